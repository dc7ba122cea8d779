#!/usr/bin/env python3
"""A StemeDB client in another language, as a check of the public gRPC API.

Usage: client.py HOST:PORT

Transacts two assertions (a text and an int64 value, both with a confidence)
under an idempotency key, repeats the call to check deduplication, then Gets
the entity and checks that exactly those facts came back stamped with the
transaction. Prints one JSON object on stdout. Exits 0 on success, 1 when a
check fails, 2 on usage errors and 3 when a call fails.

The stubs are generated into gen/ by setup.sh; nothing is generated here.
"""

import json
import math
import os
import sys
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
# Generated modules import each other as `stemedb.v1.store_pb2`.
sys.path.insert(0, os.path.join(HERE, "gen"))

try:
    import grpc
    from stemedb.v1 import store_pb2, store_pb2_grpc
except ImportError as e:  # pragma: no cover - setup problem, not a test result
    print(f"error: cannot import the generated stubs ({e}); run tests/python/setup.sh", file=sys.stderr)
    sys.exit(2)

TIMEOUT_S = 10.0
SOURCE = "python-client"


class CheckFailed(Exception):
    pass


def check(condition, what):
    if not condition:
        raise CheckFailed(what)


def value_json(v):
    kind = v.WhichOneof("kind")
    return {"type": kind, "value": getattr(v, kind) if kind else None}


def fact_json(f):
    return {
        "entity": f.entity,
        "attribute": f.attribute,
        "value": value_json(f.value),
        "source": f.source,
        "confidence": f.confidence if f.HasField("confidence") else None,
        "op": store_pb2.Op.Name(f.op),
        "tx": f.tx,
    }


def run(addr):
    entity = f"py:{uuid.uuid4()}"
    key = str(uuid.uuid4())
    wanted = {
        "name": ("text", "Ada Lovelace", 0.9),
        "age": ("int64", 36, 0.5),
    }
    assertions = [
        store_pb2.Assertion(
            entity=entity,
            attribute=attribute,
            value=store_pb2.Value(**{kind: value}),
            source=SOURCE,
            confidence=confidence,
            op=store_pb2.OP_ASSERT,
        )
        for attribute, (kind, value, confidence) in wanted.items()
    ]

    with grpc.insecure_channel(addr) as channel:
        grpc.channel_ready_future(channel).result(timeout=TIMEOUT_S)
        stub = store_pb2_grpc.StoreStub(channel)
        request = store_pb2.TransactRequest(assertions=assertions, idempotency_key=key)

        first = stub.Transact(request, timeout=TIMEOUT_S)
        check(first.tx > 0, f"transact returned tx {first.tx}")
        check(not first.deduplicated, "a fresh idempotency key was reported as deduplicated")
        check(first.HasField("recorded_at"), "transact returned no recorded_at")

        again = stub.Transact(request, timeout=TIMEOUT_S)
        check(again.deduplicated, "repeating the idempotency key was not deduplicated")
        check(again.tx == first.tx, f"repeated key returned tx {again.tx}, first call tx {first.tx}")

        got = stub.Get(store_pb2.GetRequest(entity=entity), timeout=TIMEOUT_S)

    check(got.entity == entity, f"get answered for entity {got.entity!r}, asked {entity!r}")
    check(got.basis_tx >= first.tx, f"get basis_tx {got.basis_tx} is before tx {first.tx}")
    check(len(got.facts) == len(wanted), f"get returned {len(got.facts)} facts, wanted {len(wanted)}")
    by_attribute = {f.attribute: f for f in got.facts}
    check(set(by_attribute) == set(wanted), f"get returned attributes {sorted(by_attribute)}")
    for attribute, (kind, value, confidence) in wanted.items():
        f = by_attribute[attribute]
        check(f.entity == entity, f"{attribute}: entity {f.entity!r}")
        check(f.value.WhichOneof("kind") == kind, f"{attribute}: value kind {f.value.WhichOneof('kind')}")
        check(getattr(f.value, kind) == value, f"{attribute}: value {getattr(f.value, kind)!r}, wanted {value!r}")
        check(f.source == SOURCE, f"{attribute}: source {f.source!r}")
        check(f.HasField("confidence") and math.isclose(f.confidence, confidence), f"{attribute}: confidence")
        check(f.op in (store_pb2.OP_UNSPECIFIED, store_pb2.OP_ASSERT), f"{attribute}: op {f.op}")
        check(f.tx == first.tx, f"{attribute}: tx {f.tx}, transaction was {first.tx}")

    return {
        "ok": True,
        "entity": entity,
        "idempotency_key": key,
        "tx": first.tx,
        "basis_tx": got.basis_tx,
        "facts": [fact_json(f) for f in got.facts],
    }


def main(argv):
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    addr = argv[1]
    for prefix in ("http://", "https://"):
        if addr.startswith(prefix):
            addr = addr[len(prefix):]
    try:
        result = run(addr)
    except CheckFailed as e:
        print(json.dumps({"ok": False, "check_failed": str(e)}))
        print(f"error: check failed: {e}", file=sys.stderr)
        return 1
    except grpc.FutureTimeoutError:
        print(f"error: cannot connect to {addr} within {TIMEOUT_S} s", file=sys.stderr)
        return 3
    except grpc.RpcError as e:
        print(f"error: call failed: {e.code()}: {e.details()}", file=sys.stderr)
        return 3
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
