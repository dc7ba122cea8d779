//! `stemed::store`: the sled-backed assertion store.
//!
//! # Bird's-eye view
//!
//! In: decoded WAL records `(lsn, TxRecord)` from the write path, in dense
//! LSN order ([`Store::apply`]). Out: as-of reads ([`Store::get`],
//! [`Store::query`], [`Store::history`]) and the tx log for Watch
//! ([`Store::transactions_from`]). [`codec`] is the WAL record format both
//! sides share.
//!
//! # Code map
//!
//! - `model`: domain types (no protobuf).
//! - `codec`: the WAL record of one transaction (magic, version, CRC32C).
//! - `keys`: the single sled tree's key spaces and order-preserving encodings;
//!   the layout table lives there.
//! - `live`: streaming "latest version as of T" over a claim-index scan.
//! - `page`: HMAC-authenticated, parameter-bound page tokens.
//! - `sled_store`: `Store`: apply, reads, flush, idempotency purge, entity cache.
//!
//! **Architecture Invariant:** the store knows nothing about gRPC, protobuf
//! or walld. Domain types live in [`model`]; the gRPC layer converts at its
//! boundary.
//!
//! **Architecture Invariant:** one `apply` call inserts its index entries,
//! tx log and idempotency keys on one tree, then `applied_lsn` last. sled
//! recovers a prefix of its log, so after a crash every entry of the
//! records up to the recovered `applied_lsn` is there, and the replay from
//! `applied_lsn + 1` rewrites (same keys, same bytes) whatever part of
//! later records survived.
//!
//! **Architecture Invariant:** every read has a basis tx and filters index
//! entries by `tx <= basis`; the in-memory `applied_lsn` is published only
//! after all of its entries were inserted. A read therefore never sees half
//! of an apply, and neither does an idempotency lookup.
//!
//! **Architecture Invariant:** history is immutable. Nothing is ever deleted
//! from the claim, history or tx-log key spaces; only idempotency keys expire.

pub mod codec;
mod error;
mod keys;
mod live;
pub mod model;
pub(crate) mod page;
mod sled_store;

pub use error::StoreError;
pub use model::*;
pub use sled_store::{PurgeRound, Store, StoreConfig, PURGE_KEYS_MAX, QUERY_SCAN_VERSIONS_MAX};
