//! `mboxlist`: read and write Cyrus `mailboxes.db` files and `ctl_mboxlist` dumps byte for
//! byte, for migrations to and from the mupdate master.
//!
//! stdout carries only dump or listing bytes; every message goes to stderr. Exit codes: 0
//! success, 1 a difference or inconsistency was found, 2 usage or I/O error (clap's usage
//! errors included).

use std::io::{self, BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use mupdate::cyrus::db::{self, Backend, DbReader, ReadOptions, WriteOptions};
use mupdate::cyrus::dump::{self, DumpOptions, DumpWriter, MtimePolicy};
use mupdate::cyrus::entry::{self, EntryError, KeyKind, Layout};

// The verbs that work on the master's store and over MUPDATE (import, export, diff, push).
#[path = "mboxlist/diff.rs"]
mod diff;
#[path = "mboxlist/migrate.rs"]
mod migrate;
#[path = "mboxlist/push.rs"]
mod push;

#[derive(Parser)]
#[command(
    name = "mboxlist",
    version,
    about = "Cyrus mailboxes.db and ctl_mboxlist dump tools (byte-exact with Cyrus 3.6.1)"
)]
struct Cli {
    /// No progress display and no warnings on stderr (errors are still printed).
    #[arg(long, short = 'q', global = true)]
    quiet: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print FILE as Cyrus 3.6.1 `ctl_mboxlist -d [-y]` would (same order, same bytes).
    Dump {
        /// Include intermediate mailboxes (`ctl_mboxlist -d -y`).
        #[arg(short = 'y')]
        intermediates: bool,
        /// Only mailboxes on this partition (`-p`).
        #[arg(short = 'p', long)]
        partition: Option<String>,
        /// Print the 2.3.10–3.4 tab-separated form (`name TAB mbtype [server!]partition acl`,
        /// mbtype in 3.4 bits) instead of JSON.
        #[arg(long)]
        legacy: bool,
        /// Backend of FILE (default: detected).
        #[arg(long)]
        backend: Option<Backend>,
        file: PathBuf,
    },
    /// Print every record of FILE as `cyr_dbtool FILE BACKEND batch` prints `SHOW ""`.
    Kv {
        /// Backend of FILE (default: detected).
        #[arg(long)]
        backend: Option<Backend>,
        file: PathBuf,
    },
    /// Build a new mailboxes.db OUT from a dump on stdin, like `ctl_mboxlist -u [-L]`:
    /// 3.x JSON, 3.5-dev lines with -L, or 2.x/3.4 `-d` lines (bits translated to 3.6).
    /// Memory stays constant: the dump is read in passes (a pipe is first copied to a
    /// temporary file) and the records are sorted through temporary files, in TMPDIR.
    Undump {
        /// Read 3.5-dev `-d` lines (`ctl_mboxlist -u -L`, numbers in 3.6 bits).
        #[arg(short = 'L')]
        legacy: bool,
        /// Backend of OUT.
        #[arg(long)]
        backend: Backend,
        /// Replace OUT if it exists.
        #[arg(long)]
        force: bool,
        /// Give every record the current time as mtime, as Cyrus does (default: keep the
        /// dump's mtime so that dumping OUT reproduces the input).
        #[arg(long)]
        mtime_now: bool,
        /// The time (seconds since the epoch) to use as "now", for reproducible files.
        #[arg(long, value_name = "SECONDS")]
        now: Option<i64>,
        out: PathBuf,
    },
    /// Copy IN to a new OUT in another backend (like `cvt_cyrusdb`), recovering IN as Cyrus
    /// would if it was not closed cleanly.
    Convert {
        input: PathBuf,
        out: PathBuf,
        /// Backend of OUT.
        #[arg(long)]
        backend: Backend,
        /// Replace OUT if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Check FILE like `cyr_dbtool FILE BACKEND consistent`; exit 1 if it is not consistent.
    Check {
        file: PathBuf,
        /// Backend of FILE (default: detected).
        #[arg(long)]
        backend: Option<Backend>,
        /// Write the records Cyrus would recover to a new file OUT (same backend).
        #[arg(long, value_name = "OUT")]
        repair: Option<PathBuf>,
        /// Replace the --repair target if it exists.
        #[arg(long, requires = "repair")]
        force: bool,
    },
    /// Load a mailboxes.db (any backend) or a dump into the master's store (a new or empty
    /// `mupdated` data directory), keeping every Cyrus field and record.
    Import(migrate::ImportArgs),
    /// Write the master's store as a new mailboxes.db (or with --dump as `ctl_mboxlist -d`
    /// JSON): the rollback path to Cyrus.
    Export(migrate::ExportArgs),
    /// Compare two mailbox lists (files, dumps or mupdate:// masters) as MUPDATE shows them;
    /// exit 1 when they differ.
    Diff(diff::DiffArgs),
    /// Push a backend's mailbox list to the master, like `ctl_mboxlist -m`.
    Push(push::PushArgs),
}

/// How a command ended, when not with success.
enum Failure {
    /// Exit 1: a difference or inconsistency (already reported).
    Found,
    /// Exit 2: usage or I/O.
    Error(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Error(e)
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let ui = Ui { quiet: cli.quiet };
    match run(cli.cmd, &ui) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Found) => ExitCode::from(1),
        Err(Failure::Error(e)) => {
            if is_broken_pipe(&e) {
                return ExitCode::from(2);
            }
            eprintln!("mboxlist: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe)
    })
}

/// Messages and progress on stderr.
struct Ui {
    quiet: bool,
}

impl Ui {
    fn warn(&self, msg: impl std::fmt::Display) {
        if !self.quiet {
            eprintln!("mboxlist: {msg}");
        }
    }

    /// A spinner with a record count, only when stderr is a terminal.
    fn progress(&self, what: &'static str) -> Progress {
        if self.quiet || !io::stderr().is_terminal() {
            return Progress(None);
        }
        let pb = ProgressBar::new_spinner();
        pb.set_style(
            ProgressStyle::with_template("{spinner} {msg} {pos} records ({per_sec})")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        pb.set_message(what);
        pb.enable_steady_tick(Duration::from_millis(200));
        Progress(Some(pb))
    }
}

struct Progress(Option<ProgressBar>);

impl Progress {
    /// Cheap enough to call per record: the bar is touched every 4096 records.
    fn tick(&self, n: u64) {
        if let Some(pb) = &self.0 {
            if n % 4096 == 0 {
                pb.set_position(n);
            }
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(pb) = &self.0 {
            pb.finish_and_clear();
        }
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn open(path: &Path, backend: Option<Backend>) -> Result<DbReader> {
    db::open_with(path, backend, &ReadOptions::default())
        .with_context(|| format!("cannot read {}", path.display()))
}

fn run(cmd: Cmd, ui: &Ui) -> Result<(), Failure> {
    match cmd {
        Cmd::Import(a) => migrate::import(ui, a)?,
        Cmd::Export(a) => migrate::export(ui, a)?,
        Cmd::Diff(a) => {
            if diff::diff(ui, a)? {
                return Err(Failure::Found);
            }
        }
        Cmd::Push(a) => push::push(ui, a)?,
        Cmd::Dump {
            intermediates,
            partition,
            legacy,
            backend,
            file,
        } => cmd_dump(ui, &file, backend, intermediates, partition, legacy)?,
        Cmd::Kv { backend, file } => {
            let mut reader = open(&file, backend)?;
            report_recovery(ui, &file, &reader);
            let stdout = io::stdout().lock();
            let mut out = BufWriter::with_capacity(1 << 16, stdout);
            db::kv_listing(&mut reader, &mut out)
                .with_context(|| format!("cannot list {}", file.display()))?;
            out.flush().context("writing stdout")?;
        }
        Cmd::Undump {
            legacy,
            backend,
            force,
            mtime_now,
            now: at,
            out,
        } => cmd_undump(
            ui,
            legacy,
            backend,
            force,
            mtime_now,
            at.unwrap_or_else(now),
            &out,
        )?,
        Cmd::Convert {
            input,
            out,
            backend,
            force,
        } => {
            let opts = WriteOptions {
                overwrite: force,
                ..WriteOptions::default()
            };
            let stats =
                db::copy_recovered(&input, &out, Some(backend), &ReadOptions::default(), &opts)
                    .with_context(|| {
                        format!("cannot convert {} to {}", input.display(), out.display())
                    })?;
            ui.warn(format_args!(
                "wrote {} records ({} bytes) to {} as {backend}",
                stats.records,
                stats.bytes,
                out.display()
            ));
        }
        Cmd::Check {
            file,
            backend,
            repair,
            force,
        } => {
            let report = db::check_with(&file, backend, &ReadOptions::default())
                .with_context(|| format!("cannot check {}", file.display()))?;
            eprintln!(
                "{}: {} database, {} records",
                file.display(),
                report.backend,
                report.records
            );
            match &report.recovery {
                db::Recovery::None => {}
                db::Recovery::Ignored(why) | db::Recovery::Replayed(why) => {
                    eprintln!("{}: opening it runs recovery: {why}", file.display())
                }
            }
            for p in &report.problems {
                match p.offset {
                    Some(off) => eprintln!(
                        "{}: at offset {off} (0x{off:X}): {}",
                        file.display(),
                        p.what
                    ),
                    None => eprintln!("{}: {}", file.display(), p.what),
                }
            }
            if let Some(out) = repair {
                let opts = WriteOptions {
                    overwrite: force,
                    ..WriteOptions::default()
                };
                let stats =
                    db::copy_recovered(&file, &out, backend, &ReadOptions::default(), &opts)
                        .with_context(|| format!("cannot write {}", out.display()))?;
                eprintln!(
                    "wrote {} recovered records to {}",
                    stats.records,
                    out.display()
                );
            }
            if report.is_consistent() {
                eprintln!("Yes, consistent");
            } else {
                eprintln!("No, not consistent");
                return Err(Failure::Found);
            }
        }
    }
    Ok(())
}

fn report_recovery(ui: &Ui, file: &Path, reader: &DbReader) {
    match reader.recovery() {
        db::Recovery::None => {}
        db::Recovery::Ignored(why) | db::Recovery::Replayed(why) => ui.warn(format_args!(
            "{}: not closed cleanly; reading it as Cyrus recovers it ({why})",
            file.display()
        )),
    }
}

fn cmd_dump(
    ui: &Ui,
    file: &Path,
    backend: Option<Backend>,
    intermediates: bool,
    partition: Option<String>,
    legacy: bool,
) -> Result<()> {
    let mut reader = open(file, backend)?;
    report_recovery(ui, file, &reader);
    let progress = ui.progress("dumping");
    let stdout = io::stdout().lock();
    let out = BufWriter::with_capacity(1 << 16, stdout);
    let opts = DumpOptions {
        intermediates,
        partition: partition.map(String::into_bytes),
    };
    let (n, layout);
    if legacy {
        let mut out = out;
        let mut line = Vec::with_capacity(512);
        (n, layout) = for_each_n_record(&mut reader, &progress, file, |k, v| {
            let KeyKind::Name(dbname) = entry::key_kind(k) else {
                return Ok(());
            };
            let e = match entry::parse_entry(Some(dbname), v) {
                Ok(e) => e,
                Err(EntryError::BadFormat(_)) => return Ok(()),
                Err(err) => bail!("{}: record {:?}: {err}", file.display(), show(k)),
            };
            if e.mbtype & entry::mbtype::INTERMEDIATE != 0 && !opts.intermediates {
                return Ok(());
            }
            if let Some(p) = &opts.partition {
                if e.partition.as_deref() != Some(p.as_slice()) {
                    return Ok(());
                }
            }
            line.clear();
            match dump::write_legacy_line(&mut line, &e) {
                Ok(()) => out.write_all(&line).context("writing stdout")?,
                // A sieve or JMAP-notify mailbox has no pre-3.6 form: leave it out, loudly.
                Err(EntryError::Unrepresentable(why)) => {
                    ui.warn(format_args!("{}: left out: {why}", show(&e.name)))
                }
                Err(err) => bail!("{}: record {:?}: {err}", file.display(), show(k)),
            }
            Ok(())
        })?;
        out.into_inner()
            .map_err(|e| e.into_error())
            .context("writing stdout")?
            .flush()
            .context("writing stdout")?;
    } else {
        let mut w = DumpWriter::new(out, opts).context("writing stdout")?;
        (n, layout) = for_each_n_record(&mut reader, &progress, file, |k, v| {
            w.record(k, v)
                .with_context(|| format!("cannot dump {}", file.display()))
        })?;
        let (out, stats) = w.finish().context("writing stdout")?;
        out.into_inner()
            .map_err(|e| e.into_error())
            .context("writing stdout")?
            .flush()
            .context("writing stdout")?;
        if stats.unreadable > 0 {
            ui.warn(format_args!(
                "{}: {} unreadable N records skipped, as ctl_mboxlist -d skips them",
                file.display(),
                stats.unreadable
            ));
        }
    }
    drop(progress);
    // No decisive key at all also means "upgrade" to Cyrus, but an empty file is just empty.
    if layout == Some(Layout::Legacy) || (layout.is_none() && n > 0) {
        ui.warn(format_args!(
            "{}: this is a pre-3.6 mailboxes.db (intname keys); Cyrus 3.6 `ctl_mboxlist -d` \
             shows only its keys that start with N, and so does this dump",
            file.display()
        ));
    }
    Ok(())
}

/// Feeds `f` the records `ctl_mboxlist -d` reads (`mboxlist_allmbox` iterates the `N` keys)
/// and returns how many records were read and the layout Cyrus' upgrade check sees
/// ([`entry::detect_step`] over the records from the start until one decides). Once the
/// layout is decided, the reader skips to the first `N` key along the skip-list pointers
/// (like Cyrus' `foreach` with a prefix) and stops after the last one, so the `I`, `A` and
/// other records around them are not read; where it cannot seek (skiplist, flat) it reads
/// up to them instead.
fn for_each_n_record(
    reader: &mut DbReader,
    progress: &Progress,
    file: &Path,
    mut f: impl FnMut(&[u8], &[u8]) -> Result<()>,
) -> Result<(u64, Option<Layout>)> {
    let ctx = |e: db::DbError| anyhow!(e).context(format!("cannot read {}", file.display()));
    let mut layout = None;
    let mut n = 0u64;
    let mut sought = false;
    // At or past the first `N` key: the next key without `N` ends the range.
    let mut in_range = false;
    while let Some((k, v)) = reader.next_record().map_err(ctx)? {
        n += 1;
        progress.tick(n);
        if layout.is_none() {
            layout = entry::detect_step(k, v);
        }
        if k.first() == Some(&b'N') {
            in_range = true;
            f(k, v)?;
        } else if layout.is_some() {
            if in_range {
                break;
            }
            if !sought {
                sought = true;
                in_range = reader.seek(b"N").map_err(ctx)?;
            }
        }
    }
    Ok((n, layout))
}

fn show(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Standard input as a file that can be read more than once: itself when it is a regular
/// file (from its current position), else a temporary copy.
fn seekable_stdin() -> io::Result<std::fs::File> {
    use std::os::fd::AsFd;
    let mut f = std::fs::File::from(io::stdin().as_fd().try_clone_to_owned()?);
    if f.metadata()?.is_file() {
        return Ok(f);
    }
    let mut t = dump::anonymous_temp_file()?;
    io::copy(&mut f, &mut t)?;
    io::Seek::rewind(&mut t)?;
    Ok(t)
}

fn cmd_undump(
    ui: &Ui,
    legacy: bool,
    backend: Backend,
    force: bool,
    mtime_now: bool,
    t: i64,
    out: &Path,
) -> Result<()> {
    if !force && out.exists() {
        bail!(
            "{} exists; undump writes a new file (use --force to replace it)",
            out.display()
        );
    }
    let policy = if mtime_now {
        MtimePolicy::Fixed(t)
    } else {
        MtimePolicy::FromDump { fallback: t }
    };
    // The dump is read in passes and never held whole: a file on stdin is read in place, a
    // pipe is first copied to an anonymous temporary file.
    let input = seekable_stdin().context("cannot read standard input")?;
    let (records, stats) = dump::undump_stream(
        input,
        &dump::UndumpOptions {
            legacy_l: legacy,
            mtime: policy,
            order: backend.default_order(),
        },
        &mut |w| ui.warn(w),
    )
    .context("cannot undump standard input")?;
    let (stored, skipped) = (stats.stored, stats.skipped);
    let opts = WriteOptions {
        overwrite: force,
        ..WriteOptions::default()
    };
    let n = db::write(out, backend, records, &opts)
        .with_context(|| format!("cannot write {}", out.display()))?
        .records;
    ui.warn(format_args!(
        "{}: {stored} mailboxes stored ({n} records), {skipped} skipped",
        out.display()
    ));
    Ok(())
}
