//! Process wiring: config, listener (bound or systemd-passed), privilege
//! drop, recovery, the gRPC server, systemd notifications and signals.
//! No WAL logic lives here.

use std::os::fd::FromRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use stemedb_proto::wal::v1::wal_server::WalServer;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use crate::config::{Cli, Config};
use crate::error::WalError;
use crate::group_commit::Committer;
use crate::grpc::{self, WalService};
use crate::log::{Log, LogOptions};
use crate::metrics::Metrics;
use crate::privilege::{self, PeerPolicy};

/// Exit codes of walld.
pub mod exit {
    /// Clean shutdown after SIGTERM/SIGINT.
    pub const OK: i32 = 0;
    /// Any other startup failure (I/O, socket, ...).
    pub const FAILURE: i32 = 1;
    /// Recovery found damage and the recovery mode is `refuse` (EX_DATAERR).
    pub const DATA_DAMAGE: i32 = 65;
    /// Fail-stop after an fsync or write error (EX_SOFTWARE).
    pub const FAIL_STOP: i32 = 70;
    /// Refused to run as root, or dropping privileges failed (EX_NOPERM).
    pub const NO_PERMISSION: i32 = 77;
    /// Invalid configuration (EX_CONFIG). Bad flags exit with clap's 2.
    pub const CONFIG: i32 = 78;
}

/// Runs walld; returns the exit code.
pub fn main() -> i32 {
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("walld: cannot start the runtime: {e}");
            return exit::FAILURE;
        }
    };
    // Telemetry starts on the runtime (the OTLP channel lives there) and is
    // flushed before the runtime stops.
    let telemetry = {
        let _on_runtime = runtime.enter();
        crate::telemetry::init(cli.log_format.as_deref() == Some("json"))
    };
    let code = match Config::load(cli) {
        Ok(config) => runtime.block_on(run(config)),
        Err(e) => {
            tracing::error!("invalid configuration: {e:#}");
            exit::CONFIG
        }
    };
    telemetry.shutdown();
    code
}

async fn run(config: Config) -> i32 {
    let (listener, bound) = match prepare(&config) {
        Ok(ok) => ok,
        Err((code, e)) => {
            tracing::error!("{e:#}");
            return code;
        }
    };
    let metrics = Arc::new(Metrics::new(
        Duration::from_secs(config.fsync_window_secs),
        config.fsync_window_samples_max as usize,
    ));
    let options = LogOptions {
        dir: config.dir.clone(),
        segment_bytes: config.segment_bytes,
        recovery_mode: config.recovery_mode,
        prepare_in_background: true,
    };
    let opened = tokio::task::spawn_blocking(move || {
        Log::open(options, metrics.clone()).map(|log| (log, metrics))
    })
    .await;
    let (log, metrics) = match opened {
        Ok(Ok(ok)) => ok,
        Ok(Err(e @ WalError::Corrupt { .. })) => {
            tracing::error!("recovery refused: {e}");
            return exit::DATA_DAMAGE;
        }
        Ok(Err(e)) => {
            tracing::error!("cannot open the WAL: {e}");
            return exit::FAILURE;
        }
        Err(e) => {
            tracing::error!("recovery task failed: {e}");
            return exit::FAILURE;
        }
    };
    let index = log.index();
    let committer = match Committer::start(log, config.commit_config(), metrics) {
        Ok(c) => c,
        Err(e @ WalError::Corrupt { .. }) => {
            tracing::error!("refusing to start: {e}");
            return exit::DATA_DAMAGE;
        }
        Err(e) => {
            tracing::error!("cannot start the writer: {e}");
            return exit::FAILURE;
        }
    };
    let code = serve(config.clone(), listener, committer.clone(), index).await;
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    let _ = tokio::task::spawn_blocking(move || committer.shutdown()).await;
    if let Some(path) = bound {
        let _ = std::fs::remove_file(path);
    }
    tracing::info!(code, "walld stopped");
    code
}

type Prepared = (UnixListener, Option<std::path::PathBuf>);

/// Opens the listener and the directory, then drops privileges.
fn prepare(config: &Config) -> Result<Prepared, (i32, anyhow::Error)> {
    let fail = |code: i32| move |e: anyhow::Error| (code, e);
    let identity = match &config.user {
        Some(user) => {
            Some(privilege::resolve(user, config.group.as_deref()).map_err(fail(exit::CONFIG))?)
        }
        None => None,
    };
    crate::fs::create_dir_durable(&config.dir)
        .with_context(|| format!("create WAL directory {}", config.dir.display()))
        .map_err(fail(exit::FAILURE))?;
    let (listener, bound) = listen(config).map_err(fail(exit::FAILURE))?;
    if let Some(identity) = identity {
        if nix::unistd::geteuid().is_root() {
            privilege::chown_tree(&config.dir, identity).map_err(fail(exit::FAILURE))?;
            if let Some(path) = &bound {
                privilege::chown_tree(path, identity).map_err(fail(exit::FAILURE))?;
            }
        }
        privilege::drop_to(identity).map_err(fail(exit::NO_PERMISSION))?;
    }
    privilege::check_not_root(config.allow_root).map_err(fail(exit::NO_PERMISSION))?;
    Ok((listener, bound))
}

/// The systemd-passed socket (LISTEN_FDS, fd 3) or a freshly bound one.
fn listen(config: &Config) -> anyhow::Result<Prepared> {
    let passed: Vec<i32> = sd_notify::listen_fds()
        .map(|fds| fds.collect())
        .unwrap_or_default();
    if let Some(fd) = passed.first() {
        // SAFETY: systemd passed us this fd and nothing else owns it.
        let std_listener = unsafe { std::os::unix::net::UnixListener::from_raw_fd(*fd) };
        std_listener.set_nonblocking(true)?;
        tracing::info!(fd, "using the socket passed by systemd");
        return Ok((UnixListener::from_std(std_listener)?, None));
    }
    let path = &config.socket;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        anyhow::ensure!(
            meta.file_type().is_socket(),
            "{} exists and is not a socket",
            path.display()
        );
        std::fs::remove_file(path)
            .with_context(|| format!("remove stale socket {}", path.display()))?;
    }
    if let Some(parent) = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty() && !p.exists())
    {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("create socket directory {}", parent.display()))?;
    }
    let listener = UnixListener::bind(path).with_context(|| format!("bind {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    tracing::info!(socket = %path.display(), "listening");
    Ok((listener, Some(path.clone())))
}

/// Serves until SIGTERM/SIGINT (returns 0) or a fatal WAL error (exits 70).
async fn serve(
    config: Config,
    listener: UnixListener,
    committer: Committer,
    index: Arc<crate::segment::SegmentIndex>,
) -> i32 {
    let config = Arc::new(config);
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);

    let service = WalService::new(committer.clone(), index, config.clone(), shutdown_rx);
    let wal = WalServer::new(service)
        .max_decoding_message_size(WalService::decoding_bytes_max(&config))
        .max_encoding_message_size(WalService::encoding_bytes_max(&config));
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<WalServer<WalService>>().await;
    let policy = Arc::new(PeerPolicy::new(
        config.allowed_uids.clone(),
        config.allowed_gids.clone(),
    ));
    let check = grpc::peer_check(policy);
    let router = tonic::transport::Server::builder()
        .add_service(tonic::service::interceptor::InterceptedService::new(
            wal,
            check.clone(),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            health, check,
        ));
    let signal = shutdown_signal();
    spawn_fail_stop(
        &committer,
        Duration::from_millis(config.fatal_exit_delay_ms),
    );
    spawn_watchdog();
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    tracing::info!(
        durable_lsn = committer.shared().durable_lsn(),
        "walld ready"
    );
    let stop = async move {
        signal.await;
        tracing::info!("shutting down: draining in-flight appends");
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
        let _ = shutdown_tx.send(true);
    };
    match router
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), stop)
        .await
    {
        Ok(()) => exit::OK,
        Err(e) => {
            tracing::error!("server error: {e}");
            exit::FAILURE
        }
    }
}

/// After a fatal WAL error: give in-flight answers time to flush, then
/// exit 70 so the supervisor restarts walld and recovery re-reads the disk.
fn spawn_fail_stop(committer: &Committer, delay: Duration) {
    let mut fatal = committer.shared().fatal.subscribe();
    tokio::spawn(async move {
        if fatal.wait_for(|f| *f).await.is_ok() {
            tokio::time::sleep(delay).await;
            tracing::error!(
                "exiting with code {} after a fatal WAL error",
                exit::FAIL_STOP
            );
            std::process::exit(exit::FAIL_STOP);
        }
    });
}

/// The watchdog period from WATCHDOG_USEC, as sd_watchdog_enabled(3) reads
/// it: WATCHDOG_PID, when set, must be our pid.
fn watchdog_usec() -> Option<u64> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then_some(usec)
}

fn spawn_watchdog() {
    let Some(usec) = watchdog_usec() else { return };
    tracing::info!(usec, "systemd watchdog enabled");
    let period = Duration::from_micros(usec / 2);
    tokio::spawn(async move {
        loop {
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
            tokio::time::sleep(period).await;
        }
    });
}

/// Installs the SIGTERM/SIGINT handlers now (before READY=1, so an early
/// SIGTERM is never the default "terminate"), and returns a future that
/// completes on the first of them.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        let (Ok(mut term), Ok(mut int)) = handlers else {
            tracing::error!("cannot install signal handlers");
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
}
