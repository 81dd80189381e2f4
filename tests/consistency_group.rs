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

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{tempdir, Backend, Client, Qmp};
use serde_json::{json, Value};

const DISK: u64 = 16 << 20;
const RECORD: usize = 4096;
/// The guest writers stop after this many records (8 MiB), far more than a test needs.
const MAX_RECORDS: u64 = 2048;
const GUEST_TIMEOUT: Duration = Duration::from_secs(120);
const CTL_TIMEOUT: Duration = Duration::from_secs(30);

/// True when python `qemu.qmp` (and, with `qemu`, QEMU) is there; otherwise prints SKIPPED
/// (or panics in CI).
fn prerequisites(test: &str, qemu: bool) -> bool {
    let have_qemu = !qemu || common::in_path("qemu-system-x86_64");
    let qmp = Command::new("python3")
        .args(["-c", "import qemu.qmp"])
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if have_qemu && qmp {
        return true;
    }
    let what = if have_qemu {
        "python qemu.qmp not installed"
    } else {
        "QEMU not installed"
    };
    if std::env::var_os("CI").is_some() {
        panic!("{test}: {what}, but CI must run the QEMU tests (see .ci/run)");
    }
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "\n*** {test}: SKIPPED: {what}\n*** install qemu-system-x86 and `pip install qemu.qmp` \
         (see .ci/run)"
    );
    false
}

// ---- processes -------------------------------------------------------------------------------

/// A child in its own process group whose stdout+stderr lines arrive on a channel.
struct Proc {
    name: String,
    child: Child,
    rx: mpsc::Receiver<(f64, String)>,
    lines: Vec<String>,
    exited: Option<ExitStatus>,
}

impl Proc {
    fn spawn(cmd: Command, name: &str) -> Proc {
        let (child, rx) = common::spawn_group(cmd, &format!("[{name}]"));
        Proc {
            name: name.to_string(),
            child,
            rx,
            lines: Vec::new(),
            exited: None,
        }
    }

    fn tail(&self) -> String {
        let s = self.lines.len().saturating_sub(40);
        self.lines[s..].join("\n")
    }

    /// Waits for the next line (after those already seen) matching `pred`.
    fn wait_line(&mut self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            match self
                .rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok((_, line)) => {
                    self.lines.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(e) => panic!(
                    "{}: no {what} within {timeout:?} ({e:?}). Last output:\n{}",
                    self.name,
                    self.tail()
                ),
            }
        }
    }

    fn wait_marker(&mut self, marker: &str, timeout: Duration) -> String {
        self.wait_line(marker, timeout, |l| l.contains(marker))
    }

    /// Waits until the process closed its output and exited.
    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            match self
                .rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok((_, line)) => self.lines.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                    "{} did not exit within {timeout:?}. Last output:\n{}",
                    self.name,
                    self.tail()
                ),
            }
        }
        let st = self.child.wait().expect("wait");
        self.exited = Some(st);
        st
    }

    fn drain(&mut self) {
        while let Ok((_, line)) = self.rx.try_recv() {
            self.lines.push(line);
        }
    }

    fn has_line(&self, marker: &str) -> bool {
        self.lines.iter().any(|l| l.contains(marker))
    }

    /// SIGKILL to the whole process group (run-vm.sh and its QEMU).
    fn kill(&mut self) {
        if self.exited.is_none() {
            // SAFETY: kill(2) on the process group we created.
            unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
            self.exited = self.child.wait().ok();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Parses a colo-ctl JSON line with `"event": name`.
fn ctl_event(line: &str, name: &str) -> Option<Value> {
    let v: Value = serde_json::from_str(line).ok()?;
    (v["event"] == name).then_some(v)
}

fn wait_ctl(ctl: &mut Proc, name: &str, timeout: Duration) -> Value {
    let l = ctl.wait_line(name, timeout, |l| ctl_event(l, name).is_some());
    ctl_event(&l, name).unwrap()
}

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

    fn secondary_args(&self, n: &str, port: u16) -> Vec<String> {
        [
            "--insecure-link",
            "--role",
            "secondary",
            "--image",
            &self.s(&format!("{n}-secondary.img")),
            "--size",
            &DISK.to_string(),
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--layer-dir",
            &self.s(&format!("{n}-layers")),
            "--qmp",
            &self.s(&format!("{n}-secondary.qmp")),
            "--heartbeat-ms",
            "100",
            "--peer-timeout-ms",
            "2000",
        ]
        .map(String::from)
        .to_vec()
    }

    fn start_secondary(&self, n: &str, port: u16) -> Backend {
        let args = self.secondary_args(n, port);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        Backend::start_with(&refs, &self.p(&format!("{n}-secondary.qmp")))
    }

    /// Starts pair `n` and waits until its primary is connected.
    fn pair(&self, n: &str) -> Pair {
        let mut secondary = self.start_secondary(n, 0);
        let peer = format!("127.0.0.1:{}", secondary.listen_port());
        let args = [
            "--insecure-link",
            "--role",
            "primary",
            "--image",
            &self.s(&format!("{n}-primary.img")),
            "--size",
            &DISK.to_string(),
            "--socket",
            &self.s(&format!("{n}-pvm.sock")),
            "--peer",
            &peer,
            "--qmp",
            &self.s(&format!("{n}-primary.qmp")),
            "--heartbeat-ms",
            "100",
            "--peer-timeout-ms",
            "2000",
        ];
        let primary = Backend::start_with(&args, &self.p(&format!("{n}-pvm.sock")));
        secondary.wait_for_log("connected (epoch");
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
        let script_path = self.p(&format!("{name}.sh"));
        std::fs::write(&script_path, script).unwrap();
        let mut cmd = Command::new("bash");
        cmd.arg(common::repo().join("qemu-scripts/run-vm.sh"))
            .arg("--guest")
            .arg(common::guest_dir());
        for d in disks {
            cmd.arg("--socket").arg(self.p(&format!("{d}-pvm.sock")));
        }
        cmd.args(["--num-queues", "1", "--smp", "1", "--mem", "160M"])
            .arg("--script")
            .arg(&script_path)
            .arg("--qmp")
            .arg(self.p(qmp));
        Proc::spawn(cmd, name)
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
        let mut cmd = Command::new("python3");
        cmd.arg(common::repo().join("qemu-scripts/colo-ctl.py"))
            .args(args)
            .envs(env.iter().copied())
            .current_dir(self.dir.path());
        Proc::spawn(cmd, "colo-ctl")
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

// ---- records ---------------------------------------------------------------------------------

/// The exact bytes of record `i`: 64 lines `R{i:08}-{k:02}-{payload}` (see tests/colo_e2e.rs).
fn record(i: u64) -> Vec<u8> {
    let payload = format!("{:010}", i * 7919).repeat(5);
    let mut s = String::with_capacity(RECORD);
    for k in 0..64 {
        s.push_str(&format!("R{i:08}-{k:02}-{payload}\n"));
    }
    assert_eq!(s.len(), RECORD);
    s.into_bytes()
}

/// Checks an image: records 0..n exact, zeros after. Returns n.
fn records_in(image: &Path) -> u64 {
    let data = std::fs::read(image).expect("read image");
    let mut n = 0u64;
    while (n as usize + 1) * RECORD <= data.len() {
        let blk = &data[n as usize * RECORD..(n as usize + 1) * RECORD];
        if blk.iter().all(|&b| b == 0) {
            break;
        }
        assert!(
            blk == record(n).as_slice(),
            "{}: record {n} is torn or wrong: {:?}",
            image.display(),
            String::from_utf8_lossy(&blk[..80])
        );
        n += 1;
    }
    if let Some(pos) = data[n as usize * RECORD..].iter().position(|&b| b != 0) {
        panic!(
            "{}: data after the last record {n}: byte {}",
            image.display(),
            n as usize * RECORD + pos
        );
    }
    n
}

/// Guest script: record i to block i of every disk in `disks`, in that order, per iteration
/// (O_DIRECT), printing progress.
fn writer_script(disks: &[&str]) -> String {
    let writes: String = disks
        .iter()
        .map(|d| {
            format!(
                "  dd if=/tmp/rec of=/dev/{d} bs=4096 count=1 seek=$i oflag=direct 2>/tmp/err \
                 || echo \"COLO-WRITER: IOERR {d} at $i: $(cat /tmp/err)\"\n"
            )
        })
        .collect();
    format!(
        r#"i=0
: >/tmp/tpl
for k in $(seq -w 0 63); do echo "R@@@@@@@@-$k-PPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPP" >>/tmp/tpl; done
echo "COLO-WRITER: start"
while [ $i -lt {MAX_RECORDS} ]; do
  n=$(printf %08d $i); p=$(printf %010d $((i * 7919)))
  sed "s/@@@@@@@@/$n/; s/PPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPP/$p$p$p$p$p/" /tmp/tpl >/tmp/rec
{writes}  i=$((i + 1))
  [ $((i % 20)) = 0 ] && echo "COLO-WRITER: progress $i"
done
echo "COLO-WRITER: done $i"
sleep 100000
"#
    )
}

/// Waits until pair `n`'s primary forwarded at least `bytes` since its last checkpoint, so
/// that the failover has something to roll back.
fn wait_mid_epoch(t: &Setup, n: &str, bytes: u64) {
    let mut q = Qmp::connect(&t.p(&format!("{n}-primary.qmp")));
    let deadline = Instant::now() + CTL_TIMEOUT;
    while q.execute("query-replication", json!({})).unwrap()["bytes-sent-since-checkpoint"]
        .as_u64()
        .unwrap()
        < bytes
    {
        assert!(Instant::now() < deadline, "the guest stopped writing");
        // A polling interval, not synchronisation.
        std::thread::sleep(Duration::from_millis(10));
    }
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
            .any(|l| ctl_event(l, "checkpoint-error").is_some()),
        "a group checkpoint failed"
    );
    wait_mid_epoch(t, &pairs[0].name, 3 * RECORD as u64);
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
    let vm = t.vm(
        "pvm",
        &["a", "b"],
        &writer_script(&["vda", "vdb"]),
        "pvm.qmp",
    );
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
    let vm1 = t.vm("vm1", &["a"], &writer_script(&["vda"]), "vm1.qmp");
    let vm2 = t.vm("vm2", &["b"], &writer_script(&["vda"]), "vm2.qmp");
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
