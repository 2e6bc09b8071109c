//! vip (in progress).
