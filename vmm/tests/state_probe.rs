#![allow(clippy::unwrap_used, clippy::expect_used)] // a failure is a test failure
//! Probes which vCPU and VM state ioctls this KVM serves, as `vmm/STATE.md` records: the ones
//! a checkpoint relies on must work (the test fails otherwise); the optional ones are printed
//! (`cargo test -p vmm --test state_probe -- --nocapture`).

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_msr_entry, kvm_pit_config, Msrs, KVM_CLOCK_REALTIME,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm};

#[test]
fn state_ioctls_on_this_kvm() {
    let kvm = Kvm::new().expect("this test needs /dev/kvm");
    let vm = kvm.create_vm().unwrap();
    vm.create_irq_chip().unwrap();
    vm.create_pit2(kvm_pit_config::default()).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
    vcpu.set_cpuid2(&cpuid).unwrap();

    // What a checkpoint relies on: each get, then the set of what was got.
    vcpu.set_regs(&vcpu.get_regs().unwrap()).unwrap();
    vcpu.set_sregs(&vcpu.get_sregs().unwrap()).unwrap();
    vcpu.set_fpu(&vcpu.get_fpu().unwrap()).unwrap();
    let xsave = vcpu.get_xsave().unwrap();
    // SAFETY: a whole kvm_xsave just read from this vCPU.
    unsafe { vcpu.set_xsave(&xsave) }.unwrap();
    vcpu.set_xcrs(&vcpu.get_xcrs().unwrap()).unwrap();
    vcpu.set_lapic(&vcpu.get_lapic().unwrap()).unwrap();
    vcpu.set_debug_regs(&vcpu.get_debug_regs().unwrap())
        .unwrap();
    vcpu.set_vcpu_events(&vcpu.get_vcpu_events().unwrap())
        .unwrap();
    vcpu.set_mp_state(vcpu.get_mp_state().unwrap()).unwrap();
    let got_cpuid = vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES).unwrap();
    vcpu.set_cpuid2(&got_cpuid).unwrap();
    for chip_id in 0..3 {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip).unwrap();
        vm.set_irqchip(&chip).unwrap();
    }
    vm.set_pit2(&vm.get_pit2().unwrap()).unwrap();
    let clock = vm.get_clock().unwrap();
    vm.set_clock(&kvm_clock_data {
        clock: clock.clock,
        ..Default::default()
    })
    .unwrap();

    // The optional ones, printed.
    println!("KVM_GET_CLOCK flags: {:#x}", clock.flags);
    let realtime = vm.set_clock(&kvm_clock_data {
        clock: clock.clock,
        flags: KVM_CLOCK_REALTIME,
        realtime: clock.realtime,
        ..Default::default()
    });
    println!("KVM_SET_CLOCK with KVM_CLOCK_REALTIME: {realtime:?}");
    let as_got = vm.set_clock(&clock);
    println!("KVM_SET_CLOCK with the flags KVM_GET_CLOCK returned: {as_got:?}");
    println!(
        "KVM_CAP_ADJUST_CLOCK: {:#x}",
        kvm.check_extension_int(Cap::AdjustClock)
    );
    println!("KVM_CAP_XSAVE2: {}", kvm.check_extension_int(Cap::Xsave2));
    println!(
        "KVM_CAP_NESTED_STATE: {}",
        kvm.check_extension_int(Cap::NestedState)
    );
    let mut nested = kvm_ioctls::KvmNestedStateBuffer::empty();
    println!("KVM_GET_NESTED_STATE: {:?}", vcpu.nested_state(&mut nested));
    println!(
        "KVM_CAP_TSC_CONTROL: {}, KVM_CAP_GET_TSC_KHZ: {}",
        kvm.check_extension_int(Cap::TscControl),
        kvm.check_extension_int(Cap::GetTscKhz)
    );
    let khz = vcpu.get_tsc_khz();
    println!("KVM_GET_TSC_KHZ: {khz:?}");
    if let Ok(k) = khz {
        println!("KVM_SET_TSC_KHZ (same): {:?}", vcpu.set_tsc_khz(k));
        println!("KVM_SET_TSC_KHZ (+1000): {:?}", vcpu.set_tsc_khz(k + 1000));
        println!(
            "KVM_SET_TSC_KHZ (+100000): {:?}",
            vcpu.set_tsc_khz(k + 100_000)
        );
        println!("KVM_GET_TSC_KHZ after: {:?}", vcpu.get_tsc_khz());
        let _ = vcpu.set_tsc_khz(k);
    }
    println!("KVM_KVMCLOCK_CTRL: {:?}", vcpu.kvmclock_ctrl());

    let listed = kvm.get_msr_index_list().unwrap();
    println!("KVM_GET_MSR_INDEX_LIST: {} MSRs", listed.as_slice().len());
    for &index in listed.as_slice() {
        let mut one = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .unwrap();
        let read = vcpu.get_msrs(&mut one);
        let value = one.as_slice()[0].data;
        let back = vcpu.set_msrs(&one);
        let zero = vcpu.set_msrs(
            &Msrs::from_entries(&[kvm_msr_entry {
                index,
                data: 0,
                ..Default::default()
            }])
            .unwrap(),
        );
        // Leave the vCPU as it was.
        let _ = vcpu.set_msrs(&one);
        let ones = vcpu.set_msrs(
            &Msrs::from_entries(&[kvm_msr_entry {
                index,
                data: u64::MAX,
                ..Default::default()
            }])
            .unwrap(),
        );
        let _ = vcpu.set_msrs(&one);
        if index == 0x10a {
            println!("MSR 0x10a: read {read:?} = {value:#x}, write back {back:?}, write 0 {zero:?}, write !0 {ones:?}");
        }
        if read.as_ref().ok() != Some(&1)
            || back.as_ref().ok() != Some(&1)
            || zero.as_ref().ok() != Some(&1)
        {
            println!(
                "MSR {index:#x}: read {read:?} = {value:#x}, write back {back:?}, write 0 {zero:?}"
            );
        }
    }
}
