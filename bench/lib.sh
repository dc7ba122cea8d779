# Shell functions shared by the benchmark scripts; source it from bash:
#
#   source bench/lib.sh
#   stemedb_node_start "$bin" "$dir/stemedb"   # walld + stemed
#   ... "$bin/stemectl" --addr "$STEMEDB_ADDR" ...
#   stemedb_node_stop
#
# The node is the production layout: walld and stemed as separate
# processes, stemed's WAL over walld's Unix socket, on free loopback ports.

# bench_free_port: prints a TCP port on 127.0.0.1 that was free just now.
bench_free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# bench_free_ports N: prints N distinct free ports, one a line.
bench_free_ports() {
  local n=$1 p seen=" "
  while [ "$n" -gt 0 ]; do
    p=$(bench_free_port)
    case "$seen" in *" $p "*) continue ;; esac
    seen="$seen$p "
    echo "$p"
    n=$((n - 1))
  done
}

# bench_pick_bins ROOT SMOKE BINARY...: prints the directory to take the
# binaries from. BENCH_BIN_DIR wins; in smoke mode, whichever complete
# build of ROOT/target is newer (in CI only the debug build exists, and a
# stale release build must not shadow the code just built); otherwise a
# fresh release build.
bench_pick_bins() {
  local root=$1 smoke=$2 dir b
  shift 2
  if [ -n "${BENCH_BIN_DIR:-}" ]; then
    dir=$BENCH_BIN_DIR
  elif [ "$smoke" = 1 ]; then
    dir=$root/target/debug
    if bench_have_bins "$root/target/release" "$@" &&
      { ! bench_have_bins "$dir" "$@" || [ "$root/target/release/stemed" -nt "$dir/stemed" ]; }; then
      dir=$root/target/release
    fi
  else
    echo "==> cargo build --release --bins" >&2
    (cd "$root" && cargo build --release --bins >&2) || return 1
    dir=$root/target/release
  fi
  for b in "$@"; do
    [ -x "$dir/$b" ] || {
      echo "$b is not in $dir: build it first (cargo build --workspace --bins --features wald/failpoints)" >&2
      return 1
    }
  done
  echo "$dir"
}

# bench_have_bins DIR BINARY...: true when every BINARY is executable in DIR.
bench_have_bins() {
  local d=$1 b
  shift
  for b in "$@"; do [ -x "$d/$b" ] || return 1; done
}

STEMEDB_WALLD_PID=""
STEMEDB_STEMED_PID=""
STEMEDB_ADDR=""
STEMEDB_ADMIN=""
STEMEDB_NODE_DIR=""
STEMEDB_NODE_BIN=""
STEMEDB_NODE_PORTS=""

# stemedb_node_start BIN_DIR DIR: starts walld and stemed from BIN_DIR
# with their data, socket and logs under DIR; returns once stemed is
# ready. Sets STEMEDB_WALLD_PID, STEMEDB_STEMED_PID, STEMEDB_ADDR (gRPC
# URL) and STEMEDB_ADMIN (admin HTTP URL).
stemedb_node_start() {
  local bin=$1 dir=$2 grpc_port admin_port root_flag=()
  mkdir -p "$dir"
  STEMEDB_NODE_DIR=$dir
  { read -r grpc_port; read -r admin_port; } < <(bench_free_ports 2)
  STEMEDB_ADDR=http://127.0.0.1:$grpc_port
  STEMEDB_ADMIN=http://127.0.0.1:$admin_port
  [ "$(id -u)" = 0 ] && root_flag=(--allow-root)
  "$bin/walld" --dir "$dir/wal" --socket "$dir/walld.sock" "${root_flag[@]}" >"$dir/walld.log" 2>&1 &
  STEMEDB_WALLD_PID=$!
  for _ in $(seq 1 200); do [ -S "$dir/walld.sock" ] && break; sleep 0.05; done
  [ -S "$dir/walld.sock" ] || { echo "walld did not start (log: $dir/walld.log)" >&2; return 1; }
  STEMEDB_NODE_BIN=$bin
  STEMEDB_NODE_PORTS="$grpc_port $admin_port"
  stemedb_stemed_start 15
}

# stemedb_stemed_start TIMEOUT_SECS: starts stemed of the node
# stemedb_node_start made (same binary, directory and ports) and returns
# once /readyz says ready, that is once every record walld holds is
# applied; fails after TIMEOUT_SECS.
stemedb_stemed_start() {
  local timeout=$1 dir=$STEMEDB_NODE_DIR grpc_port admin_port ready=0 deadline
  read -r grpc_port admin_port <<<"$STEMEDB_NODE_PORTS"
  "$STEMEDB_NODE_BIN/stemed" --data-dir "$dir/data" --wal-socket "$dir/walld.sock" \
    --grpc-addr "127.0.0.1:$grpc_port" --admin-addr "127.0.0.1:$admin_port" >>"$dir/stemed.log" 2>&1 &
  STEMEDB_STEMED_PID=$!
  deadline=$(( $(date +%s) + timeout ))
  while [ "$(date +%s)" -le "$deadline" ]; do
    if curl -sf "$STEMEDB_ADMIN/readyz" >/dev/null 2>&1; then ready=1; break; fi
    kill -0 "$STEMEDB_STEMED_PID" 2>/dev/null || break
    sleep 0.05
  done
  [ "$ready" = 1 ] || { echo "stemed did not become ready (log: $dir/stemed.log)" >&2; return 1; }
}

# stemedb_stemed_stop: stops stemed only (SIGTERM, waits); walld stays.
stemedb_stemed_stop() {
  if [ -n "$STEMEDB_STEMED_PID" ]; then
    { kill "$STEMEDB_STEMED_PID" 2>/dev/null && wait "$STEMEDB_STEMED_PID" 2>/dev/null; } || true
    STEMEDB_STEMED_PID=""
  fi
  return 0
}

# stemedb_node_stop: stops the node stemedb_node_start started (only those
# two processes, by pid); safe to call more than once.
stemedb_node_stop() {
  stemedb_stemed_stop
  if [ -n "$STEMEDB_WALLD_PID" ]; then
    { kill "$STEMEDB_WALLD_PID" 2>/dev/null && wait "$STEMEDB_WALLD_PID" 2>/dev/null; } || true
    STEMEDB_WALLD_PID=""
  fi
  return 0
}

# stemedb_node_tail_logs: prints the end of the node's logs to stderr.
stemedb_node_tail_logs() {
  local log
  for log in "$STEMEDB_NODE_DIR"/walld.log "$STEMEDB_NODE_DIR"/stemed.log; do
    [ -f "$log" ] && { echo "--- $log (last 30 lines)" >&2; tail -n 30 "$log" >&2; }
  done
  return 0
}

# stemedb_metric NAME: the node's unlabelled /metrics sample NAME as an
# integer (0 when absent).
stemedb_metric() {
  curl -sf "$STEMEDB_ADMIN/metrics" |
    awk -v n="$1" '$1 == n { printf "%.0f\n", $2; found = 1; exit } END { if (!found) print 0 }'
}

# stemedb_status FIELD: a top-level number of the node's
# /v1/admin/status (0 when absent).
stemedb_status() {
  curl -sf "$STEMEDB_ADMIN/v1/admin/status" |
    python3 -c 'import json, sys; print(json.load(sys.stdin).get(sys.argv[1]) or 0)' "$1"
}

# bench_rss_reset PID...: resets the peak resident set size (VmHWM) of
# each process to its current RSS (Linux clear_refs 5).
bench_rss_reset() {
  local pid
  for pid in "$@"; do echo 5 >"/proc/$pid/clear_refs" 2>/dev/null || true; done
}

# bench_rss_peak_kib PID...: the sum of the processes' VmHWM, in KiB.
bench_rss_peak_kib() {
  local pid total=0 kib
  for pid in "$@"; do
    kib=$(awk '/^VmHWM:/ { print $2 }' "/proc/$pid/status" 2>/dev/null || echo 0)
    total=$((total + ${kib:-0}))
  done
  echo "$total"
}
