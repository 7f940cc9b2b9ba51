//! Cyrus 3.6.1 behaviours a drop-in reproduces on purpose, because real clients see them.
//! Each constant names one and cites where Cyrus does it (cyrus-mupdate.md has the details).
//! Behaviours where Cyrus crashes, cuts or loses input are *not* here: the server answers those
//! correctly (see `crate::master` and `proto::command`).

/// Every failed AUTHENTICATE reads `NO "undefined error!"`: Cyrus hands a com_err code to
/// `sasl_errstring` (imap/mupdate.c:1469-1471), after sleeping `failedloginpause`.
pub const AUTH_FAILED: &str = "undefined error!";

/// The default `failedloginpause`, seconds (lib/imapoptions).
pub const FAILED_LOGIN_PAUSE_SECS: u64 = 3;

/// A client's `*` during SASL cancels, answered with an unquoted atom-text and no delay
/// (imap/mupdate.c:1446-1449).
pub const AUTH_CANCELED: &[u8] = b"Client canceled authentication";

/// LOGOUT answers `OK "bye-bye"` rather than the RFC's BYE (imap/mupdate.c:732-738).
pub const LOGOUT: &str = "bye-bye";

/// Commands before login get BAD, not the RFC's NO (imap/mupdate.c:951), quoted since 3.6.0.
pub const PLEASE_LOGIN: &str = "Please login first";

/// Cyrus's idle timeout: 3 hours, reset only by client input (imap/mupdate.c:216).
pub const IDLE_TIMEOUT_SECS: u64 = 3 * 60 * 60;

/// Cyrus's `mupdate_connections_max` default (lib/imapoptions).
pub const CONNECTIONS_MAX: usize = 128;

/// SASL challenges are bare base64 lines with no `+ ` prefix; an empty challenge is an empty
/// line (imap/saslserver.c:57-68).
pub const EMPTY_CHALLENGE: &[u8] = b"\r\n";

/// Names longer than this come back cut from Cyrus's LIST and UPDATE (a `MAX_MAILBOX_NAME+1`
/// buffer, 3.6.1:imap/mboxlist.c:665-672). We refuse longer names instead of cutting them; the
/// bound also keeps every LMDB key under `MDB_MAXKEYSIZE` (511).
pub const MAX_MAILBOX_NAME: usize = 490;
