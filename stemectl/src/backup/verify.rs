//! `backup list` and `backup verify`: re-read everything, check every
//! checksum and count.

use bytes::Bytes;

use super::dest::{split_backup, Dest};
use super::manifest::{check_file, ContentHash, Manifest, MANIFEST_NAME};

pub async fn read_manifest(backup: &Dest) -> anyhow::Result<Manifest> {
    let bytes: Bytes = backup.get(MANIFEST_NAME).await?;
    let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| {
        anyhow::anyhow!(
            "{}: not a backup manifest: {e}",
            backup.describe(MANIFEST_NAME)
        )
    })?;
    m.validate()
        .map_err(|e| anyhow::anyhow!("{}: {e}", backup.describe(MANIFEST_NAME)))?;
    Ok(m)
}

/// Every complete backup (one with a manifest) under `dest`, oldest first.
pub async fn list(dest: &Dest) -> anyhow::Result<Vec<Manifest>> {
    let mut out = Vec::new();
    for id in dest.list_dirs().await? {
        let child = dest.child(&id);
        if child.exists(MANIFEST_NAME).await? {
            out.push(read_manifest(&child).await?);
        }
    }
    out.sort_by_key(|m| (m.basis_lsn, m.created_at_unix_micros));
    Ok(out)
}

/// Re-reads every file of the backup at `spec` (LOCATION/ID); an error names
/// the file that failed.
pub async fn verify(spec: &str) -> anyhow::Result<Manifest> {
    let (dest, id) = split_backup(spec)?;
    let backup = dest.child(&id);
    let m = read_manifest(&backup).await?;
    let mut hash = ContentHash::default();
    let mut progress = super::progress::Progress::new("verify");
    for (i, entry) in m.files.iter().enumerate() {
        let bytes = backup.get(&entry.name).await?;
        progress.bytes += bytes.len() as u64;
        check_file(entry, m.basis_lsn, &bytes, |tx, data, _| {
            hash.add(tx, data);
            Ok(())
        })
        .map_err(|e| anyhow::anyhow!("{}/{e:#}", backup.describe("").trim_end_matches('/')))?;
        progress.tick(i as u64 + 1, m.files.len() as u64);
    }
    let content = hash.finish();
    if content != m.content_sha256 {
        anyhow::bail!(
            "{}: content sha256 {content} does not match the manifest's {}",
            backup.describe(MANIFEST_NAME),
            m.content_sha256
        );
    }
    Ok(m)
}

/// Checks every archived segment (header, record CRCs, dense LSNs, no gap
/// between segments) and that the archive covers `basis_lsn + 1` on, so a
/// restore of that backup can replay it. Returns (segments, last LSN).
pub async fn verify_archive(archive: &Dest, basis_lsn: u64) -> anyhow::Result<(u64, u64)> {
    let mut segments: Vec<(u64, String)> = archive
        .list_files()
        .await?
        .into_iter()
        .filter_map(|n| wald::segment::parse_file_name(&n).map(|f| (f, n)))
        .collect();
    segments.sort();
    let mut next: Option<u64> = None;
    for (first, name) in &segments {
        let described = archive.describe(name);
        if let Some(n) = next {
            if *first != n {
                anyhow::bail!(
                    "{described}: gap in the WAL archive: expected a segment starting at {n}"
                );
            }
        }
        let bytes = archive.get(name).await?;
        let (records, _) = super::archive::segment_records(&described, &bytes, *first)?;
        next = Some(records.last().map_or(*first, |r| r.0 + 1));
    }
    let Some(next) = next else {
        anyhow::bail!("{}: the WAL archive holds no segment", archive.describe(""));
    };
    let start = segments[0].0;
    if start > basis_lsn + 1 {
        anyhow::bail!(
            "{}: the WAL archive starts at LSN {start}, after the backup's basis {basis_lsn} + 1: records in between are not archived",
            archive.describe(&segments[0].1)
        );
    }
    Ok((segments.len() as u64, next - 1))
}
