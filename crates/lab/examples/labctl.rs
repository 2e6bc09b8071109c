//! Manual poking at labs (root):
//!
//! ```text
//! labctl up NAME INDEX HOST...        create and keep a named lab
//! labctl hold HOST...                 create an anonymous lab, print its name, wait for stdin EOF
//! labctl down NAME                    destroy it
//! labctl exec NAME HOST CMD...        run CMD in HOST
//! labctl spawn NAME HOST LOG CMD...   start CMD in HOST in the background
//! labctl cut|cut1|heal NAME A B       partition / one-way / heal
//! labctl ping NAME FROM TO-HOST
//! labctl list
//! labctl cleanup                      remove labs whose creator died
//! ```

use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};
use tandem_lab::{Lab, LabSpec};

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("labctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<ExitCode> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    match a.as_slice() {
        ["up", name, index, hosts @ ..] => {
            let lab = Lab::create(LabSpec::named(name, index.parse()?, hosts.iter().copied()))?;
            for h in lab.hosts() {
                println!("{} {} {}", h.name, h.netns, h.addr);
            }
            lab.keep()?;
        }
        ["hold", hosts @ ..] => {
            let lab = Lab::create(LabSpec::new(hosts.iter().copied()))?;
            println!("{}", lab.name());
            std::io::copy(&mut std::io::stdin(), &mut std::io::sink())?;
            lab.destroy()?;
        }
        ["down", name] => Lab::open(name)?.destroy()?,
        ["exec", name, host, cmd @ ..] => {
            let (prog, rest) = cmd.split_first().context("no command")?;
            let lab = Lab::open(name)?;
            let st = lab.command(host, prog)?.args(rest).status()?;
            return Ok(ExitCode::from(
                u8::try_from(st.code().unwrap_or(1)).unwrap_or(1),
            ));
        }
        ["spawn", name, host, log, cmd @ ..] => {
            let (prog, rest) = cmd.split_first().context("no command")?;
            let pid = Lab::open(name)?.spawn(host, Command::new(prog).args(rest), log)?;
            println!("{pid}");
        }
        ["cut", name, x, y] => Lab::open(name)?.partition(x, y)?,
        ["cut1", name, x, y] => Lab::open(name)?.partition_oneway(x, y)?,
        ["heal", name, x, y] => Lab::open(name)?.heal(x, y)?,
        ["ping", name, from, to] => {
            let lab = Lab::open(name)?;
            let ok = lab.ping(from, lab.host(to)?.addr);
            println!("{}", if ok { "reachable" } else { "unreachable" });
        }
        ["cleanup"] => {
            for n in Lab::cleanup_stale()? {
                println!("removed {n}");
            }
        }
        ["list"] => {
            for n in Lab::list()? {
                println!("{n}");
            }
        }
        _ => bail!("usage: see the comment at the top of examples/labctl.rs"),
    }
    Ok(ExitCode::SUCCESS)
}
