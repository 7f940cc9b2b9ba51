//! The stored mailbox record: what MUPDATE shows (type flags, location, ACL) plus mtime and, for
//! entries imported from Cyrus, the fields the protocol does not show (kept opaque in `cyrus`,
//! owned by [`crate::cyrus`]). Encoded with a version byte first so the format can evolve.

use super::Seq;

/// Cyrus 3.6 mailbox type bits (3.6.1:imap/mboxlist.h:59-98): the type in the low 4 bits,
/// flags above.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MbType(pub u32);

impl MbType {
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
            mbtype: MbType(MbType::RESERVE | MbType::REMOTE),
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
            mbtype: MbType(MbType::REMOTE),
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
        self.mbtype.has(MbType::RESERVE)
    }

    /// LIST and UPDATE skip deleted and intermediate entries (imap/mboxlist.c:3879-3909).
    pub fn is_listed(&self) -> bool {
        !self.mbtype.has(MbType::DELETED | MbType::INTERMEDIATE)
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
