#!/usr/bin/env python3
"""Drive a colo-blk QMP server with the stock python `qemu.qmp` clients.

Usage: qmp_client.py SOCKET_PATH

The server must offer the commands `echo` (returns its arguments) and
`fire-event` (emits event `name` with `data`), and accept `quit`, as the
in-process server of tests/qmp_python.rs does. Prints "qmp_client: ALL OK" and
exits 0 when every check passed; any failure raises (exit 1). A hard alarm
guards against hangs.
"""

import asyncio
import signal
import subprocess
import sys

from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol

# Failure guards only: every wait ends as soon as the awaited message arrives.
STEP_TIMEOUT = 20
HARD_TIMEOUT = 90


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print(f"ok: {what}")


async def with_timeout(aw):
    return await asyncio.wait_for(aw, STEP_TIMEOUT)


async def async_client(path):
    qmp = QMPClient("colo-blk-test")
    await with_timeout(qmp.connect(path))  # greeting + qmp_capabilities

    ver = qmp.greeting.QMP.version
    check(isinstance(ver["qemu"]["major"], int) and ver["package"].startswith("colo-blk "),
          f"greeting version {ver}")
    check(list(qmp.greeting.QMP.capabilities) == [], "no capabilities offered")

    names = {c["name"] for c in await with_timeout(qmp.execute("query-commands"))}
    check({"qmp_capabilities", "query-commands", "query-version", "quit",
           "echo", "fire-event"} <= names, f"query-commands lists {sorted(names)}")

    reply = await with_timeout(qmp.execute("query-version"))
    check(reply == dict(ver), "query-version matches the greeting")

    reply = await with_timeout(qmp.execute("echo", {"msg": "hi", "n": [1, 2]}))
    check(reply == {"msg": "hi", "n": [1, 2]}, "echo returns its arguments")

    try:
        await with_timeout(qmp.execute("no-such-command"))
        raise AssertionError("unknown command succeeded")
    except ExecuteError as err:
        check(err.error_class == "CommandNotFound", f"unknown command: {err}")

    # Many requests in flight at once: replies are routed back by id.
    replies = await with_timeout(asyncio.gather(
        *(qmp.execute("echo", {"i": i}) for i in range(32))))
    check([r["i"] for r in replies] == list(range(32)), "32 concurrent executes")

    await with_timeout(qmp.execute("fire-event",
                                   {"name": "COLO_TEST", "data": {"node": "colo0"}}))
    event = await with_timeout(qmp.events.get())
    check(event["event"] == "COLO_TEST" and event["data"] == {"node": "colo0"},
          f"event received: {dict(event)}")
    ts = event["timestamp"]
    check(isinstance(ts["seconds"], int) and 0 <= ts["microseconds"] < 1000000,
          "event timestamp shape")

    await with_timeout(qmp.disconnect())


def legacy_client(path):
    """The synchronous wrapper that qmp-shell and QEMU's iotests use."""
    qmp = QEMUMonitorProtocol(path)
    qmp.settimeout(STEP_TIMEOUT)
    greeting = qmp.connect(negotiate=True)
    check("QMP" in greeting, "legacy client greeting")
    check(qmp.cmd("echo", legacy=True) == {"legacy": True}, "legacy cmd()")
    resp = qmp.cmd_obj({"execute": "echo", "arguments": {"x": 1}, "id": "my-id"})
    check(resp == {"return": {"x": 1}, "id": "my-id"}, "legacy cmd_obj() echoes the id")
    qmp.cmd("fire-event", name="LEGACY_EVENT")
    event = qmp.pull_event(wait=STEP_TIMEOUT)
    check(event is not None and event["event"] == "LEGACY_EVENT", "legacy pull_event()")
    qmp.close()


def qmp_shell(path):
    """qmp-shell itself, fed commands on stdin."""
    proc = subprocess.run(
        [sys.executable, "-m", "qemu.qmp.qmp_shell", path],
        input="echo word=shell\nno-such-command\n",
        capture_output=True, text=True, timeout=STEP_TIMEOUT, check=False)
    out = proc.stdout + proc.stderr
    check(proc.returncode == 0, f"qmp-shell exit status {proc.returncode}: {out!r}")
    check("'word': 'shell'" in out or '"word": "shell"' in out, "qmp-shell ran echo")
    check("CommandNotFound" in out, "qmp-shell shows errors")


async def quit_last(path):
    qmp = QMPClient("colo-blk-quit")
    await with_timeout(qmp.connect(path))
    check(await with_timeout(qmp.execute("quit")) == {}, "quit replies {}")
    await with_timeout(qmp.disconnect())


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    signal.alarm(HARD_TIMEOUT)
    path = sys.argv[1]
    asyncio.run(async_client(path))
    legacy_client(path)
    qmp_shell(path)
    asyncio.run(quit_last(path))
    print("qmp_client: ALL OK")


if __name__ == "__main__":
    main()
