//! Master write rules (cyrus-mupdate.md §1.11) as a pure function.
