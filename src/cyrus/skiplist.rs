//! The skiplist format (`3.6.1:lib/cyrusdb_skiplist.c`, formats spec §4): a 48-byte header, a
//! DUMMY node, the INORDER nodes of the last checkpoint, then a log of ADD/DELETE nodes closed
//! by COMMIT words. There are no checksums, all integers are big-endian u32, and a node's
//! level is the number of pointer words before its 0xFFFFFFFF terminator.
//!
//! # Reading
//!
//! A transaction rewrites committed nodes' pointers in place *before* its COMMIT is written,
//! so after a crash the pointer graph already contains uncommitted nodes (formats spec §4.5).
//! The reader therefore first scans the file physically the way Cyrus' `recovery()` does
//! (INORDER run, then the log, looking ahead for each transaction's COMMIT; constant memory).
//! When every transaction is complete it walks level 0 (streaming, keys verified to increase).
//! When there is an uncommitted tail (or a damaged node that recovery would truncate at), it
//! replays the INORDER run and the committed log into an in-memory index of node offsets,
//! exactly as `recovery()` rebuilds the list, and yields the records sorted by the recovery
//! comparator (signed unless [`ReadOptions::order`] says otherwise). That is the only case
//! whose memory grows with the number of records; Cyrus itself rewrites the file then.
//!
//! # Writing
//!
//! The writer ([`db::write()`]) writes what Cyrus writes for one transaction of in-order inserts into a
//! fresh file: header (curlevel = highest level, listsize 0, logstart 144), dummy, ADD nodes
//! with their pointers stitched, one COMMIT (formats spec §4.6). When the log grows past
//! Cyrus' checkpoint threshold (2 × logstart + 16834 bytes) Cyrus checkpoints at commit; the
//! writer then produces the checkpointed file instead (the same nodes as INORDER, listsize =
//! count, logstart = end of file, no COMMIT), which is byte-for-byte what that checkpoint
//! writes. Node levels come from [`Levels`](super::db::Levels); with Cyrus' random sequence the
//! output is byte-identical to Cyrus'.
use std::path::{Path, PathBuf};

use super::db::{
    self, Backend, Bad, DbError, KeyIndex, LevelGen, Map, Order, OrderCheck, PatchWriter, Problem,
    ReadOptions, Record, RecordSource, Recovery, WriteOptions,
};

/// The 20-byte magic at offset 0: `\241\002\213\015skiplist file\0\0\0`.
pub const MAGIC: [u8; 20] = *b"\xA1\x02\x8B\x0Dskiplist file\0\0\0";
pub const VERSION: u32 = 1;
pub const VERSION_MINOR: u32 = 2;
/// The highest level Cyrus accepts (and the dummy's level).
pub const MAXLEVEL: u32 = 20;
pub const HEADER_SIZE: u64 = 48;
/// Where the dummy starts.
pub const DUMMY_OFFSET: u64 = HEADER_SIZE;
/// Header + dummy with 20 levels: where the first node of a new file goes.
pub const LOGSTART: u64 = DUMMY_OFFSET + 4 * (3 + MAXLEVEL as u64 + 1);
/// Checkpoint when the log ends past `2 * logstart + MINREWRITE`.
pub const MINREWRITE: u64 = 16834;

pub const INORDER: u32 = 1;
pub const ADD: u32 = 2;
pub const DELETE: u32 = 4;
pub const COMMIT: u32 = 255;
pub const DUMMY: u32 = 257;
const TERMINATOR: u32 = u32::MAX;

/// The file header (formats spec §4.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub version_minor: u32,
    pub maxlevel: u32,
    pub curlevel: u32,
    /// Only maintained by checkpoint and recovery: not the number of records.
    pub listsize: u32,
    pub logstart: u32,
    pub last_recovery: u32,
}

fn be32(b: &[u8], at: u64) -> u32 {
    let at = at as usize;
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// The u32 at `at`, when it is inside the file.
fn word(b: &[u8], at: u64) -> Option<u32> {
    (at.checked_add(4)? <= b.len() as u64).then(|| be32(b, at))
}

impl Header {
    /// `read_header`: magic, version 1.x, levels, and the dummy node.
    pub(crate) fn parse(b: &[u8]) -> Result<Header, Bad> {
        if b.len() < HEADER_SIZE as usize {
            return Err(Bad::new(
                0,
                format!(
                    "file of {} bytes is shorter than the 48-byte header",
                    b.len()
                ),
            ));
        }
        if b[..20] != MAGIC {
            return Err(Bad::new(0, "bad skiplist magic"));
        }
        let h = Header {
            version: be32(b, 20),
            version_minor: be32(b, 24),
            maxlevel: be32(b, 28),
            curlevel: be32(b, 32),
            listsize: be32(b, 36),
            logstart: be32(b, 40),
            last_recovery: be32(b, 44),
        };
        if h.version != VERSION {
            return Err(Bad::new(
                20,
                format!("unsupported version {}.{}", h.version, h.version_minor),
            ));
        }
        if h.maxlevel > MAXLEVEL {
            return Err(Bad::new(
                28,
                format!("maxlevel {} above {MAXLEVEL}", h.maxlevel),
            ));
        }
        if h.curlevel > h.maxlevel {
            return Err(Bad::new(
                32,
                format!("curlevel {} above maxlevel {}", h.curlevel, h.maxlevel),
            ));
        }
        let d = read_node(b, DUMMY_OFFSET)?;
        if d.rtype != DUMMY || d.keylen != 0 || d.datalen != 0 {
            return Err(Bad::new(
                DUMMY_OFFSET,
                "the first node is not an empty DUMMY",
            ));
        }
        if d.level != h.maxlevel {
            return Err(Bad::new(
                DUMMY_OFFSET,
                format!("DUMMY level {} != maxlevel {}", d.level, h.maxlevel),
            ));
        }
        Ok(h)
    }

    /// The 48 header bytes.
    pub fn encode(&self) -> [u8; 48] {
        let mut b = [0u8; 48];
        b[..20].copy_from_slice(&MAGIC);
        for (i, v) in [
            self.version,
            self.version_minor,
            self.maxlevel,
            self.curlevel,
            self.listsize,
            self.logstart,
            self.last_recovery,
        ]
        .into_iter()
        .enumerate()
        {
            b[20 + 4 * i..24 + 4 * i].copy_from_slice(&v.to_be_bytes());
        }
        b
    }

    fn dummy_end(&self) -> u64 {
        DUMMY_OFFSET + 4 * (3 + self.maxlevel as u64 + 1)
    }
}

fn roundup4(n: u64) -> u64 {
    (n + 3) & !3
}

/// A DUMMY, INORDER or ADD node.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Node {
    pub offset: u64,
    pub rtype: u32,
    pub keylen: u64,
    pub key_off: u64,
    pub datalen: u64,
    pub data_off: u64,
    pub ptr_off: u64,
    pub level: u32,
    pub size: u64,
}

impl Node {
    fn key<'m>(&self, m: &'m [u8]) -> &'m [u8] {
        &m[self.key_off as usize..(self.key_off + self.keylen) as usize]
    }
    fn forward(&self, m: &[u8], i: u32) -> u64 {
        be32(m, self.ptr_off + 4 * i as u64) as u64
    }
}

fn type_name(t: u32) -> String {
    match t {
        INORDER => "INORDER".into(),
        ADD => "ADD".into(),
        DELETE => "DELETE".into(),
        COMMIT => "COMMIT".into(),
        DUMMY => "DUMMY".into(),
        other => format!("unknown type {other}"),
    }
}

/// Parses the node at `offset` (`LEVEL_safe`/`RECSIZE_safe`), every byte inside the file.
pub(crate) fn read_node(m: &[u8], offset: u64) -> Result<Node, Bad> {
    let past = |what: &str| Bad::new(offset, format!("{what} runs past the end of the file"));
    let rtype = word(m, offset).ok_or_else(|| past("node type"))?;
    let keylen = word(m, offset + 4).ok_or_else(|| past("key length"))? as u64;
    let key_off = offset + 8;
    let dl_at = key_off + roundup4(keylen);
    let datalen = word(m, dl_at).ok_or_else(|| past("key"))? as u64;
    let data_off = dl_at + 4;
    let ptr_off = data_off + roundup4(datalen);
    let mut level = 0u32;
    loop {
        let w = word(m, ptr_off + 4 * level as u64).ok_or_else(|| past("node"))?;
        if w == TERMINATOR {
            break;
        }
        level += 1;
        if level > MAXLEVEL {
            return Err(Bad::new(
                offset,
                format!(
                    "{} node has no 0xFFFFFFFF within {MAXLEVEL} pointers",
                    type_name(rtype)
                ),
            ));
        }
    }
    if level == 0 {
        return Err(Bad::new(
            offset,
            format!("{} node without forward pointers", type_name(rtype)),
        ));
    }
    Ok(Node {
        offset,
        rtype,
        keylen,
        key_off,
        datalen,
        data_off,
        ptr_off,
        level,
        size: ptr_off + 4 * (level as u64 + 1) - offset,
    })
}

/// `RECSIZE_safe`: the size of any record, `None` where Cyrus would get 0.
fn rec_size(m: &[u8], offset: u64) -> Option<u64> {
    match word(m, offset)? {
        DUMMY | INORDER | ADD => read_node(m, offset).ok().map(|n| n.size),
        DELETE => (offset + 8 <= m.len() as u64).then_some(8),
        COMMIT => Some(4),
        _ => None,
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    offset: u64,
    key: (usize, usize),
    val: (usize, usize),
}

impl Entry {
    fn of(n: &Node) -> Entry {
        Entry {
            offset: n.offset,
            key: (n.key_off as usize, n.keylen as usize),
            val: (n.data_off as usize, n.datalen as usize),
        }
    }
}

/// What the physical scan of `recovery()` found.
#[derive(Debug, Default)]
struct Scan {
    /// Where recovery truncates the file (its size when nothing is cut).
    committed_end: u64,
    /// End of the INORDER run.
    inorder_end: u64,
    zero_words: bool,
    /// Why the file is cut at `committed_end`, if it is.
    cut: Option<String>,
}

/// Emulates `recovery()` (3.6.1:lib/cyrusdb_skiplist.c:2020-2437) over the file: the INORDER
/// run, then the log replayed transaction by transaction. With an index, ADDs insert or
/// replace and DELETEs unlink; without, only the structure is established. Errors are what
/// makes Cyrus' recovery fail.
fn replay<'m>(
    m: &'m [u8],
    h: &Header,
    order: Order,
    strict: bool,
    mut index: Option<&mut KeyIndex<'m, Entry>>,
) -> Result<Scan, Bad> {
    let size = m.len() as u64;
    let mut filesize = size;
    let mut scan = Scan::default();
    let mut offset = h.dummy_end();
    let mut prev: Option<Node> = None;
    while offset < filesize && word(m, offset) == Some(INORDER) {
        let n = match read_node(m, offset) {
            Ok(n) => n,
            Err(b) => {
                scan.cut = Some(format!("damaged INORDER node at {offset}: {}", b.what));
                filesize = offset;
                break;
            }
        };
        // Only a rebuild depends on the order (the scan alone serves any order).
        if let (Some(p), true) = (&prev, strict && index.is_some()) {
            if order.compare(p.key(m), n.key(m)) != std::cmp::Ordering::Less {
                return Err(Bad::new(
                    offset,
                    format!(
                        "INORDER key {} does not sort after {} in {order} order (give \
                         ReadOptions::order the order the file was written in)",
                        db::show_bytes(n.key(m)),
                        db::show_bytes(p.key(m))
                    ),
                ));
            }
        }
        if let Some(ix) = index.as_deref_mut() {
            ix.insert(n.key(m), Entry::of(&n));
        }
        prev = Some(n);
        offset += n.size;
    }
    scan.inorder_end = offset;
    // The COMMIT that closes the transaction containing every offset below it.
    let mut commit_at = 0u64;
    while offset < filesize {
        if word(m, offset) == Some(0) {
            scan.zero_words = true;
            while offset < filesize && word(m, offset) == Some(0) {
                offset += 4;
            }
            if offset >= filesize {
                return Err(Bad::new(offset, "the log ends in zero words"));
            }
        }
        let Some(t) = word(m, offset) else {
            scan.cut = Some(format!("{} stray bytes at the end", filesize - offset));
            filesize = offset;
            break;
        };
        if t == COMMIT {
            offset += 4;
            continue;
        }
        if t != ADD && t != DELETE {
            // Cyrus' recovery fails here, but not before truncating the file at this offset;
            // `cyrusdb_open` then retries, and the second recovery succeeds on the shorter
            // file (3.6.1:lib/cyrusdb.c:150-185). The net effect is a cut.
            scan.cut = Some(format!(
                "{} node at {offset} where a transaction should start: recovery truncates here",
                type_name(t)
            ));
            filesize = offset;
            break;
        }
        if offset >= commit_at {
            // Look ahead for this transaction's COMMIT.
            let mut p = offset;
            let mut found = None;
            while let Some(s) = rec_size(m, p) {
                p += s;
                if p >= filesize {
                    break;
                }
                if word(m, p) == Some(COMMIT) {
                    found = Some(p);
                    break;
                }
            }
            match found {
                Some(c) => commit_at = c,
                None => {
                    scan.cut = Some(format!(
                        "uncommitted transaction at {offset} ({} bytes) not replayed",
                        filesize - offset
                    ));
                    filesize = offset;
                    break;
                }
            }
        }
        if t == ADD {
            let n = read_node(m, offset)?;
            if let Some(ix) = index.as_deref_mut() {
                ix.insert(n.key(m), Entry::of(&n));
            }
            offset += n.size;
        } else {
            let target = be32(m, offset + 4) as u64;
            let tkeylen = word(m, target + 4).ok_or_else(|| {
                Bad::new(
                    offset,
                    format!("DELETE of offset {target} outside the file"),
                )
            })? as u64;
            if target + 8 + tkeylen > size {
                return Err(Bad::new(
                    offset,
                    format!("DELETE of offset {target}: its key runs past the end of the file"),
                ));
            }
            let tkey = &m[(target + 8) as usize..(target + 8 + tkeylen) as usize];
            if let Some(ix) = index.as_deref_mut() {
                // Cyrus unlinks only when the live node of that key is the one named.
                if ix.get(tkey).is_some_and(|e| e.offset == target) {
                    ix.remove(tkey);
                }
            }
            offset += 8;
        }
    }
    scan.committed_end = filesize;
    Ok(scan)
}

enum State {
    Walk { next: u64 },
    Replay { entries: Vec<Entry>, pos: usize },
    Done,
}

/// A streaming skiplist reader; see the module documentation.
pub struct Reader {
    path: PathBuf,
    map: Map,
    header: Header,
    recovery: Recovery,
    state: State,
    check: OrderCheck,
    prev: Option<(usize, usize)>,
    steps: u64,
    max_steps: u64,
}

impl Reader {
    /// Opens `path` as a skiplist file.
    pub fn open(path: impl AsRef<Path>, options: &ReadOptions) -> Result<Reader, DbError> {
        let path = path.as_ref();
        Reader::from_map(path, Map::open(path)?, options)
    }

    pub(crate) fn from_map(
        path: &Path,
        map: Map,
        options: &ReadOptions,
    ) -> Result<Reader, DbError> {
        let err = |b: Bad| b.into_error(path, Backend::Skiplist);
        let m = map.bytes();
        let header = Header::parse(m).map_err(err)?;
        let order = options.order.unwrap_or(Order::Signed);
        let scan = replay(m, &header, order, false, None).map_err(err)?;
        let dummy = read_node(m, DUMMY_OFFSET).map_err(err)?;
        let mut notes = Vec::new();
        if scan.inorder_end != header.logstart as u64 {
            notes.push(format!(
                "logstart {} should be {}",
                header.logstart, scan.inorder_end
            ));
        }
        if scan.zero_words {
            notes.push("zero words in the log are skipped".to_string());
        }
        let mut reader = Reader {
            path: path.to_owned(),
            recovery: Recovery::None,
            state: State::Walk {
                next: dummy.forward(m, 0),
            },
            check: OrderCheck::new(options.order, &[Order::Signed, Order::Mbox, Order::Raw])
                .unless(options.unordered),
            prev: None,
            steps: 0,
            max_steps: m.len() as u64 / 16 + 2,
            header,
            map,
        };
        if let Some(cut) = scan.cut {
            notes.push(cut);
            let m = reader.map.bytes();
            let mut index = KeyIndex::new(order);
            replay(
                m,
                &reader.header,
                order,
                !options.unordered,
                Some(&mut index),
            )
            .map_err(err)?;
            let entries = index.into_sorted();
            notes.push(format!("{} records replayed", entries.len()));
            reader.recovery = Recovery::Replayed(notes.join("; "));
            reader.check = OrderCheck::new(Some(order), &[]).unless(options.unordered);
            reader.state = State::Replay { entries, pos: 0 };
        } else if !notes.is_empty() {
            reader.recovery = Recovery::Ignored(notes.join("; "));
        }
        Ok(reader)
    }

    /// The header as read.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// What was done about an unclean file.
    pub fn recovery(&self) -> &Recovery {
        &self.recovery
    }

    /// The orders the keys so far are consistent with.
    pub fn orders(&self) -> &[Order] {
        self.check.orders()
    }

    /// The next record in key order; see [`db::DbReader::next_record`].
    pub fn next_record(&mut self) -> Result<Option<Record<'_>>, DbError> {
        match self.advance() {
            Ok(Some(e)) => {
                let m = self.map.bytes();
                Ok(Some((
                    &m[e.key.0..e.key.0 + e.key.1],
                    &m[e.val.0..e.val.0 + e.val.1],
                )))
            }
            Ok(None) => {
                self.state = State::Done;
                Ok(None)
            }
            Err(b) => {
                self.state = State::Done;
                Err(b.into_error(&self.path, Backend::Skiplist))
            }
        }
    }

    fn advance(&mut self) -> Result<Option<Entry>, Bad> {
        let m = self.map.bytes();
        let entry = match &mut self.state {
            State::Done => return Ok(None),
            State::Replay { entries, pos } => match entries.get(*pos) {
                None => return Ok(None),
                Some(e) => {
                    *pos += 1;
                    *e
                }
            },
            State::Walk { next } => {
                if *next == 0 {
                    return Ok(None);
                }
                self.steps += 1;
                if self.steps > self.max_steps {
                    return Err(Bad::new(*next, "level-0 pointers loop"));
                }
                let n = read_node(m, *next)?;
                if n.rtype != INORDER && n.rtype != ADD {
                    return Err(Bad::new(
                        n.offset,
                        format!(
                            "a level-0 pointer leads to a {} node, not INORDER or ADD",
                            type_name(n.rtype)
                        ),
                    ));
                }
                if n.keylen == 0 {
                    return Err(Bad::new(n.offset, "node with an empty key"));
                }
                *next = n.forward(m, 0);
                Entry::of(&n)
            }
        };
        let key = &m[entry.key.0..entry.key.0 + entry.key.1];
        if let Some((p, l)) = self.prev {
            self.check
                .step(&m[p..p + l], key)
                .map_err(|msg| Bad::new(entry.offset, msg))?;
        }
        self.prev = Some(entry.key);
        Ok(Some(entry))
    }
}

// ---------------------------------------------------------------------------------------------
// Consistency
// ---------------------------------------------------------------------------------------------

/// `myconsistent` (3.6.1:lib/cyrusdb_skiplist.c:1970-2017): along level 0, every pointer of
/// every node stays inside the file and leads to a greater key. For a file without an
/// uncommitted tail, also compares the level-0 walk with the log replay (they must list the
/// same nodes).
pub(crate) fn check_structure(m: &[u8], order: Order, problems: &mut Vec<Problem>) {
    let mut bad = |b: Bad| {
        problems.push(Problem {
            offset: Some(b.offset),
            what: b.what,
        })
    };
    let h = match Header::parse(m) {
        Ok(h) => h,
        Err(b) => return bad(b),
    };
    let mut index = KeyIndex::new(order);
    let scan = match replay(m, &h, order, true, Some(&mut index)) {
        Ok(s) => s,
        Err(b) => return bad(b),
    };
    if scan.cut.is_some() {
        // Cyrus recovers first; the reader checks the recovered contents.
        return;
    }
    let replayed: Vec<u64> = index.into_sorted().iter().map(|e| e.offset).collect();
    let dummy = match read_node(m, DUMMY_OFFSET) {
        Ok(d) => d,
        Err(b) => return bad(b),
    };
    let mut walked = Vec::new();
    let mut offset = dummy.forward(m, 0);
    let max = m.len() as u64 / 16 + 2;
    while offset != 0 {
        if walked.len() as u64 > max {
            return bad(Bad::new(offset, "level-0 pointers loop"));
        }
        let n = match read_node(m, offset) {
            Ok(n) => n,
            Err(b) => return bad(b),
        };
        for i in 0..n.level {
            let f = n.forward(m, i);
            if f > m.len() as u64 {
                return bad(Bad::new(
                    n.offset,
                    format!("pointer {i} is {f:04X}, past the end of the file"),
                ));
            }
            if f != 0 {
                let q = match read_node(m, f) {
                    Ok(q) => q,
                    Err(b) => return bad(b),
                };
                if order.compare(n.key(m), q.key(m)) != std::cmp::Ordering::Less {
                    return bad(Bad::new(
                        n.offset,
                        format!(
                            "pointer {i} leads to {f:04X} whose key {} does not sort after {} \
                             ({order} order)",
                            db::show_bytes(q.key(m)),
                            db::show_bytes(n.key(m))
                        ),
                    ));
                }
            }
        }
        walked.push(n.offset);
        offset = n.forward(m, 0);
    }
    if walked != replayed {
        let k = walked
            .iter()
            .zip(&replayed)
            .position(|(a, b)| a != b)
            .unwrap_or(walked.len().min(replayed.len()));
        bad(Bad::new(
            walked.get(k).or(replayed.get(k)).copied().unwrap_or(0),
            format!(
                "the level-0 walk ({} nodes) and the log replay ({} nodes) differ at node {k}",
                walked.len(),
                replayed.len()
            ),
        ));
    }
}

// ---------------------------------------------------------------------------------------------
// Writer
// ---------------------------------------------------------------------------------------------

/// Writes the sorted records of `src` as Cyrus' single transaction into a fresh file (or the
/// checkpoint Cyrus makes of it); see the module documentation.
pub(crate) fn write_sorted(
    out: &mut PatchWriter<'_>,
    src: &mut dyn RecordSource,
    options: &WriteOptions,
) -> Result<u64, DbError> {
    let stamp = options.skiplist_timestamp.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as u32)
            .unwrap_or(0)
    });
    let mut levels = LevelGen::new(options.levels);
    let mut header = Header {
        version: VERSION,
        version_minor: VERSION_MINOR,
        maxlevel: MAXLEVEL,
        curlevel: 1,
        listsize: 0,
        logstart: LOGSTART as u32,
        last_recovery: stamp,
    };
    out.append(&header.encode())?;
    let mut dummy = Vec::with_capacity(96);
    dummy.extend_from_slice(&DUMMY.to_be_bytes());
    dummy.extend_from_slice(&[0u8; 8 + 4 * MAXLEVEL as usize]);
    dummy.extend_from_slice(&TERMINATOR.to_be_bytes());
    out.append(&dummy)?;
    debug_assert_eq!(out.end(), LOGSTART);
    // Where each level's predecessor keeps its pointer word.
    let mut pred_ptr: [u64; MAXLEVEL as usize] =
        std::array::from_fn(|i| DUMMY_OFFSET + 12 + 4 * i as u64);
    let threshold = 2 * LOGSTART + MINREWRITE;
    // Offsets of the ADD nodes written before deciding to checkpoint.
    let mut adds: Vec<u64> = Vec::new();
    let mut checkpoint = false;
    let mut n = 0u64;
    const ZEROS: [u8; 4] = [0; 4];
    while let Some((key, val)) = src.next_record()? {
        let lvl = levels.skiplist_level(MAXLEVEL);
        header.curlevel = header.curlevel.max(lvl);
        let off = out.end();
        let klen = key.len() as u64;
        let dlen = val.len() as u64;
        let size = 8 + roundup4(klen) + 4 + roundup4(dlen) + 4 * (lvl as u64 + 1);
        if klen > u32::MAX as u64 || dlen > u32::MAX as u64 || off + size + 4 > u32::MAX as u64 {
            return Err(DbError::BadRecord {
                index: n,
                what: "skiplist files use 32-bit offsets and are limited to 4 GiB".into(),
            });
        }
        let rtype = if checkpoint { INORDER } else { ADD };
        out.append(&rtype.to_be_bytes())?;
        out.append(&(klen as u32).to_be_bytes())?;
        out.append(key)?;
        out.append(&ZEROS[..(roundup4(klen) - klen) as usize])?;
        out.append(&(dlen as u32).to_be_bytes())?;
        out.append(val)?;
        out.append(&ZEROS[..(roundup4(dlen) - dlen) as usize])?;
        let ptrs = out.end();
        for _ in 0..lvl {
            out.append(&ZEROS)?;
        }
        out.append(&TERMINATOR.to_be_bytes())?;
        for (i, p) in pred_ptr.iter_mut().enumerate().take(lvl as usize) {
            out.patch(*p, &(off as u32).to_be_bytes())?;
            *p = ptrs + 4 * i as u64;
        }
        n += 1;
        if !checkpoint {
            adds.push(off);
            if out.end() > threshold {
                // Cyrus' commit will checkpoint: same nodes, typed INORDER.
                for &a in &adds {
                    out.patch(a, &INORDER.to_be_bytes())?;
                }
                adds = Vec::new();
                checkpoint = true;
            }
        }
    }
    if checkpoint {
        header.listsize = n as u32;
        header.logstart = out.end() as u32;
    } else if n > 0 {
        out.append(&COMMIT.to_be_bytes())?;
    }
    out.patch(0, &header.encode())?;
    Ok(n)
}
