# bench-lib.sh -- sourced by the benchmark scripts (bench-replication.sh, bench-netns.sh,
# bench-flush-sources.sh, bench-cpu.sh): the helpers they share.
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

# start_colo LOG ARGS...: starts "$COLO" ARGS in the background (stdout to LOG.out, stderr to
# LOG), waits for its ready line and prints its pid. The pid is also appended to
# $COLO_PIDS_FILE (if set), for cleanup_colo: callers run this in a command substitution, a
# subshell, so an array of pids would not reach them.
start_colo() {
    local logf=$1
    shift
    start_colo_in "$logf" -- "$@"
}

# start_colo_in LOG WRAPPER... -- ARGS...: start_colo under WRAPPER (`ip netns exec NS`,
# `strace ...`); the pid printed and recorded is the wrapper's.
start_colo_in() {
    local logf=$1
    shift
    local wrap=()
    while [ "$1" != -- ]; do wrap+=("$1"); shift; done
    shift
    "${wrap[@]}" "$COLO" "$@" >"$logf.out" 2>"$logf" &
    local pid=$!
    [ -z "${COLO_PIDS_FILE:-}" ] || echo "$pid" >>"$COLO_PIDS_FILE"
    for _ in $(seq 1 600); do
        grep -q '"ready"' "$logf.out" 2>/dev/null && { echo "$pid"; return 0; }
        kill -0 "$pid" 2>/dev/null || { cat "$logf" >&2; return 1; }
        sleep 0.05
    done
    echo "timeout waiting for the ready line of $logf" >&2
    return 1
}

# cleanup_colo: stops every process start_colo recorded in $COLO_PIDS_FILE (an EXIT trap).
cleanup_colo() {
    [ -n "${COLO_PIDS_FILE:-}" ] && [ -f "$COLO_PIDS_FILE" ] || return 0
    local p
    while read -r p; do stop "$p"; done <"$COLO_PIDS_FILE"
    : >"$COLO_PIDS_FILE"
}

# ready_port LOG.out: the TCP port in a secondary's ready line ({"ready": {"listen": ...}}).
ready_port() {
    python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["ready"]["listen"].rsplit(":",1)[1])' "$1"
}

# wait_session LOG: waits until the primary logged its session to the secondary.
wait_session() {
    for _ in $(seq 1 600); do
        grep -aq "replicating to" "$1" && return 0
        sleep 0.05
    done
    echo "timeout waiting for the primary's session in $1" >&2
    return 1
}

# cpu_of PID: the user + system CPU seconds a process has used so far.
cpu_of() {
    python3 - "$1" <<'PY'
import os, sys
f = open(f"/proc/{sys.argv[1]}/stat").read().rsplit(")", 1)[1].split()
print((int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK"))
PY
}
