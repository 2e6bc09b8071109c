//! tandem-vip (in progress).
