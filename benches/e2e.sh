#!/usr/bin/env bash
# End-to-end throughput of sluiced against libcoap's coap-server-notls, in one run, on loopback,
# with the same client (`sluice load`). Prints a markdown table on stdout; progress on stderr.
#
#   benches/e2e.sh                      # 10 s per target
#   SLUICE_E2E_DURATION=5 benches/e2e.sh
#
# Environment:
#   SLUICE_E2E_DURATION  seconds of load per target (default 10, 1..300)
#   SLUICE_E2E_WARMUP    seconds of unmeasured load before each measurement (default 1, 0 = none)
#   SLUICE_E2E_KEEP      1: keep the scratch directory (logs, data dirs) and print its path
#   SLUICE_E2E_NO_BUILD  1: skip `cargo build` (use the binaries already in target/release)
#   SLUICE_E2E_IO        socket backends to compare, e.g. "recvmmsg uring": for each, three more
#                        rows (fsync CON, os CON, fsync NON) with `sluiced --io BACKEND`, and a
#                        table of the ratios to the first one. The other rows use sluiced's
#                        default backend (or SLUICE_IO).
#   SLUICE_E2E_SERVER_CPUS  CPUs every measured server runs on (`taskset -c` list: "1"), the
#                        sink, libcoap and sluiced alike; default: wherever the scheduler puts it
#   SLUICE_E2E_CLIENT_CPUS  CPUs the load client runs on ("0"); default: anywhere
#                        (On the 2-vCPU VM of benches/RESULTS.md, "1" and "0" keep the server's
#                        threads off the client's vCPU: see RESULTS "CPU placement".)
#
# Needs: cargo, curl, jq, ss, coap-server-notls (Debian: libcoap3-bin).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
D=${SLUICE_E2E_DURATION:-10}
if ! [[ $D =~ ^[0-9]+$ ]] || ((D < 1 || D > 300)); then
    echo "SLUICE_E2E_DURATION must be whole seconds in 1..300, is '$D'" >&2
    exit 2
fi
WARMUP=${SLUICE_E2E_WARMUP:-1}
if ! [[ $WARMUP =~ ^[0-9]+$ ]] || ((WARMUP > 60)); then
    echo "SLUICE_E2E_WARMUP must be whole seconds in 0..60, is '$WARMUP'" >&2
    exit 2
fi
SERVER_PIN=()
CLIENT_PIN=()
[[ -n ${SLUICE_E2E_SERVER_CPUS:-} ]] && SERVER_PIN=(taskset -c "$SLUICE_E2E_SERVER_CPUS")
[[ -n ${SLUICE_E2E_CLIENT_CPUS:-} ]] && CLIENT_PIN=(taskset -c "$SLUICE_E2E_CLIENT_CPUS")
for tool in cargo curl jq ss coap-server-notls taskset; do
    command -v "$tool" >/dev/null || { echo "e2e.sh: needs $tool" >&2; exit 2; }
done

SLUICED=$ROOT/target/release/sluiced
SLUICE=$ROOT/target/release/sluice
WORK=$(mktemp -d "${TMPDIR:-/tmp}/sluice-e2e.XXXXXX")
PIDS=()
SLUICED_IO=()

log() { printf '[e2e %s] %s\n' "$(date +%T)" "$*" >&2; }

# Stops one process we started: SIGTERM, then SIGKILL after a bounded wait.
stop() {
    local pid=$1
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "pid $pid ignored SIGTERM for 10 s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local status=$?
    for pid in "${PIDS[@]}"; do
        stop "$pid"
    done
    if [[ ${SLUICE_E2E_KEEP:-0} == 1 ]]; then
        log "kept $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# shellcheck source=common/free_port.sh
source "$ROOT/benches/common/free_port.sh"

# Waits (bounded) until sluiced answers /readyz; fails if it died.
wait_ready() {
    local pid=$1 http=$2 logfile=$3
    for _ in $(seq 1 300); do
        if ! kill -0 "$pid" 2>/dev/null; then
            log "sluiced exited before becoming ready:"
            tail -20 "$logfile" >&2
            return 1
        fi
        if curl -sf -o /dev/null --max-time 1 "http://127.0.0.1:$http/readyz"; then
            return 0
        fi
        sleep 0.1
    done
    log "sluiced not ready after 30 s:"
    tail -20 "$logfile" >&2
    return 1
}

# Same load as the measurement, unmeasured: first-commit file creation, caches, the server's
# session set-up. Its own device names, so it leaves no dedup or Block1 state the measured run
# could hit.
warm_up() {
    local name=$1
    shift
    ((WARMUP > 0)) || return 0
    if ! timeout $((WARMUP + 120)) "${CLIENT_PIN[@]}" "$SLUICE" load --duration "$WARMUP" --device-prefix warm- "$@" \
        >/dev/null 2>"$WORK/$name.warmup.err"; then
        log "$name: warm-up failed:"
        cat "$WORK/$name.warmup.err" >&2
        return 1
    fi
}

# CPU seconds (user + system) a running process has used so far, from /proc/PID/stat.
cpu_of() {
    awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' "/proc/$1/stat"
}

# CPU seconds (user + system) of this shell's waited-for children so far (the load clients),
# into $WORK/$1. `times` must run in this shell, not in a $(...) subshell.
children_cpu() {
    times >"$WORK/$1.times"
    tail -n 1 "$WORK/$1.times" | awk '{
        split($1, u, /m|s/); split($2, s, /m|s/); printf "%.2f", u[1] * 60 + u[2] + s[1] * 60 + s[2] }' \
        >"$WORK/$1"
}

# Runs the load client; its last stdout line (JSON) goes to $WORK/<name>.json, its CPU seconds
# to $WORK/<name>.client_cpu.
run_load() {
    local name=$1
    shift
    children_cpu "$name.client_cpu_start"
    log "$name: sluice load $*"
    # Bounded: the run plus the CON give-up time of in-flight requests (2 s * 1.5 * 31 < 95 s).
    if ! timeout $((D + 120)) "${CLIENT_PIN[@]}" "$SLUICE" load --duration "$D" --json "$@" \
        >"$WORK/$name.out" 2>"$WORK/$name.err"; then
        log "$name: sluice load failed:"
        cat "$WORK/$name.err" >&2
        return 1
    fi
    tail -n 1 "$WORK/$name.out" >"$WORK/$name.json"
    children_cpu "$name.client_cpu_end"
    awk -v a="$(cat "$WORK/$name.client_cpu_start")" -v b="$(cat "$WORK/$name.client_cpu_end")" \
        'BEGIN {printf "%.2f", b - a}' >"$WORK/$name.client_cpu"
    cat "$WORK/$name.err" >&2
}

# Server CPU seconds of process $2 during the measured run: call with "start" before, "end" after.
server_cpu() {
    local name=$1 pid=$2 phase=$3
    if [[ $phase == start ]]; then
        cpu_of "$pid" >"$WORK/$name.server_cpu_start"
    else
        awk -v a="$(cat "$WORK/$name.server_cpu_start")" -v b="$(cpu_of "$pid")" \
            'BEGIN {printf "%.2f", b - a}' >"$WORK/$name.server_cpu"
    fi
}

# (0) the ceiling: a recvmmsg sink that only counts (`sluice sink`), fed NON requests with
# No-Response by the same client and fleet shape; its rate is what it received.
measure_sink() {
    local name=$1 port pid
    port=$(free_port)
    "${SERVER_PIN[@]}" "$SLUICE" sink --bind "127.0.0.1:$port" --json --idle-exit-ms 1000 --max-seconds $((D + 60)) \
        >"$WORK/$name.sink.json" 2>"$WORK/$name.sink.err" &
    pid=$!
    PIDS+=("$pid")
    for _ in $(seq 1 50); do
        [[ -n $(ss -Hlnu "sport = :$port") ]] && break
        sleep 0.1
    done
    server_cpu "$name" "$pid" start
    run_load "$name" --target "127.0.0.1:$port" --devices 100 --window 1 --mode non --no-response
    server_cpu "$name" "$pid" end
    wait "$pid" || { log "$name: sink failed:"; cat "$WORK/$name.sink.err" >&2; return 1; }
    # The row shows what the sink received, at the rate it received it.
    jq -c --slurpfile sink "$WORK/$name.sink.json" \
        '.acknowledged = $sink[0].received | .rate = $sink[0].rate | .latency_us = {"p50": "–", "p99": "–"}' \
        "$WORK/$name.json" >"$WORK/$name.json.tmp"
    mv "$WORK/$name.json.tmp" "$WORK/$name.json"
    echo 1 >"$WORK/$name.rpd"
}

# Points the store committed (summed over shards), from /metrics.
points_stored() {
    curl -sf --max-time 5 "http://127.0.0.1:$1/metrics" |
        awk '/^sluice_points_stored_total/ {s += $NF} END {print s + 0}'
}

# (a) libcoap: answers PUT /example_data with 2.04, stores nothing.
measure_libcoap() {
    local name=$1 port pid
    port=$(free_port)
    "${SERVER_PIN[@]}" coap-server-notls -A 127.0.0.1 -p "$port" >"$WORK/$name.server.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    # libcoap has no readiness probe: wait (bounded) for its UDP socket.
    for _ in $(seq 1 50); do
        [[ -n $(ss -Hlnu "sport = :$port") ]] && break
        sleep 0.1
    done
    local load=(--target "127.0.0.1:$port" --path /example_data --method put
        --devices 100 --window 1 --mode con)
    warm_up "$name" "${load[@]}"
    server_cpu "$name" "$pid" start
    run_load "$name" "${load[@]}"
    server_cpu "$name" "$pid" end
    stop "$pid"
    echo 1 >"$WORK/$name.rpd"
}

# Points stored once sluiced has taken what its sockets still held (bounded: 5 s).
settled_points() {
    local http=$1 last now
    last=$(points_stored "$http")
    for _ in $(seq 1 25); do
        sleep 0.2
        now=$(points_stored "$http")
        [[ $now == "$last" ]] && break
        last=$now
    done
    echo "$last"
}

# sluiced with a fresh data dir; $2 = durability, the rest = load arguments.
measure_sluiced() {
    local name=$1 durability=$2
    shift 2
    local coap http pid dir=$WORK/$name
    mkdir -p "$dir"
    coap=$(free_port)
    http=$(free_port)
    while [[ $http == "$coap" ]]; do http=$(free_port); done
    "${SERVER_PIN[@]}" "$SLUICED" --data-dir "$dir/data" --coap "127.0.0.1:$coap" --http "127.0.0.1:$http" \
        --durability "$durability" "${SLUICED_IO[@]}" >"$dir/sluiced.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    wait_ready "$pid" "$http" "$dir/sluiced.log"
    grep -o 'backend=[^ ]*' "$dir/sluiced.log" | head -1 >"$WORK/$name.backend" || true
    warm_up "$name" --target "127.0.0.1:$coap" "$@"
    local before after
    before=$(points_stored "$http")
    server_cpu "$name" "$pid" start
    run_load "$name" --target "127.0.0.1:$coap" "$@"
    server_cpu "$name" "$pid" end
    after=$(settled_points "$http")
    curl -sf --max-time 5 "http://127.0.0.1:$http/metrics" >"$dir/metrics.txt" || true
    stop "$pid"
    echo $((after - before)) >"$WORK/$name.stored"
    if [[ " $* " == *" --no-response "* ]]; then
        # Nothing is acknowledged: the row shows what was stored, at the run's rate, as the
        # sink's row shows what it received.
        jq -c --argjson stored $((after - before)) --argjson d "$D" \
            '.acknowledged = $stored | .rate = $stored / $d | .latency_us = {"p50": "–", "p99": "–"}' \
            "$WORK/$name.json" >"$WORK/$name.json.tmp"
        mv "$WORK/$name.json.tmp" "$WORK/$name.json"
    fi
    local rpd=1 prev=""
    for arg in "$@"; do
        [[ $prev == --records-per-datagram ]] && rpd=$arg
        prev=$arg
    done
    echo "$rpd" >"$WORK/$name.rpd"
}

# CoAPS: one sluiced with plain CoAP and CoAPS (a generated credentials file of the measured
# devices `dev-NNNN` and the warm-up devices `warm-NNNN`); the same devices and load shape first
# in plain CoAP ($1, names dev-NNNN), then over DTLS ($2, every device handshaken before its run).
# $3 = durability, the rest = load arguments.
measure_coaps() {
    local plain=$1 dtls=$2 durability=$3
    shift 3
    local coap coaps http pid dir=$WORK/$dtls devices=100 prev=""
    for arg in "$@"; do
        [[ $prev == --devices ]] && devices=$arg
        prev=$arg
    done
    mkdir -p "$dir"
    "$SLUICE" load --gen-credentials "$devices" --device-prefix dev- >"$dir/devices.toml"
    "$SLUICE" load --gen-credentials "$devices" --device-prefix warm- >"$dir/warm.toml"
    cat "$dir/devices.toml" "$dir/warm.toml" >"$dir/credentials.toml"
    chmod 600 "$dir/credentials.toml"
    coap=$(free_port)
    coaps=$(free_port)
    http=$(free_port)
    "${SERVER_PIN[@]}" "$SLUICED" --data-dir "$dir/data" --coap "127.0.0.1:$coap" --coaps "127.0.0.1:$coaps" \
        --credentials "$dir/credentials.toml" --http "127.0.0.1:$http" \
        --durability "$durability" >"$dir/sluiced.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    wait_ready "$pid" "$http" "$dir/sluiced.log"
    local name target before after
    for name in "$plain" "$dtls"; do
        if [[ $name == "$plain" ]]; then
            warm_up "$name" --target "127.0.0.1:$coap" "$@"
            target=(--target "127.0.0.1:$coap" --device-prefix dev-)
        else
            warm_up "$name" --target "127.0.0.1:$coaps" --dtls --credentials "$dir/warm.toml" "$@"
            target=(--target "127.0.0.1:$coaps" --dtls --credentials "$dir/devices.toml")
        fi
        before=$(points_stored "$http")
        server_cpu "$name" "$pid" start
        run_load "$name" "${target[@]}" "$@"
        server_cpu "$name" "$pid" end
        after=$(points_stored "$http")
        echo $((after - before)) >"$WORK/$name.stored"
        echo 1 >"$WORK/$name.rpd"
    done
    curl -sf --max-time 5 "http://127.0.0.1:$http/metrics" >"$dir/metrics.txt" || true
    stop "$pid"
}

if [[ ${SLUICE_E2E_NO_BUILD:-0} != 1 ]]; then
    log "building release binaries"
    # The root package is the workspace's only default member: name the packages.
    (cd "$ROOT" && cargo build --release --locked -p sluice-daemon -p sluice-tools \
        --bin sluiced --bin sluice) >&2
fi
[[ -x $SLUICED && -x $SLUICE ]] || { echo "e2e.sh: release binaries missing" >&2; exit 1; }

log "scratch directory $WORK, $D s per target"
measure_sink sink
measure_libcoap libcoap
measure_sluiced fsync_con fsync --devices 100 --window 1 --mode con
measure_sluiced os_con os --devices 100 --window 1 --mode con
measure_sluiced fsync_non fsync --devices 100 --window 4 --mode non
measure_sluiced fsync_non_nr fsync --devices 100 --window 1 --mode non --no-response
measure_sluiced fsync_rkyv64 fsync --devices 20 --window 2 --mode con \
    --format rkyv --records-per-datagram 64
measure_sluiced fsync_rkyv64_deep fsync --devices 64 --window 8 --mode con \
    --format rkyv --records-per-datagram 64
measure_coaps coap_fsync coaps_fsync fsync --devices 100 --window 1 --mode con
measure_coaps coap_os coaps_os os --devices 100 --window 1 --mode con
# The socket backends side by side (SLUICE_E2E_IO), interleaved so that drift hits both alike.
read -r -a BACKENDS <<<"${SLUICE_E2E_IO:-}"
for backend in "${BACKENDS[@]}"; do
    [[ $backend == uring || $backend == recvmmsg ]] || {
        echo "SLUICE_E2E_IO: uring or recvmmsg, not '$backend'" >&2
        exit 2
    }
done
SLUICED_IO_SAVED=("${SLUICED_IO[@]}")
for mode in fsync_con os_con fsync_non; do
    for backend in "${BACKENDS[@]}"; do
        SLUICED_IO=(--io "$backend")
        case $mode in
        fsync_con) measure_sluiced "io_${backend}_$mode" fsync --devices 100 --window 1 --mode con ;;
        os_con) measure_sluiced "io_${backend}_$mode" os --devices 100 --window 1 --mode con ;;
        fsync_non) measure_sluiced "io_${backend}_$mode" fsync --devices 100 --window 4 --mode non ;;
        esac
    done
done
SLUICED_IO=("${SLUICED_IO_SAVED[@]}")
# libcoap again, last: how much the machine's load drifted during the run.
measure_libcoap libcoap_again

base=$(jq -r '.rate' "$WORK/libcoap.json")

row() {
    local name=$1 label=$2 json=$WORK/$1.json rpd stored records ratio cpu
    rpd=$(cat "$WORK/$name.rpd")
    if [[ -f $WORK/$name.stored ]]; then
        records=$(jq -r --argjson rpd "$rpd" '.rate * $rpd | floor' "$json")
        stored=$(cat "$WORK/$name.stored")
    else
        records="– (stores nothing)"
        stored="–"
    fi
    ratio=$(jq -r '.rate' "$json" | awk -v base="$base" '{printf "%.2f", $1 / base}')
    # CPU in cores: seconds of CPU over the seconds of the measured run.
    cpu=$(awk -v c="$(cat "$WORK/$name.client_cpu")" -v s="$(cat "$WORK/$name.server_cpu")" \
        -v d="$D" 'BEGIN {printf "%.2f / %.2f", c / d, s / d}')
    jq -r --arg name "$label" --arg records "$records" --arg stored "$stored" \
        --arg ratio "$ratio" --arg cpu "$cpu" '
        "| \($name) | \(.rate | floor) | \($records) | \(.latency_us.p50) / \(.latency_us.p99) | \(.timeouts) | \(.sent) / \(.acknowledged) / \($stored) | \($cpu) | \($ratio) |"' \
        "$json"
}

echo
echo "Load: \`sluice load\`, $D s per target after $WARMUP s of warm-up, loopback, $(nproc) cores, servers on CPUs ${SLUICE_E2E_SERVER_CPUS:-any}, client on CPUs ${SLUICE_E2E_CLIENT_CPUS:-any}, $(date -u +%FT%TZ)."
echo
echo "| target | requests/s acknowledged | records/s | p50 / p99 µs | timeouts | sent / acked / points stored | CPU client / server (cores) | × libcoap |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
row sink "raw recvmmsg sink (\`sluice sink\`, counts only), NON No-Response, 100 dev: received"
row libcoap "libcoap coap-server-notls, CON, 100 dev × 1"
row fsync_con "sluiced fsync, CON, 100 dev × 1"
row os_con "sluiced os, CON, 100 dev × 1"
row fsync_non "sluiced fsync, NON, 100 dev × 4"
row fsync_non_nr "sluiced fsync, NON No-Response, 100 dev (the sink's load): stored"
row fsync_rkyv64 "sluiced fsync, CON rkyv × 64 records, 20 dev × 2"
row fsync_rkyv64_deep "sluiced fsync, CON rkyv × 64 records, 64 dev × 8"
row coap_fsync "sluiced fsync, CON, 100 dev × 1 (plain CoAP, daemon shared with the next row)"
row coaps_fsync "sluiced fsync, **CoAPS** CON (DTLS PSK, CCM_8), 100 dev × 1"
row coap_os "sluiced os, CON, 100 dev × 1 (plain CoAP, daemon shared with the next row)"
row coaps_os "sluiced os, **CoAPS** CON (DTLS PSK, CCM_8), 100 dev × 1"
for mode in fsync_con os_con fsync_non; do
    for backend in "${BACKENDS[@]}"; do
        case $mode in
        fsync_con) label="sluiced fsync, CON, 100 dev × 1, --io $backend" ;;
        os_con) label="sluiced os, CON, 100 dev × 1, --io $backend" ;;
        fsync_non) label="sluiced fsync, NON, 100 dev × 4, --io $backend" ;;
        esac
        row "io_${backend}_$mode" "$label"
    done
done
row libcoap_again "libcoap coap-server-notls again (drift check)"
echo

non=$(awk -v s="$(jq -r '.rate' "$WORK/fsync_non_nr.json")" -v r="$(jq -r '.rate' "$WORK/sink.json")" \
    'BEGIN {printf "%.2f", s / r}')
echo "NON No-Response stored by sluiced / received by the raw sink, same load: **$non**."
fsync=$(jq -r '.rate' "$WORK/fsync_con.json")
again=$(jq -r '.rate' "$WORK/libcoap_again.json")
if jq -en --argjson a "$fsync" --argjson b "$base" --argjson c "$again" '$a >= $b and $a >= $c' >/dev/null; then
    echo "Target (sluiced fsync CON req/s ≥ libcoap's, both libcoap runs of this run): **met**."
else
    echo "Target (sluiced fsync CON req/s ≥ libcoap's, both libcoap runs of this run): **not met**."
fi

# CoAPS against plain CoAP, same daemon, same devices, same run (target: at least 0.60).
for durability in fsync os; do
    ratio=$(awk -v d="$(jq -r '.rate' "$WORK/coaps_$durability.json")" \
        -v p="$(jq -r '.rate' "$WORK/coap_$durability.json")" 'BEGIN {printf "%.2f", d / p}')
    handshakes=$(grep -o 'DTLS: [0-9]* handshakes in [0-9.]* s' "$WORK/coaps_$durability.err" || true)
    met="not met"
    jq -en --argjson r "$ratio" '$r >= 0.6' >/dev/null && met=met
    echo
    echo "CoAPS / plain CoAP CON req/s, $durability: **$ratio** (target ≥ 0.60: **$met**; $handshakes before the run)."
done

# The socket backends against the first one of SLUICE_E2E_IO, same run.
if ((${#BACKENDS[@]} > 1)); then
    first=${BACKENDS[0]}
    echo
    echo "Rows without \`--io\` ran with $(cat "$WORK/fsync_con.backend" 2>/dev/null || echo 'an unknown backend')."
    echo
    echo "| requests/s, ratio to --io $first | $(printf '%s | ' "${BACKENDS[@]:1}")"
    echo "|---|$(printf -- '---:|%.0s' "${BACKENDS[@]:1}")"
    for mode in fsync_con os_con fsync_non; do
        line="| $mode |"
        for backend in "${BACKENDS[@]:1}"; do
            ratio=$(awk -v a="$(jq -r '.rate' "$WORK/io_${backend}_$mode.json")" \
                -v b="$(jq -r '.rate' "$WORK/io_${first}_$mode.json")" 'BEGIN {printf "%.2f", a / b}')
            line="$line **$ratio** |"
        done
        echo "$line"
    done
fi
