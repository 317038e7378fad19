//! `strata run --help` is the parser's own description of its flags (clap renders it from the
//! definitions in vmm/src/cli.rs), so checking it checks the parser:
//! - it lists every flag that DESIGN.md and README.md document for `strata run`;
//! - every flag it lists is accepted with a valid value by a real `strata run` of the test
//!   guest, and the value takes effect (the guest or the API shows it). A flag added to the
//!   parser without a case here fails the test, so the help, the parser and this test cannot
//!   drift apart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use strata_tests::{strata_bin, Vm};
use vmm::agent::AgentClient;

const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

/// The flags of `strata run` that DESIGN.md's CLI section documents.
const DESIGN_FLAGS: &[&str] = &[
    "--kernel",
    "--initrd",
    "--cmdline",
    "--vcpus",
    "--memory",
    "--disk",
    "--vsock",
    "--api-socket",
    "--state-dir",
    "--checkpoint-type",
    "--console",
    "--config",
    "--guest",
    "--linux-kernel",
    "--no-reboot",
];

/// clap's own flags, not VM settings.
const CLAP_FLAGS: &[&str] = &["--help", "--version"];

fn run_help() -> String {
    let out = Command::new(strata_bin())
        .args(["run", "--help"])
        .output()
        .expect("run strata run --help");
    assert!(out.status.success(), "strata run --help: {}", out.status);
    String::from_utf8(out.stdout).unwrap()
}

/// The long flags of clap's long help with their descriptions: an option line (indented less
/// than its description) such as `      --kernel <PATH>` or `  -h, --help`, then the description
/// on the next lines.
fn help_entries(help: &str) -> Vec<(String, String)> {
    let options = help
        .split_once("\nOptions:\n")
        .unwrap_or_else(|| panic!("no Options: section in\n{help}"))
        .1;
    let lines: Vec<&str> = options.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut entries = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let text = line.trim_start();
        if !text.starts_with('-') || indent(line) > 6 {
            continue;
        }
        // "-h, --help": the long form.
        let long = text.rsplit(", ").next().unwrap();
        let flag: String = long
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        assert!(flag.starts_with("--"), "odd option line {line:?}");
        let description = lines[i + 1..]
            .iter()
            .take_while(|l| !l.trim().is_empty())
            .map(|l| l.trim())
            .collect::<Vec<_>>()
            .join(" ");
        entries.push((flag, description));
    }
    entries
}

fn help_flags(help: &str) -> Vec<String> {
    help_entries(help).into_iter().map(|(f, _)| f).collect()
}

/// The flags in README.md's `strata run` synopsis (from the line starting with `strata run`
/// up to the next command).
fn readme_run_flags() -> Vec<String> {
    let readme = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let text = std::fs::read_to_string(&readme).unwrap();
    let start = text
        .find("\nstrata run ")
        .unwrap_or_else(|| panic!("no strata run synopsis in {}", readme.display()));
    let synopsis: String = text[start + 1..]
        .lines()
        .take_while(|l| !l.starts_with("strata ") || l.starts_with("strata run"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut flags: Vec<String> = synopsis
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(str::to_string)
        .collect();
    flags.sort();
    flags.dedup();
    assert!(flags.len() >= 10, "README synopsis parsed badly: {flags:?}");
    flags
}

#[test]
fn run_help_lists_every_documented_flag() {
    let help = run_help();
    let listed = help_flags(&help);
    let mut documented: Vec<String> = DESIGN_FLAGS.iter().map(|f| f.to_string()).collect();
    documented.extend(readme_run_flags());
    for flag in &documented {
        assert!(
            listed.contains(flag),
            "{flag} is documented for strata run but `strata run --help` does not list it:\n{help}"
        );
    }
    // Each listed flag says what it does.
    for (flag, description) in help_entries(&help) {
        assert!(description.len() > 10, "{flag} has no description:\n{help}");
    }
}

/// `strata run ARGS` with the test guest, up to its ready line; checks the CPU count.
fn boot(args: &[&str], cpus: u32) -> Vm {
    let mut vm = Vm::start(args);
    assert_eq!(vm.wait_ready(), cpus, "{args:?}");
    vm
}

/// Powers the guest off from its console; strata must exit 0.
fn poweroff(mut vm: Vm, args: &[&str]) {
    vm.send("poweroff\n");
    expect_clean_exit(vm, args);
}

/// Waits for strata to end after a guest power-off; it must exit 0.
fn expect_clean_exit(mut vm: Vm, args: &[&str]) {
    let status = vm.wait_exit(EXIT_TIMEOUT);
    assert_eq!(
        status.code(),
        Some(0),
        "{args:?}: strata exited with {status}; stderr: {}",
        vm.stderr()
    );
}

/// The guest agent, once it answers (the guest may still be booting).
fn agent(uds: &Path) -> AgentClient {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match AgentClient::connect(uds, Duration::from_secs(10)).and_then(|mut a| {
            a.ping()?;
            Ok(a)
        }) {
            Ok(a) => return a,
            Err(e) => {
                assert!(Instant::now() < deadline, "agent at {}: {e}", uds.display());
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Powers the guest off through its agent (for runs without a console); strata must exit 0.
fn poweroff_through_agent(vm: Vm, uds: &Path, args: &[&str]) {
    // The guest powers off while running the command: no reply comes.
    let _ = agent(uds).exec(&["poweroff".to_string()], 5);
    expect_clean_exit(vm, args);
}

/// `strata ctl --api-socket SOCK --json vm status`.
fn vm_status(sock: &Path) -> serde_json::Value {
    let out = Command::new(strata_bin())
        .arg("ctl")
        .arg("--api-socket")
        .arg(sock)
        .args(["--json", "vm", "status"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "strata ctl vm status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Runs `strata run FLAG VALUE` (plus what observing it needs) and checks that the value took
/// effect. Panics naming the flag when it does not know the flag.
fn exercise(flag: &str, dir: &Path) {
    let path = |name: &str| dir.join(name).display().to_string();
    match flag {
        "--kernel" => {
            // The embedded guest's own ELF, given as a file.
            let args = ["--kernel", resources::TEST_GUEST_PATH, "--memory", "64M"];
            poweroff(boot(&args, 1), &args);
        }
        "--initrd" => {
            let initrd = path("initrd.img");
            std::fs::write(&initrd, vec![0x5au8; 64 << 10]).unwrap();
            let args = ["--initrd", &initrd, "--memory", "64M"];
            poweroff(boot(&args, 1), &args);
        }
        "--cmdline" => {
            let cmdline = "console=ttyS0 strata.flag=cmdline";
            let args = ["--cmdline", cmdline, "--memory", "64M"];
            let mut vm = boot(&args, 1);
            assert_eq!(vm.line("cmdline"), cmdline);
            poweroff(vm, &args);
        }
        "--vcpus" => {
            let args = ["--vcpus", "3", "--memory", "64M"];
            let mut vm = boot(&args, 3);
            assert_eq!(vm.line("cpus"), "3");
            poweroff(vm, &args);
        }
        "--memory" => {
            let args = ["--memory", "96M"];
            let mut vm = boot(&args, 1);
            assert_eq!(vm.line("mem"), "96");
            poweroff(vm, &args);
        }
        "--disk" => {
            let disk = path("disk.raw");
            std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
            let spec = format!("path={disk},readonly=on");
            let args = ["--disk", &spec, "--memory", "64M"];
            let mut vm = boot(&args, 1);
            let info = vm.line("blk 0 info");
            assert!(info.contains("2048") && info.contains("ro"), "{info}");
            poweroff(vm, &args);
        }
        "--vsock" => {
            let uds = path("v.sock");
            let spec = format!("cid=3,socket={uds}");
            let args = ["--vsock", &spec, "--memory", "64M"];
            let vm = boot(&args, 1);
            let info = agent(Path::new(&uds)).info().unwrap();
            assert_eq!(info["agent"], "strata-test-guest", "{info}");
            poweroff(vm, &args);
        }
        "--api-socket" => {
            let sock = path("api.sock");
            let args = ["--api-socket", &sock, "--vcpus", "2", "--memory", "64M"];
            let _vm = boot(&args, 2);
            let status = vm_status(Path::new(&sock));
            assert_eq!(status["state"], "running", "{status}");
            assert_eq!(status["config"]["vcpus"], 2, "{status}");
            // With an API socket a guest power-off leaves strata running; dropping the Vm
            // kills it.
        }
        "--state-dir" => {
            let state = dir.join("state");
            std::fs::create_dir(&state).unwrap();
            let sock = path("api-state.sock");
            let state_arg = state.display().to_string();
            let args = ["--state-dir", &state_arg, "--api-socket", &sock];
            let _vm = boot(&args, 1);
            let status = vm_status(Path::new(&sock));
            assert_eq!(
                status["checkpoint_config"]["location"],
                state_arg.as_str(),
                "{status}"
            );
        }
        "--checkpoint-type" => {
            let sock = path("api-type.sock");
            let args = ["--checkpoint-type", "standard", "--api-socket", &sock];
            let _vm = boot(&args, 1);
            let status = vm_status(Path::new(&sock));
            assert_eq!(status["checkpoint_config"]["type"], "standard", "{status}");
        }
        "--console" => {
            // none: nothing on stdout; the guest is reached and powered off through its agent.
            let uds = path("console-none.sock");
            let spec = format!("cid=3,socket={uds}");
            let args = ["--console", "none", "--vsock", &spec, "--memory", "64M"];
            let vm = Vm::start(&args);
            poweroff_through_agent(vm, Path::new(&uds), &args);
            // file=PATH: the console output goes to the file.
            let log = path("console.log");
            let uds = path("console-file.sock");
            let spec = format!("cid=3,socket={uds}");
            let target = format!("file={log}");
            let args = ["--console", &target, "--vsock", &spec, "--memory", "64M"];
            let vm = Vm::start(&args);
            poweroff_through_agent(vm, Path::new(&uds), &args);
            let text = std::fs::read_to_string(&log).unwrap();
            assert!(
                text.contains("strata test guest ready cpus=1"),
                "console file: {text}"
            );
        }
        "--config" => {
            let file = path("vm.json");
            std::fs::write(
                &file,
                r#"{"vcpus": 2, "memory": "80M", "cmdline": "console=ttyS0 from=config"}"#,
            )
            .unwrap();
            let args = ["--config", &file];
            let mut vm = boot(&args, 2);
            assert_eq!(vm.line("mem"), "80");
            assert_eq!(vm.line("cmdline"), "console=ttyS0 from=config");
            poweroff(vm, &args);
        }
        "--guest" => {
            let args = ["--guest", "test", "--memory", "64M"];
            poweroff(boot(&args, 1), &args);
        }
        "--linux-kernel" => {
            // Accepted with the test guest too, where it has nothing to choose.
            let args = ["--linux-kernel", "auto", "--memory", "64M"];
            poweroff(boot(&args, 1), &args);
        }
        "--no-reboot" => {
            let args = ["--no-reboot", "--memory", "64M"];
            let mut vm = boot(&args, 1);
            vm.send("reboot\n");
            let status = vm.wait_exit(EXIT_TIMEOUT);
            assert_eq!(status.code(), Some(0), "--no-reboot: {}", vm.stderr());
        }
        "--seccomp" => {
            // The main thread is filtered with true and log, not with false.
            for (mode, seccomp) in [("true", "2"), ("log", "2"), ("false", "0")] {
                let args = ["--seccomp", mode, "--memory", "64M"];
                let vm = boot(&args, 1);
                let status = std::fs::read_to_string(format!("/proc/{}/status", vm.pid())).unwrap();
                let field = status.lines().find_map(|l| l.strip_prefix("Seccomp:"));
                assert_eq!(field.map(str::trim), Some(seccomp), "--seccomp {mode}");
                poweroff(vm, &args);
            }
        }
        "--allow-path" => {
            let allowed = dir.join("allowed");
            std::fs::create_dir(&allowed).unwrap();
            let allowed_arg = allowed.display().to_string();
            let args = ["--allow-path", &allowed_arg, "--memory", "64M"];
            poweroff(boot(&args, 1), &args);
        }
        other => panic!(
            "`strata run --help` lists {other}, but tests/tests/cli.rs has no valid value for \
             it: add a case to `exercise`"
        ),
    }
}

#[test]
fn every_flag_in_run_help_is_accepted_with_a_valid_value() {
    let help = run_help();
    let flags: Vec<String> = help_flags(&help)
        .into_iter()
        .filter(|f| !CLAP_FLAGS.contains(&f.as_str()))
        .collect();
    assert!(flags.len() >= DESIGN_FLAGS.len(), "{flags:?}\n{help}");
    for flag in &flags {
        let dir = tempfile::tempdir().unwrap();
        eprintln!("strata run {flag} ...");
        exercise(flag, dir.path());
    }
}

#[test]
fn bad_values_are_refused_with_status_2() {
    let dir = tempfile::tempdir().unwrap();
    let bad_json = dir.path().join("bad.json");
    std::fs::write(&bad_json, "{ not json").unwrap();
    let bad_json = bad_json.to_str().unwrap();
    let missing = dir.path().join("missing.json");
    let missing = missing.to_str().unwrap();
    for (args, needle) in [
        (&["--config", bad_json][..], bad_json),
        (&["--config", missing][..], missing),
        (&["--guest", "windows"][..], "windows"),
        (&["--linux-kernel", "newest"][..], "newest"),
        (&["--checkpoint-type", "often"][..], "often"),
        (&["--vcpus", "0"][..], "--vcpus"),
        (&["--bogus"][..], "--bogus"),
    ] {
        let out = Command::new(strata_bin())
            .arg("run")
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

#[test]
fn disk_output_into_a_closed_pipe_ends_quietly_by_sigpipe() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("d.strata");
    let created = Command::new(strata_bin())
        .args(["disk", "create"])
        .arg(&image)
        .args(["--size", "1G"])
        .output()
        .unwrap();
    assert!(created.status.success(), "{created:?}");
    for args in [
        ["disk", "info", image.to_str().unwrap()],
        ["disk", "map", image.to_str().unwrap()],
    ] {
        // The reader is gone before strata writes anything.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = Command::new(strata_bin())
            .args(args)
            .stdout(writer)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGPIPE),
            "{args:?} should end by SIGPIPE: {:?} {stderr}",
            out.status
        );
    }
}
