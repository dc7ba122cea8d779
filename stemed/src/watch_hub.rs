//! Fan-out of applied transactions to Watch streams.
//!
//! Live delivery goes through a bounded broadcast channel. A watcher that
//! falls behind (the channel laps it) is not cut off: it goes back to the
//! store's transaction log and catches up from its last delivered tx, so a
//! slow client costs the node only its own reads, never unbounded memory.

use crate::store::TxEntry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{broadcast, watch};

/// Transactions buffered for live watchers.
pub const WATCH_BUFFER_TX_MAX: usize = 1024;

pub struct WatchHub {
    live: broadcast::Sender<Arc<TxEntry>>,
    applied: watch::Sender<u64>,
    streams: AtomicU64,
}

impl WatchHub {
    pub fn new(applied_lsn: u64) -> Self {
        let (live, _) = broadcast::channel(WATCH_BUFFER_TX_MAX);
        let (applied, _) = watch::channel(applied_lsn);
        WatchHub {
            live,
            applied,
            streams: AtomicU64::new(0),
        }
    }

    pub fn has_watchers(&self) -> bool {
        self.live.receiver_count() > 0
    }

    pub fn publish(&self, entry: TxEntry) {
        let _ = self.live.send(Arc::new(entry));
    }

    pub fn set_applied(&self, lsn: u64) {
        self.applied.send_replace(lsn);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<TxEntry>> {
        self.live.subscribe()
    }

    pub fn applied(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    /// Counts an open stream; returns the count before this one.
    pub fn open_stream(&self) -> u64 {
        self.streams.fetch_add(1, Ordering::AcqRel)
    }

    pub fn close_stream(&self) {
        self.streams.fetch_sub(1, Ordering::AcqRel);
    }

    pub fn streams(&self) -> u64 {
        self.streams.load(Ordering::Acquire)
    }
}
