#!/usr/bin/env python3
"""Writes the hand-made seed files of fuzz/corpus/ (frame_decode, secondary_session, qmp_input).
The virtio_request seeds are structured (arbitrary) inputs picked from fuzzer runs; see
docs/fuzzing.md."""
import os
import struct

def crc32c(data, crc=0):
    crc ^= 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF

def frame(ty, seq=0, offset=0, length=0, payload=b"", flags=0):
    h = b"COLO" + struct.pack("<BBHQQQI", ty, flags, 0, seq, offset, length, len(payload))
    return h + struct.pack("<I", crc32c(h + payload)) + payload

DISK = 1 << 20
ZERO = 0x5a45524f5a45524f  # metadata::ZERO_GENERATION
def gens(disk_id=1, current=2, bitmap=ZERO, source=0, epoch=0, history=(0, 0, 0, 0), flags=0):
    return (disk_id.to_bytes(16, "little") + struct.pack("<QQQQ", current, bitmap, source, epoch)
            + struct.pack("<4Q", *history) + struct.pack("<I", flags))
def hello(disk=DISK, block=512, version=2):
    return frame(1, payload=struct.pack("<IIQQI", version, block, disk, 0, 0) + gens())
def welcome():
    return frame(2, payload=struct.pack("<IIQII", 2, 512, DISK, 1, 0) + gens(disk_id=3, current=ZERO, bitmap=0))
def write(seq, off, data):
    return frame(3, seq, off, len(data), data)
def zeroes(seq, off, n, unmap=False):
    return frame(4, seq, off, n, flags=1 if unmap else 0)
def discard(seq, off, n):
    return frame(5, seq, off, n)
def flush(seq):
    return frame(6, seq)
def checkpoint(seq, epoch):
    return frame(7, seq, 0, epoch)
ack = lambda seq: frame(8, seq)
heartbeat = frame(9)
error = lambda m: frame(10, payload=m)

def put(target, name, data):
    with open(os.path.join("corpus", target, name), "wb") as f:
        f.write(data)

stream = (write(1, 8192, bytes(range(256)) * 16) + zeroes(2, 0, 512) + heartbeat
          + discard(3, 65536, 4096) + flush(4) + checkpoint(5, 1) + write(6, 4096, b"\xab" * 6000)
          + zeroes(7, 1 << 19, 1 << 16, True))
put("frame_decode", "hello", hello())
put("frame_decode", "welcome-ack-error", welcome() + ack(3) + error(b"disk size mismatch"))
put("frame_decode", "stream", stream)
# Failback: PEER_DIRTY (offset = extent size, length = disk size, one bit per extent), a good
# one (extents 0 and 3 of 16) after WELCOME, then one with a bit past the last extent.
peer_dirty = lambda extent, disk, bits: frame(14, 0, extent, disk, bits)
put("frame_decode", "welcome-peer-dirty",
    welcome() + peer_dirty(DISK // 16, DISK, bytes([0x09, 0x00]))
    + peer_dirty(DISK // 8, DISK // 8 * 7, bytes([0x80])))
put("frame_decode", "garbage-then-frame", b"COLO\x03junk" + write(9, 0, b"x" * 512))

put("secondary_session", "raw-hello-stream", b"\x00" + hello() + stream)
put("secondary_session", "raw-wrong-disk-size", b"\x00" + hello(disk=DISK * 2) + write(1, 0, b"a" * 512))
put("secondary_session", "hello-then-stream", b"\x01" + stream)
put("secondary_session", "hello-seq-gap", b"\x01" + write(1, 0, b"b" * 512) + write(3, 512, b"c" * 512))
put("secondary_session", "hello-out-of-range", b"\x01" + write(1, DISK - 256, b"d" * 512) + write(2, 0, b"e" * 512))
put("secondary_session", "structured", b"\x02" + bytes(range(256)) * 4)

neg = b'{"execute": "qmp_capabilities"}\n'
put("qmp_input", "negotiate-query-replication", neg + b'{"execute": "query-replication", "id": 1}\n')
put("qmp_input", "commands", neg + b'{"execute": "query-status"}\r\n{"execute": "query-commands"}\n'
    b'{"execute": "replication-failover"}\n{"execute": "nope", "arguments": {}}\n{"execute": "quit"}\n')
put("qmp_input", "before-negotiation", b'{"execute": "query-replication"}\n' + neg)
put("qmp_input", "bad-json", neg + b'{"execute": \n[1, 2\n"\\ud800"\n{"execute": "query-status", "arguments": {"x": 1}}\n')
put("qmp_input", "oob-and-id", neg + b'{"exec-oob": "query-status", "id": [1, {"a": null}]}\n{"execute": "query-version", "id": "x"}')
