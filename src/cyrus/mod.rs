//! Cyrus IMAP formats: mailbox names and dbnames, `mailboxes.db` backends, record codecs and
//! `ctl_mboxlist` dumps. No tokio here: the tools and the (future) slave share it.
pub mod db;
pub mod dlist;
pub mod dump;
pub mod entry;
pub mod flat;
pub mod imapd_conf;
pub mod kept;
pub mod mboxname;
pub mod skiplist;
pub mod twoskip;
