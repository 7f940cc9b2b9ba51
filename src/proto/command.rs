//! The server-side command parser: Cyrus 3.6's `docmd` (3.6.5:imap/mupdate.c:648-960) and its
//! lexer (`getword`, `getxstring`, 3.6.5:imap/imapparse.c) ported to a byte buffer.
//!
//! The parser is resumable by re-running: [`parse`] looks at the buffered bytes from the start
//! of the current command and either needs more input, asks for a `+ go ahead` continuation, or
//! returns a finished command (or the error reply Cyrus would give) with the number of bytes it
//! consumed and how the rest of the line must be skipped. Re-parsing a bounded command is cheap,
//! and keeping no partial state makes the parser easy to test exhaustively.
//!
//! Where Cyrus exits the whole daemon (an oversized word, quoted string or `{N+}` literal) we
//! answer a tagged `BAD "[TOOBIG] …"` with Cyrus's own texts and skip exactly the refused input.
//! Where Cyrus swallows the next line (an oversized synchronising `{N}`), we keep its reply and
//! treat the next line as a new command (cyrus-mupdate.md §5, "Suggested approach").

use super::skip::LineSkipper;
use super::Limits;

/// A parsed MUPDATE command. Every argument is an RFC 3656 string (quoted or literal).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Authenticate {
        mechanism: Vec<u8>,
        initial: Option<Vec<u8>>,
    },
    Logout,
    Noop,
    Find {
        name: Vec<u8>,
    },
    List {
        prefix: Option<Vec<u8>>,
    },
    /// `UPDATE` with no hosts, or PARTIAL-UPDATE with up to [`MAX_UPDATE_HOSTS`].
    Update {
        hosts: Vec<Vec<u8>>,
    },
    Reserve {
        name: Vec<u8>,
        location: Vec<u8>,
    },
    Activate {
        name: Vec<u8>,
        location: Vec<u8>,
        acl: Vec<u8>,
    },
    Deactivate {
        name: Vec<u8>,
        location: Vec<u8>,
    },
    Delete {
        name: Vec<u8>,
    },
    Starttls,
}

impl Command {
    /// RESERVE, ACTIVATE, DEACTIVATE and DELETE.
    pub fn is_write(&self) -> bool {
        matches!(
            self,
            Command::Reserve { .. }
                | Command::Activate { .. }
                | Command::Deactivate { .. }
                | Command::Delete { .. }
        )
    }
}

/// PARTIAL-UPDATE host limit (imap/mupdate.c `counter = 30`).
pub const MAX_UPDATE_HOSTS: usize = 30;

/// Connection facts the parser needs: Cyrus checks login before it parses arguments.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ParseState {
    pub authenticated: bool,
    /// How many synchronising literals of the current command already got `+ go ahead`.
    pub literals_acked: usize,
}

/// What the caller does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parse {
    /// The command is not complete: read more and call again with the longer buffer.
    Incomplete,
    /// Send `+ go ahead\r\n`, count it in [`ParseState::literals_acked`], call again.
    GoAhead,
    Done(Parsed),
}

/// A finished step: `consumed` bytes of the buffer are used up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub consumed: usize,
    pub outcome: Outcome,
    /// `Some` when the rest of the line must be skipped (Cyrus's `eatline`) before the next
    /// command; feed the bytes after `consumed` to it.
    pub skip: Option<LineSkipper>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Command {
        tag: Vec<u8>,
        command: Command,
    },
    /// The parser's own answer (a complete response line), e.g. `a BAD "Extra arguments"`.
    Reply(Vec<u8>),
}

/// The byte after a token, as Cyrus's lexer returns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ch {
    /// A consumed byte.
    Byte(u8),
    /// `EOF` from a failed token; the offending byte (if any) is still unread.
    Fail,
    /// `IMAP_LITERAL_TOO_LARGE`: an oversized synchronising literal header, consumed through its
    /// CRLF, with no continuation sent.
    TooLarge,
}

/// Why the lexer stopped early.
enum Stop {
    Incomplete,
    GoAhead,
    /// A limit Cyrus treats as fatal; reply and skip.
    TooBig {
        text: &'static str,
        skip: LineSkipper,
    },
}

/// A refusal that skips the rest of the line from where the limit was hit.
fn too_big(text: &'static str) -> Stop {
    Stop::TooBig {
        text,
        skip: LineSkipper::new(),
    }
}

const WORD_TOO_LONG: &str = "[TOOBIG] Word too long";
const QUOTED_TOO_LONG: &str = "[TOOBIG] Quoted value too long";
const LITERAL_TOO_LARGE: &str = "[TOOBIG] Literal size exceeds fixed limit";
const COMMAND_TOO_LONG: &str = "[TOOBIG] Command too long";

/// Parse the next command from `buf`, which starts at the beginning of a command.
pub fn parse(buf: &[u8], state: ParseState, limits: &Limits) -> Parse {
    let mut lx = Lexer {
        buf,
        pos: 0,
        limits,
        acked: state.literals_acked,
        sync_seen: 0,
        tag: None,
    };
    match lx.command(state.authenticated) {
        Ok((outcome, ch)) => {
            let skip = lx.eatline(ch);
            Parse::Done(Parsed {
                consumed: lx.pos,
                outcome,
                skip,
            })
        }
        Err(Stop::Incomplete) => {
            if buf.len() > limits.max_command {
                // Only reachable between bounded tokens: refuse and skip the line.
                let tag = lx.tag.clone();
                Parse::Done(Parsed {
                    consumed: buf.len(),
                    outcome: Outcome::Reply(tagged_bad(tag.as_deref(), COMMAND_TOO_LONG)),
                    skip: Some(LineSkipper::new()),
                })
            } else {
                Parse::Incomplete
            }
        }
        Err(Stop::GoAhead) => Parse::GoAhead,
        Err(Stop::TooBig { text, skip }) => {
            let tag = lx.tag.clone();
            Parse::Done(Parsed {
                consumed: lx.pos,
                outcome: Outcome::Reply(tagged_bad(tag.as_deref(), text)),
                skip: Some(skip),
            })
        }
    }
}

fn tagged_bad(tag: Option<&[u8]>, text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + 16);
    out.extend_from_slice(tag.unwrap_or(b"*"));
    out.extend_from_slice(b" BAD \"");
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(b"\"\r\n");
    out
}

/// C `isspace` in the C locale.
fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | 0x0B | 0x0C | b'\r')
}

/// Cyrus keeps tags and command names in C strings: a NUL ends them.
fn c_string(mut word: Vec<u8>) -> Vec<u8> {
    if let Some(nul) = word.iter().position(|&b| b == 0) {
        word.truncate(nul);
    }
    word
}

struct Lexer<'a> {
    buf: &'a [u8],
    pos: usize,
    limits: &'a Limits,
    acked: usize,
    sync_seen: usize,
    tag: Option<Vec<u8>>,
}

type Lexed<T> = Result<T, Stop>;

impl Lexer<'_> {
    fn getc(&mut self) -> Lexed<u8> {
        let c = *self.buf.get(self.pos).ok_or(Stop::Incomplete)?;
        self.pos += 1;
        Ok(c)
    }

    fn unget(&mut self) {
        self.pos -= 1;
    }

    fn check_command_size(&self) -> Lexed<()> {
        if self.pos > self.limits.max_command {
            return Err(too_big(COMMAND_TOO_LONG));
        }
        Ok(())
    }

    /// `getword`: bytes up to whitespace, parentheses or a double quote.
    fn getword(&mut self) -> Lexed<(Vec<u8>, Ch)> {
        let mut word = Vec::new();
        loop {
            let c = self.getc()?;
            if is_space(c) || c == b'(' || c == b')' || c == b'"' {
                return Ok((word, Ch::Byte(c)));
            }
            word.push(c);
            if word.len() > self.limits.max_word {
                return Err(too_big(WORD_TOO_LONG));
            }
        }
    }

    /// `getstring` (getxstring with GXS_QUOTED | GXS_LITERAL, the server as `isclient`).
    fn getstring(&mut self) -> Lexed<(Vec<u8>, Ch)> {
        let result = self.getstring_inner()?;
        self.check_command_size()?;
        Ok(result)
    }

    fn getstring_inner(&mut self) -> Lexed<(Vec<u8>, Ch)> {
        let c = self.getc()?;
        match c {
            b'"' => self.quoted(),
            b'{' => self.literal(),
            _ => {
                // Not a string (atoms are not accepted): the byte stays unread.
                self.unget();
                Ok((Vec::new(), Ch::Fail))
            }
        }
    }

    fn quoted(&mut self) -> Lexed<(Vec<u8>, Ch)> {
        let mut s = Vec::new();
        loop {
            let mut c = self.getc()?;
            if c == b'\\' {
                c = self.getc()?;
            } else if c == b'"' {
                let next = self.getc()?;
                if s.contains(&0) {
                    // Cyrus would silently cut the value at the NUL; refuse it like a literal
                    // holding a NUL instead of acting on a different name.
                    self.unget();
                    return Ok((s, Ch::Fail));
                }
                return Ok((s, Ch::Byte(next)));
            } else if c == b'\r' || c == b'\n' {
                self.unget();
                return Ok((s, Ch::Fail));
            }
            s.push(c);
            if s.len() > self.limits.max_quoted {
                return Err(too_big(QUOTED_TOO_LONG));
            }
        }
    }

    fn literal(&mut self) -> Lexed<(Vec<u8>, Ch)> {
        let mut len: u64 = 0;
        let mut digits = 0;
        let mut c = self.getc()?;
        while c.is_ascii_digit() {
            len = len.saturating_mul(10).saturating_add(u64::from(c - b'0'));
            digits += 1;
            c = self.getc()?;
        }
        if digits == 0 {
            self.unget();
            return Ok((Vec::new(), Ch::Fail));
        }
        let nonsync = c == b'+';
        if nonsync {
            c = self.getc()?;
        }
        for expected in [b'}', b'\r', b'\n'] {
            if c != expected {
                self.unget();
                return Ok((Vec::new(), Ch::Fail));
            }
            if expected != b'\n' {
                c = self.getc()?;
            }
        }
        let too_large = len > self.limits.max_literal
            || (self.pos as u64).saturating_add(len) > self.limits.max_command as u64;
        if nonsync {
            if too_large {
                // The client sends the data without waiting: skip exactly those bytes.
                return Err(Stop::TooBig {
                    text: LITERAL_TOO_LARGE,
                    skip: LineSkipper::in_literal(len),
                });
            }
        } else {
            if too_large {
                return Ok((Vec::new(), Ch::TooLarge));
            }
            let index = self.sync_seen;
            self.sync_seen += 1;
            if index >= self.acked {
                return Err(Stop::GoAhead);
            }
        }
        let len = len as usize;
        if self.buf.len() - self.pos < len {
            return Err(Stop::Incomplete);
        }
        let data = self.buf[self.pos..self.pos + len].to_vec();
        self.pos += len;
        if data.contains(&0) {
            // Exactly `len` bytes are consumed either way (imapparse.c:171-175).
            return Ok((data, Ch::Fail));
        }
        let next = self.getc()?;
        Ok((data, Ch::Byte(next)))
    }

    /// `CHECKNEWLINE`: true when the line ends here (CRLF or a bare LF).
    fn at_newline(&mut self, ch: &mut Ch) -> Lexed<bool> {
        if *ch == Ch::Byte(b'\r') {
            *ch = Ch::Byte(self.getc()?);
        }
        Ok(*ch == Ch::Byte(b'\n'))
    }

    /// How the rest of the line is skipped after a reply given with lexer char `ch`.
    fn eatline(&self, ch: Ch) -> Option<LineSkipper> {
        match ch {
            Ch::Byte(b'\n') => None,
            Ch::Byte(c) => Some(LineSkipper::after_char(c)),
            Ch::Fail => Some(LineSkipper::new()),
            // Cyrus's eatline would swallow the client's next line here (the header's CRLF is
            // already consumed); that line is the client's next command.
            Ch::TooLarge => None,
        }
    }

    fn reply(&self, text: &str) -> Outcome {
        Outcome::Reply(tagged_bad(self.tag.as_deref(), text))
    }

    /// `docmd` for one command: the outcome and the lexer char to hand to `eatline`.
    fn command(&mut self, authenticated: bool) -> Lexed<(Outcome, Ch)> {
        let (tag, ch) = self.getword()?;
        if ch != Ch::Byte(b' ') {
            return Ok((Outcome::Reply(b"* BAD \"Need command\"\r\n".to_vec()), ch));
        }
        self.tag = Some(c_string(tag));
        let (word, mut ch) = self.getword()?;
        let mut word = c_string(word);
        if word.is_empty() {
            return Ok((self.reply("Null command"), ch));
        }
        word[0] = word[0].to_ascii_uppercase();
        word[1..].make_ascii_lowercase();

        macro_rules! need_space {
            () => {
                if ch != Ch::Byte(b' ') {
                    return Ok((self.reply("Missing arguments"), ch));
                }
            };
        }
        macro_rules! end_of_line {
            () => {
                if !self.at_newline(&mut ch)? {
                    return Ok((self.reply("Extra arguments"), ch));
                }
            };
        }
        macro_rules! string {
            () => {{
                let (s, next) = self.getstring()?;
                ch = next;
                s
            }};
        }
        let nologin = |lx: &Self, ch| Ok((lx.reply("Please login first"), ch));
        let badcmd = |lx: &Self, ch| Ok((lx.reply("Unrecognized command"), ch));

        let command = match (word[0], &word[..]) {
            (b'A', b"Authenticate") => {
                need_space!();
                let mechanism = string!();
                let initial = if ch == Ch::Byte(b' ') {
                    Some(string!())
                } else {
                    None
                };
                end_of_line!();
                Command::Authenticate { mechanism, initial }
            }
            (b'A' | b'D' | b'F' | b'N' | b'R' | b'U', _) if !authenticated => {
                return nologin(self, ch)
            }
            (b'A', b"Activate") => {
                need_space!();
                let name = string!();
                need_space!();
                let location = string!();
                need_space!();
                let acl = string!();
                end_of_line!();
                Command::Activate {
                    name,
                    location,
                    acl,
                }
            }
            (b'D', b"Deactivate") => {
                need_space!();
                let name = string!();
                need_space!();
                let location = string!();
                end_of_line!();
                Command::Deactivate { name, location }
            }
            (b'D', b"Delete") => {
                need_space!();
                let name = string!();
                end_of_line!();
                Command::Delete { name }
            }
            (b'F', b"Find") => {
                need_space!();
                let name = string!();
                end_of_line!();
                Command::Find { name }
            }
            (b'L', b"Logout") => {
                end_of_line!();
                Command::Logout
            }
            (b'L', _) if !authenticated => return nologin(self, ch),
            (b'L', b"List") => {
                let prefix = if ch == Ch::Byte(b' ') {
                    Some(string!())
                } else {
                    None
                };
                end_of_line!();
                Command::List { prefix }
            }
            (b'N', b"Noop") => {
                end_of_line!();
                Command::Noop
            }
            (b'R', b"Reserve") => {
                need_space!();
                let name = string!();
                need_space!();
                let location = string!();
                end_of_line!();
                Command::Reserve { name, location }
            }
            (b'S', b"Starttls") => {
                end_of_line!();
                Command::Starttls
            }
            (b'U', b"Update") => {
                let mut hosts = Vec::new();
                while ch == Ch::Byte(b' ') {
                    let host = string!();
                    if host.first().is_none_or(|&b| b == 0) {
                        return Ok((self.reply("Badly formed arguments"), ch));
                    }
                    if hosts.len() == MAX_UPDATE_HOSTS {
                        return Ok((self.reply("Extra arguments"), ch));
                    }
                    hosts.push(host);
                }
                end_of_line!();
                Command::Update { hosts }
            }
            // COMPRESS is not offered yet (it comes with the security work): as a Cyrus built
            // without zlib, it is an unknown command.
            _ => return badcmd(self, ch),
        };
        let tag = self.tag.clone().unwrap_or_default();
        Ok((Outcome::Command { tag, command }, Ch::Byte(b'\n')))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run the parser over a whole input as a server would, answering only what the parser
    /// answers itself: replies, `+ go ahead`, and `CMD <tag> <Debug>` for commands.
    fn run(input: &[u8], authenticated: bool, limits: &Limits) -> String {
        let mut out = Vec::new();
        let mut pos = 0;
        let mut state = ParseState {
            authenticated,
            literals_acked: 0,
        };
        let mut skip: Option<LineSkipper> = None;
        loop {
            if let Some(s) = skip.as_mut() {
                match s.feed(&input[pos..]) {
                    Some(n) => {
                        pos += n;
                        skip = None;
                    }
                    None => break,
                }
            }
            match parse(&input[pos..], state, limits) {
                Parse::Incomplete => break,
                Parse::GoAhead => {
                    out.extend_from_slice(crate::proto::response::GO_AHEAD);
                    state.literals_acked += 1;
                }
                Parse::Done(p) => {
                    pos += p.consumed;
                    state.literals_acked = 0;
                    skip = p.skip;
                    match p.outcome {
                        Outcome::Reply(r) => out.extend_from_slice(&r),
                        Outcome::Command { tag, command } => out.extend_from_slice(
                            format!("CMD {} {:?}\r\n", crate::proto::escape(&tag), command)
                                .as_bytes(),
                        ),
                    }
                }
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    fn auth(input: &[u8]) -> String {
        run(input, true, &Limits::default())
    }

    fn s(v: &str) -> Vec<u8> {
        v.as_bytes().to_vec()
    }

    #[test]
    fn lexical_conformance_cases() {
        // cyrus-mupdate.md §6 cases 3-7, 12, 19, 23-28.
        assert_eq!(auth(b"\r\n"), "* BAD \"Need command\"\r\n");
        assert_eq!(auth(b"tag\r\n"), "* BAD \"Need command\"\r\n");
        assert_eq!(auth(b"tag \r\n"), "tag BAD \"Null command\"\r\n");
        assert_eq!(auth(b" x NOOP\r\n"), " BAD \"Unrecognized command\"\r\n");
        assert_eq!(auth(b"a\tNOOP\r\n"), "* BAD \"Need command\"\r\n");
        assert_eq!(auth(b"a LOGOUT extra\r\n"), "a BAD \"Extra arguments\"\r\n");
        assert_eq!(
            auth(b"a AUTHENTICATE PLAIN\r\n"),
            "a BAD \"Extra arguments\"\r\n"
        );
        assert_eq!(auth(b"f3 FIND foo\r\n"), "f3 BAD \"Extra arguments\"\r\n");
        assert_eq!(
            auth(b"f4 FIND \"unterminated\r\n"),
            "f4 BAD \"Extra arguments\"\r\n"
        );
        assert_eq!(
            auth(b"f6 FIND {3+}\r\na\0b\r\n"),
            "f6 BAD \"Extra arguments\"\r\n"
        );
        assert_eq!(auth(b"f9 FIND\r\n"), "f9 BAD \"Missing arguments\"\r\n");
        assert_eq!(auth(b"f16 NOOP \r\n"), "f16 BAD \"Extra arguments\"\r\n");
        assert_eq!(
            auth(b"f13 find \"x\"\n"),
            "CMD f13 Find { name: [120] }\r\n"
        );
        assert_eq!(auth(b"* NOOP\r\n"), "CMD * Noop\r\n");
        assert_eq!(
            auth(b"r RESERVE foo \"x\"\r\n"),
            "r BAD \"Missing arguments\"\r\n"
        );
        assert_eq!(auth(b"x \"x\"\r\r\n"), "x BAD \"Null command\"\r\n");
        assert_eq!(
            auth(b"x FIND \"x\"\r\r\nb NOOP\r\n"),
            "x BAD \"Extra arguments\"\r\nCMD b Noop\r\n"
        );
    }

    #[test]
    fn pre_auth() {
        let pre = |i: &[u8]| run(i, false, &Limits::default());
        assert_eq!(pre(b"a NOOP\r\n"), "a BAD \"Please login first\"\r\n");
        assert_eq!(pre(b"a FOO\r\n"), "a BAD \"Please login first\"\r\n");
        assert_eq!(pre(b"a XYZZY\r\n"), "a BAD \"Unrecognized command\"\r\n");
        assert_eq!(
            pre(b"a CAPABILITY\r\n"),
            "a BAD \"Unrecognized command\"\r\n"
        );
        // Case 10: the {5+} literal's CRLF does not end the skipped line.
        assert_eq!(
            pre(b"a FIND {5+}\r\nab\r\nc\r\nb NOOP\r\n"),
            "a BAD \"Please login first\"\r\nb BAD \"Please login first\"\r\n"
        );
        assert_eq!(pre(b"a LOGOUT\r\n"), "CMD a Logout\r\n");
        assert_eq!(pre(b"s STARTTLS\r\n"), "CMD s Starttls\r\n");
        assert_eq!(
            pre(b"z COMPRESS \"DEFLATE\"\r\n"),
            "z BAD \"Unrecognized command\"\r\n"
        );
        assert_eq!(
            pre(b"A01 AUTHENTICATE \"PLAIN\" \"AGFkbWluAHNlY3JldA==\"\r\n"),
            "CMD A01 Authenticate { mechanism: [80, 76, 65, 73, 78], initial: Some([65, 71, 70, 107, 98, 87, 108, 117, 65, 72, 78, 108, 89, 51, 74, 108, 100, 65, 61, 61]) }\r\n"
        );
    }

    #[test]
    fn literals() {
        // Case 21: a synchronising literal gets `+ go ahead` before its data.
        assert_eq!(
            auth(b"f1 FIND {5}\r\nhello\r\n"),
            "+ go ahead\r\nCMD f1 Find { name: [104, 101, 108, 108, 111] }\r\n"
        );
        // Case 22: {n+} gets none.
        assert_eq!(
            auth(b"f2 FIND {5+}\r\nhello\r\n"),
            "CMD f2 Find { name: [104, 101, 108, 108, 111] }\r\n"
        );
        assert_eq!(
            auth(b"f FIND {0}\r\n\r\n"),
            "+ go ahead\r\nCMD f Find { name: [] }\r\n"
        );
        // The go-ahead comes even while the data is still missing, and only once.
        assert_eq!(auth(b"f FIND {5}\r\nhel"), "+ go ahead\r\n");
        let limits = Limits::default();
        let state = ParseState {
            authenticated: true,
            literals_acked: 1,
        };
        assert_eq!(
            parse(b"f FIND {5}\r\nhel", state, &limits),
            Parse::Incomplete
        );
    }

    #[test]
    fn oversized_inputs_refused_on_this_connection_only() {
        let limits = Limits {
            max_word: 8,
            max_quoted: 8,
            max_literal: 8,
            max_command: 64,
        };
        let run = |i: &[u8]| run(i, true, &limits);
        // A synchronising {N} over the limit: Cyrus's reply, no continuation, and the next
        // line is a command (Cyrus swallows it).
        assert_eq!(
            run(b"f FIND {9}\r\nb NOOP\r\n"),
            "f BAD \"Extra arguments\"\r\nCMD b Noop\r\n"
        );
        assert_eq!(
            run(b"r RESERVE {9}\r\nb NOOP\r\n"),
            "r BAD \"Missing arguments\"\r\nCMD b Noop\r\n"
        );
        // {N+} over the limit: the N bytes that follow are skipped, never parsed.
        assert_eq!(
            run(b"f FIND {9+}\r\nx NOOP\r\n \"a\"\r\nb NOOP\r\n"),
            "f BAD \"[TOOBIG] Literal size exceeds fixed limit\"\r\nCMD b Noop\r\n"
        );
        assert_eq!(
            run(b"f FIND \"123456789\"\r\nb NOOP\r\n"),
            "f BAD \"[TOOBIG] Quoted value too long\"\r\nCMD b Noop\r\n"
        );
        assert_eq!(
            run(b"f FINDXXXXXX \"1\"\r\nb NOOP\r\n"),
            "f BAD \"[TOOBIG] Word too long\"\r\nCMD b Noop\r\n"
        );
        assert_eq!(
            run(b"123456789 NOOP\r\nb NOOP\r\n"),
            "* BAD \"[TOOBIG] Word too long\"\r\nCMD b Noop\r\n"
        );
        let many: Vec<u8> = [&b"u UPDATE"[..], &b" \"h\"".repeat(20), b"\r\nb NOOP\r\n"].concat();
        assert_eq!(
            run(&many),
            "u BAD \"[TOOBIG] Command too long\"\r\nCMD b Noop\r\n"
        );
    }

    #[test]
    fn update_hosts() {
        let hosts = |n: usize| {
            let mut line = b"u UPDATE".to_vec();
            for i in 0..n {
                line.extend_from_slice(format!(" \"h{i}\"").as_bytes());
            }
            line.extend_from_slice(b"\r\n");
            auth(&line)
        };
        assert!(hosts(30).starts_with("CMD u Update"));
        assert_eq!(hosts(31), "u BAD \"Extra arguments\"\r\n");
        assert_eq!(
            auth(b"P2 UPDATE \"\"\r\n"),
            "P2 BAD \"Badly formed arguments\"\r\n"
        );
        assert_eq!(
            auth(b"P2 UPDATE foo\r\n"),
            "P2 BAD \"Badly formed arguments\"\r\n"
        );
        assert_eq!(auth(b"U01 UPDATE\r\n"), "CMD U01 Update { hosts: [] }\r\n");
    }

    #[test]
    fn arguments() {
        let out = parse(
            b"a ACTIVATE \"user.a\\\"b\" {3+}\r\nh!p \"x\\\\y\"\r\n",
            ParseState {
                authenticated: true,
                literals_acked: 0,
            },
            &Limits::default(),
        );
        let Parse::Done(Parsed {
            outcome: Outcome::Command { command, .. },
            ..
        }) = out
        else {
            panic!("{out:?}")
        };
        assert_eq!(
            command,
            Command::Activate {
                name: s("user.a\"b"),
                location: s("h!p"),
                acl: s("x\\y")
            }
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        #[test]
        fn never_panics_and_progresses(input in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300), auth in proptest::prelude::any::<bool>()) {
            let limits = Limits { max_word: 16, max_quoted: 16, max_literal: 16, max_command: 128 };
            let _ = run(&input, auth, &limits);
        }

        #[test]
        fn split_input_gives_same_answers(input in proptest::collection::vec(proptest::sample::select(b"ab \"{}+0123\r\n\\NOOPFIND".to_vec()), 0..120)) {
            // Re-parsing from the command start as input trickles in must give exactly the
            // answers of one pass over the whole input.
            let limits = Limits { max_word: 16, max_quoted: 16, max_literal: 16, max_command: 128 };
            let whole = run(&input, true, &limits);
            let mut trickled = String::new();
            let mut done_upto = 0;
            // Feed one more byte at a time; `run` on a prefix is deterministic, so the
            // answers for each prefix must extend the previous ones.
            for end in 0..=input.len() {
                let out = run(&input[..end], true, &limits);
                proptest::prop_assert!(out.starts_with(&trickled[..done_upto]), "prefix {end}: {out:?} vs {trickled:?}");
                trickled = out;
                done_upto = trickled.len();
            }
            proptest::prop_assert_eq!(trickled, whole);
        }
    }
}
