//! The public gRPC service `stemedb.v1.Store`. Thin by design: convert the
//! request into domain types, call the write path or the store, and map
//! errors to `Status` in exactly one place (`write_status`, `store_status`).

use crate::config::Limits;
use crate::store::{self, HistoryParams, QueryParams, Store, StoreError, TxEntry};
use crate::watch_hub::WatchHub;
use crate::write_path::{WriteError, WritePath};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use stemedb_proto::store::v1 as pb;
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// Transactions read from the store per Watch catch-up round.
const WATCH_CATCH_UP_TX_MAX: usize = 256;
/// Messages buffered per Watch stream before the stream waits for its client.
const WATCH_STREAM_BUFFER_MAX: usize = 64;

pub struct StoreService {
    pub ops: Arc<crate::ops::Ops>,
    pub write_path: Arc<WritePath>,
    pub store: Store,
    pub hub: Arc<WatchHub>,
    pub limits: Limits,
}

#[tonic::async_trait]
impl pb::store_server::Store for StoreService {
    async fn transact(
        &self,
        request: Request<pb::TransactRequest>,
    ) -> Result<Response<pb::TransactResponse>, Status> {
        let deadline = deadline_of(
            &request,
            Duration::from_millis(self.limits.write_timeout_ms),
        );
        let req = request.into_inner();
        let assertions = req
            .assertions
            .into_iter()
            .enumerate()
            .map(|(i, a)| assertion_from_pb(i, a))
            .collect::<Result<Vec<_>, _>>()?;
        let key = Some(req.idempotency_key).filter(|k| !k.is_empty());
        let outcome = self
            .write_path
            .transact(assertions, key, deadline)
            .await
            .map_err(write_status)?;
        Ok(Response::new(pb::TransactResponse {
            tx: outcome.tx,
            recorded_at: Some(timestamp(outcome.recorded_at_micros)),
            deduplicated: outcome.deduplicated,
        }))
    }

    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        let req = request.into_inner();
        if req.entity.is_empty() {
            return Err(Status::invalid_argument("entity: required"));
        }
        // Inline rather than on the blocking pool: one entity's facts are a
        // short prefix scan (or a cache hit), cheaper than the hand-off.
        let (facts, basis_tx) = self
            .store
            .get(&req.entity, req.as_of_tx)
            .map_err(store_status)?;
        Ok(Response::new(pb::GetResponse {
            entity: req.entity,
            facts: facts.into_iter().map(fact_to_pb).collect(),
            basis_tx,
        }))
    }

    async fn query(
        &self,
        request: Request<pb::QueryRequest>,
    ) -> Result<Response<pb::QueryResponse>, Status> {
        self.check_query()?;
        let req = request.into_inner();
        if req.attribute.is_empty() {
            return Err(Status::invalid_argument("attribute: required"));
        }
        let value = match req.value {
            Some(v) => Some(
                value_from_pb(v).map_err(|e| Status::invalid_argument(format!("value: {e}")))?,
            ),
            None => None,
        };
        let params = QueryParams {
            attribute: req.attribute,
            value,
            source: req.source,
            as_of_tx: req.as_of_tx,
            limit: self.page_limit(req.limit)?,
        };
        let token = Some(req.page_token).filter(|t| !t.is_empty());
        let store = self.store.clone();
        let page = blocking(move || store.query(&params, token.as_deref())).await?;
        Ok(Response::new(pb::QueryResponse {
            facts: page.facts.into_iter().map(fact_to_pb).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
            basis_tx: page.basis_tx,
        }))
    }

    async fn history(
        &self,
        request: Request<pb::HistoryRequest>,
    ) -> Result<Response<pb::HistoryResponse>, Status> {
        self.check_query()?;
        let req = request.into_inner();
        if req.entity.is_empty() {
            return Err(Status::invalid_argument("entity: required"));
        }
        if let (Some(s), Some(u)) = (req.since_tx, req.until_tx) {
            if s > u {
                return Err(Status::invalid_argument(format!(
                    "since_tx: {s} is after until_tx {u}"
                )));
            }
        }
        let params = HistoryParams {
            entity: req.entity,
            attribute: req.attribute.filter(|a| !a.is_empty()),
            since_tx: req.since_tx,
            until_tx: req.until_tx,
            limit: self.page_limit(req.limit)?,
        };
        let token = Some(req.page_token).filter(|t| !t.is_empty());
        let store = self.store.clone();
        let page = blocking(move || store.history(&params, token.as_deref())).await?;
        Ok(Response::new(pb::HistoryResponse {
            facts: page.facts.into_iter().map(fact_to_pb).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.ops
            .check_watch()
            .map_err(|r| rate_limited_status(r.message, r.retry_after))?;
        let from_tx = request.into_inner().from_tx.max(1);
        if self.hub.open_stream() >= self.limits.watch_streams_max as u64 {
            self.hub.close_stream();
            return Err(Status::resource_exhausted(format!(
                "watch streams are at watch_streams_max ({})",
                self.limits.watch_streams_max
            )));
        }
        let (tx, rx) = mpsc::channel(WATCH_STREAM_BUFFER_MAX);
        let watcher = Watcher {
            store: self.store.clone(),
            hub: self.hub.clone(),
            out: tx,
            next_tx: from_tx,
        };
        tokio::spawn(watcher.run());
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

impl StoreService {
    fn check_query(&self) -> Result<(), Status> {
        self.ops
            .check_query()
            .map_err(|r| rate_limited_status(r.message, r.retry_after))
    }

    fn page_limit(&self, requested: u32) -> Result<usize, Status> {
        let max = self.limits.page_limit_max;
        match requested as usize {
            0 => Ok(self.limits.page_limit_default),
            n if n > max => Err(Status::invalid_argument(format!(
                "limit: {n} exceeds page_limit_max ({max})"
            ))),
            n => Ok(n),
        }
    }
}

/// One Watch stream: catch up from the store's transaction log, then follow
/// live; fall back to the store whenever the live channel laps it.
struct Watcher {
    store: Store,
    hub: Arc<WatchHub>,
    out: mpsc::Sender<Result<pb::WatchResponse, Status>>,
    /// The next transaction to deliver: every tx below it has been sent.
    next_tx: u64,
}

impl Watcher {
    async fn run(mut self) {
        let hub = self.hub.clone();
        // Subscribe before reading the store, so that nothing applied in
        // between is missed; duplicates are skipped by `next_tx`.
        let mut live = hub.subscribe();
        while self.catch_up().await {
            if !self.follow(&mut live).await {
                break;
            }
        }
        hub.close_stream();
    }

    /// Returns false when the client is gone or the store failed.
    async fn catch_up(&mut self) -> bool {
        loop {
            let store = self.store.clone();
            let from = self.next_tx;
            let entries = match blocking(move || {
                store.transactions_from(from, WATCH_CATCH_UP_TX_MAX)
            })
            .await
            {
                Ok(e) => e,
                Err(status) => {
                    let _ = self.out.send(Err(status)).await;
                    return false;
                }
            };
            if entries.is_empty() {
                return true;
            }
            for e in entries {
                if !self.send(&e).await {
                    return false;
                }
            }
        }
    }

    /// Returns true when the stream lagged and must catch up again.
    async fn follow(&mut self, live: &mut broadcast::Receiver<Arc<TxEntry>>) -> bool {
        loop {
            tokio::select! {
                msg = live.recv() => match msg {
                    Ok(e) => {
                        if e.tx >= self.next_tx && !self.send(&e).await {
                            return false;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => return true,
                    Err(broadcast::error::RecvError::Closed) => return false,
                },
                _ = self.out.closed() => return false,
            }
        }
    }

    async fn send(&mut self, e: &TxEntry) -> bool {
        if e.tx < self.next_tx {
            return true;
        }
        let msg = pb::WatchResponse {
            tx: e.tx,
            recorded_at: Some(timestamp(e.recorded_at_micros)),
            facts: e.facts.iter().cloned().map(fact_to_pb).collect(),
        };
        self.next_tx = e.tx + 1;
        self.out.send(Ok(msg)).await.is_ok()
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("read task failed: {e}")))?
        .map_err(store_status)
}

/// The deadline of a request: its `grpc-timeout`, else the default.
pub fn deadline_of<T>(request: &Request<T>, default: Duration) -> Instant {
    let timeout = request
        .metadata()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
        .unwrap_or(default);
    Instant::now() + timeout
}

/// Parses the gRPC wire format of a timeout: up to 8 digits and a unit.
fn parse_grpc_timeout(s: &str) -> Option<Duration> {
    if s.len() < 2 || s.len() > 9 {
        return None;
    }
    let (digits, unit) = s.split_at(s.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

pub fn write_status(e: WriteError) -> Status {
    match e {
        WriteError::Invalid(m) => Status::invalid_argument(m),
        WriteError::Unavailable(m) => Status::unavailable(m),
        WriteError::ResourceExhausted(m) => Status::resource_exhausted(m),
        WriteError::DeadlineExceeded(m) => Status::deadline_exceeded(m),
        WriteError::RateLimited {
            message,
            retry_after,
        } => rate_limited_status(message, retry_after),
        WriteError::Internal(m) => Status::internal(m),
    }
}

/// RESOURCE_EXHAUSTED with `google.rpc.RetryInfo` in the details and the
/// same delay in `retry-after-ms` metadata, for clients that do not decode
/// details.
pub fn rate_limited_status(message: String, retry_after: Duration) -> Status {
    use tonic_types::{ErrorDetails, StatusExt};
    let details = ErrorDetails::with_retry_info(Some(retry_after));
    let mut status = Status::with_error_details(tonic::Code::ResourceExhausted, message, details);
    if let Ok(v) = retry_after.as_millis().max(1).to_string().parse() {
        status.metadata_mut().insert("retry-after-ms", v);
    }
    status
}

fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::InvalidPageToken(m) => Status::invalid_argument(format!("page_token: {m}")),
        other => {
            tracing::error!(error = %other, "store read failed");
            Status::internal(other.to_string())
        }
    }
}

fn assertion_from_pb(i: usize, a: pb::Assertion) -> Result<store::Assertion, Status> {
    let value = match a.value {
        Some(v) => value_from_pb(v)
            .map_err(|e| Status::invalid_argument(format!("assertions[{i}].value: {e}")))?,
        None => {
            return Err(Status::invalid_argument(format!(
                "assertions[{i}].value: required"
            )))
        }
    };
    let op = match pb::Op::try_from(a.op) {
        Ok(pb::Op::Unspecified) | Ok(pb::Op::Assert) => store::Op::Assert,
        Ok(pb::Op::Retract) => store::Op::Retract,
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "assertions[{i}].op: unknown value {}",
                a.op
            )))
        }
    };
    Ok(store::Assertion {
        entity: a.entity,
        attribute: a.attribute,
        value,
        source: a.source,
        confidence: a.confidence,
        op,
    })
}

fn value_from_pb(v: pb::Value) -> Result<store::Value, String> {
    use pb::value::Kind;
    Ok(match v.kind.ok_or("a value kind is required")? {
        Kind::Text(s) => store::Value::Text(s),
        Kind::Int64(n) => store::Value::Int64(n),
        Kind::Double(d) => store::Value::Double(d),
        Kind::Bool(b) => store::Value::Bool(b),
        Kind::Bytes(b) => store::Value::Bytes(b),
        Kind::Ref(r) => store::Value::Ref(r),
        Kind::Timestamp(t) => store::Value::Timestamp {
            seconds: t.seconds,
            nanos: t.nanos,
        },
    })
}

fn value_to_pb(v: store::Value) -> pb::Value {
    use pb::value::Kind;
    let kind = match v {
        store::Value::Text(s) => Kind::Text(s),
        store::Value::Int64(n) => Kind::Int64(n),
        store::Value::Double(d) => Kind::Double(d),
        store::Value::Bool(b) => Kind::Bool(b),
        store::Value::Bytes(b) => Kind::Bytes(b),
        store::Value::Ref(r) => Kind::Ref(r),
        store::Value::Timestamp { seconds, nanos } => {
            Kind::Timestamp(prost_types::Timestamp { seconds, nanos })
        }
    };
    pb::Value { kind: Some(kind) }
}

fn fact_to_pb(f: store::Fact) -> pb::Fact {
    let a = f.assertion;
    pb::Fact {
        entity: a.entity,
        attribute: a.attribute,
        value: Some(value_to_pb(a.value)),
        source: a.source,
        confidence: a.confidence,
        op: match a.op {
            store::Op::Assert => pb::Op::Assert as i32,
            store::Op::Retract => pb::Op::Retract as i32,
        },
        tx: f.tx,
        recorded_at: Some(timestamp(f.recorded_at_micros)),
    }
}

fn timestamp(micros: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: (micros.rem_euclid(1_000_000) * 1_000) as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("5x"), None);
        assert_eq!(parse_grpc_timeout("m"), None);
    }

    #[test]
    fn timestamps_round_trip_negative_micros() {
        let t = timestamp(-1);
        assert_eq!((t.seconds, t.nanos), (-1, 999_999_000));
    }
}
