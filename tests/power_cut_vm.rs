//! One real power cut (issue 20, point 4). The secondary `colo-blk` runs inside a VM of its own
//! (the test guest, with the binary and its shared libraries appended to the initramfs), on an
//! ext4 file system on a virtio disk (`cache=writeback`), reached through a user-mode network
//! `hostfwd`; the primary runs on the host, driven by a vhost-user client. After a checkpoint
//! and more writes mid-stream the VM's QEMU is SIGKILLed: the guest's page cache is lost, as at
//! a power cut. The VM boots again on the same disk (ext4 replays its journal), the secondary
//! restarts on the same files and must come back at the last checkpoint (or say that it needs a
//! full resync); the primary reconnects and resyncs, and after a checkpoint the secondary's
//! image, read out of the guest's file system on the host, equals the primary's byte for byte.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command};
use std::time::{Duration, Instant};

use common::needs::Needs;
use common::pair::{assert_same, write_all, Node};
use common::pair::{assert_same_files, checkpoint, hot_writes, qmp, query, read, s, wait_in_sync};
use common::qemu::{initrd_with_tree, Proc};
use common::{poll, Client, Qmp};
use serde_json::json;

const MIB: u64 = 1 << 20;
/// The replicated disk.
const DISK: u64 = 64 * MIB;
/// A boot of the guest up to the secondary's ready line, and other waits on the guest (TCG).
const GUEST: Duration = Duration::from_secs(120);

/// The guest's script: network, mount the ext4 disk (a journal replay after the cut), start the
/// secondary on it, then obey the console: `sync` (as the kernel's periodic writeback would),
/// `stop`: stop the secondary, print its image's sha256 and unmount. The same script both
/// boots.
const SCRIPT: &str = r#"
ip link set lo up
ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 || {
    echo "POWERCUT: FAIL no eth0 (a guest without virtio_net: rerun build-guest.sh)"; exit 1; }
mkdir -p /mnt
mount -t ext4 /dev/vda /mnt || { echo "POWERCUT: FAIL mount"; exit 1; }
dmesg | grep 'EXT4-fs (vda)'
echo "POWERCUT: mounted"
ls -la /mnt /mnt/layers 2>&1
mkdir -p /mnt/layers
RUST_LOG=info /colo/colo-blk --role secondary --insecure-link --listen 0.0.0.0:7790 \
    --image /mnt/s.img --size 64M --layer-dir /mnt/layers --qmp /tmp/s.qmp \
    --heartbeat-ms 100 --peer-timeout-ms 10000 </dev/null 2>&1 &
pid=$!
while read cmd; do
    echo "POWERCUT: got $cmd"
    case "$cmd" in
        sync) sync; echo "POWERCUT: synced" ;;
        stop) break ;;
    esac
done
kill -TERM $pid
wait $pid
echo "POWERCUT: secondary exit status $?"
echo "POWERCUT: sha256 $(sha256sum /mnt/s.img | cut -d' ' -f1)"
umount /mnt && echo "POWERCUT: unmounted"
"#;

/// True when QEMU, root and the host tools are there; otherwise SKIPPED (a panic in CI).
fn prerequisites(test: &str) -> bool {
    let tools = [
        "qemu-system-x86_64",
        "mkfs.ext4",
        "debugfs",
        "e2fsck",
        "cpio",
        "ldd",
        "sha256sum",
    ];
    Needs::of(test).tools(&tools).root().met()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The test guest's initramfs with a second, uncompressed cpio archive appended (as
/// qemu-scripts/run-vm.sh does): /colo/test.sh, /colo/colo-blk (debug info stripped) and the
/// shared libraries `ldd` names, the dynamic loader included, at their paths.
fn initrd(dir: &Path, guest: &Path) -> PathBuf {
    let root = dir.join("initrd-root");
    std::fs::create_dir_all(root.join("colo")).unwrap();
    let script = root.join("colo/test.sh");
    std::fs::write(&script, SCRIPT).unwrap();
    let bin = env!("CARGO_BIN_EXE_colo-blk");
    let copy = root.join("colo/colo-blk");
    let stripped = Command::new("strip")
        .args(["--strip-debug", "-o"])
        .arg(&copy)
        .arg(bin)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !stripped {
        std::fs::copy(bin, &copy).unwrap();
    }
    for f in [&script, &copy] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    for lib in run(Command::new("ldd").arg(bin))
        .split_whitespace()
        .filter(|t| t.starts_with('/'))
    {
        let dst = root.join(lib.trim_start_matches('/'));
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(lib, &dst).unwrap_or_else(|e| panic!("copy {lib}: {e}"));
    }
    initrd_with_tree(guest, dir, &root)
}

/// Boots the guest on `disk` (virtio, cache=writeback) with the host's 127.0.0.1:`port`
/// forwarded to the guest's port 7790; its serial console is the returned stdin.
fn boot(
    dir: &Path,
    guest: &Path,
    initrd: &Path,
    disk: &Path,
    port: u16,
    n: u32,
) -> (Proc, ChildStdin) {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-machine", "q35", "-accel", "tcg", "-smp", "1", "-m", "512M",
    ])
    .arg("-kernel")
    .arg(guest.join("vmlinuz"))
    .arg("-initrd")
    .arg(initrd)
    .args(["-append", "console=ttyS0 panic=-1 loglevel=4 edd=off"])
    .args(["-nographic", "-no-reboot"])
    .arg("-drive")
    .arg(format!(
        "file={},if=virtio,format=raw,cache=writeback",
        s(disk)
    ))
    .args(["-netdev"])
    .arg(format!("user,id=net0,hostfwd=tcp:127.0.0.1:{port}-:7790"))
    .args(["-device", "virtio-net-pci,netdev=net0"])
    .current_dir(dir);
    Proc::spawn_with_stdin(cmd, &format!("vm{n}"))
}

/// Waits for the guest's secondary to print its ready line (after the disk was mounted).
fn wait_secondary(vm: &mut Proc) {
    let l = vm.wait_line("mount line", GUEST, |l| {
        l.contains("POWERCUT: mounted") || l.contains("POWERCUT: FAIL")
    });
    assert!(!l.contains("FAIL"), "{l}");
    vm.wait_marker("{\"ready\":", GUEST);
}

/// What the power cut left of the secondary's base, on a copy of the disk (e2fsck replays the
/// journal): per 4 KiB block, printed, whether it holds the checkpoint's content, the
/// primary's at the cut, or neither; then a secondary on the host over a copy of those files
/// (another boot, as after the power cut) must know that its layers held unsynced changes
/// (docs/flush-policy.md): it reports `needs-resync` and refuses a failover; forced, the
/// failover takes base as the cut left it.
fn what_the_cut_left(d: &Path, disk: &Path, e1: u64, at_e1: &[u8], at_cut: &[u8]) {
    let copy = d.join("cut.img");
    run(Command::new("cp")
        .arg("--sparse=always")
        .arg(disk)
        .arg(&copy));
    let st = Command::new("e2fsck")
        .arg("-fy")
        .arg(&copy)
        .output()
        .unwrap();
    // 0: clean; 1: errors corrected (a journal replay may count).
    assert!(
        matches!(st.status.code(), Some(0 | 1)),
        "e2fsck after the cut: {}\n{}",
        st.status,
        String::from_utf8_lossy(&st.stdout)
    );
    let base = d.join("cut-s.img");
    run(Command::new("debugfs")
        .arg("-R")
        .arg(format!("dump /s.img {}", s(&base)))
        .arg(&copy));
    let base = read(&base);
    let (mut changed, mut new, mut old, mut other) = (0, 0, 0, 0);
    for ((b, e), c) in base
        .chunks(4096)
        .zip(at_e1.chunks(4096))
        .zip(at_cut.chunks(4096))
    {
        if e == c {
            continue;
        }
        changed += 1;
        if b == c {
            new += 1;
        } else if b == e {
            old += 1;
        } else {
            other += 1;
        }
    }
    assert!(
        new > 0,
        "the guest's writeback reached no block: no mix to recover from"
    );
    eprintln!(
        "after the cut, of the {changed} blocks the primary changed since the checkpoint the \
         secondary's base holds {new} new, {old} as at the checkpoint, {other} neither"
    );
    assert!(
        new > 0,
        "the guest's writeback reached no block: no mix to recover from"
    );

    // The view a failover commits: a secondary on the host over the files the cut left (base,
    // metadata, layers) must roll back to exactly the checkpoint's disk.
    let cut = d.join("cut");
    std::fs::create_dir_all(&cut).unwrap();
    for f in ["s.img", "s.img.colo-meta", "s.img.colo-dirty"] {
        run(Command::new("debugfs")
            .arg("-R")
            .arg(format!("dump /{f} {}", s(&cut.join(f))))
            .arg(&copy));
    }
    run(Command::new("debugfs")
        .arg("-R")
        .arg(format!("rdump /layers {}", s(&cut)))
        .arg(&copy));
    std::fs::remove_file(&copy).unwrap();
    let sec = Node::secondary(&cut, "s.img", DISK, 0)
        .layers("layers")
        .qmp("s.qmp")
        .start();
    let mut sq = qmp(&cut, "s.qmp");
    let st = query(&mut sq);
    assert_eq!(st["consistency"], "needs-resync", "{st}");
    assert_eq!(st["epoch"].as_u64(), Some(e1), "{st}");
    let refused = sq
        .execute("replication-failover", json!({}))
        .expect_err("a failover over layers a power cut dropped");
    assert!(refused.to_string().contains("force"), "{refused}");
    let before = read(&cut.join("s.img"));
    let f = sq
        .execute("replication-failover", json!({"force": true}))
        .unwrap();
    assert_eq!(f["epoch"].as_u64(), Some(e1), "{f}");
    assert!(sec.terminate().success());
    assert_same(
        &read(&cut.join("s.img")),
        &before,
        "a forced failover after the cut against base as the cut left it",
    );
    std::fs::remove_dir_all(&cut).unwrap();
}

/// Waits until the secondary acknowledged everything the primary sent.
fn wait_acked(pq: &mut Qmp) {
    poll::until(
        "the secondary to acknowledge everything sent",
        GUEST,
        || {
            let st = query(pq);
            st["acked-seq"] == st["last-seq"]
        },
    );
}

#[test]
fn secondary_vm_power_cut_mid_stream_recovers_its_checkpoint() {
    let test = "secondary_vm_power_cut_mid_stream_recovers_its_checkpoint";
    if !prerequisites(test) {
        return;
    }
    let t0 = Instant::now();
    let guest = common::guest_dir();
    let dir = common::tempdir();
    let d = dir.path();
    // The guest's disk: ext4, made on the host.
    let disk = d.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(256 * MIB)
        .unwrap();
    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&disk));
    let initrd = initrd(d, &guest);
    let port = common::free_port();

    let (mut vm, mut console) = boot(d, &guest, &initrd, &disk, port, 1);
    wait_secondary(&mut vm);
    let p = Node::primary(d, "p.img", DISK, port)
        .socket("p.sock")
        .qmp("p.qmp")
        .queues(4)
        .peer_timeout_ms(10000)
        .start();
    let mut pq = qmp(d, "p.qmp");
    wait_in_sync(&mut pq);
    let mut c = Client::connect(&d.join("p.sock"), 4).unwrap();
    let sizes = [4096, 65536, 262144];
    write_all(&mut c, &hot_writes(1, 48, &sizes, DISK));
    let e1 = checkpoint(&mut pq);
    eprintln!("checkpoint {e1} at {:?}", t0.elapsed());
    let at_e1 = read(&d.join("p.img"));

    // After the checkpoint: a batch the secondary applied (its originals and base written
    // into the guest's page cache, nothing synced) and the guest wrote back (`sync`, as the
    // kernel's writeback may at any time), then one still in the stream, whose writes are
    // only in the guest's page cache, if they got there: base is left a mix of the checkpoint
    // and newer data.
    write_all(&mut c, &hot_writes(2, 48, &sizes, DISK));
    wait_acked(&mut pq);
    writeln!(console, "sync").unwrap();
    vm.wait_marker("POWERCUT: synced", GUEST);
    write_all(&mut c, &hot_writes(3, 48, &sizes, DISK));
    let st = query(&mut pq);
    vm.kill();
    eprintln!(
        "power cut at {:?}: {} bytes sent since the checkpoint, {} in flight",
        t0.elapsed(),
        st["bytes-sent-since-checkpoint"],
        st["bytes-in-flight"]
    );
    pq.wait_event("REPLICATION_PEER_LOST");
    // Only events after the cut count from here on.
    query(&mut pq);
    pq.events.clear();
    let at_cut = read(&d.join("p.img"));
    what_the_cut_left(d, &disk, e1, &at_e1, &at_cut);
    // The primary goes on alone; these changes too are resent.
    write_all(&mut c, &hot_writes(4, 16, &sizes, DISK));

    // The same disk again: ext4 replays its journal, the secondary reopens its files.
    let (mut vm, mut console) = boot(d, &guest, &initrd, &disk, port, 2);
    wait_secondary(&mut vm);
    // (While the guest boots, QEMU's port forward accepts the primary's connects with nobody
    // behind them: those attempts time out and report no decision.)
    let ev = pq.wait_event("REPLICATION_SYNC_DECISION");
    let decision = ev["data"]["decision"].as_str().unwrap().to_string();
    let reason = ev["data"]["reason"].as_str().unwrap().to_string();
    eprintln!("after the power cut: {decision} ({reason})");
    assert_ne!(decision, "refused", "{reason}");
    if decision != "full-sync" {
        // Not a full resync: the secondary must be at the last checkpoint (the checkpoint of
        // its disk it announced at this connect).
        let at = ev["data"]["secondary-epoch"].as_u64();
        assert_eq!(
            at,
            Some(e1),
            "the restarted secondary is not at the last checkpoint: {ev}"
        );
    }
    wait_in_sync(&mut pq);
    let e2 = checkpoint(&mut pq);
    assert!(e2 > e1, "checkpoint {e2} after {e1}");
    drop(c);

    // Stop the secondary, read its image's checksum, unmount, power off.
    writeln!(console, "stop").unwrap();
    let line = vm.wait_marker("POWERCUT: sha256 ", GUEST);
    let guest_sum = line.rsplit(' ').next().unwrap().trim().to_string();
    vm.wait_marker("POWERCUT: unmounted", GUEST);
    vm.wait_exit(GUEST);
    assert!(
        vm.has_line("POWERCUT: secondary exit status 0"),
        "{}",
        vm.tail()
    );
    drop(p);

    // The file system is clean, and the image in it is the primary's, byte for byte.
    run(Command::new("e2fsck").args(["-fn"]).arg(&disk));
    let out = d.join("s-out.img");
    run(Command::new("debugfs")
        .arg("-R")
        .arg(format!("dump /s.img {}", s(&out)))
        .arg(&disk));
    assert_same_files(
        &out,
        &d.join("p.img"),
        "after the power cut and a checkpoint",
    );
    let host_sum = run(Command::new("sha256sum").arg(d.join("p.img")));
    assert_eq!(guest_sum, host_sum.split(' ').next().unwrap());
    eprintln!(
        "{test}: {decision}, equal after checkpoint {e2}, {:?}",
        t0.elapsed()
    );
}
