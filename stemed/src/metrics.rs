//! `/metrics`: Prometheus text exposition of stemed's own figures and of
//! walld's, which stemed fetches over the WAL socket (`Status`) at scrape
//! time. walld has no TCP port, so this is the only place its figures are
//! exported. If walld cannot be reached within `WAL_STATUS_TIMEOUT`, the
//! scrape still succeeds and `stemedb_wal_up` is 0.
//!
//! `stemedb_wal_fsync_duration_seconds` is a *summary* (quantiles over
//! walld's sliding window), exactly as the slow-fsync runbook reads it.
//! Prometheus summaries cannot be aggregated across nodes; for that,
//! `stemedb_wal_fsync_latency_seconds` is a histogram of the same samples.

use crate::admin::AdminState;
use crate::wal_link;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::time::Duration;
use stemedb_proto::wal::v1 as wal;

/// Bound on the time a scrape waits for walld.
pub const WAL_STATUS_TIMEOUT: Duration = Duration::from_millis(500);

/// A small builder for the text format: `# HELP`, `# TYPE`, then samples.
#[derive(Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", format_value(value));
    }

    pub fn single(&mut self, name: &str, kind: &str, help: &str, value: f64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    pub fn histogram(&mut self, name: &str, help: &str, h: &wal::Histogram) {
        self.family(name, "histogram", help);
        let bucket = format!("{name}_bucket");
        for b in &h.buckets {
            let le = if b.upper_bound.is_infinite() {
                "+Inf".to_string()
            } else {
                format_value(b.upper_bound)
            };
            self.sample(&bucket, &[("le", &le)], b.cumulative_count as f64);
        }
        if !h.buckets.iter().any(|b| b.upper_bound.is_infinite()) {
            self.sample(&bucket, &[("le", "+Inf")], h.count as f64);
        }
        self.sample(&format!("{name}_sum"), &[], h.sum);
        self.sample(&format!("{name}_count"), &[], h.count as f64);
    }

    pub fn finish(self) -> String {
        self.out
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn format_value(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_string()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

pub async fn render(s: &AdminState) -> String {
    let mut e = Exposition::default();
    stemed_figures(&mut e, s);
    match wal_link::status(&s.wal_socket, WAL_STATUS_TIMEOUT).await {
        Ok(status) => {
            e.single(
                "stemedb_wal_up",
                "gauge",
                "1 when walld answered Status for this scrape.",
                1.0,
            );
            wal_figures(&mut e, &status);
        }
        Err(err) => {
            tracing::debug!(error = %err, "walld Status failed during scrape");
            e.single(
                "stemedb_wal_up",
                "gauge",
                "1 when walld answered Status for this scrape.",
                0.0,
            );
        }
    }
    e.finish()
}

fn stemed_figures(e: &mut Exposition, s: &AdminState) {
    let c = &s.write_path.counters;
    let link = s.write_path.link_status();
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64;
    e.single(
        "stemedb_assertions_ingested_total",
        "counter",
        "Assertions committed by this node.",
        load(&c.assertions_ingested),
    );
    e.single(
        "stemedb_transactions_committed_total",
        "counter",
        "Transactions committed by this node.",
        load(&c.transactions_committed),
    );
    e.single(
        "stemedb_wal_appends_total",
        "counter",
        "WAL appends (commit groups) sent by this node; transactions per append shows the batching.",
        load(&c.wal_appends),
    );
    e.single(
        "stemedb_write_bytes_in_flight",
        "gauge",
        "Write bytes admitted and not yet answered (backpressure signal).",
        load(&c.write_bytes_in_flight),
    );
    e.single(
        "stemedb_writes_in_flight",
        "gauge",
        "Transactions admitted and not yet answered.",
        load(&c.writes_in_flight),
    );
    e.single(
        "stemedb_write_queue_depth",
        "gauge",
        "Transactions waiting for the batcher (backpressure signal).",
        s.write_path.queue_depth() as f64,
    );
    e.single(
        "stemedb_applied_lsn",
        "gauge",
        "Highest LSN applied to the store.",
        s.store.applied_lsn() as f64,
    );
    e.single(
        "stemedb_apply_lag_records",
        "gauge",
        "Durable WAL records not yet applied to the store.",
        link.durable_lsn.saturating_sub(s.store.applied_lsn()) as f64,
    );
    e.single(
        "stemedb_checkpoint_flushed_lsn",
        "gauge",
        "applied_lsn made durable in sled by the last checkpoint.",
        load(&s.checkpoints.flushed_lsn),
    );
    e.single(
        "stemedb_storage_bytes",
        "gauge",
        "Size of the sled store on disk.",
        s.store.size_on_disk() as f64,
    );
    e.single(
        "stemedb_watch_streams",
        "gauge",
        "Open Watch streams.",
        s.hub.streams() as f64,
    );
    e.single(
        "stemedb_wal_connected",
        "gauge",
        "1 when this node's writer session with walld is serving.",
        f64::from(u8::from(
            link.state == crate::write_path::LinkState::Serving,
        )),
    );
}

fn wal_figures(e: &mut Exposition, st: &wal::StatusResponse) {
    e.family(
        "stemedb_wal_fsync_duration_seconds",
        "summary",
        "WAL fsync duration over walld's sliding window (default 10 min).",
    );
    for q in &st.fsync_duration_quantiles {
        let label = format_value(q.quantile);
        e.sample(
            "stemedb_wal_fsync_duration_seconds",
            &[("quantile", &label)],
            q.value,
        );
    }
    e.sample(
        "stemedb_wal_fsync_duration_seconds_sum",
        &[],
        st.fsync_duration_window_sum_seconds,
    );
    e.sample(
        "stemedb_wal_fsync_duration_seconds_count",
        &[],
        st.fsync_duration_window_count as f64,
    );
    if let Some(h) = &st.fsync_latency_seconds {
        e.histogram(
            "stemedb_wal_fsync_latency_seconds",
            "WAL fsync latency (aggregatable across nodes).",
            h,
        );
    }
    e.single(
        "stemedb_wal_fsync_total",
        "counter",
        "WAL fsyncs since walld started.",
        st.fsync_count as f64,
    );
    e.single(
        "stemedb_wal_fsync_errors_total",
        "counter",
        "WAL fsync errors since walld started (each one stops walld).",
        st.fsync_errors as f64,
    );
    e.single(
        "stemedb_wal_write_bytes_total",
        "counter",
        "Bytes written to WAL segments.",
        st.write_bytes as f64,
    );
    if let Some(h) = &st.group_records {
        e.histogram("stemedb_wal_group_records", "Records per commit group.", h);
    }
    if let Some(h) = &st.group_bytes {
        e.histogram("stemedb_wal_group_bytes", "Bytes per commit group.", h);
    }
    if let Some(h) = &st.segment_rotation_seconds {
        e.histogram(
            "stemedb_wal_segment_rotation_seconds",
            "Time an append waited for segment rotation.",
            h,
        );
    }
    e.single(
        "stemedb_wal_queue_depth",
        "gauge",
        "Appends waiting for walld's writer.",
        st.queue_depth as f64,
    );
    e.single(
        "stemedb_wal_segments",
        "gauge",
        "WAL segment files.",
        st.segment_count as f64,
    );
    e.single(
        "stemedb_wal_segment_bytes",
        "gauge",
        "Bytes of WAL segment files.",
        st.segment_bytes as f64,
    );
    e.single(
        "stemedb_wal_durable_lsn",
        "gauge",
        "Highest durable LSN.",
        st.durable_lsn as f64,
    );
    e.single(
        "stemedb_wal_first_lsn",
        "gauge",
        "First LSN still held.",
        st.first_lsn as f64,
    );
    e.single(
        "stemedb_wal_fs_free_bytes",
        "gauge",
        "Free bytes of the WAL filesystem.",
        st.fs_free_bytes as f64,
    );
    e.family("stemedb_wal_state", "gauge", "1 for walld's current state.");
    let current = wal::WalState::try_from(st.state).unwrap_or(wal::WalState::Unspecified);
    for (state, name) in [
        (wal::WalState::Serving, "serving"),
        (wal::WalState::Failed, "failed"),
        (wal::WalState::DiskFull, "disk_full"),
    ] {
        e.sample(
            "stemedb_wal_state",
            &[("state", name)],
            f64::from(u8::from(current == state)),
        );
    }
    e.family(
        "stemedb_wal_errors_total",
        "counter",
        "walld errors by kind.",
    );
    for err in &st.errors {
        e.sample(
            "stemedb_wal_errors_total",
            &[("kind", &err.kind)],
            err.count as f64,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_lines_have_the_runbook_form() {
        let mut e = Exposition::default();
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
            ..Default::default()
        };
        wal_figures(&mut e, &st);
        let text = e.finish();
        assert!(
            text.contains("stemedb_wal_fsync_duration_seconds{quantile=\"0.5\"} 0.001\n"),
            "{text}"
        );
        assert!(
            text.contains("stemedb_wal_fsync_duration_seconds{quantile=\"0.99\"} 0.15\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE stemedb_wal_fsync_duration_seconds summary"));
    }
}
