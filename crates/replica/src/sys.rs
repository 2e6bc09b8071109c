//! The applier's and the full synchronisation's system calls: `tandem_backing::sys`, shared with
//! the primary's mount, plus the errno conversions of this crate.

use std::io;

pub(crate) use tandem_backing::sys::*;

/// An I/O error of an errno.
pub(crate) fn os(errno: i32) -> io::Error {
    io::Error::from_raw_os_error(errno)
}
