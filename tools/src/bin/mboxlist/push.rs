//! `mboxlist push`: what Cyrus 3.6.1 `ctl_mboxlist -m` does for a backend (`do_pop_mupdate`,
//! 3.6.1:imap/ctl_mboxlist.c:389-522; formats spec §9, cyrus-mupdate.md §3.4), over MUPDATE
//! with SASL PLAIN:
//!
//! 1. `LIST "<servername>!"`; every listed name that the local `mailboxes.db` does not have
//!    (reserved, deleted and intermediate entries count as absent, as `mboxlist_lookup` says)
//!    is queued for DELETE on the master, the others (name, location, ACL if MAILBOX) are
//!    queued as "agreed", in LIST order. The deletes are sent (most recent first, as Cyrus's
//!    linked list does); a failed DELETE ends the run.
//! 2. The local name records are walked in database order (intermediates excluded,
//!    tombstones skipped); our location is `<servername>!<partition>`. A name at the head of
//!    the agreed queue is popped: MOVING → "unflag"; the same location and ACL (and the master
//!    sent an ACL) → nothing; else ACTIVATE. A name elsewhere gets a FIND: found at our own
//!    location → abort ("mupdate said not us before it said us"); found elsewhere → "wipe";
//!    not found and MOVING → "unflag"; not found → ACTIVATE.
//! 3. Unflag: Cyrus clears MOVING/REMOTE locally and then ACTIVATEs `servername!partition`.
//!    We ACTIVATE, but never change the local mailboxes.db (Cyrus may have it open): the
//!    local flag is reported for `ctl_mboxlist -m` to clear.
//! 4. Wipe: Cyrus deletes the local mailbox. We only report it.
//!
//! Every step prints Cyrus's `-w` line (`Remove from MUPDATE: …`, `Force Activate: …`,
//! `Remove remote flag on: …`, `Remove Local Mailbox: …`) on stdout; `--dry-run` prints
//! them and sends no write (LIST and FIND still run), like `ctl_mboxlist -m -w`.

use std::collections::{HashSet, VecDeque};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use mupdate::client::{Client, ClientError, Kind};
use mupdate::cyrus::db::{self, Backend, ReadOptions};
use mupdate::cyrus::entry::{self, mbtype, EntryError, KeyKind, Layout};
use mupdate::cyrus::mboxname;

use super::diff::q;
use super::Ui;

#[derive(Args)]
pub struct PushArgs {
    /// The MUPDATE master, HOST:PORT (default: `mupdate_server` of the imapd.conf).
    #[arg(long)]
    server: Option<String>,
    /// The backend's imapd.conf.
    #[arg(
        short = 'C',
        value_name = "IMAPD_CONF",
        default_value = "/etc/imapd.conf"
    )]
    config: PathBuf,
    /// Print what would be done (`ctl_mboxlist -m -w`); send no writes.
    #[arg(long)]
    dry_run: bool,
}

// ---------------------------------------------------------------------------------------
// imapd.conf

pub use mupdate::cyrus::imapd_conf::ImapdConf;

// ---------------------------------------------------------------------------------------
// the local list

/// One local mailbox as `mboxlist_allmbox` hands it to `pop_mupdate_cb`.
struct Local {
    name: Vec<u8>,
    moving: bool,
    partition: Option<Vec<u8>>,
    /// `""` when the record has no ACL (Cyrus's mbentry).
    acl: Vec<u8>,
}

struct LocalList {
    /// In database order; intermediates and tombstones left out.
    walk: Vec<Local>,
    /// dbnames `mboxlist_lookup` finds (not reserved, deleted or intermediate).
    found: HashSet<Vec<u8>>,
}

fn read_local(ui: &Ui, path: &Path, configured: Backend) -> Result<LocalList> {
    let backend = match db::detect(path) {
        Ok(b) => b,
        Err(_) => Backend::Flat,
    };
    if backend != configured {
        ui.warn(format_args!(
            "{}: a {backend} file, but mboxlist_db says {configured}; reading it as {backend}",
            path.display()
        ));
    }
    let mut r = db::open_with(path, Some(backend), &ReadOptions::default())
        .with_context(|| format!("cannot read {}", path.display()))?;
    let mut list = LocalList {
        walk: Vec::new(),
        found: HashSet::new(),
    };
    let mut layout = None;
    while let Some((k, v)) = r.next_record()? {
        if layout.is_none() {
            layout = entry::detect_step(k, v);
        }
        let KeyKind::Name(dbname) = entry::key_kind(k) else {
            continue;
        };
        let e = match entry::parse_entry(Some(dbname), v) {
            Ok(e) => e,
            Err(EntryError::BadFormat(_)) => continue,
            Err(err) => bail!(
                "{}: record {}: Cyrus would abort on it: {err}",
                path.display(),
                q(k)
            ),
        };
        let t = e.mbtype;
        if t & (mbtype::RESERVE | mbtype::DELETED | mbtype::INTERMEDIATE) == 0 {
            list.found.insert(dbname.to_vec());
        }
        if t & (mbtype::DELETED | mbtype::INTERMEDIATE) != 0 {
            continue;
        }
        list.walk.push(Local {
            name: e.name,
            moving: t & mbtype::MOVING != 0,
            partition: e.partition,
            acl: e.acl.unwrap_or_default(),
        });
    }
    if layout == Some(Layout::Legacy) {
        bail!(
            "{}: a pre-3.6 mailboxes.db; Cyrus 3.6 upgrades it at start-up (ctl_cyrusdb -r) \
             before ctl_mboxlist -m can use it",
            path.display()
        );
    }
    Ok(list)
}

// ---------------------------------------------------------------------------------------
// push

struct Agreed {
    name: Vec<u8>,
    location: Vec<u8>,
    acl: Option<Vec<u8>>,
}

/// Prints Cyrus's `-w` lines.
fn say(what: &str, name: &[u8]) -> Result<()> {
    let mut out = io::stdout().lock();
    out.write_all(what.as_bytes())?;
    out.write_all(b": ")?;
    out.write_all(name)?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}

pub fn push(ui: &Ui, a: PushArgs) -> Result<()> {
    let conf = ImapdConf::read(&a.config)?;
    let servername = conf
        .get("servername")
        .map(str::to_string)
        .unwrap_or_else(mupdate::cyrus::imapd_conf::hostname);
    let db_path = match (conf.get("mboxlist_db_path"), conf.get("configdirectory")) {
        (Some(p), _) => PathBuf::from(p),
        (None, Some(dir)) => Path::new(dir).join("mailboxes.db"),
        (None, None) => bail!(
            "{}: neither mboxlist_db_path nor configdirectory is set",
            a.config.display()
        ),
    };
    let configured: Backend = match conf.get("mboxlist_db") {
        Some(b) => b
            .parse()
            .map_err(|e| anyhow!("{}: mboxlist_db: {e}", a.config.display()))?,
        None => Backend::Twoskip,
    };
    let server = match (&a.server, conf.get("mupdate_server")) {
        (Some(s), _) => s.clone(),
        (None, Some(s)) => s.to_string(),
        (None, None) => bail!("give --server HOST:PORT (imapd.conf has no mupdate_server)"),
    };
    let user = conf
        .get("mupdate_authname")
        .or(conf.get("mupdate_username"))
        .ok_or_else(|| {
            anyhow!(
                "{}: set mupdate_authname (or mupdate_username)",
                a.config.display()
            )
        })?
        .to_string();
    let password = match std::env::var("MUPDATE_PASSWORD") {
        Ok(p) => p,
        Err(_) => conf
            .get("mupdate_password")
            .ok_or_else(|| {
                anyhow!(
                    "{}: set mupdate_password (or MUPDATE_PASSWORD)",
                    a.config.display()
                )
            })?
            .to_string(),
    };
    if let Some(authz) = conf.get("mupdate_username") {
        if authz != user {
            ui.warn(format_args!(
                "mupdate_username {authz:?} differs from mupdate_authname {user:?}: logging in \
                 as {user:?} without an authorisation identity"
            ));
        }
    }

    let local = read_local(ui, &db_path, configured)?;

    let mut c = Client::connect(server.as_str(), Duration::from_secs(10))
        .with_context(|| format!("couldn't connect to mupdate server {server}"))?;
    c.authenticate_plain(&user, &password)
        .with_context(|| format!("couldn't log in to {server} as {user}"))?;

    // 1. What the master thinks we host.
    let prefix = format!("{servername}!");
    let mut deletes = Vec::new();
    let mut agreed = VecDeque::new();
    c.list(Some(prefix.as_bytes()), |r| {
        if local.found.contains(&mboxname::to_dbname_cyrus(&r.name)) {
            agreed.push_back(Agreed {
                acl: (r.kind == Kind::Active).then_some(r.acl),
                name: r.name,
                location: r.location,
            });
        } else {
            deletes.push(r.name);
        }
    })
    .context("couldn't do LIST command on mupdate server")?;
    // With --dry-run nothing is deleted, but the walk must see the master as it would be
    // (Cyrus's own `-w` aborts here: its FIND finds a local reservation it did not delete).
    let mut deleted = HashSet::new();
    for name in deletes.iter().rev() {
        say("Remove from MUPDATE", name)?;
        deleted.insert(name.clone());
        if !a.dry_run {
            c.delete(name)
                .with_context(|| format!("couldn't mupdate delete {}", q(name)))?;
        }
    }

    // 2. Our list, in database order.
    let mut unflag = Vec::new();
    let mut wipe = Vec::new();
    let mut failures = 0u64;
    for m in &local.walk {
        let realpart = [
            servername.as_bytes(),
            b"!",
            m.partition.as_deref().unwrap_or_default(),
        ]
        .concat();
        let mut skip = false;
        if agreed.front().is_some_and(|h: &Agreed| h.name == m.name) {
            let head = agreed.pop_front().expect("checked");
            let same = head
                .acl
                .as_ref()
                .is_some_and(|acl| realpart == head.location && m.acl == *acl);
            if m.moving {
                say("Remove remote flag on", &m.name)?;
                // Cyrus pushes it again after clearing the flag; when the master already
                // has exactly that there is nothing to send.
                unflag.push((m, same));
                skip = true;
            } else {
                skip = same;
            }
        } else {
            let found = if a.dry_run && deleted.contains(&m.name) {
                Ok(None)
            } else {
                c.find(&m.name)
            };
            match found {
                Ok(Some(found)) => {
                    if found.location == realpart {
                        bail!(
                            "mupdate said not us before it said us: mailboxes.db said {} {} \
                             {}, mupdate says {} {} {}",
                            q(&m.name),
                            q(&realpart),
                            q(&m.acl),
                            q(&found.name),
                            q(&found.location),
                            q(&found.acl)
                        );
                    }
                    say("Remove Local Mailbox", &m.name)?;
                    wipe.push(m);
                    skip = true;
                }
                Ok(None) | Err(ClientError::No(_)) => {
                    if m.moving {
                        say("Remove remote flag on", &m.name)?;
                        unflag.push((m, false));
                        skip = true;
                    }
                }
                Err(e) => return Err(e).with_context(|| format!("FIND {}", q(&m.name))),
            }
        }
        if skip {
            continue;
        }
        say("Force Activate", &m.name)?;
        if a.dry_run {
            continue;
        }
        match c.activate(&m.name, &realpart, &m.acl) {
            Ok(()) => {}
            Err(ClientError::No(why)) => {
                failures += 1;
                ui.warn(format_args!(
                    "temporary failure storing {} (update continuing): {why}",
                    q(&m.name)
                ));
            }
            Err(e) => {
                return Err(e).with_context(|| format!("permanent failure storing {}", q(&m.name)))
            }
        }
    }

    // 3. Unflag (Cyrus's list is LIFO).
    for &(m, same) in unflag.iter().rev() {
        let realpart = [
            servername.as_bytes(),
            b"!",
            m.partition.as_deref().unwrap_or_default(),
        ]
        .concat();
        if !a.dry_run && !same {
            c.activate(&m.name, &realpart, &m.acl).with_context(|| {
                format!(
                    "couldn't perform mupdatepush to un-remote-flag {}",
                    q(&m.name)
                )
            })?;
        }
        ui.warn(format_args!(
            "{}: the master now has it here, but its local MOVING flag stays set (this tool \
             never writes mailboxes.db; `ctl_mboxlist -m` clears it)",
            q(&m.name)
        ));
    }
    // 4. Wipe: reported only.
    for m in wipe.iter().rev() {
        ui.warn(format_args!(
            "{}: the master has it on another server; Cyrus's `ctl_mboxlist -m` would delete \
             the local copy, this tool leaves it",
            q(&m.name)
        ));
    }
    let _ = c.logout();
    if failures > 0 {
        ui.warn(format_args!("{failures} mailboxes could not be stored"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imapd_conf_parsing() {
        let dir = std::env::temp_dir().join(format!("mboxlist-conf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let inc = dir.join("inc.conf");
        std::fs::write(&inc, "mupdate_password: pw:with:colons  \n").unwrap();
        let main = dir.join("imapd.conf");
        std::fs::write(
            &main,
            format!(
                "# comment\n\nConfigDirectory:   /var/lib/cyrus\nservername: be1\n\
                 servername: be2\n@include: {}\nempty:\n",
                inc.display()
            ),
        )
        .unwrap();
        let c = ImapdConf::read(&main).unwrap();
        assert_eq!(c.get("configdirectory"), Some("/var/lib/cyrus"));
        assert_eq!(c.get("servername"), Some("be2"));
        assert_eq!(c.get("mupdate_password"), Some("pw:with:colons"));
        assert_eq!(c.get("empty"), None);
        std::fs::write(&main, "no colon here\n").unwrap();
        assert!(ImapdConf::read(&main).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
