//! Rate limiting for log lines a guest (or a host client) can trigger at will.
//!
//! A guest that writes a bad register in a loop, breaks a queue after every reset or floods
//! the vsock device with connections must not flood the VMM's log (and its disk). Every such
//! log site goes through [`rate_limited!`](crate::rate_limited), which keeps one [`RateLimiter`]
//! per call site: at most [`LINES_PER_WINDOW`] lines per [`WINDOW`]; beyond that lines are
//! counted, not written, and the first line the site writes in a later window is preceded by
//! one line saying how many were suppressed (the kernel's `printk_ratelimit` does the same).
//! Lines below the logger's level cost nothing and use none of the budget.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines one call site may write per [`WINDOW`].
pub const LINES_PER_WINDOW: u32 = 10;
/// The window of [`LINES_PER_WINDOW`].
pub const WINDOW: Duration = Duration::from_secs(5);

/// What a call site may do with a line now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Write it; `suppressed` lines of this site were dropped since the last one written
    /// (write a line saying so first).
    Write {
        /// Lines dropped before this one.
        suppressed: u64,
    },
    /// Drop it (it is counted).
    Suppress,
}

#[derive(Debug)]
struct State {
    window_start: Option<Instant>,
    written: u32,
    suppressed: u64,
}

/// One call site's budget: `lines` per `window`.
#[derive(Debug)]
pub struct RateLimiter {
    lines: u32,
    window: Duration,
    state: Mutex<State>,
}

impl RateLimiter {
    /// A limiter allowing `lines` lines per `window` (usable in a `static`).
    pub const fn new(lines: u32, window: Duration) -> Self {
        Self {
            lines,
            window,
            state: Mutex::new(State {
                window_start: None,
                written: 0,
                suppressed: 0,
            }),
        }
    }

    /// Whether a line may be written now.
    pub fn check(&self) -> Verdict {
        self.check_at(Instant::now())
    }

    /// Whether a line may be written at `now` (times must not go backwards much; a clock that
    /// does simply keeps the current window).
    pub fn check_at(&self, now: Instant) -> Verdict {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let expired = s
            .window_start
            .is_none_or(|start| now.saturating_duration_since(start) >= self.window);
        if expired {
            s.window_start = Some(now);
            s.written = 0;
        }
        if s.written < self.lines {
            s.written += 1;
            Verdict::Write {
                suppressed: std::mem::take(&mut s.suppressed),
            }
        } else {
            s.suppressed = s.suppressed.saturating_add(1);
            Verdict::Suppress
        }
    }

    /// Lines dropped since the last one written.
    pub fn suppressed(&self) -> u64 {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .suppressed
    }
}

/// Logs like `log::log!(level, ...)`, at most [`LINES_PER_WINDOW`] lines per [`WINDOW`] from
/// this call site; see the [module docs](crate::ratelimit).
///
/// ```
/// devices::rate_limited!(log::Level::Warn, "virtio-blk {}: bad request", "disk0");
/// ```
#[macro_export]
macro_rules! rate_limited {
    ($level:expr, $($arg:tt)+) => {{
        static LIMITER: $crate::ratelimit::RateLimiter = $crate::ratelimit::RateLimiter::new(
            $crate::ratelimit::LINES_PER_WINDOW,
            $crate::ratelimit::WINDOW,
        );
        let level: $crate::ratelimit::__log::Level = $level;
        if $crate::ratelimit::__log::log_enabled!(level) {
            if let $crate::ratelimit::Verdict::Write { suppressed } = LIMITER.check() {
                if suppressed > 0 {
                    $crate::ratelimit::__log::log!(
                        level,
                        "{} similar messages suppressed ({}:{})",
                        suppressed,
                        file!(),
                        line!()
                    );
                }
                $crate::ratelimit::__log::log!(level, $($arg)+);
            }
        }
    }};
}

#[doc(hidden)]
pub use log as __log;

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_window_writes_its_budget_then_counts_the_rest() {
        let l = RateLimiter::new(3, Duration::from_secs(1));
        let t = Instant::now();
        let verdicts: Vec<Verdict> = (0..7).map(|i| l.check_at(t + i * MS)).collect();
        assert_eq!(
            verdicts,
            [
                Verdict::Write { suppressed: 0 },
                Verdict::Write { suppressed: 0 },
                Verdict::Write { suppressed: 0 },
                Verdict::Suppress,
                Verdict::Suppress,
                Verdict::Suppress,
                Verdict::Suppress,
            ]
        );
        assert_eq!(l.suppressed(), 4);
    }

    #[test]
    fn the_next_window_reports_what_was_suppressed_once() {
        let l = RateLimiter::new(2, Duration::from_secs(1));
        let t = Instant::now();
        for i in 0..5 {
            l.check_at(t + i * MS);
        }
        let later = t + Duration::from_secs(1);
        assert_eq!(l.check_at(later), Verdict::Write { suppressed: 3 });
        assert_eq!(l.check_at(later + MS), Verdict::Write { suppressed: 0 });
        assert_eq!(l.check_at(later + 2 * MS), Verdict::Suppress);
        assert_eq!(l.suppressed(), 1);
    }

    #[test]
    fn a_flood_writes_a_bounded_number_of_lines() {
        let l = RateLimiter::new(LINES_PER_WINDOW, WINDOW);
        let t = Instant::now();
        // A million lines over 20 s (one every 20 µs): four windows' worth are written.
        let written = (0..1_000_000u32)
            .filter(|&i| {
                matches!(
                    l.check_at(t + Duration::from_micros(20 * u64::from(i))),
                    Verdict::Write { .. }
                )
            })
            .count();
        assert_eq!(written, 4 * LINES_PER_WINDOW as usize);
    }

    #[test]
    fn call_sites_have_budgets_of_their_own() {
        let a = RateLimiter::new(1, Duration::from_secs(60));
        let b = RateLimiter::new(1, Duration::from_secs(60));
        let t = Instant::now();
        assert!(matches!(a.check_at(t), Verdict::Write { .. }));
        assert_eq!(a.check_at(t), Verdict::Suppress);
        assert!(matches!(b.check_at(t), Verdict::Write { .. }));
    }

    /// Collects the lines logged with a marker, for the macro tests.
    struct Capture(Mutex<Vec<String>>);

    impl log::Log for Capture {
        fn enabled(&self, m: &log::Metadata) -> bool {
            m.level() <= log::Level::Warn
        }
        fn log(&self, r: &log::Record) {
            if self.enabled(r.metadata()) {
                let line = r.args().to_string();
                self.0.lock().unwrap().push(line);
            }
        }
        fn flush(&self) {}
    }

    static CAPTURE: Capture = Capture(Mutex::new(Vec::new()));

    fn captured(marker: &str) -> usize {
        log::set_logger(&CAPTURE).ok();
        log::set_max_level(log::LevelFilter::Warn);
        CAPTURE
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(marker))
            .count()
    }

    #[test]
    fn the_macro_writes_a_sites_budget_of_a_flood() {
        captured("");
        for i in 0..100 {
            crate::rate_limited!(log::Level::Warn, "flood-marker line {i}");
        }
        assert_eq!(captured("flood-marker"), LINES_PER_WINDOW as usize);
    }

    #[test]
    fn lines_below_the_level_use_no_budget() {
        captured("");
        // One call site, at a level that alternates: the debug lines are not written and must
        // not eat the error lines' budget.
        for i in 0..(2 * LINES_PER_WINDOW) {
            let level = if i % 2 == 0 {
                log::Level::Debug
            } else {
                log::Level::Error
            };
            crate::rate_limited!(level, "mixed-marker {i} {level}");
        }
        assert_eq!(captured("mixed-marker"), LINES_PER_WINDOW as usize);
        assert_eq!(captured("DEBUG"), 0);
    }
}
