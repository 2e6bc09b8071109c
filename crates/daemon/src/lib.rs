//! The tandem node agent: drives the core and carries out its effects.

pub mod modlog;
pub mod net;
pub mod scripts;
pub mod vip;
