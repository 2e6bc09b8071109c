//! `tandem`: the one binary (daemon, CLI, lab).

mod cli;
mod demo;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// tandem: a two-node high-availability mirror cluster.
#[derive(Parser, Debug)]
#[command(name = "tandem", version, about, long_about = None)]
pub struct Args {
    /// Configuration file.
    #[arg(long, global = true, env = "TANDEM_CONFIG", default_value = tandem_config::DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    /// Module (optional when the configuration has a single module).
    #[arg(short = 'm', long = "module", global = true, env = "TANDEM_MODULE")]
    pub module: Option<String>,
    #[command(subcommand)]
    pub command: Commands,
}

#[derive(Subcommand, Debug)]
pub enum Commands {
    /// Run the node agent in the foreground.
    Daemon {
        /// This node's name (default: `this_node`, or the node whose address is local).
        #[arg(long)]
        node: Option<String>,
    },
    /// Both nodes' view of every module.
    Status {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// The local state as exit code: STOP=0 WAIT=1 ALONE=2 PRIM=3 SECOND=4.
    State,
    /// Block until the local module reaches STATE ready.
    WaitState {
        /// STOP, WAIT, ALONE, PRIM or SECOND.
        state: String,
        /// Give up after this long (e.g. 30s; default: wait forever); exit code 11 on timeout.
        #[arg(long)]
        timeout: Option<String>,
    },
    /// Start the module on this node.
    Start,
    /// Stop the module on this node.
    Stop,
    /// Re-run the application scripts only.
    Restart,
    /// Force this node to start as primary.
    Prim,
    /// Force this node to start as secondary.
    Second,
    /// Exchange the roles of primary and secondary.
    Swap,
    /// Stop at once when a normal stop hangs.
    Forcestop,
    /// The module log (events) or the application log (script output).
    Log {
        /// Follow new lines.
        #[arg(short = 'f', long)]
        follow: bool,
        /// The application log instead of the module log.
        #[arg(long)]
        app: bool,
        /// Number of lines.
        #[arg(short = 'n', default_value_t = 50)]
        lines: usize,
    },
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Generate a new cluster secret for `[cluster] secret`.
    Secret,
    /// From scripts: write an info line into the module log.
    Printi {
        /// The message.
        message: Vec<String>,
    },
    /// From scripts: write an error line into the module log.
    Printe {
        /// The message.
        message: Vec<String>,
    },
    /// Started by the daemon: fences the node (VIPs, application) if the daemon dies.
    #[command(hide = true)]
    Guard {
        /// The daemon's node name.
        #[arg(long)]
        node: String,
    },
    /// Build a lab on this machine and run a complete cluster in it.
    Demo {
        #[command(subcommand)]
        command: Option<demo::DemoCommand>,
    },
}

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Validate a configuration file.
    Check {
        /// The file (default: --config).
        path: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    match cli::run(args) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("tandem: {error:#}");
            ExitCode::from(cli::EXIT_ERROR)
        }
    }
}
