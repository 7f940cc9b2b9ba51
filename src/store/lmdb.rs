//! LMDB backend of [`super::MailboxStore`] (heed). The only LMDB code in the crate.
//!
//! # Layout
//!
//! One LMDB environment per data directory (`data.mdb`, `lock.mdb` directly in it) with five
//! named databases:
//!
//! | database    | key                                   | value                                |
//! |-------------|---------------------------------------|--------------------------------------|
//! | `mailboxes` | dbname ([`to_dbname`] of the intname) | [`MailboxRecord::encode`]            |
//! | `changes`   | change sequence, u64 big-endian       | encoded [`Change`] (name, old server, new record) |
//! | `meta`      | `last_seq`, `schema_version`          | u64 / u32 big-endian                 |
//! | `users`     | user name                             | [`Verifier::encode`]                 |
//! | `cyrus_aux` | raw Cyrus key                         | raw Cyrus value                      |
//!
//! Keys are dbnames so LMDB's byte order is Cyrus's LIST/UPDATE order; big-endian sequences
//! make the feed a plain range read. `mdb_stat -a DIR` and `mdb_dump -s mailboxes DIR` (LMDB
//! 0.9 tools) read these files; `mdb_copy DIR BACKUP` makes a consistent hot backup.
//!
//! # Writes: group commit
//!
//! One writer thread per store owns the write transactions. [`MailboxStore::submit`] queues a
//! batch and returns; the writer takes everything queued (up to [`LmdbOptions::max_batch`]
//! operations, at least one batch), applies the batches in queue order in ONE write
//! transaction, commits it with LMDB's default durable commit (fsync; `NOSYNC`, `NOMETASYNC`
//! and `MAPASYNC` are never set), and only then runs the `done` callbacks and the commit hook.
//! So N concurrent callers share one fsync, and throughput grows with concurrency.
//! Callbacks run on the writer thread: they must not block (a blocking `commit` there is
//! refused with an error rather than deadlocking), and a panic in one is caught and logged.
//!
//! # Map size
//!
//! LMDB needs a fixed-size map. When a transaction hits `MDB_MAP_FULL` it is aborted, the map
//! is doubled and the transaction retried. `mdb_env_set_mapsize` is undefined behaviour while
//! any transaction of this process is alive, so every transaction is opened under a *permit*
//! of a store-wide gate, and the resize takes the gate exclusively. Consequence for callers: a
//! resize waits for every live [`Snapshot`] to be dropped (at most [`RESIZE_WAIT`], after which
//! the writes of that group fail with an error and the next group tries again), so do not keep
//! a snapshot longer than the scan it serves. When another process grew the map, LMDB answers
//! `MDB_MAP_RESIZED` and the same exclusive path adopts the new size.
//!
//! # One environment per process
//!
//! LMDB forbids opening one environment twice in a process (heed answers `EnvAlreadyOpened`),
//! so [`LmdbStore::open`] keeps a registry by canonical path and returns the live store for a
//! directory that is already open (the options of the first open win). Other processes may
//! open the same directory at the same time; LMDB's lock file serialises their writers.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::ops::{Bound, ControlFlow};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, LazyLock, Mutex, MutexGuard, Weak};
use std::thread::{JoinHandle, ThreadId};
use std::time::{Duration, Instant};

use heed::types::Bytes;
use heed::{CommitOrAbort, Database, Env, EnvOpenOptions, MdbError, RoTxn, RwTxn, WithoutTls};

use super::record::{put_bytes, Reader};
use super::{
    CasOp, CasOutcome, Change, CommitDone, CommitHook, Expect, MailboxRecord, MailboxStore, Result,
    Seq, Snapshot, StoreError,
};
use crate::auth::{UserStore, Verifier};
use crate::cyrus::mboxname::{from_dbname_into, to_dbname};

/// The on-disk schema this code writes (stored in `meta`); a store with another value is
/// refused rather than misread.
pub const SCHEMA_VERSION: u32 = 1;
/// LMDB's default `MDB_MAXKEYSIZE`.
pub const MAX_KEY_LEN: usize = 511;
/// How long a map resize waits for open transactions (snapshots) before giving up.
pub const RESIZE_WAIT: Duration = Duration::from_secs(30);
/// Map sizes are rounded up to this, a multiple of every page size LMDB runs with.
const MAP_ALIGN: usize = 64 * 1024;
/// Records per write transaction in [`LmdbStore::import_batch`].
const IMPORT_CHUNK: usize = 8192;
/// Format byte of an encoded [`Change`].
const CHANGE_FORMAT: u8 = 1;

const META_LAST_SEQ: &[u8] = b"last_seq";
const META_SCHEMA: &[u8] = b"schema_version";

type Db = Database<'static, Bytes, Bytes>;

/// The visitor of [`LmdbStore::aux_scan`]: raw key and value; return `Break` to stop.
pub type AuxVisitor<'a> = dyn FnMut(&[u8], &[u8]) -> ControlFlow<()> + 'a;

/// Tuning of an [`LmdbStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LmdbOptions {
    /// Initial map size in bytes (rounded up to 64 KiB). Address space only, not disk; doubled
    /// on `MDB_MAP_FULL`.
    pub map_size: usize,
    /// How many changes the feed keeps; the writer prunes older ones. A consumer further behind
    /// gets [`StoreError::FeedTruncated`] and must resync from a snapshot.
    pub change_log_retain: u64,
    /// Operations per group commit (a single larger batch still goes in one commit).
    pub max_batch: usize,
}

impl Default for LmdbOptions {
    fn default() -> Self {
        LmdbOptions {
            map_size: 1 << 30,
            change_log_retain: 1_000_000,
            max_batch: 1024,
        }
    }
}

/// The databases of one environment.
#[derive(Clone, Copy)]
struct Dbs {
    mailboxes: Db,
    changes: Db,
    meta: Db,
    users: Db,
    aux: Db,
}

/// Counts the live transactions of this process so that a map resize can wait for none.
struct Gate {
    state: Mutex<GateState>,
    cv: Condvar,
}

#[derive(Default)]
struct GateState {
    /// Permits handed out and not yet returned.
    active: usize,
    /// Threads waiting for exclusive access; new permits wait for them (no starvation).
    pending: usize,
    /// A thread holds exclusive access (is resizing).
    exclusive: bool,
}

impl Gate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn enter(&self) {
        let mut st = self.lock();
        while st.exclusive || st.pending > 0 {
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.active += 1;
    }

    fn leave(&self) {
        let mut st = self.lock();
        st.active -= 1;
        if st.active == 0 {
            self.cv.notify_all();
        }
    }

    /// Wait until no permit is out, then hold the gate alone.
    fn exclusive(&self, wait: Duration) -> Result<ExclusiveGuard<'_>> {
        let deadline = Instant::now() + wait;
        let mut st = self.lock();
        st.pending += 1;
        while st.exclusive || st.active > 0 {
            let now = Instant::now();
            if now >= deadline {
                st.pending -= 1;
                self.cv.notify_all();
                return Err(StoreError::Io(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "growing the LMDB map must wait for every open snapshot to close, and one \
                     stayed open too long; the write will be retried with the next commit",
                )));
            }
            st = self
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        st.pending -= 1;
        st.exclusive = true;
        Ok(ExclusiveGuard { gate: self })
    }
}

struct ExclusiveGuard<'a> {
    gate: &'a Gate,
}

impl Drop for ExclusiveGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.gate.lock();
        st.exclusive = false;
        self.gate.cv.notify_all();
    }
}

/// The right to have one transaction open. Every transaction lives strictly inside a permit
/// (declare the permit after the transaction in a struct, so the transaction drops first).
struct Permit {
    shared: Arc<Shared>,
}

impl Permit {
    fn new(shared: &Arc<Shared>) -> Permit {
        shared.gate.enter();
        Permit {
            shared: Arc::clone(shared),
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.shared.gate.leave();
    }
}

/// What every store instance of one directory shares: the environment and its databases.
struct Shared {
    env: Env<WithoutTls>,
    dbs: Dbs,
    gate: Gate,
}

/// Which LMDB errors are cured by resizing the map and retrying.
enum Retry {
    Grow,
    Adopt,
}

fn retry_kind(e: &StoreError) -> Option<Retry> {
    match e {
        StoreError::Lmdb(heed::Error::Mdb(MdbError::MapFull)) => Some(Retry::Grow),
        StoreError::Lmdb(heed::Error::Mdb(MdbError::MapResized)) => Some(Retry::Adopt),
        _ => None,
    }
}

/// Attempts of one transaction before giving up (each `Grow` doubles the map).
const MAX_ATTEMPTS: usize = 24;

impl Shared {
    /// Run `f` in a read transaction, adopting a map grown by another process if needed.
    fn read<R>(
        self: &Arc<Self>,
        mut f: impl FnMut(&RoTxn<'_, WithoutTls>) -> Result<R>,
    ) -> Result<R> {
        let mut attempts = 0;
        loop {
            let attempt = {
                let _permit = Permit::new(self);
                self.env
                    .read_txn()
                    .map_err(StoreError::from)
                    .and_then(|txn| f(&txn))
            };
            match attempt {
                Err(e) if retry_kind(&e).is_some() && attempts < MAX_ATTEMPTS => {
                    attempts += 1;
                    self.resize(None)?;
                }
                other => return other,
            }
        }
    }

    /// Run `f` in a write transaction and commit it durably. On `MDB_MAP_FULL` the transaction
    /// is aborted, the map doubled and `f` run again from scratch, so `f` must only act
    /// through the transaction.
    fn write<R>(self: &Arc<Self>, mut f: impl FnMut(&mut RwTxn<'_>) -> Result<R>) -> Result<R> {
        let mut attempts = 0;
        loop {
            let (attempt, seen) = {
                let _permit = Permit::new(self);
                // Read under the permit: no resize can run concurrently.
                let seen = self.env.info().map_size;
                let attempt = self
                    .env
                    .write_txn()
                    .map_err(StoreError::from)
                    .and_then(|mut txn| {
                        let r = f(&mut txn)?;
                        txn.commit()?;
                        Ok(r)
                    });
                (attempt, seen)
            };
            match attempt {
                Err(e) if attempts < MAX_ATTEMPTS => match retry_kind(&e) {
                    Some(Retry::Grow) => {
                        attempts += 1;
                        self.resize(Some(seen))?;
                    }
                    Some(Retry::Adopt) => {
                        attempts += 1;
                        self.resize(None)?;
                    }
                    None => return Err(e),
                },
                other => return other,
            }
        }
    }

    /// Grow the map to twice `seen` (unless someone already grew it past `seen`), or with
    /// `None` adopt the size another process set.
    fn resize(&self, seen: Option<usize>) -> Result<()> {
        let _excl = self.gate.exclusive(RESIZE_WAIT)?;
        let current = self.env.info().map_size;
        let new_size = match seen {
            Some(seen) if current > seen => return Ok(()),
            Some(_) => current.checked_mul(2).ok_or_else(|| {
                StoreError::Io(io::Error::new(
                    io::ErrorKind::OutOfMemory,
                    "the LMDB map cannot grow any further",
                ))
            })?,
            // 0 tells LMDB to take the size recorded in the file.
            None => 0,
        };
        // SAFETY: `mdb_env_set_mapsize` requires that no transaction of this process is open on
        // the environment. Every transaction is created under a gate permit and dropped before
        // its permit, and we hold the gate exclusively (no permit out), so none is alive.
        unsafe { self.env.resize(new_size) }?;
        if seen.is_some() {
            tracing::info!(
                path = %self.env.path().display(),
                old = current,
                new = new_size,
                "LMDB map was full; grew it"
            );
        }
        Ok(())
    }
}

/// One queued operation, with its key computed on the caller's thread.
struct Prepared {
    key: Vec<u8>,
    name: Vec<u8>,
    /// `None`: write unconditionally (imports).
    expect: Option<Expect>,
    new: Option<MailboxRecord>,
}

struct Job {
    ops: Vec<Prepared>,
    done: CommitDone,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    stopping: bool,
}

/// The state shared by one store instance and its writer thread.
struct WriterState {
    queue: Mutex<Queue>,
    cv: Condvar,
    hook: Mutex<Option<Arc<CommitHook>>>,
    max_batch: usize,
    retain: u64,
}

impl WriterState {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The LMDB mailbox store. See the module documentation.
pub struct LmdbStore {
    shared: Arc<Shared>,
    writer: Arc<WriterState>,
    thread: Mutex<Option<JoinHandle<()>>>,
    writer_id: ThreadId,
    path: PathBuf,
}

/// Open stores by canonical path: one LMDB environment per directory per process.
struct RegistryEntry {
    store: Weak<LmdbStore>,
    shared: Weak<Shared>,
}

static REGISTRY: LazyLock<Mutex<HashMap<PathBuf, RegistryEntry>>> = LazyLock::new(Default::default);

impl LmdbStore {
    /// Open (creating if needed) the store in `dir`. Within one process, opening a directory
    /// that is already open returns the same store and ignores `options`.
    pub fn open(dir: &Path, options: LmdbOptions) -> Result<Arc<LmdbStore>> {
        std::fs::create_dir_all(dir)?;
        let path = dir.canonicalize()?;
        let mut registry = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
        registry.retain(|_, e| e.shared.strong_count() > 0);
        let existing = match registry.get(&path) {
            Some(entry) => {
                if let Some(store) = entry.store.upgrade() {
                    if !store.writer.lock().stopping {
                        return Ok(store);
                    }
                }
                entry.shared.upgrade()
            }
            None => None,
        };
        // A store whose last handle was dropped while a snapshot still holds the environment
        // gets a new writer on the same environment.
        let shared = match existing {
            Some(shared) => shared,
            None => Arc::new(open_env(&path, &options)?),
        };
        let store = Arc::new(LmdbStore::start(shared, &options, path.clone())?);
        registry.insert(
            path,
            RegistryEntry {
                store: Arc::downgrade(&store),
                shared: Arc::downgrade(&store.shared),
            },
        );
        Ok(store)
    }

    fn start(shared: Arc<Shared>, options: &LmdbOptions, path: PathBuf) -> Result<LmdbStore> {
        let writer = Arc::new(WriterState {
            queue: Mutex::new(Queue::default()),
            cv: Condvar::new(),
            hook: Mutex::new(None),
            max_batch: options.max_batch.max(1),
            retain: options.change_log_retain,
        });
        let thread = {
            let shared = Arc::clone(&shared);
            let writer = Arc::clone(&writer);
            std::thread::Builder::new()
                .name("mupdate-store-writer".into())
                .spawn(move || writer_loop(&shared, &writer))?
        };
        Ok(LmdbStore {
            shared,
            writer,
            writer_id: thread.thread().id(),
            thread: Mutex::new(Some(thread)),
            path,
        })
    }

    /// The canonical path of the data directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The current size of the LMDB map in bytes.
    pub fn map_size(&self) -> usize {
        let _permit = Permit::new(&self.shared);
        self.shared.env.info().map_size
    }

    /// Stop the writer after it has committed everything already queued; later submits fail
    /// with [`StoreError::WriterGone`]. Called by `Drop`. Blocks until the writer has exited,
    /// except when called from the writer thread itself (from a `done` callback or the hook).
    pub fn shutdown(&self) {
        self.writer.lock().stopping = true;
        self.writer.cv.notify_all();
        if std::thread::current().id() == self.writer_id {
            return;
        }
        let handle = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(handle) = handle {
            if handle.join().is_err() {
                tracing::error!("the store writer thread panicked");
            }
        }
    }

    /// Write imported records unconditionally (keeping their `mtime` and `cyrus` bytes), through
    /// the writer, each as a change of the feed. Returns the last sequence written (the current
    /// one when `records` is empty). Large imports are split into several durable commits.
    pub fn import_batch(&self, records: Vec<(Vec<u8>, MailboxRecord)>) -> Result<Seq> {
        let mut last = None;
        let mut records = records.into_iter().peekable();
        while records.peek().is_some() {
            let mut ops = Vec::with_capacity(IMPORT_CHUNK);
            for (name, record) in records.by_ref().take(IMPORT_CHUNK) {
                ops.push(prepare(name, None, Some(record))?);
            }
            let outcomes = self.commit_prepared(ops)?;
            for o in outcomes {
                if let CasOutcome::Committed(seq) = o {
                    last = Some(seq);
                }
            }
        }
        match last {
            Some(seq) => Ok(seq),
            None => self.last_seq(),
        }
    }

    /// Visit every record, deleted and intermediate ones included, in key order (the same as
    /// [`Snapshot::scan`] with an empty prefix). Filtering on [`MailboxRecord::is_listed`] is the
    /// caller's job.
    pub fn scan_all(
        &self,
        visit: &mut dyn FnMut(&[u8], &MailboxRecord) -> ControlFlow<()>,
    ) -> Result<()> {
        self.snapshot()?.scan(b"", None, visit)
    }

    /// Store raw Cyrus entries that are not mailboxes (e.g. orphan `I` records), keyed by their
    /// raw Cyrus key, in one durable write transaction. Not part of the change feed.
    pub fn aux_put_batch(&self, entries: Vec<(Vec<u8>, Vec<u8>)>) -> Result<()> {
        for (k, _) in &entries {
            check_key(k)?;
        }
        let aux = self.shared.dbs.aux;
        self.shared.write(|txn| {
            for (k, v) in &entries {
                aux.put(txn, k, v)?;
            }
            Ok(())
        })
    }

    /// Visit the raw Cyrus entries whose key starts with `prefix`, in key order.
    pub fn aux_scan(&self, prefix: &[u8], visit: &mut AuxVisitor<'_>) -> Result<()> {
        let aux = self.shared.dbs.aux;
        self.shared.read(|txn| {
            // LMDB refuses a zero-length key even as a cursor position.
            let start = if prefix.is_empty() {
                Bound::Unbounded
            } else {
                Bound::Included(prefix)
            };
            let range: (Bound<&[u8]>, Bound<&[u8]>) = (start, Bound::Unbounded);
            for item in aux.range(txn, &range)? {
                let (k, v) = item?;
                if !k.starts_with(prefix) || visit(k, v).is_break() {
                    break;
                }
            }
            Ok(())
        })
    }

    fn enqueue(&self, ops: Vec<Prepared>, done: CommitDone) {
        if ops.is_empty() {
            done(Ok(Vec::new()));
            return;
        }
        let mut q = self.writer.lock();
        if q.stopping {
            drop(q);
            done(Err(StoreError::WriterGone));
            return;
        }
        q.jobs.push_back(Job { ops, done });
        drop(q);
        self.writer.cv.notify_one();
    }

    fn commit_prepared(&self, ops: Vec<Prepared>) -> Result<Vec<CasOutcome>> {
        if std::thread::current().id() == self.writer_id {
            // Waiting on the writer from the writer's own thread (a `done` callback or the
            // commit hook) would never return.
            return Err(StoreError::Io(io::Error::new(
                io::ErrorKind::WouldBlock,
                "a blocking store commit was called from a store callback; use submit there",
            )));
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.enqueue(
            ops,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx.recv().map_err(|_| StoreError::WriterGone)?
    }
}

impl Drop for LmdbStore {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl std::fmt::Debug for LmdbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LmdbStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn check_key(key: &[u8]) -> Result<()> {
    if key.is_empty() {
        return Err(StoreError::InvalidKey("empty key".into()));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(StoreError::InvalidKey(format!(
            "{} bytes, LMDB keys hold at most {MAX_KEY_LEN}",
            key.len()
        )));
    }
    Ok(())
}

fn prepare(name: Vec<u8>, expect: Option<Expect>, new: Option<MailboxRecord>) -> Result<Prepared> {
    let key = to_dbname(&name)?;
    check_key(&key)?;
    Ok(Prepared {
        key,
        name,
        expect,
        new,
    })
}

fn open_env(path: &Path, options: &LmdbOptions) -> Result<Shared> {
    let map_size = options
        .map_size
        .max(MAP_ALIGN)
        .div_ceil(MAP_ALIGN)
        .saturating_mul(MAP_ALIGN);
    let mut opts = EnvOpenOptions::new().read_txn_without_tls();
    opts.map_size(map_size).max_dbs(8).max_readers(1024);
    let mut attempt = 0;
    let env = loop {
        // SAFETY: LMDB's rules for an open environment (lmdb.h, "Caveats"): it must not be
        // opened twice in one process (the registry in `LmdbStore::open`, held while we are
        // here, and heed's own check guarantee that); its files must not be modified except
        // through LMDB (the data directory belongs to the store; other processes use LMDB with
        // its lock file); no unsafe flags are set (no NOSYNC/NOMETASYNC/MAPASYNC/NOLOCK); the
        // directory is local (documented for operators).
        match unsafe { opts.open(path) } {
            Err(heed::Error::EnvAlreadyOpened) if attempt < 3 => {
                // The last handle of an earlier store is being dropped on another thread:
                // wait for heed to finish closing the environment.
                attempt += 1;
                if let Some(ev) = heed::env_closing_event(path) {
                    ev.wait_timeout(Duration::from_secs(5));
                }
            }
            other => break other?,
        }
    };
    let wtxn = env.write_txn()?;
    let opened = env.create_databases_and_commit(wtxn, |dbo, wtxn| -> Result<_> {
        let mailboxes = dbo.create_database::<Bytes, Bytes>(wtxn, Some("mailboxes"))?;
        let changes = dbo.create_database::<Bytes, Bytes>(wtxn, Some("changes"))?;
        let meta = dbo.create_database::<Bytes, Bytes>(wtxn, Some("meta"))?;
        let users = dbo.create_database::<Bytes, Bytes>(wtxn, Some("users"))?;
        let aux = dbo.create_database::<Bytes, Bytes>(wtxn, Some("cyrus_aux"))?;
        match meta.get(wtxn, META_SCHEMA)? {
            None => meta.put(wtxn, META_SCHEMA, &SCHEMA_VERSION.to_be_bytes())?,
            Some(v) if v == SCHEMA_VERSION.to_be_bytes() => {}
            Some(v) => {
                return Ok(CommitOrAbort::Abort(format!(
                    "the store in {} has schema {v:?}, this program reads schema {SCHEMA_VERSION}",
                    path.display()
                )))
            }
        }
        Ok(CommitOrAbort::Commit((
            mailboxes, changes, meta, users, aux,
        )))
    })?;
    let (mailboxes, changes, meta, users, aux) = match opened {
        CommitOrAbort::Commit(dbs) => dbs,
        CommitOrAbort::Abort(why) => {
            return Err(StoreError::Corrupt {
                key: META_SCHEMA.to_vec(),
                why,
            });
        }
    };
    Ok(Shared {
        env,
        dbs: Dbs {
            mailboxes,
            changes,
            meta,
            users,
            aux,
        },
        gate: Gate {
            state: Mutex::new(GateState::default()),
            cv: Condvar::new(),
        },
    })
}

fn read_u64(key: &[u8], v: Option<&[u8]>) -> Result<u64> {
    match v {
        None => Ok(0),
        Some(b) => b
            .try_into()
            .map(u64::from_be_bytes)
            .map_err(|_| StoreError::Corrupt {
                key: key.to_vec(),
                why: format!("expected 8 bytes, found {}", b.len()),
            }),
    }
}

fn read_last_seq(dbs: &Dbs, txn: &RoTxn<'_>) -> Result<Seq> {
    read_u64(META_LAST_SEQ, dbs.meta.get(txn, META_LAST_SEQ)?)
}

fn decode_record(key: &[u8], v: &[u8]) -> Result<MailboxRecord> {
    MailboxRecord::decode(v).map_err(|why| StoreError::Corrupt {
        key: key.to_vec(),
        why,
    })
}

/// Encoded change (format 1): `u8 1 | u8 bits (1: old server, 2: new record) | varint len,
/// name | [varint len, old server] | [varint len, encoded record]`. The sequence is the key.
fn encode_change(out: &mut Vec<u8>, name: &[u8], old_server: Option<&[u8]>, new: Option<&[u8]>) {
    out.clear();
    out.push(CHANGE_FORMAT);
    out.push(u8::from(old_server.is_some()) | (u8::from(new.is_some()) << 1));
    put_bytes(out, name);
    if let Some(s) = old_server {
        put_bytes(out, s);
    }
    if let Some(r) = new {
        put_bytes(out, r);
    }
}

fn decode_change(seq: Seq, bytes: &[u8]) -> Result<Change, String> {
    let mut r = Reader::new(bytes);
    let version = r.byte().ok_or("empty change")?;
    if version != CHANGE_FORMAT {
        return Err(format!("unknown change format {version}"));
    }
    let bits = r.byte().ok_or("change truncated before its field bits")?;
    if bits & !3 != 0 {
        return Err(format!("unknown change bits 0x{bits:02X}"));
    }
    let name = r.bytes("name")?.to_vec();
    let old_server = if bits & 1 != 0 {
        Some(r.bytes("old server")?.to_vec())
    } else {
        None
    };
    let new = if bits & 2 != 0 {
        Some(MailboxRecord::decode(r.bytes("record")?)?)
    } else {
        None
    };
    r.finish()?;
    Ok(Change {
        seq,
        name,
        old_server,
        new,
    })
}

/// Apply one group in the write transaction `txn`: per batch, stop at the first conflict;
/// every successful operation gets the next sequence, a `changes` entry and (for a write) a
/// record with `revision` = its sequence. Returns the outcomes per batch and the last sequence
/// written, if any.
fn apply_group(
    dbs: &Dbs,
    txn: &mut RwTxn<'_>,
    jobs: &[Job],
    retain: u64,
) -> Result<(Vec<Vec<CasOutcome>>, Option<Seq>)> {
    let first = read_last_seq(dbs, txn)?;
    let mut seq = first;
    let mut all = Vec::with_capacity(jobs.len());
    let mut rec_buf = Vec::new();
    let mut change_buf = Vec::new();
    for job in jobs {
        let mut outcomes = Vec::with_capacity(job.ops.len());
        let mut conflicted = false;
        for op in &job.ops {
            if conflicted {
                outcomes.push(CasOutcome::Skipped);
                continue;
            }
            // Copied out before any write: LMDB may reuse the page under a later put.
            let current = match dbs.mailboxes.get(txn, &op.key)? {
                Some(v) => Some(decode_record(&op.key, v)?),
                None => None,
            };
            let matches = match op.expect {
                None => true,
                Some(Expect::Absent) => current.is_none(),
                Some(Expect::Revision(r)) => current.as_ref().is_some_and(|c| c.revision == r),
            };
            if !matches {
                conflicted = true;
                outcomes.push(CasOutcome::Conflict { current });
                continue;
            }
            seq += 1;
            let encoded = match &op.new {
                Some(new) => {
                    rec_buf.clear();
                    let mut stored = new.clone();
                    stored.revision = seq;
                    stored.encode_into(&mut rec_buf);
                    dbs.mailboxes.put(txn, &op.key, &rec_buf)?;
                    Some(rec_buf.as_slice())
                }
                None => {
                    dbs.mailboxes.delete(txn, &op.key)?;
                    None
                }
            };
            let old_server = current.as_ref().and_then(|c| c.server.as_deref());
            encode_change(&mut change_buf, &op.name, old_server, encoded);
            dbs.changes.put(txn, &seq.to_be_bytes(), &change_buf)?;
            outcomes.push(CasOutcome::Committed(seq));
        }
        all.push(outcomes);
    }
    if seq == first {
        return Ok((all, None));
    }
    dbs.meta.put(txn, META_LAST_SEQ, &seq.to_be_bytes())?;
    if seq > retain {
        let cutoff = (seq - retain).to_be_bytes();
        let range: (Bound<&[u8]>, Bound<&[u8]>) = (Bound::Unbounded, Bound::Included(&cutoff));
        dbs.changes.delete_range(txn, &range)?;
    }
    Ok((all, Some(seq)))
}

/// A copy of an error for each of the callers of a failed group (errors are not `Clone`).
fn dup_err(e: &StoreError) -> StoreError {
    let dup_io = |io: &io::Error| match io.raw_os_error() {
        Some(code) => io::Error::from_raw_os_error(code),
        None => io::Error::new(io.kind(), io.to_string()),
    };
    match e {
        StoreError::Lmdb(heed::Error::Mdb(m)) => StoreError::Lmdb(heed::Error::Mdb(*m)),
        StoreError::Lmdb(heed::Error::Io(io)) | StoreError::Io(io) => StoreError::Io(dup_io(io)),
        StoreError::Corrupt { key, why } => StoreError::Corrupt {
            key: key.clone(),
            why: why.clone(),
        },
        StoreError::Name(n) => StoreError::Name(n.clone()),
        StoreError::FeedTruncated { requested, oldest } => StoreError::FeedTruncated {
            requested: *requested,
            oldest: *oldest,
        },
        StoreError::WriterGone => StoreError::WriterGone,
        StoreError::InvalidKey(s) => StoreError::InvalidKey(s.clone()),
        other => StoreError::Io(io::Error::other(other.to_string())),
    }
}

/// Run a callback of foreign code so that its panic cannot kill the writer.
fn guarded(what: &str, f: impl FnOnce()) {
    if catch_unwind(AssertUnwindSafe(f)).is_err() {
        tracing::error!("a store {what} panicked; the writer goes on");
    }
}

/// Fails whatever is still queued if the writer thread ever exits early, so no caller waits
/// forever.
struct ExitGuard<'a>(&'a WriterState);

impl Drop for ExitGuard<'_> {
    fn drop(&mut self) {
        let jobs = {
            let mut q = self.0.lock();
            q.stopping = true;
            std::mem::take(&mut q.jobs)
        };
        for job in jobs {
            guarded("done callback", || (job.done)(Err(StoreError::WriterGone)));
        }
    }
}

fn writer_loop(shared: &Arc<Shared>, w: &WriterState) {
    let _guard = ExitGuard(w);
    loop {
        let group: Vec<Job> = {
            let mut q = w.lock();
            while q.jobs.is_empty() && !q.stopping {
                q = w.cv.wait(q).unwrap_or_else(|e| e.into_inner());
            }
            if q.jobs.is_empty() {
                return;
            }
            let mut n = 0;
            let mut group = Vec::new();
            while let Some(job) = q.jobs.front() {
                if !group.is_empty() && n + job.ops.len() > w.max_batch {
                    break;
                }
                n += job.ops.len();
                group.extend(q.jobs.pop_front());
            }
            group
        };
        let dbs = shared.dbs;
        let result = shared.write(|txn| apply_group(&dbs, txn, &group, w.retain));
        match result {
            Ok((outcomes, last)) => {
                for (job, out) in group.into_iter().zip(outcomes) {
                    guarded("done callback", || (job.done)(Ok(out)));
                }
                if let Some(seq) = last {
                    let hook = w.hook.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    if let Some(hook) = hook {
                        guarded("commit hook", || hook(seq));
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, batches = group.len(), "store group commit failed");
                for job in group {
                    let err = dup_err(&e);
                    guarded("done callback", || (job.done)(Err(err)));
                }
            }
        }
    }
}

/// A read transaction at one sequence; see [`MailboxStore::snapshot`].
struct LmdbSnapshot {
    // Field order matters: the transaction must end before its permit is returned.
    txn: RoTxn<'static, WithoutTls>,
    seq: Seq,
    permit: Permit,
}

impl Snapshot for LmdbSnapshot {
    fn seq(&self) -> Seq {
        self.seq
    }

    /// `prefix` and `after` are keys in dbname form ([`to_dbname`]).
    fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        visit: &mut dyn FnMut(&[u8], &MailboxRecord) -> ControlFlow<()>,
    ) -> Result<()> {
        // LMDB refuses zero-length keys even as a cursor position, hence `Unbounded`.
        let start = match after {
            Some(a) if a >= prefix && !a.is_empty() => Bound::Excluded(a),
            _ if prefix.is_empty() => Bound::Unbounded,
            _ => Bound::Included(prefix),
        };
        let range: (Bound<&[u8]>, Bound<&[u8]>) = (start, Bound::Unbounded);
        let db = self.permit.shared.dbs.mailboxes;
        // One record decoded into over and over: a dump of 100k entries allocates little.
        let mut record = MailboxRecord::default();
        let mut name = Vec::new();
        for item in db.range(&self.txn, &range)? {
            let (key, value) = item?;
            if !prefix.is_empty() && !key.starts_with(prefix) {
                break;
            }
            record
                .decode_into(value)
                .map_err(|why| StoreError::Corrupt {
                    key: key.to_vec(),
                    why,
                })?;
            from_dbname_into(key, &mut name);
            if visit(&name, &record).is_break() {
                break;
            }
        }
        Ok(())
    }
}

impl MailboxStore for LmdbStore {
    fn get(&self, name: &[u8]) -> Result<Option<MailboxRecord>> {
        // A name with no key (empty, say) names no mailbox: FIND answers nothing, as Cyrus.
        let Ok(key) = to_dbname(name) else {
            return Ok(None);
        };
        if key.len() > MAX_KEY_LEN {
            return Ok(None);
        }
        let db = self.shared.dbs.mailboxes;
        self.shared.read(|txn| match db.get(txn, &key)? {
            Some(v) => decode_record(&key, v).map(Some),
            None => Ok(None),
        })
    }

    /// Blocking; refused (instead of deadlocking) when called from a `done` callback or the
    /// commit hook, which run on the writer thread.
    fn commit(&self, ops: Vec<CasOp>) -> Result<Vec<CasOutcome>> {
        let prepared: Result<Vec<Prepared>> = ops
            .into_iter()
            .map(|op| prepare(op.name, Some(op.expect), op.new))
            .collect();
        self.commit_prepared(prepared?)
    }

    fn submit(&self, ops: Vec<CasOp>, done: CommitDone) {
        let prepared: Result<Vec<Prepared>> = ops
            .into_iter()
            .map(|op| prepare(op.name, Some(op.expect), op.new))
            .collect();
        match prepared {
            Ok(ops) => self.enqueue(ops, done),
            Err(e) => done(Err(e)),
        }
    }

    /// The snapshot holds one LMDB read transaction (and its reader slot) until dropped; keep
    /// it no longer than needed, since it pins old pages and delays a map resize.
    fn snapshot(&self) -> Result<Box<dyn Snapshot>> {
        let mut attempts = 0;
        loop {
            let permit = Permit::new(&self.shared);
            let attempt = self
                .shared
                .env
                .clone()
                .static_read_txn()
                .map_err(StoreError::from);
            let txn = match attempt {
                Err(e) if retry_kind(&e).is_some() && attempts < MAX_ATTEMPTS => {
                    drop(permit);
                    attempts += 1;
                    self.shared.resize(None)?;
                    continue;
                }
                other => other?,
            };
            let seq = read_last_seq(&self.shared.dbs, &txn)?;
            return Ok(Box::new(LmdbSnapshot { txn, seq, permit }));
        }
    }

    fn changes_since(&self, after: Seq, limit: usize) -> Result<Vec<Change>> {
        let dbs = self.shared.dbs;
        self.shared.read(|txn| {
            let oldest = match dbs.changes.first(txn)? {
                Some((k, _)) => read_u64(k, Some(k))?,
                // Nothing kept: everything up to the last sequence was pruned.
                None => read_last_seq(&dbs, txn)? + 1,
            };
            if after.saturating_add(1) < oldest {
                return Err(StoreError::FeedTruncated {
                    requested: after,
                    oldest,
                });
            }
            let mut out = Vec::new();
            let Some(first_wanted) = after.checked_add(1) else {
                return Ok(out);
            };
            let from = first_wanted.to_be_bytes();
            let range: (Bound<&[u8]>, Bound<&[u8]>) = (Bound::Included(&from), Bound::Unbounded);
            for item in dbs.changes.range(txn, &range)?.take(limit) {
                let (k, v) = item?;
                let seq = read_u64(k, Some(k))?;
                out.push(decode_change(seq, v).map_err(|why| StoreError::Corrupt {
                    key: k.to_vec(),
                    why,
                })?);
            }
            Ok(out)
        })
    }

    fn last_seq(&self) -> Result<Seq> {
        let dbs = self.shared.dbs;
        self.shared.read(|txn| read_last_seq(&dbs, txn))
    }

    fn set_commit_hook(&self, hook: CommitHook) {
        *self.writer.hook.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(hook));
    }
}

/// User writes are direct durable write transactions (not group commits): they are rare, and
/// LMDB serialises them with the writer thread's transactions.
impl UserStore for LmdbStore {
    fn get_user(&self, name: &str) -> Result<Option<Verifier>> {
        if name.is_empty() || name.len() > MAX_KEY_LEN {
            return Ok(None);
        }
        let users = self.shared.dbs.users;
        self.shared
            .read(|txn| match users.get(txn, name.as_bytes())? {
                Some(v) => Verifier::decode(v)
                    .map(Some)
                    .map_err(|why| StoreError::Corrupt {
                        key: name.as_bytes().to_vec(),
                        why,
                    }),
                None => Ok(None),
            })
    }

    fn put_user(&self, name: &str, v: &Verifier) -> Result<()> {
        check_key(name.as_bytes())?;
        let users = self.shared.dbs.users;
        let encoded = v.encode();
        self.shared
            .write(|txn| Ok(users.put(txn, name.as_bytes(), &encoded)?))
    }

    fn delete_user(&self, name: &str) -> Result<bool> {
        if name.is_empty() || name.len() > MAX_KEY_LEN {
            return Ok(false);
        }
        let users = self.shared.dbs.users;
        self.shared
            .write(|txn| Ok(users.delete(txn, name.as_bytes())?))
    }

    fn list_users(&self) -> Result<Vec<String>> {
        let users = self.shared.dbs.users;
        self.shared.read(|txn| {
            let mut out = Vec::new();
            for item in users.iter(txn)? {
                let (k, _) = item?;
                let name = std::str::from_utf8(k).map_err(|_| StoreError::Corrupt {
                    key: k.to_vec(),
                    why: "user name is not UTF-8".into(),
                })?;
                out.push(name.to_owned());
            }
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::mpsc;

    fn open(dir: &Path) -> Arc<LmdbStore> {
        LmdbStore::open(dir, LmdbOptions::default()).unwrap()
    }

    fn active(loc: &str) -> MailboxRecord {
        MailboxRecord::active(loc.as_bytes(), b"anyone\tlrs\t".to_vec(), 1_700_000_000)
    }

    fn names_of(store: &LmdbStore, prefix: &[u8], after: Option<&[u8]>) -> Vec<Vec<u8>> {
        let snap = store.snapshot().unwrap();
        let mut out = Vec::new();
        snap.scan(prefix, after, &mut |n, _| {
            out.push(n.to_vec());
            ControlFlow::Continue(())
        })
        .unwrap();
        out
    }

    #[test]
    fn basic_cas_cycle() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        assert_eq!(store.last_seq().unwrap(), 0);
        assert_eq!(store.get(b"user.a").unwrap(), None);

        let r = MailboxRecord::reserved(b"h1!p", 5);
        assert_eq!(
            store.reserve_if_absent(b"user.a", r.clone()).unwrap(),
            CasOutcome::Committed(1)
        );
        let got = store.get(b"user.a").unwrap().unwrap();
        assert_eq!(
            got,
            MailboxRecord {
                revision: 1,
                ..r.clone()
            }
        );

        // A second reserve conflicts and shows the current record.
        let again = store.reserve_if_absent(b"user.a", active("h2")).unwrap();
        assert_eq!(
            again,
            CasOutcome::Conflict {
                current: Some(got.clone())
            }
        );

        // Wrong revision conflicts; right one commits and bumps the revision.
        assert!(matches!(
            store
                .compare_and_set(b"user.a", 7, Some(active("h2")))
                .unwrap(),
            CasOutcome::Conflict { .. }
        ));
        assert_eq!(
            store
                .compare_and_set(b"user.a", 1, Some(active("h2")))
                .unwrap(),
            CasOutcome::Committed(2)
        );
        assert_eq!(store.get(b"user.a").unwrap().unwrap().revision, 2);
        assert_eq!(
            store.delete(b"user.a", 1).unwrap(),
            CasOutcome::Conflict {
                current: store.get(b"user.a").unwrap()
            }
        );
        assert_eq!(
            store.delete(b"user.a", 2).unwrap(),
            CasOutcome::Committed(3)
        );
        assert_eq!(store.get(b"user.a").unwrap(), None);
        // Revision expectations never match an absent name.
        assert_eq!(
            store
                .compare_and_set(b"user.a", 3, Some(active("h")))
                .unwrap(),
            CasOutcome::Conflict { current: None }
        );
        assert_eq!(store.last_seq().unwrap(), 3);

        let feed = store.changes_since(0, 100).unwrap();
        assert_eq!(
            feed.iter().map(|c| c.seq).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(feed[0].old_server, None);
        assert_eq!(feed[1].old_server.as_deref(), Some(&b"h1"[..]));
        assert_eq!(
            feed[1].new.as_ref().unwrap().server.as_deref(),
            Some(&b"h2"[..])
        );
        assert_eq!(feed[1].new.as_ref().unwrap().revision, 2);
        assert_eq!(feed[2].old_server.as_deref(), Some(&b"h2"[..]));
        assert_eq!(feed[2].new, None);
        assert!(feed.iter().all(|c| c.name == b"user.a"));
    }

    #[test]
    fn batch_stops_at_first_conflict() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.reserve_if_absent(b"b", active("h")).unwrap();
        let op = |n: &[u8], expect| CasOp {
            name: n.to_vec(),
            expect,
            new: Some(active("x")),
        };
        let out = store
            .commit(vec![
                op(b"a", Expect::Absent),
                op(b"a", Expect::Revision(2)), // sees the write just before it in the batch
                op(b"b", Expect::Absent),      // conflicts
                op(b"c", Expect::Absent),      // skipped
            ])
            .unwrap();
        assert_eq!(out.len(), 4);
        assert_eq!(out[0], CasOutcome::Committed(2));
        assert_eq!(out[1], CasOutcome::Committed(3));
        assert!(matches!(&out[2], CasOutcome::Conflict { current: Some(r) } if r.revision == 1));
        assert_eq!(out[3], CasOutcome::Skipped);
        assert_eq!(store.get(b"c").unwrap(), None);
        assert_eq!(store.last_seq().unwrap(), 3);
        assert_eq!(store.commit(Vec::new()).unwrap(), Vec::new());
    }

    #[test]
    fn bad_names_are_refused_without_reaching_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        assert!(matches!(
            store.reserve_if_absent(b"", active("h")),
            Err(StoreError::Name(_))
        ));
        assert!(matches!(
            store.reserve_if_absent(b"a\x1Fb", active("h")),
            Err(StoreError::Name(_))
        ));
        let long = vec![b'x'; MAX_KEY_LEN + 1];
        assert!(matches!(
            store.reserve_if_absent(&long, active("h")),
            Err(StoreError::InvalidKey(_))
        ));
        assert_eq!(store.get(&long).unwrap(), None);
        let ok = vec![b'x'; MAX_KEY_LEN];
        assert_eq!(
            store.reserve_if_absent(&ok, active("h")).unwrap(),
            CasOutcome::Committed(1)
        );
        assert_eq!(store.last_seq().unwrap(), 1);
    }

    #[test]
    fn scan_order_prefix_and_after() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        // cyrus-mupdate.md §2.3, observed LIST order.
        let order = crate::cyrus::mboxname::OBSERVED_LIST_ORDER;
        for name in order.iter().rev() {
            store.reserve_if_absent(name, active("h")).unwrap();
        }
        let all = names_of(&store, b"", None);
        assert_eq!(all, order.iter().map(|n| n.to_vec()).collect::<Vec<_>>());

        let prefix = [
            to_dbname(b"user.a").unwrap(),
            vec![crate::cyrus::mboxname::HIER_SEP],
        ]
        .concat();
        assert_eq!(names_of(&store, &prefix, None), vec![b"user.a.x".to_vec()]);
        let prefix = to_dbname(b"user.a").unwrap();
        assert_eq!(names_of(&store, &prefix, None).len(), 5);
        let after = to_dbname(b"user.a.x").unwrap();
        assert_eq!(
            names_of(&store, &prefix, Some(&after)),
            vec![
                b"user.a-b".to_vec(),
                b"user.a^b".to_vec(),
                b"user.a0".to_vec()
            ]
        );
        // `after` before the prefix: the whole prefix; after it: nothing.
        assert_eq!(names_of(&store, &prefix, Some(b"a")).len(), 5);
        assert!(names_of(&store, &prefix, Some(b"zzz")).is_empty());
        // The visitor can stop.
        let snap = store.snapshot().unwrap();
        let mut n = 0;
        snap.scan(b"", None, &mut |_, _| {
            n += 1;
            if n == 3 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap();
        assert_eq!(n, 3);
    }

    #[test]
    fn snapshot_is_consistent_and_sendable() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.reserve_if_absent(b"a", active("h")).unwrap();
        let snap = store.snapshot().unwrap();
        store.reserve_if_absent(b"b", active("h")).unwrap();
        assert_eq!(snap.seq(), 1);
        let names = std::thread::spawn(move || {
            let mut out = Vec::new();
            snap.scan(b"", None, &mut |n, _| {
                out.push(n.to_vec());
                ControlFlow::Continue(())
            })
            .unwrap();
            out
        })
        .join()
        .unwrap();
        assert_eq!(names, vec![b"a".to_vec()]);
        assert_eq!(store.snapshot().unwrap().seq(), 2);
    }

    #[test]
    fn same_dir_same_store_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let a = open(dir.path());
        let b = LmdbStore::open(&dir.path().join("."), LmdbOptions::default()).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        a.reserve_if_absent(b"x", active("h")).unwrap();
        // A snapshot outliving every store handle keeps the environment; reopening reuses it.
        let snap = a.snapshot().unwrap();
        drop(a);
        drop(b);
        let c = open(dir.path());
        assert_eq!(
            c.reserve_if_absent(b"y", active("h")).unwrap(),
            CasOutcome::Committed(2)
        );
        assert_eq!(snap.seq(), 1);
        drop(snap);
        drop(c);
        // Fully closed, then opened afresh: everything persisted.
        let d = open(dir.path());
        assert_eq!(d.last_seq().unwrap(), 2);
        assert!(d.get(b"y").unwrap().is_some());
    }

    #[test]
    fn no_unsafe_env_flags() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let flags = store.shared.env.get_flags().unwrap();
        for bad in [
            heed::EnvFlags::NO_SYNC,
            heed::EnvFlags::NO_META_SYNC,
            heed::EnvFlags::MAP_ASYNC,
        ] {
            assert_eq!(flags & bad.bits(), 0, "unsafe flag {bad:?} set");
        }
        assert!(dir.path().join("data.mdb").exists());
        assert!(dir.path().join("lock.mdb").exists());
    }

    #[test]
    fn feed_pruning_and_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let opts = LmdbOptions {
            change_log_retain: 5,
            ..LmdbOptions::default()
        };
        let store = LmdbStore::open(dir.path(), opts).unwrap();
        assert!(store.changes_since(0, 10).unwrap().is_empty());
        for i in 0..12 {
            store
                .reserve_if_absent(format!("n{i}").as_bytes(), active("h"))
                .unwrap();
        }
        // Kept: 8..=12.
        let feed = store.changes_since(7, 100).unwrap();
        assert_eq!(
            feed.iter().map(|c| c.seq).collect::<Vec<_>>(),
            vec![8, 9, 10, 11, 12]
        );
        assert_eq!(feed[0].name, b"n7");
        assert_eq!(store.changes_since(9, 2).unwrap().len(), 2);
        assert!(store.changes_since(12, 10).unwrap().is_empty());
        assert!(store.changes_since(99, 10).unwrap().is_empty());
        match store.changes_since(6, 10) {
            Err(StoreError::FeedTruncated {
                requested: 6,
                oldest: 8,
            }) => {}
            other => panic!("expected FeedTruncated, got {other:?}"),
        }
        assert!(store.changes_since(0, 10).is_err());
    }

    #[test]
    fn feed_with_nothing_retained() {
        let dir = tempfile::tempdir().unwrap();
        let opts = LmdbOptions {
            change_log_retain: 0,
            ..LmdbOptions::default()
        };
        let store = LmdbStore::open(dir.path(), opts).unwrap();
        store.reserve_if_absent(b"a", active("h")).unwrap();
        store.reserve_if_absent(b"b", active("h")).unwrap();
        assert!(store.changes_since(2, 10).unwrap().is_empty());
        assert!(matches!(
            store.changes_since(1, 10),
            Err(StoreError::FeedTruncated {
                requested: 1,
                oldest: 3
            })
        ));
    }

    #[test]
    fn commit_hook_runs_after_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let (tx, rx) = mpsc::channel();
        let probe = Arc::clone(&store);
        store.set_commit_hook(Box::new(move |seq| {
            // The change is already visible (committed) when the hook runs.
            let visible = probe.last_seq().unwrap();
            let _ = tx.send((seq, visible));
        }));
        store.reserve_if_absent(b"a", active("h")).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), (1, 1));
        // A batch that only conflicts writes nothing and runs no hook.
        store.reserve_if_absent(b"a", active("h")).unwrap();
        store.reserve_if_absent(b"b", active("h")).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), (2, 2));
        // Break the hook's cycle (it holds the store) before the end of the test.
        store.set_commit_hook(Box::new(|_| {}));
    }

    #[test]
    fn panicking_callback_does_not_kill_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let op = CasOp {
            name: b"a".to_vec(),
            expect: Expect::Absent,
            new: Some(active("h")),
        };
        store.submit(vec![op], Box::new(|_| panic!("callback bug")));
        assert_eq!(
            store.reserve_if_absent(b"b", active("h")).unwrap(),
            CasOutcome::Committed(2)
        );
    }

    #[test]
    fn shutdown_finishes_queued_work_then_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let (tx, rx) = mpsc::channel();
        for i in 0..50 {
            let tx = tx.clone();
            let op = CasOp {
                name: format!("n{i}").into_bytes(),
                expect: Expect::Absent,
                new: Some(active("h")),
            };
            store.submit(vec![op], Box::new(move |r| tx.send(r.is_ok()).unwrap()));
        }
        store.shutdown();
        assert_eq!(rx.try_iter().filter(|ok| *ok).count(), 50);
        assert!(matches!(
            store.reserve_if_absent(b"late", active("h")),
            Err(StoreError::WriterGone)
        ));
        // Reads still work, and a new open gets a working writer.
        assert_eq!(store.last_seq().unwrap(), 50);
        let again = open(dir.path());
        assert!(!Arc::ptr_eq(&store, &again));
        assert_eq!(
            again.reserve_if_absent(b"late", active("h")).unwrap(),
            CasOutcome::Committed(51)
        );
    }

    #[test]
    fn blocking_commit_from_a_callback_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let (tx, rx) = mpsc::channel();
        let inner = Arc::clone(&store);
        let op = CasOp {
            name: b"a".to_vec(),
            expect: Expect::Absent,
            new: Some(active("h")),
        };
        store.submit(
            vec![op],
            Box::new(move |_| {
                let r = inner.reserve_if_absent(b"b", active("h"));
                tx.send(matches!(r, Err(StoreError::Io(_)))).unwrap();
            }),
        );
        assert!(rx.recv_timeout(Duration::from_secs(10)).unwrap());
        assert_eq!(store.get(b"b").unwrap(), None);
    }

    #[test]
    fn dropping_the_store_from_a_done_callback_does_not_deadlock() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let (tx, rx) = mpsc::channel();
        let held = Arc::clone(&store);
        let op = CasOp {
            name: b"a".to_vec(),
            expect: Expect::Absent,
            new: Some(active("h")),
        };
        store.submit(
            vec![op],
            Box::new(move |r| {
                drop(held);
                tx.send(r.is_ok()).unwrap();
            }),
        );
        drop(store);
        assert!(rx.recv_timeout(Duration::from_secs(10)).unwrap());
    }

    #[test]
    fn group_commit_concurrency() {
        const THREADS: usize = 16;
        const EACH: usize = 30;
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store
            .reserve_if_absent(b"shared.hot", MailboxRecord::reserved(b"h", 0))
            .unwrap();
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                let store = Arc::clone(&store);
                std::thread::spawn(move || {
                    let mut seqs = Vec::new();
                    for i in 0..EACH {
                        let name = format!("user.t{t}.m{i}");
                        match store
                            .reserve_if_absent(name.as_bytes(), active("h"))
                            .unwrap()
                        {
                            CasOutcome::Committed(s) => seqs.push(s),
                            other => panic!("{name}: {other:?}"),
                        }
                        // Increment the hot record's mtime by CAS, retrying on conflict.
                        loop {
                            let cur = store.get(b"shared.hot").unwrap().unwrap();
                            let next = MailboxRecord {
                                mtime: cur.mtime + 1,
                                ..cur.clone()
                            };
                            match store.compare_and_set(b"shared.hot", cur.revision, Some(next)) {
                                Ok(CasOutcome::Committed(s)) => {
                                    seqs.push(s);
                                    break;
                                }
                                Ok(CasOutcome::Conflict { current: Some(c) }) => {
                                    assert_ne!(c.revision, cur.revision);
                                }
                                other => panic!("hot: {other:?}"),
                            }
                        }
                    }
                    seqs
                })
            })
            .collect();
        let mut seqs: Vec<Seq> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        seqs.sort_unstable();
        let total = (THREADS * EACH * 2) as u64;
        assert_eq!(
            seqs,
            (2..=total + 1).collect::<Vec<_>>(),
            "seqs unique and dense"
        );
        assert_eq!(store.last_seq().unwrap(), total + 1);
        assert_eq!(
            store.get(b"shared.hot").unwrap().unwrap().mtime,
            (THREADS * EACH) as i64
        );
        let feed = store.changes_since(0, usize::MAX).unwrap();
        assert_eq!(feed.len() as u64, total + 1);
        assert!(feed.windows(2).all(|w| w[1].seq == w[0].seq + 1));
    }

    #[test]
    fn map_grows_when_full() {
        let dir = tempfile::tempdir().unwrap();
        let opts = LmdbOptions {
            map_size: 64 * 1024,
            ..LmdbOptions::default()
        };
        let store = LmdbStore::open(dir.path(), opts).unwrap();
        let start = store.map_size();
        assert_eq!(start, 64 * 1024);
        // Readers keep reading during the resizes (they wait on the gate, never see UB).
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let store = Arc::clone(&store);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut reads = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    store.get(b"user.m0").unwrap();
                    store.last_seq().unwrap();
                    reads += 1;
                }
                reads
            })
        };
        let acl = vec![b'r'; 300];
        let mut written = 0usize;
        for batch in 0..40 {
            let ops = (0..50)
                .map(|i| CasOp {
                    name: format!("user.m{}", batch * 50 + i).into_bytes(),
                    expect: Expect::Absent,
                    new: Some(MailboxRecord::active(b"h!p", acl.clone(), 0)),
                })
                .collect();
            let out = store.commit(ops).unwrap();
            assert!(out.iter().all(|o| matches!(o, CasOutcome::Committed(_))));
            written += out.len();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(reader.join().unwrap() > 0);
        assert!(
            store.map_size() >= 8 * start,
            "map grew to {}",
            store.map_size()
        );
        let mut n = 0;
        store
            .scan_all(&mut |_, r| {
                assert_eq!(r.acl.as_deref(), Some(acl.as_slice()));
                n += 1;
                ControlFlow::Continue(())
            })
            .unwrap();
        assert_eq!(n, written);
        // Also through a direct write transaction (users).
        let v = Verifier::with_salt("pw", 1, [0; 16]);
        store.put_user("after-growth", &v).unwrap();
        assert_eq!(store.get_user("after-growth").unwrap(), Some(v));
    }

    #[test]
    fn users() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        assert_eq!(store.get_user("bob").unwrap(), None);
        let v = Verifier::new("pw", 2).unwrap();
        store.put_user("bob", &v).unwrap();
        store
            .put_user("alice", &Verifier::new("x", 2).unwrap())
            .unwrap();
        let got = store.get_user("bob").unwrap().unwrap();
        assert!(got.verify("pw"));
        assert!(!got.verify("pw2"));
        assert_eq!(
            store.list_users().unwrap(),
            vec!["alice".to_string(), "bob".to_string()]
        );
        assert!(store.delete_user("bob").unwrap());
        assert!(!store.delete_user("bob").unwrap());
        assert_eq!(store.get_user("bob").unwrap(), None);
        assert!(matches!(
            store.put_user("", &v),
            Err(StoreError::InvalidKey(_))
        ));
        // User writes interleave with group commits without deadlock.
        let writer = {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                for i in 0..20 {
                    store
                        .reserve_if_absent(format!("m{i}").as_bytes(), active("h"))
                        .unwrap();
                }
            })
        };
        for i in 0..20 {
            store.put_user(&format!("u{i}"), &v).unwrap();
        }
        writer.join().unwrap();
        assert_eq!(store.list_users().unwrap().len(), 21);
        // Users are not changes.
        assert_eq!(store.last_seq().unwrap(), 20);
    }

    #[test]
    fn import_and_aux() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        assert_eq!(store.import_batch(Vec::new()).unwrap(), 0);
        let mut deleted = MailboxRecord::active(b"h!p", b"a\tb\t".to_vec(), 1234);
        deleted.mbtype = crate::store::MbType(crate::store::record::mbtype::DELETED);
        deleted.cyrus = b"opaque cyrus fields".to_vec();
        let records = vec![
            (b"user.a".to_vec(), active("h1")),
            (b"DELETED.user.a.5F000000".to_vec(), deleted.clone()),
        ];
        assert_eq!(store.import_batch(records).unwrap(), 2);
        // Imports overwrite unconditionally.
        assert_eq!(
            store
                .import_batch(vec![(b"user.a".to_vec(), active("h2"))])
                .unwrap(),
            3
        );
        let mut seen = Vec::new();
        store
            .scan_all(&mut |n, r| {
                seen.push((n.to_vec(), r.clone()));
                ControlFlow::Continue(())
            })
            .unwrap();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0].0, b"DELETED.user.a.5F000000");
        assert_eq!(
            seen[0].1,
            MailboxRecord {
                revision: 2,
                ..deleted
            }
        );
        assert!(!seen[0].1.is_listed());
        assert_eq!(seen[1].1.server.as_deref(), Some(&b"h2"[..]));
        assert_eq!(
            store.changes_since(2, 10).unwrap()[0].old_server.as_deref(),
            Some(&b"h1"[..])
        );
        assert!(store.import_batch(vec![(Vec::new(), active("h"))]).is_err());

        store
            .aux_put_batch(vec![
                (b"I0001".to_vec(), b"v1".to_vec()),
                (b"I0002".to_vec(), b"v2".to_vec()),
                (b"Z".to_vec(), b"v3".to_vec()),
            ])
            .unwrap();
        let mut aux = Vec::new();
        store
            .aux_scan(b"I", &mut |k, v| {
                aux.push((k.to_vec(), v.to_vec()));
                ControlFlow::Continue(())
            })
            .unwrap();
        assert_eq!(
            aux,
            vec![
                (b"I0001".to_vec(), b"v1".to_vec()),
                (b"I0002".to_vec(), b"v2".to_vec())
            ]
        );
        let mut all = 0;
        store
            .aux_scan(b"", &mut |_, _| {
                all += 1;
                ControlFlow::Continue(())
            })
            .unwrap();
        assert_eq!(all, 3);
        assert!(store.aux_put_batch(vec![(Vec::new(), Vec::new())]).is_err());
        assert_eq!(store.last_seq().unwrap(), 3);
    }

    #[test]
    fn import_larger_than_one_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let n = IMPORT_CHUNK + 10;
        let records = (0..n)
            .map(|i| (format!("user.i{i:06}").into_bytes(), active("h")))
            .collect();
        assert_eq!(store.import_batch(records).unwrap(), n as u64);
        let mut count = 0;
        store
            .scan_all(&mut |_, _| {
                count += 1;
                ControlFlow::Continue(())
            })
            .unwrap();
        assert_eq!(count, n);
    }

    #[test]
    fn change_codec_round_trip_and_refusals() {
        let rec = active("h").encode();
        let mut buf = Vec::new();
        encode_change(&mut buf, b"user.a", Some(b"old"), Some(&rec));
        let c = decode_change(9, &buf).unwrap();
        assert_eq!(
            c,
            Change {
                seq: 9,
                name: b"user.a".to_vec(),
                old_server: Some(b"old".to_vec()),
                new: Some(active("h"))
            }
        );
        encode_change(&mut buf, b"x", None, None);
        assert_eq!(decode_change(1, &buf).unwrap().new, None);
        assert!(decode_change(1, &[]).is_err());
        assert!(decode_change(1, &[2, 0, 0]).is_err());
        assert!(decode_change(1, &[1, 4, 0]).is_err());
        assert!(decode_change(1, &[1, 0, 0, 0]).is_err());
        for cut in 0..buf.len() {
            assert!(decode_change(1, &buf[..cut]).is_err());
        }
    }

    /// Re-executed by [`acknowledged_commits_survive_sigkill`] as a child process: commits one
    /// record after another and prints each acknowledgement. Does nothing in a normal run.
    #[test]
    fn durability_child() {
        let Some(dir) = std::env::var_os("MUPDATE_STORE_DURABILITY_DIR") else {
            return;
        };
        use std::io::Write as _;
        let store = open(Path::new(&dir));
        let mut out = std::io::stdout();
        for i in 0.. {
            let name = format!("user.d{i}");
            let r = store
                .reserve_if_absent(name.as_bytes(), active("h"))
                .unwrap();
            assert!(matches!(r, CasOutcome::Committed(_)));
            writeln!(out, "ACK {name}").unwrap();
            out.flush().unwrap();
        }
    }

    #[test]
    fn acknowledged_commits_survive_sigkill() {
        use std::io::BufRead as _;
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "store::lmdb::tests::durability_child",
                "--nocapture",
            ])
            .args(["--test-threads", "1"])
            .env("MUPDATE_STORE_DURABILITY_DIR", dir.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut acked = Vec::new();
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.unwrap();
            if let Some(name) = line.strip_prefix("ACK ") {
                acked.push(name.to_owned());
                if acked.len() == 30 {
                    child.kill().unwrap(); // SIGKILL, mid-stream
                    break;
                }
            }
        }
        child.wait().unwrap();
        assert_eq!(acked.len(), 30, "child did not acknowledge 30 commits");
        let store = open(dir.path());
        for name in &acked {
            assert!(
                store.get(name.as_bytes()).unwrap().is_some(),
                "{name} acknowledged but lost"
            );
        }
        assert!(store.last_seq().unwrap() >= 30);
    }

    /// Re-executed by [`another_process_writes_while_open`]: a second process on the same
    /// directory, with a tiny map that it must grow, writing mailboxes and a user.
    #[test]
    fn writer_child() {
        let Some(dir) = std::env::var_os("MUPDATE_STORE_WRITER_DIR") else {
            return;
        };
        let opts = LmdbOptions {
            map_size: 64 * 1024,
            ..LmdbOptions::default()
        };
        let store = LmdbStore::open(Path::new(&dir), opts).unwrap();
        store
            .put_user("child", &Verifier::with_salt("pw", 1, [1; 16]))
            .unwrap();
        let acl = vec![b'l'; 1000];
        for batch in 0..10 {
            let ops = (0..30)
                .map(|i| CasOp {
                    name: format!("user.c{}", batch * 30 + i).into_bytes(),
                    expect: Expect::Absent,
                    new: Some(MailboxRecord::active(b"h", acl.clone(), 0)),
                })
                .collect();
            store.commit(ops).unwrap();
        }
        println!("CHILD DONE {}", store.map_size());
    }

    #[test]
    fn another_process_writes_while_open() {
        let dir = tempfile::tempdir().unwrap();
        let opts = LmdbOptions {
            map_size: 64 * 1024,
            ..LmdbOptions::default()
        };
        let store = LmdbStore::open(dir.path(), opts).unwrap();
        assert_eq!(
            store.reserve_if_absent(b"user.p", active("h")).unwrap(),
            CasOutcome::Committed(1)
        );
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "store::lmdb::tests::writer_child", "--nocapture"])
            .args(["--test-threads", "1"])
            .env("MUPDATE_STORE_WRITER_DIR", dir.path())
            .stderr(std::process::Stdio::inherit())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("CHILD DONE"),
            "child failed: {stdout}"
        );
        // The child grew the map past ours: our next transactions see MDB_MAP_RESIZED and
        // adopt the new size.
        assert!(store.get(b"user.c299").unwrap().is_some());
        assert!(store.map_size() > 64 * 1024);
        assert!(store.get_user("child").unwrap().unwrap().verify("pw"));
        // The sequence is shared through `meta`: ours continues after the child's.
        assert_eq!(store.last_seq().unwrap(), 301);
        assert_eq!(
            store.reserve_if_absent(b"user.q", active("h")).unwrap(),
            CasOutcome::Committed(302)
        );
        assert_eq!(store.changes_since(300, 10).unwrap().len(), 2);
    }

    proptest::proptest! {
        #[test]
        fn change_decode_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let _ = decode_change(1, &bytes);
        }
    }

    // ---- model-based property test -------------------------------------------------------

    const NAMES: &[&[u8]] = &[
        b"user",
        b"user.a",
        b"user.a.b",
        b"user.a-b",
        b"user.a^b",
        b"example.com!user.z",
        b"shared",
    ];

    #[derive(Debug, Clone)]
    enum Gen {
        /// Reserve if absent (conflicts when present).
        Reserve(usize, u8),
        /// CAS with the right revision (or a wrong one when `false`), writing or deleting.
        Cas {
            name: usize,
            right: bool,
            delete: bool,
            loc: u8,
        },
        Reopen,
    }

    fn gen_op() -> impl proptest::strategy::Strategy<Value = Gen> {
        use proptest::prelude::*;
        prop_oneof![
            3 => (0..NAMES.len(), any::<u8>()).prop_map(|(n, l)| Gen::Reserve(n, l)),
            5 => (0..NAMES.len(), any::<bool>(), proptest::bool::weighted(0.25), any::<u8>())
                .prop_map(|(name, right, delete, loc)| Gen::Cas { name, right, delete, loc }),
            1 => Just(Gen::Reopen),
        ]
    }

    #[derive(Default, Clone)]
    struct Model {
        records: BTreeMap<Vec<u8>, (Vec<u8>, MailboxRecord)>,
        changes: Vec<Change>,
        seq: Seq,
    }

    impl Model {
        fn get(&self, name: &[u8]) -> Option<&MailboxRecord> {
            self.records.get(&to_dbname(name).unwrap()).map(|(_, r)| r)
        }

        /// The reference semantics of one batch.
        fn apply(&mut self, ops: &[CasOp]) -> Vec<CasOutcome> {
            let mut out = Vec::new();
            let mut conflicted = false;
            for op in ops {
                if conflicted {
                    out.push(CasOutcome::Skipped);
                    continue;
                }
                let key = to_dbname(&op.name).unwrap();
                let current = self.records.get(&key).map(|(_, r)| r.clone());
                let ok = match op.expect {
                    Expect::Absent => current.is_none(),
                    Expect::Revision(r) => current.as_ref().is_some_and(|c| c.revision == r),
                };
                if !ok {
                    conflicted = true;
                    out.push(CasOutcome::Conflict { current });
                    continue;
                }
                self.seq += 1;
                let new = op.new.clone().map(|r| MailboxRecord {
                    revision: self.seq,
                    ..r
                });
                match &new {
                    Some(r) => {
                        self.records.insert(key, (op.name.clone(), r.clone()));
                    }
                    None => {
                        self.records.remove(&key);
                    }
                }
                self.changes.push(Change {
                    seq: self.seq,
                    name: op.name.clone(),
                    old_server: current.and_then(|c| c.server),
                    new,
                });
                out.push(CasOutcome::Committed(self.seq));
            }
            out
        }
    }

    fn check_against(
        store: &LmdbStore,
        model: &Model,
    ) -> std::result::Result<(), proptest::test_runner::TestCaseError> {
        use proptest::prop_assert_eq;
        prop_assert_eq!(store.last_seq().unwrap(), model.seq);
        let snap = store.snapshot().unwrap();
        prop_assert_eq!(snap.seq(), model.seq);
        let mut scanned = Vec::new();
        snap.scan(b"", None, &mut |n, r| {
            scanned.push((n.to_vec(), r.clone()));
            ControlFlow::Continue(())
        })
        .unwrap();
        let expected: Vec<_> = model.records.values().cloned().collect();
        prop_assert_eq!(scanned, expected);
        prop_assert_eq!(
            store.changes_since(0, usize::MAX).unwrap(),
            model.changes.clone()
        );
        let mid = model.seq / 2;
        prop_assert_eq!(
            store.changes_since(mid, 3).unwrap(),
            model
                .changes
                .iter()
                .skip(mid as usize)
                .take(3)
                .cloned()
                .collect::<Vec<_>>()
        );
        for name in NAMES {
            let got = store.get(name).unwrap();
            prop_assert_eq!(got.as_ref(), model.get(name));
        }
        Ok(())
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 40, ..Default::default() })]
        #[test]
        fn matches_btreemap_model(
            batches in proptest::collection::vec(proptest::collection::vec(gen_op(), 1..5), 1..16)
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut store = open(dir.path());
            let mut model = Model::default();
            for batch in batches {
                // Build CasOps from the model state as the batch would see it.
                let mut shadow = model.clone();
                let mut ops = Vec::new();
                let mut reopen = false;
                for g in batch {
                    let op = match g {
                        Gen::Reopen => { reopen = true; continue; }
                        Gen::Reserve(n, loc) => CasOp {
                            name: NAMES[n].to_vec(),
                            expect: Expect::Absent,
                            new: Some(MailboxRecord::reserved(format!("h{}!p", loc % 4).as_bytes(), i64::from(loc))),
                        },
                        Gen::Cas { name, right, delete, loc } => {
                            let rev = shadow.get(NAMES[name]).map_or(0, |r| r.revision);
                            let rev = if right { rev } else { rev + 1 + u64::from(loc % 3) };
                            CasOp {
                                name: NAMES[name].to_vec(),
                                expect: Expect::Revision(rev),
                                new: (!delete).then(|| active(&format!("h{}", loc % 4))),
                            }
                        }
                    };
                    shadow.apply(std::slice::from_ref(&op));
                    ops.push(op);
                }
                let want = model.apply(&ops);
                let got = store.commit(ops).unwrap();
                proptest::prop_assert_eq!(got, want);
                if reopen {
                    drop(store);
                    store = open(dir.path());
                    check_against(&store, &model)?;
                }
            }
            check_against(&store, &model)?;
            drop(store);
            let store = open(dir.path());
            check_against(&store, &model)?;
        }
    }

    // ---- benchmarks (ignored; run with --release -- --ignored --nocapture) ----------------

    fn commits_per_sec(threads: usize, per_thread: usize) -> f64 {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let start = Instant::now();
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let store = Arc::clone(&store);
                std::thread::spawn(move || {
                    for i in 0..per_thread {
                        let name = format!("user.t{t}.m{i}");
                        store
                            .reserve_if_absent(name.as_bytes(), active("h"))
                            .unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        (threads * per_thread) as f64 / start.elapsed().as_secs_f64()
    }

    #[test]
    #[ignore = "benchmark"]
    fn bench_commit_throughput() {
        let one = commits_per_sec(1, 300);
        let many = commits_per_sec(32, 100);
        println!(
            "commits/s: 1 thread {one:.0}, 32 threads {many:.0} ({:.1}x)",
            many / one
        );
    }

    #[test]
    #[ignore = "benchmark"]
    fn bench_scan_100k() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let records = (0..100_000)
            .map(|i| {
                (
                    format!("user.u{i:06}.INBOX").into_bytes(),
                    active("backend1!default"),
                )
            })
            .collect();
        store.import_batch(records).unwrap();
        for _ in 0..3 {
            let start = Instant::now();
            let snap = store.snapshot().unwrap();
            let mut n = 0usize;
            snap.scan(b"", None, &mut |name, r| {
                n += name.len() + r.wire_acl().len();
                ControlFlow::Continue(())
            })
            .unwrap();
            println!("scan of 100k records: {:?} ({n})", start.elapsed());
        }
    }
}
