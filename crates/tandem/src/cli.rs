//! The command line: a client of the daemon's control API, plus local tools.

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anstyle::{AnsiColor, Style};
use anyhow::{Context, Result, bail};
use comfy_table::{ContentArrangement, Table, presets};
use tandem_api::{Client, ClientError, Event, LogLines, LogWrite, ModuleStatus, Status};
use tandem_config::Config;

use crate::{Args, Commands, ConfigCommand};

/// Exit code of any error (0-4 are the states of `tandem state`).
pub const EXIT_ERROR: u8 = 10;
/// Exit code of `wait-state` when the timeout expires.
pub const EXIT_TIMEOUT: u8 = 11;

pub fn run(args: Args) -> Result<ExitCode> {
    match &args.command {
        Commands::Daemon { node } => {
            let config = load_config(&args)?;
            init_tracing();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            runtime.block_on(tandem_daemon::run(tandem_daemon::DaemonOptions {
                config,
                node: node.clone(),
            }))?;
            Ok(ExitCode::SUCCESS)
        }
        Commands::Config {
            command: ConfigCommand::Check { path },
        } => {
            let path = path.clone().unwrap_or_else(|| args.config.clone());
            match Config::load(&path) {
                Ok(config) => {
                    println!(
                        "{}: valid (cluster {:?}; nodes {}; modules {})",
                        path.display(),
                        config.cluster.name,
                        config
                            .nodes
                            .iter()
                            .map(|node| node.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                        config
                            .modules
                            .iter()
                            .map(|module| module.name())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(error) => {
                    eprintln!("{error}");
                    Ok(ExitCode::from(EXIT_ERROR))
                }
            }
        }
        Commands::Guard { node } => {
            let config = load_config(&args)?;
            tandem_daemon::guard::run(&config, node)?;
            Ok(ExitCode::SUCCESS)
        }
        Commands::Secret => {
            println!(
                "{}",
                tandem_config::try_generate_secret().context("cannot generate a secret")?
            );
            Ok(ExitCode::SUCCESS)
        }
        Commands::Demo { command } => crate::demo::run(command.as_ref()),
        _ => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            runtime.block_on(client_command(&args))
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber_filter();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .try_init();
}

fn tracing_subscriber_filter() -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_env("TANDEM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
}

fn load_config(args: &Args) -> Result<Config> {
    // Scripts run in their own directory and call `tandem printi` with the same --config: the
    // path they inherit must be absolute.
    let path = std::path::absolute(&args.config).unwrap_or_else(|_| args.config.clone());
    Config::load(&path).map_err(|error| anyhow::anyhow!("{error}"))
}

async fn client_command(args: &Args) -> Result<ExitCode> {
    let config = load_config(args)?;
    let client = Client::new(&config.daemon.socket);
    let module_name = || -> Result<String> {
        config
            .module(args.module.as_deref())
            .map(|(_, module)| module.name().to_owned())
            .map_err(|error| anyhow::anyhow!("{error}"))
    };
    match &args.command {
        Commands::Status { json } => {
            let status = client.status().await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print_status(&status, args.module.as_deref());
            }
            Ok(ExitCode::SUCCESS)
        }
        Commands::State => {
            let name = module_name()?;
            let status = client.status().await?;
            let module = find(&status, &name)?;
            println!(
                "{} {}",
                module.state,
                if module.ready { "ready" } else { "transient" }
            );
            let code = tandem_core::State::parse(&module.state)
                .map(|state| state.exit_code())
                .unwrap_or(1);
            Ok(ExitCode::from(u8::try_from(code).unwrap_or(EXIT_ERROR)))
        }
        Commands::WaitState { state, timeout } => {
            let name = module_name()?;
            let wanted = tandem_core::State::parse(state).with_context(|| {
                format!("unknown state {state:?}; allowed: STOP, WAIT, ALONE, PRIM, SECOND")
            })?;
            let timeout = timeout
                .as_deref()
                .map(tandem_config::parse_duration)
                .transpose()
                .map_err(|error| anyhow::anyhow!("bad --timeout: {error}"))?;
            wait_state(&client, &name, wanted.as_str(), timeout).await
        }
        Commands::Start
        | Commands::Stop
        | Commands::Restart
        | Commands::Prim
        | Commands::Second
        | Commands::Swap
        | Commands::Forcestop => {
            let name = module_name()?;
            let word = match args.command {
                Commands::Start => "start",
                Commands::Stop => "stop",
                Commands::Restart => "restart",
                Commands::Prim => "prim",
                Commands::Second => "second",
                Commands::Swap => "swap",
                _ => "forcestop",
            };
            match client.command(&name, word).await {
                Ok(reply) => {
                    println!("{name}: {}", reply.message);
                    Ok(ExitCode::SUCCESS)
                }
                Err(ClientError::Refused { message, .. }) => {
                    eprintln!("tandem {word}: refused: {message}");
                    Ok(ExitCode::from(EXIT_ERROR))
                }
                Err(error) => Err(error.into()),
            }
        }
        Commands::Log { follow, app, lines } => {
            let name = module_name()?;
            show_log(&client, &config, &name, *follow, *app, *lines).await
        }
        Commands::Printi { message } | Commands::Printe { message } => {
            let name = module_name()?;
            let level = if matches!(args.command, Commands::Printi { .. }) {
                "info"
            } else {
                "error"
            };
            let _: tandem_api::CommandReply = client
                .post(
                    &format!("/v1/modules/{name}/log"),
                    &LogWrite {
                        level: level.into(),
                        message: message.join(" "),
                    },
                )
                .await?;
            Ok(ExitCode::SUCCESS)
        }
        _ => bail!("internal: unexpected command"),
    }
}

fn find<'a>(status: &'a Status, name: &str) -> Result<&'a ModuleStatus> {
    status
        .modules
        .iter()
        .find(|module| module.name == name)
        .with_context(|| format!("the daemon does not run module {name:?}"))
}

async fn wait_state(
    client: &Client,
    name: &str,
    wanted: &str,
    timeout: Option<Duration>,
) -> Result<ExitCode> {
    let deadline = timeout.map(|timeout| Instant::now() + timeout);
    let reached = |status: &Status| -> Result<bool> {
        let module = find(status, name)?;
        Ok(module.state == wanted && module.ready)
    };
    loop {
        // Subscribe first, then look, so that no change slips between the two.
        let mut events = client.events().await?;
        if reached(&client.status().await?)? {
            println!("{name}: {wanted} ready");
            return Ok(ExitCode::SUCCESS);
        }
        loop {
            let next = match deadline {
                Some(deadline) => {
                    match tokio::time::timeout_at(deadline.into(), events.next()).await {
                        Ok(next) => next,
                        Err(_) => {
                            let status = client.status().await?;
                            let module = find(&status, name)?;
                            eprintln!(
                                "{name}: timed out waiting for {wanted} ready (now {} {})",
                                module.state,
                                if module.ready { "ready" } else { "transient" }
                            );
                            return Ok(ExitCode::from(EXIT_TIMEOUT));
                        }
                    }
                }
                None => events.next().await,
            };
            match next? {
                None => break,
                Some(Event::State {
                    module,
                    state,
                    ready,
                }) if module == name => {
                    if state == wanted && ready {
                        println!("{name}: {wanted} ready");
                        return Ok(ExitCode::SUCCESS);
                    }
                }
                // The stream's keep-alive: look again, in case events were dropped for a slow
                // reader.
                Some(Event::Heartbeat) => {
                    if reached(&client.status().await?)? {
                        println!("{name}: {wanted} ready");
                        return Ok(ExitCode::SUCCESS);
                    }
                }
                Some(_) => {}
            }
        }
    }
}

async fn show_log(
    client: &Client,
    config: &Config,
    name: &str,
    follow: bool,
    app: bool,
    count: usize,
) -> Result<ExitCode> {
    let mut stdout = std::io::stdout();
    if follow && !app {
        let mut events = client.events().await?;
        let lines: LogLines = client
            .get(&format!("/v1/modules/{name}/log?n={count}"))
            .await?;
        for line in lines.lines {
            writeln!(stdout, "{line}")?;
        }
        stdout.flush()?;
        while let Some(event) = events.next().await? {
            if let Event::Log { module, line } = event
                && module == name
            {
                let stamp = tandem_scripts::log::now_timestamp();
                writeln!(stdout, "{stamp} {line}")?;
                stdout.flush()?;
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let lines: LogLines = client
        .get(&format!("/v1/modules/{name}/log?n={count}&app={app}"))
        .await?;
    for line in lines.lines {
        writeln!(stdout, "{line}")?;
    }
    stdout.flush()?;
    if follow {
        // The application log is written by the scripts themselves: follow the file.
        let app_log =
            tandem_scripts::AppLog::open(config.daemon.log_dir.join(name).join("app.log"))
                .context("cannot open the application log")?;
        let mut follower = app_log
            .follow()
            .context("cannot follow the application log")?;
        loop {
            for line in follower.read_new()? {
                writeln!(stdout, "{line}")?;
            }
            stdout.flush()?;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn state_style(state: &str, ready: bool) -> Style {
    let color = match (state, ready) {
        (_, false) => AnsiColor::Yellow,
        ("PRIM" | "ALONE" | "SECOND", true) => AnsiColor::Green,
        _ => AnsiColor::Red,
    };
    Style::new().fg_color(Some(color.into())).bold()
}

fn painted(text: &str, style: Style) -> String {
    format!("{style}{text}{style:#}")
}

fn ago(at_unix_ms: u64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(0))
        .unwrap_or(0);
    let seconds = now.saturating_sub(at_unix_ms) / 1000;
    match seconds {
        0..=59 => format!("{seconds}s ago"),
        60..=3599 => format!("{}m ago", seconds / 60),
        _ => format!("{}h{}m ago", seconds / 3600, seconds % 3600 / 60),
    }
}

/// The replication figures of a primary (`None` elsewhere).
fn replication_line(module: &tandem_api::ModuleStatus) -> Option<String> {
    let r = &module.replication;
    if r.directories == 0 {
        None
    } else if r.active {
        Some(format!(
            "replication: streaming, {}/s, {} ops / {} in flight, ack {} µs",
            human_bytes(r.bytes_per_second),
            r.inflight_ops,
            human_bytes(r.inflight_bytes),
            r.ack_latency_us
        ))
    } else if module.state == "ALONE" || module.state == "PRIM" {
        Some("replication: not connected (writes are acknowledged alone)".into())
    } else {
        None
    }
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn print_status(status: &Status, only: Option<&str>) {
    let mut out = anstream::stdout();
    let peer = &status.peer;
    let reach = if peer.reachable {
        painted(
            "reachable",
            Style::new().fg_color(Some(AnsiColor::Green.into())),
        )
    } else {
        painted(
            "UNREACHABLE",
            Style::new().fg_color(Some(AnsiColor::Red.into())).bold(),
        )
    };
    let _ = writeln!(
        out,
        "cluster {}: node {} (local), peer {} {reach}, channel {}",
        status.cluster,
        status.node,
        peer.name,
        if peer.channel { "up" } else { "down" }
    );
    if status.witness.is_none() {
        let _ = writeln!(
            out,
            "{}",
            painted(
                "no witness configured: both nodes may become primary if they lose each other",
                Style::new().fg_color(Some(AnsiColor::Yellow.into()))
            )
        );
    }
    let mut table = Table::new();
    table
        .load_style(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Dynamic);
    table.set_header(vec!["MODULE", "NODE", "STATE", "DATA", "VIP", "INFO"]);
    for module in status
        .modules
        .iter()
        .filter(|module| only.is_none_or(|name| name == module.name))
    {
        let vip = module
            .vip
            .as_ref()
            .map(|vip| format!("{}{}", vip.addr, if vip.held { " (held)" } else { "" }))
            .unwrap_or_else(|| "-".into());
        let local_state = format!(
            "{} {}",
            module.state,
            if module.ready { "ready" } else { "transient" }
        );
        let info = module
            .held
            .clone()
            .or_else(|| module.running.clone())
            .or_else(|| module.waiting_for.clone())
            .unwrap_or_default();
        table.add_row(vec![
            module.name.clone(),
            status.node.clone(),
            painted(&local_state, state_style(&module.state, module.ready)),
            if module.uptodate {
                "up to date".into()
            } else {
                format!("NOT up to date ({})", module.data)
            },
            vip,
            info,
        ]);
        let (peer_state, peer_style) = match &module.peer.state {
            Some(state) => {
                let text = format!(
                    "{state} {}",
                    if module.peer.ready {
                        "ready"
                    } else {
                        "transient"
                    }
                );
                let style = state_style(state, module.peer.ready);
                (text, style)
            }
            None => (
                "UNKNOWN".to_owned(),
                Style::new().fg_color(Some(AnsiColor::Red.into())),
            ),
        };
        table.add_row(vec![
            String::new(),
            module.peer.name.clone(),
            painted(&peer_state, peer_style),
            match module.peer.uptodate {
                Some(true) => "up to date".into(),
                Some(false) => "NOT up to date".into(),
                None => "-".into(),
            },
            String::new(),
            if module.failover {
                String::new()
            } else {
                "failover off".into()
            },
        ]);
        if let Some(line) = replication_line(module) {
            table.add_row(vec![
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                line,
            ]);
        }
        if let Some(transition) = &module.last_transition {
            table.add_row(vec![
                String::new(),
                String::new(),
                format!("last: {} -> {}", transition.from, transition.to),
                ago(transition.at_unix_ms),
                String::new(),
                transition.reason.clone(),
            ]);
        }
    }
    let _ = writeln!(out, "{table}");
}
