//! Logical export of committed transactions, the basis of backups.
//!
//! The store's transaction log is append-only and every entry is immutable,
//! so reading it up to a basis LSN while writes continue gives a consistent
//! snapshot as of that LSN, without pausing writes. Restoring re-applies the
//! records with [`Store::import`], which rebuilds every index and the
//! idempotency keys (they are part of the records).

use crate::store::{Store, StoreError};

/// Transactions read from the store per round of an export stream.
pub const EXPORT_PAGE_TX_MAX: usize = 1024;

/// Magic at the start of an export stream.
pub const EXPORT_MAGIC: &[u8; 8] = b"STMDBEX1";

// Format: stream = { magic "STMDBEX1" | basis_lsn u64 BE } then frames
// frame = { tx u64 BE | len u32 BE | crc32c(tx BE ++ data) u32 BE | data }
// where data is a `codec::encode_tx` record. The stream ends with a frame
// whose tx is 0 and len is 0 (crc of the 8 zero bytes), so truncation is
// detectable.
pub fn encode_header(basis_lsn: u64) -> Vec<u8> {
    let mut out = EXPORT_MAGIC.to_vec();
    out.extend_from_slice(&basis_lsn.to_be_bytes());
    out
}

pub fn encode_frame(tx: u64, data: &[u8], out: &mut Vec<u8>) {
    let mut crc = crc32c::crc32c(&tx.to_be_bytes());
    crc = crc32c::crc32c_append(crc, data);
    out.extend_from_slice(&tx.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(&crc.to_be_bytes());
    out.extend_from_slice(data);
}

pub fn encode_end(out: &mut Vec<u8>) {
    encode_frame(0, &[], out);
}

/// One decoded item of an export stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    Tx { tx: u64, data: Vec<u8> },
    End,
}

/// Decodes the header; returns the basis LSN and the bytes consumed.
pub fn decode_header(buf: &[u8]) -> Result<(u64, usize), String> {
    if buf.len() < 16 {
        return Err("export stream shorter than its 16-byte header".into());
    }
    if &buf[..8] != EXPORT_MAGIC {
        return Err("not a StemeDB export stream (bad magic)".into());
    }
    let lsn = u64::from_be_bytes(buf[8..16].try_into().expect("8 bytes"));
    Ok((lsn, 16))
}

/// Decodes one frame from the front of `buf`; `Ok(None)` when more bytes
/// are needed. Returns the frame and the bytes consumed.
pub fn decode_frame(buf: &[u8]) -> Result<Option<(Frame, usize)>, String> {
    if buf.len() < 16 {
        return Ok(None);
    }
    let tx = u64::from_be_bytes(buf[0..8].try_into().expect("8 bytes"));
    let len = u32::from_be_bytes(buf[8..12].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_be_bytes(buf[12..16].try_into().expect("4 bytes"));
    if buf.len() < 16 + len {
        return Ok(None);
    }
    let data = &buf[16..16 + len];
    let mut want = crc32c::crc32c(&tx.to_be_bytes());
    want = crc32c::crc32c_append(want, data);
    if want != crc {
        return Err(format!("export frame for tx {tx} fails its checksum"));
    }
    let frame = if tx == 0 && len == 0 {
        Frame::End
    } else {
        Frame::Tx {
            tx,
            data: data.to_vec(),
        }
    };
    Ok(Some((frame, 16 + len)))
}

/// One page of an export, encoded as frames: `(bytes, next_from_tx)`, with
/// `next_from_tx` None once `basis_lsn` is reached (the end frame is then
/// included).
pub fn export_page(
    store: &Store,
    from_tx: u64,
    basis_lsn: u64,
) -> Result<(Vec<u8>, Option<u64>), StoreError> {
    let page = store.export_transactions(from_tx, basis_lsn, EXPORT_PAGE_TX_MAX)?;
    let mut out = Vec::new();
    for (tx, data) in &page {
        encode_frame(*tx, data, &mut out);
    }
    if page.len() < EXPORT_PAGE_TX_MAX {
        encode_end(&mut out);
        return Ok((out, None));
    }
    let next = page.last().map(|(tx, _)| tx + 1).unwrap_or(basis_lsn + 1);
    if next > basis_lsn {
        encode_end(&mut out);
        return Ok((out, None));
    }
    Ok((out, Some(next)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_detect_damage() {
        let mut buf = encode_header(42);
        encode_frame(7, b"hello", &mut buf);
        encode_end(&mut buf);
        let (lsn, mut at) = decode_header(&buf).unwrap();
        assert_eq!(lsn, 42);
        let (f, n) = decode_frame(&buf[at..]).unwrap().unwrap();
        assert_eq!(
            f,
            Frame::Tx {
                tx: 7,
                data: b"hello".to_vec()
            }
        );
        at += n;
        assert_eq!(decode_frame(&buf[at..]).unwrap().unwrap().0, Frame::End);
        assert_eq!(decode_frame(&buf[16..20]).unwrap(), None);
        let mut bad = buf.clone();
        bad[30] ^= 1;
        assert!(decode_frame(&bad[16..]).unwrap_err().contains("checksum"));
    }
}
