#!/usr/bin/env bash
# Disaster-recovery drill: proves that a base backup plus the WAL archive
# restore every acknowledged transaction up to the last archived LSN, and
# measures RPO and RTO.
#
#   1. start a node (walld with --archive-required, stemed) and write a workload;
#   2. take a backup;
#   3. keep writing while the archiver follows;
#   4. destroy the node's data and WAL (kill -9, rm -rf);
#   5. restore into fresh directories and start a node on them;
#   6. compare the content hash over all facts up to the last archived LSN
#      with the source's (taken before the destruction);
#   7. print RPO (records and seconds not recoverable) and RTO (destruction
#      to serving again).
#
# Exit status: 0 when everything matched, 1 on any mismatch or failure.
#
# Usage: deploy/scripts/dr-drill.sh [--tx N] [--after-tx N] [--bin-dir DIR]
#          [--archive DEST] [--backups DEST] [--segment-bytes N] [--keep]
#          [--damage-archive]   (self-test: flip a byte in an archived
#                                segment; the drill must then fail)
# DEST may be a directory or s3://bucket/prefix (AWS_* from the environment).
set -euo pipefail

TX=200            # transactions before the backup
AFTER_TX=400      # transactions while archiving
BATCH=20          # assertions per transaction
BIN_DIR="${STEMEDB_BIN_DIR:-$(cd "$(dirname "$0")/../.." && pwd)/target/debug}"
SEGMENT_BYTES=65536
ARCHIVE=""
BACKUPS=""
KEEP=0
DAMAGE=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tx) TX="$2"; shift 2 ;;
    --after-tx) AFTER_TX="$2"; shift 2 ;;
    --batch) BATCH="$2"; shift 2 ;;
    --bin-dir) BIN_DIR="$2"; shift 2 ;;
    --archive) ARCHIVE="$2"; shift 2 ;;
    --backups) BACKUPS="$2"; shift 2 ;;
    --segment-bytes) SEGMENT_BYTES="$2"; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --damage-archive) DAMAGE=1; shift ;;
    -h|--help) sed -n 2,23p "$0"; exit 0 ;;
    *) echo "dr-drill: unknown argument $1" >&2; exit 2 ;;
  esac
done

WORK="$(mktemp -d -t stemedb-drill.XXXXXX)"
ARCHIVE="${ARCHIVE:-$WORK/archive}"
BACKUPS="${BACKUPS:-$WORK/backups}"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [[ $KEEP == 0 ]]; then rm -rf "$WORK"; else echo "dr-drill: kept $WORK"; fi
}
trap cleanup EXIT
fail() { echo "dr-drill: FAIL: $*" >&2; exit 1; }
now() { date +%s.%N; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
stemectl() { "$BIN_DIR/stemectl" "$@"; }

ROOT_FLAG=()
[[ $(id -u) == 0 ]] && ROOT_FLAG=(--allow-root)

# start_node DIR: walld + stemed on DIR/{wal,data}; sets WALLD_PID STEMED_PID ADMIN
start_node() {
  local dir="$1" grpc admin
  grpc=$(free_port); admin=$(free_port)
  "$BIN_DIR/walld" --dir "$dir/wal" --socket "$dir/walld.sock" --segment-bytes "$SEGMENT_BYTES" \
    --archive-required "${ROOT_FLAG[@]}" >>"$dir/walld.log" 2>&1 &
  WALLD_PID=$!; PIDS+=("$WALLD_PID")
  for _ in $(seq 600); do [[ -S "$dir/walld.sock" ]] && break; sleep 0.05; done
  STEMEDB_STORAGE_CHECKPOINT_INTERVAL_MS=200 "$BIN_DIR/stemed" --data-dir "$dir/data" \
    --grpc-addr "127.0.0.1:$grpc" --admin-addr "127.0.0.1:$admin" \
    --wal-socket "$dir/walld.sock" >>"$dir/stemed.log" 2>&1 &
  STEMED_PID=$!; PIDS+=("$STEMED_PID")
  ADMIN="http://127.0.0.1:$admin"; GRPC="http://127.0.0.1:$grpc"
  for _ in $(seq 1200); do
    curl -sf "$ADMIN/readyz" >/dev/null 2>&1 && return 0
    kill -0 "$STEMED_PID" 2>/dev/null || { tail -20 "$dir/stemed.log" >&2; fail "stemed on $dir exited"; }
    sleep 0.05
  done
  fail "node on $dir not ready"
}

# write_tx FROM COUNT: COUNT transactions of BATCH assertions each.
write_tx() {
  local from="$1" count="$2" file="$WORK/batch.jsonl"
  python3 - "$from" "$count" "$BATCH" >"$file" <<'PY'
import sys
start, count, batch = map(int, sys.argv[1:])
for t in range(start, start + count):
    for a in range(batch):
        print('{"entity": "drill:%d", "attribute": "a%d", "value": %d, "source": "drill"}' % (t % 97, a, t))
PY
  stemectl --addr "$GRPC" assert --file "$file" --batch "$BATCH" >/dev/null
}

lsn_of() { stemectl --admin-addr "$1" status --output json | jq -r .applied_lsn; }

SRC="$WORK/source"; mkdir -p "$SRC"
start_node "$SRC"
echo "dr-drill: source node at $ADMIN, work dir $WORK"
write_tx 0 "$TX"
BACKUP_JSON=$(stemectl --admin-addr "$ADMIN" --output json backup create --to "$BACKUPS")
BACKUP_ID=$(jq -r .id <<<"$BACKUP_JSON")
echo "dr-drill: backup $BACKUP_ID at LSN $(jq -r .basis_lsn <<<"$BACKUP_JSON")"

stemectl wal archive --wal-dir "$SRC/wal" --to "$ARCHIVE" --follow --interval 50ms >>"$WORK/archiver.log" 2>&1 &
ARCHIVER_PID=$!; PIDS+=("$ARCHIVER_PID")
write_tx "$TX" "$AFTER_TX"
LAST_ACK_LSN=$(lsn_of "$ADMIN")
# Let the archiver catch up with what is sealed, as it would in steady state.
for _ in $(seq 200); do
  A=$(stemectl --output json wal archive-status --wal-dir "$SRC/wal" | jq -r .archive_lag_segments)
  [[ "$A" == 0 ]] && break; sleep 0.05
done
kill -9 "$ARCHIVER_PID"; wait "$ARCHIVER_PID" 2>/dev/null || true
STATUS=$(stemectl --output json wal archive-status --wal-dir "$SRC/wal")
ARCHIVED=$(jq -r .archived_lsn <<<"$STATUS")
ARCHIVED_AT=$(jq -r .updated_at_unix_micros <<<"$STATUS")
[[ "$ARCHIVED" -gt 0 ]] || fail "nothing was archived"
# The expected content: the source as of the last archived LSN.
EXPECTED=$(stemectl --admin-addr "$ADMIN" --output json backup create --to "$WORK/expected" --at-lsn "$ARCHIVED" | jq -r .content_sha256)

if [[ $DAMAGE == 1 ]]; then
  [[ -d "$ARCHIVE" ]] || fail "--damage-archive needs a directory archive"
  VICTIM=$(ls "$ARCHIVE"/*.wal | tail -1)
  python3 - "$VICTIM" <<'PY'
import sys
p = sys.argv[1]
b = bytearray(open(p, "rb").read())
b[4096 + 20] ^= 0x20
open(p, "wb").write(bytes(b))
PY
  echo "dr-drill: damaged $VICTIM (self-test)"
fi

# Disaster: the node and its disks are gone.
T_DISASTER=$(now)
kill -9 "$STEMED_PID" "$WALLD_PID"; wait "$STEMED_PID" "$WALLD_PID" 2>/dev/null || true
rm -rf "$SRC/data" "$SRC/wal"

DST="$WORK/restored"; mkdir -p "$DST"
stemectl restore --from "$BACKUPS/$BACKUP_ID" --wal-archive "$ARCHIVE" \
  --data-dir "$DST/data" --wal-dir "$DST/wal" --output json >"$WORK/restore.json" \
  || fail "restore from $BACKUPS/$BACKUP_ID and $ARCHIVE failed (see the error above)"
start_node "$DST"
T_SERVING=$(now)
RESTORED=$(lsn_of "$ADMIN")
[[ "$RESTORED" == "$ARCHIVED" ]] || fail "restored to LSN $RESTORED, expected the archived LSN $ARCHIVED"
GOT=$(stemectl --admin-addr "$ADMIN" --output json backup create --to "$WORK/check" | jq -r .content_sha256)
[[ "$GOT" == "$EXPECTED" ]] || fail "content hash $GOT of the restored node differs from the source's $EXPECTED at LSN $ARCHIVED"

RPO_RECORDS=$((LAST_ACK_LSN - ARCHIVED))
RPO_SECONDS=$(python3 -c "print(f'{max(0.0, $T_DISASTER - $ARCHIVED_AT / 1e6):.1f}')")
RTO_SECONDS=$(python3 -c "print(f'{$T_SERVING - $T_DISASTER:.1f}')")
MBPS=$(jq -r .mb_per_s "$WORK/restore.json")
echo "dr-drill: OK: every transaction up to the archived LSN $ARCHIVED restored with identical content (sha256 $GOT)"
echo "dr-drill: RPO: $RPO_RECORDS WAL records (last acknowledged LSN $LAST_ACK_LSN, archived $ARCHIVED), ${RPO_SECONDS}s since the last archived segment"
echo "dr-drill: RTO: ${RTO_SECONDS}s from destruction to serving (restore $(printf '%.1f' "$MBPS") MB/s)"
