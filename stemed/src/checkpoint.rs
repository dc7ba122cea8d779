//! Checkpoints: flush sled, then let walld release WAL segments that sled no
//! longer needs for recovery.
//!
//! # Invariant
//! Truncation never passes the flushed `applied_lsn`: `below_lsn <=
//! flushed_applied_lsn + 1 - wal_retain_records`. A crash right after the
//! truncation restarts from the flushed `applied_lsn`, whose successors are
//! all still in the WAL.

use crate::store::Store;
use crate::wal_link;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Default)]
pub struct CheckpointStats {
    /// The applied LSN made durable by the last sled flush.
    pub flushed_lsn: AtomicU64,
    /// The last `below_lsn` walld accepted.
    pub truncated_below_lsn: AtomicU64,
    pub checkpoints: AtomicU64,
}

pub async fn run(
    store: Store,
    socket: PathBuf,
    interval: Duration,
    retain_records: u64,
    stats: Arc<CheckpointStats>,
) {
    if interval.is_zero() {
        return;
    }
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        match once(&store, &socket, retain_records, &stats).await {
            Ok(()) => {}
            Err(CheckpointError::Flush(e)) => {
                // A failed fsync cannot be retried honestly (the kernel may
                // have dropped the dirty pages and a second fsync would
                // "succeed"), and a later checkpoint would then truncate WAL
                // records the store does not hold. Stop; restart replays
                // from the WAL, which still has everything.
                tracing::error!(error = %e, "store flush failed; stopping so that restart replays the WAL");
                std::process::exit(70);
            }
            Err(CheckpointError::Truncate(e)) => {
                tracing::warn!(error = %e, "WAL truncation failed; will retry at the next checkpoint");
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("store flush: {0}")]
    Flush(crate::store::StoreError),
    #[error("WAL truncate: {0}")]
    Truncate(crate::wal_link::WalError),
}

pub async fn once(
    store: &Store,
    socket: &std::path::Path,
    retain_records: u64,
    stats: &CheckpointStats,
) -> Result<(), CheckpointError> {
    let flushed = store.flush_async().await.map_err(CheckpointError::Flush)?;
    stats.flushed_lsn.store(flushed, Ordering::Release);
    stats.checkpoints.fetch_add(1, Ordering::Relaxed);
    let below = (flushed + 1).saturating_sub(retain_records);
    assert!(below <= flushed + 1, "truncation would pass the checkpoint");
    if below <= stats.truncated_below_lsn.load(Ordering::Acquire).max(1) {
        return Ok(());
    }
    let (first_held, removed) = wal_link::truncate(socket, below, Duration::from_secs(5))
        .await
        .map_err(CheckpointError::Truncate)?;
    // Remember what walld actually released, so that a truncation it held
    // back (an unarchived segment, a partly covered one) is asked again at
    // the next checkpoint even without new writes.
    stats
        .truncated_below_lsn
        .store(first_held.min(below), Ordering::Release);
    if removed > 0 {
        tracing::info!(
            below_lsn = below,
            segments_removed = removed,
            "WAL truncated after checkpoint"
        );
    }
    Ok(())
}
