//! Latency and outcome recording for `bench`.
//!
//! Recorders are sharded so concurrent operations rarely contend; the
//! progress line and the final report merge the shards.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use hdrhistogram::Histogram;
use serde::Serialize;
use stemedb_client::Error;

/// The largest latency the histograms resolve, in microseconds (one hour);
/// larger samples saturate to it.
const LATENCY_US_MAX: u64 = 3_600_000_000;
/// Significant figures of the histograms.
const LATENCY_SIGFIGS: u8 = 3;

/// What an operation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// A transaction of `tx_size` assertions.
    Write,
    /// A `get` of one entity.
    Read,
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, LATENCY_SIGFIGS)
        .expect("static histogram bounds are valid")
}

/// The outcomes recorded in the measured window.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub write_us: Histogram<u64>,
    pub read_us: Histogram<u64>,
    pub assertions: u64,
    /// Failed operations by error kind (gRPC code name, `Transport`, ...).
    pub errors: BTreeMap<String, u64>,
    /// The first error seen, to report when nothing succeeded.
    pub first_error: Option<Error>,
    /// When the last recorded operation finished. Rates are computed over
    /// the window stretched to this point, so an overloaded open-loop run
    /// reports what the server completed, not what was scheduled.
    pub last_finish: Option<Instant>,
}

impl Default for Recorded {
    fn default() -> Self {
        Recorded {
            write_us: new_histogram(),
            read_us: new_histogram(),
            assertions: 0,
            errors: BTreeMap::new(),
            first_error: None,
            last_finish: None,
        }
    }
}

impl Recorded {
    pub fn record(
        &mut self,
        kind: OpKind,
        latency: Duration,
        assertions: u64,
        outcome: Result<(), Error>,
    ) {
        match outcome {
            Ok(()) => {
                let us = u64::try_from(latency.as_micros())
                    .unwrap_or(u64::MAX)
                    .max(1);
                match kind {
                    OpKind::Write => {
                        self.write_us.saturating_record(us);
                        self.assertions += assertions;
                    }
                    OpKind::Read => self.read_us.saturating_record(us),
                }
            }
            Err(e) => {
                *self.errors.entry(error_kind(&e)).or_insert(0) += 1;
                self.first_error.get_or_insert(e);
            }
        }
    }

    pub fn merge(&mut self, other: &Recorded) {
        self.write_us
            .add(&other.write_us)
            .expect("histograms share bounds");
        self.read_us
            .add(&other.read_us)
            .expect("histograms share bounds");
        self.assertions += other.assertions;
        for (k, n) in &other.errors {
            *self.errors.entry(k.clone()).or_insert(0) += n;
        }
        if self.first_error.is_none() {
            self.first_error.clone_from(&other.first_error);
        }
        self.last_finish = self.last_finish.max(other.last_finish);
    }

    pub fn errors_total(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// The name an error is counted under.
pub fn error_kind(e: &Error) -> String {
    match e {
        Error::Status { code, .. } => format!("{code:?}"),
        Error::Transport(_) => "Transport".into(),
        Error::InvalidResponse(_) => "InvalidResponse".into(),
    }
}

/// Shared recorders plus live counters for the progress line.
pub struct Stats {
    shards: Vec<Mutex<Recorded>>,
    /// Operations finished, warmup included.
    pub finished: AtomicU64,
    /// Operations failed, warmup included.
    pub failed: AtomicU64,
}

impl Stats {
    pub fn new(shard_count: usize) -> Stats {
        assert!(shard_count > 0, "shard_count must be positive");
        Stats {
            shards: (0..shard_count)
                .map(|_| Mutex::new(Recorded::default()))
                .collect(),
            finished: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }
    }

    /// Counts a finished operation; records it only when `measured`.
    pub fn finish(
        &self,
        shard: usize,
        measured: bool,
        kind: OpKind,
        latency: Duration,
        assertions: u64,
        outcome: Result<(), Error>,
    ) {
        self.finished.fetch_add(1, Ordering::Relaxed);
        if outcome.is_err() {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        if measured {
            let mut r = self.shards[shard % self.shards.len()]
                .lock()
                .expect("stats lock poisoned");
            r.record(kind, latency, assertions, outcome);
            r.last_finish = r.last_finish.max(Some(Instant::now()));
        }
    }

    pub fn merged(&self) -> Recorded {
        let mut total = Recorded::default();
        for shard in &self.shards {
            total.merge(&shard.lock().expect("stats lock poisoned"));
        }
        total
    }
}

/// Latency percentiles of one operation kind, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percentiles {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Option<Percentiles> {
        (!h.is_empty()).then(|| Percentiles {
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            mean: h.mean(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_only_measured_ops_and_counts_errors_by_code() {
        let stats = Stats::new(3);
        for i in 0..100u64 {
            stats.finish(
                i as usize,
                true,
                OpKind::Write,
                Duration::from_micros(i + 1),
                2,
                Ok(()),
            );
        }
        stats.finish(0, false, OpKind::Write, Duration::from_secs(5), 2, Ok(()));
        stats.finish(1, true, OpKind::Read, Duration::from_millis(1), 0, Ok(()));
        let unavailable = Error::Status {
            code: tonic::Code::Unavailable,
            message: "x".into(),
        };
        stats.finish(
            2,
            true,
            OpKind::Write,
            Duration::ZERO,
            2,
            Err(unavailable.clone()),
        );
        stats.finish(
            2,
            true,
            OpKind::Read,
            Duration::ZERO,
            0,
            Err(Error::Transport("y".into())),
        );

        let r = stats.merged();
        assert_eq!(
            r.write_us.len(),
            100,
            "the unmeasured op is not in the histogram"
        );
        assert_eq!(r.read_us.len(), 1);
        assert_eq!(r.assertions, 200);
        assert_eq!(r.errors.get("Unavailable"), Some(&1));
        assert_eq!(r.errors.get("Transport"), Some(&1));
        assert_eq!(r.errors_total(), 2);
        assert_eq!(r.first_error, Some(unavailable));
        assert_eq!(stats.finished.load(Ordering::Relaxed), 104);
        assert_eq!(stats.failed.load(Ordering::Relaxed), 2);
        assert!(r.last_finish.is_some());

        let p = Percentiles::of(&r.write_us).unwrap();
        assert_eq!((p.p50, p.p99, p.max), (50, 99, 100));
        assert!(Percentiles::of(&Recorded::default().read_us).is_none());
    }

    #[test]
    fn huge_latencies_saturate() {
        let mut r = Recorded::default();
        r.record(OpKind::Read, Duration::from_secs(100_000), 0, Ok(()));
        assert!(r.read_us.max() >= LATENCY_US_MAX * 999 / 1000);
    }
}
