//! Stage 1 of the write path: validate a transaction against the named
//! limits of `[limits]`. Every error names the assertion's index, the field
//! and the limit, so that a client can fix its request without guessing.

use crate::config::Limits;
use crate::store::{Assertion, Value};

/// A validation failure, returned to the client as INVALID_ARGUMENT.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

pub fn transaction(
    assertions: &[Assertion],
    idempotency_key: Option<&str>,
    limits: &Limits,
) -> Result<(), Invalid> {
    if assertions.is_empty() {
        return Err(Invalid(
            "assertions: a transaction needs at least 1 assertion".into(),
        ));
    }
    if assertions.len() > limits.assertions_per_tx_max {
        return Err(Invalid(format!(
            "assertions: {} assertions exceed assertions_per_tx_max ({})",
            assertions.len(),
            limits.assertions_per_tx_max
        )));
    }
    if let Some(key) = idempotency_key {
        if key.len() > limits.idempotency_key_bytes_max {
            return Err(Invalid(format!(
                "idempotency_key: {} bytes exceed idempotency_key_bytes_max ({})",
                key.len(),
                limits.idempotency_key_bytes_max
            )));
        }
    }
    for (i, a) in assertions.iter().enumerate() {
        assertion(i, a, limits)?;
    }
    Ok(())
}

fn assertion(i: usize, a: &Assertion, limits: &Limits) -> Result<(), Invalid> {
    name(i, "entity", &a.entity, limits)?;
    name(i, "attribute", &a.attribute, limits)?;
    name(i, "source", &a.source, limits)?;
    value(i, &a.value, limits)?;
    if let Some(c) = a.confidence {
        if !c.is_finite() || !(0.0..=1.0).contains(&c) {
            return Err(Invalid(format!(
                "assertions[{i}].confidence: {c} is not a finite number in [0, 1]"
            )));
        }
    }
    Ok(())
}

fn name(i: usize, field: &str, s: &str, limits: &Limits) -> Result<(), Invalid> {
    if s.is_empty() {
        return Err(Invalid(format!("assertions[{i}].{field}: required")));
    }
    if s.len() > limits.name_bytes_max {
        return Err(Invalid(format!(
            "assertions[{i}].{field}: {} bytes exceed name_bytes_max ({})",
            s.len(),
            limits.name_bytes_max
        )));
    }
    Ok(())
}

fn value(i: usize, v: &Value, limits: &Limits) -> Result<(), Invalid> {
    let too_long = |len: usize| {
        Invalid(format!(
            "assertions[{i}].value: {len} bytes exceed value_bytes_max ({})",
            limits.value_bytes_max
        ))
    };
    match v {
        Value::Text(s) if s.len() > limits.value_bytes_max => Err(too_long(s.len())),
        Value::Bytes(b) if b.len() > limits.value_bytes_max => Err(too_long(b.len())),
        Value::Ref(r) if r.is_empty() => Err(Invalid(format!(
            "assertions[{i}].value.ref: an entity id is required"
        ))),
        Value::Ref(r) if r.len() > limits.name_bytes_max => Err(Invalid(format!(
            "assertions[{i}].value.ref: {} bytes exceed name_bytes_max ({})",
            r.len(),
            limits.name_bytes_max
        ))),
        Value::Double(d) if !d.is_finite() => Err(Invalid(format!(
            "assertions[{i}].value.double: {d} is not finite"
        ))),
        Value::Timestamp { nanos, .. } if !(0..1_000_000_000).contains(nanos) => Err(Invalid(
            format!("assertions[{i}].value.timestamp.nanos: {nanos} is outside [0, 999999999]"),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Op;

    fn a(entity: &str, value: Value) -> Assertion {
        Assertion {
            entity: entity.into(),
            attribute: "attr".into(),
            value,
            source: "src".into(),
            confidence: None,
            op: Op::Assert,
        }
    }

    fn check(assertions: &[Assertion], expect: Option<&str>) {
        let got = transaction(assertions, None, &Limits::default());
        match (got, expect) {
            (Ok(()), None) => {}
            (Err(e), Some(want)) => assert!(e.0.contains(want), "{} lacks {want}", e.0),
            (got, want) => panic!("got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn limits_at_the_boundary_and_one_past() {
        let l = Limits::default();
        let max_name = "e".repeat(l.name_bytes_max);
        check(&[a(&max_name, Value::Int64(1))], None);
        check(
            &[a(&format!("{max_name}e"), Value::Int64(1))],
            Some("assertions[0].entity: 513 bytes exceed name_bytes_max (512)"),
        );
        check(&[a("e", Value::Text("v".repeat(l.value_bytes_max)))], None);
        check(
            &[
                a("e", Value::Int64(1)),
                a("e", Value::Bytes(vec![0; l.value_bytes_max + 1])),
            ],
            Some("assertions[1].value: 65537 bytes exceed value_bytes_max (65536)"),
        );
        let many: Vec<_> = (0..l.assertions_per_tx_max)
            .map(|_| a("e", Value::Bool(true)))
            .collect();
        check(&many, None);
        let mut too_many = many.clone();
        too_many.push(a("e", Value::Bool(true)));
        check(&too_many, Some("exceed assertions_per_tx_max (10000)"));
    }

    #[test]
    fn confidence_must_be_finite_in_unit_interval() {
        for (c, ok) in [
            (0.0, true),
            (1.0, true),
            (1.0000001, false),
            (-0.0001, false),
            (f64::NAN, false),
            (f64::INFINITY, false),
        ] {
            let mut x = a("e", Value::Int64(1));
            x.confidence = Some(c);
            check(
                &[x],
                if ok {
                    None
                } else {
                    Some("assertions[0].confidence")
                },
            );
        }
    }

    #[test]
    fn required_fields_are_named() {
        check(&[], Some("at least 1 assertion"));
        check(
            &[a("", Value::Int64(1))],
            Some("assertions[0].entity: required"),
        );
        let mut x = a("e", Value::Int64(1));
        x.source.clear();
        check(&[x], Some("assertions[0].source: required"));
        check(&[a("e", Value::Double(f64::NAN))], Some("value.double"));
        check(&[a("e", Value::Ref(String::new()))], Some("value.ref"));
    }
}
