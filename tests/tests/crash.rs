//! Crash tests with real processes: kill -9 stemed during concurrent writes,
//! and kill -9 walld while stemed stays up. Every acknowledged transaction
//! must be present exactly once with its content, and nothing may appear
//! twice. Seeded; the seed is printed (replay with STEMEDB_TEST_SEED).

use futures::TryStreamExt;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use stemedb_client::{Assertion, Client, ClientOptions, Query, Value};
use stemedb_tests::Node;

const WRITERS: usize = 8;
const CYCLES: usize = 3;

/// Acknowledged writes: idempotency key -> (tx, entity, value).
type Acks = Arc<Mutex<HashMap<String, (u64, String, i64)>>>;

fn key(writer: usize, i: usize) -> String {
    format!("w{writer}-{i}")
}

fn assertion(writer: usize, i: usize) -> Assertion {
    Assertion::assert(
        format!("crash:{writer}:{i}"),
        "seq",
        (writer * 1_000_000 + i) as i64,
    )
    .source("crash-test")
}

/// Writers loop until `stop`; each write has a unique idempotency key and is
/// recorded only once acknowledged. A failed write is abandoned (not
/// retried), so it is "unacknowledged" and may land at most once.
async fn write_until(
    url: String,
    writer: usize,
    start: usize,
    acks: Acks,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> usize {
    let opts = ClientOptions {
        timeout: Duration::from_secs(5),
        retry_max: 0,
        ..ClientOptions::default()
    };
    let mut i = start;
    while !stop.load(std::sync::atomic::Ordering::Acquire) {
        let Ok(c) = Client::connect_with(url.clone(), opts.clone()).await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        while !stop.load(std::sync::atomic::Ordering::Acquire) {
            match c
                .transact_with_key(vec![assertion(writer, i)], key(writer, i))
                .await
            {
                Ok(r) => {
                    acks.lock().unwrap().insert(
                        key(writer, i),
                        (
                            r.tx,
                            format!("crash:{writer}:{i}"),
                            (writer * 1_000_000 + i) as i64,
                        ),
                    );
                    i += 1;
                }
                Err(_) => {
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    break;
                }
            }
        }
    }
    i
}

/// Reads every fact of the workload and checks the invariants.
async fn verify(node: &Node, acks: &Acks) {
    let c = node.client().await;
    let facts: Vec<_> = c
        .query(Query::attribute("seq").source("crash-test").page_size(1000))
        .try_collect()
        .await
        .unwrap();
    let mut by_entity: HashMap<String, Vec<(u64, Value)>> = HashMap::new();
    for f in facts {
        by_entity.entry(f.entity).or_default().push((f.tx, f.value));
    }
    for (e, v) in &by_entity {
        assert_eq!(v.len(), 1, "{e} appears {} times: {v:?}", v.len());
    }
    // Also through history, which shows every assertion ever made.
    let acks = acks.lock().unwrap().clone();
    for (k, (tx, entity, value)) in &acks {
        let got = by_entity
            .get(entity)
            .unwrap_or_else(|| panic!("acknowledged {k} (tx {tx}) is missing\n{}", node.logs()));
        assert_eq!(
            got[0],
            (*tx, Value::Int64(*value)),
            "acknowledged {k} changed"
        );
    }
    // Every tx is distinct.
    let mut txs: Vec<u64> = by_entity.values().map(|v| v[0].0).collect();
    txs.sort_unstable();
    let before = txs.len();
    txs.dedup();
    assert_eq!(before, txs.len(), "two facts share a tx");
    eprintln!(
        "verified {} acknowledged writes, {} facts present",
        acks.len(),
        by_entity.len()
    );
}

async fn crash_cycles(kill_walld: bool, test: &str) {
    let seed = stemedb_tests::seed(test);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut node = Node::start().await;
    let acks: Acks = Arc::default();
    let mut next = [0usize; WRITERS];
    for cycle in 0..CYCLES {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let joins: Vec<_> = (0..WRITERS)
            .map(|w| {
                tokio::spawn(write_until(
                    node.grpc_url(),
                    w,
                    next[w],
                    acks.clone(),
                    stop.clone(),
                ))
            })
            .collect();
        let run_ms = rng.gen_range(200..1200);
        tokio::time::sleep(Duration::from_millis(run_ms)).await;
        if kill_walld {
            node.kill_walld();
            tokio::time::sleep(Duration::from_millis(rng.gen_range(50..400))).await;
            node.start_walld().await;
            node.wait_ready().await;
            // Keep writing across the reconnect for a moment.
            tokio::time::sleep(Duration::from_millis(300)).await;
        } else {
            node.kill_stemed();
        }
        stop.store(true, std::sync::atomic::Ordering::Release);
        for (w, j) in joins.into_iter().enumerate() {
            next[w] = j.await.unwrap();
        }
        if !kill_walld {
            node.start_stemed().await;
        }
        eprintln!(
            "cycle {cycle}: killed {} after {run_ms} ms, {} acknowledged so far",
            if kill_walld { "walld" } else { "stemed" },
            acks.lock().unwrap().len()
        );
        verify(&node, &acks).await;
    }
    assert!(
        acks.lock().unwrap().len() > 50,
        "the workload barely ran; the test proves nothing"
    );
    // Retrying every write ever attempted with its key lands none twice.
    let c = node.client().await;
    for (w, &n) in next.iter().enumerate() {
        for i in (0..n).step_by(7) {
            let r = c
                .transact_with_key(vec![assertion(w, i)], key(w, i))
                .await
                .unwrap();
            if let Some((tx, _, _)) = acks.lock().unwrap().get(&key(w, i)) {
                assert!(
                    r.deduplicated && r.tx == *tx,
                    "retry of {} got {r:?}",
                    key(w, i)
                );
            }
        }
    }
    verify(&node, &acks).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_stemed_during_concurrent_writes() {
    crash_cycles(false, "kill_9_stemed_during_concurrent_writes").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_walld_while_stemed_stays_up() {
    crash_cycles(true, "kill_9_walld_while_stemed_stays_up").await;
}
