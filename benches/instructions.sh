#!/usr/bin/env bash
# Instructions per ingested datagram, counted by valgrind (callgrind): a figure that does not move
# with machine noise. Builds benches/instructions.rs (bench profile), runs each scenario with 0
# datagrams (the baseline: start-up, warm-up, shut-down) and with N datagrams, and prints
# (instructions(N) - instructions(0)) / N.
#
#   bash benches/instructions.sh [N]        (N defaults to 20000)
#   SCENARIOS="con-json rkyv-64" bash benches/instructions.sh
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-20000}"
SCENARIOS="${SCENARIOS:-con-json non-json con-cbor rkyv-64}"
command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }

exe=$(cargo bench --bench instructions --no-run --message-format=json 2>/dev/null \
  | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)
[ -x "$exe" ] || { echo "could not build the instructions driver" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Instructions executed by one run of the driver.
count() {
  valgrind --tool=callgrind --callgrind-out-file="$work/out" "$exe" "$1" "$2" \
    >/dev/null 2>"$work/log"
  sed -n 's/.*Collected : \([0-9]*\).*/\1/p' "$work/log"
}

echo "commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . || echo ' (modified)'), N=$N"
printf '%-10s %14s %14s %12s\n' scenario "baseline" "with N" "per datagram"
for scenario in $SCENARIOS; do
  base=$(count "$scenario" 0)
  full=$(count "$scenario" "$N")
  printf '%-10s %14d %14d %12d\n' "$scenario" "$base" "$full" $(( (full - base) / N ))
done
