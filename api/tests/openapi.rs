//! `openapi.yaml` describes exactly the server's routes: the same paths, methods and statuses.

#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers outside #[test] fns

use std::collections::BTreeSet;

use api::server::ROUTES;
use serde_json::Value;

fn spec() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    serde_norway::from_str(&text).unwrap()
}

#[test]
fn spec_is_openapi_3_0() {
    assert_eq!(spec()["openapi"], "3.0.3");
}

#[test]
fn spec_paths_and_methods_equal_the_route_table() {
    let spec = spec();
    let mut in_spec = BTreeSet::new();
    for (path, ops) in spec["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            in_spec.insert((path.clone(), method.to_ascii_uppercase()));
        }
    }
    let in_server: BTreeSet<_> = ROUTES
        .iter()
        .flat_map(|r| {
            r.methods
                .iter()
                .map(|(m, _)| (r.path.to_owned(), (*m).to_owned()))
        })
        .collect();
    assert_eq!(in_spec, in_server);
}

#[test]
fn spec_statuses_equal_what_each_endpoint_can_answer() {
    let spec = spec();
    for route in ROUTES {
        for (method, endpoint) in route.methods {
            let op = &spec["paths"][route.path][method.to_ascii_lowercase()];
            let mut documented: Vec<u16> = op["responses"]
                .as_object()
                .unwrap()
                .keys()
                .map(|k| k.parse().unwrap())
                .collect();
            documented.sort_unstable();
            assert_eq!(documented, endpoint.statuses(), "{method} {}", route.path);
            assert_eq!(
                op.get("requestBody").is_some(),
                endpoint.reads_body(),
                "{method} {}",
                route.path
            );
        }
    }
}

#[test]
fn request_body_schemas_forbid_unknown_fields() {
    let spec = spec();
    let schemas = &spec["components"]["schemas"];
    for name in [
        "CheckpointConfigUpdate",
        "CreateCheckpoint",
        "ApplyCheckpoint",
        "ExportCheckpoint",
        "ExecRequest",
    ] {
        assert_eq!(schemas[name]["additionalProperties"], false, "{name}");
    }
    let empty = &spec["components"]["requestBodies"]["Empty"]["content"]["application/json"];
    assert_eq!(empty["schema"]["additionalProperties"], false);
}

#[test]
fn operations_with_an_id_take_it_as_the_checkpoint_id_parameter_and_changes_since() {
    let spec = spec();
    for route in ROUTES {
        for (method, endpoint) in route.methods {
            let op = &spec["paths"][route.path][method.to_ascii_lowercase()];
            assert_eq!(
                route.path.contains(api::server::ID_SEGMENT),
                endpoint.takes_id(),
                "{method} {}",
                route.path
            );
            let params: Vec<&str> = op
                .get("parameters")
                .and_then(Value::as_array)
                .map(|p| p.iter().map(|p| p["$ref"].as_str().unwrap()).collect())
                .unwrap_or_default();
            let mut expected = Vec::new();
            if endpoint.takes_id() {
                expected.push("#/components/parameters/CheckpointId");
            }
            if endpoint.reads_query() {
                expected.push("#/components/parameters/Since");
            }
            assert_eq!(params, expected, "{method} {}", route.path);
        }
    }
    let id = &spec["components"]["parameters"]["CheckpointId"]["schema"];
    assert_eq!(id["maxLength"], api::types::MAX_CHECKPOINT_ID_LEN);
    let since = &spec["components"]["parameters"]["Since"];
    assert_eq!(
        (&since["in"], &since["required"]),
        (&"query".into(), &false.into())
    );
    assert_eq!(&since["schema"], id);
    let name = &spec["components"]["schemas"]["CreateCheckpoint"]["properties"]["name"];
    assert_eq!(name["maxLength"], api::types::MAX_CHECKPOINT_NAME_CHARS);
}

#[test]
fn error_codes_in_spec_are_the_servers() {
    let spec = spec();
    let codes: BTreeSet<String> = spec["components"]["schemas"]["Error"]["properties"]["error"]
        ["properties"]["code"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    use api::ErrorCode::*;
    let server: BTreeSet<String> = [
        BadRequest,
        NotFound,
        MethodNotAllowed,
        InvalidState,
        PayloadTooLarge,
        Internal,
        AgentUnreachable,
        TooManyConnections,
    ]
    .iter()
    .map(|c| c.as_str().to_owned())
    .collect();
    assert_eq!(codes, server);
}

#[test]
fn enums_in_spec_are_the_types() {
    let spec = spec();
    let schemas = &spec["components"]["schemas"];
    let names = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect()
    };
    use clap::ValueEnum;
    let formats: Vec<String> = api::types::DiskFormat::value_variants()
        .iter()
        .map(|f| f.as_str().to_owned())
        .collect();
    assert_eq!(names(&schemas["DiskFormat"]["enum"]), formats);
    assert_eq!(
        names(&schemas["Progress"]["properties"]["operation"]["enum"]),
        [api::types::PROGRESS_MERGE, api::types::PROGRESS_EXPORT]
    );
    assert_eq!(
        schemas["ExportCheckpoint"]["properties"]["disk_format"]["default"],
        api::types::DiskFormat::default().as_str()
    );
}
