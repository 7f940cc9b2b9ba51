//! `ctl_mboxlist` dump and undump formats (formats spec §8).
//!
//! * [`DumpWriter`] writes Cyrus 3.6.1 `ctl_mboxlist -d [-y]` output byte for byte, from the
//!   raw records of a 3.6 `mailboxes.db` in database order (`dump_cb`,
//!   3.6.1:imap/ctl_mboxlist.c:558-688, serialised as jansson `json_dumps(…, JSON_EMBED)`).
//!   It formats JSON directly into the output buffer: no JSON tree per record, constant memory.
//! * [`write_legacy_line`] writes the 2.3.10–3.4 tab-separated `-d` form.
//! * [`Undump`] rebuilds the records `ctl_mboxlist -u [-L]` would store from 3.x JSON, 3.5-dev
//!   `-L` lines, or 2.x/3.4 `-d` lines, following `mboxlist_update_entry` (N record, I record
//!   with rename history), except that each entry keeps the dump's `mtime` unless asked not
//!   to, so that dumping the result reproduces the input.

use std::collections::BTreeMap;
use std::io::{self, BufRead, Read, Write};

use super::entry::{
    self, c_atoi, c_strtol, c_strtoul, cstr, encode_i_value, encode_n_value, mbtype, mbtype34,
    parse_entry, Entry, EntryError, FormerName, KeyKind, MAX_MAILBOX_BUFFER, MAX_MAILBOX_NAME,
    MAX_PARTITION_LEN,
};
use super::mboxname;

/// Errors of the dump and undump paths.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    #[error("record {key:?}: {source}")]
    Entry {
        key: String,
        #[source]
        source: EntryError,
    },
    #[error("dump input: {0}")]
    Input(String),
}

fn show(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

// ---------------------------------------------------------------------------------------
// JSON output.

/// What a byte becomes inside a jansson string: 0 itself, 1 a `\u00XX` escape, else the
/// letter of a two-byte escape (`\"`, `\\`, `\b`, `\f`, `\n`, `\r`, `\t`).
static JSON_ESCAPE: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut c = 0;
    while c < 0x20 {
        t[c] = 1;
        c += 1;
    }
    t[b'"' as usize] = b'"';
    t[b'\\' as usize] = b'\\';
    t[0x08] = b'b';
    t[0x0C] = b'f';
    t[b'\n' as usize] = b'n';
    t[b'\r' as usize] = b'r';
    t[b'\t' as usize] = b't';
    t
};

/// A jansson-escaped JSON string: `"` and `\` escaped, `\b \f \n \r \t`, other control bytes
/// as `\u00XX` (uppercase hex), everything else (DEL, non-ASCII UTF-8) raw.
#[cfg(test)]
fn json_str(out: &mut Vec<u8>, s: &str) {
    json_bytes(out, s.as_bytes())
}

/// [`json_str`] of bytes already known to be UTF-8.
fn json_bytes(out: &mut Vec<u8>, b: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.reserve(b.len() + 2);
    out.push(b'"');
    let mut start = 0;
    for (i, &c) in b.iter().enumerate() {
        let esc = JSON_ESCAPE[c as usize];
        if esc == 0 {
            continue;
        }
        out.extend_from_slice(&b[start..i]);
        if esc == 1 {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[(c >> 4) as usize]);
            out.push(HEX[(c & 0xF) as usize]);
        } else {
            out.push(b'\\');
            out.push(esc);
        }
        start = i + 1;
    }
    out.extend_from_slice(&b[start..]);
    out.push(b'"');
}

/// `json_string(s)` succeeds only for valid UTF-8 (and C strings end at NUL).
fn utf8(s: &[u8]) -> Option<&str> {
    std::str::from_utf8(cstr(s)).ok()
}

/// The decimal digits of `v`.
fn push_u64(out: &mut Vec<u8>, mut v: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

fn push_i64(out: &mut Vec<u8>, v: i64) {
    if v < 0 {
        out.push(b'-');
    }
    push_u64(out, v.unsigned_abs());
}

/// `, "key": ` before every member but the first; `key` is a JSON-ready ASCII literal
/// without quotes (no escapes needed).
fn member_key(out: &mut Vec<u8>, first: &mut bool, key: &[u8]) {
    if !*first {
        out.extend_from_slice(b", ");
    }
    *first = false;
    out.push(b'"');
    out.extend_from_slice(key);
    out.extend_from_slice(b"\": ");
}

fn member_str(out: &mut Vec<u8>, first: &mut bool, key: &[u8], v: &[u8]) {
    member_key(out, first, key);
    json_bytes(out, v);
}

/// A number member: Cyrus prints numbers as JSON strings (`"mtime": "1700000000"`).
fn member_u64(out: &mut Vec<u8>, first: &mut bool, key: &[u8], v: u64) {
    member_key(out, first, key);
    out.push(b'"');
    push_u64(out, v);
    out.push(b'"');
}

fn member_i64(out: &mut Vec<u8>, first: &mut bool, key: &[u8], v: i64) {
    member_key(out, first, key);
    out.push(b'"');
    push_i64(out, v);
    out.push(b'"');
}

/// An ACL as the dump sees it: the `id TAB rights TAB …` string of an [`Entry`], or the
/// pairs of a [`entry::PlainN`] (which contain no TAB, so they are the pairs the string of
/// the same entry splits into).
#[derive(Clone, Copy)]
enum Acl<'a> {
    Text(Option<&'a [u8]>),
    Pairs(&'a [(&'a [u8], &'a [u8])]),
}

/// `acl_to_json`: pairs split on TAB; a pair whose identifier or rights is not UTF-8 is
/// dropped; a repeated identifier takes the later rights at its first position.
#[cfg(test)]
fn acl_json(out: &mut Vec<u8>, acl: Option<&[u8]>) {
    acl_json_of(out, Acl::Text(acl), false)
}

/// `checked`: every identifier and rights string is known to be UTF-8 without NUL.
fn acl_json_of<'a>(out: &mut Vec<u8>, acl: Acl<'a>, checked: bool) {
    // Nearly every ACL has a handful of pairs: dedupe them on the stack.
    const INLINE: usize = 16;
    let mut inline: [(&'a [u8], &'a [u8]); INLINE] = [(&[], &[]); INLINE];
    let mut n = 0;
    let mut spill: Vec<(&'a [u8], &'a [u8])> = Vec::new();
    let mut add = |id: &'a [u8], rights: &'a [u8]| {
        let (id, rights) = if checked {
            (id, rights)
        } else {
            let (Some(id), Some(rights)) = (utf8(id), utf8(rights)) else {
                return;
            };
            (id.as_bytes(), rights.as_bytes())
        };
        if let Some(p) = inline[..n]
            .iter_mut()
            .chain(spill.iter_mut())
            .find(|(k, _)| *k == id)
        {
            p.1 = rights;
        } else if n < INLINE {
            inline[n] = (id, rights);
            n += 1;
        } else {
            spill.push((id, rights));
        }
    };
    match acl {
        Acl::Text(t) => entry::acl_pairs(t.unwrap_or_default()).for_each(|(i, r)| add(i, r)),
        Acl::Pairs(p) => p.iter().for_each(|&(i, r)| add(i, r)),
    }
    out.push(b'{');
    let mut first = true;
    for &(id, rights) in inline[..n].iter().chain(spill.iter()) {
        if !first {
            out.extend_from_slice(b", ");
        }
        first = false;
        json_bytes(out, id);
        out.extend_from_slice(b": ");
        json_bytes(out, rights);
    }
    out.push(b'}');
}

/// The parts of an entry that the JSON shows, borrowed from an [`Entry`] or from the value
/// bytes of a plain `N` record.
struct JsonView<'a> {
    name: &'a [u8],
    mbtype: u32,
    partition: Option<&'a [u8]>,
    server: Option<&'a [u8]>,
    acl: Acl<'a>,
    uniqueid: Option<&'a [u8]>,
    legacy_specialuse: Option<&'a [u8]>,
    mtime: i64,
    uidvalidity: u32,
    createdmodseq: u64,
    foldermodseq: u64,
    name_history: &'a [FormerName],
    /// Every string above is known to be UTF-8 without NUL (so none is cut or left out).
    checked: bool,
}

impl<'a> JsonView<'a> {
    fn of(e: &'a Entry) -> Self {
        JsonView {
            name: &e.name,
            mbtype: e.mbtype,
            partition: e.partition.as_deref(),
            server: e.server.as_deref(),
            acl: Acl::Text(e.acl.as_deref()),
            uniqueid: e.uniqueid.as_deref(),
            legacy_specialuse: e.legacy_specialuse.as_deref(),
            mtime: e.mtime,
            uidvalidity: e.uidvalidity,
            createdmodseq: e.createdmodseq,
            foldermodseq: e.foldermodseq,
            name_history: &e.name_history,
            checked: false,
        }
    }

    /// `s` as `json_string` takes it: up to a NUL, when UTF-8.
    fn text<'s>(&self, s: &'s [u8]) -> Option<&'s [u8]> {
        if self.checked {
            Some(s)
        } else {
            utf8(s).map(str::as_bytes)
        }
    }

    /// `ascii`: the value (and so every string of `f`) is ASCII; `f` has no NUL.
    fn plain(name: &'a [u8], f: &'a entry::PlainN<'a>, ascii: bool) -> Self {
        JsonView {
            name,
            mbtype: f.mbtype,
            partition: f.partition,
            server: f.server,
            acl: if f.saw_acl {
                Acl::Pairs(f.acl_pairs())
            } else {
                Acl::Text(None)
            },
            uniqueid: f.uniqueid,
            legacy_specialuse: None,
            mtime: f.mtime,
            uidvalidity: f.uidvalidity,
            createdmodseq: f.createdmodseq,
            foldermodseq: f.foldermodseq,
            name_history: &[],
            checked: ascii && name.is_ascii(),
        }
    }
}

/// The JSON text of one entry: `"<name>": {…}` (empty when the name is not UTF-8, which is
/// what Cyrus prints, §8.4 quirks).
pub fn entry_json(out: &mut Vec<u8>, e: &Entry) -> Result<(), EntryError> {
    view_json(out, &JsonView::of(e))
}

fn view_json(out: &mut Vec<u8>, e: &JsonView<'_>) -> Result<(), EntryError> {
    let mut lbuf = [0u8; 7];
    let letters = mbtype::letters(e.mbtype, &mut lbuf)?;
    let Some(name) = e.text(e.name) else {
        return Ok(());
    };
    // The history letters are checked up front so that an abort leaves `out` untouched.
    for h in e.name_history {
        mbtype::letters(h.mbtype, &mut [0u8; 7])?;
    }
    json_bytes(out, name);
    out.extend_from_slice(b": {");
    let mut first = true;
    member_str(out, &mut first, b"name", name);
    member_i64(out, &mut first, b"mtime", e.mtime);
    member_u64(out, &mut first, b"uidvalidity", u64::from(e.uidvalidity));
    member_u64(out, &mut first, b"createdmodseq", e.createdmodseq);
    member_u64(out, &mut first, b"foldermodseq", e.foldermodseq);
    member_str(out, &mut first, b"mbtype", letters.as_bytes());
    if let Some(p) = e.partition.and_then(|s| e.text(s)) {
        member_str(out, &mut first, b"partition", p);
    }
    if let Some(s) = e.server.and_then(|s| e.text(s)) {
        member_str(out, &mut first, b"server", s);
    }
    out.extend_from_slice(b", \"acl\": ");
    acl_json_of(out, e.acl, e.checked);
    if let Some(u) = e.uniqueid.and_then(|s| e.text(s)) {
        member_str(out, &mut first, b"uniqueid", u);
    }
    if let Some(u) = e.legacy_specialuse.and_then(|s| e.text(s)) {
        member_str(out, &mut first, b"legacy_specialuse", u);
    }
    out.extend_from_slice(b", \"name_history\": [");
    for (i, h) in e.name_history.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(b", ");
        }
        out.push(b'{');
        let mut f = true;
        if let Some(n) = utf8(&h.name) {
            member_str(out, &mut f, b"name", n.as_bytes());
        }
        member_i64(out, &mut f, b"mtime", h.mtime);
        member_u64(out, &mut f, b"uidvalidity", u64::from(h.uidvalidity));
        member_u64(out, &mut f, b"createdmodseq", h.createdmodseq);
        member_u64(out, &mut f, b"foldermodseq", h.foldermodseq);
        let mut hl = [0u8; 7];
        let hletters = mbtype::letters(h.mbtype, &mut hl)?;
        member_str(out, &mut f, b"mbtype", hletters.as_bytes());
        if let Some(p) = h.partition.as_deref().and_then(utf8) {
            member_str(out, &mut f, b"partition", p.as_bytes());
        }
        out.push(b'}');
    }
    out.extend_from_slice(b"]}");
    Ok(())
}

/// [`mboxname::from_dbname_cyrus`]`(db)` into `out`, reusing its allocation; `db` has no
/// NUL (it went through `cstr`). For the dbnames
/// Cyrus writes (no NUL, no empty domain, no empty part, not `DELETED…`) Cyrus' transform is
/// the plain one of [`mboxname::from_dbname_into`]: each 0x1F a `.`, each `.` a `^`, the
/// domain's 0x1D a `!`. Anything else takes the Cyrus transform itself.
fn dump_name(db: &[u8], out: &mut Vec<u8>) {
    use mboxname::{DELETED_PREFIX, DOMAIN_SEP, HIER_SEP};
    let rest = match db.iter().position(|&b| b == DOMAIN_SEP) {
        Some(0) => None,
        Some(i) => Some(&db[i + 1..]),
        None => Some(db),
    };
    let plain = rest.is_some_and(|r| {
        r.first().is_some_and(|&b| b != HIER_SEP)
            && r.last() != Some(&HIER_SEP)
            && !r.windows(2).any(|w| w == [HIER_SEP, HIER_SEP])
            && !r.starts_with(DELETED_PREFIX)
    });
    if plain {
        mboxname::from_dbname_into(db, out);
    } else {
        *out = mboxname::from_dbname_cyrus(db);
    }
}

/// What `ctl_mboxlist -d` prints.
#[derive(Debug, Clone, Default)]
pub struct DumpOptions {
    /// `-y`: include intermediates.
    pub intermediates: bool,
    /// `-p part`: only entries whose partition is exactly this (tombstones never match).
    pub partition: Option<Vec<u8>>,
}

/// Counters of one dump.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DumpStats {
    /// Entries printed.
    pub printed: u64,
    /// N records that do not parse (Cyrus skips them silently).
    pub unreadable: u64,
    /// Records that are not N records.
    pub other_keys: u64,
}

/// Output is handed to the writer in chunks of about this size.
const DUMP_CHUNK: usize = 64 * 1024;

/// Streaming `ctl_mboxlist -d [-y]` writer: feed it every raw (key, value) in database order.
pub struct DumpWriter<W: Write> {
    out: W,
    opts: DumpOptions,
    /// Output not yet handed to `out` (whole entries only).
    buf: Vec<u8>,
    /// The name of the entry being written (reused).
    name: Vec<u8>,
    started: bool,
    stats: DumpStats,
}

impl<W: Write> DumpWriter<W> {
    /// Writes the opening `{` line.
    pub fn new(mut out: W, opts: DumpOptions) -> io::Result<Self> {
        out.write_all(b"{\n")?;
        Ok(DumpWriter {
            out,
            opts,
            buf: Vec::with_capacity(DUMP_CHUNK + 4096),
            name: Vec::with_capacity(256),
            started: false,
            stats: DumpStats::default(),
        })
    }

    /// One raw record. Only `N` keys are printed (`mboxlist_allmbox` iterates the `N` prefix);
    /// unreadable values are skipped as Cyrus skips them; values on which Cyrus aborts are
    /// errors.
    pub fn record(&mut self, key: &[u8], value: &[u8]) -> Result<(), DumpError> {
        let KeyKind::Name(dbname) = entry::key_kind(key) else {
            self.stats.other_keys += 1;
            return Ok(());
        };
        let r = self.name_record(dbname, value);
        r.map_err(|source| {
            // What was printed before stays printed, as when every entry was written at once.
            let _ = self.flush_buf();
            DumpError::Entry {
                key: show(key),
                source,
            }
        })
    }

    fn name_record(&mut self, dbname: &[u8], value: &[u8]) -> Result<(), EntryError> {
        // The values Cyrus writes, without building an `Entry`.
        if let Some(f) = entry::parse_n_plain(value) {
            if self.skipped(f.mbtype, f.partition) {
                return Ok(());
            }
            let db = cstr(dbname);
            let mut name = std::mem::take(&mut self.name);
            dump_name(&db[..db.len().min(MAX_MAILBOX_NAME)], &mut name);
            let r = self.push(&JsonView::plain(&name, &f, value.is_ascii()));
            self.name = name;
            return r;
        }
        let e = match parse_entry(Some(dbname), value) {
            Ok(e) => e,
            Err(EntryError::BadFormat(_)) => {
                self.stats.unreadable += 1;
                return Ok(());
            }
            Err(err) => return Err(err),
        };
        self.entry(&e)
    }

    /// `-y` and `-p`.
    fn skipped(&self, mbtype: u32, partition: Option<&[u8]>) -> bool {
        if mbtype & mbtype::INTERMEDIATE != 0 && !self.opts.intermediates {
            return true;
        }
        if let Some(p) = &self.opts.partition {
            if partition.map(cstr) != Some(cstr(p)) {
                return true;
            }
        }
        false
    }

    /// One parsed entry, filtered like `-d [-y] [-p]`.
    pub fn entry(&mut self, e: &Entry) -> Result<(), EntryError> {
        if self.skipped(e.mbtype, e.partition.as_deref()) {
            return Ok(());
        }
        self.push(&JsonView::of(e)).inspect_err(|_| {
            let _ = self.flush_buf();
        })
    }

    fn push(&mut self, v: &JsonView<'_>) -> Result<(), EntryError> {
        let mark = self.buf.len();
        if self.started {
            self.buf.extend_from_slice(b",\n");
        }
        if let Err(err) = view_json(&mut self.buf, v) {
            self.buf.truncate(mark);
            return Err(err);
        }
        self.started = true;
        self.stats.printed += 1;
        if self.buf.len() >= DUMP_CHUNK {
            self.flush_buf()
                .map_err(|err| EntryError::BadFormat(format!("write: {err}")))?;
        }
        Ok(())
    }

    fn flush_buf(&mut self) -> io::Result<()> {
        let r = self.out.write_all(&self.buf);
        self.buf.clear();
        r
    }

    /// Writes the closing `\n}\n` and returns the output and the counters.
    pub fn finish(mut self) -> io::Result<(W, DumpStats)> {
        self.buf.extend_from_slice(b"\n}\n");
        self.flush_buf()?;
        self.out.flush()?;
        Ok((self.out, self.stats))
    }
}

#[cfg(test)]
mod writer_tests {
    use super::*;

    /// What [`DumpWriter::record`] printed before it had a fast path: `parse_entry`, then
    /// the entry.
    fn general(key: &[u8], value: &[u8], opts: &DumpOptions) -> Result<Vec<u8>, String> {
        let mut w = DumpWriter::new(Vec::new(), opts.clone()).unwrap();
        let KeyKind::Name(dbname) = entry::key_kind(key) else {
            unreachable!()
        };
        match parse_entry(Some(dbname), value) {
            Ok(e) => w.entry(&e).map_err(|e| e.to_string())?,
            Err(EntryError::BadFormat(_)) => {}
            Err(e) => return Err(e.to_string()),
        }
        Ok(w.finish().unwrap().0)
    }

    fn fast(key: &[u8], value: &[u8], opts: &DumpOptions) -> Result<Vec<u8>, String> {
        let mut w = DumpWriter::new(Vec::new(), opts.clone()).unwrap();
        w.record(key, value).map_err(|e| match e {
            DumpError::Entry { source, .. } => source.to_string(),
            other => other.to_string(),
        })?;
        Ok(w.finish().unwrap().0)
    }

    #[test]
    fn record_prints_what_parse_entry_and_entry_print() {
        let keys: &[&[u8]] = &[
            b"Nuser\x1Fbob",
            b"Nuser\x1Fbob\x1FSent",
            b"Nexample.com\x1Duser\x1Fa.b\x1Fx^y",
            b"Nshared\x1F\x1Fx",
            b"N\x1Fuser\x1Fq",
            b"N\x1Duser\x1Fq",
            b"NDELETED\x1Fuser\x1Fq\x1F5F000000",
            b"NDELETED\x1Fuser\x1Fq\x1Fxyz",
            b"Nuser\x1Fb\x00ob",
            b"Nu\xC3\xA9\x1Fx",
            b"Nu\xFF",
            b"N",
        ];
        let opts = [
            DumpOptions::default(),
            DumpOptions {
                intermediates: true,
                partition: Some(b"default".to_vec()),
            },
        ];
        for (i, v) in entry::sample_n_values(11, 6000).iter().enumerate() {
            let key = keys[i % keys.len()];
            let o = &opts[i % 2];
            assert_eq!(
                fast(key, v, o),
                general(key, v, o),
                "{:?} {:?}",
                show(key),
                show(v)
            );
        }
    }

    #[test]
    fn dump_name_is_cyrus_transform() {
        let parts: &[&[u8]] = &[
            b"user",
            b"DELETED",
            b"a.b",
            b"x^y",
            b"",
            b"\x1F",
            b"\x1D",
            b"5F000000",
            b"bob",
            b"\xC3\xA9",
        ];
        let mut state = 5u64;
        let mut out = Vec::new();
        for _ in 0..20_000 {
            let mut db = Vec::new();
            for _ in 0..(state >> 60) {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                db.extend_from_slice(parts[(state >> 33) as usize % parts.len()]);
            }
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            dump_name(&db, &mut out);
            assert_eq!(out, mboxname::from_dbname_cyrus(&db), "{:?}", show(&db));
        }
    }
}

/// One line of the 2.3.10–3.4 `-d` form: `name TAB mbtype SP [server!]partition SP acl LF`,
/// mbtype in 3.4 bits (which 2.x–3.4 `ctl_mboxlist -u` all read).
pub fn write_legacy_line(out: &mut Vec<u8>, e: &Entry) -> Result<(), EntryError> {
    out.extend_from_slice(&e.name);
    out.push(b'\t');
    write!(out, "{}", mbtype34::from_36(e.mbtype)?).expect("Vec write");
    out.push(b' ');
    entry::push_location(out, e);
    out.push(b' ');
    out.extend_from_slice(e.acl.as_deref().unwrap_or_default());
    out.push(b'\n');
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Undump.

/// Input formats of [`Undump`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UndumpFormat {
    /// 3.6+ JSON (`ctl_mboxlist -u`).
    Json,
    /// 3.5-dev lines (`ctl_mboxlist -u -L`), numbers in 3.6 bits.
    Legacy36,
    /// 2.0–3.4 `-d` lines, numbers in 2.x/3.4 bits (translated).
    Lines2x,
}

/// How undumped entries get their `M`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MtimePolicy {
    /// Keep the dump's mtime where it has one, else use this time.
    FromDump { fallback: i64 },
    /// Cyrus's behaviour: every record gets this time.
    Fixed(i64),
}

/// The records `ctl_mboxlist -u` would leave in an empty `mailboxes.db`, kept in raw key
/// order. Holds every record in memory (the reference model; [`undump_stream`] gives the
/// same records in constant memory, and replays on an `Undump` only the entries that share
/// keys).
#[derive(Debug, Default)]
pub struct Undump {
    records: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Messages Cyrus would print on stderr (and ours).
    pub warnings: Vec<String>,
    /// Entries written.
    pub stored: u64,
    /// Entries skipped.
    pub skipped: u64,
}

impl Undump {
    pub fn new() -> Self {
        Self::default()
    }

    /// The records, sorted by raw byte order (twoskip's comparator).
    pub fn into_records(self) -> BTreeMap<Vec<u8>, Vec<u8>> {
        self.records
    }

    /// Number of records (N and I).
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    fn lookup_i(&self, uniqueid: &[u8]) -> Result<Option<Entry>, EntryError> {
        match self.records.get(&entry::i_key(uniqueid)) {
            None => Ok(None),
            Some(v) => {
                let e = parse_entry(None, v)?;
                if e.mbtype & mbtype::RESERVE != 0 {
                    return Err(EntryError::BadFormat(
                        "the uniqueid belongs to a reserved mailbox (IMAP_MAILBOX_RESERVED)".into(),
                    ));
                }
                Ok(Some(e))
            }
        }
    }

    /// `mboxlist_update_entry(e.name, e)` on our records: write the N record and, when there
    /// is a uniqueid, the I record with the rename history. `Err(BadFormat)` means Cyrus
    /// would abort this entry's transaction (nothing written); `Err(Abort)` means Cyrus
    /// would die.
    pub fn update(&mut self, e: &Entry) -> Result<(), EntryError> {
        let dbname = mboxname::to_dbname_cyrus(&e.name);
        let nkey = entry::n_key(&dbname);
        let old = match self.records.get(&nkey) {
            Some(v) => Some(parse_entry(Some(&dbname), v)?),
            None => None,
        };
        let mut delete_i = None;
        if let Some(old_uid) = old.as_ref().and_then(|o| o.uniqueid.clone()) {
            if e.uniqueid.as_deref() != Some(&old_uid[..]) {
                if let Some(oldi) = self.lookup_i(&old_uid)? {
                    if cstr(&e.name) == oldi.name.as_slice() {
                        delete_i = Some(entry::i_key(&old_uid));
                    }
                }
            }
        }
        let nval = encode_n_value(e)?;
        let mut ival = None;
        if let Some(uid) = &e.uniqueid {
            let oldi = self.lookup_i(uid)?;
            let mut newi = e.clone();
            if let Some(mut oldi) = oldi {
                if cstr(&e.name) != oldi.name.as_slice() {
                    newi.name_history.push(FormerName {
                        name: oldi.name.clone(),
                        mtime: oldi.mtime,
                        uidvalidity: oldi.uidvalidity,
                        createdmodseq: oldi.createdmodseq,
                        foldermodseq: oldi.foldermodseq,
                        mbtype: oldi.mbtype,
                        partition: oldi.partition.clone(),
                    });
                }
                newi.name_history.append(&mut oldi.name_history);
            }
            ival = Some((entry::i_key(uid), encode_i_value(&newi, &dbname)?));
        }
        if let Some(k) = delete_i {
            self.records.remove(&k);
        }
        self.records.insert(nkey, nval);
        if let Some((k, v)) = ival {
            self.records.insert(k, v);
        }
        Ok(())
    }

    /// Store one entry; per-entry failures become warnings (Cyrus ignores the result of
    /// `mboxlist_updatelock` in `-u`), aborts are returned.
    fn store(&mut self, e: &Entry, what: &str) -> Result<bool, EntryError> {
        match self.update(e) {
            Ok(()) => {
                self.stored += 1;
                Ok(true)
            }
            Err(EntryError::BadFormat(why)) => {
                self.warnings.push(format!("{what}: not stored: {why}"));
                self.skipped += 1;
                Ok(false)
            }
            Err(err) => Err(err),
        }
    }

    /// Read a whole dump: JSON if its first non-blank byte is `{` (or `[`), else lines
    /// (`-L` lines if `legacy_l`, else 2.x/3.4 lines).
    pub fn read_auto<R: BufRead>(
        &mut self,
        mut input: R,
        legacy_l: bool,
        mtime: MtimePolicy,
    ) -> Result<(), DumpError> {
        let first = loop {
            let buf = input.fill_buf()?;
            if buf.is_empty() {
                break None;
            }
            match buf.iter().position(|b| !b.is_ascii_whitespace()) {
                Some(i) => break Some(buf[i]),
                None => {
                    let n = buf.len();
                    input.consume(n);
                }
            }
        };
        match (first, legacy_l) {
            (None, _) => Ok(()),
            (_, true) => self.read_lines(input, UndumpFormat::Legacy36, mtime),
            (Some(b'{' | b'['), false) => self.read_json(input, mtime),
            _ => self.read_lines(input, UndumpFormat::Lines2x, mtime),
        }
    }

    /// `do_undump`: one JSON object, members in file order (a repeated name keeps its first
    /// position and its last value, as jansson does). The members are parsed one at a time,
    /// but all are held until the end (for the repeated names).
    pub fn read_json<R: Read>(&mut self, input: R, mtime: MtimePolicy) -> Result<(), DumpError> {
        let mut members: Vec<(String, serde_json::Value)> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        json_members(io::BufReader::new(input), |name, v| {
            match index.get(&name) {
                Some(&i) => members[i].1 = v,
                None => {
                    index.insert(name.clone(), members.len());
                    members.push((name, v));
                }
            }
            Ok(())
        })?;
        drop(index);
        for (name, v) in members {
            let e = match json_entry(&name, &v, mtime, &mut self.warnings) {
                Ok(Some(e)) => e,
                Ok(None) => {
                    self.skipped += 1;
                    continue;
                }
                Err(source) => return Err(DumpError::Entry { key: name, source }),
            };
            self.store(&e, &name)
                .map_err(|source| DumpError::Entry { key: name, source })?;
        }
        Ok(())
    }

    /// Line formats: `-L` (`do_undump_legacy`) or 2.x/3.4 `-d` lines.
    pub fn read_lines<R: BufRead>(
        &mut self,
        mut input: R,
        format: UndumpFormat,
        mtime: MtimePolicy,
    ) -> Result<(), DumpError> {
        let mut line = Vec::new();
        let mut n = 0u64;
        loop {
            line.clear();
            if input.read_until(b'\n', &mut line)? == 0 {
                break;
            }
            n += 1;
            let what = format!("line {n}");
            let parsed = match format {
                UndumpFormat::Legacy36 => parse_l_line(&line, mtime),
                _ => parse_2x_line(&line, mtime),
            };
            let e = match parsed {
                Ok(Some(e)) => e,
                Ok(None) => {
                    self.warnings.push(format!("{what}: no partition found"));
                    self.skipped += 1;
                    continue;
                }
                Err(LineSkip(why)) => {
                    self.warnings.push(format!("{what}: {why}"));
                    self.skipped += 1;
                    continue;
                }
            };
            match self.store(&e, &what) {
                Ok(true) => {}
                // `-L` stops at the first failed update (`if (r) break;`).
                Ok(false) if format == UndumpFormat::Legacy36 => break,
                Ok(false) => {}
                Err(source) => return Err(DumpError::Entry { key: what, source }),
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Streaming undump.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::hash::{DefaultHasher, Hasher};
use std::io::{BufReader, BufWriter, Seek, SeekFrom};

use super::db::Order;

/// One raw record.
type KeyValue = (Vec<u8>, Vec<u8>);

/// Options of [`undump_stream`].
#[derive(Debug, Clone, Copy)]
pub struct UndumpOptions {
    /// Read 3.5-dev `-L` lines instead of JSON or 2.x/3.4 lines.
    pub legacy_l: bool,
    pub mtime: MtimePolicy,
    /// The order of the records produced: the target backend's
    /// ([`super::db::Backend::default_order`]).
    pub order: Order,
}

/// Counters of [`undump_stream`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UndumpStats {
    /// Entries written.
    pub stored: u64,
    /// Entries skipped.
    pub skipped: u64,
    /// Entries that share their name record or uniqueid with another entry of the input and
    /// were therefore replayed in memory.
    pub interacting: u64,
}

/// [`Undump`] in (near) constant memory: the records `ctl_mboxlist -u [-L]` would leave in
/// an empty `mailboxes.db`, read from `input` (which is read two or three times, from its
/// current position) and returned sorted in `opts.order`, byte for byte what
/// [`Undump::read_auto`] followed by [`Undump::into_records`] gives (the unit tests compare
/// the two). Warnings go to `warn` as they arise, in input order.
///
/// How: `mboxlist_update_entry` depends on earlier entries only through the entry's own
/// name record and its uniqueid's `I` record. Pass 1 reads the input and keeps one 64-bit
/// hash of each of those keys (the only state that grows with the input: 16 bytes per
/// entry). An entry whose two keys occur nowhere else in the input cannot see or change any
/// other entry's records, so its records are those of an empty database; the few entries
/// that do share a key (a renamed mailbox listed twice, a JSON name repeated, names Cyrus
/// keys alike, or a hash collision) are replayed in input order on an in-memory [`Undump`]
/// of their own, exactly as Cyrus would. For JSON, when a name repeats, one extra pass
/// collects the repeated members' last values (jansson keeps a repeated name at its first
/// position with its last value). Pass 2 then produces the records into a [`SortSpill`],
/// which keeps at most a fixed budget in memory and spills sorted runs to anonymous
/// temporary files (in `TMPDIR`). JSON members are parsed one at a time, lines one at a
/// time; the document is never held whole. A JSON syntax error (reported with its line and
/// column) or a `\u0000` anywhere is found in pass 1, before any entry is processed, as
/// jansson refuses the document before `do_undump` starts.
pub fn undump_stream<R: Read + Seek>(
    mut input: R,
    opts: &UndumpOptions,
    warn: &mut dyn FnMut(String),
) -> Result<(SortedRecords, UndumpStats), DumpError> {
    let start = input.stream_position()?;
    let format = match (first_byte(&mut input)?, opts.legacy_l) {
        (None, _) => return Ok((SortedRecords::empty(), UndumpStats::default())),
        (_, true) => UndumpFormat::Legacy36,
        (Some(b'{' | b'['), false) => UndumpFormat::Json,
        _ => UndumpFormat::Lines2x,
    };

    // Pass 1: the keys each entry touches. Every member's name counts (a repeated name
    // matters even when a value is skipped); a uniqueid counts only when its member would be
    // stored, so that a tombstone (no partition) does not tie itself to the renamed mailbox.
    let mut hashes = Vec::new();
    let mut scratch = Vec::new();
    match format {
        UndumpFormat::Json => json_members(rewind(&mut input, start)?, |name, v| {
            hashes.push(n_hash(name.as_bytes()));
            if let Ok(Some(e)) = json_entry(&name, &v, opts.mtime, &mut scratch) {
                if let Some(u) = &e.uniqueid {
                    hashes.push(i_hash(u));
                }
            }
            scratch.clear();
            Ok(())
        })?,
        _ => for_each_line(rewind(&mut input, start)?, |_, line| {
            let parsed = match format {
                UndumpFormat::Legacy36 => parse_l_line(line, opts.mtime),
                _ => parse_2x_line(line, opts.mtime),
            };
            if let Ok(Some(e)) = parsed {
                hashes.push(n_hash(&e.name));
                if let Some(u) = &e.uniqueid {
                    hashes.push(i_hash(u));
                }
            }
            Ok(true)
        })?,
    }
    hashes.sort_unstable();
    let dups: HashSet<u64> = hashes
        .windows(2)
        .filter(|w| w[0] == w[1])
        .map(|w| w[0])
        .collect();
    drop(hashes);

    // Pass 1b (JSON with repeated names only): the last value of each repeated name.
    let mut last_values: HashMap<String, serde_json::Value> = HashMap::new();
    if format == UndumpFormat::Json && !dups.is_empty() {
        let mut seen: HashMap<String, (u32, serde_json::Value)> = HashMap::new();
        json_members(rewind(&mut input, start)?, |name, v| {
            if dups.contains(&n_hash(name.as_bytes())) {
                let slot = seen.entry(name).or_insert((0, serde_json::Value::Null));
                slot.0 += 1;
                slot.1 = v;
            }
            Ok(())
        })?;
        last_values = seen
            .into_iter()
            .filter(|(_, (n, _))| *n > 1)
            .map(|(k, (_, v))| (k, v))
            .collect();
    }

    // Pass 2: the records.
    let mut run = Replay {
        dups,
        sub: Undump::new(),
        spill: SortSpill::new(opts.order),
        warn,
        stats: UndumpStats::default(),
    };
    match format {
        UndumpFormat::Json => {
            let mut done = HashSet::new();
            json_members(rewind(&mut input, start)?, |name, v| {
                let v = if done.contains(&name) {
                    return Ok(());
                } else if let Some(last) = last_values.remove(&name) {
                    done.insert(name.clone());
                    last
                } else {
                    v
                };
                run.json_member(&name, &v, opts.mtime)
            })?
        }
        _ => for_each_line(rewind(&mut input, start)?, |n, line| {
            run.line(n, line, format, opts.mtime)
        })?,
    }
    let Replay {
        sub,
        mut spill,
        stats,
        ..
    } = run;
    for (k, v) in sub.records {
        spill.push(k, v)?;
    }
    Ok((spill.finish()?, stats))
}

fn rewind<R: Read + Seek>(input: &mut R, start: u64) -> Result<BufReader<&mut R>, DumpError> {
    input.seek(SeekFrom::Start(start))?;
    Ok(BufReader::with_capacity(1 << 16, input))
}

/// The first non-white byte of `input` (consumed; the caller seeks back).
fn first_byte<R: Read>(input: R) -> io::Result<Option<u8>> {
    let mut r = BufReader::with_capacity(1 << 12, input);
    loop {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            return Ok(None);
        }
        match buf.iter().position(|b| !b.is_ascii_whitespace()) {
            Some(i) => return Ok(Some(buf[i])),
            None => {
                let n = buf.len();
                r.consume(n);
            }
        }
    }
}

fn key_hash(prefix: u8, key: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    h.write_u8(prefix);
    h.write(key);
    h.finish()
}

/// The hash of the name record key an entry named `name` is stored under.
fn n_hash(name: &[u8]) -> u64 {
    key_hash(b'N', &mboxname::to_dbname_cyrus(name))
}

/// The hash of the `I` record key of `uniqueid`.
fn i_hash(uniqueid: &[u8]) -> u64 {
    key_hash(b'I', uniqueid)
}

/// The records `mboxlist_update_entry` writes for `e` in a database that holds neither its
/// name record nor its uniqueid's record ([`Undump::update`] on an empty [`Undump`]).
fn fresh_records(e: &Entry) -> Result<(KeyValue, Option<KeyValue>), EntryError> {
    let dbname = mboxname::to_dbname_cyrus(&e.name);
    let nval = encode_n_value(e)?;
    let i = match &e.uniqueid {
        Some(uid) => Some((entry::i_key(uid), encode_i_value(e, &dbname)?)),
        None => None,
    };
    Ok(((entry::n_key(&dbname), nval), i))
}

/// Pass 2 of [`undump_stream`].
struct Replay<'w> {
    /// Key hashes that occur more than once in the input.
    dups: HashSet<u64>,
    /// The records of the entries that share keys.
    sub: Undump,
    spill: SortSpill,
    warn: &'w mut dyn FnMut(String),
    stats: UndumpStats,
}

impl Replay<'_> {
    fn interacting(&self, e: &Entry) -> bool {
        !self.dups.is_empty()
            && (self.dups.contains(&n_hash(&e.name))
                || e.uniqueid
                    .as_deref()
                    .is_some_and(|u| self.dups.contains(&i_hash(u))))
    }

    /// [`Undump::store`]: whether the entry was stored.
    fn store(&mut self, e: &Entry, what: &str) -> Result<bool, DumpError> {
        let r = if self.interacting(e) {
            self.stats.interacting += 1;
            self.sub.update(e)
        } else {
            match fresh_records(e) {
                Ok(((nk, nv), i)) => {
                    self.spill.push(nk, nv)?;
                    if let Some((ik, iv)) = i {
                        self.spill.push(ik, iv)?;
                    }
                    Ok(())
                }
                Err(err) => Err(err),
            }
        };
        match r {
            Ok(()) => {
                self.stats.stored += 1;
                Ok(true)
            }
            Err(EntryError::BadFormat(why)) => {
                (self.warn)(format!("{what}: not stored: {why}"));
                self.stats.skipped += 1;
                Ok(false)
            }
            Err(source) => Err(DumpError::Entry {
                key: what.to_owned(),
                source,
            }),
        }
    }

    /// One `do_undump` member (as [`Undump::read_json`]).
    fn json_member(
        &mut self,
        name: &str,
        v: &serde_json::Value,
        mtime: MtimePolicy,
    ) -> Result<(), DumpError> {
        let mut warnings = Vec::new();
        let parsed = json_entry(name, v, mtime, &mut warnings);
        for w in warnings {
            (self.warn)(w);
        }
        match parsed {
            Ok(Some(e)) => {
                self.store(&e, name)?;
            }
            Ok(None) => self.stats.skipped += 1,
            Err(source) => {
                return Err(DumpError::Entry {
                    key: name.to_owned(),
                    source,
                })
            }
        }
        Ok(())
    }

    /// One dump line (as [`Undump::read_lines`]); false: stop reading.
    fn line(
        &mut self,
        n: u64,
        line: &[u8],
        format: UndumpFormat,
        mtime: MtimePolicy,
    ) -> Result<bool, DumpError> {
        let what = format!("line {n}");
        let parsed = match format {
            UndumpFormat::Legacy36 => parse_l_line(line, mtime),
            _ => parse_2x_line(line, mtime),
        };
        let e = match parsed {
            Ok(Some(e)) => e,
            Ok(None) => {
                (self.warn)(format!("{what}: no partition found"));
                self.stats.skipped += 1;
                return Ok(true);
            }
            Err(LineSkip(why)) => {
                (self.warn)(format!("{what}: {why}"));
                self.stats.skipped += 1;
                return Ok(true);
            }
        };
        let stored = self.store(&e, &what)?;
        // `-L` stops at the first failed update (`if (r) break;`).
        Ok(stored || format != UndumpFormat::Legacy36)
    }
}

/// Calls `f` on each line of `input` (with its LF) and its number, until `f` says false.
fn for_each_line<R: BufRead>(
    mut input: R,
    mut f: impl FnMut(u64, &[u8]) -> Result<bool, DumpError>,
) -> Result<(), DumpError> {
    let mut line = Vec::new();
    let mut n = 0u64;
    loop {
        line.clear();
        if input.read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        n += 1;
        if !f(n, &line)? {
            return Ok(());
        }
    }
}

fn nul_error() -> DumpError {
    DumpError::Input("parse error: \\u0000 is not allowed without JSON_ALLOW_NUL".into())
}

/// Calls `f` on each member of the top-level JSON object of `input`, in file order, each
/// value parsed on its own: the document is never held whole. A top-level array is accepted
/// and yields nothing (jansson's `json_object_foreach` sees nothing in it). A syntax error
/// gives serde_json's message with the line and column; a `\u0000` anywhere is refused
/// (jansson without `JSON_ALLOW_NUL`); text after the top-level value is an error.
fn json_members<R: Read>(
    input: R,
    f: impl FnMut(String, serde_json::Value) -> Result<(), DumpError>,
) -> Result<(), DumpError> {
    let mut de = serde_json::Deserializer::from_reader(input);
    let mut stopped = None;
    let r = serde::Deserializer::deserialize_any(
        &mut de,
        TopLevel {
            f,
            stopped: &mut stopped,
        },
    );
    if let Some(err) = stopped {
        return Err(err);
    }
    r.and_then(|()| de.end()).map_err(|e| {
        if e.is_io() {
            DumpError::Io(e.into())
        } else {
            DumpError::Input(format!("parse error: {e}"))
        }
    })
}

/// The visitor of the top-level value of [`json_members`].
struct TopLevel<'a, F> {
    f: F,
    /// The error `f` stopped with (serde sees only a placeholder).
    stopped: &'a mut Option<DumpError>,
}

impl<'de, F> serde::de::Visitor<'de> for TopLevel<'_, F>
where
    F: FnMut(String, serde_json::Value) -> Result<(), DumpError>,
{
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("'[' or '{'")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        while let Some(name) = map.next_key::<String>()? {
            let value: serde_json::Value = map.next_value()?;
            let r = if name.contains('\0') || has_nul(&value) {
                Err(nul_error())
            } else {
                (self.f)(name, value)
            };
            if let Err(err) = r {
                *self.stopped = Some(err);
                return Err(serde::de::Error::custom("stopped"));
            }
        }
        Ok(())
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(v) = seq.next_element::<serde_json::Value>()? {
            if has_nul(&v) {
                *self.stopped = Some(nul_error());
                return Err(serde::de::Error::custom("stopped"));
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// External sort.

/// Bytes of records [`SortSpill`] holds in memory before it writes a sorted run.
pub const SPILL_BUDGET: usize = 16 << 20;
/// Runs merged into one when there are this many (bounds the merge's open files and
/// buffers).
const MAX_RUNS: usize = 64;
/// Per-record bookkeeping counted against the budget (two `Vec`s and their allocations).
const RECORD_OVERHEAD: usize = 80;

/// An external sort of (key, value) records with distinct keys: up to a memory budget is
/// held and sorted in memory; beyond it, sorted runs go to anonymous temporary files and are
/// merged when read back. Memory stays at the budget whatever the number of records.
pub struct SortSpill {
    order: Order,
    budget: usize,
    buf: Vec<(Vec<u8>, Vec<u8>)>,
    bytes: usize,
    runs: Vec<File>,
}

impl SortSpill {
    pub fn new(order: Order) -> Self {
        Self::with_budget(order, SPILL_BUDGET)
    }

    pub fn with_budget(order: Order, budget: usize) -> Self {
        SortSpill {
            order,
            budget,
            buf: Vec::new(),
            bytes: 0,
            runs: Vec::new(),
        }
    }

    pub fn push(&mut self, key: Vec<u8>, value: Vec<u8>) -> io::Result<()> {
        self.bytes += key.len() + value.len() + RECORD_OVERHEAD;
        self.buf.push((key, value));
        if self.bytes >= self.budget {
            self.spill()?;
        }
        Ok(())
    }

    fn sort_buf(&mut self) {
        let order = self.order;
        self.buf.sort_unstable_by(|a, b| order.compare(&a.0, &b.0));
    }

    fn spill(&mut self) -> io::Result<()> {
        self.sort_buf();
        let mut w = BufWriter::with_capacity(1 << 16, anonymous_temp_file()?);
        for (k, v) in self.buf.drain(..) {
            write_run_record(&mut w, &k, &v)?;
        }
        self.bytes = 0;
        self.runs.push(finish_run(w)?);
        if self.runs.len() >= MAX_RUNS {
            let runs = std::mem::take(&mut self.runs);
            let mut merged = Merge::new(self.order, runs)?;
            let mut w = BufWriter::with_capacity(1 << 16, anonymous_temp_file()?);
            while let Some((k, v)) = merged.next_record()? {
                write_run_record(&mut w, &k, &v)?;
            }
            self.runs.push(finish_run(w)?);
        }
        Ok(())
    }

    /// All records pushed, sorted.
    pub fn finish(mut self) -> io::Result<SortedRecords> {
        if self.runs.is_empty() {
            self.sort_buf();
            return Ok(SortedRecords(Sorted::Memory(self.buf.into_iter())));
        }
        if !self.buf.is_empty() {
            self.spill()?;
        }
        Ok(SortedRecords(Sorted::Merge(Merge::new(
            self.order, self.runs,
        )?)))
    }
}

fn write_run_record(w: &mut impl Write, k: &[u8], v: &[u8]) -> io::Result<()> {
    let len = |n: usize| {
        u32::try_from(n)
            .map(u32::to_le_bytes)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "record too large"))
    };
    w.write_all(&len(k.len())?)?;
    w.write_all(&len(v.len())?)?;
    w.write_all(k)?;
    w.write_all(v)
}

fn finish_run(w: BufWriter<File>) -> io::Result<File> {
    let mut f = w.into_inner().map_err(|e| e.into_error())?;
    f.seek(SeekFrom::Start(0))?;
    Ok(f)
}

/// A k-way merge of sorted runs.
struct Merge {
    order: Order,
    runs: Vec<(BufReader<File>, Option<KeyValue>)>,
}

impl Merge {
    fn new(order: Order, files: Vec<File>) -> io::Result<Merge> {
        let mut runs = Vec::with_capacity(files.len());
        for f in files {
            let mut r = BufReader::with_capacity(1 << 15, f);
            let head = read_run_record(&mut r)?;
            runs.push((r, head));
        }
        Ok(Merge { order, runs })
    }

    fn next_record(&mut self) -> io::Result<Option<KeyValue>> {
        let mut best: Option<usize> = None;
        for (i, (_, head)) in self.runs.iter().enumerate() {
            let Some((k, _)) = head else { continue };
            if best.is_none_or(|b| {
                let bk = &self.runs[b].1.as_ref().expect("a run with a head").0;
                self.order.compare(k, bk).is_lt()
            }) {
                best = Some(i);
            }
        }
        let Some(b) = best else { return Ok(None) };
        let (r, head) = &mut self.runs[b];
        let next = read_run_record(r)?;
        Ok(std::mem::replace(head, next))
    }
}

fn read_run_record(r: &mut impl BufRead) -> io::Result<Option<KeyValue>> {
    if r.fill_buf()?.is_empty() {
        return Ok(None);
    }
    let mut lens = [0u8; 8];
    r.read_exact(&mut lens)?;
    let kl = u32::from_le_bytes(lens[..4].try_into().expect("4 bytes")) as usize;
    let vl = u32::from_le_bytes(lens[4..].try_into().expect("4 bytes")) as usize;
    let mut k = vec![0; kl];
    r.read_exact(&mut k)?;
    let mut v = vec![0; vl];
    r.read_exact(&mut v)?;
    Ok(Some((k, v)))
}

enum Sorted {
    Memory(std::vec::IntoIter<(Vec<u8>, Vec<u8>)>),
    Merge(Merge),
    Failed,
}

/// The records of a [`SortSpill`] in order; an I/O error ends them.
pub struct SortedRecords(Sorted);

impl SortedRecords {
    pub fn empty() -> Self {
        SortedRecords(Sorted::Memory(Vec::new().into_iter()))
    }
}

impl Iterator for SortedRecords {
    type Item = io::Result<(Vec<u8>, Vec<u8>)>;

    fn next(&mut self) -> Option<Self::Item> {
        match &mut self.0 {
            Sorted::Memory(it) => it.next().map(Ok),
            Sorted::Merge(m) => match m.next_record() {
                Ok(r) => r.map(Ok),
                Err(e) => {
                    self.0 = Sorted::Failed;
                    Some(Err(e))
                }
            },
            Sorted::Failed => None,
        }
    }
}

/// A new anonymous temporary file: created in the temporary directory (`TMPDIR`, else
/// `/tmp`), mode 0600, and unlinked at once, so it goes away with its last descriptor.
pub fn anonymous_temp_file() -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir();
    loop {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let p = dir.join(format!(
            ".mupdate-spill.{}.{}.{nanos}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&p)
        {
            Ok(f) => {
                std::fs::remove_file(&p)?;
                return Ok(f);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// jansson refuses NUL in strings and keys (no `JSON_ALLOW_NUL`).
fn has_nul(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::String(s) => s.contains('\0'),
        serde_json::Value::Array(a) => a.iter().any(has_nul),
        serde_json::Value::Object(m) => m.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

fn jstr<'a>(v: &'a serde_json::Value, k: &str) -> Option<&'a str> {
    v.get(k).and_then(serde_json::Value::as_str)
}

/// One `do_undump` member → the entry Cyrus would store, `None` when Cyrus skips it.
fn json_entry(
    name: &str,
    v: &serde_json::Value,
    mtime: MtimePolicy,
    warnings: &mut Vec<String>,
) -> Result<Option<Entry>, EntryError> {
    if name.len() >= MAX_MAILBOX_NAME {
        warnings.push(format!("mailbox name too long: {name}"));
        return Ok(None);
    }
    let mut e = Entry {
        name: name.as_bytes().to_vec(),
        ..Entry::default()
    };
    match jstr(v, "uidvalidity") {
        Some(s) => e.uidvalidity = c_strtoul(s.as_bytes(), 10).0 as u32,
        None => warnings.push(format!("missing uidvalidity for {name}")),
    }
    match jstr(v, "createdmodseq") {
        Some(s) => e.createdmodseq = c_strtoul(s.as_bytes(), 10).0,
        None => warnings.push(format!("missing createdmodseq for {name}")),
    }
    match jstr(v, "foldermodseq") {
        Some(s) => e.foldermodseq = c_strtoul(s.as_bytes(), 10).0,
        None => warnings.push(format!("missing foldermodseq for {name}")),
    }
    match jstr(v, "mbtype") {
        Some(s) => e.mbtype = mbtype::from_letters(s.as_bytes())?,
        None => warnings.push(format!("missing mbtype for {name}")),
    }
    match jstr(v, "partition") {
        Some(p) if p.len() >= MAX_PARTITION_LEN => {
            warnings.push(format!("partition too long for {name}"));
            return Ok(None);
        }
        Some(p) => e.partition = Some(p.as_bytes().to_vec()),
        None => {
            // Cyrus's message, sic.
            warnings.push(format!("missing mbtype for {name}"));
            return Ok(None);
        }
    }
    e.server = jstr(v, "server").map(|s| s.as_bytes().to_vec());
    if let Some(a) = v.get("acl") {
        let mut acl = Vec::new();
        if let Some(obj) = a.as_object() {
            for (id, rights) in obj {
                acl.extend_from_slice(id.as_bytes());
                acl.push(b'\t');
                // printf("%s", NULL) prints "(null)" in glibc.
                acl.extend_from_slice(rights.as_str().unwrap_or("(null)").as_bytes());
                acl.push(b'\t');
            }
        }
        e.acl = Some(acl);
    }
    match jstr(v, "uniqueid") {
        Some(u) => e.uniqueid = Some(u.as_bytes().to_vec()),
        None => {
            warnings.push(format!("missing uniqueid for {name}"));
            return Ok(None);
        }
    }
    e.legacy_specialuse = jstr(v, "legacy_specialuse").map(|s| s.as_bytes().to_vec());
    if let Some(items) = v.get("name_history").and_then(serde_json::Value::as_array) {
        for it in items {
            let mut h = FormerName::default();
            if let Some(s) = jstr(it, "name") {
                h.name = s.as_bytes().to_vec();
            }
            if let Some(s) = jstr(it, "mtime") {
                h.mtime = i64::from(c_atoi(s.as_bytes()));
            }
            if let Some(s) = jstr(it, "uidvalidity") {
                h.uidvalidity = c_strtoul(s.as_bytes(), 10).0 as u32;
            }
            if let Some(s) = jstr(it, "createdmodseq") {
                h.createdmodseq = c_strtoul(s.as_bytes(), 10).0;
            }
            if let Some(s) = jstr(it, "foldermodseq") {
                h.foldermodseq = c_strtoul(s.as_bytes(), 10).0;
            }
            if let Some(s) = jstr(it, "mbtype") {
                h.mbtype = mbtype::from_letters(s.as_bytes())?;
            }
            h.partition = jstr(it, "partition").map(|s| s.as_bytes().to_vec());
            e.name_history.push(h);
        }
    }
    e.mtime = match mtime {
        MtimePolicy::Fixed(t) => t,
        MtimePolicy::FromDump { fallback } => match jstr(v, "mtime") {
            Some(s) => c_strtol(s.as_bytes()).0,
            None => fallback,
        },
    };
    Ok(Some(e))
}

/// Why a dump line is skipped.
#[derive(Debug)]
struct LineSkip(String);

/// A tiny `sscanf` for the `-L` patterns: each conversion either matches or stops the scan.
struct Scan<'a> {
    s: &'a [u8],
    i: usize,
}

impl<'a> Scan<'a> {
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace()
            || self.peek() == Some(0x0B)
        {
            self.i += 1;
        }
    }
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    /// `%m[^c]`: one or more bytes other than `c`.
    fn set_not(&mut self, c: u8) -> Option<&'a [u8]> {
        let start = self.i;
        while self.i < self.s.len() && self.s[self.i] != c {
            self.i += 1;
        }
        (self.i > start).then(|| &self.s[start..self.i])
    }
    /// `%ms`: skip white space, then one or more non-white bytes.
    fn word(&mut self) -> Option<&'a [u8]> {
        self.ws();
        let start = self.i;
        while self.i < self.s.len()
            && !(self.s[self.i].is_ascii_whitespace() || self.s[self.i] == 0x0B)
        {
            self.i += 1;
        }
        (self.i > start).then(|| &self.s[start..self.i])
    }
    fn lit(&mut self, c: u8) -> Option<()> {
        (self.peek() == Some(c)).then(|| self.i += 1)
    }
    /// A numeric conversion: the bytes `strtol` would take (white space, sign, digits).
    fn number(&mut self) -> Option<&'a [u8]> {
        self.ws();
        let (_, n) = c_strtol(&self.s[self.i..]);
        if n == 0 {
            return None;
        }
        let r = &self.s[self.i..self.i + n];
        self.i += n;
        Some(r)
    }
}

#[derive(Default)]
struct LFields<'a> {
    name: Option<&'a [u8]>,
    mbtype: i32,
    partition: Option<&'a [u8]>,
    acl: Option<&'a [u8]>,
    uniqueid: Option<&'a [u8]>,
    mtime: Option<i64>,
    uidvalidity: u32,
    foldermodseq: u64,
    createdmodseq: u64,
}

/// The two `sscanf` patterns of `do_undump_legacy`.
fn scan_l(line: &[u8], with_acl: bool) -> LFields<'_> {
    let mut f = LFields::default();
    let mut s = Scan { s: line, i: 0 };
    let _ = (|| -> Option<()> {
        f.name = Some(s.set_not(b'\t')?);
        s.ws();
        f.mbtype = c_strtol(s.number()?).0 as i32;
        f.partition = Some(s.word()?);
        s.ws();
        if with_acl {
            f.acl = Some(s.set_not(b'>')?);
        }
        s.lit(b'>')?;
        f.uniqueid = Some(s.word()?);
        f.mtime = Some(c_strtol(s.number()?).0);
        f.uidvalidity = c_strtoul(s.number()?, 10).0 as u32;
        f.foldermodseq = c_strtoul(s.number()?, 10).0;
        f.createdmodseq = c_strtoul(s.number()?, 10).0;
        Some(())
    })();
    f
}

/// One `-L` line → entry (`Ok(None)`: "no partition found").
fn parse_l_line(line: &[u8], mtime: MtimePolicy) -> Result<Option<Entry>, LineSkip> {
    let mut f = scan_l(line, true);
    if f.acl.is_none() {
        f = scan_l(line, false);
    }
    let Some(loc) = f.partition else {
        return Ok(None);
    };
    let name = f.name.unwrap_or_default();
    let (server, partition) = match loc.iter().position(|&b| b == b'!') {
        Some(i) => (Some(loc[..i].to_vec()), loc[i + 1..].to_vec()),
        None => (None, loc.to_vec()),
    };
    if name.len() >= MAX_MAILBOX_BUFFER {
        return Err(LineSkip("mailbox name too long".into()));
    }
    if partition.len() >= MAX_PARTITION_LEN {
        return Err(LineSkip("partition name too long".into()));
    }
    Ok(Some(Entry {
        name: name.to_vec(),
        mbtype: f.mbtype as u32,
        partition: Some(partition),
        server,
        acl: f.acl.map(<[u8]>::to_vec),
        uniqueid: f.uniqueid.map(<[u8]>::to_vec),
        legacy_specialuse: None,
        mtime: match mtime {
            MtimePolicy::Fixed(t) => t,
            MtimePolicy::FromDump { fallback } => f.mtime.unwrap_or(fallback),
        },
        uidvalidity: f.uidvalidity,
        createdmodseq: f.createdmodseq,
        foldermodseq: f.foldermodseq,
        name_history: Vec::new(),
    }))
}

/// One 2.0–3.4 `-d` line (formats spec §8.2 `-u` rules): name TAB, optional numeric mbtype
/// (2.x/3.4 bits, translated) and one SP, location up to SP or TAB, ACL to CR/LF. No
/// uniqueid, so only an N record results, as on a 3.4 frontend.
fn parse_2x_line(line: &[u8], mtime: MtimePolicy) -> Result<Option<Entry>, LineSkip> {
    let line = match line.iter().position(|&b| b == b'\r' || b == b'\n') {
        Some(i) => &line[..i],
        None => line,
    };
    if line.is_empty() {
        return Err(LineSkip("empty line".into()));
    }
    let Some(tab) = line.iter().position(|&b| b == b'\t') else {
        return Err(LineSkip("no TAB after the mailbox name".into()));
    };
    let name = &line[..tab];
    let mut p = tab + 1;
    let mut bits = 0u32;
    if line.get(p).is_some_and(u8::is_ascii_digit) {
        let (v, n) = c_strtol(&line[p..]);
        bits = v as u32;
        p += n;
        if line.get(p) == Some(&b' ') {
            p += 1;
        }
    }
    let q = line[p..]
        .iter()
        .position(|&b| b == b' ' || b == b'\t')
        .map_or(line.len(), |i| p + i);
    let loc = &line[p..q];
    let acl = line.get(q + 1..).unwrap_or_default();
    let (server, partition) = match loc.iter().position(|&b| b == b'!') {
        Some(i) => (Some(loc[..i].to_vec()), loc[i + 1..].to_vec()),
        None => (None, loc.to_vec()),
    };
    let mbtype = mbtype34::to_36(bits).map_err(|e| LineSkip(e.to_string()))?;
    if name.len() >= MAX_MAILBOX_NAME {
        return Err(LineSkip("mailbox name too long".into()));
    }
    Ok(Some(Entry {
        name: name.to_vec(),
        mbtype,
        partition: Some(partition),
        server,
        acl: Some(acl.to_vec()),
        mtime: match mtime {
            MtimePolicy::Fixed(t) | MtimePolicy::FromDump { fallback: t } => t,
        },
        ..Entry::default()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_escaping() {
        let mut out = Vec::new();
        json_str(&mut out, "a\"b\\c\n\t\u{1}\u{1f}\u{7f}é");
        assert_eq!(out, "\"a\\\"b\\\\c\\n\\t\\u0001\\u001F\u{7f}é\"".as_bytes());
    }

    #[test]
    fn frontend_entry_json() {
        let e = parse_entry(
            Some(b"user\x1Fbob"),
            b"%(T e P default M 1700000000 A %(bob lrswipkxtecdan))",
        )
        .unwrap();
        let mut out = Vec::new();
        entry_json(&mut out, &e).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#""user.bob": {"name": "user.bob", "mtime": "1700000000", "uidvalidity": "0", "createdmodseq": "0", "foldermodseq": "0", "mbtype": "e", "partition": "default", "acl": {"bob": "lrswipkxtecdan"}, "name_history": []}"#
        );
    }

    #[test]
    fn empty_dump_and_invalid_utf8() {
        let w = DumpWriter::new(Vec::new(), DumpOptions::default()).unwrap();
        assert_eq!(w.finish().unwrap().0, b"{\n\n}\n");
        let mut w = DumpWriter::new(Vec::new(), DumpOptions::default()).unwrap();
        w.record(b"Nuser\x1F\xFF", b"%(T e P default M 1)").unwrap();
        w.record(b"Nuser\x1F\xFE", b"%(T e P default M 1)").unwrap();
        assert_eq!(w.finish().unwrap().0, b"{\n,\n\n}\n");
    }

    #[test]
    fn acl_duplicates_and_tabs() {
        let mut out = Vec::new();
        acl_json(&mut out, Some(b"a\tlr\tb\tx\ta\tlrs\t"));
        assert_eq!(out, br#"{"a": "lrs", "b": "x"}"#);
    }

    #[test]
    fn l_lines() {
        let e = parse_l_line(
            b"user.remote\t16 be2!default remote\tlrswipkxtecdan\t\n",
            MtimePolicy::Fixed(5),
        )
        .unwrap()
        .unwrap();
        assert_eq!(e.mbtype, mbtype::REMOTE);
        assert_eq!(e.server.as_deref(), Some(&b"be2"[..]));
        assert_eq!(e.acl.as_deref(), Some(&b"remote\tlrswipkxtecdan\t\n"[..]));
        assert_eq!(e.uniqueid, None);
        let e = parse_l_line(
            b"user.bob\t0 default bob\tlr\t>u1 1700000001 7 9 8 \\Sent\n",
            MtimePolicy::FromDump { fallback: 0 },
        )
        .unwrap()
        .unwrap();
        assert_eq!(e.uniqueid.as_deref(), Some(&b"u1"[..]));
        assert_eq!(
            (e.mtime, e.uidvalidity, e.foldermodseq, e.createdmodseq),
            (1700000001, 7, 9, 8)
        );
        let e = parse_l_line(b"cal\t9 default >u2 1 2 3 4\n", MtimePolicy::Fixed(0))
            .unwrap()
            .unwrap();
        assert_eq!(e.acl, None);
        assert_eq!(e.uniqueid.as_deref(), Some(&b"u2"[..]));
        assert!(parse_l_line(b"nothing\n", MtimePolicy::Fixed(0))
            .unwrap()
            .is_none());
    }

    #[test]
    fn lines_2x() {
        for (line, bits, part, acl) in [
            (
                &b"user.bob\tdefault\tbob\tlrs\t\n"[..],
                0,
                &b"default"[..],
                &b"bob\tlrs\t"[..],
            ),
            (
                b"user.r\t1 be!default r\tlr\t\n",
                mbtype::REMOTE,
                b"default",
                b"r\tlr\t",
            ),
            (
                b"user.c\t32 default bob\tlr\t\r\n",
                mbtype::CALENDAR,
                b"default",
                b"bob\tlr\t",
            ),
        ] {
            let e = parse_2x_line(line, MtimePolicy::Fixed(1))
                .ok()
                .unwrap()
                .unwrap();
            assert_eq!(e.mbtype, bits);
            assert_eq!(e.partition.as_deref(), Some(part));
            assert_eq!(e.acl.as_deref(), Some(acl));
        }
    }

    #[test]
    fn undump_rename_history() {
        // Two members with one uniqueid: the second gets the first as history, and the
        // first's N record stays (what mboxlist_update_entry does).
        let json = br#"{"a.x": {"mbtype": "e", "partition": "p", "uniqueid": "u", "mtime": "1", "uidvalidity": "1", "createdmodseq": "1", "foldermodseq": "1"},
"a.y": {"mbtype": "e", "partition": "p", "uniqueid": "u", "mtime": "2", "uidvalidity": "1", "createdmodseq": "1", "foldermodseq": "1"}}"#;
        let mut u = Undump::new();
        u.read_auto(&json[..], false, MtimePolicy::FromDump { fallback: 0 })
            .unwrap();
        let r = u.into_records();
        assert_eq!(r.len(), 3);
        let i = parse_entry(None, &r[&b"Iu".to_vec()]).unwrap();
        assert_eq!(i.name, b"a.y");
        assert_eq!(i.name_history.len(), 1);
        assert_eq!(i.name_history[0].name, b"a.x");
    }
}

/// Checks against the Cyrus 3.6.1 fixtures, driven by their `kv.*.txt` listings (the raw
/// records in database order), so they need no file-format reader.
#[cfg(test)]
mod fixture_tests {
    use super::*;
    use std::path::PathBuf;

    /// `MUPDATE_FIXTURES`, else the copy in the repository, else the shared folder.
    pub(super) fn fixtures() -> PathBuf {
        if let Some(p) = std::env::var_os("MUPDATE_FIXTURES") {
            return PathBuf::from(p);
        }
        let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cyrus-3.6");
        if repo.is_dir() {
            return repo;
        }
        PathBuf::from("/work/shared/fixtures/cyrus-3.6")
    }

    fn read(rel: &str) -> Vec<u8> {
        let p = fixtures().join(rel);
        std::fs::read(&p).unwrap_or_else(|e| panic!("fixture {}: {e}", p.display()))
    }

    /// One `prot_printamap` token: atom, `"quoted"` (no escapes) or `{N}\r\n` literal.
    fn token<'a>(s: &'a [u8], i: &mut usize, stop: u8) -> &'a [u8] {
        match s[*i] {
            b'"' => {
                let end = *i + 1 + s[*i + 1..].iter().position(|&b| b == b'"').unwrap();
                let t = &s[*i + 1..end];
                *i = end + 1;
                t
            }
            b'{' => {
                let close = *i + s[*i..].iter().position(|&b| b == b'}').unwrap();
                let n: usize = std::str::from_utf8(&s[*i + 1..close])
                    .unwrap()
                    .parse()
                    .unwrap();
                assert_eq!(&s[close + 1..close + 3], b"\r\n");
                let t = &s[close + 3..close + 3 + n];
                *i = close + 3 + n;
                t
            }
            _ => {
                let end = *i + s[*i..].iter().position(|&b| b == stop).unwrap();
                let t = &s[*i..end];
                *i = end;
                t
            }
        }
    }

    /// A `cyr_dbtool … SHOW ""` listing: `KEY SP VALUE LF` per record.
    pub(crate) fn parse_kv(s: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < s.len() {
            let k = token(s, &mut i, b' ').to_vec();
            assert_eq!(s[i], b' ');
            i += 1;
            let v = token(s, &mut i, b'\n').to_vec();
            assert_eq!(
                s[i],
                b'\n',
                "after value of {:?}",
                String::from_utf8_lossy(&k)
            );
            i += 1;
            out.push((k, v));
        }
        out
    }

    fn dump(records: &[(Vec<u8>, Vec<u8>)], y: bool) -> Vec<u8> {
        let opts = DumpOptions {
            intermediates: y,
            partition: None,
        };
        let mut w = DumpWriter::new(Vec::new(), opts).unwrap();
        for (k, v) in records {
            w.record(k, v).unwrap();
        }
        w.finish().unwrap().0
    }

    /// (kv listing, `-d` dump, `-d -y` dump) triples that describe the same database.
    const SETS: &[(&str, Option<&str>, Option<&str>)] = &[
        (
            "tricky/kv.twoskip.txt",
            Some("tricky/dump.twoskip.json"),
            Some("tricky/dump-y.twoskip.json"),
        ),
        (
            "tricky/kv.skiplist.txt",
            Some("tricky/dump.skiplist.json"),
            Some("tricky/dump-y.skiplist.json"),
        ),
        (
            "tricky/kv.flat.txt",
            Some("tricky/dump.flat.json"),
            Some("tricky/dump-y.flat.json"),
        ),
        (
            "tricky/history/kv.twoskip.txt",
            Some("tricky/history/dump.twoskip.json"),
            None,
        ),
        (
            "tricky/history/kv.skiplist.txt",
            Some("tricky/history/dump.skiplist.json"),
            None,
        ),
        (
            "tricky/history/kv.flat.txt",
            Some("tricky/history/dump.flat.json"),
            None,
        ),
        (
            "tricky/crash/kv.twoskip.after-recovery.txt",
            Some("tricky/dump.twoskip.json"),
            None,
        ),
        (
            "tricky/crash/kv.skiplist.after-recovery.txt",
            Some("tricky/dump.skiplist.json"),
            None,
        ),
        (
            "legacy/kv.v34.upgraded-by-3.6.txt",
            None,
            Some("legacy/v34.upgraded-by-3.6.dump-y.json"),
        ),
        (
            "legacy/kv.v32-news.txt",
            Some("legacy/v32-news.after-ctl_cyrusdb-r.dump.json"),
            None,
        ),
    ];

    #[test]
    fn dumps_match_cyrus_byte_for_byte() {
        for &(kv, d, y) in SETS {
            let recs = parse_kv(&read(kv));
            if let Some(d) = d {
                assert!(dump(&recs, false) == read(d), "{kv} -d differs from {d}");
            }
            if let Some(y) = y {
                assert!(dump(&recs, true) == read(y), "{kv} -d -y differs from {y}");
            }
        }
    }

    const ALL_KV: &[&str] = &[
        "tricky/kv.twoskip.txt",
        "tricky/kv.skiplist.txt",
        "tricky/kv.flat.txt",
        "tricky/history/kv.twoskip.txt",
        "tricky/history/kv.skiplist.txt",
        "tricky/history/kv.flat.txt",
        "tricky/crash/kv.twoskip.after-recovery.txt",
        "tricky/crash/kv.skiplist.after-recovery.txt",
        "legacy/kv.v2x.flat.txt",
        "legacy/kv.v2x.skiplist.txt",
        "legacy/kv.v2x.skiplist-mboxsort.txt",
        "legacy/kv.v32-news.txt",
        "legacy/kv.v34-rc.txt",
        "legacy/kv.v34.twoskip.txt",
        "legacy/kv.v34.twoskip-mboxsort.txt",
        "legacy/kv.v34.upgraded-by-3.6.txt",
    ];

    /// Every dlist value of every fixture prints back to its own bytes, and every 3.6 record
    /// re-encodes to its own bytes.
    #[test]
    fn dlist_and_entry_identity_on_fixtures() {
        let mut n_checked = 0;
        for kv in ALL_KV {
            for (k, v) in parse_kv(&read(kv)) {
                if v.first() == Some(&b'%') {
                    let d = super::super::dlist::parse(&v).unwrap();
                    assert_eq!(d.to_bytes(), v, "{kv}: {:?}", String::from_utf8_lossy(&k));
                }
                match entry::key_kind(&k) {
                    KeyKind::Name(db) if kv.starts_with("tricky") || kv.contains("upgraded") => {
                        let e = parse_entry(Some(db), &v).unwrap();
                        assert_eq!(mboxname::to_dbname_cyrus(&e.name), db);
                        assert_eq!(encode_n_value(&e).unwrap(), v);
                        n_checked += 1;
                    }
                    KeyKind::Uniqueid(_) if v.first() == Some(&b'%') => {
                        let e = parse_entry(None, &v).unwrap();
                        let db = super::super::dlist::parse(&v).unwrap();
                        let db = db.get(b"N").and_then(|n| n.as_bytes()).unwrap().to_vec();
                        assert_eq!(encode_i_value(&e, &db).unwrap(), v);
                        n_checked += 1;
                    }
                    _ => {}
                }
            }
        }
        assert!(n_checked > 500, "{n_checked}");
    }

    /// Legacy (pre-3.6) fixtures decode with translated bits; 3.4 files re-encode exactly.
    #[test]
    fn legacy_fixtures_decode() {
        for kv in ["legacy/kv.v34.twoskip.txt", "legacy/kv.v2x.skiplist.txt"] {
            for (k, v) in parse_kv(&read(kv)) {
                if k.starts_with(b"$") {
                    continue;
                }
                let e = entry::parse_legacy_value(&k, &v, false).unwrap();
                if v.first() == Some(&b'%') {
                    assert_eq!(entry::encode_dlist_34(&e).unwrap(), v);
                } else {
                    assert_eq!(entry::encode_text_2x(&e).unwrap(), v);
                }
            }
        }
        // The 3.4 REMOTE calendar that 3.6 dies on.
        let recs = parse_kv(&read("legacy/kv.v34-rc.txt"));
        let rc = recs
            .iter()
            .find(|(_, v)| v.windows(6).any(|w| w == b" T rc "))
            .unwrap();
        let e = entry::parse_legacy_value(&rc.0, &rc.1, true).unwrap();
        assert_eq!(
            e.mbtype,
            mbtype::CALENDAR | mbtype::REMOTE | mbtype::LEGACY_DIRS
        );
        assert!(matches!(
            parse_entry(Some(b"x"), &rc.1),
            Err(EntryError::Abort(_))
        ));
    }

    /// `ctl_mboxlist -u` of the fixture inputs, dumped again, equals Cyrus's dump.
    #[test]
    fn undump_json_then_dump() {
        for (d, y) in [
            ("tricky/dump.twoskip.json", false),
            ("tricky/dump-y.twoskip.json", true),
        ] {
            let input = read(d);
            let mut u = Undump::new();
            u.read_auto(&input[..], false, MtimePolicy::FromDump { fallback: 0 })
                .unwrap();
            let recs: Vec<_> = u.into_records().into_iter().collect();
            // The two tombstones have no partition: JSON undump cannot create them (§8.4).
            let want = String::from_utf8(input).unwrap();
            let got = String::from_utf8(dump(&recs, y)).unwrap();
            let want: Vec<&str> = want
                .lines()
                .filter(|l| !l.contains("\"mbtype\": \"ed\""))
                .collect();
            let got: Vec<&str> = got.lines().collect();
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(g.trim_end_matches(','), w.trim_end_matches(','));
            }
        }
    }
}

/// [`undump_stream`] against the in-memory model [`Undump`].
#[cfg(test)]
mod undump_stream_tests {
    use super::*;
    use std::io::Cursor;

    const MTIME: MtimePolicy = MtimePolicy::FromDump { fallback: 7 };

    /// Both readers on `input`; returns the stream's counters when both succeed.
    #[track_caller]
    fn both(input: &[u8], legacy_l: bool, order: Order) -> Option<UndumpStats> {
        let mut u = Undump::new();
        let old = u.read_auto(input, legacy_l, MTIME);
        let mut warnings = Vec::new();
        let opts = UndumpOptions {
            legacy_l,
            mtime: MTIME,
            order,
        };
        let new = undump_stream(Cursor::new(input), &opts, &mut |w| warnings.push(w));
        match (old, new) {
            (Ok(()), Ok((recs, st))) => {
                let got: Vec<_> = recs.collect::<io::Result<_>>().unwrap();
                let mut want: Vec<_> = u.records.clone().into_iter().collect();
                want.sort_by(|a, b| order.compare(&a.0, &b.0));
                assert!(got == want, "records differ");
                assert_eq!((st.stored, st.skipped), (u.stored, u.skipped));
                assert_eq!(warnings, u.warnings);
                Some(st)
            }
            (Err(a), Err(b)) => {
                assert_eq!(a.to_string(), b.to_string());
                None
            }
            (a, b) => panic!("in memory: {a:?}; streamed: {:?}", b.map(|x| x.1)),
        }
    }

    fn member(name: &str, uid: Option<&str>, extra: &str) -> String {
        let mut s = format!(
            "{}: {{\"mbtype\": \"e\", \"partition\": \"p\", \"mtime\": \"5\", \"acl\": {{\"a\": \"lr\"}}{extra}",
            serde_json::to_string(name).unwrap()
        );
        if let Some(u) = uid {
            s.push_str(&format!(", \"uniqueid\": \"{u}\""));
        }
        s.push('}');
        s
    }

    fn doc(members: &[String]) -> Vec<u8> {
        format!("{{\n{}\n}}\n", members.join(",\n")).into_bytes()
    }

    #[test]
    fn fixture_dumps() {
        let dir = super::fixture_tests::fixtures();
        for rel in [
            "tricky/dump.twoskip.json",
            "tricky/dump-y.twoskip.json",
            "tricky/history/dump.twoskip.json",
            "legacy/v34-dump.undumped-by-3.6-L.dump.json",
        ] {
            let input = std::fs::read(dir.join(rel)).unwrap();
            for order in [Order::Raw, Order::Signed, Order::FlatMbox] {
                let st = both(&input, false, order).unwrap();
                assert!(st.stored + st.skipped > 5, "{rel}");
            }
        }
    }

    #[test]
    fn repeated_names_and_uniqueids() {
        let cases: Vec<Vec<String>> = vec![
            // A rename chain: one uniqueid under three names.
            vec![
                member("a.x", Some("u"), ""),
                member("a.y", Some("u"), ""),
                member("b", Some("v"), ""),
                member("a.z", Some("u"), ""),
            ],
            // A repeated name: first position, last value (which is skipped here).
            vec![
                member("a", Some("u1"), ""),
                member("b", Some("u2"), ""),
                "\"a\": {\"mbtype\": \"e\"}".into(),
            ],
            // ... and the other way round, with the first value aborting (never parsed).
            vec![
                "\"a\": {\"mbtype\": \"eQ\", \"partition\": \"p\", \"uniqueid\": \"u\"}".into(),
                member("b", Some("u"), ""),
                member("a", Some("w"), ""),
            ],
            // Names Cyrus keys alike (empty parts collapse), with other uniqueids: the
            // earlier I record is deleted.
            vec![
                member("user.bob.x", Some("u1"), ""),
                member("user.bob..x", Some("u2"), ""),
                member("c", None, ""),
            ],
            // A reserved mailbox's uniqueid reused: the second is not stored.
            vec![
                "\"r\": {\"mbtype\": \"ez\", \"partition\": \"p\", \"uniqueid\": \"u\"}".into(),
                member("s", Some("u"), ""),
                member("t", Some("x"), ""),
            ],
            // History carried over from the dump.
            vec![
                member(
                    "h.new",
                    Some("u"),
                    ", \"name_history\": [{\"name\": \"h.old\", \"mtime\": \"3\", \"mbtype\": \"e\"}]",
                ),
                member("h.newer", Some("u"), ""),
            ],
        ];
        for (i, c) in cases.iter().enumerate() {
            let st = both(&doc(c), false, Order::Raw);
            // (Case 1's last value is skipped before it is stored.)
            assert!(st.is_none_or(|s| i == 1 || s.interacting >= 1), "case {i}");
        }
        // A tombstone (no partition) and the mailbox it was renamed to share the uniqueid,
        // but the tombstone is never stored: nothing to replay.
        let st = both(
            &doc(&[
                "\"user.bob\": {\"mbtype\": \"ed\", \"uniqueid\": \"u\"}".into(),
                member("user.bob.new", Some("u"), ""),
            ]),
            false,
            Order::Raw,
        )
        .unwrap();
        assert_eq!((st.stored, st.skipped, st.interacting), (1, 1, 0));
        // A bad letter that is parsed aborts.
        assert!(both(
            &doc(&["\"a\": {\"mbtype\": \"eQ\", \"partition\": \"p\"}".into()]),
            false,
            Order::Raw
        )
        .is_none());
    }

    #[test]
    fn random_collisions() {
        let mut x = 0x1234_5678_u64;
        let mut next = move |n: u64| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) % n
        };
        let names = ["a", "a.b", "a..b", "c", "user.bob", "user.bob.", "d.e", "f"];
        let types = ["e", "e", "ez", "er", "ed", "n", "ei"];
        for _ in 0..300 {
            let n = 1 + next(12);
            let mut ms = Vec::new();
            for _ in 0..n {
                let name = names[next(names.len() as u64) as usize];
                let uid = match next(5) {
                    0 => None,
                    k => Some(format!("u{}", k + next(3))),
                };
                let t = types[next(types.len() as u64) as usize];
                let part = if next(6) == 0 {
                    ""
                } else {
                    ", \"partition\": \"p\""
                };
                let mut m = format!(
                    "\"{name}\": {{\"mbtype\": \"{t}\"{part}, \"mtime\": \"{}\"",
                    next(9)
                );
                if let Some(u) = uid {
                    m.push_str(&format!(", \"uniqueid\": \"{u}\""));
                }
                m.push('}');
                ms.push(m);
            }
            both(&doc(&ms), false, Order::Raw);
            // The same entries as -L lines (no repeated-name rule there).
            let mut lines = String::new();
            for m in &ms {
                let v: serde_json::Value = serde_json::from_str(&format!("{{{m}}}")).unwrap();
                let (name, e) = v.as_object().unwrap().iter().next().unwrap();
                let bits = mbtype::from_letters(e["mbtype"].as_str().unwrap().as_bytes()).unwrap();
                let part = if e.get("partition").is_some() {
                    "p"
                } else {
                    ""
                };
                lines.push_str(&format!("{name}\t{bits} {part} a\tlr\t"));
                if let Some(u) = e.get("uniqueid") {
                    lines.push_str(&format!(">{} 1 2 3 4", u.as_str().unwrap()));
                }
                lines.push('\n');
            }
            both(lines.as_bytes(), true, Order::Signed);
            both(lines.replace('>', " ").as_bytes(), false, Order::FlatMbox);
        }
    }

    #[test]
    fn legacy_l_stops_at_the_first_failed_update() {
        let input =
            b"r\t32 p a\tlr\t>u 1 2 3 4\ns\t0 p a\tlr\t>u 1 2 3 4\nt\t0 p a\tlr\t>w 1 2 3 4\n";
        let st = both(input, true, Order::Raw).unwrap();
        assert_eq!((st.stored, st.skipped), (1, 1));
    }

    #[test]
    fn bad_json_has_a_position() {
        let mut w = |_| {};
        let opts = UndumpOptions {
            legacy_l: false,
            mtime: MTIME,
            order: Order::Raw,
        };
        let err = undump_stream(Cursor::new(&b"{\n\"a\": {\"x\": }\n}"[..]), &opts, &mut w)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("line 2 column"), "{err}");
        let err = undump_stream(Cursor::new(&b"{\"a\": {}} x"[..]), &opts, &mut w)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("trailing characters"), "{err}");
        let err = undump_stream(
            Cursor::new(&b"{\"a\": {\"p\": \"\\u0000\"}}"[..]),
            &opts,
            &mut w,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("JSON_ALLOW_NUL"), "{err}");
        // An array at the top is accepted and holds nothing; an empty input is empty.
        for empty in [&b"[1, {\"a\": 2}]"[..], b"  \n", b""] {
            let (recs, st) = undump_stream(Cursor::new(empty), &opts, &mut w).unwrap();
            assert_eq!((recs.count(), st.stored), (0, 0));
        }
        assert!(undump_stream(Cursor::new(&b"[5"[..]), &opts, &mut w).is_err());
    }

    #[test]
    fn sort_spill_merges_runs() {
        for order in [Order::Raw, Order::Signed, Order::FlatMbox] {
            for budget in [1, 300, 1 << 20] {
                let mut s = SortSpill::with_budget(order, budget);
                let mut want = Vec::new();
                let mut x = 7u64;
                for i in 0..2000u32 {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                    let k = format!(
                        "{}{:x}\u{e9}\t{i}",
                        ["N", "I", "A"][(x >> 60) as usize % 3],
                        x >> 40
                    )
                    .into_bytes();
                    let v = vec![i as u8; (x >> 50) as usize % 40];
                    s.push(k.clone(), v.clone()).unwrap();
                    want.push((k, v));
                }
                want.sort_by(|a, b| order.compare(&a.0, &b.0));
                let got: Vec<_> = s.finish().unwrap().collect::<io::Result<_>>().unwrap();
                assert!(got == want, "{order} budget {budget}");
            }
        }
    }
}
