//! The agent protocol, both ends: the guest agent's request parser
//! (`strata_guest_agent::protocol::parse_request`) and the host client's reply framing
//! ([`vmm::agent::LineBuffer`]) and decoding ([`vmm::agent::decode_reply`]).
//!
//! Checked: nothing panics; an accepted request re-encodes to a line that parses to the same
//! request; the line buffer returns exactly the newline-separated lines of the stream however it
//! is cut into reads, and refuses a line over its limit.

use arbitrary::{Arbitrary, Unstructured};
use strata_guest_agent::protocol::{self, ExecReply, FreezeReply, Request};
use vmm::agent::{decode_reply, reply_fields, LineBuffer, LineError};

/// Longest line the target's line buffer takes (small, so the limit is reached).
const MAX_LINE: usize = 512;

#[derive(Arbitrary, Debug)]
enum Input {
    /// A request line as the guest agent reads it.
    Request(Vec<u8>),
    /// A request made from fields, encoded and parsed back.
    Built(Built),
    /// A reply stream as the host client reads it, in reads of the given sizes.
    Replies { stream: Vec<u8>, cuts: Vec<u8> },
}

#[derive(Arbitrary, Debug)]
enum Built {
    Ping,
    Info,
    Freeze(u64),
    Thaw,
    Exec(Vec<String>, u64),
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    match input {
        Input::Request(line) => request(&line),
        Input::Built(b) => {
            let req = match b {
                Built::Ping => Request::Ping {},
                Built::Info => Request::Info {},
                Built::Freeze(timeout_s) => Request::Freeze { timeout_s },
                Built::Thaw => Request::Thaw {},
                Built::Exec(argv, timeout_s) => Request::Exec { argv, timeout_s },
            };
            let line = serde_json::to_vec(&req).unwrap_or_default();
            match protocol::parse_request(&line) {
                Ok(back) => assert_eq!(back, req, "a request does not round-trip"),
                Err(e) => panic!("an encoded request is refused: {e}: {req:?}"),
            }
        }
        Input::Replies { stream, cuts } => replies(&stream, &cuts),
    }
}

fn request(line: &[u8]) {
    if let Ok(req) = protocol::parse_request(line) {
        let again = serde_json::to_vec(&req).unwrap_or_default();
        match protocol::parse_request(&again) {
            Ok(back) => assert_eq!(back, req, "a parsed request does not round-trip"),
            Err(e) => panic!("a re-encoded request is refused: {e}: {req:?}"),
        }
    }
}

fn replies(stream: &[u8], cuts: &[u8]) {
    // What the lines must be: split at every newline, the last piece unterminated.
    let mut want: Vec<&[u8]> = stream.split(|&b| b == b'\n').collect();
    want.pop();
    let mut lines = LineBuffer::new();
    let mut got = Vec::new();
    let mut rest = stream;
    let mut cuts = cuts.iter().cycle();
    let mut failed = None;
    'feed: while !rest.is_empty() {
        let n = usize::from(*cuts.next().unwrap_or(&255)).clamp(1, rest.len());
        lines.push(&rest[..n]);
        rest = &rest[n..];
        loop {
            match lines.next_line(MAX_LINE) {
                Ok(Some(line)) => got.push(line),
                Ok(None) => break,
                Err(e) => {
                    failed = Some(e);
                    break 'feed;
                }
            }
        }
        assert!(
            lines.len() <= MAX_LINE + 256,
            "the line buffer holds {} bytes without a line",
            lines.len()
        );
    }
    for (i, line) in got.iter().enumerate() {
        assert_eq!(line.as_bytes(), want[i], "line {i} differs from the stream");
        for op in ["exec", "freeze"] {
            if let Ok(v) = decode_reply(op, line) {
                assert!(v.get("ok").and_then(|o| o.as_bool()) == Some(true));
                let _ = reply_fields::<ExecReply>(&v, op);
                let _ = reply_fields::<FreezeReply>(&v, op);
            }
        }
    }
    match failed {
        None => assert_eq!(got.len(), want.len(), "lines lost"),
        Some(LineError::TooLong { .. }) => {
            let next = want.get(got.len());
            assert!(
                next.is_none_or(|l| l.len() > MAX_LINE),
                "a line of {:?} bytes was refused as too long",
                next.map(|l| l.len())
            );
        }
        Some(LineError::NotUtf8) => {
            let next = want.get(got.len());
            assert!(
                next.is_some_and(|l| std::str::from_utf8(l).is_err()),
                "a UTF-8 line was refused"
            );
        }
    }
}
