//! Bad command lines get one clear line on stderr and a non-zero status, never a panic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};

fn strata(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run strata");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `strata run ARGS`, expects failure with one stderr line containing `needle`.
fn refused(args: &[&str], needle: &str) {
    let mut full = vec!["run"];
    full.extend_from_slice(args);
    let (code, stderr) = strata(&full);
    assert!(
        matches!(code, Some(c) if c != 0),
        "{args:?}: status {code:?}"
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "{args:?}: expected one line, got {stderr:?}"
    );
    assert!(
        lines[0].contains(needle),
        "{args:?}: {:?} lacks {needle:?}",
        lines[0]
    );
    assert!(!stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"));
}

#[test]
fn missing_kernel_is_named() {
    refused(
        &["--kernel", "/nonexistent/vmlinux"],
        "/nonexistent/vmlinux",
    );
}

#[test]
fn file_that_is_not_a_kernel_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.txt");
    std::fs::write(&path, "just some text, not a kernel\n".repeat(100)).unwrap();
    refused(
        &["--kernel", path.to_str().unwrap()],
        "not a bootable kernel",
    );
    let empty = dir.path().join("empty");
    std::fs::write(&empty, b"").unwrap();
    refused(
        &["--kernel", empty.to_str().unwrap()],
        "not a bootable kernel",
    );
}

#[test]
fn memory_out_of_range_is_refused() {
    refused(&["--memory", "0"], "--memory");
    refused(&["--memory", "64T"], "more than the host");
    refused(&["--memory", "lots"], "invalid memory size");
    refused(&["--memory", "4M"], "too small");
}

#[test]
fn vcpus_out_of_range_are_refused() {
    refused(&["--vcpus", "0"], "--vcpus 0");
    refused(&["--vcpus", "300"], "--vcpus 300");
    refused(&["--vcpus", "-1"], "--vcpus");
}

#[test]
fn unknown_flags_are_refused() {
    refused(&["--frobnicate"], "--frobnicate");
    let (code, stderr) = strata(&["fly"]);
    assert_eq!(code, Some(2), "{stderr}");
}

#[test]
fn help_documents_every_run_flag() {
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["run", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--kernel",
        "--cmdline",
        "--vcpus",
        "--memory",
        "--no-reboot",
        "--console",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
}
