//! Replays the committed fuzz corpora (`fuzz/corpus/<target>/`) and crash
//! reproducers (`fuzz/regressions/<target>/`) through the same checks the
//! cargo-fuzz targets run, on stable Rust and without libFuzzer.

use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The files of one directory, sorted; empty if it does not exist.
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("list corpus dir").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Runs `check` on every corpus and regression input of `target`. Fails if
/// the corpus is missing or empty, so a lost corpus cannot pass silently.
fn replay(target: &str, check: fn(&[u8])) {
    let corpus = inputs(&fuzz_dir().join("corpus").join(target));
    assert!(
        !corpus.is_empty(),
        "fuzz/corpus/{target}/ is missing or empty"
    );
    let regressions = inputs(&fuzz_dir().join("regressions").join(target));
    for path in corpus.iter().chain(&regressions) {
        let data = std::fs::read(path).expect("read corpus file");
        let outcome = std::panic::catch_unwind(|| check(&data));
        assert!(outcome.is_ok(), "{target}: input {} fails", path.display());
    }
    eprintln!(
        "{target}: {} corpus and {} regression inputs pass",
        corpus.len(),
        regressions.len()
    );
}

#[test]
fn wal_record_corpus() {
    replay("wal_record", wald::fuzzing::wal_record);
}

#[test]
fn wal_segment_header_corpus() {
    replay("wal_segment_header", wald::fuzzing::wal_segment_header);
}

#[test]
fn wal_recovery_corpus() {
    replay("wal_recovery", wald::fuzzing::wal_recovery);
}

/// The case behind `regressions/wal_recovery/next-lsn-zero`, end to end: a
/// damaged file named for LSN 0 is the only segment. Refuse names it;
/// truncate-at-damage deletes it and the log opens, empty, at LSN 1.
#[test]
fn a_segment_named_lsn_0_is_damage() {
    use std::sync::Arc;
    use wald::error::WalError;
    use wald::log::{Log, LogOptions};
    use wald::metrics::Metrics;
    use wald::recovery::RecoveryMode;

    let dir = tempfile::tempdir().unwrap();
    let name = wald::segment::file_name(0);
    std::fs::write(dir.path().join(&name), vec![7u8; 4096]).unwrap();
    let open = |mode| {
        let options = LogOptions {
            dir: dir.path().to_path_buf(),
            segment_bytes: 16 * 1024,
            recovery_mode: mode,
            prepare_in_background: false,
        };
        Log::open(
            options,
            Arc::new(Metrics::new(std::time::Duration::from_secs(60), 64)),
        )
    };
    match open(RecoveryMode::Refuse) {
        Err(WalError::Corrupt { file, offset, .. }) => {
            assert!(file.ends_with(&name), "{}", file.display());
            assert_eq!(offset, 0);
        }
        Err(other) => panic!("refuse: {other}"),
        Ok(_) => panic!("refuse mode opened a WAL with a damaged segment"),
    }
    let log = open(RecoveryMode::TruncateAtDamage).expect("truncate-at-damage opens");
    assert_eq!(log.next_lsn(), 1);
    assert!(!dir.path().join(&name).exists());
}
