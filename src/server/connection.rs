//! One client connection of the master: banner, the command loop, SASL PLAIN, FIND/LIST,
//! the write pipeline (group-committed, answered in order), and UPDATE streaming.
//!
//! Commands run strictly in the order they arrived. Consecutive write commands already in the
//! input buffer are decided together and handed to the store as one ordered batch, so a
//! pipelining client shares commits instead of paying one fsync per command; every other
//! command first waits for the writes before it, so a FIND sees every earlier write of its
//! connection.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, timeout_at, Instant};

use super::listing::{self, DumpPart, Filter};
use super::stream::Stream;
use super::Shared;
use crate::master::{self, Decision, Write};
use crate::proto::command::{parse, Command, Outcome, Parse, ParseState};
use crate::proto::quirks;
use crate::proto::response::{self, Status};
use crate::proto::skip::LineSkipper;
use crate::store::{CasOp, CasOutcome, Expect, MailboxStore, Seq, StoreError};

/// Why a connection ends early.
#[derive(Debug)]
enum End {
    /// Clean: EOF, LOGOUT, or shutdown.
    Closed,
    /// Told the client why (`* BYE …` already queued or sent).
    Bye(&'static str),
    Io(std::io::Error),
    Store(StoreError),
}

impl From<std::io::Error> for End {
    fn from(e: std::io::Error) -> Self {
        End::Io(e)
    }
}

impl From<StoreError> for End {
    fn from(e: StoreError) -> Self {
        End::Store(e)
    }
}

type Result<T> = std::result::Result<T, End>;

/// A write command waiting for its batch.
struct PendingWrite {
    tag: Vec<u8>,
    command: Command,
}

/// An active UPDATE.
struct Streaming {
    tag: Vec<u8>,
    /// PARTIAL-UPDATE hosts; empty for a full UPDATE.
    hosts: Vec<Vec<u8>>,
    /// Every change up to here has been formatted for the client.
    seq: Seq,
}

const READ_CHUNK: usize = 64 * 1024;
/// Dump chunks: large enough to amortise syscalls, small enough to keep memory flat.
const DUMP_CHUNK: usize = 256 * 1024;
/// Changes read from the feed per round.
const FEED_BATCH: usize = 1024;
/// Feed reads of at most this many changes run on the connection's task.
const INLINE_FEED_READ: u64 = 256;

pub async fn serve(shared: &Shared, socket: TcpStream, peer: SocketAddr) {
    let mut conn = Conn {
        shared,
        stream: Stream::Plain(socket),
        inbuf: Vec::with_capacity(READ_CHUNK),
        pos: 0,
        out: Vec::new(),
        authenticated: false,
        acked: 0,
        skip: None,
        pending: VecDeque::new(),
        streaming: None,
        idle_deadline: Instant::now() + shared.config.idle_timeout,
        shutdown: shared.shutdown.clone(),
        committed: shared.committed.clone(),
    };
    let end = conn.run().await;
    match end {
        End::Closed => {}
        End::Bye(text) => {
            // Best effort: a peer that stopped reading may not take even this.
            response::bye(&mut conn.out, text);
            let _ = timeout(
                std::time::Duration::from_secs(1),
                conn.stream.write_all(&conn.out),
            )
            .await;
            tracing::info!(%peer, "closed: {text}");
        }
        End::Io(e) => tracing::debug!(%peer, "connection error: {e}"),
        End::Store(e) => {
            tracing::error!(%peer, "store error: {e}");
            // Answers already due go out before the BYE.
            response::bye(&mut conn.out, "internal error");
            let _ = timeout(
                std::time::Duration::from_secs(1),
                conn.stream.write_all(&conn.out),
            )
            .await;
        }
    }
    let _ = conn.stream.shutdown().await;
}

struct Conn<'a> {
    shared: &'a Shared,
    stream: Stream,
    inbuf: Vec<u8>,
    /// Start of unconsumed input in `inbuf`.
    pos: usize,
    out: Vec<u8>,
    authenticated: bool,
    acked: usize,
    skip: Option<LineSkipper>,
    pending: VecDeque<PendingWrite>,
    streaming: Option<Streaming>,
    idle_deadline: Instant,
    shutdown: tokio::sync::watch::Receiver<bool>,
    committed: tokio::sync::watch::Receiver<Seq>,
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Conn<'_> {
    fn store(&self) -> &Arc<dyn MailboxStore> {
        &self.shared.store
    }

    async fn run(&mut self) -> End {
        self.out.extend_from_slice(&self.shared.banner);
        match self.command_loop().await {
            Ok(()) => End::Closed,
            Err(end) => end,
        }
    }

    async fn command_loop(&mut self) -> Result<()> {
        loop {
            if let Some(skipper) = self.skip.as_mut() {
                match skipper.feed(&self.inbuf[self.pos..]) {
                    Some(n) => {
                        self.pos += n;
                        self.skip = None;
                    }
                    None => {
                        self.pos = self.inbuf.len();
                        self.wait_for_input().await?;
                        continue;
                    }
                }
            }
            let state = ParseState {
                authenticated: self.authenticated,
                literals_acked: self.acked,
            };
            match parse(&self.inbuf[self.pos..], state, &self.shared.config.limits) {
                Parse::Incomplete => {
                    self.run_writes().await?;
                    self.wait_for_input().await?;
                }
                Parse::GoAhead => {
                    self.run_writes().await?;
                    self.out.extend_from_slice(response::GO_AHEAD);
                    self.acked += 1;
                }
                Parse::Done(parsed) => {
                    self.pos += parsed.consumed;
                    self.acked = 0;
                    self.skip = parsed.skip;
                    match parsed.outcome {
                        Outcome::Reply(reply) => {
                            self.run_writes().await?;
                            self.out.extend_from_slice(&reply);
                        }
                        Outcome::Command { tag, command } => {
                            if !self.command(tag, command).await? {
                                return Ok(());
                            }
                        }
                    }
                }
            }
        }
    }

    /// Handle one command; false when the connection is done (LOGOUT).
    async fn command(&mut self, tag: Vec<u8>, command: Command) -> Result<bool> {
        if command.is_write() && self.streaming.is_none() {
            self.pending.push_back(PendingWrite { tag, command });
            if self.pending.len() >= self.shared.config.max_pipelined_writes {
                self.run_writes().await?;
            }
            return Ok(true);
        }
        self.run_writes().await?;
        match command {
            Command::Authenticate { mechanism, initial } => {
                if self.authenticated {
                    response::tagged(&mut self.out, &tag, Status::Bad, "already authenticated");
                } else {
                    self.authenticate(&tag, &mechanism, initial).await?;
                }
            }
            Command::Logout => {
                response::tagged(&mut self.out, &tag, Status::Ok, quirks::LOGOUT);
                self.write_out().await?;
                return Ok(false);
            }
            // TLS is not configured (it arrives with the security work): Cyrus 3.6.1 then
            // answers this in every state, before and after login.
            Command::Starttls => {
                response::tagged(&mut self.out, &tag, Status::Bad, "Unrecognized command")
            }
            Command::Noop => {
                if self.streaming.is_some() {
                    // Barrier: everything committed before this NOOP was read goes out first.
                    let target = self.store().last_seq()?;
                    self.stream_changes(Some(target)).await?;
                }
                response::tagged(&mut self.out, &tag, Status::Ok, "Noop done");
            }
            _ if self.streaming.is_some() => {
                response::tagged(&mut self.out, &tag, Status::Bad, "not legal when streaming")
            }
            Command::Find { name } => {
                if let Some(record) = self.store().get(&name)? {
                    listing::record_line(&mut self.out, &tag, &name, &record);
                }
                response::tagged(&mut self.out, &tag, Status::Ok, "Search completed");
            }
            Command::List { prefix } => {
                let filter = prefix.map_or(Filter::All, Filter::LocationPrefix);
                self.dump(&tag, filter).await?;
                response::tagged(&mut self.out, &tag, Status::Ok, "list complete");
            }
            Command::Update { hosts } => {
                let filter = if hosts.is_empty() {
                    Filter::All
                } else {
                    Filter::Hosts(hosts.clone())
                };
                let seq = self.dump(&tag, filter).await?;
                response::tagged(&mut self.out, &tag, Status::Ok, "streaming starts");
                self.streaming = Some(Streaming { tag, hosts, seq });
            }
            Command::Reserve { .. }
            | Command::Activate { .. }
            | Command::Deactivate { .. }
            | Command::Delete { .. } => unreachable!("write commands are queued above"),
        }
        Ok(true)
    }

    /// Stream a snapshot dump to the client; returns the snapshot's sequence.
    async fn dump(&mut self, tag: &[u8], filter: Filter) -> Result<Seq> {
        let mut parts =
            listing::spawn_dump(Arc::clone(self.store()), tag.to_vec(), filter, DUMP_CHUNK);
        let mut seq = 0;
        while let Some(part) = parts.recv().await {
            match part {
                DumpPart::Seq(s) => seq = s,
                DumpPart::Chunk(chunk) => {
                    if self.out.is_empty() {
                        self.out = chunk;
                    } else {
                        self.out.extend_from_slice(&chunk);
                    }
                    self.write_out().await?;
                }
                DumpPart::Failed(e) => return Err(e.into()),
            }
        }
        Ok(seq)
    }

    /// Decide and commit every queued write command, answering each in order.
    async fn run_writes(&mut self) -> Result<()> {
        while !self.pending.is_empty() {
            let mut ops = Vec::new();
            let mut names: Vec<&[u8]> = Vec::new();
            let now = now();
            // Build one batch: consecutive commands that each store something, on distinct
            // names. A refusal or no-op is answered only when nothing of this connection is
            // still uncommitted before it, so it reads state after all of its predecessors.
            let mut answered_now = Vec::new();
            for w in self.pending.iter() {
                let (name, write) = write_args(&w.command);
                if names.contains(&name) {
                    break;
                }
                let decision = match master::check_name(name) {
                    Some(_) if matches!(write, Write::Delete | Write::Deactivate { .. }) => {
                        Decision::Refuse(master::DOES_NOT_EXIST)
                    }
                    Some(text) => Decision::Refuse(text),
                    None => {
                        let current = self.shared.store.get(name)?;
                        match master::decide(current.as_ref(), &write, now) {
                            Decision::Store(new) => {
                                if !answered_now.is_empty() {
                                    // Answer the refusals before it first.
                                    break;
                                }
                                let expect = current
                                    .map_or(Expect::Absent, |c| Expect::Revision(c.revision));
                                ops.push(CasOp {
                                    name: name.to_vec(),
                                    expect,
                                    new,
                                });
                                names.push(name);
                                continue;
                            }
                            other => other,
                        }
                    }
                };
                if !ops.is_empty() {
                    break;
                }
                answered_now.push(decision);
            }
            if ops.is_empty() {
                // Only refusals / no-ops at the front: answer them.
                for decision in answered_now.drain(..) {
                    let w = self.pending.pop_front().expect("decided command is queued");
                    answer(&mut self.out, &w.tag, &decision);
                }
                continue;
            }
            let (tx, rx) = tokio::sync::oneshot::channel();
            self.shared.store.submit(
                ops,
                Box::new(move |r| {
                    let _ = tx.send(r);
                }),
            );
            let outcomes = rx.await.map_err(|_| End::Store(StoreError::WriterGone))??;
            for outcome in outcomes {
                match outcome {
                    CasOutcome::Committed(_) => {
                        let w = self
                            .pending
                            .pop_front()
                            .expect("committed command is queued");
                        response::tagged(&mut self.out, &w.tag, Status::Ok, master::DONE);
                    }
                    // Another connection changed the name first: decide again on fresh state.
                    CasOutcome::Conflict { .. } | CasOutcome::Skipped => break,
                }
            }
        }
        Ok(())
    }

    /// SASL PLAIN against the credential store (RFC 4616), Cyrus's wire form: challenges are
    /// bare base64 lines, `*` cancels, every failure is `NO "undefined error!"` after
    /// `failedloginpause`.
    async fn authenticate(
        &mut self,
        tag: &[u8],
        mechanism: &[u8],
        initial: Option<Vec<u8>>,
    ) -> Result<()> {
        let mut message = None;
        if mechanism.eq_ignore_ascii_case(b"PLAIN") {
            let encoded = match initial {
                Some(ir) => Some(ir),
                None => {
                    self.out.extend_from_slice(quirks::EMPTY_CHALLENGE);
                    match self.read_line().await? {
                        Some(line) if line.first() == Some(&b'*') => {
                            response::tagged_atom_text(
                                &mut self.out,
                                tag,
                                Status::No,
                                quirks::AUTH_CANCELED,
                            );
                            return Ok(());
                        }
                        Some(line) => Some(line),
                        None => return Err(End::Closed),
                    }
                }
            };
            message = encoded.and_then(|b64| {
                if b64 == b"=" {
                    Some(Vec::new())
                } else {
                    base64::engine::general_purpose::STANDARD.decode(&b64).ok()
                }
            });
        }
        let ok = match message {
            Some(message) => self.check_plain(message).await?,
            None => false,
        };
        if ok {
            self.authenticated = true;
            response::tagged(&mut self.out, tag, Status::Ok, "Authenticated");
        } else {
            self.write_out().await?;
            tokio::time::sleep(self.shared.config.failed_login_pause).await;
            response::tagged(&mut self.out, tag, Status::No, quirks::AUTH_FAILED);
        }
        Ok(())
    }

    async fn check_plain(&self, message: Vec<u8>) -> Result<bool> {
        let users = Arc::clone(&self.shared.users);
        let checked = tokio::task::spawn_blocking(move || {
            let Some((authzid, authcid, password)) = crate::auth::parse_plain(&message) else {
                return Ok(false);
            };
            // We act as the authenticated user only: a different authzid is refused.
            if !authzid.is_empty() && authzid != authcid {
                return Ok(false);
            }
            Ok(match users.get_user(authcid)? {
                Some(verifier) => verifier.verify(password),
                None => false,
            })
        })
        .await
        .map_err(|e| End::Io(std::io::Error::other(e)))?;
        checked.map_err(End::Store)
    }

    /// One raw line (a SASL response), without its line end; `None` at EOF.
    async fn read_line(&mut self) -> Result<Option<Vec<u8>>> {
        loop {
            if let Some(nl) = self.inbuf[self.pos..].iter().position(|&b| b == b'\n') {
                let line = &self.inbuf[self.pos..self.pos + nl];
                let line = line.strip_suffix(b"\r").unwrap_or(line).to_vec();
                self.pos += nl + 1;
                return Ok(Some(line));
            }
            if self.inbuf.len() - self.pos > self.shared.config.limits.max_command {
                return Err(End::Bye("authentication line too long"));
            }
            match self.wait_for_input().await {
                Ok(()) => {}
                Err(End::Closed) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    /// Flush output, then wait for more input (and, while streaming, for new changes).
    /// `Err(End::Closed)` at EOF or shutdown.
    async fn wait_for_input(&mut self) -> Result<()> {
        loop {
            self.write_out().await?;
            if self.pos > 0 && self.pos == self.inbuf.len() {
                self.inbuf.clear();
                self.pos = 0;
            } else if self.pos > READ_CHUNK {
                self.inbuf.drain(..self.pos);
                self.pos = 0;
            }
            if self.streaming.is_some() && *self.committed.borrow() > self.streaming_seq() {
                self.stream_changes(None).await?;
                continue;
            }
            if *self.shutdown.borrow() {
                return Err(End::Closed);
            }
            self.inbuf.reserve(READ_CHUNK);
            let streaming = self.streaming.is_some();
            tokio::select! {
                read = timeout_at(self.idle_deadline, self.stream.read_buf(&mut self.inbuf)) => {
                    match read {
                        Err(_) => return Err(End::Bye("idle for too long")),
                        Ok(Ok(0)) => return Err(End::Closed),
                        Ok(Ok(_)) => {
                            self.idle_deadline = Instant::now() + self.shared.config.idle_timeout;
                            return Ok(());
                        }
                        Ok(Err(e)) => return Err(e.into()),
                    }
                }
                changed = self.committed.changed(), if streaming => {
                    if changed.is_err() {
                        return Err(End::Closed);
                    }
                }
                _ = self.shutdown.changed() => return Err(End::Closed),
            }
        }
    }

    fn streaming_seq(&self) -> Seq {
        self.streaming.as_ref().map_or(0, |s| s.seq)
    }

    /// Format and send committed changes after the stream's position: up to `target` when
    /// given (a NOOP barrier), else what is available now.
    async fn stream_changes(&mut self, target: Option<Seq>) -> Result<()> {
        loop {
            let Some(s) = self.streaming.as_ref() else {
                return Ok(());
            };
            let after = s.seq;
            if target.is_some_and(|t| after >= t) {
                return Ok(());
            }
            // A short backlog is a few memory-mapped pages: read it inline, like FIND, so a
            // change reaches subscribers without hopping through the blocking pool (whose
            // scheduling delay dominated propagation latency). Large catch-ups stay off the
            // async threads.
            let backlog = self.committed.borrow().saturating_sub(after);
            let changes = if backlog <= INLINE_FEED_READ {
                self.store().changes_since(after, FEED_BATCH)
            } else {
                let store = Arc::clone(self.store());
                tokio::task::spawn_blocking(move || store.changes_since(after, FEED_BATCH))
                    .await
                    .map_err(|e| End::Io(std::io::Error::other(e)))?
            };
            let changes = match changes {
                Ok(c) => c,
                Err(StoreError::FeedTruncated { .. }) => {
                    return Err(End::Bye("too far behind; resynchronise"))
                }
                Err(e) => return Err(e.into()),
            };
            let Some(last) = changes.last().map(|c| c.seq) else {
                return Ok(());
            };
            let s = self.streaming.as_mut().expect("checked above");
            for change in &changes {
                listing::change_line(&mut self.out, &s.tag, &s.hosts, change);
            }
            s.seq = last;
            if self.out.len() >= self.shared.config.output_buffer || target.is_none() {
                self.write_out().await?;
                // Output reached the client: it is alive even if it sends nothing.
                self.idle_deadline = Instant::now() + self.shared.config.idle_timeout;
            }
            if target.is_none() && changes.len() < FEED_BATCH {
                return Ok(());
            }
        }
    }

    /// Write all queued output; a peer that accepts nothing for `stall_timeout` is cut off.
    async fn write_out(&mut self) -> Result<()> {
        let mut done = 0;
        while done < self.out.len() {
            match timeout(
                self.shared.config.stall_timeout,
                self.stream.write(&self.out[done..]),
            )
            .await
            {
                Err(_) => {
                    self.out.drain(..done);
                    return Err(End::Bye("output stalled"));
                }
                Ok(Ok(0)) => return Err(End::Closed),
                Ok(Ok(n)) => done += n,
                Ok(Err(e)) => return Err(e.into()),
            }
        }
        self.out.clear();
        Ok(())
    }
}

fn write_args(command: &Command) -> (&[u8], Write<'_>) {
    match command {
        Command::Reserve { name, location } => (name, Write::Reserve { location }),
        Command::Activate {
            name,
            location,
            acl,
        } => (name, Write::Activate { location, acl }),
        Command::Deactivate { name, location } => (name, Write::Deactivate { location }),
        Command::Delete { name } => (name, Write::Delete),
        _ => unreachable!("only write commands are queued"),
    }
}

fn answer(out: &mut Vec<u8>, tag: &[u8], decision: &Decision) {
    match decision {
        Decision::Refuse(text) => response::tagged(out, tag, Status::No, text),
        Decision::Unchanged | Decision::Store(_) => {
            response::tagged(out, tag, Status::Ok, master::DONE)
        }
    }
}
