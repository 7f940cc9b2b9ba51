//! Home of the C-level tests of libmupdate. It links the library so that C test programs built
//! by this crate's build script (added with the C ABI) resolve against it.
pub use mupdate as _linked;
