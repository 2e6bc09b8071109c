//! tandem-config.
