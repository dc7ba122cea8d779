//! A closed-loop load generator for etcd over its v3 gRPC KV API, measured
//! the way `stemectl bench` measures StemeDB: `concurrency` operations kept
//! in flight over `connections` HTTP/2 connections; an operation counts
//! when it starts inside the measured window, and its latency runs from
//! that start to its completion.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use crate::report::{record, Load, Recorded, Report};

/// The generated client of the vendored subset of etcd's KV service.
pub mod pb {
    tonic::include_proto!("etcdserverpb");
}

use pb::kv_client::KvClient;
use pb::{request_op, PutRequest, RangeRequest, RequestOp, TxnRequest};

/// Puts per preload Txn.
const PRELOAD_TXN_OPS: u64 = 100;

/// What each operation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// One Put of a fresh key.
    Put,
    /// One Txn (no comparisons) of this many Puts of fresh keys.
    Txn(u32),
    /// A single-key Range (linearizable, etcd's default) of a random key
    /// among the `keys` preloaded ones.
    Range { keys: u64 },
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub endpoint: String,
    pub concurrency: u32,
    pub connections: u32,
    pub op: Op,
    pub value_bytes: usize,
    pub warmup: Duration,
    pub duration: Duration,
    pub seed: u64,
    pub timeout: Duration,
}

/// The key of preloaded (read) key `n`.
pub fn read_key(n: u64) -> Vec<u8> {
    format!("r/{n:012}").into_bytes()
}

fn put(key: Vec<u8>, value: Vec<u8>) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key,
            value,
            ..PutRequest::default()
        })),
    }
}

fn random_value(rng: &mut impl Rng, bytes: usize) -> Vec<u8> {
    let mut v = vec![0u8; bytes];
    rng.fill(&mut v[..]);
    v
}

/// Opens `n` connections to `endpoint`.
pub async fn connect(
    endpoint: &str,
    n: u32,
    timeout: Duration,
) -> anyhow::Result<Vec<KvClient<Channel>>> {
    let ep = Endpoint::from_shared(endpoint.to_string())
        .with_context(|| format!("bad endpoint {endpoint}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .timeout(timeout);
    let mut clients = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let channel = ep
            .connect()
            .await
            .with_context(|| format!("connecting to etcd at {endpoint}"))?;
        clients.push(KvClient::new(channel));
    }
    Ok(clients)
}

/// Puts keys `read_key(0..keys)` with `value_bytes`-byte values, in Txns
/// of [`PRELOAD_TXN_OPS`] Puts, `parallel` Txns at a time.
pub async fn preload(
    endpoint: &str,
    keys: u64,
    value_bytes: usize,
    parallel: u32,
    timeout: Duration,
) -> anyhow::Result<()> {
    let clients = connect(endpoint, parallel.clamp(1, 8), timeout).await?;
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..parallel.max(1) {
        let mut client = clients[w as usize % clients.len()].clone();
        let next = next.clone();
        tasks.spawn(async move {
            let mut rng = StdRng::seed_from_u64(u64::from(w));
            loop {
                let first = next.fetch_add(PRELOAD_TXN_OPS, Ordering::Relaxed);
                if first >= keys {
                    return Ok::<_, anyhow::Error>(());
                }
                let ops = (first..(first + PRELOAD_TXN_OPS).min(keys))
                    .map(|n| put(read_key(n), random_value(&mut rng, value_bytes)))
                    .collect();
                client
                    .txn(TxnRequest {
                        success: ops,
                        failure: vec![],
                    })
                    .await
                    .context("preload Txn failed")?;
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.context("preload task panicked")??;
    }
    Ok(())
}

/// Runs the plan: warmup, then the measured window.
pub async fn run(plan: &Plan) -> anyhow::Result<Report> {
    anyhow::ensure!(plan.concurrency >= 1, "concurrency must be at least 1");
    let clients = connect(&plan.endpoint, plan.connections.max(1), plan.timeout).await?;
    let start = Instant::now();
    let measure_from = start + plan.warmup;
    let measure_until = measure_from + plan.duration;
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..plan.concurrency {
        let mut client = clients[worker as usize % clients.len()].clone();
        let plan = plan.clone();
        workers.spawn(async move {
            let mut rng = StdRng::seed_from_u64(plan.seed ^ (u64::from(worker) << 32));
            let mut recorded = Recorded::default();
            let mut last_finish = None;
            for seq in 0u64.. {
                let started = Instant::now();
                if started >= measure_until {
                    break;
                }
                let key = |i: Option<u32>| match i {
                    None => format!("w/{:016x}/{worker}/{seq}", plan.seed).into_bytes(),
                    Some(i) => format!("w/{:016x}/{worker}/{seq}/{i}", plan.seed).into_bytes(),
                };
                let (is_read, items, outcome) = match plan.op {
                    Op::Put => {
                        let request = PutRequest {
                            key: key(None),
                            value: random_value(&mut rng, plan.value_bytes),
                            ..PutRequest::default()
                        };
                        (false, 1, client.put(request).await.map(drop))
                    }
                    Op::Txn(n) => {
                        let success = (0..n)
                            .map(|i| put(key(Some(i)), random_value(&mut rng, plan.value_bytes)))
                            .collect();
                        let request = TxnRequest {
                            success,
                            failure: vec![],
                        };
                        (false, u64::from(n), client.txn(request).await.map(drop))
                    }
                    Op::Range { keys } => {
                        let request = RangeRequest {
                            key: read_key(rng.gen_range(0..keys)),
                            ..RangeRequest::default()
                        };
                        let outcome = client.range(request).await.and_then(|r| {
                            if r.get_ref().kvs.len() == 1 {
                                Ok(())
                            } else {
                                Err(tonic::Status::not_found("preloaded key missing"))
                            }
                        });
                        (true, 0, outcome)
                    }
                };
                if started < measure_from {
                    continue;
                }
                last_finish = Some(Instant::now());
                match outcome {
                    Ok(()) => {
                        let h = if is_read {
                            &mut recorded.read_us
                        } else {
                            &mut recorded.write_us
                        };
                        record(h, started.elapsed());
                        recorded.items += items;
                    }
                    Err(status) => recorded.error(format!("{:?}", status.code())),
                }
            }
            (recorded, last_finish)
        });
    }
    let mut recorded = Recorded::default();
    let mut last_finish = measure_until;
    while let Some(done) = workers.join_next().await {
        let (r, finish) = done.context("worker panicked")?;
        recorded.merge(&r);
        if let Some(f) = finish {
            last_finish = last_finish.max(f);
        }
    }
    let (tx_size, read_ratio, preload) = match plan.op {
        Op::Put => (1, 0.0, 0),
        Op::Txn(n) => (n, 0.0, 0),
        Op::Range { keys } => (0, 1.0, keys),
    };
    let load = Load {
        system: "etcd",
        concurrency: plan.concurrency,
        connections: clients.len() as u32,
        tx_size,
        value_bytes: plan.value_bytes,
        read_ratio,
        preload,
        warmup_s: plan.warmup.as_secs_f64(),
        duration_s: plan.duration.as_secs_f64(),
    };
    let elapsed = (last_finish - measure_from).as_secs_f64();
    let report = Report::new(&load, elapsed, &recorded);
    if report.writes.count + report.reads.count == 0 {
        anyhow::bail!("every measured etcd operation failed: {:?}", report.errors);
    }
    Ok(report)
}
