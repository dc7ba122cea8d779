//! Engine tests without gRPC: the log must behave like a `Vec` of records
//! across reopen and truncation; torn tails and damage are handled by the
//! recovery policy.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use proptest::prelude::*;
use wald::error::WalError;
use wald::log::{Log, LogOptions, LogReader};
use wald::metrics::Metrics;
use wald::record::{self, Decoded};
use wald::recovery::RecoveryMode;
use wald::segment::{self, HEADER_BYTES};

const SEGMENT_BYTES: u64 = 16 * 1024;

fn open(dir: &Path, mode: RecoveryMode) -> Result<Log, WalError> {
    let options = LogOptions {
        dir: dir.to_path_buf(),
        segment_bytes: SEGMENT_BYTES,
        recovery_mode: mode,
        prepare_in_background: false,
    };
    Log::open(
        options,
        Arc::new(Metrics::new(std::time::Duration::from_secs(60), 64)),
    )
}

fn append(log: &mut Log, records: &[Vec<u8>]) -> (u64, u64) {
    let batch: Vec<Bytes> = records.iter().map(|r| Bytes::from(r.clone())).collect();
    let outcome = log.write_batch(&[&batch[..]]);
    assert!(outcome.error.is_none(), "{:?}", outcome.error);
    outcome.ranges[0]
}

/// Every durable record from the first retained LSN.
fn read_all(log: &Log) -> Vec<(u64, Vec<u8>)> {
    let index = log.index();
    let mut reader = LogReader::new(index.clone(), index.first_lsn());
    let mut out = Vec::new();
    for _ in 0..100_000 {
        let before = out.len();
        reader
            .read(log.durable_lsn(), 1 << 20, 1024, &mut out)
            .unwrap();
        if out.len() == before {
            break;
        }
    }
    out
}

/// The one check of the model: the log holds exactly `model[first-1..]`.
fn check(log: &Log, model: &[Vec<u8>]) {
    let first = log.index().first_lsn();
    assert_eq!(log.next_lsn(), model.len() as u64 + 1);
    assert_eq!(log.durable_lsn(), model.len() as u64);
    let got = read_all(log);
    let want: Vec<(u64, Vec<u8>)> = model
        .iter()
        .enumerate()
        .skip(first as usize - 1)
        .map(|(i, r)| (i as u64 + 1, r.clone()))
        .collect();
    assert_eq!(got.len(), want.len());
    assert!(got == want, "log differs from the model");
}

#[derive(Debug, Clone)]
enum Op {
    Append(Vec<Vec<Vec<u8>>>),
    Reopen,
    Truncate(u64),
}

fn op() -> impl Strategy<Value = Op> {
    let record = proptest::collection::vec(any::<u8>(), 0..700);
    let append = proptest::collection::vec(proptest::collection::vec(record, 1..8), 1..6);
    prop_oneof![
        6 => append.prop_map(Op::Append),
        1 => Just(Op::Reopen),
        1 => (0u64..400).prop_map(Op::Truncate),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn log_behaves_like_a_vec(ops in proptest::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let mut log = open(dir.path(), RecoveryMode::Refuse).unwrap();
        let mut model: Vec<Vec<u8>> = Vec::new();
        for op in ops {
            match op {
                Op::Append(appends) => {
                    let batch: Vec<Vec<Bytes>> = appends.iter()
                        .map(|a| a.iter().map(|r| Bytes::from(r.clone())).collect()).collect();
                    let refs: Vec<&[Bytes]> = batch.iter().map(|b| &b[..]).collect();
                    let outcome = log.write_batch(&refs);
                    prop_assert!(outcome.error.is_none());
                    for (records, (first, last)) in appends.iter().zip(&outcome.ranges) {
                        prop_assert_eq!(*first, model.len() as u64 + 1);
                        model.extend(records.iter().cloned());
                        prop_assert_eq!(*last, model.len() as u64);
                    }
                    log.sync().unwrap();
                }
                Op::Reopen => {
                    drop(log);
                    log = open(dir.path(), RecoveryMode::Refuse).unwrap();
                }
                Op::Truncate(below) => {
                    let before = log.index().first_lsn();
                    let (first, _) = wald::log::truncate(&log.index(), dir.path(), below).unwrap();
                    prop_assert!(first >= before);
                    prop_assert!(first <= below.max(before) || first == log.index().first_lsn());
                }
            }
            check(&log, &model);
        }
    }
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    files.sort();
    files
}

/// (offset, frame bytes) of every frame in a segment file.
fn frames(path: &Path) -> Vec<(usize, usize)> {
    let data = std::fs::read(path).unwrap();
    let mut offset = HEADER_BYTES as usize;
    let mut out = Vec::new();
    while let Decoded::Record { frame_bytes, .. } = record::decode(&data[offset..]) {
        out.push((offset, frame_bytes));
        offset += frame_bytes;
    }
    out
}

/// Writes `count` records of non-zero bytes (so zeroing any byte changes them).
fn fill(dir: &Path, count: usize) -> Vec<Vec<u8>> {
    let mut log = open(dir, RecoveryMode::Refuse).unwrap();
    let model: Vec<Vec<u8>> = (0..count)
        .map(|i| vec![(i % 250 + 1) as u8; 40 + i % 300])
        .collect();
    for r in &model {
        append(&mut log, std::slice::from_ref(r));
    }
    log.sync().unwrap();
    model
}

fn copy_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[test]
fn torn_tail_at_every_byte_recovers_the_previous_records() {
    let origin = tempfile::tempdir().unwrap();
    let model = fill(origin.path(), 120);
    let last = segment_files(origin.path()).pop().unwrap();
    let (start, len) = *frames(&last).last().unwrap();
    for cut in start..start + len {
        for truncate_file in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            copy_dir(origin.path(), dir.path());
            let path = dir.path().join(last.file_name().unwrap());
            let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            if truncate_file {
                file.set_len(cut as u64).unwrap();
            } else {
                use std::os::unix::fs::FileExt;
                file.write_all_at(&vec![0u8; start + len - cut], cut as u64)
                    .unwrap();
            }
            let mut log =
                open(dir.path(), RecoveryMode::Refuse).unwrap_or_else(|e| panic!("cut {cut}: {e}"));
            check(&log, &model[..model.len() - 1]);
            // The writer continues right after the last valid record.
            let mut expect = model[..model.len() - 1].to_vec();
            expect.push(b"after".to_vec());
            append(&mut log, &[b"after".to_vec()]);
            log.sync().unwrap();
            drop(log);
            check(&open(dir.path(), RecoveryMode::Refuse).unwrap(), &expect);
        }
    }
}

#[test]
fn garbage_tail_is_torn_not_damage() {
    let dir = tempfile::tempdir().unwrap();
    let model = fill(dir.path(), 10);
    let last = segment_files(dir.path()).pop().unwrap();
    let (start, len) = *frames(&last).last().unwrap();
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().write(true).open(&last).unwrap();
    file.write_all_at(&[0xAB; 100], (start + len) as u64)
        .unwrap();
    check(&open(dir.path(), RecoveryMode::Refuse).unwrap(), &model);
}

/// Flips one byte inside record `victim` and expects damage at its frame.
fn corrupt_record(dir: &Path, victim_segment: usize, victim_frame: usize) -> (PathBuf, usize) {
    let path = segment_files(dir)[victim_segment].clone();
    let (offset, len) = frames(&path)[victim_frame];
    let mut data = std::fs::read(&path).unwrap();
    data[offset + len / 2] ^= 0xFF;
    std::fs::write(&path, &data).unwrap();
    (path, offset)
}

fn expect_damage(dir: &Path, path: &Path, offset: usize) {
    match open(dir, RecoveryMode::Refuse) {
        Err(WalError::Corrupt {
            file, offset: at, ..
        }) => {
            assert_eq!(file, path);
            assert_eq!(at, offset as u64);
        }
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("damage at {} offset {offset} was accepted", path.display()),
    }
}

#[test]
fn mid_log_damage_in_a_sealed_segment_is_refused_or_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let model = fill(dir.path(), 300);
    assert!(segment_files(dir.path()).len() >= 3);
    let (path, offset) = corrupt_record(dir.path(), 1, 3);
    expect_damage(dir.path(), &path, offset);
    let message = open(dir.path(), RecoveryMode::Refuse)
        .err()
        .unwrap()
        .to_string();
    assert!(
        message.contains(&path.display().to_string()) && message.contains(&offset.to_string()),
        "{message}"
    );
    // truncate-at-damage keeps exactly the records before the damage.
    let first_of_victim =
        segment::parse_file_name(path.file_name().unwrap().to_str().unwrap()).unwrap();
    let kept = (first_of_victim - 1 + 3) as usize;
    let mut log = open(dir.path(), RecoveryMode::TruncateAtDamage).unwrap();
    check(&log, &model[..kept]);
    assert_eq!(segment_files(dir.path()).len(), 2);
    append(&mut log, &[b"next".to_vec()]);
    log.sync().unwrap();
    drop(log);
    let mut expect = model[..kept].to_vec();
    expect.push(b"next".to_vec());
    check(&open(dir.path(), RecoveryMode::Refuse).unwrap(), &expect);
}

#[test]
fn damage_followed_by_valid_records_in_the_last_segment_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = fill(dir.path(), 20);
    assert_eq!(segment_files(dir.path()).len(), 1);
    let (path, offset) = corrupt_record(dir.path(), 0, 5);
    expect_damage(dir.path(), &path, offset);
    check(
        &open(dir.path(), RecoveryMode::TruncateAtDamage).unwrap(),
        &model[..5],
    );
}

#[test]
fn missing_middle_segment_is_an_lsn_gap() {
    let dir = tempfile::tempdir().unwrap();
    let model = fill(dir.path(), 300);
    let files = segment_files(dir.path());
    std::fs::remove_file(&files[1]).unwrap();
    expect_damage(dir.path(), &files[2], 0);
    let first_of_missing =
        segment::parse_file_name(files[1].file_name().unwrap().to_str().unwrap()).unwrap();
    check(
        &open(dir.path(), RecoveryMode::TruncateAtDamage).unwrap(),
        &model[..first_of_missing as usize - 1],
    );
}

#[test]
fn bad_segment_header_is_damage() {
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path(), 300);
    let files = segment_files(dir.path());
    let mut data = std::fs::read(&files[1]).unwrap();
    data[3] ^= 1;
    std::fs::write(&files[1], &data).unwrap();
    expect_damage(dir.path(), &files[1], 0);
}

#[test]
fn an_append_larger_than_a_segment_grows_one_segment_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path(), RecoveryMode::Refuse).unwrap();
    let mut model = vec![b"small".to_vec()];
    append(&mut log, &model);
    let big: Vec<Vec<u8>> = vec![vec![0xEE; 40_000], vec![0xDD; 30_000]];
    let (first, last) = append(&mut log, &big);
    assert_eq!((first, last), (2, 3));
    model.extend(big);
    model.push(b"after".to_vec());
    append(&mut log, &model[3..]);
    log.sync().unwrap();
    check(&log, &model);
    let files = segment_files(dir.path());
    assert_eq!(
        files.len(),
        3,
        "small | big (grown past its preallocation) | after"
    );
    assert!(std::fs::metadata(&files[1]).unwrap().len() > SEGMENT_BYTES);
    drop(log);
    check(&open(dir.path(), RecoveryMode::Refuse).unwrap(), &model);
}
