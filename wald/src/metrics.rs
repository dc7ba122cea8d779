//! Counters and histograms reported by Status. Knows nothing of gRPC.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Upper bounds (seconds) of the fsync and rotation latency buckets.
pub const LATENCY_BUCKETS_SECONDS: &[f64] = &[
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    f64::INFINITY,
];
/// Upper bounds of the records-per-group buckets.
pub const GROUP_RECORDS_BUCKETS: &[f64] = &[
    1.0,
    2.0,
    4.0,
    8.0,
    16.0,
    32.0,
    64.0,
    128.0,
    256.0,
    512.0,
    1024.0,
    4096.0,
    16384.0,
    f64::INFINITY,
];
/// Upper bounds of the bytes-per-group buckets.
pub const GROUP_BYTES_BUCKETS: &[f64] = &[
    256.0,
    1024.0,
    4096.0,
    16384.0,
    65536.0,
    262144.0,
    1048576.0,
    4194304.0,
    16777216.0,
    f64::INFINITY,
];

/// A fixed-bucket histogram (non-cumulative counts internally).
#[derive(Debug, Clone)]
pub struct Histogram {
    pub bounds: &'static [f64],
    pub counts: Vec<u64>,
    pub count: u64,
    pub sum: f64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        assert_eq!(bounds.last().copied(), Some(f64::INFINITY));
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            count: 0,
            sum: 0.0,
        }
    }

    pub fn observe(&mut self, value: f64) {
        let index = self
            .bounds
            .iter()
            .position(|b| value <= *b)
            .unwrap_or(self.bounds.len() - 1);
        self.counts[index] += 1;
        self.count += 1;
        self.sum += value;
    }

    /// (upper bound, cumulative count) pairs.
    pub fn cumulative(&self) -> Vec<(f64, u64)> {
        let mut total = 0;
        self.bounds
            .iter()
            .zip(&self.counts)
            .map(|(b, c)| {
                total += c;
                (*b, total)
            })
            .collect()
    }
}

/// fsync durations over a sliding time window, in a bounded ring buffer.
#[derive(Debug)]
struct Window {
    samples: VecDeque<(Instant, f64)>,
    samples_max: usize,
    window: Duration,
}

impl Window {
    fn push(&mut self, now: Instant, seconds: f64) {
        if self.samples.len() == self.samples_max {
            self.samples.pop_front();
        }
        self.samples.push_back((now, seconds));
        assert!(self.samples.len() <= self.samples_max);
    }

    fn recent(&self, now: Instant) -> Vec<f64> {
        self.samples
            .iter()
            .filter(|(t, _)| now.saturating_duration_since(*t) <= self.window)
            .map(|(_, s)| *s)
            .collect()
    }
}

/// A snapshot of the fsync window: quantiles, sum and count.
#[derive(Debug, Clone, Default)]
pub struct WindowSummary {
    pub quantiles: Vec<(f64, f64)>,
    pub sum: f64,
    pub count: u64,
}

#[derive(Debug)]
struct Histograms {
    fsync: Histogram,
    rotation: Histogram,
    group_records: Histogram,
    group_bytes: Histogram,
    window: Window,
    errors: BTreeMap<&'static str, u64>,
}

/// All metrics of one walld.
#[derive(Debug)]
pub struct Metrics {
    pub fsync_count: AtomicU64,
    pub fsync_errors: AtomicU64,
    pub write_bytes: AtomicU64,
    pub queue_depth: AtomicU64,
    fsync_nanos_total: AtomicU64,
    histograms: Mutex<Histograms>,
}

impl Metrics {
    pub fn new(window: Duration, samples_max: usize) -> Self {
        assert!(samples_max > 0);
        Metrics {
            fsync_count: AtomicU64::new(0),
            fsync_errors: AtomicU64::new(0),
            write_bytes: AtomicU64::new(0),
            queue_depth: AtomicU64::new(0),
            fsync_nanos_total: AtomicU64::new(0),
            histograms: Mutex::new(Histograms {
                fsync: Histogram::new(LATENCY_BUCKETS_SECONDS),
                rotation: Histogram::new(LATENCY_BUCKETS_SECONDS),
                group_records: Histogram::new(GROUP_RECORDS_BUCKETS),
                group_bytes: Histogram::new(GROUP_BYTES_BUCKETS),
                window: Window {
                    samples: VecDeque::with_capacity(samples_max.min(4096)),
                    samples_max,
                    window,
                },
                errors: BTreeMap::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Histograms> {
        self.histograms.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn observe_fsync(&self, duration: Duration) {
        let seconds = duration.as_secs_f64();
        self.fsync_count.fetch_add(1, Ordering::Relaxed);
        self.fsync_nanos_total
            .fetch_add(duration.as_nanos() as u64, Ordering::Relaxed);
        let mut h = self.lock();
        h.fsync.observe(seconds);
        h.window.push(Instant::now(), seconds);
    }

    pub fn observe_rotation(&self, duration: Duration) {
        self.lock().rotation.observe(duration.as_secs_f64());
    }

    pub fn observe_group(&self, records: usize, bytes: usize) {
        let mut h = self.lock();
        h.group_records.observe(records as f64);
        h.group_bytes.observe(bytes as f64);
    }

    pub fn count_error(&self, kind: &'static str) {
        *self.lock().errors.entry(kind).or_insert(0) += 1;
    }

    pub fn fsync_seconds_total(&self) -> f64 {
        self.fsync_nanos_total.load(Ordering::Relaxed) as f64 / 1e9
    }

    pub fn errors(&self) -> Vec<(&'static str, u64)> {
        self.lock().errors.iter().map(|(k, v)| (*k, *v)).collect()
    }

    /// (fsync, rotation, group_records, group_bytes) histograms.
    pub fn histograms(&self) -> [Histogram; 4] {
        let h = self.lock();
        [
            h.fsync.clone(),
            h.rotation.clone(),
            h.group_records.clone(),
            h.group_bytes.clone(),
        ]
    }

    /// Quantiles 0.5, 0.9 and 0.99 of the fsync durations in the window.
    pub fn fsync_window(&self) -> WindowSummary {
        let mut recent = self.lock().window.recent(Instant::now());
        recent.sort_by(f64::total_cmp);
        let quantile = |q: f64| -> f64 {
            if recent.is_empty() {
                return 0.0;
            }
            let rank = ((q * recent.len() as f64).ceil() as usize).clamp(1, recent.len());
            recent[rank - 1]
        };
        WindowSummary {
            quantiles: [0.5, 0.9, 0.99]
                .iter()
                .map(|q| (*q, quantile(*q)))
                .collect(),
            sum: recent.iter().sum(),
            count: recent.len() as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let mut h = Histogram::new(LATENCY_BUCKETS_SECONDS);
        h.observe(0.00001);
        h.observe(0.003);
        h.observe(100.0);
        let c = h.cumulative();
        assert_eq!(c[0], (0.00005, 1));
        assert_eq!(c.last().copied(), Some((f64::INFINITY, 3)));
    }

    #[test]
    fn window_is_bounded() {
        let m = Metrics::new(Duration::from_secs(600), 10);
        for i in 0..100 {
            m.observe_fsync(Duration::from_millis(i));
        }
        let w = m.fsync_window();
        assert_eq!(w.count, 10);
        assert!((w.quantiles[0].1 - 0.094).abs() < 1e-9);
    }
}
