//! One connection: read request lines, answer each with one reply line.
//!
//! Lines end with `\n` (an optional `\r` before it is dropped); blank lines are ignored; a line
//! longer than [`MAX_REQUEST`] is answered `request too long` and skipped. Anything unreadable
//! gets `ok:false` and the connection keeps serving; it ends when the peer closes it or a
//! write fails.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::sync::Arc;
use std::time::Duration;

use strata_guest_agent::protocol::{
    self, Empty, ExecReply, FreezeReply, InfoReply, Request, AGENT_NAME,
};

use crate::exec::{self, Ended};
use crate::freeze::Freezer;

/// Longest request line.
pub const MAX_REQUEST: usize = 1 << 20;
/// Output kept of each of an `exec`'s streams.
pub const EXEC_OUTPUT_CAP: usize = 1 << 20;
/// Longest `exec` timeout accepted, seconds.
pub const MAX_EXEC_TIMEOUT_S: u64 = 24 * 3600;

/// What every connection shares.
pub struct Agent {
    /// The freeze state.
    pub freezer: Arc<Freezer>,
}

/// One read from the peer.
enum Line {
    Request(Vec<u8>),
    TooLong,
    End,
}

/// Serves `conn` until the peer closes it.
pub fn serve(conn: impl Read + Write, agent: &Agent) -> io::Result<()> {
    let mut reader = BufReader::new(conn);
    loop {
        let reply = match read_line(&mut reader)? {
            Line::End => return Ok(()),
            Line::TooLong => protocol::error_line("request too long"),
            Line::Request(line) => {
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                handle(&line, agent)
            }
        };
        let conn = reader.get_mut();
        conn.write_all(reply.as_bytes())?;
        conn.flush()?;
    }
}

/// Reads one line without its line end; a partial line at the end of the stream is dropped.
fn read_line(r: &mut impl BufRead) -> io::Result<Line> {
    let mut line = Vec::new();
    let mut too_long = false;
    loop {
        let buf = match r.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            return Ok(Line::End);
        }
        let (chunk, end) = match buf.iter().position(|&b| b == b'\n') {
            Some(nl) => (&buf[..nl], Some(nl + 1)),
            None => (buf, None),
        };
        if !too_long && line.len() + chunk.len() <= MAX_REQUEST {
            line.extend_from_slice(chunk);
        } else {
            too_long = true;
            line = Vec::new();
        }
        let used = end.unwrap_or(buf.len());
        r.consume(used);
        if end.is_some() {
            if too_long {
                return Ok(Line::TooLong);
            }
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Ok(Line::Request(line));
        }
    }
}

/// The reply line for one request line.
pub fn handle(line: &[u8], agent: &Agent) -> String {
    let request = match protocol::parse_request(line) {
        Ok(r) => r,
        Err(e) => return protocol::error_line(&e),
    };
    match request {
        Request::Ping {} => protocol::ok_line(&Empty {}),
        Request::Info {} => protocol::ok_line(&info()),
        Request::Freeze { timeout_s } => match agent.freezer.freeze(timeout_s) {
            Ok(frozen) => protocol::ok_line(&FreezeReply { frozen }),
            Err(e) => protocol::error_line(&e),
        },
        Request::Thaw {} => match agent.freezer.thaw() {
            Ok(reply) => protocol::ok_line(&reply),
            Err(e) => protocol::error_line(&e),
        },
        Request::Exec { argv, timeout_s } => match run(&argv, timeout_s) {
            Ok(reply) => protocol::ok_line(&reply),
            Err(e) => protocol::error_line(&e),
        },
    }
}

fn info() -> InfoReply {
    let (kernel, hostname) = uname();
    InfoReply {
        agent: AGENT_NAME.into(),
        version: env!("CARGO_PKG_VERSION").into(),
        kernel,
        hostname,
    }
}

/// The kernel release and the node name, from uname(2).
fn uname() -> (String, String) {
    // SAFETY: utsname is plain old data (arrays of c_char); all zeroes is a valid value.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `uts` is a valid, writable utsname for the duration of the call.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return ("unknown".into(), "unknown".into());
    }
    let field = |chars: &[libc::c_char]| {
        let bytes: Vec<u8> = chars
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    (field(&uts.release), field(&uts.nodename))
}

/// Runs an `exec` request.
fn run(argv: &[String], timeout_s: u64) -> Result<ExecReply, String> {
    let Some((program, args)) = argv.split_first() else {
        return Err("exec: empty argv".into());
    };
    if !(1..=MAX_EXEC_TIMEOUT_S).contains(&timeout_s) {
        return Err(format!("exec: timeout_s must be 1..={MAX_EXEC_TIMEOUT_S}"));
    }
    let out = exec::run(
        program,
        args,
        Duration::from_secs(timeout_s),
        EXEC_OUTPUT_CAP,
    )
    .map_err(|e| format!("exec: cannot run {program:?}: {e}"))?;
    let mut stdout = String::from_utf8_lossy(&out.stdout.data).into_owned();
    let mut stderr = String::from_utf8_lossy(&out.stderr.data).into_owned();
    let note = |s: &mut String, what: String| {
        if !s.is_empty() && !s.ends_with('\n') {
            s.push('\n');
        }
        s.push_str(&format!("[strata-guest-agent: {what}]\n"));
    };
    if out.stdout.truncated {
        note(
            &mut stdout,
            format!("stdout truncated at {EXEC_OUTPUT_CAP} bytes"),
        );
    }
    if out.stderr.truncated {
        note(
            &mut stderr,
            format!("stderr truncated at {EXEC_OUTPUT_CAP} bytes"),
        );
    }
    let timed_out = out.ended == Ended::TimedOut;
    if timed_out {
        note(
            &mut stderr,
            format!("killed after the {timeout_s} s timeout (exit code 124)"),
        );
    }
    if out.pipes_left_open {
        note(
            &mut stderr,
            "output may be incomplete: something it started kept its output open".into(),
        );
    }
    Ok(ExecReply {
        exit_code: out.ended.exit_code(),
        stdout,
        stderr,
        truncated: out.stdout.truncated || out.stderr.truncated,
        timed_out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::freeze::Config;
    use std::io::Cursor;

    fn agent() -> Agent {
        Agent {
            freezer: Freezer::new(Config {
                hooks_dir: "/nonexistent/hooks.d".into(),
                mounts_file: "/nonexistent/mounts".into(),
                only: Vec::new(),
                hook_timeout: Duration::from_secs(1),
            }),
        }
    }

    /// Feeds `input` to a connection; returns what it answered.
    fn converse(input: &[u8]) -> Vec<String> {
        struct Duplex {
            input: Cursor<Vec<u8>>,
            output: Vec<u8>,
        }
        impl Read for Duplex {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                self.input.read(buf)
            }
        }
        impl Write for Duplex {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                self.output.write(buf)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut d = Duplex {
            input: Cursor::new(input.to_vec()),
            output: Vec::new(),
        };
        serve(&mut d, &agent()).unwrap();
        String::from_utf8(d.output)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn every_line_gets_one_reply_and_bad_ones_do_not_end_the_connection() {
        let replies = converse(
            b"{\"op\":\"ping\"}\r\n\n  \nnot json\n{\"op\":\"reboot\"}\n{\"op\":\"exec\"}\n{\"op\":\"ping\"}\n",
        );
        assert_eq!(replies.len(), 5, "{replies:?}");
        assert_eq!(replies[0], r#"{"ok":true}"#);
        assert!(replies[1].starts_with(r#"{"ok":false,"error":"malformed request"#));
        assert_eq!(replies[2], r#"{"ok":false,"error":"unknown op"}"#);
        assert!(replies[3].contains("missing field `argv`"));
        assert_eq!(replies[4], r#"{"ok":true}"#);
    }

    #[test]
    fn an_overlong_line_is_refused_and_skipped() {
        let mut input = vec![b'x'; MAX_REQUEST + 10];
        input.extend_from_slice(b"\n{\"op\":\"ping\"}\n");
        let replies = converse(&input);
        assert_eq!(
            replies,
            [
                r#"{"ok":false,"error":"request too long"}"#,
                r#"{"ok":true}"#
            ]
        );
    }

    #[test]
    fn a_partial_last_line_is_dropped() {
        assert_eq!(
            converse(b"{\"op\":\"ping\"}\n{\"op\":\"pi"),
            [r#"{"ok":true}"#]
        );
    }

    #[test]
    fn info_names_the_agent_and_the_kernel() {
        let reply = handle(br#"{"op":"info"}"#, &agent());
        let info: InfoReply = serde_json::from_str(&reply).unwrap();
        assert_eq!(info.agent, AGENT_NAME);
        assert_eq!(info.version, env!("CARGO_PKG_VERSION"));
        assert!(!info.kernel.is_empty() && info.kernel != "unknown");
    }

    #[test]
    fn exec_refuses_an_empty_argv_and_a_missing_program() {
        let a = agent();
        let reply = handle(br#"{"op":"exec","argv":[]}"#, &a);
        assert!(reply.contains("empty argv"), "{reply}");
        let reply = handle(br#"{"op":"exec","argv":["/nonexistent/x"]}"#, &a);
        assert!(
            reply.contains(r#""ok":false"#) && reply.contains("cannot run"),
            "{reply}"
        );
        let reply = handle(br#"{"op":"exec","argv":["true"],"timeout_s":0}"#, &a);
        assert!(reply.contains("timeout_s"), "{reply}");
    }

    #[test]
    fn a_timed_out_exec_says_so_in_stderr() {
        let reply = handle(
            br#"{"op":"exec","argv":["sleep","10"],"timeout_s":1}"#,
            &agent(),
        );
        let r: ExecReply = serde_json::from_str(&reply).unwrap();
        assert_eq!(r.exit_code, 124);
        assert!(r.timed_out);
        assert!(
            r.stderr.contains("killed after the 1 s timeout"),
            "{}",
            r.stderr
        );
    }
}
