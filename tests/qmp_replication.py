#!/usr/bin/env python3
"""Drive a real colo-blk primary/secondary pair with the stock `qemu.qmp` client.

Usage: qmp_replication.py PRIMARY_QMP SECONDARY_QMP

Runs query-replication on both sides, a checkpoint on the primary, and waits for the
REPLICATION_CHECKPOINT event on the secondary. Prints "qmp_replication: OK" on success.
"""

import asyncio
import sys

from qemu.qmp import ExecuteError, QMPClient

TIMEOUT = 30


async def main(pq_path, sq_path):
    pq, sq = QMPClient("pq"), QMPClient("sq")
    await asyncio.wait_for(pq.connect(pq_path), TIMEOUT)
    await asyncio.wait_for(sq.connect(sq_path), TIMEOUT)
    assert pq.greeting.QMP.version["package"].startswith("colo-blk"), pq.greeting
    p = await pq.execute("query-replication")
    s = await sq.execute("query-replication")
    assert p["role"] == "primary" and p["state"] == "connected", p
    assert s["role"] == "secondary" and s["state"] == "connected", s
    names = {c["name"] for c in await pq.execute("query-commands")}
    assert {"replication-checkpoint", "query-replication", "quit"} <= names, names
    r = await asyncio.wait_for(pq.execute("replication-checkpoint", {"timeout-ms": 20000}), TIMEOUT)
    epoch = r["epoch"]
    # The client's default listener buffers every event since it connected.
    async for ev in sq.events:
        if ev["event"] == "REPLICATION_CHECKPOINT":
            assert ev["data"]["epoch"] == epoch, ev
            assert "seconds" in ev["timestamp"] and "microseconds" in ev["timestamp"], ev
            break
    try:
        await pq.execute("replication-failover")
        raise AssertionError("failover must not exist on the primary")
    except ExecuteError as e:
        assert e.error_class == "CommandNotFound", e
    await pq.disconnect()
    await sq.disconnect()
    print("qmp_replication: OK")


if __name__ == "__main__":
    asyncio.run(asyncio.wait_for(main(sys.argv[1], sys.argv[2]), 2 * TIMEOUT))
