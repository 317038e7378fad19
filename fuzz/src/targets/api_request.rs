//! The API's request parser ([`api::server::parse_call`]): route, method, query and body, as
//! the server runs it between hyper's HTTP framing and the VMM.
//!
//! Checked: nothing panics; an accepted request belongs to the endpoint of its method and
//! path; a refusal is one of the statuses the endpoint documents (or 404/405 before an endpoint
//! is known), never a 500.

use api::server::{endpoint_of, parse_call};
use api::ErrorCode;
use arbitrary::{Arbitrary, Unstructured};

const METHODS: [&str; 6] = ["GET", "POST", "PUT", "DELETE", "PATCH", "get"];
const SEGMENTS: [&str; 14] = [
    "v1",
    "vm",
    "checkpoints",
    "checkpoint-config",
    "guest",
    "exec",
    "apply",
    "export",
    "changes",
    "revert",
    "start",
    "shutdown",
    "ck-1",
    "",
];
const KEYS: [&str; 12] = [
    "name",
    "type",
    "location",
    "save_current",
    "destination",
    "disk_format",
    "argv",
    "timeout_s",
    "since",
    "standard",
    "production-only",
    "raw",
];

#[derive(Arbitrary, Debug)]
enum Path {
    /// `/` and segments from the API's vocabulary (or arbitrary ones).
    Segments(Vec<Segment>),
    /// Anything.
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum Segment {
    Known(u8),
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum Body {
    Raw(Vec<u8>),
    Json(Json),
}

/// JSON built from the API's field names, so bodies get past the JSON syntax.
#[derive(Arbitrary, Debug)]
enum Json {
    Null,
    Bool(bool),
    Int(i64),
    Big(u64),
    Str(String),
    Word(u8),
    Array(Vec<Json>),
    Object(Vec<(u8, Json)>),
}

impl Json {
    fn value(&self, depth: usize) -> serde_json::Value {
        use serde_json::Value;
        if depth > 8 {
            return Value::Null;
        }
        match self {
            Json::Null => Value::Null,
            Json::Bool(b) => Value::Bool(*b),
            Json::Int(i) => Value::from(*i),
            Json::Big(u) => Value::from(*u),
            Json::Str(s) => Value::String(s.clone()),
            Json::Word(w) => Value::String(KEYS[usize::from(*w) % KEYS.len()].into()),
            Json::Array(a) => Value::Array(a.iter().map(|j| j.value(depth + 1)).collect()),
            Json::Object(o) => Value::Object(
                o.iter()
                    .map(|(k, v)| {
                        (
                            KEYS[usize::from(*k) % KEYS.len()].into(),
                            v.value(depth + 1),
                        )
                    })
                    .collect(),
            ),
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Input {
    method: u8,
    path: Path,
    query: Option<String>,
    body: Body,
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let method = METHODS[usize::from(input.method) % METHODS.len()];
    let path = match &input.path {
        Path::Raw(p) => p.clone(),
        Path::Segments(segs) => segs
            .iter()
            .map(|s| match s {
                Segment::Known(k) => SEGMENTS[usize::from(*k) % SEGMENTS.len()].to_string(),
                Segment::Other(o) => o.clone(),
            })
            .fold(String::new(), |acc, s| acc + "/" + &s),
    };
    let body = match &input.body {
        Body::Raw(b) => b.clone(),
        Body::Json(j) => serde_json::to_vec(&j.value(0)).unwrap_or_default(),
    };
    let result = parse_call(method, &path, input.query.as_deref(), &body);
    let endpoint = endpoint_of(method, &path);
    match (result, endpoint) {
        (Ok((endpoint, request)), Ok((e2, _))) => {
            assert_eq!(endpoint, e2, "{method} {path}");
            let _ = request;
        }
        (Ok(_), Err(e)) => panic!("{method} {path} parsed but has no endpoint: {:?}", e.error),
        (Err(e), Ok((endpoint, _))) => {
            assert!(
                e.code != ErrorCode::Internal,
                "{method} {path}: a 500 from the parser: {e}"
            );
            assert!(
                endpoint.statuses().contains(&e.code.status()),
                "{method} {path}: {e} is not a status {endpoint:?} documents"
            );
        }
        (Err(e), Err(no)) => {
            assert!(
                matches!(e.code, ErrorCode::NotFound | ErrorCode::MethodNotAllowed),
                "{method} {path}: {e}"
            );
            assert_eq!(e, no.error);
        }
    }
}
