//! Exit codes, chosen in one place from the error that ended the command.

use stemedb_client::Error;

/// The command line parsed but made no sense, e.g. a VALUE that is not of
/// its --type. Exits like a clap usage error.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// The node could not be reached (exit 4). The message says what to check.
#[derive(Debug)]
pub struct ConnectionError(pub String);

impl std::fmt::Display for ConnectionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConnectionError {}

/// The node answered with an error (exit 3), for example an admin HTTP
/// status other than 2xx.
#[derive(Debug)]
pub struct ServerError(pub String);

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ServerError {}

/// Success.
pub const OK: i32 = 0;
/// Any failure not listed below (for example a broken stdout).
pub const FAILURE: i32 = 1;
/// Bad command line (also clap's own code).
pub const USAGE: i32 = 2;
/// The server answered with an error status, or nonsense.
pub const SERVER: i32 = 3;
/// The node could not be reached, or the connection broke.
pub const CONNECTION: i32 = 4;

/// The exit code for `err`: the first SDK or usage error in its chain
/// decides; anything else is a generic failure.
pub fn code_for(err: &anyhow::Error) -> i32 {
    for cause in err.chain() {
        if cause.downcast_ref::<UsageError>().is_some() {
            return USAGE;
        }
        if cause.downcast_ref::<ConnectionError>().is_some() {
            return CONNECTION;
        }
        if cause.downcast_ref::<ServerError>().is_some() {
            return SERVER;
        }
        if let Some(e) = cause.downcast_ref::<Error>() {
            return match e {
                Error::Transport(_) => CONNECTION,
                // stemectl never cancels a call itself, so CANCELLED means
                // tonic saw the connection torn down under the call (for
                // example a TLS peer refusing our client certificate).
                Error::Status {
                    code: tonic::Code::Cancelled,
                    ..
                } => CONNECTION,
                Error::Status { .. } | Error::InvalidResponse(_) => SERVER,
            };
        }
    }
    FAILURE
}

/// What to do next about `err`, when the error itself does not say.
pub fn hint(err: &anyhow::Error, cli: &crate::cli::Cli) -> Option<String> {
    let e = err.chain().find_map(|c| c.downcast_ref::<Error>())?;
    match e {
        Error::Transport(_) => Some(format!(
            "is stemed running and serving gRPC at {}? set --addr or STEMEDB_ADDR",
            cli.addr
        )),
        Error::Status { code, message } => match code {
            tonic::Code::Cancelled => Some(format!(
                "the connection to {} was closed under the call: with TLS, check --ca-file, --client-cert and --client-key; else is stemed restarting?",
                cli.addr
            )),
            tonic::Code::Unavailable if message.contains("draining") => Some(
                "the node refuses writes while drained: run `stemectl undrain` when it may serve again, or write to another node".into(),
            ),
            tonic::Code::ResourceExhausted => Some(
                "the node's write rate limit is reached: retry later, or see `stemectl rate-limit show`".into(),
            ),
            tonic::Code::Unauthenticated => {
                Some("pass a token with --token or STEMEDB_TOKEN".into())
            }
            tonic::Code::PermissionDenied => {
                Some("this token's role may not make this call; use a token with the needed role".into())
            }
            _ => None,
        },
        Error::InvalidResponse(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn codes_follow_the_cause() {
        let status: anyhow::Result<()> = Err(Error::Status {
            code: tonic::Code::NotFound,
            message: "x".into(),
        }
        .into());
        assert_eq!(code_for(&status.context("get e").unwrap_err()), SERVER);
        let transport: anyhow::Result<()> = Err(Error::Transport("refused".into()).into());
        assert_eq!(
            code_for(&transport.context("connecting").unwrap_err()),
            CONNECTION
        );
        assert_eq!(
            code_for(&anyhow::Error::new(UsageError("bad".into()))),
            USAGE
        );
        let cancelled = anyhow::Error::new(Error::Status {
            code: tonic::Code::Cancelled,
            message: "operation was canceled".into(),
        });
        assert_eq!(code_for(&cancelled), CONNECTION);
        assert_eq!(
            code_for(&anyhow::Error::new(ConnectionError("x".into()))),
            CONNECTION
        );
        assert_eq!(
            code_for(&anyhow::Error::new(ServerError("x".into()))),
            SERVER
        );
        assert_eq!(code_for(&anyhow::anyhow!("other")), FAILURE);
    }
}
