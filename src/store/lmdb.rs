//! LMDB backend of [`super::MailboxStore`] (heed). The only LMDB code in the crate.
