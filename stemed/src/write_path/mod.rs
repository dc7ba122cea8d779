//! The write path, as named stages:
//!
//! 1. **validate** (`validate.rs`): limits, named in every error;
//! 2. **admission** (`WritePath::admit`): the link must be serving, and the
//!    in-flight write bytes must fit a bounded budget (wait until the
//!    deadline, then RESOURCE_EXHAUSTED); concurrent duplicates of one
//!    idempotency key are coalesced here;
//! 3. **batch** (`batcher.rs`): group commit of concurrent transactions into
//!    one WAL append;
//! 4. **WAL append** through walld, durable when it returns;
//! 5. **apply** (`applier.rs`) to sled in strict LSN order;
//! 6. **respond**, only after the apply (read-your-writes).
//!
//! # Invariants
//! - `applied_lsn <= durable_lsn`: the applier only sees records that walld
//!   acknowledged as durable, or that catch-up read back from walld (which
//!   only serves durable records).
//! - No client is answered before its transaction is applied.
//! - LSNs reach the applier dense and in order (asserted by the store).

mod applier;
mod batcher;
pub mod validate;

use crate::config::Config;
use crate::store::{codec, Assertion, Store, TxRecord};
use crate::watch_hub::WatchHub;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot, watch, Notify, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

pub use batcher::LinkConfig;

/// What a client learns about its committed transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxOutcome {
    pub tx: u64,
    pub recorded_at_micros: i64,
    pub deduplicated: bool,
}

/// Why a write was refused or failed; mapped to a gRPC status in one place
/// (`grpc.rs`).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum WriteError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    /// Refused by a rate limit; the client may retry after `retry_after`.
    #[error("{message}")]
    RateLimited {
        message: String,
        retry_after: Duration,
    },
    #[error("{0}")]
    Internal(String),
}

/// Stage 2's policy hook: drain and rate limits (see `ops.rs`).
pub trait Admission: Send + Sync {
    /// Admits or refuses a transaction of `assertions` assertions.
    fn admit(&self, assertions: usize) -> Result<(), WriteError>;
}

/// Admits everything (tests and tools).
pub struct AdmitAll;

impl Admission for AdmitAll {
    fn admit(&self, _: usize) -> Result<(), WriteError> {
        Ok(())
    }
}

pub(crate) type Reply = oneshot::Sender<Result<TxOutcome, WriteError>>;

/// One admitted transaction on its way to the WAL.
pub(crate) struct Pending {
    pub record: TxRecord,
    /// The WAL record; empty once it moved into the append request.
    pub encoded: Vec<u8>,
    pub deadline: Instant,
    pub reply: Reply,
    /// The request's `write.commit` span: the parent of the WAL append and
    /// apply spans of the group this transaction joins.
    pub span: tracing::Span,
}

/// The state of the link to walld, published by the batcher.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkState {
    /// Not connected yet, or reconnecting after `reason`.
    Connecting { reason: String },
    /// Connected; applying records walld holds beyond `applied_lsn`.
    CatchingUp,
    /// Accepting writes.
    Serving,
    /// walld refused writes because its disk is full; the session is kept.
    DiskFull { reason: String },
}

#[derive(Clone, Debug)]
pub struct LinkStatus {
    pub state: LinkState,
    pub epoch: u64,
    /// The highest LSN walld has acknowledged as durable to this node.
    pub durable_lsn: u64,
}

/// Shared counters for the admin and metrics endpoints.
#[derive(Default)]
pub struct WriteCounters {
    pub writes_in_flight: AtomicU64,
    pub write_bytes_in_flight: AtomicU64,
    pub assertions_ingested: AtomicU64,
    pub transactions_committed: AtomicU64,
    pub wal_appends: AtomicU64,
}

pub struct WritePath {
    limits: crate::config::Limits,
    admission: Arc<dyn Admission>,
    store: Store,
    queue: mpsc::Sender<Pending>,
    bytes_in_flight: Semaphore,
    bytes_in_flight_max: usize,
    in_flight_keys: Mutex<HashMap<String, Vec<Reply>>>,
    link: watch::Receiver<LinkStatus>,
    closed: AtomicBool,
    pub counters: Arc<WriteCounters>,
    shutdown: Arc<Notify>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl WritePath {
    /// Starts the batcher and applier. The batcher first connects to walld
    /// and replays everything beyond `store.applied_lsn()`; wait for
    /// [`WritePath::wait_serving`] before serving.
    pub fn start(
        config: &Config,
        store: Store,
        hub: Arc<WatchHub>,
        link: LinkConfig,
        admission: Arc<dyn Admission>,
    ) -> Arc<Self> {
        let limits = config.limits.clone();
        let (queue_tx, queue_rx) = mpsc::channel(limits.write_queue_depth_max);
        // Two batches may wait for the applier while a third is appended:
        // enough to overlap the WAL fsync with the sled apply, and bounded.
        let (apply_tx, apply_rx) = mpsc::channel(2);
        let initial = LinkStatus {
            state: LinkState::Connecting {
                reason: "starting".into(),
            },
            epoch: 0,
            durable_lsn: 0,
        };
        let (status_tx, status_rx) = watch::channel(initial);
        let counters = Arc::new(WriteCounters::default());
        let shutdown = Arc::new(Notify::new());
        let batcher = batcher::Batcher::new(
            config,
            link,
            queue_rx,
            apply_tx,
            status_tx,
            store.applied_lsn(),
            counters.clone(),
            shutdown.clone(),
            hub.applied(),
        );
        let applier = applier::Applier::new(store.clone(), apply_rx, hub, counters.clone());
        let applier = std::thread::Builder::new()
            .name("stemed-apply".into())
            .spawn(move || applier.run())
            .expect("spawn the applier thread");
        let tasks = vec![
            tokio::spawn(batcher.run()),
            tokio::task::spawn_blocking(move || {
                let _ = applier.join();
            }),
        ];
        Arc::new(WritePath {
            bytes_in_flight: Semaphore::new(limits.write_bytes_in_flight_max),
            bytes_in_flight_max: limits.write_bytes_in_flight_max,
            limits,
            admission,
            store,
            queue: queue_tx,
            in_flight_keys: Mutex::new(HashMap::new()),
            link: status_rx,
            closed: AtomicBool::new(false),
            counters,
            shutdown,
            tasks: Mutex::new(tasks),
        })
    }

    pub fn link_status(&self) -> LinkStatus {
        self.link.borrow().clone()
    }

    pub fn queue_depth(&self) -> usize {
        self.queue.max_capacity() - self.queue.capacity()
    }

    /// Resolves once the link has caught up and serves writes.
    pub async fn wait_serving(&self) {
        let mut rx = self.link.clone();
        // The sender lives as long as the batcher; if it is gone, stop waiting.
        let _ = rx.wait_for(|s| s.state == LinkState::Serving).await;
    }

    /// Transact: all six stages for one transaction.
    pub async fn transact(
        &self,
        assertions: Vec<Assertion>,
        idempotency_key: Option<String>,
        deadline: Instant,
    ) -> Result<TxOutcome, WriteError> {
        // Stage 1: validate.
        let validating = tracing::info_span!("write.validate", assertions = assertions.len());
        validating
            .in_scope(|| {
                validate::transaction(&assertions, idempotency_key.as_deref(), &self.limits)
            })
            .map_err(|e| WriteError::Invalid(e.0))?;
        let assertion_count = assertions.len();
        let record = TxRecord {
            idempotency_key: idempotency_key.clone(),
            recorded_at_micros: now_micros(),
            assertions,
        };
        let encoded = codec::encode_tx(&record);
        if encoded.len() > self.limits.tx_bytes_max {
            return Err(WriteError::Invalid(format!(
                "assertions: the transaction encodes to {} bytes, over tx_bytes_max ({})",
                encoded.len(),
                self.limits.tx_bytes_max
            )));
        }
        // Stage 2: admission: the link, drain and rate limits, then (in
        // `admitted`) the in-flight byte budget.
        self.check_link()?;
        self.admission.admit(assertion_count)?;
        let mut leader = match &idempotency_key {
            Some(key) => match self.join_in_flight(key)? {
                KeyAdmission::Done(outcome) => return Ok(outcome),
                KeyAdmission::Follower(rx) => return await_reply(rx, deadline).await,
                KeyAdmission::Leader => Some(LeaderGuard {
                    path: self,
                    key: key.clone(),
                    result: None,
                }),
            },
            None => None,
        };
        let result = self
            .admitted(record, encoded, assertion_count, deadline)
            .await;
        if let Err(e) = &result {
            tracing::debug!(error = %e, "transaction failed");
        }
        if let Some(g) = leader.as_mut() {
            g.result = Some(result.clone());
        }
        result
    }

    async fn admitted(
        &self,
        record: TxRecord,
        encoded: Vec<u8>,
        assertion_count: usize,
        deadline: Instant,
    ) -> Result<TxOutcome, WriteError> {
        let bytes = encoded.len();
        let permit =
            tokio::time::timeout_at(deadline, self.bytes_in_flight.acquire_many(bytes as u32))
                .instrument(tracing::info_span!("write.admit", bytes))
                .await
                .map_err(|_| {
                    WriteError::ResourceExhausted(format!(
                        "write bytes in flight are at write_bytes_in_flight_max ({}); retry later",
                        self.bytes_in_flight_max
                    ))
                })?
                .map_err(|_| WriteError::Unavailable("node is shutting down".into()))?;
        let c = &self.counters;
        let in_flight = InFlightGuard::new(c, bytes as u64);
        let result = self
            .submit(record, encoded, deadline)
            .instrument(tracing::info_span!("write.commit"))
            .await;
        drop(in_flight);
        drop(permit);
        if let Ok(o) = &result {
            if !o.deduplicated {
                c.assertions_ingested
                    .fetch_add(assertion_count as u64, Ordering::Relaxed);
            }
        }
        result
    }

    /// Stages 3 to 6 happen in the batcher and applier; this hands the
    /// transaction over and waits for its answer.
    async fn submit(
        &self,
        record: TxRecord,
        encoded: Vec<u8>,
        deadline: Instant,
    ) -> Result<TxOutcome, WriteError> {
        let (reply, rx) = oneshot::channel();
        let pending = Pending {
            record,
            encoded,
            deadline,
            reply,
            span: tracing::Span::current(),
        };
        match tokio::time::timeout_at(deadline, self.queue.send(pending)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(WriteError::Unavailable("node is shutting down".into())),
            Err(_) => return Err(WriteError::DeadlineExceeded(
                "deadline passed while waiting for the write queue (write_queue_depth_max is full)"
                    .into(),
            )),
        }
        await_reply(rx, deadline).await
    }

    fn check_link(&self) -> Result<(), WriteError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(WriteError::Unavailable("node is shutting down".into()));
        }
        match &self.link.borrow().state {
            LinkState::Serving => Ok(()),
            LinkState::DiskFull { .. } => Ok(()), // walld decides; it may have space again
            LinkState::Connecting { reason } => Err(WriteError::Unavailable(format!(
                "walld is not connected ({reason}); reconnecting, retry later"
            ))),
            LinkState::CatchingUp => Err(WriteError::Unavailable(
                "catching up with walld after reconnecting; retry later".into(),
            )),
        }
    }

    /// Coalesces concurrent writes of one idempotency key: the first is the
    /// leader; the others wait for its answer. Keys already applied answer
    /// at once.
    ///
    /// Crash-free race argument: the leader removes its entry only after its
    /// transaction is applied, so a writer that finds no entry either comes
    /// before the leader (and becomes leader) or finds the key in the store.
    fn join_in_flight(&self, key: &str) -> Result<KeyAdmission, WriteError> {
        let mut map = self
            .in_flight_keys
            .lock()
            .expect("in-flight key map poisoned");
        if let Some(waiters) = map.get_mut(key) {
            let (tx, rx) = oneshot::channel();
            waiters.push(tx);
            return Ok(KeyAdmission::Follower(rx));
        }
        let found = self
            .store
            .lookup_idempotency(key)
            .map_err(|e| WriteError::Internal(format!("idempotency lookup failed: {e}")))?;
        if let Some((tx, recorded_at_micros)) = found {
            return Ok(KeyAdmission::Done(TxOutcome {
                tx,
                recorded_at_micros,
                deduplicated: true,
            }));
        }
        map.insert(key.to_string(), Vec::new());
        Ok(KeyAdmission::Leader)
    }

    fn release_key(&self, key: &str, result: &Result<TxOutcome, WriteError>) {
        let waiters = self
            .in_flight_keys
            .lock()
            .expect("in-flight key map poisoned")
            .remove(key)
            .unwrap_or_default();
        for w in waiters {
            let r = result.clone().map(|o| TxOutcome {
                deduplicated: true,
                ..o
            });
            let _ = w.send(r);
        }
    }

    /// Refuses new writes, lets the batcher finish what is queued, and
    /// waits for the applier to apply it.
    pub async fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.shutdown.notify_one();
        let tasks: Vec<_> = std::mem::take(&mut *self.tasks.lock().expect("tasks poisoned"));
        for t in tasks {
            let _ = t.await;
        }
    }
}

/// Counts a write in flight for as long as it lives, including when the
/// client cancels and the handler future is dropped.
struct InFlightGuard<'a> {
    counters: &'a WriteCounters,
    bytes: u64,
}

impl<'a> InFlightGuard<'a> {
    fn new(counters: &'a WriteCounters, bytes: u64) -> Self {
        counters.writes_in_flight.fetch_add(1, Ordering::Relaxed);
        counters
            .write_bytes_in_flight
            .fetch_add(bytes, Ordering::Relaxed);
        InFlightGuard { counters, bytes }
    }
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.counters
            .writes_in_flight
            .fetch_sub(1, Ordering::Relaxed);
        self.counters
            .write_bytes_in_flight
            .fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// Releases an idempotency key's in-flight entry however the leader ends,
/// so that followers are never left waiting for a cancelled leader.
struct LeaderGuard<'a> {
    path: &'a WritePath,
    key: String,
    result: Option<Result<TxOutcome, WriteError>>,
}

impl Drop for LeaderGuard<'_> {
    fn drop(&mut self) {
        let result = self.result.take().unwrap_or_else(|| {
            Err(WriteError::Unavailable(
                "the first request with this idempotency key was cancelled; its outcome is unknown, retry with the same key".into(),
            ))
        });
        self.path.release_key(&self.key, &result);
    }
}

enum KeyAdmission {
    Done(TxOutcome),
    Follower(oneshot::Receiver<Result<TxOutcome, WriteError>>),
    Leader,
}

async fn await_reply(
    rx: oneshot::Receiver<Result<TxOutcome, WriteError>>,
    deadline: Instant,
) -> Result<TxOutcome, WriteError> {
    match tokio::time::timeout_at(deadline, rx).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Err(WriteError::Unavailable(
            "the write was dropped because the node is shutting down; its outcome is unknown, retry with the same idempotency key".into(),
        )),
        Err(_) => Err(WriteError::DeadlineExceeded(
            "deadline passed before the write was acknowledged; it may still commit, retry with the same idempotency key".into(),
        )),
    }
}

pub fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// Exponential backoff with a cap.
pub(crate) fn backoff(attempt: u32, max: Duration) -> Duration {
    let base = Duration::from_millis(50);
    base.saturating_mul(1u32 << attempt.min(10)).min(max)
}
