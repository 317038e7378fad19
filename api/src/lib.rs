//! The HTTP/JSON API on a Unix socket: request and response types, the server, the client that
//! `strata ctl` uses, and `openapi.yaml`. Filled in by the API issue.
