//! The tokio master daemon.
