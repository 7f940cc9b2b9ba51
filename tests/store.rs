//! The store through the public API only, as the server and the tools use it.

use std::ops::ControlFlow;
use std::sync::Arc;

use mupdate::auth::{UserStore, Verifier};
use mupdate::cyrus::mboxname::to_dbname;
use mupdate::store::lmdb::{LmdbOptions, LmdbStore};
use mupdate::store::{CasOutcome, MailboxRecord, MailboxStore};

#[test]
fn public_api_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<LmdbStore> = LmdbStore::open(dir.path(), LmdbOptions::default()).unwrap();
    // Usable as a trait object, as the server holds it.
    let dynamic: Arc<dyn MailboxStore> = store.clone();

    let rec = MailboxRecord::reserved(b"backend1!default", 1);
    let seq = match dynamic.reserve_if_absent(b"user.bob", rec).unwrap() {
        CasOutcome::Committed(s) => s,
        other => panic!("{other:?}"),
    };
    let active = MailboxRecord::active(b"backend1!default", b"bob\tlrswipkxtecda\t".to_vec(), 2);
    assert!(matches!(
        dynamic
            .compare_and_set(b"user.bob", seq, Some(active))
            .unwrap(),
        CasOutcome::Committed(_)
    ));
    dynamic
        .reserve_if_absent(b"user.bob.Sent", MailboxRecord::reserved(b"backend1", 3))
        .unwrap();
    dynamic
        .reserve_if_absent(b"user.bobby", MailboxRecord::reserved(b"backend2", 3))
        .unwrap();

    let snap = dynamic.snapshot().unwrap();
    assert_eq!(snap.seq(), 4);
    let mut names = Vec::new();
    let prefix = [
        to_dbname(b"user.bob").unwrap(),
        vec![mupdate::cyrus::mboxname::HIER_SEP],
    ]
    .concat();
    snap.scan(&prefix, None, &mut |name, r| {
        names.push((String::from_utf8_lossy(name).into_owned(), r.is_reserved()));
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(names, vec![("user.bob.Sent".to_string(), true)]);

    let feed = dynamic.changes_since(1, 10).unwrap();
    assert_eq!(feed.len(), 3);
    assert_eq!(feed[0].old_server.as_deref(), Some(&b"backend1"[..]));

    store
        .put_user("admin", &Verifier::new("secret", 16).unwrap())
        .unwrap();
    assert!(store.get_user("admin").unwrap().unwrap().verify("secret"));
    assert!(!store.get_user("admin").unwrap().unwrap().verify("Secret"));
}
