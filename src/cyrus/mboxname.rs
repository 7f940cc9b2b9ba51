//! Cyrus mailbox names: the internal name (intname, what MUPDATE carries) and the dbname (the
//! `mailboxes.db` key since 3.6, whose byte order is Cyrus's LIST/UPDATE order).
//!
//! `mbname_dbname` (3.6.1:imap/mboxlist.c:5293-5333): the domain (text before the first `!`)
//! is copied as is and followed by 0x1D; the rest is split on `.` with empty components
//! dropped (`strarray_split` uses `strtok`, so `user.e.`, `user..e` and `.user.e` all name
//! `user.e`), joined with 0x1F, and the escaped dot `^` becomes a real `.`; an empty domain is
//! the default domain. [`to_dbname`] is that transform, the key of our store, so that names
//! Cyrus treats as one mailbox are one mailbox here too. Cyrus also re-prints the hex tail of
//! `DELETED.…` names, which turns a non-hex tail into another name (`DELETED.foo.xyz` becomes
//! `foo`, formats spec §7.1): such names are refused rather than stored under a stranger's key.

/// Group separator: ends the domain part of a dbname.
pub const DOMAIN_SEP: u8 = 0x1D;
/// Unit separator: the hierarchy separator of a dbname.
pub const HIER_SEP: u8 = 0x1F;

/// Why a name has no faithful dbname.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("mailbox name is empty")]
    Empty,
    #[error("mailbox name contains byte 0x{0:02X}, which Cyrus uses as a dbname separator")]
    SeparatorByte(u8),
    #[error("a DELETED mailbox name must end in Cyrus's hexadecimal deletion time")]
    DeletedTail,
}

/// The dbname (store key) of an internal name, as Cyrus builds it. Fails for names Cyrus would
/// store under an empty key (empty, or only dots), names holding NUL or the separator bytes
/// 0x1D/0x1F themselves, and `DELETED.…` names whose tail Cyrus would rewrite.
pub fn to_dbname(intname: &[u8]) -> Result<Vec<u8>, NameError> {
    if let Some(&b) = intname
        .iter()
        .find(|&&b| b == DOMAIN_SEP || b == HIER_SEP || b == 0)
    {
        return Err(NameError::SeparatorByte(b));
    }
    let cyrus = to_dbname_cyrus(intname);
    if cyrus.is_empty() {
        return Err(NameError::Empty);
    }
    // Without the DELETED rewrite, Cyrus's transform is this plain one; where the two differ,
    // Cyrus would have changed the name itself.
    let mut plain = Vec::with_capacity(intname.len());
    let rest = match intname.iter().position(|&b| b == b'!') {
        Some(bang) => {
            if bang > 0 {
                plain.extend_from_slice(&intname[..bang]);
                plain.push(DOMAIN_SEP);
            }
            &intname[bang + 1..]
        }
        None => intname,
    };
    for component in rest.split(|&b| b == b'.').filter(|c| !c.is_empty()) {
        if !plain.is_empty() && plain.last() != Some(&DOMAIN_SEP) {
            plain.push(HIER_SEP);
        }
        plain.extend(component.iter().map(|&b| if b == b'^' { b'.' } else { b }));
    }
    if plain != cyrus {
        return Err(NameError::DeletedTail);
    }
    Ok(cyrus)
}

/// The internal name of a dbname (`mbname_from_dbname` followed by `mbname_intname`).
pub fn from_dbname(dbname: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(dbname.len());
    from_dbname_into(dbname, &mut out);
    out
}

/// [`from_dbname`] into a reused buffer (cleared first): scans call it once per record.
pub fn from_dbname_into(dbname: &[u8], out: &mut Vec<u8>) {
    out.clear();
    let rest = match dbname.iter().position(|&b| b == DOMAIN_SEP) {
        Some(gs) => {
            out.extend_from_slice(&dbname[..gs]);
            out.push(b'!');
            &dbname[gs + 1..]
        }
        None => {
            // A `!` in a name of the default domain: write the (empty) domain so the name
            // reads back as this key and not as a domain-qualified one.
            if dbname.contains(&b'!') {
                out.push(b'!');
            }
            dbname
        }
    };
    out.extend(rest.iter().map(|&b| match b {
        HIER_SEP => b'.',
        b'.' => b'^',
        other => other,
    }));
}

/// The default `deletedprefix` (3.6.1:lib/imapoptions:821).
pub const DELETED_PREFIX: &[u8] = b"DELETED";

/// Cyrus's parsed form of a name (`mbname_t`): what both Cyrus transforms go through.
struct MbName<'a> {
    domain: Option<&'a [u8]>,
    /// The `%X` deletion time; 0 = not deleted.
    is_deleted: u32,
    localpart: Option<Vec<u8>>,
    boxes: Vec<Vec<u8>>,
}

/// `strarray_split`: `strtok` semantics, so empty components vanish.
fn split_nonempty(s: &[u8], sep: u8) -> Vec<Vec<u8>> {
    s.split(|&b| b == sep)
        .filter(|c| !c.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

/// The shared tail of `mbname_from_intname` and `mbname_from_dbname`: DELETED and user
/// detection on the components.
fn classify(domain: Option<&[u8]>, mut boxes: Vec<Vec<u8>>) -> MbName<'_> {
    let mut is_deleted = 0;
    if boxes.len() > 2 && boxes[0] == DELETED_PREFIX {
        boxes.remove(0);
        let tail = boxes.pop().unwrap_or_default();
        // strtoul(…, 16) into a time_t, printed later with "%X" of (unsigned).
        is_deleted = super::entry::c_strtoul(&tail, 16).0 as u32;
    }
    let mut localpart = None;
    if boxes.len() > 1 && boxes[0] == b"user" {
        boxes.remove(0);
        localpart = Some(boxes.remove(0));
    }
    MbName {
        domain: domain.filter(|d| !d.is_empty()),
        is_deleted,
        localpart,
        boxes,
    }
}

/// Cyrus 3.6.1 `mboxname_to_dbname` (`mbname_from_intname` + `mbname_dbname`), quirks
/// included: empty components vanish, a `DELETED.…` name whose last component is not hex is
/// rewritten (`DELETED.foo.bar` → `DELETED␟foo␟BA`, `DELETED.foo.xyz` → `foo`), an empty
/// domain is dropped. Use it where the output must equal Cyrus's (undump, `H` lists); use
/// [`to_dbname`] where names must stay distinct.
pub fn to_dbname_cyrus(intname: &[u8]) -> Vec<u8> {
    let intname = super::entry::cstr(intname);
    if intname.is_empty() {
        return Vec::new();
    }
    let (domain, rest) = match intname.iter().position(|&b| b == b'!') {
        Some(i) => (Some(&intname[..i]), &intname[i + 1..]),
        None => (None, intname),
    };
    let boxes = split_nonempty(rest, b'.')
        .into_iter()
        .map(|c| {
            c.into_iter()
                .map(|b| if b == b'^' { b'.' } else { b })
                .collect()
        })
        .collect();
    let m = classify(domain, boxes);
    let mut out = Vec::with_capacity(intname.len() + 8);
    if let Some(d) = m.domain {
        out.extend_from_slice(d);
        out.push(DOMAIN_SEP);
    }
    let mut sep = false;
    if m.is_deleted != 0 {
        out.extend_from_slice(DELETED_PREFIX);
        sep = true;
    }
    if let Some(lp) = &m.localpart {
        if sep {
            out.push(HIER_SEP);
        }
        out.extend_from_slice(b"user\x1F");
        out.extend_from_slice(lp);
        sep = true;
    }
    for b in &m.boxes {
        if sep {
            out.push(HIER_SEP);
        }
        out.extend_from_slice(b);
        sep = true;
    }
    if m.is_deleted != 0 {
        if sep {
            out.push(HIER_SEP);
        }
        out.extend_from_slice(format!("{:X}", m.is_deleted).as_bytes());
    }
    out
}

/// Cyrus 3.6.1 `mboxname_from_dbname` (`mbname_from_dbname` + `mbname_intname`): the name
/// `ctl_mboxlist -d` prints for a key. Same quirks as [`to_dbname_cyrus`], and a literal `.`
/// becomes `^`.
pub fn from_dbname_cyrus(dbname: &[u8]) -> Vec<u8> {
    let dbname = super::entry::cstr(dbname);
    if dbname.is_empty() {
        return Vec::new();
    }
    let (domain, rest) = match dbname.iter().position(|&b| b == DOMAIN_SEP) {
        Some(i) => (Some(&dbname[..i]), &dbname[i + 1..]),
        None => (None, dbname),
    };
    let m = classify(domain, split_nonempty(rest, HIER_SEP));
    let mut out = Vec::with_capacity(dbname.len() + 8);
    let push_int = |out: &mut Vec<u8>, c: &[u8]| {
        out.extend(c.iter().map(|&b| if b == b'.' { b'^' } else { b }))
    };
    if let Some(d) = m.domain {
        out.extend_from_slice(d);
        out.push(b'!');
    }
    let mut sep = false;
    if m.is_deleted != 0 {
        out.extend_from_slice(DELETED_PREFIX);
        sep = true;
    }
    if let Some(lp) = &m.localpart {
        if sep {
            out.push(b'.');
        }
        out.extend_from_slice(b"user.");
        push_int(&mut out, lp);
        sep = true;
    }
    for b in &m.boxes {
        if sep {
            out.push(b'.');
        }
        push_int(&mut out, b);
        sep = true;
    }
    if m.is_deleted != 0 {
        if sep {
            out.push(b'.');
        }
        out.extend_from_slice(format!("{:X}", m.is_deleted).as_bytes());
    }
    out
}

/// Cyrus 3.6.1's observed LIST order for a set of tricky names (cyrus-mupdate.md §2.3):
/// dbname byte order, which is not `strcmp` order of the names.
#[cfg(test)]
pub(crate) const OBSERVED_LIST_ORDER: &[&[u8]] = &[
    b"DELETED.user.q.5F000000",
    b"example.com!user.z",
    b"shared",
    b"shared.x y",
    b"user",
    b"user.A",
    b"user.a",
    b"user.a.x",
    b"user.a-b",
    b"user.a^b",
    b"user.a0",
    b"user.bb",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_examples() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"user.bob.Sent", b"user\x1Fbob\x1FSent"),
            (b"user.john^doe", b"user\x1Fjohn.doe"),
            (b"example.com!user.alice", b"example.com\x1Duser\x1Falice"),
            (
                b"example.com!DELETED.user.bob.Old.6553F100",
                b"example.com\x1DDELETED\x1Fuser\x1Fbob\x1FOld\x1F6553F100",
            ),
            (b"shared.Announcements", b"shared\x1FAnnouncements"),
            (b"user.x!user.a", b"user.x\x1Duser\x1Fa"),
        ];
        for (name, db) in cases {
            assert_eq!(to_dbname(name).unwrap(), *db);
            assert_eq!(from_dbname(db), *name);
        }
    }

    #[test]
    fn order_matches_cyrus_list_order() {
        // cyrus-mupdate.md §2.3, observed order.
        let names = OBSERVED_LIST_ORDER;
        let mut keys: Vec<Vec<u8>> = names.iter().map(|n| to_dbname(n).unwrap()).collect();
        keys.sort();
        let back: Vec<Vec<u8>> = keys.iter().map(|k| from_dbname(k)).collect();
        assert_eq!(back, names.iter().map(|n| n.to_vec()).collect::<Vec<_>>());
    }

    #[test]
    fn cyrus_transforms_and_their_quirks() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"user.bob.Sent", b"user\x1Fbob\x1FSent"),
            (b"user.john^doe", b"user\x1Fjohn.doe"),
            (b"example.com!user.alice", b"example.com\x1Duser\x1Falice"),
            (
                b"example.com!DELETED.user.bob.Old.6553F100",
                b"example.com\x1DDELETED\x1Fuser\x1Fbob\x1FOld\x1F6553F100",
            ),
            (
                b"DELETED.shared.Old.65000000",
                b"DELETED\x1Fshared\x1FOld\x1F65000000",
            ),
            (b"shared", b"shared"),
            (b"user", b"user"),
        ];
        for (name, db) in cases {
            assert_eq!(to_dbname_cyrus(name), *db);
            assert_eq!(from_dbname_cyrus(db), *name);
        }
        // §7.1: non-hex DELETED tails are mangled, empty components vanish.
        assert_eq!(to_dbname_cyrus(b"DELETED.foo.bar"), b"DELETED\x1Ffoo\x1FBA");
        assert_eq!(to_dbname_cyrus(b"DELETED.foo.xyz"), b"foo");
        assert_eq!(to_dbname_cyrus(b"user..bob."), b"user\x1Fbob");
        assert_eq!(from_dbname_cyrus(b"ews"), b"ews");
        assert_eq!(to_dbname_cyrus(b"!x"), b"x");
        assert_eq!(to_dbname_cyrus(b""), b"");
    }

    #[test]
    fn refuses_irreversible_names() {
        assert_eq!(to_dbname(b""), Err(NameError::Empty));
        assert_eq!(to_dbname(b"a\x1Fb"), Err(NameError::SeparatorByte(0x1F)));
        assert_eq!(to_dbname(b"a\x1Db"), Err(NameError::SeparatorByte(0x1D)));
        assert_eq!(to_dbname(b"a\0b"), Err(NameError::SeparatorByte(0)));
        assert_eq!(to_dbname(b".."), Err(NameError::Empty));
        assert_eq!(to_dbname(b"DELETED.foo.xyz"), Err(NameError::DeletedTail));
        assert_eq!(to_dbname(b"DELETED.foo.0x1A"), Err(NameError::DeletedTail));
        assert_eq!(
            to_dbname(b"DELETED.foo.1A").unwrap(),
            b"DELETED\x1Ffoo\x1F1A"
        );
    }

    #[test]
    fn empty_components_name_one_mailbox_as_in_cyrus() {
        for same in [
            &b"user.e."[..],
            b"user..e",
            b".user.e",
            b"user.e",
            b"!user.e",
        ] {
            assert_eq!(
                to_dbname(same).unwrap(),
                b"user\x1Fe",
                "{}",
                crate::proto::escape(same)
            );
        }
        assert_eq!(to_dbname(b"d.com!user..x").unwrap(), b"d.com\x1Duser\x1Fx");
        // `!!`: the default (empty) domain and a local part `!`; its name reads back.
        assert_eq!(to_dbname(b"!!").unwrap(), b"!");
        assert_eq!(from_dbname(b"!"), b"!!");
    }

    proptest::proptest! {
        #[test]
        fn round_trip(name in proptest::collection::vec(proptest::prelude::any::<u8>(), 1..64)) {
            // The canonical name of a key maps back to the same key.
            if let Ok(db) = to_dbname(&name) {
                proptest::prop_assert_eq!(to_dbname(&from_dbname(&db)).unwrap(), db.clone());
                proptest::prop_assert_eq!(to_dbname_cyrus(&name), db);
            }
        }
    }
}
