//! walld throughput and latency benchmark (a plain main, not a timed test).
//!
//! Starts a real walld, drives durable Appends over its Unix socket at
//! several concurrencies, record sizes and records per Append, and compares
//! with the raw fdatasync rate of the same disk (8 KiB append + fdatasync).
//!
//! Run: `cargo bench -p wald --bench wal_bench`
//! Env: STEMEDB_BENCH_SECS (seconds per cell, default 3),
//!      STEMEDB_BENCH_SMOKE=1 (0.3 s per cell), STEMEDB_BENCH_DIR (default: temp dir).

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use hdrhistogram::Histogram;

const CONCURRENCIES: [usize; 4] = [1, 16, 64, 256];
const RECORD_BYTES: [usize; 2] = [128, 4096];
const RECORDS_PER_APPEND: [usize; 2] = [1, 100];
/// Connections shared by the client tasks, at most (HTTP/2 multiplexes).
const CONNECTIONS_MAX: usize = 16;

fn cell_duration() -> Duration {
    if std::env::var("STEMEDB_BENCH_SMOKE").is_ok_and(|v| v == "1") {
        return Duration::from_millis(300);
    }
    let secs: f64 = std::env::var("STEMEDB_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    Duration::from_secs_f64(secs)
}

/// fdatasyncs per second of 8 KiB writes in a loop, in a file in `dir`.
/// With `extend` every write appends to a fresh file (each fdatasync also
/// commits the new size); otherwise the writes go sequentially over a file
/// that was written and synced beforehand (the device's flush rate).
fn raw_fdatasync_rate(dir: &std::path::Path, duration: Duration, extend: bool) -> f64 {
    const WRITE_BYTES: u64 = 8192;
    const FILE_BYTES: u64 = 8 << 20;
    let path = dir.join("raw-fdatasync.bin");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    if !extend {
        let zeroes = vec![0u8; 1 << 20];
        for i in 0..FILE_BYTES / (1 << 20) {
            file.write_all_at(&zeroes, i << 20).unwrap();
        }
        file.sync_all().unwrap();
    }
    let buf = vec![0xA5u8; WRITE_BYTES as usize];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < duration {
        let offset = if extend {
            n * WRITE_BYTES
        } else {
            (n * WRITE_BYTES) % FILE_BYTES
        };
        file.write_all_at(&buf, offset).unwrap();
        file.sync_data().unwrap();
        n += 1;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    drop(file);
    let _ = std::fs::remove_file(path);
    rate
}

struct Cell {
    appends: u64,
    records: u64,
    bytes: u64,
    fsyncs: u64,
    /// Seconds walld spent inside fdatasync during the cell.
    fsync_secs: f64,
    secs: f64,
    p50_us: u64,
    p99_us: u64,
}

async fn run_cell(
    clients: &[Client],
    epoch: u64,
    concurrency: usize,
    record_bytes: usize,
    per_append: usize,
    duration: Duration,
) -> Cell {
    let mut status_client = clients[0].clone();
    let before = status(&mut status_client).await;
    let stop = Arc::new(AtomicBool::new(false));
    let appends = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Histogram::<u64>::new(3).unwrap()));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let mut client = clients[t % clients.len()].clone();
        let (stop, appends, latencies) = (stop.clone(), appends.clone(), latencies.clone());
        tasks.push(tokio::spawn(async move {
            let records: Vec<Vec<u8>> = (0..per_append)
                .map(|i| vec![(t + i) as u8; record_bytes])
                .collect();
            let mut local = Histogram::<u64>::new(3).unwrap();
            while !stop.load(Ordering::Relaxed) {
                let sent = Instant::now();
                append(&mut client, epoch, records.clone())
                    .await
                    .expect("append");
                local.record(sent.elapsed().as_micros() as u64).unwrap();
                appends.fetch_add(1, Ordering::Relaxed);
            }
            latencies.lock().unwrap().add(&local).unwrap();
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    let after = status(&mut status_client).await;
    let fsyncs = after.fsync_count - before.fsync_count;
    let fsync_secs = after.fsync_duration_sum_seconds - before.fsync_duration_sum_seconds;
    let appends = appends.load(Ordering::Relaxed);
    let h = latencies.lock().unwrap();
    Cell {
        appends,
        records: appends * per_append as u64,
        bytes: appends * (per_append * record_bytes) as u64,
        fsyncs,
        fsync_secs,
        secs,
        p50_us: h.value_at_quantile(0.5),
        p99_us: h.value_at_quantile(0.99),
    }
}

/// Rounds of the interleaved c=1 versus raw comparison.
const PAIRED_ROUNDS: usize = 10;

/// Alternates short slices of raw fdatasync and of c=1 one-record Appends,
/// so that both see the same (shared, noisy) disk. Returns (raw/s, appends/s).
async fn paired_c1(
    clients: &[Client],
    epoch: u64,
    dir: &std::path::Path,
    slice: Duration,
) -> (f64, f64) {
    let (mut raw_ops, mut raw_secs, mut wal_ops, mut wal_secs) = (0.0, 0.0, 0u64, 0.0);
    for _ in 0..PAIRED_ROUNDS {
        let started = Instant::now();
        let rate = raw_fdatasync_rate(dir, slice, false);
        let took = started.elapsed().as_secs_f64();
        raw_ops += rate * slice.as_secs_f64();
        raw_secs += slice.as_secs_f64().min(took);
        let c = run_cell(clients, epoch, 1, 128, 1, slice).await;
        wal_ops += c.appends;
        wal_secs += c.secs;
    }
    (raw_ops / raw_secs, wal_ops as f64 / wal_secs)
}

/// Mean and p50 (µs) of a Sync round trip when nothing needs syncing: the
/// cost of gRPC plus the hand-off to the writer thread and back, no fsync.
async fn overhead_without_fsync(client: &mut Client, duration: Duration) -> (f64, u64) {
    let mut h = Histogram::<u64>::new(3).unwrap();
    let start = Instant::now();
    while start.elapsed() < duration {
        let sent = Instant::now();
        client
            .sync(stemedb_proto::wal::v1::SyncRequest {})
            .await
            .unwrap();
        h.record(sent.elapsed().as_micros() as u64).unwrap();
    }
    (h.mean(), h.value_at_quantile(0.5))
}

fn main() {
    let duration = cell_duration();
    let base = std::env::var("STEMEDB_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir());
    let tmp = tempfile::tempdir_in(&base).unwrap();
    let raw_duration = duration.max(Duration::from_millis(500));
    let raw = raw_fdatasync_rate(tmp.path(), raw_duration, false);
    let raw_extend = raw_fdatasync_rate(tmp.path(), raw_duration, true);
    let raw_dir = tmp.path().to_path_buf();
    let raw_cell_duration =
        (duration / 3).clamp(Duration::from_millis(200), Duration::from_secs(1));
    let mut walld = Walld::new(tmp.path());
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_walld"));
    cmd.arg("--dir")
        .arg(&walld.dir)
        .arg("--socket")
        .arg(&walld.socket)
        .arg("--allow-root");
    walld.prepare_env(&mut cmd, &[("STEMEDB_WALLD_LOG", "warn")]);
    walld.spawn(cmd);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut clients = Vec::new();
        for _ in 0..CONNECTIONS_MAX {
            clients.push(walld.client().await);
        }
        let epoch = open_writer(&mut clients[0], "bench").await;
        println!("walld benchmark: {:.2} s per cell, WAL dir {}", duration.as_secs_f64(), walld.dir.display());
        println!("load average at the start: {}", load_average());
        println!("raw fdatasync rate at start, 8 KiB overwrite + fdatasync: {raw:.0}/s (\"raw\" below is re-measured before each cell)");
        println!("raw fdatasync rate, 8 KiB file-extending append + fdatasync: {raw_extend:.0}/s");
        println!();
        let (mean_us, p50_us) = overhead_without_fsync(&mut clients[0].clone(), duration / 3).await;
        println!("Sync round trip with nothing to sync (gRPC + writer hand-off, no fsync): mean {mean_us:.0} µs, p50 {p50_us} µs");
        let (raw_paired, wal_paired) = paired_c1(&clients, epoch, &raw_dir, duration / 5).await;
        println!(
            "interleaved c=1, 128 B, 1 record/Append vs raw ({PAIRED_ROUNDS} rounds): raw {raw_paired:.0}/s, walld {wal_paired:.0}/s, ratio {:.2}",
            wal_paired / raw_paired
        );
        println!();
        println!("| record B | rec/append | conc | appends/s | records/s | MB/s | fsyncs/s | raw fdatasync/s | fsync/raw | appends/s ÷ raw | p50 ms | p99 ms | mean fsync ms | mean append ms |");
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for record_bytes in RECORD_BYTES {
            for per_append in RECORDS_PER_APPEND {
                for concurrency in CONCURRENCIES {
                    // The disk is shared and noisy: measure raw right next to each cell.
                    let raw = raw_fdatasync_rate(&raw_dir, raw_cell_duration, false);
                    let c = run_cell(&clients, epoch, concurrency, record_bytes, per_append, duration).await;
                    let fsyncs = c.fsyncs as f64 / c.secs;
                    println!(
                        "| {record_bytes} | {per_append} | {concurrency} | {:.0} | {:.0} | {:.1} | {:.0} | {raw:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.3} | {:.3} |",
                        c.appends as f64 / c.secs,
                        c.records as f64 / c.secs,
                        c.bytes as f64 / c.secs / 1e6,
                        fsyncs,
                        fsyncs / raw,
                        c.appends as f64 / c.secs / raw,
                        c.p50_us as f64 / 1e3,
                        c.p99_us as f64 / 1e3,
                        c.fsync_secs * 1e3 / c.fsyncs.max(1) as f64,
                        c.secs * concurrency as f64 * 1e3 / c.appends.max(1) as f64,
                    );
                    let _ = std::io::stdout().flush();
                }
            }
        }
    });
    let _ = walld.stop();
    println!();
    println!("load average at the end: {}", load_average());
}

/// /proc/loadavg, printed because the machine may be shared.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_string()
}
