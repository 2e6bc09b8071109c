//! modlog (in progress).
