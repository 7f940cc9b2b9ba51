//! The client side of the codec: command encoding as Cyrus's client sends it
//! (imap/mupdate-client.c: every argument a `{n+}` literal, tags chosen by the caller) and a
//! response decoder for every line a server sends (banner capabilities, status responses,
//! MAILBOX/RESERVE/DELETE records). Used by the blocking client, the tools and the tests.

use std::borrow::Cow;

/// A decoded server line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// `tag OK|NO|BAD|BYE text`; `text` is the string's content, or the raw atom-text Cyrus
    /// sends for a few responses (`NO Client canceled authentication`).
    Status {
        tag: Vec<u8>,
        kind: StatusKind,
        text: Vec<u8>,
    },
    Mailbox {
        tag: Vec<u8>,
        name: Vec<u8>,
        location: Vec<u8>,
        acl: Vec<u8>,
    },
    Reserve {
        tag: Vec<u8>,
        name: Vec<u8>,
        location: Vec<u8>,
    },
    Delete {
        tag: Vec<u8>,
        name: Vec<u8>,
    },
    /// A banner capability line: `* AUTH …`, `* STARTTLS`, `* COMPRESS …`, `* PARTIAL-UPDATE`,
    /// or any other untagged line the client should ignore (RFC 3656 §3.8).
    Capability {
        name: Vec<u8>,
        args: Vec<Vec<u8>>,
    },
    /// `+ …` continuation.
    Continue,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusKind {
    Ok,
    No,
    Bad,
    Bye,
}

/// A line the decoder cannot read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("protocol error: {why} in line {line:?}")]
pub struct DecodeError {
    pub why: &'static str,
    pub line: String,
}

/// Upper bound on one literal the client accepts (a server could announce anything).
pub const MAX_CLIENT_LITERAL: u64 = 64 * 1024 * 1024;

/// A decoded server line borrowing from the input buffer: what [`decode_ref`] returns, so that
/// a client reading a 100k-record LIST or UPDATE dump allocates nothing per record. Strings are
/// borrowed except quoted strings with `\` escapes (and the banner's multi-string text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResponseRef<'a> {
    Status {
        tag: &'a [u8],
        kind: StatusKind,
        text: Cow<'a, [u8]>,
    },
    Mailbox {
        tag: &'a [u8],
        name: Cow<'a, [u8]>,
        location: Cow<'a, [u8]>,
        acl: Cow<'a, [u8]>,
    },
    Reserve {
        tag: &'a [u8],
        name: Cow<'a, [u8]>,
        location: Cow<'a, [u8]>,
    },
    Delete {
        tag: &'a [u8],
        name: Cow<'a, [u8]>,
    },
    /// As [`Response::Capability`]; `name` is upper-cased.
    Capability {
        name: Cow<'a, [u8]>,
        args: Vec<Cow<'a, [u8]>>,
    },
    Continue,
}

impl ResponseRef<'_> {
    /// The owned form, as [`decode`] returns it.
    pub fn into_owned(self) -> Response {
        match self {
            ResponseRef::Status { tag, kind, text } => Response::Status {
                tag: tag.to_vec(),
                kind,
                text: text.into_owned(),
            },
            ResponseRef::Mailbox {
                tag,
                name,
                location,
                acl,
            } => Response::Mailbox {
                tag: tag.to_vec(),
                name: name.into_owned(),
                location: location.into_owned(),
                acl: acl.into_owned(),
            },
            ResponseRef::Reserve {
                tag,
                name,
                location,
            } => Response::Reserve {
                tag: tag.to_vec(),
                name: name.into_owned(),
                location: location.into_owned(),
            },
            ResponseRef::Delete { tag, name } => Response::Delete {
                tag: tag.to_vec(),
                name: name.into_owned(),
            },
            ResponseRef::Capability { name, args } => Response::Capability {
                name: name.into_owned(),
                args: args.into_iter().map(Cow::into_owned).collect(),
            },
            ResponseRef::Continue => Response::Continue,
        }
    }
}

/// Decode one response from the front of `buf`: `Ok(None)` when more input is needed,
/// else the response and the number of bytes it used.
pub fn decode(buf: &[u8]) -> Result<Option<(Response, usize)>, DecodeError> {
    Ok(decode_ref(buf)?.map(|(r, n)| (r.into_owned(), n)))
}

/// [`decode`] without copying: the response borrows from `buf`.
pub fn decode_ref(buf: &[u8]) -> Result<Option<(ResponseRef<'_>, usize)>, DecodeError> {
    let mut r = Reader { buf, pos: 0 };
    match r.response() {
        Ok(resp) => Ok(Some((resp, r.pos))),
        Err(Failure::Incomplete) => Ok(None),
        Err(Failure::Bad(why)) => {
            let end = buf
                .iter()
                .position(|&b| b == b'\n')
                .unwrap_or(buf.len())
                .min(200);
            Err(DecodeError {
                why,
                line: super::escape(&buf[..end]),
            })
        }
    }
}

/// One raw line (for SASL challenges): the line without its CRLF (or LF), and bytes used.
pub fn decode_line(buf: &[u8]) -> Option<(&[u8], usize)> {
    let nl = buf.iter().position(|&b| b == b'\n')?;
    let line = &buf[..nl];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    Some((line, nl + 1))
}

enum Failure {
    Incomplete,
    Bad(&'static str),
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn peek(&self) -> Result<u8, Failure> {
        self.buf.get(self.pos).copied().ok_or(Failure::Incomplete)
    }

    fn next(&mut self) -> Result<u8, Failure> {
        let c = self.peek()?;
        self.pos += 1;
        Ok(c)
    }

    fn word(&mut self) -> Result<&'a [u8], Failure> {
        let start = self.pos;
        while !matches!(self.peek()?, b' ' | b'\r' | b'\n') {
            self.pos += 1;
        }
        Ok(&self.buf[start..self.pos])
    }

    fn end_of_line(&mut self) -> Result<(), Failure> {
        if self.peek()? == b'\r' {
            self.pos += 1;
        }
        match self.next()? {
            b'\n' => Ok(()),
            _ => Err(Failure::Bad("trailing data")),
        }
    }

    fn rest_of_line(&mut self) -> Result<&'a [u8], Failure> {
        let start = self.pos;
        while self.peek()? != b'\n' {
            self.pos += 1;
        }
        let line = &self.buf[start..self.pos];
        self.pos += 1;
        Ok(line.strip_suffix(b"\r").unwrap_or(line))
    }

    /// A quoted string or a `{n}` / `{n+}` literal.
    fn string(&mut self) -> Result<Cow<'a, [u8]>, Failure> {
        match self.next()? {
            b'"' => {
                let start = self.pos;
                // Borrow unless an escape forces a copy.
                loop {
                    match self.next()? {
                        b'\\' => break,
                        b'"' => return Ok(Cow::Borrowed(&self.buf[start..self.pos - 1])),
                        b'\r' | b'\n' => return Err(Failure::Bad("unterminated quoted string")),
                        _ => {}
                    }
                }
                let mut s = self.buf[start..self.pos - 1].to_vec();
                s.push(self.next()?);
                loop {
                    match self.next()? {
                        b'\\' => s.push(self.next()?),
                        b'"' => return Ok(Cow::Owned(s)),
                        b'\r' | b'\n' => return Err(Failure::Bad("unterminated quoted string")),
                        c => s.push(c),
                    }
                }
            }
            b'{' => {
                let mut len: u64 = 0;
                let mut digits = 0;
                while self.peek()?.is_ascii_digit() {
                    len = len * 10 + u64::from(self.next()? - b'0');
                    digits += 1;
                    if len > MAX_CLIENT_LITERAL {
                        return Err(Failure::Bad("literal too large"));
                    }
                }
                if digits == 0 {
                    return Err(Failure::Bad("bad literal length"));
                }
                if self.peek()? == b'+' {
                    self.pos += 1;
                }
                if self.next()? != b'}' {
                    return Err(Failure::Bad("bad literal header"));
                }
                if self.peek()? == b'\r' {
                    self.pos += 1;
                }
                if self.next()? != b'\n' {
                    return Err(Failure::Bad("bad literal header"));
                }
                let len = len as usize;
                if self.buf.len() - self.pos < len {
                    return Err(Failure::Incomplete);
                }
                let data = &self.buf[self.pos..self.pos + len];
                self.pos += len;
                Ok(Cow::Borrowed(data))
            }
            _ => Err(Failure::Bad("expected a string")),
        }
    }

    fn space(&mut self) -> Result<(), Failure> {
        match self.next()? {
            b' ' => Ok(()),
            _ => Err(Failure::Bad("expected a space")),
        }
    }

    fn response(&mut self) -> Result<ResponseRef<'a>, Failure> {
        if self.peek()? == b'+' {
            self.rest_of_line()?;
            return Ok(ResponseRef::Continue);
        }
        let tag = self.word()?;
        if self.peek()? != b' ' {
            return Err(Failure::Bad("missing keyword"));
        }
        self.pos += 1;
        let keyword = self.word()?;
        let is = |k: &[u8]| keyword.eq_ignore_ascii_case(k);
        let status = if is(b"OK") {
            Some(StatusKind::Ok)
        } else if is(b"NO") {
            Some(StatusKind::No)
        } else if is(b"BAD") {
            Some(StatusKind::Bad)
        } else if is(b"BYE") {
            Some(StatusKind::Bye)
        } else {
            None
        };
        if let Some(kind) = status {
            let text = if self.peek()? == b' ' {
                self.pos += 1;
                if matches!(self.peek()?, b'"' | b'{') {
                    let s = self.string()?;
                    // `* OK MUPDATE "server" …` carries more strings: keep the whole line.
                    if matches!(self.peek()?, b'\r' | b'\n') {
                        self.end_of_line()?;
                        s
                    } else {
                        let mut rest = s.into_owned();
                        rest.push(b' ');
                        rest.extend_from_slice(self.rest_of_line()?);
                        Cow::Owned(rest)
                    }
                } else {
                    Cow::Borrowed(self.rest_of_line()?)
                }
            } else {
                self.end_of_line()?;
                Cow::Borrowed(&b""[..])
            };
            return Ok(ResponseRef::Status { tag, kind, text });
        }
        if is(b"MAILBOX") {
            self.space()?;
            let name = self.string()?;
            self.space()?;
            let location = self.string()?;
            self.space()?;
            let acl = self.string()?;
            self.end_of_line()?;
            Ok(ResponseRef::Mailbox {
                tag,
                name,
                location,
                acl,
            })
        } else if is(b"RESERVE") {
            self.space()?;
            let name = self.string()?;
            self.space()?;
            let location = self.string()?;
            self.end_of_line()?;
            Ok(ResponseRef::Reserve {
                tag,
                name,
                location,
            })
        } else if is(b"DELETE") {
            self.space()?;
            let name = self.string()?;
            self.end_of_line()?;
            Ok(ResponseRef::Delete { tag, name })
        } else if tag == b"*" {
            let mut args = Vec::new();
            while self.peek()? == b' ' {
                self.pos += 1;
                if matches!(self.peek()?, b'"' | b'{') {
                    args.push(self.string()?);
                } else {
                    args.push(Cow::Borrowed(self.word()?));
                }
            }
            self.end_of_line()?;
            let name = if keyword.iter().any(u8::is_ascii_lowercase) {
                Cow::Owned(keyword.to_ascii_uppercase())
            } else {
                Cow::Borrowed(keyword)
            };
            Ok(ResponseRef::Capability { name, args })
        } else {
            Err(Failure::Bad("unknown response keyword"))
        }
    }
}

/// Encode `tag VERB arg…` with every argument a `{n+}` literal, as Cyrus's client does.
pub fn encode_command(out: &mut Vec<u8>, tag: &[u8], verb: &str, args: &[&[u8]]) {
    out.extend_from_slice(tag);
    out.push(b' ');
    out.extend_from_slice(verb.as_bytes());
    for arg in args {
        out.extend_from_slice(b" {");
        out.extend_from_slice(arg.len().to_string().as_bytes());
        out.extend_from_slice(b"+}\r\n");
        out.extend_from_slice(arg);
    }
    out.extend_from_slice(b"\r\n");
}

/// `tag AUTHENTICATE "MECH" {n+}\r\n<base64>\r\n` (or with no initial response).
pub fn encode_authenticate(out: &mut Vec<u8>, tag: &[u8], mechanism: &str, initial: Option<&[u8]>) {
    use base64::Engine as _;
    out.extend_from_slice(tag);
    out.extend_from_slice(b" AUTHENTICATE \"");
    out.extend_from_slice(mechanism.as_bytes());
    out.push(b'"');
    if let Some(ir) = initial {
        let b64 = base64::engine::general_purpose::STANDARD.encode(ir);
        out.extend_from_slice(format!(" {{{}+}}\r\n", b64.len()).as_bytes());
        out.extend_from_slice(b64.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

/// What a banner announced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BannerInfo {
    pub mechanisms: Vec<String>,
    pub starttls: bool,
    pub compress: bool,
    pub partial_update: bool,
    /// The `* OK` line's text after `OK `.
    pub greeting: Vec<u8>,
}

impl BannerInfo {
    /// Fold one banner response in; true when it was the final `* OK` line.
    pub fn absorb(&mut self, response: &Response) -> bool {
        match response {
            Response::Capability { name, args } => {
                match &name[..] {
                    b"AUTH" => {
                        self.mechanisms = args
                            .iter()
                            .map(|a| String::from_utf8_lossy(a).into_owned())
                            .collect()
                    }
                    b"STARTTLS" => self.starttls = true,
                    b"COMPRESS" => self.compress = true,
                    b"PARTIAL-UPDATE" => self.partial_update = true,
                    _ => {}
                }
                false
            }
            Response::Status {
                kind: StatusKind::Ok,
                text,
                ..
            } => {
                self.greeting = text.clone();
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(input: &[u8]) -> Response {
        let (r, n) = decode(input).unwrap().unwrap();
        assert_eq!(
            n,
            input.len(),
            "consumed all of {:?}",
            crate::proto::escape(input)
        );
        r
    }

    #[test]
    fn decodes_records() {
        assert_eq!(
            one(b"r6 MAILBOX {9+}\r\nuser.fred {8+}\r\nhostA!p1 {4+}\r\na\tl\t\r\n"),
            Response::Mailbox {
                tag: b"r6".to_vec(),
                name: b"user.fred".to_vec(),
                location: b"hostA!p1".to_vec(),
                acl: b"a\tl\t".to_vec()
            }
        );
        assert_eq!(
            one(b"U DELETE \"x y\"\r\n"),
            Response::Delete {
                tag: b"U".to_vec(),
                name: b"x y".to_vec()
            }
        );
        assert_eq!(
            one(b"a NO Client canceled authentication\r\n"),
            Response::Status {
                tag: b"a".to_vec(),
                kind: StatusKind::No,
                text: b"Client canceled authentication".to_vec()
            }
        );
    }

    #[test]
    fn borrowed_decode_matches_owned() {
        let inputs: &[&[u8]] = &[
            b"r6 MAILBOX {9+}\r\nuser.fred {8+}\r\nhostA!p1 {4+}\r\na\tl\t\r\n",
            b"U DELETE \"x\\\"y\\\\z\"\r\n",
            b"t reserve \"n\" \"h!p\"\n",
            b"* ok MUPDATE \"m\" \"Cyrus IMAP\"\r\n",
            b"a NO Client canceled authentication\r\n",
            b"* auth \"PLAIN\" LOGIN\r\n",
            b"+ go\r\n",
            b"x OK\r\n",
        ];
        for input in inputs {
            let (r, n) = decode_ref(input).unwrap().unwrap();
            assert_eq!(n, input.len());
            let (owned, m) = decode(input).unwrap().unwrap();
            assert_eq!(m, n);
            assert_eq!(r.into_owned(), owned);
        }
        // Escapes are resolved; plain strings and literals borrow.
        match decode_ref(b"U DELETE \"x\\\"y\"\r\n").unwrap().unwrap().0 {
            ResponseRef::Delete { name, .. } => assert_eq!(&name[..], b"x\"y"),
            other => panic!("{other:?}"),
        }
        match decode_ref(b"t MAILBOX \"a\" {1+}\r\nb \"\"\r\n")
            .unwrap()
            .unwrap()
            .0
        {
            ResponseRef::Mailbox {
                name,
                location,
                acl,
                ..
            } => {
                assert!(matches!(name, Cow::Borrowed(b"a")));
                assert!(matches!(location, Cow::Borrowed(b"b")));
                assert!(matches!(acl, Cow::Borrowed(b"")));
            }
            other => panic!("{other:?}"),
        }
        match decode(b"* auth \"PLAIN\"\r\n").unwrap().unwrap().0 {
            Response::Capability { name, .. } => assert_eq!(name, b"AUTH"),
            other => panic!("{other:?}"),
        }
        assert!(decode_ref(b"x MAILBOX \"a\r\n").is_err());
        assert!(decode_ref(b"x FROB \"a\"\r\n").is_err());
    }

    #[test]
    fn incomplete_until_whole() {
        let full = b"r2 RESERVE {9+}\r\nuser.fred {8+}\r\nhostA!p1\r\n";
        for cut in 0..full.len() {
            assert_eq!(decode(&full[..cut]).unwrap(), None, "cut at {cut}");
        }
    }

    #[test]
    fn banner() {
        let mut info = BannerInfo::default();
        let lines: &[&[u8]] = &[
            b"* AUTH \"PLAIN\" \"LOGIN\"\r\n",
            b"* PARTIAL-UPDATE\r\n",
            b"* OK MUPDATE \"m\" \"Cyrus IMAP\" \"3.6.1\" \"(master)\"\r\n",
        ];
        let mut done = false;
        for l in lines {
            done = info.absorb(&one(l));
        }
        assert!(done && info.partial_update);
        assert_eq!(info.mechanisms, ["PLAIN", "LOGIN"]);
        assert_eq!(
            info.greeting,
            b"MUPDATE \"m\" \"Cyrus IMAP\" \"3.6.1\" \"(master)\"".to_vec()
        );
    }

    #[test]
    fn encodes_like_cyrus_client() {
        let mut out = Vec::new();
        encode_command(
            &mut out,
            b"X2",
            "ACTIVATE",
            &[b"user.bob", b"rback!default", b"bob\tl\t"],
        );
        assert_eq!(
            out,
            b"X2 ACTIVATE {8+}\r\nuser.bob {13+}\r\nrback!default {6+}\r\nbob\tl\t\r\n"
        );
        out.clear();
        encode_command(&mut out, b"Q01", "LOGOUT", &[]);
        assert_eq!(out, b"Q01 LOGOUT\r\n");
    }
}
