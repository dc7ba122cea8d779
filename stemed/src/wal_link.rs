//! The link from stemed to walld: a gRPC client over walld's Unix socket and
//! the writer session (epoch) that fences any other writer.
//!
//! This is the only module of stemed that knows the WAL wire protocol.

use hyper_util::rt::TokioIo;
use std::path::{Path, PathBuf};
use std::time::Duration;
use stemedb_proto::wal::v1 as pb;
use stemedb_proto::wal::v1::wal_client::WalClient;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// Bound on one WAL message in either direction (a group commit append).
pub const WAL_MESSAGE_BYTES_MAX: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// walld could not be reached or the connection broke.
    #[error("walld unreachable at {socket}: {reason}")]
    Unreachable { socket: String, reason: String },
    /// walld answered with an error status.
    #[error("walld: {0}")]
    Status(tonic::Status),
    /// walld's answers broke the writer protocol.
    #[error("walld: {0}")]
    Protocol(String),
}

impl WalError {
    /// True when walld reports that its disk is full. The session survives;
    /// the write is refused and may be retried later.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, WalError::Status(s) if s.code() == tonic::Code::ResourceExhausted)
    }
}

/// A connected writer session.
pub struct WalLink {
    socket: PathBuf,
    client: WalClient<Channel>,
    epoch: u64,
}

/// Opens a channel over the Unix socket. The URI is a placeholder: the
/// connector ignores it and dials the socket.
pub async fn connect_channel(socket: &Path, timeout: Duration) -> Result<Channel, WalError> {
    let path = socket.to_path_buf();
    let unreachable = |reason: String| WalError::Unreachable {
        socket: socket.display().to_string(),
        reason,
    };
    Endpoint::try_from("http://walld.local")
        .map_err(|e| unreachable(e.to_string()))?
        .connect_timeout(timeout)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .map_err(|e| unreachable(format!("{e}: {}", source_chain(&e))))
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = String::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(&s.to_string());
        out.push(' ');
        cur = s.source();
    }
    out
}

pub fn client(channel: Channel) -> WalClient<Channel> {
    WalClient::new(channel)
        .max_decoding_message_size(WAL_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(WAL_MESSAGE_BYTES_MAX)
}

impl WalLink {
    /// Connects and opens a new writer session; returns the link and the
    /// durable LSN walld reported when the session opened.
    pub async fn open(
        socket: &Path,
        writer_id: &str,
        timeout: Duration,
    ) -> Result<(WalLink, u64), WalError> {
        let mut client = client(connect_channel(socket, timeout).await?);
        let resp = client
            .open_writer(pb::OpenWriterRequest {
                writer_id: writer_id.to_string(),
            })
            .await
            .map_err(|s| status_error(socket, s))?
            .into_inner();
        let link = WalLink {
            socket: socket.to_path_buf(),
            client,
            epoch: resp.epoch,
        };
        Ok((link, resp.durable_lsn))
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// A handle that appends in this session; several may be in flight on
    /// the one connection. walld assigns LSNs in the order appends reach
    /// its queue, which for appends in flight together may differ from the
    /// order they were sent.
    pub fn appender(&self) -> Appender {
        Appender {
            socket: self.socket.clone(),
            client: self.client.clone(),
            epoch: self.epoch,
        }
    }
}

/// Appends in one writer session (see [`WalLink::appender`]).
pub struct Appender {
    socket: PathBuf,
    client: WalClient<Channel>,
    epoch: u64,
}

impl Appender {
    /// Appends records durably; returns `(first_lsn, last_lsn)`.
    pub async fn append(mut self, records: Vec<Vec<u8>>) -> Result<(u64, u64), WalError> {
        let count = records.len() as u64;
        assert!(count > 0, "append of no records");
        let mut request = tonic::Request::new(pb::AppendRequest {
            epoch: self.epoch,
            records,
            no_sync: false,
        });
        // walld's `wal.append` span joins the caller's trace.
        crate::telemetry::inject(request.metadata_mut());
        let resp = self
            .client
            .append(request)
            .await
            .map_err(|s| status_error(&self.socket, s))?
            .into_inner();
        // walld's contract, checked on our side of the boundary too.
        assert_eq!(
            resp.last_lsn + 1 - resp.first_lsn,
            count,
            "walld assigned a non-dense LSN range"
        );
        assert!(
            resp.durable_lsn >= resp.last_lsn,
            "walld acknowledged an append that is not durable"
        );
        Ok((resp.first_lsn, resp.last_lsn))
    }
}

impl WalLink {
    /// Reads durable records `from_lsn..=to_lsn` (no follow), in order.
    pub async fn read_range(
        &mut self,
        from_lsn: u64,
        to_lsn: u64,
    ) -> Result<Vec<(u64, Vec<u8>)>, WalError> {
        let mut out = Vec::new();
        if from_lsn > to_lsn {
            return Ok(out);
        }
        let mut stream = self
            .client
            .read(pb::ReadRequest {
                from_lsn,
                follow: false,
                max_bytes_per_message: 4 << 20,
            })
            .await
            .map_err(|s| status_error(&self.socket, s))?
            .into_inner();
        let mut expected = from_lsn;
        'outer: while let Some(msg) = stream
            .message()
            .await
            .map_err(|s| status_error(&self.socket, s))?
        {
            for rec in msg.records {
                if rec.lsn > to_lsn {
                    break 'outer;
                }
                assert_eq!(rec.lsn, expected, "walld returned a gap in the WAL");
                expected += 1;
                out.push((rec.lsn, rec.data));
            }
        }
        if expected != to_lsn + 1 {
            return Err(WalError::Unreachable {
                socket: self.socket.display().to_string(),
                reason: format!(
                    "read stopped at LSN {} before the durable LSN {to_lsn}",
                    expected - 1
                ),
            });
        }
        Ok(out)
    }
}

fn status_error(socket: &Path, s: tonic::Status) -> WalError {
    match s.code() {
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
            if s.message().contains("transport") || s.message().contains("connect") =>
        {
            WalError::Unreachable {
                socket: socket.display().to_string(),
                reason: s.message().to_string(),
            }
        }
        _ => WalError::Status(s),
    }
}

/// A read-only client for Status and truncation, independent of the
/// writer session (used by the admin server and checkpoints).
pub async fn status(socket: &Path, timeout: Duration) -> Result<pb::StatusResponse, WalError> {
    let mut c = client(connect_channel(socket, timeout).await?);
    let mut req = tonic::Request::new(pb::StatusRequest {});
    req.set_timeout(timeout);
    Ok(c.status(req)
        .await
        .map_err(|s| status_error(socket, s))?
        .into_inner())
}

/// Releases WAL segments below `below_lsn`; returns `(first_lsn still
/// held, segments removed)`. walld may hold back more than asked (whole
/// segments only, and never an unarchived one).
pub async fn truncate(
    socket: &Path,
    below_lsn: u64,
    timeout: Duration,
) -> Result<(u64, u64), WalError> {
    let mut c = client(connect_channel(socket, timeout).await?);
    let mut req = tonic::Request::new(pb::TruncateRequest { below_lsn });
    req.set_timeout(timeout);
    let r = c
        .truncate(req)
        .await
        .map_err(|s| status_error(socket, s))?
        .into_inner();
    Ok((r.first_lsn, r.segments_removed))
}
