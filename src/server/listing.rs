//! LIST and UPDATE output: snapshot dumps in key (Cyrus dbname) order, produced off the async
//! threads in chunks with backpressure, and the lines a subscriber gets for each change.

use std::ops::ControlFlow;
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::proto::response;
use crate::store::{Change, MailboxRecord, MailboxStore, Seq, StoreError};

/// Which records a dump shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    All,
    /// LIST's prefix: a raw byte prefix of the whole location (imap/mupdate.c:1752-1753).
    LocationPrefix(Vec<u8>),
    /// PARTIAL-UPDATE: the server part must equal one host exactly (imap/mupdate.c:1756-1757).
    Hosts(Vec<Vec<u8>>),
}

impl Filter {
    fn shows(&self, record: &MailboxRecord) -> bool {
        if !record.is_listed() {
            return false;
        }
        match self {
            Filter::All => true,
            Filter::LocationPrefix(p) => {
                let mut location = record.location_parts().into_iter().flatten();
                p.iter().all(|b| location.next() == Some(b))
            }
            Filter::Hosts(hosts) => watched(hosts, record.server.as_deref()),
        }
    }
}

fn watched(hosts: &[Vec<u8>], server: Option<&[u8]>) -> bool {
    server.is_some_and(|s| hosts.iter().any(|h| h == s))
}

/// A MAILBOX or RESERVE line for one record.
pub fn record_line(out: &mut Vec<u8>, tag: &[u8], name: &[u8], record: &MailboxRecord) {
    let location = record.location_parts();
    if record.is_reserved() {
        response::reserve_parts(out, tag, name, &location);
    } else {
        response::mailbox_parts(out, tag, name, &location, record.wire_acl());
    }
}

/// The line (if any) an UPDATE subscriber gets for a change. `hosts` empty means a full
/// UPDATE. A partial subscriber sees a change whose new server it watches as MAILBOX/RESERVE,
/// and a mailbox that left its hosts (deleted or moved away) as DELETE (cyrus-mupdate.md
/// §1.12).
pub fn change_line(out: &mut Vec<u8>, tag: &[u8], hosts: &[Vec<u8>], change: &Change) {
    let new = change.new.as_ref().filter(|r| r.is_listed());
    let full = hosts.is_empty();
    match new {
        Some(r) if full || watched(hosts, r.server.as_deref()) => {
            record_line(out, tag, &change.name, r)
        }
        _ if full || watched(hosts, change.old_server.as_deref()) => {
            response::delete(out, tag, &change.name)
        }
        _ => {}
    }
}

/// One message of a dump.
pub enum DumpPart {
    /// First: the snapshot's change sequence.
    Seq(Seq),
    Chunk(Vec<u8>),
    Failed(StoreError),
}

/// Start dumping a snapshot on a blocking thread; lines arrive in chunks of about `chunk`
/// bytes, at most two chunks ahead of the consumer. The snapshot is one read transaction, so
/// the dump is consistent at the sequence it reports first.
pub fn spawn_dump(
    store: Arc<dyn MailboxStore>,
    tag: Vec<u8>,
    filter: Filter,
    chunk: usize,
) -> mpsc::Receiver<DumpPart> {
    let (tx, rx) = mpsc::channel(2);
    tokio::task::spawn_blocking(move || {
        let snapshot = match store.snapshot() {
            Ok(s) => s,
            Err(e) => {
                let _ = tx.blocking_send(DumpPart::Failed(e));
                return;
            }
        };
        if tx.blocking_send(DumpPart::Seq(snapshot.seq())).is_err() {
            return;
        }
        let mut buf = Vec::with_capacity(chunk + 4096);
        let mut gone = false;
        let scanned = snapshot.scan(b"", None, &mut |name, record| {
            if filter.shows(record) {
                record_line(&mut buf, &tag, name, record);
                if buf.len() >= chunk {
                    let full = std::mem::replace(&mut buf, Vec::with_capacity(chunk + 4096));
                    if tx.blocking_send(DumpPart::Chunk(full)).is_err() {
                        gone = true;
                        return ControlFlow::Break(());
                    }
                }
            }
            ControlFlow::Continue(())
        });
        if gone {
            return;
        }
        let last = match scanned {
            Ok(()) => DumpPart::Chunk(buf),
            Err(e) => DumpPart::Failed(e),
        };
        let _ = tx.blocking_send(last);
    });
    rx
}
