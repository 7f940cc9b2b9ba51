//! Interop: a real Cyrus 3.6.1 slave (`mupdate` without `-m`, under cyrmaster, PLAIN with
//! `allowplaintext: yes`) replicating from a master.
//!
//! The same body runs against two masters:
//! * `cyrus_slave_follows_cyrus_master`: the real Cyrus master, the reference that proves the
//!   test itself;
//! * `cyrus_slave_follows_our_master`: our `mupdated serve`.
//!
//! The body writes 1,000 mailboxes to the master (names with spaces, quotes, backslashes,
//! 8-bit bytes (valid and invalid UTF-8), domains, dots and carets; ACLs with several entries;
//! some only reserved), starts the slave (its banner means "initial sync done"), and checks
//! the slave's LIST against the master's, byte for byte per entry and in order, and the
//! slave's mailboxes.db through `ctl_mboxlist -d` and `cyr_dbtool show`. Then it runs RESERVE,
//! ACTIVATE and DELETE on the master and polls the slave until it has followed (up to 20 s:
//! Cyrus's master flushes its UPDATE streams on a 5 s timer), and checks everything again.
//!
//! On failure the masters' and the slave's logs (stderr, syslog, cyrmaster.log) are printed
//! by their Drop, after the panic message, and their directories are kept.

mod common;

use common::cyrus::{self, CyrusMaster, CyrusOpts, CyrusSlave};
use common::{activate_cmd, delete_cmd, reserve_cmd, show, Entry, Kind, MasterUnderTest};
use common::{MupdateClient, OurMaster, Response};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const N_MAILBOXES: usize = 1000;
const FOLLOW_TIMEOUT: Duration = Duration::from_secs(20);

#[test]
fn cyrus_slave_follows_cyrus_master() {
    if !cyrus::require_cyrus() {
        return;
    }
    let t0 = Instant::now();
    let master = CyrusMaster::start(CyrusOpts {
        servername: Some("interop-master".into()),
        ..CyrusOpts::default()
    });
    slave_follows(&master);
    eprintln!("cyrus_slave_follows_cyrus_master: {:?}", t0.elapsed());
}

#[test]
fn cyrus_slave_follows_our_master() {
    if !cyrus::require_cyrus() {
        return;
    }
    let t0 = Instant::now();
    let master = OurMaster::start(
        "interop-master",
        cyrus::DEFAULT_USER,
        cyrus::DEFAULT_PASSWORD,
    );
    // The banner contract of `mupdated serve`.
    let b = &master.banner;
    assert_eq!(b.len(), 3, "our banner: {b:?}");
    assert_eq!(b[0], "* AUTH \"PLAIN\"");
    assert_eq!(b[1], "* PARTIAL-UPDATE");
    assert!(
        b[2].starts_with("* OK MUPDATE \"interop-master\" \"mupdate\" \"")
            && b[2].ends_with("\" \"(master)\""),
        "our banner: {b:?}"
    );
    slave_follows(&master);
    eprintln!("cyrus_slave_follows_our_master: {:?}", t0.elapsed());
}

/// Mailbox `i` of the data set.
fn name(i: usize) -> Vec<u8> {
    let mut n: Vec<u8> = match i % 10 {
        0 => format!("user.u{i}").into(),
        1 => format!("user.u{i}.Sent Items").into(),
        2 => format!("user.q\"uote{i}").into(),
        3 => format!("user.back\\slash{i}.x\\y").into(),
        4 => format!("user.caf\u{e9}{i}.\u{65e5}\u{672c}").into(), // valid UTF-8
        5 => {
            let mut v = format!("user.raw{i}.").into_bytes();
            v.extend_from_slice(b"\xe9t\xe9\xff"); // 8-bit, not UTF-8
            v
        }
        6 => format!("example.com!user.x{i}").into(),
        7 => format!("example.org!user.dot^ted{i}.sub").into(),
        8 => format!("shared.a^b.c{i}.d e").into(),
        _ => format!("user.mixed \"q\" \\ {i}^x.y z").into(),
    };
    if i % 97 == 13 {
        // A few longer names (still far below Cyrus's 490-byte LIST cut).
        n.extend_from_slice(b".");
        n.extend(std::iter::repeat_n(b'L', 200));
    }
    n
}

fn location(i: usize, gen: usize) -> Vec<u8> {
    let host = (i + gen) % 7;
    match (i + gen) % 4 {
        0 => format!("backend{host}!default"),
        1 => format!("backend{host}!p\"x"),
        2 => format!("backend{host}"), // no partition
        _ => format!("backend{host}!part.with.dots"),
    }
    .into_bytes()
}

fn acl(i: usize, gen: usize) -> Vec<u8> {
    let mut a: Vec<u8> = format!("u{i}\tlrswipkxtecda\tanyone\tlrs\t").into();
    match (i + gen) % 5 {
        0 => a.extend_from_slice(b"group:staff\tlr\t"),
        1 => a.extend_from_slice(b"admin\"q\tlrswipkxtecda\tb\\s\tr\t"),
        2 => a.extend_from_slice(b"\xe9t\xe9\tl\tother\tlrs\t"), // 8-bit identifier
        3 => a.extend_from_slice(format!("g{gen}\tlr\th{gen}\tp\tz\tlrswi\t").as_bytes()),
        _ => {}
    }
    a
}

/// What the master should hold, keyed by name.
#[derive(Default)]
struct Model(BTreeMap<Vec<u8>, Entry>);

impl Model {
    /// Entries in Cyrus mailboxes.db key order (dbname order), which LIST must follow.
    fn in_list_order(&self) -> Vec<Entry> {
        let mut v: Vec<Entry> = self.0.values().cloned().collect();
        v.sort_by_key(|e| cyrus::dbname(&e.name));
        v
    }
}

/// Queues one write and applies it to the model.
fn apply(
    cmds: &mut Vec<Vec<u8>>,
    model: &mut Model,
    cmd: Vec<u8>,
    name: &[u8],
    after: Option<Entry>,
) {
    cmds.push(cmd);
    match after {
        Some(e) => model.0.insert(name.to_vec(), e),
        None => model.0.remove(name),
    };
}

/// Runs `cmds` pipelined; each must answer `OK "done"`.
fn write_all(c: &mut MupdateClient, cmds: &[Vec<u8>], m: &dyn MasterUnderTest) {
    for (r, cmd) in c.pipeline(cmds, 100).iter().zip(cmds) {
        assert!(
            r.is_ok() && r.text == b"done",
            "{} master: `{}` got `{}`",
            m.kind(),
            show(cmd),
            show(&r.final_line),
        );
    }
}

/// The entry lines of a response without their tag: what "byte for byte" compares.
fn untagged(r: &Response) -> Vec<Vec<u8>> {
    r.entry_lines
        .iter()
        .map(|l| l[r.tag.len()..].to_vec())
        .collect()
}

fn first_difference(a: &[Entry], b: &[Entry]) -> String {
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        if x != y {
            return format!("first difference at #{i}: {x:?} vs {y:?}");
        }
    }
    format!("lengths {} vs {}", a.len(), b.len())
}

fn slave_follows(m: &dyn MasterUnderTest) {
    let kind = m.kind();
    let t_write = Instant::now();
    let mut c = m.connect_auth();
    let mut model = Model::default();
    let mut cmds = Vec::new();
    for i in 0..N_MAILBOXES {
        let (n, l) = (name(i), location(i, 0));
        let e = if i % 7 == 3 {
            cmds.push(reserve_cmd(&n, &l));
            Entry::reserve(&n, &l)
        } else {
            let a = acl(i, 0);
            cmds.push(activate_cmd(&n, &l, &a));
            Entry::mailbox(&n, &l, &a)
        };
        model.0.insert(n, e);
    }
    assert_eq!(
        model.0.len(),
        N_MAILBOXES,
        "names of the data set must be unique"
    );
    write_all(&mut c, &cmds, m);
    eprintln!("{kind}: {N_MAILBOXES} writes in {:?}", t_write.elapsed());

    let master_list = c.list();
    let want = model.in_list_order();
    assert!(
        master_list.entries == want,
        "{kind} master: LIST differs from what was written ({})",
        first_difference(&master_list.entries, &want),
    );

    // The slave's banner means its initial sync is done.
    let t_sync = Instant::now();
    let slave = CyrusSlave::start(
        m.addr(),
        m.user(),
        m.password(),
        CyrusOpts {
            servername: Some("interop-slave".into()),
            ..CyrusOpts::default()
        },
    );
    eprintln!(
        "{kind}: slave ready (initial sync) in {:?}",
        t_sync.elapsed()
    );
    let last = slave.inst.banner.last().cloned().unwrap_or_default();
    assert!(
        last.ends_with(&format!("\"mupdate://{}\"", m.addr())),
        "slave banner: {:?}",
        slave.inst.banner
    );
    let mut sc = slave.connect_auth();
    check_slave(&mut c, &mut sc, &slave, &model, m, "after the initial sync");

    // Changes after the initial sync; the slave follows them through its UPDATE stream.
    let t_follow = Instant::now();
    let mut cmds = Vec::new();
    for j in 0..20 {
        // New reservations; the first ten are then activated.
        let n = format!("user.new{j}.R \"e\" \\s\u{e9}").into_bytes();
        let l = location(j, 3);
        apply(
            &mut cmds,
            &mut model,
            reserve_cmd(&n, &l),
            &n,
            Some(Entry::reserve(&n, &l)),
        );
        if j < 10 {
            let a = acl(j, 3);
            apply(
                &mut cmds,
                &mut model,
                activate_cmd(&n, &l, &a),
                &n,
                Some(Entry::mailbox(&n, &l, &a)),
            );
        }
    }
    for j in 0..10 {
        // Brand-new active mailboxes, one with an invalid-UTF-8 name.
        let mut n = format!("example.net!user.fresh{j}").into_bytes();
        if j == 0 {
            n.extend_from_slice(b"\xfe");
        }
        let (l, a) = (location(j, 5), acl(j, 5));
        apply(
            &mut cmds,
            &mut model,
            activate_cmd(&n, &l, &a),
            &n,
            Some(Entry::mailbox(&n, &l, &a)),
        );
    }
    let existing: Vec<Entry> = model.in_list_order();
    let (mut moved, mut activated, mut deleted, mut demoted) = (0, 0, 0, 0);
    for (k, e) in existing.iter().enumerate() {
        if e.name.starts_with(b"user.new") || e.name.starts_with(b"example.net!") {
            continue;
        }
        match (k % 9, e.kind) {
            (0, Kind::Mailbox) if moved < 20 => {
                // New location and ACL.
                let (l, a) = (location(k, 1), acl(k, 1));
                apply(
                    &mut cmds,
                    &mut model,
                    activate_cmd(&e.name, &l, &a),
                    &e.name,
                    Some(Entry::mailbox(&e.name, &l, &a)),
                );
                moved += 1;
            }
            (1 | 2 | 4, Kind::Reserve) if activated < 10 => {
                let a = acl(k, 2);
                apply(
                    &mut cmds,
                    &mut model,
                    activate_cmd(&e.name, &e.location, &a),
                    &e.name,
                    Some(Entry::mailbox(&e.name, &e.location, &a)),
                );
                activated += 1;
            }
            (3 | 5, _) if deleted < 30 => {
                apply(&mut cmds, &mut model, delete_cmd(&e.name), &e.name, None);
                deleted += 1;
            }
            (7, Kind::Mailbox) if demoted < 5 => {
                // RESERVE at the same location demotes an active mailbox (Cyrus 3.6).
                apply(
                    &mut cmds,
                    &mut model,
                    reserve_cmd(&e.name, &e.location),
                    &e.name,
                    Some(Entry::reserve(&e.name, &e.location)),
                );
                demoted += 1;
            }
            _ => {}
        }
    }
    assert_eq!(
        (moved, activated, deleted, demoted),
        (20, 10, 30, 5),
        "data set too small for the change mix"
    );
    write_all(&mut c, &cmds, m);

    let want = model.in_list_order();
    let deadline = Instant::now() + FOLLOW_TIMEOUT;
    let mut polls = 0;
    loop {
        polls += 1;
        let got = sc.list().entries;
        if got == want {
            break;
        }
        if Instant::now() >= deadline {
            panic!(
                "{kind}: the Cyrus slave did not follow {} changes within {FOLLOW_TIMEOUT:?} \
                 ({polls} polls; slave vs model: {})",
                cmds.len(),
                first_difference(&got, &want),
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    eprintln!(
        "{kind}: slave followed {} changes in {:?}",
        cmds.len(),
        t_follow.elapsed()
    );
    check_slave(&mut c, &mut sc, &slave, &model, m, "after the changes");
    sc.logout();
    c.logout();
}

/// Master LIST == model == slave LIST (byte for byte, in order); FIND on the slave; the
/// slave's mailboxes.db via ctl_mboxlist -d and cyr_dbtool.
fn check_slave(
    c: &mut MupdateClient,
    sc: &mut MupdateClient,
    slave: &CyrusSlave,
    model: &Model,
    m: &dyn MasterUnderTest,
    when: &str,
) {
    let kind = m.kind();
    let want = model.in_list_order();

    let master_list = c.list();
    assert!(
        master_list.entries == want,
        "{kind} {when}: master LIST differs from the model ({})",
        first_difference(&master_list.entries, &want)
    );
    let slave_list = sc.list();
    assert!(
        slave_list.entries == want,
        "{kind} {when}: slave LIST differs from the master's ({})",
        first_difference(&slave_list.entries, &want)
    );
    let (ml, sl) = (untagged(&master_list), untagged(&slave_list));
    if let Some(i) = (0..ml.len().min(sl.len())).find(|&i| ml[i] != sl[i]) {
        panic!(
            "{kind} {when}: LIST line #{i} differs in bytes: master `{}` slave `{}`",
            show(&ml[i]),
            show(&sl[i])
        );
    }
    assert_eq!(ml.len(), sl.len());

    // FIND on the slave, for a sample, and for names that must be absent.
    for e in want.iter().step_by(37) {
        let got = sc.find(&e.name);
        assert!(
            got == vec![e.clone()],
            "{kind} {when}: FIND {} on the slave: {got:?}, want {e:?}",
            show(&e.name)
        );
        let mut fc = b"FIND ".to_vec();
        fc.extend(common::lit(&e.name));
        let (mr, sr) = (c.cmd(&fc), sc.cmd(&fc));
        assert_eq!(
            untagged(&mr),
            untagged(&sr),
            "{kind} {when}: FIND bytes master vs slave for {}",
            show(&e.name)
        );
    }
    for i in (0..N_MAILBOXES).step_by(101) {
        let n = name(i);
        if !model.0.contains_key(&n) {
            assert!(
                sc.find(&n).is_empty(),
                "{kind} {when}: deleted {} still on the slave",
                show(&n)
            );
        }
    }

    // The slave's mailboxes.db, byte for byte (cyr_dbtool show), in key order.
    let raw = slave.inst.raw_mailboxes_db();
    let got: Vec<_> = raw.iter().map(|r| r.as_expected()).collect();
    let exp: Vec<_> = want.iter().map(cyrus::expected_record).collect();
    if got != exp {
        let i = (0..got.len().min(exp.len()))
            .find(|&i| got[i] != exp[i])
            .unwrap_or(got.len().min(exp.len()));
        panic!(
            "{kind} {when}: slave mailboxes.db ({} records) differs from the master's {} entries \
             at #{i}: db {:?} vs expected {:?}",
            got.len(),
            exp.len(),
            got.get(i),
            exp.get(i)
        );
    }

    // ... and through ctl_mboxlist -d, which can only show UTF-8 names and ACL identifiers.
    let dump = slave.inst.dump_mboxlist();
    let utf8: Vec<&Entry> = want
        .iter()
        .filter(|e| std::str::from_utf8(&e.name).is_ok())
        .collect();
    let names: Vec<&[u8]> = dump.entries.iter().map(|d| d.name.as_bytes()).collect();
    let want_names: Vec<&[u8]> = utf8.iter().map(|e| e.name.as_slice()).collect();
    assert!(
        names == want_names,
        "{kind} {when}: ctl_mboxlist -d lists {} names, want {}",
        names.len(),
        want_names.len()
    );
    for (d, e) in dump.entries.iter().zip(&utf8) {
        let x = cyrus::expected_record(e);
        let s = |v: &Option<Vec<u8>>| v.as_ref().map(|b| String::from_utf8_lossy(b).into_owned());
        let acl: Vec<(String, String)> = x
            .acl
            .iter()
            .filter_map(|(id, r)| {
                Some((
                    String::from_utf8(id.clone()).ok()?,
                    String::from_utf8(r.clone()).ok()?,
                ))
            })
            .collect();
        assert!(
            d.mbtype.as_bytes() == x.mbtype.as_slice()
                && d.server == s(&x.server)
                && d.partition == s(&x.partition)
                && d.acl == acl,
            "{kind} {when}: ctl_mboxlist -d entry {:?} does not match {e:?}",
            d.json
        );
    }
}
