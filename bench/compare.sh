#!/usr/bin/env bash
# StemeDB side by side with etcd and PostgreSQL: one run on one machine,
# every system on its own data directory on the same disk, durable
# defaults everywhere, one closed-loop client process per system, and one
# markdown table of medians with ratios and the performance targets.
#
#   bash bench/compare.sh               # 3 rounds, 5 s per cell; writes docs/benchmarks.md
#   bash bench/compare.sh --no-doc      # the same, table on stdout only
#   bash bench/compare.sh --quick       # smoke: 1 round, 1 s cells, tiny preload (CI)
#   bash bench/compare.sh --keep        # keep the temporary directory and logs
#
# Systems (all on 127.0.0.1, data under one temporary directory):
#   fdatasync   8 KiB writes + fdatasync in a loop, one thread (the disk's
#               durable-write rate; stemedb-peer-bench fsync)
#   etcd        Debian's etcd-server, single member, default (durable)
#               settings; driven over its gRPC KV API by stemedb-peer-bench
#   PostgreSQL  Debian's postgresql, a fresh initdb, fsync=on,
#               synchronous_commit=on, full_page_writes=on, default
#               wal_sync_method; driven by pgbench -M prepared
#   StemeDB     walld + stemed as in production; driven by stemectl bench
#
# Workloads, each run on every system in turn (fdatasync, etcd, PostgreSQL,
# StemeDB), the list repeated for every round; the table shows the median
# of each figure over the rounds:
#   write c=N   durable single writes at concurrency N (1, 16, 64, 256):
#               a 1-assertion transaction / a Put / a 1-row INSERT
#   batch       100-item transactions at concurrency 16: 100 assertions /
#               a Txn of 100 Puts / one INSERT of 100 rows
#   read c=16   point reads: Get of one entity of 20 facts / a single-key
#               Range (linearizable) / a prepared SELECT by primary key,
#               over preload/20 entities, keys or rows of 320 value bytes
#
# Peak RSS of walld + stemed (VmHWM, reset right before the cell) is taken
# during the write c=256 cell.
#
# Recovery, after the rounds: a second StemeDB node, whose checkpoints
# retain every WAL record (storage.wal_retain_records) so its WAL keeps
# every record from LSN 1, is filled by stemectl bench (the
# batch workload: 100-assertion transactions at concurrency 16) until walld
# has written BENCH_RECOVERY_MB of WAL; then stemed stops, its store is
# deleted, and stemed starts again over the same walld. The time from that
# start until /readyz says ready (every durable record applied to a new
# sled store) gives the replay rate in WAL MB/s.
#
# Environment:
#   BENCH_ROUNDS       rounds (default 3; --quick: 1)
#   BENCH_SECS         measured seconds per cell, an integer (default 5; --quick: 1)
#   BENCH_WARMUP_SECS  unmeasured seconds before each cell (default 1; --quick: 0.3)
#   BENCH_PRELOAD      facts for the read cells (default 100000; --quick: 2000)
#   BENCH_CONCURRENCY  single-write concurrencies (default "1 16 64 256")
#   BENCH_BATCH_CONCURRENCY  concurrency of the batch cells (default 16)
#   BENCH_RECOVERY_MB  MiB of WAL the recovery cell replays (default 1024; --quick: 2)
#   BENCH_RECOVERY_VALUE_BYTES  value bytes of its assertions (default 16, the batch cells')
#   BENCH_BIN_DIR      take walld, stemed, stemectl and stemedb-peer-bench from here
#
# Binaries: the full run builds and uses the release build (`cargo build
# --release --bins`). --quick builds nothing: it uses the newer of
# target/release and target/debug that has all four binaries.
#
# Missing etcd / PostgreSQL / jq / curl / python3 are installed with apt
# (as root). Every server the script starts is stopped, and the temporary
# directory removed, when it exits, also on failure or Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
# shellcheck source=bench/lib.sh
source "$root/bench/lib.sh"
# The command as run, with the BENCH_* settings that were given.
command_line="$(env | grep -E '^BENCH_[A-Z_]+=' | sort | tr '\n' ' ' || true)bash bench/compare.sh${*:+ $*}"

quick=0
keep=0
write_doc=1
doc=$root/docs/benchmarks.md
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1 ;;
    --keep) keep=1 ;;
    --no-doc) write_doc=0 ;;
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
    *) echo "compare: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done

if [ "$quick" = 1 ]; then
  rounds=${BENCH_ROUNDS:-1}
  secs=${BENCH_SECS:-1}
  warmup=${BENCH_WARMUP_SECS:-0.3}
  preload=${BENCH_PRELOAD:-2000}
  recovery_mb=${BENCH_RECOVERY_MB:-2}
  write_doc=0
else
  rounds=${BENCH_ROUNDS:-3}
  secs=${BENCH_SECS:-5}
  warmup=${BENCH_WARMUP_SECS:-1}
  preload=${BENCH_PRELOAD:-100000}
  recovery_mb=${BENCH_RECOVERY_MB:-1024}
fi
recovery_value_bytes=${BENCH_RECOVERY_VALUE_BYTES:-16}
case "$recovery_mb" in ''|*[!0-9]*|0) echo "compare: BENCH_RECOVERY_MB must be a positive integer" >&2; exit 2 ;; esac
concurrencies=${BENCH_CONCURRENCY:-"1 16 64 256"}
batch_c=${BENCH_BATCH_CONCURRENCY:-16}
case "$secs" in ''|*[!0-9]*|0) echo "compare: BENCH_SECS must be a positive integer (pgbench -T)" >&2; exit 2 ;; esac
# Entities (StemeDB), keys (etcd) and rows (PostgreSQL) the reads pick from.
read_keys=$(( (preload + 19) / 20 ))
preload=$(( read_keys * 20 ))
# pgbench runs whole seconds.
pg_warmup=$(python3 -c "import math, sys; print(math.ceil(float(sys.argv[1])))" "$warmup")

# --- what the run needs ---------------------------------------------------
pg_bindir() { { ls -d /usr/lib/postgresql/*/bin 2>/dev/null || true; } | sort -V | tail -n 1; }
need=()
command -v etcd >/dev/null || need+=(etcd-server)
{ [ -n "$(pg_bindir)" ] && [ -x "$(pg_bindir)/postgres" ]; } || need+=(postgresql)
command -v pgbench >/dev/null || need+=(postgresql-client)
command -v jq >/dev/null || need+=(jq)
command -v curl >/dev/null || need+=(curl)
command -v python3 >/dev/null || need+=(python3)
command -v runuser >/dev/null || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || { echo "compare: missing ${need[*]}; install them (apt-get install ${need[*]}) or run as root" >&2; exit 1; }
  echo "==> apt-get install ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >&2
fi
pg_bin=$(pg_bindir)
id postgres >/dev/null 2>&1 || { echo "compare: no postgres user (the postgresql package creates it)" >&2; exit 1; }

bin=$(bench_pick_bins "$root" "$quick" walld stemed stemectl stemedb-peer-bench)
peer=$bin/stemedb-peer-bench

# --- servers and cleanup ----------------------------------------------------
dir=$(mktemp -d "${TMPDIR:-/tmp}/stemedb-compare.XXXXXX")
# PostgreSQL runs as the postgres user: it must reach its directory.
chmod 755 "$dir"
etcd_pid=""
pg_data=$dir/postgresql/data
pg_started=0
cleanup() {
  local rc=$?
  set +e
  trap - INT TERM
  # Only the processes this script started, by pid.
  stemedb_node_stop
  if [ -n "$etcd_pid" ]; then kill "$etcd_pid" 2>/dev/null && wait "$etcd_pid" 2>/dev/null; fi
  if [ "$pg_started" = 1 ]; then
    runuser -u postgres -- "$pg_bin/pg_ctl" -D "$pg_data" -m fast -w -t 30 stop >/dev/null 2>&1
    if [ -f "$pg_data/postmaster.pid" ]; then
      pg_pid=$(head -n 1 "$pg_data/postmaster.pid")
      [ -n "$pg_pid" ] && kill -QUIT "$pg_pid" 2>/dev/null
    fi
  fi
  if [ "$rc" != 0 ]; then
    stemedb_node_tail_logs
    for log in "$dir"/etcd/etcd.log "$dir"/postgresql/postgres.log; do
      [ -f "$log" ] && { echo "--- $log (last 20 lines)" >&2; tail -n 20 "$log" >&2; }
    done
  fi
  if [ "$keep" = 1 ]; then echo "compare: kept $dir" >&2; else rm -rf "$dir"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

started=$(date +%s)
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
mkdir -p "$dir/fdatasync" "$dir/etcd" "$dir/postgresql" "$dir/pgbench"

# etcd: a single member; its defaults fsync the WAL on every commit.
{ read -r etcd_port; read -r etcd_peer_port; read -r pg_port; } < <(bench_free_ports 3)
etcd_url=http://127.0.0.1:$etcd_port
etcd --name compare --data-dir "$dir/etcd/data" \
  --listen-client-urls "$etcd_url" --advertise-client-urls "$etcd_url" \
  --listen-peer-urls "http://127.0.0.1:$etcd_peer_port" \
  --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer_port" \
  --initial-cluster "compare=http://127.0.0.1:$etcd_peer_port" >"$dir/etcd/etcd.log" 2>&1 &
etcd_pid=$!
ready=0
for _ in $(seq 1 200); do
  if curl -sf "$etcd_url/health" 2>/dev/null | grep -q '"health":"true"'; then ready=1; break; fi
  kill -0 "$etcd_pid" 2>/dev/null || break
  sleep 0.05
done
[ "$ready" = 1 ] || { echo "compare: etcd did not become healthy" >&2; exit 1; }

# PostgreSQL: a fresh cluster, durable settings spelled out.
chown postgres: "$dir/postgresql"
runuser -u postgres -- "$pg_bin/initdb" -D "$pg_data" -U postgres --auth=trust -E UTF8 --locale=C \
  >"$dir/postgresql/initdb.log" 2>&1 || { cat "$dir/postgresql/initdb.log" >&2; exit 1; }
pg_started=1
runuser -u postgres -- "$pg_bin/pg_ctl" -D "$pg_data" -l "$dir/postgresql/postgres.log" -w -t 60 \
  -o "-p $pg_port -k $dir/postgresql -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=on -c synchronous_commit=on -c full_page_writes=on" \
  start >/dev/null
psql_() { psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$pg_port" -U postgres -d postgres "$@"; }
psql_ <<SQL
CREATE TABLE facts (id bigserial PRIMARY KEY, entity text NOT NULL, attr text NOT NULL, value bytea NOT NULL);
CREATE INDEX facts_entity_attr ON facts (entity, attr);
CREATE TABLE kv (k bigint PRIMARY KEY, v bytea NOT NULL);
INSERT INTO kv SELECT g, decode(repeat(md5(g::text), 20), 'hex') FROM generate_series(0, $read_keys - 1) g;
VACUUM ANALYZE;
SQL
pg_sync=$(psql_ -At -c "SELECT string_agg(name || '=' || setting, ', ' ORDER BY name) FROM pg_settings WHERE name IN ('fsync', 'synchronous_commit', 'full_page_writes', 'wal_sync_method')")
cat >"$dir/pgbench/write.sql" <<'SQL'
\set n random(1, 1000000000)
INSERT INTO facts (entity, attr, value) VALUES ('bench:' || CAST(:client_id AS text) || ':' || CAST(:n AS text), 'a0', decode(md5(random()::text), 'hex'));
SQL
cat >"$dir/pgbench/batch.sql" <<'SQL'
\set n random(1, 1000000000)
INSERT INTO facts (entity, attr, value) SELECT 'bench:' || CAST(:client_id AS text) || ':' || CAST(:n AS text), 'a' || g, decode(md5(random()::text), 'hex') FROM generate_series(0, 99) g;
SQL
cat >"$dir/pgbench/read.sql" <<'SQL'
\set k random(0, :nkeys - 1)
SELECT v FROM kv WHERE k = :k;
SQL

"$peer" etcd-preload --endpoint "$etcd_url" --keys "$read_keys" --value-bytes 320 2>>"$dir/etcd/preload.log"

stemedb_node_start "$bin" "$dir/stemedb"
echo "==> up: etcd $etcd_url, PostgreSQL 127.0.0.1:$pg_port ($pg_sync), StemeDB $STEMEDB_ADDR (binaries from $bin)" >&2
echo "==> $rounds round(s); ${secs}s per cell after ${warmup}s warmup; reads over $read_keys entities/keys/rows" >&2

# --- cells ------------------------------------------------------------------
results=$dir/results.jsonl
: >"$results"

# emit ROUND WORKLOAD SYSTEM JSON: one line of results.jsonl.
emit() {
  jq -c --argjson round "$1" --arg workload "$2" --arg system "$3" \
    '{round: $round, workload: $workload, system: $system, report: .}' <<<"$4" >>"$results"
}

# cell_fdatasync ROUND WORKLOAD
cell_fdatasync() {
  local out
  out=$("$peer" fsync --dir "$dir/fdatasync" --duration "$secs" --warmup 0.2)
  emit "$1" "$2" fdatasync "$out"
}

# cell_etcd ROUND WORKLOAD KIND(write|batch|read) CONCURRENCY
cell_etcd() {
  local args=(--concurrency "$4") out
  case "$3" in
    batch) args+=(--tx-size 100) ;;
    read) args+=(--read-keys "$read_keys") ;;
  esac
  out=$("$peer" etcd --endpoint "$etcd_url" --duration "$secs" --warmup "$warmup" "${args[@]}")
  emit "$1" "$2" etcd "$out"
}

# cell_pg ROUND WORKLOAD KIND CONCURRENCY: one pgbench run that outlasts
# connecting every client, the warmup and the measured window; the window
# is cut out of its per-transaction log (see pgbench-log).
cell_pg() {
  local kind=$3 c=$4 log_prefix out report_args=()
  log_prefix=$dir/pgbench/log-r$1-$kind-c$c
  local run_secs=$(( pg_warmup + secs + 1 + (c + 63) / 64 ))
  out=$(pgbench -h 127.0.0.1 -p "$pg_port" -U postgres -n -M prepared -f "$dir/pgbench/$kind.sql" \
    -c "$c" -j "$(( c < 2 ? c : 2 ))" -D "nkeys=$read_keys" -T "$run_secs" \
    -l --log-prefix="$log_prefix" postgres 2>"$log_prefix.err") || {
    echo "compare: pgbench failed:" >&2; cat "$log_prefix.err" >&2; echo "$out" >&2; return 1; }
  case "$kind" in
    batch) report_args+=(--items-per-tx 100) ;;
    read) report_args+=(--read --preload "$read_keys" --value-bytes 320) ;;
  esac
  out=$("$peer" pgbench-log --concurrency "$c" --warmup "$warmup" --duration "$secs" \
    "${report_args[@]}" "$log_prefix".[0-9]*)
  rm -f "$log_prefix".[0-9]*
  emit "$1" "$2" postgresql "$out"
}

# cell_stemedb ROUND WORKLOAD KIND CONCURRENCY
cell_stemedb() {
  local args=(--concurrency "$4") out
  case "$3" in
    write) args+=(--tx-size 1) ;;
    batch) args+=(--tx-size 100) ;;
    read) args+=(--read-ratio 1 --preload "$preload") ;;
  esac
  local rss=0
  if [ "$2" = "write c=256" ]; then bench_rss_reset "$STEMEDB_WALLD_PID" "$STEMEDB_STEMED_PID"; fi
  out=$("$bin/stemectl" --addr "$STEMEDB_ADDR" --timeout 30s --output json bench \
    --duration "${secs}s" --warmup "${warmup}s" "${args[@]}" 2>>"$dir/stemedb/stemectl.log")
  # A node that died mid-cell shows up as errors in that cell; stop here
  # rather than measure the rest against nothing.
  local p
  for p in "$STEMEDB_WALLD_PID" "$STEMEDB_STEMED_PID"; do
    kill -0 "$p" 2>/dev/null || { echo "compare: a StemeDB process (pid $p) exited during $2" >&2; return 1; }
  done
  if [ "$2" = "write c=256" ]; then
    rss=$(bench_rss_peak_kib "$STEMEDB_WALLD_PID" "$STEMEDB_STEMED_PID")
  fi
  emit "$1" "$2" stemedb "$(jq -c --argjson rss "$rss" '. + {rss_peak_kib: $rss}' <<<"$out")"
}

workloads=()
for c in $concurrencies; do workloads+=("write:$c"); done
workloads+=("batch:$batch_c" "read:16")
for round in $(seq 1 "$rounds"); do
  for w in "${workloads[@]}"; do
    kind=${w%%:*}; c=${w#*:}
    case "$kind" in
      write) name="write c=$c" ;;
      batch) name="batch 100 c=$c" ;;
      read) name="read c=$c" ;;
    esac
    echo "==> round $round/$rounds: $name" >&2
    cell_fdatasync "$round" "$name"
    cell_etcd "$round" "$name" "$kind" "$c"
    cell_pg "$round" "$name" "$kind" "$c"
    cell_stemedb "$round" "$name" "$kind" "$c"
  done
done

# --- recovery -----------------------------------------------------------------
recovery=$dir/recovery.json
stemedb_node_stop
echo "==> recovery: writing ${recovery_mb} MiB of WAL" >&2
# Checkpoints stay on (sled reclaims its log space only across flushes);
# walld is asked to truncate nothing.
export STEMEDB_STORAGE_WAL_RETAIN_RECORDS=1000000000000
stemedb_node_start "$bin" "$dir/recovery"
recovery_bytes_target=$(( recovery_mb * 1024 * 1024 ))
wal_bytes=0
assertions=0
while [ "$wal_bytes" -lt "$recovery_bytes_target" ]; do
  out=$("$bin/stemectl" --addr "$STEMEDB_ADDR" --timeout 30s --output json bench --duration "${secs}s" \
    --warmup 0s --tx-size 100 --value-bytes "$recovery_value_bytes" --concurrency "$batch_c" \
    2>>"$dir/recovery/stemectl.log")
  assertions=$(( assertions + $(jq -r '.assertions' <<<"$out") ))
  wal_bytes=$(stemedb_metric stemedb_wal_write_bytes_total)
  echo "    ${wal_bytes} of ${recovery_bytes_target} WAL bytes" >&2
done
records=$(stemedb_status durable_lsn)
stemedb_stemed_stop
rm -rf "$dir/recovery/data"
echo "==> recovery: replaying ${records} records into a new store" >&2
t0=$(date +%s.%N)
stemedb_stemed_start 3600
t1=$(date +%s.%N)
unset STEMEDB_STORAGE_WAL_RETAIN_RECORDS
applied=$(stemedb_status applied_lsn)
[ "$applied" = "$records" ] || { echo "compare: recovery applied $applied of $records records" >&2; exit 1; }
jq -n --argjson wal_bytes "$wal_bytes" --argjson records "$records" --argjson assertions "$assertions" \
  --argjson seconds "$(python3 -c "import sys; print(float(sys.argv[2]) - float(sys.argv[1]))" "$t0" "$t1")" \
  --argjson value_bytes "$recovery_value_bytes" '$ARGS.named' >"$recovery"
stemedb_node_stop

# --- the table ----------------------------------------------------------------
elapsed=$(( $(date +%s) - started ))
load_end=$(cut -d' ' -f1-3 /proc/loadavg)
fs=$(findmnt -no SOURCE,FSTYPE -T "$dir" 2>/dev/null | awk '{ print $1 " " $2; exit }')
meta=$(jq -n \
  --arg date "$(date -u '+%Y-%m-%d %H:%M UTC')" \
  --arg nproc "$(nproc)" \
  --arg cpu "$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)" \
  --arg fs "${fs:-unknown}" \
  --arg etcd "$(etcd --version 2>/dev/null | awk '/^etcd Version/ { print $3; exit }')" \
  --arg pg "$("$pg_bin/postgres" --version | awk '{ print $3; exit }')" \
  --arg pg_sync "$pg_sync" \
  --arg rev "$(git -C "$root" describe --always --dirty 2>/dev/null || echo unknown)" \
  --arg bin "$bin" \
  --arg command "$command_line" \
  --arg rounds "$rounds" --arg secs "$secs" --arg warmup "$warmup" \
  --arg read_keys "$read_keys" --arg preload "$preload" --arg batch_c "$batch_c" \
  --arg elapsed "$elapsed" --arg load_start "$load_start" --arg load_end "$load_end" \
  '$ARGS.named')
table=$(python3 "$root/bench/table.py" "$results" "$meta" "$recovery")
echo
echo "$table"

if [ "$write_doc" = 1 ]; then
  python3 - "$doc" "$table" <<'EOF'
import sys
path, table = sys.argv[1], sys.argv[2]
begin, end = "<!-- compare:begin -->", "<!-- compare:end -->"
text = open(path).read()
block = f"{begin}\n{table}\n{end}"
if begin in text and end in text and text.index(begin) < text.index(end):
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    text = head + block + tail
else:
    text = text.rstrip("\n") + "\n\n## StemeDB, etcd and PostgreSQL side by side\n\n" + block + "\n"
open(path, "w").write(text)
EOF
  echo "compare: table written to docs/benchmarks.md" >&2
fi
echo "compare: done in ${elapsed} s" >&2
