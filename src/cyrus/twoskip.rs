//! The twoskip format (`3.6.1:lib/cyrusdb_twoskip.c`, formats spec §3): a 64-byte header, a
//! DUMMY record, then an append-only log of RECORD, DELETE and COMMIT records linked into a
//! skip list whose level 0 has two pointer slots, so that an uncommitted transaction never
//! overwrites the committed successor.
//!
//! # Reading
//!
//! A clean file (DIRTY clear, file size = `current_size`) is read by walking level 0 from the
//! dummy, ignoring slots at or past `current_size` and jumping over DELETE records, exactly
//! like `foreach`; both CRCs of every record are verified. An unclean file is read as Cyrus
//! reads it after `recovery1`: the same walk, which must yield strictly increasing keys in the
//! recovery comparator (raw unless [`ReadOptions::order`] says otherwise). Should that walk
//! fail, Cyrus falls back to `recovery2`, a physical replay of every complete transaction
//! (including its bug of deleting the DELETE record's *successor*, formats spec §3.7); the
//! reader does the same in memory, with an index of record offsets (O(records) memory, the
//! only case that is not constant).
//!
//! # Writing
//!
//! The writer ([`db::write()`]) produces what Cyrus writes when
//! it inserts the records in order into a fresh file in one transaction: the same records,
//! BLANK padding, pointer slots, CRCs, COMMIT and header. With the same levels
//! ([`Levels::CyrusRand`](super::db::Levels)) the file is byte-identical to Cyrus' own. Files
//! larger than Cyrus' repack threshold (16834 bytes and twice `repack_size`) get the header of
//! the repack Cyrus would run when that process exits (generation 2, `repack_size` at the
//! COMMIT), so Cyrus does not immediately rewrite them; the records are the same as a repack
//! writes, except that a real repack draws fresh random levels.
use std::path::{Path, PathBuf};

use super::db::Order;
use super::db::{
    self, Backend, Bad, Behind, DbError, KeyIndex, LevelGen, Map, OrderCheck, PatchWriter, Problem,
    ReadOptions, Record, RecordSource, Recovery, WriteOptions,
};

/// The 20-byte magic at offset 0: `\241\002\213\015twoskip file\0\0\0\0`.
pub const MAGIC: [u8; 20] = *b"\xA1\x02\x8B\x0Dtwoskip file\0\0\0\0";
/// The file format version this reader understands (and the only one ever written).
pub const VERSION: u32 = 1;
/// Bytes in the header.
pub const HEADER_SIZE: u64 = 64;
/// Where the DUMMY record lives.
pub const DUMMY_OFFSET: u64 = HEADER_SIZE;
/// The highest record level (the dummy's).
pub const MAXLEVEL: u8 = 31;
/// Header + dummy: the size of a new, empty file.
pub const EMPTY_SIZE: u64 = 336;
/// Header flag: a transaction was in progress.
pub const DIRTY: u32 = 1;
/// Cyrus repacks after a commit leaving the file larger than this (note: not 16384).
pub const MINREWRITE: u64 = 16834;
/// The 8-byte filler that keeps record heads inside one 512-byte block (since 3.2).
pub const BLANK: [u8; 8] = *b" BLANK\x07\xA0";
const BLOCKSIZE: u64 = 512;

/// Record type bytes.
pub const DUMMY: u8 = b'=';
pub const RECORD: u8 = b'+';
pub const DELETE: u8 = b'-';
pub const COMMIT: u8 = b'$';

/// The file header (formats spec §3.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub generation: u64,
    pub num_records: u64,
    pub repack_size: u64,
    pub current_size: u64,
    pub flags: u32,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Header {
    /// Parses and verifies (magic, version, CRC) the header at the start of `b`.
    pub(crate) fn parse(b: &[u8]) -> Result<Header, Bad> {
        if b.len() < HEADER_SIZE as usize {
            return Err(Bad::new(
                0,
                format!(
                    "file of {} bytes is shorter than the 64-byte header",
                    b.len()
                ),
            ));
        }
        if b[..20] != MAGIC {
            return Err(Bad::new(0, "bad twoskip magic"));
        }
        let h = Header {
            version: be32(b, 20),
            generation: be64(b, 24),
            num_records: be64(b, 32),
            repack_size: be64(b, 40),
            current_size: be64(b, 48),
            flags: be32(b, 56),
        };
        if h.version > VERSION {
            return Err(Bad::new(20, format!("unsupported version {}", h.version)));
        }
        let stored = be32(b, 60);
        let computed = crc32fast::hash(&b[..60]);
        if stored != computed {
            return Err(Bad::new(
                60,
                format!("header CRC mismatch: stored {stored:08X}, computed {computed:08X}"),
            ));
        }
        Ok(h)
    }

    /// The 64 bytes of this header, CRC included.
    pub fn encode(&self) -> [u8; 64] {
        let mut b = [0u8; 64];
        b[..20].copy_from_slice(&MAGIC);
        b[20..24].copy_from_slice(&self.version.to_be_bytes());
        b[24..32].copy_from_slice(&self.generation.to_be_bytes());
        b[32..40].copy_from_slice(&self.num_records.to_be_bytes());
        b[40..48].copy_from_slice(&self.repack_size.to_be_bytes());
        b[48..56].copy_from_slice(&self.current_size.to_be_bytes());
        b[56..60].copy_from_slice(&self.flags.to_be_bytes());
        let crc = crc32fast::hash(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_be_bytes());
        b
    }
}

/// One physical record (`struct skiprecord`).
#[derive(Debug, Clone)]
pub(crate) struct Rec {
    pub offset: u64,
    pub rtype: u8,
    pub level: u8,
    pub keylen: u64,
    pub vallen: u64,
    /// `nextloc[0..=level]`; the rest stay zero, as Cyrus' memset leaves them.
    pub nextloc: [u64; MAXLEVEL as usize + 1],
    pub crc_head: u32,
    pub crc_tail: u32,
    /// Absolute offset of the key; the value follows it.
    pub keyoff: u64,
    /// Total length including padding.
    pub len: u64,
}

impl Rec {
    fn new(rtype: u8, level: u8) -> Rec {
        Rec {
            offset: 0,
            rtype,
            level,
            keylen: 0,
            vallen: 0,
            nextloc: [0; MAXLEVEL as usize + 1],
            crc_head: 0,
            crc_tail: 0,
            keyoff: 0,
            len: 0,
        }
    }

    fn key<'m>(&self, map: &'m [u8]) -> &'m [u8] {
        &map[self.keyoff as usize..(self.keyoff + self.keylen) as usize]
    }
}

fn roundup8(n: u64) -> Option<u64> {
    n.checked_add(7).map(|x| x & !7)
}

fn type_name(t: u8) -> String {
    match t {
        DUMMY => "DUMMY".into(),
        RECORD => "RECORD".into(),
        DELETE => "DELETE".into(),
        COMMIT => "COMMIT".into(),
        other => format!("unknown (0x{other:02X})"),
    }
}

/// `read_onerecord`: parses the record at `offset`, bounds-checked against the whole file
/// (not `current_size`, like Cyrus), and verifies the head CRC.
pub(crate) fn read_record(map: &[u8], offset: u64) -> Result<Rec, Bad> {
    let size = map.len() as u64;
    if offset.checked_add(24).is_none_or(|e| e > size) {
        return Err(Bad::new(
            offset,
            format!("record header runs past the end of the file ({size} bytes)"),
        ));
    }
    let o = offset as usize;
    let mut r = Rec::new(map[o], map[o + 1]);
    r.offset = offset;
    r.keylen = be16(map, o + 2) as u64;
    r.vallen = be32(map, o + 4) as u64;
    if r.level > MAXLEVEL {
        return Err(Bad::new(
            offset,
            format!("level {} above {MAXLEVEL}", r.level),
        ));
    }
    let mut p = o + 8;
    if r.keylen == u16::MAX as u64 {
        r.keylen = be64(map, p);
        p += 8;
    }
    if r.vallen == u32::MAX as u64 {
        r.vallen = be64(map, p);
        p += 8;
    }
    let len = r
        .keylen
        .checked_add(r.vallen)
        .and_then(roundup8)
        .and_then(|kv| kv.checked_add((p - o) as u64 + 8 * (r.level as u64 + 1) + 8));
    let Some(len) = len.filter(|&l| offset + l <= size) else {
        return Err(Bad::new(
            offset,
            format!(
                "{} record (key {} bytes, value {} bytes) runs past the end of the file ({size} bytes)",
                type_name(r.rtype),
                r.keylen,
                r.vallen
            ),
        ));
    };
    r.len = len;
    for i in 0..=r.level as usize {
        r.nextloc[i] = be64(map, p);
        p += 8;
    }
    r.crc_head = be32(map, p);
    r.crc_tail = be32(map, p + 4);
    r.keyoff = (p + 8) as u64;
    let computed = crc32fast::hash(&map[o..p]);
    if computed != r.crc_head {
        return Err(Bad::new(
            offset,
            format!(
                "head CRC mismatch: stored {:08X}, computed {computed:08X}",
                r.crc_head
            ),
        ));
    }
    Ok(r)
}

/// `check_tailcrc`: key, value and padding.
pub(crate) fn check_tail(map: &[u8], r: &Rec) -> Result<(), Bad> {
    let n = roundup8(r.keylen + r.vallen).expect("checked in read_record");
    let computed = crc32fast::hash(&map[r.keyoff as usize..(r.keyoff + n) as usize]);
    if computed != r.crc_tail {
        return Err(Bad::new(
            r.offset,
            format!(
                "tail CRC mismatch: stored {:08X}, computed {computed:08X}",
                r.crc_tail
            ),
        ));
    }
    Ok(())
}

/// `_getloc`: the successor at `level`; level 0 takes the larger slot below `end`.
pub(crate) fn getloc(r: &Rec, level: usize, end: u64) -> u64 {
    if level > 0 {
        return r.nextloc[level + 1];
    }
    let (a, b) = (r.nextloc[0], r.nextloc[1]);
    if a >= end {
        return b;
    }
    if b >= end {
        return a;
    }
    a.max(b)
}

/// `_setloc` inside a transaction that started at `current_size`.
fn setloc(r: &mut Rec, level: usize, offset: u64, current_size: u64) {
    if level > 0 {
        r.nextloc[level + 1] = offset;
        return;
    }
    if r.nextloc[0] >= current_size {
        r.nextloc[0] = offset;
    } else if r.nextloc[1] >= current_size {
        r.nextloc[1] = offset;
    } else if r.nextloc[1] > r.nextloc[0] {
        r.nextloc[0] = offset;
    } else {
        r.nextloc[1] = offset;
    }
}

const MAXRECORDHEAD: usize = (MAXLEVEL as usize + 5) * 8;

/// `prepare_record`: everything of a record before its key, with a fresh head CRC.
fn encode_head(r: &mut Rec) -> ([u8; MAXRECORDHEAD], usize) {
    let mut b = [0u8; MAXRECORDHEAD];
    b[0] = r.rtype;
    b[1] = r.level;
    let mut len = 8;
    if r.keylen < u16::MAX as u64 {
        b[2..4].copy_from_slice(&(r.keylen as u16).to_be_bytes());
    } else {
        b[2..4].copy_from_slice(&u16::MAX.to_be_bytes());
        b[len..len + 8].copy_from_slice(&r.keylen.to_be_bytes());
        len += 8;
    }
    if r.vallen < u32::MAX as u64 {
        b[4..8].copy_from_slice(&(r.vallen as u32).to_be_bytes());
    } else {
        b[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        b[len..len + 8].copy_from_slice(&r.vallen.to_be_bytes());
        len += 8;
    }
    for i in 0..=r.level as usize {
        b[len..len + 8].copy_from_slice(&r.nextloc[i].to_be_bytes());
        len += 8;
    }
    r.crc_head = crc32fast::hash(&b[..len]);
    b[len..len + 4].copy_from_slice(&r.crc_head.to_be_bytes());
    b[len + 4..len + 8].copy_from_slice(&r.crc_tail.to_be_bytes());
    (b, len + 8)
}

// ---------------------------------------------------------------------------------------------
// Reader
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
struct Entry {
    key: (usize, usize),
    val: (usize, usize),
}

impl Entry {
    fn of(r: &Rec) -> Entry {
        let k = r.keyoff as usize;
        let kl = r.keylen as usize;
        Entry {
            key: (k, kl),
            val: (k + kl, r.vallen as usize),
        }
    }
}

enum State {
    Walk { next: u64 },
    Replay { entries: Vec<Entry>, pos: usize },
    Done,
}

/// A streaming twoskip reader; see the module documentation.
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
    behind: Behind,
}

/// Walks level 0 one record: follows `next` through DELETE records to a RECORD. `steps`
/// bounds the total work so that no pointer cycle can loop.
fn walk_step(
    map: &[u8],
    end: u64,
    next: &mut u64,
    steps: &mut u64,
    max_steps: u64,
    tail: bool,
) -> Result<Option<Rec>, Bad> {
    loop {
        if *next == 0 {
            return Ok(None);
        }
        *steps += 1;
        if *steps > max_steps {
            return Err(Bad::new(*next, "level-0 pointers loop"));
        }
        let r = read_record(map, *next)?;
        match r.rtype {
            DELETE => *next = r.nextloc[0],
            RECORD => {
                if tail {
                    check_tail(map, &r)?;
                }
                if r.keylen == 0 {
                    return Err(Bad::new(r.offset, "RECORD with an empty key"));
                }
                *next = getloc(&r, 0, end);
                return Ok(Some(r));
            }
            t => {
                return Err(Bad::new(
                    r.offset,
                    format!(
                        "a level-0 pointer leads to a {} record, not RECORD or DELETE",
                        type_name(t)
                    ),
                ))
            }
        }
    }
}

/// `recovery1` without the repairs: does the level-0 walk below `current_size` give strictly
/// increasing keys? Returns the number of records.
fn recovery1(m: &Map, end: u64, start: u64, order: Order) -> Result<u64, Bad> {
    let map = m.bytes();
    let mut behind = Behind::default();
    let mut next = start;
    let mut steps = 0;
    let max = map.len() as u64 / 8 + 2;
    let mut check = OrderCheck::new(Some(order), &[]);
    let mut prev: Option<Rec> = None;
    let mut n = 0;
    while let Some(r) = walk_step(map, end, &mut next, &mut steps, max, false)? {
        behind.read(m, r.offset, r.len);
        if let Some(p) = &prev {
            check
                .step(p.key(map), r.key(map))
                .map_err(|m| Bad::new(r.offset, m))?;
        }
        prev = Some(r);
        n += 1;
    }
    Ok(n)
}

enum Op {
    Store(Entry),
    Delete(Entry),
}

fn is_blank(map: &[u8], offset: u64) -> bool {
    offset.checked_add(8).is_some_and(|e| e <= map.len() as u64)
        && map[offset as usize..offset as usize + 8] == BLANK
}

/// `_copy_commit`: the operations of the transaction that `commit` closes, or an error (which
/// makes Cyrus abort that transaction in the new file).
fn copy_commit(map: &[u8], commit: &Rec) -> Result<Vec<Op>, Bad> {
    let mut ops = Vec::new();
    let mut offset = commit.nextloc[0];
    while offset < commit.offset {
        if is_blank(map, offset) {
            offset += 8;
            continue;
        }
        let r = read_record(map, offset)?;
        match r.rtype {
            DELETE => {
                if r.nextloc[0] == 0 {
                    return Err(Bad::new(offset, "DELETE of the list end (Cyrus asserts)"));
                }
                // Cyrus deletes the key of the record the DELETE points at (the successor of
                // the deleted record), and then advances by *that* record's length.
                let target = read_record(map, r.nextloc[0])?;
                if target.keylen == 0 {
                    return Err(Bad::new(
                        offset,
                        "DELETE of a keyless record (Cyrus asserts)",
                    ));
                }
                ops.push(Op::Delete(Entry::of(&target)));
                offset += target.len;
            }
            RECORD => {
                if r.keylen == 0 {
                    return Err(Bad::new(offset, "RECORD with an empty key (Cyrus asserts)"));
                }
                ops.push(Op::Store(Entry::of(&r)));
                offset += r.len;
            }
            t => {
                return Err(Bad::new(
                    offset,
                    format!("{} record inside a transaction", type_name(t)),
                ))
            }
        }
    }
    Ok(ops)
}

/// `recovery2`: replays every transaction whose records all read cleanly, in file order, into
/// an index; the result sorted by `order`.
fn recovery2(map: &[u8], order: Order) -> Result<(Vec<Entry>, u64), String> {
    let mut index: KeyIndex<Entry> = KeyIndex::new(order);
    let size = map.len() as u64;
    let mut offset = DUMMY_OFFSET;
    let mut dirty = 0;
    let mut applied = 0u64;
    while offset < size {
        if is_blank(map, offset) {
            offset += 8;
            continue;
        }
        match read_record(map, offset) {
            Err(_) => {
                dirty += 1;
                offset += 8;
            }
            Ok(r) => {
                if r.rtype == COMMIT {
                    if dirty == 0 {
                        if let Ok(ops) = copy_commit(map, &r) {
                            applied += 1;
                            for op in ops {
                                match op {
                                    Op::Store(e) => {
                                        index.insert(&map[e.key.0..e.key.0 + e.key.1], e);
                                    }
                                    Op::Delete(e) => {
                                        index.remove(&map[e.key.0..e.key.0 + e.key.1]);
                                    }
                                }
                            }
                        }
                    }
                    dirty = 0;
                }
                offset += r.len;
            }
        }
    }
    if index.len() == 0 {
        return Err("recovery2 found no records (Cyrus refuses to recover an empty file)".into());
    }
    Ok((index.into_sorted(), applied))
}

impl Reader {
    /// Opens `path` as a twoskip file.
    pub fn open(path: impl AsRef<Path>, options: &ReadOptions) -> Result<Reader, DbError> {
        let path = path.as_ref();
        Reader::from_map(path, Map::open(path)?, options)
    }

    pub(crate) fn from_map(
        path: &Path,
        map: Map,
        options: &ReadOptions,
    ) -> Result<Reader, DbError> {
        let err = |b: Bad| b.into_error(path, Backend::Twoskip);
        let bytes = map.bytes();
        let header = Header::parse(bytes).map_err(err)?;
        let dummy = read_record(bytes, DUMMY_OFFSET).map_err(err)?;
        if dummy.rtype != DUMMY {
            return Err(err(Bad::new(
                DUMMY_OFFSET,
                format!(
                    "expected the DUMMY record, found {}",
                    type_name(dummy.rtype)
                ),
            )));
        }
        let end = header.current_size;
        let size = bytes.len() as u64;
        let start = getloc(&dummy, 0, end);
        let max_steps = size / 8 + 2;
        let clean = header.flags & DIRTY == 0 && end == size;
        let auto = [Order::Raw, Order::Mbox];
        let mut reader = Reader {
            path: path.to_owned(),
            header,
            recovery: Recovery::None,
            state: State::Walk { next: start },
            check: OrderCheck::new(options.order, &auto).unless(options.unordered),
            prev: None,
            steps: 0,
            max_steps,
            behind: Behind::default(),
            map,
        };
        if clean {
            return Ok(reader);
        }
        let bytes = reader.map.bytes();
        let mut why = Vec::new();
        if reader.header.flags & DIRTY != 0 {
            why.push("DIRTY flag set".to_string());
        }
        if end != size {
            why.push(format!(
                "file is {size} bytes but current_size is {end} (uncommitted tail ignored)"
            ));
        }
        if end <= HEADER_SIZE {
            return Err(err(Bad::new(
                48,
                format!("current_size {end} leaves no room for the dummy (Cyrus asserts)"),
            )));
        }
        let why = why.join("; ");
        let order = options.order.unwrap_or(Order::Raw);
        match recovery1(&reader.map, end, start, order) {
            Ok(n) => {
                reader.recovery =
                    Recovery::Ignored(format!("{why}; recovery1 keeps the {n} committed records"));
                reader.check = OrderCheck::new(Some(order), &[]).unless(options.unordered);
            }
            Err(bad1) => match recovery2(bytes, order) {
                Ok((entries, commits)) => {
                    reader.recovery = Recovery::Replayed(format!(
                        "{why}; recovery1 failed at offset {} ({}); recovery2 replayed {commits} \
                         transactions into {} records",
                        bad1.offset,
                        bad1.what,
                        entries.len()
                    ));
                    reader.check = OrderCheck::new(Some(order), &[]).unless(options.unordered);
                    reader.state = State::Replay { entries, pos: 0 };
                }
                Err(e2) => {
                    return Err(err(Bad::new(
                        bad1.offset,
                        format!("{why}; recovery1 failed: {}; {e2}", bad1.what),
                    )))
                }
            },
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
        let entry = match self.advance() {
            Ok(Some(e)) => e,
            Ok(None) => {
                self.state = State::Done;
                return Ok(None);
            }
            Err(bad) => {
                self.state = State::Done;
                return Err(bad.into_error(&self.path, Backend::Twoskip));
            }
        };
        let m = self.map.bytes();
        Ok(Some((
            &m[entry.key.0..entry.key.0 + entry.key.1],
            &m[entry.val.0..entry.val.0 + entry.val.1],
        )))
    }

    /// See [`db::DbReader::seek`].
    pub fn seek(&mut self, key: &[u8]) -> Result<bool, DbError> {
        let Some(order) = self.check.search_order(key) else {
            return Ok(false);
        };
        match self.seek_in(order, key) {
            Ok(()) => Ok(true),
            Err(bad) => {
                self.state = State::Done;
                Err(bad.into_error(&self.path, Backend::Twoskip))
            }
        }
    }

    fn seek_in(&mut self, order: Order, key: &[u8]) -> Result<(), Bad> {
        use std::cmp::Ordering::Less;
        let map = self.map.bytes();
        if let Some((p, l)) = self.prev {
            if order.compare(&map[p..p + l], key) != Less {
                return Ok(());
            }
        }
        let end = self.header.current_size;
        let clean = matches!(self.recovery, Recovery::None);
        let next = match &mut self.state {
            State::Done => return Ok(()),
            State::Replay { entries, pos } => {
                let rest = &entries[*pos..];
                *pos += rest.partition_point(|e| {
                    order.compare(&map[e.key.0..e.key.0 + e.key.1], key) == Less
                });
                return Ok(());
            }
            State::Walk { next } => next,
        };
        // Forward only: when the next record is already at or past `key`, stay.
        let mut probe = *next;
        match walk_step(map, end, &mut probe, &mut self.steps, self.max_steps, true)? {
            None => return Ok(()),
            Some(r) if order.compare(r.key(map), key) != Less => return Ok(()),
            Some(_) => {}
        }
        if clean {
            // `find_loc`: down the levels from the dummy, along each while the next key is
            // less than `key`. Every pointer of a clean file is committed (only level 0 has
            // two slots). `cur` is always the dummy or a live RECORD with a smaller key, so
            // its level-0 successor is where the walk resumes; since the next record is
            // smaller than `key` too, that is ahead of where the walk was.
            let mut cur = read_record(map, DUMMY_OFFSET)?;
            for level in (1..cur.level as usize).rev() {
                loop {
                    let at = getloc(&cur, level, end);
                    if at == 0 {
                        break;
                    }
                    self.steps += 1;
                    if self.steps > self.max_steps {
                        return Err(Bad::new(at, "skip pointers loop"));
                    }
                    let r = read_record(map, at)?;
                    if r.rtype != RECORD || (r.level as usize) <= level {
                        return Err(Bad::new(
                            r.offset,
                            format!(
                                "a level-{level} pointer leads to a {} record of level {}",
                                type_name(r.rtype),
                                r.level
                            ),
                        ));
                    }
                    check_tail(map, &r)?;
                    if order.compare(r.key(map), key) != Less {
                        break;
                    }
                    cur = r;
                }
            }
            *next = getloc(&cur, 0, end);
        }
        // Level 0 from here up to the first key not less than `key`.
        loop {
            let before = *next;
            match walk_step(map, end, next, &mut self.steps, self.max_steps, true)? {
                None => return Ok(()),
                Some(r) => {
                    if order.compare(r.key(map), key) != Less {
                        *next = before;
                        return Ok(());
                    }
                    self.behind.read(&self.map, r.offset, r.len);
                }
            }
        }
    }

    fn advance(&mut self) -> Result<Option<Entry>, Bad> {
        let map = self.map.bytes();
        let (entry, offset) = match &mut self.state {
            State::Done => return Ok(None),
            State::Replay { entries, pos } => match entries.get(*pos) {
                None => return Ok(None),
                Some(e) => {
                    *pos += 1;
                    (*e, e.key.0 as u64)
                }
            },
            State::Walk { next } => {
                match walk_step(
                    map,
                    self.header.current_size,
                    next,
                    &mut self.steps,
                    self.max_steps,
                    true,
                )? {
                    None => return Ok(None),
                    Some(r) => {
                        self.behind.read(&self.map, r.offset, r.len);
                        (Entry::of(&r), r.offset)
                    }
                }
            }
        };
        let key = &map[entry.key.0..entry.key.0 + entry.key.1];
        if let Some((p, l)) = self.prev {
            self.check
                .step(&map[p..p + l], key)
                .map_err(|m| Bad::new(offset, m))?;
        }
        self.prev = Some(entry.key);
        Ok(Some(entry))
    }
}

// ---------------------------------------------------------------------------------------------
// Consistency
// ---------------------------------------------------------------------------------------------

/// `myconsistent` on a clean file (3.6.1:lib/cyrusdb_twoskip.c:2114-2193): every level's
/// linkage, key order, record count, plus the tail CRCs. An unclean file is checked after
/// recovery by the reader instead, as Cyrus' `consistent` recovers it first.
pub(crate) fn check_structure(map: &[u8], order: Order, problems: &mut Vec<Problem>) {
    let mut bad = |b: Bad| {
        problems.push(Problem {
            offset: Some(b.offset),
            what: b.what,
        })
    };
    let header = match Header::parse(map) {
        Ok(h) => h,
        Err(b) => return bad(b),
    };
    if header.flags & DIRTY != 0 || header.current_size != map.len() as u64 {
        return;
    }
    let end = header.current_size;
    let dummy = match read_record(map, DUMMY_OFFSET) {
        Ok(d) => d,
        Err(b) => return bad(b),
    };
    let mut fwd = [0u64; MAXLEVEL as usize];
    for (i, f) in fwd.iter_mut().enumerate() {
        *f = getloc(&dummy, i, end);
    }
    let mut prev = dummy;
    let mut n = 0u64;
    let mut steps = 0u64;
    let max = map.len() as u64 / 8 + 2;
    while fwd[0] != 0 {
        steps += 1;
        if steps > max {
            return bad(Bad::new(fwd[0], "level-0 pointers loop"));
        }
        let r = match read_record(map, fwd[0]) {
            Ok(r) => r,
            Err(b) => return bad(b),
        };
        if r.rtype == DELETE {
            fwd[0] = r.nextloc[0];
            continue;
        }
        if r.rtype != RECORD {
            return bad(Bad::new(
                r.offset,
                format!("{} record in the level-0 chain", type_name(r.rtype)),
            ));
        }
        if order.compare(r.key(map), prev.key(map)) != std::cmp::Ordering::Greater {
            return bad(Bad::new(
                r.offset,
                format!(
                    "out of order: key {} after {} ({order} order)",
                    db::show_bytes(r.key(map)),
                    db::show_bytes(prev.key(map))
                ),
            ));
        }
        for (i, f) in fwd.iter_mut().enumerate().take(r.level as usize) {
            if *f != r.offset {
                return bad(Bad::new(
                    r.offset,
                    format!("broken linkage at level {i}: expected {:08X}", *f),
                ));
            }
            *f = getloc(&r, i, end);
        }
        if let Err(b) = check_tail(map, &r) {
            return bad(b);
        }
        n += 1;
        prev = r;
    }
    for (i, f) in fwd.iter().enumerate() {
        if *f != 0 {
            return bad(Bad::new(*f, format!("broken tail at level {i}")));
        }
    }
    if n != header.num_records {
        bad(Bad::new(
            32,
            format!(
                "record count mismatch: header says {}, found {n}",
                header.num_records
            ),
        ));
    }
}

// ---------------------------------------------------------------------------------------------
// Writer
// ---------------------------------------------------------------------------------------------

/// `add_padding`: BLANKs until the rewritable part of a head of `iolen` bytes fits one block.
fn add_padding(out: &mut PatchWriter<'_>, iolen: u64) -> Result<(), DbError> {
    if iolen > BLOCKSIZE - 8 {
        return Ok(());
    }
    while (out.end() + 8) % BLOCKSIZE > (out.end() - 8 + iolen) % BLOCKSIZE {
        out.append(&BLANK)?;
    }
    Ok(())
}

/// `write_record`: pads, then appends `r` with `key` and `val`; sets its offset.
fn append_record(
    out: &mut PatchWriter<'_>,
    r: &mut Rec,
    key: &[u8],
    val: &[u8],
) -> Result<(), DbError> {
    const ZEROS: [u8; 8] = [0; 8];
    r.keylen = key.len() as u64;
    r.vallen = val.len() as u64;
    let kv = r.keylen + r.vallen;
    let pad = (roundup8(kv).expect("in-memory lengths") - kv) as usize;
    let mut h = crc32fast::Hasher::new();
    h.update(key);
    h.update(val);
    h.update(&ZEROS[..pad]);
    r.crc_tail = h.finalize();
    let (head, hl) = encode_head(r);
    add_padding(out, hl as u64)?;
    r.offset = out.end();
    r.keyoff = r.offset + hl as u64;
    out.append(&head[..hl])?;
    out.append(key)?;
    out.append(val)?;
    out.append(&ZEROS[..pad])?;
    r.len = out.end() - r.offset;
    Ok(())
}

/// Writes the sorted records of `src` as Cyrus' single transaction into a fresh file; see the
/// module documentation. Returns the number of records.
pub(crate) fn write_sorted(
    out: &mut PatchWriter<'_>,
    src: &mut dyn RecordSource,
    options: &WriteOptions,
) -> Result<u64, DbError> {
    let mut levels = LevelGen::new(options.levels);
    out.append(&[0u8; HEADER_SIZE as usize])?;
    let mut dummy = Rec::new(DUMMY, MAXLEVEL);
    append_record(out, &mut dummy, &[], &[])?;
    debug_assert_eq!(out.end(), EMPTY_SIZE);
    // The transaction starts at the empty file's end; `current_size` stays there until commit.
    let txn_start = out.end();
    // The predecessor at each level is the last record of at least that level: it is the one
    // whose pointer the next record of that level stitches.
    let mut preds: Vec<Rec> = vec![dummy];
    let mut pred_at = [0usize; MAXLEVEL as usize];
    let mut n = 0u64;
    while let Some((key, val)) = src.next_record()? {
        let level = levels.twoskip_level();
        let mut r = Rec::new(RECORD, level);
        // Forward pointers are the successors at each level: none, we append at the end.
        append_record(out, &mut r, key, val)?;
        let mut touched: Vec<usize> = Vec::with_capacity(4);
        for (i, &p) in pred_at.iter().enumerate().take(level as usize) {
            setloc(&mut preds[p], i, r.offset, txn_start);
            if touched.last() != Some(&p) {
                touched.push(p);
            }
        }
        for &p in &touched {
            let (head, hl) = encode_head(&mut preds[p]);
            out.patch(preds[p].offset, &head[..hl])?;
        }
        preds.push(r);
        let new = preds.len() - 1;
        for slot in pred_at.iter_mut().take(level as usize) {
            *slot = new;
        }
        // Drop records that are no longer anyone's predecessor (keep the vector tiny).
        if preds.len() > 2 * MAXLEVEL as usize {
            let mut keep: Vec<usize> = pred_at.to_vec();
            keep.sort_unstable();
            keep.dedup();
            let mut remap = vec![usize::MAX; preds.len()];
            let mut kept = Vec::with_capacity(keep.len());
            for (j, &k) in keep.iter().enumerate() {
                remap[k] = j;
                kept.push(preds[k].clone());
            }
            preds = kept;
            for slot in pred_at.iter_mut() {
                *slot = remap[*slot];
            }
        }
        n += 1;
    }
    let mut header = Header {
        version: VERSION,
        generation: 1,
        num_records: n,
        repack_size: EMPTY_SIZE,
        current_size: out.end(),
        flags: 0,
    };
    if n > 0 {
        let before_commit = out.end();
        let mut commit = Rec::new(COMMIT, 0);
        commit.nextloc[0] = txn_start;
        append_record(out, &mut commit, &[], &[])?;
        header.current_size = out.end();
        if header.current_size > MINREWRITE && header.current_size > 2 * header.repack_size {
            // What the delayed checkpoint at process exit leaves behind.
            header.generation = 2;
            header.repack_size = before_commit;
        }
    }
    out.patch(0, &header.encode())?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::super::db::{self, Levels, Order, ReadOptions, WriteOptions};
    use std::path::{Path, PathBuf};

    fn raw() -> ReadOptions {
        ReadOptions {
            order: Some(Order::Raw),
            unordered: false,
        }
    }

    fn all_records(path: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut r = db::open(path).unwrap();
        let mut v = Vec::new();
        while let Some((k, val)) = r.next_record().unwrap() {
            v.push((k.to_vec(), val.to_vec()));
        }
        v
    }

    /// Seeks to `target` (after reading `skip` records) and checks that the rest is exactly
    /// the records from the first key not less than `target` (or from `skip`, if later).
    fn check_seek(
        path: &Path,
        opts: &ReadOptions,
        all: &[(Vec<u8>, Vec<u8>)],
        skip: usize,
        target: &[u8],
    ) {
        let mut r = db::open_with(path, None, opts).unwrap();
        for _ in 0..skip {
            r.next_record().unwrap();
        }
        assert!(r.seek(target).unwrap(), "{}: seek refused", path.display());
        let from = all
            .iter()
            .position(|(k, _)| Order::Raw.compare(k, target) != std::cmp::Ordering::Less)
            .unwrap_or(all.len())
            .max(skip);
        let mut got = Vec::new();
        while let Some((k, v)) = r.next_record().unwrap() {
            got.push((k.to_vec(), v.to_vec()));
        }
        assert!(
            got == all[from..],
            "{}: seek {:?} after {skip}: {} records, want {}",
            path.display(),
            String::from_utf8_lossy(target),
            got.len(),
            all.len() - from
        );
    }

    fn targets(all: &[(Vec<u8>, Vec<u8>)]) -> Vec<Vec<u8>> {
        let mut t: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b"\0".to_vec(),
            b"A".to_vec(),
            b"I".to_vec(),
            b"N".to_vec(),
            b"O".to_vec(),
            b"\xFF\xFF".to_vec(),
        ];
        for (k, _) in all.iter().step_by(all.len() / 40 + 1) {
            t.push(k.clone());
            let mut longer = k.clone();
            longer.push(0);
            t.push(longer);
            t.push(k[..k.len() - 1].to_vec());
        }
        t
    }

    #[test]
    fn seek_follows_the_skip_pointers_to_the_first_key_not_less() {
        let dir = tempfile::tempdir().unwrap();
        for (i, (n, levels)) in [
            (0usize, Levels::Deterministic),
            (1, Levels::Deterministic),
            (7, Levels::CyrusRand { seed: 1, skip: 2 }),
            (300, Levels::Deterministic),
            (2000, Levels::CyrusRand { seed: 7, skip: 0 }),
        ]
        .into_iter()
        .enumerate()
        {
            let path = dir.path().join(format!("t{i}.db"));
            let mut recs: Vec<(Vec<u8>, Vec<u8>)> = (0..n)
                .flat_map(|j| {
                    [
                        (format!("I{j:08x}").into_bytes(), b"i".to_vec()),
                        (format!("Nuser\x1fu{j:05}").into_bytes(), b"n".to_vec()),
                    ]
                })
                .collect();
            recs.sort();
            let opts = WriteOptions {
                levels,
                fsync: false,
                ..WriteOptions::default()
            };
            db::write(
                &path,
                db::Backend::Twoskip,
                recs.clone().into_iter().map(Ok::<_, std::io::Error>),
                &opts,
            )
            .unwrap();
            let all = all_records(&path);
            assert_eq!(all, recs);
            for t in targets(&all) {
                for skip in [0, 1, all.len() / 2, all.len()] {
                    check_seek(&path, &raw(), &all, skip.min(all.len()), &t);
                }
            }
            // Twice: the second seek only moves forward.
            let mut r = db::open_with(&path, None, &raw()).unwrap();
            assert!(r.seek(b"N").unwrap());
            assert!(r.seek(b"I").unwrap());
            let first = r.next_record().unwrap().map(|(k, _)| k.to_vec());
            assert_eq!(
                first,
                all.iter()
                    .find(|(k, _)| k[0] == b'N')
                    .map(|(k, _)| k.clone())
            );
        }
    }

    fn fixtures() -> Vec<PathBuf> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let mut out = Vec::new();
        let mut stack = vec![root];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.to_string_lossy().ends_with(".db")
                    && db::detect(&p).ok() == Some(db::Backend::Twoskip)
                {
                    out.push(p);
                }
            }
        }
        out
    }

    #[test]
    fn seek_in_cyrus_files_clean_and_crashed() {
        let files = fixtures();
        assert!(files.len() >= 5, "{files:?}");
        for path in files {
            let all = all_records(&path);
            let auto = ReadOptions::default();
            let mut r = db::open(&path).unwrap();
            while r.next_record().unwrap().is_some() {}
            let mbox = !r.orders().contains(&Order::Raw);
            for t in targets(&all) {
                // An auto-detected order seeks only where raw and mbox agree (then either
                // order gives the same place).
                let mut r = db::open(&path).unwrap();
                if !r.seek(&t).unwrap() {
                    assert!(t.iter().any(|&b| b < b'/'), "{}: {t:?}", path.display());
                } else {
                    check_seek(&path, &auto, &all, 0, &t);
                }
                if !mbox {
                    check_seek(&path, &raw(), &all, 0, &t);
                }
            }
            // With the order given, always.
            let mut r = db::open_with(
                &path,
                None,
                &ReadOptions {
                    order: Some(Order::Raw),
                    unordered: true,
                },
            )
            .unwrap();
            assert!(!r.seek(b"N").unwrap(), "unordered reads do not seek");
        }
    }
}
