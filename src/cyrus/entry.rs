//! One `mailboxes.db` record as Cyrus sees it (`mbentry_t`), with decoders and encoders for
//! every key/value version of the formats spec (§7):
//!
//! * 3.6–3.12: `N`+dbname keys with `%(T I P S V C F M A)` values and `I`+uniqueid keys with
//!   `%(T N P S V C F M A H)` values ([`parse_entry`], [`encode_n_value`], [`encode_i_value`]);
//! * 2.5–3.4: intname keys with `%(A I P S T V C F M)` values and the 3.4 letter set
//!   ([`parse_legacy_value`], [`encode_dlist_34`]);
//! * ≤2.4: intname keys with `"mbtype [server!]partition acl"` text values and 2.x/3.4 bits
//!   ([`parse_legacy_value`], [`encode_text_2x`]).
//!
//! [`parse_entry`] is a faithful model of 3.6.1 `mboxlist_parse_entry` + `parseentry_cb`
//! (numbers through `atoi`/`atol`/`strtoull`, C-string truncation at NUL, legacy numbers taken
//! as 3.6 bits), because `ctl_mboxlist -d` output depends on every one of those details. Where
//! Cyrus asserts or dereferences NULL (a misplaced type letter, `NIL` where a number is
//! expected) we return [`EntryError::Abort`]; where Cyrus skips the record we return
//! [`EntryError::BadFormat`].

use super::dlist::{self, Event};
use super::mboxname;

/// `MAX_MAILBOX_NAME` (3.6.1:imap/mailbox.h:60): `mboxlist_parse_entry` keeps at most this
/// many bytes of the dbname.
pub const MAX_MAILBOX_NAME: usize = 490;
/// `MAX_MAILBOX_BUFFER`: `ctl_mboxlist -u -L` skips names this long or longer.
pub const MAX_MAILBOX_BUFFER: usize = 1024;
/// `MAX_PARTITION_LEN` (3.6.1:imap/mboxlist.h:57): undump skips partitions this long or longer.
pub const MAX_PARTITION_LEN: usize = 64;

/// Why a record value cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    /// Cyrus rejects the record (`IMAP_MAILBOX_BADFORMAT` or a dlist syntax error) and skips
    /// it in listings and dumps.
    #[error("unreadable record: {0}")]
    BadFormat(String),
    /// Cyrus 3.6.1 would abort (assertion, exit 70) or crash on this record.
    #[error("Cyrus 3.6.1 aborts on this record: {0}")]
    Abort(String),
    /// A value that the requested (older) format cannot express.
    #[error("not representable: {0}")]
    Unrepresentable(String),
}

/// Cyrus 3.6 mailbox type bits (3.6.1:imap/mboxlist.h:59-98): the type in the low 4 bits,
/// flags above. Same numbering as [`crate::store::MbType`].
pub mod mbtype {
    use super::EntryError;

    pub const EMAIL: u32 = 0;
    pub const NETNEWS: u32 = 1;
    pub const JMAPSUBMIT: u32 = 2;
    pub const JMAPPUSHSUB: u32 = 3;
    pub const JMAPNOTIFY: u32 = 4;
    pub const SIEVE: u32 = 5;
    pub const COLLECTION: u32 = 8;
    pub const CALENDAR: u32 = 9;
    pub const ADDRESSBOOK: u32 = 0xA;
    pub const TYPE_MASK: u32 = 0xF;
    pub const REMOTE: u32 = 0x10;
    pub const RESERVE: u32 = 0x20;
    pub const MOVING: u32 = 0x40;
    pub const DELETED: u32 = 0x80;
    pub const INTERMEDIATE: u32 = 0x100;
    pub const LEGACY_DIRS: u32 = 0x200;

    /// `mboxlist_mbtype_to_string`: type letter, then `d m r z i l`. Cyrus asserts when
    /// nothing is printed (a type without a letter, e.g. 4 or 6, and no flag).
    pub fn to_letters(t: u32) -> Result<String, EntryError> {
        let mut buf = [0u8; 7];
        letters(t, &mut buf).map(str::to_owned)
    }

    /// [`to_letters`] into `buf` (at most 7 letters), without allocating.
    pub fn letters(t: u32, buf: &mut [u8; 7]) -> Result<&str, EntryError> {
        let mut n = 0;
        let ty = match t & TYPE_MASK {
            EMAIL => Some(b'e'),
            NETNEWS => Some(b'n'),
            COLLECTION => Some(b'b'),
            CALENDAR => Some(b'c'),
            ADDRESSBOOK => Some(b'a'),
            JMAPSUBMIT => Some(b's'),
            JMAPPUSHSUB => Some(b'p'),
            SIEVE => Some(b'f'),
            _ => None,
        };
        if let Some(c) = ty {
            buf[0] = c;
            n = 1;
        }
        for (bit, c) in [
            (DELETED, b'd'),
            (MOVING, b'm'),
            (REMOTE, b'r'),
            (RESERVE, b'z'),
            (INTERMEDIATE, b'i'),
            (LEGACY_DIRS, b'l'),
        ] {
            if t & bit != 0 {
                buf[n] = c;
                n += 1;
            }
        }
        if n == 0 {
            return Err(EntryError::Abort(format!(
                "mbtype 0x{t:X} has no letters (assertion in mboxlist_mbtype_to_string)"
            )));
        }
        // ASCII letters only.
        Ok(std::str::from_utf8(&buf[..n]).unwrap_or("e"))
    }

    /// `mboxlist_string_to_mbtype`: an optional type letter first (`a b c e n p s`), then
    /// flag letters `d f i l m r z` (`f` ORs in SIEVE). Any other letter in flag position
    /// is an assertion failure in Cyrus (3.6.1:imap/mboxlist.c:533).
    pub fn from_letters(s: &[u8]) -> Result<u32, EntryError> {
        let mut t = 0;
        let mut rest = s;
        if let Some((&first, tail)) = s.split_first() {
            let ty = match first {
                b'a' => Some(ADDRESSBOOK),
                b'b' => Some(COLLECTION),
                b'c' => Some(CALENDAR),
                b'e' => Some(EMAIL),
                b'n' => Some(NETNEWS),
                b'p' => Some(JMAPPUSHSUB),
                b's' => Some(JMAPSUBMIT),
                _ => None,
            };
            if let Some(ty) = ty {
                t = ty;
                rest = tail;
            }
        }
        for &c in rest {
            t |= match c {
                b'd' => DELETED,
                b'f' => SIEVE,
                b'i' => INTERMEDIATE,
                b'l' => LEGACY_DIRS,
                b'm' => MOVING,
                b'r' => REMOTE,
                b'z' => RESERVE,
                _ => {
                    return Err(EntryError::Abort(format!(
                        "mbtype letters {:?}: {:?} is not valid in flag position \
                         (assertion at imap/mboxlist.c:533)",
                        String::from_utf8_lossy(s),
                        c as char
                    )))
                }
            };
        }
        Ok(t)
    }
}

/// Cyrus 2.x–3.4 mailbox type bits (3.4.9:imap/mboxlist.h:74-92). 2.x used the first five
/// with the same values.
pub mod mbtype34 {
    use super::{mbtype, EntryError};

    pub const REMOTE: u32 = 1;
    pub const RESERVE: u32 = 2;
    pub const NETNEWS: u32 = 4;
    pub const MOVING: u32 = 8;
    pub const DELETED: u32 = 16;
    pub const CALENDAR: u32 = 32;
    pub const ADDRESSBOOK: u32 = 64;
    pub const COLLECTION: u32 = 128;
    pub const INTERMEDIATE: u32 = 256;
    pub const SUBMISSION: u32 = 512;
    pub const PUSHSUBSCRIPTION: u32 = 1024;

    const LETTERS: [(u32, char); 11] = [
        (DELETED, 'd'),
        (MOVING, 'm'),
        (NETNEWS, 'n'),
        (REMOTE, 'r'),
        (RESERVE, 'z'),
        (CALENDAR, 'c'),
        (COLLECTION, 'b'),
        (ADDRESSBOOK, 'a'),
        (INTERMEDIATE, 'i'),
        (SUBMISSION, 's'),
        (PUSHSUBSCRIPTION, 'p'),
    ];

    /// 3.4 `mboxlist_mbtype_to_string`: one letter per bit, fixed order; empty for 0.
    pub fn to_letters(t: u32) -> String {
        LETTERS
            .iter()
            .filter(|(b, _)| t & b != 0)
            .map(|&(_, c)| c)
            .collect()
    }

    /// 2.5–3.4 `mboxlist_string_to_mbtype`: an unordered set; unknown letters are ignored.
    pub fn from_letters(s: &[u8]) -> u32 {
        s.iter()
            .filter_map(|&c| {
                LETTERS
                    .iter()
                    .find(|&&(_, l)| l as u8 == c)
                    .map(|&(b, _)| b)
            })
            .fold(0, |a, b| a | b)
    }

    /// Translate 3.4 bits to 3.6 bits (what a migration must do and Cyrus 3.6 does not do
    /// for numeric input, §7.7). Unknown bits and several type bits at once are errors.
    pub fn to_36(t: u32) -> Result<u32, EntryError> {
        let types = [
            (NETNEWS, mbtype::NETNEWS),
            (CALENDAR, mbtype::CALENDAR),
            (ADDRESSBOOK, mbtype::ADDRESSBOOK),
            (COLLECTION, mbtype::COLLECTION),
            (SUBMISSION, mbtype::JMAPSUBMIT),
            (PUSHSUBSCRIPTION, mbtype::JMAPPUSHSUB),
        ];
        let flags = [
            (REMOTE, mbtype::REMOTE),
            (RESERVE, mbtype::RESERVE),
            (MOVING, mbtype::MOVING),
            (DELETED, mbtype::DELETED),
            (INTERMEDIATE, mbtype::INTERMEDIATE),
        ];
        let known = types.iter().chain(flags.iter()).fold(0, |a, (b, _)| a | b);
        if t & !known != 0 {
            return Err(EntryError::Unrepresentable(format!(
                "unknown 3.4 mbtype bits 0x{:X}",
                t & !known
            )));
        }
        let mut ty = types.iter().filter(|(b, _)| t & b != 0);
        let out_type = match (ty.next(), ty.next()) {
            (None, _) => mbtype::EMAIL,
            (Some(&(_, x)), None) => x,
            (Some(_), Some(_)) => {
                return Err(EntryError::Unrepresentable(format!(
                    "3.4 mbtype {t} has several mailbox types"
                )))
            }
        };
        Ok(flags
            .iter()
            .filter(|(b, _)| t & b != 0)
            .fold(out_type, |a, (_, x)| a | x))
    }

    /// Translate 3.6 bits to 3.4 bits. LEGACY_DIRS is dropped (every pre-3.6 mailbox uses
    /// legacy directories); sieve and JMAP-notify mailboxes did not exist.
    pub fn from_36(t: u32) -> Result<u32, EntryError> {
        let ty = match t & mbtype::TYPE_MASK {
            mbtype::EMAIL => 0,
            mbtype::NETNEWS => NETNEWS,
            mbtype::CALENDAR => CALENDAR,
            mbtype::ADDRESSBOOK => ADDRESSBOOK,
            mbtype::COLLECTION => COLLECTION,
            mbtype::JMAPSUBMIT => SUBMISSION,
            mbtype::JMAPPUSHSUB => PUSHSUBSCRIPTION,
            other => {
                return Err(EntryError::Unrepresentable(format!(
                    "mailbox type {other} does not exist before Cyrus 3.6"
                )))
            }
        };
        Ok([
            (mbtype::REMOTE, REMOTE),
            (mbtype::RESERVE, RESERVE),
            (mbtype::MOVING, MOVING),
            (mbtype::DELETED, DELETED),
            (mbtype::INTERMEDIATE, INTERMEDIATE),
        ]
        .iter()
        .filter(|(b, _)| t & b != 0)
        .fold(ty, |a, (_, x)| a | x))
    }
}

/// A former name of a mailbox (an item of the I record's `H` list).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FormerName {
    /// Internal name.
    pub name: Vec<u8>,
    pub mtime: i64,
    pub uidvalidity: u32,
    pub createdmodseq: u64,
    pub foldermodseq: u64,
    /// 3.6 bits.
    pub mbtype: u32,
    pub partition: Option<Vec<u8>>,
}

/// `mbentry_t`: one mailbox as Cyrus 3.6 holds it in memory.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Entry {
    /// Internal name (`user.bob.Sent`, `example.com!user.alice`).
    pub name: Vec<u8>,
    /// 3.6 bits ([`mbtype`]).
    pub mbtype: u32,
    pub partition: Option<Vec<u8>>,
    pub server: Option<Vec<u8>>,
    /// `id TAB rights TAB …`; `None` writes no `A`, `Some("")` writes `A %()`. (Cyrus's
    /// parser turns a missing `A` into `""`; [`parse_entry`] keeps `None`, see there.)
    pub acl: Option<Vec<u8>>,
    pub uniqueid: Option<Vec<u8>>,
    /// From the 2.5-dev extended text prefix only; never written by 3.6.
    pub legacy_specialuse: Option<Vec<u8>>,
    pub mtime: i64,
    pub uidvalidity: u32,
    pub createdmodseq: u64,
    pub foldermodseq: u64,
    pub name_history: Vec<FormerName>,
}

// ---------------------------------------------------------------------------------------
// C library number parsing, as Cyrus calls it (glibc, LP64).

/// The bytes of a C string: up to the first NUL.
pub(crate) fn cstr(s: &[u8]) -> &[u8] {
    // `contains` is a memchr; almost no value has a NUL.
    if !s.contains(&0) {
        return s;
    }
    match s.iter().position(|&b| b == 0) {
        Some(i) => &s[..i],
        None => s,
    }
}

fn is_cspace(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0B | 0x0C | b'\r')
}

/// The common core of `strtol`/`strtoul`: (negative, magnitude saturated at u64::MAX,
/// overflowed, bytes consumed; 0 consumed when there are no digits).
fn c_strto(s: &[u8], base: u32) -> (bool, u64, bool, usize) {
    let mut i = 0;
    while i < s.len() && is_cspace(s[i]) {
        i += 1;
    }
    let mut neg = false;
    if i < s.len() && (s[i] == b'+' || s[i] == b'-') {
        neg = s[i] == b'-';
        i += 1;
    }
    if base == 16
        && i + 2 < s.len() + 1
        && s.get(i) == Some(&b'0')
        && matches!(s.get(i + 1), Some(b'x' | b'X'))
        && s.get(i + 2).is_some_and(|c| c.is_ascii_hexdigit())
    {
        i += 2;
    }
    let start = i;
    let mut v: u64 = 0;
    let mut over = false;
    while i < s.len() {
        let d = match (s[i] as char).to_digit(base) {
            Some(d) => d,
            None => break,
        };
        match v
            .checked_mul(u64::from(base))
            .and_then(|x| x.checked_add(u64::from(d)))
        {
            Some(x) => v = x,
            None => over = true,
        }
        i += 1;
    }
    if i == start {
        return (false, 0, false, 0);
    }
    (neg, if over { u64::MAX } else { v }, over, i)
}

/// `strtol(s, &end, 10)`: value and bytes consumed.
pub(crate) fn c_strtol(s: &[u8]) -> (i64, usize) {
    let (neg, mag, over, n) = c_strto(s, 10);
    let v = if neg {
        if over || mag > i64::MAX as u64 + 1 {
            i64::MIN
        } else {
            (mag as i64).wrapping_neg()
        }
    } else if over || mag > i64::MAX as u64 {
        i64::MAX
    } else {
        mag as i64
    };
    (v, n)
}

/// `strtoul`/`strtoull` with the given base: value and bytes consumed.
pub(crate) fn c_strtoul(s: &[u8], base: u32) -> (u64, usize) {
    let (neg, mag, over, n) = c_strto(s, base);
    let v = if over {
        u64::MAX
    } else if neg {
        mag.wrapping_neg()
    } else {
        mag
    };
    (v, n)
}

/// `atoi` (glibc: `(int) strtol`).
pub(crate) fn c_atoi(s: &[u8]) -> i32 {
    c_strtol(s).0 as i32
}

// ---------------------------------------------------------------------------------------
// 3.6 parsing.

fn need<'a>(data: Option<&'a [u8]>, key: &str) -> Result<&'a [u8], EntryError> {
    data.map(cstr)
        .ok_or_else(|| EntryError::Abort(format!("NIL value for {key} (NULL dereference)")))
}

/// `mboxlist_parse_entry(&mbentry, dbname, 0, value)` in 3.6.1: decode any value found under
/// an `N` key (`dbname` = the key without its `N`) or an `I` key (`dbname` = `None`; the name
/// then comes from the value's `N`). Values starting with `%` are dlist, anything else is
/// legacy text whose numeric mbtype is read with **3.6** bits, as Cyrus does (§7.7).
pub fn parse_entry(dbname: Option<&[u8]>, value: &[u8]) -> Result<Entry, EntryError> {
    if value.is_empty() {
        return Err(EntryError::BadFormat("empty value".into()));
    }
    let mut e = Entry::default();
    let mut have_name = false;
    if let Some(db) = dbname {
        let db = cstr(db);
        let db = &db[..db.len().min(MAX_MAILBOX_NAME)];
        e.name = mboxname::from_dbname_cyrus(db);
        have_name = true;
    }
    if value[0] == b'%' {
        parse_dlist_36(&mut e, have_name, value)?;
    } else {
        parse_text(&mut e, value);
        e.mbtype = c_strtol_at(value).0 as u32;
    }
    Ok(e)
}

/// The numeric mbtype of a legacy text value (after the optional `(…)` prefix).
fn c_strtol_at(value: &[u8]) -> (i64, usize) {
    let t = cstr(value);
    let p = text_prefix_end(t, None);
    let (v, n) = c_strtol(&t[p..]);
    (v, p + n)
}

/// Skip (and optionally collect) the 2.5-dev `(uniqueid X specialuse Y) ` prefix; returns the
/// offset of the mbtype.
fn text_prefix_end(t: &[u8], mut e: Option<&mut Entry>) -> usize {
    let len = t.len();
    let at = |i: usize| t.get(i).copied().unwrap_or(0);
    if at(0) != b'(' {
        return 0;
    }
    let mut p = 1;
    let mut last = false;
    while !last {
        let mut q = p;
        while q < len && t[q] != b' ' && t[q] != b')' {
            q += 1;
        }
        if at(q) != b' ' {
            break;
        }
        let key = &t[p..q];
        q += 1;
        p = q;
        while q < len && t[q] != b' ' && t[q] != b')' {
            q += 1;
        }
        if at(q) != b' ' {
            last = true;
        }
        let val = t[p..q].to_vec();
        if q < len {
            q += 1;
        }
        if let Some(e) = e.as_deref_mut() {
            match key {
                b"uniqueid" => e.uniqueid = Some(val),
                b"specialuse" => e.legacy_specialuse = Some(val),
                _ => {}
            }
        }
        p = q;
    }
    if at(p) == b' ' {
        p += 1;
    }
    p
}

/// The text branch of `mboxlist_parse_entry`: `[(…) ]mbtype SP [server!]partition SP acl`.
/// Sets everything but `mbtype` (whose bit meaning depends on the caller).
fn parse_text(e: &mut Entry, value: &[u8]) {
    let t = cstr(value);
    let len = t.len();
    let at = |i: usize| t.get(i).copied().unwrap_or(0);
    let mut p = text_prefix_end(t, Some(e));
    p += c_strtol(&t[p..]).1;
    if at(p) == b' ' {
        p += 1;
    }
    let mut q = p;
    while q < len && t[q] != b' ' && t[q] != b'!' {
        q += 1;
    }
    if at(q) == b'!' {
        e.server = Some(t[p..q].to_vec());
        q += 1;
        p = q;
        while q < len && t[q] != b' ' {
            q += 1;
        }
    }
    e.partition = Some(t[p..q].to_vec());
    if q < len {
        q += 1;
    }
    e.acl = Some(t[q..].to_vec());
}

/// `dlist_parsesax` + `parseentry_cb`.
fn parse_dlist_36(e: &mut Entry, mut have_name: bool, value: &[u8]) -> Result<(), EntryError> {
    let mut acl = Vec::new();
    let mut doing_acl = false;
    let mut saw_acl = false;
    let mut doing_history = false;
    let mut fail: Option<EntryError> = None;
    let r = dlist::parse_sax(value, false, |ev, key| {
        let k = cstr(key);
        let step = (|| -> Result<(), EntryError> {
            match ev {
                Event::ListStart => {
                    if k == b"H" {
                        doing_history = true;
                    }
                }
                Event::ListEnd => doing_history = false,
                Event::KvListStart => {
                    if k == b"A" {
                        doing_acl = true;
                        saw_acl = true;
                    } else if doing_history {
                        e.name_history.push(FormerName::default());
                    }
                }
                Event::KvListEnd => doing_acl = false,
                Event::String(data) => {
                    if doing_acl {
                        acl.extend_from_slice(key);
                        acl.push(b'\t');
                        acl.extend_from_slice(need(data, "ACL rights")?);
                        acl.push(b'\t');
                    } else if doing_history {
                        let field = matches!(k, b"N" | b"M" | b"V" | b"C" | b"F" | b"T" | b"P");
                        let Some(h) = e.name_history.last_mut() else {
                            if field {
                                return Err(EntryError::Abort(
                                    "history field outside a history item".into(),
                                ));
                            }
                            return Ok(());
                        };
                        match k {
                            b"N" => {
                                h.name = mboxname::from_dbname_cyrus(data.map_or(&[][..], cstr))
                            }
                            b"M" => h.mtime = i64::from(c_atoi(need(data, "M")?)),
                            b"V" => h.uidvalidity = c_strtol(need(data, "V")?).0 as u32,
                            b"C" => h.createdmodseq = c_strtoul(need(data, "C")?, 10).0,
                            b"F" => h.foldermodseq = c_strtoul(need(data, "F")?, 10).0,
                            b"T" => {
                                h.mbtype = data.map_or(Ok(0), |d| mbtype::from_letters(cstr(d)))?
                            }
                            b"P" => h.partition = data.map(|d| cstr(d).to_vec()),
                            _ => {}
                        }
                    } else {
                        match k {
                            b"C" => e.createdmodseq = c_strtoul(need(data, "C")?, 10).0,
                            b"F" => e.foldermodseq = c_strtoul(need(data, "F")?, 10).0,
                            b"I" => e.uniqueid = data.map(|d| cstr(d).to_vec()),
                            b"M" => e.mtime = i64::from(c_atoi(need(data, "M")?)),
                            b"N" if !have_name => {
                                e.name = mboxname::from_dbname_cyrus(data.map_or(&[][..], cstr));
                                have_name = true;
                            }
                            b"P" => e.partition = data.map(|d| cstr(d).to_vec()),
                            b"S" => e.server = data.map(|d| cstr(d).to_vec()),
                            b"T" => {
                                e.mbtype = data.map_or(Ok(0), |d| mbtype::from_letters(cstr(d)))?
                            }
                            b"V" => e.uidvalidity = c_strtol(need(data, "V")?).0 as u32,
                            _ => {}
                        }
                    }
                }
            }
            Ok(())
        })();
        step.map_err(|err| fail = Some(err))
    });
    if let Some(err) = fail {
        return Err(err);
    }
    r.map_err(|err| EntryError::BadFormat(err.to_string()))?;
    // Cyrus's mbentry has "" for both a missing `A` and `A %()`; we keep `None` for a
    // missing one so that re-encoding gives the stored bytes back (JSON output is the same).
    e.acl = (saw_acl || !acl.is_empty()).then(|| cstr(&acl).to_vec());
    Ok(())
}

/// At most this many ACL pairs in a [`PlainN`]; longer ACLs take the general path.
pub const PLAIN_ACL_MAX: usize = 24;

/// The fields of a 3.6 `N` value of the plain shape [`parse_n_plain`] reads, borrowed from
/// the value. They are exactly what [`parse_entry`] gives for it (less the name, which
/// comes from the key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlainN<'a> {
    pub mbtype: u32,
    pub partition: Option<&'a [u8]>,
    pub server: Option<&'a [u8]>,
    pub uniqueid: Option<&'a [u8]>,
    /// Whether there was an `A` kvlist ([`Entry::acl`] is `Some`).
    pub saw_acl: bool,
    /// The `(identifier, rights)` pairs of `A`, in order, duplicates kept: the first
    /// `acl_len` entries.
    pub acl: [(&'a [u8], &'a [u8]); PLAIN_ACL_MAX],
    pub acl_len: usize,
    pub mtime: i64,
    pub uidvalidity: u32,
    pub createdmodseq: u64,
    pub foldermodseq: u64,
}

impl<'a> PlainN<'a> {
    /// The ACL pairs.
    pub fn acl_pairs(&self) -> &[(&'a [u8], &'a [u8])] {
        &self.acl[..self.acl_len]
    }
}

/// Whether `v` holds a NUL or TAB byte, eight bytes at a time.
fn has_nul_or_tab(v: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // Nonzero exactly when some byte of `x` is zero.
    let zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    let chunks = v.chunks_exact(8);
    let tail = chunks.remainder();
    let mut hit = 0;
    for c in chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        let x = u64::from_le_bytes(w);
        hit |= zero(x) | zero(x ^ (ONES * u64::from(b'\t')));
    }
    hit != 0 || tail.iter().any(|&b| b == 0 || b == b'\t')
}

/// A plain atom at `p`: a non-empty run of bytes other than SP and `)` that does not start
/// like a quoted string, literal, list or kvlist and is not `NIL`; with where it ends.
fn plain_atom(v: &[u8], p: usize) -> Option<(&[u8], usize)> {
    let first = *v.get(p)?;
    if matches!(first, b'"' | b'{' | b'(' | b'%' | b' ' | b')') {
        return None;
    }
    let len = v[p..].iter().position(|&b| b == b' ' || b == b')')?;
    let atom = &v[p..p + len];
    (atom != b"NIL").then_some((atom, p + len))
}

/// [`parse_entry`]`(Some(dbname), value)` without allocating, for the shape every 3.6
/// `N` value Cyrus writes has: `%(KEY ATOM … A %(ID RIGHTS …) …)` with plain atoms (no
/// quoted strings, literals, `NIL` or lists, no spaces before a `)`, and no NUL or TAB
/// byte anywhere: a TAB would split differently once joined into the ACL string), at
/// most one `A` kvlist of at most [`PLAIN_ACL_MAX`] pairs, no other kvlist, and a valid
/// type. For those, the result is what the `dlist_parsesax` walk of [`parse_entry`] gives
/// (an atom ends at a SP and sheds trailing `)`s there too, and every field is assigned the
/// same way, the last occurrence winning); `None` sends anything else, errors included,
/// to [`parse_entry`].
pub fn parse_n_plain(value: &[u8]) -> Option<PlainN<'_>> {
    let v = value;
    // No NUL (C strings would end there) nor TAB (it splits ACL pairs) anywhere.
    if v.len() < 3 || !v.starts_with(b"%(") || has_nul_or_tab(v) {
        return None;
    }
    let end = v.len() - 1;
    if v[end] != b')' {
        return None;
    }
    let mut f = PlainN {
        mbtype: 0,
        partition: None,
        server: None,
        uniqueid: None,
        saw_acl: false,
        acl: [(&[][..], &[][..]); PLAIN_ACL_MAX],
        acl_len: 0,
        mtime: 0,
        uidvalidity: 0,
        createdmodseq: 0,
        foldermodseq: 0,
    };
    let mut p = 2;
    while p < end {
        let (key, q) = plain_atom(v, p)?;
        if v[q] != b' ' {
            return None;
        }
        p = q + 1;
        if v[p] == b'%' {
            // Only the one ACL kvlist; any other would feed its strings to the top level.
            if key != b"A" || f.saw_acl || v.get(p + 1) != Some(&b'(') {
                return None;
            }
            f.saw_acl = true;
            p += 2;
            while v[p] != b')' {
                let (id, q) = plain_atom(v, p)?;
                if v[q] != b' ' {
                    return None;
                }
                let (rights, q) = plain_atom(v, q + 1)?;
                if f.acl_len == PLAIN_ACL_MAX {
                    return None;
                }
                f.acl[f.acl_len] = (id, rights);
                f.acl_len += 1;
                p = q;
                if v[p] == b' ' {
                    p += 1;
                    if v[p] == b')' {
                        return None;
                    }
                }
            }
            p += 1;
        } else {
            let (a, q) = plain_atom(v, p)?;
            p = q;
            match key {
                b"C" => f.createdmodseq = c_strtoul(a, 10).0,
                b"F" => f.foldermodseq = c_strtoul(a, 10).0,
                b"I" => f.uniqueid = Some(a),
                b"M" => f.mtime = i64::from(c_atoi(a)),
                b"P" => f.partition = Some(a),
                b"S" => f.server = Some(a),
                b"T" => f.mbtype = mbtype::from_letters(a).ok()?,
                b"V" => f.uidvalidity = c_strtol(a).0 as u32,
                // `N` is ignored when the key gives the name; the rest are not read.
                _ => {}
            }
        }
        // After a value: the closing `)` (which must be the last byte) or SP and more.
        if p == end {
            break;
        }
        if p > end || v[p] != b' ' || v[p + 1] == b')' {
            return None;
        }
        p += 1;
    }
    Some(f)
}

/// `N` values for testing [`parse_n_plain`] against [`parse_entry`]: the shapes Cyrus
/// writes, mixed with every quirk the fast path must leave to the general one.
#[cfg(test)]
pub(crate) fn sample_n_values(seed: u64, n: usize) -> Vec<Vec<u8>> {
    const ITEMS: &[&[u8]] = &[
        b"T e",
        b"T er",
        b"T ei",
        b"T edm",
        b"T x",
        b"T NIL",
        b"T rc",
        b"P default",
        b"P NIL",
        b"P p\xC3\xA9",
        b"P \xFF",
        b"P a)b",
        b"P \"q u\"",
        b"P {3+}\r\nabc",
        b"S backend1",
        b"S be\tx",
        b"I 5eed-0001",
        b"I",
        b"V 1690000000",
        b"V -5",
        b"V 99999999999",
        b"V 12abc",
        b"C 42",
        b"C -1",
        b"C 184467440737095516160",
        b"F 7",
        b"F 0x10",
        b"M 1700000000",
        b"M 99999999999",
        b"M -3",
        b"M  5",
        b"N foo",
        b"X junk",
        b"A %(u1 lrswipkxtecdan anyone lrs)",
        b"A %()",
        b"A %(u1 lrs u1 x)",
        b"A %(a\tb lrs)",
        b"A x",
        b"A %(u1 NIL)",
        b"A %(u1 lrs )",
        b"A %(u1)",
        b"A %(u\xC3\xA9 l)",
        b"A %(u\xFF l)",
        b"A %(x %(y z))",
        b"H ()",
        b"H (%(N x))",
        b"Z %(C 9)",
        b"C 1)",
        b"M 1))",
        b"K\x00 v",
        b"P a\x00b",
        b"A %(\"u\" l)",
    ];
    let mut state = seed;
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as usize
    };
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let mut v = b"%(".to_vec();
        let quirky = next() % 4 == 0;
        let count = next() % 9;
        for i in 0..count {
            if i > 0 {
                v.extend_from_slice(if quirky && next() % 8 == 0 {
                    b"  "
                } else {
                    b" "
                });
            }
            // Mostly the plain items, so that the fast path is exercised.
            let pick = if quirky {
                next() % ITEMS.len()
            } else {
                next() % 34
            };
            let item = ITEMS[pick];
            if !quirky && item.iter().any(|&b| b == b'\\' || b >= 0x80 || b == b'"') {
                continue;
            }
            v.extend_from_slice(item);
        }
        match (quirky, next() % 6) {
            (true, 0) => {}
            (true, 1) => v.extend_from_slice(b" )"),
            (true, 2) => v.extend_from_slice(b") x"),
            (true, 3) => v.extend_from_slice(b"))"),
            _ => v.push(b')'),
        }
        out.push(v);
    }
    out
}

// ---------------------------------------------------------------------------------------
// 3.6 encoding.

fn kv_str(out: &mut Vec<u8>, key: &[u8], v: &[u8]) {
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b' ');
    dlist::print_astring(v, out);
}

fn kv_num(out: &mut Vec<u8>, key: &[u8], v: u64) {
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b' ');
    dlist::push_decimal(out, v);
}

/// `mailbox_acl_to_dlist` printed: `A %(id rights …)`. Pairs are split on TAB; a trailing
/// identifier without a TAB is dropped; duplicates are kept (dlist_setatom appends).
fn push_acl(out: &mut Vec<u8>, acl: &[u8]) {
    out.extend_from_slice(b" A %(");
    let mut first = true;
    for (id, rights) in acl_pairs(acl) {
        if !first {
            out.push(b' ');
        }
        first = false;
        dlist::print_astring(id, out);
        out.push(b' ');
        dlist::print_astring(rights, out);
    }
    out.push(b')');
}

/// The (identifier, rights) pairs of an ACL string, as `mailbox_acl_to_dlist` and
/// `acl_to_json` split it (C-string semantics: the ACL ends at a NUL).
pub fn acl_pairs(acl: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    let mut p = cstr(acl);
    std::iter::from_fn(move || {
        if p.is_empty() {
            return None;
        }
        let q = p.iter().position(|&b| b == b'\t')?;
        let id = &p[..q];
        let rest = &p[q + 1..];
        match rest.iter().position(|&b| b == b'\t') {
            Some(t) => {
                p = &rest[t + 1..];
                Some((id, &rest[..t]))
            }
            None => {
                p = &[];
                Some((id, rest))
            }
        }
    })
}

/// The N record value `mboxlist_entry_dlist(dbname, e, 0)` writes, with `M` = `e.mtime`
/// (Cyrus writes `time(NULL)`; callers that want that set `e.mtime` first).
pub fn encode_n_value(e: &Entry) -> Result<Vec<u8>, EntryError> {
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(b"%(T ");
    dlist::print_astring(mbtype::to_letters(e.mbtype)?.as_bytes(), &mut out);
    if let Some(u) = &e.uniqueid {
        kv_str(&mut out, b"I", cstr(u));
    }
    common_fields(&mut out, e);
    out.push(b')');
    Ok(out)
}

/// P S V C F M A, shared by N and I values.
fn common_fields(out: &mut Vec<u8>, e: &Entry) {
    if let Some(p) = &e.partition {
        kv_str(out, b"P", cstr(p));
    }
    if let Some(s) = &e.server {
        kv_str(out, b"S", cstr(s));
    }
    if e.uidvalidity != 0 {
        kv_num(out, b"V", u64::from(e.uidvalidity));
    }
    if e.createdmodseq != 0 {
        kv_num(out, b"C", e.createdmodseq);
    }
    if e.foldermodseq != 0 {
        kv_num(out, b"F", e.foldermodseq);
    }
    kv_num(out, b"M", e.mtime as u64);
    if let Some(acl) = &e.acl {
        push_acl(out, acl);
    }
}

/// The I record value `mboxlist_entry_dlist(dbname, e, 1)` writes: `T N P S V C F M A H`,
/// history names converted with Cyrus's `mboxname_to_dbname`.
pub fn encode_i_value(e: &Entry, dbname: &[u8]) -> Result<Vec<u8>, EntryError> {
    let mut out = Vec::with_capacity(160);
    out.extend_from_slice(b"%(T ");
    dlist::print_astring(mbtype::to_letters(e.mbtype)?.as_bytes(), &mut out);
    kv_str(&mut out, b"N", dbname);
    common_fields(&mut out, e);
    out.extend_from_slice(b" H (");
    for (i, h) in e.name_history.iter().enumerate() {
        if i > 0 {
            out.push(b' ');
        }
        out.extend_from_slice(b"%(N ");
        dlist::print_astring(&mboxname::to_dbname_cyrus(&h.name), &mut out);
        if h.mtime != 0 {
            kv_num(&mut out, b"M", h.mtime as u64);
        }
        if h.uidvalidity != 0 {
            kv_num(&mut out, b"V", u64::from(h.uidvalidity));
        }
        if h.createdmodseq != 0 {
            kv_num(&mut out, b"C", h.createdmodseq);
        }
        if h.foldermodseq != 0 {
            kv_num(&mut out, b"F", h.foldermodseq);
        }
        out.extend_from_slice(b" T ");
        dlist::print_astring(mbtype::to_letters(h.mbtype)?.as_bytes(), &mut out);
        if let Some(p) = &h.partition {
            kv_str(&mut out, b"P", cstr(p));
        }
        out.push(b')');
    }
    out.extend_from_slice(b"))");
    Ok(out)
}

/// The `N`+dbname key of a 3.6 name record.
pub fn n_key(dbname: &[u8]) -> Vec<u8> {
    [b"N".as_slice(), dbname].concat()
}

/// The `I`+uniqueid key of a 3.6 uniqueid record.
pub fn i_key(uniqueid: &[u8]) -> Vec<u8> {
    [b"I".as_slice(), uniqueid].concat()
}

// ---------------------------------------------------------------------------------------
// Keys.

/// What a `mailboxes.db` key is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind<'a> {
    /// 3.6 `N`+dbname.
    Name(&'a [u8]),
    /// 3.6 `I`+uniqueid.
    Uniqueid(&'a [u8]),
    /// 3.6 reverse-ACL keys (`A…`).
    Racl,
    /// Pre-3.6 internal keys (`$RACL…`, `$RUNQ…`).
    Dollar,
    /// Anything else: a pre-3.6 intname key, or junk in a 3.6 file.
    Other,
}

/// Classify a key by its first byte as 3.6 does (a pre-3.6 intname key starting with `N` or
/// `I` classifies as 3.6, which is Cyrus's own `News` hazard, §7.8).
pub fn key_kind(key: &[u8]) -> KeyKind<'_> {
    match key.split_first() {
        Some((b'N', rest)) => KeyKind::Name(rest),
        Some((b'I', rest)) => KeyKind::Uniqueid(rest),
        Some((b'A', _)) => KeyKind::Racl,
        Some((b'$', _)) => KeyKind::Dollar,
        _ => KeyKind::Other,
    }
}

/// Which key/value generation a file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// 3.6+: N/I/A keys.
    V36,
    /// ≤3.4: intname keys, text or dlist values.
    Legacy,
}

/// One step of 3.6's upgrade detection (`_check_rec_cb`, 3.6.1:imap/mboxlist.c:5352-5412):
/// `Some(layout)` when this record decides, `None` to look at the next key. With no
/// decisive key at all Cyrus upgrades, i.e. the file is [`Layout::Legacy`].
pub fn detect_step(key: &[u8], value: &[u8]) -> Option<Layout> {
    if key.starts_with(b"$RACL") || key.starts_with(b"$RUNQ") {
        return Some(Layout::Legacy);
    }
    if key.starts_with(b"AS\x1E") {
        return Some(Layout::V36);
    }
    match key.first() {
        Some(b'I') => Some(match parse_entry(None, value) {
            Ok(e) if !e.name.is_empty() => Layout::V36,
            _ if dlist::parse(value)
                .ok()
                .and_then(|d| d.get(b"N").cloned())
                .is_some() =>
            {
                Layout::V36
            }
            _ => Layout::Legacy,
        }),
        Some(b'N') => match parse_entry(Some(&key[1..]), value) {
            Ok(_) => Some(Layout::V36),
            Err(_) => None,
        },
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------
// Pre-3.6 values, translated to 3.6 bits for migration.

/// Decode a pre-3.6 record (intname key, 2.x text or 2.5–3.4 dlist value) into 3.6 terms:
/// 2.x/3.4 numeric bits and 3.4 letter sets are translated to 3.6 bits (which 3.6 itself
/// does not do, §7.7), and `legacy_dirs` adds `l` as 3.6's upgrade does.
pub fn parse_legacy_value(
    intname: &[u8],
    value: &[u8],
    legacy_dirs: bool,
) -> Result<Entry, EntryError> {
    if value.is_empty() {
        return Err(EntryError::BadFormat("empty value".into()));
    }
    let mut e = Entry {
        name: intname.to_vec(),
        ..Entry::default()
    };
    let bits34 = if value[0] == b'%' {
        let d = dlist::parse(value).map_err(|err| EntryError::BadFormat(err.to_string()))?;
        let dlist::Dlist::KvList(items) = &d else {
            return Err(EntryError::BadFormat("not a kvlist".into()));
        };
        let mut bits = 0;
        for (k, v) in items {
            let s = v.as_bytes().map(|b| cstr(b).to_vec());
            match (k.as_slice(), v) {
                (b"A", dlist::Dlist::KvList(pairs)) => {
                    let mut acl = Vec::new();
                    for (id, r) in pairs {
                        acl.extend_from_slice(id);
                        acl.push(b'\t');
                        acl.extend_from_slice(r.as_bytes().unwrap_or_default());
                        acl.push(b'\t');
                    }
                    e.acl = Some(acl);
                }
                (b"I", _) => e.uniqueid = s,
                (b"P", _) => e.partition = s,
                (b"S", _) => e.server = s,
                (b"T", _) => bits = mbtype34::from_letters(&s.unwrap_or_default()),
                (b"V", _) => e.uidvalidity = c_strtol(&s.unwrap_or_default()).0 as u32,
                (b"C", _) => e.createdmodseq = c_strtoul(&s.unwrap_or_default(), 10).0,
                (b"F", _) => e.foldermodseq = c_strtoul(&s.unwrap_or_default(), 10).0,
                (b"M", _) => e.mtime = c_strtol(&s.unwrap_or_default()).0,
                _ => {}
            }
        }
        bits
    } else {
        parse_text(&mut e, value);
        c_strtol_at(value).0 as u32
    };
    e.mbtype = mbtype34::to_36(bits34)?;
    if legacy_dirs {
        e.mbtype |= mbtype::LEGACY_DIRS;
    }
    Ok(e)
}

/// A 2.x/3.4 text value `"<mbtype34> [server!]partition acl"`.
pub fn encode_text_2x(e: &Entry) -> Result<Vec<u8>, EntryError> {
    let mut out = Vec::new();
    out.extend_from_slice(mbtype34::from_36(e.mbtype)?.to_string().as_bytes());
    out.push(b' ');
    push_location(&mut out, e);
    out.push(b' ');
    out.extend_from_slice(e.acl.as_deref().unwrap_or_default());
    Ok(out)
}

/// `[server!]partition`, what ≤3.4 stores and prints.
pub fn push_location(out: &mut Vec<u8>, e: &Entry) {
    if let Some(s) = &e.server {
        out.extend_from_slice(s);
        out.push(b'!');
    }
    out.extend_from_slice(e.partition.as_deref().unwrap_or_default());
}

/// A 3.x (3.2–3.4) dlist value `%(A I P S T V C F M)`; `T` only when the type is not 0.
pub fn encode_dlist_34(e: &Entry) -> Result<Vec<u8>, EntryError> {
    let bits = mbtype34::from_36(e.mbtype)?;
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(b"%(");
    let mut body = Vec::new();
    if let Some(acl) = &e.acl {
        push_acl(&mut body, acl);
    }
    if let Some(u) = &e.uniqueid {
        kv_str(&mut body, b"I", u);
    }
    if let Some(p) = &e.partition {
        kv_str(&mut body, b"P", p);
    }
    if let Some(s) = &e.server {
        kv_str(&mut body, b"S", s);
    }
    if bits != 0 {
        kv_str(&mut body, b"T", mbtype34::to_letters(bits).as_bytes());
    }
    if e.uidvalidity != 0 {
        kv_num(&mut body, b"V", u64::from(e.uidvalidity));
    }
    if e.createdmodseq != 0 {
        kv_num(&mut body, b"C", e.createdmodseq);
    }
    if e.foldermodseq != 0 {
        kv_num(&mut body, b"F", e.foldermodseq);
    }
    kv_num(&mut body, b"M", e.mtime as u64);
    out.extend_from_slice(&body[1..]);
    out.push(b')');
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_n_parse_is_parse_entry() {
        let mut fast = 0;
        for v in sample_n_values(3, 20_000) {
            let Some(f) = parse_n_plain(&v) else {
                continue;
            };
            fast += 1;
            let e = parse_entry(Some(b"user\x1Fbob"), &v)
                .unwrap_or_else(|err| panic!("{:?}: fast path took it, {err}", show(&v)));
            let acl: Option<Vec<u8>> = f.saw_acl.then(|| {
                f.acl_pairs()
                    .iter()
                    .flat_map(|(i, r)| [*i, b"\t", *r, b"\t"].concat())
                    .collect()
            });
            let got = Entry {
                name: e.name.clone(),
                mbtype: f.mbtype,
                partition: f.partition.map(<[u8]>::to_vec),
                server: f.server.map(<[u8]>::to_vec),
                acl,
                uniqueid: f.uniqueid.map(<[u8]>::to_vec),
                legacy_specialuse: None,
                mtime: f.mtime,
                uidvalidity: f.uidvalidity,
                createdmodseq: f.createdmodseq,
                foldermodseq: f.foldermodseq,
                name_history: Vec::new(),
            };
            assert_eq!(got, e, "{:?}", show(&v));
        }
        assert!(fast > 3_000, "only {fast} values took the fast path");
        assert!(parse_n_plain(b"%(T er P default S backend01 M 1700000000 A %(u1 lrs))").is_some());
    }

    fn show(v: &[u8]) -> String {
        String::from_utf8_lossy(v).into_owned()
    }

    #[test]
    fn letters_36() {
        for (s, t) in [
            ("e", 0),
            ("ei", mbtype::INTERMEDIATE),
            ("ed", mbtype::DELETED),
            ("erz", mbtype::REMOTE | mbtype::RESERVE),
            ("c", mbtype::CALENDAR),
            ("a", mbtype::ADDRESSBOOK),
            ("b", mbtype::COLLECTION),
            ("s", mbtype::JMAPSUBMIT),
            ("p", mbtype::JMAPPUSHSUB),
            ("f", mbtype::SIEVE),
            ("n", mbtype::NETNEWS),
            ("edmrzil", 0x3F0),
        ] {
            assert_eq!(mbtype::from_letters(s.as_bytes()).unwrap(), t, "{s}");
            assert_eq!(mbtype::to_letters(t).unwrap(), s);
        }
        // Legacy letter order without a type letter is accepted.
        assert_eq!(mbtype::from_letters(b"r").unwrap(), mbtype::REMOTE);
        assert_eq!(mbtype::from_letters(b"").unwrap(), 0);
        for bad in ["rc", "dc", "zc", "mb", "ia", "ee", "x"] {
            assert!(matches!(
                mbtype::from_letters(bad.as_bytes()),
                Err(EntryError::Abort(_))
            ));
        }
        assert!(mbtype::to_letters(4).is_err());
        assert_eq!(mbtype::to_letters(4 | mbtype::REMOTE).unwrap(), "r");
    }

    #[test]
    fn letters_34() {
        assert_eq!(mbtype34::to_letters(1 | 32), "rc");
        assert_eq!(mbtype34::from_letters(b"cr"), 33);
        assert_eq!(
            mbtype34::to_36(33).unwrap(),
            mbtype::REMOTE | mbtype::CALENDAR
        );
        assert_eq!(
            mbtype34::from_36(mbtype::REMOTE | mbtype::CALENDAR).unwrap(),
            33
        );
        assert!(mbtype34::to_36(32 | 64).is_err());
        for b in 0..2048u32 {
            if let Ok(t) = mbtype34::to_36(b) {
                assert_eq!(mbtype34::from_36(t).unwrap(), b);
            }
        }
    }

    #[test]
    fn c_numbers() {
        assert_eq!(c_strtol(b"  -12x"), (-12, 5));
        assert_eq!(c_strtol(b"x"), (0, 0));
        assert_eq!(c_strtol(b"99999999999999999999"), (i64::MAX, 20));
        assert_eq!(c_atoi(b"4294967297"), 1);
        assert_eq!(c_strtoul(b"-1", 10).0, u64::MAX);
        assert_eq!(c_strtoul(b"6553F100", 16).0, 0x6553_F100);
        assert_eq!(c_strtoul(b"0x1f", 16).0, 0x1F);
        assert_eq!(c_strtoul(b"0xg", 16), (0, 1));
        assert_eq!(c_strtoul(b"bar", 16), (0xBA, 2));
    }

    #[test]
    fn parse_36_shapes() {
        let e = parse_entry(
            Some(b"user\x1Fbob"),
            b"%(T e I 5eed P default V 1690000001 C 1 F 101 M 1700000000 A %(bob lrswipkxtecdan))",
        )
        .unwrap();
        assert_eq!(e.name, b"user.bob");
        assert_eq!(e.uniqueid.as_deref(), Some(&b"5eed"[..]));
        assert_eq!(e.acl.as_deref(), Some(&b"bob\tlrswipkxtecdan\t"[..]));
        assert_eq!(
            (e.uidvalidity, e.createdmodseq, e.foldermodseq),
            (1690000001, 1, 101)
        );
        assert_eq!(e.mtime, 1700000000);
        let back = encode_n_value(&e).unwrap();
        assert_eq!(
            back,
            b"%(T e I 5eed P default V 1690000001 C 1 F 101 M 1700000000 A %(bob lrswipkxtecdan))"
        );
        // Legacy text read with 3.6 bits: 3.4 REMOTE (1) is NETNEWS.
        let e = parse_entry(Some(b"user\x1Fremote"), b"1 be2!default remote\tlr\t").unwrap();
        assert_eq!(e.mbtype, mbtype::NETNEWS);
        assert_eq!(e.server.as_deref(), Some(&b"be2"[..]));
        assert_eq!(e.partition.as_deref(), Some(&b"default"[..]));
        assert_eq!(e.acl.as_deref(), Some(&b"remote\tlr\t"[..]));
        // Extended text prefix.
        let e = parse_entry(
            Some(b"x"),
            b"(uniqueid 0123 specialuse \\Sent) 0 default a\tlr\t",
        )
        .unwrap();
        assert_eq!(e.uniqueid.as_deref(), Some(&b"0123"[..]));
        assert_eq!(e.legacy_specialuse.as_deref(), Some(&b"\\Sent"[..]));
        assert_eq!(e.partition.as_deref(), Some(&b"default"[..]));
        // Aborts and bad formats.
        assert!(matches!(
            parse_entry(Some(b"x"), b"%(T rc)"),
            Err(EntryError::Abort(_))
        ));
        assert!(matches!(
            parse_entry(Some(b"x"), b"%(M NIL)"),
            Err(EntryError::Abort(_))
        ));
        assert!(matches!(
            parse_entry(Some(b"x"), b"%(T e"),
            Err(EntryError::BadFormat(_))
        ));
        assert!(matches!(
            parse_entry(Some(b"x"), b""),
            Err(EntryError::BadFormat(_))
        ));
    }

    #[test]
    fn i_value_with_history() {
        let e = Entry {
            name: b"user.bob.Renamed".to_vec(),
            mbtype: 0,
            partition: Some(b"default".to_vec()),
            acl: Some(b"bob\tlr\t".to_vec()),
            uniqueid: Some(b"u1".to_vec()),
            mtime: 1700000000,
            uidvalidity: 7,
            name_history: vec![FormerName {
                name: b"user.bob.OldName".to_vec(),
                mtime: 1690000000,
                uidvalidity: 77,
                createdmodseq: 3,
                foldermodseq: 7,
                mbtype: 0,
                partition: Some(b"default".to_vec()),
            }],
            ..Entry::default()
        };
        let v = encode_i_value(&e, b"user\x1Fbob\x1FRenamed").unwrap();
        assert_eq!(
            v,
            b"%(T e N user\x1Fbob\x1FRenamed P default V 7 M 1700000000 A %(bob lr) \
H (%(N user\x1Fbob\x1FOldName M 1690000000 V 77 C 3 F 7 T e P default)))"
                .to_vec()
        );
        let back = parse_entry(None, &v).unwrap();
        assert_eq!(back.name, e.name);
        assert_eq!(back.name_history, e.name_history);
    }

    #[test]
    fn legacy_values() {
        let e = parse_legacy_value(b"user.remote", b"1 be2!default remote\tlr\t", false).unwrap();
        assert_eq!(e.mbtype, mbtype::REMOTE);
        assert_eq!(encode_text_2x(&e).unwrap(), b"1 be2!default remote\tlr\t");
        let v =
            b"%(A %(bob lrswipkxtecdan) I 5eed P default T c V 1600000000 C 1 F 5 M 1700000000)";
        let e = parse_legacy_value(b"user.bob.#calendars", v, false).unwrap();
        assert_eq!(e.mbtype, mbtype::CALENDAR);
        assert_eq!(encode_dlist_34(&e).unwrap(), v.to_vec());
        let e = parse_legacy_value(b"x", b"%(P p S s T rc M 1)", true).unwrap();
        assert_eq!(
            e.mbtype,
            mbtype::CALENDAR | mbtype::REMOTE | mbtype::LEGACY_DIRS
        );
    }

    fn arb_entry() -> impl proptest::strategy::Strategy<Value = Entry> {
        use proptest::prelude::*;
        let bytes = || proptest::collection::vec(1u8..=255, 0..20);
        let types = prop_oneof![
            Just(0u32),
            Just(1),
            Just(2),
            Just(3),
            Just(5),
            Just(8),
            Just(9),
            Just(10)
        ];
        (
            (
                types,
                0u32..64,
                proptest::option::of(bytes()),
                proptest::option::of(bytes()),
            ),
            (
                proptest::option::of(proptest::collection::vec(
                    (
                        proptest::collection::vec(1u8..=255, 0..10)
                            .prop_filter("no tab", |v| !v.contains(&b'\t')),
                        proptest::collection::vec(1u8..=255, 0..10)
                            .prop_filter("no tab", |v| !v.contains(&b'\t')),
                    ),
                    0..4,
                )),
                proptest::option::of("[0-9a-f-]{1,36}"),
                0i64..=i32::MAX as i64,
                any::<u32>(),
                any::<u64>(),
                any::<u64>(),
            ),
        )
            .prop_map(
                |((ty, fl, part, server), (acl, uid, mtime, v, c, f))| Entry {
                    name: Vec::new(),
                    mbtype: ty | (fl << 4),
                    partition: part,
                    server,
                    acl: Some(
                        acl.unwrap_or_default()
                            .into_iter()
                            .flat_map(|(a, b)| [a, b"\t".to_vec(), b, b"\t".to_vec()].concat())
                            .collect(),
                    ),
                    uniqueid: uid.map(String::into_bytes),
                    legacy_specialuse: None,
                    mtime,
                    uidvalidity: v,
                    createdmodseq: c,
                    foldermodseq: f,
                    name_history: Vec::new(),
                },
            )
    }

    proptest::proptest! {
        /// encode → decode is the identity on every entry 3.6 can store (ACLs in pair form:
        /// Cyrus rebuilds the ACL string from its pairs).
        #[test]
        fn n_value_round_trip(mut e in arb_entry(), name in "[a-z]{1,8}(\\.[a-z ]{1,8}){0,3}") {
            e.name = name.clone().into_bytes();
            let db = mboxname::to_dbname_cyrus(&e.name);
            let v = encode_n_value(&e).unwrap();
            let back = parse_entry(Some(&db), &v).unwrap();
            proptest::prop_assert_eq!(back, e.clone());
            let iv = encode_i_value(&e, &db).unwrap();
            let mut back = parse_entry(None, &iv).unwrap();
            back.uniqueid = e.uniqueid.clone();
            proptest::prop_assert_eq!(back, e);
        }

        #[test]
        fn never_panics(v in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80)) {
            let _ = parse_entry(Some(b"x"), &v);
            let _ = parse_entry(None, &v);
            let _ = parse_legacy_value(b"x", &v, false);
        }
    }
}
