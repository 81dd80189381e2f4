//! The service integration files in contrib/: the systemd unit template (checked by
//! `systemd-analyze verify`), the example environment file (its options parse with the real
//! command line), and the libvirt domain with a vhost-user disk (validated against libvirt's
//! schema by `virt-xml-validate` and defined on libvirt's test driver by `virsh`). A missing
//! tool skips its check, except under CI (`.ci/run` installs them).

use std::path::PathBuf;
use std::process::Command;

use clap::Parser;
use colo_blk::cli::Cli;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Whether `tool` can be run; panics under CI when it cannot.
fn have(tool: &str) -> bool {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "{tool} is missing (.ci/run installs it)"
        );
        eprintln!("skipped: {tool} is not installed");
    }
    ok
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
        seen += 1;
    }
    assert_eq!(seen, 3, "primary, secondary and standalone examples");
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
