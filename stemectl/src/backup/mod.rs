//! Backups, WAL archiving and point-in-time restores.
//!
//! Code map: `dest` (a directory or `s3://`, put-if-absent with read-back),
//! `manifest` (the backup format and its checks), `create`, `verify` (also
//! `list`), `archive` (`wal archive`, `wal archive-status`), `restore`,
//! `progress` (stderr progress lines).
//!
//! **Architecture Invariant:** nothing here writes to a live node: backups
//! read the admin export stream, the archiver reads sealed segments and
//! writes only `archive.state`, restores build fresh directories.

mod archive;
mod create;
mod dest;
mod manifest;
mod progress;
mod restore;
mod verify;

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};

use crate::cli::{Cli, Output};
use crate::exit::UsageError;

#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Take an online, consistent backup of the node (--admin-addr).
    #[command(after_help = "Examples:
  stemectl backup create --to /var/backups/stemedb
  AWS_ENDPOINT_URL=http://127.0.0.1:5000 AWS_ALLOW_HTTP=true stemectl backup create --to s3://bucket/backups")]
    Create {
        /// A directory or s3://bucket/prefix; the backup goes to DEST/<ID>/.
        #[arg(long, value_name = "DEST")]
        to: String,
        /// Back up as of this LSN (default: the node's applied LSN).
        #[arg(long, value_name = "LSN")]
        at_lsn: Option<u64>,
        /// Bytes per data file, at most (one transaction may exceed it).
        #[arg(long, default_value_t = 64 * 1024 * 1024)]
        file_bytes_max: u64,
    },
    /// List the complete backups under DEST.
    List {
        /// A directory or s3://bucket/prefix.
        dest: String,
    },
    /// Re-read a backup and check every checksum and count.
    #[command(after_help = "Examples:
  stemectl backup verify /var/backups/stemedb/snapshots/<ID>
  stemectl backup verify --from /var/backups/stemedb/snapshots --wal /var/backups/stemedb/wal   # the latest, and the archive after it")]
    Verify {
        /// DEST/ID.
        #[arg(required_unless_present = "from", conflicts_with = "from")]
        backup: Option<String>,
        /// Verify the latest complete backup under DEST instead.
        #[arg(long, value_name = "DEST")]
        from: Option<String>,
        /// Also check every archived WAL segment here (headers, record
        /// CRCs, dense LSNs) and that the archive continues the backup.
        #[arg(long, value_name = "SRC")]
        wal: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The base backup, DEST/ID.
    #[arg(long, value_name = "BACKUP")]
    pub from: String,
    /// Replay archived WAL segments from this directory or s3:// location.
    #[arg(long, value_name = "SRC")]
    pub wal_archive: Option<String>,
    /// Restore up to and including this LSN.
    #[arg(long, value_name = "N", conflicts_with = "to_time")]
    pub to_lsn: Option<u64>,
    /// Restore transactions recorded at or before this time (RFC 3339).
    #[arg(long, value_name = "T")]
    pub to_time: Option<String>,
    /// The new node's data directory (must be empty unless --force).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// The new node's WAL directory (must be empty unless --force).
    #[arg(long)]
    pub wal_dir: PathBuf,
    /// Replace the contents of non-empty directories.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct ArchiveArgs {
    /// walld's WAL directory.
    #[arg(long)]
    pub wal_dir: PathBuf,
    /// A directory or s3://bucket/prefix.
    #[arg(long, value_name = "DEST")]
    pub to: String,
    /// Archive the segments sealed now, then exit (the default, for a
    /// timer-started oneshot unit).
    #[arg(long, conflicts_with = "follow")]
    pub once: bool,
    /// Keep archiving as segments are sealed, polling every --interval.
    #[arg(long)]
    pub follow: bool,
    /// Poll interval with --follow.
    #[arg(long, value_parser = crate::timefmt::parse_duration, default_value = "1s")]
    pub interval: Duration,
}

#[derive(Debug, Args)]
pub struct ArchiveStatusArgs {
    /// walld's WAL directory.
    #[arg(long)]
    pub wal_dir: PathBuf,
}

fn print_json(out: &mut impl Write, v: &serde_json::Value) -> anyhow::Result<()> {
    writeln!(out, "{}", serde_json::to_string_pretty(v)?)?;
    Ok(())
}

pub async fn backup(cli: &Cli, cmd: &BackupCommand, out: &mut impl Write) -> anyhow::Result<()> {
    match cmd {
        BackupCommand::Create {
            to,
            at_lsn,
            file_bytes_max,
        } => {
            let cfg = create::CreateConfig {
                to: to.clone(),
                at_lsn: *at_lsn,
                file_bytes_max: (*file_bytes_max).max(1),
            };
            let m = create::run(cli, &cfg).await?;
            match cli.output {
                Output::Json => print_json(out, &serde_json::to_value(&m)?)?,
                _ => writeln!(
                    out,
                    "backup {}/{}: basis LSN {}, {} transactions, {} assertions, {} files",
                    to.trim_end_matches('/'),
                    m.id,
                    m.basis_lsn,
                    m.transactions,
                    m.assertions,
                    m.files.len()
                )?,
            }
            Ok(())
        }
        BackupCommand::List { dest } => {
            let list = verify::list(&dest::Dest::parse(dest)?).await?;
            match cli.output {
                Output::Json => print_json(out, &serde_json::to_value(&list)?)?,
                _ => {
                    writeln!(
                        out,
                        "ID\tBASIS_LSN\tCREATED\tTRANSACTIONS\tASSERTIONS\tBYTES"
                    )?;
                    for m in &list {
                        let bytes: u64 = m.files.iter().map(|f| f.bytes).sum();
                        writeln!(
                            out,
                            "{}\t{}\t{}\t{}\t{}\t{bytes}",
                            m.id, m.basis_lsn, m.created_at, m.transactions, m.assertions
                        )?;
                    }
                }
            }
            Ok(())
        }
        BackupCommand::Verify { backup, from, wal } => {
            let spec = match (backup, from) {
                (Some(b), _) => b.clone(),
                (None, Some(from)) => {
                    let list = verify::list(&dest::Dest::parse(from)?).await?;
                    let Some(latest) = list.last() else {
                        anyhow::bail!("{from}: no complete backup (none has a manifest.json)");
                    };
                    format!("{}/{}", from.trim_end_matches('/'), latest.id)
                }
                (None, None) => unreachable!("clap requires BACKUP or --from"),
            };
            let m = verify::verify(&spec).await?;
            if let Some(src) = wal {
                let (segments, last) =
                    verify::verify_archive(&dest::Dest::parse(src)?, m.basis_lsn).await?;
                writeln!(out, "WAL archive {src} OK: {segments} segments, continues backup {} up to LSN {last}", m.id)?;
            }
            match cli.output {
                Output::Json => print_json(out, &serde_json::json!({"ok": true, "manifest": m}))?,
                _ => writeln!(
                    out,
                    "backup {} OK: basis LSN {}, {} files, {} transactions, {} assertions, content sha256 {}",
                    m.id,
                    m.basis_lsn,
                    m.files.len(),
                    m.transactions,
                    m.assertions,
                    m.content_sha256
                )?,
            }
            Ok(())
        }
    }
}

pub async fn restore(cli: &Cli, a: &RestoreArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let to_time_micros = match &a.to_time {
        None => None,
        Some(t) => {
            let at = crate::timefmt::parse_timestamp(t)
                .map_err(|e| UsageError(format!("--to-time {t:?}: {e}")))?;
            let d = at
                .duration_since(std::time::UNIX_EPOCH)
                .map_err(|_| UsageError(format!("--to-time {t:?} is before 1970")))?;
            Some(d.as_micros() as i64)
        }
    };
    let cfg = restore::RestoreConfig {
        from: a.from.clone(),
        wal_archive: a.wal_archive.clone(),
        to_lsn: a.to_lsn,
        to_time_micros,
        data_dir: a.data_dir.clone(),
        wal_dir: a.wal_dir.clone(),
        force: a.force,
    };
    let r = restore::run(&cfg).await?;
    match cli.output {
        Output::Json => print_json(out, &serde_json::to_value(&r)?)?,
        _ => writeln!(
            out,
            "restored backup {} (basis LSN {}) + {} WAL records to LSN {}: {} transactions, {} assertions, {:.1} MB in {:.2}s ({:.1} MB/s); start walld on {} and stemed on {}",
            r.backup_id,
            r.basis_lsn,
            r.wal_records_replayed,
            r.restored_lsn,
            r.transactions,
            r.assertions,
            r.bytes_read as f64 / 1e6,
            r.seconds,
            r.mb_per_s,
            a.wal_dir.display(),
            a.data_dir.display()
        )?,
    }
    Ok(())
}

pub async fn wal_archive(a: &ArchiveArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let cfg = archive::ArchiveConfig {
        wal_dir: a.wal_dir.clone(),
        to: a.to.clone(),
        once: !a.follow,
        interval: a.interval,
    };
    let s = archive::run(&cfg).await?;
    writeln!(
        out,
        "archived through LSN {} ({} segments archived, {} failures)",
        s.archived_through_lsn, s.segments_archived_total, s.failures_total
    )?;
    Ok(())
}

pub fn wal_archive_status(
    cli: &Cli,
    a: &ArchiveStatusArgs,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let v = archive::status(&a.wal_dir)?;
    match cli.output {
        Output::Json => print_json(out, &v)?,
        _ => {
            for (k, val) in v.as_object().into_iter().flatten() {
                writeln!(out, "{k}: {val}")?;
            }
        }
    }
    Ok(())
}
