//! The sans-IO MUPDATE protocol layer shared by the server, the blocking client and (later) the
//! C library and the slave: no sockets, no runtime.
//!
//! * [`command`]: the server-side command parser, a faithful port of Cyrus 3.6's `docmd`
//!   lexing (imap/mupdate.c:648-960, imap/imapparse.c) over a byte buffer, resumable.
//! * [`skip`]: Cyrus's `eatline` error recovery as an incremental state machine.
//! * [`response`]: the server's response writer (banner, tagged texts, `{n+}` literal lines).
//! * [`client`]: the client side: command encoder and response decoder.
//! * [`quirks`]: the Cyrus behaviours we reproduce on purpose, in one place.

pub mod client;
pub mod command;
pub mod quirks;
pub mod response;
pub mod skip;

/// Parser limits. Cyrus's `maxword`, `maxquoted` and `maxliteral` default to 128 KiB
/// (lib/imapoptions); Cyrus exits the whole daemon when one is exceeded, we refuse the command.
/// `max_command` bounds a whole command (Cyrus has no such bound).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_word: usize,
    pub max_quoted: usize,
    pub max_literal: u64,
    pub max_command: usize,
}

impl Limits {
    pub const CYRUS_DEFAULT_WORD: usize = 128 * 1024;
    /// The smallest whole-command bound we accept (the floor): 1 MiB.
    pub const MIN_COMMAND: usize = 1024 * 1024;
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_word: Self::CYRUS_DEFAULT_WORD,
            max_quoted: Self::CYRUS_DEFAULT_WORD,
            max_literal: Self::CYRUS_DEFAULT_WORD as u64,
            max_command: 4 * Self::MIN_COMMAND,
        }
    }
}

/// Render bytes for logs and test failures: printable ASCII as is, the rest escaped.
pub fn escape(bytes: &[u8]) -> String {
    bytes
        .iter()
        .flat_map(|&b| std::ascii::escape_default(b))
        .map(char::from)
        .collect()
}
