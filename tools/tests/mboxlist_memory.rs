//! Peak memory of `mboxlist undump` (and `import` of a dump) must not grow with the number of
//! entries: dumps are read in passes, one member or line at a time, and the records go
//! through an external sort (`mupdate::cyrus::dump::undump_stream`).
//!
//! Each case runs the binary under `/usr/bin/time -f %M` at two sizes and compares the peak
//! resident set sizes. Holding the records in memory costs about 3 KB per entry (858 MB for
//! 300k entries before the reader streamed), so 80k more entries would add some 230 MB; the
//! bound on the growth is 24 MB (the sort's 16 MB buffer filling up, the 16 bytes per entry
//! of key hashes). The big run is `#[ignore]`d:
//! `MBOXLIST_MEMORY_ENTRIES=1000000 cargo test --release -p mupdate-tools --test
//! mboxlist_memory -- --ignored --nocapture`.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_mboxlist");
const TIME: &str = "/usr/bin/time";
const MB: u64 = 1024;

/// A `ctl_mboxlist -d` style dump of `n` entries in Cyrus's order: users with 19 folders
/// each, every entry with its own uniqueid.
fn write_dump(path: &Path, n: usize) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    f.write_all(b"{\n").unwrap();
    for i in 0..n {
        let user = format!("u{:07}", i / 20);
        let name = if i % 20 == 0 {
            format!("user.{user}")
        } else {
            format!("user.{user}.Folder{:02}", i % 20)
        };
        if i > 0 {
            f.write_all(b",\n").unwrap();
        }
        write!(
            f,
            "\"{name}\": {{\"name\": \"{name}\", \"mtime\": \"1700000000\", \"uidvalidity\": \"{}\", \
             \"createdmodseq\": \"{i}\", \"foldermodseq\": \"{}\", \"mbtype\": \"e\", \"partition\": \
             \"default\", \"acl\": {{\"{user}\": \"lrswipkxtecdan\", \"anyone\": \"lrs\"}}, \
             \"uniqueid\": \"{i:08x}-0000-4000-8000-{:012x}\", \"name_history\": []}}",
            1_690_000_000 + i,
            i + 100,
            i * 7919
        )
        .unwrap();
    }
    f.write_all(b"\n}\n").unwrap();
    f.flush().unwrap();
}

/// Peak RSS in KB of `mboxlist ARGS`, with `input` on stdin (through a pipe when `pipe`).
fn peak_rss(args: &[&str], input: Option<&Path>, pipe: bool, dir: &Path) -> u64 {
    let out = dir.join("rss.txt");
    let mut c = Command::new(TIME);
    c.args(["-f", "%M", "-o", out.to_str().unwrap(), BIN, "-q"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    match input {
        None => c.stdin(Stdio::null()),
        Some(_) if pipe => c.stdin(Stdio::piped()),
        Some(p) => c.stdin(std::fs::File::open(p).unwrap()),
    };
    let mut child = c.spawn().expect("run /usr/bin/time");
    let feeder = input.filter(|_| pipe).map(|input| {
        let mut stdin = child.stdin.take().unwrap();
        let input = input.to_owned();
        std::thread::spawn(move || {
            let mut f = std::fs::File::open(input).unwrap();
            std::io::copy(&mut f, &mut stdin).unwrap();
        })
    });
    let o = child.wait_with_output().unwrap();
    if let Some(h) = feeder {
        h.join().unwrap();
    }
    assert!(
        o.status.success(),
        "mboxlist {args:?}: {}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    let s = std::fs::read_to_string(&out).unwrap();
    s.trim().lines().last().unwrap().trim().parse().unwrap()
}

/// Peak anonymous RSS in KB of `mboxlist ARGS`, sampled from `/proc/PID/status` every
/// few milliseconds. For `import`: its peak RSS also counts the pages of the LMDB map it
/// touched (file-backed, and growing with the store: 48 MB at 1M entries), which are not
/// what is measured here.
fn peak_anon(args: &[&str], dir: &Path) -> u64 {
    let err = dir.join("stderr.txt");
    let mut child = Command::new(BIN)
        .arg("-q")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let status = format!("/proc/{}/status", child.id());
    let mut peak = 0;
    let st = loop {
        if let Ok(s) = std::fs::read_to_string(&status) {
            let anon = s
                .lines()
                .find_map(|l| l.strip_prefix("RssAnon:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok());
            peak = peak.max(anon.unwrap_or(0));
        }
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    assert!(
        st.success(),
        "mboxlist {args:?}: {st}\n{}",
        std::fs::read_to_string(&err).unwrap_or_default()
    );
    assert!(peak > 0, "no RssAnon sample of mboxlist {args:?}");
    peak
}

/// What is measured: `undump` into each backend from a file or a pipe, or `import`.
#[derive(Clone, Copy)]
enum Run {
    Undump(&'static str, bool),
    Import,
}

/// (what, peak RSS with `small` entries, with `big` entries), in KB.
fn measure(small: usize, big: usize, runs: &[Run]) -> Vec<(String, u64, u64)> {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let dumps: Vec<_> = [small, big]
        .iter()
        .map(|&n| {
            let p = d.join(format!("d{n}.json"));
            write_dump(&p, n);
            p
        })
        .collect();
    let mut rows = Vec::new();
    for &run in runs {
        let mut rss = Vec::new();
        for dump in &dumps {
            let out = d.join("out");
            let _ = std::fs::remove_file(&out);
            let _ = std::fs::remove_dir_all(&out);
            let o = out.to_str().unwrap();
            rss.push(match run {
                Run::Undump(backend, pipe) => {
                    peak_rss(&["undump", "--backend", backend, o], Some(dump), pipe, d)
                }
                Run::Import => peak_anon(&["import", "--data-dir", o, dump.to_str().unwrap()], d),
            });
        }
        let what = match run {
            Run::Undump(b, pipe) => {
                format!(
                    "undump --backend {b} < {}",
                    if pipe { "pipe" } else { "file" }
                )
            }
            Run::Import => "import (anonymous RSS)".to_owned(),
        };
        rows.push((what, rss[0], rss[1]));
    }
    rows
}

#[track_caller]
fn check(rows: &[(String, u64, u64)], small: usize, big: usize, max_growth_mb: u64) {
    for (what, a, b) in rows {
        eprintln!(
            "{what}: {small} entries {} MB, {big} entries {} MB",
            a / MB,
            b / MB
        );
    }
    for (what, a, b) in rows {
        assert!(*b < 100 * MB, "{what}: {big} entries peak at {} MB", b / MB);
        assert!(
            b.saturating_sub(*a) < max_growth_mb * MB,
            "{what}: peak RSS grows from {} MB ({small} entries) to {} MB ({big} entries)",
            a / MB,
            b / MB
        );
    }
}

const ALL: [Run; 5] = [
    Run::Undump("twoskip", false),
    Run::Undump("twoskip", true),
    Run::Undump("skiplist", false),
    Run::Undump("flat", true),
    Run::Import,
];

#[test]
fn undump_memory_does_not_grow_with_the_entries() {
    if !Path::new(TIME).exists() {
        eprintln!("{TIME} missing: skipped");
        return;
    }
    if cfg!(debug_assertions) {
        // Unoptimised builds parse some 20 times slower: fewer and smaller runs (35k more
        // entries held in memory would still add some 100 MB).
        let runs = [Run::Undump("twoskip", true), Run::Import];
        check(&measure(5_000, 40_000, &runs), 5_000, 40_000, 40);
    } else {
        check(&measure(20_000, 100_000, &ALL), 20_000, 100_000, 24);
    }
}

#[test]
#[ignore = "big: a few seconds per run in release"]
fn undump_memory_big() {
    let big = std::env::var("MBOXLIST_MEMORY_ENTRIES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300_000);
    check(&measure(20_000, big, &ALL), 20_000, big, 40);
}
