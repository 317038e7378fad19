//! The checkpoint state file and manifest parsers: the state container
//! ([`snapshot::state::decode_state_bytes`]: magic, version, flags, length cap, checksum), the
//! VM state it carries ([`vmm::checkpoint::SavedVm`]) with the checks a restore makes before
//! it builds anything (`VmSnapshotState::check` and every saved queue through
//! [`devices::virtio::queue::restore_queue`]), and `manifest.json`
//! ([`snapshot::manifest::Manifest::from_json`]).
//!
//! An input that starts with `{` is taken as JSON as it is (a state payload and a manifest),
//! so that the seeds in `fuzz/seeds/snapshot_state/` (a real standard checkpoint's payload and
//! manifest) and their mutations reach the checks behind the decoding.
//!
//! Checked: nothing panics; a payload wrapped by the encoder decodes to itself; a container
//! longer than the cap is refused.

use std::path::Path;

use arbitrary::{Arbitrary, Unstructured};
use snapshot::state::{decode_state_bytes, encode_state_bytes};
use vm_memory::GuestAddress;

/// The cap the target decodes with (small, so it is reached).
const CAP: u64 = 4096;
/// Guest memory the saved queues are checked against.
const MEM_SIZE: usize = 1 << 20;
/// The MSRs this project's KVM saves (those of the seed checkpoint), taken as the host's.
const MSRS: [u32; 43] = [
    0x174,
    0x175,
    0x176,
    0xc000_0081,
    0xc000_0083,
    0xc000_0102,
    0xc000_0084,
    0xc000_0082,
    0x10,
    0x277,
    0xc001_0117,
    0x3a,
    0x48,
    0x122,
    0x1d9,
    0x1db,
    0x1dc,
    0x1dd,
    0x1de,
    0x12,
    0x11,
    0x4b56_4d01,
    0x4b56_4d00,
    0x4b56_4d02,
    0x4b56_4d03,
    0x4b56_4d04,
    0x4b56_4d06,
    0x4b56_4d07,
    0x3b,
    0x6e0,
    0x10a,
    0x345,
    0x1a0,
    0x17a,
    0x17b,
    0x34,
    0xce,
    0x140,
    0xc001_011f,
    0x1fc,
    0x8b,
    0xc001_0015,
    0x4b56_4d05,
];

#[derive(Arbitrary, Debug)]
enum Input {
    /// A whole state file.
    Container(Vec<u8>),
    /// A payload, wrapped by the encoder first so that the checksum holds.
    Payload(Vec<u8>),
    /// `manifest.json`.
    Manifest(Vec<u8>),
}

fn host_config() -> vmm::config::VmConfig {
    vmm::config::VmConfig {
        kernel: vmm::config::Kernel::TestGuest,
        initrd: None,
        cmdline: String::new(),
        vcpus: 1,
        memory: 64 << 20,
        reboot: false,
        console: vmm::config::ConsoleConfig::None,
        disks: Vec::new(),
        vsock: None,
        api_socket: None,
        checkpoint: Default::default(),
    }
}

fn payload(bytes: &[u8]) {
    let Ok(saved) = serde_json::from_slice::<vmm::checkpoint::SavedVm>(bytes) else {
        return;
    };
    let config = saved.machine.to_config(&host_config());
    let caps = vmm::vstate::vcpu::StateCaps {
        msrs: MSRS.to_vec(),
        xsave_size: 4096,
        refused_msrs: Vec::new(),
    };
    let _ = saved.vm.check(&config, &caps);
    let Ok(mem) = devices::virtio::GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]) else {
        return;
    };
    for d in &saved.vm.devices {
        for q in &d.transport.queues {
            let _ = devices::virtio::queue::restore_queue(q, 256, &mem);
        }
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    if data.first() == Some(&b'{') {
        payload(data);
        let _ = snapshot::manifest::Manifest::from_json(Path::new("manifest.json"), data);
        return;
    }
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let path = Path::new("fuzz.state");
    match input {
        Input::Container(bytes) => {
            if let Ok(p) = decode_state_bytes(path, &bytes, CAP) {
                assert!(p.len() as u64 <= CAP, "a payload over the cap was accepted");
                payload(&p);
            }
        }
        Input::Payload(p) => {
            let file = encode_state_bytes(&p);
            match decode_state_bytes(path, &file, CAP) {
                Ok(back) => assert_eq!(back, p, "a payload does not round-trip"),
                Err(e) => assert!(
                    p.len() as u64 > CAP,
                    "an encoded payload of {} bytes is refused: {e}",
                    p.len()
                ),
            }
            payload(&p);
        }
        Input::Manifest(bytes) => {
            let _ = snapshot::manifest::Manifest::from_json(Path::new("manifest.json"), &bytes);
        }
    }
}
