#!/usr/bin/env bash
# End-to-end benchmark of stemed with `stemectl bench`: starts its own node
# (walld + stemed as separate processes, as in production) in a temporary
# directory on free loopback ports, runs a matrix of cells against it, and
# prints one markdown table.
#
#   scripts/bench-stemed.sh                  # release build, 10 s per cell
#   scripts/bench-stemed.sh --json out.json  # also the raw stemectl JSON
#   scripts/bench-stemed.sh --smoke          # ~1 s per cell, small preload (CI)
#   scripts/bench-stemed.sh --keep           # keep the node's directory and logs
#
# Matrix: durable writes at concurrency 1, 16, 64 and 256, with 1 and with
# 100 assertions per transaction; then Get at concurrency 16 on a store
# preloaded with 1,000,000 facts (entities of 20 facts).
#
# Per cell it also reads walld's fsync counter (stemedb_wal_fsync_total on
# the admin /metrics) and the durable LSN (one WAL record per transaction)
# before and after, so the fsyncs per transaction of group commit are
# visible. Both deltas include the cell's warmup (and, for the Get cell,
# the preload).
#
# Environment:
#   BENCH_SECS         measured seconds per cell (default 10; --smoke: 1)
#   BENCH_WARMUP_SECS  unmeasured seconds before each cell (default 2; --smoke: 0.3)
#   BENCH_PRELOAD      facts preloaded for the Get cell (default 1000000; --smoke: 20000)
#   BENCH_CONCURRENCY  write concurrencies (default "1 16 64 256")
#   BENCH_TX_SIZES     assertions per transaction (default "1 100")
#   BENCH_BIN_DIR      use the binaries in this directory instead
#
# Binaries: the full run builds and uses the release build
# (`cargo build --release --bins`). --smoke builds nothing: it uses the
# newer of target/release and target/debug that has all three binaries (in
# CI only the debug build that scripts/test.sh has just made exists).
set -euo pipefail
caller_dir=$(pwd)
cd "$(dirname "$0")/.."
root=$(pwd)

smoke=0
json_out=""
keep=0
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) smoke=1 ;;
    --json) json_out="${2:?--json needs a FILE}"; shift ;;
    --json=*) json_out="${1#--json=}" ;;
    --keep) keep=1 ;;
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
    *) echo "bench-stemed: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done

# --json FILE is relative to where the script was started.
case "$json_out" in ""|/*) ;; *) json_out="$caller_dir/$json_out" ;; esac

if [ "$smoke" = 1 ]; then
  secs=${BENCH_SECS:-1}
  warmup=${BENCH_WARMUP_SECS:-0.3}
  preload=${BENCH_PRELOAD:-20000}
else
  secs=${BENCH_SECS:-10}
  warmup=${BENCH_WARMUP_SECS:-2}
  preload=${BENCH_PRELOAD:-1000000}
fi
concurrencies=${BENCH_CONCURRENCY:-"1 16 64 256"}
tx_sizes=${BENCH_TX_SIZES:-"1 100"}

# shellcheck source=bench/lib.sh
source "$root/bench/lib.sh"
bin=$(bench_pick_bins "$root" "$smoke" walld stemed stemectl)
command -v curl >/dev/null || { echo "bench-stemed: needs curl" >&2; exit 1; }
command -v python3 >/dev/null || { echo "bench-stemed: needs python3" >&2; exit 1; }

dir=$(mktemp -d "${TMPDIR:-/tmp}/bench-stemed.XXXXXX")
cleanup() {
  local rc=$?
  set +e
  # Only the processes this script started, by pid.
  stemedb_node_stop
  [ "$rc" != 0 ] && stemedb_node_tail_logs
  if [ "$keep" = 1 ]; then echo "bench-stemed: kept $dir" >&2; else rm -rf "$dir"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

stemedb_node_start "$bin" "$dir" || exit 1
admin=$STEMEDB_ADMIN
addr=$STEMEDB_ADDR
echo "==> node up: walld + stemed from $bin; gRPC $addr, admin $admin; ${secs}s per cell after ${warmup}s warmup" >&2

fsyncs() { stemedb_metric stemedb_wal_fsync_total; }
durable_lsn() { stemedb_status durable_lsn; }

results=$dir/results.jsonl
: >"$results"
# run_cell NAME STEMECTL-BENCH-ARGS...: one cell, one line of results.jsonl.
run_cell() {
  local name=$1; shift
  local f0 l0 f1 l1 out
  f0=$(fsyncs); l0=$(durable_lsn)
  echo "==> $name" >&2
  out=$("$bin/stemectl" --addr "$addr" --timeout 30s --output json bench \
    --duration "${secs}s" --warmup "${warmup}s" "$@")
  f1=$(fsyncs); l1=$(durable_lsn)
  python3 - "$name" "$((f1 - f0))" "$((l1 - l0))" "$out" >>"$results" <<'EOF'
import json, sys
name, fsyncs, records, report = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
print(json.dumps({"cell": name, "fsyncs": fsyncs, "wal_records": records, "report": report}))
EOF
}

for size in $tx_sizes; do
  for c in $concurrencies; do
    run_cell "write c=$c tx=$size" --concurrency "$c" --tx-size "$size"
  done
done
run_cell "get c=16 preload=$preload" --concurrency 16 --read-ratio 1 --preload "$preload"

python3 - "$results" "${json_out}" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def ms(p, key):
    return "-" if not p else f"{p[key] / 1000:.2f}"
print()
print("| cell | tx/s (get: reads/s) | assertions/s | p50 ms | p99 ms | errors | fsyncs | fsyncs/tx |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for r in rows:
    rep = r["report"]
    is_read = rep["read_ratio"] >= 1.0
    op = rep["reads"] if is_read else rep["writes"]
    per_tx = f'{r["fsyncs"] / r["wal_records"]:.3f}' if r["wal_records"] else "-"
    assertions = "-" if is_read else f'{rep["assertions_per_s"]:.0f}'
    print(f'| {r["cell"]} | {op["per_s"]:.0f} | {assertions} | {ms(op["latency_us"], "p50")} | '
          f'{ms(op["latency_us"], "p99")} | {rep["errors_total"]} | {r["fsyncs"]} | {per_tx} |')
print()
print("fsyncs and fsyncs/tx: walld fsyncs and WAL records (one per transaction) during the cell, warmup (and preload) included.")
if sys.argv[2]:
    with open(sys.argv[2], "w") as f:
        json.dump(rows, f, indent=2)
    print(f"raw results: {sys.argv[2]}")
EOF
