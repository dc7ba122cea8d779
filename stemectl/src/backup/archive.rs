//! `wal archive`: copies sealed WAL segments to a directory or S3 and
//! records progress in `<wal_dir>/archive.state` (`wald::archive_state`),
//! which walld reads to hold truncation back (`--archive-required`).
//!
//! # The archive contract
//! 1. Only sealed segments (all but the highest) are archived, in LSN
//!    order, after checking that their records are dense and complete.
//! 2. The object is the segment up to its last record (the preallocated
//!    zero tail is cut), named like the segment file.
//! 3. A segment counts as archived only after the upload is read back
//!    (size and sha256) — then `archived_through_lsn` moves past it.
//! 4. An existing object is never overwritten with different bytes
//!    ([`Dest::put_new`]); that is an error, counted like any failure.
//! 5. Failures retry with exponential backoff forever and are counted in
//!    `failures_total` (persisted, so walld reports it in Status).
//!
//! A crash anywhere leaves either the old state (the segment is uploaded
//! again, found identical and counted once) or the new one: a segment is
//! never lost or duplicated, because its object name is its first LSN.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use wald::archive_state::{self, ArchiveState};
use wald::record::{self, Decoded};
use wald::segment;

use super::dest::{Conflict, Dest, PutOutcome};

/// First and longest wait between retries of one segment.
const RETRY_BACKOFF_MIN: Duration = Duration::from_millis(100);
const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(30);

pub struct ArchiveConfig {
    pub wal_dir: PathBuf,
    pub to: String,
    /// Archive what is sealed now, then exit; else poll every `interval`.
    pub once: bool,
    pub interval: Duration,
}

/// The records `(lsn, data)` of a segment image and the offset after the last.
pub type SegmentRecords<'a> = (Vec<(u64, &'a [u8])>, usize);

/// Records `(lsn, data)` of one segment image and the offset after the
/// last one. Errors name the file: a bad header, a damaged frame (anything
/// but the zero tail), or an LSN out of sequence.
pub fn segment_records<'a>(
    name: &str,
    bytes: &'a [u8],
    first_lsn: u64,
) -> anyhow::Result<SegmentRecords<'a>> {
    match segment::decode_header(bytes) {
        Ok(lsn) if lsn == first_lsn => {}
        Ok(lsn) => bail!("{name}: header says first LSN {lsn}, the name says {first_lsn}"),
        Err(e) => bail!("{name}: {e}"),
    }
    let mut out = Vec::new();
    let mut offset = segment::HEADER_BYTES as usize;
    let mut expected = first_lsn;
    while let Some(rest) = bytes.get(offset..) {
        match record::decode(rest) {
            Decoded::Record {
                lsn,
                data,
                frame_bytes,
            } => {
                if lsn != expected {
                    bail!("{name}: record LSN {lsn} at offset {offset}, expected {expected}");
                }
                out.push((lsn, data));
                offset += frame_bytes;
                expected += 1;
            }
            Decoded::End => break,
            Decoded::Invalid(why) => bail!("{name}: damaged record at offset {offset}: {why}"),
        }
    }
    Ok((out, offset.min(bytes.len())))
}

/// Segment files of `dir` in LSN order.
pub fn list_segments(dir: &Path) -> anyhow::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("list {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(first) = segment::parse_file_name(&name) {
            out.push((first, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as i64
}

fn save(wal_dir: &Path, state: &mut ArchiveState) -> anyhow::Result<()> {
    state.updated_at_micros = now_micros();
    archive_state::write(wal_dir, state)
        .with_context(|| format!("write {}", archive_state::path(wal_dir).display()))
}

/// Reads, checks and trims one sealed segment holding `first..=last`.
fn sealed_image(path: &Path, first: u64, last: u64) -> anyhow::Result<Option<Bytes>> {
    let name = segment::file_name(first);
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    };
    let (records, end) = segment_records(&name, &bytes, first)?;
    let got_last = records.last().map_or(first - 1, |r| r.0);
    if got_last != last {
        bail!(
            "{name}: sealed segment ends at LSN {got_last}, the next segment starts at {}",
            last + 1
        );
    }
    Ok(Some(Bytes::copy_from_slice(&bytes[..end])))
}

/// Archives one segment, retrying forever (except a conflict with `once`).
async fn archive_one(
    cfg: &ArchiveConfig,
    dest: &Dest,
    state: &mut ArchiveState,
    (first, path): (u64, &Path),
    last: u64,
) -> anyhow::Result<()> {
    let name = segment::file_name(first);
    let mut backoff = RETRY_BACKOFF_MIN;
    loop {
        let attempt = async {
            let Some(image) = sealed_image(path, first, last)? else {
                return Ok(None);
            };
            dest.put_new(&name, image).await.map(Some)
        }
        .await;
        match attempt {
            Ok(outcome) => {
                match outcome {
                    None => eprintln!(
                        "wal archive: warning: {name} was removed before it was archived (is walld running without --archive-required?); the archive has a gap below LSN {}",
                        last + 1
                    ),
                    Some(PutOutcome::AlreadyPresent) => {
                        eprintln!("wal archive: {name} already archived with identical bytes")
                    }
                    Some(PutOutcome::Written) => eprintln!("wal archive: archived {name} (LSN {first}..={last})"),
                }
                assert!(last > state.archived_through_lsn);
                state.archived_through_lsn = last;
                state.segments_archived_total += 1;
                save(&cfg.wal_dir, state)?;
                return Ok(());
            }
            Err(e) => {
                state.failures_total += 1;
                save(&cfg.wal_dir, state)?;
                let conflict = e.downcast_ref::<Conflict>().is_some();
                eprintln!(
                    "wal archive: {name}: {e:#} (failure {}, retrying in {backoff:?})",
                    state.failures_total
                );
                if conflict && cfg.once {
                    return Err(e);
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RETRY_BACKOFF_MAX);
            }
        }
    }
}

pub async fn run(cfg: &ArchiveConfig) -> anyhow::Result<ArchiveState> {
    let dest = Dest::parse(&cfg.to)?;
    let mut state = archive_state::read(&cfg.wal_dir)
        .map_err(|e| anyhow::anyhow!("{e} (delete it to start archiving from the oldest segment)"))?
        .unwrap_or_default();
    loop {
        let segments = list_segments(&cfg.wal_dir)?;
        for pair in segments.windows(2) {
            let (first, path) = (&pair[0].0, &pair[0].1);
            let last = pair[1].0 - 1;
            if last <= state.archived_through_lsn {
                continue;
            }
            archive_one(cfg, &dest, &mut state, (*first, path), last).await?;
        }
        if cfg.once {
            return Ok(state);
        }
        tokio::time::sleep(cfg.interval).await;
    }
}

/// Archive figures computed offline from the WAL directory.
pub fn status(wal_dir: &Path) -> anyhow::Result<serde_json::Value> {
    let state = archive_state::read(wal_dir).map_err(anyhow::Error::msg)?;
    let segments = list_segments(wal_dir)?;
    let firsts: Vec<u64> = segments.iter().map(|s| s.0).collect();
    let s = state.unwrap_or_default();
    Ok(serde_json::json!({
        "state_file": archive_state::path(wal_dir).display().to_string(),
        "state_present": state.is_some(),
        "archived_lsn": s.archived_through_lsn,
        "archive_lag_segments": archive_state::lag_segments(&firsts, s.archived_through_lsn),
        "archive_failures_total": s.failures_total,
        "segments_archived_total": s.segments_archived_total,
        "updated_at_unix_micros": s.updated_at_micros,
        "wal_segments": firsts.len(),
    }))
}
