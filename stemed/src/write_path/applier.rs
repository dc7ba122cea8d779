//! Stages 5 and 6: apply durable records to sled in strict LSN order, then
//! answer the clients and publish the transactions to watchers.
//!
//! A store error here is fatal for the process: the record is durable in
//! the WAL, so stopping and replaying on restart is always correct, while
//! carrying on could answer reads from a store that missed a transaction.

use super::{Reply, TxOutcome, WriteCounters};
use crate::store::{ApplyOutcome, Fact, Store, TxEntry, TxRecord};
use crate::watch_hub::WatchHub;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::mpsc;

/// Durable transactions with consecutive LSNs from `first_lsn`. Replies are
/// absent for records replayed from the WAL.
pub(crate) struct ApplyBatch {
    pub first_lsn: u64,
    pub txs: Vec<(TxRecord, Option<Reply>)>,
    /// `write.apply`, a child of the group's first request (none in replay).
    pub span: tracing::Span,
}

pub(crate) struct Applier {
    store: Store,
    rx: mpsc::Receiver<ApplyBatch>,
    hub: Arc<WatchHub>,
    counters: Arc<WriteCounters>,
}

impl Applier {
    pub fn new(
        store: Store,
        rx: mpsc::Receiver<ApplyBatch>,
        hub: Arc<WatchHub>,
        counters: Arc<WriteCounters>,
    ) -> Self {
        Applier {
            store,
            rx,
            hub,
            counters,
        }
    }

    /// Runs on its own OS thread: sled's apply is synchronous, and a
    /// dedicated thread saves a hand-off to the blocking pool per batch.
    pub fn run(mut self) {
        while let Some(batch) = self.rx.blocking_recv() {
            self.apply(batch);
        }
    }

    fn apply(&mut self, batch: ApplyBatch) {
        let ApplyBatch {
            first_lsn,
            txs,
            span,
        } = batch;
        let _applying = span.enter();
        let (records, replies): (Vec<(u64, TxRecord)>, Vec<Option<Reply>>) = txs
            .into_iter()
            .enumerate()
            .map(|(i, (r, reply))| ((first_lsn + i as u64, r), reply))
            .unzip();
        let outcomes = match self.store.apply(&records) {
            Ok(outcomes) => outcomes,
            Err(e) => fatal(&format!("applying LSN {first_lsn}: {e}")),
        };
        assert_eq!(outcomes.len(), records.len(), "one outcome per record");
        let last_lsn = first_lsn + records.len() as u64 - 1;
        assert_eq!(
            self.store.applied_lsn(),
            last_lsn,
            "applied_lsn must reach the batch's last LSN"
        );
        let watching = self.hub.has_watchers();
        for (((lsn, record), outcome), reply) in records.into_iter().zip(outcomes).zip(replies) {
            let answer = match outcome {
                ApplyOutcome::Applied {
                    tx,
                    recorded_at_micros,
                } => {
                    debug_assert_eq!(tx, lsn);
                    self.counters
                        .transactions_committed
                        .fetch_add(1, Ordering::Relaxed);
                    if watching {
                        self.hub.publish(entry(tx, record));
                    }
                    TxOutcome {
                        tx,
                        recorded_at_micros,
                        deduplicated: false,
                    }
                }
                ApplyOutcome::Duplicate {
                    original_tx,
                    recorded_at_micros,
                } => TxOutcome {
                    tx: original_tx,
                    recorded_at_micros,
                    deduplicated: true,
                },
            };
            if let Some(reply) = reply {
                let _ = reply.send(Ok(answer));
            }
        }
        self.hub.set_applied(last_lsn);
    }
}

fn entry(tx: u64, record: TxRecord) -> TxEntry {
    let recorded_at_micros = record.recorded_at_micros;
    TxEntry {
        tx,
        recorded_at_micros,
        facts: record
            .assertions
            .into_iter()
            .map(|assertion| Fact {
                assertion,
                tx,
                recorded_at_micros,
            })
            .collect(),
    }
}

fn fatal(msg: &str) -> ! {
    tracing::error!(
        error = msg,
        "store apply failed; stopping so that restart replays the WAL"
    );
    std::process::exit(70);
}
