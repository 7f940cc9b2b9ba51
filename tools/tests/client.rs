//! The product's blocking client (`mupdate::client`) against the real `mupdated` binary:
//! every method, the UPDATE stream, pipelining, refusals. Each test runs its own master on a
//! free port with a fresh data directory.

use std::io::Read as _;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mupdate::client::{Client, ClientError, ClientOptions, Kind, Record, Update};
use mupdate::proto::client::{Response, StatusKind};

const TIMEOUT: Duration = Duration::from_secs(20);

/// A `mupdated serve` child, killed on drop.
struct Master {
    child: Child,
    addr: SocketAddr,
    password: String,
    _dir: tempfile::TempDir,
}

impl Master {
    fn start() -> Master {
        let dir = tempfile::tempdir().expect("temp dir");
        // Bind port 0 to learn a free port, release it, hand it to the daemon.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_mupdated"))
            .args(["serve", "--listen", &addr.to_string(), "--data-dir"])
            .arg(dir.path())
            .args(["--servername", "clienttest", "--failed-login-pause", "0"])
            .env("MUPDATE_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn mupdated");
        let mut master = Master {
            child,
            addr,
            password: String::new(),
            _dir: dir,
        };
        let pw_file: PathBuf = master._dir.path().join("admin-password");
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Ok(Some(status)) = master.child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = master.child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                panic!("mupdated exited {status}: {err}");
            }
            if let Ok(pw) = std::fs::read_to_string(&pw_file) {
                if !pw.trim().is_empty() && Client::connect(addr, Duration::from_secs(2)).is_ok() {
                    master.password = pw.trim().to_string();
                    return master;
                }
            }
            assert!(
                Instant::now() < deadline,
                "mupdated not ready in {TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn client(&self) -> Client {
        let options = ClientOptions {
            connect_timeout: TIMEOUT,
            read_timeout: Some(TIMEOUT),
            ..ClientOptions::default()
        };
        let mut c = Client::connect_with(self.addr, &options).expect("connect");
        c.authenticate_plain("admin", &self.password)
            .expect("authenticate");
        c
    }
}

impl Drop for Master {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rec(name: &str, location: &str, acl: &str, kind: Kind) -> Record {
    Record {
        name: name.into(),
        location: location.into(),
        acl: acl.into(),
        kind,
    }
}

#[test]
fn every_command_method() {
    let m = Master::start();
    let mut c = Client::connect(m.addr, TIMEOUT).unwrap();
    assert!(c.banner().mechanisms.iter().any(|x| x == "PLAIN"));
    assert!(String::from_utf8_lossy(&c.banner().greeting).contains("\"clienttest\""));
    // Before login, commands are refused, and a wrong password is NO.
    assert!(matches!(c.find("user.x"), Err(ClientError::Bad(_))));
    assert!(matches!(
        c.authenticate_plain("admin", "wrong"),
        Err(ClientError::No(_))
    ));
    c.authenticate_plain("admin", &m.password).unwrap();

    c.reserve("user.bob", "hostA!p1").unwrap();
    assert_eq!(
        c.find("user.bob").unwrap(),
        Some(rec("user.bob", "hostA!p1", "", Kind::Reserved))
    );
    // RESERVE at another location of a taken name: refused.
    match c.reserve("user.bob", "hostB!p1") {
        Err(ClientError::No(t)) => assert_eq!(t, "mailbox already exists"),
        other => panic!("{other:?}"),
    }
    c.activate("user.bob", "hostA!p1", "bob\tlrswipkxtecda\t")
        .unwrap();
    assert_eq!(
        c.find("user.bob").unwrap(),
        Some(rec(
            "user.bob",
            "hostA!p1",
            "bob\tlrswipkxtecda\t",
            Kind::Active
        ))
    );
    c.activate("user.carol", "hostB!p2", "carol\tl\t").unwrap();
    c.reserve("user.dave", "hostA!p10").unwrap();

    let all = c.list_vec(None).unwrap();
    let names: Vec<&[u8]> = all.iter().map(|r| &r.name[..]).collect();
    assert_eq!(names, [&b"user.bob"[..], b"user.carol", b"user.dave"]);
    // The prefix is a raw prefix of the location: hostA!p1 matches hostA!p10 too.
    let mut seen = Vec::new();
    let n = c.list(Some(b"hostA!p1"), |r| seen.push(r.name)).unwrap();
    assert_eq!(n, 2);
    assert_eq!(seen, [b"user.bob".to_vec(), b"user.dave".to_vec()]);
    assert_eq!(c.list(Some(b"nohost"), |_| {}).unwrap(), 0);

    // DEACTIVATE takes the new location and drops the ACL.
    c.deactivate("user.bob", "hostC!p3").unwrap();
    assert_eq!(
        c.find("user.bob").unwrap(),
        Some(rec("user.bob", "hostC!p3", "", Kind::Reserved))
    );
    assert!(matches!(
        c.deactivate("user.bob", "hostC!p3"),
        Err(ClientError::No(_))
    ));
    c.delete("user.bob").unwrap();
    assert_eq!(c.find("user.bob").unwrap(), None);
    match c.delete("user.bob") {
        Err(ClientError::No(t)) => assert_eq!(t, "mailbox doesn't exist"),
        other => panic!("{other:?}"),
    }
    c.noop(|u| panic!("not streaming, got {u:?}")).unwrap();
    // The connection is still in step after every refusal.
    assert_eq!(c.find("user.carol").unwrap().unwrap().location, b"hostB!p2");
    c.logout().unwrap();
}

#[test]
fn update_dump_stream_and_noop_barrier() {
    let m = Master::start();
    let mut w = m.client();
    for i in 0..50 {
        w.activate(format!("user.u{i:02}"), "hostA!p1", "a\tl\t")
            .unwrap();
    }
    w.reserve("user.r", "hostB!p1").unwrap();

    let mut sub = m.client();
    let mut dump = Vec::new();
    assert_eq!(sub.update(&[], |r| dump.push(r)).unwrap(), 51);
    assert!(sub.is_streaming());
    assert_eq!(dump[0].name, b"user.r");
    assert_eq!(dump[1].name, b"user.u00");
    assert_eq!(dump.iter().filter(|r| r.kind == Kind::Reserved).count(), 1);
    // Nothing happens: poll times out and returns None, nothing is lost.
    assert_eq!(sub.poll_update(Duration::from_millis(100)).unwrap(), None);

    // Changes are streamed without NOOP.
    w.activate("user.new", "hostA!p1", "n\tl\t").unwrap();
    match sub.next_update().unwrap() {
        Update::Mailbox(r) => assert_eq!(r, rec("user.new", "hostA!p1", "n\tl\t", Kind::Active)),
        other => panic!("{other:?}"),
    }
    w.delete("user.u00").unwrap();
    assert_eq!(
        sub.next_update().unwrap(),
        Update::Delete(b"user.u00".to_vec())
    );
    // NOOP is a barrier: every change acknowledged before it is delivered before its OK.
    w.deactivate("user.u01", "hostC!p1").unwrap();
    w.activate("user.u02", "hostA!p2", "").unwrap();
    let mut got = Vec::new();
    sub.noop(|u| got.push(u)).unwrap();
    let names: Vec<&[u8]> = got.iter().map(|u| u.name()).collect();
    assert_eq!(names, [&b"user.u01"[..], b"user.u02"]);
    // Only NOOP and LOGOUT are legal now.
    assert!(matches!(sub.find("user.new"), Err(ClientError::Bad(_))));
    assert!(matches!(sub.list_vec(None), Err(ClientError::Bad(_))));
    // A change racing with a refused command is queued, then handed out in order.
    w.activate("user.late", "hostA!p1", "").unwrap();
    let _ = sub.find("x");
    assert_eq!(sub.next_update().unwrap().name(), b"user.late");
    let mut it = sub.updates();
    w.delete("user.late").unwrap();
    assert_eq!(
        it.next().unwrap().unwrap(),
        Update::Delete(b"user.late".to_vec())
    );
    sub.logout().unwrap();
    w.logout().unwrap();
}

#[test]
fn partial_update_filters_by_host() {
    let m = Master::start();
    let mut w = m.client();
    w.activate("user.a", "hostA!p1", "").unwrap();
    w.activate("user.b", "hostB!p1", "").unwrap();
    let mut sub = m.client();
    assert!(sub.banner().partial_update);
    let mut dump = Vec::new();
    sub.update(&[b"hostB"], |r| dump.push(r.name)).unwrap();
    assert_eq!(dump, [b"user.b".to_vec()]);
    w.activate("user.c", "hostA!p1", "").unwrap(); // not watched: nothing
    w.activate("user.b", "hostC!p1", "").unwrap(); // left hostB: DELETE
    w.activate("user.d", "hostB!p1", "").unwrap(); // on hostB: MAILBOX
    let mut got = Vec::new();
    sub.noop(|u| got.push(u)).unwrap();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0], Update::Delete(b"user.b".to_vec()));
    assert_eq!(got[1].name(), b"user.d");
}

#[test]
fn pipelined_commands_answer_in_order() {
    let m = Master::start();
    let mut c = m.client();
    let mut tags = Vec::new();
    for i in 0..200 {
        let name = format!("user.p{i:03}");
        let t1 = c.next_tag();
        c.queue_command(&t1, "RESERVE", &[name.as_bytes(), b"h!p"]);
        let t2 = c.next_tag();
        c.queue_command(&t2, "ACTIVATE", &[name.as_bytes(), b"h!p", b"x\tl\t"]);
        let t3 = c.next_tag();
        c.queue_command(&t3, "FIND", &[name.as_bytes()]);
        tags.push((t1, t2, t3, name));
    }
    c.flush().unwrap();
    for (t1, t2, t3, name) in &tags {
        for t in [t1, t2] {
            match c.read_response().unwrap() {
                Response::Status { tag, kind, .. } => {
                    assert_eq!(&tag, t);
                    assert_eq!(kind, StatusKind::Ok);
                }
                other => panic!("{other:?}"),
            }
        }
        // FIND after its ACTIVATE, on the same connection, sees it.
        match c.read_response().unwrap() {
            Response::Mailbox { tag, name: n, .. } => {
                assert_eq!(&tag, t3);
                assert_eq!(n, name.as_bytes());
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(c.read_response().unwrap(),
            Response::Status { tag, kind: StatusKind::Ok, .. } if &tag == t3));
    }
    // Raw bytes: a malformed command gets BAD and the connection goes on.
    c.send_raw(b"zz FROB\r\n").unwrap();
    assert!(matches!(c.read_response().unwrap(),
        Response::Status { tag, kind: StatusKind::Bad, .. } if tag == b"zz"));
    assert_eq!(c.list_vec(None).unwrap().len(), 200);
    c.logout().unwrap();
}

#[test]
fn server_gone_is_an_io_error() {
    let mut m = Master::start();
    let mut c = m.client();
    c.noop(|_| {}).unwrap();
    m.child.kill().unwrap();
    m.child.wait().unwrap();
    match c.find("user.x") {
        Err(ClientError::Io(_)) => {}
        other => panic!("{other:?}"),
    }
}
