//! Model-based tests of `stemed::store`: the store must answer every read
//! exactly like a trivial in-memory model (a `Vec` of every applied
//! assertion), across reopens and simulated crashes.
//!
//! Seeded: the seed is printed; set `STEMEDB_TEST_SEED=<n>` to replay one.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use stemed::store::{
    ApplyOutcome, Assertion, Fact, HistoryParams, Op, Page, QueryParams, Store, StoreConfig,
    StoreError, TxEntry, TxRecord, Value,
};

// Bounds of the random universe. Small, so claims collide constantly.
const ENTITIES: &[&str] = &["e0", "e1", "e2", "e\u{0}3", "e"];
const ATTRIBUTES: &[&str] = &["name", "age", "link", "n\u{0}"];
const SOURCES: &[&str] = &["s0", "s1", ""];
const IDEMPOTENCY_KEYS_MAX: u32 = 6;
const RETENTION_MICROS: u64 = 2_000;

fn seed() -> u64 {
    let seed = match std::env::var("STEMEDB_TEST_SEED") {
        Ok(s) => s.parse().expect("STEMEDB_TEST_SEED is a u64"),
        Err(_) => rand::random(),
    };
    println!("STEMEDB_TEST_SEED={seed}");
    seed
}

fn config(path: &Path, entity_cache_entries: u64) -> StoreConfig {
    StoreConfig {
        path: path.to_path_buf(),
        cache_capacity_bytes: 8 << 20,
        entity_cache_entries,
        entity_cache_bytes: 1 << 20,
        idempotency_retention: Duration::from_micros(RETENTION_MICROS),
    }
}

fn values() -> Vec<Value> {
    vec![
        Value::Text("a".into()),
        Value::Text("b\u{0}".into()),
        Value::Int64(-1),
        Value::Int64(3),
        Value::Double(1.5),
        Value::Double(-2.25),
        Value::Bool(true),
        Value::Bytes(vec![0, 255]),
        Value::Ref("e1".into()),
        Value::Timestamp {
            seconds: -5,
            nanos: 7,
        },
    ]
}

fn cmp_value(a: &Value, b: &Value) -> Ordering {
    a.documented_cmp(b)
}

fn same_claim(x: &Assertion, y: &Assertion) -> bool {
    x.entity == y.entity && x.attribute == y.attribute && x.value == y.value && x.source == y.source
}

/// The model: every record ever given to the store, and what it did.
#[derive(Default)]
struct Model {
    /// Index i holds LSN i + 1.
    records: Vec<TxRecord>,
    outcomes: Vec<ApplyOutcome>,
    /// Every applied (non-duplicate) assertion in (tx, pos) order.
    facts: Vec<Fact>,
    idem: HashMap<String, (u64, i64)>,
}

impl Model {
    fn applied(&self) -> u64 {
        self.records.len() as u64
    }

    fn apply(&mut self, rec: TxRecord) -> ApplyOutcome {
        let tx = self.applied() + 1;
        let outcome = match rec.idempotency_key.as_ref().and_then(|k| self.idem.get(k)) {
            Some(&(original_tx, recorded_at_micros)) => ApplyOutcome::Duplicate {
                original_tx,
                recorded_at_micros,
            },
            None => {
                if let Some(k) = &rec.idempotency_key {
                    self.idem.insert(k.clone(), (tx, rec.recorded_at_micros));
                }
                for a in &rec.assertions {
                    self.facts.push(Fact {
                        assertion: a.clone(),
                        tx,
                        recorded_at_micros: rec.recorded_at_micros,
                    });
                }
                ApplyOutcome::Applied {
                    tx,
                    recorded_at_micros: rec.recorded_at_micros,
                }
            }
        };
        self.records.push(rec);
        self.outcomes.push(outcome);
        outcome
    }

    fn basis(&self, as_of: Option<u64>) -> u64 {
        match as_of {
            None | Some(0) => self.applied(),
            Some(t) => t.min(self.applied()),
        }
    }

    /// Live claims as of `basis`: the latest version of each claim, if an Assert.
    fn live(&self, basis: u64) -> Vec<Fact> {
        let mut latest: Vec<Fact> = Vec::new();
        for f in self.facts.iter().filter(|f| f.tx <= basis) {
            match latest
                .iter_mut()
                .find(|l| same_claim(&l.assertion, &f.assertion))
            {
                Some(l) => *l = f.clone(),
                None => latest.push(f.clone()),
            }
        }
        latest.retain(|f| f.assertion.op == Op::Assert);
        latest
    }

    fn get(&self, entity: &str, as_of: Option<u64>) -> (Vec<Fact>, u64) {
        self.get_at(entity, self.basis(as_of))
    }

    fn get_at(&self, entity: &str, basis: u64) -> (Vec<Fact>, u64) {
        let mut facts: Vec<Fact> = self
            .live(basis)
            .into_iter()
            .filter(|f| f.assertion.entity == entity)
            .collect();
        facts.sort_by(|x, y| {
            let (x, y) = (&x.assertion, &y.assertion);
            x.attribute
                .cmp(&y.attribute)
                .then(cmp_value(&x.value, &y.value))
                .then(x.source.cmp(&y.source))
        });
        (facts, basis)
    }

    fn query(&self, q: &QueryParams) -> (Vec<Fact>, u64) {
        self.query_at(q, self.basis(q.as_of_tx))
    }

    fn query_at(&self, q: &QueryParams, basis: u64) -> (Vec<Fact>, u64) {
        let mut facts: Vec<Fact> = self
            .live(basis)
            .into_iter()
            .filter(|f| f.assertion.attribute == q.attribute)
            .filter(|f| q.value.as_ref().is_none_or(|v| *v == f.assertion.value))
            .filter(|f| q.source.as_ref().is_none_or(|s| *s == f.assertion.source))
            .collect();
        facts.sort_by(|x, y| {
            let (x, y) = (&x.assertion, &y.assertion);
            cmp_value(&x.value, &y.value)
                .then(x.entity.cmp(&y.entity))
                .then(x.source.cmp(&y.source))
        });
        (facts, basis)
    }

    fn history(&self, h: &HistoryParams) -> Vec<Fact> {
        let until = h.until_tx.unwrap_or(u64::MAX).min(self.applied());
        let since = h.since_tx.unwrap_or(0);
        self.facts
            .iter()
            .filter(|f| f.assertion.entity == h.entity)
            .filter(|f| {
                h.attribute
                    .as_ref()
                    .is_none_or(|a| *a == f.assertion.attribute)
            })
            .filter(|f| since <= f.tx && f.tx <= until)
            .cloned()
            .collect()
    }

    fn transactions_from(&self, from: u64, limit: usize) -> Vec<TxEntry> {
        let mut out = Vec::new();
        for (i, outcome) in self.outcomes.iter().enumerate() {
            let tx = i as u64 + 1;
            if tx < from || out.len() == limit {
                continue;
            }
            if let ApplyOutcome::Applied {
                recorded_at_micros, ..
            } = outcome
            {
                let facts = self.facts.iter().filter(|f| f.tx == tx).cloned().collect();
                out.push(TxEntry {
                    tx,
                    recorded_at_micros: *recorded_at_micros,
                    facts,
                });
            }
        }
        out
    }

    fn purge(&mut self, now_micros: i64) -> usize {
        let cutoff = now_micros - RETENTION_MICROS as i64;
        let before = self.idem.len();
        self.idem.retain(|_, (_, at)| *at >= cutoff);
        before - self.idem.len()
    }
}

fn random_assertion(rng: &mut StdRng) -> Assertion {
    let vals = values();
    Assertion {
        entity: ENTITIES[rng.gen_range(0..ENTITIES.len())].to_string(),
        attribute: ATTRIBUTES[rng.gen_range(0..ATTRIBUTES.len())].to_string(),
        value: vals[rng.gen_range(0..vals.len())].clone(),
        source: SOURCES[rng.gen_range(0..SOURCES.len())].to_string(),
        confidence: if rng.gen_bool(0.5) {
            Some(rng.gen_range(0..=100) as f64 / 100.0)
        } else {
            None
        },
        op: if rng.gen_bool(0.3) {
            Op::Retract
        } else {
            Op::Assert
        },
    }
}

fn random_record(rng: &mut StdRng, clock_micros: &mut i64) -> TxRecord {
    *clock_micros += rng.gen_range(0..500);
    let n = rng.gen_range(0..=5);
    TxRecord {
        idempotency_key: rng
            .gen_bool(0.4)
            .then(|| format!("k{}", rng.gen_range(0..IDEMPOTENCY_KEYS_MAX))),
        recorded_at_micros: *clock_micros,
        assertions: (0..n).map(|_| random_assertion(rng)).collect(),
    }
}

fn random_as_of(rng: &mut StdRng, applied: u64) -> Option<u64> {
    match rng.gen_range(0..4) {
        0 => None,
        1 => Some(0),
        2 => Some(applied + rng.gen_range(0..3)),
        _ => Some(rng.gen_range(1..=applied.max(1))),
    }
}

/// Follows page tokens to the end; checks each page's size and basis.
/// Pages may be short (a query page stops at its scan budget).
fn all_pages(limit: usize, mut next: impl FnMut(Option<&str>) -> Page) -> (Vec<Fact>, u64) {
    let mut facts = Vec::new();
    let first = next(None);
    let basis = first.basis_tx;
    let mut page = first;
    for _ in 0..100_000 {
        assert!(
            page.facts.len() <= limit,
            "page of {} facts exceeds limit {limit}",
            page.facts.len()
        );
        assert_eq!(
            page.basis_tx, basis,
            "later pages keep the first page's basis"
        );
        facts.extend(page.facts);
        match page.next_page_token {
            None => return (facts, basis),
            Some(t) => {
                page = next(Some(&t));
            }
        }
    }
    panic!("paging did not end");
}

fn check_reads(store: &Store, model: &Model, rng: &mut StdRng) {
    let applied = model.applied();
    assert_eq!(store.applied_lsn(), applied);
    for entity in ENTITIES {
        let as_of = random_as_of(rng, applied);
        assert_eq!(
            store.get(entity, as_of).unwrap(),
            model.get(entity, as_of),
            "get {entity:?} as of {as_of:?}"
        );
        assert_eq!(
            store.get(entity, None).unwrap(),
            model.get(entity, None),
            "current get {entity:?}"
        );
    }
    let vals = values();
    for attribute in ATTRIBUTES {
        let q = QueryParams {
            attribute: attribute.to_string(),
            value: rng
                .gen_bool(0.4)
                .then(|| vals[rng.gen_range(0..vals.len())].clone()),
            source: rng
                .gen_bool(0.3)
                .then(|| SOURCES[rng.gen_range(0..SOURCES.len())].to_string()),
            as_of_tx: random_as_of(rng, applied),
            limit: rng.gen_range(1..5),
        };
        let got = all_pages(q.limit, |t| store.query(&q, t).unwrap());
        assert_eq!(got, model.query(&q), "query {q:?}");
    }
    for entity in ENTITIES {
        let since = rng.gen_bool(0.5).then(|| rng.gen_range(0..=applied + 1));
        let until = rng.gen_bool(0.5).then(|| rng.gen_range(0..=applied + 1));
        let h = HistoryParams {
            entity: entity.to_string(),
            attribute: rng
                .gen_bool(0.5)
                .then(|| ATTRIBUTES[rng.gen_range(0..ATTRIBUTES.len())].to_string()),
            since_tx: since,
            until_tx: until,
            limit: rng.gen_range(1..6),
        };
        let (got, basis) = all_pages(h.limit, |t| store.history(&h, t).unwrap());
        assert_eq!(basis, applied);
        assert_eq!(got, model.history(&h), "history {h:?}");
    }
    let from = rng.gen_range(0..=applied + 1);
    let limit = rng.gen_range(1..10);
    assert_eq!(
        store.transactions_from(from, limit).unwrap(),
        model.transactions_from(from, limit),
        "transactions_from {from}"
    );
}

fn apply_random_batch(store: &Store, model: &mut Model, rng: &mut StdRng, clock: &mut i64) {
    let n = rng.gen_range(1..=4);
    let mut records = Vec::new();
    let mut expected = Vec::new();
    for _ in 0..n {
        let rec = random_record(rng, clock);
        expected.push(model.apply(rec.clone()));
        records.push((model.applied(), rec));
    }
    assert_eq!(store.apply(&records).unwrap(), expected);
    for (lsn, rec) in &records {
        if let Some(k) = &rec.idempotency_key {
            assert_eq!(
                store.lookup_idempotency(k).unwrap(),
                model.idem.get(k).copied(),
                "idempotency key {k} after lsn {lsn}"
            );
        }
    }
}

#[test]
fn store_behaves_like_the_model() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let cache_entries = rng.gen_range(0..4);
    let mut store = Store::open(config(dir.path(), cache_entries)).unwrap();
    assert_eq!(store.applied_lsn(), 0);
    // Tiny scan budgets make query pages stop early all the time.
    let scan_budget = [1, 2, 5, usize::MAX][rng.gen_range(0..4)];
    store.set_query_scan_budget_for_tests(scan_budget);
    let mut model = Model::default();
    let mut clock = 1_000_000i64;
    for step in 0..300 {
        match rng.gen_range(0..20) {
            0 => {
                assert_eq!(store.flush().unwrap(), model.applied());
                drop(store);
                store = Store::open(config(dir.path(), cache_entries)).unwrap();
                store.set_query_scan_budget_for_tests(scan_budget);
            }
            1 => {
                let purged = store.purge_idempotency(clock).unwrap();
                assert_eq!(purged, model.purge(clock), "purge at step {step}");
            }
            2..=4 => check_reads(&store, &model, &mut rng),
            _ => apply_random_batch(&store, &mut model, &mut rng, &mut clock),
        }
    }
    check_reads(&store, &model, &mut rng);
}

#[test]
fn apply_rejects_lsn_gaps_and_repeats() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path(), 8)).unwrap();
    let rec = TxRecord {
        idempotency_key: None,
        recorded_at_micros: 1,
        assertions: vec![],
    };
    assert!(matches!(
        store.apply(&[(2, rec.clone())]),
        Err(StoreError::LsnOrder {
            expected: 1,
            got: 2
        })
    ));
    store.apply(&[(1, rec.clone())]).unwrap();
    assert!(matches!(
        store.apply(&[(1, rec.clone())]),
        Err(StoreError::LsnOrder {
            expected: 2,
            got: 1
        })
    ));
    assert!(matches!(
        store.apply(&[(2, rec.clone()), (4, rec.clone())]),
        Err(StoreError::LsnOrder {
            expected: 3,
            got: 4
        })
    ));
    // A failed call applies nothing.
    assert_eq!(store.applied_lsn(), 1);
}

fn fact_assertion(entity: String, attribute: &str, value: Value) -> Assertion {
    Assertion {
        entity,
        attribute: attribute.into(),
        value,
        source: "s".into(),
        confidence: None,
        op: Op::Assert,
    }
}

/// Applies `txs` transactions of `per_tx` assertions `n = i` on `e{i}`.
fn fill(store: &Store, txs: u64, per_tx: u64) {
    fill_in_batches(store, txs, per_tx, 64);
}

/// [`fill`] applying `batch_txs` transactions per `apply` call.
fn fill_in_batches(store: &Store, txs: u64, per_tx: u64, batch_txs: usize) {
    let first = store.applied_lsn() + 1;
    let records: Vec<(u64, TxRecord)> = (0..txs)
        .map(|t| {
            let assertions = (0..per_tx)
                .map(|i| {
                    fact_assertion(
                        format!("e{:06}", t * per_tx + i),
                        "n",
                        Value::Int64((t * per_tx + i) as i64),
                    )
                })
                .collect();
            (
                first + t,
                TxRecord {
                    idempotency_key: None,
                    recorded_at_micros: t as i64,
                    assertions,
                },
            )
        })
        .collect();
    for chunk in records.chunks(batch_txs) {
        store.apply(chunk).unwrap();
    }
}

/// Applies `n` more single-assertion transactions about `entity`.
fn fill_history(store: &Store, entity: &str, n: u64) {
    let first = store.applied_lsn() + 1;
    let records: Vec<(u64, TxRecord)> = (0..n)
        .map(|i| {
            let a = fact_assertion(entity.to_string(), "n", Value::Int64(i as i64));
            (
                first + i,
                TxRecord {
                    idempotency_key: None,
                    recorded_at_micros: 0,
                    assertions: vec![a],
                },
            )
        })
        .collect();
    store.apply(&records).unwrap();
}

#[test]
fn page_tokens_are_authenticated_and_bound_to_params() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path(), 8)).unwrap();
    fill(&store, 5, 10);
    let q = QueryParams {
        attribute: "n".into(),
        value: None,
        source: None,
        as_of_tx: None,
        limit: 3,
    };
    let token = store
        .query(&q, None)
        .unwrap()
        .next_page_token
        .expect("more than one page");
    let rejected = |r: Result<Page, StoreError>| matches!(r, Err(StoreError::InvalidPageToken(_)));

    let others = [
        QueryParams {
            attribute: "m".into(),
            ..q.clone()
        },
        QueryParams {
            source: Some("s".into()),
            ..q.clone()
        },
        QueryParams {
            value: Some(Value::Int64(4)),
            ..q.clone()
        },
        QueryParams {
            as_of_tx: Some(3),
            ..q.clone()
        },
    ];
    for other in &others {
        assert!(
            rejected(store.query(other, Some(&token))),
            "token accepted for {other:?}"
        );
    }
    let h = HistoryParams {
        entity: "e000001".into(),
        attribute: None,
        since_tx: None,
        until_tx: None,
        limit: 3,
    };
    assert!(
        rejected(store.history(&h, Some(&token))),
        "query token accepted by history"
    );
    for forged in ["", "AAAA", "not base64 !", &"A".repeat(100_000)] {
        assert!(
            rejected(store.query(&q, Some(forged))),
            "forged token {forged:.20} accepted"
        );
    }
    let mut rng = StdRng::seed_from_u64(seed());
    let alphabet: Vec<char> = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        .chars()
        .collect();
    for _ in 0..200 {
        let mut chars: Vec<char> = token.chars().collect();
        let i = rng.gen_range(0..chars.len());
        let c = alphabet[rng.gen_range(0..alphabet.len())];
        if chars[i] == c {
            continue;
        }
        chars[i] = c;
        let mutated: String = chars.into_iter().collect();
        // Changing the last char may only flip unused padding bits of base64.
        if let Ok(p) = store.query(&q, Some(&mutated)) {
            assert_eq!(i, token.len() - 1, "mutation at char {i} accepted");
            assert_eq!(p, store.query(&q, Some(&token)).unwrap());
        }
    }
    // History tokens are bound to entity, attribute and bounds too.
    let h = HistoryParams {
        entity: "e000001".into(),
        attribute: None,
        since_tx: None,
        until_tx: None,
        limit: 1,
    };
    fill_history(&store, "e000001", 3);
    let htoken = store
        .history(&h, None)
        .unwrap()
        .next_page_token
        .expect("more than one page");
    assert!(store.history(&h, Some(&htoken)).is_ok());
    let others = [
        HistoryParams {
            entity: "e000002".into(),
            ..h.clone()
        },
        HistoryParams {
            attribute: Some("n".into()),
            ..h.clone()
        },
        HistoryParams {
            since_tx: Some(1),
            ..h.clone()
        },
        HistoryParams {
            until_tx: Some(100),
            ..h.clone()
        },
    ];
    for other in &others {
        assert!(
            rejected(store.history(other, Some(&htoken))),
            "history token accepted for {other:?}"
        );
    }
    assert!(
        rejected(store.query(&q, Some(&htoken))),
        "history token accepted by query"
    );

    // Tokens stay valid across a reopen: the secret is stored.
    let expected = store.query(&q, Some(&token)).unwrap();
    drop(store);
    let store = Store::open(config(dir.path(), 8)).unwrap();
    assert_eq!(store.query(&q, Some(&token)).unwrap(), expected);
    // A token minted by another store (another secret) is rejected.
    let dir2 = tempfile::tempdir().unwrap();
    let store2 = Store::open(config(dir2.path(), 8)).unwrap();
    fill(&store2, 5, 10);
    assert!(rejected(store2.query(&q, Some(&token))));
}

#[test]
fn paging_over_10k_facts_returns_each_once_at_a_fixed_basis() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path(), 8)).unwrap();
    fill(&store, 100, 100);
    let q = QueryParams {
        attribute: "n".into(),
        value: None,
        source: None,
        as_of_tx: None,
        limit: 97,
    };
    let mut seen = vec![false; 10_000];
    let mut token: Option<String> = None;
    let mut pages = 0;
    loop {
        let page = store.query(&q, token.as_deref()).unwrap();
        assert_eq!(page.basis_tx, 100);
        assert!(page.facts.len() <= q.limit);
        for f in &page.facts {
            let Value::Int64(n) = f.assertion.value else {
                panic!("unexpected value {:?}", f.assertion.value)
            };
            assert!(!seen[n as usize], "fact {n} returned twice");
            seen[n as usize] = true;
        }
        pages += 1;
        if pages == 3 {
            // Writes between pages are not visible to the paging sequence.
            fill(&store, 2, 10);
        }
        match page.next_page_token {
            Some(t) => token = Some(t),
            None => break,
        }
    }
    assert!(seen.iter().all(|s| *s), "every fact returned");
    assert_eq!(pages, 10_000usize.div_ceil(97));

    // A selective filter over 10k claims: each page stops at its scan
    // budget, short or empty but with a token, and the sequence still ends.
    store.set_query_scan_budget_for_tests(1_000);
    let q = QueryParams {
        source: Some("nobody".into()),
        ..q
    };
    let mut pages = 0;
    let mut token: Option<String> = None;
    loop {
        let page = store.query(&q, token.as_deref()).unwrap();
        assert!(page.facts.is_empty());
        pages += 1;
        match page.next_page_token {
            Some(t) => token = Some(t),
            None => break,
        }
    }
    assert!((10..=12).contains(&pages), "{pages} budget-limited pages");

    let h = HistoryParams {
        entity: "e000042".into(),
        attribute: None,
        since_tx: None,
        until_tx: None,
        limit: 1,
    };
    let (facts, _) = all_pages(1, |t| store.history(&h, t).unwrap());
    assert_eq!(facts.len(), 1);
}

/// Copies a live store's directory as a crash would leave it, without
/// flushing or closing it.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// After a simulated crash the recovered `applied_lsn` matches the facts
/// present (apply is atomic), and replaying from `applied_lsn + 1` restores
/// the full state.
#[test]
fn crash_recovery_is_atomic_and_replayable() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path(), 4)).unwrap();
    let mut model = Model::default();
    let mut clock = 0i64;
    for round in 0..4 {
        for _ in 0..rng.gen_range(1..30) {
            apply_random_batch(&store, &mut model, &mut rng, &mut clock);
        }
        // Whatever `flush` returned must survive the crash.
        let durable_lsn = if rng.gen_bool(0.5) {
            store.flush().unwrap()
        } else {
            0
        };
        let crash = tempfile::tempdir().unwrap();
        copy_dir(dir.path(), crash.path());
        let recovered = Store::open(config(crash.path(), 4)).unwrap();
        let lsn = recovered.applied_lsn();
        println!(
            "round {round}: applied {}, flushed {durable_lsn}, recovered {lsn}",
            model.applied()
        );
        assert!(
            lsn >= durable_lsn,
            "round {round}: flushed {durable_lsn} but recovered {lsn}"
        );
        assert!(
            lsn <= model.applied(),
            "round {round}: recovered lsn {lsn} beyond applied {}",
            model.applied()
        );
        // The recovered store equals the model truncated to its applied_lsn.
        let mut prefix = Model::default();
        for rec in &model.records[..lsn as usize] {
            prefix.apply(rec.clone());
        }
        check_reads(&recovered, &prefix, &mut rng);
        // Replay the WAL tail, as stemed does on restart.
        let tail: Vec<(u64, TxRecord)> = model.records[lsn as usize..]
            .iter()
            .enumerate()
            .map(|(i, r)| (lsn + 1 + i as u64, r.clone()))
            .collect();
        let outcomes = recovered.apply(&tail).unwrap();
        assert_eq!(outcomes, model.outcomes[lsn as usize..].to_vec());
        check_reads(&recovered, &model, &mut rng);
    }
}

/// Apply throughput. Small by default so the suite stays fast; for a real
/// measurement run
/// `STEMEDB_BENCH_ASSERTIONS=100000 [STEMEDB_BENCH_BATCH_TXS=64] cargo test --release -p stemed --test store_model apply_throughput -- --nocapture`.
#[test]
fn apply_throughput() {
    let total: u64 = std::env::var("STEMEDB_BENCH_ASSERTIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6_400);
    let batch_txs: usize = std::env::var("STEMEDB_BENCH_BATCH_TXS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    for per_tx in [1u64, 100] {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path(), 1024);
        cfg.cache_capacity_bytes = 512 << 20;
        let store = Store::open(cfg).unwrap();
        let txs = (total / per_tx).max(1);
        let started = Instant::now();
        fill_in_batches(&store, txs, per_tx, batch_txs);
        store.flush().unwrap();
        let secs = started.elapsed().as_secs_f64();
        println!(
            "apply: {txs} txs x {per_tx} assertions in batches of {batch_txs} txs: {secs:.2}s, {:.0} assertions/s, {:.0} txs/s, {} MiB on disk",
            (txs * per_tx) as f64 / secs,
            txs as f64 / secs,
            store.size_on_disk() >> 20
        );
        assert_eq!(store.applied_lsn(), txs);
        assert_eq!(store.fact_count_estimate(), txs * per_tx);
    }
}

/// Readers racing the writer always see a consistent snapshot: a current
/// `get` or `query` equals the model at the basis it reports, bases never go
/// backwards, and the writer reads its own writes as soon as `apply` returns
/// (the entity cache is invalidated before `apply` returns).
#[test]
fn concurrent_reads_see_consistent_snapshots() {
    use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path(), 3)).unwrap();
    let mut model = Model::default();
    let mut clock = 0i64;
    let records: Vec<(u64, TxRecord)> = (1..=400u64)
        .map(|lsn| {
            let rec = random_record(&mut rng, &mut clock);
            model.apply(rec.clone());
            (lsn, rec)
        })
        .collect();
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        for reader in 0..2 {
            let (store, model, done) = (&store, &model, &done);
            s.spawn(move || {
                let mut last_basis = 0;
                let mut i = reader;
                while !done.load(AtomicOrdering::Acquire) {
                    i += 1;
                    let entity = ENTITIES[i % ENTITIES.len()];
                    let (facts, basis) = store.get(entity, None).unwrap();
                    assert!(
                        basis >= last_basis,
                        "basis went back from {last_basis} to {basis}"
                    );
                    last_basis = basis;
                    assert_eq!(
                        facts,
                        model.get_at(entity, basis).0,
                        "reader get {entity:?} at {basis}"
                    );
                    let q = QueryParams {
                        attribute: ATTRIBUTES[i % ATTRIBUTES.len()].into(),
                        value: None,
                        source: None,
                        as_of_tx: None,
                        limit: 2,
                    };
                    let (facts, basis) = all_pages(2, |t| store.query(&q, t).unwrap());
                    assert_eq!(facts, model.query_at(&q, basis).0);
                }
            });
        }
        let mut prefix = Model::default();
        for chunk in records.chunks(3) {
            store.apply(chunk).unwrap();
            for (_, rec) in chunk {
                prefix.apply(rec.clone());
            }
            for a in chunk.iter().flat_map(|(_, r)| &r.assertions) {
                assert_eq!(
                    store.get(&a.entity, None).unwrap(),
                    prefix.get(&a.entity, None),
                    "read-your-writes"
                );
            }
        }
        done.store(true, AtomicOrdering::Release);
    });
}
