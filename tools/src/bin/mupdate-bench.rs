//! `mupdate-bench`: a load generator for any MUPDATE master (ours or Cyrus's), in the spirit
//! of redis-benchmark.
//!
//! Workloads (`-w`):
//! * `write`: per mailbox RESERVE, then ACTIVATE once RESERVE's OK is in (what a Cyrus backend
//!   does to create a mailbox), `--mailboxes N` over `--connections C` with `--pipeline D`
//!   commands in flight per connection. Reports mailboxes/s and per-command latency.
//! * `find`: FIND of existing names (`{prefix}{index}`, indices drawn uniformly from the
//!   `--existing` first ones), `--ops N` over C connections.
//! * `list`: a full LIST on one connection, `--repeat R` times.
//! * `update-sync`: time from sending UPDATE to its `OK "streaming starts"` (the full dump a
//!   slave or frontend loads at start), R times, each on a fresh connection.
//! * `propagation`: a subscriber does a plain UPDATE and never sends NOOP; a writer ACTIVATEs
//!   `--changes K` new mailboxes `--interval-ms` apart; each change's latency is from the
//!   writer receiving its OK to the subscriber receiving the matching MAILBOX line.
//! * `none`: only `--populate`.
//!
//! `--populate N` first creates N mailboxes (one ACTIVATE each, pipelined over many
//! connections) so that find/list/update-sync have data. Everything is bounded: each run by
//! `--time-limit`, each read by `--io-timeout`.
//!
//! The client side is one OS thread per connection on the blocking product client
//! (`mupdate::client`), batching: every reply already read is handled before the next write,
//! so one `write` carries all commands that became ready.

use std::collections::{HashMap, VecDeque};
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use mupdate::client::{Client, ClientError, ClientOptions, Update};
use mupdate::proto::client::{Response, StatusKind};
use serde_json::{json, Value};

#[derive(Parser, Debug)]
#[command(
    name = "mupdate-bench",
    version,
    about = "Load generator for MUPDATE (RFC 3656) masters: ours or Cyrus's"
)]
struct Args {
    /// The server, host:port.
    #[arg(short, long, default_value = "127.0.0.1:3905")]
    server: String,
    /// User to authenticate as (SASL PLAIN).
    #[arg(short, long, default_value = "admin")]
    user: String,
    /// Password (prefer --password-file or MUPDATE_PASSWORD: argv is visible to others).
    #[arg(long, env = "MUPDATE_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// File whose first line is the password (e.g. DATA_DIR/admin-password).
    #[arg(long)]
    password_file: Option<PathBuf>,
    /// What to measure.
    #[arg(short, long, value_enum, default_value_t = Workload::Write)]
    workload: Workload,
    /// write: how many new mailboxes to create.
    #[arg(short = 'n', long, default_value_t = 10_000)]
    mailboxes: usize,
    /// find: how many FIND commands.
    #[arg(long, default_value_t = 100_000)]
    ops: usize,
    /// find: names are drawn from the first N indices under --prefix (default: --populate if
    /// given, else --mailboxes).
    #[arg(long)]
    existing: Option<usize>,
    /// Connections for write and find.
    #[arg(short, long, default_value_t = 1)]
    connections: usize,
    /// Commands in flight per connection.
    #[arg(short = 'P', long, default_value_t = 1)]
    pipeline: usize,
    /// Mailbox names are `{prefix}{index:08}`; the default is unique per run.
    #[arg(long)]
    prefix: Option<String>,
    /// Location of created mailboxes (`server!partition`).
    #[arg(long, default_value = "benchhost!default")]
    location: String,
    /// ACL of created mailboxes; `\t` is a TAB (default: `{user}\tlrswipkxtecda\t`).
    #[arg(long)]
    acl: Option<String>,
    /// Create N mailboxes (indices 0..N, one ACTIVATE each) before the workload.
    #[arg(long, default_value_t = 0)]
    populate: usize,
    /// Connections used by --populate.
    #[arg(long, default_value_t = 16)]
    populate_connections: usize,
    /// Commands in flight per connection during --populate.
    #[arg(long, default_value_t = 16)]
    populate_pipeline: usize,
    /// list, update-sync: how many runs.
    #[arg(short, long, default_value_t = 5)]
    repeat: usize,
    /// propagation: how many ACTIVATEs.
    #[arg(long, default_value_t = 40)]
    changes: usize,
    /// propagation: time between ACTIVATEs.
    #[arg(long, default_value_t = 30)]
    interval_ms: u64,
    /// propagation: after the last write, how long to wait for the subscriber to see all
    /// changes (Cyrus flushes UPDATE streams every 5 s).
    #[arg(long, default_value_t = 15)]
    settle_secs: u64,
    /// Stop issuing work after this many seconds (populate and workload each).
    #[arg(long, default_value_t = 300)]
    time_limit: u64,
    /// Connect timeout and per-read timeout, seconds.
    #[arg(long, default_value_t = 30)]
    io_timeout: u64,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Label shown in output (e.g. "ours", "cyrus").
    #[arg(long)]
    label: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Workload {
    Write,
    Find,
    List,
    UpdateSync,
    Propagation,
    None,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Write => "write",
            Workload::Find => "find",
            Workload::List => "list",
            Workload::UpdateSync => "update-sync",
            Workload::Propagation => "propagation",
            Workload::None => "none",
        }
    }
}

/// Settings every connection shares.
#[derive(Clone)]
struct Conf {
    server: String,
    user: String,
    password: String,
    prefix: String,
    location: String,
    acl: String,
    io_timeout: Duration,
}

impl Conf {
    fn connect(&self) -> Result<Client> {
        let options = ClientOptions {
            connect_timeout: self.io_timeout,
            read_timeout: Some(self.io_timeout),
            write_timeout: Some(self.io_timeout),
            ..ClientOptions::default()
        };
        let mut c = Client::connect_with(self.server.as_str(), &options)
            .with_context(|| format!("connecting to {}", self.server))?;
        c.authenticate_plain(&self.user, &self.password)
            .with_context(|| format!("authenticating as {}", self.user))?;
        Ok(c)
    }

    fn name(&self, index: usize) -> String {
        format!("{}{index:08}", self.prefix)
    }
}

// ------------------------------------------------------------------------------------------
// statistics

/// Percentiles of a sample in milliseconds.
#[derive(Debug, Clone, Copy, Default)]
struct Lat {
    count: usize,
    p50: f64,
    p99: f64,
    max: f64,
    mean: f64,
}

impl Lat {
    fn of_nanos(mut v: Vec<u64>) -> Lat {
        if v.is_empty() {
            return Lat::default();
        }
        v.sort_unstable();
        let at = |q: f64| {
            let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
            v[i] as f64 / 1e6
        };
        Lat {
            count: v.len(),
            p50: at(0.50),
            p99: at(0.99),
            max: v[v.len() - 1] as f64 / 1e6,
            mean: v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64 / 1e6,
        }
    }

    fn json(&self) -> Value {
        json!({"count": self.count, "p50": self.p50, "p99": self.p99, "max": self.max,
               "mean": self.mean})
    }
}

fn nanos(d: Duration) -> u64 {
    d.as_nanos().min(u128::from(u64::MAX)) as u64
}

/// One workload's result.
#[derive(Debug, Default)]
struct Summary {
    workload: &'static str,
    /// Units completed (mailboxes, FINDs, records per dump, changes seen).
    count: u64,
    elapsed: Duration,
    throughput: f64,
    unit: &'static str,
    /// (what, latency): the first one is the headline.
    latencies: Vec<(&'static str, Lat)>,
    errors: u64,
    first_error: Option<String>,
    /// False when the time limit or an error cut the run short.
    complete: bool,
    extra: serde_json::Map<String, Value>,
}

impl Summary {
    fn json(&self) -> Value {
        let lat: serde_json::Map<String, Value> = self
            .latencies
            .iter()
            .map(|(k, l)| ((*k).to_string(), l.json()))
            .collect();
        let mut v = json!({
            "workload": self.workload,
            "count": self.count,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "throughput": self.throughput,
            "unit": self.unit,
            "latency_ms": lat,
            "errors": self.errors,
            "first_error": self.first_error,
            "complete": self.complete,
        });
        if let Value::Object(m) = &mut v {
            m.extend(self.extra.clone());
        }
        v
    }

    fn print(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        writeln!(
            out,
            "{:<14} {:>9} {:>9} {:>14} {:<12} {:>9} {:>9} {:>9} {:>7}",
            "workload",
            "count",
            "time_s",
            "throughput",
            "unit",
            "p50_ms",
            "p99_ms",
            "max_ms",
            "errors"
        )?;
        let (head, rest) = match self.latencies.split_first() {
            Some((h, r)) => (Some(h), r),
            None => (None, &[][..]),
        };
        let l = head.map(|h| h.1).unwrap_or_default();
        writeln!(
            out,
            "{:<14} {:>9} {:>9.3} {:>14.1} {:<12} {:>9.3} {:>9.3} {:>9.3} {:>7}",
            self.workload,
            self.count,
            self.elapsed.as_secs_f64(),
            self.throughput,
            self.unit,
            l.p50,
            l.p99,
            l.max,
            self.errors
        )?;
        for (what, l) in rest {
            writeln!(
                out,
                "  {:<12} {:>9} {:>9} {:>14} {:<12} {:>9.3} {:>9.3} {:>9.3}",
                what, l.count, "", "", "", l.p50, l.p99, l.max
            )?;
        }
        for (k, v) in &self.extra {
            writeln!(out, "  {k}: {v}")?;
        }
        if let Some(e) = &self.first_error {
            writeln!(out, "  first error: {e}")?;
        }
        if !self.complete {
            writeln!(out, "  INCOMPLETE (time limit or error)")?;
        }
        Ok(())
    }
}

// ------------------------------------------------------------------------------------------
// pipelined write/find engine

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Reserve,
    Activate,
    Find,
}

/// What the connections of one pipelined run do.
#[derive(Debug, Clone, Copy)]
enum Plan {
    /// Create mailboxes `base..base+total`: RESERVE then ACTIVATE, or ACTIVATE alone.
    Create {
        base: usize,
        total: usize,
        reserve_first: bool,
    },
    /// `total` FINDs of names drawn from `0..existing`.
    Find { total: usize, existing: usize },
}

impl Plan {
    fn total(&self) -> usize {
        match *self {
            Plan::Create { total, .. } | Plan::Find { total, .. } => total,
        }
    }
}

struct InFlight {
    tag: Vec<u8>,
    op: Op,
    index: usize,
    sent: Instant,
    /// When this mailbox's first command was sent (a create's end-to-end latency).
    began: Instant,
    hit: bool,
}

#[derive(Default)]
struct ConnStats {
    op_lat: HashMap<&'static str, Vec<u64>>,
    unit_lat: Vec<u64>,
    units: u64,
    errors: u64,
    hits: u64,
    misses: u64,
    first_error: Option<String>,
}

impl ConnStats {
    fn error(&mut self, e: String) {
        self.errors += 1;
        self.first_error.get_or_insert(e);
    }

    fn merge(&mut self, o: ConnStats) {
        for (k, v) in o.op_lat {
            self.op_lat.entry(k).or_default().extend(v);
        }
        self.unit_lat.extend(o.unit_lat);
        self.units += o.units;
        self.errors += o.errors;
        self.hits += o.hits;
        self.misses += o.misses;
        if self.first_error.is_none() {
            self.first_error = o.first_error;
        }
    }
}

fn op_name(op: Op) -> &'static str {
    match op {
        Op::Reserve => "reserve",
        Op::Activate => "activate",
        Op::Find => "find",
    }
}

/// Work handed out across connections, one unit at a time, so fast connections take more.
struct Dispenser {
    next: AtomicUsize,
    total: usize,
    deadline: Instant,
    cut: AtomicBool,
}

impl Dispenser {
    fn take(&self) -> Option<usize> {
        if Instant::now() >= self.deadline {
            self.cut.store(true, Ordering::Relaxed);
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        (i < self.total).then_some(i)
    }
}

/// Run one connection of a pipelined plan until the dispenser is empty and nothing is in
/// flight. Replies must come back in command order (both Cyrus and ours guarantee it); a
/// mismatch is an error.
fn run_connection(
    client: &mut Client,
    conf: &Conf,
    plan: Plan,
    depth: usize,
    work: &Dispenser,
    seed: u64,
) -> Result<ConnStats> {
    let mut stats = ConnStats::default();
    let mut inflight: VecDeque<InFlight> = VecDeque::with_capacity(depth);
    // Mailboxes whose RESERVE succeeded and that wait for their ACTIVATE.
    let mut ready: VecDeque<(usize, Instant)> = VecDeque::new();
    let mut rng = seed | 1;
    let location = conf.location.as_bytes();
    let acl = conf.acl.as_bytes();
    loop {
        // Fill the pipeline: pending ACTIVATEs first, so mailboxes finish in order.
        while inflight.len() < depth {
            let now = Instant::now();
            let (op, index, began) = if let Some((index, began)) = ready.pop_front() {
                (Op::Activate, index, began)
            } else {
                let Some(i) = work.take() else { break };
                match plan {
                    Plan::Create {
                        base,
                        reserve_first,
                        ..
                    } => {
                        let op = if reserve_first {
                            Op::Reserve
                        } else {
                            Op::Activate
                        };
                        (op, base + i, now)
                    }
                    Plan::Find { existing, .. } => {
                        // xorshift64: uniform enough, no dependency, no shared state.
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        (Op::Find, (rng % existing.max(1) as u64) as usize, now)
                    }
                }
            };
            let tag = client.next_tag();
            let name = conf.name(index);
            let name = name.as_bytes();
            match op {
                Op::Reserve => client.queue_command(&tag, "RESERVE", &[name, location]),
                Op::Activate => client.queue_command(&tag, "ACTIVATE", &[name, location, acl]),
                Op::Find => client.queue_command(&tag, "FIND", &[name]),
            }
            inflight.push_back(InFlight {
                tag,
                op,
                index,
                sent: now,
                began,
                hit: false,
            });
        }
        if inflight.is_empty() {
            return Ok(stats);
        }
        client.flush()?;
        // One blocking read, then everything else that came with it.
        let mut response = Some(client.read_response()?);
        while let Some(r) = response {
            handle_reply(r, &mut inflight, &mut ready, &mut stats)?;
            response = client.read_buffered_response()?;
        }
    }
}

fn handle_reply(
    response: Response,
    inflight: &mut VecDeque<InFlight>,
    ready: &mut VecDeque<(usize, Instant)>,
    stats: &mut ConnStats,
) -> Result<()> {
    let Some(front) = inflight.front_mut() else {
        bail!("a reply with nothing in flight: {response:?}");
    };
    match response {
        Response::Status { tag, kind, text } if tag == front.tag => {
            let f = inflight.pop_front().expect("front exists");
            let now = Instant::now();
            match kind {
                StatusKind::Ok => {
                    stats
                        .op_lat
                        .entry(op_name(f.op))
                        .or_default()
                        .push(nanos(now - f.sent));
                    match f.op {
                        Op::Reserve => ready.push_back((f.index, f.began)),
                        Op::Activate => {
                            stats.units += 1;
                            stats.unit_lat.push(nanos(now - f.began));
                        }
                        Op::Find => {
                            stats.units += 1;
                            stats.unit_lat.push(nanos(now - f.sent));
                            if f.hit {
                                stats.hits += 1;
                            } else {
                                stats.misses += 1;
                            }
                        }
                    }
                }
                StatusKind::No | StatusKind::Bad => stats.error(format!(
                    "{} of index {}: {:?} {}",
                    op_name(f.op),
                    f.index,
                    kind,
                    String::from_utf8_lossy(&text)
                )),
                StatusKind::Bye => bail!("BYE {}", String::from_utf8_lossy(&text)),
            }
        }
        Response::Mailbox { tag, .. } | Response::Reserve { tag, .. }
            if tag == front.tag && front.op == Op::Find =>
        {
            front.hit = true;
        }
        Response::Status {
            kind: StatusKind::Bye,
            text,
            ..
        } => bail!("BYE {}", String::from_utf8_lossy(&text)),
        // Untagged chatter is ignored (RFC 3656 §3.8).
        Response::Status { ref tag, .. } | Response::Capability { name: ref tag, .. }
            if tag == b"*" || matches!(response, Response::Capability { .. }) => {}
        other => bail!(
            "reply out of order: expected tag {}, got {other:?}",
            String::from_utf8_lossy(&front.tag)
        ),
    }
    Ok(())
}

/// Connect `connections` clients (not timed), then run `plan` over them from a common start.
fn run_pipelined(
    conf: &Conf,
    plan: Plan,
    connections: usize,
    depth: usize,
    time_limit: Duration,
) -> Result<(ConnStats, Duration, bool)> {
    let connections = connections.clamp(1, plan.total().max(1));
    let depth = depth.max(1);
    let mut clients = Vec::with_capacity(connections);
    // Connecting and logging in are not measured.
    for _ in 0..connections {
        clients.push(conf.connect()?);
    }
    let barrier = Arc::new(Barrier::new(connections + 1));
    // Connections are up: the time limit counts from here (thread start-up is microseconds).
    let work = Arc::new(Dispenser {
        next: AtomicUsize::new(0),
        total: plan.total(),
        deadline: Instant::now() + time_limit,
        cut: AtomicBool::new(false),
    });
    let mut handles = Vec::new();
    for (k, mut client) in clients.into_iter().enumerate() {
        let conf = conf.clone();
        let barrier = Arc::clone(&barrier);
        let work = Arc::clone(&work);
        handles.push(
            std::thread::Builder::new()
                .name(format!("conn-{k}"))
                .spawn(move || -> Result<ConnStats> {
                    barrier.wait();
                    let seed = 0x9E37_79B9_7F4A_7C15u64.wrapping_mul(k as u64 + 1);
                    let stats = run_connection(&mut client, &conf, plan, depth, &work, seed)?;
                    let _ = client.logout();
                    Ok(stats)
                })?,
        );
    }
    barrier.wait();
    let start = Instant::now();
    let mut total = ConnStats::default();
    let mut failed = None;
    for h in handles {
        match h.join() {
            Ok(Ok(s)) => total.merge(s),
            Ok(Err(e)) => {
                failed.get_or_insert(format!("{e:#}"));
            }
            Err(_) => {
                failed.get_or_insert("a connection thread panicked".into());
            }
        }
    }
    let elapsed = start.elapsed();
    let complete = failed.is_none() && !work.cut.load(Ordering::Relaxed);
    if let Some(e) = failed {
        total.errors += 1;
        total.first_error = Some(e);
    }
    Ok((total, elapsed, complete))
}

fn pipelined_summary(
    workload: &'static str,
    unit: &'static str,
    unit_lat_name: &'static str,
    (stats, elapsed, complete): (ConnStats, Duration, bool),
) -> Summary {
    let mut latencies = vec![(unit_lat_name, Lat::of_nanos(stats.unit_lat))];
    let mut ops: Vec<_> = stats.op_lat.into_iter().collect();
    ops.sort_by_key(|(k, _)| *k);
    for (k, v) in ops {
        if k != unit_lat_name {
            latencies.push((k, Lat::of_nanos(v)));
        }
    }
    let mut extra = serde_json::Map::new();
    if workload == "find" {
        extra.insert("hits".into(), json!(stats.hits));
        extra.insert("misses".into(), json!(stats.misses));
    }
    Summary {
        workload,
        count: stats.units,
        elapsed,
        throughput: stats.units as f64 / elapsed.as_secs_f64().max(1e-9),
        unit,
        latencies,
        errors: stats.errors,
        first_error: stats.first_error,
        complete,
        extra,
    }
}

// ------------------------------------------------------------------------------------------
// dumps

fn list_workload(conf: &Conf, repeat: usize, deadline: Instant) -> Result<Summary> {
    let mut client = conf.connect()?;
    let mut times = Vec::new();
    let mut records = 0;
    let mut complete = true;
    for _ in 0..repeat.max(1) {
        if Instant::now() >= deadline {
            complete = false;
            break;
        }
        let t0 = Instant::now();
        records = client.list_ref(None, |_| {})?;
        times.push(nanos(t0.elapsed()));
    }
    let _ = client.logout();
    Ok(dump_summary("list", records, times, complete))
}

fn update_sync_workload(conf: &Conf, repeat: usize, deadline: Instant) -> Result<Summary> {
    let mut times = Vec::new();
    let mut records = 0;
    let mut complete = true;
    for _ in 0..repeat.max(1) {
        if Instant::now() >= deadline {
            complete = false;
            break;
        }
        let mut client = conf.connect()?;
        let t0 = Instant::now();
        records = client.update_ref(&[], |_| {})?;
        times.push(nanos(t0.elapsed()));
        let _ = client.logout();
    }
    Ok(dump_summary("update-sync", records, times, complete))
}

fn dump_summary(
    workload: &'static str,
    records: usize,
    times: Vec<u64>,
    complete: bool,
) -> Summary {
    let total: u64 = times.iter().sum();
    let lat = Lat::of_nanos(times);
    let mut extra = serde_json::Map::new();
    extra.insert("runs".into(), json!(lat.count));
    Summary {
        workload,
        count: records as u64,
        elapsed: Duration::from_nanos(total),
        // Records per second of the median run.
        throughput: records as f64 / (lat.p50 / 1e3).max(1e-9),
        unit: "records/s",
        latencies: vec![("run", lat)],
        errors: 0,
        first_error: None,
        complete,
        extra,
    }
}

// ------------------------------------------------------------------------------------------
// propagation

fn propagation_workload(
    conf: &Conf,
    changes: usize,
    interval: Duration,
    settle: Duration,
    deadline: Instant,
) -> Result<Summary> {
    let mut subscriber = conf.connect()?;
    let dump = subscriber.update(&[], |_| {})?;
    let mut writer = conf.connect()?;
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel::<(Vec<u8>, Instant)>();
    let prefix = conf.prefix.clone().into_bytes();
    let reader = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || -> Result<()> {
            while !stop.load(Ordering::Relaxed) {
                let update = subscriber.poll_update(Duration::from_millis(100))?;
                if let Some(Update::Mailbox(r)) = update {
                    // Stamp at once: this is the arrival time the latency is measured to.
                    let at = Instant::now();
                    if r.name.starts_with(&prefix) && tx.send((r.name, at)).is_err() {
                        break;
                    }
                }
            }
            let _ = subscriber.logout();
            Ok(())
        })
    };
    let mut acked: HashMap<Vec<u8>, Instant> = HashMap::new();
    let mut write_lat = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    let start = Instant::now();
    let mut complete = true;
    for k in 0..changes {
        let due = start + interval * k as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        if Instant::now() >= deadline {
            complete = false;
            break;
        }
        let name = conf.name(k);
        let t0 = Instant::now();
        match writer.activate(&name, &conf.location, &conf.acl) {
            Ok(()) => {
                let ok = Instant::now();
                write_lat.push(nanos(ok - t0));
                acked.insert(name.into_bytes(), ok);
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    let _ = writer.logout();
    // Collect arrivals until every acknowledged change was seen or the settle time is over.
    let mut seen: HashMap<Vec<u8>, Instant> = HashMap::new();
    let settle_end = (Instant::now() + settle).min(deadline.max(Instant::now()));
    while acked.keys().any(|k| !seen.contains_key(k)) {
        let now = Instant::now();
        if now >= settle_end {
            break;
        }
        match rx.recv_timeout(settle_end - now) {
            Ok((name, at)) => {
                seen.entry(name).or_insert(at);
            }
            Err(_) => break,
        }
    }
    stop.store(true, Ordering::Relaxed);
    match reader.join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            errors += 1;
            first_error.get_or_insert(format!("subscriber: {e:#}"));
        }
        Err(_) => bail!("subscriber thread panicked"),
    }
    while let Ok((name, at)) = rx.try_recv() {
        seen.entry(name).or_insert(at);
    }
    let mut lat = Vec::new();
    let mut early = 0;
    for (name, ok) in &acked {
        if let Some(at) = seen.get(name) {
            // The subscriber may get the line a hair before the writer's OK is read: both
            // follow the same commit. Count those as zero.
            match at.checked_duration_since(*ok) {
                Some(d) => lat.push(nanos(d)),
                None => {
                    early += 1;
                    lat.push(0);
                }
            }
        }
    }
    let missing = acked.len() - lat.len();
    if missing > 0 {
        complete = false;
        errors += missing as u64;
        first_error.get_or_insert(format!(
            "{missing} changes not seen by the subscriber within {settle:?}"
        ));
    }
    let mut extra = serde_json::Map::new();
    extra.insert("initial_dump".into(), json!(dump));
    extra.insert("seen_before_writer_ok".into(), json!(early));
    extra.insert("missing".into(), json!(missing));
    let seen_count = lat.len() as u64;
    let elapsed = start.elapsed();
    Ok(Summary {
        workload: "propagation",
        count: seen_count,
        elapsed,
        throughput: seen_count as f64 / elapsed.as_secs_f64().max(1e-9),
        unit: "changes/s",
        latencies: vec![
            ("propagation", Lat::of_nanos(lat)),
            ("activate", Lat::of_nanos(write_lat)),
        ],
        errors,
        first_error,
        complete,
        extra,
    })
}

// ------------------------------------------------------------------------------------------

fn read_password(args: &Args) -> Result<String> {
    if let Some(p) = &args.password {
        return Ok(p.clone());
    }
    if let Some(path) = &args.password_file {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let line = text.lines().next().unwrap_or("");
        if line.is_empty() {
            bail!("{} holds no password", path.display());
        }
        return Ok(line.to_string());
    }
    bail!("give --password, --password-file or MUPDATE_PASSWORD")
}

fn default_prefix() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!("user.bench{}x{}.", std::process::id(), t % 1_000_000_000)
}

fn run(args: &Args) -> Result<Value> {
    let conf = Conf {
        server: args.server.clone(),
        user: args.user.clone(),
        password: read_password(args)?,
        prefix: args.prefix.clone().unwrap_or_else(default_prefix),
        location: args.location.clone(),
        // `\t` in --acl stands for a TAB: Cyrus ACL text is `id TAB rights TAB …`.
        acl: args
            .acl
            .as_ref()
            .map(|a| a.replace("\\t", "\t"))
            .unwrap_or_else(|| format!("{}\tlrswipkxtecda\t", args.user)),
        io_timeout: Duration::from_secs(args.io_timeout.max(1)),
    };
    let limit = Duration::from_secs(args.time_limit.max(1));
    // Check the server and credentials once, and keep the banner for the report.
    let probe = conf.connect()?;
    let greeting = String::from_utf8_lossy(&probe.banner().greeting).into_owned();
    let _ = probe.logout();
    let mut report = json!({
        "server": args.server,
        "label": args.label,
        "banner": greeting,
        "prefix": conf.prefix,
        "workload": args.workload.name(),
        "connections": args.connections,
        "pipeline": args.pipeline,
    });
    let mut human = Vec::new();
    writeln!(
        human,
        "server {} {}({greeting})",
        args.server,
        args.label
            .as_ref()
            .map(|l| format!("[{l}] "))
            .unwrap_or_default()
    )?;
    if args.populate > 0 {
        let plan = Plan::Create {
            base: 0,
            total: args.populate,
            reserve_first: false,
        };
        let r = run_pipelined(
            &conf,
            plan,
            args.populate_connections,
            args.populate_pipeline,
            limit,
        )?;
        let s = pipelined_summary("populate", "mailboxes/s", "mailbox", r);
        s.print(&mut human)?;
        report["populate"] = s.json();
    }
    let summary = match args.workload {
        Workload::None => None,
        Workload::Write => {
            let plan = Plan::Create {
                base: args.populate,
                total: args.mailboxes,
                reserve_first: true,
            };
            let r = run_pipelined(&conf, plan, args.connections, args.pipeline, limit)?;
            Some(pipelined_summary("write", "mailboxes/s", "mailbox", r))
        }
        Workload::Find => {
            let existing = args
                .existing
                .unwrap_or(if args.populate > 0 {
                    args.populate
                } else {
                    args.mailboxes
                })
                .max(1);
            let plan = Plan::Find {
                total: args.ops,
                existing,
            };
            let r = run_pipelined(&conf, plan, args.connections, args.pipeline, limit)?;
            Some(pipelined_summary("find", "ops/s", "find", r))
        }
        Workload::List => Some(list_workload(&conf, args.repeat, Instant::now() + limit)?),
        Workload::UpdateSync => Some(update_sync_workload(
            &conf,
            args.repeat,
            Instant::now() + limit,
        )?),
        Workload::Propagation => Some(propagation_workload(
            &conf,
            args.changes,
            Duration::from_millis(args.interval_ms),
            Duration::from_secs(args.settle_secs),
            Instant::now() + limit,
        )?),
    };
    if let Some(s) = summary {
        s.print(&mut human)?;
        report["result"] = s.json();
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        std::io::stdout().write_all(&human)?;
    }
    Ok(report)
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(report) => {
            let failed = ["populate", "result"].iter().any(|k| {
                report
                    .get(k)
                    .is_some_and(|r| r["complete"] == Value::Bool(false))
            });
            if failed {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            if let Some(ClientError::No(text)) = e.downcast_ref::<ClientError>() {
                eprintln!("mupdate-bench: refused: {text}");
            }
            eprintln!("mupdate-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}
