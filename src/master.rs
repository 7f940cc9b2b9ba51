//! The master's write rules: Cyrus's `cmd_set` state machine (3.6.1:imap/mupdate.c:1537-1686,
//! cyrus-mupdate.md §1.11, "standard" mode, which is what a master without `mupdate_server`
//! always runs) as a pure function from (current record, command) to a decision.
//!
//! Where Cyrus 3.6.1 crashes (DELETE or DEACTIVATE of an unknown name, DEACTIVATE of a
//! reservation) or corrupts (an empty name, names over 490 bytes), we answer as spec §5
//! recommends instead.

use crate::cyrus::mboxname;
use crate::proto::quirks::MAX_MAILBOX_NAME;
use crate::store::MailboxRecord;

/// A write command's arguments after the name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write<'a> {
    Reserve { location: &'a [u8] },
    Activate { location: &'a [u8], acl: &'a [u8] },
    Deactivate { location: &'a [u8] },
    Delete,
}

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Store this (or delete, with `None`), then answer `OK "done"`.
    Store(Option<MailboxRecord>),
    /// Answer `OK "done"` without writing (a repeated RESERVE at the same location).
    Unchanged,
    /// Answer `NO "<text>"`.
    Refuse(&'static str),
}

pub const EXISTS: &str = "mailbox already exists";
pub const NOT_ACTIVE: &str = "mailbox not currently active";
pub const DOES_NOT_EXIST: &str = "mailbox doesn't exist";
pub const INVALID_NAME: &str = "invalid mailbox name";
pub const NAME_TOO_LONG: &str = "mailbox name too long";
pub const DONE: &str = "done";

/// Is `name` one the master can store? `None` if so, else the refusal text.
pub fn check_name(name: &[u8]) -> Option<&'static str> {
    if name.len() > MAX_MAILBOX_NAME {
        return Some(NAME_TOO_LONG);
    }
    mboxname::to_dbname(name).err().map(|_| INVALID_NAME)
}

/// Apply one write command to the current record under its name.
pub fn decide(current: Option<&MailboxRecord>, write: &Write<'_>, now: i64) -> Decision {
    use Decision::*;
    match (current, write) {
        (None, Write::Reserve { location }) => Store(Some(MailboxRecord::reserved(location, now))),
        (None, Write::Activate { location, acl }) => Store(Some(MailboxRecord::active(
            location,
            normalize_acl(acl),
            now,
        ))),
        (None, Write::Deactivate { .. } | Write::Delete) => Refuse(DOES_NOT_EXIST),
        (Some(cur), Write::Reserve { location }) => {
            if cur.location() != *location {
                Refuse(EXISTS)
            } else if cur.is_reserved() {
                Unchanged
            } else {
                // Cyrus demotes an active mailbox and drops its ACL (spec §5 item 8).
                Store(Some(MailboxRecord::reserved(location, now)))
            }
        }
        (Some(_), Write::Activate { location, acl }) => Store(Some(MailboxRecord::active(
            location,
            normalize_acl(acl),
            now,
        ))),
        (Some(cur), Write::Deactivate { location }) => {
            if cur.is_reserved() {
                Refuse(NOT_ACTIVE)
            } else {
                // The supplied location replaces the old one (spec §5 item 9).
                Store(Some(MailboxRecord::reserved(location, now)))
            }
        }
        (Some(_), Write::Delete) => Store(None),
    }
}

/// Cyrus's ACL round trip through its key-value form (imap/mailbox.c:8254-8287, spec §2.1):
/// `id TAB rights TAB` pairs; an identifier without a following TAB ends the list, and rights
/// run to the next TAB or the end. So `"anyone rls"` → `""`, `"a\tb\tc"` → `"a\tb\t"`,
/// `"a\tb"` → `"a\tb\t"`. Duplicates are kept, as in 3.6.1.
pub fn normalize_acl(acl: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(acl.len() + 1);
    let mut rest = acl;
    while let Some(tab) = rest.iter().position(|&b| b == b'\t') {
        let id = &rest[..tab];
        let after = &rest[tab + 1..];
        let (rights, next) = match after.iter().position(|&b| b == b'\t') {
            Some(t) => (&after[..t], &after[t + 1..]),
            None => (after, &after[after.len()..]),
        };
        out.extend_from_slice(id);
        out.push(b'\t');
        out.extend_from_slice(rights);
        out.push(b'\t');
        rest = next;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acl_normalisation_matches_cyrus() {
        assert_eq!(normalize_acl(b"anyone rls"), b"");
        assert_eq!(normalize_acl(b"a\tb\tc"), b"a\tb\t");
        assert_eq!(normalize_acl(b"a\tb"), b"a\tb\t");
        assert_eq!(
            normalize_acl(b"fred\tlrswipkxtecda\tanyone\tlrs\t"),
            b"fred\tlrswipkxtecda\tanyone\tlrs\t"
        );
        assert_eq!(normalize_acl(b""), b"");
        assert_eq!(normalize_acl(b"a\tl\ta\tr\t"), b"a\tl\ta\tr\t");
    }

    /// Every (state, command) pair of the §1.11 table, standard mode, with Cyrus's crashes
    /// replaced by the recommended NOs.
    #[test]
    fn cmd_set_table() {
        let l0: &[u8] = b"hostA!p1";
        let l: &[u8] = b"hostB!p2";
        let reserved = MailboxRecord::reserved(l0, 1);
        let active = MailboxRecord::active(l0, b"a\tl\t".to_vec(), 1);
        let t = 7;
        let res = |loc| Decision::Store(Some(MailboxRecord::reserved(loc, t)));
        let act = |loc| Decision::Store(Some(MailboxRecord::active(loc, b"x\ty\t".to_vec(), t)));
        let cases: Vec<(Option<&MailboxRecord>, Write, Decision)> = vec![
            (None, Write::Reserve { location: l }, res(l)),
            (
                None,
                Write::Activate {
                    location: l,
                    acl: b"x\ty",
                },
                act(l),
            ),
            (
                None,
                Write::Deactivate { location: l },
                Decision::Refuse(DOES_NOT_EXIST),
            ),
            (None, Write::Delete, Decision::Refuse(DOES_NOT_EXIST)),
            (
                Some(&reserved),
                Write::Reserve { location: l0 },
                Decision::Unchanged,
            ),
            (
                Some(&reserved),
                Write::Reserve { location: l },
                Decision::Refuse(EXISTS),
            ),
            (
                Some(&reserved),
                Write::Activate {
                    location: l,
                    acl: b"x\ty",
                },
                act(l),
            ),
            (
                Some(&reserved),
                Write::Deactivate { location: l0 },
                Decision::Refuse(NOT_ACTIVE),
            ),
            (
                Some(&reserved),
                Write::Deactivate { location: l },
                Decision::Refuse(NOT_ACTIVE),
            ),
            (Some(&reserved), Write::Delete, Decision::Store(None)),
            (Some(&active), Write::Reserve { location: l0 }, res(l0)),
            (
                Some(&active),
                Write::Reserve { location: l },
                Decision::Refuse(EXISTS),
            ),
            (
                Some(&active),
                Write::Activate {
                    location: l,
                    acl: b"x\ty",
                },
                act(l),
            ),
            (Some(&active), Write::Deactivate { location: l }, res(l)),
            (Some(&active), Write::Delete, Decision::Store(None)),
        ];
        for (cur, cmd, want) in cases {
            assert_eq!(decide(cur, &cmd, t), want, "{cur:?} {cmd:?}");
        }
    }

    #[test]
    fn locations_round_trip_as_cyrus_stores_them() {
        for loc in [&b"a!b!c"[..], b"", b"host!", b"host", b"!p"] {
            assert_eq!(MailboxRecord::reserved(loc, 0).location(), loc);
        }
    }

    #[test]
    fn names() {
        assert_eq!(check_name(b"user.a"), None);
        assert_eq!(check_name(b""), Some(INVALID_NAME));
        assert_eq!(check_name(&[b'a'; 490]), None);
        assert_eq!(check_name(&[b'a'; 491]), Some(NAME_TOO_LONG));
        assert_eq!(check_name(b"a\x1fb"), Some(INVALID_NAME));
    }
}
