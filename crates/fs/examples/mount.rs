//! Mounts tandem-fs in place over a directory until stdin closes (or a line is read).
//!
//! `cargo run --release -p tandem-fs --example mount -- DIR [primary|secondary] [--count]`
//!
//! With `--count`, prints the number of mutations by kind on exit. For manual tests, benchmarks
//! and pjdfstest runs; needs root.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tandem_fs::{Completion, Mode, Mount, MountOptions, Mutation, Replicator};

#[derive(Default)]
struct Counter(Mutex<BTreeMap<&'static str, (u64, u64)>>);

impl Replicator for Counter {
    fn submit(&self, m: &Mutation<'_>, done: Completion) {
        let bytes = match &m.op {
            tandem_fs::Op::Write { data, .. } => data.len() as u64,
            _ => 0,
        };
        if let Ok(mut map) = self.0.lock() {
            let e = map.entry(m.kind()).or_default();
            e.0 += 1;
            e.1 += bytes;
        }
        done.complete(Ok(()));
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(dir) = args.first() else {
        eprintln!("usage: mount DIR [primary|secondary] [--count]");
        std::process::exit(2);
    };
    let mode = match args.get(1).map(String::as_str) {
        Some("secondary") => Mode::Secondary,
        _ => Mode::Primary,
    };
    let counter = Arc::new(Counter::default());
    let replicator: Arc<dyn Replicator> = if args.iter().any(|a| a == "--count") {
        counter.clone()
    } else {
        Arc::new(tandem_fs::LocalOnly)
    };
    let options = MountOptions {
        mode,
        ..MountOptions::default()
    };
    let mount = Mount::mount_in_place(&PathBuf::from(dir), options, replicator)?;
    println!(
        "mounted {} {:?}",
        mount.path().display(),
        mount.negotiated()
    );
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    println!("{:?}", mount.stats());
    mount.unmount()?;
    if let Ok(map) = counter.0.lock() {
        for (kind, (n, bytes)) in map.iter() {
            println!("{kind:12} {n:10} {bytes:14} bytes");
        }
    }
    Ok(())
}
