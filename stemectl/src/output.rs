//! Rendering results as text or JSON.

use std::io::Write;

use serde_json::json;
use stemedb_client::{EntityView, Fact, Op, TxEvent, TxReceipt};

use crate::cli::Output;
use crate::timefmt::format_rfc3339;
use crate::value::{value_json, value_text};

fn op_name(op: Op) -> &'static str {
    match op {
        Op::Assert => "assert",
        Op::Retract => "retract",
    }
}

/// One fact as JSON.
pub fn fact_json(f: &Fact) -> serde_json::Value {
    json!({
        "entity": f.entity,
        "attribute": f.attribute,
        "value": value_json(&f.value),
        "source": f.source,
        "confidence": f.confidence,
        "op": op_name(f.op),
        "tx": f.tx,
        "recorded_at": format_rfc3339(f.recorded_at),
    })
}

/// One fact as a text line (without the entity when `with_entity` is false).
pub fn fact_line(f: &Fact, with_entity: bool) -> String {
    let mut line = format!("tx {:<8} {:<7} ", f.tx, op_name(f.op));
    if with_entity {
        line.push_str(&format!("{} ", f.entity));
    }
    line.push_str(&format!("{} = {}", f.attribute, value_text(&f.value)));
    if !f.source.is_empty() {
        line.push_str(&format!("  source={}", f.source));
    }
    if let Some(c) = f.confidence {
        line.push_str(&format!("  confidence={c}"));
    }
    line
}

/// Prints a transaction receipt.
pub fn receipt(out: &mut impl Write, format: Output, r: &TxReceipt) -> std::io::Result<()> {
    match format {
        Output::Json => writeln!(
            out,
            "{}",
            json!({"tx": r.tx, "recorded_at": format_rfc3339(r.recorded_at), "deduplicated": r.deduplicated})
        ),
        Output::Table => writeln!(
            out,
            "tx {} recorded at {}{}",
            r.tx,
            format_rfc3339(r.recorded_at),
            if r.deduplicated {
                " (deduplicated: already applied)"
            } else {
                ""
            }
        ),
    }
}

/// Prints an entity view.
pub fn entity_view(out: &mut impl Write, format: Output, v: &EntityView) -> std::io::Result<()> {
    match format {
        Output::Json => {
            let facts: Vec<_> = v.facts.iter().map(fact_json).collect();
            writeln!(
                out,
                "{}",
                json!({"entity": v.entity, "basis_tx": v.basis_tx, "facts": facts})
            )
        }
        Output::Table => {
            writeln!(
                out,
                "{} as of tx {}: {} fact(s)",
                v.entity,
                v.basis_tx,
                v.facts.len()
            )?;
            for f in &v.facts {
                writeln!(out, "  {}", fact_line(f, false))?;
            }
            Ok(())
        }
    }
}

/// Prints one fact of a stream (query, history).
pub fn streamed_fact(out: &mut impl Write, format: Output, f: &Fact) -> std::io::Result<()> {
    match format {
        Output::Json => writeln!(out, "{}", fact_json(f)),
        Output::Table => writeln!(out, "{}", fact_line(f, true)),
    }
}

/// Prints one watched transaction.
pub fn tx_event(out: &mut impl Write, format: Output, e: &TxEvent) -> std::io::Result<()> {
    match format {
        Output::Json => {
            let facts: Vec<_> = e.facts.iter().map(fact_json).collect();
            writeln!(
                out,
                "{}",
                json!({"tx": e.tx, "recorded_at": format_rfc3339(e.recorded_at), "facts": facts})
            )
        }
        Output::Table => {
            writeln!(
                out,
                "tx {} recorded at {}: {} fact(s)",
                e.tx,
                format_rfc3339(e.recorded_at),
                e.facts.len()
            )?;
            for f in &e.facts {
                writeln!(out, "  {}", fact_line(f, true))?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};
    use stemedb_client::Value;

    fn fact() -> Fact {
        Fact {
            entity: "user:1".into(),
            attribute: "name".into(),
            value: Value::Text("Ada".into()),
            source: "hr".into(),
            confidence: Some(0.9),
            op: Op::Assert,
            tx: 7,
            recorded_at: UNIX_EPOCH + Duration::from_secs(1),
        }
    }

    #[test]
    fn fact_renders_both_ways() {
        assert_eq!(
            fact_line(&fact(), true),
            "tx 7        assert  user:1 name = \"Ada\"  source=hr  confidence=0.9"
        );
        assert_eq!(
            fact_json(&fact()),
            json!({"entity": "user:1", "attribute": "name", "value": {"type": "text", "value": "Ada"},
                   "source": "hr", "confidence": 0.9, "op": "assert", "tx": 7, "recorded_at": "1970-01-01T00:00:01Z"})
        );
    }

    #[test]
    fn json_view_is_one_line() {
        let view = EntityView {
            entity: "user:1".into(),
            facts: vec![fact(), fact()],
            basis_tx: 9,
        };
        let mut out = Vec::new();
        entity_view(&mut out, Output::Json, &view).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.lines().count(), 1);
        let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed["basis_tx"], 9);
        assert_eq!(parsed["facts"].as_array().unwrap().len(), 2);
    }
}
