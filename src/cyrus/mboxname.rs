//! Cyrus mailbox names: the internal name (intname, what MUPDATE carries) and the dbname (the
//! `mailboxes.db` key since 3.6, whose byte order is Cyrus's LIST/UPDATE order).
//!
//! `mbname_dbname` (3.6.1:imap/mboxlist.c:5293-5333): the domain (text before the first `!`)
//! is copied as is and followed by 0x1D; the rest is split on `.`, joined with 0x1F, and the
//! escaped dot `^` becomes a real `.`. We apply that transform to every name. Cyrus also
//! re-prints the hex tail of `DELETED.…` names, which mangles a non-hex tail into another name
//! (formats spec §7.1); for canonical tails both transforms agree, and for the others ours keeps
//! the name instead of losing it.

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
}

/// The dbname of an internal name. Fails where the transform would not be reversible (an empty
/// name, or one holding the separator bytes 0x1D/0x1F themselves), so two names never share a
/// key.
pub fn to_dbname(intname: &[u8]) -> Result<Vec<u8>, NameError> {
    if intname.is_empty() {
        return Err(NameError::Empty);
    }
    if let Some(&b) = intname.iter().find(|&&b| b == DOMAIN_SEP || b == HIER_SEP) {
        return Err(NameError::SeparatorByte(b));
    }
    let mut out = Vec::with_capacity(intname.len());
    let rest = match intname.iter().position(|&b| b == b'!') {
        Some(bang) => {
            out.extend_from_slice(&intname[..bang]);
            out.push(DOMAIN_SEP);
            &intname[bang + 1..]
        }
        None => intname,
    };
    out.extend(rest.iter().map(|&b| match b {
        b'.' => HIER_SEP,
        b'^' => b'.',
        other => other,
    }));
    Ok(out)
}

/// The internal name of a dbname (`mbname_from_dbname` followed by `mbname_intname`).
pub fn from_dbname(dbname: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(dbname.len());
    let rest = match dbname.iter().position(|&b| b == DOMAIN_SEP) {
        Some(gs) => {
            out.extend_from_slice(&dbname[..gs]);
            out.push(b'!');
            &dbname[gs + 1..]
        }
        None => dbname,
    };
    out.extend(rest.iter().map(|&b| match b {
        HIER_SEP => b'.',
        b'.' => b'^',
        other => other,
    }));
    out
}

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
        let names: &[&[u8]] = &[
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
        let mut keys: Vec<Vec<u8>> = names.iter().map(|n| to_dbname(n).unwrap()).collect();
        keys.sort();
        let back: Vec<Vec<u8>> = keys.iter().map(|k| from_dbname(k)).collect();
        assert_eq!(back, names.iter().map(|n| n.to_vec()).collect::<Vec<_>>());
    }

    #[test]
    fn refuses_irreversible_names() {
        assert_eq!(to_dbname(b""), Err(NameError::Empty));
        assert_eq!(to_dbname(b"a\x1Fb"), Err(NameError::SeparatorByte(0x1F)));
        assert_eq!(to_dbname(b"a\x1Db"), Err(NameError::SeparatorByte(0x1D)));
    }

    proptest::proptest! {
        #[test]
        fn round_trip(name in proptest::collection::vec(proptest::prelude::any::<u8>(), 1..64)) {
            if let Ok(db) = to_dbname(&name) {
                proptest::prop_assert_eq!(from_dbname(&db), name);
            }
        }
    }
}
