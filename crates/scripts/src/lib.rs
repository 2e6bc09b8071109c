//! tandem-scripts (in progress).
