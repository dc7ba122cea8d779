//! Admin and metrics HTTP (HTTP/1.1, axum) on `server.admin_addr`.
//!
//! Routes: `/healthz` (liveness), `/readyz` (200 only when walld is
//! connected, replay has caught up and the WAL accepts writes; the JSON body
//! says why not), `/v1/admin/status` (node state) and `/metrics`.

use crate::checkpoint::CheckpointStats;
use crate::store::Store;
use crate::watch_hub::WatchHub;
use crate::write_path::{LinkState, WritePath};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

#[derive(Clone)]
pub struct AdminState {
    pub write_path: Arc<WritePath>,
    pub store: Store,
    pub hub: Arc<WatchHub>,
    pub checkpoints: Arc<CheckpointStats>,
    pub started: Instant,
    /// walld's socket, for Status at scrape time.
    pub wal_socket: std::path::PathBuf,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/v1/admin/status", get(status))
        .route("/metrics", get(metrics))
        .with_state(state)
}

fn link_state_name(s: &LinkState) -> (&'static str, Option<String>) {
    match s {
        LinkState::Serving => ("serving", None),
        LinkState::CatchingUp => ("catching_up", Some("replaying the WAL".into())),
        LinkState::Connecting { reason } => (
            "disconnected",
            Some(format!("walld is not connected: {reason}")),
        ),
        LinkState::DiskFull { reason } => ("disk_full", Some(reason.clone())),
    }
}

async fn readyz(State(s): State<AdminState>) -> Response {
    let link = s.write_path.link_status();
    let (name, why) = link_state_name(&link.state);
    match why {
        None => (StatusCode::OK, Json(json!({"ready": true}))).into_response(),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "wal": name, "reasons": [reason]})),
        )
            .into_response(),
    }
}

async fn status(State(s): State<AdminState>) -> Json<serde_json::Value> {
    let link = s.write_path.link_status();
    let c = &s.write_path.counters;
    Json(json!({
        "state": "serving",
        "applied_lsn": s.store.applied_lsn(),
        "durable_lsn": link.durable_lsn,
        "writer_epoch": link.epoch,
        "wal": link_state_name(&link.state).0,
        "writes_in_flight": c.writes_in_flight.load(Ordering::Relaxed),
        "write_bytes_in_flight": c.write_bytes_in_flight.load(Ordering::Relaxed),
        "write_queue_depth": s.write_path.queue_depth(),
        "watch_streams": s.hub.streams(),
        "checkpoint_flushed_lsn": s.checkpoints.flushed_lsn.load(Ordering::Relaxed),
        "uptime_seconds": s.started.elapsed().as_secs(),
        "version": env!("CARGO_PKG_VERSION"),
    }))
}

async fn metrics(State(s): State<AdminState>) -> Response {
    let text = crate::metrics::render(&s).await;
    ([("content-type", "text/plain; version=0.0.4")], text).into_response()
}
