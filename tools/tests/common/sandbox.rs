//! The real Cyrus tools in a throw-away configuration like the fixtures' sandboxes (see
//! `tests/fixtures/cyrus-3.6/README.md`): fixed time through the fixtures' shim, `LC_ALL=C`,
//! `TZ=UTC`, run as user `cyrus` when the tests run as root.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use super::cyrus::cyrus_ids;

/// The shim's default `time()`, also the fixtures' `M`.
pub const T0: i64 = 1_700_000_000;

/// The Cyrus 3.6.1 fixtures: `MUPDATE_FIXTURES`, else the repository's copy, else the
/// shared folder next to the repository.
pub fn fixtures() -> PathBuf {
    if let Some(p) = std::env::var_os("MUPDATE_FIXTURES") {
        return PathBuf::from(p);
    }
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/cyrus-3.6");
    if repo.is_dir() {
        return repo;
    }
    PathBuf::from("/work/shared/fixtures/cyrus-3.6")
}

pub fn fx(rel: &str) -> PathBuf {
    fixtures().join(rel)
}

/// Byte equality, reported by the first differing line.
pub fn same(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let g = String::from_utf8_lossy(got);
        let w = String::from_utf8_lossy(want);
        let line = g.lines().zip(w.lines()).position(|(a, b)| a != b);
        panic!(
            "{what}: output differs ({} vs {} bytes, first differing line {line:?})\n got: \
             {:?}\nwant: {:?}",
            got.len(),
            want.len(),
            line.and_then(|i| g.lines().nth(i)),
            line.and_then(|i| w.lines().nth(i))
        );
    }
}

/// A throw-away Cyrus configuration like the fixtures' sandboxes, plus the time shim.
pub struct Sandbox {
    pub dir: tempfile::TempDir,
    shim: PathBuf,
}

pub fn chown_tree(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).unwrap();
    if p.is_dir() {
        for e in std::fs::read_dir(p).unwrap() {
            chown_tree(&e.unwrap().path(), uid, gid);
        }
    }
}

impl Sandbox {
    pub fn new(backend: &str) -> Sandbox {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for sub in ["conf/db", "part", "p2"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        std::fs::write(
            d.join("imapd.conf"),
            format!(
                "configdirectory: {0}/conf\npartition-default: {0}/part\npartition-p2: {0}/p2\n\
                 defaultpartition: default\nvirtdomains: userid\nunixhierarchysep: no\n\
                 altnamespace: no\nmboxlist_db: {backend}\nmboxname_lockpath: {0}/conf/lock\n\
                 proc_path: {0}/conf/proc\n",
                d.display()
            ),
        )
        .unwrap();
        std::fs::write(d.join("conf/db/skipstamp"), (T0 as u32).to_be_bytes()).unwrap();
        let shim = d.join("cyrfix_shim.so");
        let st = Command::new("gcc")
            .args(["-O2", "-shared", "-fPIC", "-o"])
            .arg(&shim)
            .arg(fx("tools/cyrfix_shim.c"))
            .status()
            .expect("gcc is needed to build the fixtures' time shim");
        assert!(st.success(), "building the shim failed");
        Sandbox { dir, shim }
    }

    pub fn conf(&self) -> PathBuf {
        self.dir.path().join("imapd.conf")
    }

    pub fn db(&self) -> PathBuf {
        self.dir.path().join("conf/mailboxes.db")
    }

    /// Run a Cyrus tool (as `cyrus` when root) with the shim.
    pub fn cyrus(&self, tool: &str, args: &[&str], stdin: &[u8]) -> Output {
        #[cfg(unix)]
        use std::os::unix::process::CommandExt;
        if let Some((uid, gid)) = cyrus_ids() {
            if unsafe { libc::getuid() } == 0 {
                chown_tree(self.dir.path(), uid, gid);
            }
        }
        let mut c = Command::new(Path::new("/usr/lib/cyrus/bin").join(tool));
        c.arg("-C").arg(self.conf()).args(args);
        c.env("LD_PRELOAD", &self.shim)
            .env("CYRFIX_TIME", T0.to_string());
        c.env("LC_ALL", "C").env("TZ", "UTC");
        if unsafe { libc::getuid() } == 0 {
            if let Some((uid, gid)) = cyrus_ids() {
                c.uid(uid).gid(gid).env("HOME", "/tmp");
            }
        }
        let mut child = c
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {tool}: {e}"));
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        let o = child.wait_with_output().unwrap();
        assert!(
            o.status.success(),
            "{tool} {args:?}: {}\n{}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
        o
    }

    /// `ctl_mboxlist -d [-y]` of a copy of `file`.
    pub fn dump_of(&self, file: &Path, y: bool) -> Vec<u8> {
        copy_rw(file, &self.db());
        self.cyrus("ctl_mboxlist", if y { &["-d", "-y"] } else { &["-d"] }, b"")
            .stdout
    }

    /// `cyr_dbtool … batch` `SHOW ""` of a copy of `file`.
    pub fn kv_of(&self, file: &Path, backend: &str) -> Vec<u8> {
        let copy = self.dir.path().join("conf/kvcopy.db");
        copy_rw(file, &copy);
        let c = copy.to_str().unwrap().to_owned();
        self.cyrus("cyr_dbtool", &[&c, backend, "batch"], b"SHOW \"\"\n")
            .stdout
    }
}

/// Copy a (possibly read-only) file into a sandbox where Cyrus may open it read-write.
pub fn copy_rw(from: &Path, to: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::copy(from, to).unwrap();
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o644)).unwrap();
}
