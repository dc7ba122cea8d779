//! The Rust client for StemeDB, a durable assertion store.
//!
//! StemeDB holds facts `(entity, attribute, value)` asserted or retracted by
//! a `source`, each stamped with the transaction (`tx`) that made it
//! durable. Every read can be answered as of a past transaction.
//!
//! ```no_run
//! use futures::TryStreamExt;
//! use stemedb_client::{Assertion, Client, HistoryQuery, Query};
//!
//! # async fn demo() -> Result<(), stemedb_client::Error> {
//! let client = Client::connect("http://127.0.0.1:18181").await?;
//! let receipt = client
//!     .transact(vec![
//!         Assertion::assert("user:1", "name", "Ada").source("hr").confidence(0.9),
//!         Assertion::assert("user:1", "age", 36i64).source("hr"),
//!     ])
//!     .await?;
//! let view = client.get("user:1", Some(receipt.tx)).await?;
//! assert_eq!(view.facts.len(), 2);
//! let named_ada: Vec<_> = client.query(Query::attribute("name").value("Ada")).try_collect().await?;
//! let history: Vec<_> = client.history(HistoryQuery::entity("user:1")).try_collect().await?;
//! # Ok(()) }
//! ```
//!
//! # Architecture
//! `model` holds the SDK's own types, `convert` maps them to and from the
//! protobuf types of `stemedb-proto`, `client` makes the calls and `retry`
//! decides what to retry. **Architecture Invariant:** no protobuf type
//! appears in the public API except through [`Client::raw`] and the
//! re-exported [`proto`] module, both meant for tests that need raw requests.

#![warn(missing_docs)]

mod client;
mod convert;
mod error;
mod model;
mod retry;

pub use client::{Client, ClientOptions};
pub use error::Error;
pub use model::{
    Assertion, EntityView, Fact, FactPage, HistoryQuery, Op, Query, TxEvent, TxReceipt, Value,
};
pub use retry::RetryPolicy;

/// The generated protobuf types, for use with [`Client::raw`].
pub use stemedb_proto::store::v1 as proto;
/// The generated gRPC client type returned by [`Client::raw`].
pub use stemedb_proto::store::v1::store_client::StoreClient;
/// The channel type underlying a [`Client`].
pub use tonic::transport::Channel;
