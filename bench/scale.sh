#!/bin/bash
# Scale benchmark (not a test; issue 11 "Benchmark"). In one run on this machine, for the plain
# local directory, a no-op passthrough FUSE mount (tandem-fs with its LocalOnly replicator) and
# the replicated directory (the demo lab's node1, PRIM with node2 SECOND):
#   1. create N empty files in D directories (W writers in parallel, `xargs touch`);
#   2. `find | wc -l` of the tree, then `stat` of every file (`find -printf %s`), right after the
#      creation (and a `sync`) as an application would (what the kernel cached is used: the
#      targets);
#   3. the same two with the kernel's caches dropped before each ("cold": every entry is looked
#      up again, one request each through FUSE; reported, no target);
#   4. remove every file (W writers in parallel);
# then the rates, the ratios, and for the replicated leg the peak descriptors and resident memory
# of both daemons, with the targets as PASS/FAIL lines. A missed target does not fail the run;
# errors do (exit 1).
#
#   sudo bench/scale.sh [--files 1000000] [--dirs 1000] [--writers 4] [--legs local,noop,repl]
#                       [--scratch /var/tmp/tandem-scale]
#
# Everything it starts (the no-op mount, the demo lab) is removed on exit, Ctrl-C included. The
# replicated leg is not run while a demo lab is up (it is not ours to remove).
set -eu -o pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '13,14p' "$0" | sed 's/^# \{0,1\}//'; }

FILES=1000000
DIRS=1000
WRITERS=4
LEGS=local,noop,repl
SCRATCH=/var/tmp/tandem-scale
REPLICATED=/srv/tandem-scale
while [ $# -gt 0 ]; do
    case "$1" in
        --files) FILES=$2; shift 2 ;;
        --dirs) DIRS=$2; shift 2 ;;
        --writers) WRITERS=$2; shift 2 ;;
        --legs) LEGS=$2; shift 2 ;;
        --scratch) SCRATCH=$(realpath -m "$2"); shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
done
for number in "$FILES" "$DIRS" "$WRITERS"; do
    case "$number" in '' | *[!0-9]* | 0) echo "not a positive integer: $number" >&2; exit 2 ;; esac
done
[ $((DIRS % WRITERS)) = 0 ] || { echo "--dirs must be a multiple of --writers" >&2; exit 2; }
[ $((FILES % DIRS)) = 0 ] || { echo "--files must be a multiple of --dirs" >&2; exit 2; }
has_leg() { case ",$LEGS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
[ "$(id -u)" = 0 ] || { echo "run as root (FUSE mounts, network namespaces)" >&2; exit 2; }

./scripts/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --locked -p tandem --bin tandem
cargo build --release --locked -p tandem-fs --example mount
TARGET=$(realpath "${CARGO_TARGET_DIR:-target}")
TANDEM=$TARGET/release/tandem
NOOP_MOUNT=$TARGET/release/examples/mount
cd /

WORK=
NOOP_PID=
NOOP_HOLDER=
SAMPLERS=
LAB_UP=0

# shellcheck disable=SC2317 # (the EXIT trap)
cleanup() {
    local status=$? pid
    trap - EXIT INT TERM
    for pid in $SAMPLERS; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
    if [ -n "$NOOP_PID" ]; then
        [ -z "$NOOP_HOLDER" ] || { kill "$NOOP_HOLDER" 2>/dev/null || true; wait "$NOOP_HOLDER" 2>/dev/null || true; }
        for _ in $(seq 600); do kill -0 "$NOOP_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$NOOP_PID" 2>/dev/null || true
        wait "$NOOP_PID" 2>/dev/null || true
    fi
    if [ "$LAB_UP" = 1 ]; then
        "$TANDEM" demo down >/dev/null || echo "warning: \`tandem demo down\` failed; run it again" >&2
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

mkdir -p "$SCRATCH"
WORK=$(mktemp -d "$SCRATCH/run.XXXXXX")
mkdir -p "$WORK/local" "$WORK/noop" "$WORK/log"

now() { date +%s.%N; }
# Items per second since $2.
rate() { awk -v n="$1" -v t0="$2" -v t1="$(now)" 'BEGIN { printf "%.0f", n / (t1 - t0) }'; }
declare -A FIG
# The four phases on the tree at $2, run through the command prefix in the array named $3.
run_phases() {
    local leg=$1 dir=$2 prefix_name=$3 start per_dir=$((FILES / DIRS)) dirs_per_writer=$((DIRS / WRITERS))
    local -n prefix=$prefix_name
    local writers="pids=; for w in \$(seq 0 $((WRITERS - 1))); do ( for d in \$(seq \$((w * $dirs_per_writer)) \$((w * $dirs_per_writer + $dirs_per_writer - 1))); do"
    local wait_all="done ) & pids=\"\$pids \$!\"; done; for p in \$pids; do wait \$p || exit 1; done"
    start=$(now)
    "${prefix[@]}" sh -c "cd $dir && $writers mkdir d\$d && (cd d\$d && seq 1 $per_dir | sed 's/^/f/' | xargs touch) || exit 1; $wait_all"
    FIG[$leg.create]=$(rate "$FILES" "$start")
    # The creation's dirty metadata is written back before the next phase (on every leg), so
    # that the kernel's writeback does not compete with the listing for this machine's CPUs.
    sync
    local found suffix
    for suffix in "" _cold; do
        [ -z "$suffix" ] || echo 3 >/proc/sys/vm/drop_caches
        start=$(now)
        found=$("${prefix[@]}" sh -c "find $dir | wc -l")
        FIG[$leg.find$suffix]=$(rate "$found" "$start")
        [ "$found" = $((FILES + DIRS + 1)) ] || { echo "$leg: find saw $found entries, expected $((FILES + DIRS + 1))" >&2; exit 1; }
        [ -z "$suffix" ] || echo 3 >/proc/sys/vm/drop_caches
        start=$(now)
        found=$("${prefix[@]}" sh -c "find $dir -type f -printf '%s\n' | wc -l")
        FIG[$leg.stat$suffix]=$(rate "$found" "$start")
        [ "$found" = "$FILES" ] || { echo "$leg: stat saw $found files" >&2; exit 1; }
    done
    start=$(now)
    "${prefix[@]}" sh -c "cd $dir && $writers rm -rf d\$d || exit 1; $wait_all"
    FIG[$leg.remove]=$(rate "$FILES" "$start")
    printf '  %-6s create %9.0f files/s   find %9.0f entries/s   stat %9.0f files/s   remove %9.0f files/s   (cold: find %9.0f, stat %9.0f)\n' \
        "$leg" "${FIG[$leg.create]}" "${FIG[$leg.find]}" "${FIG[$leg.stat]}" "${FIG[$leg.remove]}" "${FIG[$leg.find_cold]}" "${FIG[$leg.stat_cold]}"
}

echo "== $FILES files in $DIRS directories, $WRITERS writers"
direct=()
if has_leg local; then
    run_phases local "$WORK/local" direct
fi

if has_leg noop; then
    mkfifo "$WORK/noop.ctl"
    "$NOOP_MOUNT" "$WORK/noop" primary <"$WORK/noop.ctl" >"$WORK/log/noop-mount.log" 2>&1 &
    NOOP_PID=$!
    sleep infinity >"$WORK/noop.ctl" &
    NOOP_HOLDER=$!
    for _ in $(seq 100); do
        grep -q '^mounted' "$WORK/log/noop-mount.log" && break
        kill -0 "$NOOP_PID" 2>/dev/null || break
        sleep 0.1
    done
    [ "$(findmnt -n -o FSTYPE --mountpoint "$WORK/noop" | tail -n 1 || true)" = fuse.tandem ] ||
        { cat "$WORK/log/noop-mount.log" >&2; echo "the no-op mount did not come up" >&2; exit 1; }
    run_phases noop "$WORK/noop" direct
    kill "$NOOP_HOLDER"; wait "$NOOP_HOLDER" 2>/dev/null || true; NOOP_HOLDER=
    wait "$NOOP_PID" || true; NOOP_PID=
fi

# Peak descriptors and resident memory (KiB) of a process, sampled every 0.2 s into a file.
sample() {
    local pid=$1 out=$2 fds rss peak_fds=0 peak_rss=0
    while kill -0 "$pid" 2>/dev/null; do
        fds=$(find "/proc/$pid/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
        rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status" 2>/dev/null || echo 0)
        [ "$fds" -le "$peak_fds" ] || peak_fds=$fds
        [ "${rss:-0}" -le "$peak_rss" ] || peak_rss=$rss
        echo "$peak_fds $peak_rss" >"$out"
        sleep 0.2
    done
}

if has_leg repl; then
    if "$TANDEM" demo info --json >/dev/null 2>&1; then
        echo "a demo lab is already running (not started by this benchmark): no replicated leg" >&2
        exit 1
    fi
    mkdir -p "$WORK/scripts"
    LAB_UP=1
    "$TANDEM" demo up --scripts "$WORK/scripts" --replicated "$REPLICATED" >"$WORK/log/demo-up.log" 2>&1 ||
        { tail -20 "$WORK/log/demo-up.log" >&2; exit 1; }
    info=$("$TANDEM" demo info --json)
    pids=()
    for node in node1 node2; do
        pids+=("$(jq -r ".hosts[] | select(.name==\"$node\") | .daemon_pid" <<<"$info")")
    done
    rss0=()
    for i in 0 1; do
        rss0+=("$(awk '/^VmRSS:/ { print $2 }' "/proc/${pids[$i]}/status")")
        sample "${pids[$i]}" "$WORK/peak.$i" &
        SAMPLERS="$SAMPLERS $!"
    done
    in_node1=("$TANDEM" demo exec node1 --)
    "${in_node1[@]}" mkdir -p "$REPLICATED/scale"
    epoch_before=$("$TANDEM" demo exec node1 -- tandem status --json | jq -r '.modules[0].epoch')
    run_phases repl "$REPLICATED/scale" in_node1
    state=$("$TANDEM" demo exec node1 -- tandem status --json | jq -r '[.modules[0].state, .modules[0].epoch] | @tsv')
    [ "$state" = "PRIM	$epoch_before" ] || echo "WARNING: the pair did not stay PRIM/SECOND in epoch $epoch_before: $state" >&2
    sleep 0.5
    for i in 0 1; do
        read -r fds rss <"$WORK/peak.$i"
        FIG[repl.fds.$i]=$fds
        FIG[repl.rss.$i]=$rss
        FIG[repl.bytes_per_inode.$i]=$(( (FIG[repl.rss.$i] - rss0[i]) * 1024 / FILES ))
        echo "  node$((i + 1)) daemon: peak ${FIG[repl.fds.$i]} descriptors, peak resident ${FIG[repl.rss.$i]} KiB (+$(( FIG[repl.rss.$i] - rss0[i] )) KiB: ${FIG[repl.bytes_per_inode.$i]} bytes per file)"
    done
fi

echo
echo "== ratios and targets"
verdict() { if awk "BEGIN { exit !($1) }"; then echo PASS; else echo FAIL; fi; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
if has_leg repl && has_leg noop; then
    r=$(ratio "${FIG[repl.create]}" "${FIG[noop.create]}")
    printf '%s create: replicated / no-op FUSE = %.2f (target >= 0.20)\n' "$(verdict "$r >= 0.20")" "$r"
fi
if has_leg repl && has_leg local; then
    for phase in find stat; do
        r=$(ratio "${FIG[repl.$phase]}" "${FIG[local.$phase]}")
        printf '%s %s: replicated / local = %.2f (target >= 0.50)\n' "$(verdict "$r >= 0.50")" "$phase" "$r"
    done
    for phase in find stat; do
        r=$(ratio "${FIG[repl.${phase}_cold]}" "${FIG[local.${phase}_cold]}")
        printf 'info %s with the caches dropped: replicated / local = %.2f (no target: one FUSE request per entry)\n' "$phase" "$r"
    done
fi
if has_leg repl; then
    for i in 0 1; do
        printf '%s node%d descriptors: peak %d (target < 1000)\n' "$(verdict "${FIG[repl.fds.$i]} < 1000")" $((i + 1)) "${FIG[repl.fds.$i]}"
        printf '%s node%d resident memory: %d bytes per file (target < 200)\n' "$(verdict "${FIG[repl.bytes_per_inode.$i]} < 200")" $((i + 1)) "${FIG[repl.bytes_per_inode.$i]}"
    done
fi
