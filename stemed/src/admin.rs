//! Admin and metrics HTTP/1.1 (axum on hyper) on `server.admin_addr`.
//!
//! | route | does |
//! |---|---|
//! | `GET /metrics` | Prometheus exposition (`metrics.rs`) |
//! | `GET /healthz` | liveness |
//! | `GET /readyz` | 200 only when walld is connected, replay has caught up, the node is not draining and the WAL is not failed or full; the JSON body says why not |
//! | `GET /v1/admin/status` | node state |
//! | `POST /v1/admin/node/drain`, `/undrain` | drain (persisted); no body, or `{}` |
//! | `GET`/`POST /v1/admin/rate-limit` | `{"max_writes_per_sec": N}`; 0 or null removes it (persisted) |
//!
//! Bounded: at most `ADMIN_CONNECTIONS_MAX` connections, headers within
//! `HEADER_TIMEOUT`, whole requests within `REQUEST_TIMEOUT` (408), bodies
//! up to `BODY_BYTES_MAX` (413, refused on the `Content-Length` alone, or
//! once that much of a chunked body has arrived). JSON bodies are accepted
//! whatever their Content-Type, so `curl -d '{...}'` works as operators
//! type it. Every error, the bounds' own included, is `{"error": "..."}`.

use crate::auth::{AdminAuth, AdminDecision};
use crate::checkpoint::CheckpointStats;
use crate::ops::Ops;
use crate::store::Store;
use crate::watch_hub::WatchHub;
use crate::write_path::{LinkState, WritePath};
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

pub const ADMIN_CONNECTIONS_MAX: usize = 256;
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
pub const BODY_BYTES_MAX: usize = 64 * 1024;

#[derive(Clone)]
pub struct AdminState {
    pub write_path: Arc<WritePath>,
    pub store: Store,
    pub hub: Arc<WatchHub>,
    pub checkpoints: Arc<CheckpointStats>,
    pub started: Instant,
    /// walld's socket, for Status at scrape time.
    pub wal_socket: std::path::PathBuf,
    pub ops: Arc<Ops>,
    pub auth: Arc<AdminAuth>,
    pub health: tonic_health::server::HealthReporter,
    /// The load-balancer listener, closed while draining.
    pub lb: crate::listeners::LbListener,
}

pub fn router(state: AdminState) -> Router {
    let protected = Router::new()
        .route("/v1/admin/status", get(status))
        .route("/v1/admin/node/drain", post(drain))
        .route("/v1/admin/node/undrain", post(undrain))
        .route(
            "/v1/admin/rate-limit",
            get(get_rate_limit).post(set_rate_limit),
        )
        .route("/v1/admin/export", get(export))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_admin,
        ));
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(protected)
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such admin route") })
        .layer(tower_http::limit::RequestBodyLimitLayer::new(
            BODY_BYTES_MAX,
        ))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
        .layer(axum::middleware::map_response(json_errors))
        .with_state(state)
}

/// The bounds' own refusals (413 from the body limit, 408 from the
/// request timeout, 405 from the router) carry plain text or nothing; like
/// every other admin error they become `{"error": ...}` naming the bound.
async fn json_errors(response: Response) -> Response {
    let is_json = response
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json {
        return response;
    }
    match response.status() {
        StatusCode::PAYLOAD_TOO_LARGE => error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body exceeds BODY_BYTES_MAX ({BODY_BYTES_MAX} bytes)"),
        ),
        StatusCode::REQUEST_TIMEOUT => error(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "request not received within REQUEST_TIMEOUT ({} s)",
                REQUEST_TIMEOUT.as_secs()
            ),
        ),
        StatusCode::METHOD_NOT_ALLOWED => {
            let mut r = error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this admin route",
            );
            if let Some(allow) = response.headers().get("allow") {
                r.headers_mut().insert("allow", allow.clone());
            }
            r
        }
        _ => response,
    }
}

fn error(code: StatusCode, message: impl Into<String>) -> Response {
    (code, Json(json!({"error": message.into()}))).into_response()
}

async fn require_admin(
    State(s): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let authorization = headers.get("authorization").and_then(|v| v.to_str().ok());
    match s.auth.decide(peer.ip(), authorization) {
        AdminDecision::Allow => next.run(request).await,
        AdminDecision::Deny(why) => {
            tracing::warn!(peer = %peer, reason = why, "admin request refused");
            let mut r = error(StatusCode::UNAUTHORIZED, why);
            r.headers_mut()
                .insert("www-authenticate", "Bearer".parse().expect("static header"));
            r
        }
    }
}

/// Why the node is not ready, if it is not.
fn not_ready_reasons(s: &AdminState) -> Vec<String> {
    let mut reasons = Vec::new();
    if s.ops.draining() {
        reasons.push("node is draining".to_string());
    }
    match s.write_path.link_status().state {
        LinkState::Serving => {}
        LinkState::CatchingUp => reasons.push("replaying the WAL from walld".into()),
        LinkState::Connecting { reason } => {
            reasons.push(format!("walld is not connected: {reason}"))
        }
        LinkState::DiskFull { reason } => reasons.push(format!("WAL disk is full: {reason}")),
    }
    reasons
}

async fn readyz(State(s): State<AdminState>) -> Response {
    let reasons = not_ready_reasons(&s);
    if reasons.is_empty() {
        (StatusCode::OK, Json(json!({"ready": true}))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "reasons": reasons})),
        )
            .into_response()
    }
}

fn link_state_name(s: &LinkState) -> &'static str {
    match s {
        LinkState::Serving => "serving",
        LinkState::CatchingUp => "catching_up",
        LinkState::Connecting { .. } => "disconnected",
        LinkState::DiskFull { .. } => "disk_full",
    }
}

fn node_state(s: &AdminState) -> &'static str {
    if s.ops.draining() {
        "draining"
    } else {
        "serving"
    }
}

async fn status(State(s): State<AdminState>) -> Json<serde_json::Value> {
    let link = s.write_path.link_status();
    let c = &s.write_path.counters;
    let wal = crate::wal_link::status(&s.wal_socket, crate::metrics::WAL_STATUS_TIMEOUT)
        .await
        .ok();
    let wal_state =
        wal.as_ref().map(
            |w| match stemedb_proto::wal::v1::WalState::try_from(w.state) {
                Ok(stemedb_proto::wal::v1::WalState::Serving) => "serving",
                Ok(stemedb_proto::wal::v1::WalState::Failed) => "failed",
                Ok(stemedb_proto::wal::v1::WalState::DiskFull) => "disk_full",
                _ => "unknown",
            },
        );
    Json(json!({
        "state": node_state(&s),
        "ready": not_ready_reasons(&s).is_empty(),
        "applied_lsn": s.store.applied_lsn(),
        "durable_lsn": wal.as_ref().map(|w| w.durable_lsn).unwrap_or(link.durable_lsn),
        "writes_in_flight": c.writes_in_flight.load(Ordering::Relaxed),
        "write_bytes_in_flight": c.write_bytes_in_flight.load(Ordering::Relaxed),
        "write_queue_depth": s.write_path.queue_depth(),
        "max_writes_per_sec": s.ops.effective_write_limit(),
        "wal_link": link_state_name(&link.state),
        "writer_epoch": link.epoch,
        "walld": {
            "reachable": wal.is_some(),
            "state": wal_state,
            "reason": wal.as_ref().map(|w| w.reason.clone()),
            "first_lsn": wal.as_ref().map(|w| w.first_lsn),
            "segments": wal.as_ref().map(|w| w.segment_count),
            "fs_free_bytes": wal.as_ref().map(|w| w.fs_free_bytes),
        },
        "watch_streams": s.hub.streams(),
        "checkpoint_flushed_lsn": s.checkpoints.flushed_lsn.load(Ordering::Relaxed),
        "uptime_seconds": s.started.elapsed().as_secs(),
        "version": env!("CARGO_PKG_VERSION"),
    }))
}

async fn set_serving(s: &AdminState, serving: bool) {
    use crate::grpc::StoreService;
    use stemedb_proto::store::v1::store_server::StoreServer;
    let health = s.health.clone();
    if serving {
        health.set_serving::<StoreServer<StoreService>>().await;
        health
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
    } else {
        health.set_not_serving::<StoreServer<StoreService>>().await;
        health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
    }
}

async fn drain(State(s): State<AdminState>, body: Bytes) -> Response {
    if let Err(msg) = no_body("drain", &body) {
        return error(StatusCode::BAD_REQUEST, msg);
    }
    // First out of the load balancer, then refuse writes: a request that
    // nginx already routed here must not meet the drain.
    s.lb.drain().await;
    if let Err(e) = s.ops.set_draining(true) {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot persist drain: {e:#}"),
        );
    }
    set_serving(&s, false).await;
    tracing::warn!("node draining: new writes are refused, reads are served");
    drain_reply(&s)
}

async fn undrain(State(s): State<AdminState>, body: Bytes) -> Response {
    if let Err(msg) = no_body("undrain", &body) {
        return error(StatusCode::BAD_REQUEST, msg);
    }
    if let Err(e) = s.ops.set_draining(false) {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot persist undrain: {e:#}"),
        );
    }
    set_serving(&s, true).await;
    s.lb.undrain();
    tracing::info!("node serving again");
    drain_reply(&s)
}

/// drain and undrain take no parameters: an empty body or `{}` (what
/// `curl -d '{}'` sends); anything else is refused rather than ignored, so
/// a client that believes it passed an option learns it did not.
fn no_body(route: &str, body: &[u8]) -> Result<(), String> {
    if body.trim_ascii().is_empty() {
        return Ok(());
    }
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| format!("body is not JSON: {e}; {route} takes no body (send none or {{}})"))?;
    match v.as_object() {
        Some(o) if o.is_empty() => Ok(()),
        Some(o) => Err(format!(
            "body: unknown field {:?}; {route} takes no body (send none or {{}})",
            o.keys().next().map(String::as_str).unwrap_or_default()
        )),
        None => Err(format!("body must be empty or {{}}; {route} takes no body")),
    }
}

fn drain_reply(s: &AdminState) -> Response {
    Json(json!({
        "state": node_state(s),
        "writes_in_flight": s.write_path.counters.writes_in_flight.load(Ordering::Relaxed),
    }))
    .into_response()
}

async fn get_rate_limit(State(s): State<AdminState>) -> Json<serde_json::Value> {
    Json(json!({"max_writes_per_sec": s.ops.effective_write_limit()}))
}

/// Parses `{"max_writes_per_sec": N | 0 | null}`.
fn parse_rate_limit(body: &[u8]) -> Result<Option<u32>, String> {
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| format!("body is not JSON: {e}; expected {{\"max_writes_per_sec\": N}}"))?;
    let obj = v
        .as_object()
        .ok_or("body must be a JSON object like {\"max_writes_per_sec\": 500}")?;
    if let Some(k) = obj.keys().find(|k| *k != "max_writes_per_sec") {
        return Err(format!("unknown field {k:?}; expected max_writes_per_sec"));
    }
    match obj.get("max_writes_per_sec") {
        None => {
            Err("max_writes_per_sec: required (a number, 0 or null to remove the limit)".into())
        }
        Some(serde_json::Value::Null) => Ok(None),
        Some(n) => {
            let n = n.as_u64().ok_or_else(|| {
                format!("max_writes_per_sec: {n} is not a non-negative whole number")
            })?;
            let n = u32::try_from(n)
                .map_err(|_| format!("max_writes_per_sec: {n} exceeds {}", u32::MAX))?;
            Ok((n > 0).then_some(n))
        }
    }
}

async fn set_rate_limit(State(s): State<AdminState>, body: Bytes) -> Response {
    let limit = match parse_rate_limit(&body) {
        Ok(l) => l,
        Err(msg) => return error(StatusCode::BAD_REQUEST, msg),
    };
    match s.ops.set_write_limit(limit) {
        Ok(effective) => {
            tracing::warn!(max_writes_per_sec = ?effective, "write rate limit changed");
            Json(json!({"max_writes_per_sec": effective})).into_response()
        }
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot persist the rate limit: {e:#}"),
        ),
    }
}

#[derive(serde::Deserialize)]
struct ExportParams {
    /// The export's basis; default: the applied LSN when the export starts.
    to_lsn: Option<u64>,
}

/// `GET /v1/admin/export[?to_lsn=N]`: every committed transaction up to the
/// basis LSN, as a framed stream (`export.rs`), generated page by page so
/// memory stays bounded. The basis is in the `x-stemedb-basis-lsn` header
/// and the stream's own header.
async fn export(
    State(s): State<AdminState>,
    axum::extract::Query(p): axum::extract::Query<ExportParams>,
) -> Response {
    let applied = s.store.applied_lsn();
    let basis = p.to_lsn.unwrap_or(applied);
    if basis > applied {
        return error(
            StatusCode::BAD_REQUEST,
            format!("to_lsn: {basis} is beyond the applied LSN {applied}"),
        );
    }
    let store = s.store.clone();
    let header = crate::export::encode_header(basis);
    let pages = futures::stream::unfold(Some(1u64), move |from| {
        let store = store.clone();
        async move {
            let from = from?;
            let page = tokio::task::spawn_blocking(move || {
                crate::export::export_page(&store, from, basis)
            })
            .await;
            match page {
                Ok(Ok((bytes, next))) => Some((Ok::<_, std::io::Error>(Bytes::from(bytes)), next)),
                Ok(Err(e)) => Some((Err(std::io::Error::other(e.to_string())), None)),
                Err(e) => Some((Err(std::io::Error::other(e.to_string())), None)),
            }
        }
    });
    let body = futures::StreamExt::chain(
        futures::stream::once(async move { Ok::<_, std::io::Error>(Bytes::from(header)) }),
        pages,
    );
    let mut r = axum::body::Body::from_stream(body).into_response();
    r.headers_mut().insert(
        "x-stemedb-basis-lsn",
        basis.to_string().parse().expect("digits"),
    );
    r.headers_mut().insert(
        "content-type",
        "application/octet-stream".parse().expect("static"),
    );
    r
}

async fn metrics(State(s): State<AdminState>) -> Response {
    let text = crate::metrics::render(&s).await;
    ([("content-type", "text/plain; version=0.0.4")], text).into_response()
}

/// Accept loop: a bounded number of connections, each served by hyper with
/// a header timeout, optionally over TLS.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let slots = Arc::new(tokio::sync::Semaphore::new(ADMIN_CONNECTIONS_MAX));
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = async { let _ = stop.wait_for(|s| *s).await; } => return Ok(()),
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(peer = %peer, "admin connection refused: {ADMIN_CONNECTIONS_MAX} connections open");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tls {
                Some(acceptor) => {
                    match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => serve_connection(s, peer, router).await,
                        Ok(Err(e)) => {
                            tracing::debug!(peer = %peer, error = %e, "admin TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(peer = %peer, "admin TLS handshake timed out"),
                    }
                }
                None => serve_connection(stream, peer, router).await,
            }
        });
    }
}

async fn serve_connection<S>(stream: S, peer: SocketAddr, router: Router)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tower::ServiceExt;
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            router.clone().oneshot(req.map(axum::body::Body::new))
        });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    if let Err(e) = conn.await {
        tracing::debug!(peer = %peer, error = %e, "admin connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::{no_body, parse_rate_limit};

    #[test]
    fn drain_bodies() {
        for ok in [&b""[..], b"  \n", b"{}", b" { } "] {
            assert_eq!(no_body("drain", ok), Ok(()), "{ok:?}");
        }
        for bad in [&b"{"[..], b"[]", b"1", br#"{"force": true}"#, b"\xff"] {
            let err = no_body("drain", bad).unwrap_err();
            assert!(err.contains("body"), "{err}");
        }
    }

    #[test]
    fn rate_limit_bodies() {
        assert_eq!(
            parse_rate_limit(br#"{"max_writes_per_sec": 500}"#),
            Ok(Some(500))
        );
        assert_eq!(parse_rate_limit(br#"{"max_writes_per_sec": 0}"#), Ok(None));
        assert_eq!(
            parse_rate_limit(br#"{"max_writes_per_sec": null}"#),
            Ok(None)
        );
        for bad in [
            &b"{"[..],
            b"[]",
            br#"{"max_writes_per_sec": -1}"#,
            br#"{"max_writes_per_sec": 1.5}"#,
            br#"{}"#,
            br#"{"rate": 1}"#,
        ] {
            let err = parse_rate_limit(bad).unwrap_err();
            assert!(!err.is_empty());
        }
        assert!(parse_rate_limit(br#"{"max_writes_per_sec": "x"}"#)
            .unwrap_err()
            .contains("max_writes_per_sec"));
    }
}
