//! scripts (in progress).
