//! Continuous fault tolerance under QEMU's x-colo (docs/colo-with-qemu.md, "Continuous fault
//! tolerance"): one guest runs while the pair fails over three times and is re-protected twice
//! in between, the roles swapping each time, with no restart the guest could see.
//!
//! Two "hosts" A and B are two sets of processes on this machine, each in its own directory
//! (its image, layer directories, sockets) with its own ports: a backend, a QEMU 11, and on the
//! secondary's host `colo-blk supervise` with a fence command. The rounds:
//!
//! ```text
//!  A primary, B secondary (COLO)  ── kill A ──► B's supervisor: fence, takeover (B alone)
//!  re-protect: A's old disk as secondary (--discard-my-data), B promoted in place, new QEMU on
//!  A with -incoming, x-colo from B  ── B hangs (SIGSTOP) ──► A's supervisor: no checkpoint,
//!  no link: the fence (kills B's processes), takeover
//!  re-protect: B's old disk as secondary, A promoted ── kill A ──► B's supervisor: the fence
//!  fails (B waits, asserted), then succeeds: takeover
//! ```
//!
//! The guest program ([`records_writer`]) keeps its record count in its shell's memory and checks the
//! disk against it (no record missing, none from a lost epoch); any FAIL or IOERR on any
//! console fails the test. Each re-protect's resync must resend much less than the disk
//! (asserted below the sum of both dirty records plus a margin). Printed, not asserted: the time
//! from the kill to the survivor's next completed write, and from the re-protect's start to its
//! first COLO checkpoint.
//!
//! Needs the COLO QEMU (`COLO_QEMU`, default /opt/colo-qemu/bin/qemu-system-x86_64); skipped
//! loudly without it unless `CI` is set.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::pair::{poll_state, Node};
use common::qemu::{initrd_with_script, Proc};
use common::xcolo::{
    self, incoming, migrate_into_colo, prerequisites, qemu_command, records_in, verified, writer,
};
use common::{poll, tempdir, Backend, Qmp};
use serde_json::{json, Value};

const DISK: u64 = 64 << 20;
/// x-checkpoint-delay (ms).
const DELAY_MS: u64 = 300;
/// A hang guard only (TCG on a loaded machine is slow).
const TIMEOUT: Duration = Duration::from_secs(180);
/// What a re-protect may resend beyond both dirty records (the survivor's at its promotion,
/// the old primary's own): what the guest wrote between the promotion and the handshake.
const MARGIN: u64 = 1 << 20;

/// The guest program: [`writer`] up to 15000 records.
fn records_writer() -> String {
    writer(15000)
}

fn qmp(path: &Path) -> Qmp {
    xcolo::qmp(path, TIMEOUT)
}

/// One "host": its directory, its backend and QEMU (one generation of each at a time), and
/// its supervisor while it is the secondary's host.
struct Host {
    name: &'static str,
    dir: PathBuf,
    /// Processes started on this host so far (file names per generation).
    gen: u32,
    backend: Option<Backend>,
    qemu: Option<Proc>,
    supervisor: Option<Proc>,
    /// The replication port this host's secondary listens on.
    port: u16,
}

impl Host {
    fn new(root: &Path, name: &'static str) -> Host {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        Host {
            name,
            dir,
            gen: 0,
            backend: None,
            qemu: None,
            supervisor: None,
            port: 0,
        }
    }

    fn f(&self, what: &str, ext: &str) -> String {
        format!("{what}{}.{ext}", self.gen)
    }

    /// A secondary backend on this host's image (a new generation); `discard`: the old
    /// primary's disk coming back (`--discard-my-data`).
    fn start_secondary(&mut self, discard: bool) {
        self.gen += 1;
        let mut node = Node::secondary(&self.dir, "disk.img", DISK, 0)
            .dirty_log_extent("64K")
            .layers(&format!("layers{}", self.gen))
            .qmp(&self.f("backend", "qmp"))
            .socket(&self.f("vm", "sock"));
        if discard {
            node = node.args(&["--discard-my-data"]);
        }
        let b = node.start();
        self.port = b.listen_port();
        self.backend = Some(b);
    }

    fn start_primary(&mut self, peer: u16) {
        self.gen += 1;
        let b = Node::primary(&self.dir, "disk.img", DISK, peer)
            .dirty_log_extent("64K")
            .qmp(&self.f("backend", "qmp"))
            .socket(&self.f("vm", "sock"))
            .start();
        self.backend = Some(b);
    }

    /// This host's QEMU of the current generation (`-incoming defer` when `incoming`).
    fn start_qemu(&mut self, guest: &Path, initrd: &Path, incoming: bool) {
        let sock = self.dir.join(self.f("vm", "sock"));
        let qmp = ["vm", "sup"].map(|q| self.dir.join(self.f(q, "qmp")));
        let cmd = qemu_command(self.name, guest, initrd, &sock, &qmp, incoming);
        self.qemu = Some(Proc::spawn(cmd, &format!("{}{}", self.name, self.gen)));
    }

    fn vm_qmp(&self) -> PathBuf {
        self.dir.join(self.f("vm", "qmp"))
    }

    fn backend_qmp(&self) -> PathBuf {
        self.dir.join(self.f("backend", "qmp"))
    }

    fn qemu(&mut self) -> &mut Proc {
        self.qemu.as_mut().expect("a QEMU on this host")
    }

    /// Makes this host's new QEMU wait for the x-colo migration on `mport`.
    fn incoming(&self, mport: u16) {
        incoming(&mut qmp(&self.vm_qmp()), mport);
    }

    /// The host dies: SIGKILL of its QEMU and its backend.
    fn kill(&mut self) -> f64 {
        let t = common::wall_clock();
        if let Some(q) = self.qemu.as_mut() {
            q.kill();
        }
        if let Some(mut b) = self.backend.take() {
            let _ = b.child.kill();
            let _ = b.child.wait();
        }
        t
    }

    /// The host hangs: SIGSTOP of its QEMU and its backend (their connections stay open and
    /// silent, as with a host that lost power: no reset). Their pids go to `pids` for the fence.
    fn freeze(&mut self, pids: &Path) -> f64 {
        let t = common::wall_clock();
        let q = self.qemu.as_ref().expect("a QEMU").child.id();
        let b = self.backend.as_ref().expect("a backend").child.id();
        for pid in [q, b] {
            // SAFETY: kill(2) on children of this test.
            unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
        }
        std::fs::write(pids, format!("{q} {b}\n")).unwrap();
        t
    }

    /// After a fence that was to kill this frozen host: its processes are gone.
    fn fenced(&mut self) {
        let q = self.qemu.as_mut().unwrap();
        let mut b = self.backend.take().unwrap();
        for child in [&mut q.child, &mut b.child] {
            let st = poll::value("the fence to kill the frozen host", TIMEOUT, || {
                child.try_wait().unwrap()
            });
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(st.signal(), Some(libc::SIGKILL), "{st}");
        }
        q.exited = q.child.try_wait().ok().flatten();
    }

    /// `colo-blk supervise` on this host (its QEMU is the Secondary VM), fencing with
    /// `fence` (a script in the test directory).
    fn supervise(&mut self, fence: &Path) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_colo-blk"));
        cmd.arg("supervise")
            .arg("--qemu-qmp")
            .arg(self.dir.join(self.f("sup", "qmp")))
            .arg("--backend-qmp")
            .arg(self.backend_qmp())
            .arg("--fence-cmd")
            .arg(format!("sh {}", fence.display()))
            .args(["--loss-timeout-ms", "1000", "--fence-retry-ms", "500"])
            .args(["--checkpoint-timeout-ms", "2000"])
            .args(["--poll-ms", "50"]);
        let mut p = Proc::spawn(cmd, &format!("supervise-{}", self.name));
        p.wait_marker("\"event\":\"watching\"", TIMEOUT);
        self.supervisor = Some(p);
    }

    fn supervisor(&mut self) -> &mut Proc {
        self.supervisor.as_mut().expect("a supervisor on this host")
    }
}

/// The supervisor's JSON line of `event`.
fn wait_event(sup: &mut Proc, event: &str) -> Value {
    let marker = format!("\"event\":\"{event}\"");
    let l = sup.wait_line(event, TIMEOUT, |l| {
        l.contains(&marker) || l.contains("\"event\":\"error\"")
    });
    assert!(l.contains(&marker), "supervisor: {l}");
    let json = &l[l.find('{').expect("a JSON line")..];
    serde_json::from_str(json).unwrap_or_else(|e| panic!("{l}: {e}"))
}

/// The whole test's state.
struct Run {
    _root: tempfile::TempDir,
    guest: PathBuf,
    initrd: PathBuf,
    fence: PathBuf,
    fence_log: PathBuf,
    fence_fails: PathBuf,
    /// The pids a fence kills (a frozen host's), while it exists.
    fence_pids: PathBuf,
    /// The highest record count any VM verified so far.
    verified: u64,
}

impl Run {
    fn new() -> (Run, Host, Host) {
        let root = tempdir();
        let guest = common::guest_dir();
        let initrd = initrd_with_script(&guest, root.path(), &records_writer());
        // The fence: records every call; fails while `fence-fails` exists.
        let fence = root.path().join("fence.sh");
        let fence_log = root.path().join("fence.log");
        let fence_fails = root.path().join("fence-fails");
        let fence_pids = root.path().join("fence-pids");
        std::fs::write(
            &fence,
            format!(
                "echo \"fence $COLO_FENCE_PEER\" >>{log}\n[ ! -e {fails} ] || exit 1\n\
                 [ ! -e {pids} ] || kill -9 $(cat {pids})\n",
                log = fence_log.display(),
                fails = fence_fails.display(),
                pids = fence_pids.display()
            ),
        )
        .unwrap();
        let a = Host::new(root.path(), "a");
        let b = Host::new(root.path(), "b");
        let run = Run {
            _root: root,
            guest,
            initrd,
            fence,
            fence_log,
            fence_fails,
            fence_pids,
            verified: 0,
        };
        (run, a, b)
    }

    fn fence_calls(&self) -> usize {
        std::fs::read_to_string(&self.fence_log)
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    /// Waits for `n` verified lines on `host`'s console; records the highest count.
    fn verified_on(&mut self, host: &mut Host, n: usize) {
        for _ in 0..n {
            let l = host
                .qemu()
                .wait_line("verified", TIMEOUT, |l| l.contains("COLO-A: verified"));
            assert!(!l.contains("FAIL"), "[{}] {l}", host.name);
            self.verified = self.verified.max(verified(&l).unwrap());
        }
    }
}

/// Both VMs' consoles: no FAIL, no IOERR.
fn assert_no_failures(hosts: &mut [&mut Host]) {
    let mut all = Vec::new();
    for h in hosts.iter_mut() {
        if let Some(q) = h.qemu.as_mut() {
            all.extend(
                q.failures()
                    .into_iter()
                    .map(|l| format!("[{}] {l}", h.name)),
            );
        }
    }
    assert!(all.is_empty(), "guest checks failed:\n{}", all.join("\n"));
}

/// The first pair: `p` primary, `s` secondary, both QEMUs, x-colo; `s` supervised.
fn start_pair(run: &Run, p: &mut Host, s: &mut Host) {
    s.start_secondary(false);
    p.start_primary(s.port);
    poll_state(
        &mut qmp(&s.backend_qmp()),
        "the first session",
        TIMEOUT,
        |r| r["state"] == "connected",
    );
    p.start_qemu(&run.guest, &run.initrd, false);
    p.qemu().wait_marker("COLO-A: start", TIMEOUT);
    s.start_qemu(&run.guest, &run.initrd, true);
    let mport = common::free_port();
    s.incoming(mport);
    migrate_into_colo(&mut qmp(&p.vm_qmp()), mport, DELAY_MS, TIMEOUT);
    s.supervise(&run.fence);
}

/// Lets the pair run: the secondary takes three checkpoints (QEMU restarted the Secondary VM
/// from the primary's state each time), the primary's guest verifies records.
fn run_protected(run: &mut Run, p: &mut Host, s: &mut Host) {
    let mut q = qmp(&s.backend_qmp());
    let n = |r: &Value| r["checkpoints"].as_u64().unwrap_or(0);
    let start = n(&q.execute("query-replication", json!({})).unwrap());
    poll_state(&mut q, "three COLO checkpoints", TIMEOUT, |r| {
        n(r) >= start + 3
    });
    p.qemu().drain();
    run.verified_on(p, 2);
}

/// Kills `dead`; `surv`'s supervisor takes over (after `failing_fences` failed fences, each
/// asserted to leave the survivor waiting). Returns the kill time and when QEMU left COLO.
/// How a host dies.
#[derive(Clone, Copy, PartialEq)]
enum Death {
    /// SIGKILL of its processes: their sockets are closed at once.
    Kill,
    /// SIGSTOP: they hang with their connections open; the fence kills them.
    Freeze,
}

fn fail_over(
    run: &mut Run,
    dead: &mut Host,
    surv: &mut Host,
    death: Death,
    failing_fences: usize,
) -> (f64, f64) {
    if failing_fences > 0 {
        std::fs::write(&run.fence_fails, "").unwrap();
    }
    let calls = run.fence_calls();
    let t_kill = match death {
        Death::Kill => dead.kill(),
        Death::Freeze => dead.freeze(&run.fence_pids),
    };
    for k in 0..failing_fences {
        let e = wait_event(surv.supervisor(), "fence-failed");
        eprintln!("fence failed ({k}): {e}");
        // The survivor waits: QEMU still a COLO secondary, the backend not failed over.
        let colo = qmp(&surv.vm_qmp())
            .execute("query-colo-status", json!({}))
            .unwrap();
        assert_eq!(
            colo["mode"], "secondary",
            "taken over despite a failed fence: {colo}"
        );
        let st = qmp(&surv.backend_qmp())
            .execute("query-replication", json!({}))
            .unwrap();
        assert_ne!(
            st["state"], "failed-over",
            "failed over despite a failed fence: {st}"
        );
    }
    if failing_fences > 0 {
        std::fs::remove_file(&run.fence_fails).unwrap();
    }
    let fenced = wait_event(surv.supervisor(), "fenced");
    if death == Death::Freeze {
        dead.fenced();
        std::fs::remove_file(&run.fence_pids).unwrap();
    }
    let done = wait_event(surv.supervisor(), "taken-over");
    assert!(
        run.fence_calls() > calls + failing_fences,
        "the fence command was not called before the takeover"
    );
    eprintln!("{} took over: {fenced} {done}", surv.name);
    dead.qemu().drain();
    for (_, l) in &dead.qemu.as_ref().unwrap().lines {
        if let Some(v) = verified(l) {
            run.verified = run.verified.max(v);
        }
    }
    surv.supervisor().wait_exit(TIMEOUT);
    surv.supervisor = None;
    let t_done = done["time"].as_f64().unwrap();
    let t_out =
        t_done - (done["ms"].as_f64().unwrap() - done["left-colo-ms"].as_f64().unwrap()) / 1000.0;
    (t_kill, t_out)
}

/// After a takeover: the same guest goes on on `surv` past everything verified so far. Returns
/// the time of its first completed write after QEMU left COLO.
fn survivor_continues(run: &mut Run, surv: &mut Host, t_out: f64) -> f64 {
    let want = run.verified + 10;
    let mut first: Option<f64> = None;
    let mut last = 0;
    let mut after = 0;
    while last < want || after < 2 || first.is_none() {
        let l = surv
            .qemu()
            .wait_line("records after the failover", TIMEOUT, |l| {
                l.contains("COLO-A: ") && !l.contains(": start")
            });
        assert!(
            !l.contains("FAIL") && !l.contains("IOERR"),
            "[{}] {l}",
            surv.name
        );
        let at = surv.qemu().lines.last().unwrap().0;
        // Lines of the Secondary VM before it left COLO: a run QEMU may have discarded.
        if at < t_out {
            continue;
        }
        if l.contains("COLO-A: wrote") {
            first.get_or_insert(at);
        } else if let Some(v) = verified(&l) {
            last = v;
            after += 1;
        }
    }
    run.verified = run.verified.max(last);
    first.unwrap()
}

/// Re-protects `surv` (failed over) with `dead`'s old disk as its new secondary: returns the
/// reprotect report and its duration.
fn reprotect(run: &Run, surv: &mut Host, dead: &mut Host) -> (Value, f64) {
    dead.start_secondary(true);
    dead.start_qemu(&run.guest, &run.initrd, true);
    let mport = common::free_port();
    dead.incoming(mport);
    let t = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_colo-blk"))
        .arg("reprotect")
        .arg("--x-colo")
        .arg("--survivor")
        .arg(surv.backend_qmp())
        .arg("--peer")
        .arg(format!("127.0.0.1:{}", dead.port))
        .arg("--target")
        .arg(dead.backend_qmp())
        .arg("--qemu-qmp")
        .arg(surv.vm_qmp())
        .arg("--migrate-uri")
        .arg(format!("tcp:127.0.0.1:{mport}"))
        .arg("--checkpoint-delay")
        .arg(DELAY_MS.to_string())
        .stderr(Stdio::inherit())
        .output()
        .expect("colo-blk reprotect");
    let secs = t.elapsed().as_secs_f64();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "reprotect printed {:?}: {e}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    assert!(
        out.status.success() && report["reprotected"] == true,
        "reprotect: {report}"
    );
    assert_eq!(report["promoted"], true, "{report}");
    assert_eq!(report["full-sync"], false, "{report}");
    let resent = report["resync-total-bytes"].as_u64().unwrap();
    // The survivor's dirty record at its promotion plus the old primary's own record.
    let dirty = report["dirty-total-bytes"].as_u64().unwrap();
    assert!(
        report["target-own-dirty-bytes"].as_u64().is_some(),
        "{report}"
    );
    assert!(
        resent <= dirty + MARGIN && resent < DISK / 8,
        "the re-protect resent {resent} bytes (both dirty records {dirty}, disk {DISK})"
    );
    // The new secondary is consistent (checked by reprotect) and took the checkpoint.
    let mut d = qmp(&dead.backend_qmp());
    poll_state(&mut d, "the new secondary's checkpoints", TIMEOUT, |r| {
        r["checkpoints"].as_u64().unwrap_or(0) >= 1 && r["consistency"] == "consistent"
    });
    (report, secs)
}

#[test]
fn three_failovers_with_two_reprotects_one_guest() {
    if !prerequisites("three_failovers_with_two_reprotects_one_guest") {
        return;
    }
    let (mut run, mut a, mut b) = Run::new();
    let mut timings = Vec::new();
    start_pair(&run, &mut a, &mut b);
    run_protected(&mut run, &mut a, &mut b);
    // Round 1: A dies, B takes over.
    let (t_kill, t_out) = fail_over(&mut run, &mut a, &mut b, Death::Kill, 0);
    let first = survivor_continues(&mut run, &mut b, t_out);
    timings.push(format!(
        "failover 1 (A killed): next guest write {:.0} ms after the kill",
        (first - t_kill) * 1000.0
    ));
    assert_no_failures(&mut [&mut a, &mut b]);
    // Re-protect 1: A's old disk becomes B's secondary.
    let (r, secs) = reprotect(&run, &mut b, &mut a);
    timings.push(format!("re-protect 1 (B primary, A secondary): first checkpoint {secs:.1} s after the start; resent {} bytes (dirty records: B's {}, A's own {})", r["resync-total-bytes"], r["survivor-dirty-bytes"], r["target-own-dirty-bytes"]));
    a.supervise(&run.fence);
    run_protected(&mut run, &mut b, &mut a);
    // Round 2: B hangs (no reset on its connections: A's QEMU sees no COLO_EXIT, only no
    // more checkpoints); A's fence kills it; A takes over.
    let (t_kill, t_out) = fail_over(&mut run, &mut b, &mut a, Death::Freeze, 0);
    let first = survivor_continues(&mut run, &mut a, t_out);
    timings.push(format!(
        "failover 2 (B frozen, killed by the fence): next guest write {:.0} ms after the kill",
        (first - t_kill) * 1000.0
    ));
    assert_no_failures(&mut [&mut a, &mut b]);
    // Re-protect 2: B's old disk becomes A's secondary.
    let (r, secs) = reprotect(&run, &mut a, &mut b);
    timings.push(format!("re-protect 2 (A primary, B secondary): first checkpoint {secs:.1} s after the start; resent {} bytes (dirty records: A's {}, B's own {})", r["resync-total-bytes"], r["survivor-dirty-bytes"], r["target-own-dirty-bytes"]));
    b.supervise(&run.fence);
    run_protected(&mut run, &mut a, &mut b);
    // Round 3: A dies; B's fence fails twice (B must wait), then succeeds.
    let (t_kill, t_out) = fail_over(&mut run, &mut a, &mut b, Death::Kill, 2);
    let first = survivor_continues(&mut run, &mut b, t_out);
    timings.push(format!(
        "failover 3 (A killed, two failed fences first): next guest write {:.0} ms after the kill, {:.0} ms after QEMU left COLO",
        (first - t_kill) * 1000.0,
        (first - t_out) * 1000.0
    ));
    assert_no_failures(&mut [&mut a, &mut b]);
    // The survivor's disk holds exactly the records its guest verified, and no other.
    b.qemu().kill();
    b.backend.take().unwrap().terminate();
    let n = records_in(&b.dir.join("disk.img"));
    assert!(
        n >= run.verified,
        "B's image has {n} records, the guest verified {}",
        run.verified
    );
    for t in &timings {
        eprintln!("TIMING {t}");
    }
}
