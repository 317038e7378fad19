//! The checkpoint state file and manifest parsers: the state container
//! ([`snapshot::state::decode_state_bytes`]: magic, version, flags, length cap, checksum), the
//! VM state it carries ([`vmm::checkpoint::SavedVm`]) with the checks a restore makes before
//! it builds anything (`VmSnapshotState::check` and every saved queue through
//! [`devices::virtio::queue::restore_queue`]), and `manifest.json`
//! ([`snapshot::manifest::Manifest::from_json`]).
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
        msrs: vec![0x10, 0x1b, 0x174, 0x175, 0x176, 0xc000_0080, 0xc000_0081],
        xsave_size: 4096,
        refused_msrs: vec![0x10a],
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
