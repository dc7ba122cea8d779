//! What `bench` sends: the operation mix, the written entities, and the
//! preload.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use stemedb_client::{Assertion, Client, Error, Value};

use super::stats::OpKind;

/// The most entities remembered as read targets. Past it, new entities
/// overwrite old ones round-robin, so memory stays bounded on long runs.
const ENTITIES_MAX: usize = 1_000_000;
/// Facts per preloaded entity.
pub const PRELOAD_FACTS_PER_ENTITY: u64 = 20;
/// Assertions per preload transaction.
pub const PRELOAD_TX_ASSERTIONS: u64 = 1000;
/// Random bytes values are cut from.
const PAYLOAD_POOL_BYTES: usize = 64 * 1024;

/// Written entities that reads may target.
#[derive(Default)]
pub struct Entities {
    ids: Mutex<Vec<Arc<str>>>,
    pushed: AtomicU64,
}

impl Entities {
    pub fn push(&self, id: Arc<str>) {
        let n = self.pushed.fetch_add(1, Ordering::Relaxed) as usize;
        let mut ids = self.ids.lock().expect("entities lock poisoned");
        if ids.len() < ENTITIES_MAX {
            ids.push(id);
        } else {
            ids[n % ENTITIES_MAX] = id;
        }
    }

    pub fn pick(&self, rng: &mut impl Rng) -> Option<Arc<str>> {
        let ids = self.ids.lock().expect("entities lock poisoned");
        (!ids.is_empty()).then(|| ids[rng.gen_range(0..ids.len())].clone())
    }

    pub fn len(&self) -> usize {
        self.ids.lock().expect("entities lock poisoned").len()
    }
}

/// The parameters of the generated operations.
#[derive(Debug, Clone)]
pub struct Shape {
    /// Identifies this run in entity ids and idempotency keys.
    pub run_id: u64,
    pub tx_size: u32,
    pub value_bytes: usize,
    pub read_ratio: f64,
}

/// Generates and executes operations for one worker (closed loop) or for
/// the dispatcher (open loop).
pub struct Generator {
    shape: Arc<Shape>,
    payload: Arc<Vec<u8>>,
    worker: u64,
    seq: u64,
    rng: StdRng,
}

/// One operation, decided before it is sent.
pub enum Op {
    Write {
        entity: Arc<str>,
        key: String,
        assertions: Vec<Assertion>,
    },
    Read {
        entity: Arc<str>,
    },
}

impl Op {
    pub fn kind(&self) -> OpKind {
        match self {
            Op::Write { .. } => OpKind::Write,
            Op::Read { .. } => OpKind::Read,
        }
    }

    pub fn assertion_count(&self) -> u64 {
        match self {
            Op::Write { assertions, .. } => assertions.len() as u64,
            Op::Read { .. } => 0,
        }
    }

    /// Sends the operation; a successful write registers its entity.
    pub async fn execute(self, client: &Client, entities: &Entities) -> Result<(), Error> {
        match self {
            Op::Write {
                entity,
                key,
                assertions,
            } => {
                client.transact_with_key(assertions, key).await?;
                entities.push(entity);
                Ok(())
            }
            Op::Read { entity } => client.get(&entity, None).await.map(drop),
        }
    }
}

/// Random bytes to cut values from; seeded so runs are repeatable.
pub fn payload_pool(seed: u64, value_bytes: usize) -> Arc<Vec<u8>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut pool = vec![0u8; PAYLOAD_POOL_BYTES.max(value_bytes * 2)];
    rng.fill(pool.as_mut_slice());
    Arc::new(pool)
}

fn cut(pool: &[u8], rng: &mut impl Rng, len: usize) -> Vec<u8> {
    assert!(pool.len() >= len, "payload pool is smaller than a value");
    let start = rng.gen_range(0..=pool.len() - len);
    pool[start..start + len].to_vec()
}

impl Generator {
    pub fn new(shape: Arc<Shape>, payload: Arc<Vec<u8>>, seed: u64, worker: u64) -> Generator {
        // Distinct, reproducible streams per worker.
        let rng = StdRng::seed_from_u64(seed ^ worker.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        Generator {
            shape,
            payload,
            worker,
            seq: 0,
            rng,
        }
    }

    /// The next operation: a read with probability `read_ratio` once some
    /// entity exists to read, otherwise a write of a fresh entity.
    pub fn next_op(&mut self, entities: &Entities) -> Op {
        if self.shape.read_ratio > 0.0 && self.rng.gen_bool(self.shape.read_ratio) {
            if let Some(entity) = entities.pick(&mut self.rng) {
                return Op::Read { entity };
            }
        }
        self.seq += 1;
        let run = self.shape.run_id;
        let entity: Arc<str> = format!("bench:{run:016x}:{}:{}", self.worker, self.seq).into();
        let assertions = (0..self.shape.tx_size)
            .map(|i| {
                let value = Value::Bytes(cut(&self.payload, &mut self.rng, self.shape.value_bytes));
                Assertion::assert(&*entity, format!("a{i}"), value).source("bench")
            })
            .collect();
        // A real idempotency key, unique per run, worker and sequence,
        // without the cost of a UUID.
        let key = format!("bench-{run:016x}-{}-{}", self.worker, self.seq);
        Op::Write {
            entity,
            key,
            assertions,
        }
    }
}

/// Writes `facts` facts in transactions of [`PRELOAD_TX_ASSERTIONS`] over
/// entities of [`PRELOAD_FACTS_PER_ENTITY`] facts each, `parallel` at a
/// time, printing progress to stderr once per second. Registers every
/// entity for reads.
pub async fn preload(
    clients: &[Client],
    shape: &Shape,
    payload: &[u8],
    facts: u64,
    parallel: usize,
    entities: &Entities,
    quiet: bool,
) -> anyhow::Result<()> {
    let batches = facts.div_ceil(PRELOAD_TX_ASSERTIONS);
    let written = AtomicU64::new(0);
    let started = Instant::now();
    let mut last_report = started;
    let run = shape.run_id;
    let mut rng = StdRng::seed_from_u64(run);
    let mut results = futures::stream::iter(0..batches)
        .map(|batch| {
            let first = batch * PRELOAD_TX_ASSERTIONS;
            let last = (first + PRELOAD_TX_ASSERTIONS).min(facts);
            let assertions: Vec<Assertion> = (first..last)
                .map(|n| {
                    let entity = format!("bench:{run:016x}:p:{}", n / PRELOAD_FACTS_PER_ENTITY);
                    let value = Value::Bytes(cut(payload, &mut rng, shape.value_bytes));
                    Assertion::assert(entity, format!("f{}", n % PRELOAD_FACTS_PER_ENTITY), value)
                        .source("bench")
                })
                .collect();
            let client = clients[batch as usize % clients.len()].clone();
            let written = &written;
            async move {
                let n = assertions.len() as u64;
                client
                    .transact_with_key(assertions, format!("bench-{run:016x}-preload-{batch}"))
                    .await?;
                written.fetch_add(n, Ordering::Relaxed);
                Ok::<(u64, u64), Error>((first, last))
            }
        })
        .buffer_unordered(parallel.max(1));
    while let Some(result) = results.next().await {
        let (first, last) =
            result.map_err(|e| anyhow::Error::new(e).context("preload transaction failed"))?;
        // Register each entity once: by the batch holding its first fact.
        let first_entity = first.div_ceil(PRELOAD_FACTS_PER_ENTITY);
        let end_entity = last.div_ceil(PRELOAD_FACTS_PER_ENTITY);
        for e in first_entity..end_entity {
            entities.push(format!("bench:{run:016x}:p:{e}").into());
        }
        if !quiet && last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            let done = written.load(Ordering::Relaxed);
            let rate = done as f64 / started.elapsed().as_secs_f64();
            eprintln!(
                "preload: {done}/{facts} facts ({:.0}%), {rate:.0} facts/s",
                done as f64 * 100.0 / facts as f64
            );
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    if !quiet {
        eprintln!(
            "preload: {facts} facts over {} entities in {elapsed:.1} s",
            entities.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(read_ratio: f64) -> Arc<Shape> {
        Arc::new(Shape {
            run_id: 7,
            tx_size: 3,
            value_bytes: 16,
            read_ratio,
        })
    }

    #[test]
    fn writes_until_something_can_be_read() {
        let entities = Entities::default();
        let mut g = Generator::new(shape(1.0), payload_pool(1, 16), 42, 0);
        let Op::Write {
            entity,
            key,
            assertions,
        } = g.next_op(&entities)
        else {
            panic!("nothing to read yet")
        };
        assert_eq!(&*entity, "bench:0000000000000007:0:1");
        assert_eq!(key, "bench-0000000000000007-0-1");
        assert_eq!(assertions.len(), 3);
        assert!(assertions
            .iter()
            .all(|a| matches!(&a.value, Value::Bytes(b) if b.len() == 16)));
        entities.push(entity.clone());
        let Op::Read { entity: read } = g.next_op(&entities) else {
            panic!("read_ratio 1 must read")
        };
        assert_eq!(read, entity);
    }

    #[test]
    fn read_ratio_is_respected_roughly_and_reproducibly() {
        let entities = Entities::default();
        entities.push("e".into());
        let count_reads = |seed| {
            let mut g = Generator::new(shape(0.25), payload_pool(1, 16), seed, 3);
            (0..4000)
                .filter(|_| g.next_op(&entities).kind() == OpKind::Read)
                .count()
        };
        let reads = count_reads(9);
        assert!(
            (800..1200).contains(&reads),
            "reads {reads} of 4000 at ratio 0.25"
        );
        assert_eq!(count_reads(9), reads, "same seed, same mix");
    }

    #[test]
    fn keys_are_unique_per_worker_and_sequence() {
        let entities = Entities::default();
        let mut keys = std::collections::HashSet::new();
        for worker in 0..4 {
            let mut g = Generator::new(shape(0.0), payload_pool(1, 16), 5, worker);
            for _ in 0..100 {
                let Op::Write { key, .. } = g.next_op(&entities) else {
                    panic!("read_ratio 0 never reads")
                };
                assert!(keys.insert(key));
            }
        }
    }

    #[test]
    fn entities_stay_bounded() {
        let entities = Entities::default();
        let mut rng = StdRng::seed_from_u64(0);
        assert!(entities.pick(&mut rng).is_none());
        for i in 0..10 {
            entities.push(format!("e{i}").into());
        }
        assert_eq!(entities.len(), 10);
        assert!(entities.pick(&mut rng).is_some());
    }
}
