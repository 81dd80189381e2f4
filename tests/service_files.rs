//! The service integration files in contrib/: the systemd unit template (checked by
//! `systemd-analyze verify`), the example environment file (its options parse with the real
//! command line), and the libvirt domain with a vhost-user disk (validated against libvirt's
//! schema by `virt-xml-validate` and defined on libvirt's test driver by `virsh`). A missing
//! tool skips its check, except under CI (`.ci/run` installs them).
//!
//! And the three together on a real libvirtd (`qemu:///system`, QEMU as user libvirt-qemu,
//! TCG): the shipped domain, with the test guest instead of a boot disk, boots on a colo-blk
//! started with the env example's standalone options in a runtime directory of the unit's mode,
//! and does I/O on every queue the domain asks for. Skipped loudly without root or libvirtd,
//! except under CI (`.ci/run` installs and starts libvirtd).

mod common;

use std::process::Command;
use std::time::Duration;

use clap::Parser;
use colo_blk::cli::Cli;
use common::needs::Needs;
use common::qemu::initrd_with_script;
use common::{poll, repo};

/// Whether `tool` is installed; SKIPPED (a failure in CI) when it is not.
fn have(tool: &str) -> bool {
    Needs::of(&format!("service_files with {tool}"))
        .tools(&[tool])
        .met()
}

#[test]
fn the_systemd_unit_verifies() {
    if !have("systemd-analyze") {
        return;
    }
    let unit = std::fs::read_to_string(repo().join("contrib/systemd/colo-blk@.service")).unwrap();
    assert!(unit.contains("Type=notify"));
    assert!(unit.contains("EnvironmentFile=/etc/colo-blk/%i.env"));
    // verify wants the ExecStart binary to exist: point it at the one just built.
    let unit = unit.replace("/usr/local/bin/colo-blk", env!("CARGO_BIN_EXE_colo-blk"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("colo-blk@disk0.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // verify only warns about most mistakes ("..., ignoring"): any output is a failure.
    assert!(out.status.success() && err.trim().is_empty(), "{err}");
}

#[test]
fn the_example_environment_file_holds_valid_options() {
    let env = std::fs::read_to_string(repo().join("contrib/systemd/colo-blk.env.example")).unwrap();
    let mut seen = 0;
    for line in env.lines() {
        let line = line.trim_start_matches("# ");
        let Some(opts) = line.strip_prefix("COLO_BLK_OPTS=") else {
            continue;
        };
        let argv = std::iter::once("colo-blk").chain(opts.split_whitespace());
        let cli = Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{opts}: {e}"));
        cli.validate().unwrap_or_else(|e| panic!("{opts}: {e}"));
        // Each vhost-user socket can serve the libvirt domain: QEMU's user may connect, and
        // the domain asks for no more queues than the socket has.
        if cli.socket.is_some() {
            assert_eq!(cli.socket_group.as_deref(), Some("libvirt-qemu"), "{opts}");
            assert!(cli.num_queues >= domain_queues(), "{opts}");
        }
        seen += 1;
    }
    assert_eq!(seen, 3, "primary, secondary and standalone examples");
}

/// The `queues` of the libvirt domain's vhost-user disk.
fn domain_queues() -> u16 {
    let xml =
        std::fs::read_to_string(repo().join("contrib/libvirt/domain-vhostuser-disk.xml")).unwrap();
    let at = xml.find("queues='").expect("queues in the domain") + "queues='".len();
    xml[at..].split('\'').next().unwrap().parse().unwrap()
}

/// The unit's RuntimeDirectoryMode (the sockets' directory).
fn runtime_directory_mode() -> u32 {
    let unit = std::fs::read_to_string(repo().join("contrib/systemd/colo-blk@.service")).unwrap();
    let mode = unit
        .lines()
        .find_map(|l| l.strip_prefix("RuntimeDirectoryMode="))
        .expect("RuntimeDirectoryMode");
    u32::from_str_radix(mode, 8).unwrap()
}

/// The env example's standalone options.
fn standalone_options() -> Vec<String> {
    let env = std::fs::read_to_string(repo().join("contrib/systemd/colo-blk.env.example")).unwrap();
    let opts = env
        .lines()
        .filter_map(|l| l.trim_start_matches("# ").strip_prefix("COLO_BLK_OPTS="))
        .find(|o| !o.contains("--role"))
        .expect("a standalone example");
    opts.split_whitespace().map(String::from).collect()
}

/// A domain defined on the system libvirtd, destroyed and undefined on drop.
struct Domain(String);

impl Domain {
    fn virsh(args: &[&str]) -> std::process::Output {
        Command::new("virsh")
            .args(["-c", "qemu:///system"])
            .args(args)
            .output()
            .unwrap()
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = format!("/var/log/libvirt/qemu/{}.log", self.0);
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            eprintln!("{log}:\n{text}");
        }
        let _ = Domain::virsh(&["destroy", &self.0]);
        let _ = Domain::virsh(&["undefine", &self.0]);
    }
}

/// Whether the system libvirtd with its QEMU driver can be used (root, virsh connects).
fn libvirtd() -> bool {
    // SAFETY: geteuid(2) has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let up = root
        && Command::new("virsh")
            .args(["-c", "qemu:///system", "version"])
            .output()
            .is_ok_and(|o| o.status.success());
    Needs::of("the_shipped_libvirt_domain_boots_on_the_shipped_options")
        .root()
        .that(
            up || !root,
            "a libvirtd answering on qemu:///system (libvirt-daemon-system)",
        )
        .met()
}

/// The shipped unit, env example and domain together on a real libvirtd: QEMU (as
/// libvirt-qemu) connects to colo-blk's socket in a directory of the unit's mode, with the
/// queues the domain asks for, and the guest's writes are in the image.
#[test]
fn the_shipped_libvirt_domain_boots_on_the_shipped_options() {
    use std::os::unix::fs::PermissionsExt;
    if !libvirtd() {
        return;
    }
    let guest = common::guest_dir();
    let dir = common::tempdir();
    // Reachable by QEMU's user, as /run and /var/lib are.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let run = dir.path().join("run/colo-blk");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::set_permissions(
        dir.path().join("run"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    // What systemd makes of RuntimeDirectory= for a unit running as root.
    std::fs::set_permissions(
        &run,
        std::fs::Permissions::from_mode(runtime_directory_mode()),
    )
    .unwrap();
    let moved = |o: &str| {
        o.replace("/run/colo-blk", &run.display().to_string())
            .replace("/var/lib/colo-blk", &dir.path().display().to_string())
            .replace("127.0.0.1:9750", "127.0.0.1:0")
    };
    let mut args: Vec<String> = standalone_options().iter().map(|o| moved(o)).collect();
    args.extend(["--size".to_string(), "64M".to_string()]);
    let socket = run.join("vm1-disk0.sock");
    let image = dir.path().join("vm1-disk0.img");
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let backend = common::Backend::start_with(&refs, &socket);

    let queues = domain_queues();
    let script = format!(
        "echo \"LV: queues $(ls /sys/block/vda/mq | wc -l)\"\n\
         for q in $(seq 0 {last}); do\n\
           taskset -c $q sh -c \"dd if=/dev/zero bs=4096 count=1 2>/dev/null | tr '\\\\0' L | \
             dd of=/dev/vda bs=4096 seek=$((10 + q)) oflag=direct 2>/dev/null\"\n\
         done\n\
         n=$(dd if=/dev/vda bs=4096 skip=10 count={queues} iflag=direct 2>/dev/null | tr -d L | wc -c)\n\
         [ \"$n\" = 0 ] && echo \"LV-TEST: PASS\" || echo \"LV-TEST: FAIL $n\"\n",
        last = queues - 1
    );
    let initrd = initrd_with_script(&guest, dir.path(), &script);
    // libvirt gives the kernel to QEMU's user while the domain runs: a copy, not the repo's.
    let kernel = dir.path().join("vmlinuz");
    std::fs::copy(guest.join("vmlinuz"), &kernel).unwrap();
    let console = dir.path().join("console.log");
    let name = format!("colo-blk-test-{}", std::process::id());
    let xml = std::fs::read_to_string(repo().join("contrib/libvirt/domain-vhostuser-disk.xml"))
        .unwrap()
        .replace("<domain type='kvm'>", "<domain type='qemu'>")
        .replace("<name>vm1</name>", &format!("<name>{name}</name>"))
        .replace(
            "<memory unit='GiB'>2</memory>",
            "<memory unit='MiB'>256</memory>",
        )
        .replace(
            "<boot dev='hd'/>",
            &format!(
                "<kernel>{}</kernel><initrd>{}</initrd>\
                 <cmdline>console=ttyS0 panic=-1 edd=off</cmdline>",
                kernel.display(),
                initrd.display()
            ),
        )
        .replace(
            "<serial type='pty'/>",
            &format!(
                "<serial type='file'><source path='{}'/></serial>",
                console.display()
            ),
        )
        .replace("<console type='pty'/>", "")
        .replace("</devices>", "</devices><on_poweroff>destroy</on_poweroff>")
        .replace("/run/colo-blk", &run.display().to_string());
    let xml_path = dir.path().join("domain.xml");
    std::fs::write(&xml_path, xml).unwrap();
    let out = Domain::virsh(&["define", &xml_path.display().to_string()]);
    assert!(out.status.success(), "{out:?}");
    let domain = Domain(name.clone());
    let qemu_log =
        || std::fs::read_to_string(format!("/var/log/libvirt/qemu/{name}.log")).unwrap_or_default();
    // A QEMU that cannot connect keeps the domain "paused (starting up)" and `virsh start`
    // waiting: bounded by timeout(1).
    let out = Command::new("timeout")
        .args(["120", "virsh", "-c", "qemu:///system", "start", &name])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}\n{}", qemu_log());
    // The guest powers off when its script is done (the Domain's drop shows QEMU's log).
    poll::until("the guest to power off", Duration::from_secs(300), || {
        let state = Domain::virsh(&["domstate", &name]);
        String::from_utf8_lossy(&state.stdout).trim() == "shut off"
    });
    drop(domain);
    let text = std::fs::read_to_string(&console).unwrap_or_default();
    assert!(
        text.contains("LV-TEST: PASS") && text.contains(&format!("LV: queues {queues}")),
        "console:\n{text}\n{}",
        qemu_log()
    );
    let img = std::fs::read(&image).unwrap();
    let written = &img[10 * 4096..(10 + usize::from(queues)) * 4096];
    assert!(
        written.iter().all(|&b| b == b'L'),
        "the guest's writes are not in the image"
    );
    assert!(backend.terminate().success());
}

#[test]
fn the_libvirt_domain_validates_and_defines() {
    let xml = repo().join("contrib/libvirt/domain-vhostuser-disk.xml");
    if have("virt-xml-validate") && have("xmllint") {
        let out = Command::new("virt-xml-validate")
            .arg(&xml)
            .arg("domain")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if have("virsh") {
        // libvirt's built-in test driver: no daemon, parses and keeps the definition.
        let script = format!("define {}; dumpxml vm1", xml.display());
        let out = Command::new("virsh")
            .args(["-c", "test:///default", &script])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains("<disk type='vhostuser' device='disk'"),
            "{text}"
        );
        assert!(text.contains("<source type='memfd'/>"), "{text}");
        assert!(text.contains("<access mode='shared'/>"), "{text}");
        assert!(
            text.contains("path='/run/colo-blk/vm1-disk0.sock'"),
            "{text}"
        );
    }
}

/// `qemu-scripts/run-vm.sh` asks QEMU for as many queues as colo-blk has by default: QEMU
/// refuses a device with more queues than its backend.
#[test]
fn run_vm_defaults_to_colo_blks_queue_count() {
    let script = std::fs::read_to_string(repo().join("qemu-scripts/run-vm.sh")).unwrap();
    let queues: u16 = script
        .lines()
        .find_map(|l| l.strip_prefix("num_queues="))
        .expect("run-vm.sh sets num_queues")
        .parse()
        .unwrap();
    let cli = Cli::try_parse_from(["colo-blk", "--socket", "s", "--image", "i"]).unwrap();
    assert_eq!(queues, cli.num_queues);
    assert!(
        script.contains(&format!("(default {queues}, colo-blk's default")),
        "run-vm.sh --help gives its default"
    );
}
