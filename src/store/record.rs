//! The stored mailbox record: what MUPDATE shows (type flags, location, ACL) plus mtime and, for
//! entries imported from Cyrus, the fields the protocol does not show (kept opaque in `cyrus`,
//! owned by [`crate::cyrus`]). Encoded with a version byte first so the format can evolve.

use super::Seq;
pub use crate::cyrus::entry::mbtype;

/// Cyrus 3.6 mailbox type bits (3.6.1:imap/mboxlist.h:59-98): the type in the low 4 bits,
/// flags above; the constants are in [`mbtype`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MbType(pub u32);

impl MbType {
    /// Whether any of the [`mbtype`] flag bits in `flag` is set.
    pub fn has(self, flag: u32) -> bool {
        self.0 & flag != 0
    }
}

/// One mailbox.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MailboxRecord {
    pub mbtype: MbType,
    /// Text before the first `!` of the location; `Some(b"")` for an empty location.
    pub server: Option<Vec<u8>>,
    /// Text after the first `!`; `Some(b"")` for `host!`.
    pub partition: Option<Vec<u8>>,
    /// Normalised ACL, `id TAB rights TAB` repeated; `None` when a Cyrus entry had no `A`.
    pub acl: Option<Vec<u8>>,
    /// Seconds since the epoch of the last write.
    pub mtime: i64,
    /// The change sequence that wrote this record. Set by the store; ignored on writes.
    pub revision: Seq,
    /// Cyrus fields MUPDATE does not show (uniqueid, uidvalidity, modseqs, history, …), in a
    /// versioned encoding owned by `crate::cyrus`. Empty for records the master wrote.
    pub cyrus: Vec<u8>,
}

impl MailboxRecord {
    /// What the master stores for `RESERVE name location` (database_log + insertremote:
    /// RESERVE|REMOTE, no ACL).
    pub fn reserved(location: &[u8], mtime: i64) -> Self {
        let (server, partition) = split_location(location);
        MailboxRecord {
            mbtype: MbType(mbtype::RESERVE | mbtype::REMOTE),
            server: Some(server.to_vec()),
            partition: partition.map(<[u8]>::to_vec),
            acl: None,
            mtime,
            revision: 0,
            cyrus: Vec::new(),
        }
    }

    /// What the master stores for `ACTIVATE name location acl`; `acl` already normalised.
    pub fn active(location: &[u8], acl: Vec<u8>, mtime: i64) -> Self {
        let (server, partition) = split_location(location);
        MailboxRecord {
            mbtype: MbType(mbtype::REMOTE),
            server: Some(server.to_vec()),
            partition: partition.map(<[u8]>::to_vec),
            acl: Some(acl),
            mtime,
            revision: 0,
            cyrus: Vec::new(),
        }
    }

    /// RESERVE on the wire (the RESERVE flag); otherwise MAILBOX.
    pub fn is_reserved(&self) -> bool {
        self.mbtype.has(mbtype::RESERVE)
    }

    /// LIST and UPDATE skip deleted and intermediate entries (imap/mboxlist.c:3879-3909).
    pub fn is_listed(&self) -> bool {
        !self.mbtype.has(mbtype::DELETED | mbtype::INTERMEDIATE)
    }

    /// The location as Cyrus reads it back: `server!partition`, else server, else partition,
    /// else empty (imap/mupdate.c:1375-1428).
    pub fn location(&self) -> Vec<u8> {
        match (&self.server, &self.partition) {
            (Some(s), Some(p)) => [s.as_slice(), b"!", p.as_slice()].concat(),
            (Some(s), None) => s.clone(),
            (None, Some(p)) => p.clone(),
            (None, None) => Vec::new(),
        }
    }

    /// [`location`](Self::location) as up to three pieces to concatenate, without allocating
    /// (LIST and UPDATE write one per record).
    pub fn location_parts(&self) -> [&[u8]; 3] {
        match (&self.server, &self.partition) {
            (Some(s), Some(p)) => [s, b"!", p],
            (Some(s), None) => [s, b"", b""],
            (None, Some(p)) => [p, b"", b""],
            (None, None) => [b"", b"", b""],
        }
    }

    /// The ACL as the wire shows it: empty for a reservation.
    pub fn wire_acl(&self) -> &[u8] {
        if self.is_reserved() {
            b""
        } else {
            self.acl.as_deref().unwrap_or(b"")
        }
    }
}

/// Split a location at its first `!` (imap/mupdate.c:1329-1369).
pub fn split_location(location: &[u8]) -> (&[u8], Option<&[u8]>) {
    match location.iter().position(|&b| b == b'!') {
        Some(i) => (&location[..i], Some(&location[i + 1..])),
        None => (location, None),
    }
}

/// The current (and only) version of the record encoding; the first byte of every value.
pub const RECORD_FORMAT: u8 = 1;

// Presence bits of the optional fields (format 1). Any other bit set is an error, so a future
// format that adds a field cannot be misread by this one.
const HAS_SERVER: u8 = 1 << 0;
const HAS_PARTITION: u8 = 1 << 1;
const HAS_ACL: u8 = 1 << 2;
const KNOWN_BITS: u8 = HAS_SERVER | HAS_PARTITION | HAS_ACL;

impl MailboxRecord {
    /// The stored form (format 1):
    ///
    /// ```text
    /// u8 format = 1 | u8 presence bits (server, partition, acl)
    /// varint mbtype | varint zigzag(mtime) | varint revision
    /// [varint len, server] [varint len, partition] [varint len, acl]
    /// varint len, cyrus
    /// ```
    ///
    /// Varints are LEB128, so a typical record costs a few bytes over its text. The revision
    /// is stored too: a record read back knows which change wrote it (the CAS token).
    pub fn encode(&self) -> Vec<u8> {
        let opt_len = |o: &Option<Vec<u8>>| o.as_ref().map_or(0, |v| v.len() + 10);
        let mut out = Vec::with_capacity(
            2 + 30
                + opt_len(&self.server)
                + opt_len(&self.partition)
                + opt_len(&self.acl)
                + self.cyrus.len()
                + 10,
        );
        self.encode_into(&mut out);
        out
    }

    /// [`encode`](Self::encode), appending to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let mut bits = 0u8;
        if self.server.is_some() {
            bits |= HAS_SERVER;
        }
        if self.partition.is_some() {
            bits |= HAS_PARTITION;
        }
        if self.acl.is_some() {
            bits |= HAS_ACL;
        }
        out.push(RECORD_FORMAT);
        out.push(bits);
        put_varint(out, u64::from(self.mbtype.0));
        put_varint(out, zigzag(self.mtime));
        put_varint(out, self.revision);
        for field in [&self.server, &self.partition, &self.acl]
            .into_iter()
            .flatten()
        {
            put_bytes(out, field);
        }
        put_bytes(out, &self.cyrus);
    }

    /// Parse a stored record. Never panics: every length is checked against the input, unknown
    /// versions and presence bits are refused, and trailing bytes are an error (so a truncated
    /// or padded value is noticed rather than half-read).
    pub fn decode(bytes: &[u8]) -> Result<MailboxRecord, String> {
        let mut rec = MailboxRecord::default();
        rec.decode_into(bytes)?;
        Ok(rec)
    }

    /// [`decode`](Self::decode) into an existing record, reusing its buffers (scans decode
    /// every record into one). On error `self` holds a mix of old and new fields.
    pub fn decode_into(&mut self, bytes: &[u8]) -> Result<(), String> {
        let mut r = Reader::new(bytes);
        let version = r.byte().ok_or("empty record")?;
        if version != RECORD_FORMAT {
            return Err(format!("unknown record format {version}"));
        }
        let bits = r.byte().ok_or("record truncated before its field bits")?;
        if bits & !KNOWN_BITS != 0 {
            return Err(format!("unknown field bits 0x{bits:02X}"));
        }
        let mbtype = r.varint("mbtype")?;
        self.mbtype =
            MbType(u32::try_from(mbtype).map_err(|_| format!("mbtype {mbtype} out of range"))?);
        self.mtime = unzigzag(r.varint("mtime")?);
        self.revision = r.varint("revision")?;
        let mut opt = |field: &mut Option<Vec<u8>>, bit: u8, what: &str| -> Result<(), String> {
            if bits & bit != 0 {
                let v = field.get_or_insert_with(Vec::new);
                v.clear();
                v.extend_from_slice(r.bytes(what)?);
            } else {
                *field = None;
            }
            Ok(())
        };
        opt(&mut self.server, HAS_SERVER, "server")?;
        opt(&mut self.partition, HAS_PARTITION, "partition")?;
        opt(&mut self.acl, HAS_ACL, "acl")?;
        self.cyrus.clear();
        self.cyrus.extend_from_slice(r.bytes("cyrus fields")?);
        r.finish()
    }
}

/// Append `v` as an unsigned LEB128 varint (at most 10 bytes).
pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Append a varint length followed by the bytes.
pub(crate) fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// A bounds-checked cursor over an encoded value; every read returns an error instead of
/// panicking when the input is short or malformed.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    pub(crate) fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.buf.split_first()?;
        self.buf = rest;
        Some(b)
    }

    /// An unsigned LEB128 varint; refuses encodings longer than 10 bytes, above `u64::MAX`, or
    /// padded with zero groups.
    pub(crate) fn varint(&mut self, what: &str) -> Result<u64, String> {
        let mut v: u64 = 0;
        for i in 0..10 {
            let b = self.byte().ok_or_else(|| format!("truncated in {what}"))?;
            let low = u64::from(b & 0x7F);
            if i == 9 && low > 1 {
                return Err(format!("{what} overflows 64 bits"));
            }
            v |= low << (7 * i);
            if b & 0x80 == 0 {
                if b == 0 && i > 0 {
                    // A zero last group is a padded encoding; refusing it keeps one encoding
                    // per value.
                    return Err(format!("{what}: non-canonical varint"));
                }
                return Ok(v);
            }
        }
        Err(format!("{what} overflows 64 bits"))
    }

    /// A varint length and that many bytes.
    pub(crate) fn bytes(&mut self, what: &str) -> Result<&'a [u8], String> {
        let len = self.varint(what)?;
        if len > self.buf.len() as u64 {
            return Err(format!(
                "{what}: length {len} exceeds the {} bytes left",
                self.buf.len()
            ));
        }
        let (head, rest) = self.buf.split_at(len as usize);
        self.buf = rest;
        Ok(head)
    }

    /// Fails when bytes are left over.
    pub(crate) fn finish(&self) -> Result<(), String> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(format!("{} trailing bytes", self.buf.len()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> MailboxRecord {
        MailboxRecord {
            mbtype: MbType(mbtype::REMOTE | mbtype::RESERVE),
            server: Some(b"imap1".to_vec()),
            partition: Some(b"".to_vec()),
            acl: None,
            mtime: -5,
            revision: 300,
            cyrus: b"\x00\xffopaque".to_vec(),
        }
    }

    #[test]
    fn round_trip_sample_and_default() {
        for rec in [sample(), MailboxRecord::default()] {
            let enc = rec.encode();
            assert_eq!(enc[0], RECORD_FORMAT);
            assert_eq!(MailboxRecord::decode(&enc).unwrap(), rec);
        }
    }

    #[test]
    fn exact_bytes_of_format_1() {
        // Pin the format: a change here must come with a new version byte.
        let rec = MailboxRecord::active(b"h!p", b"anyone\tlr\t".to_vec(), 1);
        let mut rec = rec;
        rec.revision = 128;
        let enc = rec.encode();
        let mut want = vec![1u8, 0b111, 0x10, 2, 0x80, 0x01, 1, b'h', 1, b'p', 10];
        want.extend_from_slice(b"anyone\tlr\t");
        want.push(0);
        assert_eq!(enc, want);
    }

    #[test]
    fn none_and_empty_are_distinct() {
        let mut a = sample();
        a.acl = Some(Vec::new());
        let b = sample();
        assert_ne!(a.encode(), b.encode());
        assert_eq!(
            MailboxRecord::decode(&a.encode()).unwrap().acl,
            Some(Vec::new())
        );
        assert_eq!(MailboxRecord::decode(&b.encode()).unwrap().acl, None);
    }

    #[test]
    fn refuses_bad_input() {
        let enc = sample().encode();
        assert!(MailboxRecord::decode(&[]).is_err());
        assert!(MailboxRecord::decode(&[2]).is_err(), "unknown version");
        let mut bad_bits = enc.clone();
        bad_bits[1] |= 0x80;
        assert!(
            MailboxRecord::decode(&bad_bits).is_err(),
            "unknown field bit"
        );
        let mut trailing = enc.clone();
        trailing.push(0);
        assert!(MailboxRecord::decode(&trailing).is_err(), "trailing byte");
        for cut in 0..enc.len() {
            assert!(
                MailboxRecord::decode(&enc[..cut]).is_err(),
                "truncated at {cut}"
            );
        }
        // An 11-byte varint and a huge length.
        assert!(MailboxRecord::decode(&[
            1, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F
        ])
        .is_err());
        assert!(MailboxRecord::decode(&[1, 1, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0x0F]).is_err());
        // mbtype above u32.
        assert!(MailboxRecord::decode(&[1, 0, 0x80, 0x80, 0x80, 0x80, 0x10, 0, 0, 0]).is_err());
    }

    #[test]
    fn refuses_padded_varints() {
        // mbtype 0 written as two bytes.
        assert!(MailboxRecord::decode(&[1, 0, 0x80, 0x00, 0, 0, 0]).is_err());
        assert!(MailboxRecord::decode(&[1, 0, 0x00, 0, 0, 0]).is_ok());
    }

    #[test]
    fn varint_edges() {
        for v in [
            0,
            1,
            127,
            128,
            16383,
            16384,
            u64::from(u32::MAX),
            u64::MAX - 1,
            u64::MAX,
        ] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            assert!(out.len() <= 10);
            let mut r = Reader::new(&out);
            assert_eq!(r.varint("v").unwrap(), v);
            r.finish().unwrap();
        }
        for v in [0, 1, -1, i64::MIN, i64::MAX] {
            assert_eq!(unzigzag(zigzag(v)), v);
        }
    }

    fn opt_bytes() -> impl Strategy<Value = Option<Vec<u8>>> {
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40))
    }

    prop_compose! {
        pub(crate) fn any_record()(
            mbtype in any::<u32>(),
            server in opt_bytes(),
            partition in opt_bytes(),
            acl in opt_bytes(),
            mtime in any::<i64>(),
            revision in any::<u64>(),
            cyrus in proptest::collection::vec(any::<u8>(), 0..40),
        ) -> MailboxRecord {
            MailboxRecord { mbtype: MbType(mbtype), server, partition, acl, mtime, revision, cyrus }
        }
    }

    proptest! {
        #[test]
        fn round_trip(rec in any_record()) {
            prop_assert_eq!(MailboxRecord::decode(&rec.encode()).unwrap(), rec);
        }

        #[test]
        fn decode_into_reuses_without_leaking_old_fields(a in any_record(), b in any_record()) {
            let mut rec = a;
            rec.decode_into(&b.encode()).unwrap();
            prop_assert_eq!(rec, b);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = MailboxRecord::decode(&bytes);
        }

        #[test]
        fn decode_never_panics_near_valid(rec in any_record(), pos in any::<usize>(), val in any::<u8>(), cut in any::<usize>()) {
            let mut enc = rec.encode();
            let pos = pos % enc.len();
            enc[pos] = val;
            enc.truncate(cut % (enc.len() + 1));
            if let Ok(back) = MailboxRecord::decode(&enc) {
                // Whatever decodes must re-encode to the same bytes (one encoding per record).
                prop_assert_eq!(back.encode(), enc);
            }
        }
    }
}
