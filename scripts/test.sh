#!/usr/bin/env bash
# The whole StemeDB test suite, from a clean checkout on a fresh machine:
# installs what the tests need, lints, builds, runs every test, and runs the
# benchmarks in smoke mode. Sized for a 2-core machine (under 30 minutes).
#
#   bash scripts/test.sh
#
# Environment: STEMEDB_TEST_SEED replays one seed of the randomized tests.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
step() { printf '\n==> %s\n' "$*"; }
started=$(date +%s)

step "system packages"
need=()
command -v systemd-socket-activate >/dev/null || need+=(systemd)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v python3 >/dev/null || need+=(python3 python3-venv)
command -v npm >/dev/null || need+=(npm)
command -v curl >/dev/null || need+=(curl)
command -v nginx >/dev/null || need+=(nginx)
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v promtool >/dev/null || need+=(prometheus)
command -v jq >/dev/null || need+=(jq)
command -v etcd >/dev/null || need+=(etcd-server)
compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null || need+=(postgresql)
command -v pgbench >/dev/null || need+=(postgresql-client)
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}"
fi

step "buf lint (protos)"
if [ ! -x .tools/node_modules/.bin/buf ]; then
  npm install --silent --prefix .tools @bufbuild/buf@1 >/dev/null
fi
(cd proto && ../.tools/node_modules/.bin/buf lint)

step "Prometheus rules and config (promtool)"
promtool check rules monitoring/prometheus/alerts.yml
promtool test rules monitoring/prometheus/alerts_test.yml
promtool check config monitoring/prometheus/prometheus.yml

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
cargo clippy --workspace --all-targets --features wald/failpoints -- -D warnings

step "build binaries"
# Tests run walld with failpoints compiled in (inert unless FAILPOINTS is
# set), so one build serves the fault tests and all the others.
cargo build --workspace --bins --features wald/failpoints

step "python client (another language)"
bash tests/python/setup.sh

step "S3-compatible server for the backup tests (moto)"
if [ ! -x .tools/moto/bin/moto_server ]; then
  python3 -m venv .tools/moto
  .tools/moto/bin/pip install --quiet 'moto[server]'
fi
export PATH="$PWD/.tools/moto/bin:$PATH"

step "tests"
cargo test --workspace --features wald/failpoints

step "benchmarks, smoke mode"
# Smoke mode proves the benchmarks run; it builds them in the test profile
# (no second, release build of the whole tree). Real numbers come from the
# commands in docs/benchmarks.md.
STEMEDB_BENCH_SMOKE=1 cargo test -p wald --features failpoints --bench wal_bench
bash scripts/bench-stemed.sh --smoke

step "StemeDB beside etcd and PostgreSQL, smoke mode"
# One short round of bench/compare.sh on the debug build: proves the
# comparison runs end to end (table on stdout; docs/benchmarks.md untouched).
bash bench/compare.sh --quick

echo
echo "all checks passed in $(( $(date +%s) - started )) s"
