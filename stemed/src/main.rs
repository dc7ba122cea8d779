//! `stemed`: flags, config, logging, then `server::run`.

use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use stemed::config::Config;

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
            init_logging(&config);
            if let Err(e) = run(config) {
                tracing::error!(error = format!("{e:#}"), "stemed failed");
                eprintln!("stemed: {e:#}");
                std::process::exit(1);
            }
        }
    }
}

fn run(config: Config) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(stemed::server::run(config))
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
    c.check()?;
    Ok(c)
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.telemetry.log_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if config.telemetry.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
