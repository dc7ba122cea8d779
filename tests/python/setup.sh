#!/usr/bin/env bash
# Prepares the Python client test: a venv at tests/python/.venv with the
# pinned requirements, and stubs generated from proto/ into tests/python/gen.
# Idempotent and non-interactive: rerunning only refreshes what changed.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="$here/.venv"
gen="$here/gen"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi

# Reinstall only when requirements.txt changed since the last install.
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    "$venv/bin/python" -m pip install --disable-pip-version-check --no-input --quiet -r "$here/requirements.txt"
    echo "$want" > "$stamp"
fi

# Regenerate the stubs every time: it takes a second and keeps them in
# step with the proto. Generated modules import each other as
# `stemedb.v1.store_pb2`, so gen/ is a package root with __init__.py files.
rm -rf "$gen"
mkdir -p "$gen"
(cd "$root" && "$venv/bin/python" -m grpc_tools.protoc -I proto \
    --python_out="$gen" --grpc_python_out="$gen" proto/stemedb/v1/store.proto)
touch "$gen/stemedb/__init__.py" "$gen/stemedb/v1/__init__.py"
echo "python client ready: $venv, stubs in $gen"
