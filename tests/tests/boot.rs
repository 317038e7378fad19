//! Boot the embedded test guest under KVM and check what it sees through its console.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use strata_tests::Vm;

const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn echo_round_trips_through_the_serial_console() {
    let mut vm = Vm::start(&["--vcpus", "1", "--memory", "64M"]);
    assert_eq!(vm.wait_ready(), 1);

    assert_eq!(vm.line("echo hello, strata"), "hello, strata");
    assert_eq!(vm.line("echo   spaced  out "), "  spaced  out ");
    let reply = vm.command("no-such-command");
    assert!(reply.status.is_err(), "{reply:?}");
    // The guest keeps answering after an error.
    assert_eq!(vm.line("echo still here"), "still here");
}

#[test]
fn four_vcpus_all_run_and_count() {
    let mut vm = Vm::start(&["--vcpus", "4", "--memory", "128M"]);
    assert_eq!(vm.wait_ready(), 4);
    assert_eq!(vm.line("cpus"), "4");

    vm.command("count start").ok();
    let first = per_cpu(&mut vm);
    std::thread::sleep(Duration::from_millis(500));
    let second = per_cpu(&mut vm);
    vm.command("count stop").ok();

    assert_eq!(first.len(), 4, "{first:?}");
    for (cpu, (a, b)) in first.iter().zip(&second).enumerate() {
        assert!(b > a, "vCPU {cpu} did not count: {a} then {b}");
    }
}

/// `count get` → total, then `per-cpu c0 c1 ...`.
fn per_cpu(vm: &mut Vm) -> Vec<u64> {
    let out = vm.command("count get").ok();
    assert_eq!(out.len(), 2, "{out:?}");
    let total: u64 = out[0].parse().unwrap();
    let each: Vec<u64> = out[1]
        .strip_prefix("per-cpu ")
        .unwrap()
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    // The counters run while they are printed: the total is read first, then each counter.
    assert!(
        total <= each.iter().sum::<u64>(),
        "total {total} > sum of {each:?}"
    );
    each
}

#[test]
fn guest_sees_the_command_line_and_memory_size() {
    let cmdline = "console=ttyS0 strata.test=1 quoted=\"a b\" last";
    let mut vm = Vm::start(&["--memory", "192M", "--cmdline", cmdline]);
    vm.wait_ready();

    assert_eq!(vm.line("cmdline"), cmdline);
    assert_eq!(vm.line("mem"), "192");
}

#[test]
fn large_memory_is_reported_across_the_mmio_hole() {
    let mut vm = Vm::start(&["--memory", "4G"]);
    vm.wait_ready();
    assert_eq!(vm.line("mem"), "4096");
    vm.send("poweroff\n");
    assert!(vm.wait_exit(EXIT_TIMEOUT).success());
}

#[test]
fn filled_memory_checks_out_and_a_wrong_seed_does_not() {
    let mut vm = Vm::start(&["--memory", "64M"]);
    vm.wait_ready();

    vm.command("fill 16 1").ok();
    vm.command("check 16 1").ok();
    let wrong = vm.command("check 16 2");
    assert!(wrong.status.is_err(), "{wrong:?}");
    let too_big = vm.command("fill 64 1");
    assert!(too_big.status.is_err(), "{too_big:?}");
}

#[test]
fn poweroff_ends_strata_with_status_0() {
    let mut vm = Vm::start(&["--vcpus", "2", "--memory", "64M"]);
    vm.wait_ready();
    vm.send("poweroff\n");

    let status = vm.wait_exit(EXIT_TIMEOUT);
    assert_eq!(status.code(), Some(0), "stderr: {}", vm.stderr());
}

#[test]
fn panic_ends_strata_with_an_error() {
    let mut vm = Vm::start(&["--memory", "64M"]);
    vm.wait_ready();
    vm.send("panic\n");

    let status = vm.wait_exit(EXIT_TIMEOUT);
    assert_eq!(status.code(), Some(1));
    assert!(
        vm.stderr().contains("the guest panicked"),
        "stderr: {}",
        vm.stderr()
    );
}

#[test]
fn reboot_restarts_the_guest_and_no_reboot_exits() {
    let mut vm = Vm::start(&["--vcpus", "2", "--memory", "64M"]);
    vm.wait_ready();
    vm.command("fill 2 7").ok();
    vm.send("reboot\n");
    // A fresh boot: the banner again, all CPUs again, memory from scratch.
    vm.wait_for(Duration::from_secs(60), |l| {
        l.ends_with("strata test guest booting")
    });
    assert_eq!(vm.wait_ready(), 2);
    assert!(vm.command("check 2 7").status.is_err());
    vm.send("poweroff\n");
    assert_eq!(vm.wait_exit(EXIT_TIMEOUT).code(), Some(0));

    let mut vm = Vm::start(&["--memory", "64M", "--no-reboot"]);
    vm.wait_ready();
    vm.send("reboot\n");
    assert_eq!(vm.wait_exit(EXIT_TIMEOUT).code(), Some(0));
}
