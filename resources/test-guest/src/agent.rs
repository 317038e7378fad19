//! The guest-agent protocol over vsock port 52: one JSON object per line
//! each way (see the README). A tiny JSON reader for flat objects: string
//! values (with every JSON escape), integers, `true`/`false`/`null`, arrays
//! and nested values are skipped when the key is unknown. Never panics:
//! anything it cannot read is answered `{"ok":false,"error":"..."}`.

use crate::commands;
use crate::console::Sink;
use crate::disklog;
use crate::sync::Global;

/// Largest response (the connection keeps this much room free before it
/// reads the next request).
pub const RESPONSE_MAX: usize = 8192;
/// What `info` reports as the agent's version.
const VERSION: &str = match option_env!("STRATA_VERSION") {
    Some(v) => v,
    None => "0.1.0",
};
/// Longest console command `exec` runs (the console's line limit).
const COMMAND_MAX: usize = 256;
/// Captured output of one `exec`.
const CAPTURE_MAX: usize = 3072;
/// Default auto-thaw timeout of `freeze`.
const DEFAULT_FREEZE_S: u64 = 30;
/// Nesting of skipped values.
const MAX_DEPTH: u32 = 16;

/// A byte sink over a fixed slice that remembers overflow.
pub struct SliceWriter<'a> {
    buf: &'a mut [u8],
    len: usize,
    overflow: bool,
}

impl<'a> SliceWriter<'a> {
    /// An empty writer over `buf`.
    pub fn new(buf: &'a mut [u8]) -> Self {
        Self {
            buf,
            len: 0,
            overflow: false,
        }
    }

    /// What was written.
    pub fn written(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or_default()
    }

    fn push(&mut self, b: u8) {
        match self.buf.get_mut(self.len) {
            Some(slot) => {
                *slot = b;
                self.len += 1;
            }
            None => self.overflow = true,
        }
    }
}

impl Sink for SliceWriter<'_> {
    fn bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.push(b);
        }
    }
}

/// Writes `s` as a JSON string (quotes included). With `console_lines`,
/// `\r` is dropped and a final line end removed, so console output lines
/// come out joined by `\n`.
fn json_str(out: &mut dyn Sink, s: &[u8], console_lines: bool) {
    let mut s = s;
    if console_lines {
        while let Some(rest) = s.strip_suffix(b"\n").or_else(|| s.strip_suffix(b"\r")) {
            s = rest;
        }
    }
    out.bytes(b"\"");
    for &b in s {
        match b {
            b'"' => out.bytes(b"\\\""),
            b'\\' => out.bytes(b"\\\\"),
            b'\n' => out.bytes(b"\\n"),
            b'\r' if console_lines => {}
            b'\r' => out.bytes(b"\\r"),
            b'\t' => out.bytes(b"\\t"),
            0..=0x1f | 0x7f => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                let hi = HEX.get(usize::from(b >> 4)).copied().unwrap_or(b'0');
                let lo = HEX.get(usize::from(b & 0xf)).copied().unwrap_or(b'0');
                out.bytes(&[b'\\', b'u', b'0', b'0', hi, lo]);
            }
            _ => out.bytes(&[b]),
        }
    }
    out.bytes(b"\"");
}

/// Writes `{"ok":false,"error":"<msg>"}\n` into `out`; returns its length.
pub fn error_response(out: &mut [u8], msg: &str) -> usize {
    let mut w = SliceWriter::new(out);
    write_error(&mut w, msg);
    if w.overflow {
        return 0;
    }
    w.len
}

fn write_error(w: &mut dyn Sink, msg: &str) {
    w.str("{\"ok\":false,\"error\":");
    json_str(w, msg.as_bytes(), false);
    w.str("}\n");
}

/// What a request asked for.
struct Request {
    op: [u8; 16],
    op_len: usize,
    has_op: bool,
    op_too_long: bool,
    command: [u8; COMMAND_MAX],
    command_len: usize,
    has_argv: bool,
    argc: usize,
    timeout_s: Option<u64>,
}

/// A request before anything is parsed into it.
const EMPTY_REQUEST: Request = Request {
    op: [0; 16],
    op_len: 0,
    has_op: false,
    op_too_long: false,
    command: [0; COMMAND_MAX],
    command_len: 0,
    has_argv: false,
    argc: 0,
    timeout_s: None,
};

static REQUEST: Global<Request> = Global::new(EMPTY_REQUEST);
static CAPTURE: Global<[u8; CAPTURE_MAX]> = Global::new([0; CAPTURE_MAX]);

/// Answers one request line into `out`; returns the response's length
/// (with its `\n`). `out` should hold [`RESPONSE_MAX`] bytes.
pub fn handle_line(line: &[u8], out: &mut [u8]) -> usize {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.iter().all(|b| b.is_ascii_whitespace()) {
        return 0;
    }
    // SAFETY: BSP only, not re-entered (exec runs console commands, which
    // do not talk to the agent).
    let req = unsafe { &mut *REQUEST.get() };
    *req = EMPTY_REQUEST;
    let mut w = SliceWriter::new(out);
    match Parser::new(line).request(req) {
        Err(e) => {
            w.str("{\"ok\":false,\"error\":\"malformed request: ");
            w.str(e);
            w.str("\"}\n");
        }
        Ok(()) => respond(req, &mut w),
    }
    if w.overflow {
        // Too large for the buffer: say so instead of a cut-off line.
        return error_response(out, "response too large");
    }
    w.len
}

fn respond(req: &Request, w: &mut SliceWriter) {
    if !req.has_op {
        return write_error(w, "missing op");
    }
    if req.op_too_long {
        return write_error(w, "unknown op");
    }
    match req.op.get(..req.op_len).unwrap_or_default() {
        b"ping" | b"thaw" => {
            if req.op.starts_with(b"thaw") {
                disklog::thaw();
            }
            w.str("{\"ok\":true}\n");
        }
        b"info" => {
            w.str("{\"ok\":true,\"agent\":\"strata-test-guest\",\"version\":");
            json_str(w, VERSION.as_bytes(), false);
            w.str(",\"kernel\":\"strata-test-guest\",\"hostname\":\"test-guest\"}\n");
        }
        b"freeze" => {
            let secs = req.timeout_s.unwrap_or(DEFAULT_FREEZE_S);
            let frozen = disklog::freeze(secs.saturating_mul(1000));
            write_freeze(w, &frozen);
        }
        b"exec" => {
            if !req.has_argv || req.argc == 0 {
                return write_error(w, "exec needs a non-empty argv");
            }
            if req.command_len > COMMAND_MAX {
                return write_error(w, "command too long");
            }
            exec(req.command.get(..req.command_len).unwrap_or_default(), w);
        }
        _ => write_error(w, "unknown op"),
    }
}

/// `{"ok":true,"frozen":["log"],"log_records":N,"logs":[{"disk":D,"records":R},...]}`:
/// `frozen` is `[]` and `logs` empty when no log was running; `log_records`
/// is the sum of the `records` (each log's records on disk, flushed).
fn write_freeze(w: &mut dyn Sink, frozen: &disklog::Frozen) {
    w.str("{\"ok\":true,\"frozen\":");
    w.str(if frozen.any() { "[\"log\"]" } else { "[]" });
    w.str(",\"log_records\":");
    w.dec(frozen.total());
    w.str(",\"logs\":[");
    for (k, &(disk, records)) in frozen.logs().iter().enumerate() {
        if k > 0 {
            w.str(",");
        }
        w.str("{\"disk\":");
        w.dec(disk);
        w.str(",\"records\":");
        w.dec(records);
        w.str("}");
    }
    w.str("]}\n");
}

/// The command-line parameter that switches the agent off.
const AGENT_PARAM: &[u8] = b"strata.agent=";

/// Whether the kernel command line leaves the agent on (listening on vsock
/// port 52). `strata.agent=off` (also `0`, `no`, `false`) switches it off,
/// `strata.agent=on` (`1`, `yes`, `true`) on; the last one counts. Words
/// are split at blanks outside double quotes and the quotes are dropped
/// (`strata.agent="off"` is `strata.agent=off`); what follows a lone `--`
/// is for init, not the kernel, and is ignored, as Linux does.
pub fn enabled_by(cmdline: &[u8]) -> bool {
    let mut on = true;
    let mut word = [0u8; 32];
    let mut len = 0usize;
    let mut long = false;
    let mut quoted = false;
    // One blank more at the end finishes the last word.
    for b in cmdline.iter().copied().chain(core::iter::once(b' ')) {
        if b == b'"' {
            quoted = !quoted;
            continue;
        }
        if quoted || !b.is_ascii_whitespace() {
            match word.get_mut(len) {
                Some(slot) => {
                    *slot = b;
                    len += 1;
                }
                None => long = true,
            }
            continue;
        }
        let w = word.get(..len).unwrap_or_default();
        if !long && w == b"--" {
            break;
        }
        if !long {
            match w.strip_prefix(AGENT_PARAM) {
                Some(b"off" | b"0" | b"no" | b"false") => on = false,
                Some(b"on" | b"1" | b"yes" | b"true") => on = true,
                _ => {}
            }
        }
        len = 0;
        long = false;
    }
    on
}

fn exec(command: &[u8], w: &mut SliceWriter) {
    // SAFETY: as in `handle_line`.
    let capture = unsafe { &mut *CAPTURE.get() };
    let mut cap = SliceWriter::new(capture);
    let result = commands::execute(command, &mut cap);
    w.str("{\"ok\":true,\"exit_code\":");
    w.str(if result.is_ok() { "0" } else { "1" });
    w.str(",\"stdout\":");
    json_str(w, cap.written(), true);
    w.str(",\"stderr\":");
    match &result {
        Ok(()) => w.str("\"\""),
        Err(fail) => {
            let mut reason = [0u8; 128];
            let mut r = SliceWriter::new(&mut reason);
            fail.write(&mut r);
            json_str(w, r.written(), false);
        }
    }
    if cap.overflow {
        w.str(",\"truncated\":true");
    }
    w.str("}\n");
}

/// A cursor over one request line.
struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
}

type PResult<T> = Result<T, &'static str>;

impl<'a> Parser<'a> {
    fn new(s: &'a [u8]) -> Self {
        Self { s, pos: 0 }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let b = self.peek()?;
        self.pos += 1;
        Some(b)
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\r' | b'\n')) {
            self.pos += 1;
        }
    }

    fn expect(&mut self, b: u8, what: &'static str) -> PResult<()> {
        self.ws();
        if self.next() == Some(b) {
            Ok(())
        } else {
            Err(what)
        }
    }

    /// The whole line: one object, then only whitespace.
    fn request(&mut self, req: &mut Request) -> PResult<()> {
        self.expect(b'{', "expected an object")?;
        self.ws();
        if self.peek() == Some(b'}') {
            self.pos += 1;
        } else {
            loop {
                self.ws();
                let mut key_buf = [0u8; 16];
                let mut key = SliceWriter::new(&mut key_buf);
                self.string(&mut key)?;
                let known = !key.overflow;
                let key_len = key.len;
                self.expect(b':', "expected ':'")?;
                self.ws();
                match (known, key_buf.get(..key_len).unwrap_or_default()) {
                    (true, b"op") => {
                        let mut op = SliceWriter::new(&mut req.op);
                        self.string(&mut op)?;
                        req.op_len = op.len;
                        req.op_too_long = op.overflow;
                        req.has_op = true;
                    }
                    (true, b"argv") => self.argv(req)?,
                    (true, b"timeout_s") => req.timeout_s = Some(self.uint()?),
                    _ => self.skip_value(0)?,
                }
                self.ws();
                match self.next() {
                    Some(b',') => continue,
                    Some(b'}') => break,
                    _ => return Err("expected ',' or '}'"),
                }
            }
        }
        self.ws();
        if self.pos != self.s.len() {
            return Err("trailing characters");
        }
        Ok(())
    }

    /// `["a","b",...]`, joined with spaces into the command.
    fn argv(&mut self, req: &mut Request) -> PResult<()> {
        self.expect(b'[', "argv must be an array of strings")?;
        req.has_argv = true;
        req.argc = 0;
        let mut cmd = SliceWriter::new(&mut req.command);
        self.ws();
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(());
        }
        loop {
            self.ws();
            if self.peek() != Some(b'"') {
                return Err("argv must be an array of strings");
            }
            if req.argc > 0 {
                cmd.bytes(b" ");
            }
            self.string(&mut cmd)?;
            req.argc += 1;
            self.ws();
            match self.next() {
                Some(b',') => continue,
                Some(b']') => break,
                _ => return Err("expected ',' or ']'"),
            }
        }
        req.command_len = if cmd.overflow {
            COMMAND_MAX + 1
        } else {
            cmd.len
        };
        Ok(())
    }

    /// A non-negative integer.
    fn uint(&mut self) -> PResult<u64> {
        let start = self.pos;
        let mut v = 0u64;
        while let Some(b @ b'0'..=b'9') = self.peek() {
            v = v
                .checked_mul(10)
                .and_then(|v| v.checked_add(u64::from(b - b'0')))
                .ok_or("number too large")?;
            self.pos += 1;
        }
        if self.pos == start {
            return Err("expected a non-negative integer");
        }
        Ok(v)
    }

    /// A string, decoded into `out`.
    fn string(&mut self, out: &mut dyn Sink) -> PResult<()> {
        if self.next() != Some(b'"') {
            return Err("expected a string");
        }
        loop {
            match self.next().ok_or("unterminated string")? {
                b'"' => return Ok(()),
                b'\\' => match self.next().ok_or("unterminated string")? {
                    b'"' => out.bytes(b"\""),
                    b'\\' => out.bytes(b"\\"),
                    b'/' => out.bytes(b"/"),
                    b'b' => out.bytes(b"\x08"),
                    b'f' => out.bytes(b"\x0c"),
                    b'n' => out.bytes(b"\n"),
                    b'r' => out.bytes(b"\r"),
                    b't' => out.bytes(b"\t"),
                    b'u' => {
                        let cp = self.hex4()?;
                        utf8(out, cp);
                    }
                    _ => return Err("bad escape"),
                },
                0..=0x1f => return Err("control character in string"),
                b => out.bytes(&[b]),
            }
        }
    }

    fn hex4(&mut self) -> PResult<u32> {
        let mut v = 0u32;
        for _ in 0..4 {
            let d = match self.next().ok_or("bad \\u escape")? {
                b @ b'0'..=b'9' => b - b'0',
                b @ b'a'..=b'f' => b - b'a' + 10,
                b @ b'A'..=b'F' => b - b'A' + 10,
                _ => return Err("bad \\u escape"),
            };
            v = (v << 4) | u32::from(d);
        }
        Ok(v)
    }

    /// Skips any JSON value.
    fn skip_value(&mut self, depth: u32) -> PResult<()> {
        if depth > MAX_DEPTH {
            return Err("nested too deeply");
        }
        self.ws();
        match self.peek().ok_or("expected a value")? {
            b'"' => {
                struct Discard;
                impl Sink for Discard {
                    fn bytes(&mut self, _: &[u8]) {}
                }
                self.string(&mut Discard)
            }
            b'{' | b'[' => {
                let close = if self.next() == Some(b'{') {
                    b'}'
                } else {
                    b']'
                };
                let object = close == b'}';
                self.ws();
                if self.peek() == Some(close) {
                    self.pos += 1;
                    return Ok(());
                }
                loop {
                    if object {
                        self.ws();
                        self.skip_value(depth + 1)?;
                        self.expect(b':', "expected ':'")?;
                    }
                    self.skip_value(depth + 1)?;
                    self.ws();
                    match self.next() {
                        Some(b',') => continue,
                        Some(b) if b == close => return Ok(()),
                        _ => return Err("bad array or object"),
                    }
                }
            }
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            b'-' | b'0'..=b'9' => {
                self.pos += 1;
                while matches!(
                    self.peek(),
                    Some(b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-')
                ) {
                    self.pos += 1;
                }
                Ok(())
            }
            _ => Err("unexpected character"),
        }
    }

    fn literal(&mut self, word: &[u8]) -> PResult<()> {
        let end = self.pos + word.len();
        if self.s.get(self.pos..end) == Some(word) {
            self.pos = end;
            Ok(())
        } else {
            Err("unexpected character")
        }
    }
}

/// UTF-8 of a code point from `\uXXXX` (a lone surrogate becomes U+FFFD).
fn utf8(out: &mut dyn Sink, cp: u32) {
    let cp = if (0xD800..0xE000).contains(&cp) {
        0xFFFD
    } else {
        cp
    };
    if cp < 0x80 {
        out.bytes(&[cp as u8]);
    } else if cp < 0x800 {
        out.bytes(&[0xC0 | (cp >> 6) as u8, 0x80 | (cp & 0x3F) as u8]);
    } else {
        out.bytes(&[
            0xE0 | (cp >> 12) as u8,
            0x80 | ((cp >> 6) & 0x3F) as u8,
            0x80 | (cp & 0x3F) as u8,
        ]);
    }
}
