//! The real Cyrus 3.6.1 `mupdate` under `cyrmaster`, for interop tests and benchmarks.
//!
//! Each [`CyrusMaster`] / [`CyrusSlave`] lives in a temporary directory of its own under
//! /tmp, listens on a free port of 127.0.0.1, and is stopped (SIGTERM, then SIGKILL) on drop,
//! also when the test panics. On a panic the directory is kept and the instance's syslog
//! lines and cyrmaster log are printed.
//!
//! Binaries are taken from the Debian paths; `CYRUS_LIBEXEC`, `CYRMASTER` and `SASLPASSWD2`
//! override them. With `MUPDATE_SKIP_CYRUS=1`, [`require_cyrus`] returns false so tests can
//! skip; otherwise missing binaries are a test failure.
//!
//! Syslog: Cyrus logs only via syslog(3) to /dev/log. [`ensure_syslog`] binds a datagram
//! socket there (once per process, rebinding if a previous owner died) and appends every
//! message to one shared file ([`syslog_file`]); each instance has its own `syslog_prefix`
//! and reads back only its own lines. Test processes running in parallel share the file, so
//! whichever of them owns /dev/log captures for all.

use super::{file_tail, free_port, pid_alive, terminate_pid, wait_output_timeout, Entry, Kind};
use super::{MasterUnderTest, MupdateClient};
use std::io::{Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const DEFAULT_USER: &str = "mupdateadmin";
pub const DEFAULT_PASSWORD: &str = "s3cret-pw";

// ------------------------------------------------------------------------------------------
// binaries

pub fn libexec_dir() -> PathBuf {
    std::env::var_os("CYRUS_LIBEXEC")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/cyrus/bin"))
}
pub fn cyrmaster_bin() -> PathBuf {
    std::env::var_os("CYRMASTER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/cyrmaster"))
}
pub fn saslpasswd2_bin() -> PathBuf {
    std::env::var_os("SASLPASSWD2")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/saslpasswd2"))
}
pub fn mupdate_bin() -> PathBuf {
    libexec_dir().join("mupdate")
}
pub fn ctl_cyrusdb_bin() -> PathBuf {
    libexec_dir().join("ctl_cyrusdb")
}
pub fn ctl_mboxlist_bin() -> PathBuf {
    libexec_dir().join("ctl_mboxlist")
}
pub fn cyr_dbtool_bin() -> PathBuf {
    libexec_dir().join("cyr_dbtool")
}

fn missing_binaries() -> Vec<PathBuf> {
    [
        cyrmaster_bin(),
        saslpasswd2_bin(),
        mupdate_bin(),
        ctl_cyrusdb_bin(),
        ctl_mboxlist_bin(),
        cyr_dbtool_bin(),
    ]
    .into_iter()
    .filter(|p| !p.is_file())
    .collect()
}

/// Call first in every test that needs Cyrus. Returns false (the test should return early)
/// only when `MUPDATE_SKIP_CYRUS=1`; panics when a binary is missing otherwise.
#[track_caller]
pub fn require_cyrus() -> bool {
    if std::env::var("MUPDATE_SKIP_CYRUS").as_deref() == Ok("1") {
        eprintln!("MUPDATE_SKIP_CYRUS=1: skipping a test that needs Cyrus 3.6.1");
        return false;
    }
    let missing = missing_binaries();
    assert!(
        missing.is_empty(),
        "Cyrus binaries missing: {missing:?}. Install them with `apt-get install -y cyrus-common \
         cyrus-murder cyrus-clients sasl2-bin libsasl2-modules` (or set CYRUS_LIBEXEC / CYRMASTER \
         / SASLPASSWD2, or MUPDATE_SKIP_CYRUS=1 to skip)"
    );
    true
}

fn is_root() -> bool {
    // SAFETY: getuid has no preconditions.
    unsafe { libc::getuid() == 0 }
}

/// uid and gid of the `cyrus` user (gid of its primary group, `mail` on Debian).
pub fn cyrus_ids() -> Option<(u32, u32)> {
    let name = std::ffi::CString::new("cyrus").unwrap();
    // SAFETY: getpwnam returns NULL or a pointer to static storage; we copy two ints out
    // at once. Tests calling it concurrently only ever look up the same name.
    unsafe {
        let pw = libc::getpwnam(name.as_ptr());
        if pw.is_null() {
            None
        } else {
            Some(((*pw).pw_uid, (*pw).pw_gid))
        }
    }
}

/// A command that runs as the `cyrus` user when the tests run as root.
pub fn cyrus_command(program: &Path) -> Command {
    let mut c = Command::new(program);
    if is_root() {
        if let Some((uid, gid)) = cyrus_ids() {
            c.uid(uid).gid(gid);
            c.env("HOME", "/tmp");
        }
    }
    c
}

fn chown_tree(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    if path.is_dir() && !path.is_symlink() {
        for e in std::fs::read_dir(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())) {
            chown_tree(&e.expect("dir entry").path(), uid, gid);
        }
    }
}

// ------------------------------------------------------------------------------------------
// syslog capture

/// The shared file all captured syslog messages are appended to.
pub fn syslog_file() -> PathBuf {
    std::env::var_os("MUPDATE_TEST_SYSLOG")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/mupdate-tests-syslog.log"))
}

static SYSLOG_LOCK: Mutex<()> = Mutex::new(());

/// Makes sure something listens on /dev/log (binding it here if nobody does). Returns a note
/// for diagnostics when that is impossible (e.g. not root); never panics.
pub fn ensure_syslog() -> Option<String> {
    let _g = SYSLOG_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dev_log = Path::new("/dev/log");
    if let Ok(probe) = UnixDatagram::unbound() {
        if probe.connect(dev_log).is_ok() {
            return None; // a live listener: ours, another test process's, or a syslogd
        }
    }
    // Absent or stale (its owner exited): take it over.
    if dev_log.exists() || dev_log.is_symlink() {
        if let Err(e) = std::fs::remove_file(dev_log) {
            return Some(format!("cannot remove stale /dev/log: {e}"));
        }
    }
    let sock = match UnixDatagram::bind(dev_log) {
        Ok(s) => s,
        Err(e) => return Some(format!("cannot bind /dev/log: {e} (Cyrus logs are lost)")),
    };
    let _ = std::fs::set_permissions(dev_log, std::fs::Permissions::from_mode(0o666));
    let path = syslog_file();
    let file = match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) => return Some(format!("cannot open {}: {e}", path.display())),
    };
    let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666));
    std::thread::Builder::new()
        .name("syslog-capture".into())
        .spawn(move || {
            let mut file = file;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match sock.recv(&mut buf) {
                    Ok(n) => {
                        let mut msg = buf[..n].to_vec();
                        while msg.last() == Some(&b'\n') || msg.last() == Some(&0) {
                            msg.pop();
                        }
                        msg.push(b'\n');
                        let _ = file.write_all(&msg); // one write per message (O_APPEND)
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        })
        .expect("spawn syslog capture thread");
    None
}

/// Current length of the shared syslog file (to read only later lines).
fn syslog_offset() -> u64 {
    std::fs::metadata(syslog_file())
        .map(|m| m.len())
        .unwrap_or(0)
}

/// The captured syslog lines since `offset` that contain `needle`.
pub fn syslog_lines(offset: u64, needle: &str) -> Vec<String> {
    let mut f = match std::fs::File::open(syslog_file()) {
        Ok(f) => f,
        Err(_) => return Vec::new(),
    };
    let _ = f.seek(SeekFrom::Start(offset));
    let mut buf = Vec::new();
    let _ = std::io::Read::read_to_end(&mut f, &mut buf);
    String::from_utf8_lossy(&buf)
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

// ------------------------------------------------------------------------------------------
// instances

/// Options for a Cyrus instance.
#[derive(Debug, Clone)]
pub struct CyrusOpts {
    /// `servername` (also the SASL realm). Default: `cyrus-master` / `cyrus-slave`.
    pub servername: Option<String>,
    /// Users created in the sasldb and listed in `admins` (only admins may authenticate).
    /// Default: one, [`DEFAULT_USER`] / [`DEFAULT_PASSWORD`].
    pub users: Vec<(String, String)>,
    /// Extra `imapd.conf` lines, e.g. `failedloginpause: 0`.
    pub extra_imapd: Vec<String>,
    /// How long to wait for the banner (for a slave: for its initial sync).
    pub ready_timeout: Duration,
}

impl Default for CyrusOpts {
    fn default() -> Self {
        CyrusOpts {
            servername: None,
            users: vec![(DEFAULT_USER.to_string(), DEFAULT_PASSWORD.to_string())],
            extra_imapd: Vec::new(),
            ready_timeout: Duration::from_secs(60),
        }
    }
}

static INSTANCE_SEQ: AtomicU32 = AtomicU32::new(0);

/// What masters and slaves share: the directory, cyrmaster, logs.
pub struct Instance {
    dir: Option<tempfile::TempDir>,
    /// The temp dir (imapd.conf, cyrus.conf, sasldb2, config/, spool/, cyrmaster.log).
    pub root: PathBuf,
    pub addr: SocketAddr,
    pub servername: String,
    pub role: &'static str,
    /// Unique `syslog_prefix` of this instance.
    pub syslog_prefix: String,
    syslog_offset: u64,
    syslog_note: Option<String>,
    cyrmaster_pid: i32,
    /// The banner lines (no CRLF) seen when the instance became ready.
    pub banner: Vec<String>,
    /// Diagnostics already went into a panic message: Drop need not print them again.
    reported: bool,
}

impl Instance {
    fn start(
        role: &'static str,
        opts: &CyrusOpts,
        slave_of: Option<(SocketAddr, &str, &str)>,
    ) -> Self {
        let missing = missing_binaries();
        assert!(
            missing.is_empty(),
            "Cyrus binaries missing: {missing:?} (see require_cyrus)"
        );
        let syslog_note = ensure_syslog();
        let seq = INSTANCE_SEQ.fetch_add(1, Ordering::Relaxed);
        let syslog_prefix = format!("cyrus-t{}-{seq}-{role}", std::process::id());
        let servername = opts
            .servername
            .clone()
            .unwrap_or_else(|| format!("cyrus-{role}"));
        assert!(!opts.users.is_empty(), "CyrusOpts::users must not be empty");

        let dir = tempfile::Builder::new()
            .prefix(&format!("cyrus-{role}-"))
            .tempdir_in("/tmp")
            .expect("create temp dir");
        let root = dir.path().to_path_buf();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755))
            .expect("chmod temp dir");
        for sub in ["db", "socket", "proc", "lock", "log"] {
            std::fs::create_dir_all(root.join("config").join(sub)).expect("mkdir config/*");
        }
        std::fs::create_dir_all(root.join("spool")).expect("mkdir spool");

        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let d = root.display();
        let admins: Vec<&str> = opts.users.iter().map(|(u, _)| u.as_str()).collect();
        let mut conf = format!(
            "configdirectory: {d}/config\n\
             partition-default: {d}/spool\n\
             servername: {servername}\n\
             admins: {}\n\
             allowplaintext: yes\n\
             sasl_pwcheck_method: auxprop\n\
             sasl_auxprop_plugin: sasldb\n\
             sasl_sasldb_path: {d}/sasldb2\n\
             mupdate_config: standard\n\
             syslog_prefix: {syslog_prefix}\n",
            admins.join(" ")
        );
        if let Some((master, user, password)) = slave_of {
            conf.push_str(&format!(
                "mupdate_server: {master}\nmupdate_authname: {user}\nmupdate_password: {password}\n"
            ));
        }
        for l in &opts.extra_imapd {
            conf.push_str(l);
            conf.push('\n');
        }
        std::fs::write(root.join("imapd.conf"), conf).expect("write imapd.conf");
        let m_flag = if slave_of.is_none() { " -m" } else { "" };
        let cyrus_conf = format!(
            "START {{\n  recover cmd=\"{ctl} -C {d}/imapd.conf -r\"\n}}\n\
             SERVICES {{\n  mupdate cmd=\"{mupdate} -C {d}/imapd.conf{m_flag}\" listen=\"{addr}\" prefork=1\n}}\n\
             EVENTS {{\n  checkpoint cmd=\"{ctl} -C {d}/imapd.conf -c\" period=30\n}}\n",
            ctl = ctl_cyrusdb_bin().display(),
            mupdate = mupdate_bin().display(),
        );
        std::fs::write(root.join("cyrus.conf"), cyrus_conf).expect("write cyrus.conf");

        for (user, password) in &opts.users {
            let mut child = Command::new(saslpasswd2_bin())
                .args(["-p", "-c", "-f"])
                .arg(root.join("sasldb2"))
                .args(["-u", &servername, user])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("spawn saslpasswd2: {e}"));
            child
                .stdin
                .take()
                .unwrap()
                .write_all(password.as_bytes())
                .expect("write password to saslpasswd2");
            let out = wait_output_timeout(child, Duration::from_secs(30), "saslpasswd2");
            assert!(
                out.status.success(),
                "saslpasswd2 for {user} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if is_root() {
            let (uid, gid) = cyrus_ids().expect("user `cyrus` missing (install cyrus-common)");
            chown_tree(&root, uid, gid);
        }

        let mut inst = Instance {
            dir: Some(dir),
            root: root.clone(),
            addr,
            servername,
            role,
            syslog_prefix,
            syslog_offset: syslog_offset(),
            syslog_note,
            cyrmaster_pid: 0,
            banner: Vec::new(),
            reported: false,
        };
        let out = wait_output_timeout(
            Command::new(cyrmaster_bin())
                .arg("-C")
                .arg(root.join("imapd.conf"))
                .arg("-M")
                .arg(root.join("cyrus.conf"))
                .arg("-p")
                .arg(root.join("cyrmaster.pid"))
                .arg("-d")
                .arg("-L")
                .arg(root.join("cyrmaster.log"))
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("spawn cyrmaster: {e}")),
            Duration::from_secs(30),
            "cyrmaster -d",
        );
        if !out.status.success() {
            inst.reported = true;
            panic!(
                "cyrmaster -d exited {}: {}{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                inst.diagnostics()
            );
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while inst.cyrmaster_pid == 0 {
            if let Ok(s) = std::fs::read_to_string(root.join("cyrmaster.pid")) {
                if let Ok(pid) = s.trim().parse::<i32>() {
                    inst.cyrmaster_pid = pid;
                    break;
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "cyrmaster wrote no pid file within 10 s\n{}",
                    inst.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        inst.wait_ready(opts.ready_timeout);
        inst
    }

    /// Connects until a banner is read; bounded by `timeout`.
    fn wait_ready(&mut self, timeout: Duration) {
        let start = Instant::now();
        let deadline = start + timeout;
        let mut last_err = String::from("never connected");
        loop {
            if !pid_alive(self.cyrmaster_pid) {
                self.reported = true;
                panic!(
                    "Cyrus {} ({}): cyrmaster (pid {}) died before the banner (last error: {last_err})\n{}",
                    self.role,
                    self.addr,
                    self.cyrmaster_pid,
                    self.diagnostics()
                );
            }
            let now = Instant::now();
            if now >= deadline {
                self.reported = true;
                panic!(
                    "Cyrus {} ({}): no MUPDATE banner within {timeout:?} (last error: {last_err}){}\n{}",
                    self.role,
                    self.addr,
                    if self.role == "slave" {
                        " -- a slave sends it only after its initial sync from the master"
                    } else {
                        ""
                    },
                    self.diagnostics()
                );
            }
            match std::net::TcpStream::connect_timeout(&self.addr, Duration::from_secs(2)) {
                Ok(s) => match MupdateClient::from_stream(s, deadline - now) {
                    Ok(c) => {
                        self.banner = c.banner_text();
                        c.logout();
                        // Guards against a port picked twice: the banner must be ours.
                        let want = format!("* OK MUPDATE \"{}\" ", self.servername);
                        if !self.banner.last().is_some_and(|l| l.starts_with(&want)) {
                            self.reported = true;
                            panic!(
                                "Cyrus {} ({}): the banner is not from this instance \
                                 (servername {}): {:?}\n{}",
                                self.role,
                                self.addr,
                                self.servername,
                                self.banner,
                                self.diagnostics()
                            );
                        }
                        return;
                    }
                    Err(e) => last_err = format!("reading banner: {e}"),
                },
                Err(e) => last_err = format!("connect: {e}"),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn imapd_conf(&self) -> PathBuf {
        self.root.join("imapd.conf")
    }
    pub fn config_dir(&self) -> PathBuf {
        self.root.join("config")
    }
    pub fn cyrmaster_pid(&self) -> i32 {
        self.cyrmaster_pid
    }

    /// This instance's syslog lines so far.
    pub fn syslog(&self) -> Vec<String> {
        syslog_lines(self.syslog_offset, &self.syslog_prefix)
    }

    pub fn diagnostics(&self) -> String {
        let mut s = format!(
            "--- Cyrus {} {} at {} (dir {}, cyrmaster pid {})\n",
            self.role,
            self.servername,
            self.addr,
            self.root.display(),
            self.cyrmaster_pid
        );
        if let Some(n) = &self.syslog_note {
            s.push_str(&format!("syslog capture: {n}\n"));
        }
        let lines = self.syslog();
        s.push_str(&format!(
            "--- syslog ({} lines with prefix {}, from {}; last 200):\n",
            lines.len(),
            self.syslog_prefix,
            syslog_file().display()
        ));
        for l in lines.iter().skip(lines.len().saturating_sub(200)) {
            s.push_str(l);
            s.push('\n');
        }
        s.push_str("--- cyrmaster.log (tail):\n");
        s.push_str(&file_tail(&self.root.join("cyrmaster.log"), 8 * 1024));
        s
    }

    /// `ctl_mboxlist -d` of this instance's mailboxes.db.
    pub fn dump_mboxlist(&self) -> MboxlistDump {
        dump_mboxlist(&self.imapd_conf())
    }

    /// Every record of this instance's mailboxes.db, exact bytes (cyr_dbtool).
    pub fn raw_mailboxes_db(&self) -> Vec<RawMbox> {
        raw_mailboxes_db(&self.imapd_conf(), &self.config_dir().join("mailboxes.db"))
    }

    /// Descendants of cyrmaster (mupdate, ctl_cyrusdb, ...), from /proc.
    fn descendants(&self) -> Vec<i32> {
        let mut parent = std::collections::HashMap::new();
        if let Ok(rd) = std::fs::read_dir("/proc") {
            for e in rd.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                    continue;
                };
                if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                    if let Some(i) = stat.rfind(')') {
                        let f: Vec<&str> = stat[i + 1..].split_whitespace().collect();
                        if let Some(pp) = f.get(1).and_then(|s| s.parse::<i32>().ok()) {
                            parent.insert(pid, pp);
                        }
                    }
                }
            }
        }
        let mut out = Vec::new();
        let mut frontier = vec![self.cyrmaster_pid];
        while let Some(p) = frontier.pop() {
            for (&c, &pp) in &parent {
                if pp == p && !out.contains(&c) {
                    out.push(c);
                    frontier.push(c);
                }
            }
        }
        out
    }

    fn stop(&mut self) {
        if self.cyrmaster_pid > 1 {
            let children = self.descendants();
            terminate_pid(self.cyrmaster_pid, libc::SIGTERM, Duration::from_secs(10));
            for c in children {
                terminate_pid(c, libc::SIGTERM, Duration::from_secs(3));
            }
            self.cyrmaster_pid = 0;
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        if panicking && !self.reported {
            eprintln!("{}", self.diagnostics());
        }
        self.stop();
        if panicking || std::env::var("MUPDATE_KEEP_TMP").as_deref() == Ok("1") {
            if let Some(d) = self.dir.take() {
                eprintln!("(kept {} for inspection)", d.keep().display());
            }
        }
    }
}

/// A Cyrus 3.6.1 MUPDATE master (`mupdate -m`) under cyrmaster.
pub struct CyrusMaster {
    pub inst: Instance,
    pub users: Vec<(String, String)>,
}

impl CyrusMaster {
    /// Starts it and waits for its banner; panics (with logs) if it does not come up.
    pub fn start(opts: CyrusOpts) -> Self {
        let inst = Instance::start("master", &opts, None);
        CyrusMaster {
            inst,
            users: opts.users,
        }
    }
    pub fn addr(&self) -> SocketAddr {
        self.inst.addr
    }
}

impl MasterUnderTest for CyrusMaster {
    fn kind(&self) -> &'static str {
        "cyrus"
    }
    fn addr(&self) -> SocketAddr {
        self.inst.addr
    }
    fn user(&self) -> &str {
        &self.users[0].0
    }
    fn password(&self) -> &str {
        &self.users[0].1
    }
    fn diagnostics(&self) -> String {
        self.inst.diagnostics()
    }
}

/// A Cyrus 3.6.1 MUPDATE slave (`mupdate` without `-m`) under cyrmaster, replicating from
/// `master_addr` with PLAIN or better. `start` returns once its banner is read, i.e. once
/// its initial sync has finished.
pub struct CyrusSlave {
    pub inst: Instance,
    pub users: Vec<(String, String)>,
    pub master_addr: SocketAddr,
}

impl CyrusSlave {
    pub fn start(master_addr: SocketAddr, user: &str, password: &str, opts: CyrusOpts) -> Self {
        let inst = Instance::start("slave", &opts, Some((master_addr, user, password)));
        CyrusSlave {
            inst,
            users: opts.users,
            master_addr,
        }
    }
    pub fn addr(&self) -> SocketAddr {
        self.inst.addr
    }
    /// A client logged in to the slave (with the slave's own first user).
    pub fn connect_auth(&self) -> MupdateClient {
        MupdateClient::connect_auth(self.inst.addr, &self.users[0].0, &self.users[0].1)
    }
}

/// For benchmarks: a durable Cyrus master (default twoskip, fsync on) with `n_users` admin
/// users `bench1..=benchN`, each with its own password.
pub struct BenchCyrusMaster {
    pub master: CyrusMaster,
    pub addr: SocketAddr,
    /// (user, password) pairs.
    pub users: Vec<(String, String)>,
}

pub fn start_bench_master(n_users: usize) -> BenchCyrusMaster {
    let users: Vec<(String, String)> = (1..=n_users.max(1))
        .map(|i| (format!("bench{i}"), format!("pw-bench-{i}")))
        .collect();
    let master = CyrusMaster::start(CyrusOpts {
        servername: Some("bench-master".into()),
        users: users.clone(),
        ..CyrusOpts::default()
    });
    BenchCyrusMaster {
        addr: master.addr(),
        master,
        users,
    }
}

// ------------------------------------------------------------------------------------------
// mailboxes.db dumps

/// One entry of `ctl_mboxlist -d` (JSON).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DumpEntry {
    pub name: String,
    /// e.g. `er` (remote), `erz` (remote reserved).
    pub mbtype: String,
    pub server: Option<String>,
    pub partition: Option<String>,
    /// ACL in stored order.
    pub acl: Vec<(String, String)>,
    pub json: serde_json::Value,
}

/// `ctl_mboxlist -d` parsed. ctl_mboxlist cannot print names that are not UTF-8: it writes
/// an empty line instead (and may then leave a trailing comma), and it silently drops ACL
/// entries whose identifier is not UTF-8. So lines are parsed one by one.
#[derive(Debug, Clone)]
pub struct MboxlistDump {
    pub entries: Vec<DumpEntry>,
    /// Empty lines where an entry could not be printed.
    pub blank_lines: usize,
    pub raw: String,
}

impl MboxlistDump {
    pub fn get(&self, name: &str) -> Option<&DumpEntry> {
        self.entries.iter().find(|e| e.name == name)
    }
}

pub fn dump_mboxlist(imapd_conf: &Path) -> MboxlistDump {
    let child = cyrus_command(&ctl_mboxlist_bin())
        .arg("-d")
        .arg("-C")
        .arg(imapd_conf)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn ctl_mboxlist: {e}"));
    let out = wait_output_timeout(child, Duration::from_secs(120), "ctl_mboxlist -d");
    assert!(
        out.status.success(),
        "ctl_mboxlist -d -C {} failed ({}): {}",
        imapd_conf.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    parse_mboxlist_dump(&String::from_utf8_lossy(&out.stdout))
}

pub fn parse_mboxlist_dump(raw: &str) -> MboxlistDump {
    let mut lines: Vec<&str> = raw.lines().collect();
    assert_eq!(
        lines.first().map(|l| l.trim()),
        Some("{"),
        "ctl_mboxlist -d output does not start with {{: {raw:.2000}"
    );
    assert_eq!(
        lines.last().map(|l| l.trim()),
        Some("}"),
        "ctl_mboxlist -d output does not end with }}: {raw:.2000}"
    );
    lines.remove(0);
    lines.pop();
    let mut entries = Vec::new();
    let mut blank_lines = 0;
    for l in lines {
        let l = l.trim();
        if l.is_empty() {
            blank_lines += 1;
            continue;
        }
        let l = l.strip_suffix(',').unwrap_or(l);
        let obj: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&format!("{{{l}}}"))
                .unwrap_or_else(|e| panic!("ctl_mboxlist -d line is not JSON ({e}): {l}"));
        for (key, v) in obj {
            let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
            let acl = match v.get("acl") {
                Some(serde_json::Value::Object(m)) => m
                    .iter()
                    .map(|(k, r)| (k.clone(), r.as_str().unwrap_or_default().to_string()))
                    .collect(),
                _ => Vec::new(),
            };
            assert_eq!(
                s("name").as_deref(),
                Some(key.as_str()),
                "dump key vs name: {l}"
            );
            entries.push(DumpEntry {
                name: key,
                mbtype: s("mbtype").unwrap_or_default(),
                server: s("server"),
                partition: s("partition"),
                acl,
                json: v,
            });
        }
    }
    MboxlistDump {
        entries,
        blank_lines,
        raw: raw.to_string(),
    }
}

/// A dlist value as stored in mailboxes.db (`%(K v K v)`, `(a b)`, atoms, strings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dlist {
    Str(Vec<u8>),
    List(Vec<Dlist>),
    KvList(Vec<(Vec<u8>, Dlist)>),
}

impl Dlist {
    pub fn get(&self, key: &[u8]) -> Option<&Dlist> {
        match self {
            Dlist::KvList(kv) => kv.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }
    pub fn str(&self) -> Option<&[u8]> {
        match self {
            Dlist::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// One `N<dbname>` record of mailboxes.db, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawMbox {
    /// The key without its `N`.
    pub dbname: Vec<u8>,
    pub mbtype: Vec<u8>,
    pub server: Option<Vec<u8>>,
    pub partition: Option<Vec<u8>>,
    pub acl: Vec<(Vec<u8>, Vec<u8>)>,
    pub value: Dlist,
}

/// Every `N…` record of a mailboxes.db (twoskip), in key order, via `cyr_dbtool … show`.
pub fn raw_mailboxes_db(imapd_conf: &Path, db: &Path) -> Vec<RawMbox> {
    let child = cyrus_command(&cyr_dbtool_bin())
        .arg("-C")
        .arg(imapd_conf)
        .arg(db)
        .args(["twoskip", "show"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn cyr_dbtool: {e}"));
    let out = wait_output_timeout(child, Duration::from_secs(120), "cyr_dbtool show");
    assert!(
        out.status.success(),
        "cyr_dbtool {} twoskip show failed ({}): {}",
        db.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    parse_dbtool_show(&out.stdout)
        .into_iter()
        .filter(|(k, _)| k.first() == Some(&b'N'))
        .map(|(k, value)| {
            let gs = |key: &[u8]| value.get(key).and_then(Dlist::str).map(<[u8]>::to_vec);
            let acl = match value.get(b"A") {
                Some(Dlist::KvList(kv)) => kv
                    .iter()
                    .map(|(id, r)| (id.clone(), r.str().unwrap_or_default().to_vec()))
                    .collect(),
                _ => Vec::new(),
            };
            RawMbox {
                dbname: k[1..].to_vec(),
                mbtype: gs(b"T").unwrap_or_default(),
                server: gs(b"S"),
                partition: gs(b"P"),
                acl,
                value,
            }
        })
        .collect()
}

/// Parses `cyr_dbtool show` output: `key TAB dlist-value LF`, repeated.
pub fn parse_dbtool_show(out: &[u8]) -> Vec<(Vec<u8>, Dlist)> {
    let mut p = DlistParser { b: out, i: 0 };
    let mut recs = Vec::new();
    while p.i < out.len() {
        let start = p.i;
        while p.i < out.len() && out[p.i] != b'\t' {
            p.i += 1;
        }
        assert!(
            p.i < out.len(),
            "cyr_dbtool: record without TAB at byte {start}"
        );
        let key = out[start..p.i].to_vec();
        p.i += 1;
        let v = p.value();
        assert!(
            p.i < out.len() && out[p.i] == b'\n',
            "cyr_dbtool: junk after the value of key {} at byte {}",
            super::show(&key),
            p.i
        );
        p.i += 1;
        recs.push((key, v));
    }
    recs
}

struct DlistParser<'a> {
    b: &'a [u8],
    i: usize,
}

impl DlistParser<'_> {
    fn peek(&self) -> u8 {
        *self
            .b
            .get(self.i)
            .unwrap_or_else(|| panic!("dlist: unexpected end at byte {}", self.i))
    }
    fn skip_sp(&mut self) {
        while self.i < self.b.len() && self.b[self.i] == b' ' {
            self.i += 1;
        }
    }
    fn value(&mut self) -> Dlist {
        match self.peek() {
            b'%' => {
                assert_eq!(
                    self.b.get(self.i + 1),
                    Some(&b'('),
                    "dlist: % without ( at {}",
                    self.i
                );
                self.i += 2;
                let mut kv = Vec::new();
                loop {
                    self.skip_sp();
                    if self.peek() == b')' {
                        self.i += 1;
                        return Dlist::KvList(kv);
                    }
                    let k = match self.value() {
                        Dlist::Str(s) => s,
                        other => panic!("dlist: non-string key {other:?} at {}", self.i),
                    };
                    self.skip_sp();
                    let v = self.value();
                    kv.push((k, v));
                }
            }
            b'(' => {
                self.i += 1;
                let mut items = Vec::new();
                loop {
                    self.skip_sp();
                    if self.peek() == b')' {
                        self.i += 1;
                        return Dlist::List(items);
                    }
                    items.push(self.value());
                }
            }
            b'"' => {
                self.i += 1;
                let mut s = Vec::new();
                loop {
                    match self.peek() {
                        b'"' => {
                            self.i += 1;
                            return Dlist::Str(s);
                        }
                        b'\\' => {
                            self.i += 1;
                            s.push(self.peek());
                            self.i += 1;
                        }
                        c => {
                            s.push(c);
                            self.i += 1;
                        }
                    }
                }
            }
            b'{' => {
                let close = self.b[self.i..]
                    .iter()
                    .position(|&c| c == b'}')
                    .unwrap_or_else(|| panic!("dlist: unterminated literal at {}", self.i))
                    + self.i;
                let digits = std::str::from_utf8(&self.b[self.i + 1..close])
                    .unwrap()
                    .trim_end_matches('+');
                let n: usize = digits
                    .parse()
                    .unwrap_or_else(|_| panic!("dlist: bad literal length at {}", self.i));
                self.i = close + 1;
                assert_eq!(&self.b[self.i..self.i + 2], b"\r\n", "dlist: literal CRLF");
                self.i += 2;
                let s = self.b[self.i..self.i + n].to_vec();
                self.i += n;
                Dlist::Str(s)
            }
            _ => {
                let start = self.i;
                while self.i < self.b.len() && !matches!(self.b[self.i], b' ' | b')' | b'\n') {
                    self.i += 1;
                }
                let s = &self.b[start..self.i];
                if s == b"NIL" {
                    Dlist::Str(Vec::new())
                } else {
                    Dlist::Str(s.to_vec())
                }
            }
        }
    }
}

/// The mailboxes.db key (without `N`) Cyrus 3.6 uses for an internal mailbox name: the
/// domain (before the first `!`) as is plus 0x1D, then `.` → 0x1F and `^` → `.`.
/// Written here independently of the product's transform, to cross-check it.
pub fn dbname(name: &[u8]) -> Vec<u8> {
    let (mut out, rest) = match name.iter().position(|&b| b == b'!') {
        Some(p) => {
            let mut o = name[..p].to_vec();
            o.push(0x1D);
            (o, &name[p + 1..])
        }
        None => (Vec::new(), name),
    };
    out.extend(rest.iter().map(|&b| match b {
        b'.' => 0x1F,
        b'^' => b'.',
        b => b,
    }));
    out
}

/// What a Cyrus mailboxes.db record for a MUPDATE entry must contain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedRecord {
    pub dbname: Vec<u8>,
    pub mbtype: Vec<u8>,
    pub server: Option<Vec<u8>>,
    pub partition: Option<Vec<u8>>,
    pub acl: Vec<(Vec<u8>, Vec<u8>)>,
}

/// The record Cyrus's `database_log` writes for `e` (§2.1): location split at the first `!`,
/// mbtype `er` for MAILBOX and `erz` for RESERVE, ACL split into `id TAB rights TAB` pairs.
pub fn expected_record(e: &Entry) -> ExpectedRecord {
    let (server, partition) = match e.location.iter().position(|&b| b == b'!') {
        Some(p) => (
            Some(e.location[..p].to_vec()),
            Some(e.location[p + 1..].to_vec()),
        ),
        None => (Some(e.location.clone()), None),
    };
    let mut acl = Vec::new();
    if e.kind == Kind::Mailbox {
        let parts: Vec<&[u8]> = e.acl.split(|&b| b == b'\t').collect();
        let mut i = 0;
        while i + 1 < parts.len() {
            acl.push((parts[i].to_vec(), parts[i + 1].to_vec()));
            i += 2;
        }
    }
    ExpectedRecord {
        dbname: dbname(&e.name),
        mbtype: if e.kind == Kind::Reserve {
            b"erz".to_vec()
        } else {
            b"er".to_vec()
        },
        server,
        partition,
        acl,
    }
}

impl RawMbox {
    pub fn as_expected(&self) -> ExpectedRecord {
        ExpectedRecord {
            dbname: self.dbname.clone(),
            mbtype: self.mbtype.clone(),
            server: self.server.clone(),
            partition: self.partition.clone(),
            acl: self.acl.clone(),
        }
    }
}
