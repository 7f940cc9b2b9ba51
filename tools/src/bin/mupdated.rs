//! `mupdated`: the MUPDATE master daemon and its user administration.
//!
//! * `mupdated serve` runs a master in the foreground on the embedded LMDB store.
//! * `mupdated user add|del|list` manages the credential store (works while a server runs:
//!   the server reads credentials from the store at each AUTHENTICATE).

use std::io::{BufRead, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use mupdate::auth::{UserStore, Verifier, DEFAULT_ITERATIONS};
use mupdate::proto::Limits;
use mupdate::server::{self, Config};
use mupdate::store::lmdb::{LmdbOptions, LmdbStore};

#[derive(Parser)]
#[command(
    name = "mupdated",
    version,
    about = "MUPDATE (RFC 3656) master for the Cyrus IMAP murder"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a master in the foreground (logs to stderr; SIGTERM or SIGINT stops it cleanly).
    Serve(ServeArgs),
    /// Manage the users who may authenticate.
    User {
        #[command(subcommand)]
        command: UserCmd,
    },
}

#[derive(Args)]
struct StoreArgs {
    /// The data directory (LMDB store, admin-password).
    #[arg(long, default_value = "./mupdate-data")]
    data_dir: PathBuf,
    /// Initial LMDB map size in bytes. It is address space, not disk, and it grows on demand;
    /// a large start makes growth (which waits for open UPDATE snapshots) rare.
    #[arg(long, default_value_t = 16 << 30)]
    map_size: usize,
    /// Changes kept in the change feed for subscribers that fall behind.
    #[arg(long, default_value_t = 1_000_000)]
    change_log_retain: u64,
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:3905")]
    listen: SocketAddr,
    #[command(flatten)]
    store: StoreArgs,
    /// Name shown in the banner (Cyrus `servername`); defaults to the host name.
    #[arg(long)]
    servername: Option<String>,
    /// Cyrus `mupdate_connections_max`: connections above this get `* BYE "Server Unable"`.
    #[arg(long, default_value_t = 128)]
    connections_max: usize,
    /// Cyrus `failedloginpause`: delay before a failed AUTHENTICATE is answered (e.g. 3, 3s, 500ms).
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    failed_login_pause: Duration,
    /// Close connections idle (no input) this long with `* BYE "idle for too long"`.
    #[arg(long, default_value = "3h", value_parser = parse_duration)]
    idle_timeout: Duration,
    /// Cyrus `maxword`: longest tag or command word, bytes.
    #[arg(long, default_value_t = Limits::CYRUS_DEFAULT_WORD)]
    max_word: usize,
    /// Cyrus `maxquoted`: longest quoted string, bytes.
    #[arg(long, default_value_t = Limits::CYRUS_DEFAULT_WORD)]
    max_quoted: usize,
    /// Cyrus `maxliteral`: longest literal, bytes.
    #[arg(long, default_value_t = Limits::CYRUS_DEFAULT_WORD as u64)]
    max_literal: u64,
    /// Longest whole command, bytes (at least 1 MiB).
    #[arg(long, default_value_t = 4 * Limits::MIN_COMMAND)]
    max_command: usize,
    /// Bytes of UPDATE output buffered ahead of a subscriber's socket.
    #[arg(long, default_value_t = 1024 * 1024)]
    output_buffer: usize,
    /// Cut off a client whose socket accepts no output for this long (e.g. 60s).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    stall_timeout: Duration,
    /// Most pipelined write commands of one connection committed together.
    #[arg(long, default_value_t = 256)]
    max_pipelined_writes: usize,
}

#[derive(Subcommand)]
enum UserCmd {
    /// Create or replace a user; the password is read as one line from stdin.
    Add {
        name: String,
        #[command(flatten)]
        store: StoreArgs,
        /// PBKDF2 iterations of the stored verifier (SCRAM's default is 4096).
        #[arg(long, default_value_t = DEFAULT_ITERATIONS)]
        iterations: u32,
    },
    /// Remove a user.
    Del {
        name: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List users, one per line.
    List {
        #[command(flatten)]
        store: StoreArgs,
    },
}

/// `3`, `3s`, `500ms`, `2m`, `3h`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, ""), |i| s.split_at(i));
    let n: f64 = num.parse().map_err(|_| format!("not a duration: {s:?}"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("unknown unit in {s:?} (use ms, s, m or h)")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("not a duration: {s:?}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn open_store(args: &StoreArgs) -> Result<Arc<LmdbStore>> {
    let options = LmdbOptions {
        map_size: args.map_size,
        change_log_retain: args.change_log_retain,
        ..LmdbOptions::default()
    };
    LmdbStore::open(&args.data_dir, options)
        .with_context(|| format!("opening the store in {}", args.data_dir.display()))
}

fn random_password() -> Result<String> {
    let mut bytes = [0u8; 18];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .context("reading /dev/urandom")?;
    const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";
    Ok(bytes
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect())
}

/// On first start with no users, create `admin` with a random password in DIR/admin-password.
fn ensure_admin(store: &LmdbStore, dir: &Path) -> Result<()> {
    if !store.list_users()?.is_empty() {
        return Ok(());
    }
    let password = random_password()?;
    let path = dir.join("admin-password");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        writeln!(f, "{password}")?;
        f.sync_all()?;
    }
    store.put_user("admin", &Verifier::new(&password, DEFAULT_ITERATIONS)?)?;
    tracing::info!("created user admin; its password is in {}", path.display());
    Ok(())
}

fn serve(args: ServeArgs) -> Result<()> {
    if args.max_command < Limits::MIN_COMMAND {
        bail!(
            "--max-command must be at least {} bytes",
            Limits::MIN_COMMAND
        );
    }
    let store = open_store(&args.store)?;
    ensure_admin(&store, &args.store.data_dir)?;
    let config = Config {
        servername: args
            .servername
            .unwrap_or_else(mupdate::cyrus::imapd_conf::hostname),
        limits: Limits {
            max_word: args.max_word,
            max_quoted: args.max_quoted,
            max_literal: args.max_literal,
            max_command: args.max_command,
        },
        connections_max: args.connections_max,
        failed_login_pause: args.failed_login_pause,
        idle_timeout: args.idle_timeout,
        output_buffer: args.output_buffer,
        stall_timeout: args.stall_timeout,
        max_pipelined_writes: args.max_pipelined_writes.max(1),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        tracing::info!(
            "mupdated {} master \"{}\" listening on {} (data in {})",
            server::VERSION,
            config.servername,
            listener.local_addr()?,
            args.store.data_dir.display()
        );
        let users: Arc<dyn UserStore + Send + Sync> = store.clone();
        server::run(listener, config, store.clone(), users, shutdown_signal()).await?;
        tracing::info!("stopped");
        anyhow::Ok(())
    })?;
    store.shutdown();
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers, run until killed.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

fn read_password() -> Result<String> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("reading the password from stdin")?;
    let password = line.strip_suffix('\n').unwrap_or(&line);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        bail!("empty password (give it as one line on stdin)");
    }
    Ok(password.to_string())
}

fn user(cmd: UserCmd) -> Result<()> {
    match cmd {
        UserCmd::Add {
            name,
            store,
            iterations,
        } => {
            if name.is_empty() || name.contains(['\0', '\n']) {
                bail!("invalid user name {name:?}");
            }
            if iterations == 0 {
                bail!("--iterations must be at least 1");
            }
            let password = read_password()?;
            let s = open_store(&store)?;
            s.put_user(&name, &Verifier::new(&password, iterations)?)?;
            s.shutdown();
            eprintln!("user {name} saved");
        }
        UserCmd::Del { name, store } => {
            let s = open_store(&store)?;
            let existed = s.delete_user(&name)?;
            s.shutdown();
            if !existed {
                bail!("no user {name:?}");
            }
            eprintln!("user {name} removed");
        }
        UserCmd::List { store } => {
            let s = open_store(&store)?;
            let mut out = std::io::stdout().lock();
            for name in s.list_users()? {
                writeln!(out, "{name}")?;
            }
            s.shutdown();
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MUPDATE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let result = match cli.command {
        Cmd::Serve(args) => serve(args),
        Cmd::User { command } => user(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mupdated: {e:#}");
            ExitCode::from(2)
        }
    }
}
