//! Where stemed's TCP listeners come from, and the load-balancer listener
//! that follows the drain state.
//!
//! **Socket activation.** When systemd (or `systemd-socket-activate`)
//! passes listening sockets (`LISTEN_PID` is ours and `LISTEN_FDS` is set),
//! stemed serves on them instead of binding `server.grpc_addr` and
//! `server.admin_addr`: fd 3 is the gRPC API and fd 4 admin HTTP, in the
//! order of the `ListenStream=` lines of `stemedb-api.socket`. Both must be
//! listening TCP stream sockets; anything else is a startup error.
//!
//! **The load-balancer listener** (`server.lb_grpc_addr`) serves the same
//! gRPC services, but only while the node is not draining. Open-source
//! nginx never retries a gRPC call it has already sent upstream and has only
//! passive health checks, so a drained node must make nginx fail over
//! *before* a request is sent: on drain this listener stops accepting, hands
//! the connections already queued in the kernel to the server (so none is
//! reset), closes the socket (new connects are refused, which nginx retries
//! on the next upstream) and shuts its connections down gracefully (HTTP/2
//! GOAWAY after their requests finish). On undrain it listens again. It is
//! never socket-activated: a socket held open by systemd would queue
//! connections instead of refusing them.
//!
//! **Hostile connections** ([`guarded`]): both gRPC listeners share one cap
//! (`limits.grpc_connections_max`; past it a connection is closed when
//! accepted), each connection must send the HTTP/2 preface (its first 24
//! bytes; with TLS those are the start of the handshake, which tonic bounds
//! by the same timeout) within `limits.grpc_handshake_timeout_ms`, and
//! accept errors (out of file
//! descriptors, say) are logged and retried after a pause instead of
//! spinning.
//!
//! # Invariants
//! - The drain handler calls [`LbListener::drain`] *before* the node
//!   refuses writes, so no request routed here by the load balancer meets
//!   the drain (within `LB_CLOSE_WAIT_MAX`).
//! - The listener is bound only while the node is not draining.

use anyhow::Context;
use futures::Stream;
use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, RawFd};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The first fd passed by systemd (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;
/// fd of the gRPC API under socket activation.
pub const GRPC_FD: RawFd = LISTEN_FDS_START;
/// fd of admin HTTP under socket activation.
pub const ADMIN_FD: RawFd = LISTEN_FDS_START + 1;
/// How long `drain` waits for the load-balancer listener's requests to
/// finish before it lets the node refuse writes anyway.
pub const LB_CLOSE_WAIT_MAX: Duration = Duration::from_secs(5);
/// Pause between attempts to bind the load-balancer address again after
/// undrain (the port may still be taken).
pub const LB_REBIND_INTERVAL: Duration = Duration::from_secs(1);
/// Connections taken from the kernel's accept queue when the
/// load-balancer listener closes (the queue is bounded by the backlog).
pub const LB_BACKLOG_HANDOVER_MAX: usize = 4096;

/// The gRPC and admin listeners: passed by systemd, else bound.
pub async fn api_listeners(
    server: &crate::config::ServerConfig,
) -> anyhow::Result<(TcpListener, TcpListener)> {
    let passed: Vec<RawFd> = sd_notify::listen_fds()
        .context("invalid socket activation environment (LISTEN_PID/LISTEN_FDS)")?
        .collect();
    if passed.is_empty() {
        let grpc = TcpListener::bind(server.grpc_addr)
            .await
            .with_context(|| format!("cannot bind gRPC on {}", server.grpc_addr))?;
        let admin = TcpListener::bind(server.admin_addr)
            .await
            .with_context(|| format!("cannot bind admin HTTP on {}", server.admin_addr))?;
        return Ok((grpc, admin));
    }
    anyhow::ensure!(
        passed == [GRPC_FD, ADMIN_FD],
        "socket activation passed fds {passed:?}; stemed needs exactly two, fd {GRPC_FD} (gRPC) and fd {ADMIN_FD} (admin HTTP)"
    );
    let grpc = inherited(GRPC_FD, "gRPC")?;
    let admin = inherited(ADMIN_FD, "admin HTTP")?;
    tracing::info!(
        grpc = %grpc.local_addr()?,
        admin = %admin.local_addr()?,
        "using the sockets passed by systemd; server.grpc_addr and server.admin_addr are ignored"
    );
    Ok((grpc, admin))
}

/// Takes ownership of a passed fd after checking it is a listening TCP
/// stream socket.
fn inherited(fd: RawFd, what: &str) -> anyhow::Result<TcpListener> {
    use nix::sys::socket::{
        getsockname, getsockopt, sockopt, AddressFamily, SockType, SockaddrLike, SockaddrStorage,
    };
    // SAFETY: the fd was passed to this process by socket activation and
    // is not owned by anything else; it is borrowed only for the checks.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let kind = getsockopt(&borrowed, sockopt::SockType)
        .with_context(|| format!("fd {fd} ({what}) is not a socket"))?;
    let listening = getsockopt(&borrowed, sockopt::AcceptConn)
        .with_context(|| format!("fd {fd} ({what}): cannot read SO_ACCEPTCONN"))?;
    let addr: SockaddrStorage =
        getsockname(fd).with_context(|| format!("fd {fd} ({what}): getsockname"))?;
    let inet = matches!(
        addr.family(),
        Some(AddressFamily::Inet | AddressFamily::Inet6)
    );
    anyhow::ensure!(
        kind == SockType::Stream && listening && inet,
        "fd {fd} ({what}) must be a listening TCP socket (ListenStream=host:port)"
    );
    // SAFETY: as above; from here on the listener owns the fd.
    let std_listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
    std_listener.set_nonblocking(true)?;
    Ok(TcpListener::from_std(std_listener)?)
}

/// Handle on the load-balancer listener, for the drain and undrain
/// handlers. With no `lb_grpc_addr` every call is a no-op.
#[derive(Clone)]
pub struct LbListener {
    inner: Option<LbShared>,
}

#[derive(Clone)]
struct LbShared {
    /// What the admin API wants: true while the node is draining.
    draining: std::sync::Arc<watch::Sender<bool>>,
    /// What the listener task reports: true while it is bound or still
    /// finishing the requests of its connections.
    open: watch::Receiver<bool>,
}

impl LbListener {
    /// No load-balancer listener configured.
    pub fn disabled() -> LbListener {
        LbListener { inner: None }
    }

    /// Binds `addr` now unless the node is draining (a bind error is a
    /// startup error), then follows the drain state until `stop` turns
    /// true. `serve` runs one server instance over an incoming stream; it
    /// must return once the stream has ended and its connections closed,
    /// or once `stop` turns true.
    pub async fn start<F, Fut>(
        addr: Option<SocketAddr>,
        draining: bool,
        stop: watch::Receiver<bool>,
        serve: F,
    ) -> anyhow::Result<LbListener>
    where
        F: Fn(LbIncoming, watch::Receiver<bool>) -> Fut + Send + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let Some(addr) = addr else {
            return Ok(LbListener::disabled());
        };
        let first = match draining {
            true => None,
            false => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot bind the load-balancer gRPC on {addr}"))?,
            ),
        };
        if let Some(l) = &first {
            println!("stemed load-balancer gRPC {}", l.local_addr()?);
        }
        let (draining_tx, draining_rx) = watch::channel(draining);
        let (open_tx, open_rx) = watch::channel(first.is_some());
        tokio::spawn(run(addr, first, draining_rx, stop, open_tx, serve));
        Ok(LbListener {
            inner: Some(LbShared {
                draining: std::sync::Arc::new(draining_tx),
                open: open_rx,
            }),
        })
    }

    /// Closes the listener and waits, at most `LB_CLOSE_WAIT_MAX`, until
    /// the requests on its connections have finished. Call it before the
    /// node starts refusing writes.
    pub async fn drain(&self) {
        let Some(lb) = &self.inner else { return };
        lb.draining.send_replace(true);
        let mut open = lb.open.clone();
        let closed = tokio::time::timeout(LB_CLOSE_WAIT_MAX, open.wait_for(|o| !*o))
            .await
            .is_ok();
        match closed {
            true => tracing::info!("load-balancer listener closed"),
            false => tracing::warn!(
                wait_ms = LB_CLOSE_WAIT_MAX.as_millis() as u64,
                "load-balancer listener closed, but some of its requests are still running"
            ),
        }
    }

    /// Listens again (in the background; retried until the port is free).
    pub fn undrain(&self) {
        if let Some(lb) = &self.inner {
            lb.draining.send_replace(false);
        }
    }

    /// Resolves once the listener and all its connections are closed.
    pub async fn closed(&self) {
        if let Some(lb) = &self.inner {
            let mut open = lb.open.clone();
            let _ = open.wait_for(|o| !*o).await;
        }
    }
}

/// The listener task: one server instance per undrained period.
async fn run<F, Fut>(
    addr: SocketAddr,
    mut listener: Option<TcpListener>,
    mut draining: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
    open: watch::Sender<bool>,
    serve: F,
) where
    F: Fn(LbIncoming, watch::Receiver<bool>) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    loop {
        let l = match listener.take() {
            Some(l) => l,
            None => match bind_when_serving(addr, &mut draining, &mut stop).await {
                Some(l) => l,
                None => break,
            },
        };
        open.send_replace(true);
        tracing::info!(addr = %addr, "load-balancer listener open");
        let incoming = incoming(l, draining.clone());
        if let Err(e) = serve(incoming, stop.clone()).await {
            tracing::error!(error = format!("{e:#}"), "load-balancer gRPC server failed");
            tokio::time::sleep(LB_REBIND_INTERVAL).await;
        }
        open.send_replace(false);
        if *stop.borrow() {
            break;
        }
    }
    open.send_replace(false);
}

/// Waits until the node serves, then binds; None once `stop` turns true.
async fn bind_when_serving(
    addr: SocketAddr,
    draining: &mut watch::Receiver<bool>,
    stop: &mut watch::Receiver<bool>,
) -> Option<TcpListener> {
    loop {
        tokio::select! {
            serving = draining.wait_for(|d| !*d) => {
                // Every handle is gone: nobody can undrain any more.
                serving.ok()?;
            }
            _ = stop.wait_for(|s| *s) => return None,
        }
        match TcpListener::bind(addr).await {
            Ok(l) => return Some(l),
            Err(e) => {
                tracing::warn!(addr = %addr, error = %e, "cannot bind the load-balancer gRPC yet")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(LB_REBIND_INTERVAL) => {}
            _ = stop.wait_for(|s| *s) => return None,
        }
    }
}

/// The connections of the load-balancer listener, for tonic's
/// `serve_with_incoming_shutdown`.
pub type LbIncoming = std::pin::Pin<Box<dyn Stream<Item = std::io::Result<TcpStream>> + Send>>;

/// Accepted connections until `draining` turns true; then the connections
/// already queued in the kernel, then the end of the stream, which drops
/// (closes) the listener.
///
/// Why the hand-over: a connection that completed its handshake but was
/// not yet accepted would be reset when the socket closes, after nginx has
/// sent its request on it, and nginx does not retry a sent gRPC call.
fn incoming(listener: TcpListener, draining: watch::Receiver<bool>) -> LbIncoming {
    enum Phase {
        Accepting(TcpListener, watch::Receiver<bool>),
        HandingOver(std::net::TcpListener, usize),
    }
    let stream = futures::stream::unfold(
        Some(Phase::Accepting(listener, draining)),
        |phase| async move {
            match phase? {
                Phase::Accepting(listener, mut draining) => {
                    let accepted = tokio::select! {
                        biased;
                        _ = draining.wait_for(|d| *d) => None,
                        accepted = listener.accept() => Some(accepted),
                    };
                    if let Some(accepted) = accepted {
                        let next = Phase::Accepting(listener, draining);
                        let stream = accepted.and_then(|(s, _)| nodelay(s));
                        return Some((stream, Some(next)));
                    }
                    // tokio accepts only after epoll reports readiness; the
                    // std listener asks the kernel directly.
                    let std_listener = listener.into_std().ok()?;
                    hand_over(std_listener, 0)
                }
                Phase::HandingOver(std_listener, taken) => hand_over(std_listener, taken),
            }
        },
    );
    // One queued connection at a time, until the accept queue is empty.
    fn hand_over(
        listener: std::net::TcpListener,
        taken: usize,
    ) -> Option<(std::io::Result<TcpStream>, Option<Phase>)> {
        if taken >= LB_BACKLOG_HANDOVER_MAX {
            return None;
        }
        let (stream, _) = listener.accept().ok()?;
        let stream = stream
            .set_nonblocking(true)
            .and_then(|_| TcpStream::from_std(stream))
            .and_then(nodelay);
        Some((stream, Some(Phase::HandingOver(listener, taken + 1))))
    }
    Box::pin(stream)
}

/// Turns Nagle off on an accepted gRPC connection. tonic's
/// `Server::tcp_nodelay` applies only to listeners tonic binds itself, not
/// to streams handed to `serve_with_incoming`; without this, small
/// responses wait for the peer's delayed ACK (about 40 ms per Get).
pub fn nodelay(stream: TcpStream) -> std::io::Result<TcpStream> {
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Accepted connections of `listener`, each with Nagle off.
pub fn accepted_nodelay(
    listener: TcpListener,
) -> impl futures::Stream<Item = std::io::Result<TcpStream>> + Send + 'static {
    futures::StreamExt::map(
        tokio_stream::wrappers::TcpListenerStream::new(listener),
        |r| r.and_then(nodelay),
    )
}

/// The bounds on gRPC connections (`[limits]`), shared by the public and
/// load-balancer listeners.
#[derive(Clone)]
pub struct GrpcConnLimits {
    /// One permit per open connection (`grpc_connections_max`).
    pub slots: std::sync::Arc<tokio::sync::Semaphore>,
    pub connections_max: usize,
    /// `grpc_handshake_timeout_ms`.
    pub handshake_timeout: Duration,
}

impl GrpcConnLimits {
    pub fn new(connections_max: usize, handshake_timeout: Duration) -> GrpcConnLimits {
        GrpcConnLimits {
            slots: std::sync::Arc::new(tokio::sync::Semaphore::new(connections_max)),
            connections_max,
            handshake_timeout,
        }
    }
}

/// Bytes of the HTTP/2 client connection preface (`PRI * HTTP/2.0...`).
pub const HTTP2_PREFACE_BYTES: usize = 24;
/// Pause after a failed accept (e.g. out of file descriptors), so that a
/// pending connection the kernel keeps reporting does not spin the loop.
pub const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// The connections a gRPC server serves: each holds a slot of
/// `grpc_connections_max` until it closes and must send its first
/// [`HTTP2_PREFACE_BYTES`] within `grpc_handshake_timeout_ms`. Past the cap
/// a connection is closed as soon as it is accepted. Accept errors are
/// skipped after [`ACCEPT_ERROR_BACKOFF`], never handed to the server.
/// Refusals and accept errors are logged at most once a second each.
pub fn guarded<I>(
    incoming: I,
    limits: GrpcConnLimits,
) -> impl Stream<Item = std::io::Result<GrpcConn>> + Send + 'static
where
    I: Stream<Item = std::io::Result<TcpStream>> + Send + 'static,
{
    let refused = std::sync::Arc::new(Throttle::default());
    let failed = std::sync::Arc::new(Throttle::default());
    futures::StreamExt::filter_map(incoming, move |accepted| {
        let (limits, refused, failed) = (limits.clone(), refused.clone(), failed.clone());
        async move {
            let stream = match accepted {
                Ok(s) => s,
                Err(e) => {
                    if let Some(n) = failed.note() {
                        tracing::warn!(error = %e, failures = n, "gRPC accept failed");
                    }
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    return None;
                }
            };
            match limits.slots.clone().try_acquire_owned() {
                Ok(slot) => Some(Ok(GrpcConn::new(stream, slot, limits.handshake_timeout))),
                Err(_) => {
                    if let Some(n) = refused.note() {
                        tracing::warn!(
                            peer = ?stream.peer_addr().ok(),
                            refused = n,
                            "gRPC connections refused: grpc_connections_max ({}) connections open",
                            limits.connections_max
                        );
                    }
                    None
                }
            }
        }
    })
}

/// At most one log line a second for an event a client can repeat at will,
/// carrying how many happened since the last line.
#[derive(Default)]
struct Throttle {
    since_last: std::sync::atomic::AtomicU64,
    last: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Throttle {
    /// Some(count since the last line) when it is time to log.
    fn note(&self) -> Option<u64> {
        use std::sync::atomic::Ordering;
        let n = self.since_last.fetch_add(1, Ordering::Relaxed) + 1;
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            return None;
        }
        *last = Some(std::time::Instant::now());
        self.since_last.fetch_sub(n, Ordering::Relaxed);
        Some(n)
    }
}

/// An accepted gRPC connection (see [`guarded`]).
pub struct GrpcConn {
    stream: TcpStream,
    /// Until the preface has arrived: when to give up on it.
    preface_deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    preface_left: usize,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl GrpcConn {
    fn new(
        stream: TcpStream,
        slot: tokio::sync::OwnedSemaphorePermit,
        handshake_timeout: Duration,
    ) -> GrpcConn {
        GrpcConn {
            stream,
            preface_deadline: Some(Box::pin(tokio::time::sleep(handshake_timeout))),
            preface_left: HTTP2_PREFACE_BYTES,
            _slot: slot,
        }
    }
}

impl tonic::transport::server::Connected for GrpcConn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        tonic::transport::server::Connected::connect_info(&self.stream)
    }
}

impl tokio::io::AsyncRead for GrpcConn {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let this = &mut *self;
        let before = buf.filled().len();
        match std::pin::Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len() - before;
                this.preface_left = this.preface_left.saturating_sub(n);
                if this.preface_left == 0 || n == 0 {
                    this.preface_deadline = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let expired = this
                    .preface_deadline
                    .as_mut()
                    .is_some_and(|d| d.as_mut().poll(cx).is_ready());
                if !expired {
                    return Poll::Pending;
                }
                this.preface_deadline = None;
                Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no HTTP/2 preface within grpc_handshake_timeout_ms",
                )))
            }
            other => other,
        }
    }
}

impl tokio::io::AsyncWrite for GrpcConn {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn set_draining(tx: &watch::Sender<bool>, draining: bool) {
        tx.send_replace(draining);
    }

    #[tokio::test]
    async fn queued_connections_are_handed_over_before_the_socket_closes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Handshakes complete in the kernel; nothing has accepted them yet.
        let clients: Vec<_> = (0..3)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        let (tx, rx) = watch::channel(false);
        set_draining(&tx, true);
        let accepted: Vec<_> = incoming(listener, rx).collect().await;
        assert_eq!(accepted.len(), clients.len());
        assert!(accepted.iter().all(|r| r.is_ok()));
        let refused = std::net::TcpStream::connect(addr);
        assert!(
            refused.is_err(),
            "the socket must be closed after the hand-over"
        );
    }

    #[tokio::test]
    async fn lb_listener_closes_on_drain_and_listens_again_on_undrain() {
        let addr = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap()
        };
        let (_stop_tx, stop_rx) = watch::channel(false);
        // A server that accepts and drops connections until the stream ends.
        let serve = |mut incoming: LbIncoming, _stop: watch::Receiver<bool>| async move {
            while let Some(c) = incoming.next().await {
                drop(c);
            }
            Ok(())
        };
        let lb = LbListener::start(Some(addr), false, stop_rx, serve)
            .await
            .unwrap();
        assert!(std::net::TcpStream::connect(addr).is_ok());
        lb.drain().await;
        assert!(std::net::TcpStream::connect(addr).is_err());
        lb.undrain();
        let mut open = lb.inner.as_ref().unwrap().open.clone();
        open.wait_for(|o| *o).await.unwrap();
        assert!(std::net::TcpStream::connect(addr).is_ok());
    }

    #[tokio::test]
    async fn a_draining_node_does_not_bind() {
        let addr = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap()
        };
        let (_stop_tx, stop_rx) = watch::channel(false);
        let serve = |_: LbIncoming, _: watch::Receiver<bool>| async { Ok(()) };
        let lb = LbListener::start(Some(addr), true, stop_rx, serve)
            .await
            .unwrap();
        assert!(std::net::TcpStream::connect(addr).is_err());
        LbListener::disabled().drain().await;
        lb.closed().await;
    }
}
