//! Progress lines on stderr for long backups and restores: bytes, rate and
//! an ETA from the fraction done.

use std::time::{Duration, Instant};

/// Seconds between progress lines.
const PRINT_INTERVAL: Duration = Duration::from_secs(1);

pub struct Progress {
    what: &'static str,
    start: Instant,
    last_print: Instant,
    pub bytes: u64,
}

impl Progress {
    pub fn new(what: &'static str) -> Progress {
        let now = Instant::now();
        Progress {
            what,
            start: now,
            last_print: now,
            bytes: 0,
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    pub fn rate_mb_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.elapsed().as_secs_f64().max(1e-6)
    }

    /// Prints a line if a second passed; `done` of `total` (any unit) gives the ETA.
    pub fn tick(&mut self, done: u64, total: u64) {
        if self.last_print.elapsed() >= PRINT_INTERVAL {
            self.last_print = Instant::now();
            self.print(done, total);
        }
    }

    pub fn print(&self, done: u64, total: u64) {
        let secs = self.elapsed().as_secs_f64();
        let eta = if done > 0 && total >= done {
            format!("{:.0}s", secs * (total - done) as f64 / done as f64)
        } else {
            "?".into()
        };
        eprintln!(
            "{}: {:.1} MB, {:.1} MB/s, {done}/{total}, ETA {eta}",
            self.what,
            self.bytes as f64 / 1e6,
            self.rate_mb_s()
        );
    }
}
