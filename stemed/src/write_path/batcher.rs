//! Stages 3 and 4: group concurrent transactions into one WAL append, and
//! own the writer session with walld (connect, catch up, reconnect).
//!
//! The batcher is the only WAL writer of this node. Up to
//! `wal.appends_in_flight_max` appends are in flight at once; walld may
//! assign their LSNs in any order, so an answered group waits until every
//! LSN before it was handed on, and the applier sees LSN order.
//!
//! # States
//! `Connecting → CatchingUp → Serving`, and back to `Connecting` whenever an
//! append fails. After any append error the outcome of that append is
//! unknown (walld may have made it durable before the link broke), so the
//! batcher always re-opens the session and reads back what walld holds
//! beyond the last LSN it handed to the applier. A record that became durable
//! without an acknowledgement is applied then; its client got an error and a
//! retry with the same idempotency key is answered from the store.

use super::applier::ApplyBatch;
use super::{backoff, LinkState, LinkStatus, Pending, WriteCounters, WriteError};
use crate::config::Config;
use crate::store::codec;
use crate::wal_link::{WalError, WalLink};
use futures::stream::{FuturesUnordered, StreamExt};
use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tracing::Instrument;

/// Records read back from walld per catch-up round.
const CATCH_UP_RECORDS_MAX: u64 = 4096;

#[derive(Clone, Debug)]
pub struct LinkConfig {
    pub socket: PathBuf,
    pub writer_id: String,
}

pub(crate) struct Batcher {
    link_config: LinkConfig,
    link: Option<WalLink>,
    queue: mpsc::Receiver<Pending>,
    applier: mpsc::Sender<ApplyBatch>,
    status: watch::Sender<LinkStatus>,
    /// The last LSN handed to the applier. Everything up to it is durable.
    sent_lsn: u64,
    /// Durable groups answered ahead of an earlier append, by first LSN,
    /// with their last LSN.
    ready: BTreeMap<u64, (u64, Vec<Pending>)>,
    appends_in_flight_max: usize,
    max_wait: Duration,
    max_bytes: usize,
    max_records: usize,
    connect_timeout: Duration,
    backoff_max: Duration,
    counters: Arc<WriteCounters>,
    shutdown: Arc<Notify>,
    /// The applier's progress, to wait for catch-up to be applied.
    applied: watch::Receiver<u64>,
}

impl Batcher {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: &Config,
        link_config: LinkConfig,
        queue: mpsc::Receiver<Pending>,
        applier: mpsc::Sender<ApplyBatch>,
        status: watch::Sender<LinkStatus>,
        applied_lsn: u64,
        counters: Arc<WriteCounters>,
        shutdown: Arc<Notify>,
        applied: watch::Receiver<u64>,
    ) -> Self {
        Batcher {
            link_config,
            link: None,
            queue,
            applier,
            status,
            sent_lsn: applied_lsn,
            ready: BTreeMap::new(),
            appends_in_flight_max: config.wal.appends_in_flight_max,
            max_wait: Duration::from_millis(config.wal.group_commit_max_wait_ms),
            max_bytes: config.wal.group_commit_max_bytes as usize,
            max_records: config.wal.group_commit_max_records,
            connect_timeout: Duration::from_millis(config.wal.connect_timeout_ms),
            backoff_max: Duration::from_millis(config.wal.reconnect_backoff_max_ms),
            counters,
            shutdown,
            applied,
        }
    }

    pub async fn run(mut self) {
        let shutdown = self.shutdown.clone();
        if !self.reconnect("starting".into(), &shutdown).await {
            return;
        }
        let mut in_flight = FuturesUnordered::new();
        // The queue is closed and empty: finish what is in flight, then stop.
        let mut draining = false;
        loop {
            let room = in_flight.len() < self.appends_in_flight_max;
            let failure = tokio::select! {
                Some(done) = in_flight.next() => self.completed(done).await.err(),
                p = self.queue.recv(), if room && !draining => {
                    match p {
                        Some(first) => {
                            let batch = self.collect(first).await;
                            if !batch.is_empty() {
                                in_flight.push(self.start_append(batch));
                            }
                        }
                        None => draining = true,
                    }
                    None
                }
                _ = shutdown.notified(), if !draining => {
                    self.queue.close();
                    None
                }
                else => break,
            };
            let failure = failure.or_else(|| {
                // Every append has been answered, yet a group still waits
                // for LSNs before its own: walld assigned LSNs this writer
                // never saw.
                (in_flight.is_empty() && !self.ready.is_empty()).then(|| {
                    WalError::Protocol(format!(
                        "walld's LSNs {}..{} were never assigned to this writer's appends",
                        self.sent_lsn + 1,
                        self.ready.keys().next().copied().unwrap_or_default() - 1
                    ))
                })
            });
            if let Some(e) = failure {
                self.abandon(&mut in_flight).await;
                let reason = e.to_string();
                tracing::warn!(error = %reason, "WAL append failed; re-opening the writer session");
                if !self.reconnect(reason, &shutdown).await {
                    break;
                }
            }
        }
        // Dropping `self.applier` lets the applier drain and stop.
    }

    /// Stage 3: the group. It takes what is queued now, and with
    /// `group_commit_max_wait_ms > 0` waits that long for more, within the
    /// byte and record bounds. Transactions whose deadline has passed or
    /// whose client has gone are answered here and never reach the WAL.
    async fn collect(&mut self, first: Pending) -> Vec<Pending> {
        let mut batch = Vec::new();
        let mut bytes = 0usize;
        let window_end = Instant::now() + self.max_wait;
        let mut next = Some(first);
        loop {
            if let Some(p) = next.take() {
                bytes += p.encoded.len();
                if let Some(p) = admit_to_group(p) {
                    batch.push(p);
                }
            }
            if bytes >= self.max_bytes || batch.len() >= self.max_records {
                break;
            }
            match self.queue.try_recv() {
                Ok(p) => next = Some(p),
                Err(_) if self.max_wait.is_zero() => break,
                Err(_) => match tokio::time::timeout_at(window_end, self.queue.recv()).await {
                    Ok(Some(p)) => next = Some(p),
                    _ => break,
                },
            }
        }
        batch
    }

    /// Stage 4: one WAL append, durable when it returns. Up to
    /// `wal.appends_in_flight_max` are in flight, so the next group travels
    /// to walld while walld fsyncs the previous one.
    fn start_append(&self, mut batch: Vec<Pending>) -> impl Future<Output = Answered> {
        let appender = self
            .link
            .as_ref()
            .expect("append without a session")
            .appender();
        // The encoded records move into the request: nothing reads them after.
        let records: Vec<Vec<u8>> = batch
            .iter_mut()
            .map(|p| std::mem::take(&mut p.encoded))
            .collect();
        // One append serves many requests: it is a child of the first and
        // linked from the others, so each request's trace reaches walld.
        let appending = group_span(&batch, "write.wal_append", records.len());
        async move {
            let result = appender.append(records).instrument(appending).await;
            Answered { batch, result }
        }
    }

    /// Stage 4, answered: a durable group waits in `ready` until every LSN
    /// before it has been handed on, then goes to the applier, so the
    /// applier sees LSN order whatever order walld's answers arrive in. An
    /// error return means the session must be re-opened.
    async fn completed(&mut self, answered: Answered) -> Result<(), WalError> {
        let Answered { batch, result } = answered;
        match result {
            Ok((first_lsn, last_lsn)) => {
                assert!(
                    first_lsn > self.sent_lsn && !self.ready.contains_key(&first_lsn),
                    "walld assigned LSN {first_lsn} twice (this writer has handed on up to {})",
                    self.sent_lsn
                );
                self.counters.wal_appends.fetch_add(1, Ordering::Relaxed);
                // walld's durable LSN is a prefix: this answer covers every
                // LSN up to `last_lsn`, answered yet or not.
                self.status.send_modify(|s| {
                    s.durable_lsn = s.durable_lsn.max(last_lsn);
                    if matches!(s.state, LinkState::DiskFull { .. }) {
                        s.state = LinkState::Serving;
                    }
                });
                self.ready.insert(first_lsn, (last_lsn, batch));
                while let Some(entry) = self.ready.first_entry() {
                    if *entry.key() != self.sent_lsn + 1 {
                        break;
                    }
                    let (first_lsn, (last_lsn, batch)) = entry.remove_entry();
                    self.sent_lsn = last_lsn;
                    let span = group_span(&batch, "write.apply", batch.len());
                    let txs = batch
                        .into_iter()
                        .map(|p| (p.record, Some(p.reply)))
                        .collect();
                    self.send_to_applier(ApplyBatch {
                        first_lsn,
                        txs,
                        span,
                    })
                    .await;
                }
                Ok(())
            }
            Err(e) if e.is_disk_full() => {
                // walld refused the whole append before assigning LSNs; the
                // session stays, and the state says why writes fail.
                let msg = e.to_string();
                self.status.send_modify(|s| {
                    s.state = LinkState::DiskFull {
                        reason: msg.clone(),
                    }
                });
                fail_all(batch, WriteError::ResourceExhausted(msg));
                Ok(())
            }
            Err(e) => {
                fail_all(batch, outcome_unknown(&e));
                Err(e)
            }
        }
    }

    /// After a failed append: waits for the other appends in flight, hands
    /// on what became contiguous, and answers the rest "outcome unknown"
    /// (they wait behind LSNs that may or may not be durable). The catch-up
    /// after reconnecting applies whatever walld did make durable.
    async fn abandon<F: Future<Output = Answered>>(&mut self, in_flight: &mut FuturesUnordered<F>) {
        while let Some(answered) = in_flight.next().await {
            // Each failure answers its own group; the reconnect follows.
            let _ = self.completed(answered).await;
        }
        let reason = WalError::Protocol(format!(
            "an append before LSN {} failed",
            self.ready.keys().next().copied().unwrap_or_default()
        ));
        for (_, (_, batch)) in std::mem::take(&mut self.ready) {
            fail_all(batch, outcome_unknown(&reason));
        }
    }

    async fn send_to_applier(&mut self, batch: ApplyBatch) {
        if self.applier.send(batch).await.is_err() {
            // The applier only stops on a fatal store error, after which
            // the process exits; nothing can be applied any more.
            tracing::error!("applier stopped; refusing further writes");
        }
    }

    /// Re-opens the writer session with backoff, then catches up. Returns
    /// false on shutdown.
    async fn reconnect(&mut self, reason: String, shutdown: &Notify) -> bool {
        self.link = None;
        self.status.send_modify(|s| {
            s.state = LinkState::Connecting {
                reason: reason.clone(),
            }
        });
        let mut attempt = 0u32;
        loop {
            self.fail_queued(&reason);
            match self.open_and_catch_up().await {
                Ok(()) => return true,
                Err(e) => {
                    let wait = backoff(attempt, self.backoff_max);
                    attempt += 1;
                    tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "cannot open the WAL writer session");
                    self.status.send_modify(|s| {
                        s.state = LinkState::Connecting {
                            reason: e.to_string(),
                        }
                    });
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.notified() => return false,
                    }
                }
            }
        }
    }

    /// Answers everything queued while the link is down: those writes never
    /// reached walld, so UNAVAILABLE is exact.
    fn fail_queued(&mut self, reason: &str) {
        while let Ok(p) = self.queue.try_recv() {
            let _ = p.reply.send(Err(WriteError::Unavailable(format!(
                "walld is not connected ({reason}); retry later"
            ))));
        }
    }

    async fn open_and_catch_up(&mut self) -> Result<(), WalError> {
        let (mut link, durable_lsn) = WalLink::open(
            &self.link_config.socket,
            &self.link_config.writer_id,
            self.connect_timeout,
        )
        .await?;
        if durable_lsn < self.sent_lsn {
            // walld holds less than this node already applied: the WAL lost
            // acknowledged records (or is another node's). Continuing would
            // hand out LSNs twice. Fail stop.
            tracing::error!(
                durable_lsn,
                applied_lsn = self.sent_lsn,
                "walld's durable LSN is behind this node's applied LSN; refusing to continue"
            );
            std::process::exit(70);
        }
        self.status.send_modify(|s| {
            s.state = LinkState::CatchingUp;
            s.epoch = link.epoch();
            s.durable_lsn = durable_lsn;
        });
        let start = self.sent_lsn;
        while self.sent_lsn < durable_lsn {
            let from = self.sent_lsn + 1;
            let to = durable_lsn.min(self.sent_lsn + CATCH_UP_RECORDS_MAX);
            let records = link.read_range(from, to).await?;
            let mut txs = Vec::with_capacity(records.len());
            for (lsn, data) in records {
                match codec::decode_tx(&data) {
                    Ok(r) => txs.push((r, None)),
                    Err(e) => {
                        tracing::error!(lsn, error = %e, "WAL record is not a transaction; refusing to continue");
                        std::process::exit(70);
                    }
                }
            }
            self.sent_lsn = to;
            self.send_to_applier(ApplyBatch {
                first_lsn: from,
                txs,
                span: tracing::Span::none(),
            })
            .await;
        }
        // Serving means reads see every durable record: wait until the
        // applier has applied the catch-up, not just received it. (Found by
        // the power-loss suite: /readyz said ready with applied_lsn behind.)
        if self
            .applied
            .wait_for(|applied| *applied >= durable_lsn)
            .await
            .is_err()
        {
            return Err(WalError::Unreachable {
                socket: self.link_config.socket.display().to_string(),
                reason: "the applier stopped during catch-up".into(),
            });
        }
        if durable_lsn > start {
            tracing::info!(
                from_lsn = start + 1,
                to_lsn = durable_lsn,
                "caught up with walld"
            );
        }
        self.link = Some(link);
        self.status.send_modify(|s| s.state = LinkState::Serving);
        Ok(())
    }
}

/// Drops transactions that can no longer be answered usefully before they
/// reach the WAL.
fn admit_to_group(p: Pending) -> Option<Pending> {
    if p.reply.is_closed() {
        return None;
    }
    if Instant::now() >= p.deadline {
        let _ = p.reply.send(Err(WriteError::DeadlineExceeded(
            "deadline passed while queued for the WAL; nothing was written".into(),
        )));
        return None;
    }
    Some(p)
}

/// A span for a stage that serves a whole group: child of the first
/// request's span, with links to the others.
fn group_span(batch: &[Pending], name: &'static str, records: usize) -> tracing::Span {
    let first = batch.first().map(|p| p.span.id());
    let span = match name {
        "write.wal_append" => {
            tracing::info_span!(parent: first.flatten(), "write.wal_append", records)
        }
        _ => tracing::info_span!(parent: first.flatten(), "write.apply", records),
    };
    for p in batch.iter().skip(1) {
        span.follows_from(&p.span);
    }
    span
}

/// A group that reached walld.
struct Answered {
    batch: Vec<Pending>,
    result: Result<(u64, u64), WalError>,
}

fn outcome_unknown(e: &WalError) -> WriteError {
    WriteError::Unavailable(format!(
        "WAL append failed, the write's outcome is unknown; retry with the same idempotency key: {e}"
    ))
}

fn fail_all(batch: Vec<Pending>, err: WriteError) {
    for p in batch {
        let _ = p.reply.send(Err(err.clone()));
    }
}
