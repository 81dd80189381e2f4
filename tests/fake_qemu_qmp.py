#!/usr/bin/env python3
"""fake_qemu_qmp.py SOCKET -- a stand-in for a VM's QEMU in tests/consistency_group.rs: a QMP
server that answers qmp_capabilities, query-status, stop and cont (a run state, nothing else),
so that colo-ctl's group logic runs against backends written by a blkio client instead of a
guest. Prints "fake-qemu: ready", then "fake-qemu: stop" / "fake-qemu: cont" per command."""

import asyncio
import json
import sys

running = True


def say(msg):
    sys.stdout.write(f"fake-qemu: {msg}\n")
    sys.stdout.flush()


async def serve(reader, writer):
    global running
    greeting = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0},
                                    "package": "fake"}, "capabilities": []}}
    writer.write((json.dumps(greeting) + "\r\n").encode())
    await writer.drain()
    buf = ""
    decoder = json.JSONDecoder()
    while True:
        # Commands are a JSON stream (qemu.qmp sends no newline after them).
        buf = buf.lstrip()
        try:
            msg, end = decoder.raw_decode(buf)
        except ValueError:
            chunk = await reader.read(4096)
            if not chunk:
                return
            buf += chunk.decode()
            continue
        buf = buf[end:]
        cmd = msg.get("execute")
        reply = {"return": {}}
        if cmd == "query-status":
            reply = {"return": {"status": "running" if running else "paused",
                                "running": running, "singlestep": False}}
        elif cmd in ("stop", "cont"):
            running = cmd == "cont"
            say(cmd)
        elif cmd != "qmp_capabilities":
            reply = {"error": {"class": "CommandNotFound", "desc": f"{cmd} not faked"}}
        if "id" in msg:
            reply["id"] = msg["id"]
        writer.write((json.dumps(reply) + "\r\n").encode())
        await writer.drain()


async def main(path):
    server = await asyncio.start_unix_server(serve, path)
    say("ready")
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
