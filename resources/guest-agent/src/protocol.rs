//! The agent's wire format: one JSON object per line each way, on vsock port [`AGENT_PORT`].
//!
//! A request is a [`Request`], tagged by `op`. The reply is `{"ok":true, ...}` with the
//! operation's fields ([`InfoReply`], [`FreezeReply`], [`ThawReply`], [`ExecReply`]; none for
//! `ping`), or `{"ok":false,"error":"..."}` ([`Status`]). A request the agent cannot read gets
//! an `ok:false` reply (see [`parse_request`] for the messages) and the connection keeps
//! serving.
//!
//! Requests are strict (unknown fields are refused, so a typo is an error rather than a
//! silently ignored option); replies are lenient (unknown fields are ignored, and fields added
//! after the first version have defaults), so an agent newer than the host can add some.

use serde::{Deserialize, Serialize};

/// The vsock port the guest agent listens on.
pub const AGENT_PORT: u32 = 52;
/// What `info` reports as `agent` for the Linux agent.
pub const AGENT_NAME: &str = "strata-guest-agent";
/// `freeze`'s auto-thaw lease when the request names none, seconds.
pub const DEFAULT_FREEZE_TIMEOUT_S: u64 = 30;
/// `exec`'s timeout when the request names none, seconds.
pub const DEFAULT_EXEC_TIMEOUT_S: u64 = 30;
/// The operations, as on the wire.
pub const OPS: [&str; 5] = ["ping", "info", "freeze", "thaw", "exec"];

fn default_freeze_timeout() -> u64 {
    DEFAULT_FREEZE_TIMEOUT_S
}

fn default_exec_timeout() -> u64 {
    DEFAULT_EXEC_TIMEOUT_S
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// A request: one JSON object on one line, `op` naming the operation. (Operations without
/// fields are empty struct variants so that unknown fields are refused for them too: serde
/// ignores extra fields on unit variants of an internally tagged enum.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Is the agent there? Reply: `{"ok":true}`.
    Ping {},
    /// Agent name and version, kernel, hostname. Reply: [`InfoReply`].
    Info {},
    /// Run the freeze hooks, sync and freeze every writable filesystem; the agent thaws by
    /// itself after `timeout_s` if no `thaw` comes. Reply: [`FreezeReply`].
    Freeze {
        /// Auto-thaw lease, seconds ([`DEFAULT_FREEZE_TIMEOUT_S`] when absent).
        #[serde(default = "default_freeze_timeout")]
        timeout_s: u64,
    },
    /// Thaw the filesystems and run the thaw hooks. Reply: [`ThawReply`].
    Thaw {},
    /// Run a command. Reply: [`ExecReply`].
    Exec {
        /// Program and arguments.
        argv: Vec<String>,
        /// Kill the command after this many seconds ([`DEFAULT_EXEC_TIMEOUT_S`] when absent).
        #[serde(default = "default_exec_timeout")]
        timeout_s: u64,
    },
}

impl Request {
    /// The operation's name, as on the wire.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Ping {} => "ping",
            Request::Info {} => "info",
            Request::Freeze { .. } => "freeze",
            Request::Thaw {} => "thaw",
            Request::Exec { .. } => "exec",
        }
    }
}

/// Reads one request line (without its line end). The error is the message for the
/// `ok:false` reply, worded as the test guest words it: `malformed request: <what>` (not one
/// JSON object), `missing op`, `unknown op`, or `bad <op> request: <what>` (missing or
/// unexpected fields, wrong types).
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    let value: serde_json::Value =
        serde_json::from_slice(line).map_err(|e| format!("malformed request: {e}"))?;
    let Some(map) = value.as_object() else {
        return Err("malformed request: not a JSON object".into());
    };
    let op = match map.get("op") {
        None => return Err("missing op".into()),
        Some(serde_json::Value::String(op)) => op.clone(),
        Some(_) => return Err("malformed request: op is not a string".into()),
    };
    if !OPS.contains(&op.as_str()) {
        return Err("unknown op".into());
    }
    serde_json::from_value(value).map_err(|e| format!("bad {op} request: {e}"))
}

/// The part every reply has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Whether the operation succeeded.
    pub ok: bool,
    /// Why not (when `ok` is false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A reply without fields (`ping`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Empty {}

/// `info`'s fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InfoReply {
    /// Which agent answers: [`AGENT_NAME`], or `strata-test-guest`.
    pub agent: String,
    /// Agent version.
    pub version: String,
    /// Kernel release (`uname -r`).
    pub kernel: String,
    /// Guest hostname.
    pub hostname: String,
}

/// `freeze`'s fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreezeReply {
    /// What was frozen, in freeze order: mount points (the test guest says `log` for its
    /// disk-log workload).
    pub frozen: Vec<String>,
}

/// `thaw`'s fields (all optional: the test guest answers a bare `{"ok":true}`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThawReply {
    /// What was thawed, in thaw order; empty when nothing was frozen.
    #[serde(default)]
    pub thawed: Vec<String>,
    /// The last freeze ended by its lease running out before this `thaw` came (so whatever
    /// the host did meanwhile may not have seen a frozen guest).
    #[serde(default, skip_serializing_if = "is_false")]
    pub lease_expired: bool,
}

/// `exec`'s fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecReply {
    /// The command's exit code: 128 + signal when a signal ended it, 124 when the agent
    /// killed it for running past `timeout_s`.
    pub exit_code: i32,
    /// What it wrote to stdout (lossy UTF-8).
    pub stdout: String,
    /// What it wrote to stderr (lossy UTF-8).
    pub stderr: String,
    /// Output was cut at the agent's limit (a note at the end of the stream says where).
    #[serde(default, skip_serializing_if = "is_false")]
    pub truncated: bool,
    /// The agent killed the command at its timeout.
    #[serde(default, skip_serializing_if = "is_false")]
    pub timed_out: bool,
}

/// `ok:true` plus an operation's fields, for encoding.
#[derive(Serialize)]
struct Success<'a, T: Serialize> {
    ok: bool,
    #[serde(flatten)]
    fields: &'a T,
}

/// The reply line (newline included) for a successful operation with `fields` (a struct
/// with named fields, e.g. [`Empty`] or [`FreezeReply`]).
pub fn ok_line<T: Serialize>(fields: &T) -> String {
    match serde_json::to_string(&Success { ok: true, fields }) {
        Ok(mut line) => {
            line.push('\n');
            line
        }
        Err(e) => error_line(&format!("cannot encode the reply: {e}")),
    }
}

/// The reply line (newline included) for a failed operation.
pub fn error_line(message: &str) -> String {
    let status = Status {
        ok: false,
        error: Some(message.to_string()),
    };
    // A struct of a bool and a string always encodes; the fallback is for form's sake.
    let mut line = serde_json::to_string(&status)
        .unwrap_or_else(|_| r#"{"ok":false,"error":"unspecified error"}"#.to_string());
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_the_documented_wire_format() {
        let exec = Request::Exec {
            argv: vec!["cat".into(), "/proc/version".into()],
            timeout_s: 10,
        };
        assert_eq!(
            serde_json::to_string(&exec).unwrap(),
            r#"{"op":"exec","argv":["cat","/proc/version"],"timeout_s":10}"#
        );
        assert_eq!(
            serde_json::to_string(&Request::Freeze { timeout_s: 30 }).unwrap(),
            r#"{"op":"freeze","timeout_s":30}"#
        );
        assert_eq!(
            serde_json::to_string(&Request::Info {}).unwrap(),
            r#"{"op":"info"}"#
        );
    }

    #[test]
    fn absent_timeouts_take_their_defaults() {
        assert_eq!(
            parse_request(br#"{"op":"freeze"}"#).unwrap(),
            Request::Freeze {
                timeout_s: DEFAULT_FREEZE_TIMEOUT_S
            }
        );
        assert_eq!(
            parse_request(br#"{"op":"exec","argv":["true"]}"#).unwrap(),
            Request::Exec {
                argv: vec!["true".into()],
                timeout_s: DEFAULT_EXEC_TIMEOUT_S
            }
        );
    }

    #[test]
    fn unreadable_requests_get_the_test_guests_messages() {
        for (line, want) in [
            (&b"not json"[..], "malformed request: "),
            (b"[1]", "malformed request: not a JSON object"),
            (b"\xff\xfe", "malformed request: "),
            (br#"{"argv":["x"]}"#, "missing op"),
            (br#"{"op":7}"#, "malformed request: op is not a string"),
            (br#"{"op":"reboot"}"#, "unknown op"),
            (
                br#"{"op":"exec"}"#,
                "bad exec request: missing field `argv`",
            ),
            (
                br#"{"op":"ping","x":1}"#,
                "bad ping request: unknown field `x`",
            ),
            (
                br#"{"op":"freeze","timeout_s":"soon"}"#,
                "bad freeze request: invalid type",
            ),
        ] {
            let err = parse_request(line).unwrap_err();
            assert!(
                err.starts_with(want),
                "{:?}: {err}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn reply_lines_are_one_object_with_ok_first() {
        assert_eq!(ok_line(&Empty {}), "{\"ok\":true}\n");
        assert_eq!(
            ok_line(&FreezeReply {
                frozen: vec!["/".into()]
            }),
            "{\"ok\":true,\"frozen\":[\"/\"]}\n"
        );
        assert_eq!(
            ok_line(&ThawReply::default()),
            "{\"ok\":true,\"thawed\":[]}\n"
        );
        assert_eq!(
            error_line("unknown op"),
            "{\"ok\":false,\"error\":\"unknown op\"}\n"
        );
        let exec = ok_line(&ExecReply {
            exit_code: 124,
            stdout: String::new(),
            stderr: "x\n".into(),
            truncated: false,
            timed_out: true,
        });
        let back: ExecReply = serde_json::from_str(&exec).unwrap();
        assert!(back.timed_out && !back.truncated);
        assert_eq!(back.exit_code, 124);
    }

    /// The replies the test guest's README documents, verbatim.
    const TEST_GUEST_INFO: &str = r#"{"ok":true,"agent":"strata-test-guest","version":"<crate version>","kernel":"strata-test-guest","hostname":"test-guest"}"#;

    #[test]
    fn test_guest_replies_parse_with_the_shared_types() {
        let status: Status = serde_json::from_str(TEST_GUEST_INFO).unwrap();
        assert!(status.ok);
        let info: InfoReply = serde_json::from_str(TEST_GUEST_INFO).unwrap();
        assert_eq!(info.agent, "strata-test-guest");
        assert_eq!(info.hostname, "test-guest");

        let freeze: FreezeReply = serde_json::from_str(r#"{"ok":true,"frozen":["log"]}"#).unwrap();
        assert_eq!(freeze.frozen, vec!["log".to_string()]);
        let thaw: ThawReply = serde_json::from_str(r#"{"ok":true}"#).unwrap();
        assert_eq!(thaw, ThawReply::default());
        let exec: ExecReply = serde_json::from_str(
            r#"{"ok":true,"exit_code":1,"stdout":"a\nb","stderr":"no such disk","truncated":true}"#,
        )
        .unwrap();
        assert!(exec.truncated && !exec.timed_out);
        let err: Status =
            serde_json::from_str(r#"{"ok":false,"error":"request too long"}"#).unwrap();
        assert_eq!(err.error.as_deref(), Some("request too long"));
    }

    /// Every `{"ok":...}` answer in the test guest README's agent table (but exec's, which is
    /// a template) parses as a reply, and the `info` answer as [`InfoReply`]: a change on
    /// either side fails here.
    #[test]
    fn test_guest_readme_answers_parse_with_the_shared_types() {
        let readme = include_str!("../../test-guest/README.md");
        let start = readme
            .find("| `{\"op\":\"ping\"}`")
            .expect("the test guest README's agent table");
        let mut answers = 0;
        for row in readme[start..].lines().take_while(|l| l.starts_with('|')) {
            let cells: Vec<&str> = row.split(" | ").collect();
            let (Some(request), Some(answer)) = (cells.first(), cells.get(1)) else {
                continue;
            };
            if request.contains("\"exec\"") {
                continue;
            }
            // Code spans are the odd pieces between backticks.
            for json in answer.split('`').skip(1).step_by(2) {
                if !json.starts_with("{\"ok\"") {
                    continue;
                }
                let status: Status =
                    serde_json::from_str(json).unwrap_or_else(|e| panic!("{json}: {e}"));
                assert!(status.ok, "{json}");
                if request.contains("\"info\"") {
                    let info: InfoReply = serde_json::from_str(json).unwrap();
                    assert_eq!(info.agent, "strata-test-guest");
                }
                if request.contains("\"freeze\"") {
                    serde_json::from_str::<FreezeReply>(json).unwrap();
                }
                if request.contains("\"thaw\"") {
                    serde_json::from_str::<ThawReply>(json).unwrap();
                }
                answers += 1;
            }
        }
        // ping, info, freeze (twice), thaw.
        assert!(
            answers >= 5,
            "found only {answers} JSON answers in the README table"
        );
    }
}
