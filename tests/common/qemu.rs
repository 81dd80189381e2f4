//! Test support for the QEMU tests: prerequisite checks that skip loudly (or fail in CI), child
//! processes whose output lines the tests wait on ([`Proc`]: QEMU guests, colo-ctl), booting
//! the test guest with `qemu-scripts/run-vm.sh`, colo-ctl and its JSON event lines, and the
//! guest's record writer with the host-side check of an image's records.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::needs::Needs;
use super::{poll, Qmp};

/// True when python `qemu.qmp` (and, with `qemu`, QEMU) is there; otherwise SKIPPED (a failure
/// in CI, see [`Needs::met`]).
pub fn prerequisites(test: &str, qemu: bool) -> bool {
    let qemu: &[&str] = if qemu { &["qemu-system-x86_64"] } else { &[] };
    Needs::of(test).tools(qemu).python("qemu.qmp").met()
}

/// True when every e2fsprogs tool in `tools` is installed; otherwise SKIPPED (a failure in CI).
pub fn e2fsprogs(test: &str, tools: &[&str]) -> bool {
    Needs::of(test).tools(tools).met()
}

// ---- processes -------------------------------------------------------------------------------

/// A child in its own process group whose stdout+stderr lines arrive on a channel. Killed (the
/// whole group) on drop.
pub struct Proc {
    pub name: String,
    pub child: Child,
    rx: mpsc::Receiver<(f64, String)>,
    /// The lines received so far, each with the wall-clock time it arrived (seconds).
    pub lines: Vec<(f64, String)>,
    pub exited: Option<ExitStatus>,
}

impl Proc {
    /// Starts `cmd` as by [`super::spawn_group`], its output prefixed `[name]`.
    pub fn spawn(cmd: Command, name: &str) -> Proc {
        Proc::spawn_stdin(cmd, name, Stdio::null())
    }

    /// [`Proc::spawn`] with stdin a pipe, taken out of the child and returned (a guest's
    /// serial console: what is written there is typed on it).
    pub fn spawn_with_stdin(cmd: Command, name: &str) -> (Proc, ChildStdin) {
        let mut p = Proc::spawn_stdin(cmd, name, Stdio::piped());
        let stdin = p.child.stdin.take().expect("stdin");
        (p, stdin)
    }

    fn spawn_stdin(cmd: Command, name: &str, stdin: Stdio) -> Proc {
        let (child, rx) = super::spawn_group_stdin(cmd, &format!("[{name}]"), stdin);
        Proc {
            name: name.to_string(),
            child,
            rx,
            lines: Vec::new(),
            exited: None,
        }
    }

    /// The last 40 lines.
    pub fn tail(&self) -> String {
        let s = self.lines.len().saturating_sub(40);
        self.lines[s..]
            .iter()
            .map(|l| l.1.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits for the next line (after those already seen) matching `pred`.
    pub fn wait_line(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            match self
                .rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok((t, line)) => {
                    self.lines.push((t, line.clone()));
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

    /// Waits until `count` lines in all (received since the start) satisfy `pred`.
    pub fn wait_count(
        &mut self,
        what: &str,
        count: usize,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) {
        let seen = self.lines.iter().filter(|l| pred(&l.1)).count();
        for _ in seen..count {
            self.wait_line(what, timeout, &pred);
        }
    }

    /// Waits for the next line containing `marker`.
    pub fn wait_marker(&mut self, marker: &str, timeout: Duration) -> String {
        self.wait_line(marker, timeout, |l| l.contains(marker))
    }

    /// Waits until the process closed its output and exited.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            match self
                .rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(l) => self.lines.push(l),
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

    /// Takes in every line already received, so later waits only see newer output.
    pub fn drain(&mut self) {
        while let Ok(l) = self.rx.try_recv() {
            self.lines.push(l);
        }
    }

    /// Whether a line received so far contains `marker`.
    pub fn has_line(&self, marker: &str) -> bool {
        self.lines.iter().any(|l| l.1.contains(marker))
    }

    /// Every line with FAIL or IOERR (after a [`Proc::drain`]).
    pub fn failures(&mut self) -> Vec<String> {
        self.drain();
        self.lines
            .iter()
            .filter(|l| l.1.contains("FAIL") || l.1.contains("IOERR"))
            .map(|l| l.1.clone())
            .collect()
    }

    /// SIGKILL to the whole process group (e.g. run-vm.sh and its QEMU).
    pub fn kill(&mut self) {
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

/// Boots the test guest in `guest` with `qemu-scripts/run-vm.sh` on the QEMU binary `qemu`
/// (`None`: run-vm.sh's default, `$QEMU` or the system's): one vhost-user-blk disk per socket
/// (vda, vdb, ...), one queue, one CPU, `mem` of RAM, running `script` (written to
/// `dir/name.sh`); `qmp` opens QEMU's QMP socket there.
#[allow(clippy::too_many_arguments)]
pub fn run_vm_on(
    qemu: Option<&str>,
    dir: &Path,
    name: &str,
    guest: &Path,
    sockets: &[PathBuf],
    mem: &str,
    script: &str,
    qmp: Option<&Path>,
) -> Proc {
    let script_path = dir.join(format!("{name}.sh"));
    std::fs::write(&script_path, script).unwrap();
    let mut cmd = Command::new("bash");
    cmd.arg(super::repo().join("qemu-scripts/run-vm.sh"))
        .arg("--guest")
        .arg(guest);
    for s in sockets {
        cmd.arg("--socket").arg(s);
    }
    cmd.args(["--num-queues", "1", "--smp", "1", "--mem", mem])
        .arg("--script")
        .arg(&script_path);
    if let Some(q) = qmp {
        cmd.arg("--qmp").arg(q);
    }
    if let Some(q) = qemu {
        cmd.arg("--qemu").arg(q);
    }
    Proc::spawn(cmd, name)
}

/// The test guest's initramfs with `script` as /colo/test.sh appended (as run-vm.sh does).
pub fn initrd_with_script(guest: &Path, dir: &Path, script: &str) -> PathBuf {
    let root = dir.join("root");
    std::fs::create_dir_all(root.join("colo")).unwrap();
    std::fs::write(root.join("colo/test.sh"), script).unwrap();
    initrd_with_tree(guest, dir, &root)
}

/// `dir/initrd`: the test guest's initramfs with a second, uncompressed cpio archive of the
/// tree `root` appended (its files at their paths in the guest, owned by root).
pub fn initrd_with_tree(guest: &Path, dir: &Path, root: &Path) -> PathBuf {
    let mut initrd = std::fs::read(guest.join("initramfs.cpio.gz")).unwrap();
    // The kernel finds an uncompressed archive only at an aligned offset.
    initrd.resize(initrd.len().div_ceil(512) * 512, 0);
    let cpio = Command::new("sh")
        .arg("-c")
        .arg("find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0")
        .current_dir(root)
        .output()
        .unwrap();
    assert!(cpio.status.success(), "cpio: {}", cpio.status);
    initrd.extend_from_slice(&cpio.stdout);
    let path = dir.join("initrd");
    std::fs::write(&path, initrd).unwrap();
    path
}

// ---- colo-ctl --------------------------------------------------------------------------------

/// Starts `qemu-scripts/colo-ctl.py` with `args` and `env`, in `dir`.
pub fn colo_ctl<S: AsRef<OsStr>>(dir: &Path, args: &[S], env: &[(&str, &str)]) -> Proc {
    let mut cmd = Command::new("python3");
    cmd.arg(super::repo().join("qemu-scripts/colo-ctl.py"))
        .args(args)
        .envs(env.iter().copied())
        .current_dir(dir);
    Proc::spawn(cmd, "colo-ctl")
}

/// Parses a colo-ctl JSON line with `"event": name`.
pub fn ctl_event(line: &str, name: &str) -> Option<Value> {
    let v: Value = serde_json::from_str(line).ok()?;
    (v["event"] == name).then_some(v)
}

/// Waits for colo-ctl's next `name` event line and returns it.
pub fn wait_ctl(ctl: &mut Proc, name: &str, timeout: Duration) -> Value {
    let l = ctl.wait_line(name, timeout, |l| ctl_event(l, name).is_some());
    ctl_event(&l, name).unwrap()
}

/// Waits until the primary with the QMP socket `qmp` forwarded at least `bytes` since its last
/// checkpoint, so that a failover has something to roll back.
pub fn wait_mid_epoch(qmp: &Path, bytes: u64, timeout: Duration) {
    let mut q = Qmp::connect(qmp);
    poll::until(
        "the guest to write (bytes sent since the checkpoint)",
        timeout,
        || {
            let st = q.execute("query-replication", json!({})).unwrap();
            st["bytes-sent-since-checkpoint"].as_u64().unwrap() >= bytes
        },
    );
}

// ---- records ---------------------------------------------------------------------------------

/// Record `i` is the 4 KiB block at `i * RECORD`.
pub const RECORD: usize = 4096;

/// The exact bytes of record `i`: 64 text lines of 64 bytes, `R{i:08}-{k:02}-{payload}\n`,
/// the payload `{i * 7919:010}` five times.
pub fn record(i: u64) -> Vec<u8> {
    let payload = format!("{:010}", i * 7919).repeat(5);
    let mut s = String::with_capacity(RECORD);
    for k in 0..64 {
        s.push_str(&format!("R{i:08}-{k:02}-{payload}\n"));
    }
    assert_eq!(s.len(), RECORD);
    s.into_bytes()
}

/// Checks an image: records 0..n exact, zeros after. Returns n. Panics on a torn record.
pub fn records_in(image: &Path) -> u64 {
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
/// (O_DIRECT), for i up to `max_records`, printing `COLO-WRITER: progress i` every
/// `progress_every` records and `IOERR` lines on errors.
pub fn writer_script(disks: &[&str], max_records: u64, progress_every: u64) -> String {
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
while [ $i -lt {max_records} ]; do
  n=$(printf %08d $i); p=$(printf %010d $((i * 7919)))
  sed "s/@@@@@@@@/$n/; s/PPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPP/$p$p$p$p$p/" /tmp/tpl >/tmp/rec
{writes}  i=$((i + 1))
  [ $((i % {progress_every})) = 0 ] && echo "COLO-WRITER: progress $i"
done
echo "COLO-WRITER: done $i"
sleep 100000
"#
    )
}
