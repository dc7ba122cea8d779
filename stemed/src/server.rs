//! Wiring: open the store, connect to walld (or start one in dev mode),
//! catch up, then serve gRPC and admin HTTP until SIGINT or SIGTERM.
//!
//! Shutdown order: stop accepting requests, let the write path answer what
//! it admitted, flush sled, then stop a dev-mode walld.

use crate::admin::{self, AdminState};
use crate::auth::{AdminAuth, GrpcAuth, GrpcAuthLayer};
use crate::checkpoint::{self, CheckpointStats};
use crate::config::Config;
use crate::devmode::{self, ChildWalld};
use crate::grpc::StoreService;
use crate::listeners;
use crate::ops::Ops;
use crate::store::{Store, StoreConfig};
use crate::tls;
use crate::watch_hub::WatchHub;
use crate::write_path::{LinkConfig, WritePath};
use anyhow::Context;
use std::sync::Arc;
use std::time::{Duration, Instant};
use stemedb_proto::store::v1::store_server::StoreServer;

pub async fn run(config: Config) -> anyhow::Result<()> {
    let started = Instant::now();
    let data_dir = config.storage.data_dir.clone();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
    let (socket, child) = match &config.wal.socket {
        Some(s) => (s.clone(), None),
        None => {
            let bin = devmode::find_walld(config.wal.walld_bin.as_deref())?;
            let child = ChildWalld::start(bin.clone(), &data_dir).await?;
            println!(
                "stemed dev mode: walld {} with WAL {} on {}",
                bin.display(),
                child.wal_dir.display(),
                child.socket.display()
            );
            (child.socket.clone(), Some(child))
        }
    };
    let store = Store::open(StoreConfig {
        path: data_dir.join("store"),
        cache_capacity_bytes: config.storage.cache_capacity_bytes,
        entity_cache_entries: config.storage.entity_cache_entries,
        entity_cache_bytes: config.storage.entity_cache_bytes,
        idempotency_retention: Duration::from_secs(config.storage.idempotency_retention_secs),
    })
    .context("cannot open the store")?;
    tracing::info!(applied_lsn = store.applied_lsn(), "store opened");

    let ops = Arc::new(Ops::open(&data_dir, &config.rate_limit)?);
    if ops.draining() {
        tracing::warn!("node is draining (persisted); undrain it to accept writes");
    }
    let admin_auth = Arc::new(AdminAuth::from_config(&config.auth)?);
    let grpc_auth = Arc::new(GrpcAuth::from_config(&config.auth)?);
    let grpc_tls = tls::grpc(&config.tls)?;
    let admin_tls = tls::admin(&config.tls)?;
    let hub = Arc::new(WatchHub::new(store.applied_lsn()));
    let link = LinkConfig {
        socket: socket.clone(),
        writer_id: format!("stemed-{}", std::process::id()),
    };
    let write_path = WritePath::start(&config, store.clone(), hub.clone(), link, ops.clone());
    // Checkpoints run during the replay too: a long replay then restarts
    // from its last checkpoint after a crash, and sled, which only reclaims
    // its log space across flushes, does not grow without bound (replaying
    // 560 MB of WAL unflushed took 8 GB of sled log).
    let checkpoints = Arc::new(CheckpointStats::default());
    tokio::spawn(checkpoint::run(
        store.clone(),
        socket.clone(),
        config.checkpoint_interval(),
        config.storage.wal_retain_records,
        checkpoints.clone(),
    ));
    tracing::info!(socket = %socket.display(), "connecting to walld and replaying the WAL");
    tokio::select! {
        _ = write_path.wait_serving() => {}
        _ = shutdown_signal() => {
            write_path.close().await;
            if let Some(c) = &child { c.stop().await; }
            return Ok(());
        }
    }
    tracing::info!(applied_lsn = store.applied_lsn(), "caught up with walld");

    tokio::spawn(purge_idempotency_keys(store.clone()));

    let (grpc_listener, admin_listener) = listeners::api_listeners(&config.server).await?;
    println!(
        "stemed serving: gRPC {} admin http://{} data {}",
        grpc_listener.local_addr()?,
        admin_listener.local_addr()?,
        data_dir.display()
    );

    let (health, health_service) = tonic_health::server::health_reporter();
    let conn_limits = listeners::GrpcConnLimits::new(
        config.limits.grpc_connections_max,
        config.grpc_handshake_timeout(),
    );
    // The public listener and the load-balancer listener serve the same
    // services; each server instance gets its own parts.
    let grpc_parts = {
        let (ops, write_path, store, hub) =
            (ops.clone(), write_path.clone(), store.clone(), hub.clone());
        let (health, limits) = (health.clone(), config.limits.clone());
        move || GrpcParts {
            service: StoreService {
                ops: ops.clone(),
                write_path: write_path.clone(),
                store: store.clone(),
                hub: hub.clone(),
                limits: limits.clone(),
            },
            health: health.clone(),
            auth: grpc_auth.clone(),
            tls: grpc_tls.clone(),
            draining: ops.draining(),
            message_bytes_max: limits.grpc_message_bytes_max,
            streams_per_connection_max: limits.grpc_streams_per_connection_max,
            error_resets_max: limits.grpc_error_resets_per_connection_max,
            conn_limits: conn_limits.clone(),
        }
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let lb = {
        let (parts, health_service) = (grpc_parts.clone(), health_service.clone());
        listeners::LbListener::start(
            config.server.lb_grpc_addr,
            ops.draining(),
            stop_rx.clone(),
            move |incoming, stop| serve_grpc(incoming, parts(), health_service.clone(), stop),
        )
        .await?
    };
    let admin_state = AdminState {
        ops: ops.clone(),
        auth: admin_auth,
        health: health.clone(),
        write_path: write_path.clone(),
        store: store.clone(),
        hub: hub.clone(),
        lb: lb.clone(),
        checkpoints,
        started,
        wal_socket: socket.clone(),
    };
    let admin = tokio::spawn(admin::serve(
        admin_listener,
        admin::router(admin_state),
        admin_tls,
        stop_rx.clone(),
    ));
    let grpc = tokio::spawn(serve_grpc(
        listeners::accepted_nodelay(grpc_listener),
        grpc_parts(),
        health_service,
        stop_rx,
    ));
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);

    shutdown_signal().await;
    tracing::info!("shutting down");
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    // Out of the load balancer first, as on drain, so that a restart sends
    // nginx's next calls to another node instead of failing them.
    lb.drain().await;
    let _ = stop_tx.send(true);
    let grace = Duration::from_millis(config.server.shutdown_grace_ms);
    let _ = tokio::time::timeout(grace, grpc).await;
    let _ = tokio::time::timeout(grace, lb.closed()).await;
    let _ = tokio::time::timeout(grace, admin).await;
    write_path.close().await;
    let flushed = store.flush_async().await?;
    tracing::info!(applied_lsn = flushed, "store flushed");
    if let Some(c) = &child {
        c.stop().await;
    }
    Ok(())
}

struct GrpcParts {
    service: StoreService,
    health: tonic_health::server::HealthReporter,
    auth: Arc<GrpcAuth>,
    tls: Option<tonic::transport::ServerTlsConfig>,
    draining: bool,
    message_bytes_max: usize,
    streams_per_connection_max: u32,
    error_resets_max: usize,
    conn_limits: listeners::GrpcConnLimits,
}

async fn serve_grpc<H, I>(
    incoming: I,
    parts: GrpcParts,
    health_service: tonic_health::pb::health_server::HealthServer<H>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()>
where
    H: tonic_health::pb::health_server::Health,
    I: futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> + Send + 'static,
{
    let incoming = listeners::guarded(incoming, parts.conn_limits.clone());
    let health = parts.health;
    if parts.draining {
        health.set_not_serving::<StoreServer<StoreService>>().await;
        health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
    } else {
        health.set_serving::<StoreServer<StoreService>>().await;
    }
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(stemedb_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("cannot build the reflection service")?;
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = parts.tls {
        // The TLS handshake has the same bound as the preface that follows.
        let tls = tls.timeout(parts.conn_limits.handshake_timeout);
        builder = builder.tls_config(tls).context("invalid TLS config")?;
    }
    builder
        .tcp_nodelay(true)
        .max_concurrent_streams(parts.streams_per_connection_max)
        .http2_max_local_error_reset_streams(Some(parts.error_resets_max))
        .layer(crate::telemetry::GrpcLayer)
        .layer(GrpcAuthLayer(parts.auth))
        .layer(UndecodableIsInvalidArgument)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(
            StoreServer::new(parts.service)
                .max_decoding_message_size(parts.message_bytes_max)
                .max_encoding_message_size(parts.message_bytes_max),
        )
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await
        .context("gRPC server failed")
}

/// A request body that is not a valid message (bad wire format, invalid
/// UTF-8 in a string field) is the client's fault: tonic answers INTERNAL
/// ("failed to decode Protobuf message: <Message>.<field>: ..."), which
/// clients and alerts read as a server fault, so it becomes
/// INVALID_ARGUMENT with the same message, which names the field.
#[derive(Clone)]
struct UndecodableIsInvalidArgument;

impl<S> tower::Layer<S> for UndecodableIsInvalidArgument {
    type Service = UndecodableService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        UndecodableService(inner)
    }
}

#[derive(Clone)]
struct UndecodableService<S>(S);

impl<S, B> tower::Service<http::Request<B>> for UndecodableService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let fut = self.0.call(req);
        Box::pin(async move {
            let mut response = fut.await?;
            undecodable_is_invalid_argument(response.headers_mut());
            Ok(response)
        })
    }
}

/// Rewrites a trailers-only INTERNAL decode failure to INVALID_ARGUMENT.
fn undecodable_is_invalid_argument(headers: &mut http::HeaderMap) {
    const DECODE_FAILED: &[&[u8]] = &[
        b"failed to decode Protobuf message",
        b"failed%20to%20decode%20Protobuf%20message",
    ];
    let internal = headers.get("grpc-status").map(|v| v.as_bytes()) == Some(b"13");
    let undecodable = headers
        .get("grpc-message")
        .is_some_and(|m| DECODE_FAILED.iter().any(|p| m.as_bytes().starts_with(p)));
    if internal && undecodable {
        headers.insert("grpc-status", http::HeaderValue::from_static("3"));
    }
}

/// Idempotency keys older than the retention are dropped hourly, in bounded
/// rounds.
async fn purge_idempotency_keys(store: Store) {
    let mut tick = tokio::time::interval(Duration::from_secs(3600));
    loop {
        tick.tick().await;
        let s = store.clone();
        let now = crate::write_path::now_micros();
        match tokio::task::spawn_blocking(move || s.purge_idempotency(now)).await {
            Ok(Ok(n)) if n > 0 => tracing::info!(keys = n, "purged expired idempotency keys"),
            Ok(Err(e)) => tracing::warn!(error = %e, "purging idempotency keys failed"),
            _ => {}
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
