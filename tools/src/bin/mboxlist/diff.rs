//! `mboxlist diff A B`: compare two mailbox lists as MUPDATE shows them.
//!
//! Each side is a mailboxes.db, a `ctl_mboxlist -d` dump, or `mupdate://[user@]host:port`
//! (LIST over MUPDATE; the password comes from `MUPDATE_PASSWORD`). Files are read as our
//! master serves them after `mboxlist import` (Cyrus's master reads them the same way):
//! tombstones and intermediates are not listed, a reservation is `RESERVE` with no ACL, the
//! location is `server!partition` (or what of it exists). `--servername` gives local entries
//! of file sides their server, as `import --servername` does.
//!
//! `--all-fields` (files only) compares every field of the name records instead, hidden
//! entries included: type letters, partition, server, ACL, uniqueid, uidvalidity, modseqs,
//! mtime. `I`, `A` and other non-mailbox records are not compared.
//!
//! Output, sorted by name: `- NAME …` only in A, `+ NAME …` only in B, `~ NAME A -> B`
//! different. Strings are quoted; bytes that are not printable UTF-8 are escaped.

use std::collections::BTreeMap;
use std::io::{self, BufWriter, Write};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use mupdate::client::{Client, Kind};
use mupdate::cyrus::entry::{mbtype, Entry};
use mupdate::cyrus::kept;

use super::migrate::{open_source, Converted, Converter, SourceFormat};
use super::Ui;

#[derive(Args)]
pub struct DiffArgs {
    /// A mailboxes.db, a dump, or mupdate://[user@]host:port.
    a: String,
    /// Same as A.
    b: String,
    /// Compare every Cyrus field of the name records (both sides must be files).
    #[arg(long)]
    all_fields: bool,
    /// Server of local entries of file sides (as `import --servername`).
    #[arg(long, value_name = "NAME")]
    servername: Option<String>,
    /// What file sides are.
    #[arg(long, value_enum, default_value_t = SourceFormat::Auto)]
    format: SourceFormat,
}

/// One entry as MUPDATE shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct View {
    reserved: bool,
    location: Vec<u8>,
    acl: Vec<u8>,
}

/// A quoted, escaped rendering of bytes.
pub fn q(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() + 2);
    s.push('"');
    for chunk in b.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '"' => s.push_str("\\\""),
                '\\' => s.push_str("\\\\"),
                '\t' => s.push_str("\\t"),
                '\n' => s.push_str("\\n"),
                '\r' => s.push_str("\\r"),
                c if (c as u32) < 0x20 || c as u32 == 0x7F => {
                    s.push_str(&format!("\\x{:02X}", c as u32))
                }
                c => s.push(c),
            }
        }
        for &x in chunk.invalid() {
            s.push_str(&format!("\\x{x:02X}"));
        }
    }
    s.push('"');
    s
}

impl View {
    fn show(&self) -> String {
        if self.reserved {
            format!("RESERVE {}", q(&self.location))
        } else {
            format!("MAILBOX {} {}", q(&self.location), q(&self.acl))
        }
    }
}

enum Side {
    Views(BTreeMap<Vec<u8>, View>),
    Entries(BTreeMap<Vec<u8>, Entry>),
}

/// `mupdate://[user@]host:port` → (user, address).
fn parse_url(s: &str) -> Option<(Option<&str>, &str)> {
    let rest = s.strip_prefix("mupdate://")?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    match rest.rsplit_once('@') {
        Some((user, addr)) => Some((Some(user), addr)),
        None => Some((None, rest)),
    }
}

fn load_mupdate(user: Option<&str>, addr: &str) -> Result<BTreeMap<Vec<u8>, View>> {
    let mut c = Client::connect(addr, Duration::from_secs(10))
        .with_context(|| format!("cannot connect to {addr}"))?;
    if let Some(user) = user {
        let password = std::env::var("MUPDATE_PASSWORD")
            .map_err(|_| anyhow!("set MUPDATE_PASSWORD to log in to {addr} as {user}"))?;
        c.authenticate_plain(user, &password)
            .with_context(|| format!("cannot log in to {addr} as {user}"))?;
    }
    let mut views = BTreeMap::new();
    c.list(None, |r| {
        let reserved = r.kind == Kind::Reserved;
        views.insert(
            r.name,
            View {
                reserved,
                location: r.location,
                acl: if reserved { Vec::new() } else { r.acl },
            },
        );
    })
    .with_context(|| format!("LIST on {addr}"))?;
    let _ = c.logout();
    Ok(views)
}

fn load_file(ui: &Ui, path: &str, a: &DiffArgs) -> Result<Side> {
    let mut source = open_source(ui, path.as_ref(), a.format)?;
    let conv = Converter::new(source.layout, a.servername.as_deref());
    let mut views = BTreeMap::new();
    let mut entries = BTreeMap::new();
    let mut out = Vec::new();
    source.records.for_each(|k, v| {
        conv.convert(k, v, &mut out);
        for c in out.drain(..) {
            let Converted::Mailbox { name, rec, .. } = c else {
                continue;
            };
            if a.all_fields {
                let x =
                    kept::export_n(&name, &rec).map_err(|why| anyhow!("record {}: {why}", q(k)))?;
                entries.entry(name).or_insert(x.entry);
            } else if rec.is_listed() {
                views.entry(name).or_insert(View {
                    reserved: rec.is_reserved(),
                    location: rec.location(),
                    acl: rec.wire_acl().to_vec(),
                });
            }
        }
        Ok(())
    })?;
    Ok(if a.all_fields {
        Side::Entries(entries)
    } else {
        Side::Views(views)
    })
}

fn load(ui: &Ui, spec: &str, a: &DiffArgs) -> Result<Side> {
    if spec.starts_with("mupdate://") {
        if a.all_fields {
            bail!("--all-fields compares files only; {spec} shows only what MUPDATE shows");
        }
        let (user, addr) =
            parse_url(spec).ok_or_else(|| anyhow!("not a mupdate://[user@]host:port URL"))?;
        return Ok(Side::Views(load_mupdate(user, addr)?));
    }
    load_file(ui, spec, a).with_context(|| format!("cannot read {spec}"))
}

/// The fields of two entries that differ, as `field A -> B`.
fn entry_fields(e: &Entry) -> Vec<(&'static str, String)> {
    let opt = |o: &Option<Vec<u8>>| o.as_deref().map_or("NIL".to_string(), q);
    vec![
        (
            "mbtype",
            mbtype::to_letters(e.mbtype).unwrap_or_else(|_| format!("0x{:X}", e.mbtype)),
        ),
        ("partition", opt(&e.partition)),
        ("server", opt(&e.server)),
        ("acl", opt(&e.acl)),
        ("uniqueid", opt(&e.uniqueid)),
        ("legacy_specialuse", opt(&e.legacy_specialuse)),
        ("mtime", e.mtime.to_string()),
        ("uidvalidity", e.uidvalidity.to_string()),
        ("createdmodseq", e.createdmodseq.to_string()),
        ("foldermodseq", e.foldermodseq.to_string()),
        ("name_history", format!("{} items", e.name_history.len())),
    ]
}

fn entry_show(e: &Entry) -> String {
    entry_fields(e)
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Merge-walk two sorted maps; `show` renders one value, `change` a pair that differs.
fn walk<V: PartialEq>(
    out: &mut impl Write,
    a: &BTreeMap<Vec<u8>, V>,
    b: &BTreeMap<Vec<u8>, V>,
    show: impl Fn(&V) -> String,
    change: impl Fn(&V, &V) -> String,
) -> io::Result<u64> {
    let mut n = 0;
    let mut ai = a.iter().peekable();
    let mut bi = b.iter().peekable();
    loop {
        let ord = match (ai.peek(), bi.peek()) {
            (None, None) => break,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some((ka, _)), Some((kb, _))) => ka.cmp(kb),
        };
        match ord {
            std::cmp::Ordering::Less => {
                let (k, v) = ai.next().expect("peeked");
                writeln!(out, "- {} {}", q(k), show(v))?;
                n += 1;
            }
            std::cmp::Ordering::Greater => {
                let (k, v) = bi.next().expect("peeked");
                writeln!(out, "+ {} {}", q(k), show(v))?;
                n += 1;
            }
            std::cmp::Ordering::Equal => {
                let (k, va) = ai.next().expect("peeked");
                let (_, vb) = bi.next().expect("peeked");
                if va != vb {
                    writeln!(out, "~ {} {}", q(k), change(va, vb))?;
                    n += 1;
                }
            }
        }
    }
    Ok(n)
}

/// Returns whether the sides differ.
pub fn diff(ui: &Ui, a: DiffArgs) -> Result<bool> {
    let left = load(ui, &a.a, &a)?;
    let right = load(ui, &a.b, &a)?;
    let stdout = io::stdout().lock();
    let mut out = BufWriter::new(stdout);
    let n = match (&left, &right) {
        (Side::Views(l), Side::Views(r)) => walk(&mut out, l, r, View::show, |x, y| {
            format!("{} -> {}", x.show(), y.show())
        }),
        (Side::Entries(l), Side::Entries(r)) => walk(&mut out, l, r, entry_show, |x, y| {
            entry_fields(x)
                .into_iter()
                .zip(entry_fields(y))
                .filter(|(f, g)| f.1 != g.1)
                .map(|(f, g)| format!("{} {} -> {}", f.0, f.1, g.1))
                .collect::<Vec<_>>()
                .join(", ")
        }),
        _ => bail!("internal error: sides of different kinds"),
    }
    .context("writing stdout")?;
    out.flush().context("writing stdout")?;
    if n > 0 {
        ui.warn(format_args!("{n} differences"));
    }
    Ok(n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_quoting() {
        assert_eq!(
            parse_url("mupdate://admin@127.0.0.1:3905"),
            Some((Some("admin"), "127.0.0.1:3905"))
        );
        assert_eq!(parse_url("mupdate://h:1/"), Some((None, "h:1")));
        assert_eq!(parse_url("h:1"), None);
        assert_eq!(
            q(b"a\tb\"\xFF\x01\xC3\xA9"),
            "\"a\\tb\\\"\\xFF\\x01\u{e9}\""
        );
    }
}
