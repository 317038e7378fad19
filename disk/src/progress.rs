//! A one-line progress bar on stderr, drawn only when stderr is a terminal.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Draws `label [#####-----] 42%` at most ten times a second.
pub(crate) struct Progress {
    label: &'static str,
    enabled: bool,
    last: Option<Instant>,
}

impl Progress {
    pub fn new(label: &'static str) -> Progress {
        Progress {
            label,
            enabled: std::io::stderr().is_terminal(),
            last: None,
        }
    }

    pub fn update(&mut self, done: u64, total: u64) {
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now - t < Duration::from_millis(100))
            && done < total
        {
            return;
        }
        self.last = Some(now);
        let pct = (done.min(total) * 100).checked_div(total).unwrap_or(100);
        let filled = (pct / 4) as usize;
        let mut e = std::io::stderr();
        let _ = write!(
            e,
            "\r{} [{}{}] {pct:3}%",
            self.label,
            "#".repeat(filled),
            "-".repeat(25 - filled)
        );
        let _ = e.flush();
    }

    pub fn finish(&mut self) {
        if self.enabled && self.last.is_some() {
            let _ = writeln!(std::io::stderr());
        }
    }
}
