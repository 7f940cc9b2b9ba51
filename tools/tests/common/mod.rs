//! Shared test harness for the integration tests in `tools/tests/`.
//!
//! * [`cyrus`]: run the real Cyrus 3.6.1 `mupdate` (master or slave) under `cyrmaster`, capture
//!   its syslog, dump its `mailboxes.db`.
//! * [`MupdateClient`]: a tiny blocking MUPDATE client for tests (std::net only). It is
//!   deliberately independent of the product's own client in `src/client.rs`.
//! * [`OurMaster`]: our `mupdated serve`, started the same way, for interop tests.
//!
//! Every test binary compiles this module, and each uses only part of it.
#![allow(dead_code)]

pub mod cyrus;
pub mod sandbox;

use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Default I/O timeout of a test client: any single read waits at most this long.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

// ------------------------------------------------------------------------------------------
// small helpers

/// Standard base64 (RFC 4648, with padding).
pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if chunk.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

/// Printable rendering of protocol bytes (for assertion messages).
pub fn show(bytes: &[u8]) -> String {
    let mut s = String::new();
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\r' => s.push_str("\\r"),
                '\n' => s.push_str("\\n"),
                '\t' => s.push_str("\\t"),
                '\\' => s.push_str("\\\\"),
                c if c.is_control() => s.push_str(&format!("\\x{:02x}", c as u32)),
                c => s.push(c),
            }
        }
        for b in chunk.invalid() {
            s.push_str(&format!("\\x{b:02x}"));
        }
    }
    s
}

/// A non-synchronising literal `{n+}\r\n<bytes>`.
pub fn lit(bytes: &[u8]) -> Vec<u8> {
    let mut v = format!("{{{}+}}\r\n", bytes.len()).into_bytes();
    v.extend_from_slice(bytes);
    v
}

/// A free TCP port on 127.0.0.1 (bind port 0, read it back, release it).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 to pick a free port");
    l.local_addr().expect("local_addr").port()
}

/// True while `pid` exists and is not a zombie (nobody may reap daemonised processes here).
pub fn pid_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => match stat.rfind(')') {
            Some(i) => !matches!(stat[i + 1..].trim_start().chars().next(), Some('Z' | 'X')),
            None => true,
        },
        Err(_) => false,
    }
}

/// Sends `sig` to `pid`, then waits up to `grace` for it to be gone; SIGKILL after that.
pub fn terminate_pid(pid: i32, sig: i32, grace: Duration) {
    if pid <= 1 || !pid_alive(pid) {
        return;
    }
    // SAFETY: plain kill(2) on a pid this harness started.
    unsafe { libc::kill(pid, sig) };
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if !pid_alive(pid) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while pid_alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The tail (last `max` bytes) of a file, lossily decoded, for diagnostics.
pub fn file_tail(path: &Path, max: usize) -> String {
    match std::fs::read(path) {
        Ok(b) => {
            let start = b.len().saturating_sub(max);
            String::from_utf8_lossy(&b[start..]).into_owned()
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

// ------------------------------------------------------------------------------------------
// the test client

/// Kind of a data response line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Mailbox,
    Reserve,
    Delete,
}

/// One `MAILBOX` / `RESERVE` / `DELETE` response (name, location, ACL as raw bytes).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Entry {
    pub kind: Kind,
    pub name: Vec<u8>,
    /// Empty for DELETE.
    pub location: Vec<u8>,
    /// Empty for RESERVE and DELETE.
    pub acl: Vec<u8>,
}

impl Entry {
    pub fn mailbox(name: &[u8], location: &[u8], acl: &[u8]) -> Self {
        Entry {
            kind: Kind::Mailbox,
            name: name.to_vec(),
            location: location.to_vec(),
            acl: acl.to_vec(),
        }
    }
    pub fn reserve(name: &[u8], location: &[u8]) -> Self {
        Entry {
            kind: Kind::Reserve,
            name: name.to_vec(),
            location: location.to_vec(),
            acl: Vec::new(),
        }
    }
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            Kind::Mailbox => write!(
                f,
                "MAILBOX \"{}\" \"{}\" \"{}\"",
                show(&self.name),
                show(&self.location),
                show(&self.acl)
            ),
            Kind::Reserve => write!(
                f,
                "RESERVE \"{}\" \"{}\"",
                show(&self.name),
                show(&self.location)
            ),
            Kind::Delete => write!(f, "DELETE \"{}\"", show(&self.name)),
        }
    }
}

/// One response line as read: its tokens (quoted strings unescaped, literals' data) and the
/// exact bytes it arrived as (CRLF included).
#[derive(Clone, PartialEq, Eq)]
pub struct Line {
    pub tokens: Vec<Vec<u8>>,
    pub raw: Vec<u8>,
}

impl Line {
    pub fn tag(&self) -> &[u8] {
        self.tokens.first().map(Vec::as_slice).unwrap_or(b"")
    }
    /// The response word (second token), upper-cased.
    pub fn word(&self) -> Vec<u8> {
        self.tokens
            .get(1)
            .map(|w| w.to_ascii_uppercase())
            .unwrap_or_default()
    }
    pub fn args(&self) -> &[Vec<u8>] {
        if self.tokens.len() > 2 {
            &self.tokens[2..]
        } else {
            &[]
        }
    }
    /// The line without its trailing CRLF, as text (lossy), for messages and banner checks.
    pub fn text(&self) -> String {
        let raw = self.raw.strip_suffix(b"\r\n").unwrap_or(&self.raw);
        String::from_utf8_lossy(raw).into_owned()
    }
    fn entry(&self) -> Option<Entry> {
        let a = self.args();
        match self.word().as_slice() {
            b"MAILBOX" if a.len() == 3 => Some(Entry::mailbox(&a[0], &a[1], &a[2])),
            b"RESERVE" if a.len() == 2 => Some(Entry::reserve(&a[0], &a[1])),
            b"DELETE" if a.len() == 1 => Some(Entry {
                kind: Kind::Delete,
                name: a[0].clone(),
                location: Vec::new(),
                acl: Vec::new(),
            }),
            _ => None,
        }
    }
}

impl fmt::Debug for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", show(&self.raw))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    No,
    Bad,
}

/// Everything the server sent for one tagged command.
#[derive(Debug, Clone)]
pub struct Response {
    pub tag: String,
    /// Data lines carrying this tag (MAILBOX/RESERVE/DELETE), parsed, in arrival order.
    pub entries: Vec<Entry>,
    /// The same lines' exact bytes, in the same order.
    pub entry_lines: Vec<Vec<u8>>,
    /// Any other line received before the final one (untagged, other tags).
    pub other: Vec<Line>,
    pub status: Status,
    /// The final line's text argument (`"done"` → `done`), unescaped.
    pub text: Vec<u8>,
    /// The final line, exactly.
    pub final_line: Vec<u8>,
}

impl Response {
    pub fn is_ok(&self) -> bool {
        self.status == Status::Ok
    }
    /// Panics unless the status is OK with exactly `text`.
    #[track_caller]
    pub fn expect_ok(&self, text: &str) -> &Self {
        assert!(
            self.status == Status::Ok && self.text == text.as_bytes(),
            "expected `{} OK \"{text}\"`, got {}",
            self.tag,
            show(&self.final_line)
        );
        self
    }
}

/// A blocking MUPDATE client for tests.
pub struct MupdateClient {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    next_tag: u64,
    /// The banner lines, in order; the last is the `* OK MUPDATE ...` line.
    pub banner: Vec<Line>,
}

fn io_err(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl MupdateClient {
    /// Connects and reads the banner (up to its `* OK` line), each read bounded by `timeout`.
    pub fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<Self> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        Self::from_stream(stream, timeout)
    }

    /// Reads the banner from an already connected stream.
    pub fn from_stream(stream: TcpStream, timeout: Duration) -> io::Result<Self> {
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        let writer = stream.try_clone()?;
        let mut c = MupdateClient {
            reader: BufReader::with_capacity(64 * 1024, stream),
            writer,
            next_tag: 1,
            banner: Vec::new(),
        };
        for _ in 0..64 {
            let line = c.read_line()?;
            let done = line.tag() == b"*" && line.word() == b"OK";
            let bye = line.tag() == b"*" && line.word() == b"BYE";
            c.banner.push(line);
            if done {
                return Ok(c);
            }
            if bye {
                return Err(io_err(format!("BYE in banner: {:?}", c.banner)));
            }
        }
        Err(io_err(format!("banner without * OK: {:?}", c.banner)))
    }

    /// Connects, reads the banner and authenticates with PLAIN; panics on any failure.
    #[track_caller]
    pub fn connect_auth(addr: SocketAddr, user: &str, password: &str) -> Self {
        let mut c = Self::connect(addr, IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("connect to MUPDATE server {addr}: {e}"));
        let r = c
            .authenticate_plain(user, password)
            .unwrap_or_else(|e| panic!("AUTHENTICATE at {addr}: {e}"));
        r.expect_ok("Authenticated");
        c
    }

    /// The banner's lines as text (no CRLF).
    pub fn banner_text(&self) -> Vec<String> {
        self.banner.iter().map(Line::text).collect()
    }

    /// Changes the per-read timeout.
    pub fn set_timeout(&mut self, timeout: Duration) -> io::Result<()> {
        self.writer.set_read_timeout(Some(timeout))
    }

    pub fn next_tag(&mut self) -> String {
        let t = format!("T{}", self.next_tag);
        self.next_tag += 1;
        t
    }

    /// `AUTHENTICATE "PLAIN" "<base64 \0user\0pass>"`.
    pub fn authenticate_plain(&mut self, user: &str, password: &str) -> io::Result<Response> {
        let mut ir = vec![0u8];
        ir.extend_from_slice(user.as_bytes());
        ir.push(0);
        ir.extend_from_slice(password.as_bytes());
        self.command(format!("AUTHENTICATE \"PLAIN\" \"{}\"", base64(&ir)).as_bytes())
    }

    /// Writes `<tag> <cmd>\r\n` without waiting; returns the tag.
    pub fn send(&mut self, cmd: &[u8]) -> io::Result<String> {
        let tag = self.next_tag();
        let mut buf = Vec::with_capacity(tag.len() + cmd.len() + 3);
        buf.extend_from_slice(tag.as_bytes());
        buf.push(b' ');
        buf.extend_from_slice(cmd);
        buf.extend_from_slice(b"\r\n");
        self.writer.write_all(&buf)?;
        Ok(tag)
    }

    /// Writes raw bytes as they are.
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.writer.write_all(bytes)
    }

    /// Sends one command (`cmd` is everything after the tag) and reads its whole response.
    pub fn command(&mut self, cmd: &[u8]) -> io::Result<Response> {
        let tag = self.send(cmd)?;
        self.read_response(&tag)
    }

    /// Reads lines until `<tag> OK|NO|BAD`. Bounded: the per-read timeout, plus a cap of
    /// 10 million lines.
    pub fn read_response(&mut self, tag: &str) -> io::Result<Response> {
        let mut r = Response {
            tag: tag.to_string(),
            entries: Vec::new(),
            entry_lines: Vec::new(),
            other: Vec::new(),
            status: Status::Bad,
            text: Vec::new(),
            final_line: Vec::new(),
        };
        for _ in 0..10_000_000u32 {
            let line = self.read_line()?;
            if line.tag() == tag.as_bytes() {
                let word = line.word();
                let status = match word.as_slice() {
                    b"OK" => Some(Status::Ok),
                    b"NO" => Some(Status::No),
                    b"BAD" => Some(Status::Bad),
                    _ => None,
                };
                if let Some(status) = status {
                    r.status = status;
                    // Quoted text is one token; unquoted Cyrus texts are several atoms.
                    r.text = line.args().join(&b' ');
                    r.final_line = line.raw;
                    return Ok(r);
                }
                if let Some(e) = line.entry() {
                    r.entries.push(e);
                    r.entry_lines.push(line.raw);
                    continue;
                }
            }
            if line.tag() == b"*" && line.word() == b"BYE" {
                return Err(io_err(format!(
                    "server said {:?} while waiting for {tag}",
                    line
                )));
            }
            r.other.push(line);
        }
        Err(io_err(format!("no final response for {tag}")))
    }

    /// Reads one response line, literals included.
    pub fn read_line(&mut self) -> io::Result<Line> {
        let mut raw = Vec::new();
        let mut tokens: Vec<Vec<u8>> = Vec::new();
        loop {
            let b = self.peek()?;
            match b {
                b' ' => {
                    self.bump(&mut raw)?;
                }
                b'\r' => {
                    self.bump(&mut raw)?;
                    if self.bump(&mut raw)? != b'\n' {
                        return Err(io_err(format!("CR without LF after {}", show(&raw))));
                    }
                    break;
                }
                b'\n' => {
                    self.bump(&mut raw)?;
                    break;
                }
                b'"' => {
                    self.bump(&mut raw)?;
                    let mut tok = Vec::new();
                    loop {
                        match self.bump(&mut raw)? {
                            b'"' => break,
                            b'\\' => tok.push(self.bump(&mut raw)?),
                            b'\r' | b'\n' => {
                                return Err(io_err(format!(
                                    "line break inside a quoted string: {}",
                                    show(&raw)
                                )))
                            }
                            c => tok.push(c),
                        }
                    }
                    tokens.push(tok);
                }
                b'{' if !tokens.is_empty() => {
                    self.bump(&mut raw)?;
                    let mut n: usize = 0;
                    let mut digits = 0;
                    loop {
                        match self.bump(&mut raw)? {
                            c @ b'0'..=b'9' if digits < 12 => {
                                n = n * 10 + usize::from(c - b'0');
                                digits += 1;
                            }
                            b'+' => {}
                            b'}' if digits > 0 => break,
                            _ => return Err(io_err(format!("bad literal: {}", show(&raw)))),
                        }
                    }
                    if self.bump(&mut raw)? != b'\r' || self.bump(&mut raw)? != b'\n' {
                        return Err(io_err(format!("literal without CRLF: {}", show(&raw))));
                    }
                    let mut data = vec![0u8; n];
                    self.reader.read_exact(&mut data)?;
                    raw.extend_from_slice(&data);
                    tokens.push(data);
                }
                _ => {
                    let mut tok = Vec::new();
                    loop {
                        let c = self.peek()?;
                        if matches!(c, b' ' | b'\r' | b'\n') {
                            break;
                        }
                        tok.push(self.bump(&mut raw)?);
                    }
                    tokens.push(tok);
                }
            }
            if raw.len() > 64 * 1024 * 1024 {
                return Err(io_err("response line over 64 MiB".into()));
            }
        }
        Ok(Line { tokens, raw })
    }

    fn peek(&mut self) -> io::Result<u8> {
        let buf = self.reader.fill_buf()?;
        match buf.first() {
            Some(&b) => Ok(b),
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed by the server",
            )),
        }
    }

    fn bump(&mut self, raw: &mut Vec<u8>) -> io::Result<u8> {
        let b = self.peek()?;
        self.reader.consume(1);
        raw.push(b);
        Ok(b)
    }

    // ---- convenience wrappers; each panics on I/O errors, with the command in the message

    #[track_caller]
    pub fn cmd(&mut self, cmd: &[u8]) -> Response {
        self.command(cmd)
            .unwrap_or_else(|e| panic!("MUPDATE command `{}`: {e}", show(cmd)))
    }

    /// `FIND <name>` → the entries (zero or one) after `OK "Search completed"`.
    #[track_caller]
    pub fn find(&mut self, name: &[u8]) -> Vec<Entry> {
        let mut c = b"FIND ".to_vec();
        c.extend(lit(name));
        let r = self.cmd(&c);
        r.expect_ok("Search completed");
        r.entries
    }

    /// `LIST` → every entry, in server order, after `OK "list complete"`.
    #[track_caller]
    pub fn list(&mut self) -> Response {
        let r = self.cmd(b"LIST");
        r.expect_ok("list complete");
        r
    }

    #[track_caller]
    pub fn reserve(&mut self, name: &[u8], location: &[u8]) -> Response {
        let mut c = b"RESERVE ".to_vec();
        c.extend(lit(name));
        c.push(b' ');
        c.extend(lit(location));
        self.cmd(&c)
    }

    #[track_caller]
    pub fn activate(&mut self, name: &[u8], location: &[u8], acl: &[u8]) -> Response {
        self.cmd(&activate_cmd(name, location, acl))
    }

    #[track_caller]
    pub fn delete(&mut self, name: &[u8]) -> Response {
        let mut c = b"DELETE ".to_vec();
        c.extend(lit(name));
        self.cmd(&c)
    }

    /// Runs `cmds` pipelined in batches of `batch`, and returns every response in order.
    #[track_caller]
    pub fn pipeline(&mut self, cmds: &[Vec<u8>], batch: usize) -> Vec<Response> {
        let mut out = Vec::with_capacity(cmds.len());
        for chunk in cmds.chunks(batch.max(1)) {
            let mut tags = Vec::with_capacity(chunk.len());
            for c in chunk {
                tags.push(
                    self.send(c)
                        .unwrap_or_else(|e| panic!("send `{}`: {e}", show(c))),
                );
            }
            for (t, c) in tags.iter().zip(chunk) {
                out.push(
                    self.read_response(t)
                        .unwrap_or_else(|e| panic!("response to `{}`: {e}", show(c))),
                );
            }
        }
        out
    }

    pub fn logout(mut self) {
        let _ = self.command(b"LOGOUT");
    }
}

/// The bytes of `ACTIVATE <name> <location> <acl>` (after the tag), as literals.
pub fn activate_cmd(name: &[u8], location: &[u8], acl: &[u8]) -> Vec<u8> {
    let mut c = b"ACTIVATE ".to_vec();
    c.extend(lit(name));
    c.push(b' ');
    c.extend(lit(location));
    c.push(b' ');
    c.extend(lit(acl));
    c
}

/// The bytes of `RESERVE <name> <location>` (after the tag), as literals.
pub fn reserve_cmd(name: &[u8], location: &[u8]) -> Vec<u8> {
    let mut c = b"RESERVE ".to_vec();
    c.extend(lit(name));
    c.push(b' ');
    c.extend(lit(location));
    c
}

/// The bytes of `DELETE <name>` (after the tag), as a literal.
pub fn delete_cmd(name: &[u8]) -> Vec<u8> {
    let mut c = b"DELETE ".to_vec();
    c.extend(lit(name));
    c
}

// ------------------------------------------------------------------------------------------
// masters under test

/// What an interop test needs from a master, whichever implementation runs it.
pub trait MasterUnderTest {
    /// `"cyrus"` or `"ours"`.
    fn kind(&self) -> &'static str;
    fn addr(&self) -> SocketAddr;
    fn user(&self) -> &str;
    fn password(&self) -> &str;
    /// Logs and paths to print when a test fails.
    fn diagnostics(&self) -> String;
    fn connect_auth(&self) -> MupdateClient {
        MupdateClient::connect_auth(self.addr(), self.user(), self.password())
    }
}

/// Our master, `mupdated serve`, in a temporary data directory. SIGTERM on drop.
pub struct OurMaster {
    child: Option<Child>,
    dir: Option<tempfile::TempDir>,
    pub root: PathBuf,
    pub addr: SocketAddr,
    pub servername: String,
    pub user: String,
    pub password: String,
    pub stderr_path: PathBuf,
    pub banner: Vec<String>,
}

/// Path of our daemon, built by cargo for the tools crate's integration tests.
pub fn mupdated_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_mupdated"))
}

impl OurMaster {
    /// Creates the store with one user, starts `mupdated serve` on a free port and waits
    /// (up to 30 s) for its banner. Panics with its stderr on failure.
    pub fn start(servername: &str, user: &str, password: &str) -> Self {
        Self::start_with_pause(servername, user, password, Duration::ZERO)
    }

    /// As [`OurMaster::start`], with `--failed-login-pause` set to `pause` (Cyrus's
    /// `failedloginpause`; `start` uses 0).
    pub fn start_with_pause(servername: &str, user: &str, password: &str, pause: Duration) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("mupdated-test-")
            .tempdir_in("/tmp")
            .expect("create temp dir for mupdated");
        let root = dir.path().to_path_buf();
        let data = root.join("data");
        let bin = mupdated_bin();

        let mut add = Command::new(&bin)
            .args(["user", "add", user, "--data-dir"])
            .arg(&data)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {} user add: {e}", bin.display()));
        // The child may exit without reading stdin: report that with its status below.
        let write_err = add
            .stdin
            .take()
            .unwrap()
            .write_all(format!("{password}\n").as_bytes())
            .err();
        let out = wait_output_timeout(add, Duration::from_secs(60), "mupdated user add");
        assert!(
            out.status.success() && write_err.is_none(),
            "`mupdated user add {user} --data-dir {}` failed ({}; writing the password to \
             its stdin: {write_err:?}):\nstdout: {}\nstderr: {}",
            data.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );

        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let stderr_path = root.join("mupdated.stderr");
        let stderr = std::fs::File::create(&stderr_path).expect("create stderr file");
        let child = Command::new(&bin)
            .arg("serve")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--data-dir")
            .arg(&data)
            .arg("--servername")
            .arg(servername)
            .arg("--failed-login-pause")
            .arg(format!("{}ms", pause.as_millis()))
            .stdin(Stdio::null())
            .stdout(stderr.try_clone().expect("dup stderr file"))
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {} serve: {e}", bin.display()));

        let mut m = OurMaster {
            child: Some(child),
            dir: Some(dir),
            root,
            addr,
            servername: servername.to_string(),
            user: user.to_string(),
            password: password.to_string(),
            stderr_path,
            banner: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last_err = String::from("never connected");
        loop {
            if let Some(status) = m.child.as_mut().unwrap().try_wait().ok().flatten() {
                panic!(
                    "mupdated serve exited early ({status}) before its banner\n{}",
                    m.diagnostics()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "mupdated serve on {addr}: no banner within 30 s (last error: {last_err})\n{}",
                    m.diagnostics()
                );
            }
            match MupdateClient::connect(addr, Duration::from_secs(10)) {
                Ok(c) => {
                    m.banner = c.banner_text();
                    c.logout();
                    return m;
                }
                Err(e) => last_err = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }
}

impl MasterUnderTest for OurMaster {
    fn kind(&self) -> &'static str {
        "ours"
    }
    fn addr(&self) -> SocketAddr {
        self.addr
    }
    fn user(&self) -> &str {
        &self.user
    }
    fn password(&self) -> &str {
        &self.password
    }
    fn diagnostics(&self) -> String {
        format!(
            "--- our mupdated at {} (dir {}) stderr (tail):\n{}",
            self.addr,
            self.root.display(),
            file_tail(&self.stderr_path, 16 * 1024)
        )
    }
}

impl Drop for OurMaster {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate_pid(child.id() as i32, libc::SIGTERM, Duration::from_secs(10));
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.diagnostics());
            if let Some(d) = self.dir.take() {
                let p = d.keep();
                eprintln!("(kept {} for inspection)", p.display());
            }
        }
    }
}

/// Waits for a child with a deadline (SIGKILL after it) and collects its output.
pub fn wait_output_timeout(
    mut child: Child,
    timeout: Duration,
    what: &str,
) -> std::process::Output {
    let deadline = Instant::now() + timeout;
    // Drain pipes on threads so a chatty child cannot block on a full pipe.
    let mut so = child.stdout.take();
    let mut se = child.stderr.take();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(s) = so.as_mut() {
            let _ = s.read_to_end(&mut v);
        }
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(s) = se.as_mut() {
            let _ = s.read_to_end(&mut v);
        }
        v
    });
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`{what}` did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    std::process::Output {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    }
}
