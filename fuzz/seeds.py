#!/usr/bin/env python3
"""Writes the hand-made seed inputs of every fuzz target to fuzz/corpus/<target>/seed-*.

The byte layouts follow the encoders in wald/src/record.rs, wald/src/segment.rs
and stemed/src/store/codec.rs, and the input readers of wald/src/fuzzing.rs and
stemed/src/fuzzing.rs. Run from anywhere: python3 fuzz/seeds.py
"""

import hashlib
import hmac
import base64
import os
import struct

ROOT = os.path.dirname(os.path.abspath(__file__))


def _crc32c_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


assert crc32c(b"123456789") == 0xE3069283


# wald/src/record.rs: { len u32 LE | crc32c u32 LE over (len | lsn | data) | lsn u64 LE | data }
def frame(lsn: int, data: bytes) -> bytes:
    ln = struct.pack("<I", len(data))
    l = struct.pack("<Q", lsn)
    return ln + struct.pack("<I", crc32c(ln + l + data)) + l + data


# wald/src/segment.rs: { magic | version u32 | first_lsn u64 | header_bytes u32 | crc32c }
def segment_header(first_lsn: int) -> bytes:
    h = b"STMWALSG" + struct.pack("<IQI", 1, first_lsn, 4096)
    return h + struct.pack("<I", crc32c(h))


def be_str(s: bytes) -> bytes:
    return struct.pack(">I", len(s)) + s


# stemed/src/store/codec.rs
def tx(key, micros, assertions) -> bytes:
    out = bytes([0xA7, 1, 1 if key is not None else 0]) + struct.pack(">q", micros)
    if key is not None:
        out += be_str(key)
    out += struct.pack(">I", len(assertions))
    for op, e, a, s, conf, value in assertions:
        out += bytes([op]) + be_str(e) + be_str(a) + be_str(s)
        out += b"\x00" if conf is None else b"\x01" + struct.pack(">d", conf)
        out += value
    return out + struct.pack(">I", crc32c(out))


def write(target: str, name: str, data: bytes):
    d = os.path.join(ROOT, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def u8(x):
    return bytes([x])


def le64(x):
    return struct.pack("<Q", x)


def le16(x):
    return struct.pack("<H", x)


def main():
    # wal_record: raw frames (decode path) and lsn|flip|trailing|payload (round trip).
    write("wal_record", "frame", frame(1, b"hello"))
    write("wal_record", "two-frames", frame(7, b"a" * 40) + frame(8, b""))
    write("wal_record", "frame-then-zeroes", frame(3, b"xyz") + bytes(20))
    write("wal_record", "zeroes", bytes(32))
    write("wal_record", "roundtrip", le64(42) + le16(77) + u8(5) + b"payload")

    # wal_segment_header: header, padded header, names.
    write("wal_segment_header", "header", segment_header(1))
    write("wal_segment_header", "header-padded", segment_header(1 << 40) + bytes(4068))
    write("wal_segment_header", "name", b"00000000000000000001.wal")
    write("wal_segment_header", "name-max", b"18446744073709551615.wal")

    # wal_recovery, raw mode (0xFF): the body of segment 1 after its header.
    body = frame(1, b"one") + frame(2, b"two") + frame(3, b"three")
    write("wal_recovery", "raw-clean", b"\xff" + body + bytes(64))
    write("wal_recovery", "raw-torn-tail", b"\xff" + body + frame(4, b"four")[:10])
    write("wal_recovery", "raw-damage", b"\xff" + frame(1, b"one") + b"\x01" * 16 + frame(2, b"two"))
    # Structured mode: see build_segments in wald/src/fuzzing.rs.
    rec = lambda data: u8(0) + u8(len(data)) + data  # a record with the next LSN
    seg = lambda recs, pad=0, flip=0: (
        u8(0) + u8(0) + u8(len(recs)) + b"".join(recs) + u8(pad) + le16(flip)
    )
    write("wal_recovery", "two-segments",
          u8(0) + u8(1) + seg([rec(b"a"), rec(b"bb")]) + seg([rec(b"ccc")], pad=2) + u8(0))
    write("wal_recovery", "gap",
          u8(0) + u8(1) + seg([rec(b"a")]) + u8(5) + u8(0) + u8(1) + rec(b"b") + u8(0) + le16(0) + u8(0))
    write("wal_recovery", "torn-frame",
          u8(0) + u8(0) + u8(0) + u8(0) + u8(2) + rec(b"a") + u8(7) + u8(8) + b"partial!" + le16(11)
          + u8(1) + le16(0) + u8(1))
    write("wal_recovery", "near-lsn-max",
          u8(2) + u8(0) + u8(0) + seg([rec(b"x"), rec(b"y")]) + u8(0))
    write("wal_recovery", "flipped",
          u8(0) + u8(0) + seg([rec(b"a"), rec(b"b"), rec(b"c")], flip=2 * 4120 + 1) + u8(0x40) + u8(2))

    # tx_codec: records as encode_tx writes them.
    int64 = lambda i: u8(2) + struct.pack(">q", i)
    text = lambda s: u8(1) + be_str(s)
    write("tx_codec", "golden",
          tx(b"k", 2, [(2, b"e", b"a", b"s", 0.5, int64(-1))]))
    write("tx_codec", "values", tx(None, 1_700_000_000_000_000, [
        (1, b"user:1", b"name", b"crm", None, text("Ada".encode())),
        (1, b"user:1", b"score", b"crm", 1.0, u8(3) + struct.pack(">d", 2.5)),
        (1, b"user:1", b"ok", b"crm", None, u8(4) + u8(1)),
        (1, b"user:1", b"blob", b"crm", None, u8(5) + be_str(b"\x00\xff")),
        (2, b"user:1", b"friend", b"crm", 0.25, u8(6) + be_str(b"user:2")),
        (1, b"user:1", b"born", b"crm", None, u8(7) + struct.pack(">qi", -5, 7)),
    ]))
    write("tx_codec", "empty", tx(None, 0, []))

    # assertion_validation: limits | record (see stemed/src/fuzzing.rs).
    s = lambda b: u8(1) + u8(len(b)) + b  # a short string
    assertion = lambda value, conf=b"\x00", op=0: s(b"e1") + s(b"attr") + value + s(b"src") + conf + u8(op)
    valid_tx = u8(1) + s(b"key-1") + le64(123) + u8(2) + assertion(u8(1) + le64(5)) + assertion(
        u8(0) + s(b"text"), conf=u8(1) + u8(4) + u8(100))
    write("assertion_validation", "valid", u8(0) + valid_tx)
    write("assertion_validation", "small-limits", u8(1) + u8(2) + u8(3) + u8(4) + u8(5) + valid_tx)
    write("assertion_validation", "long-name",
          u8(0) + u8(0) + le64(1) + u8(1) + u8(3) + u8(0) + le16(513) + s(b"a") + u8(3) + u8(1) + s(b"s") + u8(0) + u8(0))
    write("assertion_validation", "bad-timestamp",
          u8(0) + u8(0) + le64(1) + u8(1) + assertion(u8(6) + le64(9) + u8(3)))

    # page_token: mode | secret[32] | kind and params | ...
    secret = bytes(range(32))
    query = u8(0) + s(b"name") + u8(1) + u8(1) + u8(1)  # attribute "name", no value/source/as_of
    write("page_token", "sealed-query", u8(2) + secret + query + le64(9) + le16(3) + b"\x01name\x00\x01")
    write("page_token", "sealed-history", u8(5) + secret + u8(1) + s(b"e1") + u8(1) + u8(0) + le64(3) + u8(1)
          + le64(7) + le16(0) + b"e1\x00\x01")
    body = b"\x01\x01" + bytes(16) + struct.pack(">QI", 4, 3) + b"abc"
    write("page_token", "authenticated-body", u8(1) + secret + query + body)
    tag = hmac.new(secret, body, hashlib.sha256).digest()
    token = base64.urlsafe_b64encode(body + tag).rstrip(b"=")
    write("page_token", "token-string", u8(0) + secret + query + token)


if __name__ == "__main__":
    main()
