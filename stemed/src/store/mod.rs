//! `stemed::store`: the sled-backed assertion store.
//!
//! **Architecture Invariant:** the store knows nothing about gRPC or
//! protobuf; its domain types live in [`model`] and the gRPC layer converts
//! at its boundary. It does not know about walld either: it is fed decoded
//! WAL records (`(lsn, TxRecord)`) in LSN order by the write path.

pub mod codec;
mod error;
mod keys;
mod live;
pub mod model;
mod page;
mod sled_store;

pub use error::StoreError;
pub use model::*;
pub use sled_store::{Store, StoreConfig, PURGE_KEYS_MAX, QUERY_SCAN_VERSIONS_MAX};
