//! The backup format.
//!
//! A backup is a directory (or prefix) `<ID>/` holding data files
//! `data-000001.stx`, ... and `manifest.json`, written last: a backup
//! without a manifest is incomplete and ignored by `backup list`.
//!
//! Format of a data file: one export stream of `stemed::export` (header
//! with the basis LSN, frames of `codec::encode_tx` records, end frame), so
//! every file is checked on its own (frame CRCs) and as a whole (sha256 and
//! crc32c in the manifest).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const MANIFEST_NAME: &str = "manifest.json";
pub const FORMAT_VERSION: u32 = 1;

/// One data file of a backup.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DataFile {
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
    pub crc32c: u32,
    pub transactions: u64,
    pub assertions: u64,
    /// First and last tx in the file (0 when it holds none).
    pub first_tx: u64,
    pub last_tx: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format_version: u32,
    pub id: String,
    /// The store as of this LSN: every transaction with tx <= basis_lsn.
    pub basis_lsn: u64,
    pub created_at: String,
    pub created_at_unix_micros: i64,
    pub source_admin_addr: String,
    pub transactions: u64,
    pub assertions: u64,
    /// sha256 over every (tx BE u64 | len BE u32 | record) in tx order:
    /// the content of the store as of basis_lsn, independent of how the
    /// backup is split into files.
    pub content_sha256: String,
    pub files: Vec<DataFile>,
}

impl Manifest {
    pub fn validate(&self) -> Result<(), String> {
        if self.format_version != FORMAT_VERSION {
            return Err(format!(
                "format_version {} is not supported (this stemectl reads {FORMAT_VERSION})",
                self.format_version
            ));
        }
        let tx: u64 = self.files.iter().map(|f| f.transactions).sum();
        let a: u64 = self.files.iter().map(|f| f.assertions).sum();
        if tx != self.transactions || a != self.assertions {
            return Err(format!(
                "file counts ({tx} transactions, {a} assertions) do not add up to the totals ({}, {})",
                self.transactions, self.assertions
            ));
        }
        Ok(())
    }
}

/// The running content hash of [`Manifest::content_sha256`].
#[derive(Default)]
pub struct ContentHash(Sha256);

impl ContentHash {
    pub fn add(&mut self, tx: u64, record: &[u8]) {
        self.0.update(tx.to_be_bytes());
        self.0.update((record.len() as u32).to_be_bytes());
        self.0.update(record);
    }

    pub fn finish(self) -> String {
        self.0
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// Counts of one decoded data file.
#[derive(Debug, Default)]
pub struct FileScan {
    pub basis_lsn: u64,
    pub transactions: u64,
    pub assertions: u64,
    pub first_tx: u64,
    pub last_tx: u64,
}

/// Decodes a whole data file, calling `each` for every transaction; checks
/// frame CRCs, tx order, the end frame and that every record decodes.
pub fn scan_file(
    name: &str,
    bytes: &[u8],
    mut each: impl FnMut(u64, &[u8], &stemed::store::TxRecord) -> anyhow::Result<()>,
) -> anyhow::Result<FileScan> {
    use stemed::export::{decode_frame, decode_header, Frame};
    let (basis_lsn, mut at) = decode_header(bytes).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
    let mut scan = FileScan {
        basis_lsn,
        ..FileScan::default()
    };
    loop {
        let frame = decode_frame(&bytes[at..]).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        let Some((frame, n)) = frame else {
            anyhow::bail!("{name}: truncated: ends without its end frame at byte {at}");
        };
        at += n;
        match frame {
            Frame::End => break,
            Frame::Tx { tx, data } => {
                if tx <= scan.last_tx || tx > basis_lsn {
                    anyhow::bail!(
                        "{name}: tx {tx} out of order (previous {}, basis {basis_lsn})",
                        scan.last_tx
                    );
                }
                let rec = stemed::store::codec::decode_tx(&data)
                    .map_err(|e| anyhow::anyhow!("{name}: tx {tx}: {e}"))?;
                if scan.first_tx == 0 {
                    scan.first_tx = tx;
                }
                scan.last_tx = tx;
                scan.transactions += 1;
                scan.assertions += rec.assertions.len() as u64;
                each(tx, &data, &rec)?;
            }
        }
    }
    if at != bytes.len() {
        anyhow::bail!("{name}: {} bytes after the end frame", bytes.len() - at);
    }
    Ok(scan)
}

/// Checks a data file against its manifest entry (size, sha256, crc32c,
/// counts); returns its scan.
pub fn check_file(
    entry: &DataFile,
    basis_lsn: u64,
    bytes: &[u8],
    each: impl FnMut(u64, &[u8], &stemed::store::TxRecord) -> anyhow::Result<()>,
) -> anyhow::Result<FileScan> {
    let name = &entry.name;
    if bytes.len() as u64 != entry.bytes {
        anyhow::bail!(
            "{name}: {} bytes, the manifest says {}",
            bytes.len(),
            entry.bytes
        );
    }
    let sha = crate::backup::dest::sha256_hex(bytes);
    if sha != entry.sha256 {
        anyhow::bail!(
            "{name}: sha256 {sha} does not match the manifest's {}",
            entry.sha256
        );
    }
    let crc = crc32c::crc32c(bytes);
    if crc != entry.crc32c {
        anyhow::bail!(
            "{name}: crc32c {crc:08x} does not match the manifest's {:08x}",
            entry.crc32c
        );
    }
    let scan = scan_file(name, bytes, each)?;
    if scan.basis_lsn != basis_lsn {
        anyhow::bail!(
            "{name}: basis LSN {} differs from the manifest's {basis_lsn}",
            scan.basis_lsn
        );
    }
    if (
        scan.transactions,
        scan.assertions,
        scan.first_tx,
        scan.last_tx,
    ) != (
        entry.transactions,
        entry.assertions,
        entry.first_tx,
        entry.last_tx,
    ) {
        anyhow::bail!(
            "{name}: holds {} transactions / {} assertions (tx {}..={}), the manifest says {} / {} (tx {}..={})",
            scan.transactions, scan.assertions, scan.first_tx, scan.last_tx,
            entry.transactions, entry.assertions, entry.first_tx, entry.last_tx
        );
    }
    Ok(scan)
}
