//! Conformance case 56 (cyrus-mupdate.md §6, §3.4, cyrus-mboxlist-formats.md §9): the real
//! Cyrus 3.6.1 client `ctl_mboxlist -m` of a *backend* (`servername: rback`, no daemon) pushes
//! its local mailboxes.db to a master, here ours and, with the identical steps, the real
//! Cyrus master; both must end with the same LIST.
//!
//! Steps, against each master:
//! 1. the master holds a few entries of other servers (`otherback`, and `rback2`, which
//!    shares the prefix `rback` but not `rback!`), and nothing of `rback`;
//! 2. the backend's mailboxes.db is filled with `ctl_mboxlist -u` from a JSON dump of ~200
//!    mailboxes (spaces, quotes, backslashes, `^`, `-`, `%`, UTF-8, domains; partitions
//!    `default` and `p2`; several ACL shapes);
//! 3. `ctl_mboxlist -m` exits 0; afterwards `LIST "rback!"` shows exactly those mailboxes at
//!    `rback!<partition>` with their ACLs;
//! 4. a second `ctl_mboxlist -m` exits 0 and changes nothing (same LIST; an UPDATE
//!    subscriber sees no change after a NOOP barrier);
//! 5. the backend gets a fresh mailboxes.db from a smaller dump, and the master gets entries
//!    for `rback` the backend does not have (active and reserved), a stale ACL and a wrong
//!    partition for mailboxes it does have; `ctl_mboxlist -m` exits 0, DELETEs the extra
//!    entries and re-ACTIVATEs the stale ones;
//! 6. the two masters' full LISTs are equal, byte for byte.

mod common;

use common::cyrus::{self, CyrusMaster, CyrusOpts};
use common::{show, wait_output_timeout, Entry, MasterUnderTest, MupdateClient, OurMaster};
use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

const BACKEND: &str = "rback";
const N_MAILBOXES: usize = 200;

// ------------------------------------------------------------------------------------------
// the data set

/// One local mailbox of the backend.
#[derive(Clone, Debug)]
struct Mbox {
    name: String,
    partition: &'static str,
    acl: Vec<(String, String)>,
}

impl Mbox {
    fn acl_string(&self) -> String {
        self.acl
            .iter()
            .map(|(id, rights)| format!("{id}\t{rights}\t"))
            .collect()
    }
    fn location(&self) -> String {
        format!("{BACKEND}!{}", self.partition)
    }
    fn entry(&self) -> Entry {
        Entry::mailbox(
            self.name.as_bytes(),
            self.location().as_bytes(),
            self.acl_string().as_bytes(),
        )
    }
}

fn mailbox(i: usize) -> Mbox {
    let name = match i % 12 {
        0 => format!("user.u{i}"),
        1 => format!("user.u{}.Sent Items", i - 1),
        2 => format!("user.q\"uote{i}"),
        3 => format!("user.back\\slash{i}.x\\y"),
        4 => format!("user.caf\u{e9}{i}.\u{65e5}\u{672c}"),
        5 => format!("example.com!user.x{i}"),
        6 => format!("example.com!user.x{}.sub", i - 1),
        7 => format!("shared.a^b.c{i}.d e"),
        8 => format!("user.dash-{i}"),
        9 => format!("user.dash-{}.child", i - 1),
        10 => format!("user.p{i}.100% done"),
        _ => format!("user.mixed \"q\" \\ {i}^x.y z"),
    };
    let partition = if i % 3 == 1 { "p2" } else { "default" };
    let owner = format!("u{i}");
    let acl = match i % 4 {
        0 => vec![(owner, "lrswipkxtecdan".to_string())],
        1 => vec![
            (owner, "lrswipkxtecda".to_string()),
            ("anyone".to_string(), "lrs".to_string()),
        ],
        2 => vec![
            (owner, "lrswipkxtecdan".to_string()),
            ("group:staff".to_string(), "lr".to_string()),
            ("b\\s\"q".to_string(), "p".to_string()),
        ],
        _ => vec![],
    };
    Mbox {
        name,
        partition,
        acl,
    }
}

fn all_mailboxes() -> Vec<Mbox> {
    let v: Vec<Mbox> = (0..N_MAILBOXES).map(mailbox).collect();
    let mut names: Vec<&str> = v.iter().map(|m| m.name.as_str()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), v.len(), "names of the data set must be unique");
    v
}

/// The ones kept in step 5: every mailbox but those with `i % 7 == 3` (a child is dropped
/// along with its parent so that no orphan is left behind).
fn kept(i: usize) -> bool {
    let parent = match i % 12 {
        1 | 6 | 9 => i - 1,
        _ => i,
    };
    parent % 7 != 3 && i % 7 != 3
}

/// A `ctl_mboxlist -d` style JSON dump (what `-u` reads, cyrus-mboxlist-formats.md §8.4).
fn dump_json(mboxes: &[(usize, Mbox)]) -> String {
    let mut root = serde_json::Map::new();
    for (i, m) in mboxes {
        let mut acl = serde_json::Map::new();
        for (id, rights) in &m.acl {
            acl.insert(id.clone(), serde_json::Value::String(rights.clone()));
        }
        let v = serde_json::json!({
            "uidvalidity": format!("{}", 1_690_000_000 + i),
            "createdmodseq": "1",
            "foldermodseq": "1",
            "mbtype": "e",
            "partition": m.partition,
            "acl": acl,
            "uniqueid": format!("5eed0000-0000-4000-8000-{i:012x}"),
        });
        root.insert(m.name.clone(), v);
    }
    serde_json::to_string_pretty(&serde_json::Value::Object(root)).unwrap()
}

// ------------------------------------------------------------------------------------------
// the backend configuration

fn chown_tree(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    if path.is_dir() && !path.is_symlink() {
        for e in std::fs::read_dir(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())) {
            chown_tree(&e.expect("dir entry").path(), uid, gid);
        }
    }
}

/// A Cyrus 3.6 backend configuration (no daemon) whose `mupdate_server` is `master`.
struct Backend {
    dir: Option<tempfile::TempDir>,
    root: PathBuf,
}

impl Backend {
    fn new(master: &dyn MasterUnderTest) -> Backend {
        let dir = tempfile::Builder::new()
            .prefix("cyrus-backend-")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let root = dir.path().to_path_buf();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        for sub in [
            "config/db",
            "config/socket",
            "config/proc",
            "config/lock",
            "config/log",
            "spool/default",
            "spool/p2",
        ] {
            std::fs::create_dir_all(root.join(sub)).unwrap();
        }
        let d = root.display();
        let conf = format!(
            "configdirectory: {d}/config\n\
             partition-default: {d}/spool/default\n\
             partition-p2: {d}/spool/p2\n\
             defaultpartition: default\n\
             servername: {BACKEND}\n\
             virtdomains: userid\n\
             allowplaintext: yes\n\
             mupdate_server: {}\n\
             mupdate_authname: {}\n\
             mupdate_password: {}\n\
             mupdate_config: standard\n\
             syslog_prefix: cyrus-backend-{}\n",
            master.addr(),
            master.user(),
            master.password(),
            std::process::id()
        );
        std::fs::write(root.join("imapd.conf"), conf).unwrap();
        let b = Backend {
            dir: Some(dir),
            root,
        };
        b.chown();
        b
    }

    fn chown(&self) {
        // SAFETY: getuid has no preconditions.
        if unsafe { libc::getuid() } == 0 {
            let (uid, gid) = cyrus::cyrus_ids().expect("user `cyrus` missing");
            chown_tree(&self.root, uid, gid);
        }
    }

    fn conf(&self) -> PathBuf {
        self.root.join("imapd.conf")
    }

    /// `ctl_mboxlist` with `args` (as the cyrus user), `stdin` fed; bounded by 60 s.
    fn ctl_mboxlist(&self, args: &[&str], stdin: &[u8]) -> std::process::Output {
        self.chown();
        let mut child = cyrus::cyrus_command(&cyrus::ctl_mboxlist_bin())
            .arg("-C")
            .arg(self.conf())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn ctl_mboxlist: {e}"));
        let err = child.stdin.take().unwrap().write_all(stdin).err();
        let out = wait_output_timeout(
            child,
            Duration::from_secs(60),
            &format!("ctl_mboxlist {args:?}"),
        );
        assert!(err.is_none(), "writing to ctl_mboxlist {args:?}: {err:?}");
        out
    }

    /// A fresh mailboxes.db holding exactly `mboxes`.
    fn load(&self, mboxes: &[(usize, Mbox)]) {
        let _ = std::fs::remove_file(self.root.join("config/mailboxes.db"));
        let out = self.ctl_mboxlist(&["-u"], dump_json(mboxes).as_bytes());
        assert!(
            out.status.success(),
            "ctl_mboxlist -u failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let dump = cyrus::dump_mboxlist(&self.conf());
        assert_eq!(
            dump.entries.len(),
            mboxes.len(),
            "the backend's mailboxes.db after -u: {}",
            dump.raw
        );
    }

    /// `ctl_mboxlist -m`: push to the master. Returns (exit code, stdout+stderr, elapsed).
    fn push(&self) -> (Option<i32>, String, Duration) {
        let t = Instant::now();
        let out = self.ctl_mboxlist(&["-m"], b"");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text, t.elapsed())
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(d) = self.dir.take() {
                eprintln!("(kept backend {} for inspection)", d.keep().display());
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// the procedure

/// What the procedure saw on one master.
struct Outcome {
    /// Full LIST at the end, entry lines without the tag, in order.
    final_list: Vec<Vec<u8>>,
    /// `(exit code, output)` of the three `ctl_mboxlist -m` runs.
    pushes: Vec<(Option<i32>, String)>,
}

/// The entry lines of a LIST without their tag.
fn list_lines(c: &mut MupdateClient, prefix: Option<&str>) -> (Vec<Entry>, Vec<Vec<u8>>) {
    let cmd = match prefix {
        Some(p) => {
            let mut v = b"LIST ".to_vec();
            v.extend(common::lit(p.as_bytes()));
            v
        }
        None => b"LIST".to_vec(),
    };
    let r = c.cmd(&cmd);
    r.expect_ok("list complete");
    let lines = r
        .entry_lines
        .iter()
        .map(|l| l[r.tag.len()..].to_vec())
        .collect();
    (r.entries, lines)
}

fn write_ok(c: &mut MupdateClient, cmd: &[u8], m: &dyn MasterUnderTest) {
    let r = c.cmd(cmd);
    assert!(
        r.is_ok() && r.text == b"done",
        "{} master: `{}` got `{}`",
        m.kind(),
        show(cmd),
        show(&r.final_line)
    );
}

#[track_caller]
fn assert_rback_list(m: &dyn MasterUnderTest, when: &str, want: &[Mbox]) {
    let mut c = m.connect_auth();
    let (got, _) = list_lines(&mut c, Some(&format!("{BACKEND}!")));
    let mut want: Vec<Entry> = want.iter().map(Mbox::entry).collect();
    want.sort_by_key(|e| cyrus::dbname(&e.name));
    let got_map: BTreeMap<&[u8], &Entry> = got.iter().map(|e| (e.name.as_slice(), e)).collect();
    let want_map: BTreeMap<&[u8], &Entry> = want.iter().map(|e| (e.name.as_slice(), e)).collect();
    let missing: Vec<&Entry> = want
        .iter()
        .filter(|e| got_map.get(e.name.as_slice()) != Some(e))
        .collect();
    let extra: Vec<&Entry> = got
        .iter()
        .filter(|e| want_map.get(e.name.as_slice()) != Some(e))
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{} master, {when}: LIST \"{BACKEND}!\" has {} entries, want {}.\n missing or \
         different (want): {missing:?}\n unexpected (got): {extra:?}",
        m.kind(),
        got.len(),
        want.len()
    );
    assert_eq!(
        got,
        want,
        "{} master, {when}: LIST \"{BACKEND}!\" is not in mailboxes.db order",
        m.kind()
    );
    c.logout();
}

fn procedure(m: &dyn MasterUnderTest) -> Outcome {
    let kind = m.kind();
    let t0 = Instant::now();
    let all: Vec<(usize, Mbox)> = all_mailboxes().into_iter().enumerate().collect();
    let small: Vec<(usize, Mbox)> = all.iter().filter(|(i, _)| kept(*i)).cloned().collect();
    assert!(small.len() < all.len() && small.len() > N_MAILBOXES / 2);

    // 1. Entries of other servers.
    let mut c = m.connect_auth();
    for cmd in [
        common::activate_cmd(b"user.other1", b"otherback!default", b"o\tlr\t"),
        common::activate_cmd(b"user.r2", b"rback2!default", b"r\tlr\t"),
        common::reserve_cmd(b"user.elsewhere", b"otherback!p"),
        common::activate_cmd(b"user.noslash", BACKEND.as_bytes(), b""),
    ] {
        write_ok(&mut c, &cmd, m);
    }
    c.logout();

    let backend = Backend::new(m);
    let mut pushes = Vec::new();
    let mut push = |when: &str| {
        let (code, text, took) = backend.push();
        eprintln!("{kind}: ctl_mboxlist -m ({when}): exit {code:?} in {took:?}: {text}");
        assert_eq!(
            code,
            Some(0),
            "{kind} master: ctl_mboxlist -m ({when}) failed: {text}\n{}",
            m.diagnostics()
        );
        pushes.push((code, text));
    };

    // 2, 3. Populate, push.
    backend.load(&all);
    push("first");
    let everything: Vec<Mbox> = all.iter().map(|(_, m)| m.clone()).collect();
    assert_rback_list(m, "after the first push", &everything);
    let mut c = m.connect_auth();
    let (_, before) = list_lines(&mut c, None);
    c.logout();

    // 4. Again: no change, not even a rewrite of an unchanged entry.
    let mut sub = m.connect_auth();
    let r = sub.cmd(b"UPDATE");
    r.expect_ok("streaming starts");
    push("second");
    let r = sub.cmd(b"NOOP");
    r.expect_ok("Noop done");
    assert!(
        r.entries.is_empty() && r.other.is_empty(),
        "{kind} master: the second ctl_mboxlist -m changed entries: {:?} {:?}",
        r.entries,
        r.other
    );
    let mut c = m.connect_auth();
    let (_, after) = list_lines(&mut c, None);
    assert!(
        before == after,
        "{kind} master: LIST changed after the second push"
    );

    // 5. Fewer local mailboxes; extra and stale entries on the master.
    backend.load(&small);
    let stale_acl = &small[0].1;
    let wrong_part = &small[1].1;
    for cmd in [
        common::activate_cmd(b"user.ghost1", b"rback!default", b"g\tlr\t"),
        common::reserve_cmd(b"user.ghost2", b"rback!p2"),
        common::activate_cmd(b"user.ghost3.sub", b"rback!nopart", b""),
        common::activate_cmd(
            stale_acl.name.as_bytes(),
            stale_acl.location().as_bytes(),
            b"stale\tl\t",
        ),
        common::activate_cmd(
            wrong_part.name.as_bytes(),
            format!("{BACKEND}!other").as_bytes(),
            wrong_part.acl_string().as_bytes(),
        ),
    ] {
        write_ok(&mut c, &cmd, m);
    }
    c.logout();
    push("third");
    let remaining: Vec<Mbox> = small.iter().map(|(_, m)| m.clone()).collect();
    assert_rback_list(m, "after the third push", &remaining);
    let mut c = m.connect_auth();
    let (_, final_list) = list_lines(&mut c, None);
    c.logout();
    for other in [
        &b"user.other1"[..],
        b"user.r2",
        b"user.elsewhere",
        b"user.noslash",
    ] {
        assert!(
            final_list
                .iter()
                .any(|l| l.windows(other.len()).any(|w| w == other)),
            "{kind} master: {} (another server's) is gone",
            show(other)
        );
    }
    eprintln!("{kind}: procedure in {:?}", t0.elapsed());
    Outcome { final_list, pushes }
}

#[test]
fn ctl_mboxlist_m_against_our_master_and_cyrus() {
    if !cyrus::require_cyrus() {
        return;
    }
    let t0 = Instant::now();
    let ours = OurMaster::start(
        "mupdate-master",
        cyrus::DEFAULT_USER,
        cyrus::DEFAULT_PASSWORD,
    );
    let theirs = CyrusMaster::start(CyrusOpts {
        servername: Some("mupdate-master".into()),
        ..CyrusOpts::default()
    });
    // Both procedures at once (they share nothing).
    let (o, c) = std::thread::scope(|s| {
        let ho = s.spawn(|| procedure(&ours));
        let hc = s.spawn(|| procedure(&theirs));
        (ho.join(), hc.join())
    });
    let c = c.unwrap_or_else(|e| std::panic::resume_unwind(e));
    let o = o.unwrap_or_else(|e| std::panic::resume_unwind(e));
    if c.final_list != o.final_list {
        let n = c
            .final_list
            .iter()
            .zip(&o.final_list)
            .take_while(|(a, b)| a == b)
            .count();
        panic!(
            "after the same ctl_mboxlist -m steps the masters' LISTs differ ({} vs {} entries); \
             first difference at #{n}: cyrus {} / ours {}",
            c.final_list.len(),
            o.final_list.len(),
            c.final_list.get(n).map_or("<none>".into(), |l| show(l)),
            o.final_list.get(n).map_or("<none>".into(), |l| show(l)),
        );
    }
    for (i, (pc, po)) in c.pushes.iter().zip(&o.pushes).enumerate() {
        assert_eq!(
            pc.0, po.0,
            "push #{i}: exit codes differ (cyrus {pc:?}, ours {po:?})"
        );
    }
    eprintln!(
        "ctl_mboxlist_m_against_our_master_and_cyrus: {} entries at the end, {:?}",
        o.final_list.len(),
        t0.elapsed()
    );
}
