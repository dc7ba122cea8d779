//! Typed values on the command line and in output.

use clap::ValueEnum;
use serde_json::json;
use stemedb_client::Value;

use crate::timefmt;

/// How to read a VALUE argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ValueType {
    /// UTF-8 text (the default).
    Text,
    /// A signed 64-bit integer.
    Int,
    /// A finite 64-bit float.
    Double,
    /// `true` or `false`.
    Bool,
    /// The id of another entity.
    Ref,
    /// Bytes written as hex, e.g. `00ff10` (an optional `0x` prefix is allowed).
    BytesHex,
    /// RFC 3339 (`2024-05-01T12:00:00Z`) or seconds since the epoch.
    Timestamp,
}

/// Reads `raw` as a value of kind `ty`. Errors name the type and the input.
pub fn parse_value(raw: &str, ty: ValueType) -> Result<Value, String> {
    Ok(match ty {
        ValueType::Text => Value::Text(raw.to_string()),
        ValueType::Int => Value::Int64(
            raw.parse()
                .map_err(|e| format!("value {raw:?} is not an int: {e}"))?,
        ),
        ValueType::Double => {
            let v: f64 = raw
                .parse()
                .map_err(|e| format!("value {raw:?} is not a double: {e}"))?;
            if !v.is_finite() {
                return Err(format!("value {raw:?} is not a finite double"));
            }
            Value::Double(v)
        }
        ValueType::Bool => Value::Bool(match raw {
            "true" => true,
            "false" => false,
            _ => return Err(format!("value {raw:?} is not a bool (use true or false)")),
        }),
        ValueType::Ref => Value::Ref(raw.to_string()),
        ValueType::BytesHex => Value::Bytes(parse_hex(raw)?),
        ValueType::Timestamp => Value::Timestamp(timefmt::parse_timestamp(raw)?),
    })
}

fn parse_hex(raw: &str) -> Result<Vec<u8>, String> {
    let digits = raw.strip_prefix("0x").unwrap_or(raw);
    if digits.len() % 2 != 0 {
        return Err(format!("value {raw:?} has an odd number of hex digits"));
    }
    (0..digits.len())
        .step_by(2)
        .map(|i| {
            digits
                .get(i..i + 2)
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
                .ok_or_else(|| format!("value {raw:?} is not hex"))
        })
        .collect()
}

/// Lowercase hex, no prefix.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A value for humans: text quoted, refs as `@id`, bytes as `0x…`.
pub fn value_text(v: &Value) -> String {
    match v {
        Value::Text(s) => format!("{s:?}"),
        Value::Int64(i) => i.to_string(),
        Value::Double(d) => format!("{d:?}"),
        Value::Bool(b) => b.to_string(),
        Value::Bytes(b) => format!("0x{}", to_hex(b)),
        Value::Ref(r) => format!("@{r}"),
        Value::Timestamp(t) => timefmt::format_rfc3339(*t),
    }
}

/// A value for machines: `{"type": "int", "value": 42}`. Bytes are hex,
/// timestamps RFC 3339; `type` uses the `--type` names.
pub fn value_json(v: &Value) -> serde_json::Value {
    let (ty, value) = match v {
        Value::Text(s) => ("text", json!(s)),
        Value::Int64(i) => ("int", json!(i)),
        Value::Double(d) => ("double", json!(d)),
        Value::Bool(b) => ("bool", json!(b)),
        Value::Bytes(b) => ("bytes-hex", json!(to_hex(b))),
        Value::Ref(r) => ("ref", json!(r)),
        Value::Timestamp(t) => ("timestamp", json!(timefmt::format_rfc3339(*t))),
    };
    json!({ "type": ty, "value": value })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn parses_each_type() {
        let cases = [
            ("Ada", ValueType::Text, Value::Text("Ada".into())),
            ("-42", ValueType::Int, Value::Int64(-42)),
            ("2.5", ValueType::Double, Value::Double(2.5)),
            ("true", ValueType::Bool, Value::Bool(true)),
            ("user:2", ValueType::Ref, Value::Ref("user:2".into())),
            (
                "0x00ff10",
                ValueType::BytesHex,
                Value::Bytes(vec![0, 255, 16]),
            ),
            ("", ValueType::BytesHex, Value::Bytes(vec![])),
            (
                "1970-01-01T00:00:01Z",
                ValueType::Timestamp,
                Value::Timestamp(UNIX_EPOCH + Duration::from_secs(1)),
            ),
        ];
        for (raw, ty, want) in cases {
            assert_eq!(parse_value(raw, ty), Ok(want), "{raw} as {ty:?}");
        }
    }

    #[test]
    fn rejects_malformed_values() {
        let cases = [
            ("4.2", ValueType::Int),
            ("NaN", ValueType::Double),
            ("yes", ValueType::Bool),
            ("abc", ValueType::BytesHex),
            ("zz", ValueType::BytesHex),
            ("now", ValueType::Timestamp),
        ];
        for (raw, ty) in cases {
            assert!(parse_value(raw, ty).is_err(), "{raw} as {ty:?}");
        }
    }

    #[test]
    fn renders_values() {
        assert_eq!(value_text(&Value::Bytes(vec![1, 171])), "0x01ab");
        assert_eq!(value_text(&Value::Ref("u".into())), "@u");
        assert_eq!(
            value_text(&Value::Text("a \"b\"".into())),
            "\"a \\\"b\\\"\""
        );
        assert_eq!(
            value_json(&Value::Int64(7)),
            json!({"type": "int", "value": 7})
        );
        assert_eq!(
            value_json(&Value::Bytes(vec![255])),
            json!({"type": "bytes-hex", "value": "ff"})
        );
        // What value_json prints, parse_value reads back.
        for v in [
            Value::Int64(-1),
            Value::Double(0.1),
            Value::Bool(false),
            Value::Bytes(vec![9, 8]),
        ] {
            let j = value_json(&v);
            let raw = match &j["value"] {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let ty = ValueType::from_str(j["type"].as_str().unwrap(), false).unwrap();
            assert_eq!(parse_value(&raw, ty), Ok(v));
        }
    }
}
