//! Library part of the `tandem` binary: the cluster-in-a-lab used by `tandem demo` and by the
//! multi-process tests, and the demo's sample application.

pub mod cluster;
pub mod sample_app;
