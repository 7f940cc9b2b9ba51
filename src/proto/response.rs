//! The server's response writer. Byte for byte what Cyrus 3.6 sends: data values always as
//! non-synchronising `{n+}` literals (imap/mupdate.c `cmd_find`), status texts as quoted strings
//! where Cyrus quotes them, and the banner lines in Cyrus's order (imap/mupdate.c:973-1016).

/// A status response kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    No,
    Bad,
}

impl Status {
    fn word(self) -> &'static [u8] {
        match self {
            Status::Ok => b"OK",
            Status::No => b"NO",
            Status::Bad => b"BAD",
        }
    }
}

/// `tag OK "text"\r\n` (and NO/BAD). `text` must not contain `"` or `\`: every fixed text
/// does not.
pub fn tagged(out: &mut Vec<u8>, tag: &[u8], status: Status, text: &str) {
    debug_assert!(!text.contains(['"', '\\']));
    out.reserve(tag.len() + text.len() + 9);
    out.extend_from_slice(tag);
    out.push(b' ');
    out.extend_from_slice(status.word());
    out.extend_from_slice(b" \"");
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(b"\"\r\n");
}

/// A tagged response with an unquoted atom-text, as Cyrus sends a few (spec §5 item 26), e.g.
/// `tag NO Client canceled authentication`.
pub fn tagged_atom_text(out: &mut Vec<u8>, tag: &[u8], status: Status, text: &[u8]) {
    out.extend_from_slice(tag);
    out.push(b' ');
    out.extend_from_slice(status.word());
    out.push(b' ');
    out.extend_from_slice(text);
    out.extend_from_slice(b"\r\n");
}

/// `* BYE "text"\r\n`.
pub fn bye(out: &mut Vec<u8>, text: &str) {
    tagged_like(out, b"* BYE \"", text);
}

fn tagged_like(out: &mut Vec<u8>, head: &[u8], text: &str) {
    out.extend_from_slice(head);
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(b"\"\r\n");
}

/// What the connection-cap refusal sends: 24 bytes plus the C string terminator, which Cyrus
/// writes too (imap/mupdate.c:60, 944-958; spec §6 case 49). Reproduced because clients may
/// have learned to expect it.
pub const SERVER_UNABLE: &[u8] = b"* BYE \"Server Unable\"\r\n\0";

/// A non-synchronising literal, `{n+}\r\n<bytes>` (also what Cyrus's dlist printer writes).
pub fn push_literal(out: &mut Vec<u8>, value: &[u8]) {
    out.push(b'{');
    push_decimal(out, value.len() as u64);
    out.extend_from_slice(b"+}\r\n");
    out.extend_from_slice(value);
}

/// Unsigned decimal without allocation (hot path of LIST, UPDATE and dumps).
pub fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// A literal of several pieces written back to back.
fn push_literal_parts(out: &mut Vec<u8>, parts: &[&[u8]]) {
    out.push(b'{');
    push_decimal(out, parts.iter().map(|p| p.len() as u64).sum());
    out.extend_from_slice(b"+}\r\n");
    for p in parts {
        out.extend_from_slice(p);
    }
}

/// `tag MAILBOX {n+}\r\nname {n+}\r\nlocation {n+}\r\nacl\r\n`.
pub fn mailbox(out: &mut Vec<u8>, tag: &[u8], name: &[u8], location: &[u8], acl: &[u8]) {
    mailbox_parts(out, tag, name, &[location], acl);
}

/// [`mailbox`] with the location given in pieces (server, `!`, partition).
pub fn mailbox_parts(out: &mut Vec<u8>, tag: &[u8], name: &[u8], location: &[&[u8]], acl: &[u8]) {
    out.reserve(tag.len() + name.len() + acl.len() + 64);
    out.extend_from_slice(tag);
    out.extend_from_slice(b" MAILBOX ");
    push_literal(out, name);
    out.push(b' ');
    push_literal_parts(out, location);
    out.push(b' ');
    push_literal(out, acl);
    out.extend_from_slice(b"\r\n");
}

/// `tag RESERVE {n+}\r\nname {n+}\r\nlocation\r\n`.
pub fn reserve(out: &mut Vec<u8>, tag: &[u8], name: &[u8], location: &[u8]) {
    reserve_parts(out, tag, name, &[location]);
}

/// [`reserve`] with the location given in pieces.
pub fn reserve_parts(out: &mut Vec<u8>, tag: &[u8], name: &[u8], location: &[&[u8]]) {
    out.reserve(tag.len() + name.len() + 48);
    out.extend_from_slice(tag);
    out.extend_from_slice(b" RESERVE ");
    push_literal(out, name);
    out.push(b' ');
    push_literal_parts(out, location);
    out.extend_from_slice(b"\r\n");
}

/// `tag DELETE {n+}\r\nname\r\n`.
pub fn delete(out: &mut Vec<u8>, tag: &[u8], name: &[u8]) {
    out.extend_from_slice(tag);
    out.extend_from_slice(b" DELETE ");
    push_literal(out, name);
    out.extend_from_slice(b"\r\n");
}

/// `+ go ahead\r\n`, the continuation for a synchronising literal (imapparse.c:155-161).
pub const GO_AHEAD: &[u8] = b"+ go ahead\r\n";

/// The server's role, shown last in the banner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Master,
    /// A slave shows `mupdate://<mupdate_server as configured>` (no trailing `/`, as Cyrus).
    Slave {
        upstream: String,
    },
}

/// Everything the banner shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Banner {
    /// SASL mechanism names, strongest first; each is sent in double quotes, as Cyrus does.
    pub mechanisms: Vec<String>,
    pub starttls: bool,
    pub compress: bool,
    pub servername: String,
    pub implementation: String,
    pub version: String,
    pub role: Role,
}

impl Banner {
    /// The banner lines in Cyrus's order: `* AUTH`, `* STARTTLS`, `* COMPRESS "DEFLATE"`,
    /// `* PARTIAL-UPDATE`, `* OK MUPDATE …`.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"* AUTH");
        for m in &self.mechanisms {
            out.extend_from_slice(b" \"");
            out.extend_from_slice(m.as_bytes());
            out.push(b'"');
        }
        out.extend_from_slice(b"\r\n");
        if self.starttls {
            out.extend_from_slice(b"* STARTTLS\r\n");
        }
        if self.compress {
            out.extend_from_slice(b"* COMPRESS \"DEFLATE\"\r\n");
        }
        out.extend_from_slice(b"* PARTIAL-UPDATE\r\n");
        let role = match &self.role {
            Role::Master => "(master)".to_string(),
            Role::Slave { upstream } => format!("mupdate://{upstream}"),
        };
        let line = format!(
            "* OK MUPDATE \"{}\" \"{}\" \"{}\" \"{}\"\r\n",
            self.servername, self.implementation, self.version, role
        );
        out.extend_from_slice(line.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_lines_match_cyrus() {
        // cyrus-mupdate.md §6 cases 29 and 31.
        let mut out = Vec::new();
        reserve(&mut out, b"r2", b"user.fred", b"hostA!p1");
        assert_eq!(out, b"r2 RESERVE {9+}\r\nuser.fred {8+}\r\nhostA!p1\r\n");
        out.clear();
        mailbox(
            &mut out,
            b"r6",
            b"user.fred",
            b"hostA!p1",
            b"fred\tlrswipkxtecda\tanyone\tlrs\t",
        );
        assert_eq!(
            out,
            &b"r6 MAILBOX {9+}\r\nuser.fred {8+}\r\nhostA!p1 {30+}\r\nfred\tlrswipkxtecda\tanyone\tlrs\t\r\n"[..]
        );
        out.clear();
        delete(&mut out, b"P1", b"user.r");
        assert_eq!(out, b"P1 DELETE {6+}\r\nuser.r\r\n");
        out.clear();
        mailbox(&mut out, b"x", b"a", b"b", b"");
        assert_eq!(out, b"x MAILBOX {1+}\r\na {1+}\r\nb {0+}\r\n\r\n");
    }

    #[test]
    fn banner_order() {
        let b = Banner {
            mechanisms: vec!["PLAIN".into()],
            starttls: false,
            compress: false,
            servername: "m".into(),
            implementation: "mupdate".into(),
            version: "0.1.0".into(),
            role: Role::Master,
        };
        let mut out = Vec::new();
        b.write(&mut out);
        assert_eq!(
            out,
            b"* AUTH \"PLAIN\"\r\n* PARTIAL-UPDATE\r\n* OK MUPDATE \"m\" \"mupdate\" \"0.1.0\" \"(master)\"\r\n"
        );
    }

    #[test]
    fn decimal() {
        for n in [0u64, 9, 10, 131072, u64::MAX] {
            let mut out = Vec::new();
            push_decimal(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
        }
    }
}
