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
        if let Err(e) = once(&store, &socket, retain_records, &stats).await {
            tracing::warn!(error = %e, "checkpoint failed; will retry");
        }
    }
}

pub async fn once(
    store: &Store,
    socket: &std::path::Path,
    retain_records: u64,
    stats: &CheckpointStats,
) -> anyhow::Result<()> {
    let flushed = store.flush_async().await?;
    stats.flushed_lsn.store(flushed, Ordering::Release);
    stats.checkpoints.fetch_add(1, Ordering::Relaxed);
    let below = (flushed + 1).saturating_sub(retain_records);
    assert!(below <= flushed + 1, "truncation would pass the checkpoint");
    if below <= stats.truncated_below_lsn.load(Ordering::Acquire).max(1) {
        return Ok(());
    }
    let removed = wal_link::truncate(socket, below, Duration::from_secs(5)).await?;
    stats.truncated_below_lsn.store(below, Ordering::Release);
    if removed > 0 {
        tracing::info!(
            below_lsn = below,
            segments_removed = removed,
            "WAL truncated after checkpoint"
        );
    }
    Ok(())
}
