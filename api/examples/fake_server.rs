//! Serves the API with the tests' fake VMM on the socket named by the first argument, until
//! killed: `cargo run -p api --example fake_server -- /tmp/strata.sock`, then
//! `curl --unix-socket /tmp/strata.sock http://localhost/v1/vm`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/fake.rs"]
mod fake;

fn main() {
    let Some(path) = std::env::args_os().nth(1) else {
        eprintln!("usage: fake_server SOCKET");
        std::process::exit(2);
    };
    let path = std::path::Path::new(&path);
    let _fake = match fake::Fake::try_start_with(path, api::ServerOptions::default()) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("fake_server: error: {e}");
            std::process::exit(1);
        }
    };
    eprintln!("fake VMM serving {}", path.display());
    loop {
        std::thread::park();
    }
}
