//! Replays the committed fuzz corpora (`fuzz/corpus/<target>/`) and crash
//! reproducers (`fuzz/regressions/<target>/`) through the same checks the
//! cargo-fuzz targets run, on stable Rust and without libFuzzer. Also runs
//! the page-token property against a real store: every token the store
//! hands out must open on the next page.

use std::path::{Path, PathBuf};
use std::time::Duration;

use stemed::config::Limits;
use stemed::store::{Assertion, Op, QueryParams, Store, StoreConfig, TxRecord, Value};

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
fn tx_codec_corpus() {
    replay("tx_codec", stemed::fuzzing::tx_codec);
}

#[test]
fn assertion_validation_corpus() {
    replay(
        "assertion_validation",
        stemed::fuzzing::assertion_validation,
    );
}

#[test]
fn page_token_corpus() {
    replay("page_token", stemed::fuzzing::page_token);
}

/// Query pages of one attribute whose values are as large as the default
/// limits allow (escaping doubles a zero byte in the key): the token after
/// each page carries such a claim's key and must open on the next request.
#[test]
fn store_tokens_open_for_the_largest_values() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(StoreConfig {
        path: dir.path().to_path_buf(),
        cache_capacity_bytes: 8 << 20,
        entity_cache_entries: 0,
        entity_cache_bytes: 0,
        idempotency_retention: Duration::from_secs(60),
    })
    .unwrap();
    let max = Limits::default().value_bytes_max;
    let values = [
        Value::Text("t".repeat(max)),
        Value::Bytes(vec![0; max]),
        Value::Bytes(vec![1; max]),
        Value::Text("\u{0}".repeat(max)),
    ];
    let records: Vec<(u64, TxRecord)> = values
        .iter()
        .enumerate()
        .map(|(i, value)| {
            let rec = TxRecord {
                idempotency_key: None,
                recorded_at_micros: 1,
                assertions: vec![Assertion {
                    entity: format!("e{i}"),
                    attribute: "big".into(),
                    value: value.clone(),
                    source: "s".into(),
                    confidence: None,
                    op: Op::Assert,
                }],
            };
            (i as u64 + 1, rec)
        })
        .collect();
    store.apply(&records).unwrap();
    let q = QueryParams {
        attribute: "big".into(),
        value: None,
        source: None,
        as_of_tx: None,
        limit: 1,
    };
    let mut token: Option<String> = None;
    let mut seen = Vec::new();
    loop {
        let page = store
            .query(&q, token.as_deref())
            .unwrap_or_else(|e| panic!("page {} failed: {e}", seen.len() + 1));
        seen.extend(page.facts.into_iter().map(|f| f.assertion.entity));
        match page.next_page_token {
            Some(t) => token = Some(t),
            None => break,
        }
    }
    seen.sort();
    assert_eq!(seen, ["e0", "e1", "e2", "e3"]);
}
