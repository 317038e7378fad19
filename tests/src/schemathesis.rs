//! Runs schemathesis (PyPI) against `api/openapi.yaml` and a live API socket.
//!
//! Schemathesis speaks TCP only, so a small TCP→Unix proxy sits in front of the socket. It is
//! installed once into a venv under the target folder; when that fails (no network to PyPI)
//! the caller's test fails with the reason, it does not skip.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The version whose CLI flags are used here.
pub const SCHEMATHESIS: &str = "schemathesis==4.32.5";

/// The OpenAPI document of the server.
pub fn spec() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../api/openapi.yaml")
}

/// The `st` binary, installing it into a venv the first time.
pub fn install() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/schemathesis-venv
    let target = exe
        .ancestors()
        .nth(3)
        .expect("target directory")
        .to_path_buf();
    let venv = target.join("schemathesis-venv");
    let st = venv.join("bin/st");
    let stamp = venv.join(".installed");
    if st.exists() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(SCHEMATHESIS) {
        return st;
    }
    let run = |cmd: &mut Command, what: &str, hint: &str| {
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot run {what}: {e}; {hint}"));
        assert!(
            out.status.success(),
            "{what} failed; {hint}\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // A half-made venv from an earlier failure would fail the same way again.
    let _ = std::fs::remove_dir_all(&venv);
    run(
        Command::new("python3").arg("-m").arg("venv").arg(&venv),
        "python3 -m venv",
        "the API tests need Python's venv module: install Debian's python3-venv \
         (apt-get install python3-venv)",
    );
    run(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(SCHEMATHESIS),
        &format!("pip install {SCHEMATHESIS}"),
        "the API tests install schemathesis from PyPI: is https://pypi.org reachable?",
    );
    std::fs::write(&stamp, SCHEMATHESIS).expect("write the venv stamp");
    st
}

fn pump<R: Read, W: Write>(mut from: R, mut to: W, done: impl FnOnce(W)) {
    let _ = std::io::copy(&mut from, &mut to);
    done(to);
}

/// Serves a TCP port on 127.0.0.1 that forwards every connection to `sock`; returns the port.
pub fn proxy(sock: &Path) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
    let port = listener.local_addr().expect("proxy address").port();
    let sock = sock.to_path_buf();
    std::thread::spawn(move || {
        for tcp in listener.incoming() {
            let Ok(tcp) = tcp else { continue };
            let Ok(unix) = UnixStream::connect(&sock) else {
                continue;
            };
            let (Ok(tcp2), Ok(unix2)) = (tcp.try_clone(), unix.try_clone()) else {
                continue;
            };
            std::thread::spawn(move || {
                pump(tcp, unix2, |u| {
                    let _ = u.shutdown(Shutdown::Write);
                })
            });
            std::thread::spawn(move || {
                pump(unix, tcp2, |t| {
                    let _ = t.shutdown(Shutdown::Write);
                })
            });
        }
    });
    // The proxy works before schemathesis is blamed for anything.
    let mut probe = TcpStream::connect(("127.0.0.1", port)).expect("connect to the proxy");
    probe
        .write_all(b"GET /v1/vm HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("probe the proxy");
    let mut out = String::new();
    let _ = probe.read_to_string(&mut out);
    assert!(
        out.starts_with("HTTP/1.1 200"),
        "the API does not answer: {out}"
    );
    port
}

/// How long a schemathesis run may take before it counts as hung and is killed.
pub const HANG_GUARD: Duration = Duration::from_secs(900);

/// Runs `st run` with every check against the API socket `sock`; returns its output. Kills it
/// and fails if it runs longer than [`HANG_GUARD`] (a hung server or proxy, not a slow one).
pub fn run(sock: &Path, max_examples: u32, workdir: &Path) -> Output {
    let st = install();
    let port = proxy(sock);
    let mut child = Command::new(&st)
        .current_dir(workdir) // its .hypothesis folder goes there
        .env("NO_COLOR", "1")
        .arg("run")
        .arg(spec())
        .arg("--url")
        .arg(format!("http://127.0.0.1:{port}"))
        .args(["--checks", "all", "--max-examples"])
        .arg(max_examples.to_string())
        .args(["--seed", "7", "--workers", "1", "--request-timeout", "30"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run schemathesis");
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + HANG_GUARD;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for schemathesis") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("schemathesis hung: still running after {HANG_GUARD:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = Output {
        status,
        stdout: stdout.join().expect("schemathesis stdout"),
        stderr: stderr.join().expect("schemathesis stderr"),
    };
    eprintln!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}
