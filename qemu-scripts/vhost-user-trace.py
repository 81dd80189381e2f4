#!/usr/bin/env python3
"""vhost-user-trace.py -- decodes the vhost-user messages a backend received, from
`strace -f -tt -T -xx -s 256 -e trace=recvmsg,sendmsg -o FILE colo-blk ...`
(colo-qemu-pair.sh --strace writes primary.strace / secondary.strace).

Usage: vhost-user-trace.py FILE [--events events.log]

Prints one line per front-end request: time, request name and its payload (queue index, value).
With --events (colo-qemu-pair.sh's events.log), QEMU's QMP events are merged in by timestamp.
Only sockets whose first message is GET_FEATURES are decoded (the vhost-user socket; not QMP or
the replication link).
"""

import argparse
import datetime
import json
import re
import struct
import sys

REQ = {
    1: "GET_FEATURES", 2: "SET_FEATURES", 3: "SET_OWNER", 4: "RESET_OWNER", 5: "SET_MEM_TABLE",
    6: "SET_LOG_BASE", 7: "SET_LOG_FD", 8: "SET_VRING_NUM", 9: "SET_VRING_ADDR",
    10: "SET_VRING_BASE", 11: "GET_VRING_BASE", 12: "SET_VRING_KICK", 13: "SET_VRING_CALL",
    14: "SET_VRING_ERR", 15: "GET_PROTOCOL_FEATURES", 16: "SET_PROTOCOL_FEATURES",
    17: "GET_QUEUE_NUM", 18: "SET_VRING_ENABLE", 19: "SEND_RARP", 20: "NET_SET_MTU",
    21: "SET_BACKEND_REQ_FD", 22: "IOTLB_MSG", 23: "SET_VRING_ENDIAN", 24: "GET_CONFIG",
    25: "SET_CONFIG", 31: "GET_INFLIGHT_FD", 32: "SET_INFLIGHT_FD", 34: "RESET_DEVICE",
    35: "VRING_KICK", 36: "GET_MAX_MEM_SLOTS", 37: "ADD_MEM_REG", 38: "REM_MEM_REG",
    39: "SET_STATUS", 40: "GET_STATUS", 42: "SET_DEVICE_STATE_FD", 43: "CHECK_DEVICE_STATE",
}
LINE = re.compile(r'^(\d+)\s+(\d\d:\d\d:\d\d\.\d+) (recvmsg|sendmsg)\((\d+), \{.*?msg_iov=\[(.*?)\], msg_iovlen.*\) = (\d+)(?: <([0-9.]+)>)?')
UNFINISHED = re.compile(r'^(\d+)\s+(\d\d:\d\d:\d\d\.\d+) (recvmsg|sendmsg)\((\d+),\s+<unfinished')
RESUMED = re.compile(r'^(\d+)\s+(\d\d:\d\d:\d\d\.\d+) <\.\.\. (recvmsg|sendmsg) resumed>\{.*?msg_iov=\[(.*?)\], msg_iovlen.*\) = (\d+)(?: <([0-9.]+)>)?')
IOV = re.compile(r'iov_base="((?:\\x[0-9a-f]{2})*)"')


def unhex(s):
    return bytes(int(h, 16) for h in re.findall(r"\\x([0-9a-f]{2})", s))


def secs(t):
    h, m, rest = t.split(":")
    return int(h) * 3600 + int(m) * 60 + float(rest)


def hms(x):
    h = int(x // 3600)
    m = int(x % 3600 // 60)
    return f"{h:02d}:{m:02d}:{x % 60:09.6f}"


def payload(req, p):
    if req in (8, 10, 18, 11) and len(p) >= 4:
        idx = struct.unpack_from("<I", p)[0]
        if req == 11:
            return f"q{idx}"
        return f"q{idx} {struct.unpack_from('<I', p, 4)[0]}" if len(p) >= 8 else f"q{idx}"
    if req in (12, 13, 14) and len(p) >= 8:
        v = struct.unpack_from("<Q", p)[0]
        return f"q{v & 0xff}{' nofd' if v & 0x100 else ''}"
    if req == 9 and len(p) >= 4:
        return f"q{struct.unpack_from('<I', p)[0]}"
    if req == 2 and len(p) >= 8:
        v = struct.unpack_from("<Q", p)[0]
        return f"0x{v:x}{' LOG_ALL' if v & (1 << 26) else ''}"
    if req == 39 and len(p) >= 8:
        return f"0x{struct.unpack_from('<Q', p)[0]:x}"
    return ""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("--events")
    a = ap.parse_args()
    streams = {}  # fd -> [bytes, [(offset, time)]]
    day = None
    pending = {}  # pid -> fd of its unfinished call (strace -f splits calls other threads interrupt)
    for line in open(a.file, errors="replace"):
        m = LINE.match(line)
        if m:
            _, t, call, fd, iov, n, dur = m.groups()
        else:
            u = UNFINISHED.match(line)
            if u:
                pending[u.group(1)] = u.group(4)
                continue
            m = RESUMED.match(line)
            if not m or m.group(1) not in pending:
                continue
            pid, t, call, iov, n, dur = m.groups()
            fd = pending.pop(pid)
            dur = None  # the resumed line is stamped when the call returned
            s = streams.setdefault(fd, [b"", []])
            if call == "recvmsg":
                data = b"".join(unhex(x) for x in IOV.findall(iov))[: int(n)]
                s[1].append([len(s[0]), secs(t)])
                s[0] += data
            continue
        s = streams.setdefault(fd, [b"", []])
        # strace -tt stamps a call when it is entered; a recvmsg blocks until the message
        # arrives. With -T the return time is entry + duration; without it, the entry of the
        # next call on the socket (the payload read or the reply) is taken.
        ret = secs(t) + float(dur) if dur else None
        if s[1] and s[1][-1][1] is None:
            s[1][-1][1] = secs(t)
        if call == "sendmsg":
            continue
        data = b"".join(unhex(x) for x in IOV.findall(iov))[: int(n)]
        s[1].append([len(s[0]), ret])
        s[0] += data
    out = []
    for fd, (buf, times) in streams.items():
        if len(buf) < 12 or struct.unpack_from("<I", buf)[0] != 1:
            continue
        off = 0
        ti = 0
        while off + 12 <= len(buf):
            req, flags, size = struct.unpack_from("<III", buf, off)
            while ti + 1 < len(times) and times[ti + 1][0] <= off:
                ti += 1
            p = buf[off + 12: off + 12 + size]
            t = times[ti][1]
            out.append((hms(t) if t is not None else "??:??:??.??????", f"fd{fd} {REQ.get(req, req)} {payload(req, p)}".rstrip()))
            off += 12 + size
    if a.events:
        for line in open(a.events):
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if "vm" in e and "ts" in e:
                t = datetime.datetime.fromtimestamp(e["ts"], datetime.timezone.utc).strftime("%H:%M:%S.%f")
                extra = f" pause {e['pause_ms']} ms" if "pause_ms" in e else ""
                out.append((t, f"=== {e['vm']} {e['event']}{extra}"))
    out.sort(key=lambda x: x[0])
    for t, s in out:
        print(t, s)


if __name__ == "__main__":
    sys.exit(main())
