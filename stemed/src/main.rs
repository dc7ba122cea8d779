//! `stemed`: flags, logging, then `server::run`.

use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;
use stemed::config::Config;

/// The StemeDB API server. With no flags it runs a development node: data in
/// ./stemedb-data, a child walld on a socket there, gRPC on 127.0.0.1:18181
/// and admin HTTP on 127.0.0.1:18180.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    /// TOML config file (production: /etc/stemedb/api.toml). Flags and
    /// environment variables override it.
    #[arg(long, env = "STEMEDB_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory [default: ./stemedb-data].
    #[arg(long, env = "STEMEDB_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Public gRPC address [default: 127.0.0.1:18181].
    #[arg(long, env = "STEMEDB_GRPC_ADDR")]
    grpc_addr: Option<SocketAddr>,
    /// Admin HTTP address [default: 127.0.0.1:18180].
    #[arg(long, env = "STEMEDB_ADMIN_ADDR")]
    admin_addr: Option<SocketAddr>,
    /// walld's Unix socket. Unset: dev mode spawns a child walld.
    #[arg(long, env = "STEMEDB_WAL_SOCKET")]
    wal_socket: Option<PathBuf>,
    /// The walld binary for dev mode [default: next to stemed, then PATH].
    #[arg(long, env = "STEMEDB_WALLD_BIN")]
    walld_bin: Option<PathBuf>,
    /// Group commit window in ms [default: 0 = flush when the queue is empty].
    #[arg(long, env = "STEMEDB_GROUP_COMMIT_MAX_WAIT_MS")]
    group_commit_max_wait_ms: Option<u64>,
    /// Checkpoint interval in ms; 0 disables checkpoints [default: 10000].
    #[arg(long, env = "STEMEDB_CHECKPOINT_INTERVAL_MS")]
    checkpoint_interval_ms: Option<u64>,
    /// Log format: text or json.
    #[arg(long, env = "STEMEDB_LOG_FORMAT", default_value = "text")]
    log_format: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_logging(&args.log_format);
    let mut config = match &args.config {
        Some(p) => Config::from_file(p)?,
        None => Config::default(),
    };
    apply_overrides(&mut config, &args);
    config.check()?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(stemed::server::run(config))
}

fn apply_overrides(c: &mut Config, a: &Args) {
    if let Some(v) = &a.data_dir {
        c.server.data_dir = v.clone();
    }
    if let Some(v) = a.grpc_addr {
        c.server.grpc_addr = v;
    }
    if let Some(v) = a.admin_addr {
        c.server.admin_addr = v;
    }
    if let Some(v) = &a.wal_socket {
        c.wal.socket = Some(v.clone());
    }
    if let Some(v) = &a.walld_bin {
        c.wal.walld_bin = Some(v.clone());
    }
    if let Some(v) = a.group_commit_max_wait_ms {
        c.wal.group_commit_max_wait_ms = v;
    }
    if let Some(v) = a.checkpoint_interval_ms {
        c.checkpoint.interval_ms = v;
    }
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
