//! `mboxlist import/export/diff/push`: the master's store against the Cyrus 3.6.1 fixtures,
//! our `mupdated serve`, the real `ctl_mboxlist -d` and the real Cyrus master.
//!
//! Tests that need Cyrus fail loudly when it is missing, unless `MUPDATE_SKIP_CYRUS=1`.

mod common;

use common::cyrus::{self as cyr, CyrusMaster, CyrusOpts};
use common::sandbox::{fx, same, Sandbox, T0};
use common::{Entry, Kind, MasterUnderTest, MupdateClient, OurMaster};
use mupdate::cyrus::db::{self, Backend, WriteOptions};
use mupdate::cyrus::entry::{self, mbtype, Entry as CyrusEntry, FormerName};
use mupdate::cyrus::mboxname;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_mboxlist");
const MUPDATED: &str = env!("CARGO_BIN_EXE_mupdated");
const USER: &str = "admin";
const PASSWORD: &str = "store-test-pw";

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(BIN);
    c.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("spawn mboxlist")
}

#[track_caller]
fn ok(args: &[&str]) -> Vec<u8> {
    let o = run(args, &[]);
    assert!(
        o.status.success(),
        "mboxlist {args:?}: {}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    o.stdout
}

#[track_caller]
fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("mboxlist-store-")
        .tempdir_in("/tmp")
        .unwrap()
}

/// `import` SOURCE into a new store under `dir`, `export` it as `backend`; returns the file.
fn round_trip(dir: &Path, source: &Path, backend: &str, servername: Option<&str>) -> PathBuf {
    let store = dir.join(format!("store-{backend}"));
    let mut args = vec!["-q", "import", "--data-dir", p(&store), p(source)];
    if let Some(s) = servername {
        args.extend(["--servername", s]);
    }
    ok(&args);
    let out = dir.join(format!("out.{backend}.db"));
    ok(&[
        "-q",
        "export",
        "--data-dir",
        p(&store),
        p(&out),
        "--backend",
        backend,
    ]);
    out
}

/// The 3.6-layout fixture databases, with their backends and the kv listing Cyrus reads.
fn fixture_dbs() -> Vec<(String, &'static str, String)> {
    let mut v = Vec::new();
    for b in ["twoskip", "skiplist", "flat"] {
        for d in ["tricky", "tricky/history"] {
            v.push((
                format!("{d}/mailboxes.{b}.db"),
                b,
                format!("{d}/kv.{b}.txt"),
            ));
        }
    }
    for b in ["twoskip", "skiplist"] {
        for f in ["crashed", "recovered"] {
            v.push((
                format!("tricky/crash/mailboxes.{b}.{f}.db"),
                b,
                format!("tricky/crash/kv.{b}.after-recovery.txt"),
            ));
        }
    }
    for (db, kv) in [
        ("legacy/v32-news.twoskip.db", "legacy/kv.v32-news.txt"),
        (
            "legacy/v34.upgraded-by-3.6.twoskip.db",
            "legacy/kv.v34.upgraded-by-3.6.txt",
        ),
    ] {
        v.push((db.into(), "twoskip", kv.into()));
    }
    v.push((
        "legacy/v34-dump.undumped-by-3.6-L.twoskip.db".into(),
        "twoskip",
        String::new(),
    ));
    v
}

/// A dump with every `"mtime": "<n>"` replaced (entries without one get the current time).
fn norm_mtime(dump: &[u8]) -> String {
    let s = String::from_utf8_lossy(dump);
    let mut out = String::new();
    let mut rest: &str = &s;
    while let Some(i) = rest.find("\"mtime\": \"") {
        let (a, b) = rest.split_at(i + 10);
        out.push_str(a);
        let end = b.find('"').unwrap_or(0);
        out.push_str("<t>");
        rest = &b[end..];
    }
    out.push_str(rest);
    out
}

/// Every record of a db file, by key.
fn records(path: &Path) -> std::collections::BTreeMap<Vec<u8>, Vec<u8>> {
    let mut r = db::open(path).unwrap();
    let mut m = std::collections::BTreeMap::new();
    while let Some((k, v)) = r.next_record().unwrap() {
        m.insert(k.to_vec(), v.to_vec());
    }
    m
}

// ------------------------------------------------------------------------------------------
// Fixtures only.

#[test]
fn every_fixture_db_survives_import_and_export_byte_for_byte() {
    let t = tmp();
    for (i, (db, backend, kv)) in fixture_dbs().into_iter().enumerate() {
        for servername in [None, Some("be1")] {
            let dir = t.path().join(format!("{i}-{}", servername.is_some()));
            std::fs::create_dir_all(&dir).unwrap();
            let out = round_trip(&dir, &fx(&db), backend, servername);
            let want = if kv.is_empty() {
                ok(&["kv", p(&fx(&db))])
            } else {
                std::fs::read(fx(&kv)).unwrap()
            };
            same(
                &ok(&["kv", p(&out)]),
                &want,
                &format!("{db} (--servername {servername:?}): records after the round trip"),
            );
            // --dump writes what `dump` of a twoskip file would print.
            let store = dir.join(format!("store-{backend}"));
            let json = dir.join("out.json");
            ok(&[
                "-q",
                "export",
                "--data-dir",
                p(&store),
                p(&json),
                "--dump",
                "-y",
            ]);
            let tw = dir.join("tw.db");
            ok(&[
                "-q",
                "export",
                "--data-dir",
                p(&store),
                p(&tw),
                "--backend",
                "twoskip",
            ]);
            same(
                &std::fs::read(&json).unwrap(),
                &ok(&["dump", "-y", p(&tw)]),
                &format!("{db}: export --dump -y"),
            );
        }
    }
}

#[test]
fn pre_36_files_import_as_cyrus_upgrades_them() {
    let t = tmp();
    let out = round_trip(t.path(), &fx("legacy/v34.twoskip.db"), "twoskip", None);
    same(
        &ok(&["dump", "-y", p(&out)]),
        &std::fs::read(fx("legacy/v34.upgraded-by-3.6.dump-y.json")).unwrap(),
        "v34 → 3.6 dump -y",
    );
    // The same records as Cyrus's upgrade, except its reverse-ACL keys (`reverseacls: 1`).
    let want: Vec<u8> = std::fs::read(fx("legacy/kv.v34.upgraded-by-3.6.txt"))
        .unwrap()
        .split_inclusive(|&b| b == b'\n')
        .filter(|l| !l.starts_with(b"\"AS\x1E"))
        .flatten()
        .copied()
        .collect();
    same(&ok(&["kv", p(&out)]), &want, "v34 → 3.6 records");
    // 2.x text values: remote `1 host!part` and reserved `3 host!part` entries.
    for f in ["legacy/v2x.skiplist.db", "legacy/v2x.flat.db"] {
        let d = t.path().join(f.replace('/', "-"));
        std::fs::create_dir_all(&d).unwrap();
        let out = round_trip(&d, &fx(f), "twoskip", None);
        let dump = String::from_utf8(ok(&["dump", p(&out)])).unwrap();
        assert!(
            dump.contains(
                "\"user.remote\": {\"name\": \"user.remote\", \"mtime\": \"0\", \"uidvalidity\": \
                 \"0\", \"createdmodseq\": \"0\", \"foldermodseq\": \"0\", \"mbtype\": \"erl\", \
                 \"partition\": \"default\", \"server\": \"imap-be2.example.com\""
            ),
            "{f}: {dump}"
        );
        assert!(dump.contains("\"mbtype\": \"erzl\""), "{f}: {dump}");
    }
}

#[test]
fn dumps_import_like_ctl_mboxlist_u() {
    let t = tmp();
    for (i, d) in ["inputs/tricky.json", "tricky/dump-y.twoskip.json"]
        .iter()
        .enumerate()
    {
        let dir = t.path().join(i.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        let out = round_trip(&dir, &fx(d), "twoskip", None);
        let undumped = dir.join("undumped.db");
        let input = std::fs::read(fx(d)).unwrap();
        let mut c = Command::new(BIN)
            .args(["-q", "undump", "--backend", "twoskip", p(&undumped)])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin.take().unwrap().write_all(&input).unwrap();
        assert!(c.wait_with_output().unwrap().status.success());
        if i == 1 {
            // Every entry has an mtime: the very same records.
            same(
                &ok(&["kv", p(&out)]),
                &ok(&["kv", p(&undumped)]),
                &format!("{d}: import == undump"),
            );
        }
        same(
            norm_mtime(&ok(&["dump", "-y", p(&out)])).as_bytes(),
            norm_mtime(&ok(&["dump", "-y", p(&undumped)])).as_bytes(),
            &format!("{d}: import == undump (dump -y, up to missing mtimes)"),
        );
    }
}

#[test]
fn import_and_export_refuse_what_they_should() {
    let t = tmp();
    let st = t.path().join("st");
    let tricky = fx("tricky/mailboxes.twoskip.db");
    ok(&["-q", "import", "--data-dir", p(&st), p(&tricky)]);
    let again = run(&["import", "--data-dir", p(&st), p(&tricky)], &[]);
    assert_eq!(
        again.status.code(),
        Some(2),
        "second import without --force"
    );
    ok(&["-q", "import", "--force", "--data-dir", p(&st), p(&tricky)]);
    // Junk never panics.
    let junk = t.path().join("junk");
    std::fs::write(&junk, b"\xA1\x02\x8B\x0Dtwoskip file\0\0\0\0garbage").unwrap();
    let r = run(
        &["import", "--data-dir", p(&t.path().join("j")), p(&junk)],
        &[],
    );
    assert_eq!(
        r.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    std::fs::write(&junk, b"{\"x\": ").unwrap();
    let r = run(
        &[
            "import",
            "--format",
            "dump",
            "--data-dir",
            p(&t.path().join("j2")),
            p(&junk),
        ],
        &[],
    );
    assert_eq!(r.status.code(), Some(2));
    // A directory that is not a store is not filled.
    let notstore = t.path().join("notstore");
    std::fs::create_dir_all(&notstore).unwrap();
    std::fs::write(notstore.join("x"), b"x").unwrap();
    let r = run(&["import", "--data-dir", p(&notstore), p(&tricky)], &[]);
    assert_eq!(r.status.code(), Some(2));
    let out = t.path().join("out.db");
    ok(&[
        "-q",
        "export",
        "--data-dir",
        p(&st),
        p(&out),
        "--backend",
        "skiplist",
    ]);
    let r = run(
        &[
            "export",
            "--data-dir",
            p(&st),
            p(&out),
            "--backend",
            "skiplist",
        ],
        &[],
    );
    assert_eq!(r.status.code(), Some(2), "export over an existing file");
    ok(&[
        "-q",
        "export",
        "--force",
        "--data-dir",
        p(&st),
        p(&out),
        "--backend",
        "flat",
    ]);
    let r = run(
        &[
            "export",
            "--data-dir",
            p(&notstore),
            p(&t.path().join("o2")),
            "--dump",
        ],
        &[],
    );
    assert_eq!(r.status.code(), Some(2), "export of a non-store");
}

#[test]
fn diff_exit_codes_and_lines() {
    let tw = fx("tricky/mailboxes.twoskip.db");
    let r = run(&["diff", p(&tw), p(&fx("tricky/mailboxes.flat.db"))], &[]);
    assert_eq!(
        r.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(r.stdout.is_empty());
    let r = run(
        &[
            "diff",
            "--all-fields",
            p(&tw),
            p(&fx("tricky/history/mailboxes.skiplist.db")),
        ],
        &[],
    );
    assert_eq!(
        r.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&r.stdout)
    );
    let r = run(&["diff", p(&tw), p(&fx("tricky/dump.twoskip.json"))], &[]);
    assert_eq!(
        r.status.code(),
        Some(0),
        "db vs its own dump: {}",
        String::from_utf8_lossy(&r.stdout)
    );
    let r = run(
        &[
            "diff",
            p(&tw),
            p(&fx("legacy/v34-dump.undumped-by-3.6-L.twoskip.db")),
        ],
        &[],
    );
    assert_eq!(r.status.code(), Some(1));
    let out = String::from_utf8(r.stdout).unwrap();
    assert!(out
        .lines()
        .all(|l| l.starts_with("- ") || l.starts_with("+ ") || l.starts_with("~ ")));
    assert!(
        out.contains("- \"user.bob.with space\" MAILBOX \"default\" \"bob\\tlrswipkxtecdan\\t\""),
        "{out}"
    );
    let r = run(
        &[
            "diff",
            "--servername",
            "be1",
            p(&tw),
            p(&fx("tricky/mailboxes.skiplist.db")),
        ],
        &[],
    );
    assert_eq!(r.status.code(), Some(0));
    let r = run(&["diff", p(&tw), "/nonexistent/file"], &[]);
    assert_eq!(r.status.code(), Some(2));
    let r = run(
        &["diff", "--all-fields", p(&tw), "mupdate://127.0.0.1:1"],
        &[],
    );
    assert_eq!(r.status.code(), Some(2));
}

// ------------------------------------------------------------------------------------------
// Served by our master.

/// `mupdated serve` on an existing data directory (after `user add`). SIGTERM on drop.
struct Served {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Served {
    fn start(data: &Path) -> Served {
        let mut add = Command::new(MUPDATED)
            .args(["user", "add", USER, "--data-dir", p(data)])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let _ = add
            .stdin
            .take()
            .unwrap()
            .write_all(format!("{PASSWORD}\n").as_bytes());
        let o = add.wait_with_output().unwrap();
        assert!(
            o.status.success(),
            "user add: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let port = common::free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let log = data.with_extension("log");
        let f = std::fs::File::create(&log).unwrap();
        let child = Command::new(MUPDATED)
            .args([
                "serve",
                "--listen",
                &addr.to_string(),
                "--data-dir",
                p(data),
            ])
            .args(["--servername", "store-test", "--failed-login-pause", "0"])
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap();
        let s = Served { child, addr, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        while MupdateClient::connect(addr, Duration::from_secs(5)).is_err() {
            assert!(
                Instant::now() < deadline,
                "mupdated did not come up: {}",
                common::file_tail(&s.log, 4096)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        s
    }

    fn client(&self) -> MupdateClient {
        MupdateClient::connect_auth(self.addr, USER, PASSWORD)
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        common::terminate_pid(
            self.child.id() as i32,
            libc::SIGTERM,
            Duration::from_secs(10),
        );
        let _ = self.child.wait();
    }
}

/// What Cyrus's master says for the entries of a Cyrus `-d -y` dump (database order): the
/// rules of cyrus-mupdate.md §2.2 applied to Cyrus's own output, independent of our reader.
fn expected_from_dump(dump: &[u8], servername: Option<&str>) -> Vec<(Entry, bool)> {
    let v: serde_json::Value = {
        // Keep file order: parse member by member.
        serde_json::from_slice(dump).unwrap()
    };
    let mut out = Vec::new();
    for (name, e) in v.as_object().unwrap() {
        let letters = e["mbtype"].as_str().unwrap();
        let listed = !letters.contains('d') && !letters.contains('i');
        let reserved = letters.contains('z');
        let mut server = e.get("server").and_then(|s| s.as_str()).map(str::to_string);
        if server.is_none() && !letters.contains('r') {
            server = servername.map(str::to_string);
        }
        let part = e.get("partition").and_then(|s| s.as_str());
        let location = match (&server, part) {
            (Some(s), Some(p)) => format!("{s}!{p}"),
            (Some(s), None) => s.clone(),
            (None, Some(p)) => p.to_string(),
            (None, None) => String::new(),
        };
        let mut acl = String::new();
        for (id, r) in e["acl"].as_object().unwrap() {
            acl.push_str(&format!("{id}\t{}\t", r.as_str().unwrap()));
        }
        let entry = if reserved {
            Entry::reserve(name.as_bytes(), location.as_bytes())
        } else {
            Entry::mailbox(name.as_bytes(), location.as_bytes(), acl.as_bytes())
        };
        out.push((entry, listed));
    }
    out
}

#[test]
fn served_lists_and_finds_as_cyrus_master_would() {
    let t = tmp();
    let cases = [
        ("tricky/mailboxes.twoskip.db", "tricky/dump-y.twoskip.json"),
        ("tricky/mailboxes.skiplist.db", "tricky/dump-y.twoskip.json"),
        (
            "tricky/history/mailboxes.flat.db",
            "tricky/dump-y.twoskip.json",
        ),
        ("tricky/dump-y.skiplist.json", "tricky/dump-y.twoskip.json"),
        (
            "legacy/v34.twoskip.db",
            "legacy/v34.upgraded-by-3.6.dump-y.json",
        ),
        (
            "legacy/v34-dump.undumped-by-3.6-L.twoskip.db",
            "legacy/v34-dump.undumped-by-3.6-L.dump.json",
        ),
    ];
    for (i, (source, oracle)) in cases.iter().enumerate() {
        for servername in [None, Some("be1")] {
            let data = t.path().join(format!("{i}-{}", servername.is_some()));
            let src = fx(source);
            let mut args = vec!["-q", "import", "--data-dir", p(&data), p(&src)];
            if let Some(s) = servername {
                args.extend(["--servername", s]);
            }
            ok(&args);
            let mut expected = expected_from_dump(&std::fs::read(fx(oracle)).unwrap(), servername);
            if source.ends_with(".json") {
                // `ctl_mboxlist -u` skips entries without a partition (the tombstones).
                let dump: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(fx(source)).unwrap()).unwrap();
                expected.retain(|(e, _)| {
                    dump[String::from_utf8_lossy(&e.name).as_ref()]
                        .get("partition")
                        .is_some()
                });
            }
            let served = Served::start(&data);
            let mut c = served.client();
            let listed: Vec<Entry> = expected
                .iter()
                .filter(|(_, l)| *l)
                .map(|(e, _)| e.clone())
                .collect();
            let got = c.list().entries;
            assert_eq!(got, listed, "{source} (--servername {servername:?}): LIST");
            assert!(got.len() >= 8, "{source}: only {} listed", got.len());
            for (e, _) in &expected {
                assert_eq!(
                    c.find(&e.name),
                    vec![e.clone()],
                    "{source}: FIND {}",
                    common::show(&e.name)
                );
            }
            // LIST "be1!" sees exactly the local entries.
            if servername.is_some() {
                let r = c.cmd(b"LIST \"be1!\"");
                let want: Vec<Entry> = listed
                    .iter()
                    .filter(|e| e.location.starts_with(b"be1!"))
                    .cloned()
                    .collect();
                assert_eq!(r.entries, want, "{source}: LIST be1!");
            }
            c.logout();
        }
    }
}

#[test]
fn diff_against_a_served_store() {
    let t = tmp();
    let data = t.path().join("st");
    let tw = fx("tricky/mailboxes.twoskip.db");
    ok(&["-q", "import", "--data-dir", p(&data), p(&tw)]);
    let served = Served::start(&data);
    let url = format!("mupdate://{USER}@{}", served.addr);
    let env = [("MUPDATE_PASSWORD", PASSWORD)];
    let r = run(&["diff", p(&tw), &url], &env);
    assert_eq!(
        r.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&r.stderr)
    );
    let mut c = served.client();
    assert!(c.activate(b"user.bob.Sent", b"be9!p", b"bob\tl\t").is_ok());
    assert!(c.delete(b"user.carol").is_ok());
    assert!(c.reserve(b"user.new", b"be9!p").is_ok());
    let r = run(&["diff", p(&tw), &url], &env);
    assert_eq!(r.status.code(), Some(1));
    let out = String::from_utf8(r.stdout).unwrap();
    // Sorted by name: "user.bob.Sent" < "user.carol" < "user.new".
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(lines[0].starts_with("~ \"user.bob.Sent\""), "{out}");
    assert!(lines[1].starts_with("- \"user.carol\""), "{out}");
    assert!(
        lines[2].starts_with("+ \"user.new\" RESERVE \"be9!p\""),
        "{out}"
    );
    let r = run(
        &["diff", p(&tw), &format!("mupdate://{USER}@{}", served.addr)],
        &[("MUPDATE_PASSWORD", "wrong")],
    );
    assert_eq!(r.status.code(), Some(2));
    c.logout();
    drop(served);
    // What the master wrote is exported as Cyrus's master stores it.
    let out = t.path().join("out.db");
    ok(&[
        "-q",
        "export",
        "--data-dir",
        p(&data),
        p(&out),
        "--backend",
        "twoskip",
    ]);
    let recs = records(&out);
    let get = |k: &[u8]| recs.get(k).map(|v| String::from_utf8_lossy(v).into_owned());
    let sent = get(b"Nuser\x1Fbob\x1FSent").expect("user.bob.Sent exported");
    assert!(
        sent.starts_with("%(T er P p S be9 M ") && sent.ends_with(" A %(bob l))"),
        "{sent}"
    );
    let new = get(b"Nuser\x1Fnew").expect("user.new exported");
    assert!(
        new.starts_with("%(T erz P p S be9 M ") && new.ends_with(" A %())"),
        "{new}"
    );
    assert_eq!(get(b"Nuser\x1Fcarol"), None);
    // Its I record stays, as Cyrus's master leaves it (orphaned).
    assert!(get(b"I1a2b3c4d5e6f7a8b").is_some_and(|v| v.contains("N user\x1Fcarol P p2")));
}

// ------------------------------------------------------------------------------------------
// Against the real Cyrus tools.

fn require_cyrus() -> bool {
    cyr::require_cyrus()
}

#[test]
fn cyrus_dumps_of_exports_equal_the_originals() {
    if !require_cyrus() {
        return;
    }
    let t = tmp();
    for (i, (db, backend, _)) in fixture_dbs().into_iter().enumerate() {
        let sb = Sandbox::new(backend);
        let dir = t.path().join(i.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        let out = round_trip(&dir, &fx(&db), backend, Some("be1"));
        for y in [false, true] {
            same(
                &sb.dump_of(&out, y),
                &sb.dump_of(&fx(&db), y),
                &format!("{db}: ctl_mboxlist -d (-y {y}) of the export"),
            );
        }
    }
}

/// A small deterministic generator (no extra dependency).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.next() as usize % v.len()]
    }
}

/// A random 3.6 mailboxes.db's records: N and I records as Cyrus writes them (awkward
/// names, domains, every type and flag, long ACLs, rename histories), master-style N-only
/// entries, tombstones, orphaned I records, reverse-ACL keys and values Cyrus writes in
/// another field order.
fn random_records(seed: u64, n: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut r = Rng(seed);
    let comps = [
        "Sent",
        "with space",
        "say \"hi\"",
        "back\\slash",
        "100% done",
        "Entw&APw-rfe",
        "a^b",
        "x*y",
        "(paren)",
        "{brace}",
        "NIL",
        "-dash",
        "Archive",
        "Entwürfe",
    ];
    let users = ["bob", "alice", "john^doe", "eve", "carol"];
    let domains = ["", "", "example.com!", "example-x.org!"];
    let types = [
        "e", "e", "e", "n", "b", "c", "a", "s", "p", "f", "ei", "ez", "em", "er", "erz", "el",
        "cl", "eil", "ed", "edl", "erl",
    ];
    let ids = [
        "anyone",
        "-mallory",
        "group:staff members",
        "group:50% off",
        "admin",
        "anonymous",
    ];
    let mut recs = std::collections::BTreeMap::new();
    let mut names = std::collections::HashSet::new();
    while names.len() < n {
        let mut name = String::from(*r.pick(&domains));
        if r.next() % 4 == 0 {
            name.push_str(r.pick::<&str>(&["shared", "Public Folders", "News"]));
        } else {
            name.push_str("user.");
            name.push_str(r.pick::<&str>(&users));
        }
        for _ in 0..r.next() % 3 {
            name.push('.');
            name.push_str(r.pick::<&str>(&comps));
        }
        if r.next() % 15 == 0 {
            name = format!("DELETED.{name}.{:X}", 0x6500_0000 + r.next() % 0x100_0000);
        }
        if !names.insert(name.clone()) {
            continue;
        }
        let letters = *r.pick(&types);
        let mut e = CyrusEntry {
            name: name.clone().into_bytes(),
            mbtype: mbtype::from_letters(letters.as_bytes()).unwrap(),
            mtime: 1_600_000_000 + (r.next() % 100_000_000) as i64,
            ..CyrusEntry::default()
        };
        let mut acl = Vec::new();
        for _ in 0..r.next() % 6 {
            acl.extend_from_slice(r.pick(&ids).as_bytes());
            acl.push(b'\t');
            acl.extend_from_slice(
                r.pick::<&str>(&["lrs", "lrswipkxtecdan", "", "p"])
                    .as_bytes(),
            );
            acl.push(b'\t');
        }
        if r.next() % 20 == 0 {
            acl.extend_from_slice(&[b"x".repeat(1030), b"\tlr\t".to_vec()].concat());
        }
        e.acl = if r.next() % 10 == 0 { None } else { Some(acl) };
        let dbname = mboxname::to_dbname_cyrus(&e.name);
        let master_style = r.next() % 6 == 0;
        if master_style {
            // What a murder master stores: REMOTE, server, no uniqueid.
            e.mbtype = mbtype::REMOTE
                | if r.next() % 3 == 0 {
                    mbtype::RESERVE
                } else {
                    0
                };
            e.server = Some(
                r.pick::<&str>(&["be1", "imap-be2.example.com", ""])
                    .as_bytes()
                    .to_vec(),
            );
            e.partition = (r.next() % 4 != 0).then(|| b"default".to_vec());
            e.acl = Some(e.acl.unwrap_or_default());
        } else {
            e.partition = Some(r.pick::<&str>(&["default", "p2"]).as_bytes().to_vec());
            if letters.contains('r') || letters.contains('m') {
                e.server = Some(b"imap-be2.example.com".to_vec());
            }
            e.uidvalidity = r.next() as u32;
            e.createdmodseq = r.next() % 1000;
            e.foldermodseq = r.next() % 100_000;
            let uid = format!("{:08x}-0000-4000-8000-{:012x}", r.next(), r.next());
            e.uniqueid = Some(uid.clone().into_bytes());
            if letters.contains('d') {
                // A tombstone as mboxlist_deletemailbox writes it: no P, no A.
                e.partition = None;
                e.acl = None;
            }
            let mut ie = e.clone();
            if r.next() % 5 == 0 {
                ie.name_history.push(FormerName {
                    name: b"user.bob.Old".to_vec(),
                    mtime: 1_690_000_000,
                    uidvalidity: 7,
                    createdmodseq: 3,
                    foldermodseq: 9,
                    mbtype: 0,
                    partition: Some(b"default".to_vec()),
                });
            }
            recs.insert(
                entry::i_key(uid.as_bytes()),
                entry::encode_i_value(&ie, &dbname).unwrap(),
            );
        }
        let mut v = entry::encode_n_value(&e).unwrap();
        if r.next() % 12 == 0 && e.uniqueid.is_some() {
            // Same fields in another order (not what encode writes): kept verbatim.
            let s = String::from_utf8(v).unwrap();
            let i = s.find(" I ").unwrap();
            let end = i + 3 + s[i + 3..].find(' ').unwrap();
            v = format!("{}{}{})", &s[..i], &s[end..s.len() - 1], &s[i..end]).into_bytes();
        }
        if e.acl.as_ref().is_some_and(|a| !a.is_empty()) && r.next() % 10 == 0 && !master_style {
            recs.insert([b"AU\x1Ebob\x1E".as_slice(), &dbname].concat(), Vec::new());
        }
        recs.insert(entry::n_key(&dbname), v);
    }
    // Orphaned I records (3.6 never deletes them) and the reverse-ACL marker.
    for i in 0..3 {
        let e = CyrusEntry {
            name: format!("user.bob.Purged{i}").into_bytes(),
            partition: Some(b"purgeme".to_vec()),
            acl: Some(b"bob\tlrs\t".to_vec()),
            mtime: T0,
            uidvalidity: 1,
            ..CyrusEntry::default()
        };
        let db = mboxname::to_dbname_cyrus(&e.name);
        recs.insert(
            entry::i_key(format!("orphan-{seed}-{i}").as_bytes()),
            entry::encode_i_value(&e, &db).unwrap(),
        );
    }
    recs.insert(b"AS\x1E".to_vec(), Vec::new());
    recs.into_iter().collect()
}

fn write_db(path: &Path, backend: Backend, mut recs: Vec<(Vec<u8>, Vec<u8>)>) {
    recs.sort_by(|a, b| db::compare(backend, &a.0, &b.0));
    db::write(
        path,
        backend,
        recs.into_iter().map(Ok::<_, std::io::Error>),
        &WriteOptions {
            fsync: false,
            ..WriteOptions::default()
        },
    )
    .unwrap();
}

/// Property: import → export is the identity on the records of random 3.6 files (our kv
/// listing), for every backend, with and without --servername.
#[test]
fn random_sets_round_trip_identically() {
    let t = tmp();
    for seed in 0..6u64 {
        for (j, backend) in [Backend::Twoskip, Backend::Skiplist, Backend::Flat]
            .iter()
            .enumerate()
        {
            let dir = t.path().join(format!("{seed}-{j}"));
            std::fs::create_dir_all(&dir).unwrap();
            let src = dir.join("src.db");
            write_db(
                &src,
                *backend,
                random_records(0x5eed_0000 + seed, 60 + 20 * seed as usize),
            );
            let sn = (seed % 2 == 0).then_some("be1");
            let out = round_trip(&dir, &src, backend.name(), sn);
            same(
                &ok(&["kv", p(&out)]),
                &ok(&["kv", p(&src)]),
                &format!("seed {seed} {backend}: records"),
            );
            let r = run(&["diff", "--all-fields", p(&src), p(&out)], &[]);
            assert_eq!(
                r.status.code(),
                Some(0),
                "{}",
                String::from_utf8_lossy(&r.stdout)
            );
        }
    }
}

/// Random sets through the real `ctl_mboxlist -d`: the export's dump equals the original's.
#[test]
fn random_sets_dump_the_same_through_cyrus() {
    if !require_cyrus() {
        return;
    }
    let t = tmp();
    for (j, backend) in [Backend::Twoskip, Backend::Skiplist, Backend::Flat]
        .iter()
        .enumerate()
    {
        let sb = Sandbox::new(backend.name());
        for seed in 0..2u64 {
            let dir = t.path().join(format!("{seed}-{j}"));
            std::fs::create_dir_all(&dir).unwrap();
            let src = dir.join("src.db");
            write_db(&src, *backend, random_records(0xc0de + seed, 150));
            let out = round_trip(&dir, &src, backend.name(), Some("be1"));
            for y in [false, true] {
                let want = sb.dump_of(&src, y);
                assert!(
                    want.len() > 10_000,
                    "{backend}: Cyrus dumped only {} bytes",
                    want.len()
                );
                same(
                    &sb.dump_of(&out, y),
                    &want,
                    &format!("{backend} seed {seed} -y {y}"),
                );
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// push

/// A backend: an imapd.conf and a mailboxes.db, as `ctl_mboxlist -m` would read them.
fn backend_conf(dir: &Path, db: &Path, master: &dyn MasterUnderTest) -> PathBuf {
    let config = dir.join("config");
    std::fs::create_dir_all(&config).unwrap();
    std::fs::copy(db, config.join("mailboxes.db")).unwrap();
    let conf = dir.join("imapd.conf");
    std::fs::write(
        &conf,
        format!(
            "# a backend\nconfigdirectory: {}\nservername: be1\nmupdate_server: {}\n\
             mupdate_authname: {}\nmupdate_password: {}\n",
            config.display(),
            master.addr(),
            master.user(),
            master.password()
        ),
    )
    .unwrap();
    conf
}

/// Entries the master already has before the push: one stale (deleted), one with the
/// wrong ACL (activated), one elsewhere (reported for wipe), one right (left alone).
fn seed_master(c: &mut MupdateClient) {
    assert!(c
        .activate(b"user.zz-stale", b"be1!default", b"x\tl\t")
        .is_ok());
    assert!(c
        .activate(b"user.bob.Sent", b"be1!default", b"bob\tl\t")
        .is_ok());
    assert!(c
        .activate(b"user.carol", b"be9!default", b"carol\tlrswipkxtecdan\t")
        .is_ok());
    assert!(c
        .activate(b"user.bob", b"be1!default", b"bob\tlrswipkxtecdan\t")
        .is_ok());
    assert!(c.reserve(b"user.reserved-stale", b"be1!default").is_ok());
}

fn push(conf: &Path, dry: bool) -> String {
    let mut args = vec!["push", "-C", p(conf)];
    if dry {
        args.push("--dry-run");
    }
    let o = run(&args, &[]);
    assert!(
        o.status.success(),
        "push: {}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn push_scenario(master: &dyn MasterUnderTest, dir: &Path) -> (Vec<Entry>, String, String) {
    let mut c = master.connect_auth();
    seed_master(&mut c);
    let conf = backend_conf(dir, &fx("tricky/mailboxes.twoskip.db"), master);
    let dry = push(&conf, true);
    assert_eq!(
        c.list().entries.len(),
        5,
        "{}: --dry-run wrote",
        master.kind()
    );
    let first = push(&conf, false);
    assert_eq!(
        dry,
        first,
        "{}: --dry-run announces what the run does",
        master.kind()
    );
    let list = c.list().entries;
    let second = push(&conf, true);
    let again = push(&conf, false);
    assert_eq!(
        second,
        again,
        "{}: --dry-run of the second run",
        master.kind()
    );
    assert_eq!(
        c.list().entries,
        list,
        "{}: a second push changed the list",
        master.kind()
    );
    c.logout();
    (list, first, second)
}

#[test]
fn push_gives_the_same_list_on_our_master_and_on_cyrus() {
    let t = tmp();
    let ours = OurMaster::start("push-master", USER, PASSWORD);
    let (our_list, our_first, our_second) = push_scenario(&ours, &t.path().join("ours"));
    for l in [
        "Remove from MUPDATE: user.zz-stale",
        "Remove from MUPDATE: user.reserved-stale",
        "Force Activate: user.bob.Sent",
        "Remove Local Mailbox: user.carol",
        "Remove remote flag on: user.bob.Moving",
        "Force Activate: user.bob.Reserved",
    ] {
        assert!(
            our_first.lines().any(|x| x == l),
            "missing {l:?} in\n{our_first}"
        );
    }
    let named = |n: &str| our_first.lines().any(|l| l.ends_with(&format!(": {n}")));
    assert!(!named("user.bob"), "user.bob agreed already:\n{our_first}");
    assert!(!named("user.bob.Archive"), "intermediates are not pushed");
    assert!(!named("user.bob.Gone"), "tombstones are not pushed");
    // The second run writes nothing, except what Cyrus's own logic always redoes: a local
    // reservation is "not found" by mboxlist_lookup, so it is deleted from the master and
    // pushed again. The MOVING mailbox (whose local flag we leave) and the one the master
    // has elsewhere are only mentioned.
    for l in our_second.lines() {
        assert!(
            [
                "Remove remote flag on: user.bob.Moving",
                "Remove Local Mailbox: user.carol",
                "Remove from MUPDATE: user.bob.Reserved",
                "Force Activate: user.bob.Reserved",
            ]
            .contains(&l),
            "second run: {l}"
        );
    }
    let sent = our_list
        .iter()
        .find(|e| e.name == b"user.bob.Sent")
        .unwrap();
    assert_eq!(sent.location, b"be1!default");
    assert_eq!(sent.acl, b"bob\tlrswipkxtecdan\t");
    assert!(our_list.iter().all(|e| e.kind == Kind::Mailbox));
    assert!(our_list
        .iter()
        .any(|e| e.name == b"user.carol" && e.location == b"be9!default"));

    if !require_cyrus() {
        return;
    }
    let cyrus = CyrusMaster::start(CyrusOpts::default());
    let (cy_list, cy_first, cy_second) = push_scenario(&cyrus, &t.path().join("cyrus"));
    assert_eq!(our_list, cy_list, "LIST after push: ours vs Cyrus");
    assert_eq!(our_first, cy_first);
    assert_eq!(our_second, cy_second);
    // Our store exported holds what Cyrus's master holds (up to the write times).
    let cy_db = t.path().join("cyrus-master.db");
    std::fs::copy(cyrus.inst.config_dir().join("mailboxes.db"), &cy_db).unwrap();
    ours_export_check(&ours, &cy_db, t.path());
}

fn ours_export_check(ours: &OurMaster, cyrus_db: &Path, dir: &Path) {
    let out = dir.join("ours-export.db");
    ok(&[
        "-q",
        "export",
        "--data-dir",
        p(&ours.root.join("data")),
        p(&out),
        "--backend",
        "twoskip",
    ]);
    let norm = |b: Vec<u8>| -> String {
        let s = String::from_utf8_lossy(&b).into_owned();
        let mut o = String::new();
        for line in s.lines() {
            let mut words: Vec<String> = line.split(' ').map(str::to_string).collect();
            for i in 1..words.len() {
                if words[i - 1] == "M" && words[i].chars().all(|c| c.is_ascii_digit()) {
                    words[i] = "<t>".into();
                }
            }
            o.push_str(&words.join(" "));
            o.push('\n');
        }
        o
    };
    assert_eq!(
        norm(ok(&["kv", p(&out)])),
        norm(ok(&["kv", p(cyrus_db)])),
        "our exported store vs the Cyrus master's mailboxes.db"
    );
}
