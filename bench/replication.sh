#!/bin/bash
# Replication benchmark (not a test; issue 4 "Benchmark"). Measures, in one run on this machine:
# the replicated directory (the demo lab's node1, PRIM with node2 SECOND), the plain local
# directory, a no-op passthrough FUSE mount (tandem-fs with its LocalOnly replicator), and the
# two-copy limit (both replicas share this disk: the same data written twice at once), with
#   1. sequential 1 MiB writes, fsync at the end (MB/s, 10^6 bytes);
#   2. 4 KiB write + fsync at queue depth 1 on a fresh, growing file (IOPS, p50/p99 latency);
#   3. pgbench -c 4 (TPS), PostgreSQL with its data directory in the place under test;
# then prints the figures, ratios and the targets as PASS/FAIL lines. A missed target does not
# fail the run; errors do (exit 1), and so does a replicated leg that cannot be measured.
#
#   sudo bench/replication.sh [--mib 1024] [--seconds 10] [--runs 1] [--pg-scale 10] [--pg-seconds 30]
#                             [--scratch /var/tmp/tandem-bench] [--no-replicated] [--no-pgbench]
#                             [--repl-wait 120] [--json FILE] [--legs local,twocopy,noop,repl]
#                             [--no-bracket]
#
# --runs N repeats workloads 1 and 2 and keeps the median run (the lower middle one for even N);
# --legs runs only some places (the ratios need local, twocopy and repl together);
# --no-replicated is --legs local,twocopy,noop;
# the local and two-copy legs run again after the replicated one (unless --no-bracket), and the
# ratios use the mean of both, so that a drift of the disk's speed during the run (this VM's disk
# moves by 1.5-4x between minutes) biases them less; both figures are printed.
#
# Everything it starts (the no-op mount, PostgreSQL servers, the demo lab) is removed on exit,
# Ctrl-C included. The replicated leg is not run while a demo lab is up (it is not ours to remove).
set -eu -o pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '12,23p' "$0" | sed 's/^# \{0,1\}//'; }

MIB=1024
RUNS=1
SECONDS_4K=10
PG_SCALE=10
PG_SECONDS=30
PG_CLIENTS=4
PG_JOBS=2
SCRATCH=/var/tmp/tandem-bench
REPLICATED=/srv/tandem-bench
LEGS=local,twocopy,noop,repl
WITH_PGBENCH=1
REPL_WAIT=120
JSON_OUT=
BRACKET=1
while [ $# -gt 0 ]; do
    case "$1" in
        --mib) MIB=$2; shift 2 ;;
        --runs) RUNS=$2; shift 2 ;;
        --seconds) SECONDS_4K=$2; shift 2 ;;
        --pg-scale) PG_SCALE=$2; shift 2 ;;
        --pg-seconds) PG_SECONDS=$2; shift 2 ;;
        --scratch) SCRATCH=$(realpath -m "$2"); shift 2 ;;
        --legs) LEGS=$2; shift 2 ;;
        --no-replicated) LEGS=local,twocopy,noop; shift ;;
        --no-pgbench) WITH_PGBENCH=0; shift ;;
        --repl-wait) REPL_WAIT=$2; shift 2 ;;
        --json) JSON_OUT=$(realpath -m "$2"); shift 2 ;;
        --no-bracket) BRACKET=0; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
done
for number in "$MIB" "$RUNS" "$SECONDS_4K" "$PG_SCALE" "$PG_SECONDS" "$REPL_WAIT"; do
    case "$number" in '' | *[!0-9]* | 0) echo "not a positive integer: $number" >&2; exit 2 ;; esac
done
for leg in ${LEGS//,/ }; do
    case "$leg" in local | twocopy | noop | repl) ;; *) echo "unknown leg $leg" >&2; exit 2 ;; esac
done
has_leg() { case ",$LEGS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
[ "$(id -u)" = 0 ] || { echo "run as root (FUSE mounts, network namespaces)" >&2; exit 2; }

# ---------------------------------------------------------------------------------------------
# Build.

./scripts/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
export RUST_BACKTRACE=0 RUST_LIB_BACKTRACE=0
cargo build --release --locked -p tandem --bin tandem --example io_bench
cargo build --release --locked -p tandem-fs --example mount
TARGET=$(realpath "${CARGO_TARGET_DIR:-target}")
TANDEM=$TARGET/release/tandem
IO_BENCH=$TARGET/release/examples/io_bench
NOOP_MOUNT=$TARGET/release/examples/mount
# Everything below uses absolute paths; PostgreSQL's tools run as postgres, who may not be able to
# enter the repository.
cd /

PGBIN=
if [ "$WITH_PGBENCH" = 1 ]; then
    for dir in $(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V); do
        if [ -x "$dir/initdb" ] && [ -x "$dir/pgbench" ]; then PGBIN=$dir; fi
    done
    [ -n "$PGBIN" ] || { echo "PostgreSQL (initdb, pgbench) not found under /usr/lib/postgresql" >&2; exit 1; }
    id postgres >/dev/null 2>&1 || { echo "no postgres user (install postgresql)" >&2; exit 1; }
fi

# ---------------------------------------------------------------------------------------------
# Clean-up of everything this run starts, on any exit.

WORK=
NOOP_PID=
NOOP_HOLDER=
NOOP_DIR=
LAB_UP=0
DEMO_UP_PID=
PG_PIDS=""

# shellcheck disable=SC2317 # (called from the clean-up trap)
stop_postgres_pid() {
    local pid=$1
    # Only a live postgres process (the PID was read from the postmaster.pid we created).
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = postgres ] || return 0
    kill -INT "$pid" 2>/dev/null || return 0
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
    kill -QUIT "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
}

unmount_noop() {
    [ -n "$NOOP_PID" ] || return 0
    # The mount tool unmounts when its stdin closes: the FIFO's only writer is the holder.
    if [ -n "$NOOP_HOLDER" ]; then
        kill "$NOOP_HOLDER" 2>/dev/null || true
        wait "$NOOP_HOLDER" 2>/dev/null || true
        NOOP_HOLDER=
    fi
    for _ in $(seq 300); do kill -0 "$NOOP_PID" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$NOOP_PID" 2>/dev/null; then
        echo "the no-op mount did not exit within 30 s; killing it (its watchdog detaches the mount)" >&2
        tail -5 "$WORK/log/noop-mount.log" >&2 || true
        kill -KILL "$NOOP_PID" 2>/dev/null || true
        sleep 1
    fi
    wait "$NOOP_PID" 2>/dev/null || true
    NOOP_PID=
    if [ -n "$NOOP_DIR" ] && mountpoint -q "$NOOP_DIR"; then
        umount -l "$NOOP_DIR" || true
    fi
}

lab_down() {
    if [ -n "$DEMO_UP_PID" ]; then
        # `demo up` runs in its own session (Ctrl-C does not cut it in half): let it finish.
        for _ in $(seq 600); do kill -0 "$DEMO_UP_PID" 2>/dev/null || break; sleep 0.2; done
        wait "$DEMO_UP_PID" 2>/dev/null || true
        DEMO_UP_PID=
    fi
    [ "$LAB_UP" = 1 ] || return 0
    LAB_UP=0
    "$TANDEM" demo down >/dev/null || echo "warning: \`tandem demo down\` failed; run it again" >&2
}

# shellcheck disable=SC2317 # (the EXIT trap)
cleanup() {
    local status=$? pid
    trap - EXIT INT TERM
    for pid in $PG_PIDS; do stop_postgres_pid "$pid"; done
    PG_PIDS=""
    unmount_noop
    lab_down
    if [ "$status" != 0 ] && [ "$status" != 130 ] && [ -d "$WORK/log" ]; then
        local kept
        kept=$SCRATCH/logs-$(date +%Y%m%d-%H%M%S)
        cp -r "$WORK/log" "$kept" && echo "logs of this run kept in $kept" >&2
    fi
    if [ -n "$WORK" ] && [ -d "$WORK" ]; then
        if findmnt -rn -o TARGET | grep -q "^$WORK"; then
            echo "warning: something is still mounted under $WORK; not removing it" >&2
        else
            rm -rf "$WORK"
        fi
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'echo "interrupted" >&2; exit 130' INT TERM

# ---------------------------------------------------------------------------------------------
# Scratch space: the plain and no-op legs run here, on the filesystem of the lab's replicated
# directories (the lab keeps them under /run/tandem-lab/<lab>/<node>/data/).

mkdir -p "$SCRATCH"
chmod 755 "$SCRATCH"
WORK=$(mktemp -d "$SCRATCH/run.XXXXXX")
chmod 755 "$WORK"
mkdir -p "$WORK/local" "$WORK/copy1" "$WORK/copy2" "$WORK/noop" "$WORK/log" "$WORK/sock"
chown postgres "$WORK/sock" 2>/dev/null || true
LAB_FS_PROBE=/run/tandem-lab
[ -d "$LAB_FS_PROBE" ] || LAB_FS_PROBE=/run
if [ "$(stat -c %d "$WORK")" != "$(stat -c %d "$LAB_FS_PROBE")" ]; then
    echo "WARNING: $SCRATCH ($(df --output=source "$WORK" | tail -1)) is not on the filesystem of" \
        "the lab's replicated directories ($LAB_FS_PROBE: $(df --output=source "$LAB_FS_PROBE" | tail -1));" \
        "use --scratch DIR on that filesystem for a fair comparison" >&2
fi
if [ "$(stat -f -c %T "$LAB_FS_PROBE")" = tmpfs ]; then
    echo "WARNING: $LAB_FS_PROBE is tmpfs: the lab's replicated directories live in memory, the" \
        "replicated figures are not comparable with a disk" >&2
fi

# ---------------------------------------------------------------------------------------------
# Helpers.

# A command inside the lab's node1 (its network and mount namespaces).
in_node1=("$TANDEM" demo exec node1 --)

# Figures: RESULTS[<place>.<figure>] (place: local, noop, repl, twocopy).
declare -A RESULTS=()
declare -A NOTES=()

settle() { sync; sleep 1; }

jfield() { printf '%s' "$1" | jq -r "$2"; }

# run_io PLACE LABEL ARGS...: runs io_bench ARGS (inside the lab's node1 for PLACE repl) --runs
# times and stores the JSON of the median run (by MB/s or IOPS) in RESULTS[PLACE.LABEL].
run_io() {
    local place=$1 label=$2 out all=() run
    shift 2
    local prefix=()
    if [ "$place" = repl ]; then prefix=("${in_node1[@]}"); fi
    for run in $(seq "$RUNS"); do
        settle
        out=$("${prefix[@]}" "$IO_BENCH" "$@")
        echo "$place $label run $run: $out" >>"$WORK/log/raw.txt"
        all+=("$out")
    done
    if [ "$RUNS" -gt 1 ]; then
        printf '  %-10s %-12s runs: %s\n' "$place" "$label" \
            "$(printf '%s\n' "${all[@]}" | jq -r '.mb_per_s // .iops' | paste -sd ' ')"
    fi
    RESULTS[$place.$label]=$(printf '%s\n' "${all[@]}" |
        jq -sc 'sort_by(.mb_per_s // .iops) | .[(length - 1) / 2 | floor]')
}

show_io() {
    local place=$1 label=$2 json
    json=${RESULTS[$place.$label]:-}
    [ -n "$json" ] || return 0
    case "$label" in
        seq*) printf '  %-10s %-12s %8s MB/s  (%s s, fsync %s s)\n' "$place" "$label" \
            "$(jfield "$json" .mb_per_s)" "$(jfield "$json" .seconds)" \
            "$(jfield "$json" '[.per_stream[].fsync_seconds] | max')" ;;
        *) printf '  %-10s %-12s %8s IOPS per stream  p50 %s us  p99 %s us  (write p50 %s us, fsync p50 %s us)\n' \
            "$place" "$label" "$(jfield "$json" .iops)" "$(jfield "$json" .p50_us)" \
            "$(jfield "$json" .p99_us)" "$(jfield "$json" .write_p50_us)" "$(jfield "$json" .fsync_p50_us)" ;;
    esac
}

# pgbench_leg PLACE DIR EXEC...: PostgreSQL with its data directory in DIR/pg (DIR as seen through
# the EXEC prefix), on a private Unix socket only; stores the TPS in RESULTS[PLACE.tps].
PORT=55432
pgbench_leg() {
    local place=$1 dir=$2 data log pid tps latency
    shift 2
    local prefix=("$@")
    PORT=$((PORT + 1))
    data=$dir/pg
    log=$WORK/log/postgres-$place.log
    touch "$log"
    chown postgres "$log"
    local as_pg=("${prefix[@]}" runuser -u postgres --)
    "${prefix[@]}" mkdir -p "$data"
    "${prefix[@]}" chown postgres "$data"
    "${prefix[@]}" chmod 700 "$data"
    echo "  $place: initdb in $data"
    "${as_pg[@]}" "$PGBIN/initdb" -D "$data" -A trust -U postgres -E UTF8 --no-instructions \
        >"$WORK/log/initdb-$place.log" 2>&1 ||
        { tail -20 "$WORK/log/initdb-$place.log" >&2; return 1; }
    # Defaults otherwise: fsync on, synchronous_commit on, full_page_writes on.
    "${as_pg[@]}" sh -c "cat >> '$data/postgresql.conf'" <<EOF
listen_addresses = ''
port = $PORT
unix_socket_directories = '$WORK/sock'
shared_buffers = 128MB
EOF
    "${as_pg[@]}" "$PGBIN/pg_ctl" -D "$data" -l "$log" -w -t 120 start >/dev/null ||
        { tail -20 "$log" >&2; return 1; }
    pid=$("${prefix[@]}" head -1 "$data/postmaster.pid")
    PG_PIDS="$PG_PIDS $pid"
    local pgb=("${as_pg[@]}" "$PGBIN/pgbench" -h "$WORK/sock" -p "$PORT")
    echo "  $place: pgbench -i -s $PG_SCALE"
    "${pgb[@]}" -i -q -s "$PG_SCALE" postgres >"$WORK/log/pgbench-init-$place.log" 2>&1 ||
        { tail -20 "$WORK/log/pgbench-init-$place.log" >&2; return 1; }
    "${as_pg[@]}" "$PGBIN/psql" -h "$WORK/sock" -p "$PORT" -qAt -c CHECKPOINT postgres >/dev/null
    settle
    echo "  $place: pgbench -c $PG_CLIENTS -j $PG_JOBS -T $PG_SECONDS"
    "${pgb[@]}" -c "$PG_CLIENTS" -j "$PG_JOBS" -T "$PG_SECONDS" postgres \
        >"$WORK/log/pgbench-$place.log" 2>&1 ||
        { tail -20 "$WORK/log/pgbench-$place.log" >&2; return 1; }
    tps=$(awk '/^tps = / { print $3; exit }' "$WORK/log/pgbench-$place.log")
    latency=$(awk '/^latency average = / { print $4; exit }' "$WORK/log/pgbench-$place.log")
    [ -n "$tps" ] || { cat "$WORK/log/pgbench-$place.log" >&2; return 1; }
    RESULTS[$place.tps]=$(printf '%.1f' "$tps")
    RESULTS[$place.pg_latency_ms]=$latency
    printf '  %-10s pgbench      %8s TPS  (latency average %s ms)\n' "$place" "${RESULTS[$place.tps]}" "$latency"
    "${as_pg[@]}" "$PGBIN/pg_ctl" -D "$data" -m fast -w -t 60 stop >/dev/null
    PG_PIDS=${PG_PIDS/ $pid/}
    if [ "$place" = repl ]; then
        # Sanity check of the product: after a clean shutdown both backing copies are equal.
        local primary=$LAB_DIR/node1/data/0${data#"$REPLICATED"} secondary=$LAB_DIR/node2/data/0${data#"$REPLICATED"}
        if diff -rq "$primary" "$secondary" >"$WORK/log/diff-repl.txt" 2>&1; then
            echo "  repl: the data directory is identical on node1 and node2 ($(du -sm "$secondary" | cut -f1) MiB)"
        else
            local differences
            differences=$(head -3 "$WORK/log/diff-repl.txt" | paste -sd ';')
            NOTES[repl.tps]="INVALID: the data directories of node1 and node2 differ: $differences"
            echo "  repl: ${NOTES[repl.tps]}" >&2
        fi
    fi
    "${prefix[@]}" rm -rf "$data"
}

echo
echo "tandem replication benchmark: $(nproc) cores, kernel $(uname -r)," \
    "scratch $WORK on $(df --output=source "$WORK" | tail -1) ($(stat -f -c %T "$WORK"))"
echo "workloads: seq ${MIB} MiB in 1 MiB writes + fsync; 4 KiB write+fsync QD1 for ${SECONDS_4K} s" \
    "(fresh file, appending, not preallocated); pgbench scale $PG_SCALE, -c $PG_CLIENTS -j $PG_JOBS -T $PG_SECONDS"

# ---------------------------------------------------------------------------------------------
# 1. The plain local directory, and the two-copy limit.

# baseline_legs SUFFIX WHEN: the local and two-copy legs, their figures stored as places
# local$SUFFIX and twocopy$SUFFIX.
baseline_legs() {
    local suffix=$1 when=$2
    if has_leg local; then
        echo
        echo "== plain local directory$when"
        run_io "local$suffix" seq seq --mib "$MIB" "$WORK/local"
        show_io "local$suffix" seq
        run_io "local$suffix" fsync4k fsync4k --seconds "$SECONDS_4K" "$WORK/local"
        show_io "local$suffix" fsync4k
        if [ "$WITH_PGBENCH" = 1 ]; then
            chmod 755 "$WORK/local"
            pgbench_leg "local$suffix" "$WORK/local"
        fi
    fi
    if has_leg twocopy; then
        echo
        echo "== two-copy limit (two concurrent writers into two plain directories)$when"
        run_io "twocopy$suffix" seq seq --mib "$MIB" --parallel 2 "$WORK/copy1" "$WORK/copy2"
        show_io "twocopy$suffix" seq
        run_io "twocopy$suffix" fsync4k fsync4k --seconds "$SECONDS_4K" --parallel 2 \
            "$WORK/copy1" "$WORK/copy2"
        show_io "twocopy$suffix" fsync4k
    fi
}
baseline_legs "" ""

# ---------------------------------------------------------------------------------------------
# 2. A no-op passthrough FUSE mount: tandem-fs in place, LocalOnly replicator.

noop_leg() {
    echo
    echo "== no-op FUSE mount (tandem-fs, LocalOnly)"
    mkfifo "$WORK/noop.ctl"
    NOOP_DIR=$WORK/noop
    "$NOOP_MOUNT" "$NOOP_DIR" primary <"$WORK/noop.ctl" >"$WORK/log/noop-mount.log" 2>&1 &
    NOOP_PID=$!
    # The FIFO's writer is a process of its own, so that no other child inherits the write end.
    sleep infinity >"$WORK/noop.ctl" &
    NOOP_HOLDER=$!
    for _ in $(seq 100); do
        grep -q '^mounted' "$WORK/log/noop-mount.log" && break
        kill -0 "$NOOP_PID" 2>/dev/null || break
        sleep 0.1
    done
    if [ "$(findmnt -n -o FSTYPE --mountpoint "$NOOP_DIR" | tail -n 1 || true)" != fuse.tandem ]; then
        cat "$WORK/log/noop-mount.log" >&2
        echo "the no-op mount did not come up" >&2
        exit 1
    fi
    run_io noop seq seq --mib "$MIB" "$NOOP_DIR"
    show_io noop seq
    run_io noop fsync4k fsync4k --seconds "$SECONDS_4K" "$NOOP_DIR"
    show_io noop fsync4k
    if [ "$WITH_PGBENCH" = 1 ]; then
        pgbench_leg noop "$NOOP_DIR"
    fi
    unmount_noop
}
if has_leg noop; then noop_leg; fi

# ---------------------------------------------------------------------------------------------
# 3. The replicated directory: node1 of the demo lab, PRIM with node2 SECOND.

# Prints "ok <epoch>" when node1 is PRIM ready with node2 SECOND ready and up to date, the
# replication stream active and the directory a tandem mount; otherwise a reason.
repl_health() {
    local status fstype
    status=$("${in_node1[@]}" tandem status --json 2>&1) || { echo "no status: $status"; return 0; }
    fstype=$("${in_node1[@]}" findmnt -n -o FSTYPE --mountpoint "$REPLICATED" 2>/dev/null | tail -n 1 || true)
    printf '%s' "$status" | jq -r --arg fstype "$fstype" '.modules[0] as $m |
        if $m == null then "no module"
        elif ($m.state != "PRIM" or ($m.ready | not)) then "node1 is \($m.state) (ready \($m.ready))"
        elif ($m.peer.state != "SECOND" or ($m.peer.ready | not)) then "node2 is \($m.peer.state // "unknown") (ready \($m.peer.ready))"
        elif $m.peer.uptodate != true then "node2 is not up to date"
        elif ($m.replication.active | not) then "the replication stream is not active"
        elif $fstype != "fuse.tandem" then "the replicated directory is not a tandem mount (\($fstype))"
        else "ok \($m.epoch)" end' 2>/dev/null || echo "unreadable status: $status"
}

# Marks the figures of a replicated workload invalid if the pair was not PRIM/SECOND (same epoch)
# all along.
check_still_replicated() {
    local label=$1 epoch=$2 health
    health=$(repl_health)
    if [ "$health" != "ok $epoch" ]; then
        NOTES[repl.$label]="${NOTES[repl.$label]:+${NOTES[repl.$label]}; }INVALID: after the run: $health (epoch before: $epoch)"
        echo "  repl $label: ${NOTES[repl.$label]}" >&2
    fi
}

# Measures the replicated leg. Errors during the measurement stop the benchmark (set -e); a lab
# that cannot be started or does not replicate only sets REPL_ERROR.
REPL_ERROR=
LAB_DIR=
replicated_leg() {
    local up_status=0 health='' last='' epoch node
    if "$TANDEM" demo info --json >/dev/null 2>&1; then
        REPL_ERROR="a demo lab is already running (not started by this benchmark; \`tandem demo down\` first)"
        return 0
    fi
    mkdir -p "$WORK/scripts"
    echo "  starting the demo lab (node1 PRIM, node2 SECOND), replicated $REPLICATED"
    setsid "$TANDEM" demo up --scripts "$WORK/scripts" --replicated "$REPLICATED" \
        >"$WORK/log/demo-up.log" 2>&1 &
    DEMO_UP_PID=$!
    LAB_UP=1
    wait "$DEMO_UP_PID" || up_status=$?
    DEMO_UP_PID=
    if [ "$up_status" != 0 ]; then
        tail -20 "$WORK/log/demo-up.log" >&2
        REPL_ERROR="tandem demo up failed"
        return 0
    fi
    LAB_DIR=$("$TANDEM" demo info --json | jq -r .dir)
    if [ "$(stat -c %d "$LAB_DIR/node1/data/0")" != "$(stat -c %d "$WORK")" ]; then
        echo "WARNING: the replicated directory's backing ($LAB_DIR/node1/data/0) is not on the" \
            "scratch filesystem: the comparison is not like for like" >&2
    fi
    for _ in $(seq "$REPL_WAIT"); do
        health=$(repl_health)
        case "$health" in ok*) break ;; esac
        [ "$health" = "$last" ] || echo "  waiting: $health"
        last=$health
        sleep 1
    done
    case "$health" in
        ok*) ;;
        *)
            REPL_ERROR="not replicating after $REPL_WAIT s: $health"
            # The lab's logs go with the lab: keep a copy with this run's logs.
            for node in node1 node2; do
                cp -r "$LAB_DIR/$node/log" "$WORK/log/$node" 2>/dev/null || true
                cp "$LAB_DIR/$node/daemon.out" "$WORK/log/$node/" 2>/dev/null || true
            done
            return 0
            ;;
    esac
    epoch=${health#ok }
    echo "  node1 PRIM, node2 SECOND and up to date, replication active (epoch $epoch)"
    "${in_node1[@]}" mkdir -p "$REPLICATED/bench"
    run_io repl seq seq --mib "$MIB" "$REPLICATED/bench"
    check_still_replicated seq "$epoch"
    show_io repl seq
    run_io repl fsync4k fsync4k --seconds "$SECONDS_4K" "$REPLICATED/bench"
    check_still_replicated fsync4k "$epoch"
    show_io repl fsync4k
    if [ "$WITH_PGBENCH" = 1 ]; then
        "${in_node1[@]}" chmod 755 "$REPLICATED/bench"
        pgbench_leg repl "$REPLICATED/bench" "${in_node1[@]}"
        check_still_replicated tps "$epoch"
    fi
    "${in_node1[@]}" tandem status --json | jq -c '.modules[0].replication' |
        sed 's/^/  replication status after the runs: /'
}

if has_leg repl; then
    echo
    echo "== replicated directory (demo lab node1 -> node2)"
    replicated_leg
    [ -z "$REPL_ERROR" ] || echo "  replicated leg NOT MEASURED: $REPL_ERROR" >&2
    lab_down
    if [ "$BRACKET" = 1 ] && [ -z "$REPL_ERROR" ]; then
        baseline_legs _after " again, after the replicated leg"
    fi
else
    REPL_ERROR="not run (--legs $LEGS)"
fi

# ---------------------------------------------------------------------------------------------
# Report.

# Reference figures measured earlier on this machine with GlusterFS replica 2.
GLUSTER_SEQ=117
GLUSTER_SEQ_LOCAL=401
GLUSTER_IOPS=544
GLUSTER_TPS=534
GLUSTER_TPS_LOCAL=1581

fig() { # fig PLACE FIELD [LABEL]: a figure or empty
    local json
    case "$2" in
        tps) printf '%s' "${RESULTS[$1.tps]:-}" ;;
        *) json=${RESULTS[$1.${3:-}]:-}; if [ -n "$json" ]; then jfield "$json" ".$2"; fi ;;
    esac
}
calc() { awk "BEGIN { printf \"$1\", $2 }"; }
cell() { [ -n "$1" ] && printf '%s' "$1" || printf 'n/a'; }
# bracketed PLACE FIELD [LABEL]: the mean of the figure before and after the replicated leg
# (the one figure when it ran once).
bracketed() {
    local before after
    before=$(fig "$1" "$2" "${3:-}")
    after=$(fig "$1_after" "$2" "${3:-}")
    if [ -n "$before" ] && [ -n "$after" ]; then
        calc '%.1f' "($before + $after) / 2"
    else
        printf '%s' "$before"
    fi
}

SEQ_LOCAL=$(bracketed local mb_per_s seq) SEQ_NOOP=$(fig noop mb_per_s seq)
SEQ_REPL=$(fig repl mb_per_s seq) SEQ_TWO=$(bracketed twocopy mb_per_s seq)
IOPS_LOCAL=$(bracketed local iops fsync4k) IOPS_NOOP=$(fig noop iops fsync4k)
IOPS_REPL=$(fig repl iops fsync4k) IOPS_TWO=$(bracketed twocopy iops fsync4k)
lat() {
    if [ -n "${RESULTS[$1.fsync4k]:-}" ]; then echo "$(fig "$1" p50_us fsync4k)/$(fig "$1" p99_us fsync4k)"; fi
}
TPS_LOCAL=$(bracketed local tps) TPS_NOOP=$(fig noop tps) TPS_REPL=$(fig repl tps)

echo
echo "== results (same run, same machine)"
printf '%-34s %12s %12s %12s %16s\n' "" local "no-op FUSE" replicated "two-copy limit"
printf '%-34s %12s %12s %12s %16s\n' "seq 1 MiB writes + fsync (MB/s)" "$(cell "$SEQ_LOCAL")" \
    "$(cell "$SEQ_NOOP")" "$(cell "$SEQ_REPL")" "$(cell "$SEQ_TWO")"
printf '%-34s %12s %12s %12s %16s\n' "4K write+fsync QD1 (IOPS)" "$(cell "$IOPS_LOCAL")" \
    "$(cell "$IOPS_NOOP")" "$(cell "$IOPS_REPL")" "$(cell "${IOPS_TWO:+$IOPS_TWO /stream}")"
printf '%-34s %12s %12s %12s %16s\n' "  latency p50/p99 (us)" "$(cell "$(lat local)")" \
    "$(cell "$(lat noop)")" "$(cell "$(lat repl)")" "$(cell "$(lat twocopy)")"
printf '%-34s %12s %12s %12s %16s\n' "pgbench -c $PG_CLIENTS (TPS)" "$(cell "$TPS_LOCAL")" \
    "$(cell "$TPS_NOOP")" "$(cell "$TPS_REPL")" "-"
if [ -n "${RESULTS[local_after.fsync4k]:-}${RESULTS[twocopy_after.fsync4k]:-}" ]; then
    echo "  local and two-copy: the mean of the runs before and after the replicated leg:"
    for place in local twocopy; do
        [ -n "${RESULTS[${place}_after.fsync4k]:-}" ] || continue
        printf '    %-8s before/after: seq %s/%s MB/s, 4K %s/%s IOPS%s\n' "$place" \
            "$(cell "$(fig "$place" mb_per_s seq)")" "$(cell "$(fig "${place}_after" mb_per_s seq)")" \
            "$(cell "$(fig "$place" iops fsync4k)")" "$(cell "$(fig "${place}_after" iops fsync4k)")" \
            "$([ "$place" = local ] && [ -n "$(fig local tps)" ] &&
                printf ', pgbench %s/%s TPS' "$(fig local tps)" "$(cell "$(fig local_after tps)")")"
    done
fi
for key in "${!NOTES[@]}"; do echo "  note: $key: ${NOTES[$key]}"; done
echo "reference (GlusterFS replica 2, measured earlier on this machine): seq $GLUSTER_SEQ MB/s" \
    "(local $GLUSTER_SEQ_LOCAL MB/s then); 4K write+fsync $GLUSTER_IOPS IOPS;" \
    "pgbench $GLUSTER_TPS TPS (local $GLUSTER_TPS_LOCAL TPS then)"

echo
echo "== ratios"
ratio() { # ratio LABEL A B: A / B in percent
    if [ -n "$2" ] && [ -n "$3" ]; then
        printf '  %-44s %s %%\n' "$1" "$(calc '%.1f' "100 * $2 / $3")"
    fi
}
ratio "seq: no-op FUSE / local" "$SEQ_NOOP" "$SEQ_LOCAL"
ratio "seq: two-copy limit / local" "$SEQ_TWO" "$SEQ_LOCAL"
ratio "seq: replicated / local" "$SEQ_REPL" "$SEQ_LOCAL"
ratio "seq: replicated / two-copy limit" "$SEQ_REPL" "$SEQ_TWO"
ratio "4K IOPS: no-op FUSE / local" "$IOPS_NOOP" "$IOPS_LOCAL"
ratio "4K IOPS: two-copy limit (per stream) / local" "$IOPS_TWO" "$IOPS_LOCAL"
ratio "4K IOPS: replicated / local" "$IOPS_REPL" "$IOPS_LOCAL"
ratio "4K IOPS: replicated / two-copy limit" "$IOPS_REPL" "$IOPS_TWO"
ratio "pgbench TPS: no-op FUSE / local" "$TPS_NOOP" "$TPS_LOCAL"
ratio "pgbench TPS: replicated / local" "$TPS_REPL" "$TPS_LOCAL"

echo
echo "== targets (issue 4)"
# target LABEL VALUE THRESHOLD DESCRIPTION [NOTE-KEY]
target() {
    local label=$1 value=$2 threshold=$3 description=$4 note=${5:-}
    if [ -z "$value" ] || [ -z "$threshold" ]; then
        printf 'n/a   %s: %s (not measured%s)\n' "$label" "$description" \
            "$([ -n "$REPL_ERROR" ] && [ -z "$value" ] && printf ': %s' "$REPL_ERROR")"
    elif [ -n "$note" ] && [ -n "${NOTES[$note]:-}" ]; then
        printf 'n/a   %s: %s (%s)\n' "$label" "$description" "${NOTES[$note]}"
    elif [ "$(calc '%d' "($value >= $threshold)")" = 1 ]; then
        printf 'PASS  %s: %s\n' "$label" "$description"
    else
        printf 'FAIL  %s: %s\n' "$label" "$description"
    fi
}
pct() { [ -n "$1" ] && [ -n "$2" ] && calc '%.0f %%' "100 * $1 / $2" || echo "?"; }
thr() { if [ -n "$2" ]; then calc '%.1f' "$1 * $2"; fi; }
target "sequential" "$SEQ_REPL" "$(thr 0.8 "$SEQ_TWO")" \
    "replicated $(cell "$SEQ_REPL") MB/s = $(pct "$SEQ_REPL" "$SEQ_TWO") of the two-copy limit $(cell "$SEQ_TWO") MB/s (target >= 80 %)" repl.seq
target "sequential" "$SEQ_REPL" "$(thr 1.5 "$GLUSTER_SEQ")" \
    "replicated $(cell "$SEQ_REPL") MB/s vs GlusterFS $GLUSTER_SEQ MB/s (target >= 1.5 x = $(thr 1.5 "$GLUSTER_SEQ") MB/s)" repl.seq
target "4K write+fsync" "$IOPS_REPL" "$(thr 0.6 "$IOPS_LOCAL")" \
    "replicated $(cell "$IOPS_REPL") IOPS = $(pct "$IOPS_REPL" "$IOPS_LOCAL") of local $(cell "$IOPS_LOCAL") IOPS (target >= 60 %)" repl.fsync4k
target "4K write+fsync" "$IOPS_REPL" "$(thr 3 "$GLUSTER_IOPS")" \
    "replicated $(cell "$IOPS_REPL") IOPS vs GlusterFS $GLUSTER_IOPS IOPS (target >= 3 x = $(thr 3 "$GLUSTER_IOPS") IOPS)" repl.fsync4k
if [ "$WITH_PGBENCH" = 1 ]; then
    target "pgbench" "$TPS_REPL" "$(thr 0.7 "$TPS_LOCAL")" \
        "replicated $(cell "$TPS_REPL") TPS = $(pct "$TPS_REPL" "$TPS_LOCAL") of local $(cell "$TPS_LOCAL") TPS (target >= 70 %; GlusterFS: $GLUSTER_TPS vs $GLUSTER_TPS_LOCAL)" repl.tps
fi

if [ -n "$JSON_OUT" ]; then
    {
        for key in "${!RESULTS[@]}"; do
            value=${RESULTS[$key]}
            case "$value" in '{'*) ;; *) value=$(jq -n --arg v "$value" '$v | tonumber? // $v') ;; esac
            jq -n --arg k "$key" --argjson v "$value" '{($k): $v}'
        done
        for key in "${!NOTES[@]}"; do jq -n --arg k "note.$key" --arg v "${NOTES[$key]}" '{($k): $v}'; done
    } | jq -s 'add // {}' >"$JSON_OUT"
    echo "figures written to $JSON_OUT"
fi

if has_leg repl && [ -n "$REPL_ERROR" ]; then
    echo "the replicated leg could not be measured: $REPL_ERROR" >&2
    exit 1
fi
exit 0
