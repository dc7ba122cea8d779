//! walld library: the WAL engine and its gRPC service.
//!
//! Write path: `grpc` → `group_commit` (queue, writer thread) → `log`
//! (frames from `record` into `segment` files, through the `fs` seam).
//! `recovery` rebuilds the log at start; `epoch` persists writer fencing.

pub mod archive_state;
pub mod config;
pub mod daemon;
pub mod epoch;
pub mod error;
pub mod fs;
#[doc(hidden)]
pub mod fuzzing;
pub mod group_commit;
pub mod grpc;
pub mod log;
pub mod metrics;
pub mod privilege;
pub mod record;
pub mod recovery;
pub mod segment;
pub mod telemetry;
