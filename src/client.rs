//! A blocking MUPDATE client (`std::net::TcpStream`, no runtime, no threads) on the sans-IO
//! codec in [`crate::proto::client`].
//!
//! It speaks the way Cyrus's C client does (imap/mupdate-client.c, cyrus-mupdate.md §3): tags
//! `X<n>` counting from 0 per connection, every argument a `{n+}` literal, `AUTHENTICATE
//! "PLAIN" {n+}` with the initial response as a literal. Unlike the C client it
//!
//! * checks tags, so that it can tell a command's records from UPDATE records streamed in
//!   between, and queues the latter for [`Client::next_update`] instead of failing;
//! * never leaves the connection out of step: a callback error or an unexpected record is
//!   remembered and the rest of the response is still read up to the tagged status;
//! * keeps a read timeout after login (Cyrus clears it, so every later call of the C client can
//!   block forever). A timed-out read loses nothing: partial input stays buffered and the next
//!   call resumes where it stopped.
//!
//! Besides the one-call-per-command methods there is a pipelined interface
//! ([`Client::next_tag`], [`Client::queue_command`], [`Client::flush`],
//! [`Client::read_response`]) so that a benchmark or a bulk loader can keep many commands in
//! flight on one connection. Replies come back in command order (RFC 3656 servers answer each
//! command before reading the next one; ours preserves order while batching commits).
//!
//! Nothing the server sends can make this module panic: every malformed line is a
//! [`ClientError::Protocol`], and the read buffer is bounded by
//! [`ClientOptions::max_response`].

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use crate::proto::client::{self as codec, BannerInfo, Response, ResponseRef, StatusKind};

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket failed, timed out (`WouldBlock`/`TimedOut`), or the server closed it
    /// (`UnexpectedEof`).
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// The server sent something this client cannot read or did not expect.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// `tag NO "text"`: the command was refused (e.g. `mailbox already exists`).
    #[error("server answered NO: {0}")]
    No(String),
    /// `tag BAD "text"`: the server did not accept the command's form or state.
    #[error("server answered BAD: {0}")]
    Bad(String),
    /// `BYE "text"`: the server is closing the connection.
    #[error("server said BYE: {0}")]
    Bye(String),
    /// A call that needs an active UPDATE stream was made without one.
    #[error("no UPDATE stream is active on this connection")]
    NotStreaming,
}

impl From<codec::DecodeError> for ClientError {
    fn from(e: codec::DecodeError) -> Self {
        ClientError::Protocol(e.to_string())
    }
}

impl ClientError {
    /// True for a read or write that hit its timeout (the connection is still usable).
    pub fn is_timeout(&self) -> bool {
        matches!(self, ClientError::Io(e) if is_timeout(e))
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// The state of a mailbox entry as the server reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A `MAILBOX` line: active at `location` with `acl`.
    Active,
    /// A `RESERVE` line: being created or moved; no ACL.
    Reserved,
}

/// One mailbox entry from FIND, LIST, UPDATE or a streamed change.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Record {
    pub name: Vec<u8>,
    /// `server!partition` (verbatim: Cyrus stores whatever it was given).
    pub location: Vec<u8>,
    /// Cyrus ACL text (`user\trights\t…`); empty for [`Kind::Reserved`].
    pub acl: Vec<u8>,
    pub kind: Kind,
}

/// A record borrowed from the client's read buffer, valid during a callback: LIST and UPDATE
/// dumps of 100k records are read without a single allocation per record
/// ([`Client::list_ref`], [`Client::update_ref`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRef<'a> {
    pub name: &'a [u8],
    pub location: &'a [u8],
    pub acl: &'a [u8],
    pub kind: Kind,
}

impl RecordRef<'_> {
    pub fn to_record(&self) -> Record {
        Record {
            name: self.name.to_vec(),
            location: self.location.to_vec(),
            acl: self.acl.to_vec(),
            kind: self.kind,
        }
    }
}

/// A record line of the reply being waited for.
enum Item<'a> {
    Record(RecordRef<'a>),
    /// A DELETE line: legal only in a stream, so always an error in a reply.
    Delete,
}

/// The record line `response` is, if it belongs to `tag`.
fn item_of<'b>(response: &'b ResponseRef<'_>, tag: &[u8]) -> Option<Item<'b>> {
    match response {
        ResponseRef::Mailbox {
            tag: t,
            name,
            location,
            acl,
        } if *t == tag => Some(Item::Record(RecordRef {
            name,
            location,
            acl,
            kind: Kind::Active,
        })),
        ResponseRef::Reserve {
            tag: t,
            name,
            location,
        } if *t == tag => Some(Item::Record(RecordRef {
            name,
            location,
            acl: b"",
            kind: Kind::Reserved,
        })),
        ResponseRef::Delete { tag: t, .. } if *t == tag => Some(Item::Delete),
        _ => None,
    }
}

/// One change streamed to an UPDATE subscriber.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Update {
    /// The mailbox now is (or is reserved) as given.
    Mailbox(Record),
    /// The mailbox is gone (or, for a partial UPDATE, left the watched hosts).
    Delete(Vec<u8>),
}

impl Update {
    /// The mailbox name this change is about.
    pub fn name(&self) -> &[u8] {
        match self {
            Update::Mailbox(r) => &r.name,
            Update::Delete(n) => n,
        }
    }
}

/// A response's records, split off from the status lines.
fn as_update(response: Response) -> std::result::Result<(Vec<u8>, Update), Response> {
    match response {
        Response::Mailbox {
            tag,
            name,
            location,
            acl,
        } => Ok((
            tag,
            Update::Mailbox(Record {
                name,
                location,
                acl,
                kind: Kind::Active,
            }),
        )),
        Response::Reserve {
            tag,
            name,
            location,
        } => Ok((
            tag,
            Update::Mailbox(Record {
                name,
                location,
                acl: Vec::new(),
                kind: Kind::Reserved,
            }),
        )),
        Response::Delete { tag, name } => Ok((tag, Update::Delete(name))),
        other => Err(other),
    }
}

/// Connection settings.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Bounds the TCP connect and every read of the banner (Cyrus's `client_timeout`, 10 s).
    pub connect_timeout: Duration,
    /// Bounds each read after the banner; `None` waits forever, as Cyrus's client does after
    /// login. A read that times out returns an error that [`ClientError::is_timeout`]
    /// recognises and the connection stays usable.
    pub read_timeout: Option<Duration>,
    /// Bounds each write; `None` waits forever.
    pub write_timeout: Option<Duration>,
    /// Largest single response accepted (a MAILBOX line with its three literals). Bounds the
    /// memory a hostile server can make us allocate.
    pub max_response: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(10),
            read_timeout: Some(Duration::from_secs(60)),
            write_timeout: Some(Duration::from_secs(60)),
            max_response: 64 * 1024 * 1024,
        }
    }
}

/// Initial read buffer: big enough that a LIST or UPDATE dump is read in few syscalls.
const READ_CHUNK: usize = 64 * 1024;

/// A blocking MUPDATE connection.
pub struct Client {
    stream: TcpStream,
    /// Input; unconsumed bytes are `rbuf[start..end]`.
    rbuf: Vec<u8>,
    start: usize,
    end: usize,
    /// Encoded commands not yet written.
    out: Vec<u8>,
    next_tag: u64,
    banner: BannerInfo,
    /// Tag of the active UPDATE, once its `OK "streaming starts"` arrived.
    streaming: Option<Vec<u8>>,
    /// Streamed changes read while waiting for another command's reply.
    queued: VecDeque<Update>,
    read_timeout: Option<Duration>,
    max_response: usize,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("peer", &self.stream.peer_addr().ok())
            .field("next_tag", &self.next_tag)
            .field("streaming", &self.streaming.is_some())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connect (trying each address `addr` resolves to) and read the banner; `timeout` bounds
    /// the connect and each banner read. Other settings are [`ClientOptions::default`].
    pub fn connect(addr: impl ToSocketAddrs, timeout: Duration) -> Result<Client> {
        let options = ClientOptions {
            connect_timeout: timeout,
            ..ClientOptions::default()
        };
        Self::connect_with(addr, &options)
    }

    /// [`connect`](Self::connect) with every setting given.
    pub fn connect_with(addr: impl ToSocketAddrs, options: &ClientOptions) -> Result<Client> {
        let mut last = None;
        for a in addr.to_socket_addrs()? {
            match TcpStream::connect_timeout(&a, options.connect_timeout) {
                Ok(stream) => return Self::from_stream(stream, options),
                Err(e) => last = Some(e),
            }
        }
        Err(ClientError::Io(last.unwrap_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "address resolved to nothing")
        })))
    }

    /// Take over a connected socket and read the banner.
    pub fn from_stream(stream: TcpStream, options: &ClientOptions) -> Result<Client> {
        // Commands are small and each waits for its answer: Nagle would add delayed-ACK stalls.
        stream.set_nodelay(true)?;
        stream.set_write_timeout(options.write_timeout)?;
        stream.set_read_timeout(Some(nonzero(options.connect_timeout)))?;
        let mut client = Client {
            stream,
            rbuf: vec![0; READ_CHUNK],
            start: 0,
            end: 0,
            out: Vec::with_capacity(4096),
            next_tag: 0,
            banner: BannerInfo::default(),
            streaming: None,
            queued: VecDeque::new(),
            read_timeout: options.read_timeout.map(nonzero),
            max_response: options.max_response.max(READ_CHUNK),
        };
        client.read_banner()?;
        client.stream.set_read_timeout(client.read_timeout)?;
        Ok(client)
    }

    fn read_banner(&mut self) -> Result<()> {
        loop {
            let response = self.read_response()?;
            match &response {
                Response::Status {
                    kind: StatusKind::Bye,
                    text,
                    ..
                } => return Err(ClientError::Bye(lossy(text))),
                Response::Status {
                    kind: StatusKind::No | StatusKind::Bad,
                    text,
                    ..
                } => {
                    return Err(ClientError::Protocol(format!(
                        "banner refused: {}",
                        lossy(text)
                    )))
                }
                Response::Capability { .. } | Response::Status { .. } => {
                    if self.banner.absorb(&response) {
                        return Ok(());
                    }
                }
                _ => {
                    return Err(ClientError::Protocol(
                        "unexpected line in the banner".into(),
                    ))
                }
            }
        }
    }

    /// What the banner offered (mechanisms, STARTTLS, PARTIAL-UPDATE, the greeting).
    pub fn banner(&self) -> &BannerInfo {
        &self.banner
    }

    /// The server's address.
    pub fn peer_addr(&self) -> Result<SocketAddr> {
        Ok(self.stream.peer_addr()?)
    }

    /// Change the read timeout used after authentication (see [`ClientOptions::read_timeout`]).
    pub fn set_read_timeout(&mut self, timeout: Option<Duration>) -> Result<()> {
        self.read_timeout = timeout.map(nonzero);
        self.stream.set_read_timeout(self.read_timeout)?;
        Ok(())
    }

    /// SASL PLAIN with an initial response and an empty authorisation identity, as Cyrus's
    /// client sends it. `Err(No)` when the credentials are refused. Works without TLS only if
    /// the server allows it (Cyrus: `allowplaintext: yes`).
    pub fn authenticate_plain(&mut self, user: &str, password: &str) -> Result<()> {
        let mut message = Vec::with_capacity(user.len() + password.len() + 2);
        message.push(0);
        message.extend_from_slice(user.as_bytes());
        message.push(0);
        message.extend_from_slice(password.as_bytes());
        let tag = self.next_tag();
        codec::encode_authenticate(&mut self.out, &tag, "PLAIN", Some(&message));
        let result = self
            .flush()
            .and_then(|()| self.finish_plain(&tag, &message));
        // Zero the credentials we still hold.
        message.iter_mut().for_each(|b| *b = 0);
        result
    }

    /// Read AUTHENTICATE's outcome. A line that is neither tagged nor untagged is a SASL
    /// challenge (Cyrus sends bare base64 lines, RFC 3656 `+ …`): PLAIN has nothing to say
    /// but the message itself, so the first challenge gets it and a second one cancels.
    fn finish_plain(&mut self, tag: &[u8], message: &[u8]) -> Result<()> {
        let mut challenges = 0;
        loop {
            let Some((line, used)) = codec::decode_line(&self.rbuf[self.start..self.end]) else {
                self.fill()?;
                continue;
            };
            let tagged = line.starts_with(tag) && line.get(tag.len()) == Some(&b' ');
            if tagged || line.starts_with(b"* ") {
                match self.read_response()? {
                    Response::Status { tag: t, kind, text } if t == tag => {
                        return status_result(kind, &text).map(|_| ());
                    }
                    Response::Status {
                        kind: StatusKind::Bye,
                        text,
                        ..
                    } => return Err(ClientError::Bye(lossy(&text))),
                    // Other untagged lines are ignored (RFC 3656 §3.8).
                    _ if !tagged => continue,
                    _ => {
                        return Err(ClientError::Protocol(
                            "unexpected reply to AUTHENTICATE".into(),
                        ))
                    }
                }
            }
            self.start += used;
            challenges += 1;
            if challenges == 1 {
                use base64::Engine as _;
                let b64 = base64::engine::general_purpose::STANDARD.encode(message);
                self.out.extend_from_slice(b64.as_bytes());
                self.out.extend_from_slice(b"\r\n");
            } else {
                // `*` cancels (RFC 4422); the server answers NO, which we then read.
                self.out.extend_from_slice(b"*\r\n");
            }
            self.flush()?;
        }
    }

    // --------------------------------------------------------------------------------------
    // one call per command

    /// `RESERVE name location`: claim a name for a mailbox being created or moved.
    /// `Err(No)` when it exists at another location.
    pub fn reserve(&mut self, name: impl AsRef<[u8]>, location: impl AsRef<[u8]>) -> Result<()> {
        self.simple("RESERVE", &[name.as_ref(), location.as_ref()])
    }

    /// `ACTIVATE name location acl`: the mailbox exists at `location` with `acl`.
    pub fn activate(
        &mut self,
        name: impl AsRef<[u8]>,
        location: impl AsRef<[u8]>,
        acl: impl AsRef<[u8]>,
    ) -> Result<()> {
        self.simple(
            "ACTIVATE",
            &[name.as_ref(), location.as_ref(), acl.as_ref()],
        )
    }

    /// `DEACTIVATE name location`: an active mailbox goes back to reserved (a move starts).
    pub fn deactivate(&mut self, name: impl AsRef<[u8]>, location: impl AsRef<[u8]>) -> Result<()> {
        self.simple("DEACTIVATE", &[name.as_ref(), location.as_ref()])
    }

    /// `DELETE name`. Beware: Cyrus 3.6.1's master crashes on a name it does not have.
    pub fn delete(&mut self, name: impl AsRef<[u8]>) -> Result<()> {
        self.simple("DELETE", &[name.as_ref()])
    }

    /// `NOOP`. On a streaming connection this is a barrier: every change committed before the
    /// server read it is delivered first. `on_update` gets those and any queued earlier.
    pub fn noop(&mut self, mut on_update: impl FnMut(Update)) -> Result<()> {
        let tag = self.send_next("NOOP", &[])?;
        let result = self.wait(&tag, |_| {
            Err(ClientError::Protocol("record in reply to NOOP".into()))
        });
        // Queued updates precede the OK on the wire: hand them over even if the NOOP failed.
        self.queued.drain(..).for_each(&mut on_update);
        result.map(|_| ())
    }

    /// `FIND name`: the entry, or `None` when the server has no such name.
    pub fn find(&mut self, name: impl AsRef<[u8]>) -> Result<Option<Record>> {
        let tag = self.send_next("FIND", &[name.as_ref()])?;
        let mut found = None;
        self.wait(&tag, |item| match item {
            Item::Record(r) if found.is_none() => {
                found = Some(r.to_record());
                Ok(())
            }
            Item::Record(_) => Err(ClientError::Protocol("FIND returned two records".into())),
            Item::Delete => Err(ClientError::Protocol("DELETE in reply to FIND".into())),
        })?;
        Ok(found)
    }

    /// `LIST [prefix]`: every entry whose *location* starts with `prefix` (Cyrus compares raw
    /// bytes of `server!partition`), in the server's key order. Returns how many there were.
    pub fn list(
        &mut self,
        prefix: Option<&[u8]>,
        mut on_record: impl FnMut(Record),
    ) -> Result<usize> {
        self.list_ref(prefix, |r| on_record(r.to_record()))
    }

    /// [`list`](Self::list) handing out records borrowed from the read buffer.
    pub fn list_ref(
        &mut self,
        prefix: Option<&[u8]>,
        mut on_record: impl FnMut(RecordRef<'_>),
    ) -> Result<usize> {
        let tag = match prefix {
            Some(p) => self.send_next("LIST", &[p])?,
            None => self.send_next("LIST", &[])?,
        };
        let mut count = 0;
        self.wait(&tag, |item| match item {
            Item::Record(r) => {
                count += 1;
                on_record(r);
                Ok(())
            }
            Item::Delete => Err(ClientError::Protocol("DELETE in reply to LIST".into())),
        })?;
        Ok(count)
    }

    /// [`list`](Self::list) into a vector.
    pub fn list_vec(&mut self, prefix: Option<&[u8]>) -> Result<Vec<Record>> {
        let mut records = Vec::new();
        self.list(prefix, |r| records.push(r))?;
        Ok(records)
    }

    /// `UPDATE [host…]`: subscribe. `on_record` gets the initial dump (every entry, or those on
    /// the given hosts with PARTIAL-UPDATE); when this returns (`OK "streaming starts"`) the
    /// connection is streaming and changes arrive through [`next_update`](Self::next_update),
    /// [`poll_update`](Self::poll_update) or [`noop`](Self::noop). Only NOOP and LOGOUT are
    /// legal afterwards. Returns the size of the dump.
    pub fn update(&mut self, hosts: &[&[u8]], mut on_record: impl FnMut(Record)) -> Result<usize> {
        self.update_ref(hosts, |r| on_record(r.to_record()))
    }

    /// [`update`](Self::update) handing out the dump's records borrowed from the read buffer.
    pub fn update_ref(
        &mut self,
        hosts: &[&[u8]],
        mut on_record: impl FnMut(RecordRef<'_>),
    ) -> Result<usize> {
        let tag = self.send_next("UPDATE", hosts)?;
        let mut count = 0;
        self.wait(&tag, |item| match item {
            Item::Record(r) => {
                count += 1;
                on_record(r);
                Ok(())
            }
            Item::Delete => Err(ClientError::Protocol(
                "DELETE in an UPDATE's initial dump".into(),
            )),
        })?;
        self.streaming = Some(tag);
        Ok(count)
    }

    /// True once an UPDATE has started streaming.
    pub fn is_streaming(&self) -> bool {
        self.streaming.is_some()
    }

    /// The next streamed change, waiting up to the read timeout (then an error that
    /// [`ClientError::is_timeout`] recognises; nothing is lost).
    pub fn next_update(&mut self) -> Result<Update> {
        if let Some(u) = self.queued.pop_front() {
            return Ok(u);
        }
        let Some(stream_tag) = self.streaming.clone() else {
            return Err(ClientError::NotStreaming);
        };
        loop {
            match as_update(self.read_response()?) {
                Ok((tag, update)) if tag == stream_tag => return Ok(update),
                Ok(_) => {
                    return Err(ClientError::Protocol(
                        "record with a foreign tag on a streaming connection".into(),
                    ))
                }
                Err(other) => self.untagged(other)?,
            }
        }
    }

    /// The next streamed change if one arrives within `timeout`, else `None`.
    pub fn poll_update(&mut self, timeout: Duration) -> Result<Option<Update>> {
        if let Some(u) = self.queued.pop_front() {
            return Ok(Some(u));
        }
        if self.end > self.start {
            // A whole change may be buffered already: take it without touching the socket.
            if let Some(update) = self.buffered_update()? {
                return Ok(Some(update));
            }
        }
        self.stream.set_read_timeout(Some(nonzero(timeout)))?;
        let result = self.next_update();
        self.stream.set_read_timeout(self.read_timeout)?;
        match result {
            Ok(u) => Ok(Some(u)),
            Err(e) if e.is_timeout() => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn buffered_update(&mut self) -> Result<Option<Update>> {
        let Some(stream_tag) = self.streaming.clone() else {
            return Err(ClientError::NotStreaming);
        };
        while let Some(response) = self.read_buffered_response()? {
            match as_update(response) {
                Ok((tag, update)) if tag == stream_tag => return Ok(Some(update)),
                Ok(_) => {
                    return Err(ClientError::Protocol(
                        "record with a foreign tag on a streaming connection".into(),
                    ))
                }
                Err(other) => self.untagged(other)?,
            }
        }
        Ok(None)
    }

    /// Streamed changes as an iterator; it ends after the first error (a timeout included).
    pub fn updates(&mut self) -> Updates<'_> {
        Updates {
            client: self,
            failed: false,
        }
    }

    /// `LOGOUT`, wait for its reply (streamed changes still in flight are dropped) and close.
    /// A server that closes without answering is fine too.
    pub fn logout(mut self) -> Result<()> {
        let tag = self.next_tag();
        codec::encode_command(&mut self.out, &tag, "LOGOUT", &[]);
        self.flush()?;
        let result = self.wait(&tag, |_| Ok(()));
        let _ = self.stream.shutdown(Shutdown::Both);
        match result {
            Ok(_) | Err(ClientError::Bye(_)) => Ok(()),
            Err(ClientError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn send_next(&mut self, verb: &str, args: &[&[u8]]) -> Result<Vec<u8>> {
        let tag = self.next_tag();
        self.send_command(&tag, verb, args)?;
        Ok(tag)
    }

    fn simple(&mut self, verb: &str, args: &[&[u8]]) -> Result<()> {
        let tag = self.send_next(verb, args)?;
        self.wait(&tag, |_| {
            Err(ClientError::Protocol(format!("record in reply to {verb}")))
        })
        .map(|_| ())
    }

    /// Read up to `tag`'s status. Records with `tag` go to `on_item`, borrowed from the read
    /// buffer; if it fails, the rest of the reply is still read (to stay in step) and its first
    /// error returned. Records of the active UPDATE are queued. Returns the OK text.
    fn wait(
        &mut self,
        tag: &[u8],
        mut on_item: impl FnMut(Item<'_>) -> Result<()>,
    ) -> Result<Vec<u8>> {
        let mut failed = None;
        loop {
            let decoded = if self.start < self.end {
                codec::decode_ref(&self.rbuf[self.start..self.end])?
            } else {
                None
            };
            let Some((response, used)) = decoded else {
                self.fill()?;
                continue;
            };
            // This command's records are handled in place; anything else is taken out owned.
            let other = match item_of(&response, tag) {
                Some(item) => {
                    if failed.is_none() {
                        if let Err(e) = on_item(item) {
                            failed = Some(e);
                        }
                    }
                    None
                }
                None => Some(response.into_owned()),
            };
            self.start += used;
            let Some(other) = other else { continue };
            match as_update(other) {
                Ok((t, update)) if self.streaming.as_deref() == Some(&t[..]) => {
                    self.queued.push_back(update)
                }
                Ok(_) => {
                    failed.get_or_insert_with(|| {
                        ClientError::Protocol("record with an unknown tag".into())
                    });
                }
                Err(Response::Status { tag: t, kind, text }) if t == tag => {
                    let result = status_result(kind, &text);
                    return match failed {
                        Some(e) => Err(e),
                        None => result,
                    };
                }
                Err(other) => self.untagged(other)?,
            }
        }
    }

    /// A response outside any command's reply: untagged capabilities and OK/NO/BAD texts are
    /// ignored (RFC 3656 §3.8), BYE ends the connection, anything else is an error.
    fn untagged(&mut self, response: Response) -> Result<()> {
        match response {
            Response::Status {
                kind: StatusKind::Bye,
                text,
                ..
            } => Err(ClientError::Bye(lossy(&text))),
            Response::Status { tag, .. } if tag == b"*" => Ok(()),
            Response::Capability { .. } => Ok(()),
            Response::Status { tag, .. } => Err(ClientError::Protocol(format!(
                "status for unknown tag {}",
                crate::proto::escape(&tag)
            ))),
            _ => Err(ClientError::Protocol("unexpected continuation".into())),
        }
    }

    // --------------------------------------------------------------------------------------
    // pipelined use

    /// The next tag, `X<n>`, n counting from 0 on each connection (authentication included).
    pub fn next_tag(&mut self) -> Vec<u8> {
        let tag = format!("X{}", self.next_tag).into_bytes();
        self.next_tag += 1;
        tag
    }

    /// Encode `tag verb {n+}arg…` into the output buffer without writing it; see
    /// [`flush`](Self::flush). Keep the number of unanswered commands moderate (a few
    /// thousand): a server that stops reading until we read its replies could otherwise
    /// deadlock both sides' socket buffers.
    pub fn queue_command(&mut self, tag: &[u8], verb: &str, args: &[&[u8]]) {
        codec::encode_command(&mut self.out, tag, verb, args);
    }

    /// Queue raw bytes (a hand-written command, a deliberately malformed line).
    pub fn queue_raw(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
    }

    /// Queue and write one command.
    pub fn send_command(&mut self, tag: &[u8], verb: &str, args: &[&[u8]]) -> Result<()> {
        self.queue_command(tag, verb, args);
        self.flush()
    }

    /// Queue and write raw bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.queue_raw(bytes);
        self.flush()
    }

    /// Write everything queued, in one `write` where the socket allows.
    pub fn flush(&mut self) -> Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let r = self.stream.write_all(&self.out);
        self.out.clear();
        Ok(r?)
    }

    /// The next response of any kind (records, statuses, untagged lines), reading as needed.
    /// This bypasses tag bookkeeping: use it for pipelined commands, not mixed with UPDATE
    /// queueing.
    pub fn read_response(&mut self) -> Result<Response> {
        loop {
            if let Some(r) = self.read_buffered_response()? {
                return Ok(r);
            }
            self.fill()?;
        }
    }

    /// The next response if it is already wholly buffered; never touches the socket. Lets a
    /// pipelining caller handle every reply of one read before writing again.
    pub fn read_buffered_response(&mut self) -> Result<Option<Response>> {
        if self.start == self.end {
            return Ok(None);
        }
        match codec::decode(&self.rbuf[self.start..self.end])? {
            Some((response, used)) => {
                self.start += used;
                Ok(Some(response))
            }
            None => Ok(None),
        }
    }

    /// Read once from the socket into the buffer, compacting or growing it first.
    fn fill(&mut self) -> Result<()> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.end == self.rbuf.len() {
            if self.start > 0 {
                self.rbuf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else if self.rbuf.len() >= self.max_response {
                return Err(ClientError::Protocol(format!(
                    "a response exceeds {} bytes",
                    self.max_response
                )));
            } else {
                let len = (self.rbuf.len() * 2).min(self.max_response);
                self.rbuf.resize(len, 0);
            }
        }
        loop {
            match self.stream.read(&mut self.rbuf[self.end..]) {
                Ok(0) => {
                    return Err(ClientError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the server closed the connection",
                    )))
                }
                Ok(n) => {
                    self.end += n;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Iterator over streamed changes ([`Client::updates`]).
pub struct Updates<'a> {
    client: &'a mut Client,
    failed: bool,
}

impl Iterator for Updates<'_> {
    type Item = Result<Update>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let r = self.client.next_update();
        self.failed = r.is_err();
        Some(r)
    }
}

fn status_result(kind: StatusKind, text: &[u8]) -> Result<Vec<u8>> {
    match kind {
        StatusKind::Ok => Ok(text.to_vec()),
        StatusKind::No => Err(ClientError::No(lossy(text))),
        StatusKind::Bad => Err(ClientError::Bad(lossy(text))),
        StatusKind::Bye => Err(ClientError::Bye(lossy(text))),
    }
}

fn lossy(text: &[u8]) -> String {
    String::from_utf8_lossy(text).into_owned()
}

/// `set_read_timeout(Some(0))` is an error in std: round up.
fn nonzero(d: Duration) -> Duration {
    d.max(Duration::from_millis(1))
}

#[cfg(test)]
mod tests {
    //! Against a scripted fake server: a listener thread that plays (expect, reply) steps,
    //! checking every byte we send, then hands back what it saw.
    use super::*;
    use std::net::TcpListener;
    use std::thread::JoinHandle;

    const BANNER: &[u8] = b"* AUTH \"PLAIN\"\r\n* PARTIAL-UPDATE\r\n\
        * OK MUPDATE \"fake\" \"mupdate\" \"0\" \"(master)\"\r\n";

    enum Step {
        /// Read exactly these bytes from the client (else the server thread panics, which the
        /// test sees as a failed join).
        Expect(&'static [u8]),
        Send(Vec<u8>),
        Pause(u64),
        Close,
    }
    use Step::*;

    fn fake(steps: Vec<Step>) -> (SocketAddr, JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let handle = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            for step in steps {
                match step {
                    Expect(want) => {
                        let mut got = vec![0; want.len()];
                        s.read_exact(&mut got).unwrap();
                        assert_eq!(
                            crate::proto::escape(&got),
                            crate::proto::escape(want),
                            "client sent"
                        );
                    }
                    Send(bytes) => s.write_all(&bytes).unwrap(),
                    Pause(ms) => std::thread::sleep(Duration::from_millis(ms)),
                    Close => return,
                }
            }
            // Linger until the client is done so it never sees a premature EOF.
            let mut sink = [0u8; 256];
            while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
        });
        (addr, handle)
    }

    fn with_banner(mut steps: Vec<Step>) -> Vec<Step> {
        steps.insert(0, Send(BANNER.to_vec()));
        steps
    }

    fn opts() -> ClientOptions {
        ClientOptions {
            connect_timeout: Duration::from_secs(5),
            read_timeout: Some(Duration::from_secs(5)),
            ..ClientOptions::default()
        }
    }

    #[test]
    fn banner_auth_and_commands_on_the_wire() {
        let (addr, server) = fake(with_banner(vec![
            Expect(b"X0 AUTHENTICATE \"PLAIN\" {16+}\r\nAGJvYgBzM2NyZXQ=\r\n"),
            Send(b"X0 OK \"Authenticated\"\r\n".to_vec()),
            Expect(b"X1 RESERVE {8+}\r\nuser.bob {7+}\r\nh!p1 \xc3\xa9\r\n"),
            Send(b"X1 OK \"done\"\r\n".to_vec()),
            Expect(b"X2 ACTIVATE {8+}\r\nuser.bob {4+}\r\nh!p1 {6+}\r\nbob\tl\t\r\n"),
            Send(b"X2 OK \"done\"\r\n".to_vec()),
            Expect(b"X3 DEACTIVATE {8+}\r\nuser.bob {4+}\r\nh!p2\r\n"),
            Send(b"X3 OK \"done\"\r\n".to_vec()),
            Expect(b"X4 DELETE {8+}\r\nuser.bob\r\n"),
            Send(b"X4 NO \"mailbox doesn't exist\"\r\n".to_vec()),
            Expect(b"X5 NOOP\r\n"),
            Send(b"X5 OK \"Noop done\"\r\n".to_vec()),
            Expect(b"X6 LOGOUT\r\n"),
            Send(b"X6 OK \"bye-bye\"\r\n".to_vec()),
        ]));
        let mut c = Client::connect_with(addr, &opts()).unwrap();
        assert_eq!(c.banner().mechanisms, ["PLAIN"]);
        assert!(c.banner().partial_update);
        c.authenticate_plain("bob", "s3cret").unwrap();
        c.reserve("user.bob", "h!p1 \u{e9}").unwrap();
        c.activate("user.bob", "h!p1", "bob\tl\t").unwrap();
        c.deactivate("user.bob", "h!p2").unwrap();
        match c.delete("user.bob") {
            Err(ClientError::No(t)) => assert_eq!(t, "mailbox doesn't exist"),
            other => panic!("{other:?}"),
        }
        c.noop(|_| panic!("not streaming")).unwrap();
        c.logout().unwrap();
        server.join().unwrap();
    }

    #[test]
    fn auth_refused_and_bad() {
        let (addr, server) = fake(with_banner(vec![
            Expect(b"X0 AUTHENTICATE \"PLAIN\" {12+}\r\nAGEAd3Jvbmc=\r\n"),
            Send(b"X0 NO \"undefined error!\"\r\n".to_vec()),
            Expect(b"X1 FIND {1+}\r\nx\r\n"),
            Send(b"X1 BAD \"Unauthenticated\"\r\n".to_vec()),
        ]));
        let mut c = Client::connect_with(addr, &opts()).unwrap();
        assert!(
            matches!(c.authenticate_plain("a", "wrong"), Err(ClientError::No(t)) if t == "undefined error!")
        );
        assert!(matches!(c.find("x"), Err(ClientError::Bad(t)) if t == "Unauthenticated"));
        drop(c);
        server.join().unwrap();
    }

    #[test]
    fn auth_answers_an_empty_challenge() {
        let (addr, server) = fake(with_banner(vec![
            Expect(b"X0 AUTHENTICATE \"PLAIN\" {8+}\r\nAGEAcHc=\r\n"),
            Send(b"\r\n".to_vec()),
            Expect(b"AGEAcHc=\r\n"),
            Send(b"+ \r\n".to_vec()),
            Expect(b"*\r\n"),
            Send(b"X0 NO Client canceled authentication\r\n".to_vec()),
        ]));
        let mut c = Client::connect_with(addr, &opts()).unwrap();
        assert!(
            matches!(c.authenticate_plain("a", "pw"), Err(ClientError::No(t)) if t == "Client canceled authentication")
        );
        drop(c);
        server.join().unwrap();
    }

    #[test]
    fn find_list_and_stray_records() {
        let (addr, server) = fake(with_banner(vec![
            Expect(b"X0 FIND {6+}\r\nuser.a\r\n"),
            Send(b"X0 MAILBOX {6+}\r\nuser.a {4+}\r\nh!p1 {4+}\r\na\tl\t\r\nX0 OK \"Search completed\"\r\n".to_vec()),
            Expect(b"X1 FIND {6+}\r\nuser.b\r\n"),
            Send(b"X1 RESERVE \"user.b\" \"h!p2\"\r\nX1 OK \"Search completed\"\r\n".to_vec()),
            Expect(b"X2 FIND {6+}\r\nuser.c\r\n"),
            Send(b"X2 OK \"Search completed\"\r\n".to_vec()),
            Expect(b"X3 LIST\r\n"),
            // Split mid-literal to exercise resumption across reads.
            Send(b"X3 MAILBOX {6+}\r\nuse".to_vec()),
            Pause(50),
            Send(b"r.a {4+}\r\nh!p1 {0+}\r\n\r\nX3 RESERVE {6+}\r\nuser.b {4+}\r\nh!p2\r\nX3 OK \"list complete\"\r\n".to_vec()),
            Expect(b"X4 LIST {2+}\r\nh!\r\n"),
            Send(b"X4 OK \"list complete\"\r\n".to_vec()),
            // A record for another tag: an error, but the reply is still read to its end.
            Expect(b"X5 ACTIVATE {1+}\r\nx {1+}\r\ny {0+}\r\n\r\n"),
            Send(b"Q9 DELETE {1+}\r\nx\r\nX5 OK \"done\"\r\n".to_vec()),
            Expect(b"X6 NOOP\r\n"),
            Send(b"X6 OK \"Noop done\"\r\n".to_vec()),
        ]));
        let mut c = Client::connect_with(addr, &opts()).unwrap();
        let a = c.find("user.a").unwrap().unwrap();
        assert_eq!(
            a,
            Record {
                name: b"user.a".to_vec(),
                location: b"h!p1".to_vec(),
                acl: b"a\tl\t".to_vec(),
                kind: Kind::Active
            }
        );
        let b = c.find("user.b").unwrap().unwrap();
        assert_eq!(b.kind, Kind::Reserved);
        assert_eq!(b.location, b"h!p2");
        assert_eq!(c.find("user.c").unwrap(), None);
        let all = c.list_vec(None).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].name, b"user.a");
        assert_eq!(all[0].acl, b"");
        assert_eq!(all[1].kind, Kind::Reserved);
        assert_eq!(c.list(Some(b"h!"), |_| {}).unwrap(), 0);
        assert!(matches!(
            c.activate("x", "y", ""),
            Err(ClientError::Protocol(_))
        ));
        // Still in step: the next command gets its own reply.
        c.noop(|_| {}).unwrap();
        drop(c);
        server.join().unwrap();
    }

    #[test]
    fn update_stream_queueing_and_polling() {
        let (addr, server) = fake(with_banner(vec![
            Expect(b"X0 UPDATE {2+}\r\nhA\r\n"),
            Send(
                b"X0 MAILBOX {1+}\r\na {5+}\r\nhA!p1 {0+}\r\n\r\nX0 OK \"streaming starts\"\r\n"
                    .to_vec(),
            ),
            Send(b"X0 DELETE {1+}\r\nb\r\n".to_vec()),
            Expect(b"X1 FIND {1+}\r\na\r\n"),
            // A change streamed before the refusal is queued, not lost.
            Send(
                b"X0 RESERVE {1+}\r\nc {5+}\r\nhA!p2\r\nX1 BAD \"not legal when streaming\"\r\n"
                    .to_vec(),
            ),
            Pause(300),
            Send(b"X0 MAILBOX {1+}\r\nd {5+}\r\nhA!p1 {3+}\r\nx\tl\r\n".to_vec()),
            Expect(b"X2 NOOP\r\n"),
            Send(b"X0 DELETE {1+}\r\ne\r\nX2 OK \"Noop done\"\r\n".to_vec()),
            Send(b"* BYE \"idle for too long\"\r\n".to_vec()),
        ]));
        let mut c = Client::connect_with(addr, &opts()).unwrap();
        assert!(matches!(c.next_update(), Err(ClientError::NotStreaming)));
        let mut dump = Vec::new();
        assert_eq!(c.update(&[b"hA"], |r| dump.push(r)).unwrap(), 1);
        assert!(c.is_streaming());
        assert_eq!(dump[0].name, b"a");
        assert_eq!(c.next_update().unwrap(), Update::Delete(b"b".to_vec()));
        assert!(matches!(c.find("a"), Err(ClientError::Bad(_))));
        match c.next_update().unwrap() {
            Update::Mailbox(r) => assert_eq!((&r.name[..], r.kind), (&b"c"[..], Kind::Reserved)),
            other => panic!("{other:?}"),
        }
        assert_eq!(c.poll_update(Duration::from_millis(20)).unwrap(), None);
        let d = c.poll_update(Duration::from_secs(5)).unwrap().unwrap();
        assert_eq!(d.name(), b"d");
        let mut got = Vec::new();
        c.noop(|u| got.push(u)).unwrap();
        assert_eq!(got, [Update::Delete(b"e".to_vec())]);
        let mut it = c.updates();
        assert!(matches!(it.next(), Some(Err(ClientError::Bye(t))) if t == "idle for too long"));
        assert!(it.next().is_none());
        drop(c);
        server.join().unwrap();
    }

    #[test]
    fn pipelined_interface() {
        let (addr, server) = fake(with_banner(vec![
            Expect(b"X0 FIND {1+}\r\na\r\nX1 FIND {1+}\r\nb\r\nraw\r\n"),
            Send(
                b"X0 OK \"Search completed\"\r\nX1 OK \"Search completed\"\r\nraw BAD \"x\"\r\n"
                    .to_vec(),
            ),
        ]));
        let mut c = Client::connect_with(addr, &opts()).unwrap();
        let t0 = c.next_tag();
        let t1 = c.next_tag();
        c.queue_command(&t0, "FIND", &[b"a"]);
        c.queue_command(&t1, "FIND", &[b"b"]);
        assert!(c.read_buffered_response().unwrap().is_none());
        c.send_raw(b"raw\r\n").unwrap();
        let first = c.read_response().unwrap();
        assert!(
            matches!(first, Response::Status { ref tag, kind: StatusKind::Ok, .. } if tag == b"X0")
        );
        // The rest arrived in the same segment (most likely) or is read now.
        let second = match c.read_buffered_response().unwrap() {
            Some(r) => r,
            None => c.read_response().unwrap(),
        };
        assert!(matches!(second, Response::Status { ref tag, .. } if tag == b"X1"));
        let third = c.read_response().unwrap();
        assert!(
            matches!(third, Response::Status { ref tag, kind: StatusKind::Bad, .. } if tag == b"raw")
        );
        drop(c);
        server.join().unwrap();
    }

    #[test]
    fn bad_server_input_is_an_error_not_a_panic() {
        let cases: Vec<&'static [u8]> = vec![
            b"garbage\r\n",
            b"* BYE \"Server Unable\"\r\n\0",
            b"X0 MAILBOX {99999999999}\r\n",
            b"* NO \"nope\"\r\n",
            b"+ go ahead\r\n",
            b"* OK MUPDATE \"m\"\r\nX7 OK \"stray\"\r\n",
        ];
        for (i, bytes) in cases.into_iter().enumerate() {
            let steps = vec![Send(bytes.to_vec()), Pause(100), Close];
            let (addr, server) = fake(steps);
            let result = Client::connect_with(addr, &opts()).and_then(|mut c| c.find("x"));
            assert!(result.is_err(), "case {i}: {result:?}");
            server.join().unwrap();
        }
    }

    #[test]
    fn oversized_response_is_refused() {
        let mut big = b"X0 MAILBOX {200000+}\r\n".to_vec();
        big.extend(std::iter::repeat_n(b'a', 200_000));
        let (addr, server) = fake(with_banner(vec![
            Expect(b"X0 FIND {1+}\r\nx\r\n"),
            Send(big),
        ]));
        let options = ClientOptions {
            max_response: 100_000,
            ..opts()
        };
        let mut c = Client::connect_with(addr, &options).unwrap();
        match c.find("x") {
            Err(ClientError::Protocol(t)) => assert!(t.contains("exceeds"), "{t}"),
            other => panic!("{other:?}"),
        }
        drop(c);
        server.join().unwrap();
    }

    #[test]
    fn eof_and_timeouts() {
        let (addr, server) = fake(with_banner(vec![
            Expect(b"X0 NOOP\r\n"),
            Pause(300),
            Send(b"X0 OK \"Noop done\"\r\n".to_vec()),
            Expect(b"X1 NOOP\r\n"),
            Close,
        ]));
        let mut c = Client::connect_with(addr, &opts()).unwrap();
        c.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let tag = c.next_tag();
        c.send_command(&tag, "NOOP", &[]).unwrap();
        let e = c.read_response().unwrap_err();
        assert!(e.is_timeout(), "{e:?}");
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert!(matches!(
            c.read_response().unwrap(),
            Response::Status {
                kind: StatusKind::Ok,
                ..
            }
        ));
        match c.noop(|_| {}) {
            Err(ClientError::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof),
            other => panic!("{other:?}"),
        }
        server.join().unwrap();
        // Nothing listens: connect fails with Io.
        assert!(matches!(
            Client::connect(addr, Duration::from_secs(1)),
            Err(ClientError::Io(_))
        ));
    }
}
