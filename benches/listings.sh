#!/usr/bin/env bash
# Fleet-wide listings under continuous ingest: every commit changes the store's generation, so
# each `/v1/latest` or `/v1/devices` request misses the result cache and builds its answer.
# Prints a markdown table on stdout.
#
#   benches/listings.sh STORE_DIR [SLUICED...]
#
# STORE_DIR: a store with many devices, e.g. the query benchmark's
# (`SLUICE_QUERY_BENCH_DIR=/tmp/q cargo bench --locked --bench query`: 100,000 devices); it is
# written to (the load's readings). SLUICED: sluiced binaries to compare, run in turn, twice
# each (default: target/release/sluiced). Each run: sluiced on CPU 1 (its shards and HTTP on
# one core), `sluice load --devices 100 --rate 2000` from CPU 0 for the whole run, and curl
# (CPU 0) asking each listing REQUESTS times, one at a time; curl's `time_total`.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=common/free_port.sh
source "$ROOT/benches/common/free_port.sh"
REQUESTS=20
STORE=${1:?usage: benches/listings.sh STORE_DIR [SLUICED...]}
shift
[[ -d $STORE ]] || { echo "listings.sh: no store in $STORE" >&2; exit 2; }
BINARIES=("$@")
((${#BINARIES[@]} > 0)) || BINARIES=("$ROOT/target/release/sluiced")
SLUICE=$ROOT/target/release/sluice
for tool in curl ss taskset; do
    command -v "$tool" >/dev/null || { echo "listings.sh: needs $tool" >&2; exit 2; }
done
[[ -x $SLUICE ]] || { echo "listings.sh: $SLUICE missing (cargo build --release)" >&2; exit 1; }
PID=""
LOAD=""
cleanup() {
    [[ -n $LOAD ]] && kill "$LOAD" 2>/dev/null && wait "$LOAD" 2>/dev/null
    [[ -n $PID ]] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null
    return 0
}
trap cleanup EXIT

PATHS=(/v1/latest /v1/devices "/v1/latest?prefix=host-7&limit=1000")
header="| sluiced | run |"
for path in "${PATHS[@]}"; do header+=" \`$path\` median (range) |"; done
echo "$header"
echo "|---|---:|$(printf -- '---:|%.0s' "${PATHS[@]}")"
for round in 1 2; do
    for sluiced in "${BINARIES[@]}"; do
        COAP=$(free_port)
        HTTP=$(free_port)
        taskset -c 1 "$sluiced" --data-dir "$STORE" --coap "127.0.0.1:$COAP" \
            --http "127.0.0.1:$HTTP" --shards 2 >/dev/null 2>&1 &
        PID=$!
        for _ in $(seq 1 300); do
            curl -sf "http://127.0.0.1:$HTTP/healthz" >/dev/null && break
            kill -0 "$PID" 2>/dev/null || { echo "listings.sh: sluiced exited" >&2; exit 1; }
            sleep 0.1
        done
        taskset -c 0 "$SLUICE" load --target "127.0.0.1:$COAP" --devices 100 --rate 2000 \
            --duration 60 >/dev/null 2>&1 &
        LOAD=$!
        sleep 1
        row="| $sluiced | $round |"
        for path in "${PATHS[@]}"; do
            median=$(for _ in $(seq 1 $REQUESTS); do
                taskset -c 0 curl -sf -o /dev/null -w '%{time_total}\n' "http://127.0.0.1:$HTTP$path"
            done | sort -n | awk '{a[NR] = $1} END {printf "%.1f ms (%.1f–%.1f)", a[int(NR / 2) + 1] * 1000, a[1] * 1000, a[NR] * 1000}')
            row+=" $median |"
        done
        echo "$row"
        kill "$LOAD"; wait "$LOAD" 2>/dev/null || true; LOAD=""
        kill "$PID"; wait "$PID" 2>/dev/null || true; PID=""
    done
done
