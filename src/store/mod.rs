//! The mailbox store: a small trait of transactional operations, so that the LMDB backend here
//! and a future etcd backend (txn on mod revision, watch from a revision) are interchangeable.
//!
//! Keys are Cyrus dbnames ([`crate::cyrus::mboxname::to_dbname`]), so that the backend's byte
//! order is Cyrus's LIST/UPDATE order. Every successful write gets the next value of one
//! persisted, monotonic change sequence; the change feed ([`MailboxStore::changes_since`]) lets
//! an UPDATE stream (and later a slave) resume from a position.
//!
//! Writes are durable before they are acknowledged, and concurrent callers share one commit
//! (group commit) without reordering any one caller's operations.

pub mod lmdb;
pub mod record;

pub use record::{MailboxRecord, MbType};

use std::ops::ControlFlow;

/// A position in the change feed. 0 means "before the first change".
pub type Seq = u64;

/// What a compare-and-set expects to find under the name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The name must not exist (reserve-if-absent).
    Absent,
    /// The record must still be the one written by change `revision`.
    Revision(Seq),
}

/// One compare-and-set: if the current record under `name` matches `expect`, replace it with
/// `new` (`None` deletes).
#[derive(Debug, Clone, PartialEq)]
pub struct CasOp {
    /// The internal (intname) mailbox name.
    pub name: Vec<u8>,
    pub expect: Expect,
    pub new: Option<MailboxRecord>,
}

/// The result of one [`CasOp`].
#[derive(Debug, Clone, PartialEq)]
pub enum CasOutcome {
    /// Written and durable; this is its change sequence.
    Committed(Seq),
    /// The expectation failed; nothing was written. `current` is what is there now.
    Conflict { current: Option<MailboxRecord> },
    /// An earlier operation of the same batch conflicted, so this one was not tried (a batch
    /// is one caller's ordered commands: none may overtake another).
    Skipped,
}

/// One entry of the change feed.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub seq: Seq,
    /// The internal mailbox name.
    pub name: Vec<u8>,
    /// The server part of the location before the change (partial UPDATE filters on the old
    /// or the new server, cyrus-mupdate.md §1.12).
    pub old_server: Option<Vec<u8>>,
    /// The record after the change; `None` when the change deleted it.
    pub new: Option<MailboxRecord>,
}

/// Store errors. Texts say what the operator can do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("LMDB: {0}")]
    Lmdb(#[from] heed::Error),
    #[error("I/O on the data directory: {0}")]
    Io(#[from] std::io::Error),
    #[error("corrupt record under key {key:?}: {why}")]
    Corrupt { key: Vec<u8>, why: String },
    #[error("invalid mailbox name: {0}")]
    Name(#[from] crate::cyrus::mboxname::NameError),
    #[error("the change feed no longer holds changes after {requested} (oldest kept: {oldest})")]
    FeedTruncated { requested: Seq, oldest: Seq },
    #[error("the store's writer has stopped")]
    WriterGone,
    /// A key the backend cannot hold (empty, or longer than LMDB's 511-byte key limit).
    #[error("key refused by the store: {0}")]
    InvalidKey(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Called after each durable group commit with the last sequence it wrote. Must not block.
pub type CommitHook = Box<dyn Fn(Seq) + Send + Sync>;
/// Receives the outcome of an asynchronous [`MailboxStore::submit`].
pub type CommitDone = Box<dyn FnOnce(Result<Vec<CasOutcome>>) + Send>;

/// A consistent read view at one change sequence.
pub trait Snapshot: Send {
    /// The last change this view contains.
    fn seq(&self) -> Seq;
    /// Visit records whose key (dbname) starts with `prefix`, in key order, starting strictly
    /// after `after` when given. The visitor gets the internal name and the record and may stop.
    ///
    /// `prefix` and `after` are in dbname form: pass `to_dbname(b"user.bob")` followed by
    /// [`HIER_SEP`](crate::cyrus::mboxname::HIER_SEP) for the children of `user.bob`, not the
    /// internal name. Every record is visited, deleted and intermediate ones too; LIST and
    /// UPDATE must skip those not [`MailboxRecord::is_listed`].
    fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        visit: &mut dyn FnMut(&[u8], &MailboxRecord) -> ControlFlow<()>,
    ) -> Result<()>;
}

/// The transactional operations every backend provides.
pub trait MailboxStore: Send + Sync + 'static {
    /// The record under an internal name, if any.
    fn get(&self, name: &[u8]) -> Result<Option<MailboxRecord>>;

    /// Queue a batch of compare-and-sets for the next group commit and return at once;
    /// `done` runs (on the writer's thread) after the commit is durable. Operations of one batch
    /// are applied in order; after the first conflict the rest are [`CasOutcome::Skipped`].
    fn submit(&self, ops: Vec<CasOp>, done: CommitDone);

    /// Blocking form of [`submit`](Self::submit).
    fn commit(&self, ops: Vec<CasOp>) -> Result<Vec<CasOutcome>> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.submit(
            ops,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx.recv().map_err(|_| StoreError::WriterGone)?
    }

    /// Create `record` under `name` only if the name is free.
    fn reserve_if_absent(&self, name: &[u8], record: MailboxRecord) -> Result<CasOutcome> {
        let op = CasOp {
            name: name.to_vec(),
            expect: Expect::Absent,
            new: Some(record),
        };
        Ok(self.commit(vec![op])?.remove(0))
    }

    /// Replace (or with `None` delete) the record last written by change `revision`.
    fn compare_and_set(
        &self,
        name: &[u8],
        revision: Seq,
        new: Option<MailboxRecord>,
    ) -> Result<CasOutcome> {
        let op = CasOp {
            name: name.to_vec(),
            expect: Expect::Revision(revision),
            new,
        };
        Ok(self.commit(vec![op])?.remove(0))
    }

    /// Delete the record last written by change `revision`.
    fn delete(&self, name: &[u8], revision: Seq) -> Result<CasOutcome> {
        self.compare_and_set(name, revision, None)
    }

    /// A consistent view of every record at the current sequence.
    fn snapshot(&self) -> Result<Box<dyn Snapshot>>;

    /// Changes with sequence > `after`, oldest first, at most `limit`.
    /// [`StoreError::FeedTruncated`] when some of them were already pruned.
    fn changes_since(&self, after: Seq, limit: usize) -> Result<Vec<Change>>;

    /// The sequence of the last durable change.
    fn last_seq(&self) -> Result<Seq>;

    /// Install the hook run after every group commit (replaces any earlier one).
    fn set_commit_hook(&self, hook: CommitHook);
}
