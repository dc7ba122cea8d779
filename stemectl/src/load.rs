//! `assert --file` / `retract --file`: JSON lines in, transactions out.
//!
//! Each transaction is one batch of consecutive lines. Its idempotency key
//! is derived from the batch's starting byte offset and a hash of its
//! bytes and of the defaults that give them meaning (the command's op and
//! `--source`), so rerunning the same command on the same file sends the
//! same keys and nothing is applied twice; after a failure, a rerun
//! resumes where the last applied batch ended.
//!
//! Lines are validated before their batch is sent; the first bad line
//! stops the load, and nothing from it on is sent.

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::ValueEnum;
use serde_json::{json, Map, Value as Json};
use sha2::{Digest, Sha256};
use stemedb_client::{Assertion, Client, Op, TxReceipt};

use crate::cli::Output;
use crate::exit::UsageError;
use crate::value::{parse_value, ValueType};

/// Lines per transaction unless `--batch` says otherwise.
pub const BATCH_DEFAULT: u32 = 1000;
/// The longest accepted line, in bytes (a value may be large, but a line
/// past this is a file that is not JSON lines).
const LINE_BYTES_MAX: usize = 64 * 1024 * 1024;
/// How often the progress line is refreshed.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);
/// Fields a line may carry without meaning, so the output of
/// `query --output json` can be loaded back.
const IGNORED_FIELDS: [&str; 2] = ["tx", "recorded_at"];

/// What a line means when it does not say.
pub struct Defaults {
    pub op: Op,
    pub source: String,
}

/// A line that cannot become an assertion.
#[derive(Debug, PartialEq)]
pub struct LineError {
    pub line: u64,
    pub field: Option<String>,
    pub message: String,
}

impl std::fmt::Display for LineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.field {
            Some(field) => write!(f, "line {}: field {field:?}: {}", self.line, self.message),
            None => write!(f, "line {}: {}", self.line, self.message),
        }
    }
}

fn bad(line: u64, field: &str, message: impl Into<String>) -> LineError {
    LineError {
        line,
        field: Some(field.to_string()),
        message: message.into(),
    }
}

fn string_field<'a>(
    obj: &'a Map<String, Json>,
    line: u64,
    field: &str,
) -> Result<Option<&'a str>, LineError> {
    match obj.get(field) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s)),
        Some(other) => Err(bad(line, field, format!("must be a string, not {other}"))),
    }
}

/// Parses one line (1-based number `line`) into an assertion.
pub fn parse_line(text: &str, line: u64, defaults: &Defaults) -> Result<Assertion, LineError> {
    let json: Json = serde_json::from_str(text).map_err(|e| LineError {
        line,
        field: None,
        message: format!("not JSON: {e}"),
    })?;
    let Json::Object(obj) = json else {
        return Err(LineError {
            line,
            field: None,
            message:
                "must be a JSON object like {\"entity\": .., \"attribute\": .., \"value\": ..}"
                    .into(),
        });
    };
    if let Some(k) = obj.keys().find(|k| {
        !matches!(
            k.as_str(),
            "entity" | "attribute" | "value" | "type" | "source" | "confidence" | "op"
        ) && !IGNORED_FIELDS.contains(&k.as_str())
    }) {
        return Err(bad(
            line,
            k,
            "unknown field; expected entity, attribute, value, type, source, confidence, op",
        ));
    }
    let entity =
        string_field(&obj, line, "entity")?.ok_or_else(|| bad(line, "entity", "required"))?;
    let attribute =
        string_field(&obj, line, "attribute")?.ok_or_else(|| bad(line, "attribute", "required"))?;
    let value = line_value(&obj, line)?;
    let op = match string_field(&obj, line, "op")? {
        None => defaults.op,
        Some("assert") => Op::Assert,
        Some("retract") => Op::Retract,
        Some(other) => {
            return Err(bad(
                line,
                "op",
                format!("{other:?} is not assert or retract"),
            ))
        }
    };
    let source = string_field(&obj, line, "source")?.unwrap_or(&defaults.source);
    let confidence = match obj.get("confidence") {
        None | Some(Json::Null) => None,
        Some(c) => {
            let c = c
                .as_f64()
                .ok_or_else(|| bad(line, "confidence", format!("{c} is not a number")))?;
            if !(0.0..=1.0).contains(&c) {
                return Err(bad(line, "confidence", format!("{c} is outside [0, 1]")));
            }
            Some(c)
        }
    };
    let mut a = match op {
        Op::Assert => Assertion::assert(entity, attribute, value),
        Op::Retract => Assertion::retract(entity, attribute, value),
    }
    .source(source);
    a.confidence = confidence;
    Ok(a)
}

/// The value of a line: `"value": 36` with an optional `"type"`, or the
/// `{"type": .., "value": ..}` object that `--output json` prints.
fn line_value(obj: &Map<String, Json>, line: u64) -> Result<stemedb_client::Value, LineError> {
    let (mut raw, mut ty_name) = (obj.get("value"), None);
    if let Some(Json::Object(inner)) = raw {
        ty_name = inner.get("type").and_then(Json::as_str);
        raw = inner.get("value");
    }
    if let Some(t) = string_field(obj, line, "type")? {
        ty_name = Some(t);
    }
    let raw = raw.ok_or_else(|| bad(line, "value", "required"))?;
    let ty = match ty_name {
        Some(name) => ValueType::from_str(name, false).map_err(|_| {
            bad(
                line,
                "type",
                format!(
                    "{name:?} is not one of text, int, double, bool, ref, bytes-hex, timestamp"
                ),
            )
        })?,
        None => match raw {
            Json::String(_) => ValueType::Text,
            Json::Bool(_) => ValueType::Bool,
            Json::Number(n) if n.is_i64() => ValueType::Int,
            Json::Number(_) => ValueType::Double,
            _ => return Err(bad(line, "value", "must be a string, number or bool")),
        },
    };
    let raw = match raw {
        Json::String(s) => s.clone(),
        Json::Number(_) | Json::Bool(_) => raw.to_string(),
        _ => return Err(bad(line, "value", "must be a string, number or bool")),
    };
    parse_value(&raw, ty).map_err(|e| bad(line, "value", e))
}

/// The idempotency key of the batch that starts at byte `offset` and
/// consists of `bytes`.
pub fn batch_key(offset: u64, bytes: &[u8], defaults: &Defaults) -> String {
    let mut h = Sha256::new();
    h.update(match defaults.op {
        Op::Assert => b"assert\n",
        Op::Retract => b"retrac\n",
    });
    h.update((defaults.source.len() as u64).to_le_bytes());
    h.update(defaults.source.as_bytes());
    h.update(bytes);
    let digest = h.finalize();
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("stemectl-file:{offset}:{hex}")
}

/// A batch being filled.
#[derive(Default)]
struct Batch {
    assertions: Vec<Assertion>,
    bytes: Vec<u8>,
    start_offset: u64,
    first_line: u64,
}

/// What a load did.
#[derive(Debug, Default)]
struct Totals {
    lines: u64,
    assertions: u64,
    transactions: u64,
    deduplicated: u64,
    first_tx: Option<u64>,
    last_tx: Option<u64>,
}

/// Loads `path` (`-`: stdin) in transactions of `batch` lines.
pub async fn run(
    client: &Client,
    path: &Path,
    batch: usize,
    defaults: &Defaults,
    format: Output,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    assert!(batch > 0, "clap bounds --batch to at least 1");
    let (reader, size): (Box<dyn BufRead>, Option<u64>) = if path == Path::new("-") {
        (Box::new(std::io::stdin().lock()), None)
    } else {
        let file = std::fs::File::open(path)
            .map_err(|e| UsageError(format!("--file {}: cannot open: {e}", path.display())))?;
        let size = file.metadata().ok().map(|m| m.len());
        (Box::new(std::io::BufReader::new(file)), size)
    };
    let mut reader = reader;
    let mut progress = Progress::new(size);
    let mut totals = Totals::default();
    let mut current = Batch::default();
    let mut offset = 0u64;
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = std::io::Read::take(&mut reader, LINE_BYTES_MAX as u64 + 1)
            .read_until(b'\n', &mut line)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        let line_no = totals.lines + 1;
        if n > LINE_BYTES_MAX {
            return Err(stop(
                &totals,
                LineError {
                    line: line_no,
                    field: None,
                    message: format!("longer than {LINE_BYTES_MAX} bytes"),
                },
            ));
        }
        totals.lines = line_no;
        if current.assertions.is_empty() && current.bytes.is_empty() {
            current.start_offset = offset;
            current.first_line = line_no;
        }
        offset += n as u64;
        current.bytes.extend_from_slice(&line);
        let text = std::str::from_utf8(&line).map_err(|_| {
            stop(
                &totals,
                LineError {
                    line: line_no,
                    field: None,
                    message: "not UTF-8".into(),
                },
            )
        })?;
        if text.trim().is_empty() {
            continue;
        }
        let a = parse_line(text, line_no, defaults).map_err(|e| stop(&totals, e))?;
        current.assertions.push(a);
        if current.assertions.len() == batch {
            send(client, std::mem::take(&mut current), defaults, &mut totals).await?;
            progress.maybe_print(&totals, offset);
        }
    }
    if !current.assertions.is_empty() {
        send(client, current, defaults, &mut totals).await?;
    }
    progress.finish(&totals, offset);
    print_totals(out, format, &totals)?;
    Ok(())
}

/// The error for a bad line, saying what was already applied.
fn stop(totals: &Totals, e: LineError) -> anyhow::Error {
    let done = if totals.transactions == 0 {
        "nothing was sent".to_string()
    } else {
        format!(
            "{} assertion(s) before it were applied in {} transaction(s); fix the line and rerun: applied batches are deduplicated",
            totals.assertions, totals.transactions
        )
    };
    UsageError(format!("{e}; {done}")).into()
}

async fn send(
    client: &Client,
    batch: Batch,
    defaults: &Defaults,
    totals: &mut Totals,
) -> anyhow::Result<()> {
    let key = batch_key(batch.start_offset, &batch.bytes, defaults);
    let count = batch.assertions.len() as u64;
    let receipt: TxReceipt = client
        .transact_with_key(batch.assertions, key)
        .await
        .with_context(|| {
            format!(
                "transaction of the {count} fact(s) from line {} (after {} applied transaction(s); rerun to resume: applied batches are deduplicated)",
                batch.first_line, totals.transactions
            )
        })?;
    totals.transactions += 1;
    totals.assertions += count;
    totals.deduplicated += u64::from(receipt.deduplicated);
    totals.first_tx.get_or_insert(receipt.tx);
    totals.last_tx = Some(receipt.tx);
    Ok(())
}

fn print_totals(out: &mut impl Write, format: Output, t: &Totals) -> std::io::Result<()> {
    match format {
        Output::Json => writeln!(
            out,
            "{}",
            json!({
                "lines": t.lines,
                "assertions": t.assertions,
                "transactions": t.transactions,
                "deduplicated": t.deduplicated,
                "first_tx": t.first_tx,
                "last_tx": t.last_tx,
            })
        ),
        Output::Table => writeln!(
            out,
            "{} line(s), {} assertion(s) in {} transaction(s): {} applied now, {} already applied (deduplicated){}",
            t.lines,
            t.assertions,
            t.transactions,
            t.transactions - t.deduplicated,
            t.deduplicated,
            match (t.first_tx, t.last_tx) {
                (Some(a), Some(b)) => format!("; tx {a}..={b}"),
                _ => String::new(),
            }
        ),
    }
}

/// The progress line on stderr: shown only once a load has run for
/// [`PROGRESS_INTERVAL`], so small inputs stay quiet.
struct Progress {
    started: Instant,
    last: Instant,
    size: Option<u64>,
    shown: bool,
    tty: bool,
}

impl Progress {
    fn new(size: Option<u64>) -> Progress {
        let now = Instant::now();
        Progress {
            started: now,
            last: now,
            size,
            shown: false,
            tty: std::io::stderr().is_terminal(),
        }
    }

    fn maybe_print(&mut self, t: &Totals, offset: u64) {
        if self.last.elapsed() < PROGRESS_INTERVAL {
            return;
        }
        self.last = Instant::now();
        self.print(t, offset, false);
    }

    fn finish(&mut self, t: &Totals, offset: u64) {
        if self.shown {
            self.print(t, offset, true);
        }
    }

    fn print(&mut self, t: &Totals, offset: u64, last: bool) {
        self.shown = true;
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let mut line = format!(
            "load: {} line(s), {} tx, {:.0} tx/s, {:.0} assertions/s",
            t.lines,
            t.transactions,
            t.transactions as f64 / secs,
            t.assertions as f64 / secs
        );
        if let Some(size) = self.size.filter(|s| *s > 0 && !last) {
            let done = offset as f64 / size as f64;
            let eta = if done > 0.0 {
                secs * (1.0 - done) / done
            } else {
                0.0
            };
            line.push_str(&format!(", {:.0}%, ETA {:.0}s", done * 100.0, eta));
        }
        // A terminal gets one line rewritten in place; a log gets lines.
        if self.tty {
            eprint!("\r{line}\x1b[K{}", if last { "\n" } else { "" });
        } else {
            eprintln!("{line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stemedb_client::Value;

    fn defaults() -> Defaults {
        Defaults {
            op: Op::Assert,
            source: "cli".into(),
        }
    }

    fn check(line: &str, want: Result<(Op, Value, &str, Option<f64>), &str>) {
        let got = parse_line(line, 7, &defaults())
            .map(|a| (a.op, a.value, a.source, a.confidence))
            .map_err(|e| e.to_string());
        match want {
            Ok((op, v, s, c)) => assert_eq!(got, Ok((op, v, s.to_string(), c)), "{line}"),
            Err(msg) => {
                let e = got.expect_err(line);
                assert!(e.contains(msg), "{line}: {e} lacks {msg}");
            }
        }
    }

    #[test]
    fn parses_lines() {
        check(
            r#"{"entity":"e","attribute":"a","value":"x"}"#,
            Ok((Op::Assert, Value::Text("x".into()), "cli", None)),
        );
        check(
            r#"{"entity":"e","attribute":"a","value":36}"#,
            Ok((Op::Assert, Value::Int64(36), "cli", None)),
        );
        check(
            r#"{"entity":"e","attribute":"a","value":2.5,"source":"hr","confidence":0.5,"op":"retract"}"#,
            Ok((Op::Retract, Value::Double(2.5), "hr", Some(0.5))),
        );
        check(
            r#"{"entity":"e","attribute":"a","value":"36","type":"int"}"#,
            Ok((Op::Assert, Value::Int64(36), "cli", None)),
        );
        check(
            r#"{"entity":"e","attribute":"a","value":"u:2","type":"ref"}"#,
            Ok((Op::Assert, Value::Ref("u:2".into()), "cli", None)),
        );
        check(
            r#"{"entity":"e","attribute":"a","value":true}"#,
            Ok((Op::Assert, Value::Bool(true), "cli", None)),
        );
        // What `query --output json` prints loads back.
        check(
            r#"{"entity":"e","attribute":"a","value":{"type":"bytes-hex","value":"ff"},"tx":3,"recorded_at":"x"}"#,
            Ok((Op::Assert, Value::Bytes(vec![255]), "cli", None)),
        );
    }

    #[test]
    fn errors_name_the_line_and_field() {
        check("nope", Err("line 7: not JSON"));
        check("[1]", Err("line 7: must be a JSON object"));
        check(
            r#"{"attribute":"a","value":1}"#,
            Err(r#"line 7: field "entity": required"#),
        );
        check(
            r#"{"entity":"e","value":1}"#,
            Err(r#"field "attribute": required"#),
        );
        check(
            r#"{"entity":"e","attribute":"a"}"#,
            Err(r#"field "value": required"#),
        );
        check(
            r#"{"entity":"e","attribute":"a","value":"x","type":"int"}"#,
            Err(r#"field "value": value "x" is not an int"#),
        );
        check(
            r#"{"entity":"e","attribute":"a","value":1,"type":"num"}"#,
            Err(r#"field "type": "num" is not one of"#),
        );
        check(
            r#"{"entity":"e","attribute":"a","value":1,"confidence":1.5}"#,
            Err(r#"field "confidence": 1.5 is outside [0, 1]"#),
        );
        check(
            r#"{"entity":"e","attribute":"a","value":1,"op":"upsert"}"#,
            Err(r#"field "op": "upsert""#),
        );
        check(
            r#"{"entity":"e","attribute":"a","value":[1]}"#,
            Err(r#"field "value": must be a string"#),
        );
        check(
            r#"{"entity":5,"attribute":"a","value":1}"#,
            Err(r#"field "entity": must be a string"#),
        );
        check(
            r#"{"entity":"e","attribute":"a","value":1,"colour":"red"}"#,
            Err(r#"field "colour": unknown field"#),
        );
    }

    #[test]
    fn batch_keys_depend_on_offset_content_and_defaults() {
        let d = defaults();
        let k = batch_key(0, b"x\n", &d);
        assert_eq!(k, batch_key(0, b"x\n", &d), "deterministic");
        assert!(k.starts_with("stemectl-file:0:"));
        assert!(k.len() <= 256, "fits the server's key limit");
        assert_ne!(k, batch_key(2, b"x\n", &d));
        assert_ne!(k, batch_key(0, b"y\n", &d));
        assert_ne!(
            k,
            batch_key(
                0,
                b"x\n",
                &Defaults {
                    op: Op::Retract,
                    source: "cli".into()
                }
            )
        );
        assert_ne!(
            k,
            batch_key(
                0,
                b"x\n",
                &Defaults {
                    op: Op::Assert,
                    source: "other".into()
                }
            )
        );
    }
}
