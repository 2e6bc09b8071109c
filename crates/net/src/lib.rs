//! tandem-net (in progress).
