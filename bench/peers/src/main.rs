//! `stemedb-peer-bench`: the load generators `bench/compare.sh` uses for
//! the systems StemeDB is compared with, and the raw fdatasync probe. Every
//! subcommand prints one JSON object shaped like `stemectl bench --output
//! json` (see `report.rs`).

use stemedb_peer_bench::{etcd, fsync, pgbench};

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "stemedb-peer-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Raw fdatasync rate: 8 KiB writes + fdatasync in a loop, one thread,
    /// in a file in DIR.
    Fsync {
        #[arg(long)]
        dir: PathBuf,
        /// Measured seconds.
        #[arg(long, default_value_t = 5.0)]
        duration: f64,
        /// Unmeasured seconds first.
        #[arg(long, default_value_t = 0.5)]
        warmup: f64,
    },
    /// Closed-loop load on etcd's gRPC KV API.
    Etcd {
        /// etcd client URL.
        #[arg(long, default_value = "http://127.0.0.1:2379")]
        endpoint: String,
        /// Operations kept in flight.
        #[arg(long, default_value_t = 16)]
        concurrency: u32,
        /// HTTP/2 connections (default: the smaller of concurrency and 8,
        /// like `stemectl bench`).
        #[arg(long)]
        connections: Option<u32>,
        /// Puts per operation: 1 sends a plain Put, more send one Txn of
        /// that many Puts.
        #[arg(long, default_value_t = 1)]
        tx_size: u32,
        /// Read instead of write: single-key Ranges of random keys among
        /// this many preloaded ones (see `etcd-preload`).
        #[arg(long)]
        read_keys: Option<u64>,
        /// Bytes per written value.
        #[arg(long, default_value_t = 16)]
        value_bytes: usize,
        #[arg(long, default_value_t = 5.0)]
        duration: f64,
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
        /// Seeds values and names this run's keys (default: random).
        #[arg(long)]
        seed: Option<u64>,
        /// Per-request timeout in seconds.
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
    },
    /// Puts the keys `etcd --read-keys N` reads.
    EtcdPreload {
        #[arg(long, default_value = "http://127.0.0.1:2379")]
        endpoint: String,
        #[arg(long)]
        keys: u64,
        #[arg(long, default_value_t = 320)]
        value_bytes: usize,
        /// Txns in flight.
        #[arg(long, default_value_t = 16)]
        parallel: u32,
    },
    /// Reports a pgbench run from its per-transaction logs (`pgbench -l`):
    /// the transactions that started in the window that opens WARMUP
    /// seconds after every client is running and lasts DURATION seconds.
    PgbenchLog {
        /// The script reads (one SELECT per transaction).
        #[arg(long)]
        read: bool,
        /// Rows each write transaction inserts.
        #[arg(long, default_value_t = 1)]
        items_per_tx: u32,
        /// pgbench clients (-c).
        #[arg(long)]
        concurrency: u32,
        #[arg(long, default_value_t = 16)]
        value_bytes: usize,
        #[arg(long, default_value_t = 0)]
        preload: u64,
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
        #[arg(long)]
        duration: f64,
        /// The log files pgbench wrote.
        #[arg(required = true)]
        logs: Vec<PathBuf>,
    },
}

fn secs(s: f64) -> anyhow::Result<Duration> {
    anyhow::ensure!(s.is_finite() && s >= 0.0, "bad number of seconds: {s}");
    Ok(Duration::from_secs_f64(s))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let report = match cli.command {
        Command::Fsync {
            dir,
            duration,
            warmup,
        } => fsync::run(&dir, secs(warmup)?, secs(duration)?)?,
        Command::Etcd {
            endpoint,
            concurrency,
            connections,
            tx_size,
            read_keys,
            value_bytes,
            duration,
            warmup,
            seed,
            timeout,
        } => {
            let op = match (read_keys, tx_size) {
                (Some(0), _) => anyhow::bail!("--read-keys must be at least 1"),
                (Some(keys), _) => etcd::Op::Range { keys },
                (None, 0) => anyhow::bail!("--tx-size must be at least 1"),
                (None, 1) => etcd::Op::Put,
                (None, n) => etcd::Op::Txn(n),
            };
            let plan = etcd::Plan {
                endpoint,
                concurrency,
                connections: connections.unwrap_or(concurrency.min(8)),
                op,
                value_bytes,
                warmup: secs(warmup)?,
                duration: secs(duration)?,
                seed: seed.unwrap_or_else(rand::random),
                timeout: secs(timeout)?,
            };
            runtime()?.block_on(etcd::run(&plan))?
        }
        Command::EtcdPreload {
            endpoint,
            keys,
            value_bytes,
            parallel,
        } => {
            let started = std::time::Instant::now();
            runtime()?.block_on(etcd::preload(
                &endpoint,
                keys,
                value_bytes,
                parallel,
                Duration::from_secs(60),
            ))?;
            eprintln!(
                "etcd-preload: {keys} keys in {:.1} s",
                started.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        Command::PgbenchLog {
            read,
            items_per_tx,
            concurrency,
            value_bytes,
            preload,
            warmup,
            duration,
            logs,
        } => pgbench::report(&pgbench::Plan {
            logs,
            read,
            items_per_tx,
            concurrency,
            // pgbench opens one connection per client.
            connections: concurrency,
            value_bytes,
            preload,
            warmup: secs(warmup)?,
            duration: secs(duration)?,
        })?,
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}
