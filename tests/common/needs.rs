//! What a test needs of the machine (QEMU, root, tools, python `qemu.qmp`, ...), and the one
//! way a test that cannot run here says so: outside CI it is skipped, loudly, naming what is
//! missing; in CI (`CI` set) it fails, because CI always runs every test (.ci/run installs
//! what they need).

use std::io::Write;
use std::process::{Command, Stdio};

/// The requirements of one test, checked as they are added; [`Needs::met`] decides.
///
/// ```ignore
/// if !Needs::of("my_test").tools(&["qemu-system-x86_64"]).root().met() {
///     return;
/// }
/// ```
pub struct Needs {
    test: String,
    missing: Vec<String>,
}

impl Needs {
    /// The requirements of `test` (its name, for the messages).
    pub fn of(test: &str) -> Needs {
        Needs {
            test: test.to_string(),
            missing: Vec::new(),
        }
    }

    /// `what` is missing unless `ok`.
    pub fn that(mut self, ok: bool, what: impl Into<String>) -> Needs {
        if !ok {
            self.missing.push(what.into());
        }
        self
    }

    /// Every program in `tools` (a path, or a name looked up in PATH) is installed.
    pub fn tools(self, tools: &[&str]) -> Needs {
        tools.iter().fold(self, |n, t| {
            n.that(super::in_path(t), format!("{t} (not installed)"))
        })
    }

    /// The test runs as root.
    pub fn root(self) -> Needs {
        // SAFETY: geteuid(2) has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        self.that(root, "root")
    }

    /// python3 imports every module of `modules` (e.g. `qemu.qmp`).
    pub fn python(self, modules: &str) -> Needs {
        let ok = Command::new("python3")
            .args(["-c", &format!("import {modules}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        self.that(ok, format!("python3 with {modules} (pip install qemu.qmp)"))
    }

    /// True when nothing is missing. Otherwise: a failure in CI, a loud SKIPPED line elsewhere
    /// (and false: the test returns).
    pub fn met(self) -> bool {
        if self.missing.is_empty() {
            return true;
        }
        let missing = self.missing.join(", ");
        if std::env::var_os("CI").is_some() {
            panic!(
                "{}: missing {missing}, but CI always runs this test (see .ci/run)",
                self.test
            );
        }
        // Straight to stderr, not eprintln!: the harness would capture that for a passing test.
        let _ = writeln!(
            std::io::stderr(),
            "\n*** {}: SKIPPED: missing {missing}\n*** CI always runs it; install what .ci/run \
             installs to run it here\n",
            self.test
        );
        false
    }
}
