//! Proves the Cyrus harness (tests/common/cyrus.rs) against the real Cyrus 3.6.1: banner,
//! PLAIN, RESERVE/ACTIVATE/FIND/LIST on a master, replication to a slave, mailboxes.db dumps,
//! syslog capture.

mod common;

use common::cyrus::{self, CyrusMaster, CyrusOpts, CyrusSlave};
use common::{activate_cmd, show, Entry, MasterUnderTest, MupdateClient, Status};
use std::time::{Duration, Instant};

#[test]
fn cyrus_master_banner_and_commands() {
    if !cyrus::require_cyrus() {
        return;
    }
    let m = CyrusMaster::start(CyrusOpts {
        servername: Some("harness-master".into()),
        ..CyrusOpts::default()
    });

    // Banner (spec §1.2), exactly as observed with Debian 12's packages: AUTH, COMPRESS,
    // PARTIAL-UPDATE, then the OK line.
    let b = &m.inst.banner;
    assert_eq!(b.len(), 4, "banner: {b:?}");
    assert_eq!(
        b[0],
        "* AUTH \"SCRAM-SHA-512\" \"SCRAM-SHA-384\" \"SCRAM-SHA-256\" \"SCRAM-SHA-224\" \
         \"SCRAM-SHA-1\" \"DIGEST-MD5\" \"CRAM-MD5\" \"NTLM\" \"PLAIN\" \"LOGIN\""
    );
    assert_eq!(b[1], "* COMPRESS \"DEFLATE\"");
    assert_eq!(b[2], "* PARTIAL-UPDATE");
    let last = &b[3];
    assert!(
        last.starts_with("* OK MUPDATE \"harness-master\" \"Cyrus IMAP\" \"3.6.1-")
            && last.ends_with("\" \"(master)\""),
        "last banner line: {last}"
    );

    let mut c = m.connect_auth();
    // A second AUTHENTICATE is refused.
    let r = c.authenticate_plain(m.user(), m.password()).unwrap();
    assert_eq!(r.status, Status::Bad, "{r:?}");
    assert_eq!(r.text, b"already authenticated");

    c.reserve(b"user.fred", b"hostA!p1").expect_ok("done");
    c.reserve(b"user.fred", b"hostA!p1").expect_ok("done");
    let r = c.reserve(b"user.fred", b"hostB!p1");
    assert_eq!(
        (r.status, r.text.as_slice()),
        (Status::No, &b"mailbox already exists"[..]),
        "{r:?}"
    );
    assert_eq!(
        c.find(b"user.fred"),
        vec![Entry::reserve(b"user.fred", b"hostA!p1")]
    );

    // Exact bytes of a FIND answer (spec §6 case 31).
    let acl = b"fred\tlrswipkxtecda\tanyone\tlrs\t";
    c.activate(b"user.fred", b"hostA!p1", acl).expect_ok("done");
    let r = c.cmd(b"FIND \"user.fred\"");
    r.expect_ok("Search completed");
    assert_eq!(
        r.entry_lines,
        vec![format!(
            "{} MAILBOX {{9+}}\r\nuser.fred {{8+}}\r\nhostA!p1 {{30+}}\r\n{}\r\n",
            r.tag,
            String::from_utf8_lossy(acl)
        )
        .into_bytes()],
        "{:?}",
        r.entry_lines.iter().map(|l| show(l)).collect::<Vec<_>>()
    );
    assert!(c.find(b"user.nobody").is_empty());

    // LIST in mailboxes.db key order (spec §6 case 39), not strcmp order.
    for n in ["user.a0", "user.a^b", "user.a-b", "user.a.x", "user.a"] {
        c.activate(n.as_bytes(), b"hostB!p2", b"anyone\tlr\t")
            .expect_ok("done");
    }
    let names: Vec<String> = c
        .list()
        .entries
        .iter()
        .map(|e| String::from_utf8_lossy(&e.name).into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "user.a",
            "user.a.x",
            "user.a-b",
            "user.a^b",
            "user.a0",
            "user.fred"
        ]
    );

    // DELETE, then the mailboxes.db as ctl_mboxlist -d sees it.
    c.delete(b"user.a0").expect_ok("done");
    assert!(c.find(b"user.a0").is_empty());
    let dump = m.inst.dump_mboxlist();
    let names: Vec<&str> = dump.entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        names,
        ["user.a", "user.a.x", "user.a-b", "user.a^b", "user.fred"]
    );
    let fred = dump.get("user.fred").unwrap();
    assert_eq!(fred.mbtype, "er");
    assert_eq!(fred.server.as_deref(), Some("hostA"));
    assert_eq!(fred.partition.as_deref(), Some("p1"));
    assert_eq!(
        fred.acl,
        vec![
            ("fred".to_string(), "lrswipkxtecda".to_string()),
            ("anyone".to_string(), "lrs".to_string())
        ]
    );
    // ... and byte for byte through cyr_dbtool.
    let raw = m.inst.raw_mailboxes_db();
    assert_eq!(raw.len(), 5, "{raw:?}");
    let rec = raw
        .iter()
        .find(|r| r.dbname == b"user\x1ffred")
        .expect("user.fred in the raw db");
    assert_eq!(
        rec.as_expected(),
        cyrus::expected_record(&Entry::mailbox(b"user.fred", b"hostA!p1", acl))
    );
    c.logout();
}

#[test]
fn cyrus_slave_replicates_50_mailboxes() {
    if !cyrus::require_cyrus() {
        return;
    }
    let t0 = Instant::now();
    let m = CyrusMaster::start(CyrusOpts::default());
    let mut c = m.connect_auth();
    let mut expected = Vec::new();
    let mut cmds = Vec::new();
    for i in 0..50 {
        let name = format!("user.u{i:02}");
        if i % 5 == 4 {
            cmds.push(common::reserve_cmd(name.as_bytes(), b"backend2!default"));
            expected.push(Entry::reserve(name.as_bytes(), b"backend2!default"));
        } else {
            let acl = format!("u{i:02}\tlrswipkxtecda\tanyone\tlr\t");
            cmds.push(activate_cmd(
                name.as_bytes(),
                b"backend1!default",
                acl.as_bytes(),
            ));
            expected.push(Entry::mailbox(
                name.as_bytes(),
                b"backend1!default",
                acl.as_bytes(),
            ));
        }
    }
    for r in c.pipeline(&cmds, 25) {
        r.expect_ok("done");
    }
    let master_list = c.list();
    assert_eq!(master_list.entries, expected);

    let s = CyrusSlave::start(m.addr(), m.user(), m.password(), CyrusOpts::default());
    let last = s.inst.banner.last().unwrap();
    assert!(
        last.starts_with("* OK MUPDATE \"cyrus-slave\" \"Cyrus IMAP\" \"3.6.1-")
            && last.ends_with(&format!("\"mupdate://{}\"", m.addr())),
        "slave banner: {:?}",
        s.inst.banner
    );
    let mut sc = s.connect_auth();
    for e in &expected {
        assert_eq!(sc.find(&e.name), vec![e.clone()], "FIND on the slave");
    }
    let slave_list = sc.list();
    assert_eq!(slave_list.entries, expected);
    // Byte for byte, apart from the tag.
    let strip = |r: &common::Response| -> Vec<Vec<u8>> {
        r.entry_lines
            .iter()
            .map(|l| l[r.tag.len()..].to_vec())
            .collect()
    };
    assert_eq!(strip(&slave_list), strip(&master_list));

    // Writes on a slave are refused (spec §6 case 48).
    let r = sc.activate(b"user.q", b"h!p", b"a\tl\t");
    assert_eq!(
        (r.status, r.text.as_slice()),
        (Status::Bad, &b"read-only session"[..])
    );

    // The slave's mailboxes.db.
    let dump = s.inst.dump_mboxlist();
    assert_eq!(dump.entries.len(), 50, "{}", dump.raw);
    for (d, e) in dump.entries.iter().zip(&expected) {
        let x = cyrus::expected_record(e);
        assert_eq!(d.name.as_bytes(), e.name.as_slice());
        assert_eq!(d.mbtype.as_bytes(), x.mbtype.as_slice(), "{d:?}");
        assert_eq!(d.server.as_deref().map(str::as_bytes), x.server.as_deref());
        assert_eq!(
            d.partition.as_deref().map(str::as_bytes),
            x.partition.as_deref()
        );
        let acl: Vec<(Vec<u8>, Vec<u8>)> = d
            .acl
            .iter()
            .map(|(a, b)| (a.clone().into_bytes(), b.clone().into_bytes()))
            .collect();
        assert_eq!(acl, x.acl, "{d:?}");
    }
    let raw: Vec<_> = s
        .inst
        .raw_mailboxes_db()
        .iter()
        .map(|r| r.as_expected())
        .collect();
    let want: Vec<_> = expected.iter().map(cyrus::expected_record).collect();
    assert_eq!(raw, want);

    // A change on the master reaches the slave (Cyrus flushes its UPDATE stream every 5 s).
    c.delete(b"user.u00").expect_ok("done");
    c.activate(b"user.new", b"backend3!p", b"x\tl\t")
        .expect_ok("done");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let gone = sc.find(b"user.u00").is_empty();
        let new = sc.find(b"user.new");
        if gone && new == vec![Entry::mailbox(b"user.new", b"backend3!p", b"x\tl\t")] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "slave did not follow DELETE/ACTIVATE within 20 s (user.u00 gone: {gone}, user.new: {new:?})"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("cyrus_slave_replicates_50_mailboxes: {:?}", t0.elapsed());
}

#[test]
fn syslog_capture_sees_cyrus_messages() {
    if !cyrus::require_cyrus() {
        return;
    }
    let m = CyrusMaster::start(CyrusOpts {
        extra_imapd: vec!["failedloginpause: 0".into()],
        ..CyrusOpts::default()
    });
    let mut c = MupdateClient::connect(m.addr(), common::IO_TIMEOUT).unwrap();
    let r = c.authenticate_plain(m.user(), "wrong password").unwrap();
    assert_eq!(
        (r.status, r.text.as_slice()),
        (Status::No, &b"undefined error!"[..])
    );
    // Cyrus logs a failed login ("badlogin"); wait for it to reach the capture.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lines = m.inst.syslog();
        if lines.iter().any(|l| l.contains("badlogin")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no badlogin line for prefix {} in {} within 10 s; got {lines:?}",
            m.inst.syslog_prefix,
            cyrus::syslog_file().display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
