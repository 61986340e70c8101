#!/usr/bin/env bash
# Receive-to-acknowledge latency of durable CON requests at half of sluiced's maximum load
# (issue #7's p99 target), on loopback with `sluice load`. Prints a markdown table on stdout.
#
#   benches/latency.sh [SLUICED ARGS...]         # e.g. --io recvmmsg, --steering cpu
#
# Environment:
#   SLUICE_LAT_DURATION     seconds of each measured run (default 8, 1..120)
#   SLUICE_LAT_RUNS         half-load runs, each with a fresh sluiced (default 3, 1..10)
#   SLUICE_LAT_SERVER_CPUS  CPUs sluiced runs on (`taskset -c` list); default: any
#   SLUICE_LAT_CLIENT_CPUS  CPUs the load client runs on; default: any
#
# First one run at full load (100 devices, one request in flight each) gives the maximum; then
# each half-load run offers half of it (`--rate`) and reads, from /metrics, the server's p99
# receive-to-acknowledge and commit latencies (the highest over shards), beside the client's
# p50 / p99 and the CPU time the hypervisor took from this machine during the run (the `steal`
# column of /proc/stat). Uses the release binaries in target/release (build them first:
# cargo build --release --locked -p sluice-daemon -p sluice-tools --bin sluiced --bin sluice).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
D=${SLUICE_LAT_DURATION:-8}
RUNS=${SLUICE_LAT_RUNS:-3}
[[ $D =~ ^[0-9]+$ ]] && ((D >= 1 && D <= 120)) || { echo "SLUICE_LAT_DURATION: 1..120" >&2; exit 2; }
[[ $RUNS =~ ^[0-9]+$ ]] && ((RUNS >= 1 && RUNS <= 10)) || { echo "SLUICE_LAT_RUNS: 1..10" >&2; exit 2; }
for tool in curl jq ss taskset; do
    command -v "$tool" >/dev/null || { echo "latency.sh: needs $tool" >&2; exit 2; }
done
SLUICED=$ROOT/target/release/sluiced
SLUICE=$ROOT/target/release/sluice
[[ -x $SLUICED && -x $SLUICE ]] || { echo "latency.sh: release binaries missing" >&2; exit 1; }
SERVER_PIN=()
CLIENT_PIN=()
[[ -n ${SLUICE_LAT_SERVER_CPUS:-} ]] && SERVER_PIN=(taskset -c "$SLUICE_LAT_SERVER_CPUS")
[[ -n ${SLUICE_LAT_CLIENT_CPUS:-} ]] && CLIENT_PIN=(taskset -c "$SLUICE_LAT_CLIENT_CPUS")
WORK=$(mktemp -d "${TMPDIR:-/tmp}/sluice-latency.XXXXXX")
PID=""

cleanup() {
    local status=$?
    if [[ -n $PID ]]; then
        kill "$PID" 2>/dev/null || true
        wait "$PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT

log() { printf '[latency %s] %s\n' "$(date +%T)" "$*" >&2; }

# shellcheck source=common/free_port.sh
source "$ROOT/benches/common/free_port.sh"

steal() { awk '/^cpu / {print $9}' /proc/stat; }

# One fresh sluiced, one second of warm-up, one measured run of `sluice load ARGS`; prints
# "rate client_p50_us client_p99_us ack_p99_ms commit_p99_ms steal_s".
run() {
    local coap http dir m out before after
    coap=$(free_port)
    http=$(free_port)
    while [[ $http == "$coap" ]]; do http=$(free_port); done
    dir=$(mktemp -d "$WORK/run.XXXX")
    "${SERVER_PIN[@]}" "$SLUICED" --data-dir "$dir/data" --coap "127.0.0.1:$coap" \
        --http "127.0.0.1:$http" --durability fsync "${SLUICED_ARGS[@]}" >"$dir/log" 2>&1 &
    PID=$!
    for _ in $(seq 1 300); do
        kill -0 "$PID" 2>/dev/null || { tail -20 "$dir/log" >&2; return 1; }
        curl -sf -o /dev/null --max-time 1 "http://127.0.0.1:$http/readyz" && break
        sleep 0.1
    done
    timeout 60 "${CLIENT_PIN[@]}" "$SLUICE" load --target "127.0.0.1:$coap" --devices 100 \
        --duration 1 --device-prefix warm- --quiet >/dev/null 2>&1
    before=$(steal)
    out=$(timeout $((D + 120)) "${CLIENT_PIN[@]}" "$SLUICE" load --target "127.0.0.1:$coap" \
        --devices 100 --duration "$D" --mode con --json "$@" 2>/dev/null | tail -n 1)
    after=$(steal)
    m=$(curl -sf --max-time 5 "http://127.0.0.1:$http/metrics")
    kill "$PID"
    wait "$PID" 2>/dev/null || true
    PID=""
    quantile() {
        echo "$m" | awk -v name="$1" -v q="$2" 'index($0, name "{") == 1 && index($0, "quantile=\"" q "\"") {
            if ($NF > max) max = $NF } END {printf "%.2f", max * 1000}'
    }
    echo "$(echo "$out" | jq -r '"\(.rate | floor) \(.latency_us.p50) \(.latency_us.p99)"')" \
        "$(quantile sluice_ack_latency_seconds 0.99)" "$(quantile sluice_commit_latency_seconds 0.99)" \
        "$(awk -v a="$before" -v b="$after" -v hz="$(getconf CLK_TCK)" 'BEGIN {printf "%.2f", (b - a) / hz}')"
}

SLUICED_ARGS=("$@")
log "full load (window 1)"
read -r full full_p50 full_p99 full_ack full_commit full_steal < <(run --window 1)
half=$((full / 2))
echo
echo "sluiced --durability fsync ${SLUICED_ARGS[*]}, server on CPUs ${SLUICE_LAT_SERVER_CPUS:-any}, client on CPUs ${SLUICE_LAT_CLIENT_CPUS:-any}, $D s per run, $(date -u +%FT%TZ)."
echo
echo "| load | requests/s | client p50 / p99 µs | server ack p99 ms | commit p99 ms | steal s |"
echo "|---|---:|---:|---:|---:|---:|"
echo "| full (100 dev × 1) | $full | $full_p50 / $full_p99 | $full_ack | $full_commit | $full_steal |"
for i in $(seq 1 "$RUNS"); do
    log "half load $i/$RUNS: $half/s"
    read -r rate p50 p99 ack commit stolen < <(run --rate "$half")
    echo "| half, run $i | $rate | $p50 / $p99 | **$ack** | $commit | $stolen |"
done
