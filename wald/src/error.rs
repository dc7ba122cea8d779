//! The one error type of the WAL engine. Callers branch on the variant;
//! the gRPC layer maps each variant to a status code in exactly one place.

use std::path::PathBuf;

/// Every failure the WAL engine reports.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// The request is malformed (empty batch, a bound exceeded, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A bound on queue or message size was hit.
    #[error("resource exhausted: {0}")]
    ResourceExhausted(String),
    /// The append carried an epoch that is not the current writer epoch.
    #[error("writer epoch {got} is not the current epoch {current}")]
    Fenced { got: u64, current: u64 },
    /// No writer has been opened yet, so no epoch is valid.
    #[error("no writer is open (current epoch 0); call OpenWriter first")]
    NoWriter,
    /// A Read started below the first retained LSN.
    #[error("from_lsn {from_lsn} is below the first available LSN {first_lsn}")]
    OutOfRange { from_lsn: u64, first_lsn: u64 },
    /// ENOSPC while preallocating or writing. Not fatal: retried later.
    #[error("WAL disk is full: {0}")]
    DiskFull(String),
    /// An fsync failed. Fatal: the process stops (see `log::Log::sync`).
    #[error("WAL fsync failed: {0}")]
    FsyncFailed(String),
    /// The WAL stopped after an earlier fatal error.
    #[error("WAL has failed and stopped accepting writes: {0}")]
    Failed(String),
    /// Bytes on disk are damaged; names the file and the byte offset.
    #[error("WAL damage in {} at offset {offset}: {reason}", file.display())]
    Corrupt {
        file: PathBuf,
        offset: u64,
        reason: String,
    },
    /// Any other I/O failure, with what was being done.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// walld is shutting down.
    #[error("walld is shutting down")]
    ShuttingDown,
}

impl WalError {
    /// Wraps an I/O error, turning ENOSPC and EDQUOT into `DiskFull`.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        let context = context.into();
        if is_disk_full(&source) {
            return WalError::DiskFull(format!("{context}: {source}"));
        }
        WalError::Io { context, source }
    }

    /// A copy of this error for one more waiting caller (I/O errors are not
    /// `Clone`, so they are carried as text).
    pub fn duplicate(&self) -> WalError {
        match self {
            WalError::InvalidArgument(s) => WalError::InvalidArgument(s.clone()),
            WalError::ResourceExhausted(s) => WalError::ResourceExhausted(s.clone()),
            WalError::Fenced { got, current } => WalError::Fenced {
                got: *got,
                current: *current,
            },
            WalError::NoWriter => WalError::NoWriter,
            WalError::OutOfRange {
                from_lsn,
                first_lsn,
            } => WalError::OutOfRange {
                from_lsn: *from_lsn,
                first_lsn: *first_lsn,
            },
            WalError::DiskFull(s) => WalError::DiskFull(s.clone()),
            WalError::FsyncFailed(s) => WalError::FsyncFailed(s.clone()),
            WalError::ShuttingDown => WalError::ShuttingDown,
            other => WalError::Failed(other.to_string()),
        }
    }

    /// A short stable name for the error counters in Status.
    pub fn kind(&self) -> &'static str {
        match self {
            WalError::InvalidArgument(_) => "invalid_argument",
            WalError::ResourceExhausted(_) => "resource_exhausted",
            WalError::Fenced { .. } => "fenced",
            WalError::NoWriter => "no_writer",
            WalError::OutOfRange { .. } => "out_of_range",
            WalError::DiskFull(_) => "disk_full",
            WalError::FsyncFailed(_) => "fsync_failed",
            WalError::Failed(_) => "failed",
            WalError::Corrupt { .. } => "corrupt",
            WalError::Io { .. } => "io",
            WalError::ShuttingDown => "shutting_down",
        }
    }
}

/// True for the errno values that mean "no space left".
pub fn is_disk_full(error: &std::io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::ENOSPC) | Some(libc::EDQUOT)
    )
}

pub type Result<T, E = WalError> = std::result::Result<T, E>;
