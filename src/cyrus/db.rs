//! Cyrus `mailboxes.db` files as raw `(key, value)` byte pairs: format detection, streaming
//! readers with Cyrus' own crash recovery, atomic writers, the comparators, the `cyr_dbtool`
//! key/value listing and a consistency check.
//!
//! Three backends exist (formats spec §1-§5): [`twoskip`] (the 3.x default),
//! [`skiplist`] (the 2.x default) and [`flat`] (a sorted text
//! file). This layer knows nothing about what keys and values mean; the record codecs (dlist,
//! N/I/A keys) build on it.
//!
//! # Reading
//!
//! [`open`] detects the backend like `cyrusdb_detect` and returns a [`DbReader`], a lending
//! iterator ([`DbReader::next_record`], [`DbReader::for_each`]) over the records in the file's
//! key order. Files are mapped read-only; nothing is ever written next to them (no lock file,
//! no recovery in place). Readers need constant memory in the number of records, except on a
//! recovery path that Cyrus itself could only take by rewriting the file (twoskip `recovery2`,
//! skiplist with an uncommitted tail): those build an index of record offsets, documented on
//! the backend readers.
//!
//! A crashed file reads as Cyrus would read it *after* its recovery (formats spec §3.7, §4.5).
//!
//! The mapped file must not be modified while a reader is open (the same contract as any
//! mmap-based reader). Cyrus replaces skiplist and flat files by `rename()`, which is safe,
//! but appends to and rewrites twoskip files in place: read a copy of a live database, or
//! stop Cyrus first.
//!
//! # Writing
//!
//! [`write()`] writes records that are already sorted in the target order (see [`Order`] and
//! [`compare`]) into a fresh file next to the target, fsyncs it, renames it over the target
//! and fsyncs the directory, so a reader only ever sees the old or the complete new database.
//! The layout is the one Cyrus 3.6.1 writes for the same inserts on a fresh file in one
//! transaction; see the backend modules for which bytes are identical.
use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::ops::ControlFlow;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use super::{flat, skiplist, twoskip};

/// A `(key, value)` pair borrowed from a reader.
pub type Record<'a> = (&'a [u8], &'a [u8]);

// ---------------------------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------------------------

/// A `cyrusdb` backend that can hold `mailboxes.db`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// `cyrusdb_twoskip.c`: the default since 2.5 (formats spec §3).
    Twoskip,
    /// `cyrusdb_skiplist.c`: the default of 2.1-2.4 (formats spec §4).
    Skiplist,
    /// `cyrusdb_flat.c`: one `KEY TAB VALUE LF` line per record (formats spec §5).
    Flat,
}

impl Backend {
    /// The name Cyrus uses (`mboxlist_db`, `cyr_dbtool`).
    pub fn name(self) -> &'static str {
        match self {
            Backend::Twoskip => "twoskip",
            Backend::Skiplist => "skiplist",
            Backend::Flat => "flat",
        }
    }

    /// The key order Cyrus 3.6 uses for `mailboxes.db` in this backend (formats spec §2):
    /// twoskip [`Order::Raw`], skiplist [`Order::Signed`], flat [`Order::FlatMbox`].
    pub fn default_order(self) -> Order {
        match self {
            Backend::Twoskip => Order::Raw,
            Backend::Skiplist => Order::Signed,
            Backend::Flat => Order::FlatMbox,
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The error of [`Backend::from_str`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown cyrusdb backend {0:?} (expected twoskip, skiplist or flat)")]
pub struct UnknownBackend(pub String);

impl FromStr for Backend {
    type Err = UnknownBackend;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "twoskip" => Ok(Backend::Twoskip),
            "skiplist" => Ok(Backend::Skiplist),
            "flat" => Ok(Backend::Flat),
            other => Err(UnknownBackend(other.to_owned())),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Everything that can go wrong in this layer. Corruption always names the byte offset.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// An operating-system error on `path`.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file is not a valid database of `backend`: `what` went wrong at byte `offset`.
    #[error("{}: corrupt {backend} database at offset {offset} (0x{offset:X}): {what}", path.display())]
    Corrupt {
        path: PathBuf,
        backend: Backend,
        offset: u64,
        what: String,
    },
    /// [`detect`] could not tell which backend wrote the file.
    #[error("{}: {what}", path.display())]
    Unrecognized { path: PathBuf, what: String },
    /// A record given to a writer cannot be stored: out of order, duplicate, empty key, or too
    /// large for the format. `index` counts records from 0.
    #[error("record {index}: {what}")]
    BadRecord { index: u64, what: String },
    /// The target exists and [`WriteOptions::overwrite`] is off.
    #[error("{}: already exists (set WriteOptions::overwrite to replace it)", path.display())]
    Exists { path: PathBuf },
    /// The caller's record iterator failed after `index` records; nothing was written.
    #[error("record source failed after {index} records: {source}")]
    Source {
        index: u64,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl DbError {
    /// The byte offset of a [`DbError::Corrupt`] error.
    pub fn offset(&self) -> Option<u64> {
        match self {
            DbError::Corrupt { offset, .. } => Some(*offset),
            _ => None,
        }
    }

    pub(crate) fn io(path: &Path, source: io::Error) -> DbError {
        DbError::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// A corruption found by a backend parser, before the path and backend are attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Bad {
    pub offset: u64,
    pub what: String,
}

impl Bad {
    pub(crate) fn new(offset: u64, what: impl Into<String>) -> Bad {
        Bad {
            offset,
            what: what.into(),
        }
    }

    pub(crate) fn into_error(self, path: &Path, backend: Backend) -> DbError {
        DbError::Corrupt {
            path: path.to_owned(),
            backend,
            offset: self.offset,
            what: self.what,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Comparators
// ---------------------------------------------------------------------------------------------

/// A key order (formats spec §2). Every order breaks ties by length: a key sorts before any
/// longer key that starts with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Order {
    /// `memcmp` on unsigned bytes (`bsearch_ncompare_raw`): twoskip.
    Raw,
    /// Bytes compared as C `char`, signed on x86-64, so bytes >= 0x80 sort before ASCII
    /// (`compare_signed`): skiplist. (On ARM/PowerPC Linux Cyrus' skiplist order is
    /// [`Order::Raw`].)
    Signed,
    /// Bytes mapped through `convert_to_compare[]` (`.` to 0x02, TAB and LF to 0x01,
    /// 0x01-0x08 to 0x03-0x0A) then compared unsigned (`bsearch_ncompare_mbox`): twoskip or
    /// skiplist opened with `CYRUSDB_MBOXSORT` (2.3-3.4 `improved_mboxlist_sort: yes`).
    Mbox,
    /// [`Order::Mbox`] applied to the *escaped* keys of a flat file (formats spec §5): NUL,
    /// TAB, CR and LF become `FF 80|byte` and 0xFF becomes `FF FF` before comparing. This is
    /// the order of every flat file.
    FlatMbox,
}

/// `convert_to_compare[]` of `lib/bsearch.c`: the identity except for the bytes listed on
/// [`Order::Mbox`].
const fn mbox_table() -> [u8; 256] {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = i as u8;
        i += 1;
    }
    let mut b = 1;
    while b <= 8 {
        t[b] = b as u8 + 2;
        b += 1;
    }
    t[b'\t' as usize] = 0x01;
    t[b'\n' as usize] = 0x01;
    t[b'.' as usize] = 0x02;
    t
}

pub(crate) static MBOX_MAP: [u8; 256] = mbox_table();

/// The bytes a key becomes in a flat file (formats spec §5), one byte or an escape pair.
fn flat_escape(b: u8) -> ([u8; 2], usize) {
    match b {
        0 | b'\t' | b'\r' | b'\n' => ([0xFF, 0x80 | b], 2),
        0xFF => ([0xFF, 0xFF], 2),
        _ => ([b, 0], 1),
    }
}

fn cmp_mapped(a: &[u8], b: &[u8], f: impl Fn(u8) -> i16) -> Ordering {
    for (&x, &y) in a.iter().zip(b) {
        if x != y {
            let c = f(x).cmp(&f(y));
            if c != Ordering::Equal {
                return c;
            }
        }
    }
    a.len().cmp(&b.len())
}

fn cmp_flat(a: &[u8], b: &[u8]) -> Ordering {
    let mut ia = a.iter().flat_map(|&x| {
        let (e, n) = flat_escape(x);
        e.into_iter().take(n)
    });
    let mut ib = b.iter().flat_map(|&x| {
        let (e, n) = flat_escape(x);
        e.into_iter().take(n)
    });
    loop {
        match (ia.next(), ib.next()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) => match MBOX_MAP[x as usize].cmp(&MBOX_MAP[y as usize]) {
                Ordering::Equal => {}
                c => return c,
            },
        }
    }
}

impl Order {
    /// Compares two keys in this order.
    pub fn compare(self, a: &[u8], b: &[u8]) -> Ordering {
        match self {
            Order::Raw => a.cmp(b),
            Order::Signed => cmp_mapped(a, b, |x| x as i8 as i16),
            Order::Mbox => cmp_mapped(a, b, |x| MBOX_MAP[x as usize] as i16),
            Order::FlatMbox => cmp_flat(a, b),
        }
    }

    /// The name used in messages.
    pub fn name(self) -> &'static str {
        match self {
            Order::Raw => "raw",
            Order::Signed => "signed",
            Order::Mbox => "mbox",
            Order::FlatMbox => "flat-mbox",
        }
    }

    /// A key that is equal under this order to every key equal to `key`, for hashing: only
    /// [`Order::Mbox`] identifies two different byte strings (TAB and LF both map to 0x01).
    pub(crate) fn canonical<'a>(self, key: &'a [u8]) -> Cow<'a, [u8]> {
        if self == Order::Mbox && key.contains(&b'\n') {
            Cow::Owned(
                key.iter()
                    .map(|&b| if b == b'\n' { b'\t' } else { b })
                    .collect(),
            )
        } else {
            Cow::Borrowed(key)
        }
    }
}

impl fmt::Display for Order {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Compares two keys in `backend`'s Cyrus 3.6 order ([`Backend::default_order`]); sort with
/// this before calling [`write()`].
pub fn compare(backend: Backend, a: &[u8], b: &[u8]) -> Ordering {
    backend.default_order().compare(a, b)
}

/// Checks that keys strictly increase while a file is walked. With a fixed order, any other
/// sequence is an error; without one, the walk may follow any of the orders Cyrus ever used
/// for the backend, as long as one of them holds for the whole file. Strictly increasing keys
/// also guarantee that a corrupt pointer chain cannot loop.
#[derive(Debug, Clone)]
pub(crate) struct OrderCheck {
    candidates: Vec<Order>,
    fixed: bool,
    enabled: bool,
}

impl OrderCheck {
    pub(crate) fn new(fixed: Option<Order>, auto: &[Order]) -> OrderCheck {
        match fixed {
            Some(o) => OrderCheck {
                candidates: vec![o],
                fixed: true,
                enabled: true,
            },
            None => OrderCheck {
                candidates: auto.to_vec(),
                fixed: false,
                enabled: true,
            },
        }
    }

    /// Turns the check off when `unordered` ([`ReadOptions::unordered`]).
    pub(crate) fn unless(mut self, unordered: bool) -> OrderCheck {
        self.enabled = !unordered;
        self
    }

    /// `Err(message)` when `cur` does not follow `prev`.
    pub(crate) fn step(&mut self, prev: &[u8], cur: &[u8]) -> Result<(), String> {
        if !self.enabled
            || self
                .candidates
                .iter()
                .all(|o| o.compare(prev, cur) == Ordering::Less)
        {
            return Ok(());
        }
        let before = self.candidates.clone();
        self.candidates
            .retain(|o| o.compare(prev, cur) == Ordering::Less);
        if self.candidates.is_empty() {
            let names: Vec<&str> = before.iter().map(|o| o.name()).collect();
            return Err(format!(
                "key {} does not sort after the previous key {} in {} order{}",
                show_bytes(cur),
                show_bytes(prev),
                names.join("/"),
                if self.fixed { "" } else { " (any known order)" }
            ));
        }
        Ok(())
    }

    /// The orders consistent with every step so far.
    pub(crate) fn orders(&self) -> &[Order] {
        &self.candidates
    }

    /// The order in which to search for the first key not less than `key`: `Some` when every
    /// order the file may still be in ranks every possible key against `key` the same way
    /// (always once the order is fixed; see [`ranks_alike`]). `None` when the check is off:
    /// keys need not be sorted then.
    pub(crate) fn search_order(&self, key: &[u8]) -> Option<Order> {
        if !self.enabled {
            return None;
        }
        let (&first, rest) = self.candidates.split_first()?;
        rest.iter()
            .all(|&o| ranks_alike(first, o, key))
            .then_some(first)
    }
}

/// Whether `a` and `b` compare every key with `key` alike. Raw, signed and mbox are
/// lexicographic over a per-byte map, so it is enough that they rank every byte alike
/// against each byte of `key` (then the first unequal position and its sign agree). Flat
/// order escapes bytes first and is only alike with itself.
fn ranks_alike(a: Order, b: Order, key: &[u8]) -> bool {
    if a == b {
        return true;
    }
    if a == Order::FlatMbox || b == Order::FlatMbox {
        return false;
    }
    key.iter()
        .all(|&p| (0..=255u8).all(|c| a.compare(&[c], &[p]) == b.compare(&[c], &[p])))
}

/// A short printable form of a key for messages.
pub(crate) fn show_bytes(b: &[u8]) -> String {
    let mut s = String::from("\"");
    for &c in b.iter().take(80) {
        match c {
            b'"' | b'\\' => {
                s.push('\\');
                s.push(c as char);
            }
            0x20..=0x7E => s.push(c as char),
            _ => s.push_str(&format!("\\x{c:02X}")),
        }
    }
    if b.len() > 80 {
        s.push_str("...");
    }
    s.push('"');
    s
}

/// Maps exact-match keys (under an order) to record locations during a log replay.
pub(crate) struct KeyIndex<'a, V> {
    order: Order,
    map: HashMap<Cow<'a, [u8]>, (&'a [u8], V)>,
}

impl<'a, V: Copy> KeyIndex<'a, V> {
    pub(crate) fn new(order: Order) -> Self {
        KeyIndex {
            order,
            map: HashMap::new(),
        }
    }

    pub(crate) fn insert(&mut self, key: &'a [u8], v: V) -> Option<V> {
        self.map
            .insert(self.order.canonical(key), (key, v))
            .map(|(_, old)| old)
    }

    pub(crate) fn get(&self, key: &[u8]) -> Option<V> {
        self.map
            .get(self.order.canonical(key).as_ref())
            .map(|e| e.1)
    }

    pub(crate) fn remove(&mut self, key: &[u8]) -> Option<V> {
        self.map
            .remove(self.order.canonical(key).as_ref())
            .map(|e| e.1)
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// The entries sorted by the order.
    pub(crate) fn into_sorted(self) -> Vec<V> {
        let order = self.order;
        let mut v: Vec<(&[u8], V)> = self.map.into_values().collect();
        v.sort_by(|a, b| order.compare(a.0, b.0));
        v.into_iter().map(|e| e.1).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Memory map
// ---------------------------------------------------------------------------------------------

/// A read-only shared mapping of a whole file. Reading through the page cache keeps memory
/// flat however large the database is, and the skip-list formats need random access. Pages
/// a sequential scan has finished with are handed back ([`Map::release`], [`Behind`]), so
/// the resident set stays a few MiB however large the file is.
pub(crate) struct Map {
    ptr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is read-only and owned by this value; nothing aliases it mutably, so it
// may move to and be read from another thread like a `Box<[u8]>`.
unsafe impl Send for Map {}
// SAFETY: as above; shared access only ever reads.
unsafe impl Sync for Map {}

impl Map {
    pub(crate) fn open(path: &Path) -> Result<Map, DbError> {
        let file = File::open(path).map_err(|e| DbError::io(path, e))?;
        let len = file.metadata().map_err(|e| DbError::io(path, e))?.len();
        let len = usize::try_from(len).map_err(|_| {
            DbError::io(
                path,
                io::Error::new(io::ErrorKind::Unsupported, "file too large to map"),
            )
        })?;
        if len == 0 {
            // mmap(2) refuses empty mappings; an empty slice needs none.
            return Ok(Map {
                ptr: std::ptr::null_mut(),
                len: 0,
            });
        }
        use std::os::unix::io::AsRawFd;
        // SAFETY: we ask for a fresh read-only shared mapping of `len` bytes of an open file
        // descriptor; the kernel chooses the address, and the result is checked against
        // MAP_FAILED before use. The mapping outlives the descriptor, which may be closed.
        // (Shared, like Cyrus' own map_refresh: with PROT_READ nothing is ever written, and
        // MADV_DONTNEED on a shared file mapping is documented to refill from the file.)
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(DbError::io(path, io::Error::last_os_error()));
        }
        Ok(Map { ptr, len })
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `ptr` is a live PROT_READ mapping of exactly `len` bytes owned by `self`
        // (unmapped only in Drop), so the slice is valid for the borrow of `self`. The module
        // documentation states the caller's duty not to modify the file meanwhile.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }
}

impl Map {
    /// Drops this process's page-table references to the whole pages inside
    /// `[from, to)`: they no longer count in its resident set, and the next read of them
    /// faults them in again from the page cache (or the file). The bytes read are the same
    /// either way, so this is only a hint; errors are ignored.
    pub(crate) fn release(&self, from: u64, to: u64) {
        let page = page_size();
        let to = to.min(self.len as u64);
        let from = from.div_ceil(page) * page;
        let to = to / page * page;
        if from >= to {
            return;
        }
        // SAFETY: `[from, to)` is a page-aligned range inside the live mapping of `self`
        // (`ptr` is page-aligned, `to <= len`). The mapping is a PROT_READ MAP_SHARED file
        // mapping: MADV_DONTNEED does not unmap it or change what it contains, it only drops
        // the page-table entries, and a later read refills them from the file's pages, which
        // the module's contract says nobody modifies while the reader is open. Slices
        // borrowed from `self` therefore stay valid and read the same bytes.
        unsafe {
            libc::madvise(
                (self.ptr as *mut u8).add(from as usize) as *mut libc::c_void,
                (to - from) as usize,
                libc::MADV_DONTNEED,
            );
        }
    }
}

fn page_size() -> u64 {
    static PAGE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf has no preconditions.
        let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if n > 0 {
            n as u64
        } else {
            4096
        }
    })
}

/// How much of a sequential run a reader keeps mapped in before handing it back.
const RELEASE_WINDOW: u64 = 4 << 20;

/// Tracks the run of increasing offsets a scan reads and [releases](Map::release) what lies
/// behind it every [`RELEASE_WINDOW`] bytes, so that a scan of a large file keeps a small
/// resident set. A jump backwards or far ahead (a record appended after a repack, a seek)
/// starts a new run: only bytes the scan itself walked over are released, and anything read
/// again is simply faulted in again.
#[derive(Debug, Default)]
pub(crate) struct Behind {
    start: u64,
    end: u64,
}

impl Behind {
    /// `[at, at + len)` has just been read.
    pub(crate) fn read(&mut self, map: &Map, at: u64, len: u64) {
        if at < self.end || at - self.end > RELEASE_WINDOW {
            self.start = at;
        }
        self.end = at.saturating_add(len);
        if at - self.start >= RELEASE_WINDOW {
            map.release(self.start, at);
            self.start = at / page_size() * page_size();
        }
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        if self.len != 0 {
            // SAFETY: `ptr`/`len` are exactly what mmap returned, and no slice borrowed from
            // `self` can outlive this call.
            unsafe {
                libc::munmap(self.ptr, self.len);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Detection and opening
// ---------------------------------------------------------------------------------------------

/// Which backend wrote `path`, as `cyrusdb_detect` decides it (3.6.1:lib/cyrusdb.c:592-616):
/// the first 16 of at least 32 bytes name twoskip or skiplist. Cyrus cannot detect flat files;
/// we call a file flat when it looks like one (no NUL byte, every line in the first 64 KiB has
/// a TAB, and it ends with LF). An empty or unknown file is a [`DbError::Unrecognized`]
/// (an empty file is a valid *empty* flat database: open it with [`open_as`]).
pub fn detect(path: impl AsRef<Path>) -> Result<Backend, DbError> {
    let path = path.as_ref();
    let map = Map::open(path)?;
    detect_bytes(map.bytes()).map_err(|what| DbError::Unrecognized {
        path: path.to_owned(),
        what,
    })
}

pub(crate) fn detect_bytes(b: &[u8]) -> Result<Backend, String> {
    if b.is_empty() {
        return Err(
            "empty file: not a twoskip or skiplist database (an empty file is an empty \
                    flat database only if you say so: open it as flat)"
                .into(),
        );
    }
    if b.len() >= 32 {
        if b[..16] == skiplist::MAGIC[..16] {
            return Ok(Backend::Skiplist);
        }
        if b[..16] == twoskip::MAGIC[..16] {
            return Ok(Backend::Twoskip);
        }
    }
    if b.len() >= 4 && (b[..4] == twoskip::MAGIC[..4]) {
        return Err(format!(
            "truncated twoskip or skiplist file ({} bytes): cyrusdb_detect needs 32",
            b.len()
        ));
    }
    let head = &b[..b.len().min(64 * 1024)];
    let mut lines: Vec<&[u8]> = head.split(|&c| c == b'\n').collect();
    // the piece after the last LF: empty, or a line cut at 64 KiB
    let last = lines.pop().unwrap_or_default();
    let looks_flat = !head.contains(&0)
        && b.last() == Some(&b'\n')
        && if lines.is_empty() {
            last.contains(&b'\t')
        } else {
            lines.iter().all(|l| l.contains(&b'\t'))
        };
    if looks_flat {
        return Ok(Backend::Flat);
    }
    Err(format!(
        "not a twoskip, skiplist or flat database (starts with {})",
        show_bytes(&b[..b.len().min(16)])
    ))
}

/// How to read a file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadOptions {
    /// The comparator the file was written with. `None` accepts any order Cyrus used for the
    /// backend, as long as the whole file follows one of them (twoskip and skiplist:
    /// raw, signed or mbox; flat: not checked), and recovers crashed files with the 3.6
    /// default ([`Backend::default_order`]), as `cyr_dbtool` without `-M` does. Give
    /// `Some(Order::Mbox)` for a 2.3-3.4 `improved_mboxlist_sort` file.
    pub order: Option<Order>,
    /// Accept keys that do not increase, as Cyrus' own `foreach` does (it never checks).
    /// Off by default: out-of-order keys mean corruption and are reported with their offset.
    /// Turn it on to salvage such a file (e.g. with [`copy_recovered`], which then sorts).
    /// Pointer loops are still caught. Twoskip `recovery1` always checks the order, as Cyrus'
    /// does.
    pub unordered: bool,
}

/// What a reader had to do because the file was not cleanly closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovery {
    /// The file was clean; it is read as is.
    None,
    /// The file needed recovery that does not change its committed contents (twoskip
    /// `recovery1`: DIRTY flag or uncommitted bytes after `current_size`; skiplist: stale
    /// `logstart` or stray zero words). The text says what was found.
    Ignored(String),
    /// Recovery changes what a naive pointer walk would see (twoskip `recovery2`, skiplist
    /// uncommitted transaction); the reader replays the log like Cyrus does. The text says
    /// why.
    Replayed(String),
}

/// A reader over any backend. Records come in file order, which for a consistent file is its
/// comparator order.
pub enum DbReader {
    Twoskip(twoskip::Reader),
    Skiplist(skiplist::Reader),
    Flat(flat::Reader),
}

impl fmt::Debug for DbReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DbReader")
            .field("backend", &self.backend())
            .field("recovery", self.recovery())
            .finish()
    }
}

/// Opens `path`, detecting the backend with [`detect`].
pub fn open(path: impl AsRef<Path>) -> Result<DbReader, DbError> {
    open_with(path, None, &ReadOptions::default())
}

/// Opens `path` as `backend`.
pub fn open_as(path: impl AsRef<Path>, backend: Backend) -> Result<DbReader, DbError> {
    open_with(path, Some(backend), &ReadOptions::default())
}

/// Maps `path` and settles its backend (detected from the bytes when `None`).
fn map_as(path: &Path, backend: Option<Backend>) -> Result<(Map, Backend), DbError> {
    let map = Map::open(path)?;
    let backend = match backend {
        Some(b) => b,
        None => detect_bytes(map.bytes()).map_err(|what| DbError::Unrecognized {
            path: path.to_owned(),
            what,
        })?,
    };
    Ok((map, backend))
}

/// Opens `path` as `backend` (detected when `None`) with `options`.
pub fn open_with(
    path: impl AsRef<Path>,
    backend: Option<Backend>,
    options: &ReadOptions,
) -> Result<DbReader, DbError> {
    let path = path.as_ref();
    let (map, backend) = map_as(path, backend)?;
    Ok(match backend {
        Backend::Twoskip => DbReader::Twoskip(twoskip::Reader::from_map(path, map, options)?),
        Backend::Skiplist => DbReader::Skiplist(skiplist::Reader::from_map(path, map, options)?),
        Backend::Flat => DbReader::Flat(flat::Reader::from_map(path, map, options)),
    })
}

impl DbReader {
    /// The backend of the file.
    pub fn backend(&self) -> Backend {
        match self {
            DbReader::Twoskip(_) => Backend::Twoskip,
            DbReader::Skiplist(_) => Backend::Skiplist,
            DbReader::Flat(_) => Backend::Flat,
        }
    }

    /// What the reader did about an unclean file.
    pub fn recovery(&self) -> &Recovery {
        match self {
            DbReader::Twoskip(r) => r.recovery(),
            DbReader::Skiplist(r) => r.recovery(),
            DbReader::Flat(_) => &Recovery::None,
        }
    }

    /// The next `(key, value)`, borrowed from the reader until the next call. `Ok(None)` at
    /// the end. After an error the reader stays at the end.
    pub fn next_record(&mut self) -> Result<Option<Record<'_>>, DbError> {
        match self {
            DbReader::Twoskip(r) => r.next_record(),
            DbReader::Skiplist(r) => r.next_record(),
            DbReader::Flat(r) => r.next_record(),
        }
    }

    /// Skips forward to the first remaining record whose key is not less than `key` in the
    /// file's order, as Cyrus' `foreach` with a prefix starts (twoskip `find_loc`): on a
    /// clean twoskip file it follows the skip-list pointers from the dummy and reads only the
    /// records on that search path, never the pages of the records it skips. The skipped
    /// records are not verified (neither does Cyrus read them); those after it are, as
    /// usual. A crashed twoskip file walks level 0 (recovery has read it all already), a
    /// replayed one searches its index.
    ///
    /// `Ok(false)` leaves the reader where it was: the backend has no such search here
    /// (skiplist, flat), [`ReadOptions::unordered`] is on, or the order is not known yet
    /// and the orders the file may be in rank keys differently against `key` (a key whose
    /// bytes are all `/` or above, such as `N`, ranks alike in twoskip's raw and mbox
    /// orders).
    /// Never moves backwards: when the last record read is already at or past `key` it
    /// does nothing and returns `Ok(true)`.
    pub fn seek(&mut self, key: &[u8]) -> Result<bool, DbError> {
        match self {
            DbReader::Twoskip(r) => r.seek(key),
            DbReader::Skiplist(_) | DbReader::Flat(_) => Ok(false),
        }
    }

    /// Calls `f` on every remaining record until it returns [`ControlFlow::Break`].
    pub fn for_each<F>(&mut self, mut f: F) -> Result<(), DbError>
    where
        F: FnMut(&[u8], &[u8]) -> ControlFlow<()>,
    {
        while let Some((k, v)) = self.next_record()? {
            if f(k, v).is_break() {
                break;
            }
        }
        Ok(())
    }

    /// The orders the keys read so far are consistent with (all of them before the first
    /// record; flat files without [`ReadOptions::order`] report [`Order::FlatMbox`]).
    pub fn orders(&self) -> &[Order] {
        match self {
            DbReader::Twoskip(r) => r.orders(),
            DbReader::Skiplist(r) => r.orders(),
            DbReader::Flat(r) => r.orders(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Key/value listing
// ---------------------------------------------------------------------------------------------

/// Writes `s` the way `prot_printamap` does (3.6.1:lib/prot.c:1379-1411): `""` when empty; a
/// bare atom when every byte is an atom character (not 8-bit, below 0x1F, 0x7F, SP, `{`, `(`,
/// `)`, `"`, `%`, `*`, `\`), it is shorter than 1023 bytes and not `NIL`; a `"quoted string"`
/// when shorter than 1024 bytes with no NUL, CR, LF, 8-bit, `"`, `%` or `\`; otherwise a
/// `{N}\r\n` literal followed by the bytes.
pub fn write_amap(out: &mut impl Write, s: &[u8]) -> io::Result<()> {
    if s.is_empty() {
        return out.write_all(b"\"\"");
    }
    let atom = s.len() <= 1022
        && s != b"NIL"
        && s.iter().all(|&c| {
            !(c & 0x80 != 0
                || c < 0x1F
                || c == 0x7F
                || matches!(c, b' ' | b'{' | b'(' | b')' | b'"' | b'%' | b'*' | b'\\'))
        });
    if atom {
        return out.write_all(s);
    }
    let quoted = s.len() < 1024
        && s.iter().all(|&c| {
            !(c == 0 || c & 0x80 != 0 || matches!(c, b'\r' | b'\n' | b'"' | b'%' | b'\\'))
        });
    if quoted {
        out.write_all(b"\"")?;
        out.write_all(s)?;
        return out.write_all(b"\"");
    }
    write!(out, "{{{}}}\r\n", s.len())?;
    out.write_all(s)
}

/// Writes every remaining record of `reader` exactly as `cyr_dbtool FILE BACKEND batch` prints
/// them for `SHOW ""` (`aprinter_cb`, 3.6.1:imap/cyr_dbtool.c:130-141): `KEY SP VALUE LF`, each
/// through [`write_amap`].
pub fn kv_listing(reader: &mut DbReader, out: &mut impl Write) -> Result<(), DbError> {
    let io_err = |e| DbError::io(Path::new("<kv listing output>"), e);
    while let Some((k, v)) = reader.next_record()? {
        write_amap(out, k).map_err(io_err)?;
        out.write_all(b" ").map_err(io_err)?;
        write_amap(out, v).map_err(io_err)?;
        out.write_all(b"\n").map_err(io_err)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Consistency check
// ---------------------------------------------------------------------------------------------

/// One inconsistency found by [`check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where, when it is about one place in the file.
    pub offset: Option<u64>,
    pub what: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.offset {
            Some(o) => write!(f, "offset {o} (0x{o:X}): {}", self.what),
            None => f.write_str(&self.what),
        }
    }
}

/// The result of [`check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckReport {
    pub backend: Backend,
    /// Live records, as the reader yields them (after recovery).
    pub records: u64,
    /// What opening the file in Cyrus would recover.
    pub recovery: Recovery,
    /// The orders the keys are consistent with.
    pub orders: Vec<Order>,
    /// Inconsistencies. Empty means Cyrus' `consistent` would say "Yes, consistent" (after the
    /// recovery that opening the file runs).
    pub problems: Vec<Problem>,
}

impl CheckReport {
    /// True when there are no [`CheckReport::problems`].
    pub fn is_consistent(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks `path` like `cyr_dbtool FILE BACKEND consistent` (twoskip `myconsistent`: order,
/// every skip level's linkage, record count, CRCs; skiplist `myconsistent`: order and
/// pointers at every level, plus the pointer walk against a log replay; flat: line syntax and
/// order), in the backend's default order unless `options.order` says otherwise. Corruption
/// becomes a [`Problem`]; an `Err` means the file could not be read or recognised at all.
pub fn check(path: impl AsRef<Path>) -> Result<CheckReport, DbError> {
    check_with(path, None, &ReadOptions::default())
}

/// [`check`] with an explicit backend and options.
pub fn check_with(
    path: impl AsRef<Path>,
    backend: Option<Backend>,
    options: &ReadOptions,
) -> Result<CheckReport, DbError> {
    let path = path.as_ref();
    let (map, backend) = map_as(path, backend)?;
    let order = options.order.unwrap_or(backend.default_order());
    let mut problems = Vec::new();
    // Structure first (backend specific), then what a reader yields.
    match backend {
        Backend::Twoskip => twoskip::check_structure(map.bytes(), order, &mut problems),
        Backend::Skiplist => skiplist::check_structure(map.bytes(), order, &mut problems),
        Backend::Flat => {}
    }
    let ropts = ReadOptions {
        order: Some(order),
        unordered: false,
    };
    let mut records = 0u64;
    let (recovery, orders) = match open_with(path, Some(backend), &ropts) {
        Ok(mut reader) => {
            loop {
                match reader.next_record() {
                    Ok(Some(_)) => records += 1,
                    Ok(None) => break,
                    Err(e) => {
                        // the structure check usually found it already
                        if problems.is_empty() {
                            problems.push(Problem {
                                offset: e.offset(),
                                what: error_what(e),
                            });
                        }
                        break;
                    }
                }
            }
            (reader.recovery().clone(), reader.orders().to_vec())
        }
        Err(e) => {
            if problems.is_empty() {
                problems.push(Problem {
                    offset: e.offset(),
                    what: error_what(e),
                });
            }
            (Recovery::None, Vec::new())
        }
    };
    Ok(CheckReport {
        backend,
        records,
        recovery,
        orders,
        problems,
    })
}

fn error_what(e: DbError) -> String {
    match e {
        DbError::Corrupt { what, .. } => what,
        other => other.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------------

/// How writers choose skip-list node levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Levels {
    /// Record *i* (from 1) gets level 1 + trailing zero bits of *i* (capped at the format's
    /// maximum): a perfectly balanced list and reproducible output (formats spec §3.8).
    #[default]
    Deterministic,
    /// Cyrus' own `randlvl` fed by the fixture shim's `rand()` (`tools/cyrfix_shim.c`: a
    /// 64-bit LCG returning `state >> 33`), after discarding `skip` values. With `seed: 1,
    /// skip: 2` this reproduces what `cyr_dbtool` wrote for the fixtures.
    CyrusRand { seed: u64, skip: u32 },
}

/// Options of [`write()`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteOptions {
    /// Replace an existing target (default: refuse with [`DbError::Exists`]).
    pub overwrite: bool,
    /// The order the records come in and the file will use (default: the backend's, see
    /// [`Backend::default_order`]). Use [`Order::Mbox`] to write a 2.3-3.4
    /// `improved_mboxlist_sort` twoskip or skiplist file. Ignored for flat (always
    /// [`Order::FlatMbox`]).
    pub order: Option<Order>,
    /// Node levels of twoskip and skiplist files.
    pub levels: Levels,
    /// The skiplist header's `last_recovery` (default: now). Cyrus recovers, and so rewrites,
    /// a skiplist file whose stamp is older than its `db/skipstamp` when it opens it.
    pub skiplist_timestamp: Option<u32>,
    /// fsync the file and its directory (default on; turn off only for throw-away output).
    pub fsync: bool,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            overwrite: false,
            order: None,
            levels: Levels::Deterministic,
            skiplist_timestamp: None,
            fsync: true,
        }
    }
}

/// What [`write()`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteStats {
    pub records: u64,
    pub bytes: u64,
}

/// The level sequence of [`Levels`].
pub(crate) struct LevelGen {
    kind: Levels,
    count: u64,
    state: u64,
}

/// glibc's RAND_MAX.
const RAND_MAX: i32 = i32::MAX;

impl LevelGen {
    pub(crate) fn new(kind: Levels) -> LevelGen {
        let mut g = LevelGen {
            kind,
            count: 0,
            state: 0,
        };
        if let Levels::CyrusRand { seed, skip } = kind {
            g.state = seed;
            for _ in 0..skip {
                g.rand();
            }
        }
        g
    }

    fn rand(&mut self) -> i32 {
        self.state = self
            .state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.state >> 33) as i32
    }

    /// `(float) rand() / (float) RAND_MAX < PROB`, in single precision like Cyrus.
    fn coin(&mut self) -> bool {
        (self.rand() as f32) / (RAND_MAX as f32) < 0.5
    }

    fn deterministic(&mut self, max: u32) -> u32 {
        self.count += 1;
        (1 + self.count.trailing_zeros()).min(max)
    }

    /// twoskip `randlvl(1, MAXLEVEL)` (3.6.1:lib/cyrusdb_twoskip.c:461-468).
    pub(crate) fn twoskip_level(&mut self) -> u8 {
        match self.kind {
            Levels::Deterministic => self.deterministic(twoskip::MAXLEVEL as u32) as u8,
            Levels::CyrusRand { .. } => {
                let mut lvl = 1u8;
                while self.coin() {
                    lvl += 1;
                    if lvl == twoskip::MAXLEVEL {
                        break;
                    }
                }
                lvl
            }
        }
    }

    /// skiplist `randlvl` (3.6.1:lib/cyrusdb_skiplist.c:1217-1228): the coin is tossed
    /// before the cap is tested.
    pub(crate) fn skiplist_level(&mut self, maxlevel: u32) -> u32 {
        match self.kind {
            Levels::Deterministic => self.deterministic(maxlevel),
            Levels::CyrusRand { .. } => {
                let mut lvl = 1;
                while self.coin() && lvl < maxlevel {
                    lvl += 1;
                }
                lvl
            }
        }
    }
}

/// Records handed to a backend writer, already validated: non-empty keys in strictly
/// increasing order.
pub(crate) trait RecordSource {
    fn next_record(&mut self) -> Result<Option<Record<'_>>, DbError>;
}

struct Input<I> {
    inner: I,
    order: Order,
    index: u64,
    key: Vec<u8>,
    prev: Vec<u8>,
    val: Vec<u8>,
}

impl<I, E> RecordSource for Input<I>
where
    I: Iterator<Item = Result<(Vec<u8>, Vec<u8>), E>>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn next_record(&mut self) -> Result<Option<Record<'_>>, DbError> {
        let Some(item) = self.inner.next() else {
            return Ok(None);
        };
        let (key, val) = item.map_err(|e| DbError::Source {
            index: self.index,
            source: e.into(),
        })?;
        if key.is_empty() {
            return Err(DbError::BadRecord {
                index: self.index,
                what: "empty key (Cyrus asserts keylen > 0)".into(),
            });
        }
        if self.index > 0 {
            let c = self.order.compare(&self.key, &key);
            if c != Ordering::Less {
                return Err(DbError::BadRecord {
                    index: self.index,
                    what: format!(
                        "key {} {} the previous key {} in {} order: sort the records first \
                         (db::compare)",
                        show_bytes(&key),
                        if c == Ordering::Equal {
                            "duplicates"
                        } else {
                            "sorts before"
                        },
                        show_bytes(&self.key),
                        self.order
                    ),
                });
            }
        }
        self.prev = std::mem::replace(&mut self.key, key);
        self.val = val;
        self.index += 1;
        Ok(Some((&self.key, &self.val)))
    }
}

/// An output file written mostly sequentially, with in-place patches of bytes written
/// earlier (skip-list pointers). Recent bytes stay in a buffer, so most patches never touch
/// the file; older ones become positioned writes.
pub(crate) struct PatchWriter<'f> {
    file: &'f File,
    buf: Vec<u8>,
    buf_start: u64,
    path: &'f Path,
}

const PATCH_BUF: usize = 1 << 20;

impl<'f> PatchWriter<'f> {
    pub(crate) fn new(file: &'f File, path: &'f Path) -> Self {
        PatchWriter {
            file,
            buf: Vec::with_capacity(PATCH_BUF + 64 * 1024),
            buf_start: 0,
            path,
        }
    }

    /// The offset of the next appended byte.
    pub(crate) fn end(&self) -> u64 {
        self.buf_start + self.buf.len() as u64
    }

    pub(crate) fn append(&mut self, data: &[u8]) -> Result<(), DbError> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= PATCH_BUF {
            self.flush()?;
        }
        Ok(())
    }

    /// Overwrites bytes at `offset`, which must already have been appended.
    pub(crate) fn patch(&mut self, offset: u64, data: &[u8]) -> Result<(), DbError> {
        debug_assert!(offset + data.len() as u64 <= self.end());
        let mut data = data;
        let mut offset = offset;
        if offset < self.buf_start {
            let n = ((self.buf_start - offset) as usize).min(data.len());
            self.file
                .write_all_at(&data[..n], offset)
                .map_err(|e| DbError::io(self.path, e))?;
            data = &data[n..];
            offset += n as u64;
        }
        if !data.is_empty() {
            let at = (offset - self.buf_start) as usize;
            self.buf[at..at + data.len()].copy_from_slice(data);
        }
        Ok(())
    }

    pub(crate) fn flush(&mut self) -> Result<(), DbError> {
        if !self.buf.is_empty() {
            self.file
                .write_all_at(&self.buf, self.buf_start)
                .map_err(|e| DbError::io(self.path, e))?;
            self.buf_start += self.buf.len() as u64;
            self.buf.clear();
        }
        Ok(())
    }
}

/// Writes `records`, sorted in the target order (see [`WriteOptions::order`]; [`compare`]
/// sorts in the default order), as a `backend` database at `path`.
///
/// The database is built in a temporary file in the same directory, fsynced, and renamed into
/// place (or hard-linked, when not overwriting, so an existing file is never replaced), and
/// the directory is fsynced: a crash leaves the old file or the new one, never a mix. On any
/// error, including an error from the iterator or an unsorted record, the temporary file is
/// removed and `path` is untouched. Values are streamed; memory does not grow with the number
/// of records.
pub fn write<I, E>(
    path: impl AsRef<Path>,
    backend: Backend,
    records: I,
    options: &WriteOptions,
) -> Result<WriteStats, DbError>
where
    I: IntoIterator<Item = Result<(Vec<u8>, Vec<u8>), E>>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let order = match backend {
        Backend::Flat => Order::FlatMbox,
        _ => options.order.unwrap_or(backend.default_order()),
    };
    let mut input = Input {
        inner: records.into_iter(),
        order,
        index: 0,
        key: Vec::new(),
        prev: Vec::new(),
        val: Vec::new(),
    };
    write_source(path.as_ref(), backend, &mut input, options)
}

/// Removes the temporary file unless disarmed.
struct TempGuard<'a> {
    path: &'a Path,
    armed: bool,
}

impl Drop for TempGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = fs::remove_file(self.path);
        }
    }
}

fn write_source(
    path: &Path,
    backend: Backend,
    src: &mut dyn RecordSource,
    options: &WriteOptions,
) -> Result<WriteStats, DbError> {
    if !options.overwrite && fs::symlink_metadata(path).is_ok() {
        return Err(DbError::Exists {
            path: path.to_owned(),
        });
    }
    let file_name = path.file_name().ok_or_else(|| {
        DbError::io(
            path,
            io::Error::new(io::ErrorKind::InvalidInput, "not a file name"),
        )
    })?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".mupdate-tmp.{}.{stamp}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&tmp)
        .map_err(|e| DbError::io(&tmp, e))?;
    let mut guard = TempGuard {
        path: &tmp,
        armed: true,
    };
    let records = {
        let mut out = PatchWriter::new(&file, &tmp);
        let n = match backend {
            Backend::Twoskip => twoskip::write_sorted(&mut out, src, options)?,
            Backend::Skiplist => skiplist::write_sorted(&mut out, src, options)?,
            Backend::Flat => flat::write_sorted(&mut out, src)?,
        };
        out.flush()?;
        n
    };
    let bytes = file.metadata().map_err(|e| DbError::io(&tmp, e))?.len();
    if options.fsync {
        file.sync_all().map_err(|e| DbError::io(&tmp, e))?;
    }
    drop(file);
    if options.overwrite {
        fs::rename(&tmp, path).map_err(|e| DbError::io(path, e))?;
    } else {
        match fs::hard_link(&tmp, path) {
            Ok(()) => {
                let _ = fs::remove_file(&tmp);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(DbError::Exists {
                    path: path.to_owned(),
                })
            }
            // File systems without hard links: check, then rename (racy only against a
            // concurrent creator of the same name).
            Err(_) => {
                if fs::symlink_metadata(path).is_ok() {
                    return Err(DbError::Exists {
                        path: path.to_owned(),
                    });
                }
                fs::rename(&tmp, path).map_err(|e| DbError::io(path, e))?;
            }
        }
    }
    guard.armed = false;
    if options.fsync {
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| DbError::io(&dir, e))?;
    }
    Ok(WriteStats { records, bytes })
}

/// Reads `src` the way Cyrus would after recovery and writes a clean copy to `dst` as
/// `backend` (the source's when `None`): the repair step of `mboxlist check --repair OUT`.
///
/// When the source's records already come in the target order (the normal case) this
/// streams; otherwise (another backend's order, or a file in a non-default order) it sorts
/// the records in memory first.
pub fn copy_recovered(
    src: impl AsRef<Path>,
    dst: impl AsRef<Path>,
    backend: Option<Backend>,
    read: &ReadOptions,
    options: &WriteOptions,
) -> Result<WriteStats, DbError> {
    let src = src.as_ref();
    let mut reader = open_with(src, None, read)?;
    let target = backend.unwrap_or(reader.backend());
    let order = match target {
        Backend::Flat => Order::FlatMbox,
        _ => options.order.unwrap_or(target.default_order()),
    };
    // First pass: is the source already in the target order?
    let mut sorted = true;
    let mut prev: Vec<u8> = Vec::new();
    let mut first = true;
    while let Some((k, _)) = reader.next_record()? {
        if !first && order.compare(&prev, k) != Ordering::Less {
            sorted = false;
            break;
        }
        first = false;
        prev.clear();
        prev.extend_from_slice(k);
    }
    let mut reader = open_with(src, Some(reader.backend()), read)?;
    if sorted {
        struct FromReader<'r>(&'r mut DbReader);
        impl RecordSource for FromReader<'_> {
            fn next_record(&mut self) -> Result<Option<Record<'_>>, DbError> {
                self.0.next_record()
            }
        }
        write_source(dst.as_ref(), target, &mut FromReader(&mut reader), options)
    } else {
        let mut all = Vec::new();
        while let Some((k, v)) = reader.next_record()? {
            all.push((k.to_vec(), v.to_vec()));
        }
        all.sort_by(|a, b| order.compare(&a.0, &b.0));
        all.dedup_by(|b, a| order.compare(&a.0, &b.0) == Ordering::Equal);
        let opts = WriteOptions {
            order: Some(order),
            ..options.clone()
        };
        write(
            dst,
            target,
            all.into_iter().map(Ok::<_, std::convert::Infallible>),
            &opts,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders() {
        assert_eq!(
            Order::Raw.compare(b"user.bob-x", b"user.bob.x"),
            Ordering::Less
        );
        assert_eq!(
            Order::Mbox.compare(b"user.bob-x", b"user.bob.x"),
            Ordering::Greater
        );
        assert_eq!(Order::Signed.compare(b"a\xE9", b"aE"), Ordering::Less);
        assert_eq!(Order::Raw.compare(b"a\xE9", b"aE"), Ordering::Greater);
        assert_eq!(Order::Raw.compare(b"ab", b"abc"), Ordering::Less);
        assert_eq!(Order::Signed.compare(b"ab", b"abc"), Ordering::Less);
        assert_eq!(Order::Mbox.compare(b"ab", b"ab."), Ordering::Less);
        assert_eq!(Order::Mbox.compare(b"a\tb", b"a\nb"), Ordering::Equal);
        assert_eq!(
            Order::Mbox.compare(b"example.com!x", b"example-x.org!x"),
            Ordering::Less
        );
        // flat escapes NUL to FF 80, so it sorts after every plain byte
        assert_eq!(Order::FlatMbox.compare(b"a\0", b"a~"), Ordering::Greater);
        assert_eq!(Order::Mbox.compare(b"a\0", b"a~"), Ordering::Less);
        assert_eq!(Order::FlatMbox.compare(b"a\n", b"a\t"), Ordering::Greater);
        assert_eq!(Order::FlatMbox.compare(b"a", b"a\x01"), Ordering::Less);
    }

    #[test]
    fn amap() {
        let show = |s: &[u8]| {
            let mut v = Vec::new();
            write_amap(&mut v, s).unwrap();
            v
        };
        assert_eq!(show(b""), b"\"\"");
        assert_eq!(show(b"abc\x1F"), b"abc\x1F");
        assert_eq!(show(b"NIL"), b"\"NIL\"");
        assert_eq!(show(b"a b\t"), b"\"a b\t\"");
        assert_eq!(show(b"a\x1Db"), b"\"a\x1Db\"");
        assert_eq!(show(b"a\"b"), b"{3}\r\na\"b");
        assert_eq!(show(&[b'a'; 1022]), vec![b'a'; 1022]);
        let mut q = vec![b'"'];
        q.extend_from_slice(&[b'a'; 1023]);
        q.push(b'"');
        assert_eq!(show(&[b'a'; 1023]), q);
        let mut l = b"{1024}\r\n".to_vec();
        l.extend_from_slice(&[b'a'; 1024]);
        assert_eq!(show(&[b'a'; 1024]), l);
    }

    #[test]
    fn backend_names() {
        for b in [Backend::Twoskip, Backend::Skiplist, Backend::Flat] {
            assert_eq!(b.to_string().parse::<Backend>().unwrap(), b);
        }
        assert!("berkeley".parse::<Backend>().is_err());
    }

    #[test]
    fn detection() {
        assert!(detect_bytes(b"").is_err());
        assert_eq!(detect_bytes(b"k\tv\nk2\tv2\n"), Ok(Backend::Flat));
        assert!(detect_bytes(b"just text\n").is_err());
        assert!(detect_bytes(&twoskip::MAGIC[..]).is_err());
    }

    #[test]
    fn lcg_matches_shim() {
        // state = 1 * a + c; first output is state >> 33
        let mut g = LevelGen::new(Levels::CyrusRand { seed: 1, skip: 0 });
        let s = 6364136223846793005u64.wrapping_add(1442695040888963407);
        assert_eq!(g.rand(), (s >> 33) as i32);
    }
}
