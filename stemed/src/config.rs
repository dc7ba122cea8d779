//! stemed configuration: `/etc/stemedb/api.toml`, overridden by flags and
//! `STEMEDB_*` environment variables (see `main.rs`), with embedded defaults
//! so that a bare `stemed` runs a development node.
//!
//! Every knob is documented in `docs/operations/configuration.md`.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub wal: WalConfig,
    pub limits: Limits,
    pub store: StoreSection,
    pub checkpoint: CheckpointConfig,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Public gRPC API address.
    pub grpc_addr: SocketAddr,
    /// Admin and metrics HTTP address.
    pub admin_addr: SocketAddr,
    /// Where sled keeps the indexes (and, in dev mode, walld's WAL).
    pub data_dir: PathBuf,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WalConfig {
    /// walld's Unix socket. When unset, stemed runs in dev mode: it spawns a
    /// child walld with its WAL and socket inside `data_dir`.
    pub socket: Option<PathBuf>,
    /// The walld binary for dev mode; default: next to stemed, then `PATH`.
    pub walld_bin: Option<PathBuf>,
    /// How long the write batcher waits for more transactions once it has
    /// one. 0 flushes as soon as the queue is empty, so a lone writer never
    /// waits; larger values trade latency for fewer fsyncs per transaction.
    pub group_commit_max_wait_ms: u64,
    /// Upper bound on the record bytes of one WAL append (one fsync).
    pub group_commit_max_bytes: u64,
    /// Upper bound on the transactions in one WAL append.
    pub group_commit_max_records: usize,
    /// Timeout for one connection attempt to walld.
    pub connect_timeout_ms: u64,
    /// Reconnect backoff starts at 50 ms and doubles up to this.
    pub reconnect_backoff_max_ms: u64,
}

/// Validation and admission limits. Each one is named in the error that
/// enforces it.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub assertions_per_tx_max: usize,
    pub value_bytes_max: usize,
    pub name_bytes_max: usize,
    pub idempotency_key_bytes_max: usize,
    /// Encoded bytes of one transaction record.
    pub tx_bytes_max: usize,
    /// gRPC message size limit of the public API.
    pub grpc_message_bytes_max: usize,
    /// Write bytes admitted but not yet answered; beyond it writers wait
    /// until their deadline, then get RESOURCE_EXHAUSTED.
    pub write_bytes_in_flight_max: usize,
    /// Transactions queued for the batcher.
    pub write_queue_depth_max: usize,
    /// Deadline for a write whose client sent no `grpc-timeout`.
    pub write_timeout_ms: u64,
    /// Deadline for a read whose client sent no `grpc-timeout`.
    pub read_timeout_ms: u64,
    pub page_limit_default: usize,
    pub page_limit_max: usize,
    /// Watch streams open at once.
    pub watch_streams_max: usize,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSection {
    /// sled's page cache.
    pub cache_capacity_bytes: u64,
    /// Entities whose current view is cached.
    pub entity_cache_entries: u64,
    /// How long idempotency keys are remembered.
    pub idempotency_retention_secs: u64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// How often sled is flushed and the WAL truncated below the flushed
    /// `applied_lsn`. 0 disables checkpoints (the WAL then grows).
    pub interval_ms: u64,
    /// Records kept in the WAL below the checkpoint (retention).
    pub wal_retain_records: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server: ServerConfig::default(),
            wal: WalConfig::default(),
            limits: Limits::default(),
            store: StoreSection::default(),
            checkpoint: CheckpointConfig::default(),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            grpc_addr: "127.0.0.1:18181".parse().expect("static address"),
            admin_addr: "127.0.0.1:18180".parse().expect("static address"),
            data_dir: PathBuf::from("./stemedb-data"),
        }
    }
}

impl Default for WalConfig {
    fn default() -> Self {
        WalConfig {
            socket: None,
            walld_bin: None,
            group_commit_max_wait_ms: 0,
            group_commit_max_bytes: 1 << 20,
            group_commit_max_records: 4096,
            connect_timeout_ms: 2_000,
            reconnect_backoff_max_ms: 2_000,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            assertions_per_tx_max: 10_000,
            value_bytes_max: 64 * 1024,
            name_bytes_max: 512,
            idempotency_key_bytes_max: 256,
            tx_bytes_max: 8 << 20,
            grpc_message_bytes_max: 16 << 20,
            write_bytes_in_flight_max: 64 << 20,
            write_queue_depth_max: 8192,
            write_timeout_ms: 10_000,
            read_timeout_ms: 30_000,
            page_limit_default: 100,
            page_limit_max: 1_000,
            watch_streams_max: 1_024,
        }
    }
}

impl Default for StoreSection {
    fn default() -> Self {
        StoreSection {
            cache_capacity_bytes: 256 << 20,
            entity_cache_entries: 10_000,
            idempotency_retention_secs: 7 * 24 * 3600,
        }
    }
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            interval_ms: 10_000,
            wal_retain_records: 0,
        }
    }
}

impl Config {
    /// Reads a TOML file. Unknown keys and bad values are errors that name
    /// the key.
    pub fn from_file(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config {}: {e}", path.display()))?;
        Self::from_toml(&text).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))
    }

    pub fn from_toml(text: &str) -> anyhow::Result<Config> {
        let config: Config = toml::from_str(text)?;
        config.check()?;
        Ok(config)
    }

    /// Cross-field checks that serde cannot express.
    pub fn check(&self) -> anyhow::Result<()> {
        let l = &self.limits;
        anyhow::ensure!(
            l.assertions_per_tx_max >= 1,
            "limits.assertions_per_tx_max must be at least 1"
        );
        anyhow::ensure!(
            l.tx_bytes_max < l.grpc_message_bytes_max,
            "limits.tx_bytes_max ({}) must be below limits.grpc_message_bytes_max ({})",
            l.tx_bytes_max,
            l.grpc_message_bytes_max
        );
        anyhow::ensure!(
            l.write_bytes_in_flight_max >= l.tx_bytes_max,
            "limits.write_bytes_in_flight_max ({}) must be at least limits.tx_bytes_max ({})",
            l.write_bytes_in_flight_max,
            l.tx_bytes_max
        );
        anyhow::ensure!(
            l.write_bytes_in_flight_max <= u32::MAX as usize,
            "limits.write_bytes_in_flight_max must be at most {}",
            u32::MAX
        );
        anyhow::ensure!(
            l.page_limit_default >= 1 && l.page_limit_default <= l.page_limit_max,
            "limits.page_limit_default must be within 1..=limits.page_limit_max"
        );
        anyhow::ensure!(
            self.wal.group_commit_max_records >= 1,
            "wal.group_commit_max_records must be at least 1"
        );
        anyhow::ensure!(
            l.write_queue_depth_max >= 1,
            "limits.write_queue_depth_max must be at least 1"
        );
        Ok(())
    }

    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.limits.write_timeout_ms)
    }

    pub fn read_timeout(&self) -> Duration {
        Duration::from_millis(self.limits.read_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_pass_check() {
        Config::default().check().unwrap();
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.server.grpc_addr.port(), 18181);
        assert_eq!(c.server.admin_addr.port(), 18180);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::from_toml("[wal]\ngroup_commit_max_wiat_ms = 3\n").unwrap_err();
        assert!(err.to_string().contains("group_commit_max_wiat_ms"), "{err}");
    }

    #[test]
    fn runbook_tuning_keys_parse() {
        let c = Config::from_toml(
            "[wal]\ngroup_commit_max_wait_ms = 10\ngroup_commit_max_bytes = 1048576\n",
        )
        .unwrap();
        assert_eq!(c.wal.group_commit_max_wait_ms, 10);
        assert_eq!(c.wal.group_commit_max_bytes, 1_048_576);
    }

    #[test]
    fn bad_value_names_the_key() {
        let err = Config::from_toml("[limits]\nvalue_bytes_max = \"big\"\n").unwrap_err();
        assert!(err.to_string().contains("value_bytes_max"), "{err}");
    }
}
