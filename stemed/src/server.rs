//! Wiring: open the store, connect to walld (or start one in dev mode),
//! catch up, then serve gRPC and admin HTTP until SIGINT or SIGTERM.
//!
//! Shutdown order: stop accepting requests, let the write path answer what
//! it admitted, flush sled, then stop a dev-mode walld.

use crate::admin::{self, AdminState};
use crate::checkpoint::{self, CheckpointStats};
use crate::config::Config;
use crate::devmode::{self, ChildWalld};
use crate::grpc::StoreService;
use crate::store::{Store, StoreConfig};
use crate::watch_hub::WatchHub;
use crate::write_path::{LinkConfig, WritePath};
use anyhow::Context;
use std::sync::Arc;
use std::time::{Duration, Instant};
use stemedb_proto::store::v1::store_server::StoreServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

/// Bound on waiting for in-flight requests at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

pub async fn run(config: Config) -> anyhow::Result<()> {
    let started = Instant::now();
    let data_dir = config.server.data_dir.clone();
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
        cache_capacity_bytes: config.store.cache_capacity_bytes,
        entity_cache_entries: config.store.entity_cache_entries,
        idempotency_retention: Duration::from_secs(config.store.idempotency_retention_secs),
    })
    .context("cannot open the store")?;
    tracing::info!(applied_lsn = store.applied_lsn(), "store opened");

    let hub = Arc::new(WatchHub::new(store.applied_lsn()));
    let link = LinkConfig {
        socket: socket.clone(),
        writer_id: format!("stemed-{}", std::process::id()),
    };
    let write_path = WritePath::start(&config, store.clone(), hub.clone(), link);
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

    let checkpoints = Arc::new(CheckpointStats::default());
    tokio::spawn(checkpoint::run(
        store.clone(),
        socket.clone(),
        config.checkpoint.clone(),
        checkpoints.clone(),
    ));
    tokio::spawn(purge_idempotency_keys(store.clone()));

    let grpc_listener = TcpListener::bind(config.server.grpc_addr)
        .await
        .with_context(|| format!("cannot bind gRPC on {}", config.server.grpc_addr))?;
    let admin_listener = TcpListener::bind(config.server.admin_addr)
        .await
        .with_context(|| format!("cannot bind admin HTTP on {}", config.server.admin_addr))?;
    println!(
        "stemed serving: gRPC {} admin http://{} data {}",
        grpc_listener.local_addr()?,
        admin_listener.local_addr()?,
        data_dir.display()
    );

    let admin_state = AdminState {
        write_path: write_path.clone(),
        store: store.clone(),
        hub: hub.clone(),
        checkpoints,
        started,
        wal_socket: socket.clone(),
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let admin = tokio::spawn(serve_admin(admin_listener, admin_state, stop_rx.clone()));
    let grpc = tokio::spawn(serve_grpc(
        grpc_listener,
        config.clone(),
        write_path.clone(),
        store.clone(),
        hub,
        stop_rx,
    ));
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);

    shutdown_signal().await;
    tracing::info!("shutting down");
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, grpc).await;
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, admin).await;
    write_path.close().await;
    let flushed = store.flush_async().await?;
    tracing::info!(applied_lsn = flushed, "store flushed");
    if let Some(c) = &child {
        c.stop().await;
    }
    Ok(())
}

async fn serve_grpc(
    listener: TcpListener,
    config: Config,
    write_path: Arc<WritePath>,
    store: Store,
    hub: Arc<WatchHub>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<StoreServer<StoreService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(stemedb_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("cannot build the reflection service")?;
    let limits = config.limits.clone();
    let service = StoreService {
        write_path,
        store,
        hub,
        limits: limits.clone(),
    };
    let incoming = TcpListenerStream::new(listener);
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(
            StoreServer::new(service)
                .max_decoding_message_size(limits.grpc_message_bytes_max)
                .max_encoding_message_size(limits.grpc_message_bytes_max),
        )
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await
        .context("gRPC server failed")
}

async fn serve_admin(
    listener: TcpListener,
    state: AdminState,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    axum::serve(listener, admin::router(state))
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await
        .context("admin server failed")
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
