#![allow(clippy::unwrap_used, clippy::expect_used)] // a failure is a test failure
//! A running test guest with two disks and a vsock device survives a pause, a save of all its
//! state (vCPUs, VM, serial, i8042, reset control, every virtio transport and device), the
//! teardown of its KVM VM, vCPUs and device threads, and a restore into a fresh KVM VM on the
//! same guest memory with the disks re-opened and the vsock socket bound again (issue 11,
//! "Must show"). Built through the library API only, as the runner does: a `Platform` whose
//! console goes to a channel, `Vm::boot`, `Vm::pause`, `Vm::save_state`,
//! `Vm::shutdown_keep_memory`, `Vm::restore_from`, `Vm::resume`.
//!
//! Needs /dev/kvm; fails loudly without it.

mod common;

use std::sync::mpsc;
use std::time::Duration;

use common::{config_with_devices, file_hash, pattern_hash, platform};
use vmm::agent::AgentClient;
use vmm::device_manager::{DeviceState, NotPaused};
use vmm::vm::{EventTx, SaveError, Vm, VmEvent, VmSnapshotState};

/// Hang guard for an agent round trip.
const AGENT_GUARD: Duration = Duration::from_secs(60);

#[test]
fn running_guest_with_disks_and_vsock_is_restored_into_a_fresh_vm_and_goes_on() {
    let (platform, console) = platform();
    let (config, files) = config_with_devices();
    let (events, event_rx) = mpsc::channel::<VmEvent>();
    let vm = Vm::boot(&platform, &config, &EventTx::new(&events, 0)).unwrap();
    console.wait_for(|l| l.contains("strata test guest ready"));
    console.command("count start").unwrap();
    console.command("fill 4 7").unwrap();
    console.command("blk 0 write 0 64 5").unwrap();
    let written = console.line("blk 0 read 0 64");
    let mut agent = AgentClient::connect(&files.uds, AGENT_GUARD).unwrap();
    agent.ping().unwrap();
    let before = console.wait_count_above(0);

    vm.pause().unwrap();
    let state = vm.save_state(&platform).unwrap();
    let json = serde_json::to_string(&state).unwrap();
    let memory = vm.shutdown_keep_memory();
    // The old device is gone with its connections.
    let old_connection = agent.ping();
    let parsed: VmSnapshotState = serde_json::from_str(&json).unwrap();
    let restored = Vm::restore_from(
        &platform,
        &config,
        memory,
        &parsed,
        &EventTx::new(&events, 1),
    )
    .unwrap();
    let again = restored.save_state(&platform).unwrap();
    restored.resume().unwrap();
    let read_back = console.line("blk 0 read 0 64");
    console.command("blk 0 write 64 32 9").unwrap();
    console.command("blk 0 flush").unwrap();
    let disk0_new = console.line("blk 0 read 64 32");
    console.command("blk 1 write 8 16 11").unwrap();
    console.command("blk 1 flush").unwrap();
    let disk1_new = console.line("blk 1 read 8 16");
    let mut agent = AgentClient::connect(&files.uds, AGENT_GUARD).unwrap();
    let ping = agent.ping();
    let after = console.count();
    let later = console.wait_count_above(after);
    let check = console.command("check 4 7");
    let cpus = console.command("cpus").unwrap();
    restored.shutdown();

    assert_eq!(parsed, state);
    // Disks first in `--disk` order, then vsock.
    let kinds: Vec<_> = state
        .devices
        .iter()
        .map(|d| (d.device.kind(), d.index))
        .collect();
    use vmm::device_manager::DeviceKind::{Block, Vsock};
    assert_eq!(kinds, vec![(Block, 0), (Block, 1), (Vsock, 0)]);
    assert!(state.devices.iter().all(|d| d.transport.active));
    // Saved again right after the restore (before it ran): the same vCPU, disk and legacy
    // state ...
    assert_eq!(again.vcpus.len(), 2);
    for (a, b) in again.vcpus.iter().zip(&state.vcpus) {
        assert_eq!((&a.regs, &a.sregs, &a.cpuid), (&b.regs, &b.sregs, &b.cpuid));
    }
    assert_eq!(again.devices[..2], state.devices[..2]);
    assert_eq!(
        (&again.i8042, &again.reset_control, &again.serial),
        (&state.i8042, &state.reset_control, &state.serial)
    );
    // ... and the vsock device the same but for the TRANSPORT_RESET event it put on its event
    // queue (queue 2) for the guest.
    let (v_then, v_now) = (&state.devices[2], &again.devices[2]);
    assert_eq!(v_now.device, v_then.device);
    assert!(matches!(v_now.device, DeviceState::Vsock(_)));
    assert_eq!(v_now.transport.queues[..2], v_then.transport.queues[..2]);
    assert_eq!(
        v_now.transport.queues[2].next_used,
        v_then.transport.queues[2].next_used.wrapping_add(1),
        "TRANSPORT_RESET delivered"
    );
    // What the guest wrote before the pause is there, on the guest's side and in the file.
    assert_eq!(written, pattern_hash(0, 64, 5));
    assert_eq!(read_back, written);
    assert_eq!(file_hash(&files.disks[0], 0, 64), written);
    // Both disks serve new requests.
    assert_eq!(disk0_new, pattern_hash(64, 32, 9));
    assert_eq!(disk1_new, pattern_hash(8, 16, 11));
    assert_eq!(file_hash(&files.disks[1], 8, 16), disk1_new);
    // The host reaches the agent again; the old connection did not survive.
    assert!(old_connection.is_err());
    ping.unwrap();
    // `before` was read just before the pause: the restored guest counts on from there.
    assert!(after >= before, "count went back: {after} < {before}");
    assert!(later > after);
    assert_eq!(check, Ok(vec![]));
    assert_eq!(cpus, vec!["2".to_string()]);
    assert!(
        event_rx.try_recv().is_err(),
        "no vCPU or device stopped the VM"
    );
}

#[test]
fn a_state_that_does_not_fit_the_configuration_is_refused_naming_the_device() {
    let (platform, console) = platform();
    let (config, _files) = config_with_devices();
    let (events, _event_rx) = mpsc::channel::<VmEvent>();
    let vm = Vm::boot(&platform, &config, &EventTx::new(&events, 0)).unwrap();
    console.wait_for(|l| l.contains("strata test guest ready"));
    vm.pause().unwrap();
    let state = vm.save_state(&platform).unwrap();
    vm.resume().unwrap();
    // Saving needs the devices paused too.
    let running = vm.save_state(&platform);
    vm.shutdown();
    let caps = platform.state_caps().unwrap();

    let mut no_vsock = config.clone();
    no_vsock.vsock = None;
    let mut one_disk = config.clone();
    one_disk.disks.pop();
    let mut read_only = config.clone();
    read_only.disks[1].read_only = true;
    let mut other_cid = config.clone();
    other_cid.vsock.as_mut().unwrap().cid = 4;
    let mut swapped = state.clone();
    swapped.devices.swap(1, 2);
    let field = |s: &VmSnapshotState, c: &vmm::config::VmConfig| {
        s.check(c, &caps).expect_err("accepted").field
    };

    assert_eq!(state.check(&config, &caps), Ok(()));
    assert_eq!(field(&state, &no_vsock), "devices");
    assert_eq!(field(&state, &one_disk), "devices");
    assert_eq!(field(&state, &read_only), "devices[1].device.read_only");
    assert_eq!(field(&state, &other_cid), "devices[2].device.cid");
    let err = swapped.check(&config, &caps).unwrap_err();
    assert_eq!(err.field, "devices[1]");
    assert!(
        err.reason.contains("vsock") && err.reason.contains("disk 1"),
        "{err}"
    );
    match running {
        Err(SaveError::Device(NotPaused(name))) => assert_eq!(name, "virtio-blk0"),
        other => panic!("saved a running VM: {:?}", other.map(|_| ())),
    }
}
