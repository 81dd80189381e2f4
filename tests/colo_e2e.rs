//! End to end with QEMU: a Primary VM on the primary colo-blk backend, the secondary backend,
//! and the checkpoint manager `qemu-scripts/colo-ctl.py` (QEMU stop → replication-checkpoint →
//! cont), then the primary is killed and a fresh guest boots from the secondary.
//!
//! Guest disk content: record `i` is the 4 KiB block at `i * 4096`, 64 text lines of 64 bytes,
//! `R{i:08}-{k:02}-{payload(i) x5}\n`, fully determined by `i` ([`record`]). The guest writer
//! writes records 0, 1, 2, … in order with `dd oflag=direct`, so at any instant the disk holds
//! records `0..n` (the last maybe torn) and zeros after them.
//!
//! Synchronisation is by guest serial markers, colo-ctl JSON lines, the backends' QMP state
//! and events, and process exits (never a backend's log line); timeouts are failure guards.
//!
//! Skipped loudly without `qemu-system-x86_64` or python `qemu.qmp`, unless `CI` is set (then the
//! test fails). Environment as in tests/qemu_boot.rs: `COLO_GUEST_DIR`, `COLO_BLK_ACCEL`.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::pair::{wait_connected, Node};
use common::qemu::{
    ctl_event, e2fsprogs, prerequisites, record, records_in, wait_ctl, wait_mid_epoch, Proc, RECORD,
};
use common::{tempdir, Backend, Client, Qmp};
use serde_json::json;

const DISK: u64 = 32 << 20;
/// The writer stops after this many records (16 MiB), the reader scans that far.
const MAX_RECORDS: u64 = 4096;
const GUEST_TIMEOUT: Duration = Duration::from_secs(120);

// ---- the pair --------------------------------------------------------------------------------

struct Setup {
    dir: tempfile::TempDir,
    guest: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        Setup {
            guest: common::guest_dir(),
            dir: tempdir(),
        }
    }

    fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn s(&self, name: &str) -> String {
        self.p(name).display().to_string()
    }

    /// The secondary with a vhost-user socket (svm.sock). `port` 0 picks a free one.
    fn secondary(&self, port: u16) -> (Backend, u16) {
        self.secondary_with(port, &[])
    }

    /// [`Setup::secondary`] with more arguments.
    fn secondary_with(&self, port: u16, extra: &[&str]) -> (Backend, u16) {
        let b = Node::secondary(self.dir.path(), "secondary.img", DISK, port)
            .layers("layers")
            .qmp("secondary.qmp")
            .socket("svm.sock")
            .args(extra)
            .start();
        let port = b.listen_port();
        (b, port)
    }

    /// The secondary (with `extra`) and the primary, connected; and the replication port.
    fn pair(&self, extra: &[&str]) -> (Backend, Backend, u16) {
        let (secondary, port) = self.secondary_with(0, extra);
        let primary = self.primary(port);
        wait_connected(&mut secondary.qmp());
        (secondary, primary, port)
    }

    fn primary(&self, port: u16) -> Backend {
        Node::primary(self.dir.path(), "primary.img", DISK, port)
            .socket("pvm.sock")
            .qmp("primary.qmp")
            .start()
    }

    /// Boots the test guest on `socket` running `script`; `qmp` opens QEMU's QMP socket.
    fn vm(&self, name: &str, socket: &str, script: &str, qmp: Option<&str>) -> Proc {
        let qmp = qmp.map(|q| self.p(q));
        common::qemu::run_vm_on(
            None,
            self.dir.path(),
            name,
            &self.guest,
            &[self.p(socket)],
            "192M",
            script,
            qmp.as_deref(),
        )
    }

    /// Starts colo-ctl.py against pvm.qmp / primary.qmp / secondary.qmp.
    fn colo_ctl(&self, extra: &[&str]) -> Proc {
        let mut args = vec![
            "--qemu-qmp".to_string(),
            self.s("pvm.qmp"),
            "--primary-qmp".to_string(),
            self.s("primary.qmp"),
            "--secondary-qmp".to_string(),
            self.s("secondary.qmp"),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        common::qemu::colo_ctl(self.dir.path(), &args, &[])
    }

    /// colo-ctl checkpointing every 400 ms and failing over when the primary is lost, with a
    /// pause hook that copies the primary image to `snap/EPOCH.img` at each checkpoint while
    /// the PVM is paused (keeping the last two); returns it with the `snap` directory.
    fn failover_ctl(&self) -> (Proc, PathBuf) {
        let snap = self.p("snap");
        std::fs::create_dir_all(&snap).unwrap();
        let hook = format!(
            "cp {img} {snap}/$COLO_EPOCH.img && rm -f {snap}/$((COLO_EPOCH - 2)).img",
            img = self.s("primary.img"),
            snap = snap.display()
        );
        let ctl = self.colo_ctl(&[
            "--interval-ms",
            "400",
            "--failover-on-primary-loss",
            "--pause-hook",
            &hook,
        ]);
        (ctl, snap)
    }
}

// ---- records ---------------------------------------------------------------------------------

/// Guest script: writes records 0, 1, … to /dev/vda with O_DIRECT, progress every 25 records;
/// stops at MAX_RECORDS.
fn writer_script() -> String {
    common::qemu::writer_script(&["vda"], MAX_RECORDS, 25)
}

/// Guest script: scans the record area and prints a summary line.
fn reader_script() -> String {
    let mib = (MAX_RECORDS * RECORD as u64) >> 20;
    format!(
        r#"dd if=/dev/vda bs=1M count={mib} iflag=direct 2>/dev/null | tr -d '\000' | awk '
function dec(s) {{ sub(/^0+/, "", s); return s + 0 }}
function done_rec() {{ if (n == 64) ok++; else torn++; if (cur != last + 1) gaps++; last = cur }}
BEGIN {{ last = -1; cur = -1 }}
{{
  if ($0 !~ /^R[0-9]+-[0-9]+-[0-9]+$/) {{ bad++; next }}
  split($0, a, "-"); r = dec(substr(a[1], 2)); k = dec(a[2])
  p = sprintf("%010d", r * 7919); if (a[3] != p p p p p) bad++
  if (r != cur) {{ if (cur >= 0) done_rec(); cur = r; n = 0 }}
  if (k != n) bad++
  n++
}}
END {{ if (cur >= 0) done_rec(); printf "COLO-RECORDS: ok=%d torn=%d gaps=%d bad=%d last=%d\n", ok, torn, gaps, bad, last }}'
"#
    )
}

// ---- tests -----------------------------------------------------------------------------------

/// (a) Kill the primary QEMU and backend mid-run: after failover the secondary disk holds
/// exactly the records of the last checkpoint, and a fresh guest reads them from it.
#[test]
fn failover_keeps_the_last_checkpoint() {
    if !prerequisites("failover_keeps_the_last_checkpoint", true) {
        return;
    }
    let t = Setup::new();
    let (_secondary, primary, _) = t.pair(&[]);
    let mut pvm = t.vm("pvm", "pvm.sock", &writer_script(), Some("pvm.qmp"));
    // A copy of the primary disk at each checkpoint, taken while the PVM is paused.
    let (mut ctl, snap) = t.failover_ctl();
    pvm.wait_marker("COLO-WRITER: progress", GUEST_TIMEOUT);
    // Six checkpoints that carried guest writes.
    let mut pauses = Vec::new();
    let mut last_epoch = 0;
    while pauses.len() < 6 {
        let c = wait_ctl(&mut ctl, "checkpoint", Duration::from_secs(30));
        if c["bytes"].as_u64().unwrap() > 0 {
            pauses.push(c["pause_ms"].as_f64().unwrap());
        }
        last_epoch = c["epoch"].as_u64().unwrap();
    }
    // Kill in the middle of an epoch: once the primary forwarded writes since the last
    // checkpoint, so that the failover has something to roll back.
    pvm.drain();
    assert!(!pvm.has_line("IOERR"), "the PVM saw I/O errors");
    assert!(
        !pvm.has_line("COLO-WRITER: done"),
        "writer finished too early"
    );
    wait_mid_epoch(
        &t.p("primary.qmp"),
        3 * RECORD as u64,
        Duration::from_secs(30),
    );
    let t_kill = Instant::now();
    pvm.kill();
    drop(primary); // SIGKILL
    let f = wait_ctl(&mut ctl, "failover", Duration::from_secs(30));
    let failover_wall = t_kill.elapsed();
    assert!(ctl.wait_exit(Duration::from_secs(30)).success());
    let epoch = f["epoch"].as_u64().unwrap();
    assert!(epoch >= last_epoch, "failover epoch {epoch} < {last_epoch}");

    // Byte for byte: the secondary is the primary disk as it was during the last pause.
    let snap_img = snap.join(format!("{epoch}.img"));
    let sec = std::fs::read(t.p("secondary.img")).unwrap();
    let want = std::fs::read(&snap_img).expect("snapshot of the failover epoch");
    let n_snap = records_in(&snap_img);
    let n_sec = records_in(&t.p("secondary.img"));
    assert_eq!(
        n_sec, n_snap,
        "records after failover vs at checkpoint {epoch}"
    );
    assert!(
        sec == want,
        "secondary differs from the primary at checkpoint {epoch}"
    );
    assert!(n_sec > 0 && n_sec < MAX_RECORDS);

    // A fresh guest on the failed-over secondary sees the same records.
    let mut reader = t.vm("reader", "svm.sock", &reader_script(), None);
    let line = reader.wait_marker("COLO-RECORDS:", GUEST_TIMEOUT);
    assert!(reader.wait_exit(GUEST_TIMEOUT).success());
    let expect = format!(
        "COLO-RECORDS: ok={n_sec} torn=0 gaps=0 bad=0 last={}",
        n_sec as i64 - 1
    );
    assert!(
        line.ends_with(&expect),
        "reader saw {line:?}, expected {expect:?}"
    );
    pauses.sort_by(|a, b| a.partial_cmp(b).unwrap());
    eprintln!(
        "TIMING failover: {n_sec} records at epoch {epoch}; checkpoint pause median {:.1} ms max {:.1} ms \
         (incl. 32 MiB snapshot hook); failover {} ms in the backend ({} bytes rolled back), {:.0} ms from SIGKILL to done",
        pauses[pauses.len() / 2],
        pauses[pauses.len() - 1],
        f["backend_ms"],
        f["restored_hidden_bytes"],
        failover_wall.as_secs_f64() * 1000.0
    );
}

/// (b) Kill the secondary: the PVM keeps writing without I/O errors, colo-ctl reports
/// "unprotected"; a restarted secondary is resynchronised and checkpoints resume.
#[test]
fn secondary_lost_pvm_keeps_running() {
    if !prerequisites("secondary_lost_pvm_keeps_running", true) {
        return;
    }
    let t = Setup::new();
    let (secondary, _primary, port) = t.pair(&[]);
    let mut pvm = t.vm("pvm", "pvm.sock", &writer_script(), Some("pvm.qmp"));
    let mut ctl = t.colo_ctl(&["--interval-ms", "300"]);
    pvm.wait_marker("COLO-WRITER: progress", GUEST_TIMEOUT);
    for _ in 0..2 {
        wait_ctl(&mut ctl, "checkpoint", Duration::from_secs(30));
    }
    drop(secondary); // SIGKILL
    let u = wait_ctl(&mut ctl, "unprotected", Duration::from_secs(30));
    eprintln!("unprotected: {u}");
    pvm.drain();
    // The guest keeps making progress: three more progress lines (75 records) after that.
    for _ in 0..3 {
        pvm.wait_marker("COLO-WRITER: progress", Duration::from_secs(60));
    }
    assert!(!pvm.has_line("IOERR"), "the PVM saw I/O errors");
    assert!(ctl.child.try_wait().unwrap().is_none(), "colo-ctl exited");

    // A new secondary on the same port and image: resync, then checkpoints resume.
    let (secondary2, _) = t.secondary(port);
    wait_connected(&mut secondary2.qmp());
    wait_ctl(&mut ctl, "protected", Duration::from_secs(30));
    let c = wait_ctl(&mut ctl, "checkpoint", Duration::from_secs(30));
    eprintln!("checkpoint after reconnect: {c}");
    pvm.wait_marker("COLO-WRITER: progress", Duration::from_secs(60));
    assert!(!pvm.has_line("IOERR"), "the PVM saw I/O errors");
}

/// (c) A Secondary VM runs on the secondary. First the blkio client as the "SVM" (reads and
/// writes at exact moments around a manual checkpoint), then a QEMU SVM guest: its write is
/// dropped by the next checkpoint (it sees the primary's data), and its write after that
/// checkpoint survives the failover, on top of exactly the checkpoint's disk.
#[test]
fn secondary_vm_writes_dropped_at_checkpoint_kept_at_failover() {
    if !prerequisites(
        "secondary_vm_writes_dropped_at_checkpoint_kept_at_failover",
        true,
    ) {
        return;
    }
    let t = Setup::new();
    let (_secondary, primary, _) = t.pair(&[]);
    let mut pq = Qmp::connect(&t.p("primary.qmp"));
    let mut sq = Qmp::connect(&t.p("secondary.qmp"));

    // The PVM writes records 0..; the blkio "SVM" writes its own block at record 2000.
    let mut pvm = t.vm("pvm", "pvm.sock", &writer_script(), Some("pvm.qmp"));
    pvm.wait_marker("COLO-WRITER: progress 50", GUEST_TIMEOUT);
    let svm_off = 2000 * RECORD as u64;
    let mine = vec![0x5Au8; RECORD];
    {
        let mut svm = Client::connect(&t.p("svm.sock"), 1).expect("SVM client");
        assert_eq!(svm.write(0, svm_off, &mine), 0);
        assert_eq!(svm.read(0, svm_off, RECORD).unwrap(), mine);
        // Its view of record 0 is the primary's (the stream is applied below the SVM).
        let r0 = svm.read(0, 0, RECORD).unwrap();
        assert!(r0 == record(0) || r0.iter().all(|&b| b == 0));
        let e = pq
            .execute("replication-checkpoint", json!({"timeout-ms": 10000}))
            .unwrap()["epoch"]
            .as_u64()
            .unwrap();
        sq.wait_event("REPLICATION_CHECKPOINT");
        // After the checkpoint the SVM's write is gone: it sees the primary's disk.
        let got = svm.read(0, svm_off, RECORD).unwrap();
        assert!(
            got.iter().all(|&b| b == 0),
            "SVM write survived checkpoint {e}"
        );
        assert_eq!(svm.read(0, 0, RECORD).unwrap(), record(0));
    }

    // The same with a real QEMU Secondary VM: it writes block 3000 and reads it back; after
    // the next checkpoint it reads zeros there (and the primary's record 0); then it writes block
    // 3001, the primary dies, and after failover the disk is the checkpoint plus block 3001.
    let svm_script = r#"w() { printf "SVM-BLOCK-$1\n" >/tmp/b; dd if=/tmp/b of=/dev/vda bs=4096 count=1 seek=$2 conv=sync oflag=direct 2>/dev/null || echo "COLO-SVM: IOERR"; }
r() { dd if=/dev/vda bs=4096 count=1 skip=$1 iflag=direct 2>/dev/null | head -c 11; }
w 1 3000
echo "COLO-SVM: wrote 1, reads $(r 3000)"
n=0
while [ "$(r 3000)" = "SVM-BLOCK-1" ]; do n=$((n + 1)); sleep 0.05; done
echo "COLO-SVM: block 1 gone after $n polls, record 0 reads $(r 0 | head -c 9)"
w 2 3001
echo "COLO-SVM: wrote 2, reads $(r 3001)"
sleep 100000
"#;
    let mut svm = t.vm("svm", "svm.sock", svm_script, None);
    let l = svm.wait_marker("COLO-SVM: wrote 1", GUEST_TIMEOUT);
    assert!(l.ends_with("reads SVM-BLOCK-1"), "{l}");
    // One checkpoint through colo-ctl (QEMU stop, checkpoint, snapshot of the primary, cont).
    let snap = t.p("snap.img");
    let hook = format!("cp {} {}", t.s("primary.img"), snap.display());
    let mut ctl = t.colo_ctl(&[
        "--interval-ms",
        "100",
        "--count",
        "1",
        "--pause-hook",
        &hook,
    ]);
    let c = wait_ctl(&mut ctl, "checkpoint", Duration::from_secs(30));
    assert!(ctl.wait_exit(Duration::from_secs(30)).success());
    let epoch = c["epoch"].as_u64().unwrap();
    let l = svm.wait_marker("COLO-SVM: block 1 gone", Duration::from_secs(60));
    assert!(l.ends_with("record 0 reads R00000000"), "{l}");
    let l = svm.wait_marker("COLO-SVM: wrote 2", Duration::from_secs(60));
    assert!(l.ends_with("reads SVM-BLOCK-2"), "{l}");
    // Kill the primary side and fail over while the SVM runs.
    pvm.kill();
    drop(primary);
    let f = sq.execute("replication-failover", json!({})).unwrap();
    assert_eq!(f["epoch"].as_u64().unwrap(), epoch);
    assert!(f["committed-active-bytes"].as_u64().unwrap() >= RECORD as u64);
    svm.kill();
    assert!(!svm.has_line("IOERR"), "the SVM saw I/O errors");
    // The disk: the primary at the checkpoint, plus the SVM's block 3001.
    let mut want = std::fs::read(&snap).unwrap();
    let mut blk = b"SVM-BLOCK-2\n".to_vec();
    blk.resize(RECORD, 0);
    want[3001 * RECORD..3002 * RECORD].copy_from_slice(&blk);
    let img = std::fs::read(t.p("secondary.img")).unwrap();
    if let Some(pos) = img.iter().zip(&want).position(|(a, b)| a != b) {
        panic!(
            "after failover the disk differs from checkpoint {epoch} + SVM writes at byte {pos}"
        );
    }
    let n = records_in(&snap);
    assert!(n >= 50, "only {n} records at the checkpoint");
}

/// Runs a host tool; returns (success, stdout+stderr).
fn host(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// (d) ext4 survives: the PVM writes and fsyncs files in a loop; after failover a fresh guest
/// mounts (journal replay) and unmounts, `e2fsck -fn` passes and every file synced before the
/// last checkpoint is there with its content.
#[test]
fn ext4_survives_failover() {
    if !prerequisites("ext4_survives_failover", true) {
        return;
    }
    if !e2fsprogs(
        "ext4_survives_failover",
        &["mkfs.ext4", "e2fsck", "debugfs"],
    ) {
        return;
    }
    let t = Setup::new();
    // Both disks start identical: one fresh file system, copied.
    let primary_img = t.p("primary.img");
    std::fs::File::create(&primary_img)
        .unwrap()
        .set_len(DISK)
        .unwrap();
    let (ok, out) = host(
        "mkfs.ext4",
        &["-q", "-F", "-b", "4096", &t.s("primary.img")],
    );
    assert!(ok, "mkfs.ext4: {out}");
    std::fs::copy(&primary_img, t.p("secondary.img")).unwrap();

    // Images colo-blk did not create carry no replication history: the copy is not known to
    // be equal, so the secondary is allowed a full sync (it copies the same bytes again).
    let (_secondary, primary, _) = t.pair(&["--allow-full-sync"]);
    let writer = r#"mkdir -p /mnt; mount -t ext4 /dev/vda /mnt || { echo "COLO-FS: mount failed"; exit 1; }
: >/tmp/tpl
for k in $(seq -w 0 63); do echo "R@@@@@@@@-$k-PPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPP" >>/tmp/tpl; done
i=0
while [ $i -lt 2000 ]; do
  n=$(printf %08d $i); p=$(printf %010d $((i * 7919)))
  sed "s/@@@@@@@@/$n/; s/PPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPP/$p$p$p$p$p/" /tmp/tpl >/tmp/rec
  dd if=/tmp/rec of=/mnt/f$i bs=4096 conv=fsync 2>/dev/null || echo "COLO-FS: IOERR $i"
  sync
  echo "COLO-FS: synced $i"
  i=$((i + 1))
done
sleep 100000
"#;
    let mut pvm = t.vm("pvm", "pvm.sock", writer, Some("pvm.qmp"));
    let (mut ctl, snap) = t.failover_ctl();
    pvm.wait_marker("COLO-FS: synced 5", GUEST_TIMEOUT);
    let mut checkpoints = Vec::new();
    while checkpoints.len() < 5 {
        let c = wait_ctl(&mut ctl, "checkpoint", Duration::from_secs(30));
        if c["bytes"].as_u64().unwrap() > 0 {
            checkpoints.push(c);
        }
    }
    pvm.wait_marker("COLO-FS: synced", Duration::from_secs(30));
    pvm.kill();
    drop(primary);
    let f = wait_ctl(&mut ctl, "failover", Duration::from_secs(30));
    assert!(ctl.wait_exit(Duration::from_secs(30)).success());
    let epoch = f["epoch"].as_u64().unwrap();
    // All checkpoint lines, including any printed after the ones we waited for.
    let stopped_at = ctl
        .lines
        .iter()
        .filter_map(|(_, l)| ctl_event(l, "checkpoint"))
        .find(|c| c["epoch"] == epoch)
        .map(|c| c["stopped_at"].as_f64().unwrap())
        .expect("checkpoint line of the failover epoch");
    // Files whose "synced" line reached us before QEMU was stopped for that checkpoint.
    pvm.drain();
    let synced: Vec<u64> = pvm
        .lines
        .iter()
        .filter(|(t, _)| *t < stopped_at)
        .filter_map(|(_, l)| l.split("COLO-FS: synced ").nth(1))
        .map(|n| n.trim().parse().unwrap())
        .collect();
    assert!(
        !synced.is_empty(),
        "no file synced before checkpoint {epoch}"
    );
    assert!(!pvm.has_line("IOERR"));
    let want = std::fs::read(snap.join(format!("{epoch}.img"))).expect("snapshot");
    assert!(
        std::fs::read(t.p("secondary.img")).unwrap() == want,
        "secondary differs from the primary at checkpoint {epoch}"
    );

    // A fresh guest mounts (replays the journal) and unmounts cleanly.
    let reader = "mkdir -p /mnt; mount -t ext4 /dev/vda /mnt && echo \"COLO-FS: mounted $(ls /mnt | grep -c '^f')\" \
                  && umount /mnt && echo COLO-FS: unmounted\n";
    let mut g = t.vm("reader", "svm.sock", reader, None);
    g.wait_marker("COLO-FS: unmounted", GUEST_TIMEOUT);
    assert!(g.wait_exit(GUEST_TIMEOUT).success());
    let (ok, out) = host("e2fsck", &["-fn", &t.s("secondary.img")]);
    assert!(ok, "e2fsck -fn failed after failover:\n{out}");
    for &i in &synced {
        let out = Command::new("debugfs")
            .args(["-R", &format!("cat /f{i}"), &t.s("secondary.img")])
            .output()
            .expect("debugfs");
        assert!(
            out.stdout == record(i),
            "file f{i} (synced before checkpoint {epoch}) is missing or wrong: {:?} {}",
            String::from_utf8_lossy(&out.stdout[..out.stdout.len().min(100)]),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    eprintln!(
        "TIMING ext4: {} files synced before checkpoint {epoch}; failover {} ms in the backend",
        synced.len(),
        f["backend_ms"]
    );
}
