//! `tandem demo`: the lab as a user feature (spec §8).

use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum DemoCommand {
    /// Build the lab and start the cluster, detached.
    Up,
}

pub fn run(_command: Option<&DemoCommand>) -> Result<ExitCode> {
    bail!("not yet")
}
