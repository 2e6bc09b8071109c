//! tandem-sim.
