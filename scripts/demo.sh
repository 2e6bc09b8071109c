#!/bin/sh
# Builds tandem and runs the demo cluster in a lab on this machine (run as root; Ctrl-C ends it).
set -eu
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --locked
exec ./target/release/tandem demo "$@"
