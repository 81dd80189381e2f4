//! What the tests under QEMU's x-colo share (tests/colo_qemu.rs, tests/colo_continuous.rs): the
//! COLO-capable QEMU and its command line, the migration into COLO, the guest's record writer
//! and the host-side check of its records.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use super::needs::Needs;
use super::{poll, Qmp};

/// The COLO-capable QEMU 11: `COLO_QEMU`, by default where
/// qemu-scripts/install-colo-qemu.sh installs it.
pub fn colo_qemu() -> String {
    std::env::var("COLO_QEMU").unwrap_or_else(|_| "/opt/colo-qemu/bin/qemu-system-x86_64".into())
}

/// True when the COLO QEMU runs and is at least version 9 (x-colo with vhost-user-blk: QEMU
/// 7.2 hangs at the first checkpoint, docs/colo-with-qemu.md); otherwise SKIPPED (a failure
/// in CI).
pub fn prerequisites(test: &str) -> bool {
    let qemu = colo_qemu();
    let major = Command::new(&qemu)
        .arg("--version")
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| {
            // "QEMU emulator version 11.1.3 ..."
            let out = String::from_utf8_lossy(&o.stdout).to_string();
            out.split("version ")
                .nth(1)
                .and_then(|v| v.split('.').next())
                .and_then(|m| m.parse::<u32>().ok())
        });
    Needs::of(test)
        .that(
            major.is_some_and(|m| m >= 9),
            format!(
                "a COLO-capable QEMU (>= 9) at {qemu} (COLO_QEMU; `sudo bash \
                 qemu-scripts/install-colo-qemu.sh`)"
            ),
        )
        .met()
}

/// Waits until `path` exists (a QEMU's QMP socket, bound a moment after it starts).
pub fn wait_path(path: &Path, limit: Duration) {
    let what = format!("{} to appear", path.display());
    poll::until(&what, limit, || path.exists());
}

/// A QMP connection to `path` once it exists.
pub fn qmp(path: &Path, limit: Duration) -> Qmp {
    wait_path(path, limit);
    Qmp::connect(path)
}

/// The QEMU named `name` booting the test guest (`guest`'s kernel, `initrd`) with one
/// vhost-user-blk disk on `socket` (reconnecting), its serial console on stdout, a QMP server
/// on each of `qmp`, and `-incoming defer` when `incoming`.
pub fn qemu_command(
    name: &str,
    guest: &Path,
    initrd: &Path,
    socket: &Path,
    qmp: &[PathBuf],
    incoming: bool,
) -> Command {
    let accel = std::env::var("COLO_BLK_ACCEL").unwrap_or_else(|_| "tcg".into());
    let mut cmd = Command::new(colo_qemu());
    cmd.args(["-name", name, "-machine", "q35", "-accel", &accel])
        .args(["-smp", "1", "-m", "192M"])
        .args(["-object", "memory-backend-memfd,id=mem,size=192M,share=on"])
        .args(["-machine", "memory-backend=mem"])
        .arg("-kernel")
        .arg(guest.join("vmlinuz"))
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 loglevel=4 edd=off"])
        .args(["-nographic", "-no-reboot", "-nodefaults"])
        .args(["-serial", "stdio"])
        .arg("-chardev")
        .arg(format!(
            "socket,id=vub,path={},reconnect-ms=1000",
            socket.display()
        ))
        .args([
            "-device",
            "vhost-user-blk-pci,chardev=vub,num-queues=1,id=disk0",
        ]);
    for q in qmp {
        cmd.arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", q.display()));
    }
    if incoming {
        cmd.args(["-incoming", "defer"]);
    }
    cmd
}

/// The migration capabilities of x-colo.
pub fn caps() -> Value {
    json!({"capabilities": [
        {"capability": "return-path", "state": true},
        {"capability": "x-colo", "state": true}]})
}

/// Makes the QEMU of `svm` (started with `-incoming defer`) wait for the x-colo migration on
/// 127.0.0.1:`port`.
pub fn incoming(svm: &mut Qmp, port: u16) {
    svm.execute("migrate-set-capabilities", caps())
        .expect("migrate-set-capabilities");
    let uri = format!("tcp:127.0.0.1:{port}");
    svm.execute("migrate-incoming", json!({ "uri": uri }))
        .expect("migrate-incoming");
}

/// Migrates the QEMU of `pvm` into COLO with the one waiting on 127.0.0.1:`port`, checkpoints
/// every `delay_ms`; returns once it is in COLO.
pub fn migrate_into_colo(pvm: &mut Qmp, port: u16, delay_ms: u64, limit: Duration) {
    pvm.execute("migrate-set-capabilities", caps())
        .expect("migrate-set-capabilities");
    pvm.execute(
        "migrate-set-parameters",
        json!({"x-checkpoint-delay": delay_ms}),
    )
    .expect("x-checkpoint-delay");
    let uri = format!("tcp:127.0.0.1:{port}");
    pvm.execute("migrate", json!({ "uri": uri }))
        .expect("migrate");
    poll::until("the migration into COLO", limit, || {
        let m = pvm.execute("query-migrate", json!({})).unwrap();
        assert!(m["status"] != "failed", "migration into COLO: {m}");
        m["status"] == "colo"
    });
}

/// The guest's record writer, up to `max` records. Record `i` is the 4 KiB block `i`: "REC
/// i\n" and zeros. Before writing block i it checks the block is still all zeros (a record
/// from an epoch the guest's memory does not know about would be there otherwise); after every
/// 5th write it re-reads blocks 0..i and checks each holds exactly its record (none missing,
/// none torn). `i` lives in the shell's memory, so after a failover it is the survivor's: the
/// disk must agree with it.
pub fn writer(max: u64) -> String {
    format!(
        r#"i=0
echo "COLO-A: start"
while [ $i -lt {max} ]; do
  n=$(dd if=/dev/vda bs=4096 skip=$i count=1 iflag=direct 2>/dev/null | tr -d '\000' | wc -c)
  if [ "$n" -ne 0 ]; then
    echo "COLO-A: FAIL block $i not empty before its write: $(dd if=/dev/vda bs=4096 skip=$i count=1 iflag=direct 2>/dev/null | tr -d '\000' | head -c 40)"
  fi
  if ! echo "REC $i" | dd of=/dev/vda bs=4096 seek=$i count=1 conv=sync oflag=direct 2>/tmp/err; then
    echo "COLO-A: IOERR $i $(cat /tmp/err)"
  fi
  echo "COLO-A: wrote $i"
  i=$((i + 1))
  if [ $((i % 5)) = 0 ]; then
    r=$(dd if=/dev/vda bs=4096 count=$i iflag=direct 2>/dev/null | tr -d '\000' | awk -v n=$i '
      $0 != "REC " (NR - 1) {{ bad++; if (first == "") first = (NR - 1) ": " $0 }}
      END {{ if (NR != n || bad) printf "FAIL %d records read for %d, %d bad, first bad [%s]", NR, n, bad, first; else printf "ok" }}')
    echo "COLO-A: verified $i $r"
  fi
done
echo "COLO-A: done"
"#
    )
}

/// The `verified N ok` count of a [`writer`] console line.
pub fn verified(line: &str) -> Option<u64> {
    let rest = line.split("COLO-A: verified ").nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

/// Host side: the image holds [`writer`]'s records 0..n exactly and zeros after; returns n.
pub fn records_in(image: &Path) -> u64 {
    let data = std::fs::read(image).expect("read image");
    let mut n = 0usize;
    while (n + 1) * 4096 <= data.len() {
        let blk = &data[n * 4096..(n + 1) * 4096];
        if blk.iter().all(|&b| b == 0) {
            break;
        }
        let want = format!("REC {n}\n");
        assert!(
            blk.starts_with(want.as_bytes()) && blk[want.len()..].iter().all(|&b| b == 0),
            "{}: block {n} is not record {n}: {:?}",
            image.display(),
            String::from_utf8_lossy(&blk[..32])
        );
        n += 1;
    }
    if let Some(pos) = data[n * 4096..].iter().position(|&b| b != 0) {
        panic!(
            "{}: data after the last record {n} at byte {}",
            image.display(),
            n * 4096 + pos
        );
    }
    n as u64
}
