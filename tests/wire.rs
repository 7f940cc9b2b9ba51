//! Wire tests over real TCP against an in-process master: the conformance cases of
//! cyrus-mupdate.md §6 that a master can show, byte for byte, plus the limits and the cases
//! where Cyrus crashes or loses input and we must not.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use mupdate::auth::{UserStore, Verifier};
use mupdate::server::{self, Config};
use mupdate::store::lmdb::{LmdbOptions, LmdbStore};

const PASSWORD: &str = "secret";

struct Master {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Drop for Master {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn config() -> Config {
    Config {
        servername: "testmaster".into(),
        failed_login_pause: Duration::from_millis(0),
        ..Config::default()
    }
}

fn start(config: Config) -> Master {
    let dir = tempfile::tempdir().unwrap();
    let store = LmdbStore::open(dir.path(), LmdbOptions::default()).unwrap();
    store
        .put_user("admin", &Verifier::new(PASSWORD, 64).unwrap())
        .unwrap();
    store
        .put_user("user1", &Verifier::new(PASSWORD, 64).unwrap())
        .unwrap();
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = std_listener.local_addr().unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
            let users: Arc<dyn UserStore + Send + Sync> = store.clone();
            server::run(listener, config, store.clone(), users, async {
                let _ = stop_rx.await;
            })
            .await
            .unwrap();
        });
    });
    Master {
        addr,
        stop: Some(stop_tx),
        thread: Some(thread),
        _dir: dir,
    }
}

struct Client {
    s: TcpStream,
    buf: Vec<u8>,
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

const BANNER: &str = "* AUTH \"PLAIN\"\r\n* PARTIAL-UPDATE\r\n";

impl Client {
    fn raw(m: &Master) -> Client {
        let s = TcpStream::connect(m.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Client { s, buf: Vec::new() }
    }

    /// Connected, banner read and checked.
    fn new(m: &Master) -> Client {
        let mut c = Client::raw(m);
        let banner = format!(
            "{BANNER}* OK MUPDATE \"testmaster\" \"mupdate\" \"{}\" \"(master)\"\r\n",
            server::VERSION
        );
        c.expect(banner.as_bytes());
        c
    }

    fn login(m: &Master) -> Client {
        let mut c = Client::new(m);
        c.send(
            format!(
                "A01 AUTHENTICATE \"PLAIN\" \"{}\"\r\n",
                b64("\0admin\0secret")
            )
            .as_bytes(),
        );
        c.expect(b"A01 OK \"Authenticated\"\r\n");
        c
    }

    fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).unwrap();
    }

    /// Read until exactly `want.len()` bytes arrived and compare.
    fn expect(&mut self, want: &[u8]) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.buf.len() < want.len() && Instant::now() < deadline {
            let mut chunk = [0u8; 65536];
            match self.s.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    break
                }
                Err(e) => panic!("read: {e}"),
            }
        }
        let n = want.len().min(self.buf.len());
        let got: Vec<u8> = self.buf.drain(..n).collect();
        assert_eq!(
            mupdate::proto::escape(&got),
            mupdate::proto::escape(want),
            "server bytes differ"
        );
    }

    /// Send and expect.
    fn ask(&mut self, send: &str, want: &str) {
        self.send(send.as_bytes());
        self.expect(want.as_bytes());
    }

    /// Nothing more arrives within `wait`.
    fn quiet(&mut self, wait: Duration) {
        self.s.set_read_timeout(Some(wait)).unwrap();
        let mut chunk = [0u8; 4096];
        let r = self.s.read(&mut chunk);
        self.s
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        match r {
            Ok(0) => panic!("connection closed"),
            Ok(n) => panic!("unexpected bytes: {}", mupdate::proto::escape(&chunk[..n])),
            Err(_) => assert!(
                self.buf.is_empty(),
                "unexpected bytes: {}",
                mupdate::proto::escape(&self.buf)
            ),
        }
    }

    /// The server closed the connection (after any bytes still buffered).
    fn closed(&mut self) {
        let mut chunk = [0u8; 4096];
        loop {
            match self.s.read(&mut chunk) {
                Ok(0) => return,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) => panic!("expected EOF, got {e}"),
            }
        }
    }
}

#[test]
fn banner_and_lexical_cases() {
    let m = start(config());
    let mut c = Client::new(&m); // case 1
    c.ask("\r\n", "* BAD \"Need command\"\r\n"); // 3
    c.ask("tag\r\n", "* BAD \"Need command\"\r\n"); // 4
    c.ask("tag \r\n", "tag BAD \"Null command\"\r\n"); // 5
    c.ask(" x NOOP\r\n", " BAD \"Unrecognized command\"\r\n"); // 6
    c.ask("a\tNOOP\r\n", "* BAD \"Need command\"\r\n"); // 7
    c.ask("a NOOP\r\n", "a BAD \"Please login first\"\r\n"); // 8
    c.ask("a FOO\r\n", "a BAD \"Please login first\"\r\n");
    c.ask("a FIND \"x\"\r\n", "a BAD \"Please login first\"\r\n");
    c.ask("a XYZZY\r\n", "a BAD \"Unrecognized command\"\r\n"); // 9
    c.ask(
        "a FIND {5+}\r\nab\r\nc\r\nb NOOP\r\n",
        "a BAD \"Please login first\"\r\nb BAD \"Please login first\"\r\n",
    ); // 10
    c.ask("a LOGOUT extra\r\n", "a BAD \"Extra arguments\"\r\n"); // 12
    c.ask("a AUTHENTICATE PLAIN\r\n", "a BAD \"Extra arguments\"\r\n"); // 19
    c.ask("s STARTTLS\r\n", "s BAD \"Unrecognized command\"\r\n"); // 52, before login
    c.ask(
        "z COMPRESS \"DEFLATE\"\r\n",
        "z BAD \"Unrecognized command\"\r\n",
    );
    c.quiet(Duration::from_millis(100));
    c.ask("a LOGOUT\r\ny NOOP\r\n", "a OK \"bye-bye\"\r\n"); // 11
    c.closed();
    assert!(
        c.buf.is_empty(),
        "a pipelined command after LOGOUT got an answer"
    );
}

#[test]
fn authentication_cases() {
    let pause = Duration::from_millis(1000);
    let m = start(Config {
        failed_login_pause: pause,
        ..config()
    });
    let mut c = Client::new(&m);
    // 14: PLAIN without an initial response: an empty challenge line.
    c.ask("a AUTHENTICATE \"PLAIN\"\r\n", "\r\n");
    c.ask(
        &format!("{}\r\n", b64("\0admin\0secret")),
        "a OK \"Authenticated\"\r\n",
    );
    c.ask(
        "a7 AUTHENTICATE \"PLAIN\" \"x\"\r\n",
        "a7 BAD \"already authenticated\"\r\n",
    ); // 20

    // 15: lower-case mechanism, initial response as a {n+} literal.
    let mut c = Client::new(&m);
    let ir = b64("\0admin\0secret");
    c.ask(
        &format!("a AUTHENTICATE \"plain\" {{{}+}}\r\n{ir}\r\n", ir.len()),
        "a OK \"Authenticated\"\r\n",
    );

    // 16-ish: `*` cancels, unquoted text, no delay.
    let mut c = Client::new(&m);
    c.ask("x AUTHENTICATE \"PLAIN\"\r\n", "\r\n");
    let t = Instant::now();
    c.ask("*\r\n", "x NO Client canceled authentication\r\n");
    assert!(
        t.elapsed() < pause - Duration::from_millis(200),
        "a cancel is answered without the pause"
    );

    // 17, 18: bad password, unknown mechanism, bad base64, wrong authzid: NO after the pause.
    for (line, what) in [
        (
            format!("a AUTHENTICATE \"PLAIN\" \"{}\"\r\n", b64("\0admin\0wrong")),
            "bad password",
        ),
        (
            "a AUTHENTICATE \"CRAM-MD5\"\r\n".to_string(),
            "unknown mechanism",
        ),
        (
            "a AUTHENTICATE \"PLAIN\" \"!!!\"\r\n".to_string(),
            "bad base64",
        ),
        (
            format!(
                "a AUTHENTICATE \"PLAIN\" \"{}\"\r\n",
                b64("\0nobody\0secret")
            ),
            "unknown user",
        ),
        (
            format!(
                "a AUTHENTICATE \"PLAIN\" \"{}\"\r\n",
                b64("user1\0admin\0secret")
            ),
            "other authzid",
        ),
        (
            "a AUTHENTICATE \"PLAIN\" \"=\"\r\n".to_string(),
            "empty response",
        ),
    ] {
        let mut c = Client::new(&m);
        let t = Instant::now();
        c.ask(&line, "a NO \"undefined error!\"\r\n");
        assert!(
            t.elapsed() >= pause,
            "{what}: answered before failedloginpause"
        );
        // The client can retry on the same connection.
        c.ask(
            &format!(
                "b AUTHENTICATE \"PLAIN\" \"{}\"\r\n",
                b64("admin\0admin\0secret")
            ),
            "b OK \"Authenticated\"\r\n",
        );
    }

    // 20a: commands pipelined behind AUTHENTICATE are answered, in order.
    let mut c = Client::new(&m);
    c.ask(
        &format!("x1 NOOP\r\na AUTHENTICATE \"PLAIN\" \"{}\"\r\nb1 NOOP\r\nb2 FIND \"none\"\r\n", b64("\0admin\0secret")),
        "x1 BAD \"Please login first\"\r\na OK \"Authenticated\"\r\nb1 OK \"Noop done\"\r\nb2 OK \"Search completed\"\r\n",
    );
    c.quiet(Duration::from_millis(100));
}

#[test]
fn argument_cases() {
    let m = start(config());
    let mut c = Client::login(&m);
    c.ask("f1 FIND {5}\r\n", "+ go ahead\r\n"); // 21
    c.ask("hello\r\n", "f1 OK \"Search completed\"\r\n");
    c.ask(
        "f2 FIND {5+}\r\nhello\r\n",
        "f2 OK \"Search completed\"\r\n",
    ); // 22
    c.ask("f3 FIND foo\r\n", "f3 BAD \"Extra arguments\"\r\n"); // 23
    c.ask(
        "f4 FIND \"unterminated\r\n",
        "f4 BAD \"Extra arguments\"\r\n",
    ); // 24
    c.send(b"f6 FIND {3+}\r\na\0b\r\n"); // 25
    c.expect(b"f6 BAD \"Extra arguments\"\r\n");
    c.ask("f9 FIND\r\n", "f9 BAD \"Missing arguments\"\r\n"); // 26
    c.ask("f16 NOOP \r\n", "f16 BAD \"Extra arguments\"\r\n"); // 27
    c.ask("f13 find \"x\"\n", "f13 OK \"Search completed\"\r\n"); // 28
    c.ask("* NOOP\r\n", "* OK \"Noop done\"\r\n"); // 54
    c.ask("r RESERVE foo \"x\"\r\n", "r BAD \"Missing arguments\"\r\n");
    c.ask("s STARTTLS\r\n", "s BAD \"Unrecognized command\"\r\n"); // 52, after login
    c.quiet(Duration::from_millis(100));
}

#[test]
fn write_state_machine_cases() {
    let m = start(config());
    let mut c = Client::login(&m);
    c.ask(
        "r1 RESERVE \"user.fred\" \"hostA!p1\"\r\n",
        "r1 OK \"done\"\r\n",
    ); // 29
    c.ask(
        "r2 FIND \"user.fred\"\r\n",
        "r2 RESERVE {9+}\r\nuser.fred {8+}\r\nhostA!p1\r\nr2 OK \"Search completed\"\r\n",
    );
    c.ask(
        "r3 RESERVE \"user.fred\" \"hostA!p1\"\r\n",
        "r3 OK \"done\"\r\n",
    ); // 30
    c.ask(
        "r4 RESERVE \"user.fred\" \"hostB!p1\"\r\n",
        "r4 NO \"mailbox already exists\"\r\n",
    );
    c.ask(
        "r5 ACTIVATE \"user.fred\" \"hostA!p1\" \"fred\tlrswipkxtecda\tanyone\tlrs\t\"\r\n",
        "r5 OK \"done\"\r\n",
    ); // 31
    c.ask(
        "r6 FIND \"user.fred\"\r\n",
        "r6 MAILBOX {9+}\r\nuser.fred {8+}\r\nhostA!p1 {30+}\r\nfred\tlrswipkxtecda\tanyone\tlrs\t\r\nr6 OK \"Search completed\"\r\n",
    );
    c.ask(
        "r7 RESERVE \"user.fred\" \"hostA!p1\"\r\n",
        "r7 OK \"done\"\r\n",
    ); // 32
    c.ask(
        "r8 FIND \"user.fred\"\r\n",
        "r8 RESERVE {9+}\r\nuser.fred {8+}\r\nhostA!p1\r\nr8 OK \"Search completed\"\r\n",
    );
    c.ask(
        "a ACTIVATE \"user.fred\" \"hostA!p1\" \"a\tl\t\"\r\n",
        "a OK \"done\"\r\n",
    );
    c.ask(
        "d1 DEACTIVATE \"user.fred\" \"hostC!p3\"\r\n",
        "d1 OK \"done\"\r\n",
    ); // 33
    c.ask(
        "d2 FIND \"user.fred\"\r\n",
        "d2 RESERVE {9+}\r\nuser.fred {8+}\r\nhostC!p3\r\nd2 OK \"Search completed\"\r\n",
    );
    c.ask(
        "d3 DEACTIVATE \"user.fred\" \"hostD!p\"\r\n",
        "d3 NO \"mailbox not currently active\"\r\n",
    ); // 34
    c.ask(
        "d4 DEACTIVATE \"user.fred\" \"hostC!p3\"\r\n",
        "d4 NO \"mailbox not currently active\"\r\n",
    ); // 34, Cyrus aborts
    c.ask(
        "d5 DEACTIVATE \"user.none\" \"h!p\"\r\n",
        "d5 NO \"mailbox doesn't exist\"\r\n",
    ); // 35, Cyrus crashes
    c.ask("x1 DELETE \"user.fred\"\r\n", "x1 OK \"done\"\r\n"); // 36
    c.ask(
        "x2 FIND \"user.fred\"\r\n",
        "x2 OK \"Search completed\"\r\n",
    );
    c.ask(
        "x3 DELETE \"user.fred\"\r\n",
        "x3 NO \"mailbox doesn't exist\"\r\n",
    ); // 37, Cyrus crashes
    c.ask("x4 DELETE \"\"\r\n", "x4 NO \"mailbox doesn't exist\"\r\n");
    c.ask(
        "x5 ACTIVATE \"\" \"h!p\" \"a\tl\t\"\r\n",
        "x5 NO \"invalid mailbox name\"\r\n",
    ); // Cyrus corrupts
    let long = "n".repeat(491);
    c.ask(
        &format!("x6 RESERVE \"{long}\" \"h!p\"\r\n"),
        "x6 NO \"mailbox name too long\"\r\n",
    );
    let ok = "n".repeat(490);
    c.ask(
        &format!("x7 RESERVE \"{ok}\" \"h!p\"\r\n"),
        "x7 OK \"done\"\r\n",
    );
    c.ask(
        "l LIST\r\n",
        &format!("l RESERVE {{490+}}\r\n{ok} {{3+}}\r\nh!p\r\nl OK \"list complete\"\r\n"),
    );
    // 38: ACL normalisation.
    c.ask(
        "y1 ACTIVATE \"user.sp\" \"hostA!p1\" \"anyone rls\"\r\n",
        "y1 OK \"done\"\r\n",
    );
    c.ask(
        "y2 FIND \"user.sp\"\r\n",
        "y2 MAILBOX {7+}\r\nuser.sp {8+}\r\nhostA!p1 {0+}\r\n\r\ny2 OK \"Search completed\"\r\n",
    );
    c.ask(
        "y3 ACTIVATE \"user.sp\" \"hostA!p1\" \"a\tb\tc\"\r\n",
        "y3 OK \"done\"\r\n",
    );
    c.ask("y4 FIND \"user.sp\"\r\n", "y4 MAILBOX {7+}\r\nuser.sp {8+}\r\nhostA!p1 {4+}\r\na\tb\t\r\ny4 OK \"Search completed\"\r\n");
    // 8-bit names and locations round-trip through literals; locations are verbatim.
    c.send(b"z1 ACTIVATE {6+}\r\nuser.\xe9 {5+}\r\na!b!c {4+}\r\nx\tl\t\r\n");
    c.expect(b"z1 OK \"done\"\r\n");
    c.send(b"z2 FIND {6+}\r\nuser.\xe9\r\n");
    c.expect(b"z2 MAILBOX {6+}\r\nuser.\xe9 {5+}\r\na!b!c {4+}\r\nx\tl\t\r\nz2 OK \"Search completed\"\r\n");
    c.quiet(Duration::from_millis(100));
}

#[test]
fn list_order_and_prefix() {
    let m = start(config());
    let mut c = Client::login(&m);
    // 39: dbname order, not strcmp order (inserted in reverse to prove it).
    let names = ["user.a", "user.a.x", "user.a-b", "user.a^b", "user.a0"];
    for (i, n) in names.iter().rev().enumerate() {
        c.ask(
            &format!("a{i} ACTIVATE \"{n}\" \"hostA!p1\" \"\"\r\n"),
            &format!("a{i} OK \"done\"\r\n"),
        );
    }
    c.ask(
        "b ACTIVATE \"user.b\" \"hostA!p10\" \"\"\r\n",
        "b OK \"done\"\r\n",
    );
    c.ask(
        "b2 RESERVE \"user.c\" \"hostB!p1\"\r\n",
        "b2 OK \"done\"\r\n",
    );
    let line = |tag: &str, n: &str, loc: &str| {
        format!(
            "{tag} MAILBOX {{{}+}}\r\n{n} {{{}+}}\r\n{loc} {{0+}}\r\n\r\n",
            n.len(),
            loc.len()
        )
    };
    let mut want = String::new();
    for n in names {
        want += &line("l", n, "hostA!p1");
    }
    want += &line("l", "user.b", "hostA!p10");
    want += "l RESERVE {6+}\r\nuser.c {8+}\r\nhostB!p1\r\nl OK \"list complete\"\r\n";
    c.ask("l LIST\r\n", &want);
    // 40: the prefix is a raw byte prefix of the location.
    let mut want = String::new();
    for n in names {
        want += &line("l3", n, "hostA!p1");
    }
    want += &line("l3", "user.b", "hostA!p10");
    want += "l3 OK \"list complete\"\r\n";
    c.ask("l3 LIST \"hostA!p1\"\r\n", &want);
    c.ask("l4 LIST \"nohost\"\r\n", "l4 OK \"list complete\"\r\n");
}

fn read_line_containing(c: &mut Client, needle: &str, within: Duration) -> Instant {
    let deadline = Instant::now() + within;
    c.s.set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let mut scanned: usize = 0;
    loop {
        let from = scanned.saturating_sub(needle.len());
        if let Some(pos) = c.buf[from..]
            .windows(needle.len())
            .position(|w| w == needle.as_bytes())
        {
            let t = Instant::now();
            c.buf.drain(..from + pos + needle.len());
            c.s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            return t;
        }
        scanned = c.buf.len();
        let tail = &c.buf[c.buf.len().saturating_sub(300)..];
        assert!(
            Instant::now() < deadline,
            "{needle:?} did not arrive; last bytes {}",
            mupdate::proto::escape(tail)
        );
        let mut chunk = [0u8; 65536];
        if let Ok(n) = c.s.read(&mut chunk) {
            assert!(n > 0, "closed");
            c.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

#[test]
fn update_streaming_cases() {
    let m = start(config());
    let mut w = Client::login(&m);
    w.ask(
        "a ACTIVATE \"user.a\" \"hostA!p1\" \"a\tl\t\"\r\n",
        "a OK \"done\"\r\n",
    );
    let mut u = Client::login(&m);
    // 41
    u.ask(
        "U01 UPDATE\r\n",
        "U01 MAILBOX {6+}\r\nuser.a {8+}\r\nhostA!p1 {4+}\r\na\tl\t\r\nU01 OK \"streaming starts\"\r\n",
    );
    u.ask(
        "F1 FIND \"user.a\"\r\n",
        "F1 BAD \"not legal when streaming\"\r\n",
    );
    u.ask("F2 UPDATE\r\n", "F2 BAD \"not legal when streaming\"\r\n");
    u.ask(
        "F3 RESERVE \"x\" \"y\"\r\n",
        "F3 BAD \"not legal when streaming\"\r\n",
    );
    u.ask(
        "F4 AUTHENTICATE \"PLAIN\" \"x\"\r\n",
        "F4 BAD \"already authenticated\"\r\n",
    );
    // 42: NOOP is a barrier.
    w.ask(
        "b ACTIVATE \"user.new\" \"hostA!p1\" \"a\tl\t\"\r\n",
        "b OK \"done\"\r\n",
    );
    u.ask(
        "N01 NOOP\r\n",
        "U01 MAILBOX {8+}\r\nuser.new {8+}\r\nhostA!p1 {4+}\r\na\tl\t\r\nN01 OK \"Noop done\"\r\n",
    );
    // 43, pushed as it commits: no NOOP needed, and fast.
    w.ask(
        "c RESERVE \"user.push\" \"hostB!p\"\r\n",
        "c OK \"done\"\r\n",
    );
    let sent = Instant::now();
    let got = read_line_containing(
        &mut u,
        "U01 RESERVE {9+}\r\nuser.push {7+}\r\nhostB!p\r\n",
        Duration::from_secs(2),
    );
    assert!(
        got - sent < Duration::from_secs(1),
        "pushed at commit, not on a timer"
    );
    // 44: ACTIVATE then DELETE: the last line for the name is its final state.
    w.ask(
        "d ACTIVATE \"user.new3\" \"h!p\" \"\"\r\nd2 DELETE \"user.new3\"\r\n",
        "d OK \"done\"\r\nd2 OK \"done\"\r\n",
    );
    u.ask("N02 NOOP\r\n", "U01 MAILBOX {9+}\r\nuser.new3 {3+}\r\nh!p {0+}\r\n\r\nU01 DELETE {9+}\r\nuser.new3\r\nN02 OK \"Noop done\"\r\n");
    // 45: DEACTIVATE streams as RESERVE at the new location.
    w.ask(
        "e DEACTIVATE \"user.a\" \"hostZ!p9\"\r\n",
        "e OK \"done\"\r\n",
    );
    u.ask(
        "N03 NOOP\r\n",
        "U01 RESERVE {6+}\r\nuser.a {8+}\r\nhostZ!p9\r\nN03 OK \"Noop done\"\r\n",
    );
    u.ask("L LOGOUT\r\n", "L OK \"bye-bye\"\r\n");
    u.closed();
}

#[test]
fn partial_update_cases() {
    let m = start(config());
    let mut w = Client::login(&m);
    w.ask(
        "a ACTIVATE \"user.r\" \"hostB\" \"a\tl\t\"\r\n",
        "a OK \"done\"\r\n",
    );
    w.ask(
        "b ACTIVATE \"user.s\" \"hostA!p1\" \"a\tl\t\"\r\n",
        "b OK \"done\"\r\n",
    );
    w.ask(
        "c ACTIVATE \"user.t\" \"hostB!x\" \"a\tl\t\"\r\n",
        "c OK \"done\"\r\n",
    );
    let mut p = Client::login(&m);
    // 46: only entries whose server is exactly a host argument; `hostA!p1` matches nothing.
    p.ask(
        "P1 UPDATE \"hostB\" \"hostA!p1\"\r\n",
        "P1 MAILBOX {6+}\r\nuser.r {5+}\r\nhostB {4+}\r\na\tl\t\r\nP1 MAILBOX {6+}\r\nuser.t {7+}\r\nhostB!x {4+}\r\na\tl\t\r\nP1 OK \"streaming starts\"\r\n",
    );
    w.ask(
        "d ACTIVATE \"user.r\" \"hostC\" \"a\tl\t\"\r\n",
        "d OK \"done\"\r\n",
    ); // moved away: DELETE
    w.ask(
        "e ACTIVATE \"user.zz\" \"hostA\" \"a\tl\t\"\r\n",
        "e OK \"done\"\r\n",
    ); // unwatched
    w.ask(
        "f ACTIVATE \"user.zb\" \"hostB\" \"a\tl\t\"\r\n",
        "f OK \"done\"\r\n",
    ); // watched
    w.ask("g DELETE \"user.r\"\r\n", "g OK \"done\"\r\n"); // no longer watched
    p.ask("N1 NOOP\r\n", "P1 DELETE {6+}\r\nuser.r\r\nP1 MAILBOX {7+}\r\nuser.zb {5+}\r\nhostB {4+}\r\na\tl\t\r\nN1 OK \"Noop done\"\r\n");
    // 47
    let mut c = Client::login(&m);
    c.ask(
        "P2 UPDATE \"\"\r\n",
        "P2 BAD \"Badly formed arguments\"\r\n",
    );
    let hosts = |n: usize| (0..n).map(|i| format!(" \"h{i}\"")).collect::<String>();
    c.ask(
        &format!("P3 UPDATE{}\r\n", hosts(31)),
        "P3 BAD \"Extra arguments\"\r\n",
    );
    c.ask(
        &format!("P4 UPDATE{}\r\n", hosts(30)),
        "P4 OK \"streaming starts\"\r\n",
    );
}

#[test]
fn connection_cap() {
    // 49: over the cap, exactly `* BYE "Server Unable"\r\n\0`, then close; others unaffected.
    let m = start(Config {
        connections_max: 2,
        ..config()
    });
    let mut a = Client::login(&m);
    let _b = Client::new(&m);
    let mut c = Client::raw(&m);
    c.expect(b"* BYE \"Server Unable\"\r\n\0");
    c.closed();
    assert!(c.buf.is_empty());
    a.ask("n NOOP\r\n", "n OK \"Noop done\"\r\n");
    drop(_b);
    // A freed slot is reusable (once the server noticed the close).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut d = Client::raw(&m);
        let mut first = [0u8; 6];
        d.s.read_exact(&mut first).unwrap();
        if &first == b"* AUTH" {
            break;
        }
        assert!(Instant::now() < deadline, "the slot was never freed");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn oversized_input_refused_on_its_connection_only() {
    let limits = mupdate::proto::Limits {
        max_word: 1024,
        max_quoted: 1024,
        max_literal: 1024,
        max_command: 1 << 20,
    };
    let m = start(Config { limits, ..config() });
    let mut other = Client::login(&m);
    let mut c = Client::login(&m);
    // Synchronising {N} over the limit: Cyrus's exact reply, no continuation, and the next
    // line is a command of its own (Cyrus swallows it).
    c.ask(
        "f FIND {2000}\r\nb NOOP\r\n",
        "f BAD \"Extra arguments\"\r\nb OK \"Noop done\"\r\n",
    );
    // {N+} over the limit: the N bytes are skipped, never run (they hold a command here).
    let mut payload = b"x DELETE \"user.keep\"\r\n".to_vec();
    payload.resize(2000, b'A');
    other.ask(
        "k ACTIVATE \"user.keep\" \"h!p\" \"\"\r\n",
        "k OK \"done\"\r\n",
    );
    c.send(b"g FIND {2000+}\r\n");
    c.send(&payload);
    c.send(b"\r\nh NOOP\r\n");
    c.expect(b"g BAD \"[TOOBIG] Literal size exceeds fixed limit\"\r\nh OK \"Noop done\"\r\n");
    other.ask(
        "k2 FIND \"user.keep\"\r\n",
        "k2 MAILBOX {9+}\r\nuser.keep {3+}\r\nh!p {0+}\r\n\r\nk2 OK \"Search completed\"\r\n",
    );
    // Oversized quoted string and word.
    c.ask(
        &format!("q FIND \"{}\"\r\nq2 NOOP\r\n", "x".repeat(1500)),
        "q BAD \"[TOOBIG] Quoted value too long\"\r\nq2 OK \"Noop done\"\r\n",
    );
    c.ask(
        &format!("{} NOOP\r\nw2 NOOP\r\n", "t".repeat(1500)),
        "* BAD \"[TOOBIG] Word too long\"\r\nw2 OK \"Noop done\"\r\n",
    );
    other.ask("o NOOP\r\n", "o OK \"Noop done\"\r\n");
}

#[test]
fn whole_command_bound() {
    // Each string is within its limit, the command is not: refused, connection usable.
    let limits = mupdate::proto::Limits {
        max_word: 1024,
        max_quoted: 100_000,
        max_literal: 100_000,
        max_command: 1 << 20,
    };
    let m = start(Config { limits, ..config() });
    let mut c = Client::login(&m);
    let big: String = (0..30)
        .map(|_| format!(" \"{}\"", "h".repeat(50_000)))
        .collect();
    c.ask(
        &format!("u UPDATE{big}\r\nu2 NOOP\r\n"),
        "u BAD \"[TOOBIG] Command too long\"\r\nu2 OK \"Noop done\"\r\n",
    );
    // Literals count too: the second one would pass the bound.
    let lit = "x".repeat(90_000);
    let many: String = (0..12).map(|_| format!(" {{90000+}}\r\n{lit}")).collect();
    c.ask(
        &format!("v UPDATE{many}\r\nv2 NOOP\r\n"),
        "v BAD \"[TOOBIG] Literal size exceeds fixed limit\"\r\nv2 OK \"Noop done\"\r\n",
    );
}

#[test]
fn idle_timeout() {
    let m = start(Config {
        idle_timeout: Duration::from_millis(300),
        ..config()
    });
    let mut c = Client::login(&m);
    std::thread::sleep(Duration::from_millis(600));
    c.expect(b"* BYE \"idle for too long\"\r\n");
    c.closed();
}

#[test]
fn stalled_subscriber_is_cut_off_without_hurting_others() {
    let m = start(Config {
        stall_timeout: Duration::from_millis(500),
        output_buffer: 64 * 1024,
        ..config()
    });
    let mut w = Client::login(&m);
    let mut stalled = Client::login(&m);
    stalled.ask("U UPDATE\r\n", "U OK \"streaming starts\"\r\n");
    let mut healthy = Client::login(&m);
    healthy.ask("V UPDATE\r\n", "V OK \"streaming starts\"\r\n");
    // The healthy subscriber reads all along and gets everything.
    let reader = std::thread::spawn(move || {
        read_line_containing(&mut healthy, "user.m2999 {3+}", Duration::from_secs(60));
    });
    // `stalled` never reads again. Write enough to fill its socket buffers many times.
    let acl = "a\t".to_string() + &"l".repeat(5000) + "\t";
    for i in 0..3000 {
        w.send(format!("a{i} ACTIVATE \"user.m{i}\" \"h!p\" \"{acl}\"\r\n").as_bytes());
        if i % 100 == 99 {
            for j in i - 99..=i {
                w.expect(format!("a{j} OK \"done\"\r\n").as_bytes());
            }
        }
    }
    reader.join().expect("the healthy subscriber was served");
    // The stalled one is disconnected (it finds EOF after whatever the kernel buffered).
    std::thread::sleep(Duration::from_millis(1500));
    stalled
        .s
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stalled.closed();
    w.ask("n NOOP\r\n", "n OK \"Noop done\"\r\n");
}

#[test]
fn pipelined_writes_answer_in_order_and_find_sees_them() {
    let m = start(config());
    let mut c = Client::login(&m);
    let mut send = String::new();
    let mut want = String::new();
    for i in 0..300 {
        send += &format!(
            "r{i} RESERVE \"user.p{i}\" \"h!p\"\r\na{i} ACTIVATE \"user.p{i}\" \"h!p\" \"\"\r\n"
        );
        want += &format!("r{i} OK \"done\"\r\na{i} OK \"done\"\r\n");
        if i % 50 == 0 {
            send += &format!("f{i} FIND \"user.p{i}\"\r\n");
            want += &format!("f{i} MAILBOX {{{}+}}\r\nuser.p{i} {{3+}}\r\nh!p {{0+}}\r\n\r\nf{i} OK \"Search completed\"\r\n", format!("user.p{i}").len());
        }
    }
    send +=
        "x RESERVE \"user.p1\" \"other!p\"\r\nd DELETE \"user.p1\"\r\nd2 DELETE \"user.p1\"\r\n";
    want +=
        "x NO \"mailbox already exists\"\r\nd OK \"done\"\r\nd2 NO \"mailbox doesn't exist\"\r\n";
    c.ask(&send, &want);
}

#[test]
fn concurrent_writers_on_one_name_stay_consistent() {
    let m = start(config());
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let addr = m.addr;
            std::thread::spawn(move || {
                let s = TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                let mut c = Client { s, buf: Vec::new() };
                let mut banner = [0u8; 1];
                while !c.buf.ends_with(b"(master)\"\r\n") {
                    c.s.read_exact(&mut banner).unwrap();
                    c.buf.push(banner[0]);
                }
                c.buf.clear();
                c.ask(
                    &format!(
                        "A AUTHENTICATE \"PLAIN\" \"{}\"\r\n",
                        b64("\0admin\0secret")
                    ),
                    "A OK \"Authenticated\"\r\n",
                );
                let mut oks = 0;
                for i in 0..50 {
                    c.send(format!("r{i} RESERVE \"user.shared\" \"h{t}!p\"\r\n").as_bytes());
                    let mut line = Vec::new();
                    let mut b = [0u8; 1];
                    while !line.ends_with(b"\r\n") {
                        c.s.read_exact(&mut b).unwrap();
                        line.push(b[0]);
                    }
                    if line.ends_with(b"OK \"done\"\r\n") {
                        oks += 1;
                        c.ask(
                            &format!("d{i} DELETE \"user.shared\"\r\n"),
                            &format!("d{i} OK \"done\"\r\n"),
                        );
                    } else {
                        assert!(
                            line.ends_with(b"NO \"mailbox already exists\"\r\n"),
                            "{}",
                            mupdate::proto::escape(&line)
                        );
                    }
                }
                oks
            })
        })
        .collect();
    let total: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(total > 0);
    let mut c = Client::login(&m);
    c.ask(
        "f FIND \"user.shared\"\r\n",
        "f OK \"Search completed\"\r\n",
    );
}

#[test]
fn garbage_from_many_clients_never_hurts_the_server() {
    let m = start(Config {
        idle_timeout: Duration::from_secs(5),
        ..config()
    });
    let mut keeper = Client::login(&m);
    keeper.ask(
        "k ACTIVATE \"user.keep\" \"h!p\" \"\"\r\n",
        "k OK \"done\"\r\n",
    );
    // Deterministic noise: random bytes, random command fragments, literals with wild sizes.
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let pieces: &[&[u8]] = &[
        b"a ",
        b"NOOP",
        b"FIND ",
        b"{5}\r\n",
        b"{99999999999+}\r\n",
        b"{3+}\r\n",
        b"\"",
        b"\\",
        b"\r\n",
        b"\n",
        b"UPDATE ",
        b"LIST ",
        b"AUTHENTICATE \"PLAIN\" ",
        b"*\r\n",
        b"\0",
        b"\xff",
        b"DELETE \"user.keep\"",
        b" ",
        b"(",
        b")",
        b"LOGOUT",
    ];
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let mut bytes = Vec::new();
            for _ in 0..400 {
                if next() % 3 == 0 {
                    bytes.extend((0..(next() % 16)).map(|_| next() as u8));
                } else {
                    bytes.extend_from_slice(pieces[(next() % pieces.len() as u64) as usize]);
                }
            }
            let addr = m.addr;
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(300)))
                    .unwrap();
                let _ = s.write_all(&bytes);
                let mut sink = [0u8; 65536];
                while let Ok(n) = s.read(&mut sink) {
                    if n == 0 {
                        break;
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    // The server is alive, the keeper's session works, and no garbage (these were not
    // authenticated) changed anything.
    keeper.ask(
        "f FIND \"user.keep\"\r\n",
        "f MAILBOX {9+}\r\nuser.keep {3+}\r\nh!p {0+}\r\n\r\nf OK \"Search completed\"\r\n",
    );
    let mut fresh = Client::login(&m);
    fresh.ask("n NOOP\r\n", "n OK \"Noop done\"\r\n");
}
