//! Model test: a random sequence of transactions, kill -9 restarts of stemed
//! and reads (current and as-of) against real processes must match an
//! in-memory model of the assertion semantics. Seeded; the seed is printed.

use futures::TryStreamExt;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet};
use stemedb_client::{Assertion, Client, Op, Query, Value};
use stemedb_tests::Node;

const STEPS: usize = 160;

/// A claim: (entity, attribute, value, source).
type Claim = (String, String, i64, String);

#[derive(Default)]
struct Model {
    txs: Vec<(u64, Vec<(Claim, Op)>)>,
}

impl Model {
    /// Live claims as of `as_of` (None: everything), with the tx of the
    /// assertion that made each live.
    fn live(&self, as_of: Option<u64>) -> BTreeMap<Claim, u64> {
        let mut state: BTreeMap<Claim, (Op, u64)> = BTreeMap::new();
        for (tx, ops) in &self.txs {
            if as_of.is_some_and(|t| *tx > t) {
                break;
            }
            for (claim, op) in ops {
                state.insert(claim.clone(), (*op, *tx));
            }
        }
        state
            .into_iter()
            .filter(|(_, (op, _))| *op == Op::Assert)
            .map(|(c, (_, tx))| (c, tx))
            .collect()
    }
}

fn random_claim(rng: &mut impl Rng) -> Claim {
    (
        format!("e{}", rng.gen_range(0..4)),
        format!("a{}", rng.gen_range(0..3)),
        rng.gen_range(0..3),
        format!("s{}", rng.gen_range(0..2)),
    )
}

fn to_set(facts: Vec<stemedb_client::Fact>) -> BTreeSet<(Claim, u64)> {
    facts
        .into_iter()
        .map(|f| {
            let Value::Int64(v) = f.value else {
                panic!("unexpected value {:?}", f.value)
            };
            ((f.entity, f.attribute, v, f.source), f.tx)
        })
        .collect()
}

async fn check_reads(c: &Client, model: &Model, rng: &mut impl Rng, step: usize) {
    let last = model.txs.last().map(|t| t.0).unwrap_or(0);
    let as_of = if rng.gen_bool(0.5) || last == 0 {
        None
    } else {
        Some(rng.gen_range(1..=last))
    };
    let live = model.live(as_of);
    let entity = format!("e{}", rng.gen_range(0..4));
    let got = to_set(c.get(&entity, as_of).await.unwrap().facts);
    let want: BTreeSet<_> = live
        .iter()
        .filter(|(k, _)| k.0 == entity)
        .map(|(k, tx)| (k.clone(), *tx))
        .collect();
    assert_eq!(got, want, "step {step}: get({entity}, as_of {as_of:?})");

    let attribute = format!("a{}", rng.gen_range(0..3));
    let mut q = Query::attribute(attribute.clone()).page_size(rng.gen_range(1..5));
    let value = rng.gen_bool(0.4).then(|| rng.gen_range(0..3i64));
    let source = rng
        .gen_bool(0.4)
        .then(|| format!("s{}", rng.gen_range(0..2)));
    if let Some(v) = value {
        q = q.value(v);
    }
    if let Some(s) = &source {
        q = q.source(s.clone());
    }
    if let Some(t) = as_of {
        q = q.as_of(t);
    }
    let got = to_set(c.query(q).try_collect().await.unwrap());
    let want: BTreeSet<_> = live
        .iter()
        .filter(|(k, _)| {
            k.1 == attribute
                && value.is_none_or(|v| k.2 == v)
                && source.as_ref().is_none_or(|s| &k.3 == s)
        })
        .map(|(k, tx)| (k.clone(), *tx))
        .collect();
    assert_eq!(
        got, want,
        "step {step}: query({attribute}, value {value:?}, source {source:?}, as_of {as_of:?})"
    );
}

#[tokio::test]
async fn random_transacts_restarts_and_reads_match_the_model() {
    let seed = stemedb_tests::seed("model");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut node = Node::start().await;
    let mut c = node.client().await;
    let mut model = Model::default();
    for step in 0..STEPS {
        match rng.gen_range(0..100) {
            0..=49 => {
                let n = rng.gen_range(1..=4);
                let ops: Vec<(Claim, Op)> = (0..n)
                    .map(|_| {
                        let op = if rng.gen_bool(0.3) {
                            Op::Retract
                        } else {
                            Op::Assert
                        };
                        (random_claim(&mut rng), op)
                    })
                    .collect();
                let assertions = ops
                    .iter()
                    .map(|((e, a, v, s), op)| {
                        let x = match op {
                            Op::Assert => Assertion::assert(e.clone(), a.clone(), *v),
                            Op::Retract => Assertion::retract(e.clone(), a.clone(), *v),
                        };
                        x.source(s.clone())
                    })
                    .collect();
                let r = c.transact(assertions).await.unwrap();
                if let Some((last, _)) = model.txs.last() {
                    assert!(r.tx > *last, "step {step}: tx {} after {last}", r.tx);
                }
                model.txs.push((r.tx, ops));
            }
            50..=54 => {
                node.restart_stemed().await;
                c = node.client().await;
            }
            _ => check_reads(&c, &model, &mut rng, step).await,
        }
    }
    // A final full comparison of every entity, now and as of every tx.
    for (tx, _) in model.txs.clone().iter().step_by(5) {
        for e in 0..4 {
            let entity = format!("e{e}");
            let got = to_set(c.get(&entity, Some(*tx)).await.unwrap().facts);
            let want: BTreeSet<_> = model
                .live(Some(*tx))
                .into_iter()
                .filter(|(k, _)| k.0 == entity)
                .collect();
            assert_eq!(got, want, "final: get({entity}, as_of {tx})");
        }
    }
}
