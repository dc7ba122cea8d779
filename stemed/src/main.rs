//! `stemed`: flags, config, logging, then `server::run`.

use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use stemed::config::Config;

/// sled allocates and frees a node copy on every insert; glibc malloc's
/// arena locks made that a point of contention between the applier and
/// sled's flusher threads (seen in profiles). mimalloc has per-thread heaps.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The StemeDB API server. With no flags it runs a development node: data in
/// ./stemedb-data, a child walld on a socket there, gRPC on 127.0.0.1:18181
/// and admin HTTP on 127.0.0.1:18180.
///
/// Every config key can be set in the TOML file, as an environment variable
/// STEMEDB_<SECTION>_<KEY> (e.g. STEMEDB_WAL_GROUP_COMMIT_MAX_WAIT_MS=10),
/// or, for the common ones, as a flag. Precedence: flags > environment >
/// file > defaults. See docs/operations/configuration.md.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    common: Common,
}

#[derive(clap::Args, Debug, Clone)]
struct Common {
    /// TOML config file (production: /etc/stemedb/api.toml).
    #[arg(long, env = "STEMEDB_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// [storage] data_dir [default: ./stemedb-data].
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// [server] grpc_addr [default: 127.0.0.1:18181].
    #[arg(long, global = true)]
    grpc_addr: Option<SocketAddr>,
    /// [server] admin_addr [default: 127.0.0.1:18180].
    #[arg(long, global = true)]
    admin_addr: Option<SocketAddr>,
    /// [wal] socket: walld's Unix socket. Unset: dev mode spawns a child walld.
    #[arg(long, global = true)]
    wal_socket: Option<PathBuf>,
    /// [wal] walld_bin for dev mode [default: next to stemed, then PATH].
    #[arg(long, global = true)]
    walld_bin: Option<PathBuf>,
    /// [telemetry] log_format: text or json [default: text].
    #[arg(long, global = true, value_parser = ["text", "json"])]
    log_format: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate the config (file, environment and flags) and exit: 0 when
    /// valid, 1 with the offending key named otherwise.
    ///
    /// Example: stemed check-config --config /etc/stemedb/api.toml
    CheckConfig,
    /// Print the effective config as TOML.
    ///
    /// Example: stemed print-config --config /etc/stemedb/api.toml
    PrintConfig,
}

fn main() {
    let args = Args::parse();
    let config = match load(&args.common) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("stemed: invalid config: {e:#}");
            std::process::exit(1);
        }
    };
    match args.command {
        Some(Command::CheckConfig) => println!("config is valid"),
        Some(Command::PrintConfig) => print!("{}", config.to_toml()),
        None => {
            if let Err(e) = run(config) {
                eprintln!("stemed: {e:#}");
                std::process::exit(1);
            }
        }
    }
}

/// Threads of the blocking pool, which runs the store's reads (Query,
/// History, Watch catch-up), flushes and purges. A burst of reads queues
/// for them instead of growing the pool to tokio's default of 512 threads,
/// each with its own stack and allocator heap (a 10,000-stream burst grew
/// stemed by 34 MiB in threads alone). One thread waits on the applier for
/// the life of the process.
const BLOCKING_THREADS_MAX: usize = 32;

/// Telemetry starts inside the runtime (the OTLP channel lives there) and
/// is flushed before it stops.
fn run(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(BLOCKING_THREADS_MAX)
        .build()?;
    runtime.block_on(async {
        let telemetry = stemed::telemetry::init(&config.telemetry);
        let result = stemed::server::run(config).await;
        if let Err(e) = &result {
            tracing::error!(error = format!("{e:#}"), "stemed failed");
        }
        let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
        result
    })
}

fn load(a: &Common) -> anyhow::Result<Config> {
    let mut c = Config::load(a.config.as_deref(), std::env::vars())?;
    if let Some(v) = &a.data_dir {
        c.storage.data_dir = v.clone();
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
    if let Some(v) = &a.log_format {
        c.telemetry.log_format = v.clone();
    }
    c.check()?;
    Ok(c)
}
