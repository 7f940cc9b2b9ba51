//! The flat format (`3.6.1:lib/cyrusdb_flat.c`, formats spec §5): one `KEY TAB VALUE LF` line
//! per record, sorted by [`Order::FlatMbox`], with NUL, TAB, CR, LF escaped as `FF 80|byte`
//! and 0xFF as `FF FF` (since 2.5; ≤2.4 files have no escapes, and decode unchanged unless
//! they contain 0xFF, exactly as Cyrus 3.6 reads them).
//!
//! There is no header, checksum, log or recovery: Cyrus rewrites the whole file and renames it
//! into place, so a crash leaves the old file intact (a stale `FILE.NEW` is ignored).
//!
//! The reader parses lines like `getentry`: the key runs to the first TAB (which may lie past
//! a line without one), the value to the next LF; a NUL or the end of the file before either
//! is corruption. The writer's output for a record set is unique, so it is byte-identical to
//! the file Cyrus writes for the same records.
use std::path::{Path, PathBuf};

use super::db::{
    Backend, Bad, DbError, Map, Order, OrderCheck, PatchWriter, ReadOptions, Record, RecordSource,
};

const ESCAPE: u8 = 0xFF;

/// Appends the flat encoding of `s` (`encode`).
pub fn encode_into(s: &[u8], out: &mut Vec<u8>) {
    for &b in s {
        match b {
            0 | b'\t' | b'\r' | b'\n' => out.extend_from_slice(&[ESCAPE, 0x80 | b]),
            ESCAPE => out.extend_from_slice(&[ESCAPE, ESCAPE]),
            _ => out.push(b),
        }
    }
}

/// Appends the decoding of `s` (`decode`): `FF FF` is 0xFF, `FF x` is `x & 0x7F`, and a lone
/// trailing 0xFF is dropped.
pub fn decode_into(s: &[u8], out: &mut Vec<u8>) {
    let mut i = 0;
    while i < s.len() {
        if s[i] == ESCAPE {
            if i + 1 < s.len() {
                let x = s[i + 1];
                out.push(if x == ESCAPE { ESCAPE } else { x & 0x7F });
            }
            i += 2;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
}

/// A streaming flat-file reader.
pub struct Reader {
    path: PathBuf,
    map: Map,
    pos: usize,
    done: bool,
    key: Vec<u8>,
    val: Vec<u8>,
    prev: Vec<u8>,
    first: bool,
    check: Option<OrderCheck>,
}

impl Reader {
    /// Opens `path` as a flat file.
    pub fn open(path: impl AsRef<Path>, options: &ReadOptions) -> Result<Reader, DbError> {
        let path = path.as_ref();
        Ok(Reader::from_map(path, Map::open(path)?, options))
    }

    pub(crate) fn from_map(path: &Path, map: Map, options: &ReadOptions) -> Reader {
        Reader {
            path: path.to_owned(),
            map,
            pos: 0,
            done: false,
            key: Vec::new(),
            val: Vec::new(),
            prev: Vec::new(),
            first: true,
            check: options
                .order
                .filter(|_| !options.unordered)
                .map(|o| OrderCheck::new(Some(o), &[])),
        }
    }

    /// The order checked ([`ReadOptions::order`]), or [`Order::FlatMbox`].
    pub fn orders(&self) -> &[Order] {
        match &self.check {
            Some(c) => c.orders(),
            None => &[Order::FlatMbox],
        }
    }

    /// The next record in file order.
    pub fn next_record(&mut self) -> Result<Option<Record<'_>>, DbError> {
        match self.advance() {
            Ok(true) => Ok(Some((&self.key, &self.val))),
            Ok(false) => {
                self.done = true;
                Ok(None)
            }
            Err(b) => {
                self.done = true;
                Err(b.into_error(&self.path, Backend::Flat))
            }
        }
    }

    fn advance(&mut self) -> Result<bool, Bad> {
        let m = self.map.bytes();
        if self.done || self.pos >= m.len() {
            return Ok(false);
        }
        let start = self.pos;
        let tab = find(m, start, b'\t').ok_or_else(|| {
            Bad::new(
                start as u64,
                "line without a TAB before a NUL or the end of the file",
            )
        })?;
        let lf = find(m, tab + 1, b'\n').ok_or_else(|| {
            Bad::new(
                tab as u64 + 1,
                "value without a LF before a NUL or the end of the file",
            )
        })?;
        self.key.clear();
        decode_into(&m[start..tab], &mut self.key);
        self.val.clear();
        decode_into(&m[tab + 1..lf], &mut self.val);
        self.pos = lf + 1;
        if let Some(c) = &mut self.check {
            if !self.first {
                c.step(&self.prev, &self.key)
                    .map_err(|msg| Bad::new(start as u64, msg))?;
            }
            self.prev.clear();
            self.prev.extend_from_slice(&self.key);
        }
        self.first = false;
        Ok(true)
    }
}

/// The index of the first `want` at or after `from`, stopping at a NUL like `strchr`.
fn find(m: &[u8], from: usize, want: u8) -> Option<usize> {
    m[from..]
        .iter()
        .position(|&b| b == want || b == 0)
        .map(|i| from + i)
        .filter(|&i| m[i] == want)
}

/// Writes the sorted records of `src` as a flat file. Returns the number of records.
pub(crate) fn write_sorted(
    out: &mut PatchWriter<'_>,
    src: &mut dyn RecordSource,
) -> Result<u64, DbError> {
    let mut line = Vec::new();
    let mut n = 0;
    while let Some((key, val)) = src.next_record()? {
        line.clear();
        encode_into(key, &mut line);
        line.push(b'\t');
        encode_into(val, &mut line);
        line.push(b'\n');
        out.append(&line)?;
        n += 1;
    }
    Ok(n)
}
