//! The tokio master daemon: accept loop, connection cap, shutdown. Per-connection logic is in
//! [`connection`]; the transport (plain now, TLS and DEFLATE later, swapped in place) in
//! [`stream`]; LIST/UPDATE output in [`listing`].
//!
//! The store is reached through the [`MailboxStore`] trait: point reads run inline (an LMDB read
//! is a memory-mapped lookup), scans and feed reads run in `spawn_blocking`, writes go to the
//! store's group-commit writer and are awaited without holding a thread.

pub mod connection;
pub mod listing;
pub mod stream;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::auth::UserStore;
use crate::proto::quirks;
use crate::proto::response::{Banner, Role};
use crate::proto::Limits;
use crate::store::{MailboxStore, Seq};

/// This implementation's name and version, shown in the banner's middle fields.
pub const IMPLEMENTATION: &str = "mupdate";
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Server settings. Names follow the Cyrus options they stand for.
#[derive(Debug, Clone)]
pub struct Config {
    /// `servername`: shown in the banner.
    pub servername: String,
    pub limits: Limits,
    /// `mupdate_connections_max`: connections above it get `* BYE "Server Unable"`.
    pub connections_max: usize,
    /// `failedloginpause`: delay before a failed AUTHENTICATE's NO.
    pub failed_login_pause: Duration,
    /// Connections with no client input for this long get `* BYE "idle for too long"`
    /// (streaming connections count output too).
    pub idle_timeout: Duration,
    /// Bytes of streamed changes formatted ahead of the socket for one subscriber; the feed is
    /// read only below this, so a slow subscriber costs bounded memory.
    pub output_buffer: usize,
    /// A connection whose socket accepts no output for this long while output is pending is
    /// sent `* BYE` and closed.
    pub stall_timeout: Duration,
    /// Most write commands of one connection committed together.
    pub max_pipelined_writes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            servername: "localhost".into(),
            limits: Limits::default(),
            connections_max: quirks::CONNECTIONS_MAX,
            failed_login_pause: Duration::from_secs(quirks::FAILED_LOGIN_PAUSE_SECS),
            idle_timeout: Duration::from_secs(quirks::IDLE_TIMEOUT_SECS),
            output_buffer: 1024 * 1024,
            stall_timeout: Duration::from_secs(60),
            max_pipelined_writes: 256,
        }
    }
}

impl Config {
    /// The banner this server sends. PLAIN is the one mechanism that works end to end here;
    /// a Cyrus peer picks the strongest offered, so nothing else is offered.
    pub fn banner(&self) -> Vec<u8> {
        let banner = Banner {
            mechanisms: vec!["PLAIN".into()],
            starttls: false,
            compress: false,
            servername: self.servername.clone(),
            implementation: IMPLEMENTATION.into(),
            version: VERSION.into(),
            role: Role::Master,
        };
        let mut out = Vec::new();
        banner.write(&mut out);
        out
    }
}

/// What every connection shares.
pub struct Shared {
    pub config: Config,
    pub banner: Vec<u8>,
    pub store: Arc<dyn MailboxStore>,
    pub users: Arc<dyn UserStore + Send + Sync>,
    /// The last committed change sequence, published by the store's commit hook.
    pub committed: watch::Receiver<Seq>,
    pub shutdown: watch::Receiver<bool>,
    connections: AtomicUsize,
}

/// Serve on an already bound listener until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    config: Config,
    store: Arc<dyn MailboxStore>,
    users: Arc<dyn UserStore + Send + Sync>,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let (seq_tx, seq_rx) = watch::channel(store.last_seq().map_err(std::io::Error::other)?);
    store.set_commit_hook(Box::new(move |seq| {
        seq_tx.send_replace(seq);
    }));
    let (stop_tx, stop_rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        banner: config.banner(),
        config,
        store,
        users,
        committed: seq_rx,
        shutdown: stop_rx,
        connections: AtomicUsize::new(0),
    });
    let mut tasks = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((socket, peer)) => accept(&shared, &mut tasks, socket, peer),
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    drop(listener);
    stop_tx.send_replace(true);
    // Let connections finish their current command; writes already acknowledged are durable.
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(5), drain)
        .await
        .is_err()
    {
        tasks.abort_all();
    }
    shared.store.set_commit_hook(Box::new(|_| {}));
    Ok(())
}

fn accept(
    shared: &Arc<Shared>,
    tasks: &mut tokio::task::JoinSet<()>,
    socket: tokio::net::TcpStream,
    peer: SocketAddr,
) {
    let _ = socket.set_nodelay(true);
    let count = shared.connections.fetch_add(1, Ordering::SeqCst) + 1;
    if count > shared.config.connections_max {
        shared.connections.fetch_sub(1, Ordering::SeqCst);
        tracing::warn!(%peer, "connection refused: mupdate_connections_max reached");
        // Non-blocking, as Cyrus: a peer that cannot take 25 bytes gets nothing.
        let _ = socket.try_write(crate::proto::response::SERVER_UNABLE);
        return;
    }
    let shared = Arc::clone(shared);
    tasks.spawn(async move {
        tracing::debug!(%peer, "connection");
        connection::serve(&shared, socket, peer).await;
        shared.connections.fetch_sub(1, Ordering::SeqCst);
        tracing::debug!(%peer, "closed");
    });
}
