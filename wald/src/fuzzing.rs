//! Property checks over arbitrary bytes for the on-disk formats: the record
//! frame, the segment header and file name, and recovery over whole segment
//! files. Each check panics when a property fails and is the body of one
//! cargo-fuzz target in `fuzz/`; `tests/fuzz_corpus.rs` replays the committed
//! corpus through the same functions on stable Rust.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::WalError;
use crate::record::{self, Decoded, FRAME_HEADER_BYTES};
use crate::recovery::{self, Recovered, RecoveryMode};
use crate::segment::{self, HEADER_BYTES};

/// Reads structure out of fuzz input; past the end every read is zero, so
/// any byte string is a valid input.
struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }

    fn u8(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }

    fn u16(&mut self) -> u16 {
        let mut a = [0u8; 2];
        let b = self.bytes(2);
        a[..b.len()].copy_from_slice(b);
        u16::from_le_bytes(a)
    }

    fn u64(&mut self) -> u64 {
        let mut a = [0u8; 8];
        let b = self.bytes(8);
        a[..b.len()].copy_from_slice(b);
        u64::from_le_bytes(a)
    }

    fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.data.len())
    }
}

/// `record::decode` and `peek_header` over arbitrary bytes, and the frame
/// round trip: whatever `encode` writes decodes to the same (lsn, data),
/// and a flipped bit outside the length field is never a valid record.
pub fn wal_record(data: &[u8]) {
    check_decode(data);

    let mut input = Input::new(data);
    let lsn = input.u64().max(1);
    let flip = input.u16();
    let trailing_zeroes = usize::from(input.u8() % 32);
    let payload = input.rest();
    let mut frame = Vec::new();
    record::encode(lsn, payload, &mut frame);
    assert_eq!(frame.len(), record::frame_bytes(payload.len()));
    frame.extend(std::iter::repeat_n(0u8, trailing_zeroes));
    match record::decode(&frame) {
        Decoded::Record {
            lsn: l,
            data: d,
            frame_bytes,
        } => {
            assert_eq!(l, lsn);
            assert_eq!(d, payload);
            assert_eq!(frame_bytes, record::frame_bytes(payload.len()));
        }
        other => panic!("an encoded frame decoded as {other:?}"),
    }
    assert_eq!(
        record::peek_header(&frame),
        Some((payload.len(), lsn)),
        "peek_header disagrees with encode"
    );

    // CRC32C detects every single-bit error in the fixed-length part of the
    // frame. (A flip in the length field reframes the data and is only
    // checked for not panicking, above.)
    let frame_len = record::frame_bytes(payload.len());
    let bit = usize::from(flip) % ((frame_len - 4) * 8);
    let mut damaged = frame.clone();
    damaged[4 + bit / 8] ^= 1 << (bit % 8);
    check_decode(&damaged);
    assert!(
        !matches!(record::decode(&damaged), Decoded::Record { .. }),
        "flipping bit {bit} after the length field was not detected"
    );
}

/// Properties of one `record::decode` call on any input.
fn check_decode(buf: &[u8]) {
    let peeked = record::peek_header(buf);
    assert_eq!(peeked.is_some(), buf.len() >= FRAME_HEADER_BYTES);
    match record::decode(buf) {
        Decoded::Record {
            lsn,
            data,
            frame_bytes,
        } => {
            assert!(lsn > 0, "decoded LSN 0");
            assert!(data.len() <= record::RECORD_BYTES_MAX);
            assert_eq!(frame_bytes, record::frame_bytes(data.len()));
            assert!(frame_bytes <= buf.len());
            assert_eq!(peeked, Some((data.len(), lsn)));
            let mut again = Vec::new();
            record::encode(lsn, data, &mut again);
            assert_eq!(
                again,
                buf[..frame_bytes],
                "decode accepted a non-canonical frame"
            );
        }
        Decoded::End => assert!(buf.iter().all(|b| *b == 0), "End before non-zero bytes"),
        Decoded::Invalid(reason) => assert!(!reason.is_empty()),
    }
}

/// `segment::decode_header` and `parse_file_name` over arbitrary bytes,
/// and the round trips of `encode_header` and `file_name`.
pub fn wal_segment_header(data: &[u8]) {
    if let Ok(first_lsn) = segment::decode_header(data) {
        assert!(first_lsn > 0);
        let canonical = segment::encode_header(first_lsn);
        assert_eq!(
            canonical,
            data[..canonical.len()],
            "decode_header accepted a non-canonical header"
        );
    }
    let name = String::from_utf8_lossy(data);
    if let Some(lsn) = segment::parse_file_name(&name) {
        assert_eq!(
            segment::file_name(lsn),
            name,
            "parse_file_name is not exact"
        );
    }

    let mut input = Input::new(data);
    let lsn = input.u64();
    let flip = input.u16();
    let name = segment::file_name(lsn);
    assert_eq!(segment::parse_file_name(&name), Some(lsn));
    assert_eq!(segment::parse_file_name(&format!("{name}.tmp")), None);
    if lsn > 0 {
        let mut header = segment::encode_header(lsn);
        assert_eq!(segment::decode_header(&header), Ok(lsn));
        let bit = usize::from(flip) % (header.len() * 8);
        header[bit / 8] ^= 1 << (bit % 8);
        assert!(
            segment::decode_header(&header).is_err(),
            "flipping header bit {bit} was not detected"
        );
    }
}

/// A directory under /dev/shm (or the temp dir) removed on drop.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("wald-fuzz-{}-{n}", std::process::id());
        // tmpfs keeps the fsyncs of recovery cheap; any temp dir will do.
        for base in [PathBuf::from("/dev/shm"), std::env::temp_dir()] {
            let path = base.join(&name);
            let _ = std::fs::remove_dir_all(&path);
            if std::fs::create_dir_all(&path).is_ok() {
                return ScratchDir(path);
            }
        }
        panic!("cannot create a scratch dir for {name}");
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Builds segment files from fuzz input: mostly well-formed segments and
/// records (so that the fuzzer reaches the deep cases of the policy, past
/// the CRCs) mixed with gaps, foreign LSNs, raw bytes, torn frames, zero
/// runs and flipped bits.
fn build_segments(data: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut input = Input::new(data);
    let mode = input.u8();
    if mode == 0xFF {
        // The rest of the input is the body of the one segment.
        let mut file = header_block(1);
        file.extend_from_slice(input.rest());
        return vec![(segment::file_name(1), file)];
    }
    let mut next = match mode % 4 {
        0 => 1,
        1 => u64::from(input.u8()) + 1,
        2 => u64::MAX - u64::from(input.u8() % 4),
        _ => input.u64().max(1),
    };
    let mut files = Vec::new();
    for _ in 0..1 + input.u8() % 4 {
        let first_lsn = match input.u8() % 8 {
            0..=4 => next,
            5 => next.wrapping_add(1),
            6 => input.u64(),
            _ => 0,
        };
        next = first_lsn;
        let mut file = match input.u8() % 8 {
            0..=5 if first_lsn > 0 => header_block(first_lsn),
            6 => header_block(input.u64().max(1)),
            _ => {
                let len = usize::from(input.u8() % 64);
                let mut file = input.bytes(len).to_vec();
                if input.u8() & 1 == 0 {
                    file.resize(HEADER_BYTES as usize, 0);
                }
                file
            }
        };
        for _ in 0..input.u8() % 8 {
            match input.u8() % 8 {
                0..=3 => {
                    let len = usize::from(input.u8());
                    if next > 0 {
                        record::encode(next, input.bytes(len), &mut file);
                        next = next.wrapping_add(1);
                    }
                }
                4 => {
                    let lsn = input.u64().max(1);
                    let len = usize::from(input.u8());
                    record::encode(lsn, input.bytes(len), &mut file);
                }
                5 => {
                    let n = usize::from(input.u8()) * 4;
                    file.resize(file.len() + n, 0);
                }
                6 => {
                    let n = usize::from(input.u8());
                    file.extend_from_slice(input.bytes(n));
                }
                _ => {
                    let len = usize::from(input.u8());
                    let mut frame = Vec::new();
                    record::encode(next.max(1), input.bytes(len), &mut frame);
                    let cut = usize::from(input.u16()) % frame.len();
                    file.extend_from_slice(&frame[..cut]);
                }
            }
        }
        let pad = usize::from(input.u8() % 4) * 512;
        file.resize(file.len() + pad, 0);
        let flip = input.u16();
        if flip & 1 == 1 && !file.is_empty() {
            let at = usize::from(flip / 2) % file.len();
            file[at] ^= input.u8() | 1;
        }
        files.push((segment::file_name(first_lsn), file));
    }
    match input.u8() % 4 {
        1 => files.push((
            format!("{}.tmp", segment::file_name(next.max(1))),
            vec![1; 64],
        )),
        2 => files.push(("not-a-segment.wal".to_string(), vec![1; 64])),
        _ => {}
    }
    files
}

/// A segment header padded to `HEADER_BYTES`, as `segment::install` writes it.
fn header_block(first_lsn: u64) -> Vec<u8> {
    let mut block = segment::encode_header(first_lsn);
    block.resize(HEADER_BYTES as usize, 0);
    block
}

fn write_files(dir: &Path, files: &[(String, Vec<u8>)]) {
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).expect("write segment file");
    }
}

/// Every segment file in `dir` with its contents, in LSN order.
fn segment_files(dir: &Path) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("list scratch dir") {
        let entry = entry.expect("list scratch dir");
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(lsn) = segment::parse_file_name(&name) {
            out.push((lsn, std::fs::read(entry.path()).expect("read segment")));
        }
    }
    out.sort();
    out
}

/// Recovery deletes every unfinished `.tmp` segment, even when it refuses.
fn assert_no_tmp(dir: &Path) {
    for entry in std::fs::read_dir(dir).expect("list scratch dir") {
        let name = entry.expect("list scratch dir").file_name();
        let name = name.to_string_lossy();
        assert!(
            !name.ends_with(segment::TMP_SUFFIX),
            "recovery left {name} behind"
        );
    }
}

/// Checks a successful recovery against the files it left, with a scan of
/// its own: every kept segment has a valid header, dense LSNs that continue
/// the previous segment, and only zero bytes after its last record; the
/// last one ends at `active_offset` and `next_lsn`.
fn check_recovered(dir: &Path, rec: &Recovered) {
    assert!(rec.next_lsn > 0, "recovery chose next LSN 0");
    assert!(rec.active_offset >= HEADER_BYTES);
    assert_no_tmp(dir);
    let on_disk = segment_files(dir);
    let kept: Vec<u64> = rec.segments.iter().map(|s| s.first_lsn).collect();
    let listed: Vec<u64> = on_disk.iter().map(|(lsn, _)| *lsn).collect();
    assert_eq!(
        kept, listed,
        "segments kept vs segment files left in the dir"
    );
    let mut expected = rec.segments.first().map_or(rec.next_lsn, |s| s.first_lsn);
    for (i, (first_lsn, bytes)) in on_disk.iter().enumerate() {
        assert_eq!(segment::decode_header(bytes), Ok(*first_lsn));
        assert_eq!(*first_lsn, expected, "segment does not continue the log");
        let mut offset = HEADER_BYTES as usize;
        while let Some(Decoded::Record {
            lsn, frame_bytes, ..
        }) = bytes.get(offset..).map(record::decode)
        {
            if lsn != expected {
                break;
            }
            expected = expected
                .checked_add(1)
                .expect("LSN overflow in a kept segment");
            offset += frame_bytes;
        }
        let tail = bytes.get(offset..).unwrap_or_default();
        assert!(
            tail.iter().all(|b| *b == 0),
            "non-zero bytes after the last record of a kept segment (offset {offset})"
        );
        if i + 1 == on_disk.len() {
            assert_eq!(rec.active_offset, offset as u64, "active offset");
        }
    }
    assert_eq!(rec.next_lsn, expected, "next LSN vs the records kept");
}

/// The recovery scanner over segment files built from arbitrary bytes, in
/// both modes. It never panics; `refuse` either succeeds or names damage
/// without touching a segment file; `truncate-at-damage` always succeeds;
/// whatever either leaves behind recovers again cleanly to the same state.
pub fn wal_recovery(data: &[u8]) {
    let files = build_segments(data);

    let refuse_dir = ScratchDir::new();
    write_files(&refuse_dir.0, &files);
    let before = segment_files(&refuse_dir.0);
    let refused = match recovery::recover(&refuse_dir.0, RecoveryMode::Refuse) {
        Ok(rec) => {
            assert!(rec.damage_truncated.is_none());
            check_recovered(&refuse_dir.0, &rec);
            check_recovers_again(&refuse_dir.0, &rec);
            Some(rec)
        }
        Err(WalError::Corrupt { file, reason, .. }) => {
            assert!(!reason.is_empty());
            assert!(file.starts_with(&refuse_dir.0));
            assert_no_tmp(&refuse_dir.0);
            assert_eq!(
                before,
                segment_files(&refuse_dir.0),
                "refuse mode changed segment files"
            );
            None
        }
        Err(other) => panic!("refuse mode failed with a non-damage error: {other}"),
    };

    let truncate_dir = ScratchDir::new();
    write_files(&truncate_dir.0, &files);
    let rec = recovery::recover(&truncate_dir.0, RecoveryMode::TruncateAtDamage)
        .unwrap_or_else(|e| panic!("truncate-at-damage failed: {e}"));
    check_recovered(&truncate_dir.0, &rec);
    check_recovers_again(&truncate_dir.0, &rec);
    match refused {
        Some(r) => {
            assert!(rec.damage_truncated.is_none(), "only one mode saw damage");
            assert_eq!(
                (r.next_lsn, r.active_offset),
                (rec.next_lsn, rec.active_offset)
            );
            assert_eq!(r.torn_tails.len(), rec.torn_tails.len());
        }
        None => assert!(rec.damage_truncated.is_some(), "only one mode saw damage"),
    }
}

/// A second recovery of what the first one left finds nothing to repair.
fn check_recovers_again(dir: &Path, first: &Recovered) {
    let again = recovery::recover(dir, RecoveryMode::Refuse)
        .unwrap_or_else(|e| panic!("a recovered WAL did not recover again: {e}"));
    assert!(again.torn_tails.is_empty(), "torn tail after recovery");
    assert!(again.damage_truncated.is_none());
    let lsns = |r: &Recovered| r.segments.iter().map(|s| s.first_lsn).collect::<Vec<_>>();
    assert_eq!(lsns(&again), lsns(first));
    if !first.segments.is_empty() {
        assert_eq!(again.next_lsn, first.next_lsn);
        assert_eq!(again.active_offset, first.active_offset);
    }
}
