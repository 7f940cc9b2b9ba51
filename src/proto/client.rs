//! The client side of the codec: command encoding as Cyrus's client sends it
//! (imap/mupdate-client.c: every argument a `{n+}` literal, tags chosen by the caller) and a
//! response decoder for every line a server sends (banner capabilities, status responses,
//! MAILBOX/RESERVE/DELETE records). Used by the blocking client, the tools and the tests.

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

/// Decode one response from the front of `buf`: `Ok(None)` when more input is needed,
/// else the response and the number of bytes it used.
pub fn decode(buf: &[u8]) -> Result<Option<(Response, usize)>, DecodeError> {
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

impl Reader<'_> {
    fn peek(&self) -> Result<u8, Failure> {
        self.buf.get(self.pos).copied().ok_or(Failure::Incomplete)
    }

    fn next(&mut self) -> Result<u8, Failure> {
        let c = self.peek()?;
        self.pos += 1;
        Ok(c)
    }

    fn word(&mut self) -> Result<Vec<u8>, Failure> {
        let start = self.pos;
        while !matches!(self.peek()?, b' ' | b'\r' | b'\n') {
            self.pos += 1;
        }
        Ok(self.buf[start..self.pos].to_vec())
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

    fn rest_of_line(&mut self) -> Result<Vec<u8>, Failure> {
        let start = self.pos;
        while self.peek()? != b'\n' {
            self.pos += 1;
        }
        let line = &self.buf[start..self.pos];
        self.pos += 1;
        Ok(line.strip_suffix(b"\r").unwrap_or(line).to_vec())
    }

    /// A quoted string or a `{n}` / `{n+}` literal.
    fn string(&mut self) -> Result<Vec<u8>, Failure> {
        match self.next()? {
            b'"' => {
                let mut s = Vec::new();
                loop {
                    match self.next()? {
                        b'\\' => s.push(self.next()?),
                        b'"' => return Ok(s),
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
                let data = self.buf[self.pos..self.pos + len].to_vec();
                self.pos += len;
                Ok(data)
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

    fn response(&mut self) -> Result<Response, Failure> {
        if self.peek()? == b'+' {
            self.rest_of_line()?;
            return Ok(Response::Continue);
        }
        let tag = self.word()?;
        if self.peek()? != b' ' {
            return Err(Failure::Bad("missing keyword"));
        }
        self.pos += 1;
        let keyword = self.word()?.to_ascii_uppercase();
        let status = match &keyword[..] {
            b"OK" => Some(StatusKind::Ok),
            b"NO" => Some(StatusKind::No),
            b"BAD" => Some(StatusKind::Bad),
            b"BYE" => Some(StatusKind::Bye),
            _ => None,
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
                        let mut rest = s;
                        rest.push(b' ');
                        rest.extend(self.rest_of_line()?);
                        rest
                    }
                } else {
                    self.rest_of_line()?
                }
            } else {
                self.end_of_line()?;
                Vec::new()
            };
            return Ok(Response::Status { tag, kind, text });
        }
        match &keyword[..] {
            b"MAILBOX" => {
                self.space()?;
                let name = self.string()?;
                self.space()?;
                let location = self.string()?;
                self.space()?;
                let acl = self.string()?;
                self.end_of_line()?;
                Ok(Response::Mailbox {
                    tag,
                    name,
                    location,
                    acl,
                })
            }
            b"RESERVE" => {
                self.space()?;
                let name = self.string()?;
                self.space()?;
                let location = self.string()?;
                self.end_of_line()?;
                Ok(Response::Reserve {
                    tag,
                    name,
                    location,
                })
            }
            b"DELETE" => {
                self.space()?;
                let name = self.string()?;
                self.end_of_line()?;
                Ok(Response::Delete { tag, name })
            }
            _ if tag == b"*" => {
                let mut args = Vec::new();
                while self.peek()? == b' ' {
                    self.pos += 1;
                    if matches!(self.peek()?, b'"' | b'{') {
                        args.push(self.string()?);
                    } else {
                        args.push(self.word()?);
                    }
                }
                self.end_of_line()?;
                Ok(Response::Capability {
                    name: keyword,
                    args,
                })
            }
            _ => Err(Failure::Bad("unknown response keyword")),
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
