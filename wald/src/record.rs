//! The record frame: how one record is laid out inside a segment.
//!
//! The CRC covers the length, the LSN and the data, so a frame whose length
//! field was torn is detected as well as one whose payload was torn.

/// Bytes of the frame header before the data.
pub const FRAME_HEADER_BYTES: usize = 16;
/// Upper bound on the data of one record. Bounds every decode.
pub const RECORD_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Bytes a record of `data_len` bytes takes on disk.
pub fn frame_bytes(data_len: usize) -> usize {
    FRAME_HEADER_BYTES + data_len
}

fn frame_crc(len: u32, lsn: u64, data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&len.to_le_bytes());
    let crc = crc32c::crc32c_append(crc, &lsn.to_le_bytes());
    crc32c::crc32c_append(crc, data)
}

// Format: { len u32 LE | crc32c u32 LE over (len | lsn | data) | lsn u64 LE | data [len] }
/// Appends the frame of one record to `out`.
pub fn encode(lsn: u64, data: &[u8], out: &mut Vec<u8>) {
    assert!(lsn > 0, "LSN 0 is reserved for 'no record'");
    assert!(data.len() <= RECORD_BYTES_MAX);
    let len = data.len() as u32;
    let start = out.len();
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&frame_crc(len, lsn, data).to_le_bytes());
    out.extend_from_slice(&lsn.to_le_bytes());
    out.extend_from_slice(data);
    debug_assert_eq!(out.len() - start, frame_bytes(data.len()));
}

/// The result of decoding at one position of a segment.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A complete frame with a valid CRC.
    Record {
        lsn: u64,
        data: &'a [u8],
        frame_bytes: usize,
    },
    /// The rest of the buffer is zero bytes: the clean end of the data.
    End,
    /// Not a valid frame: torn, overwritten or damaged.
    Invalid(&'static str),
}

/// Decodes the frame at the start of `buf`. Never panics on any input.
pub fn decode(buf: &[u8]) -> Decoded<'_> {
    if buf.len() < FRAME_HEADER_BYTES {
        if buf.iter().all(|b| *b == 0) {
            return Decoded::End;
        }
        return Decoded::Invalid("incomplete frame header");
    }
    let len = u32::from_le_bytes(buf[0..4].try_into().unwrap_or_default());
    let crc = u32::from_le_bytes(buf[4..8].try_into().unwrap_or_default());
    let lsn = u64::from_le_bytes(buf[8..16].try_into().unwrap_or_default());
    if len == 0 && crc == 0 && lsn == 0 {
        if buf.iter().all(|b| *b == 0) {
            return Decoded::End;
        }
        return Decoded::Invalid("zero frame header followed by non-zero bytes");
    }
    if lsn == 0 {
        return Decoded::Invalid("frame LSN is 0");
    }
    let len_usize = len as usize;
    if len_usize > RECORD_BYTES_MAX {
        return Decoded::Invalid("frame length above RECORD_BYTES_MAX");
    }
    let Some(data) = buf.get(FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + len_usize) else {
        return Decoded::Invalid("incomplete frame data");
    };
    if frame_crc(len, lsn, data) != crc {
        return Decoded::Invalid("frame CRC mismatch");
    }
    Decoded::Record {
        lsn,
        data,
        frame_bytes: frame_bytes(len_usize),
    }
}

/// Peeks at the length and LSN of the frame header at the start of `buf`.
pub fn peek_header(buf: &[u8]) -> Option<(usize, u64)> {
    let header = buf.get(..FRAME_HEADER_BYTES)?;
    let len = u32::from_le_bytes(header[0..4].try_into().ok()?) as usize;
    let lsn = u64::from_le_bytes(header[8..16].try_into().ok()?);
    Some((len, lsn))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip(lsn in 1u64.., data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let mut buf = Vec::new();
            encode(lsn, &data, &mut buf);
            prop_assert_eq!(buf.len(), frame_bytes(data.len()));
            buf.extend_from_slice(&[0u8; 7]);
            match decode(&buf) {
                Decoded::Record { lsn: l, data: d, frame_bytes: n } => {
                    prop_assert_eq!(l, lsn);
                    prop_assert_eq!(d, &data[..]);
                    prop_assert_eq!(n, frame_bytes(data.len()));
                }
                other => prop_assert!(false, "decoded {:?}", other),
            }
        }

        #[test]
        fn any_bit_flip_is_detected(lsn in 1u64.., data in proptest::collection::vec(any::<u8>(), 1..256), bit in 0usize..8) {
            let mut buf = Vec::new();
            encode(lsn, &data, &mut buf);
            let byte = (lsn as usize) % buf.len();
            buf[byte] ^= 1 << bit;
            let is_record = matches!(decode(&buf), Decoded::Record { .. });
            prop_assert!(!is_record);
        }

        #[test]
        fn decode_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode(&buf);
        }
    }

    #[test]
    fn zeroes_are_the_end() {
        assert_eq!(decode(&[0u8; 100]), Decoded::End);
        assert_eq!(decode(&[]), Decoded::End);
        assert_eq!(decode(&[0u8; 5]), Decoded::End);
    }
}
