//! mupdate: a MUPDATE (RFC 3656) implementation for the Cyrus IMAP murder.
//!
//! Module map (one job each):
//! * [`proto`]: the sans-IO protocol layer (validated types, string/literal framing, command
//!   parser, response writer, client state machine). No sockets, no runtime.
//! * [`store`]: the mailbox store trait and its LMDB implementation (group commit, change feed).
//! * [`master`]: the RESERVE/ACTIVATE/DEACTIVATE/DELETE rules as a pure function.
//! * [`auth`]: the credential store (salted PBKDF2 verifiers) and SASL PLAIN.
//! * `server` (feature `server`): the tokio master daemon.
//! * [`client`]: a blocking (`std::net`, no runtime) client on the same codec.
//! * [`cyrus`]: Cyrus formats (mailbox names and dbnames, mailboxes.db, dumps).
pub mod auth;
pub mod client;
pub mod cyrus;
pub mod master;
pub mod proto;
#[cfg(feature = "server")]
pub mod server;
pub mod store;
