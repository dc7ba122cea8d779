//! The SDK's one error type.

use std::error::Error as StdError;

/// Everything a [`Client`](crate::Client) call can fail with.
///
/// Callers branch on the variant: [`Error::Status`] is an answer from the
/// server (or a deadline enforced locally), [`Error::Transport`] means no
/// answer arrived at all, and [`Error::InvalidResponse`] means an answer
/// arrived that this SDK cannot make sense of.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// The call finished with a gRPC status other than OK.
    #[error("server returned {code:?}: {message}")]
    Status {
        /// The gRPC status code.
        code: tonic::Code,
        /// The status message, as sent by the server.
        message: String,
    },
    /// The connection could not be established or broke mid-call.
    #[error("transport error: {0}")]
    Transport(String),
    /// The server answered with a message that violates the API contract,
    /// for example a fact without a value.
    #[error("invalid response from server: {0}")]
    InvalidResponse(String),
}

impl Error {
    /// The gRPC code of a [`Error::Status`]; `None` for the other variants.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Error::Status { code, .. } => Some(*code),
            Error::Transport(_) | Error::InvalidResponse(_) => None,
        }
    }

    /// True when the call may be retried safely and has a chance of
    /// succeeding: the server said UNAVAILABLE, or the transport failed.
    ///
    /// Writes are only retried with the same idempotency key, so a retry of
    /// a write that did land is answered with the original tx.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Status { code, .. } => *code == tonic::Code::Unavailable,
            Error::Transport(_) => true,
            Error::InvalidResponse(_) => false,
        }
    }
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        // A status that tonic synthesised from a local I/O or HTTP/2 failure
        // carries the failure as its source and, when tonic cannot map it to
        // a better code, the code UNKNOWN. A status decoded from the server
        // never has a source. Such statuses are transport failures: the
        // server may or may not have seen the request.
        if status.code() == tonic::Code::Unknown && status.source().is_some() {
            return Error::Transport(describe_chain(&status));
        }
        // tonic reports a locally enforced deadline as CANCELLED; gRPC
        // defines it as DEADLINE_EXCEEDED, which is what callers branch on.
        if status.code() == tonic::Code::Cancelled && is_local_timeout(&status) {
            return Error::Status {
                code: tonic::Code::DeadlineExceeded,
                message: format!(
                    "deadline exceeded before the server answered ({})",
                    status.message()
                ),
            };
        }
        Error::Status {
            code: status.code(),
            message: status.message().to_string(),
        }
    }
}

impl From<tonic::transport::Error> for Error {
    fn from(err: tonic::transport::Error) -> Self {
        let chain = describe_chain(&err);
        // tonic's own message is just "transport error", which our Display
        // already says; keep only the causes.
        let causes = chain.strip_prefix("transport error: ").unwrap_or(&chain);
        Error::Transport(causes.to_string())
    }
}

/// True when tonic's client-side deadline fired: a `TimeoutExpired` is in
/// the status's source chain.
fn is_local_timeout(status: &tonic::Status) -> bool {
    let mut source = status.source();
    // Bounded walk, as in describe_chain.
    for _ in 0..16 {
        match source {
            Some(e) if e.is::<tonic::TimeoutExpired>() => return true,
            Some(e) => source = e.source(),
            None => return false,
        }
    }
    false
}

/// Joins an error and its sources into one line, so the root cause (for
/// example "Connection refused") is not lost.
fn describe_chain(err: &(dyn StdError + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    // Bound the walk: source chains are short, and a cycle must not hang us.
    let mut depth_left = 16;
    while let Some(inner) = source {
        if depth_left == 0 {
            break;
        }
        depth_left -= 1;
        let text = inner.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = inner.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_statuses_keep_their_code() {
        let err = Error::from(tonic::Status::invalid_argument("entity is empty"));
        assert_eq!(err.code(), Some(tonic::Code::InvalidArgument));
        assert!(!err.is_retryable());
        assert_eq!(
            err,
            Error::Status {
                code: tonic::Code::InvalidArgument,
                message: "entity is empty".into()
            }
        );
    }

    #[test]
    fn unavailable_is_retryable() {
        let err = Error::from(tonic::Status::unavailable("draining"));
        assert!(err.is_retryable());
        assert_eq!(err.code(), Some(tonic::Code::Unavailable));
    }

    #[test]
    fn local_unknown_with_source_is_transport() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
        let status = tonic::Status::from_error(Box::new(io));
        assert_eq!(status.code(), tonic::Code::Unknown);
        let err = Error::from(status);
        assert!(matches!(err, Error::Transport(_)), "{err:?}");
        assert!(err.is_retryable());
        assert_eq!(err.code(), None);
    }

    #[test]
    fn local_timeout_is_deadline_exceeded() {
        let status = tonic::Status::from_error(Box::new(tonic::TimeoutExpired(())));
        assert_eq!(status.code(), tonic::Code::Cancelled);
        let err = Error::from(status);
        assert_eq!(err.code(), Some(tonic::Code::DeadlineExceeded), "{err:?}");
        assert!(!err.is_retryable());
        // A CANCELLED sent by the server stays CANCELLED.
        assert_eq!(
            Error::from(tonic::Status::cancelled("bye")).code(),
            Some(tonic::Code::Cancelled)
        );
    }

    #[test]
    fn unknown_from_server_is_not_retryable() {
        let err = Error::from(tonic::Status::unknown("boom"));
        assert_eq!(err.code(), Some(tonic::Code::Unknown));
        assert!(!err.is_retryable());
    }
}
