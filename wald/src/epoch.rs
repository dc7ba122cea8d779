//! The writer-epoch file: a tiny metadata file in the WAL directory that
//! makes the fencing epoch survive restarts.
//!
//! # Update protocol (crash-safe)
//! 1. write the new contents to `walld.epoch.tmp`, fsync it;
//! 2. rename it over `walld.epoch`;
//! 3. fsync the directory.
//!
//! A crash at any step leaves either the old or the new file, never a mix.

use std::path::{Path, PathBuf};

use crate::error::{Result, WalError};
use crate::fs;

const FILE_NAME: &str = "walld.epoch";
const TMP_NAME: &str = "walld.epoch.tmp";
/// "STMEPOCH" as a little-endian u64.
const MAGIC: u64 = u64::from_le_bytes(*b"STMEPOCH");
const VERSION: u32 = 1;
const ENCODED_BYTES: usize = 24;

// Format: { magic u64 LE "STMEPOCH" | version u32 LE | epoch u64 LE |
//           crc32c u32 LE over the preceding 20 bytes }
fn encode(epoch: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(ENCODED_BYTES);
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&epoch.to_le_bytes());
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    assert_eq!(out.len(), ENCODED_BYTES);
    out
}

fn decode(buf: &[u8]) -> Result<u64, &'static str> {
    if buf.len() != ENCODED_BYTES {
        return Err("wrong size");
    }
    let crc = u32::from_le_bytes(buf[20..24].try_into().map_err(|_| "bad")?);
    if crc32c::crc32c(&buf[..20]) != crc {
        return Err("CRC mismatch");
    }
    if u64::from_le_bytes(buf[0..8].try_into().map_err(|_| "bad")?) != MAGIC {
        return Err("magic mismatch");
    }
    if u32::from_le_bytes(buf[8..12].try_into().map_err(|_| "bad")?) != VERSION {
        return Err("unsupported version");
    }
    Ok(u64::from_le_bytes(
        buf[12..20].try_into().map_err(|_| "bad")?,
    ))
}

pub fn path(dir: &Path) -> PathBuf {
    dir.join(FILE_NAME)
}

/// Loads the epoch; 0 if no writer was ever opened. Corruption is an error.
pub fn load(dir: &Path) -> Result<u64> {
    let path = path(dir);
    match std::fs::read(&path) {
        Ok(buf) => decode(&buf).map_err(|reason| WalError::Corrupt {
            file: path.clone(),
            offset: 0,
            reason: format!("epoch file: {reason}"),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(WalError::io(format!("read {}", path.display()), e)),
    }
}

/// Durably replaces the epoch file (see the module docs for the steps).
pub fn store(dir: &Path, epoch: u64) -> Result<()> {
    let tmp = dir.join(TMP_NAME);
    let file = fs::create(&tmp).map_err(|e| WalError::io("create epoch file", e))?;
    fs::write_all_at(&file, &encode(epoch), 0)
        .map_err(|(_, e)| WalError::io("write epoch file", e))?;
    fs::fsync(&file).map_err(|e| WalError::FsyncFailed(format!("epoch file: {e}")))?;
    fs::rename(&tmp, &path(dir)).map_err(|e| WalError::io("rename epoch file", e))?;
    fs::fsync_dir(dir).map_err(|e| WalError::FsyncFailed(format!("WAL directory: {e}")))?;
    assert_eq!(load(dir)?, epoch);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption_rejected() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), 0);
        store(dir.path(), 7).unwrap();
        assert_eq!(load(dir.path()).unwrap(), 7);
        let mut bytes = std::fs::read(path(dir.path())).unwrap();
        for i in 0..bytes.len() {
            bytes[i] ^= 0x01;
            std::fs::write(path(dir.path()), &bytes).unwrap();
            assert!(
                matches!(load(dir.path()), Err(WalError::Corrupt { .. })),
                "flip at {i}"
            );
            bytes[i] ^= 0x01;
        }
        std::fs::write(path(dir.path()), &bytes[..10]).unwrap();
        assert!(load(dir.path()).is_err());
    }
}
