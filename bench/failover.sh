#!/bin/sh
# Failover benchmark (not a test): p50/p95 failover time over N kills of the primary, then a soak
# with both cores saturated that must show no false failover.
#   sudo bench/failover.sh [--runs 10] [--soak 300]
set -eu
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --locked --bin tandem --example failover_bench
exec ./target/release/examples/failover_bench "$@"
