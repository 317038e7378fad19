//! Freeze and thaw hooks: the executables in the hooks directory (default
//! `/etc/strata/hooks.d`), run in file-name order with the argument `freeze` before the
//! filesystems freeze and in reverse order with `thaw` after they thaw.
//!
//! A hook is a regular file (or a symlink to one) with an execute bit whose name does not
//! start with `.`; other entries are skipped with a log line. A hook fails when it cannot be
//! started, exits non-zero, dies of a signal, or runs past the hook timeout (then it is
//! killed). A missing hooks directory means no hooks.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::exec::{self, Ended};

/// Output kept from a hook (for the error message and the log).
const HOOK_OUTPUT_CAP: usize = 64 << 10;
/// Characters of a failing hook's stderr quoted in the error.
const QUOTED_STDERR: usize = 300;

/// The hooks in `dir`, in the order `freeze` runs them.
pub fn list(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut hooks = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let hidden = path
            .file_name()
            .is_some_and(|n| n.as_encoded_bytes().starts_with(b"."));
        if hidden {
            continue;
        }
        match std::fs::metadata(&path) {
            Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => hooks.push(path),
            Ok(_) => log!("hook {}: not an executable file, skipped", path.display()),
            Err(e) => log!("hook {}: {e}, skipped", path.display()),
        }
    }
    hooks.sort();
    Ok(hooks)
}

/// Runs `hook` with `arg` (`freeze` or `thaw`); the error says what went wrong.
pub fn run(hook: &Path, arg: &str, timeout: Duration) -> Result<(), String> {
    let name = hook.display();
    let out = exec::run(
        &hook.to_string_lossy(),
        &[arg.to_string()],
        timeout,
        HOOK_OUTPUT_CAP,
    )
    .map_err(|e| format!("{arg} hook {name} cannot run: {e}"))?;
    if out.ended == Ended::Exited(0) {
        return Ok(());
    }
    let ended = match out.ended {
        Ended::TimedOut => format!("timed out after {timeout:?}"),
        other => other.to_string(),
    };
    let stderr = String::from_utf8_lossy(&out.stderr.data);
    let stderr = stderr.trim();
    let quoted: String = stderr.chars().take(QUOTED_STDERR).collect();
    if quoted.is_empty() {
        Err(format!("{arg} hook {name} failed: {ended}"))
    } else {
        Err(format!("{arg} hook {name} failed: {ended}: {quoted}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn script(dir: &Path, name: &str, body: &str, mode: u32) -> PathBuf {
        let path = dir.join(name);
        fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn hooks_are_the_visible_executables_in_name_order() {
        let dir = tempfile::tempdir().unwrap();
        let b = script(dir.path(), "20-b", "true", 0o755);
        let a = script(dir.path(), "10-a", "true", 0o700);
        script(dir.path(), "15-not-executable", "true", 0o644);
        script(dir.path(), ".hidden", "true", 0o755);
        fs::create_dir(dir.path().join("30-dir")).unwrap();
        assert_eq!(list(dir.path()).unwrap(), vec![a, b]);
    }

    #[test]
    fn a_missing_directory_has_no_hooks() {
        let dir = tempfile::tempdir().unwrap();
        assert!(list(&dir.path().join("nope")).unwrap().is_empty());
    }

    #[test]
    fn a_failing_hook_is_named_with_its_status_and_stderr() {
        let dir = tempfile::tempdir().unwrap();
        let hook = script(
            dir.path(),
            "10-db",
            "echo \"db busy ($1)\" >&2; exit 3",
            0o755,
        );
        let err = run(&hook, "freeze", Duration::from_secs(10)).unwrap_err();
        assert!(err.contains("10-db"), "{err}");
        assert!(err.contains("exit status 3"), "{err}");
        assert!(err.contains("db busy (freeze)"), "{err}");
    }

    #[test]
    fn a_hook_past_its_timeout_fails() {
        let dir = tempfile::tempdir().unwrap();
        let hook = script(dir.path(), "10-slow", "sleep 30", 0o755);
        let err = run(&hook, "freeze", Duration::from_millis(200)).unwrap_err();
        assert!(err.contains("timed out"), "{err}");
    }
}
