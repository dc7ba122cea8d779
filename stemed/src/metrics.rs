//! `/metrics`: one Prometheus registry, two sources.
//!
//! - **stemed's own figures** are OpenTelemetry instruments (a request
//!   duration histogram recorded by the gRPC layer in `telemetry.rs`, and
//!   observable gauges and counters read at scrape time) exported through
//!   `opentelemetry-prometheus` into [`registry`].
//! - **walld's figures** come over the WAL socket (`Status`) at scrape time
//!   and are turned into metric families by [`WalCollector`], registered on
//!   the *same* registry. walld has no TCP port, so this is the only place
//!   its figures are exported. If walld cannot be reached within
//!   `WAL_STATUS_TIMEOUT`, the scrape still succeeds and `stemedb_wal_up`
//!   is 0.
//!
//! Why walld's figures bypass OpenTelemetry: `stemedb_wal_fsync_duration_seconds`
//! is a Prometheus *summary* (quantiles 0.5/0.9/0.99 over walld's sliding
//! window), exactly as the slow-fsync runbook reads it. OpenTelemetry has no
//! summary instrument (its histograms are bucketed or exponential), and
//! walld computes the quantiles itself, so the family is written as a
//! `prometheus::proto` summary. The other walld families are already
//! aggregated by walld (cumulative counters, bucketed histograms), and
//! re-recording them through OpenTelemetry instruments would double-count.
//! Prometheus summaries cannot be aggregated across nodes; for that,
//! `stemedb_wal_fsync_latency_seconds` is a histogram of the same samples.
//!
//! Naming: the OpenTelemetry exporter appends the unit (`s` → `_seconds`,
//! `By` → `_bytes`) and `_total` for counters, so instrument names here
//! never carry either (`stemedb_api_request_duration` + unit `s` becomes
//! `stemedb_api_request_duration_seconds`). A test checks the exposition
//! for doubled suffixes.

use crate::admin::AdminState;
use crate::wal_link;
use opentelemetry::metrics::{Histogram, Meter, MeterProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use prometheus::core::{Collector, Desc};
use prometheus::proto::{
    Bucket, Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType, Quantile, Summary,
};
use prometheus::{Encoder, Registry, TextEncoder};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use stemedb_proto::wal::v1 as wal;

/// Bound on the time a scrape waits for walld.
pub const WAL_STATUS_TIMEOUT: Duration = Duration::from_millis(500);

/// Upper bounds (seconds) of the API request duration buckets: 100 µs to 10 s.
pub const REQUEST_DURATION_BUCKETS_SECONDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];

struct Exporter {
    registry: Registry,
    provider: SdkMeterProvider,
    wal: Arc<WalCollector>,
    /// Serialises scrapes: the WAL collector holds one Status at a time.
    scrape: tokio::sync::Mutex<()>,
}

fn exporter() -> &'static Exporter {
    static EXPORTER: OnceLock<Exporter> = OnceLock::new();
    EXPORTER.get_or_init(|| {
        let registry = Registry::new();
        let reader = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .without_target_info()
            .scope_info_enabled(false)
            .build()
            .expect("the Prometheus exporter builds on a fresh registry");
        let provider = SdkMeterProvider::builder().with_reader(reader).build();
        let wal = Arc::new(WalCollector::default());
        let up = Desc::new(
            WAL_UP.to_string(),
            WAL_UP_HELP.to_string(),
            Vec::new(),
            Default::default(),
        )
        .expect("a valid descriptor");
        registry
            .register(Box::new(WalRef(wal.clone(), up)))
            .expect("the WAL collector registers on a fresh registry");
        Exporter {
            registry,
            provider,
            wal,
            scrape: tokio::sync::Mutex::new(()),
        }
    })
}

/// The meter of stemed's own instruments.
pub fn meter() -> Meter {
    exporter().provider.meter("stemed")
}

/// The registry behind `/metrics`.
pub fn registry() -> &'static Registry {
    &exporter().registry
}

/// Request durations by method and gRPC status code, recorded by the gRPC
/// layer (`telemetry::GrpcLayer`).
pub fn request_duration() -> &'static Histogram<f64> {
    static H: OnceLock<Histogram<f64>> = OnceLock::new();
    H.get_or_init(|| {
        meter()
            .f64_histogram("stemedb_api_request_duration")
            .with_unit("s")
            .with_description(
                "gRPC request duration by method and status code (write p99 is Transact).",
            )
            .with_boundaries(REQUEST_DURATION_BUCKETS_SECONDS.to_vec())
            .build()
    })
}

/// Records one finished request.
pub fn observe_request(method: &str, code: &str, seconds: f64) {
    request_duration().record(
        seconds,
        &[
            KeyValue::new("method", method.to_string()),
            KeyValue::new("code", code.to_string()),
        ],
    );
}

/// Observable instruments over the node's state; registered once, read at
/// every scrape. The handles are kept so the callbacks stay registered.
fn register_node_instruments(s: &AdminState) {
    static DONE: OnceLock<Vec<Box<dyn std::any::Any + Send + Sync>>> = OnceLock::new();
    DONE.get_or_init(|| node_instruments(s.clone()));
}

type Read = fn(&AdminState) -> u64;

fn load(a: &std::sync::atomic::AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

fn node_instruments(s: AdminState) -> Vec<Box<dyn std::any::Any + Send + Sync>> {
    let m = meter();
    // (name, unit, help, read): names carry no unit and no `_total`.
    let counters: [(&'static str, &'static str, Read); 6] = [
        (
            "stemedb_assertions_ingested",
            "Assertions committed by this node.",
            |s| load(&s.write_path.counters.assertions_ingested),
        ),
        (
            "stemedb_transactions_committed",
            "Transactions committed by this node.",
            |s| load(&s.write_path.counters.transactions_committed),
        ),
        (
            "stemedb_wal_appends",
            "WAL appends (commit groups) sent by this node; transactions per append shows the batching.",
            |s| load(&s.write_path.counters.wal_appends),
        ),
        (
            "stemedb_api_rate_limited",
            "Requests refused by a rate limit.",
            |s| load(&s.ops.rate_limited),
        ),
        (
            "stemedb_entity_cache_hits",
            "Current-view Gets answered from the entity cache.",
            |s| s.store.cache_stats().0,
        ),
        (
            "stemedb_entity_cache_misses",
            "Current-view Gets that had to scan the store.",
            |s| s.store.cache_stats().1,
        ),
    ];
    let gauges: [(&'static str, &'static str, &'static str, Read); 11] = [
        (
            "stemedb_write_bytes_in_flight",
            "",
            "Write bytes admitted and not yet answered (backpressure signal).",
            |s| load(&s.write_path.counters.write_bytes_in_flight),
        ),
        (
            "stemedb_writes_in_flight",
            "",
            "Transactions admitted and not yet answered.",
            |s| load(&s.write_path.counters.writes_in_flight),
        ),
        (
            "stemedb_write_queue_depth",
            "",
            "Transactions waiting for the batcher (backpressure signal).",
            |s| s.write_path.queue_depth() as u64,
        ),
        (
            "stemedb_applied_lsn",
            "",
            "Highest LSN applied to the store.",
            |s| s.store.applied_lsn(),
        ),
        (
            "stemedb_apply_lag_records",
            "",
            "Durable WAL records not yet applied to the store (durable_lsn - applied_lsn).",
            |s| {
                s.write_path
                    .link_status()
                    .durable_lsn
                    .saturating_sub(s.store.applied_lsn())
            },
        ),
        (
            "stemedb_checkpoint_flushed_lsn",
            "",
            "applied_lsn made durable in sled by the last checkpoint.",
            |s| load(&s.checkpoints.flushed_lsn),
        ),
        (
            "stemedb_storage",
            "By",
            "Size of the sled store on disk.",
            |s| s.store.size_on_disk(),
        ),
        ("stemedb_watch_streams", "", "Open Watch streams.", |s| {
            s.hub.streams()
        }),
        (
            "stemedb_wal_connected",
            "",
            "1 when this node's writer session with walld is serving.",
            |s| {
                u64::from(s.write_path.link_status().state == crate::write_path::LinkState::Serving)
            },
        ),
        (
            "stemedb_node_draining",
            "",
            "1 while the node is draining.",
            |s| u64::from(s.ops.draining()),
        ),
        (
            "stemedb_uptime",
            "s",
            "Seconds since stemed started.",
            |s| s.started.elapsed().as_secs(),
        ),
    ];
    let mut kept: Vec<Box<dyn std::any::Any + Send + Sync>> = Vec::new();
    for (name, help, read) in counters {
        let s = s.clone();
        kept.push(Box::new(
            m.u64_observable_counter(name)
                .with_description(help)
                .with_callback(move |o| o.observe(read(&s), &[]))
                .build(),
        ));
    }
    for (name, unit, help, read) in gauges {
        let s = s.clone();
        let mut b = m
            .u64_observable_gauge(name)
            .with_description(help)
            .with_callback(move |o| o.observe(read(&s), &[]));
        if !unit.is_empty() {
            b = b.with_unit(unit);
        }
        kept.push(Box::new(b.build()));
    }
    kept
}

/// Renders the whole exposition: walld's Status is fetched first (async),
/// then the registry is gathered once.
pub async fn render(s: &AdminState) -> String {
    register_node_instruments(s);
    let e = exporter();
    let _one_scrape = e.scrape.lock().await;
    let status = match wal_link::status(&s.wal_socket, WAL_STATUS_TIMEOUT).await {
        Ok(status) => Some(status),
        Err(err) => {
            tracing::debug!(error = %err, "walld Status failed during scrape");
            None
        }
    };
    e.wal.set(status);
    let families = e.registry.gather();
    let mut out = Vec::new();
    if let Err(err) = TextEncoder::new().encode(&families, &mut out) {
        tracing::warn!(error = %err, "cannot encode metrics");
    }
    String::from_utf8(out).unwrap_or_default()
}

/// walld's figures from the last Status; `None` when walld did not answer.
#[derive(Default)]
pub struct WalCollector {
    status: Mutex<Option<wal::StatusResponse>>,
}

impl WalCollector {
    fn set(&self, status: Option<wal::StatusResponse>) {
        *self.status.lock().unwrap_or_else(|p| p.into_inner()) = status;
    }
}

const WAL_UP: &str = "stemedb_wal_up";
const WAL_UP_HELP: &str = "1 when walld answered Status for this scrape.";

/// The registry owns its collectors; this shares one with the exporter.
struct WalRef(Arc<WalCollector>, Desc);

impl Collector for WalRef {
    fn desc(&self) -> Vec<&Desc> {
        // The other families are built per scrape from Status; one
        // descriptor is enough to give this collector its own identity
        // next to the OpenTelemetry collector, which declares none.
        vec![&self.1]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let status = self.0.status.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = vec![family(
            WAL_UP,
            WAL_UP_HELP,
            MetricType::GAUGE,
            vec![gauge(&[], if status.is_some() { 1.0 } else { 0.0 })],
        )];
        if let Some(st) = status.as_ref() {
            wal_families(st, &mut out);
        }
        out
    }
}

fn family(name: &str, help: &str, kind: MetricType, metrics: Vec<Metric>) -> MetricFamily {
    assert!(!help.is_empty(), "family {name} has no HELP text");
    let mut f = MetricFamily::default();
    f.set_name(name.to_string());
    f.set_help(help.to_string());
    f.set_field_type(kind);
    f.set_metric(metrics);
    f
}

fn labels(pairs: &[(&str, &str)]) -> Vec<LabelPair> {
    pairs
        .iter()
        .map(|(k, v)| {
            let mut l = LabelPair::default();
            l.set_name(k.to_string());
            l.set_value(v.to_string());
            l
        })
        .collect()
}

fn gauge(pairs: &[(&str, &str)], value: f64) -> Metric {
    let mut g = Gauge::default();
    g.set_value(value);
    let mut m = Metric::from_gauge(g);
    m.set_label(labels(pairs));
    m
}

fn counter(pairs: &[(&str, &str)], value: f64) -> Metric {
    let mut c = Counter::default();
    c.set_value(value);
    let mut m = Metric::from_label(labels(pairs));
    m.set_counter(c);
    m
}

fn histogram(h: &wal::Histogram) -> Metric {
    let mut p = prometheus::proto::Histogram::default();
    p.set_sample_count(h.count);
    p.set_sample_sum(h.sum);
    // The encoder writes the `+Inf` bucket itself from the sample count.
    p.set_bucket(
        h.buckets
            .iter()
            .filter(|b| b.upper_bound.is_finite())
            .map(|b| {
                let mut bucket = Bucket::default();
                bucket.set_upper_bound(b.upper_bound);
                bucket.set_cumulative_count(b.cumulative_count);
                bucket
            })
            .collect(),
    );
    let mut m = Metric::default();
    m.set_histogram(p);
    m
}

fn fsync_summary(st: &wal::StatusResponse) -> Metric {
    let mut s = Summary::default();
    s.set_sample_sum(st.fsync_duration_window_sum_seconds);
    s.set_sample_count(st.fsync_duration_window_count);
    s.set_quantile(
        st.fsync_duration_quantiles
            .iter()
            .map(|q| {
                let mut p = Quantile::default();
                p.set_quantile(q.quantile);
                p.set_value(q.value);
                p
            })
            .collect(),
    );
    let mut m = Metric::default();
    m.set_summary(s);
    m
}

fn wal_families(st: &wal::StatusResponse, out: &mut Vec<MetricFamily>) {
    use MetricType::{COUNTER, GAUGE, HISTOGRAM, SUMMARY};
    out.push(family(
        "stemedb_wal_fsync_duration_seconds",
        "WAL fsync duration over walld's sliding window (default 10 min).",
        SUMMARY,
        vec![fsync_summary(st)],
    ));
    let histograms = [
        (
            "stemedb_wal_fsync_latency_seconds",
            "WAL fsync latency (aggregatable across nodes).",
            &st.fsync_latency_seconds,
        ),
        (
            "stemedb_wal_group_records",
            "Records per commit group.",
            &st.group_records,
        ),
        (
            "stemedb_wal_group_bytes",
            "Bytes per commit group.",
            &st.group_bytes,
        ),
        (
            "stemedb_wal_segment_rotation_seconds",
            "Time an append waited for segment rotation.",
            &st.segment_rotation_seconds,
        ),
    ];
    for (name, help, h) in histograms {
        if let Some(h) = h {
            out.push(family(name, help, HISTOGRAM, vec![histogram(h)]));
        }
    }
    let counters = [
        (
            "stemedb_wal_fsync_total",
            "WAL fsyncs since walld started.",
            st.fsync_count,
        ),
        (
            "stemedb_wal_fsync_errors_total",
            "WAL fsync errors since walld started (each one stops walld).",
            st.fsync_errors,
        ),
        (
            "stemedb_wal_write_bytes_total",
            "Bytes written to WAL segments.",
            st.write_bytes,
        ),
        (
            "stemedb_wal_archive_failures_total",
            "WAL archive uploads or verifications that failed (each retried).",
            st.archive_failures_total,
        ),
    ];
    for (name, help, v) in counters {
        out.push(family(name, help, COUNTER, vec![counter(&[], v as f64)]));
    }
    let gauges = [
        (
            "stemedb_wal_queue_depth",
            "Appends waiting for walld's writer.",
            st.queue_depth,
        ),
        (
            "stemedb_wal_segments",
            "WAL segment files.",
            st.segment_count,
        ),
        (
            "stemedb_wal_segment_bytes",
            "Bytes of WAL segment files.",
            st.segment_bytes,
        ),
        (
            "stemedb_wal_durable_lsn",
            "Highest durable LSN.",
            st.durable_lsn,
        ),
        (
            "stemedb_wal_first_lsn",
            "First LSN still held.",
            st.first_lsn,
        ),
        (
            "stemedb_wal_fs_free_bytes",
            "Free bytes of the WAL filesystem.",
            st.fs_free_bytes,
        ),
        (
            "stemedb_wal_archive_lag_segments",
            "Sealed WAL segments not yet archived.",
            st.archive_lag_segments,
        ),
        (
            "stemedb_wal_archived_lsn",
            "Every record at or below this LSN is archived and verified.",
            st.archived_lsn,
        ),
    ];
    for (name, help, v) in gauges {
        out.push(family(name, help, GAUGE, vec![gauge(&[], v as f64)]));
    }
    let current = wal::WalState::try_from(st.state).unwrap_or(wal::WalState::Unspecified);
    let states = [
        (wal::WalState::Serving, "serving"),
        (wal::WalState::Failed, "failed"),
        (wal::WalState::DiskFull, "disk_full"),
    ]
    .iter()
    .map(|(state, name)| gauge(&[("state", name)], f64::from(u8::from(current == *state))))
    .collect();
    out.push(family(
        "stemedb_wal_state",
        "1 for walld's current state.",
        GAUGE,
        states,
    ));
    if !st.errors.is_empty() {
        let errors = st
            .errors
            .iter()
            .map(|e| counter(&[("kind", &e.kind)], e.count as f64))
            .collect();
        out.push(family(
            "stemedb_wal_errors_total",
            "walld errors by kind.",
            COUNTER,
            errors,
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(families: &[MetricFamily]) -> String {
        let mut out = Vec::new();
        TextEncoder::new().encode(families, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn summary_lines_have_the_runbook_form() {
        let st = wal::StatusResponse {
            fsync_duration_quantiles: vec![
                wal::Quantile {
                    quantile: 0.5,
                    value: 0.001,
                },
                wal::Quantile {
                    quantile: 0.9,
                    value: 0.01,
                },
                wal::Quantile {
                    quantile: 0.99,
                    value: 0.15,
                },
            ],
            fsync_latency_seconds: Some(wal::Histogram {
                buckets: vec![
                    wal::HistogramBucket {
                        upper_bound: 0.001,
                        cumulative_count: 1,
                    },
                    wal::HistogramBucket {
                        upper_bound: f64::INFINITY,
                        cumulative_count: 2,
                    },
                ],
                count: 2,
                sum: 0.2,
            }),
            ..Default::default()
        };
        let mut families = Vec::new();
        wal_families(&st, &mut families);
        let text = encode(&families);
        for line in [
            "stemedb_wal_fsync_duration_seconds{quantile=\"0.5\"} 0.001\n",
            "stemedb_wal_fsync_duration_seconds{quantile=\"0.9\"} 0.01\n",
            "stemedb_wal_fsync_duration_seconds{quantile=\"0.99\"} 0.15\n",
            "# TYPE stemedb_wal_fsync_duration_seconds summary\n",
            "stemedb_wal_fsync_latency_seconds_bucket{le=\"+Inf\"} 2\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(!text.contains("inf\""), "{text}");
    }

    #[test]
    fn otel_names_get_one_unit_suffix_and_one_total() {
        observe_request("Transact", "OK", 0.003);
        let text = encode(&registry().gather());
        assert!(
            text.contains("# TYPE stemedb_api_request_duration_seconds histogram"),
            "{text}"
        );
        assert!(!text.contains("_seconds_seconds"), "{text}");
        assert!(!text.contains("_total_total"), "{text}");
        assert!(text.contains("stemedb_wal_up 0"), "{text}");
    }
}
