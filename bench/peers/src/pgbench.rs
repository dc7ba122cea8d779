//! Turns pgbench's per-transaction logs (`pgbench -l`) into the common
//! report, measured like `stemectl bench`: pgbench runs longer than the
//! measurement, and only transactions that start inside the window count.
//! The window opens `warmup` after every client has started its first
//! transaction (pgbench's `-T` clock also covers opening the connections,
//! which takes seconds for hundreds of clients) and lasts `duration`; a
//! transaction's latency runs from its start to its completion, also when
//! that is after the window closed.
//!
//! A log line is `client_id transaction_no time script_no time_epoch
//! time_us [schedule_lag] [retries]`: `time` is the transaction's latency in
//! microseconds (or `failed` / `skipped`), `time_epoch`.`time_us` its end.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use crate::report::{record, Load, Recorded, Report};

#[derive(Debug, Clone)]
pub struct Plan {
    pub logs: Vec<PathBuf>,
    /// Whether the script reads (SELECT) rather than writes.
    pub read: bool,
    /// Rows each write transaction inserts.
    pub items_per_tx: u32,
    pub concurrency: u32,
    pub connections: u32,
    pub value_bytes: usize,
    pub preload: u64,
    pub warmup: Duration,
    pub duration: Duration,
}

/// One logged transaction; times in microseconds since the epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub client: u64,
    pub begin: u64,
    pub end: u64,
    /// The latency, or what happened instead (`failed`, `skipped`).
    pub outcome: Result<u64, String>,
}

pub fn parse_log(text: &str) -> anyhow::Result<Vec<Entry>> {
    let mut entries = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let fields: Vec<&str> = line.split_ascii_whitespace().collect();
        if fields.is_empty() {
            continue;
        }
        let field = |i: usize, what: &str| -> anyhow::Result<u64> {
            let f = fields
                .get(i)
                .with_context(|| format!("line {}: no {what}: {line:?}", n + 1))?;
            f.parse()
                .with_context(|| format!("line {}: bad {what} {f:?}", n + 1))
        };
        let client = field(0, "client_id")?;
        let end = field(4, "time_epoch")? * 1_000_000 + field(5, "time_us")?;
        let outcome = match fields[2] {
            "failed" | "skipped" => Err(fields[2].to_string()),
            _ => Ok(field(2, "latency")?),
        };
        let begin = end.saturating_sub(*outcome.as_ref().unwrap_or(&0));
        entries.push(Entry {
            client,
            begin,
            end,
            outcome,
        });
    }
    Ok(entries)
}

/// The measured window `[from, until)`: it opens `warmup` after the last
/// client's first transaction began.
pub fn window(
    entries: &[Entry],
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<(u64, u64)> {
    let mut first_by_client = std::collections::BTreeMap::new();
    for e in entries {
        let first = first_by_client.entry(e.client).or_insert(e.begin);
        *first = (*first).min(e.begin);
    }
    let all_running = *first_by_client
        .values()
        .max()
        .context("the pgbench logs hold no transaction")?;
    let from = all_running + warmup.as_micros() as u64;
    let until = from + duration.as_micros() as u64;
    let last_begin = entries.iter().map(|e| e.begin).max().unwrap_or(0);
    anyhow::ensure!(
        last_begin >= until,
        "pgbench stopped {:.2} s before the measured window closed (raise -T)",
        (until - last_begin.min(until)) as f64 / 1e6
    );
    Ok((from, until))
}

pub fn report(plan: &Plan) -> anyhow::Result<Report> {
    let mut entries = Vec::new();
    for path in &plan.logs {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        entries.extend(parse_log(&text).with_context(|| format!("parsing {}", path.display()))?);
    }
    let (from, until) = window(&entries, plan.warmup, plan.duration)?;
    let mut recorded = Recorded::default();
    let mut last_end = until;
    for e in entries
        .iter()
        .filter(|e| e.begin >= from && e.begin < until)
    {
        last_end = last_end.max(e.end);
        match &e.outcome {
            Ok(latency) => {
                let h = if plan.read {
                    &mut recorded.read_us
                } else {
                    recorded.items += u64::from(plan.items_per_tx);
                    &mut recorded.write_us
                };
                record(h, Duration::from_micros(*latency));
            }
            Err(kind) => recorded.error(kind.clone()),
        }
    }
    anyhow::ensure!(
        recorded.write_us.len() + recorded.read_us.len() > 0,
        "no transaction completed in the measured window (errors: {:?})",
        recorded.errors
    );
    let load = Load {
        system: "postgresql",
        concurrency: plan.concurrency,
        connections: plan.connections,
        tx_size: if plan.read { 0 } else { plan.items_per_tx },
        value_bytes: plan.value_bytes,
        read_ratio: if plan.read { 1.0 } else { 0.0 },
        preload: plan.preload,
        warmup_s: plan.warmup.as_secs_f64(),
        duration_s: plan.duration.as_secs_f64(),
    };
    Ok(Report::new(
        &load,
        (last_end - from) as f64 / 1e6,
        &recorded,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Client 1 starts at 10.0 s; client 0's first transaction at 10.1988 s.
    // Window with 0.2 s warmup and 1 s duration: [10.3988, 11.3988).
    const LOG: &str = "\
0 1 1200 0 10 200000
1 1 800 0 10 100800
0 2 failed 0 10 500000
1 2 3000 0 10 900000 0
0 3 700 0 11 300000
1 3 400 0 11 500000
1 4 100000 0 11 600000
";

    fn plan(path: PathBuf, read: bool) -> Plan {
        Plan {
            logs: vec![path],
            read,
            items_per_tx: 100,
            concurrency: 2,
            connections: 2,
            value_bytes: 16,
            preload: 0,
            warmup: Duration::from_millis(200),
            duration: Duration::from_secs(1),
        }
    }

    #[test]
    fn parses_latency_end_and_failures() {
        let e = parse_log(LOG).unwrap();
        assert_eq!(e.len(), 7);
        assert_eq!(
            e[0],
            Entry {
                client: 0,
                begin: 10_198_800,
                end: 10_200_000,
                outcome: Ok(1200)
            }
        );
        assert_eq!(e[2].outcome, Err("failed".to_string()));
        assert_eq!(e[2].begin, e[2].end);
        assert_eq!(e[3].end, 10_900_000);
    }

    #[test]
    fn only_transactions_starting_in_the_window_count() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.1");
        std::fs::write(&path, LOG).unwrap();
        let rep = report(&plan(path.clone(), false)).unwrap();
        // In the window: the failure at 10.5, the 3 ms one (begin 10.897),
        // the 0.7 ms one (11.2993) and the 0.4 ms one (11.4996 is out).
        assert_eq!(rep.writes.count, 2);
        assert_eq!(rep.errors_total, 1);
        assert_eq!(rep.assertions, 200);
        assert!((rep.elapsed_s - 1.0).abs() < 1e-9, "{}", rep.elapsed_s);
        let p = rep.writes.latency_us.unwrap();
        assert!(p.max >= 3000 && p.max < 3010, "{p:?}");
        let rep = report(&plan(path, true)).unwrap();
        assert_eq!(
            (rep.reads.count, rep.writes.count, rep.assertions),
            (2, 0, 0)
        );
    }

    #[test]
    fn a_run_shorter_than_the_window_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.1");
        std::fs::write(&path, LOG).unwrap();
        let mut p = plan(path, false);
        p.duration = Duration::from_secs(2);
        let err = report(&p).unwrap_err().to_string();
        assert!(err.contains("raise -T"), "{err}");
    }

    #[test]
    fn a_malformed_line_is_an_error() {
        assert!(parse_log("0 1 12x 0 1 2\n").is_err());
        assert!(parse_log("0 1 12\n").is_err());
    }
}
