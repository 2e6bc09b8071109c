//! `tandem demo`: the lab as a user feature (spec §8).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use tandem::cluster::{Cluster, ClusterSpec, DEFAULT_REPLICATED};
use tandem_lab::LabSpec;

/// Name of the demo lab.
const LAB: &str = "demo";

#[derive(Subcommand, Debug)]
pub enum DemoCommand {
    /// Build the lab and start the cluster, detached; returns once PRIM/SECOND are ready.
    Up(UpArgs),
    /// Stop everything the lab started and remove it.
    Down,
    /// Describe the lab.
    Info {
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a command inside a host's network and mount namespaces.
    Exec {
        /// node1, node2, witness or client.
        host: String,
        /// The command.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<String>,
    },
    /// The sample application (run by the demo's start_prim script).
    #[command(hide = true)]
    App {
        /// Address to listen on.
        #[arg(long)]
        listen: SocketAddr,
        /// Directory holding the counter.
        #[arg(long)]
        dir: PathBuf,
        /// Node name shown in answers.
        #[arg(long)]
        node: String,
    },
}

#[derive(clap::Args, Debug, Default)]
pub struct UpArgs {
    /// Use your own start_prim/stop_prim/... scripts instead of the sample application's.
    #[arg(long)]
    scripts: Option<PathBuf>,
    /// A replicated directory (repeatable; default /srv/tandem-demo/data).
    #[arg(long = "replicated")]
    replicated: Vec<PathBuf>,
}

pub fn run(command: Option<&DemoCommand>) -> Result<ExitCode> {
    match command {
        None => interactive(),
        Some(DemoCommand::Up(args)) => {
            let cluster = up(args)?;
            print_guide(&cluster)?;
            cluster.keep()?;
            Ok(ExitCode::SUCCESS)
        }
        Some(DemoCommand::Down) => {
            let cluster = Cluster::open(LAB, &binary()?).context("no demo lab is running")?;
            cluster.destroy()?;
            println!("demo lab removed");
            Ok(ExitCode::SUCCESS)
        }
        Some(DemoCommand::Info { json }) => {
            let cluster = Cluster::open(LAB, &binary()?).context("no demo lab is running")?;
            let info = cluster.info()?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                print_guide(&cluster)?;
            }
            cluster.keep()?;
            Ok(ExitCode::SUCCESS)
        }
        Some(DemoCommand::Exec { host, command }) => {
            let cluster = Cluster::open(LAB, &binary()?).context("no demo lab is running")?;
            // `tandem` inside the lab is this very binary, wherever it was built or installed.
            let binary = binary()?;
            let program = if command[0] == "tandem" {
                binary.clone().into_os_string()
            } else {
                command[0].clone().into()
            };
            let mut process = cluster.lab.command(host, program)?;
            process.args(&command[1..]);
            if let Some(dir) = binary.parent() {
                let path = std::env::var("PATH").unwrap_or_default();
                process.env("PATH", format!("{}:{path}", dir.display()));
            }
            if tandem::cluster::NODES.contains(&host.as_str()) {
                process.env("TANDEM_CONFIG", cluster.config_path(host)?);
            }
            let status = process
                .status()
                .with_context(|| format!("cannot run {:?}", command[0]))?;
            cluster.keep()?;
            Ok(ExitCode::from(
                u8::try_from(status.code().unwrap_or(1)).unwrap_or(1),
            ))
        }
        Some(DemoCommand::App { listen, dir, node }) => {
            tandem::sample_app::serve(*listen, dir, node)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn binary() -> Result<PathBuf> {
    std::env::current_exe().context("cannot find the tandem binary")
}

fn up(args: &UpArgs) -> Result<Cluster> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("the demo builds network namespaces: run it as root");
    }
    if Cluster::open(LAB, &binary()?)
        .map(|cluster| cluster.keep())
        .is_ok()
    {
        bail!("a demo lab is already running: `tandem demo down` first");
    }
    let mut spec = ClusterSpec::new(LabSpec::demo());
    if !args.replicated.is_empty() {
        spec.replicated.clone_from(&args.replicated);
    }
    if spec.replicated.is_empty() {
        spec.replicated = vec![PathBuf::from(DEFAULT_REPLICATED)];
    }
    for dir in &spec.replicated {
        if !dir.is_absolute() {
            bail!("--replicated {}: the path must be absolute", dir.display());
        }
    }
    spec.scripts = args.scripts.as_ref().map(std::path::absolute).transpose()?;
    println!("building the lab (node1, node2, witness, client on a private bridge)...");
    let cluster = Cluster::create(&spec, &binary()?)?;
    println!("starting the daemons; node1 becomes primary, node2 secondary...");
    cluster.bootstrap()?;
    Ok(cluster)
}

fn print_guide(cluster: &Cluster) -> Result<()> {
    let info = cluster.info()?;
    let pid = |node: &str| {
        cluster
            .daemon_pid(node)
            .map(|pid| pid.to_string())
            .unwrap_or_else(|| "?".into())
    };
    println!(
        "\nThe demo cluster runs: node1 {} (daemon pid {}), node2 {} (daemon pid {}), client {}.\n\
         Virtual IP {vip}; sample application {url}; replicated {replicated}.\n\n\
         Watch:\n\
         \x20 tandem demo exec node1 -- tandem status\n\
         \x20 tandem demo exec node1 -- tandem log -f\n\
         \x20 tandem demo exec client -- curl -s {url}\n\n\
         Break things:\n\
         \x20 kill -9 $(tandem demo info --json | jq '.hosts[] | select(.name==\"node1\") | .daemon_pid')   # crash the primary's daemon\n\
         \x20 tandem demo exec node1 -- tandem swap        # exchange roles\n\
         \x20 tandem demo exec node1 -- tandem stop        # graceful stop: node2 takes over\n\
         \x20 tandem demo exec node1 -- ip link set eth0 down   # cut the primary's network\n\n\
         Remove everything: tandem demo down",
        cluster.lab.host("node1")?.addr,
        pid("node1"),
        cluster.lab.host("node2")?.addr,
        pid("node2"),
        cluster.lab.host("client")?.addr,
        vip = info["vip"].as_str().unwrap_or("?"),
        url = info["app_url"].as_str().unwrap_or("?"),
        replicated = cluster
            .replicated
            .iter()
            .map(|dir| dir.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    );
    Ok(())
}

fn interactive() -> Result<ExitCode> {
    let interrupted = Arc::new(AtomicBool::new(false));
    for signal in [libc::SIGINT, libc::SIGTERM] {
        signal_hook_flag(signal, &interrupted)?;
    }
    let cluster = up(&UpArgs::default())?;
    print_guide(&cluster)?;
    println!("\nPress Ctrl-C to stop the demo and remove the lab.");
    while !interrupted.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(200));
    }
    // The terminal may be gone by now: never fail on printing, always tear down.
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "\nstopping the demo...");
    cluster.destroy()?;
    let _ = writeln!(stdout, "demo lab removed");
    Ok(ExitCode::SUCCESS)
}

static FLAG: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();

extern "C" fn on_signal(_signal: libc::c_int) {
    if let Some(flag) = FLAG.get() {
        flag.store(true, Ordering::SeqCst);
    }
}

fn signal_hook_flag(signal: libc::c_int, flag: &Arc<AtomicBool>) -> Result<()> {
    let _ = FLAG.set(Arc::clone(flag));
    // SAFETY: `on_signal` is async-signal-safe: it only reads an initialised OnceLock and stores
    // to an atomic.
    let previous = unsafe { libc::signal(signal, on_signal as *const () as libc::sighandler_t) };
    if previous == libc::SIG_ERR {
        bail!("cannot install a signal handler");
    }
    Ok(())
}
