//! The raw fdatasync rate of a directory's disk: 8 KiB writes, each
//! followed by fdatasync, in a loop on one thread. The writes go
//! sequentially over a file that was written and synced beforehand, so
//! every fdatasync flushes data only (no size change): the rate at which
//! the device makes one small write durable, the ceiling for one client
//! doing one durable write at a time.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::report::{record, Load, Recorded, Report};

pub const WRITE_BYTES: u64 = 8192;
const FILE_BYTES: u64 = 8 << 20;

/// Measures for `warmup` (not recorded), then for `duration`.
pub fn run(dir: &Path, warmup: Duration, duration: Duration) -> anyhow::Result<Report> {
    let path = dir.join(format!("fdatasync-probe-{}.bin", std::process::id()));
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    let result = measure(&file, warmup, duration);
    drop(file);
    let _ = std::fs::remove_file(&path);
    let (recorded, elapsed) = result?;
    let load = Load {
        system: "fdatasync",
        concurrency: 1,
        connections: 0,
        tx_size: 1,
        value_bytes: WRITE_BYTES as usize,
        read_ratio: 0.0,
        preload: 0,
        warmup_s: warmup.as_secs_f64(),
        duration_s: duration.as_secs_f64(),
    };
    Ok(Report::new(&load, elapsed.as_secs_f64(), &recorded))
}

fn measure(
    file: &File,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<(Recorded, Duration)> {
    let mb = vec![0u8; 1 << 20];
    for i in 0..FILE_BYTES / (1 << 20) {
        file.write_all_at(&mb, i << 20)?;
    }
    file.sync_all()?;
    let buf = vec![0xA5u8; WRITE_BYTES as usize];
    let mut recorded = Recorded::default();
    let mut n = 0u64;
    let start = Instant::now();
    let measure_from = start + warmup;
    let measure_until = measure_from + duration;
    loop {
        let began = Instant::now();
        if began >= measure_until {
            break;
        }
        file.write_all_at(&buf, (n * WRITE_BYTES) % FILE_BYTES)?;
        file.sync_data()?;
        n += 1;
        if began >= measure_from {
            record(&mut recorded.write_us, began.elapsed());
            recorded.items += 1;
        }
    }
    // The last measured write may end after the window closes.
    let elapsed = Instant::now().max(measure_until) - measure_from;
    Ok((recorded, elapsed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_synced_writes_and_removes_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let report = run(
            dir.path(),
            Duration::from_millis(20),
            Duration::from_millis(200),
        )
        .unwrap();
        assert!(report.writes.count > 0, "no fdatasync completed in 200 ms");
        assert_eq!(report.assertions, report.writes.count);
        let p = report.writes.latency_us.unwrap();
        assert!(p.p50 >= 1 && p.p50 <= p.p99 && p.p99 <= p.max);
        assert!(
            (report.elapsed_s - 0.2).abs() < 0.2,
            "elapsed {}",
            report.elapsed_s
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
