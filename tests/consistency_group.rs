//! Consistency groups (docs/consistency-groups.md): several disks, of one VM or of several,
//! checkpointed together by `qemu-scripts/colo-ctl.py` (stop every VM → prepare every disk →
//! hook → commit every disk → cont) and failed over together, so that after a failover every
//! disk is from the same group checkpoint.
//!
//! - with QEMU 7.2 and the test guest: one VM with two disks on two colo-blk pairs, and two
//!   VMs with one disk each; the primaries are SIGKILLed mid-run and colo-ctl fails the group
//!   over by itself;
//! - without a guest (blkio clients write, `tests/fake_qemu_qmp.py` stands in for QEMU's
//!   stop/cont): colo-ctl dying between the two commits of a group checkpoint, and the
//!   secondary's prepare record across a restart of the secondary process.
//!
//! Synchronisation is by output lines (guest serial markers, colo-ctl JSON lines, backend log
//! lines), QMP answers and process exits; timeouts are failure guards. Skipped loudly without
//! `qemu-system-x86_64` or python `qemu.qmp`, unless `CI` is set (then the tests fail).

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::pair::{wait_connected, Node};
use common::qemu::{
    ctl_event, prerequisites, records_in, wait_ctl, wait_mid_epoch, writer_script, Proc, RECORD,
};
use common::{tempdir, Backend, Client, Qmp};
use serde_json::{json, Value};

const DISK: u64 = 16 << 20;
/// The guest writers stop after this many records (8 MiB), far more than a test needs.
const MAX_RECORDS: u64 = 2048;
const GUEST_TIMEOUT: Duration = Duration::from_secs(120);
const CTL_TIMEOUT: Duration = Duration::from_secs(30);

// ---- pairs -----------------------------------------------------------------------------------

struct Setup {
    dir: tempfile::TempDir,
}

/// One colo-blk pair, named `n`: files `n-primary.img`, `n-secondary.img`, `n-layers/`,
/// sockets `n-pvm.sock`, `n-primary.qmp`, `n-secondary.qmp`.
struct Pair {
    name: String,
    primary: Option<Backend>,
    secondary: Backend,
}

impl Setup {
    fn new() -> Setup {
        Setup { dir: tempdir() }
    }

    fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn s(&self, name: &str) -> String {
        self.p(name).display().to_string()
    }

    fn start_secondary(&self, n: &str, port: u16) -> Backend {
        Node::secondary(self.dir.path(), &format!("{n}-secondary.img"), DISK, port)
            .layers(&format!("{n}-layers"))
            .qmp(&format!("{n}-secondary.qmp"))
            .start()
    }

    /// Starts pair `n` and waits until its primary is connected.
    fn pair(&self, n: &str) -> Pair {
        let secondary = self.start_secondary(n, 0);
        let primary = Node::primary(
            self.dir.path(),
            &format!("{n}-primary.img"),
            DISK,
            secondary.listen_port(),
        )
        .socket(&format!("{n}-pvm.sock"))
        .qmp(&format!("{n}-primary.qmp"))
        .start();
        wait_connected(&mut secondary.qmp());
        Pair {
            name: n.to_string(),
            primary: Some(primary),
            secondary,
        }
    }

    /// `--disk PRIMARY_QMP:SECONDARY_QMP` of pair `n`.
    fn disk_arg(&self, n: &str) -> String {
        format!(
            "{}:{}",
            self.s(&format!("{n}-primary.qmp")),
            self.s(&format!("{n}-secondary.qmp"))
        )
    }

    /// Boots the test guest with one disk per pair in `disks` (vda, vdb, ...) running `script`.
    fn vm(&self, name: &str, disks: &[&str], script: &str, qmp: &str) -> Proc {
        let sockets: Vec<PathBuf> = disks
            .iter()
            .map(|d| self.p(&format!("{d}-pvm.sock")))
            .collect();
        common::qemu::run_vm_on(
            None,
            self.dir.path(),
            name,
            &common::guest_dir(),
            &sockets,
            "160M",
            script,
            Some(&self.p(qmp)),
        )
    }

    /// A stand-in for a VM's QEMU (stop/cont over QMP only).
    fn fake_qemu(&self, qmp: &str) -> Proc {
        let mut cmd = Command::new("python3");
        cmd.arg(common::repo().join("tests/fake_qemu_qmp.py"))
            .arg(self.p(qmp));
        let mut p = Proc::spawn(cmd, "fake-qemu");
        p.wait_marker("fake-qemu: ready", CTL_TIMEOUT);
        p
    }

    fn colo_ctl(&self, args: &[String], env: &[(&str, &str)]) -> Proc {
        common::qemu::colo_ctl(self.dir.path(), args, env)
    }

    /// The hook: copies every pair's primary image to `snap/G-PAIR.img` while all VMs are
    /// stopped and every disk is prepared (the images are exactly group checkpoint G).
    fn snapshot_hook(&self, pairs: &[&str]) -> String {
        let snap = self.p("snap");
        std::fs::create_dir_all(&snap).unwrap();
        let mut hook = String::new();
        for n in pairs {
            hook.push_str(&format!(
                "cp {img} {snap}/$COLO_EPOCH-{n}.img && rm -f {snap}/$((COLO_EPOCH - 3))-{n}.img && ",
                img = self.s(&format!("{n}-primary.img")),
                snap = snap.display()
            ));
        }
        hook.push_str("true");
        hook
    }

    fn snapshot(&self, group: u64, n: &str) -> PathBuf {
        self.p(&format!("snap/{group}-{n}.img"))
    }

    fn secondary_image(&self, n: &str) -> PathBuf {
        self.p(&format!("{n}-secondary.img"))
    }
}

/// Asserts that pair `n`'s secondary image is byte-equal to its primary at group checkpoint `g`.
fn assert_at_group(t: &Setup, n: &str, g: u64) {
    let want = std::fs::read(t.snapshot(g, n))
        .unwrap_or_else(|e| panic!("snapshot of {n} at group checkpoint {g}: {e}"));
    let got = std::fs::read(t.secondary_image(n)).unwrap();
    if let Some(pos) = got.iter().zip(&want).position(|(a, b)| a != b) {
        panic!("{n}: the secondary differs from its primary at group checkpoint {g} at byte {pos}");
    }
    assert_eq!(got.len(), want.len());
}

/// Guest script: record i to block i of every disk in `disks` per iteration, progress every
/// 20 records; stops at MAX_RECORDS.
fn writer(disks: &[&str]) -> String {
    writer_script(disks, MAX_RECORDS, 20)
}

/// Runs the group in pause mode with `members` (each: QEMU QMP name, its pairs) until `k`
/// checkpoints carried writes, then SIGKILLs the VMs and every primary backend at once;
/// colo-ctl fails the group over. Returns the failover line and the pauses (ms).
fn run_and_lose_primaries(
    t: &Setup,
    pairs: &mut [Pair],
    vms: &mut [Proc],
    members: &[(&str, &[&str])],
    k: usize,
) -> (Value, Vec<f64>, Proc) {
    let names: Vec<&str> = pairs.iter().map(|p| p.name.as_str()).collect();
    let hook = t.snapshot_hook(&names);
    let mut args: Vec<String> = Vec::new();
    for (qmp, disks) in members {
        args.push("--vm".into());
        args.push(t.s(qmp));
        for d in *disks {
            args.push("--disk".into());
            args.push(t.disk_arg(d));
        }
    }
    args.extend(
        [
            "--interval-ms",
            "300",
            "--failover-on-primary-loss",
            "--pause-hook",
            &hook,
        ]
        .map(String::from),
    );
    let mut ctl = t.colo_ctl(&args, &[]);
    let ready = wait_ctl(&mut ctl, "ready", CTL_TIMEOUT);
    eprintln!("ready: {ready}");
    for vm in vms.iter_mut() {
        vm.wait_marker("COLO-WRITER: progress", GUEST_TIMEOUT);
    }
    let mut pauses = Vec::new();
    while pauses.len() < k {
        let c = wait_ctl(&mut ctl, "checkpoint", CTL_TIMEOUT);
        // Every disk's writes are in it (each VM writes to all of its disks).
        let disks = c["disks"].as_object().expect("disks");
        assert_eq!(disks.len(), pairs.len(), "{c}");
        if disks.values().all(|d| d["bytes"].as_u64().unwrap() > 0) {
            pauses.push(c["pause_ms"].as_f64().unwrap());
        }
    }
    assert!(
        !ctl.lines
            .iter()
            .any(|(_, l)| ctl_event(l, "checkpoint-error").is_some()),
        "a group checkpoint failed"
    );
    wait_mid_epoch(
        &t.p(&format!("{}-primary.qmp", pairs[0].name)),
        3 * RECORD as u64,
        CTL_TIMEOUT,
    );
    for vm in vms.iter_mut() {
        vm.kill();
    }
    for p in pairs.iter_mut() {
        p.primary.take(); // SIGKILL: the primary host is lost
    }
    let f = wait_ctl(&mut ctl, "failover", CTL_TIMEOUT);
    assert!(ctl.wait_exit(CTL_TIMEOUT).success());
    for vm in vms.iter_mut() {
        vm.drain();
        assert!(!vm.has_line("IOERR"), "{} saw I/O errors", vm.name);
        assert!(!vm.has_line("COLO-WRITER: done"), "writer finished early");
    }
    (f, pauses, ctl)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

// ---- tests with a guest ----------------------------------------------------------------------

/// (a) One VM, two disks on two pairs: each loop iteration writes record n to /dev/vda, then to
/// /dev/vdb. Group checkpoints run every 300 ms; the hook snapshots both primary images. The
/// primaries are SIGKILLed mid-epoch; colo-ctl fails both disks over to the same group
/// checkpoint G: each secondary is byte-equal to its primary at G, and the last record on vdb
/// is the last record on vda (or the one before it: the pause fell between an iteration's two
/// writes). Checkpointing the disks one after the other would let them differ by a whole
/// interval of records.
#[test]
fn one_vm_two_disks_fail_over_to_one_checkpoint() {
    if !prerequisites("one_vm_two_disks_fail_over_to_one_checkpoint", true) {
        return;
    }
    let t = Setup::new();
    let mut pairs = [t.pair("a"), t.pair("b")];
    let vm = t.vm("pvm", &["a", "b"], &writer(&["vda", "vdb"]), "pvm.qmp");
    let mut vms = [vm];
    let (f, pauses, _ctl) =
        run_and_lose_primaries(&t, &mut pairs, &mut vms, &[("pvm.qmp", &["a", "b"])], 5);
    let g = f["group"].as_u64().expect("group");
    assert_eq!(f["disks"].as_object().unwrap().len(), 2, "{f}");
    assert_at_group(&t, "a", g);
    assert_at_group(&t, "b", g);
    let (na, nb) = (
        records_in(&t.secondary_image("a")),
        records_in(&t.secondary_image("b")),
    );
    assert!(
        nb == na || nb + 1 == na,
        "after failover vda holds {na} records and vdb {nb}: not one checkpoint"
    );
    assert!(nb > 0);
    eprintln!(
        "TIMING group of 1 VM x 2 disks: failover to group checkpoint {g} ({na}/{nb} records); \
         pause median {:.1} ms (incl. the 2 x 16 MiB snapshot hook), failover {} ms",
        median(pauses),
        f["duration_ms"]
    );
}

/// (b) Two VMs with one disk each form one service: every group checkpoint stops both. After
/// the primaries die, both secondaries are byte-equal to their primaries at the same group
/// checkpoint (the hook copied both images in the same pause).
#[test]
fn two_vms_fail_over_to_one_checkpoint() {
    if !prerequisites("two_vms_fail_over_to_one_checkpoint", true) {
        return;
    }
    let t = Setup::new();
    let mut pairs = [t.pair("a"), t.pair("b")];
    let vm1 = t.vm("vm1", &["a"], &writer(&["vda"]), "vm1.qmp");
    let vm2 = t.vm("vm2", &["b"], &writer(&["vda"]), "vm2.qmp");
    let mut vms = [vm1, vm2];
    let (f, pauses, _ctl) = run_and_lose_primaries(
        &t,
        &mut pairs,
        &mut vms,
        &[("vm1.qmp", &["a"]), ("vm2.qmp", &["b"])],
        4,
    );
    let g = f["group"].as_u64().expect("group");
    assert_at_group(&t, "a", g);
    assert_at_group(&t, "b", g);
    let (na, nb) = (
        records_in(&t.secondary_image("a")),
        records_in(&t.secondary_image("b")),
    );
    assert!(na > 0 && nb > 0);
    eprintln!(
        "TIMING group of 2 VMs: failover to group checkpoint {g} ({na}/{nb} records); pause \
         median {:.1} ms, failover {} ms",
        median(pauses),
        f["duration_ms"]
    );
}

// ---- tests without a guest -------------------------------------------------------------------

/// Writes `n` 4 KiB blocks of pattern `seed` at block `at` through pair `p`'s primary.
fn write_blocks(t: &Setup, p: &str, seed: u64, at: u64, n: u64) {
    let mut c = Client::connect(&t.p(&format!("{p}-pvm.sock")), 1).expect("client");
    for i in 0..n {
        let data = common::pattern(seed * 1000 + i, RECORD);
        assert_eq!(c.write(0, (at + i) * RECORD as u64, &data), 0);
    }
    assert_eq!(c.flush(0), 0);
}

fn group_args(t: &Setup, qmp: &str, pairs: &[&str], extra: &[&str]) -> Vec<String> {
    let mut args = vec!["--vm".to_string(), t.s(qmp)];
    for p in pairs {
        args.push("--disk".into());
        args.push(t.disk_arg(p));
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn failover_args(t: &Setup, pairs: &[&str], extra: &[&str]) -> Vec<String> {
    let mut args = vec!["--mode".to_string(), "group-failover".to_string()];
    for p in pairs {
        args.push("--disk".into());
        args.push(format!(":{}", t.s(&format!("{p}-secondary.qmp"))));
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// One group checkpoint by colo-ctl (`--count 1`); returns its line.
fn one_group_checkpoint(t: &Setup, pairs: &[&str], env: &[(&str, &str)]) -> (Proc, Value) {
    let hook = t.snapshot_hook(pairs);
    let args = group_args(
        t,
        "qemu.qmp",
        pairs,
        &["--interval-ms", "50", "--count", "1", "--pause-hook", &hook],
    );
    let mut ctl = t.colo_ctl(&args, env);
    let ready = wait_ctl(&mut ctl, "ready", CTL_TIMEOUT);
    (ctl, ready)
}

/// (c) colo-ctl dies right after committing the first disk of a group checkpoint (the fault
/// knob; the VM stays stopped, as after a crash), then the primary host is lost: the second
/// disk's secondary is still prepared, and `--mode group-failover` commits it before failing
/// both over: both disks are at that group checkpoint. If instead the VM had run on and
/// written to the second disk, its prepare is gone and group-failover refuses, naming it,
/// without failing anything over.
#[test]
fn coordinator_crash_between_commits() {
    if !prerequisites("coordinator_crash_between_commits", false) {
        return;
    }
    for wrote_after_crash in [false, true] {
        let t = Setup::new();
        let mut pairs = [t.pair("a"), t.pair("b")];
        let mut qemu = t.fake_qemu("qemu.qmp");
        write_blocks(&t, "a", 1, 0, 8);
        write_blocks(&t, "b", 1, 0, 8);
        let (mut ctl, ready) = one_group_checkpoint(&t, &["a", "b"], &[]);
        let g0 = ready["group"].as_u64().unwrap();
        let c = wait_ctl(&mut ctl, "checkpoint", CTL_TIMEOUT);
        assert!(ctl.wait_exit(CTL_TIMEOUT).success());
        let g1 = c["group"].as_u64().unwrap();
        assert_eq!(g1, g0 + 1);
        // The next one dies between the commits.
        write_blocks(&t, "a", 2, 4, 8);
        write_blocks(&t, "b", 2, 4, 8);
        let (mut ctl, _) = one_group_checkpoint(
            &t,
            &["a", "b"],
            &[("COLO_CTL_FAULT", "exit-after-commit:1")],
        );
        ctl.wait_marker("fault injected", CTL_TIMEOUT);
        assert_eq!(ctl.wait_exit(CTL_TIMEOUT).code(), Some(70));
        let g2 = g1 + 1;
        let st = Qmp::connect(&t.p("qemu.qmp"))
            .execute("query-status", json!({}))
            .unwrap();
        assert_eq!(
            st["running"], false,
            "the crashed coordinator left the VM stopped"
        );
        qemu.drain();
        let mut sa = Qmp::connect(&t.p("a-secondary.qmp"));
        let mut sb = Qmp::connect(&t.p("b-secondary.qmp"));
        let qa = sa.execute("query-replication", json!({})).unwrap();
        let qb = sb.execute("query-replication", json!({})).unwrap();
        assert_eq!(qa["group"]["current"], g2, "{qa}");
        assert_eq!(qb["group"]["current"], g1, "{qb}");
        assert_eq!(qb["group"]["prepared"]["group"], g2, "{qb}");
        if wrote_after_crash {
            // Someone continued the VM: it writes to the second disk.
            write_blocks(&t, "b", 3, 20, 1);
            Qmp::connect(&t.p("b-primary.qmp"))
                .execute(
                    "replication-prepare-checkpoint",
                    json!({"timeout-ms": 10000}),
                )
                .unwrap();
            let q = sb.execute("query-replication", json!({})).unwrap();
            assert!(q["group"]["prepared"].is_null(), "{q}");
        }
        for p in pairs.iter_mut() {
            p.primary.take(); // SIGKILL
        }
        let mut fo = t.colo_ctl(&failover_args(&t, &["a", "b"], &[]), &[]);
        if wrote_after_crash {
            let e = wait_ctl(&mut fo, "failover-error", CTL_TIMEOUT);
            assert_eq!(fo.wait_exit(CTL_TIMEOUT).code(), Some(1));
            let members = e["members"].to_string();
            assert!(
                members.contains("vm0/vdb") && !members.contains("vm0/vda"),
                "{e}"
            );
            for s in [&mut sa, &mut sb] {
                let q = s.execute("query-replication", json!({})).unwrap();
                assert_ne!(q["state"], "failed-over", "{q}");
            }
            continue;
        }
        let f = wait_ctl(&mut fo, "failover", CTL_TIMEOUT);
        assert!(fo.wait_exit(CTL_TIMEOUT).success());
        assert_eq!(f["group"], g2, "{f}");
        assert_eq!(f["committed"], json!(["vm0/vdb"]), "{f}");
        assert_at_group(&t, "a", g2);
        assert_at_group(&t, "b", g2);
        drop(pairs);
    }
}

/// (d) The secondary's prepare record: refused with a wrong applied sequence number; it
/// survives a SIGKILL and restart of the secondary process (the primary is gone by then);
/// a commit for another group is refused; group failover (the other disk committed the group
/// checkpoint through its primary) commits it, and both disks are the primaries' disks at the
/// prepare.
#[test]
fn prepare_record_survives_a_secondary_restart() {
    if !prerequisites("prepare_record_survives_a_secondary_restart", false) {
        return;
    }
    let t = Setup::new();
    let mut pairs = [t.pair("a"), t.pair("b")];
    let mut pq: Vec<Qmp> = ["a", "b"]
        .iter()
        .map(|n| Qmp::connect(&t.p(&format!("{n}-primary.qmp"))))
        .collect();
    let mut sq: Vec<Qmp> = ["a", "b"]
        .iter()
        .map(|n| Qmp::connect(&t.p(&format!("{n}-secondary.qmp"))))
        .collect();
    // Group checkpoint 1, by hand: prepare both, commit both.
    let prepare = |pq: &mut Qmp, sq: &mut Qmp, g: u64| -> u64 {
        pq.execute(
            "replication-prepare-checkpoint",
            json!({"timeout-ms": 10000}),
        )
        .unwrap();
        let seq = pq.execute("query-replication", json!({})).unwrap()["acked-seq"]
            .as_u64()
            .unwrap();
        let e = sq
            .execute(
                "replication-prepare",
                json!({"group": g, "applied-seq": seq + 1}),
            )
            .unwrap_err();
        assert!(e.to_string().contains("not prepared"), "{e}");
        let r = sq
            .execute(
                "replication-prepare",
                json!({"group": g, "applied-seq": seq}),
            )
            .unwrap();
        assert_eq!(r["group"], g);
        assert_eq!(r["applied-seq"], seq);
        seq
    };
    for (p, s) in pq.iter_mut().zip(sq.iter_mut()) {
        prepare(p, s, 1);
    }
    for p in pq.iter_mut() {
        p.execute("replication-checkpoint", json!({"timeout-ms": 10000}))
            .unwrap();
    }
    // Group checkpoint 2: writes, both prepared, only disk a committed.
    write_blocks(&t, "a", 5, 0, 16);
    write_blocks(&t, "b", 5, 0, 16);
    for (p, s) in pq.iter_mut().zip(sq.iter_mut()) {
        prepare(p, s, 2);
    }
    pq[0]
        .execute("replication-checkpoint", json!({"timeout-ms": 10000}))
        .unwrap();
    let want_a = std::fs::read(t.p("a-primary.img")).unwrap();
    let want_b = std::fs::read(t.p("b-primary.img")).unwrap();
    drop(pq);
    for p in pairs.iter_mut() {
        p.primary.take(); // SIGKILL
    }
    // The secondary of b dies and comes back (on the same port and directories).
    let port = pairs[1].secondary.listen_port();
    drop(sq);
    {
        // SIGKILL first: the new process takes over its files and port.
        let b = &mut pairs[1].secondary;
        let _ = b.child.kill();
        let _ = b.child.wait();
    }
    pairs[1].secondary = t.start_secondary("b", port);
    let mut sb = Qmp::connect(&t.p("b-secondary.qmp"));
    let q = sb.execute("query-replication", json!({})).unwrap();
    assert_eq!(q["group"]["current"], 1, "{q}");
    assert_eq!(q["group"]["prepared"]["group"], 2, "{q}");
    // Not connected: a plain checkpoint is refused, a commit of another group too.
    let e = sb
        .execute("replication-do-checkpoint", json!({}))
        .unwrap_err();
    assert!(e.to_string().contains("no primary is connected"), "{e}");
    let e = sb
        .execute("replication-do-checkpoint", json!({"group": 3}))
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("not prepared for group checkpoint 3"),
        "{e}"
    );
    // The plan, then the failover.
    let mut plan = t.colo_ctl(&failover_args(&t, &["a", "b"], &["--dry-run"]), &[]);
    let p = wait_ctl(&mut plan, "failover-plan", CTL_TIMEOUT);
    assert!(plan.wait_exit(CTL_TIMEOUT).success());
    assert_eq!(p["group"], 2, "{p}");
    assert_eq!(p["commit"], json!(["vm0/vdb"]), "{p}");
    let mut fo = t.colo_ctl(&failover_args(&t, &["a", "b"], &[]), &[]);
    let f = wait_ctl(&mut fo, "failover", CTL_TIMEOUT);
    assert!(fo.wait_exit(CTL_TIMEOUT).success());
    assert_eq!(f["group"], 2, "{f}");
    assert!(std::fs::read(t.secondary_image("a")).unwrap() == want_a);
    assert!(std::fs::read(t.secondary_image("b")).unwrap() == want_b);
    // Failing over again is refused by the backends, not mixed: both are at group 2.
    let q = sb.execute("query-replication", json!({})).unwrap();
    assert_eq!(
        (q["state"].as_str(), q["group"]["current"].as_u64()),
        (Some("failed-over"), Some(2))
    );
}

/// A secondary of the group dies: colo-ctl reports the group unprotected and takes no group
/// checkpoint (the VM keeps running); the secondary comes back on the same port, colo-ctl
/// reconnects to its QMP socket, reports protected, and the next group checkpoint brings both
/// disks to it. SIGTERM leaves the VM running.
#[test]
fn a_lost_secondary_pauses_group_checkpoints_until_it_is_back() {
    if !prerequisites(
        "a_lost_secondary_pauses_group_checkpoints_until_it_is_back",
        false,
    ) {
        return;
    }
    let t = Setup::new();
    let mut pairs = [t.pair("a"), t.pair("b")];
    let _qemu = t.fake_qemu("qemu.qmp");
    let args = group_args(&t, "qemu.qmp", &["a", "b"], &["--interval-ms", "100"]);
    let mut ctl = t.colo_ctl(&args, &[]);
    wait_ctl(&mut ctl, "checkpoint", CTL_TIMEOUT);
    let port = pairs[1].secondary.listen_port();
    {
        let b = &mut pairs[1].secondary;
        let _ = b.child.kill();
        let _ = b.child.wait();
    }
    let u = wait_ctl(&mut ctl, "unprotected", CTL_TIMEOUT);
    assert!(u["reason"].to_string().contains("vm0/vdb"), "{u}");
    write_blocks(&t, "a", 7, 0, 4);
    write_blocks(&t, "b", 7, 0, 4);
    pairs[1].secondary = t.start_secondary("b", port);
    wait_ctl(&mut ctl, "protected", CTL_TIMEOUT);
    let c = wait_ctl(&mut ctl, "checkpoint", CTL_TIMEOUT);
    let g = c["group"].as_u64().unwrap();
    for n in ["a", "b"] {
        let q = Qmp::connect(&t.p(&format!("{n}-secondary.qmp")))
            .execute("query-replication", json!({}))
            .unwrap();
        assert!(q["group"]["current"].as_u64().unwrap() >= g, "{n}: {q}");
    }
    // SAFETY: kill(2) on the child we spawned (colo-ctl leads its own process group).
    unsafe { libc::kill(ctl.child.id() as i32, libc::SIGTERM) };
    assert_eq!(ctl.wait_exit(CTL_TIMEOUT).code(), Some(143));
    let st = Qmp::connect(&t.p("qemu.qmp"))
        .execute("query-status", json!({}))
        .unwrap();
    assert_eq!(st["running"], true, "colo-ctl left the VM stopped");
}
