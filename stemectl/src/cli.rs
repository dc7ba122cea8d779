//! Command-line definitions. Parsing only: no I/O here.

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::timefmt::parse_duration;
use crate::value::ValueType;

/// stemectl: operate a StemeDB node (admin HTTP) and read and write its
/// facts (gRPC).
#[derive(Debug, Parser)]
#[command(name = "stemectl", version, about, propagate_version = true)]
#[command(after_help = "Examples:
  stemectl status
  stemectl drain --wait && stemectl status --output json
  stemectl rate-limit set 500
  stemectl assert user:1 name Ada --source hr
  stemectl assert --file facts.jsonl --batch 500
  stemectl --addr https://db1:18181 --admin-addr https://db1:18180 --ca-file ca.pem --token \"$(cat token)\" status
  stemectl completions bash > /etc/bash_completion.d/stemectl

Exit codes: 0 ok, 1 other failure, 2 usage or bad input, 3 server error, 4 connection failure.")]
pub struct Cli {
    /// The node's gRPC address (https:// for TLS).
    #[arg(
        long,
        global = true,
        env = "STEMEDB_ADDR",
        default_value = "http://127.0.0.1:18181"
    )]
    pub addr: String,
    /// The node's admin HTTP address (https:// for TLS).
    #[arg(
        long,
        global = true,
        env = "STEMEDB_ADMIN_ADDR",
        default_value = "http://127.0.0.1:18180"
    )]
    pub admin_addr: String,
    /// Bearer token, sent as `Authorization: Bearer` to admin HTTP and gRPC.
    #[arg(long, global = true, env = "STEMEDB_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// How to print results.
    #[arg(long, global = true, value_enum, env = "STEMEDB_OUTPUT", default_value_t = Output::Table)]
    pub output: Output,
    /// Deadline of each request.
    #[arg(long, global = true, env = "STEMEDB_TIMEOUT", value_parser = parse_duration, default_value = "10s")]
    pub timeout: Duration,
    #[command(subcommand)]
    pub command: Command,
}

/// TLS for both gRPC and admin HTTP. Used when an address is https://.
#[derive(Debug, Clone, Args)]
pub struct TlsArgs {
    /// PEM file of the CA that signed the server's certificate.
    #[arg(long, global = true, env = "STEMEDB_CA_FILE", value_name = "PATH")]
    pub ca_file: Option<std::path::PathBuf>,
    /// PEM client certificate for mTLS (with --client-key).
    #[arg(
        long,
        global = true,
        env = "STEMEDB_CLIENT_CERT",
        value_name = "PATH",
        requires = "client_key"
    )]
    pub client_cert: Option<std::path::PathBuf>,
    /// PEM private key of --client-cert.
    #[arg(
        long,
        global = true,
        env = "STEMEDB_CLIENT_KEY",
        value_name = "PATH",
        requires = "client_cert"
    )]
    pub client_key: Option<std::path::PathBuf>,
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned, human-readable text (alias: text).
    #[value(alias = "text")]
    Table,
    /// JSON: one object, or one object per line for streams (query,
    /// history, watch).
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Assert a fact, or many from a file of JSON lines.
    #[command(after_help = "Examples:
  stemectl assert user:1 name Ada --source hr --confidence 0.9
  stemectl assert user:1 age 36 --type int
  stemectl assert user:1 manager user:7 --type ref
  stemectl assert user:1 hired 2024-05-01T09:00:00Z --type timestamp
  stemectl assert blob:1 digest 00ff10 --type bytes-hex --output json
  stemectl assert --file facts.jsonl --batch 500
  gen-facts | stemectl assert --file -

A --file has one JSON object per line:
  {\"entity\": \"user:1\", \"attribute\": \"age\", \"value\": 36, \"type\": \"int\", \"source\": \"hr\", \"confidence\": 0.9, \"op\": \"assert\"}
entity, attribute and value are required; type defaults from the JSON value (string: text, integer: int,
number: double, bool: bool); source defaults to --source; op defaults to the command (assert or retract).
Lines are sent in transactions of --batch lines, each with an idempotency key derived from its byte offset
and content, so rerunning the same file does not apply anything twice.")]
    Assert(WriteArgs),
    /// Retract a fact (withdraw an earlier assertion by the same source).
    #[command(after_help = "Examples:
  stemectl retract user:1 name Ada --source hr
  stemectl retract user:1 age 36 --type int --idempotency-key fix-42
  stemectl retract --file mistakes.jsonl     # same line format as assert; op defaults to retract")]
    Retract(WriteArgs),
    /// Show every live claim about an entity.
    #[command(after_help = "Examples:
  stemectl get user:1
  stemectl get user:1 --as-of 42 --output json")]
    Get {
        /// The entity.
        entity: String,
        /// Answer as of this transaction (default: the latest).
        #[arg(long = "as-of", value_name = "TX")]
        as_of: Option<u64>,
    },
    /// Find live claims of an attribute, optionally with one value or source.
    #[command(after_help = "Examples:
  stemectl query name
  stemectl query name --value Ada
  stemectl query age --value 36 --type int --source hr --limit 10
  stemectl query name --as-of 42 --output json   # one JSON fact per line")]
    Query {
        /// The attribute.
        attribute: String,
        /// Only facts with this value.
        #[arg(long)]
        value: Option<String>,
        /// How to read --value.
        #[arg(long = "type", value_enum, default_value_t = ValueType::Text, requires = "value")]
        value_type: ValueType,
        /// Only facts from this source.
        #[arg(long)]
        source: Option<String>,
        /// Answer as of this transaction (default: the latest).
        #[arg(long = "as-of", value_name = "TX")]
        as_of: Option<u64>,
        /// Print at most N facts.
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
    },
    /// Show the assertions and retractions of an entity in tx order.
    #[command(after_help = "Examples:
  stemectl history user:1
  stemectl history user:1 --attribute name --since 10 --until 20")]
    History {
        /// The entity.
        entity: String,
        /// Only this attribute.
        #[arg(long)]
        attribute: Option<String>,
        /// Only transactions >= TX.
        #[arg(long, value_name = "TX")]
        since: Option<u64>,
        /// Only transactions <= TX.
        #[arg(long, value_name = "TX")]
        until: Option<u64>,
    },
    /// Stream transactions as they commit.
    #[command(after_help = "Examples:
  stemectl watch                  # from the beginning, then live
  stemectl watch --from 100 --count 5 --output json")]
    Watch {
        /// The first transaction to show (0 or 1: from the beginning).
        #[arg(long, value_name = "TX", default_value_t = 0)]
        from: u64,
        /// Stop after N transactions.
        #[arg(long, value_name = "N")]
        count: Option<u64>,
    },
    /// Stop accepting writes (reads are still served); survives restarts.
    #[command(
        after_help = "New writes get UNAVAILABLE \"node is draining\"; writes in flight complete, and \
/readyz and gRPC health report not serving so load balancers route away.

Examples:
  stemectl drain
  stemectl drain --wait --wait-timeout 2m    # until no write is in flight
  stemectl --admin-addr http://db1:18180 drain --output json"
    )]
    Drain {
        /// Poll the node until no write is in flight, printing progress.
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this long (exit 1).
        #[arg(long, value_parser = parse_duration, default_value = "60s", requires = "wait")]
        wait_timeout: Duration,
    },
    /// Resume accepting writes after a drain.
    #[command(after_help = "Examples:
  stemectl undrain
  stemectl undrain --output json")]
    Undrain,
    /// Show, set or clear the node's global write rate limit.
    #[command(subcommand)]
    #[command(after_help = "Examples:
  stemectl rate-limit show
  stemectl rate-limit set 500     # assertions per second, applies at once, persists
  stemectl rate-limit clear")]
    RateLimit(RateLimitCommand),
    /// Show the node's state: serving or draining, LSNs, writes in flight,
    /// rate limit, walld, uptime, version.
    #[command(after_help = "Examples:
  stemectl status
  stemectl status --output json | jq .durable_lsn
  STEMEDB_ADMIN_ADDR=http://db1:18180 stemectl status")]
    Status,
    /// Inspect the write-ahead log daemon (walld) behind the node.
    #[command(subcommand)]
    #[command(after_help = "Examples:
  stemectl wal status
  stemectl wal status --output json")]
    Wal(WalCommand),
    /// Back up the node, list backups, verify one.
    #[command(subcommand)]
    Backup(crate::backup::BackupCommand),
    /// Build a fresh node from a backup and archived WAL (point in time).
    #[command(after_help = "Examples:
  stemectl restore --from /var/backups/stemedb/<ID> --data-dir /var/lib/stemedb/data --wal-dir /var/lib/stemedb/wal
  stemectl restore --from s3://b/backups/<ID> --wal-archive s3://b/wal --to-lsn 12345 --data-dir D --wal-dir W")]
    Restore(crate::backup::RestoreArgs),
    /// Print a shell completion script.
    #[command(after_help = "Examples:
  stemectl completions bash > /etc/bash_completion.d/stemectl
  stemectl completions zsh > \"${fpath[1]}/_stemectl\"
  stemectl completions fish > ~/.config/fish/completions/stemectl.fish")]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Measure throughput and latency over real gRPC.
    #[command(
        after_help = "Closed loop (--concurrency) keeps N requests in flight. Open loop (--rate) sends on a fixed \
schedule and measures latency from each request's scheduled send time, so a stalled server is not hidden \
(no coordinated omission).

Examples:
  stemectl bench --duration 10s --concurrency 32
  stemectl bench --rate 5000 --tx-size 10 --value-bytes 64 --duration 30s
  stemectl bench --preload 100000 --read-ratio 0.9 --output json"
    )]
    Bench(BenchArgs),
}

#[derive(Debug, Subcommand)]
pub enum RateLimitCommand {
    /// Print the current limit.
    #[command(after_help = "Examples:
  stemectl rate-limit show
  stemectl rate-limit show --output json")]
    Show,
    /// Limit writes to N assertions per second (applies at once, persists).
    #[command(after_help = "Examples:
  stemectl rate-limit set 500")]
    Set {
        /// Assertions per second, at least 1 (use `clear` for no limit).
        #[arg(value_parser = clap::value_parser!(u32).range(1..))]
        max_writes_per_sec: u32,
    },
    /// Remove the limit.
    #[command(after_help = "Examples:
  stemectl rate-limit clear")]
    Clear,
}

#[derive(Debug, Subcommand)]
pub enum WalCommand {
    /// walld's state, segments, free space, and the node's durable and
    /// applied LSNs.
    #[command(after_help = "Examples:
  stemectl wal status
  stemectl wal status --output json")]
    Status,
    /// Copy sealed WAL segments to a directory or s3:// (verified, never
    /// overwriting), recording progress in <wal-dir>/archive.state.
    Archive(crate::backup::ArchiveArgs),
    /// The archiver's progress: archived LSN, lag in segments, failures.
    ArchiveStatus(crate::backup::ArchiveStatusArgs),
}

#[derive(Debug, Args)]
pub struct WriteArgs {
    /// The entity (omit with --file).
    #[arg(required_unless_present = "file", conflicts_with = "file")]
    pub entity: Option<String>,
    /// The attribute.
    #[arg(required_unless_present = "file")]
    pub attribute: Option<String>,
    /// The value, read as --type.
    #[arg(required_unless_present = "file")]
    pub value: Option<String>,
    /// Read facts from a file of JSON lines (`-`: stdin) instead.
    #[arg(long, value_name = "PATH", conflicts_with = "idempotency_key")]
    pub file: Option<std::path::PathBuf>,
    /// Lines per transaction with --file [default: 1000].
    #[arg(long, value_name = "N", requires = "file", value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub batch: Option<u32>,
    /// How to read VALUE (with --file, each line has its own "type").
    #[arg(long = "type", value_enum, default_value_t = ValueType::Text, conflicts_with = "file")]
    pub value_type: ValueType,
    /// Who makes the claim (the server requires one).
    #[arg(long, env = "STEMEDB_SOURCE", default_value = "stemectl")]
    pub source: String,
    /// How sure the source is, in [0, 1] (with --file: per line).
    #[arg(long, conflicts_with = "file")]
    pub confidence: Option<f64>,
    /// Idempotency key (default: a fresh UUID). Repeating a key returns the
    /// original transaction.
    #[arg(long)]
    pub idempotency_key: Option<String>,
}

#[derive(Debug, Args, Clone)]
pub struct BenchArgs {
    /// Closed loop: requests kept in flight.
    #[arg(long, default_value_t = 16, conflicts_with = "rate", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub concurrency: u32,
    /// Open loop: operations per second, on a fixed schedule.
    #[arg(long, value_name = "OPS_PER_S")]
    pub rate: Option<f64>,
    /// Assertions per transaction.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub tx_size: u32,
    /// Bytes per written value.
    #[arg(long, default_value_t = 16)]
    pub value_bytes: usize,
    /// Fraction of operations that are reads (a get of a random written entity).
    #[arg(long, default_value_t = 0.0)]
    pub read_ratio: f64,
    /// Measured time.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub duration: Duration,
    /// Unmeasured time before it.
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    pub warmup: Duration,
    /// Write N facts first (1000 per transaction, 20 per entity); reads then
    /// target those entities.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub preload: u64,
    /// gRPC channels to spread requests over (default: min(concurrency, 8)).
    #[arg(long)]
    pub connections: Option<u32>,
    /// Client retries of UNAVAILABLE per operation. 0 shows every error.
    #[arg(long, default_value_t = 0)]
    pub retry_max: u32,
    /// Seed of the workload's randomness (default: random, printed).
    #[arg(long)]
    pub seed: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_a_typed_assert() {
        let cli = Cli::try_parse_from([
            "stemectl",
            "--output",
            "json",
            "assert",
            "e",
            "age",
            "36",
            "--type",
            "int",
            "--confidence",
            "0.5",
        ])
        .unwrap();
        assert_eq!(cli.output, Output::Json);
        let Command::Assert(w) = cli.command else {
            panic!("not assert")
        };
        assert_eq!(
            (w.value_type, w.confidence, w.source.as_str()),
            (ValueType::Int, Some(0.5), "stemectl")
        );
    }

    #[test]
    fn rate_and_concurrency_conflict() {
        assert!(
            Cli::try_parse_from(["stemectl", "bench", "--rate", "10", "--concurrency", "4"])
                .is_err()
        );
        let cli = Cli::try_parse_from(["stemectl", "bench", "--duration", "1s", "--warmup", "0s"])
            .unwrap();
        let Command::Bench(b) = cli.command else {
            panic!("not bench")
        };
        assert_eq!(
            (b.concurrency, b.duration, b.warmup),
            (16, Duration::from_secs(1), Duration::ZERO)
        );
    }

    #[test]
    fn node_commands_and_output_alias_parse() {
        let cli = Cli::try_parse_from(["stemectl", "--output", "text", "drain", "--wait"]).unwrap();
        assert_eq!(cli.output, Output::Table);
        let Command::Drain { wait, wait_timeout } = cli.command else {
            panic!("not drain")
        };
        assert_eq!((wait, wait_timeout), (true, Duration::from_secs(60)));
        let cli = Cli::try_parse_from(["stemectl", "rate-limit", "set", "500"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::RateLimit(RateLimitCommand::Set {
                max_writes_per_sec: 500
            })
        ));
        for bad in [
            &["stemectl", "rate-limit", "set", "0"][..],
            &["stemectl", "rate-limit"],
            &["stemectl", "wal"],
            &["stemectl", "drain", "--wait-timeout", "5s"],
            &["stemectl", "--client-cert", "c.pem", "status"],
            &["stemectl", "--output", "yaml", "status"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn file_replaces_the_positional_fact() {
        let cli =
            Cli::try_parse_from(["stemectl", "assert", "--file", "-", "--batch", "10"]).unwrap();
        let Command::Assert(w) = cli.command else {
            panic!("not assert")
        };
        assert_eq!(
            (w.file.as_deref(), w.batch, w.entity),
            (Some(std::path::Path::new("-")), Some(10), None)
        );
        for bad in [
            &["stemectl", "assert"][..],
            &["stemectl", "assert", "e", "a"],
            &["stemectl", "assert", "e", "a", "v", "--file", "f"],
            &["stemectl", "assert", "--file", "f", "--type", "int"],
            &["stemectl", "assert", "--file", "f", "--batch", "0"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?} parsed");
        }
    }
}
