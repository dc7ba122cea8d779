//! stemed configuration: `/etc/stemedb/api.toml`, overridden by flags and
//! `STEMEDB_*` environment variables (see `main.rs`), with embedded defaults
//! so that a bare `stemed` runs a development node.
//!
//! Every knob is documented in `docs/operations/configuration.md`.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub wal: WalConfig,
    pub storage: StorageConfig,
    pub limits: Limits,
    pub rate_limit: RateLimitConfig,
    pub auth: AuthConfig,
    pub tls: TlsConfig,
    pub telemetry: TelemetryConfig,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Public gRPC API address.
    pub grpc_addr: SocketAddr,
    /// Admin and metrics HTTP address.
    pub admin_addr: SocketAddr,
    /// Bound on waiting for in-flight requests at shutdown.
    pub shutdown_grace_ms: u64,
    /// Load-balancer gRPC address: the same services as `grpc_addr`, but
    /// closed while the node is draining (connects are refused, so nginx
    /// fails over before it sends a request) and open again on undrain.
    /// Point load balancers here. Unset: no such listener.
    pub lb_grpc_addr: Option<SocketAddr>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
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
    /// WAL appends sent to walld and not yet answered, at most. With 2, the
    /// next group is on its way while walld fsyncs the previous one; 1
    /// sends one append at a time.
    pub appends_in_flight_max: usize,
    /// Timeout for one connection attempt to walld.
    pub connect_timeout_ms: u64,
    /// Reconnect backoff starts at 50 ms and doubles up to this.
    pub reconnect_backoff_max_ms: u64,
}

/// Validation and admission limits. Each one is named in the error that
/// enforces it.
#[derive(Clone, Debug, Deserialize, Serialize)]
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
    /// gRPC connections open at once, across the public and load-balancer
    /// listeners; past it a new connection is closed as soon as it is
    /// accepted. Keep it below the open-file limit (`LimitNOFILE`). Behind
    /// deploy/nginx, which opens one upstream connection per call, it also
    /// bounds the calls nginx can have in flight to this node.
    pub grpc_connections_max: usize,
    /// Concurrent HTTP/2 streams (calls) per gRPC connection, advertised as
    /// SETTINGS_MAX_CONCURRENT_STREAMS; a client queues calls beyond it.
    pub grpc_streams_per_connection_max: u32,
    /// Streams the server may reset for a client's protocol errors (a
    /// malformed request, say) on one connection before it closes the
    /// connection with GOAWAY ENHANCE_YOUR_CALM (tonic's default is no
    /// limit; see RUSTSEC-2024-0003).
    pub grpc_error_resets_per_connection_max: usize,
    /// How long a new gRPC connection may take to send the HTTP/2 preface
    /// before it is closed; with TLS, the bound of the TLS handshake too.
    pub grpc_handshake_timeout_ms: u64,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Where sled keeps the indexes and the node state (and, in dev mode,
    /// walld's WAL and socket).
    pub data_dir: PathBuf,
    /// sled's page cache, counted in sled's serialized bytes: its resident
    /// memory runs well above this figure and grows with the store (see
    /// docs/reliability.md, "Soak"). The default is the one the 10-minute
    /// soak held under 300 MB for walld + stemed. Raise it on hosts with
    /// memory to spare, for reads of a working set larger than the cache.
    pub cache_capacity_bytes: u64,
    /// Entities whose current view is cached, at most (0 disables the cache).
    pub entity_cache_entries: u64,
    /// Bytes the entity cache may hold (facts' strings and values, an
    /// estimate of their in-memory size), at most.
    pub entity_cache_bytes: u64,
    /// How long idempotency keys are remembered.
    pub idempotency_retention_secs: u64,
    /// How often sled is flushed and the WAL truncated below the flushed
    /// `applied_lsn` (a checkpoint). 0 disables checkpoints: then the WAL
    /// is never truncated, and sled, which reclaims its log space only
    /// across flushes, grows with every write (for tests only).
    pub checkpoint_interval_ms: u64,
    /// Records kept in the WAL below the checkpoint (retention).
    pub wal_retain_records: u64,
}

/// Rate limits. `writes_per_sec` is the starting global write limit in
/// assertions per second; the admin API changes it at runtime and that
/// choice persists in the node state. 0 means no limit.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Assertions per second written through Transact.
    pub writes_per_sec: u32,
    /// Get, Query and History calls per second.
    pub queries_per_sec: u32,
    /// Watch streams opened per second.
    pub watch_streams_per_sec: u32,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// File holding the admin bearer token, required for admin requests
    /// from addresses outside `trusted_networks`. Unset: such requests are
    /// refused.
    pub admin_token_file: Option<PathBuf>,
    /// Networks (CIDR) whose admin requests need no token.
    pub trusted_networks: Vec<String>,
    /// gRPC bearer tokens, one `TOKEN ROLE` per line (roles: read, write,
    /// admin). Unset: the gRPC API needs no token.
    pub tokens_file: Option<PathBuf>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain; with `key_file`, turns on TLS for gRPC and
    /// admin HTTP.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// PEM CA bundle; when set, clients must present a certificate signed
    /// by it (mTLS).
    pub client_ca_file: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// `text` or `json`.
    pub log_format: String,
    /// Log filter (tracing EnvFilter syntax); RUST_LOG overrides it.
    pub log_level: String,
    /// OTLP/gRPC endpoint for traces; unset: no export.
    pub otlp_endpoint: Option<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            grpc_addr: "127.0.0.1:18181".parse().expect("static address"),
            admin_addr: "127.0.0.1:18180".parse().expect("static address"),
            shutdown_grace_ms: 10_000,
            lb_grpc_addr: None,
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
            appends_in_flight_max: 2,
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
            grpc_connections_max: 4_096,
            grpc_streams_per_connection_max: 256,
            grpc_error_resets_per_connection_max: 1_024,
            grpc_handshake_timeout_ms: 10_000,
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            data_dir: PathBuf::from("./stemedb-data"),
            cache_capacity_bytes: 64 << 20,
            entity_cache_entries: 10_000,
            entity_cache_bytes: 32 << 20,
            idempotency_retention_secs: 7 * 24 * 3600,
            checkpoint_interval_ms: 10_000,
            wal_retain_records: 0,
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            admin_token_file: None,
            trusted_networks: vec!["127.0.0.0/8".into(), "::1/128".into()],
            tokens_file: None,
        }
    }
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            log_format: "text".into(),
            log_level: "info".into(),
            otlp_endpoint: None,
        }
    }
}

/// The config sections; an environment variable `STEMEDB_<SECTION>_<KEY>`
/// overrides `<key>` of `[<section>]`.
pub const SECTIONS: &[&str] = &[
    "rate_limit",
    "telemetry",
    "storage",
    "server",
    "limits",
    "auth",
    "tls",
    "wal",
];

impl Config {
    /// Reads a TOML file. Unknown keys and bad values are errors that name
    /// the key.
    pub fn from_file(path: &Path) -> anyhow::Result<Config> {
        Self::load(Some(path), std::iter::empty())
    }

    pub fn from_toml(text: &str) -> anyhow::Result<Config> {
        let table: toml::Table = toml::from_str(text)?;
        let config = Self::from_table(table)?;
        config.check()?;
        Ok(config)
    }

    /// The effective config: defaults, then the file (if any), then every
    /// `STEMEDB_<SECTION>_<KEY>` variable of `env`. Errors name the file or
    /// the variable and the key.
    pub fn load(
        file: Option<&Path>,
        env: impl Iterator<Item = (String, String)>,
    ) -> anyhow::Result<Config> {
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("cannot read config {}: {e}", path.display()))?;
                let t: toml::Table = toml::from_str(&text)
                    .map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))?;
                Self::from_table(t.clone())
                    .map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))?;
                t
            }
            None => toml::Table::new(),
        };
        let known = known_keys();
        let mut vars: Vec<(String, String)> = env.collect();
        vars.sort();
        for (name, raw) in vars {
            let Some((section, key)) = env_target(&name) else {
                continue;
            };
            if !known.contains(&(section.to_string(), key.clone())) {
                anyhow::bail!("environment variable {name}: [{section}] has no key `{key}`");
            }
            let value = parse_env_value(&raw);
            table
                .entry(section.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .ok_or_else(|| anyhow::anyhow!("config section [{section}] is not a table"))?
                .insert(key.clone(), value);
            Self::from_table(table.clone())
                .map_err(|e| anyhow::anyhow!("environment variable {name}={raw:?}: {e}"))?;
        }
        let config = Self::from_table(table)?;
        config.check()?;
        Ok(config)
    }

    fn from_table(table: toml::Table) -> anyhow::Result<Config> {
        Config::deserialize(toml::Value::Table(table)).map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// The effective config as TOML. Secrets never live in the config
    /// itself (only the paths of the files holding them), so nothing here
    /// needs redacting; the files' contents are never printed or logged.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
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
            (1..=64).contains(&self.wal.appends_in_flight_max),
            "wal.appends_in_flight_max must be within 1..=64, not {}",
            self.wal.appends_in_flight_max
        );
        anyhow::ensure!(
            matches!(self.telemetry.log_format.as_str(), "text" | "json"),
            "telemetry.log_format must be \"text\" or \"json\", not {:?}",
            self.telemetry.log_format
        );
        for n in &self.auth.trusted_networks {
            n.parse::<ipnet::IpNet>().map_err(|e| {
                anyhow::anyhow!("auth.trusted_networks: {n:?} is not a CIDR network: {e}")
            })?;
        }
        anyhow::ensure!(
            self.tls.cert_file.is_some() == self.tls.key_file.is_some(),
            "tls.cert_file and tls.key_file must be set together"
        );
        anyhow::ensure!(
            self.tls.client_ca_file.is_none() || self.tls.cert_file.is_some(),
            "tls.client_ca_file needs tls.cert_file and tls.key_file"
        );
        anyhow::ensure!(
            l.write_queue_depth_max >= 1,
            "limits.write_queue_depth_max must be at least 1"
        );
        anyhow::ensure!(
            l.grpc_connections_max >= 1,
            "limits.grpc_connections_max must be at least 1"
        );
        anyhow::ensure!(
            l.grpc_streams_per_connection_max >= 1,
            "limits.grpc_streams_per_connection_max must be at least 1"
        );
        anyhow::ensure!(
            l.grpc_error_resets_per_connection_max >= 1,
            "limits.grpc_error_resets_per_connection_max must be at least 1"
        );
        anyhow::ensure!(
            l.grpc_handshake_timeout_ms >= 1,
            "limits.grpc_handshake_timeout_ms must be at least 1"
        );
        Ok(())
    }

    pub fn checkpoint_interval(&self) -> Duration {
        Duration::from_millis(self.storage.checkpoint_interval_ms)
    }

    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.limits.write_timeout_ms)
    }

    pub fn read_timeout(&self) -> Duration {
        Duration::from_millis(self.limits.read_timeout_ms)
    }

    pub fn grpc_handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.limits.grpc_handshake_timeout_ms)
    }
}

/// Every `(section, key)` of the config, including optional keys.
pub fn known_keys() -> Vec<(String, String)> {
    let value = serde_json::to_value(Config::default()).expect("config serializes");
    let mut out = Vec::new();
    if let Some(sections) = value.as_object() {
        for (section, keys) in sections {
            if let Some(keys) = keys.as_object() {
                for key in keys.keys() {
                    out.push((section.clone(), key.clone()));
                }
            }
        }
    }
    out
}

/// The environment variable that overrides `[section] key`.
pub fn env_name(section: &str, key: &str) -> String {
    format!("STEMEDB_{}_{}", section.to_uppercase(), key.to_uppercase())
}

fn env_target(name: &str) -> Option<(&'static str, String)> {
    let rest = name.strip_prefix("STEMEDB_")?.to_lowercase();
    SECTIONS.iter().find_map(|section| {
        let key = rest.strip_prefix(section)?.strip_prefix('_')?;
        Some((*section, key.to_string()))
    })
}

/// An environment value is read as a TOML value (number, bool, array) when
/// it parses as one, else as a string.
fn parse_env_value(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
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
        assert!(
            err.to_string().contains("group_commit_max_wiat_ms"),
            "{err}"
        );
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
    fn env_overrides_every_section_and_names_bad_variables() {
        let env = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Vec<_>>()
                .into_iter()
        };
        let c = Config::load(
            None,
            env(&[
                ("STEMEDB_WAL_GROUP_COMMIT_MAX_WAIT_MS", "7"),
                ("STEMEDB_RATE_LIMIT_WRITES_PER_SEC", "500"),
                ("STEMEDB_STORAGE_DATA_DIR", "/tmp/x"),
                ("STEMEDB_WAL_SOCKET", "/run/stemedb/walld.sock"),
                ("STEMEDB_AUTH_TRUSTED_NETWORKS", "[\"10.0.0.0/8\"]"),
                ("STEMEDB_TEST_SEED", "1"),
                ("STEMEDB_WALLD_DIR", "/ignored/by/stemed"),
            ]),
        )
        .unwrap();
        assert_eq!(c.wal.group_commit_max_wait_ms, 7);
        assert_eq!(c.rate_limit.writes_per_sec, 500);
        assert_eq!(c.storage.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(c.auth.trusted_networks, vec!["10.0.0.0/8".to_string()]);
        let err = Config::load(None, env(&[("STEMEDB_WAL_GROUP_COMIT_MAX_WAIT_MS", "7")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("STEMEDB_WAL_GROUP_COMIT_MAX_WAIT_MS"), "{err}");
        let err = Config::load(None, env(&[("STEMEDB_LIMITS_VALUE_BYTES_MAX", "lots")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("STEMEDB_LIMITS_VALUE_BYTES_MAX"), "{err}");
    }

    /// Both files come from scripts/gen-config-docs.py: rerun it after
    /// adding a key.
    #[test]
    fn every_key_is_in_the_example_env_file_and_the_docs() {
        let example = include_str!("../../deploy/.env.example");
        let docs = include_str!("../../docs/operations/configuration.md");
        for (section, key) in known_keys() {
            let name = env_name(&section, &key);
            assert!(example.contains(&name), "deploy/.env.example lacks {name}");
            assert!(
                docs.contains(&format!("| `{key}` | `{name}` |")),
                "docs/operations/configuration.md lacks {section}.{key}"
            );
        }
    }

    #[test]
    fn bad_value_names_the_key() {
        let err = Config::from_toml("[limits]\nvalue_bytes_max = \"big\"\n").unwrap_err();
        assert!(err.to_string().contains("value_bytes_max"), "{err}");
    }
}
