//! The node subcommands (drain, undrain, rate-limit, status, wal status):
//! admin HTTP calls and their rendering.

use std::io::Write;
use std::time::Duration;

use serde_json::{json, Value as Json};

use crate::admin::Admin;
use crate::cli::{Cli, Output, RateLimitCommand};
use crate::exit::ServerError;

/// How often `drain --wait` asks for the writes in flight.
const DRAIN_POLL_INTERVAL: Duration = Duration::from_millis(200);
/// How often `drain --wait` prints progress while waiting.
const DRAIN_PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

const STATUS: &str = "/v1/admin/status";
const RATE_LIMIT: &str = "/v1/admin/rate-limit";

/// `drain [--wait]`.
pub async fn drain(
    cli: &Cli,
    wait: bool,
    wait_timeout: Duration,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let admin = Admin::from_cli(cli)?;
    let mut reply = admin.post("/v1/admin/node/drain", None).await?;
    if wait {
        reply = wait_for_no_writes(&admin, reply, wait_timeout).await?;
    }
    match cli.output {
        Output::Json => writeln!(out, "{reply}")?,
        Output::Table => writeln!(
            out,
            "node is {}: new writes are refused, reads are served; {} write(s) in flight",
            text(&reply["state"]),
            text(&reply["writes_in_flight"])
        )?,
    }
    Ok(())
}

/// Polls the status until `writes_in_flight` is 0; returns the last
/// status's state and count, shaped like the drain reply.
async fn wait_for_no_writes(
    admin: &Admin,
    first: Json,
    wait_timeout: Duration,
) -> anyhow::Result<Json> {
    let started = tokio::time::Instant::now();
    let mut printed = started;
    let mut last = first;
    loop {
        let in_flight = last["writes_in_flight"]
            .as_u64()
            .ok_or_else(|| ServerError(format!("status has no writes_in_flight count: {last}")))?;
        if in_flight == 0 {
            if printed != started {
                eprintln!("drain: no writes in flight after {:.1?}", started.elapsed());
            }
            return Ok(json!({"state": last["state"], "writes_in_flight": 0}));
        }
        if started.elapsed() >= wait_timeout {
            anyhow::bail!(
                "drain: {in_flight} write(s) still in flight after --wait-timeout {wait_timeout:?}; the node stays drained — run `stemectl drain --wait` again or `stemectl undrain`"
            );
        }
        if printed.elapsed() >= DRAIN_PROGRESS_INTERVAL || printed == started {
            eprintln!(
                "drain: waiting for {in_flight} write(s) in flight ({:.0?} elapsed)",
                started.elapsed()
            );
            printed = tokio::time::Instant::now();
        }
        tokio::time::sleep(DRAIN_POLL_INTERVAL).await;
        last = admin.get(STATUS).await?;
    }
}

/// `undrain`.
pub async fn undrain(cli: &Cli, out: &mut impl Write) -> anyhow::Result<()> {
    let reply = Admin::from_cli(cli)?
        .post("/v1/admin/node/undrain", None)
        .await?;
    match cli.output {
        Output::Json => writeln!(out, "{reply}")?,
        Output::Table => writeln!(
            out,
            "node is {}: writes are accepted",
            text(&reply["state"])
        )?,
    }
    Ok(())
}

/// `rate-limit show | set N | clear`.
pub async fn rate_limit(
    cli: &Cli,
    command: &RateLimitCommand,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let admin = Admin::from_cli(cli)?;
    let reply = match command {
        RateLimitCommand::Show => admin.get(RATE_LIMIT).await?,
        RateLimitCommand::Set { max_writes_per_sec } => {
            admin
                .post(
                    RATE_LIMIT,
                    Some(json!({ "max_writes_per_sec": max_writes_per_sec })),
                )
                .await?
        }
        RateLimitCommand::Clear => {
            admin
                .post(RATE_LIMIT, Some(json!({ "max_writes_per_sec": null })))
                .await?
        }
    };
    match cli.output {
        Output::Json => writeln!(out, "{reply}")?,
        Output::Table => writeln!(
            out,
            "write rate limit: {}",
            rate_text(&reply["max_writes_per_sec"])
        )?,
    }
    Ok(())
}

/// `status`.
pub async fn status(cli: &Cli, out: &mut impl Write) -> anyhow::Result<()> {
    let status = Admin::from_cli(cli)?.get(STATUS).await?;
    match cli.output {
        Output::Json => writeln!(out, "{status}")?,
        Output::Table => write_table(out, &status_rows(&status))?,
    }
    Ok(())
}

/// `wal status`: the `walld` object of the status plus the node's view of
/// the log.
pub async fn wal_status(cli: &Cli, out: &mut impl Write) -> anyhow::Result<()> {
    let status = Admin::from_cli(cli)?.get(STATUS).await?;
    let wal = wal_json(&status);
    match cli.output {
        Output::Json => writeln!(out, "{wal}")?,
        Output::Table => write_table(out, &wal_rows(&wal))?,
    }
    Ok(())
}

fn wal_json(status: &Json) -> Json {
    json!({
        "walld": status["walld"],
        "durable_lsn": status["durable_lsn"],
        "applied_lsn": status["applied_lsn"],
        "checkpoint_flushed_lsn": status["checkpoint_flushed_lsn"],
        "wal_link": status["wal_link"],
        "writer_epoch": status["writer_epoch"],
    })
}

/// The rows of `status`, in the order an operator reads them.
fn status_rows(s: &Json) -> Vec<(&'static str, String)> {
    vec![
        ("state", text(&s["state"])),
        ("ready", text(&s["ready"])),
        ("writes in flight", text(&s["writes_in_flight"])),
        ("write bytes in flight", text(&s["write_bytes_in_flight"])),
        ("write queue depth", text(&s["write_queue_depth"])),
        ("write rate limit", rate_text(&s["max_writes_per_sec"])),
        ("applied lsn", text(&s["applied_lsn"])),
        ("durable lsn", text(&s["durable_lsn"])),
        ("checkpoint flushed lsn", text(&s["checkpoint_flushed_lsn"])),
        ("wal link", text(&s["wal_link"])),
        ("walld", walld_summary(&s["walld"])),
        ("watch streams", text(&s["watch_streams"])),
        ("uptime", uptime_text(&s["uptime_seconds"])),
        ("version", text(&s["version"])),
    ]
}

fn wal_rows(w: &Json) -> Vec<(&'static str, String)> {
    let d = &w["walld"];
    vec![
        ("walld reachable", text(&d["reachable"])),
        ("walld state", text(&d["state"])),
        ("walld reason", text(&d["reason"])),
        ("first lsn", text(&d["first_lsn"])),
        ("durable lsn", text(&w["durable_lsn"])),
        ("applied lsn", text(&w["applied_lsn"])),
        ("checkpoint flushed lsn", text(&w["checkpoint_flushed_lsn"])),
        ("segments", text(&d["segments"])),
        ("fs free", bytes_text(&d["fs_free_bytes"])),
        ("wal link", text(&w["wal_link"])),
        ("writer epoch", text(&w["writer_epoch"])),
    ]
}

fn write_table(out: &mut impl Write, rows: &[(&str, String)]) -> std::io::Result<()> {
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (key, value) in rows {
        writeln!(out, "{key:<width$}  {value}")?;
    }
    Ok(())
}

/// A JSON scalar for humans: strings unquoted, null and absent as `-`.
fn text(v: &Json) -> String {
    match v {
        Json::Null => "-".into(),
        Json::String(s) if s.is_empty() => "-".into(),
        Json::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn rate_text(v: &Json) -> String {
    match v.as_u64() {
        Some(n) => format!("{n} assertions/s"),
        None => "none".into(),
    }
}

fn walld_summary(d: &Json) -> String {
    if d["reachable"] == Json::Bool(false) {
        return "unreachable".into();
    }
    let mut s = text(&d["state"]);
    if let Some(reason) = d["reason"].as_str().filter(|r| !r.is_empty()) {
        s.push_str(&format!(" ({reason})"));
    }
    s.push_str(&format!(
        ", {} segment(s), {} free",
        text(&d["segments"]),
        bytes_text(&d["fs_free_bytes"])
    ));
    s
}

fn bytes_text(v: &Json) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let Some(mut n) = v.as_u64().map(|n| n as f64) else {
        return text(v);
    };
    let mut unit = 0;
    while n >= 1024.0 && unit + 1 < UNITS.len() {
        n /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{n:.1} {}", UNITS[unit])
    }
}

fn uptime_text(v: &Json) -> String {
    let Some(s) = v.as_u64() else {
        return text(v);
    };
    let (d, h, m, s) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s:02}s"),
        (0, _, _) => format!("{h}h{m:02}m"),
        _ => format!("{d}d{h:02}h"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_scalars_for_humans() {
        assert_eq!(text(&Json::Null), "-");
        assert_eq!(text(&json!("serving")), "serving");
        assert_eq!(text(&json!(7)), "7");
        assert_eq!(rate_text(&json!(500)), "500 assertions/s");
        assert_eq!(rate_text(&Json::Null), "none");
        assert_eq!(bytes_text(&json!(512)), "512 B");
        assert_eq!(bytes_text(&json!(3 * 1024 * 1024)), "3.0 MiB");
        assert_eq!(uptime_text(&json!(59)), "59s");
        assert_eq!(uptime_text(&json!(61)), "1m01s");
        assert_eq!(uptime_text(&json!(3 * 3600 + 120)), "3h02m");
        assert_eq!(uptime_text(&json!(2 * 86_400 + 3600)), "2d01h");
    }

    #[test]
    fn table_aligns_values() {
        let mut out = Vec::new();
        write_table(&mut out, &[("a", "1".into()), ("long key", "2".into())]).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "a         1\nlong key  2\n"
        );
    }

    #[test]
    fn wal_view_keeps_walld_and_lsns() {
        let status = json!({"walld": {"reachable": true, "state": "serving", "segments": 2},
                            "durable_lsn": 9, "applied_lsn": 8, "state": "serving"});
        let wal = wal_json(&status);
        assert_eq!(wal["walld"]["segments"], 2);
        assert_eq!(
            (wal["durable_lsn"].as_u64(), wal["applied_lsn"].as_u64()),
            (Some(9), Some(8))
        );
        assert!(wal.get("state").is_none());
        assert_eq!(
            walld_summary(&status["walld"]),
            "serving, 2 segment(s), - free"
        );
        assert_eq!(walld_summary(&json!({"reachable": false})), "unreachable");
    }
}
