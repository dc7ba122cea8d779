//! The gRPC layer: the only module that knows tonic and protobuf types.
//! It validates requests into domain calls and maps `WalError` to `Status`
//! in exactly one place (`to_status`).

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use stemedb_proto::wal::v1 as pb;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};

use crate::config::Config;
use crate::error::WalError;
use crate::group_commit::{Committer, WalState};
use crate::log::{self, LogReader};
use crate::metrics::{Histogram, Metrics};
use crate::privilege::PeerPolicy;
use crate::segment::SegmentIndex;

/// Records in one streamed Read message, at most.
const READ_RECORDS_PER_MESSAGE_MAX: usize = 16 * 1024;
/// Streamed Read messages buffered per stream, at most.
const READ_MESSAGES_BUFFERED_MAX: usize = 4;
/// Protobuf overhead allowed on top of `append_bytes_max`.
pub const MESSAGE_OVERHEAD_BYTES: usize = 64 * 1024;

/// The one mapping from domain errors to gRPC status codes.
pub fn to_status(error: WalError, metrics: &Metrics) -> Status {
    metrics.count_error(error.kind());
    let message = error.to_string();
    match error {
        WalError::InvalidArgument(_) => Status::invalid_argument(message),
        WalError::ResourceExhausted(_) | WalError::DiskFull(_) => {
            Status::resource_exhausted(message)
        }
        WalError::Fenced { .. } | WalError::NoWriter => Status::failed_precondition(message),
        WalError::OutOfRange { .. } => Status::out_of_range(message),
        WalError::FsyncFailed(_) | WalError::Failed(_) | WalError::ShuttingDown => {
            Status::unavailable(message)
        }
        WalError::Corrupt { .. } => Status::data_loss(message),
        WalError::Io { .. } => Status::internal(message),
    }
}

/// The Wal service.
pub struct WalService {
    committer: Committer,
    index: Arc<SegmentIndex>,
    config: Arc<Config>,
    /// Becomes true at shutdown; ends `follow` streams.
    shutdown: watch::Receiver<bool>,
}

impl WalService {
    pub fn new(
        committer: Committer,
        index: Arc<SegmentIndex>,
        config: Arc<Config>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        WalService {
            committer,
            index,
            config,
            shutdown,
        }
    }

    fn metrics(&self) -> &Metrics {
        &self.committer.shared().metrics
    }

    fn err(&self, error: WalError) -> Status {
        if matches!(
            error,
            WalError::Io { .. } | WalError::Failed(_) | WalError::Corrupt { .. }
        ) {
            tracing::error!(%error, "request failed");
        }
        to_status(error, self.metrics())
    }

    /// The largest gRPC message walld accepts: one Append.
    pub fn decoding_bytes_max(config: &Config) -> usize {
        config.append_bytes_max as usize + MESSAGE_OVERHEAD_BYTES
    }

    /// The largest gRPC message walld sends: one Read message, which may
    /// hold a single record as large as one Append.
    pub fn encoding_bytes_max(config: &Config) -> usize {
        config.append_bytes_max.max(config.read_message_bytes_max) as usize + MESSAGE_OVERHEAD_BYTES
    }
}

#[tonic::async_trait]
impl pb::wal_server::Wal for WalService {
    async fn open_writer(
        &self,
        request: Request<pb::OpenWriterRequest>,
    ) -> Result<Response<pb::OpenWriterResponse>, Status> {
        let writer_id = request.into_inner().writer_id;
        let (epoch, durable_lsn) = self
            .committer
            .open_writer(writer_id)
            .await
            .map_err(|e| self.err(e))?;
        Ok(Response::new(pb::OpenWriterResponse { epoch, durable_lsn }))
    }

    async fn append(
        &self,
        request: Request<pb::AppendRequest>,
    ) -> Result<Response<pb::AppendResponse>, Status> {
        let deadline = grpc_timeout(&request);
        // The caller's trace continues here; the writer's `wal.group` span
        // picks this one up as the current span of the queued job.
        let span = crate::telemetry::request_span("wal.append", request.metadata());
        let request = request.into_inner();
        let records: Vec<Bytes> = request.records.into_iter().map(Bytes::from).collect();
        let ack = tracing::Instrument::instrument(
            self.committer
                .append(request.epoch, records, request.no_sync, deadline),
            span,
        )
        .await
        .map_err(|e| self.err(e))?;
        Ok(Response::new(pb::AppendResponse {
            first_lsn: ack.first_lsn,
            last_lsn: ack.last_lsn,
            durable_lsn: ack.durable_lsn,
        }))
    }

    async fn sync(
        &self,
        _request: Request<pb::SyncRequest>,
    ) -> Result<Response<pb::SyncResponse>, Status> {
        let durable_lsn = self.committer.sync().await.map_err(|e| self.err(e))?;
        Ok(Response::new(pb::SyncResponse { durable_lsn }))
    }

    type ReadStream = ReceiverStream<Result<pb::ReadResponse, Status>>;

    async fn read(
        &self,
        request: Request<pb::ReadRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        let request = request.into_inner();
        let first_lsn = self.index.first_lsn();
        let from_lsn = if request.from_lsn == 0 {
            first_lsn
        } else {
            request.from_lsn
        };
        if from_lsn < first_lsn {
            return Err(self.err(WalError::OutOfRange {
                from_lsn,
                first_lsn,
            }));
        }
        let bytes_max = match request.max_bytes_per_message {
            0 => self.config.read_message_bytes_max as usize,
            n => (n as usize).min(self.config.read_message_bytes_max as usize),
        };
        let (tx, rx) = mpsc::channel(READ_MESSAGES_BUFFERED_MAX);
        let stream = ReadStream {
            reader: Some(LogReader::new(self.index.clone(), from_lsn)),
            durable: self.committer.shared().durable.subscribe(),
            shutdown: self.shutdown.clone(),
            follow: request.follow,
            bytes_max,
            tx,
            metrics: self.committer.shared().metrics.clone(),
        };
        tokio::spawn(stream.run());
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn truncate(
        &self,
        request: Request<pb::TruncateRequest>,
    ) -> Result<Response<pb::TruncateResponse>, Status> {
        let requested_below_lsn = request.into_inner().below_lsn;
        let index = self.index.clone();
        let dir: PathBuf = self.config.dir.clone();
        let archive_required = self.config.archive_required;
        let result = tokio::task::spawn_blocking(move || {
            let below_lsn = if archive_required {
                archive_truncate_bound(&dir, requested_below_lsn)
            } else {
                requested_below_lsn
            };
            log::truncate(&index, &dir, below_lsn)
        })
        .await
        .map_err(|e| Status::internal(format!("truncate task: {e}")))?;
        let (first_lsn, segments_removed) = result.map_err(|e| self.err(e))?;
        Ok(Response::new(pb::TruncateResponse {
            first_lsn,
            segments_removed,
        }))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let shared = self.committer.shared().clone();
        let index = self.index.clone();
        let config = self.config.clone();
        let status = tokio::task::spawn_blocking(move || build_status(&shared, &index, &config))
            .await
            .map_err(|e| Status::internal(format!("status task: {e}")))?;
        Ok(Response::new(status))
    }
}

/// With `archive_required`: truncation follows min(checkpoint, archived).
/// An unreadable `archive.state` counts as nothing archived, which only
/// delays truncation.
fn archive_truncate_bound(dir: &std::path::Path, requested_below_lsn: u64) -> u64 {
    let state = match crate::archive_state::read(dir) {
        Ok(state) => state,
        Err(error) => {
            tracing::error!(%error, "archive state unreadable; not truncating unarchived segments");
            None
        }
    };
    let bound = crate::archive_state::truncate_bound(requested_below_lsn, state.as_ref());
    if bound < requested_below_lsn {
        tracing::debug!(
            requested_below_lsn,
            bound,
            "truncation held back by the WAL archive"
        );
    }
    bound
}

/// Archive figures for Status: (archived_lsn, lag in segments, failures).
/// A node that neither requires archiving nor has an archiver reports no
/// lag, so the lag alert stays quiet where archiving is not set up.
fn archive_status(config: &Config, index: &SegmentIndex) -> (u64, u64, u64) {
    let state = crate::archive_state::read(&config.dir).ok().flatten();
    if state.is_none() && !config.archive_required {
        return (0, 0, 0);
    }
    let state = state.unwrap_or_default();
    let first_lsns: Vec<u64> = index
        .paths()
        .iter()
        .filter_map(|p| {
            p.file_name()?
                .to_str()
                .and_then(crate::segment::parse_file_name)
        })
        .collect();
    let lag = crate::archive_state::lag_segments(&first_lsns, state.archived_through_lsn);
    (state.archived_through_lsn, lag, state.failures_total)
}

/// The caller's deadline from the `grpc-timeout` header ("100m", "5S", ...).
fn grpc_timeout<T>(request: &Request<T>) -> Option<std::time::Duration> {
    use std::time::Duration;
    let value = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

fn histogram(h: &Histogram) -> pb::Histogram {
    pb::Histogram {
        buckets: h
            .cumulative()
            .into_iter()
            .map(|(upper_bound, cumulative_count)| pb::HistogramBucket {
                upper_bound,
                cumulative_count,
            })
            .collect(),
        count: h.count,
        sum: h.sum,
    }
}

fn build_status(
    shared: &crate::group_commit::WalShared,
    index: &SegmentIndex,
    config: &Config,
) -> pb::StatusResponse {
    let metrics = &shared.metrics;
    let (state, reason) = shared.state();
    let state = match state {
        WalState::Serving => pb::WalState::Serving,
        WalState::Failed => pb::WalState::Failed,
        WalState::DiskFull => pb::WalState::DiskFull,
    };
    let paths = index.paths();
    let segment_bytes = paths
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    let (archived_lsn, archive_lag_segments, archive_failures_total) =
        archive_status(config, index);
    let window = metrics.fsync_window();
    let [fsync, rotation, group_records, group_bytes] = metrics.histograms();
    pb::StatusResponse {
        state: state as i32,
        reason,
        first_lsn: index.first_lsn(),
        durable_lsn: shared.durable_lsn(),
        segment_count: paths.len() as u64,
        segment_bytes,
        fsync_count: metrics.fsync_count.load(Ordering::Relaxed),
        fsync_duration_quantiles: window
            .quantiles
            .iter()
            .map(|(quantile, value)| pb::Quantile {
                quantile: *quantile,
                value: *value,
            })
            .collect(),
        fsync_duration_window_sum_seconds: window.sum,
        fsync_duration_window_count: window.count,
        fsync_latency_seconds: Some(histogram(&fsync)),
        write_bytes: metrics.write_bytes.load(Ordering::Relaxed),
        group_records: Some(histogram(&group_records)),
        group_bytes: Some(histogram(&group_bytes)),
        queue_depth: metrics.queue_depth.load(Ordering::Relaxed),
        errors: metrics
            .errors()
            .into_iter()
            .map(|(kind, count)| pb::ErrorCount {
                kind: kind.to_string(),
                count,
            })
            .collect(),
        config: config
            .entries()
            .into_iter()
            .map(|(key, value)| pb::ConfigEntry { key, value })
            .collect(),
        segment_rotation_seconds: Some(histogram(&rotation)),
        fs_free_bytes: crate::fs::free_bytes(&config.dir),
        epoch: shared.epoch.load(Ordering::Relaxed),
        fsync_errors: metrics.fsync_errors.load(Ordering::Relaxed),
        appended_lsn: shared.appended_lsn.load(Ordering::Relaxed),
        fsync_duration_sum_seconds: metrics.fsync_seconds_total(),
        archive_required: config.archive_required,
        archived_lsn,
        archive_lag_segments,
        archive_failures_total,
    }
}

/// One Read stream: reads durable records in a blocking task and sends
/// them; with `follow`, waits for the durable LSN to move.
struct ReadStream {
    reader: Option<LogReader>,
    durable: watch::Receiver<u64>,
    shutdown: watch::Receiver<bool>,
    follow: bool,
    bytes_max: usize,
    tx: mpsc::Sender<Result<pb::ReadResponse, Status>>,
    metrics: Arc<Metrics>,
}

impl ReadStream {
    async fn run(mut self) {
        loop {
            let durable_lsn = *self.durable.borrow_and_update();
            let Some(reader) = self.reader.as_ref() else {
                return;
            };
            if reader.next_lsn() <= durable_lsn {
                if !self.send_batch(durable_lsn).await {
                    return;
                }
                continue;
            }
            if !self.follow || *self.shutdown.borrow() {
                return;
            }
            tokio::select! {
                changed = self.durable.changed() => if changed.is_err() { return },
                _ = self.shutdown.changed() => return,
                _ = self.tx.closed() => return,
            }
        }
    }

    /// Reads and sends one message; false when the stream is over.
    async fn send_batch(&mut self, durable_lsn: u64) -> bool {
        let Some(mut reader) = self.reader.take() else {
            return false;
        };
        let bytes_max = self.bytes_max;
        let joined = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            let result = reader.read(
                durable_lsn,
                bytes_max,
                READ_RECORDS_PER_MESSAGE_MAX,
                &mut out,
            );
            (reader, result.map(|()| out))
        })
        .await;
        let Ok((reader, result)) = joined else {
            return false;
        };
        self.reader = Some(reader);
        let message = match result {
            Ok(records) => {
                assert!(
                    records.iter().all(|(lsn, _)| *lsn <= durable_lsn),
                    "never send a record that is not durable"
                );
                Ok(pb::ReadResponse {
                    records: records
                        .into_iter()
                        .map(|(lsn, data)| pb::Record { lsn, data })
                        .collect(),
                })
            }
            Err(e) => Err(to_status(e, &self.metrics)),
        };
        let end = message.is_err();
        self.tx.send(message).await.is_ok() && !end
    }
}

/// Rejects peers whose SO_PEERCRED uid and gid are not allowed.
pub fn peer_check(
    policy: Arc<PeerPolicy>,
) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |request: Request<()>| {
        let cred = request
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|info| info.peer_cred);
        match cred {
            Some(c) if policy.allows(c.uid(), c.gid()) => Ok(request),
            Some(c) => {
                tracing::warn!(uid = c.uid(), gid = c.gid(), pid = ?c.pid(), "peer rejected: uid/gid not allowed");
                Err(Status::permission_denied(format!(
                    "peer uid {} gid {} is not allowed to use walld",
                    c.uid(),
                    c.gid()
                )))
            }
            None => {
                tracing::warn!("peer rejected: no peer credentials");
                Err(Status::permission_denied("peer credentials unavailable"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeout_of(value: &str) -> Option<std::time::Duration> {
        let mut request = Request::new(());
        request
            .metadata_mut()
            .insert("grpc-timeout", value.parse().unwrap());
        grpc_timeout(&request)
    }

    #[test]
    fn grpc_timeout_units() {
        use std::time::Duration;
        assert_eq!(timeout_of("100m"), Some(Duration::from_millis(100)));
        assert_eq!(timeout_of("5S"), Some(Duration::from_secs(5)));
        assert_eq!(timeout_of("2M"), Some(Duration::from_secs(120)));
        assert_eq!(timeout_of("7u"), Some(Duration::from_micros(7)));
        assert_eq!(timeout_of("x"), None);
        assert_eq!(grpc_timeout(&Request::new(())), None);
    }
}
