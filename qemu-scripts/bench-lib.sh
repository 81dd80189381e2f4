# bench-lib.sh -- sourced by the benchmark scripts (bench-replication.sh, bench-netns.sh): the
# helpers they share.
# shellcheck shell=bash

# stop PID: stops a colo-blk started in the background and waits until it is gone. The
# scripts start it inside a command substitution, so it is not the shell's child and `wait`
# would return at once: a process still shutting down could then remove the socket or the
# images of the next run.
stop() {
    kill "$1" 2>/dev/null || true
    while kill -0 "$1" 2>/dev/null; do sleep 0.05; done
}

# qmp SOCKET COMMAND [JSON-ARGS]: runs one QMP command (qemu.qmp), prints its result as JSON.
qmp() {
    python3 - "$@" <<'PY'
import asyncio, json, sys
from qemu.qmp import QMPClient
async def main(path, cmd, args):
    q = QMPClient("bench")
    await q.connect(path)
    r = await q.execute(cmd, json.loads(args) if args else None)
    print(json.dumps(r))
    await q.disconnect()
asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else ""))
PY
}

# blkbench_path: builds benches/blkbench.rs if needed and prints its executable (found in
# cargo's JSON messages; run from the repository).
blkbench_path() {
    cargo bench --bench blkbench --no-run --message-format=json-render-diagnostics 2>/dev/null |
        python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m["target"]["name"]=="blkbench" and m.get("executable"):
        print(m["executable"])' | tail -n1
}
