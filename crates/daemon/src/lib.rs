//! The tandem node agent: drives the core and carries out its effects.
