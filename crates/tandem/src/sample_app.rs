//! The demo's sample application: a tiny HTTP service that counts requests in a file under the
//! replicated directory (`tandem demo app`).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

/// Serves forever: every request increments `DIR/counter` (written durably) and answers with the
/// node name and the count.
pub fn serve(listen: SocketAddr, dir: &Path, node: &str) -> Result<()> {
    let listener =
        TcpListener::bind(listen).with_context(|| format!("cannot listen on {listen}"))?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    eprintln!(
        "sample app of {node} listening on {listen}, counting in {}",
        dir.display()
    );
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let mut reader = BufReader::new(match stream.try_clone() {
            Ok(clone) => clone,
            Err(_) => continue,
        });
        let mut line = String::new();
        // Read the request head; the content does not matter.
        while reader
            .read_line(&mut line)
            .map(|read| read > 2)
            .unwrap_or(false)
        {
            line.clear();
        }
        let count = match increment(dir) {
            Ok(count) => count,
            Err(error) => {
                let _ = write!(
                    stream,
                    "HTTP/1.1 500 Internal Server Error\r\nConnection: close\r\n\r\n{error:#}\n"
                );
                continue;
            }
        };
        let body = format!("{node}: request {count}\n");
        let _ = write!(
            stream,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }
    Ok(())
}

fn increment(dir: &Path) -> Result<u64> {
    let path = dir.join("counter");
    let count = std::fs::read_to_string(&path)
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok())
        .unwrap_or(0)
        + 1;
    let temporary = dir.join("counter.tmp");
    {
        let mut file = std::fs::File::create(&temporary)?;
        writeln!(file, "{count}")?;
        file.sync_all()?;
    }
    std::fs::rename(&temporary, &path)?;
    Ok(count)
}
