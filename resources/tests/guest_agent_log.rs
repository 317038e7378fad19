//! Host-side tests of the test guest's `log` workload (`disklog.rs`) and its agent
//! (`agent.rs`): the guest's own source files, compiled for the host against in-memory
//! disks, a fake clock and a stub console command runner. They check the round robin of
//! several logs, restart and stop, what `freeze` reports (the exact JSON reply), thaw and the
//! automatic thaw, and the `strata.agent=off` switch of the command line.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code, missing_docs)]

use std::sync::{Mutex, MutexGuard};

#[path = "../test-guest/src/agent.rs"]
mod agent;
#[path = "../test-guest/src/console.rs"]
mod console;
#[path = "../test-guest/src/disklog.rs"]
mod disklog;
#[path = "../test-guest/src/pattern.rs"]
mod pattern;
#[path = "../test-guest/src/sync.rs"]
mod sync;

/// The console's byte output (nothing here writes to it).
mod uart {
    pub fn put_byte(_: u8) {}
}

/// A fake clock: "TSC" ticks are milliseconds, moved by the test.
mod time {
    use std::sync::atomic::{AtomicU64, Ordering};

    pub static NOW_MS: AtomicU64 = AtomicU64::new(1);

    pub fn rdtsc() -> u64 {
        NOW_MS.load(Ordering::Relaxed)
    }

    pub fn deadline_ms(ms: u64) -> u64 {
        rdtsc() + ms
    }

    pub fn passed(deadline: u64) -> bool {
        rdtsc() >= deadline
    }
}

/// The console commands `exec` runs: only `echo` here.
mod commands {
    use crate::console::Sink;

    pub enum Fail {
        Reason(&'static str),
    }

    impl Fail {
        pub fn write(&self, out: &mut dyn Sink) {
            let Fail::Reason(r) = self;
            out.str(r);
        }
    }

    pub fn execute(line: &[u8], out: &mut dyn Sink) -> Result<(), Fail> {
        match line.strip_prefix(b"echo ") {
            Some(text) => {
                out.bytes(text);
                out.nl();
                Ok(())
            }
            None => Err(Fail::Reason("unknown command")),
        }
    }
}

/// In-memory disks with the guest driver's interface, plus a log of the requests.
mod blk {
    use std::sync::Mutex;

    pub const MAX_DISKS: usize = 8;
    pub const MAX_COUNT: u64 = 65_536;

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Error {
        NoDisk,
        Io,
    }

    impl Error {
        pub fn reason(self) -> &'static str {
            match self {
                Error::NoDisk => "no such disk",
                Error::Io => "io",
            }
        }
    }

    #[derive(Clone, Debug, PartialEq, Eq)]
    pub enum Op {
        Write(u64, u64),
        Flush(u64),
    }

    pub struct Disks {
        pub data: Vec<Vec<u8>>,
        /// Disks whose requests fail.
        pub failing: Vec<bool>,
        pub ops: Vec<Op>,
    }

    pub static DISKS: Mutex<Disks> = Mutex::new(Disks {
        data: Vec::new(),
        failing: Vec::new(),
        ops: Vec::new(),
    });

    fn with<T>(n: u64, f: impl FnOnce(&mut Disks, usize) -> Result<T, Error>) -> Result<T, Error> {
        let mut d = DISKS.lock().unwrap();
        let i = usize::try_from(n).map_err(|_| Error::NoDisk)?;
        if i >= d.data.len() {
            return Err(Error::NoDisk);
        }
        if d.failing[i] {
            return Err(Error::Io);
        }
        f(&mut d, i)
    }

    pub fn info(n: u64) -> Result<(u64, bool, u64), Error> {
        with(n, |d, i| Ok((d.data[i].len() as u64 / 512, false, 0)))
    }

    pub fn write_sector(n: u64, sector: u64, buf: &[u8; 512]) -> Result<(), Error> {
        with(n, |d, i| {
            let at = sector as usize * 512;
            let dst = d.data[i].get_mut(at..at + 512).ok_or(Error::Io)?;
            dst.copy_from_slice(buf);
            d.ops.push(Op::Write(n, sector));
            Ok(())
        })
    }

    pub fn flush(n: u64) -> Result<(), Error> {
        with(n, |d, _| {
            d.ops.push(Op::Flush(n));
            Ok(())
        })
    }

    pub fn read(
        n: u64,
        sector: u64,
        count: u64,
        mut f: impl FnMut(u64, &[u8]),
    ) -> Result<(), Error> {
        let bytes = with(n, |d, i| {
            let at = sector as usize * 512;
            Ok(d.data[i]
                .get(at..at + count as usize * 512)
                .ok_or(Error::Io)?
                .to_vec())
        })?;
        f(sector, &bytes);
        Ok(())
    }
}

/// The guest's state is global: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Fresh zeroed disks of `sectors` sectors each, every log stopped and thawed.
fn setup(sectors: &[usize]) -> MutexGuard<'static, ()> {
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    disklog::stop();
    disklog::thaw();
    let mut d = blk::DISKS.lock().unwrap();
    d.data = sectors.iter().map(|&n| vec![0u8; n * 512]).collect();
    d.failing = vec![false; sectors.len()];
    d.ops.clear();
    guard
}

fn ops() -> Vec<blk::Op> {
    std::mem::take(&mut blk::DISKS.lock().unwrap().ops)
}

fn verify(n: u64) -> u64 {
    match disklog::verify(n) {
        Ok(n) => n,
        Err(disklog::VerifyError::Broken(g)) => panic!("disk {n}: broken log after {g}"),
        Err(disklog::VerifyError::Disk(e)) => panic!("disk {n}: {}", e.reason()),
    }
}

/// Runs `n` turns of the BSP loop's log step.
fn steps(n: usize) {
    for _ in 0..n {
        disklog::check_thaw();
        if disklog::wants_step() {
            disklog::step();
        }
    }
}

/// The reply line to one agent request, as the vsock service sends it.
fn agent_raw(request: &str) -> String {
    let mut out = vec![0u8; agent::RESPONSE_MAX];
    let n = agent::handle_line(request.as_bytes(), &mut out);
    String::from_utf8(out[..n].to_vec()).unwrap()
}

#[test]
fn two_logs_take_turns_one_whole_record_each_write_then_flush() {
    let _g = setup(&[64, 64, 64]);
    disklog::start(0).unwrap();
    disklog::start(2).unwrap();
    steps(6);
    use blk::Op::{Flush, Write};
    let turns = ops();
    // Which log goes first depends on where the last test left the turn.
    let order = |a: u64, b: u64| -> Vec<blk::Op> {
        (0..3)
            .flat_map(|k| [Write(a, k), Flush(a), Write(b, k), Flush(b)])
            .collect()
    };
    assert!(turns == order(0, 2) || turns == order(2, 0), "{turns:?}");
    assert_eq!((verify(0), verify(1), verify(2)), (3, 0, 3));
}

#[test]
fn starting_a_disk_again_restarts_only_that_disk() {
    let _g = setup(&[64, 64]);
    disklog::start(0).unwrap();
    disklog::start(1).unwrap();
    steps(20);
    assert_eq!((verify(0), verify(1)), (10, 10));
    disklog::start(0).unwrap();
    steps(6);
    // Disk 0 has a new run of 3 records (the old run's records past them are ignored), disk 1
    // went on.
    assert_eq!((verify(0), verify(1)), (3, 13));
    assert_eq!(
        agent_raw(r#"{"op":"freeze","timeout_s":5}"#),
        "{\"ok\":true,\"frozen\":[\"log\"],\"log_records\":16,\"logs\":\
         [{\"disk\":0,\"records\":3},{\"disk\":1,\"records\":13}]}\n"
    );
    disklog::thaw();
}

#[test]
fn stop_with_a_disk_stops_that_log_and_stop_stops_all() {
    let _g = setup(&[64, 64]);
    disklog::start(0).unwrap();
    disklog::start(1).unwrap();
    steps(4);
    disklog::stop_disk(0);
    steps(4);
    assert_eq!((verify(0), verify(1)), (2, 6));
    assert_eq!(
        agent_raw(r#"{"op":"freeze"}"#),
        "{\"ok\":true,\"frozen\":[\"log\"],\"log_records\":6,\"logs\":[{\"disk\":1,\"records\":6}]}\n"
    );
    disklog::thaw();
    disklog::stop();
    assert!(!disklog::wants_step());
    steps(4);
    assert_eq!((verify(0), verify(1)), (2, 6));
    assert_eq!(
        agent_raw(r#"{"op":"freeze","timeout_s":1}"#),
        "{\"ok\":true,\"frozen\":[],\"log_records\":0,\"logs\":[]}\n"
    );
    assert_eq!(disklog::thaw_deadline(), None, "nothing was frozen");
}

#[test]
fn freeze_reports_each_running_log_after_flushing_and_holds_until_thaw() {
    let _g = setup(&[64, 64]);
    disklog::start(0).unwrap();
    disklog::start(1).unwrap();
    steps(7);
    ops();
    let line = agent_raw(r#"{"op":"freeze","timeout_s":60}"#);
    let (n0, n1) = (verify(0), verify(1));
    assert_eq!(n0 + n1, 7);
    assert_eq!(
        line,
        format!(
            "{{\"ok\":true,\"frozen\":[\"log\"],\"log_records\":7,\"logs\":[{{\"disk\":0,\"records\":{n0}}},{{\"disk\":1,\"records\":{n1}}}]}}\n"
        )
    );
    // Each disk with a running log was flushed by the freeze.
    assert_eq!(ops(), vec![blk::Op::Flush(0), blk::Op::Flush(1)]);
    assert!(!disklog::wants_step());
    steps(10);
    assert!(ops().is_empty(), "a frozen log wrote");
    assert_eq!((verify(0), verify(1)), (n0, n1));
    // A log started while frozen waits for the thaw like the others.
    assert_eq!(agent_raw(r#"{"op":"thaw"}"#), "{\"ok\":true}\n");
    steps(4);
    assert_eq!((verify(0), verify(1)), (n0 + 2, n1 + 2));
}

#[test]
fn the_automatic_thaw_resumes_every_log() {
    let _g = setup(&[64, 64]);
    disklog::start(0).unwrap();
    disklog::start(1).unwrap();
    steps(2);
    assert_eq!(
        agent_raw(r#"{"op":"freeze","timeout_s":3}"#),
        "{\"ok\":true,\"frozen\":[\"log\"],\"log_records\":2,\"logs\":\
         [{\"disk\":0,\"records\":1},{\"disk\":1,\"records\":1}]}\n"
    );
    let deadline = disklog::thaw_deadline().expect("a thaw is due");
    time::NOW_MS.store(deadline - 1, std::sync::atomic::Ordering::Relaxed);
    steps(4);
    assert_eq!((verify(0), verify(1)), (1, 1));
    time::NOW_MS.store(deadline, std::sync::atomic::Ordering::Relaxed);
    steps(4);
    assert_eq!((verify(0), verify(1)), (3, 3));
    assert_eq!(disklog::thaw_deadline(), None);
}

#[test]
fn a_full_or_failing_disk_stops_its_own_log_only() {
    let _g = setup(&[3, 64, 64]);
    disklog::start(0).unwrap();
    disklog::start(1).unwrap();
    disklog::start(2).unwrap();
    blk::DISKS.lock().unwrap().failing[2] = true;
    steps(20);
    // Disk 0 filled up at 3 records, disk 2 failed at once, disk 1 took the other turns.
    assert_eq!((verify(0), verify(1)), (3, 16));
    assert_eq!(
        agent_raw(r#"{"op":"freeze"}"#),
        "{\"ok\":true,\"frozen\":[\"log\"],\"log_records\":16,\"logs\":\
         [{\"disk\":1,\"records\":16}]}\n"
    );
    disklog::thaw();
}

#[test]
fn log_start_on_a_missing_disk_fails_and_changes_nothing() {
    let _g = setup(&[64]);
    assert!(matches!(disklog::start(1), Err(blk::Error::NoDisk)));
    assert!(matches!(disklog::start(99), Err(blk::Error::NoDisk)));
    assert!(!disklog::wants_step());
}

#[test]
fn exec_and_ping_still_answer() {
    let _g = setup(&[]);
    assert_eq!(agent_raw(r#"{"op":"ping"}"#), "{\"ok\":true}\n");
    assert_eq!(
        agent_raw(r#"{"op":"exec","argv":["echo","hi"]}"#),
        "{\"ok\":true,\"exit_code\":0,\"stdout\":\"hi\",\"stderr\":\"\"}\n"
    );
}

#[test]
fn strata_agent_off_on_the_command_line_switches_the_agent_off() {
    for (cmdline, on) in [
        ("", true),
        ("console=ttyS0", true),
        ("console=ttyS0 strata.agent=off", false),
        ("strata.agent=off console=ttyS0", false),
        ("strata.agent=0", false),
        ("strata.agent=no", false),
        ("strata.agent=false", false),
        ("strata.agent=\"off\"", false),
        ("\tstrata.agent=off\n", false),
        ("strata.agent=on", true),
        ("strata.agent=off strata.agent=on", true),
        ("strata.agent=on strata.agent=off", false),
        ("strata.agent=offx", true),
        ("xstrata.agent=off", true),
        ("strata.agent", true),
        ("foo=\"a strata.agent=off\"", true),
        ("-- strata.agent=off", true),
        ("console=ttyS0 -- init strata.agent=off", true),
        (
            "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 strata.agent=off",
            false,
        ),
    ] {
        assert_eq!(agent::enabled_by(cmdline.as_bytes()), on, "{cmdline:?}");
    }
    let long = format!("{} strata.agent=off", "x".repeat(5000));
    assert!(!agent::enabled_by(long.as_bytes()));
}
