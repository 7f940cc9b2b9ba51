//! `mboxlist import` and `mboxlist export`: a Cyrus `mailboxes.db` or dump into the master's
//! LMDB store, and the store back into a `mailboxes.db` or `ctl_mboxlist -d` dump (the
//! rollback path).
//!
//! What goes where (see `mupdate::cyrus::kept`):
//!
//! * every 3.6 name record (`N` key) that parses becomes a mailbox of the store, served as
//!   Cyrus's master reads it (reserved → RESERVE, tombstones and intermediates kept but not
//!   listed), with its Cyrus-only fields in `MailboxRecord::cyrus`;
//! * every other record (`I` uniqueid records, orphans included; `A` reverse-ACL keys; name
//!   records Cyrus could not read either; stray keys) is kept byte for byte in `cyrus_aux`;
//! * a pre-3.6 file (intname keys, 2.x text or 2.5–3.4 dlist values) is translated the way
//!   3.6's `ctl_cyrusdb -r` upgrade translates it: 3.6 type bits plus `l`, an `I` record for
//!   every entry with a uniqueid, `$RACL`/`$RUNQ` keys dropped; except that entries without a
//!   uniqueid are kept (the upgrade drops those whose `cyrus.header` it cannot open, which on
//!   a murder master is all of them).
//!
//! Export writes the union again, in the backend's order; a record imported and not written
//! since gets its original bytes, a record our master wrote is stored as Cyrus's master
//! stores it.

use std::collections::HashSet;
use std::fs;
use std::io::{self, BufRead, BufWriter};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, ValueEnum};
use mupdate::cyrus::db::{self, Backend, ReadOptions, WriteOptions};
use mupdate::cyrus::dump::{
    undump_stream, DumpOptions, DumpWriter, MtimePolicy, SortedRecords, UndumpOptions,
};
use mupdate::cyrus::entry::{self, KeyKind, Layout};
use mupdate::cyrus::kept::{self, ExportKind};
use mupdate::cyrus::mboxname;
use mupdate::store::lmdb::{LmdbOptions, LmdbStore, MAX_KEY_LEN};
use mupdate::store::{MailboxRecord, MailboxStore};

use super::{show, Ui};

/// Records per store transaction (and the most held in memory at once).
const BATCH: usize = 8192;

/// What a SOURCE file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SourceFormat {
    /// twoskip/skiplist by their magic; a JSON dump by its `{`; any other file is a flat db.
    Auto,
    /// A mailboxes.db (flat when it has no twoskip/skiplist magic).
    Db,
    /// A `ctl_mboxlist -d` dump: 3.x JSON, or 2.x/3.4 tab-separated lines.
    Dump,
    /// A 3.5-dev `-d` dump (`ctl_mboxlist -u -L` input, numbers in 3.6 bits).
    DumpL,
}

#[derive(Args)]
pub struct ImportArgs {
    /// The master's data directory (created if missing; `mupdated serve --data-dir DIR`).
    #[arg(long)]
    data_dir: PathBuf,
    /// A mailboxes.db (twoskip, skiplist or flat) or a `ctl_mboxlist -d` dump.
    source: PathBuf,
    /// Server of entries that are local in SOURCE (no server of their own), so that the master
    /// shows them at `NAME!partition`. Export drops it again.
    #[arg(long, value_name = "NAME")]
    servername: Option<String>,
    /// What SOURCE is.
    #[arg(long, value_enum, default_value_t = SourceFormat::Auto)]
    format: SourceFormat,
    /// Import into a store that already holds mailboxes: records with the same name (or, for
    /// Cyrus-only records, the same key) are replaced, all others are kept.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
pub struct ExportArgs {
    /// The master's data directory.
    #[arg(long)]
    data_dir: PathBuf,
    /// The file to write (a new mailboxes.db, or with --dump a `ctl_mboxlist -d` dump).
    out: PathBuf,
    /// Backend of OUT.
    #[arg(long, required_unless_present = "dump", conflicts_with = "dump")]
    backend: Option<Backend>,
    /// Write Cyrus 3.6 `ctl_mboxlist -d` JSON (the order a twoskip file has) instead of a db.
    #[arg(long)]
    dump: bool,
    /// With --dump: include intermediates (`ctl_mboxlist -d -y`).
    #[arg(short = 'y', requires = "dump")]
    intermediates: bool,
    /// Replace OUT if it exists.
    #[arg(long)]
    force: bool,
}

// ---------------------------------------------------------------------------------------
// Reading Cyrus sources.

/// One source record, classified.
pub enum Converted {
    /// A mailbox the master serves (or keeps hidden), under its internal name. `natural`
    /// is false for a 3.6 name record whose key is not the store key of its name (Cyrus's
    /// name quirks, hand-made keys): such a name may collide with another record's.
    Mailbox {
        name: Vec<u8>,
        rec: MailboxRecord,
        natural: bool,
    },
    /// A record kept only for export.
    Aux(Vec<u8>, Vec<u8>),
    /// A record that cannot be kept (said why).
    Dropped(String),
}

/// Turns raw records of one file into [`Converted`] ones.
pub struct Converter {
    pub layout: Layout,
    servername: Option<Vec<u8>>,
}

impl Converter {
    pub fn new(layout: Layout, servername: Option<&str>) -> Converter {
        Converter {
            layout,
            servername: servername.map(|s| s.as_bytes().to_vec()),
        }
    }

    /// Convert one record; `out` gets one or two results (a pre-3.6 entry with a uniqueid
    /// also yields its 3.6 `I` record).
    pub fn convert(&self, key: &[u8], value: &[u8], out: &mut Vec<Converted>) {
        let servername = self.servername.as_deref();
        match self.layout {
            Layout::V36 => match entry::key_kind(key) {
                KeyKind::Name(dbname) => match kept::import_n(dbname, value, servername) {
                    Ok((name, rec)) => {
                        let natural = mboxname::to_dbname(&name).is_ok_and(|k| k == dbname);
                        out.push(Converted::Mailbox { name, rec, natural })
                    }
                    Err(why) => {
                        out.push(Converted::Dropped(format!(
                            "name record {:?} is kept for export but not served: {why}",
                            show(key)
                        )));
                        out.push(Converted::Aux(key.to_vec(), value.to_vec()));
                    }
                },
                _ => out.push(Converted::Aux(key.to_vec(), value.to_vec())),
            },
            Layout::Legacy => {
                if key.starts_with(b"$") {
                    // `$RACL…`/`$RUNQ…`: the 3.6 upgrade discards them.
                    return;
                }
                let e = match entry::parse_legacy_value(key, value, true) {
                    Ok(e) => e,
                    Err(why) => {
                        out.push(Converted::Dropped(format!(
                            "pre-3.6 record {:?} not imported: {why}",
                            show(key)
                        )));
                        return;
                    }
                };
                let rec = match kept::import_entry(&e, servername) {
                    Ok(rec) => rec,
                    Err(why) => {
                        out.push(Converted::Dropped(format!(
                            "pre-3.6 record {:?} not imported: {why}",
                            show(key)
                        )));
                        return;
                    }
                };
                if let Some(uid) = &e.uniqueid {
                    let dbname = mboxname::to_dbname_cyrus(&e.name);
                    match entry::encode_i_value(&e, &dbname) {
                        Ok(v) => out.push(Converted::Aux(entry::i_key(uid), v)),
                        Err(why) => out.push(Converted::Dropped(format!(
                            "no I record for {:?}: {why}",
                            show(key)
                        ))),
                    }
                }
                out.push(Converted::Mailbox {
                    name: e.name.clone(),
                    rec,
                    natural: true,
                });
            }
        }
    }
}

/// Where the raw records come from.
pub enum Records {
    /// A mailboxes.db, streamed.
    Db(db::DbReader),
    /// A dump, as `ctl_mboxlist -u` would store it in an empty db, in raw key order
    /// (streamed: see `undump_stream`).
    Dump(SortedRecords),
}

impl Records {
    /// Calls `f` on every record in source order.
    pub fn for_each(&mut self, mut f: impl FnMut(&[u8], &[u8]) -> Result<()>) -> Result<()> {
        match self {
            Records::Db(r) => {
                while let Some((k, v)) = r.next_record()? {
                    f(k, v)?;
                }
            }
            Records::Dump(it) => {
                for r in it {
                    let (k, v) = r.context("reading the sorted dump records back")?;
                    f(&k, &v)?;
                }
            }
        }
        Ok(())
    }
}

/// An opened source: its records and their layout.
pub struct Source {
    pub records: Records,
    pub layout: Layout,
    pub what: &'static str,
}

fn looks_like_json(path: &Path) -> Result<bool> {
    let f = fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut r = io::BufReader::new(f);
    loop {
        let buf = r
            .fill_buf()
            .with_context(|| format!("cannot read {}", path.display()))?;
        if buf.is_empty() {
            return Ok(false);
        }
        match buf.iter().position(|b| !b.is_ascii_whitespace()) {
            Some(i) => return Ok(matches!(buf[i], b'{' | b'[')),
            None => {
                let n = buf.len();
                r.consume(n);
            }
        }
    }
}

/// Open SOURCE as `format` says (auto-detecting when asked).
pub fn open_source(ui: &Ui, path: &Path, format: SourceFormat) -> Result<Source> {
    let format = match format {
        SourceFormat::Auto => match db::detect(path) {
            Ok(_) => SourceFormat::Db,
            Err(_) if looks_like_json(path)? => SourceFormat::Dump,
            Err(_) => SourceFormat::Db,
        },
        f => f,
    };
    match format {
        SourceFormat::Db => {
            let backend = db::detect(path).unwrap_or(Backend::Flat);
            let layout = detect_layout(path, backend)?;
            let reader = db::open_with(path, Some(backend), &ReadOptions::default())
                .with_context(|| format!("cannot read {}", path.display()))?;
            match reader.recovery() {
                db::Recovery::None => {}
                db::Recovery::Ignored(why) | db::Recovery::Replayed(why) => ui.warn(format_args!(
                    "{}: not closed cleanly; reading it as Cyrus recovers it ({why})",
                    path.display()
                )),
            }
            if layout == Layout::Legacy {
                ui.warn(format_args!(
                    "{}: a pre-3.6 mailboxes.db; translating it as Cyrus 3.6's upgrade does",
                    path.display()
                ));
            }
            Ok(Source {
                records: Records::Db(reader),
                layout,
                what: backend.name(),
            })
        }
        SourceFormat::Dump | SourceFormat::DumpL | SourceFormat::Auto => {
            let f =
                fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
            // Streamed (`undump_stream`): read in passes, records sorted through temporary
            // files; memory does not grow with the number of entries.
            let opts = UndumpOptions {
                legacy_l: format == SourceFormat::DumpL,
                // As `undump`: entries without an mtime get the current time (Cyrus gives
                // every entry the current time).
                mtime: MtimePolicy::FromDump {
                    fallback: std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs() as i64),
                },
                order: db::Order::Raw,
            };
            let (records, _) = undump_stream(f, &opts, &mut |w| {
                ui.warn(format_args!("{}: {w}", path.display()))
            })
            .with_context(|| format!("cannot read the dump {}", path.display()))?;
            Ok(Source {
                records: Records::Dump(records),
                layout: Layout::V36,
                what: "dump",
            })
        }
    }
}

/// 3.6's own decision (`_check_rec_cb`): the first decisive key; none at all in a non-empty
/// file means "pre-3.6".
fn detect_layout(path: &Path, backend: Backend) -> Result<Layout> {
    let mut r = db::open_with(path, Some(backend), &ReadOptions::default())
        .with_context(|| format!("cannot read {}", path.display()))?;
    let mut any = false;
    while let Some((k, v)) = r.next_record()? {
        any = true;
        if let Some(l) = entry::detect_step(k, v) {
            return Ok(l);
        }
    }
    Ok(if any { Layout::Legacy } else { Layout::V36 })
}

// ---------------------------------------------------------------------------------------
// import

fn open_store(dir: &Path, create: bool) -> Result<Arc<LmdbStore>> {
    if !dir.join("data.mdb").exists() {
        if !create {
            bail!("{} holds no mupdate store (no data.mdb)", dir.display());
        }
        if let Ok(mut entries) = fs::read_dir(dir) {
            if entries.next().is_some() {
                bail!(
                    "{} is not empty and holds no mupdate store; give an empty or new directory",
                    dir.display()
                );
            }
        }
    }
    LmdbStore::open(dir, LmdbOptions::default())
        .with_context(|| format!("cannot open the store in {}", dir.display()))
}

fn store_is_empty(store: &LmdbStore) -> Result<bool> {
    let mut any = false;
    store.scan_all(&mut |_, _| {
        any = true;
        ControlFlow::Break(())
    })?;
    store.aux_scan(b"", &mut |_, _| {
        any = true;
        ControlFlow::Break(())
    })?;
    Ok(!any)
}

#[derive(Default)]
struct ImportStats {
    mailboxes: u64,
    hidden: u64,
    reserved: u64,
    aux: u64,
    dropped: u64,
}

/// A name record held back: (raw key, raw value, name, record).
type Deferred = (Vec<u8>, Vec<u8>, Vec<u8>, MailboxRecord);

/// Buffers of one import.
struct Importer<'a> {
    store: &'a LmdbStore,
    ui: &'a Ui,
    batch: Vec<(Vec<u8>, MailboxRecord)>,
    aux: Vec<(Vec<u8>, Vec<u8>)>,
    /// Name records whose name's store key is not their Cyrus key: they could collide with
    /// another record's name, so they are written last and only if the name is still free.
    deferred: Vec<Deferred>,
    stats: ImportStats,
}

impl Importer<'_> {
    fn add(&mut self, c: Converted, raw: (&[u8], &[u8])) -> Result<()> {
        match c {
            Converted::Mailbox { name, rec, natural } => {
                if !natural {
                    self.deferred
                        .push((raw.0.to_vec(), raw.1.to_vec(), name, rec));
                    return Ok(());
                }
                self.count(&rec);
                self.batch.push((name, rec));
                if self.batch.len() >= BATCH {
                    self.flush_mailboxes()?;
                }
            }
            Converted::Aux(k, v) => self.add_aux(k, v)?,
            Converted::Dropped(why) => {
                self.stats.dropped += 1;
                self.ui.warn(why);
            }
        }
        Ok(())
    }

    fn count(&mut self, rec: &MailboxRecord) {
        self.stats.mailboxes += 1;
        if !rec.is_listed() {
            self.stats.hidden += 1;
        } else if rec.is_reserved() {
            self.stats.reserved += 1;
        }
    }

    fn add_aux(&mut self, k: Vec<u8>, v: Vec<u8>) -> Result<()> {
        if k.is_empty() || k.len() > MAX_KEY_LEN {
            self.stats.dropped += 1;
            self.ui.warn(format_args!(
                "record {:?} ({} bytes of key) cannot be kept: the store holds keys of 1 to \
                 {MAX_KEY_LEN} bytes",
                show(&k[..k.len().min(64)]),
                k.len()
            ));
            return Ok(());
        }
        self.stats.aux += 1;
        self.aux.push((k, v));
        if self.aux.len() >= BATCH {
            self.flush_aux()?;
        }
        Ok(())
    }

    fn flush_mailboxes(&mut self) -> Result<()> {
        if !self.batch.is_empty() {
            let batch = std::mem::take(&mut self.batch);
            self.store
                .import_batch(batch)
                .context("writing mailboxes to the store")?;
        }
        Ok(())
    }

    fn flush_aux(&mut self) -> Result<()> {
        if !self.aux.is_empty() {
            let aux = std::mem::take(&mut self.aux);
            self.store
                .aux_put_batch(aux)
                .context("writing Cyrus records to the store")?;
        }
        Ok(())
    }

    fn finish(mut self) -> Result<ImportStats> {
        self.flush_mailboxes()?;
        let mut seen = HashSet::new();
        for (key, value, name, rec) in std::mem::take(&mut self.deferred) {
            let taken = !seen.insert(name.clone()) || self.store.get(&name)?.is_some();
            if taken {
                self.ui.warn(format_args!(
                    "name record {:?} has the same mailbox name as another ({:?}); kept for \
                     export but not served",
                    show(&key),
                    show(&name)
                ));
                self.stats.dropped += 1;
                self.add_aux(key, value)?;
            } else {
                self.count(&rec);
                self.batch.push((name, rec));
            }
        }
        self.flush_mailboxes()?;
        self.flush_aux()?;
        Ok(self.stats)
    }
}

pub fn import(ui: &Ui, a: ImportArgs) -> Result<()> {
    if let Some(s) = &a.servername {
        if s.is_empty() || s.contains('!') {
            bail!("--servername must be a non-empty name without '!'");
        }
    }
    let mut source = open_source(ui, &a.source, a.format)?;
    let store = open_store(&a.data_dir, true)?;
    if !a.force && !store_is_empty(&store)? {
        bail!(
            "the store in {} already holds mailboxes; use --force to import into it anyway \
             (same names are replaced, others kept)",
            a.data_dir.display()
        );
    }
    let conv = Converter::new(source.layout, a.servername.as_deref());
    let progress = ui.progress("importing");
    let mut imp = Importer {
        store: &store,
        ui,
        batch: Vec::with_capacity(BATCH),
        aux: Vec::new(),
        deferred: Vec::new(),
        stats: ImportStats::default(),
    };
    let mut out = Vec::with_capacity(2);
    let mut n = 0u64;
    source
        .records
        .for_each(|k, v| {
            n += 1;
            progress.tick(n);
            conv.convert(k, v, &mut out);
            for c in out.drain(..) {
                imp.add(c, (k, v))?;
            }
            Ok(())
        })
        .with_context(|| format!("cannot import {}", a.source.display()))?;
    let stats = imp.finish()?;
    drop(progress);
    store.shutdown();
    ui.warn(format_args!(
        "{}: {n} records ({}) → {} mailboxes ({} reserved, {} deleted or intermediate, not \
         listed), {} Cyrus-only records kept, {} not imported",
        a.source.display(),
        source.what,
        stats.mailboxes,
        stats.reserved,
        stats.hidden,
        stats.aux,
        stats.dropped
    ));
    Ok(())
}

// ---------------------------------------------------------------------------------------
// export

/// One record on its way out, with what decides between two records under the same key.
struct Out {
    key: Vec<u8>,
    value: Vec<u8>,
    /// 2 = a mailbox, 1 = a kept Cyrus record; a mailbox wins, then the later revision.
    rank: (u8, u64),
    /// For messages.
    name: Vec<u8>,
}

/// Runs a store scan on its own thread and hands its items over through a bounded channel.
fn scan_thread<T: Send + 'static>(
    f: impl FnOnce(&mut dyn FnMut(T) -> bool) -> Result<()> + Send + 'static,
) -> (Receiver<T>, std::thread::JoinHandle<Result<()>>) {
    let (tx, rx) = sync_channel::<T>(4096);
    let h = std::thread::spawn(move || f(&mut |item| tx.send(item).is_ok()));
    (rx, h)
}

fn mailbox_out(name: &[u8], rec: &MailboxRecord) -> Result<(Out, ExportKind)> {
    let x = kept::export_n(name, rec)
        .map_err(|why| anyhow!("mailbox {:?}: cannot export: {why}", show(name)))?;
    Ok((
        Out {
            key: x.key,
            value: x.value,
            rank: (2, rec.revision),
            name: name.to_vec(),
        },
        x.kind,
    ))
}

/// Every record of the store as Cyrus records, in raw (twoskip) key order, one key once.
/// Streams; only mailboxes whose Cyrus key sorts elsewhere than their store key (Cyrus's
/// name quirks) are held and merged in.
fn export_records(
    ui: &Ui,
    store: &Arc<LmdbStore>,
    mut sink: impl FnMut(Vec<u8>, Vec<u8>) -> Result<()>,
) -> Result<ExportCounts> {
    let mut counts = ExportCounts::default();
    // Pass 1: the out-of-order ones.
    let mut misfits = Vec::new();
    let mut failed = None;
    store.scan_all(&mut |name, rec| match mailbox_out(name, rec) {
        Ok((o, _)) => {
            if !kept::key_in_store_order(name, &o.key) {
                misfits.push(o);
            }
            ControlFlow::Continue(())
        }
        Err(e) => {
            failed = Some(e);
            ControlFlow::Break(())
        }
    })?;
    if let Some(e) = failed {
        return Err(e);
    }
    misfits.sort_by(|a, b| a.key.cmp(&b.key));
    let mut misfits = misfits.into_iter().peekable();

    let s1 = Arc::clone(store);
    let (mrx, mh) = scan_thread(move |send| {
        let mut failed = None;
        s1.scan_all(&mut |name, rec| match mailbox_out(name, rec) {
            Ok((o, kind)) => {
                if !kept::key_in_store_order(name, &o.key) {
                    return ControlFlow::Continue(());
                }
                if send((o, kind)) {
                    ControlFlow::Continue(())
                } else {
                    ControlFlow::Break(())
                }
            }
            Err(e) => {
                failed = Some(e);
                ControlFlow::Break(())
            }
        })?;
        failed.map_or(Ok(()), Err)
    });
    let s2 = Arc::clone(store);
    let (arx, ah) = scan_thread(move |send| {
        s2.aux_scan(b"", &mut |k, v| {
            let o = Out {
                key: k.to_vec(),
                value: v.to_vec(),
                rank: (1, 0),
                name: Vec::new(),
            };
            if send(o) {
                ControlFlow::Continue(())
            } else {
                ControlFlow::Break(())
            }
        })?;
        Ok(())
    });
    let mut mit = mrx
        .into_iter()
        .map(|(o, kind)| {
            match kind {
                ExportKind::Master => counts.master += 1,
                ExportKind::Imported => counts.imported += 1,
                ExportKind::Reencoded => counts.reencoded += 1,
            }
            o
        })
        .peekable();
    let mut ait = arx.into_iter().peekable();
    let mut last: Option<Out> = None;
    let result = (|| -> Result<()> {
        loop {
            // The smallest head of the three sources.
            let pick = [
                mit.peek().map(|o| &o.key),
                ait.peek().map(|o| &o.key),
                misfits.peek().map(|o| &o.key),
            ]
            .into_iter()
            .enumerate()
            .filter_map(|(i, k)| k.map(|k| (i, k)))
            .min_by(|a, b| a.1.cmp(b.1))
            .map(|(i, _)| i);
            let next = match pick {
                Some(0) => mit.next(),
                Some(1) => ait.next(),
                Some(2) => misfits.next(),
                _ => None,
            };
            let Some(o) = next else { break };
            match last.take() {
                Some(prev) if prev.key == o.key => {
                    let (keep, lose) = if o.rank > prev.rank {
                        (o, prev)
                    } else {
                        (prev, o)
                    };
                    counts.shadowed += 1;
                    ui.warn(format_args!(
                        "key {:?}: two records map to it (mailbox {:?} and {:?}); writing the \
                         {}",
                        show(&keep.key),
                        show(&keep.name),
                        show(&lose.name),
                        if keep.rank.0 == 2 {
                            "mailbox (the later one)"
                        } else {
                            "kept record"
                        }
                    ));
                    last = Some(keep);
                }
                Some(prev) => {
                    counts.records += 1;
                    sink(prev.key, prev.value)?;
                    last = Some(o);
                }
                None => last = Some(o),
            }
        }
        if let Some(prev) = last.take() {
            counts.records += 1;
            sink(prev.key, prev.value)?;
        }
        Ok(())
    })();
    // Stop the scans (a dropped receiver ends them) before joining.
    drop(mit);
    drop(ait);
    let joined = [mh.join(), ah.join()];
    result?;
    for j in joined {
        j.map_err(|_| anyhow!("a store scan thread panicked"))??;
    }
    Ok(counts)
}

#[derive(Default, Debug)]
struct ExportCounts {
    records: u64,
    master: u64,
    imported: u64,
    reencoded: u64,
    shadowed: u64,
}

pub fn export(ui: &Ui, a: ExportArgs) -> Result<()> {
    if !a.force && fs::symlink_metadata(&a.out).is_ok() {
        bail!(
            "{} exists; export writes a new file (use --force to replace it)",
            a.out.display()
        );
    }
    let store = open_store(&a.data_dir, false)?;
    let progress = ui.progress("exporting");
    let counts = if a.dump {
        let (tmp, f) = temp_beside(&a.out)?;
        let guard = RemoveOnDrop(Some(tmp.clone()));
        let opts = DumpOptions {
            intermediates: a.intermediates,
            partition: None,
        };
        let mut w = DumpWriter::new(BufWriter::with_capacity(1 << 16, f), opts)?;
        let mut n = 0;
        let counts = export_records(ui, &store, |k, v| {
            n += 1;
            progress.tick(n);
            w.record(&k, &v)
                .with_context(|| format!("cannot dump record {:?}", show(&k)))
        })?;
        let (out, _) = w.finish()?;
        let f = out.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        drop(f);
        if !a.force && fs::symlink_metadata(&a.out).is_ok() {
            bail!("{} appeared while exporting; not replaced", a.out.display());
        }
        fs::rename(&tmp, &a.out).with_context(|| format!("cannot write {}", a.out.display()))?;
        let mut guard = guard;
        guard.0 = None;
        counts
    } else {
        let backend = a.backend.unwrap_or(Backend::Twoskip);
        let opts = WriteOptions {
            overwrite: a.force,
            ..WriteOptions::default()
        };
        let ctx = || format!("cannot write {}", a.out.display());
        if backend == Backend::Twoskip {
            // Raw order is twoskip's: stream through a writer thread.
            let (tx, rx) = sync_channel::<(Vec<u8>, Vec<u8>)>(4096);
            let out = a.out.clone();
            let writer = std::thread::spawn(move || {
                db::write(&out, backend, rx.into_iter().map(Ok::<_, io::Error>), &opts)
            });
            let mut n = 0;
            let counts = export_records(ui, &store, |k, v| {
                n += 1;
                progress.tick(n);
                tx.send((k, v))
                    .map_err(|_| anyhow!("the file writer stopped"))
            });
            drop(tx);
            let written = writer
                .join()
                .map_err(|_| anyhow!("the file writer panicked"))?;
            // A writer error explains a send failure better than the send does.
            written.with_context(ctx)?;
            counts?
        } else {
            // Another key order than the store's: sort through bounded memory and temp files.
            let mut sorted = mupdate::cyrus::dump::SortSpill::new(backend.default_order());
            let mut n = 0u64;
            let counts = export_records(ui, &store, |k, v| {
                n += 1;
                progress.tick(n);
                sorted.push(k, v).map_err(anyhow::Error::from)
            })?;
            let records = sorted.finish().context("sorting the records")?;
            db::write(&a.out, backend, records, &opts).with_context(ctx)?;
            counts
        }
    };
    drop(progress);
    ui.warn(format_args!(
        "{}: {} records ({} mailboxes as imported, {} written by the master, {} re-encoded; \
         {} shadowed)",
        a.out.display(),
        counts.records,
        counts.imported,
        counts.master,
        counts.reencoded,
        counts.shadowed
    ));
    Ok(())
}

struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_file(p);
        }
    }
}

/// A new temporary file in the directory of `path`.
fn temp_beside(path: &Path) -> Result<(PathBuf, fs::File)> {
    let name = path
        .file_name()
        .ok_or_else(|| anyhow!("{} is not a file name", path.display()))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let mut tmp = std::ffi::OsString::from(".");
    tmp.push(name);
    tmp.push(format!(".mboxlist-tmp.{}", std::process::id()));
    let tmp = dir.join(tmp);
    let f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    Ok((tmp, f))
}
