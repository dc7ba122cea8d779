//! `stemectl bench`: a closed- or open-loop load generator over the Rust
//! SDK and real gRPC.
//!
//! Timeline: connect → preload (optional) → warmup → measured window →
//! drain in-flight operations → report. An operation is measured when it
//! *starts* (open loop: is *scheduled*) inside the measured window; its
//! latency runs from that start to its completion, even if it completes
//! after the window closes.

mod report;
mod stats;
mod workload;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use stemedb_client::{Client, ClientOptions};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use self::stats::{Percentiles, Stats};
use self::workload::{Entities, Generator, Shape};
use crate::cli::{BenchArgs, Cli, Output};
use crate::exit::UsageError;

/// The most operations in flight in open-loop mode. Past it, sending
/// waits; latency still runs from each operation's scheduled time, so the
/// wait shows up in the results instead of hiding.
const OPEN_LOOP_IN_FLIGHT_MAX: usize = 10_000;
/// The most gRPC channels.
const CONNECTIONS_MAX: u32 = 1024;
/// The largest written value, in bytes.
const VALUE_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Recorder shards.
const SHARDS: usize = 64;

/// The validated plan of a run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub rate: Option<f64>,
    pub concurrency: u32,
    pub connections: u32,
    pub duration: Duration,
    pub warmup: Duration,
    pub preload: u64,
    pub seed: u64,
    pub shape: Shape,
}

fn plan(args: &BenchArgs) -> Result<Plan, UsageError> {
    if !(0.0..=1.0).contains(&args.read_ratio) {
        return Err(UsageError(format!(
            "--read-ratio {} is outside [0, 1]",
            args.read_ratio
        )));
    }
    if let Some(rate) = args.rate {
        if !(rate.is_finite() && rate > 0.0) {
            return Err(UsageError(format!(
                "--rate {rate} must be a positive number of ops/s"
            )));
        }
    }
    if args.duration.is_zero() {
        return Err(UsageError("--duration must be positive".into()));
    }
    if args.value_bytes > VALUE_BYTES_MAX {
        return Err(UsageError(format!(
            "--value-bytes {} exceeds {VALUE_BYTES_MAX}",
            args.value_bytes
        )));
    }
    let connections = args.connections.unwrap_or(args.concurrency.min(8));
    if !(1..=CONNECTIONS_MAX).contains(&connections) {
        return Err(UsageError(format!(
            "--connections {connections} is outside [1, {CONNECTIONS_MAX}]"
        )));
    }
    let seed = args.seed.unwrap_or_else(|| rand::thread_rng().gen());
    Ok(Plan {
        rate: args.rate,
        concurrency: args.concurrency,
        connections,
        duration: args.duration,
        warmup: args.warmup,
        preload: args.preload,
        seed,
        shape: Shape {
            run_id: seed,
            tx_size: args.tx_size,
            value_bytes: args.value_bytes,
            read_ratio: args.read_ratio,
        },
    })
}

/// Runs the benchmark and prints the report to stdout.
pub async fn run(cli: &Cli, args: &BenchArgs) -> anyhow::Result<()> {
    let plan = plan(args)?;
    let options = ClientOptions {
        timeout: cli.timeout,
        retry_max: args.retry_max,
        ..ClientOptions::default()
    };
    let mut clients = Vec::with_capacity(plan.connections as usize);
    for _ in 0..plan.connections {
        let client = crate::connect::grpc(cli, options.clone()).await?;
        clients.push(client);
    }
    eprintln!(
        "bench: seed {} (replay the same workload with --seed {})",
        plan.seed, plan.seed
    );

    let payload = workload::payload_pool(plan.seed, plan.shape.value_bytes);
    let entities = Arc::new(Entities::default());
    if plan.preload > 0 {
        // Preload is setup, not measurement: let it retry through hiccups.
        let preload_clients: Vec<Client> = clients
            .iter()
            .map(|c| {
                c.with_options(ClientOptions {
                    timeout: cli.timeout,
                    ..ClientOptions::default()
                })
            })
            .collect();
        let parallel = plan.concurrency.min(64) as usize;
        workload::preload(
            &preload_clients,
            &plan.shape,
            &payload,
            plan.preload,
            parallel,
            &entities,
            false,
        )
        .await?;
    }

    let stats = Arc::new(Stats::new(SHARDS));
    let start = Instant::now();
    let window = Window {
        measure_from: start + plan.warmup,
        measure_until: start + plan.warmup + plan.duration,
    };
    let progress = tokio::spawn(progress_loop(stats.clone(), start, window));
    let shape = Arc::new(plan.shape.clone());
    match plan.rate {
        None => closed_loop(&plan, &clients, shape, payload, &entities, &stats, window).await,
        Some(rate) => {
            open_loop(
                &plan, rate, &clients, shape, payload, &entities, &stats, window,
            )
            .await
        }
    }
    progress.abort();
    let recorded = stats.merged();
    // Rates divide by the window stretched to the last completion: an
    // open-loop run that outpaced the server reports the server's pace.
    let rate_span = recorded
        .last_finish
        .map_or(window.measure_until, |t| t.max(window.measure_until))
        - window.measure_from;
    let report = report::Report::new(&plan, rate_span.as_secs_f64(), &recorded);
    match cli.output {
        Output::Json => println!("{}", serde_json::to_string(&report)?),
        Output::Table => print!("{}", report.to_text()),
    }
    let succeeded = recorded.write_us.len() + recorded.read_us.len();
    match recorded.first_error {
        Some(e) if succeeded == 0 => {
            Err(anyhow::Error::new(e).context("every measured operation failed"))
        }
        _ => Ok(()),
    }
}

#[derive(Debug, Clone, Copy)]
struct Window {
    measure_from: Instant,
    measure_until: Instant,
}

impl Window {
    fn measures(&self, started: Instant) -> bool {
        started >= self.measure_from && started < self.measure_until
    }
}

async fn closed_loop(
    plan: &Plan,
    clients: &[Client],
    shape: Arc<Shape>,
    payload: Arc<Vec<u8>>,
    entities: &Arc<Entities>,
    stats: &Arc<Stats>,
    window: Window,
) {
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..plan.concurrency {
        let client = clients[worker as usize % clients.len()].clone();
        let mut generator =
            Generator::new(shape.clone(), payload.clone(), plan.seed, u64::from(worker));
        let (entities, stats) = (entities.clone(), stats.clone());
        workers.spawn(async move {
            loop {
                let started = Instant::now();
                if started >= window.measure_until {
                    break;
                }
                let op = generator.next_op(&entities);
                let (kind, assertions) = (op.kind(), op.assertion_count());
                let outcome = op.execute(&client, &entities).await;
                let measured = window.measures(started);
                stats.finish(
                    worker as usize,
                    measured,
                    kind,
                    started.elapsed(),
                    assertions,
                    outcome,
                );
            }
        });
    }
    while workers.join_next().await.is_some() {}
}

#[allow(clippy::too_many_arguments)]
async fn open_loop(
    plan: &Plan,
    rate: f64,
    clients: &[Client],
    shape: Arc<Shape>,
    payload: Arc<Vec<u8>>,
    entities: &Arc<Entities>,
    stats: &Arc<Stats>,
    window: Window,
) {
    let interval = Duration::from_secs_f64(1.0 / rate);
    let in_flight = Arc::new(Semaphore::new(OPEN_LOOP_IN_FLIGHT_MAX));
    let mut generator = Generator::new(shape, payload, plan.seed, 0);
    let first = Instant::now();
    for n in 0u64.. {
        // Schedule from the start, not from the last send, so a slow send
        // does not push every later one back.
        let scheduled = first + interval.mul_f64(n as f64);
        if scheduled >= window.measure_until {
            break;
        }
        tokio::time::sleep_until(scheduled).await;
        let permit = in_flight
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore is never closed");
        let op = generator.next_op(entities);
        let client = clients[n as usize % clients.len()].clone();
        let (entities, stats) = (entities.clone(), stats.clone());
        tokio::spawn(async move {
            let (kind, assertions) = (op.kind(), op.assertion_count());
            let outcome = op.execute(&client, &entities).await;
            // Latency from the scheduled send time: no coordinated omission.
            stats.finish(
                n as usize,
                window.measures(scheduled),
                kind,
                scheduled.elapsed(),
                assertions,
                outcome,
            );
            drop(permit);
        });
    }
    // Wait for every operation still in flight.
    let all = u32::try_from(OPEN_LOOP_IN_FLIGHT_MAX).expect("bound fits u32");
    drop(
        in_flight
            .acquire_many(all)
            .await
            .expect("semaphore is never closed"),
    );
}

async fn progress_loop(stats: Arc<Stats>, start: Instant, window: Window) {
    let mut ticker =
        tokio::time::interval_at(start + Duration::from_secs(1), Duration::from_secs(1));
    let mut last_finished = 0u64;
    loop {
        let now = ticker.tick().await;
        let finished = stats.finished.load(Ordering::Relaxed);
        let failed = stats.failed.load(Ordering::Relaxed);
        let phase = if now < window.measure_from {
            "warmup "
        } else {
            "measure"
        };
        let recorded = stats.merged();
        let p99 = |h| Percentiles::of(h).map_or("-".to_string(), |p| report::ms(p.p99));
        eprintln!(
            "[{:>4}s] {phase} {:>8} ops/s  p99 write {} read {}  errors {failed}",
            (now - start).as_secs(),
            finished - last_finished,
            p99(&recorded.write_us),
            p99(&recorded.read_us),
        );
        last_finished = finished;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(extra: &[&str]) -> BenchArgs {
        let cli = Cli::try_parse_from([&["stemectl", "bench"], extra].concat()).unwrap();
        match cli.command {
            crate::cli::Command::Bench(b) => b,
            _ => unreachable!(),
        }
    }

    #[test]
    fn connections_default_to_min_of_concurrency_and_8() {
        assert_eq!(plan(&args(&["--concurrency", "3"])).unwrap().connections, 3);
        assert_eq!(plan(&args(&[])).unwrap().connections, 8);
        assert_eq!(plan(&args(&["--connections", "2"])).unwrap().connections, 2);
    }

    #[test]
    fn rejects_bad_plans() {
        for bad in [
            &["--read-ratio", "1.5"][..],
            &["--rate", "0"],
            &["--duration", "0s"],
            &["--connections", "0"],
            &["--value-bytes", "999999999"],
        ] {
            assert!(plan(&args(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn seed_is_kept() {
        let p = plan(&args(&["--seed", "77", "--tx-size", "5"])).unwrap();
        assert_eq!((p.seed, p.shape.run_id, p.shape.tx_size), (77, 77, 5));
    }

    #[test]
    fn window_measures_half_open_interval() {
        let t = Instant::now();
        let w = Window {
            measure_from: t + Duration::from_secs(1),
            measure_until: t + Duration::from_secs(2),
        };
        assert!(!w.measures(t));
        assert!(w.measures(t + Duration::from_secs(1)));
        assert!(!w.measures(t + Duration::from_secs(2)));
    }
}
