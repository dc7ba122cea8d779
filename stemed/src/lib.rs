//! stemed: the StemeDB API server.
//!
//! - `store`: sled and the assertion model; knows nothing about gRPC.
//! - `write_path`: validate → admit → batch → WAL append → apply → respond.
//! - `wal_link`: the only module that speaks walld's protocol.
//! - `grpc`: the public `stemedb.v1.Store` service.
//! - `admin`: health, status and metrics over HTTP.
//! - `listeners`: socket activation and the load-balancer listener that
//!   follows the drain state.
//! - `telemetry`: logs, traces (OTLP) and the gRPC request layer.
//! - `server`: wiring of all of the above; `main.rs` only parses flags.

pub mod admin;
pub mod auth;
pub mod checkpoint;
pub mod config;
pub mod devmode;
pub mod export;
#[doc(hidden)]
pub mod fuzzing;
pub mod grpc;
pub mod listeners;
pub mod metrics;
pub mod ops;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod wal_link;
pub mod watch_hub;
pub mod write_path;
