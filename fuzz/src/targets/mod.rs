//! The fuzz targets, one module each, and the table the drivers go through.

pub mod agent_protocol;
pub mod api_request;
pub mod disk_chain_open;
pub mod disk_header_table;
pub mod snapshot_state;
pub mod virtio_blk;
pub mod vsock_packets;

/// A fuzz target as the drivers see it.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// Its name (the libFuzzer binary's too).
    pub name: &'static str,
    /// What it fuzzes.
    pub what: &'static str,
    /// The entry point: panics only on a bug.
    pub run: fn(&[u8]),
    /// Longest input worth generating.
    pub max_len: usize,
    /// Inputs the smoke test runs (a few seconds' worth in a debug build).
    pub smoke_inputs: usize,
}

/// Every target.
pub const TARGETS: &[Target] = &[
    Target {
        name: "disk_header_table",
        what: "the disk layer header, L1 and L2 table parsers (and their round trip)",
        run: disk_header_table::run,
        max_len: 4096,
        smoke_inputs: 4000,
    },
    Target {
        name: "disk_chain_open",
        what: "Chain::open, reads and writes on crafted layer files (a base and a child)",
        run: disk_chain_open::run,
        max_len: 2048,
        smoke_inputs: 2000,
    },
    Target {
        name: "snapshot_state",
        what: "the state file container and the VM state it holds, with its checks",
        run: snapshot_state::run,
        max_len: 8192,
        smoke_inputs: 3000,
    },
    Target {
        name: "virtio_blk",
        what: "virtio-blk request parsing behind the queue's chain checks, on mock guest memory",
        run: virtio_blk::run,
        max_len: 4096,
        smoke_inputs: 3000,
    },
    Target {
        name: "vsock_packets",
        what: "vsock tx packets, host handshakes and connection life cycles on a live device",
        run: vsock_packets::run,
        max_len: 4096,
        smoke_inputs: 2000,
    },
    Target {
        name: "agent_protocol",
        what: "agent requests (guest side) and the host client's reply framing and decoding",
        run: agent_protocol::run,
        max_len: 4096,
        smoke_inputs: 4000,
    },
    Target {
        name: "api_request",
        what: "the API's route, query and body parser",
        run: api_request::run,
        max_len: 4096,
        smoke_inputs: 4000,
    },
];

/// The target called `name`.
pub fn by_name(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}
