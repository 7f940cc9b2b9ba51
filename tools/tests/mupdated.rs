//! The `mupdated` command line as operators and checks use it: first start, users, SIGTERM,
//! and durability of acknowledged writes across `kill -9`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_mupdated");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Daemon {
    child: Child,
    port: u16,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(dir: &Path) -> Daemon {
    let port = free_port();
    let child = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--servername",
            "clitest",
        ])
        .arg("--data-dir")
        .arg(dir)
        .args(["--failed-login-pause", "0"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "mupdated did not start listening"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Daemon { child, port }
}

/// A minimal line client: login, then raw commands answered up to their tagged status.
struct Conn {
    r: BufReader<TcpStream>,
}

impl Conn {
    fn open(port: u16) -> Conn {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut c = Conn {
            r: BufReader::new(s),
        };
        loop {
            let line = c.line();
            if line.starts_with("* OK MUPDATE") {
                assert!(line.contains("\"clitest\" \"mupdate\""), "{line}");
                return c;
            }
        }
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.r.read_line(&mut line).unwrap();
        line
    }

    /// Send `tag …`, return every line up to and including the tagged OK/NO/BAD.
    fn cmd(&mut self, tag: &str, rest: &str) -> String {
        write!(self.r.get_mut(), "{tag} {rest}\r\n").unwrap();
        let mut all = String::new();
        loop {
            let line = self.line();
            assert!(!line.is_empty(), "connection closed; so far {all:?}");
            all += &line;
            for status in ["OK", "NO", "BAD"] {
                if line.starts_with(&format!("{tag} {status} ")) {
                    return all;
                }
            }
        }
    }

    fn login(&mut self, user: &str, password: &str) -> String {
        use base64::Engine as _;
        let ir = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
        self.cmd("A01", &format!("AUTHENTICATE \"PLAIN\" \"{ir}\""))
    }
}

fn user_add(dir: &Path, name: &str, password: &str) -> std::process::Output {
    let mut child = Command::new(BIN)
        .args(["user", "add", name, "--data-dir"])
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{password}\r\n").as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn user_list(dir: &Path) -> String {
    let out = Command::new(BIN)
        .args(["user", "list", "--data-dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn first_start_creates_admin_once() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut d = serve(&dir);
    let pw_file = dir.join("admin-password");
    let password = std::fs::read_to_string(&pw_file).unwrap();
    let password = password.trim_end();
    assert!(password.len() >= 16);
    let mode = std::fs::metadata(&pw_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let mut c = Conn::open(d.port);
    assert_eq!(c.login("admin", password), "A01 OK \"Authenticated\"\r\n");
    // SIGTERM: a clean exit.
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(d.child.id() as i32, libc::SIGTERM) };
    let status = d.child.wait().unwrap();
    assert!(status.success(), "exit status {status:?}");
    let mut log = String::new();
    d.child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert_eq!(log.matches("admin-password").count(), 1, "{log}");
    // A second start keeps the same admin.
    let d2 = serve(&dir);
    assert_eq!(
        std::fs::read_to_string(&pw_file).unwrap().trim_end(),
        password
    );
    let mut c = Conn::open(d2.port);
    assert_eq!(c.login("admin", password), "A01 OK \"Authenticated\"\r\n");
}

#[test]
fn users_before_and_while_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("fresh");
    // Before the first serve, in a missing directory.
    let out = user_add(&dir, "alice", "pw-alice");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty(), "stdout is for listings only");
    assert_eq!(user_list(&dir), "alice\n");
    let d = serve(&dir);
    assert!(
        !dir.join("admin-password").exists(),
        "users exist: no admin is made"
    );
    let mut c = Conn::open(d.port);
    assert_eq!(c.login("alice", "pw-alice"), "A01 OK \"Authenticated\"\r\n");
    // While the server runs: the new user works at once, a removed one stops working.
    assert!(user_add(&dir, "bob", "pw-bob").status.success());
    let mut c = Conn::open(d.port);
    assert_eq!(c.login("bob", "pw-bob"), "A01 OK \"Authenticated\"\r\n");
    assert_eq!(user_list(&dir), "alice\nbob\n");
    let del = Command::new(BIN)
        .args(["user", "del", "bob", "--data-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(del.status.success());
    let mut c = Conn::open(d.port);
    assert_eq!(c.login("bob", "pw-bob"), "A01 NO \"undefined error!\"\r\n");
    let again = Command::new(BIN)
        .args(["user", "del", "bob", "--data-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(
        again.status.code(),
        Some(2),
        "removing a missing user is an error"
    );
    // An empty password is refused.
    assert!(!user_add(&dir, "carol", "").status.success());
}

#[test]
fn acknowledged_writes_survive_kill_9() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    assert!(user_add(&dir, "admin", "pw").status.success());
    let mut d = serve(&dir);
    let mut c = Conn::open(d.port);
    c.login("admin", "pw");
    for i in 0..200 {
        assert_eq!(
            c.cmd(
                &format!("a{i}"),
                &format!("ACTIVATE \"user.k{i}\" \"h!p\" \"u\tl\t\"")
            ),
            format!("a{i} OK \"done\"\r\n")
        );
    }
    // The moment the last OK is read, SIGKILL: no chance to flush anything.
    d.child.kill().unwrap();
    d.child.wait().unwrap();
    let d = serve(&dir);
    let mut c = Conn::open(d.port);
    c.login("admin", "pw");
    let list = c.cmd("l", "LIST");
    assert_eq!(list.matches(" MAILBOX ").count(), 200, "{list}");
    assert!(c
        .cmd("f", "FIND \"user.k199\"")
        .starts_with("f MAILBOX {9+}\r\n"));
}

#[test]
fn bad_flags_are_usage_errors() {
    let out = Command::new(BIN)
        .args(["serve", "--max-command", "1000"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--max-command"));
    let out = Command::new(BIN)
        .args(["serve", "--no-such-flag"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
