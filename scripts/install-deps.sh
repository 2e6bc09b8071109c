#!/bin/sh
# Installs what tandem's demo and test suite need on a fresh Debian machine (run as root).
set -eu
missing=""
for pair in ip:iproute2 nft:nftables nsenter:util-linux unshare:util-linux curl:curl ping:iputils-ping \
    sqlite3:sqlite3 cc:build-essential pkg-config:pkg-config jq:jq setfattr:attr ps:procps \
    hostname:hostname ipcmk:util-linux; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing="$missing ${pair#*:}"
done
# pjdfstest (POSIX conformance of the replicated filesystem) links against libacl.
[ -e /usr/include/sys/acl.h ] || missing="$missing libacl1-dev"
# PostgreSQL (bench/replication.sh's pgbench, the PostgreSQL acceptance test with pg_amcheck): server,
# client and contrib; Debian keeps initdb, pgbench and pg_amcheck in /usr/lib/postgresql/<version>/bin.
# No cluster of its own is created or started: the benchmark and the tests run their own.
if ! ls /usr/lib/postgresql/*/bin/pg_amcheck /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    missing="$missing postgresql postgresql-client postgresql-contrib"
    mkdir -p /etc/postgresql-common/createcluster.d
    echo "create_main_cluster = false" >/etc/postgresql-common/createcluster.d/tandem.conf
fi
[ -e /dev/fuse ] || echo "warning: /dev/fuse is missing: the filesystem tests cannot mount" >&2
if [ -n "$missing" ]; then
    echo "installing:$missing"
    apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing
fi
if ! command -v cargo >/dev/null 2>&1; then
    if [ -x "$HOME/.cargo/bin/cargo" ]; then
        PATH="$HOME/.cargo/bin:$PATH"
    else
        echo "installing the Rust toolchain with rustup"
        apt-get install -y -qq curl ca-certificates build-essential
        curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c rustfmt,clippy
        PATH="$HOME/.cargo/bin:$PATH"
    fi
fi
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt 2>/dev/null || true
if ! command -v pjdfstest >/dev/null 2>&1; then
    echo "installing pjdfstest (POSIX filesystem conformance suite)"
    cargo install --locked --quiet pjdfstest --version 0.2.2
fi
