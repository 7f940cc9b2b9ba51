//! Cyrus IMAP formats: mailbox names and dbnames, `mailboxes.db` backends, record codecs and
//! `ctl_mboxlist` dumps. No tokio here: the tools and the (future) slave share it.
pub mod mboxname;
pub mod dlist;
