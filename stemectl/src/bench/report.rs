//! The final `bench` report, as text or one JSON object.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use super::stats::{Percentiles, Recorded};
use super::Plan;

/// Microseconds as milliseconds with three decimals.
pub fn ms(us: u64) -> String {
    format!("{:.3}ms", us as f64 / 1000.0)
}

#[derive(Debug, Serialize)]
pub struct OpReport {
    /// Successful operations in the measured window.
    pub count: u64,
    pub per_s: f64,
    /// Latency of successful operations, in microseconds.
    pub latency_us: Option<Percentiles>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    /// `closed` (fixed concurrency) or `open` (fixed rate).
    pub mode: &'static str,
    pub concurrency: Option<u32>,
    pub rate: Option<f64>,
    pub connections: u32,
    pub tx_size: u32,
    pub value_bytes: usize,
    pub read_ratio: f64,
    pub preload: u64,
    pub warmup_s: f64,
    /// The requested measured window.
    pub duration_s: f64,
    /// The window the rates are computed over: `duration_s`, stretched to
    /// the completion of the last measured operation.
    pub elapsed_s: f64,
    pub seed: u64,
    pub writes: OpReport,
    pub assertions: u64,
    pub assertions_per_s: f64,
    pub reads: OpReport,
    pub errors_total: u64,
    /// Failed operations by gRPC code name (or `Transport`).
    pub errors: BTreeMap<String, u64>,
}

impl Report {
    pub fn new(plan: &Plan, elapsed_secs: f64, r: &Recorded) -> Report {
        assert!(elapsed_secs > 0.0, "measured window must be positive");
        let op = |h: &hdrhistogram::Histogram<u64>| OpReport {
            count: h.len(),
            per_s: h.len() as f64 / elapsed_secs,
            latency_us: Percentiles::of(h),
        };
        Report {
            mode: if plan.rate.is_some() {
                "open"
            } else {
                "closed"
            },
            concurrency: plan.rate.is_none().then_some(plan.concurrency),
            rate: plan.rate,
            connections: plan.connections,
            tx_size: plan.shape.tx_size,
            value_bytes: plan.shape.value_bytes,
            read_ratio: plan.shape.read_ratio,
            preload: plan.preload,
            warmup_s: plan.warmup.as_secs_f64(),
            duration_s: plan.duration.as_secs_f64(),
            elapsed_s: elapsed_secs,
            seed: plan.seed,
            writes: op(&r.write_us),
            assertions: r.assertions,
            assertions_per_s: r.assertions as f64 / elapsed_secs,
            reads: op(&r.read_us),
            errors_total: r.errors_total(),
            errors: r.errors.clone(),
        }
    }

    pub fn to_text(&self) -> String {
        let mut t = String::new();
        let load = match (self.mode, self.rate, self.concurrency) {
            ("open", Some(rate), _) => format!("open loop at {rate} ops/s"),
            (_, _, Some(c)) => format!("closed loop, concurrency {c}"),
            _ => "unknown load".into(),
        };
        let _ = writeln!(
            t,
            "bench: {load} over {} connection(s); {:.1} s measured after {:.1} s warmup; seed {}",
            self.connections, self.duration_s, self.warmup_s, self.seed
        );
        if self.elapsed_s > self.duration_s * 1.05 {
            let _ = writeln!(
                t,
                "note: the last measured operation finished {:.1} s after the window closed; rates are over {:.1} s",
                self.elapsed_s - self.duration_s,
                self.elapsed_s
            );
        }
        let _ = writeln!(
            t,
            "writes: {} tx ({:.1} tx/s), {} assertions ({:.1} assertions/s), {} per tx, {} value bytes",
            self.writes.count, self.writes.per_s, self.assertions, self.assertions_per_s, self.tx_size, self.value_bytes
        );
        let _ = writeln!(
            t,
            "reads:  {} gets ({:.1} reads/s), read ratio {}",
            self.reads.count, self.reads.per_s, self.read_ratio
        );
        let _ = writeln!(
            t,
            "{:<8}{:>12}{:>12}{:>12}{:>12}{:>12}",
            "latency", "p50", "p90", "p99", "p99.9", "max"
        );
        for (name, op) in [("write", &self.writes), ("read", &self.reads)] {
            match &op.latency_us {
                Some(p) => {
                    let _ = writeln!(
                        t,
                        "{name:<8}{:>12}{:>12}{:>12}{:>12}{:>12}",
                        ms(p.p50),
                        ms(p.p90),
                        ms(p.p99),
                        ms(p.p999),
                        ms(p.max)
                    );
                }
                None => {
                    let _ = writeln!(t, "{name:<8}{:>12}", "-");
                }
            }
        }
        if self.errors.is_empty() {
            let _ = writeln!(t, "errors: none");
        } else {
            let by_code: Vec<String> = self
                .errors
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            let _ = writeln!(t, "errors: {} ({})", self.errors_total, by_code.join(", "));
        }
        t
    }
}
