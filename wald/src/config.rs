//! Configuration: CLI flags > `STEMEDB_WALLD_*` environment variables >
//! the TOML file > built-in defaults. Unknown keys in the file are errors.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use serde::Deserialize;

use crate::group_commit::CommitConfig;
use crate::recovery::RecoveryMode;

/// The file read when `--config` is not given, if it exists.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/stemedb/walld.toml";

const MIB: u64 = 1024 * 1024;

/// walld: the StemeDB write-ahead-log daemon. Serves stemedb.wal.v1.Wal
/// and grpc.health.v1 on a Unix socket only (no TCP port).
///
/// Every knob can also be set as STEMEDB_WALLD_<NAME> in the environment or
/// as <name> (snake_case) in the TOML config file.
/// Precedence: flags > environment > config file > defaults.
#[derive(Debug, Default, Parser)]
#[command(name = "walld", version)]
pub struct Cli {
    /// TOML config file. Default: /etc/stemedb/walld.toml, read only if it exists.
    #[arg(long, env = "STEMEDB_WALLD_CONFIG")]
    pub config: Option<PathBuf>,
    /// WAL directory (created and fsynced into its parent if missing). Default: /var/lib/stemedb/wal
    #[arg(long, env = "STEMEDB_WALLD_DIR")]
    pub dir: Option<PathBuf>,
    /// Unix socket path to serve on (mode 0660). Ignored under systemd socket
    /// activation (LISTEN_FDS). Default: /run/stemedb/walld.sock
    #[arg(long, env = "STEMEDB_WALLD_SOCKET")]
    pub socket: Option<PathBuf>,
    /// Preallocated size of one segment file in bytes. Default: 67108864 (64 MiB)
    #[arg(long, env = "STEMEDB_WALLD_SEGMENT_BYTES")]
    pub segment_bytes: Option<u64>,
    /// Largest Append request (record bytes plus 16 bytes of framing per
    /// record); also bounds the gRPC message size. Default: 16777216 (16 MiB)
    #[arg(long, env = "STEMEDB_WALLD_APPEND_BYTES_MAX")]
    pub append_bytes_max: Option<u64>,
    /// How long a commit group waits for more appends, in microseconds;
    /// 0 flushes as soon as the queue is empty. Default: 0
    #[arg(long, env = "STEMEDB_WALLD_GROUP_COMMIT_MAX_WAIT_US")]
    pub group_commit_max_wait_us: Option<u64>,
    /// Bytes after which a commit group is closed. Default: 1048576 (1 MiB)
    #[arg(long, env = "STEMEDB_WALLD_GROUP_COMMIT_MAX_BYTES")]
    pub group_commit_max_bytes: Option<u64>,
    /// Requests waiting for the writer, at most. Default: 4096
    #[arg(long, env = "STEMEDB_WALLD_QUEUE_DEPTH_MAX")]
    pub queue_depth_max: Option<u64>,
    /// Bytes waiting for the writer, at most. Default: 67108864 (64 MiB)
    #[arg(long, env = "STEMEDB_WALLD_QUEUE_BYTES_MAX")]
    pub queue_bytes_max: Option<u64>,
    /// How long an Append waits for room in a full queue before failing with
    /// RESOURCE_EXHAUSTED, in milliseconds. Default: 5000
    #[arg(long, env = "STEMEDB_WALLD_QUEUE_WAIT_MS_MAX")]
    pub queue_wait_ms_max: Option<u64>,
    /// An fsync slower than this logs a "slow fsync" warning, in ms. Default: 100
    #[arg(long, env = "STEMEDB_WALLD_SLOW_FSYNC_MS")]
    pub slow_fsync_ms: Option<u64>,
    /// Sliding window of the fsync duration quantiles, in seconds. Default: 600
    #[arg(long, env = "STEMEDB_WALLD_FSYNC_WINDOW_SECS")]
    pub fsync_window_secs: Option<u64>,
    /// Fsync samples kept for the window, at most. Default: 100000
    #[arg(long, env = "STEMEDB_WALLD_FSYNC_WINDOW_SAMPLES_MAX")]
    pub fsync_window_samples_max: Option<u64>,
    /// Record bytes per streamed Read message when the client asks for 0.
    /// Default: 1048576 (1 MiB)
    #[arg(long, env = "STEMEDB_WALLD_READ_MESSAGE_BYTES_MAX")]
    pub read_message_bytes_max: Option<u64>,
    /// What recovery does on damage (not a torn tail): refuse to start, or
    /// cut the log at the damage. Default: refuse
    #[arg(long, env = "STEMEDB_WALLD_RECOVERY_MODE", value_enum)]
    pub recovery_mode: Option<RecoveryMode>,
    /// User to switch to after opening the socket and directory (when started as root). Default: none
    #[arg(long, env = "STEMEDB_WALLD_USER")]
    pub user: Option<String>,
    /// Group to switch to (default: the user's primary group).
    #[arg(long, env = "STEMEDB_WALLD_GROUP")]
    pub group: Option<String>,
    /// Keep running as root (otherwise walld refuses). Default: false
    #[arg(long, env = "STEMEDB_WALLD_ALLOW_ROOT", value_parser = clap::builder::BoolishValueParser::new())]
    pub allow_root: bool,
    /// Peer uids allowed to connect, comma-separated. Default: walld's own uid and 0 (root)
    #[arg(long, env = "STEMEDB_WALLD_ALLOWED_UIDS", value_delimiter = ',')]
    pub allowed_uids: Option<Vec<u32>>,
    /// Peer gids allowed to connect, comma-separated. Default: none
    #[arg(long, env = "STEMEDB_WALLD_ALLOWED_GIDS", value_delimiter = ',')]
    pub allowed_gids: Option<Vec<u32>>,
    /// Time to let in-flight answers flush before a fatal exit (code 70), in ms. Default: 200
    #[arg(long, env = "STEMEDB_WALLD_FATAL_EXIT_DELAY_MS")]
    pub fatal_exit_delay_ms: Option<u64>,
    /// Truncate never removes a segment the archiver (`stemectl wal archive`)
    /// has not archived: truncation follows min(checkpoint, archived), read
    /// from <dir>/archive.state. Default: false
    #[arg(long, env = "STEMEDB_WALLD_ARCHIVE_REQUIRED", value_parser = clap::builder::BoolishValueParser::new())]
    pub archive_required: bool,
    /// Log format on stderr: text or json. Default: text
    #[arg(long, env = "STEMEDB_WALLD_LOG_FORMAT", value_parser = ["text", "json"])]
    pub log_format: Option<String>,
}

/// The config file. Every key is optional; unknown keys are rejected.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub dir: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    pub segment_bytes: Option<u64>,
    pub append_bytes_max: Option<u64>,
    pub group_commit_max_wait_us: Option<u64>,
    pub group_commit_max_bytes: Option<u64>,
    pub queue_depth_max: Option<u64>,
    pub queue_bytes_max: Option<u64>,
    pub queue_wait_ms_max: Option<u64>,
    pub slow_fsync_ms: Option<u64>,
    pub fsync_window_secs: Option<u64>,
    pub fsync_window_samples_max: Option<u64>,
    pub read_message_bytes_max: Option<u64>,
    pub recovery_mode: Option<RecoveryMode>,
    pub user: Option<String>,
    pub group: Option<String>,
    pub allow_root: Option<bool>,
    pub allowed_uids: Option<Vec<u32>>,
    pub allowed_gids: Option<Vec<u32>>,
    pub fatal_exit_delay_ms: Option<u64>,
    pub archive_required: Option<bool>,
}

/// The effective configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub segment_bytes: u64,
    pub append_bytes_max: u64,
    pub group_commit_max_wait_us: u64,
    pub group_commit_max_bytes: u64,
    pub queue_depth_max: u64,
    pub queue_bytes_max: u64,
    pub queue_wait_ms_max: u64,
    pub slow_fsync_ms: u64,
    pub fsync_window_secs: u64,
    pub fsync_window_samples_max: u64,
    pub read_message_bytes_max: u64,
    pub recovery_mode: RecoveryMode,
    pub user: Option<String>,
    pub group: Option<String>,
    pub allow_root: bool,
    /// None means the default: walld's own uid and root.
    pub allowed_uids: Option<Vec<u32>>,
    pub allowed_gids: Vec<u32>,
    pub fatal_exit_delay_ms: u64,
    /// Truncation waits for the archiver (see `archive_state`).
    pub archive_required: bool,
}

fn read_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("read config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parse config file {}", path.display()))
}

impl Config {
    /// Resolves the effective config from parsed flags/env and the file.
    pub fn load(cli: Cli) -> anyhow::Result<Config> {
        let file = match &cli.config {
            Some(path) => read_file(path)?,
            None if Path::new(DEFAULT_CONFIG_PATH).exists() => {
                read_file(Path::new(DEFAULT_CONFIG_PATH))?
            }
            None => FileConfig::default(),
        };
        Config::merge(cli, file)
    }

    /// Flags/env (already merged by clap) override the file, which
    /// overrides the defaults.
    pub fn merge(cli: Cli, file: FileConfig) -> anyhow::Result<Config> {
        let config = Config {
            dir: cli
                .dir
                .or(file.dir)
                .unwrap_or_else(|| PathBuf::from("/var/lib/stemedb/wal")),
            socket: cli
                .socket
                .or(file.socket)
                .unwrap_or_else(|| PathBuf::from("/run/stemedb/walld.sock")),
            segment_bytes: cli.segment_bytes.or(file.segment_bytes).unwrap_or(64 * MIB),
            append_bytes_max: cli
                .append_bytes_max
                .or(file.append_bytes_max)
                .unwrap_or(16 * MIB),
            group_commit_max_wait_us: cli
                .group_commit_max_wait_us
                .or(file.group_commit_max_wait_us)
                .unwrap_or(0),
            group_commit_max_bytes: cli
                .group_commit_max_bytes
                .or(file.group_commit_max_bytes)
                .unwrap_or(MIB),
            queue_depth_max: cli.queue_depth_max.or(file.queue_depth_max).unwrap_or(4096),
            queue_bytes_max: cli
                .queue_bytes_max
                .or(file.queue_bytes_max)
                .unwrap_or(64 * MIB),
            queue_wait_ms_max: cli
                .queue_wait_ms_max
                .or(file.queue_wait_ms_max)
                .unwrap_or(5000),
            slow_fsync_ms: cli.slow_fsync_ms.or(file.slow_fsync_ms).unwrap_or(100),
            fsync_window_secs: cli
                .fsync_window_secs
                .or(file.fsync_window_secs)
                .unwrap_or(600),
            fsync_window_samples_max: cli
                .fsync_window_samples_max
                .or(file.fsync_window_samples_max)
                .unwrap_or(100_000),
            read_message_bytes_max: cli
                .read_message_bytes_max
                .or(file.read_message_bytes_max)
                .unwrap_or(MIB),
            recovery_mode: cli.recovery_mode.or(file.recovery_mode).unwrap_or_default(),
            user: cli.user.or(file.user),
            group: cli.group.or(file.group),
            allow_root: cli.allow_root || file.allow_root.unwrap_or(false),
            allowed_uids: cli.allowed_uids.or(file.allowed_uids),
            allowed_gids: cli.allowed_gids.or(file.allowed_gids).unwrap_or_default(),
            fatal_exit_delay_ms: cli
                .fatal_exit_delay_ms
                .or(file.fatal_exit_delay_ms)
                .unwrap_or(200),
            archive_required: cli.archive_required || file.archive_required.unwrap_or(false),
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.segment_bytes < 2 * crate::segment::HEADER_BYTES {
            bail!(
                "segment_bytes {} is below the minimum {}",
                self.segment_bytes,
                2 * crate::segment::HEADER_BYTES
            );
        }
        if self.append_bytes_max == 0 || self.append_bytes_max > self.queue_bytes_max {
            bail!(
                "append_bytes_max {} must be between 1 and queue_bytes_max {}",
                self.append_bytes_max,
                self.queue_bytes_max
            );
        }
        if self.queue_bytes_max > u64::from(u32::MAX) {
            bail!(
                "queue_bytes_max {} is above the maximum {}",
                self.queue_bytes_max,
                u32::MAX
            );
        }
        if self.queue_depth_max == 0
            || self.group_commit_max_bytes == 0
            || self.fsync_window_samples_max == 0
        {
            bail!("queue_depth_max, group_commit_max_bytes and fsync_window_samples_max must be above 0");
        }
        Ok(())
    }

    pub fn commit_config(&self) -> CommitConfig {
        CommitConfig {
            group_commit_max_wait: Duration::from_micros(self.group_commit_max_wait_us),
            group_commit_max_bytes: self.group_commit_max_bytes as usize,
            queue_depth_max: self.queue_depth_max as usize,
            queue_bytes_max: self.queue_bytes_max as usize,
            queue_wait_max: Duration::from_millis(self.queue_wait_ms_max),
            append_bytes_max: self.append_bytes_max as usize,
            slow_fsync: Duration::from_millis(self.slow_fsync_ms),
        }
    }

    /// Key/value pairs of the effective config, for Status.
    pub fn entries(&self) -> Vec<(String, String)> {
        let list = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        let entries = [
            ("dir", self.dir.display().to_string()),
            ("socket", self.socket.display().to_string()),
            ("segment_bytes", self.segment_bytes.to_string()),
            ("append_bytes_max", self.append_bytes_max.to_string()),
            (
                "group_commit_max_wait_us",
                self.group_commit_max_wait_us.to_string(),
            ),
            (
                "group_commit_max_bytes",
                self.group_commit_max_bytes.to_string(),
            ),
            ("queue_depth_max", self.queue_depth_max.to_string()),
            ("queue_bytes_max", self.queue_bytes_max.to_string()),
            ("queue_wait_ms_max", self.queue_wait_ms_max.to_string()),
            ("slow_fsync_ms", self.slow_fsync_ms.to_string()),
            ("fsync_window_secs", self.fsync_window_secs.to_string()),
            (
                "fsync_window_samples_max",
                self.fsync_window_samples_max.to_string(),
            ),
            (
                "read_message_bytes_max",
                self.read_message_bytes_max.to_string(),
            ),
            ("recovery_mode", self.recovery_mode.as_str().to_string()),
            ("user", self.user.clone().unwrap_or_default()),
            ("group", self.group.clone().unwrap_or_default()),
            ("allow_root", self.allow_root.to_string()),
            (
                "allowed_uids",
                self.allowed_uids.as_deref().map_or("default".into(), list),
            ),
            ("allowed_gids", list(&self.allowed_gids)),
            ("fatal_exit_delay_ms", self.fatal_exit_delay_ms.to_string()),
            ("archive_required", self.archive_required.to_string()),
        ];
        entries
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_is_named() {
        let err =
            toml::from_str::<FileConfig>("segment_bytes = 1\nsegmnet_bytes = 2\n").unwrap_err();
        assert!(err.to_string().contains("segmnet_bytes"), "{err}");
    }

    #[test]
    fn flags_override_file_override_defaults() {
        let cli = Cli::parse_from(["walld", "--segment-bytes", "65536"]);
        let file: FileConfig =
            toml::from_str("segment_bytes = 131072\nslow_fsync_ms = 5\n").unwrap();
        let config = Config::merge(cli, file).unwrap();
        assert_eq!(config.segment_bytes, 65536);
        assert_eq!(config.slow_fsync_ms, 5);
        assert_eq!(config.queue_depth_max, 4096);
    }
}
