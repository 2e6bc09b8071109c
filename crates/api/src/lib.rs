//! tandem-api.
