//! The JSON report, field for field the shape of `stemectl bench --output
//! json`, so one parser reads the results of every system.
//!
//! `assertions` and `assertions_per_s` count the items written: puts for
//! etcd, rows for PostgreSQL, 8 KiB blocks for the fdatasync probe.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// The largest latency the histograms resolve, in microseconds (one hour);
/// larger samples saturate to it. The same bounds as `stemectl bench`.
const LATENCY_US_MAX: u64 = 3_600_000_000;
const LATENCY_SIGFIGS: u8 = 3;

pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, LATENCY_SIGFIGS)
        .expect("static histogram bounds are valid")
}

/// Records one latency, clamped to the histogram's range.
pub fn record(h: &mut Histogram<u64>, latency: Duration) {
    let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
    h.saturating_record(us.clamp(1, LATENCY_US_MAX));
}

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

#[derive(Debug, Serialize)]
pub struct OpReport {
    /// Successful operations in the measured window.
    pub count: u64,
    pub per_s: f64,
    /// Latency of successful operations, in microseconds.
    pub latency_us: Option<Percentiles>,
}

impl OpReport {
    pub fn of(h: &Histogram<u64>, elapsed_s: f64) -> OpReport {
        OpReport {
            count: h.len(),
            per_s: h.len() as f64 / elapsed_s,
            latency_us: Percentiles::of(h),
        }
    }
}

/// What one measured run recorded.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub write_us: Histogram<u64>,
    pub read_us: Histogram<u64>,
    /// Items written by the successful writes.
    pub items: u64,
    /// Failed operations by error kind (gRPC code name, ...).
    pub errors: BTreeMap<String, u64>,
}

impl Default for Recorded {
    fn default() -> Self {
        Recorded {
            write_us: new_histogram(),
            read_us: new_histogram(),
            items: 0,
            errors: BTreeMap::new(),
        }
    }
}

impl Recorded {
    pub fn merge(&mut self, other: &Recorded) {
        self.write_us
            .add(&other.write_us)
            .expect("histograms share bounds");
        self.read_us
            .add(&other.read_us)
            .expect("histograms share bounds");
        self.items += other.items;
        for (k, n) in &other.errors {
            *self.errors.entry(k.clone()).or_default() += n;
        }
    }

    pub fn error(&mut self, kind: impl Into<String>) {
        *self.errors.entry(kind.into()).or_default() += 1;
    }
}

/// How the load was generated.
#[derive(Debug, Clone)]
pub struct Load {
    pub system: &'static str,
    pub concurrency: u32,
    pub connections: u32,
    /// Items per write operation (puts per Txn, rows per INSERT transaction).
    pub tx_size: u32,
    pub value_bytes: usize,
    /// 1.0 for a read workload, 0.0 for a write workload.
    pub read_ratio: f64,
    pub preload: u64,
    pub warmup_s: f64,
    pub duration_s: f64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    /// Which system was measured (`etcd`, `postgresql`, `fdatasync`).
    pub system: &'static str,
    /// Always `closed`: a fixed number of operations in flight.
    pub mode: &'static str,
    pub concurrency: Option<u32>,
    pub rate: Option<f64>,
    pub connections: u32,
    pub tx_size: u32,
    pub value_bytes: usize,
    pub read_ratio: f64,
    pub preload: u64,
    pub warmup_s: f64,
    pub duration_s: f64,
    /// The window the rates are computed over.
    pub elapsed_s: f64,
    pub writes: OpReport,
    pub assertions: u64,
    pub assertions_per_s: f64,
    pub reads: OpReport,
    pub errors_total: u64,
    pub errors: BTreeMap<String, u64>,
}

impl Report {
    pub fn new(load: &Load, elapsed_s: f64, r: &Recorded) -> Report {
        assert!(elapsed_s > 0.0, "measured window must be positive");
        Report {
            system: load.system,
            mode: "closed",
            concurrency: Some(load.concurrency),
            rate: None,
            connections: load.connections,
            tx_size: load.tx_size,
            value_bytes: load.value_bytes,
            read_ratio: load.read_ratio,
            preload: load.preload,
            warmup_s: load.warmup_s,
            duration_s: load.duration_s,
            elapsed_s,
            writes: OpReport::of(&r.write_us, elapsed_s),
            assertions: r.items,
            assertions_per_s: r.items as f64 / elapsed_s,
            reads: OpReport::of(&r.read_us, elapsed_s),
            errors_total: r.errors.values().sum(),
            errors: r.errors.clone(),
        }
    }
}
