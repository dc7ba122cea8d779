//! `restore`: a fresh node from a base backup plus, optionally, archived WAL
//! up to a target LSN or time.
//!
//! # Steps
//! 1. refuse non-empty directories unless `--force`;
//! 2. import every data file of the backup (each checked against the
//!    manifest first) with `Store::import`, which sets `applied_lsn` to the
//!    basis LSN;
//! 3. replay archived segments from `basis + 1` with `Store::apply` (dense
//!    LSNs), stopping at the target; a gap in the archive is an error;
//! 4. flush, then check the content hash up to the basis against the
//!    manifest;
//! 5. write an empty WAL segment that starts at `restored_lsn + 1`, so a
//!    fresh walld on `--wal-dir` continues exactly after the restored store.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use stemed::store::{Store, StoreConfig, TxRecord};

use super::archive::segment_records;
use super::dest::{split_backup, Dest};
use super::manifest::{check_file, ContentHash};
use super::progress::Progress;
use crate::exit::UsageError;

/// Records applied per store batch.
const RESTORE_BATCH_RECORDS_MAX: usize = 1024;

pub struct RestoreConfig {
    pub from: String,
    pub wal_archive: Option<String>,
    pub to_lsn: Option<u64>,
    /// Last `recorded_at` to include, microseconds since the Unix epoch.
    pub to_time_micros: Option<i64>,
    pub data_dir: PathBuf,
    pub wal_dir: PathBuf,
    pub force: bool,
}

#[derive(Debug, serde::Serialize)]
pub struct RestoreReport {
    pub backup_id: String,
    pub basis_lsn: u64,
    pub restored_lsn: u64,
    pub wal_records_replayed: u64,
    pub transactions: u64,
    pub assertions: u64,
    pub bytes_read: u64,
    pub seconds: f64,
    pub mb_per_s: f64,
}

fn prepare_dir(dir: &Path, force: bool, flag: &str) -> anyhow::Result<()> {
    let non_empty = match std::fs::read_dir(dir) {
        Ok(mut entries) => entries.next().is_some(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(e).with_context(|| format!("{flag} {}", dir.display())),
    };
    if non_empty {
        if !force {
            return Err(UsageError(format!(
                "{flag} {} is not empty; pass --force to replace its contents",
                dir.display()
            ))
            .into());
        }
        std::fs::remove_dir_all(dir).with_context(|| format!("clear {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))
}

struct Batch<'a> {
    store: &'a Store,
    records: Vec<(u64, TxRecord)>,
    dense: bool,
}

impl Batch<'_> {
    fn push(&mut self, lsn: u64, rec: TxRecord) -> anyhow::Result<()> {
        self.records.push((lsn, rec));
        if self.records.len() >= RESTORE_BATCH_RECORDS_MAX {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        let Some(last) = self.records.last().map(|r| r.0) else {
            return Ok(());
        };
        if self.dense {
            self.store.apply(&self.records)?;
        } else {
            self.store.import(&self.records, last)?;
        }
        self.records.clear();
        Ok(())
    }
}

pub async fn run(cfg: &RestoreConfig) -> anyhow::Result<RestoreReport> {
    let (location, id) = split_backup(&cfg.from)?;
    let backup = location.child(&id);
    let manifest = super::verify::read_manifest(&backup).await?;
    if let Some(to) = cfg.to_lsn {
        if to < manifest.basis_lsn {
            return Err(UsageError(format!(
                "--to-lsn {to} is before the basis LSN {} of backup {id}; restore from an older backup",
                manifest.basis_lsn
            ))
            .into());
        }
    }
    if cfg.wal_archive.is_none() && cfg.to_lsn.is_some_and(|to| to > manifest.basis_lsn) {
        return Err(UsageError(format!(
            "--to-lsn beyond the basis LSN {} of backup {id} needs --wal-archive",
            manifest.basis_lsn
        ))
        .into());
    }
    prepare_dir(&cfg.data_dir, cfg.force, "--data-dir")?;
    prepare_dir(&cfg.wal_dir, cfg.force, "--wal-dir")?;
    // stemed keeps its store in <data-dir>/store (stemed/src/server.rs).
    let store_dir = cfg.data_dir.join("store");
    let store = Store::open(StoreConfig {
        path: store_dir,
        cache_capacity_bytes: 64 * 1024 * 1024,
        entity_cache_entries: 0,
        entity_cache_bytes: 0,
        idempotency_retention: Duration::from_secs(7 * 24 * 3600),
    })
    .with_context(|| format!("open a store in {}", cfg.data_dir.display()))?;
    let mut progress = Progress::new("restore");
    let mut hash = ContentHash::default();
    let mut batch = Batch {
        store: &store,
        records: Vec::new(),
        dense: false,
    };
    for (i, entry) in manifest.files.iter().enumerate() {
        let bytes = backup.get(&entry.name).await?;
        progress.bytes += bytes.len() as u64;
        check_file(entry, manifest.basis_lsn, &bytes, |tx, data, rec| {
            if let Some(t) = cfg.to_time_micros {
                if rec.recorded_at_micros > t {
                    bail!("tx {tx} of the backup was recorded after --to-time; restore from an older backup");
                }
            }
            hash.add(tx, data);
            batch.push(tx, rec.clone())
        })
        .map_err(|e| anyhow::anyhow!("{}/{e:#}", backup.describe("").trim_end_matches('/')))?;
        progress.tick(i as u64 + 1, manifest.files.len() as u64);
    }
    batch.flush()?;
    store.import(&[], manifest.basis_lsn)?;
    if hash.finish() != manifest.content_sha256 {
        bail!(
            "{}: content sha256 does not match the restored transactions",
            backup.describe("manifest.json")
        );
    }
    let replayed = match &cfg.wal_archive {
        Some(src) => replay(cfg, &Dest::parse(src)?, &store, &mut progress).await?,
        None => 0,
    };
    let restored_lsn = store.applied_lsn();
    store.flush()?;
    verify_restored(&store, &manifest)?;
    write_wal_start(&cfg.wal_dir, restored_lsn + 1)?;
    let transactions = count_transactions(&store, restored_lsn)?;
    Ok(RestoreReport {
        backup_id: id,
        basis_lsn: manifest.basis_lsn,
        restored_lsn,
        wal_records_replayed: replayed,
        transactions,
        assertions: store.fact_count_estimate(),
        bytes_read: progress.bytes,
        seconds: progress.elapsed().as_secs_f64(),
        mb_per_s: progress.rate_mb_s(),
    })
}

/// Replays archived records after the store's applied LSN up to the target.
async fn replay(
    cfg: &RestoreConfig,
    archive: &Dest,
    store: &Store,
    progress: &mut Progress,
) -> anyhow::Result<u64> {
    let mut segments: Vec<(u64, String)> = archive
        .list_files()
        .await?
        .into_iter()
        .filter_map(|n| wald::segment::parse_file_name(&n).map(|f| (f, n)))
        .collect();
    segments.sort();
    let target = cfg.to_lsn.unwrap_or(u64::MAX);
    let start = store.applied_lsn() + 1;
    // The segment holding `start`: the last one starting at or below it.
    let from = segments.iter().rposition(|(f, _)| *f <= start).unwrap_or(0);
    let mut batch = Batch {
        store,
        records: Vec::new(),
        dense: true,
    };
    let mut replayed = 0;
    let mut next = start;
    'segments: for (first, name) in &segments[from..] {
        if next > target {
            break;
        }
        if *first > next {
            bail!(
                "{}: the WAL archive has a gap: LSN {next} is needed, the next archived segment starts at {first}",
                archive.describe(name)
            );
        }
        let bytes = archive.get(name).await?;
        progress.bytes += bytes.len() as u64;
        let described = archive.describe(name);
        let (records, _) = segment_records(&described, &bytes, *first)?;
        for (lsn, data) in records {
            if lsn < next {
                continue;
            }
            if lsn > target {
                break 'segments;
            }
            let rec = stemed::store::codec::decode_tx(data)
                .map_err(|e| anyhow::anyhow!("{described}: record {lsn}: {e}"))?;
            if cfg
                .to_time_micros
                .is_some_and(|t| rec.recorded_at_micros > t)
            {
                break 'segments;
            }
            batch.push(lsn, rec)?;
            next = lsn + 1;
            replayed += 1;
        }
        // The last archived segment's start is a lower bound of the total.
        let total = target.min(segments.last().map_or(next, |s| s.0)).max(next);
        progress.tick(next, total);
    }
    batch.flush()?;
    if let Some(to) = cfg.to_lsn {
        if store.applied_lsn() < to {
            bail!(
                "the WAL archive {} ends at LSN {}, before --to-lsn {to}",
                archive.describe(""),
                store.applied_lsn()
            );
        }
    }
    Ok(replayed)
}

/// The restored store must hold exactly the backup's content up to its basis.
fn verify_restored(store: &Store, m: &super::manifest::Manifest) -> anyhow::Result<()> {
    let mut hash = ContentHash::default();
    let mut from = 1;
    loop {
        let page = store.export_transactions(from, m.basis_lsn, RESTORE_BATCH_RECORDS_MAX)?;
        for (tx, data) in &page {
            hash.add(*tx, data);
        }
        match page.last() {
            Some((tx, _)) if page.len() == RESTORE_BATCH_RECORDS_MAX => from = tx + 1,
            _ => break,
        }
    }
    if hash.finish() != m.content_sha256 {
        bail!(
            "the restored store differs from backup {} up to its basis LSN {}",
            m.id,
            m.basis_lsn
        );
    }
    Ok(())
}

fn count_transactions(store: &Store, through: u64) -> anyhow::Result<u64> {
    let mut n = 0;
    let mut from = 1;
    loop {
        let page = store.export_transactions(from, through, RESTORE_BATCH_RECORDS_MAX)?;
        n += page.len() as u64;
        match page.last() {
            Some((tx, _)) if page.len() == RESTORE_BATCH_RECORDS_MAX => from = tx + 1,
            _ => return Ok(n),
        }
    }
}

/// An empty segment starting at `first_lsn`: walld recovers it as a log
/// whose next LSN is `first_lsn`. Written tmp → fsync → rename → fsync(dir).
fn write_wal_start(wal_dir: &Path, first_lsn: u64) -> anyhow::Result<()> {
    use std::io::Write;
    let mut image = wald::segment::encode_header(first_lsn);
    image.resize(wald::segment::HEADER_BYTES as usize, 0);
    let name = wald::segment::file_name(first_lsn);
    let tmp = wal_dir.join(format!("{name}{}", wald::segment::TMP_SUFFIX));
    {
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
        f.write_all(&image)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, wal_dir.join(&name))?;
    std::fs::File::open(wal_dir)?.sync_all()?;
    Ok(())
}
