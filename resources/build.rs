//! Builds the freestanding test guest (`test-guest/`) into
//! `$OUT_DIR/test-guest.elf` by invoking `rustc` directly.
//!
//! The guest is a `no_std` x86_64 ELF linked at 1 MiB with its own linker
//! script. No rustup target can be added on our machines, so it is built for
//! the host target (x86_64-unknown-linux-gnu) with the C runtime, PIE and
//! SSE switched off. SSE must stay off: the KVM we test on emulates guest
//! kernel code and refuses SSE/AVX instructions (see shared PVM.md). rustc
//! warns that disabling SSE2 changes the target's float ABI and will become
//! an error one day; the guest uses no floats, and the warning is accepted
//! here (it is printed only if the build fails).
//!
//! `RUSTFLAGS`/`CARGO_ENCODED_RUSTFLAGS` are deliberately not passed on:
//! they are meant for the host crates and may carry flags (target CPUs,
//! instrumentation) that would break the guest.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{exit, Command};

fn main() {
    let manifest_dir = PathBuf::from(env_or_die("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env_or_die("OUT_DIR"));
    let guest_dir = manifest_dir.join("test-guest");
    let main_rs = guest_dir.join("src").join("main.rs");
    let link_ld = guest_dir.join("link.ld");
    let output = out_dir.join("test-guest.elf");

    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={}", link_ld.display());
    rerun_if_dir_changed(&guest_dir.join("src"));
    println!("cargo:rerun-if-env-changed=RUSTC");

    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let mut cmd = Command::new(&rustc);
    cmd.env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_MAKEFLAGS")
        // `info` of the guest's agent reports it (option_env! in agent.rs).
        .env("STRATA_VERSION", env_or_die("CARGO_PKG_VERSION"))
        .args([
            "--edition",
            "2021",
            "--crate-type",
            "bin",
            "--crate-name",
            "test_guest",
        ])
        .args(["-C", "opt-level=2"])
        .args(["-C", "panic=abort"])
        // Interrupts in ring 0 push their frame at RSP without a stack switch, over the 128
        // bytes below RSP that the host target's ABI lets leaf code use (the red zone).
        .args(["-C", "no-redzone=yes"])
        .args(["-C", "relocation-model=static"])
        .args(["-C", "code-model=small"])
        .args(["-C", "target-feature=-sse,-sse2"])
        .args(["-C", "debuginfo=0"])
        .args(["-C", "strip=debuginfo"])
        .args(["-C", "link-arg=-nostartfiles"])
        .args(["-C", "link-arg=-nostdlib"])
        .args(["-C", "link-arg=-static"])
        .args(["-C", "link-arg=-no-pie"])
        .arg("-C")
        .arg(format!("link-arg=-Wl,-T,{}", link_ld.display()))
        .args(["-C", "link-arg=-Wl,--gc-sections"])
        .args(["-C", "link-arg=-Wl,--build-id=none"])
        .arg("-o")
        .arg(&output)
        .arg(&main_rs);

    let result = match cmd.output() {
        Ok(result) => result,
        Err(err) => die(&format!(
            "cannot run {}: {err}",
            Path::new(&rustc).display()
        )),
    };
    if !result.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&result.stdout));
        eprintln!("{}", String::from_utf8_lossy(&result.stderr));
        die(&format!(
            "building the test guest ({}) failed: {}",
            main_rs.display(),
            result.status
        ));
    }
}

/// Asks cargo to rerun when any file under `dir` changes.
fn rerun_if_dir_changed(dir: &Path) {
    println!("cargo:rerun-if-changed={}", dir.display());
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) => die(&format!("cannot read {}: {err}", dir.display())),
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            rerun_if_dir_changed(&path);
        } else {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
}

fn env_or_die(name: &str) -> String {
    env::var(name).unwrap_or_else(|_| die(&format!("{name} is not set")))
}

fn die(message: &str) -> ! {
    eprintln!("error: {message}");
    exit(1)
}
