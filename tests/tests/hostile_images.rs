//! Hostile disk images (issue #16) through the `strata` binary: a corpus of crafted layers
//! (absolute parent, `../` parent, FIFO parent, parent swapped for another file of the same
//! size, 64 TiB header on a 4 KiB file, overflowing cluster numbers, folding flag set) is
//! refused by `strata disk info` and by `strata run` with an error naming the file, and the
//! peak RSS of each run (from `wait4`'s rusage) stays small; `strata disk merge` never writes
//! outside the chain's folder. The library-level tests are in `disk/tests/hostile.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::OsString;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use disk::crafted::{layer_over_raw, mtime, write_layer};
use disk::format::{self, Header, ParentRef};
use disk::{create_empty, create_layer, Chain, CreateOptions, OpenOptions};
use strata_tests::strata_bin;

/// Peak RSS allowed to any run over a crafted image.
const RSS_LIMIT_KIB: u64 = 48 << 10;

/// What a run of `strata` did.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    /// Peak resident set size in KiB (`ru_maxrss` of the child).
    max_rss_kib: u64,
}

/// Runs `strata ARGS`, killing it after `timeout`; the child's peak RSS comes from `wait4`
/// (which reaps it, so `Child::wait` is not used).
#[allow(clippy::zombie_processes)]
fn strata(args: &[OsString], timeout: Duration) -> Run {
    let mut child = Command::new(strata_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let mut status = 0;
    // SAFETY: rusage is plain old data; zeroes are a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let mut killed = false;
    loop {
        // SAFETY: wait4 on our own child, writing into the locals above.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if r == pid {
            break;
        }
        assert_eq!(r, 0, "wait4: {}", std::io::Error::last_os_error());
        if Instant::now() > deadline && !killed {
            // SAFETY: kill of our own child, which has not been reaped yet.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            killed = true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!killed, "strata {args:?} did not finish within {timeout:?}");
    Run {
        code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
        max_rss_kib: usage.ru_maxrss as u64,
    }
}

fn args(list: &[&dyn AsRef<std::ffi::OsStr>]) -> Vec<OsString> {
    list.iter().map(|a| a.as_ref().to_os_string()).collect()
}

/// The corpus, in `dir/vm/`, with a "secret" file in `dir`: (file, what its error must say).
fn corpus(dir: &Path) -> Vec<(PathBuf, &'static str)> {
    let vm = dir.join("vm");
    std::fs::create_dir(&vm).unwrap();
    let secret = dir.join("secret.raw");
    std::fs::write(&secret, vec![0x5au8; 65_536]).unwrap();
    let mut out = Vec::new();

    let p = vm.join("absolute-parent.strata");
    layer_over_raw(&p, secret.to_str().unwrap(), &secret).unwrap();
    out.push((p, "outside"));

    let p = vm.join("dotdot-parent.strata");
    layer_over_raw(&p, "../secret.raw", &secret).unwrap();
    out.push((p, "outside"));

    let fifo = vm.join("pipe");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo reads the NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let h = Header::new(
        16,
        1 << 20,
        ParentRef::Raw {
            path: "pipe".into(),
            size: 1 << 20,
            mtime: (0, 0),
            fold_ino: 0,
        },
    );
    let p = vm.join("fifo-parent.strata");
    write_layer(&p, &h).unwrap();
    out.push((p, "FIFO"));

    let base = vm.join("base.raw");
    std::fs::write(&base, vec![1u8; 1 << 20]).unwrap();
    let p = vm.join("swapped-parent.strata");
    create_layer(&base, &p).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let other = vm.join("other.raw");
    std::fs::write(&other, vec![2u8; 1 << 20]).unwrap();
    std::fs::rename(&other, &base).unwrap();
    out.push((p, "modified"));

    let h = Header::new(
        format::MIN_CLUSTER_BITS,
        format::MAX_VIRTUAL_SIZE,
        ParentRef::None,
    );
    let p = vm.join("64tib-on-4kib.strata");
    std::fs::write(&p, h.encode()).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(4096)
        .unwrap();
    out.push((p, "truncated"));

    let mut h = Header::new(21, 1 << 30, ParentRef::None);
    h.alloc_end = format::MAX_HOST_CLUSTER + 1;
    let p = vm.join("overflowing-mark.strata");
    write_layer(&p, &h).unwrap();
    out.push((p, "alloc_end"));

    let p = vm.join("overflowing-table.strata");
    create_empty(&p, 1 << 30, CreateOptions::default()).unwrap();
    let mut c = Chain::open(&p, OpenOptions::default()).unwrap();
    c.write_at(0, &[7u8; 65_536]).unwrap();
    drop(c);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .write_all_at(
            &format::l1_encode(0, format::MAX_HOST_CLUSTER).to_le_bytes(),
            format::L1_OFFSET,
        )
        .unwrap();
    out.push((p, "outside the data area"));

    // FOLDING set on a layer whose parent changed, not by a merge of it.
    let lbase = vm.join("lbase.strata");
    create_empty(&lbase, 1 << 20, CreateOptions::default()).unwrap();
    let p = vm.join("folding.strata");
    create_layer(&lbase, &p).unwrap();
    let mut raw = [0u8; format::HEADER_SIZE];
    std::fs::File::open(&p)
        .unwrap()
        .read_exact_at(&mut raw, 0)
        .unwrap();
    let mut h = Header::parse(&raw).unwrap();
    h.flags |= format::FLAG_FOLDING;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .write_all_at(&h.encode(), 0)
        .unwrap();
    let mut c = Chain::open(&lbase, OpenOptions::default()).unwrap();
    c.write_at(0, &[9u8; 512]).unwrap();
    drop(c);
    out.push((p, "modified"));
    out
}

#[test]
fn strata_disk_info_refuses_every_crafted_image_naming_it_with_a_small_peak_rss() {
    let d = tempfile::tempdir().unwrap();
    // Baseline: a healthy 1 GiB disk.
    let ok = d.path().join("ok.strata");
    create_empty(&ok, 1 << 30, CreateOptions::default()).unwrap();
    let base = strata(&args(&[&"disk", &"info", &ok]), Duration::from_secs(30));
    assert_eq!(base.code, Some(0), "{}", base.stderr);
    let mut table = vec![format!(
        "{:<28} {:>8} KiB",
        "ok.strata (baseline)", base.max_rss_kib
    )];
    let mut failures = Vec::new();
    for (file, needle) in corpus(d.path()) {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let r = strata(&args(&[&"disk", &"info", &file]), Duration::from_secs(30));
        table.push(format!("{name:<28} {:>8} KiB", r.max_rss_kib));
        if r.code != Some(1) || !r.stderr.contains(&name) || !r.stderr.contains(needle) {
            failures.push(format!(
                "{name}: exit {:?}, expected an error naming it and saying {needle:?}: {}{}",
                r.code, r.stdout, r.stderr
            ));
        }
        if r.max_rss_kib > RSS_LIMIT_KIB {
            failures.push(format!("{name}: peak RSS {} KiB", r.max_rss_kib));
        }
    }
    eprintln!("peak RSS of strata disk info:\n{}", table.join("\n"));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn huge_sparse_images_open_and_check_in_small_memory() {
    let d = tempfile::tempdir().unwrap();
    // 64 TiB with 8 KiB clusters: a 128 MiB L1 table, all holes.
    let h = Header::new(
        format::MIN_CLUSTER_BITS,
        format::MAX_VIRTUAL_SIZE,
        ParentRef::None,
    );
    let big = d.path().join("64tib-sparse.strata");
    write_layer(&big, &h).unwrap();
    // A 1 GiB layer whose file is 1 TiB long (a sparse tail of 2^24 free clusters).
    let long = d.path().join("long-tail.strata");
    create_empty(&long, 1 << 30, CreateOptions::default()).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&long)
        .unwrap()
        .set_len(1 << 40)
        .unwrap();
    let mut lines = Vec::new();
    for (cmd, file) in [
        ("info", &big),
        ("map", &big),
        ("check", &big),
        ("check", &long),
    ] {
        let r = strata(&args(&[&"disk", &cmd, file]), Duration::from_secs(60));
        assert_eq!(r.code, Some(0), "{cmd} {}: {}", file.display(), r.stderr);
        lines.push(format!(
            "strata disk {cmd} {}: {} KiB",
            file.file_name().unwrap().to_string_lossy(),
            r.max_rss_kib
        ));
        assert!(
            r.max_rss_kib <= RSS_LIMIT_KIB,
            "strata disk {cmd} {}: peak RSS {} KiB",
            file.display(),
            r.max_rss_kib
        );
    }
    eprintln!("{}", lines.join("\n"));
}

#[test]
fn strata_disk_merge_never_writes_outside_the_chains_folder() {
    let d = tempfile::tempdir().unwrap();
    let vm = d.path().join("vm");
    std::fs::create_dir(&vm).unwrap();
    let victim = d.path().join("victim.raw");
    std::fs::write(&victim, vec![0x5au8; 1 << 20]).unwrap();
    let before = std::fs::read(&victim).unwrap();
    let when = mtime(&victim).unwrap();
    // A layer over the victim made with the opt-in (as a user who trusts it would), given data.
    let top = vm.join("top.strata");
    let r = strata(
        &args(&[
            &"disk",
            &"create",
            &top,
            &"--parent",
            &victim,
            &"--allow-parent-outside",
        ]),
        Duration::from_secs(30),
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let mut c = Chain::open_with(
        &top,
        OpenOptions::default(),
        &disk::ParentPolicy::anywhere(),
    )
    .unwrap();
    c.write_at(0, &[0xeeu8; 65_536]).unwrap();
    drop(c);
    // Without the opt-in, neither a merge nor anything else follows it.
    for cmd in [
        args(&[&"disk", &"merge", &top]),
        args(&[&"disk", &"info", &top]),
        args(&[&"disk", &"convert", &top, &vm.join("out.raw")]),
    ] {
        let r = strata(&cmd, Duration::from_secs(30));
        assert_eq!(r.code, Some(1), "{cmd:?}: {}", r.stdout);
        assert!(
            r.stderr.contains("top.strata")
                && r.stderr.contains("outside")
                && r.stderr.contains("--allow-parent-outside"),
            "{cmd:?}: {}",
            r.stderr
        );
    }
    assert_eq!(std::fs::read(&victim).unwrap(), before);
    assert_eq!(mtime(&victim).unwrap(), when);
    // `create --parent` refuses an outside parent unless asked, and records a relative name
    // for one in the folder.
    let r = strata(
        &args(&[
            &"disk",
            &"create",
            &vm.join("x.strata"),
            &"--parent",
            &victim,
        ]),
        Duration::from_secs(30),
    );
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("outside"), "{}", r.stderr);
    assert!(!vm.join("x.strata").exists());
    // The opt-in is what made the merge possible: with it, it writes the victim (so the
    // check above could have seen a write).
    let r = strata(
        &args(&[&"disk", &"merge", &top, &"--allow-parent-outside"]),
        Duration::from_secs(30),
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_ne!(std::fs::read(&victim).unwrap(), before);
}

#[test]
fn strata_run_refuses_a_crafted_disk_naming_it() {
    strata_tests::require_kvm();
    let d = tempfile::tempdir().unwrap();
    let files = corpus(d.path());
    let mut table = Vec::new();
    for (file, needle) in files.iter().filter(|(f, _)| {
        let n = f.file_name().unwrap().to_string_lossy();
        n.starts_with("dotdot") || n.starts_with("fifo") || n.starts_with("64tib")
    }) {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let r = strata(
            &args(&[
                &"run",
                &"--memory",
                &"64M",
                &"--console",
                &"none",
                &"--disk",
                &format!("path={}", file.display()),
            ]),
            Duration::from_secs(60),
        );
        assert_ne!(r.code, Some(0), "{name}");
        assert!(
            r.stderr.contains(&name) && r.stderr.contains(needle),
            "{name}: {}",
            r.stderr
        );
        table.push(format!("strata run over {name}: {} KiB", r.max_rss_kib));
        assert!(
            r.max_rss_kib <= 2 * RSS_LIMIT_KIB,
            "{name}: peak RSS {} KiB",
            r.max_rss_kib
        );
    }
    eprintln!("{}", table.join("\n"));
}

#[test]
fn strata_run_follows_a_parent_outside_the_disks_folder_only_into_an_allowed_path() {
    strata_tests::require_kvm();
    let d = tempfile::tempdir().unwrap();
    let images = d.path().join("images");
    let vm = d.path().join("vm");
    std::fs::create_dir(&images).unwrap();
    std::fs::create_dir(&vm).unwrap();
    let base = images.join("base.raw");
    std::fs::write(&base, vec![3u8; 1 << 20]).unwrap();
    let top = vm.join("top.strata");
    let r = strata(
        &args(&[
            &"disk",
            &"create",
            &top,
            &"--parent",
            &base,
            &"--allow-parent-outside",
        ]),
        Duration::from_secs(30),
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let disk = format!("path={}", top.display());
    let r = strata(
        &args(&[
            &"run",
            &"--memory",
            &"64M",
            &"--console",
            &"none",
            &"--disk",
            &disk,
        ]),
        Duration::from_secs(60),
    );
    assert_ne!(r.code, Some(0));
    assert!(
        r.stderr.contains("top.strata") && r.stderr.contains("outside"),
        "{}",
        r.stderr
    );
    // The user's --allow-path folder is one the chain may lead into.
    let allow = images.display().to_string();
    let mut guest =
        strata_tests::Vm::start(&["--memory", "64M", "--disk", &disk, "--allow-path", &allow]);
    guest.wait_ready();
    assert!(guest.line("blk 0 info").starts_with("2048 rw"));
    guest.send("poweroff\n");
    assert!(guest.wait_exit(Duration::from_secs(30)).success());
}
