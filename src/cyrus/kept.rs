//! The Cyrus side of a store record: how a `mailboxes.db` name record becomes a
//! [`MailboxRecord`] (what the master serves) plus the Cyrus fields MUPDATE does not show,
//! kept in [`MailboxRecord::cyrus`], and how such a record becomes a name record again.
//!
//! The round trip is exact: a record imported from a Cyrus file and not written since is
//! exported with the same key and value bytes. Records written by our master (empty `cyrus`)
//! are exported as Cyrus 3.6.1's master stores them (`database_log` → `mboxlist_insertremote`,
//! cyrus-mupdate.md §2.1): key `N` + Cyrus's dbname, value `%(T er P <part> S <server> M <t>
//! A %(…))`, `T erz` with `A %()` for a reservation, no uniqueid or modseqs.
//!
//! The kept bytes are versioned (first byte [`KEPT_FORMAT`]):
//!
//! ```text
//! u8 format = 1 | u8 flags (RAW, DBNAME, SERVER_ADDED, UNIQUEID)
//! [varint len, dbname]                 if DBNAME: the key's dbname, when it is not what
//!                                      Cyrus's mboxname_to_dbname gives for the name
//! RAW:  varint len, value              the value verbatim (when re-encoding would differ)
//! else: [varint len, uniqueid] varint uidvalidity, createdmodseq, foldermodseq
//! ```
//!
//! Only the fields that re-encode to the stored value are kept structurally; anything else
//! (a legacy text value under an `N` key, a value with a rename history, odd field order, a
//! `legacy_specialuse`) is kept verbatim.

use super::entry::{self, encode_n_value, mbtype, parse_entry, Entry, EntryError};
use super::mboxname::{self, from_dbname_cyrus, to_dbname_cyrus};
use crate::store::lmdb::MAX_KEY_LEN;
use crate::store::record::{put_bytes, put_varint, Reader};
use crate::store::{MailboxRecord, MbType};

/// The current version of the kept-fields encoding.
pub const KEPT_FORMAT: u8 = 1;

const F_RAW: u8 = 1 << 0;
const F_DBNAME: u8 = 1 << 1;
const F_SERVER_ADDED: u8 = 1 << 2;
const F_UNIQUEID: u8 = 1 << 3;
const F_KNOWN: u8 = F_RAW | F_DBNAME | F_SERVER_ADDED | F_UNIQUEID;

/// The Cyrus fields of one imported name record that the store record does not hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Kept {
    /// The key's dbname, when it differs from `to_dbname_cyrus(name)` (a hand-made key).
    pub dbname: Option<Vec<u8>>,
    /// The value verbatim, when re-encoding the parsed entry would not give it back.
    pub raw_value: Option<Vec<u8>>,
    /// The record's server was given at import (`--servername`), not read from the file.
    pub server_added: bool,
    pub uniqueid: Option<Vec<u8>>,
    pub uidvalidity: u32,
    pub createdmodseq: u64,
    pub foldermodseq: u64,
}

impl Kept {
    /// The stored form (see the module documentation).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(48);
        let mut flags = 0;
        if self.raw_value.is_some() {
            flags |= F_RAW;
        }
        if self.dbname.is_some() {
            flags |= F_DBNAME;
        }
        if self.server_added {
            flags |= F_SERVER_ADDED;
        }
        if self.uniqueid.is_some() && self.raw_value.is_none() {
            flags |= F_UNIQUEID;
        }
        out.push(KEPT_FORMAT);
        out.push(flags);
        if let Some(d) = &self.dbname {
            put_bytes(&mut out, d);
        }
        match &self.raw_value {
            Some(v) => put_bytes(&mut out, v),
            None => {
                if let Some(u) = &self.uniqueid {
                    put_bytes(&mut out, u);
                }
                put_varint(&mut out, u64::from(self.uidvalidity));
                put_varint(&mut out, self.createdmodseq);
                put_varint(&mut out, self.foldermodseq);
            }
        }
        out
    }

    /// Parse kept bytes. Never panics; unknown versions, flags and trailing bytes are errors.
    pub fn decode(bytes: &[u8]) -> Result<Kept, String> {
        let mut r = Reader::new(bytes);
        let version = r.byte().ok_or("empty Cyrus fields")?;
        if version != KEPT_FORMAT {
            return Err(format!("unknown Cyrus fields format {version}"));
        }
        let flags = r.byte().ok_or("truncated Cyrus fields")?;
        if flags & !F_KNOWN != 0 {
            return Err(format!("unknown Cyrus fields flags 0x{flags:02X}"));
        }
        let mut k = Kept {
            server_added: flags & F_SERVER_ADDED != 0,
            ..Kept::default()
        };
        if flags & F_DBNAME != 0 {
            k.dbname = Some(r.bytes("dbname")?.to_vec());
        }
        if flags & F_RAW != 0 {
            k.raw_value = Some(r.bytes("value")?.to_vec());
        } else {
            if flags & F_UNIQUEID != 0 {
                k.uniqueid = Some(r.bytes("uniqueid")?.to_vec());
            }
            k.uidvalidity = u32::try_from(r.varint("uidvalidity")?)
                .map_err(|_| "uidvalidity out of range".to_string())?;
            k.createdmodseq = r.varint("createdmodseq")?;
            k.foldermodseq = r.varint("foldermodseq")?;
        }
        if r.byte().is_some() {
            return Err("trailing bytes after the Cyrus fields".into());
        }
        Ok(k)
    }
}

/// Why a name record cannot become a store record (it is then kept raw in `cyrus_aux`, where
/// export finds it again, but the master does not serve it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unservable {
    /// Cyrus cannot parse the value either (`database_lookup` fails on it).
    #[error("value does not parse: {0}")]
    Unreadable(String),
    /// Cyrus 3.6.1 would abort (assert) on this value.
    #[error("Cyrus 3.6.1 aborts on this value: {0}")]
    CyrusAborts(String),
    /// The name has no store key (empty, holds 0x1D/0x1F, or longer than LMDB allows).
    #[error("name cannot be a store key: {0}")]
    Name(String),
}

/// The store key of an internal name, checked against what the store accepts.
pub fn store_key(name: &[u8]) -> Result<Vec<u8>, Unservable> {
    let key = mboxname::to_dbname(name).map_err(|e| Unservable::Name(e.to_string()))?;
    if key.len() > MAX_KEY_LEN {
        return Err(Unservable::Name(format!(
            "{} bytes, the store holds keys of at most {MAX_KEY_LEN}",
            key.len()
        )));
    }
    Ok(key)
}

/// Is this entry local to the server whose file it came from (no server of its own)?
fn is_local(e: &Entry) -> bool {
    e.server.is_none() && e.mbtype & mbtype::REMOTE == 0
}

/// Turn a 3.6 name record (`N` + `dbname` → `value`) into the internal name and store record
/// the master serves, keeping every Cyrus field. `servername` (import `--servername`) becomes
/// the server of local entries so that LIST shows `servername!partition`.
pub fn import_n(
    dbname: &[u8],
    value: &[u8],
    servername: Option<&[u8]>,
) -> Result<(Vec<u8>, MailboxRecord), Unservable> {
    let e = match parse_entry(Some(dbname), value) {
        Ok(e) => e,
        Err(EntryError::BadFormat(why)) => return Err(Unservable::Unreadable(why)),
        Err(other) => return Err(Unservable::CyrusAborts(other.to_string())),
    };
    // parse_entry cuts the name at 490 bytes as Cyrus's LIST does; FIND and we use it whole.
    let name = from_dbname_cyrus(dbname);
    store_key(&name)?;
    let exact = encode_n_value(&e).is_ok_and(|v| v == value);
    let kept = Kept {
        dbname: (to_dbname_cyrus(&name) != dbname).then(|| dbname.to_vec()),
        raw_value: (!exact).then(|| value.to_vec()),
        ..Kept::default()
    };
    Ok((name, record_of(&e, kept, servername)))
}

/// A store record for an entry translated from a pre-3.6 file (or any entry built in
/// memory): exported as `encode_n_value` of the entry under `N` + Cyrus's dbname of its name.
/// Fails where 3.6 has no letters for the type.
pub fn import_entry(e: &Entry, servername: Option<&[u8]>) -> Result<MailboxRecord, Unservable> {
    encode_n_value(e).map_err(|err| Unservable::CyrusAborts(err.to_string()))?;
    store_key(&e.name)?;
    Ok(record_of(e, Kept::default(), servername))
}

fn record_of(e: &Entry, mut kept: Kept, servername: Option<&[u8]>) -> MailboxRecord {
    let mut server = e.server.clone();
    if let Some(s) = servername.filter(|_| is_local(e)) {
        server = Some(s.to_vec());
        kept.server_added = true;
    }
    if kept.raw_value.is_none() {
        kept.uniqueid = e.uniqueid.clone();
        kept.uidvalidity = e.uidvalidity;
        kept.createdmodseq = e.createdmodseq;
        kept.foldermodseq = e.foldermodseq;
    }
    MailboxRecord {
        mbtype: MbType(e.mbtype),
        server,
        partition: e.partition.clone(),
        acl: e.acl.clone(),
        mtime: e.mtime,
        revision: 0,
        cyrus: kept.encode(),
    }
}

/// How [`export_n`] produced a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportKind {
    /// Written by our master: stored as Cyrus's master would store it.
    Master,
    /// Imported and unchanged: the original bytes.
    Imported,
    /// Imported, but its visible fields no longer match the kept value (a writer other than
    /// the master changed it): re-encoded from the record and the kept fields.
    Reencoded,
}

/// The Cyrus entry (3.6 `mbentry_t`) and name-record key of a store record, and the value
/// bytes to write for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exported {
    /// `N` + dbname.
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub entry: Entry,
    pub kind: ExportKind,
}

/// The name record Cyrus would hold for store record `rec` under internal name `name`.
pub fn export_n(name: &[u8], rec: &MailboxRecord) -> Result<Exported, String> {
    if rec.cyrus.is_empty() {
        let e = Entry {
            name: name.to_vec(),
            mbtype: rec.mbtype.0,
            partition: rec.partition.clone(),
            server: rec.server.clone(),
            // insertremote always writes an ACL; a reservation has an empty one (`A %()`).
            acl: Some(rec.acl.clone().unwrap_or_default()),
            mtime: rec.mtime,
            ..Entry::default()
        };
        let value = encode_n_value(&e).map_err(|err| err.to_string())?;
        return Ok(Exported {
            key: entry::n_key(&to_dbname_cyrus(name)),
            value,
            entry: e,
            kind: ExportKind::Master,
        });
    }
    let kept = Kept::decode(&rec.cyrus)?;
    let dbname = kept.dbname.clone().unwrap_or_else(|| to_dbname_cyrus(name));
    let server = if kept.server_added {
        None
    } else {
        rec.server.clone()
    };
    let visible = |e: &mut Entry| {
        e.name = name.to_vec();
        e.mbtype = rec.mbtype.0;
        e.partition = rec.partition.clone();
        e.server = server.clone();
        e.acl = rec.acl.clone();
        e.mtime = rec.mtime;
    };
    let key = entry::n_key(&dbname);
    if let Some(raw) = &kept.raw_value {
        let mut parsed = parse_entry(Some(&dbname), raw).map_err(|err| err.to_string())?;
        let mut updated = parsed.clone();
        visible(&mut updated);
        parsed.name = name.to_vec();
        if parsed == updated {
            return Ok(Exported {
                key,
                value: raw.clone(),
                entry: parsed,
                kind: ExportKind::Imported,
            });
        }
        let value = encode_n_value(&updated).map_err(|err| err.to_string())?;
        return Ok(Exported {
            key,
            value,
            entry: updated,
            kind: ExportKind::Reencoded,
        });
    }
    let mut e = Entry {
        uniqueid: kept.uniqueid,
        uidvalidity: kept.uidvalidity,
        createdmodseq: kept.createdmodseq,
        foldermodseq: kept.foldermodseq,
        ..Entry::default()
    };
    visible(&mut e);
    let value = encode_n_value(&e).map_err(|err| err.to_string())?;
    Ok(Exported {
        key,
        value,
        entry: e,
        kind: ExportKind::Imported,
    })
}

/// Does the exported key of this record sort where the store key does (`N` + store key)?
/// False for names whose Cyrus dbname differs from ours (Cyrus's quirks, hand-made keys).
pub fn key_in_store_order(name: &[u8], key: &[u8]) -> bool {
    match mboxname::to_dbname(name) {
        Ok(k) => key.len() == k.len() + 1 && key[1..] == k[..],
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_codec_round_trips_and_refuses_junk() {
        let cases = [
            Kept::default(),
            Kept {
                dbname: Some(b"user\x1Fbob\x1F\x1Fx".to_vec()),
                raw_value: Some(b"0 default bob\tlrs\t".to_vec()),
                server_added: true,
                ..Kept::default()
            },
            Kept {
                uniqueid: Some(b"5eed".to_vec()),
                uidvalidity: u32::MAX,
                createdmodseq: u64::MAX,
                foldermodseq: 7,
                ..Kept::default()
            },
        ];
        for k in cases {
            let b = k.encode();
            assert_eq!(Kept::decode(&b).unwrap(), k);
            for cut in 0..b.len() {
                assert!(Kept::decode(&b[..cut]).is_err());
            }
            let mut longer = b.clone();
            longer.push(0);
            assert!(Kept::decode(&longer).is_err());
        }
        assert!(Kept::decode(&[2, 0, 0, 0, 0]).is_err());
        assert!(Kept::decode(&[1, 0x80, 0, 0, 0]).is_err());
    }

    #[test]
    fn imported_records_export_their_bytes() {
        let values: [&[u8]; 4] = [
            b"%(T e I 5eed P default V 1690000001 C 1 F 101 M 1700000000 A %(bob lrswipkxtecdan))",
            b"%(T ed I 5eed V 1 C 2 F 3 M 1700000000)",
            b"%(T e P default M 1700000000 A %(bob lr) I late)",
            b"%(T erz S \"\" M 1796328508 A %())",
        ];
        for v in values {
            let (name, rec) = import_n(b"user\x1Fbob", v, Some(b"be1")).unwrap();
            assert_eq!(name, b"user.bob");
            let x = export_n(&name, &rec).unwrap();
            assert_eq!(x.key, b"Nuser\x1Fbob");
            assert_eq!(x.value, v, "{}", String::from_utf8_lossy(v));
            assert_eq!(x.kind, ExportKind::Imported);
        }
        let (_, rec) = import_n(b"user\x1Fbob", values[0], Some(b"be1")).unwrap();
        assert_eq!(rec.location(), b"be1!default");
        let (_, rec) = import_n(b"user\x1Fbob", values[3], Some(b"be1")).unwrap();
        assert_eq!(rec.location(), b"");
        assert!(rec.is_reserved());
    }

    #[test]
    fn master_records_export_like_cyrus_master() {
        let rec = MailboxRecord::active(b"hostA!p0", b"anyone\tlr\t".to_vec(), 1796327855);
        let x = export_n(b"user.a", &rec).unwrap();
        assert_eq!(x.key, b"Nuser\x1Fa");
        assert_eq!(
            x.value,
            b"%(T er P p0 S hostA M 1796327855 A %(anyone lr))".to_vec()
        );
        let rec = MailboxRecord::reserved(b"", 1796328508);
        let x = export_n(b"user.emptyloc", &rec).unwrap();
        assert_eq!(x.value, b"%(T erz S \"\" M 1796328508 A %())".to_vec());
    }

    #[test]
    fn changed_records_are_reencoded() {
        let v = b"%(T e P default M 1700000000 A %(bob lr) I late)";
        let (name, mut rec) = import_n(b"user\x1Fbob", v, None).unwrap();
        rec.acl = Some(b"bob\tlrs\t".to_vec());
        let x = export_n(&name, &rec).unwrap();
        assert_eq!(x.kind, ExportKind::Reencoded);
        assert_eq!(
            x.value,
            b"%(T e I late P default M 1700000000 A %(bob lrs))".to_vec()
        );
    }
}
