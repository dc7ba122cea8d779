//! The one error type of the store.

/// Errors returned by [`crate::store::Store`] and [`crate::store::codec`].
///
/// Callers branch on the variant: `InvalidPageToken` is the client's fault,
/// `LsnOrder` is a bug in the caller's replay logic, `Corrupt` and `Sled`
/// mean the disk (or a WAL record) cannot be trusted.
#[derive(thiserror::Error, Debug)]
pub enum StoreError {
    #[error("invalid page token: {0}")]
    InvalidPageToken(String),
    #[error("corrupt record: {0}")]
    Corrupt(String),
    #[error("storage error: {0}")]
    Sled(#[from] sled::Error),
    /// `apply` was given a record whose LSN is not the next one.
    #[error("lsn out of order: expected {expected}, got {got}")]
    LsnOrder { expected: u64, got: u64 },
    /// The store on disk was written by an incompatible format version.
    #[error("unsupported store format version {found} (this build reads {supported})")]
    UnsupportedFormat { found: u64, supported: u64 },
    /// An earlier commit failed; this store must be reopened before applying.
    #[error("store refuses writes after an earlier commit failure; restart and replay")]
    WriteFailed,
    /// A filesystem call outside sled (fsync of the store's files and
    /// directories) failed.
    #[error("store I/O: {0}")]
    Io(String),
    #[error("background task failed: {0}")]
    Task(String),
}

/// Shorthand for building a `StoreError::Corrupt`.
pub(crate) fn corrupt(what: impl Into<String>) -> StoreError {
    StoreError::Corrupt(what.into())
}
