//! Conversions between the SDK's model and the protobuf wire types. This is
//! the only module besides `client` that knows the wire format.
//!
//! Requests convert infallibly (the server validates them). Responses
//! convert fallibly: a message that breaks the API contract becomes
//! [`Error::InvalidResponse`], never a panic.

use std::time::SystemTime;

use stemedb_proto::store::v1 as pb;

use crate::model::{
    Assertion, EntityView, Fact, FactPage, HistoryQuery, Op, Query, TxEvent, TxReceipt, Value,
};
use crate::Error;

pub(crate) fn value_to_pb(value: Value) -> pb::Value {
    use pb::value::Kind;
    let kind = match value {
        Value::Text(v) => Kind::Text(v),
        Value::Int64(v) => Kind::Int64(v),
        Value::Double(v) => Kind::Double(v),
        Value::Bool(v) => Kind::Bool(v),
        Value::Bytes(v) => Kind::Bytes(v),
        Value::Ref(v) => Kind::Ref(v),
        Value::Timestamp(v) => Kind::Timestamp(prost_types::Timestamp::from(v)),
    };
    pb::Value { kind: Some(kind) }
}

pub(crate) fn value_from_pb(value: Option<pb::Value>) -> Result<Value, Error> {
    use pb::value::Kind;
    let kind = value
        .and_then(|v| v.kind)
        .ok_or_else(|| Error::InvalidResponse("fact has no value".into()))?;
    Ok(match kind {
        Kind::Text(v) => Value::Text(v),
        Kind::Int64(v) => Value::Int64(v),
        Kind::Double(v) => Value::Double(v),
        Kind::Bool(v) => Value::Bool(v),
        Kind::Bytes(v) => Value::Bytes(v),
        Kind::Ref(v) => Value::Ref(v),
        Kind::Timestamp(t) => Value::Timestamp(time_from_pb(Some(t), "value.timestamp")?),
    })
}

pub(crate) fn op_to_pb(op: Op) -> pb::Op {
    match op {
        Op::Assert => pb::Op::Assert,
        Op::Retract => pb::Op::Retract,
    }
}

pub(crate) fn op_from_pb(op: i32) -> Result<Op, Error> {
    match pb::Op::try_from(op) {
        // The API defines OP_UNSPECIFIED as OP_ASSERT.
        Ok(pb::Op::Unspecified) | Ok(pb::Op::Assert) => Ok(Op::Assert),
        Ok(pb::Op::Retract) => Ok(Op::Retract),
        Err(_) => Err(Error::InvalidResponse(format!("fact has unknown op {op}"))),
    }
}

fn time_from_pb(t: Option<prost_types::Timestamp>, field: &str) -> Result<SystemTime, Error> {
    let t = t.ok_or_else(|| Error::InvalidResponse(format!("{field} is missing")))?;
    SystemTime::try_from(t)
        .map_err(|e| Error::InvalidResponse(format!("{field} is out of range: {e}")))
}

pub(crate) fn assertion_to_pb(a: Assertion) -> pb::Assertion {
    pb::Assertion {
        entity: a.entity,
        attribute: a.attribute,
        value: Some(value_to_pb(a.value)),
        source: a.source,
        confidence: a.confidence,
        op: op_to_pb(a.op) as i32,
    }
}

pub(crate) fn fact_from_pb(f: pb::Fact) -> Result<Fact, Error> {
    Ok(Fact {
        value: value_from_pb(f.value)?,
        op: op_from_pb(f.op)?,
        recorded_at: time_from_pb(f.recorded_at, "fact.recorded_at")?,
        entity: f.entity,
        attribute: f.attribute,
        source: f.source,
        confidence: f.confidence,
        tx: f.tx,
    })
}

/// The inverse of [`fact_from_pb`], for round-trip tests.
#[cfg(test)]
fn fact_to_pb(f: Fact) -> pb::Fact {
    pb::Fact {
        entity: f.entity,
        attribute: f.attribute,
        value: Some(value_to_pb(f.value)),
        source: f.source,
        confidence: f.confidence,
        op: op_to_pb(f.op) as i32,
        tx: f.tx,
        recorded_at: Some(prost_types::Timestamp::from(f.recorded_at)),
    }
}

fn facts_from_pb(facts: Vec<pb::Fact>) -> Result<Vec<Fact>, Error> {
    facts.into_iter().map(fact_from_pb).collect()
}

pub(crate) fn receipt_from_pb(r: pb::TransactResponse) -> Result<TxReceipt, Error> {
    if r.tx == 0 {
        return Err(Error::InvalidResponse("transact returned tx 0".into()));
    }
    Ok(TxReceipt {
        tx: r.tx,
        recorded_at: time_from_pb(r.recorded_at, "transact.recorded_at")?,
        deduplicated: r.deduplicated,
    })
}

pub(crate) fn entity_view_from_pb(r: pb::GetResponse) -> Result<EntityView, Error> {
    Ok(EntityView {
        entity: r.entity,
        facts: facts_from_pb(r.facts)?,
        basis_tx: r.basis_tx,
    })
}

fn page_token(token: String) -> Option<String> {
    // The API marks the last page with an empty token.
    (!token.is_empty()).then_some(token)
}

pub(crate) fn query_page_from_pb(r: pb::QueryResponse) -> Result<FactPage, Error> {
    Ok(FactPage {
        facts: facts_from_pb(r.facts)?,
        next_page_token: page_token(r.next_page_token),
        basis_tx: r.basis_tx,
    })
}

pub(crate) fn history_page_from_pb(r: pb::HistoryResponse) -> Result<FactPage, Error> {
    Ok(FactPage {
        facts: facts_from_pb(r.facts)?,
        next_page_token: page_token(r.next_page_token),
        basis_tx: 0,
    })
}

pub(crate) fn tx_event_from_pb(r: pb::WatchResponse) -> Result<TxEvent, Error> {
    Ok(TxEvent {
        tx: r.tx,
        recorded_at: time_from_pb(r.recorded_at, "watch.recorded_at")?,
        facts: facts_from_pb(r.facts)?,
    })
}

pub(crate) fn query_to_pb(q: Query, page_token: Option<String>) -> pb::QueryRequest {
    pb::QueryRequest {
        attribute: q.attribute,
        value: q.value.map(value_to_pb),
        source: q.source,
        as_of_tx: q.as_of_tx,
        limit: q.page_size,
        page_token: page_token.unwrap_or_default(),
    }
}

pub(crate) fn history_to_pb(h: HistoryQuery, page_token: Option<String>) -> pb::HistoryRequest {
    pb::HistoryRequest {
        entity: h.entity,
        attribute: h.attribute,
        since_tx: h.since_tx,
        until_tx: h.until_tx,
        limit: h.page_size,
        page_token: page_token.unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn all_values() -> Vec<Value> {
        vec![
            Value::Text("Ada Lovelace".into()),
            Value::Text(String::new()),
            Value::Int64(i64::MIN),
            Value::Int64(-1),
            Value::Int64(i64::MAX),
            Value::Double(0.1),
            Value::Double(-0.0),
            Value::Double(f64::MAX),
            Value::Bool(true),
            Value::Bool(false),
            Value::Bytes(vec![]),
            Value::Bytes(vec![0, 1, 254, 255]),
            Value::Ref("user:2".into()),
            Value::Timestamp(UNIX_EPOCH),
            Value::Timestamp(UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789)),
            Value::Timestamp(UNIX_EPOCH - Duration::new(86_400, 500)),
        ]
    }

    fn check_fact_round_trip(fact: Fact) {
        let wire = fact_to_pb(fact.clone());
        assert_eq!(fact_from_pb(wire).expect("valid fact"), fact);
    }

    #[test]
    fn values_round_trip() {
        for v in all_values() {
            assert_eq!(value_from_pb(Some(value_to_pb(v.clone()))).unwrap(), v);
        }
    }

    #[test]
    fn facts_round_trip() {
        for (i, v) in all_values().into_iter().enumerate() {
            check_fact_round_trip(Fact {
                entity: format!("e{i}"),
                attribute: "a".into(),
                value: v,
                source: "src".into(),
                confidence: if i % 2 == 0 { Some(0.5) } else { None },
                op: if i % 3 == 0 { Op::Retract } else { Op::Assert },
                tx: i as u64 + 1,
                recorded_at: UNIX_EPOCH + Duration::from_micros(1_700_000_000_000_000 + i as u64),
            });
        }
    }

    #[test]
    fn assertion_maps_every_field() {
        let a = Assertion::retract("e", "a", 7i64)
            .source("s")
            .confidence(0.25);
        let wire = assertion_to_pb(a);
        assert_eq!(wire.entity, "e");
        assert_eq!(wire.attribute, "a");
        assert_eq!(wire.source, "s");
        assert_eq!(wire.confidence, Some(0.25));
        assert_eq!(wire.op, pb::Op::Retract as i32);
        assert_eq!(wire.value, Some(value_to_pb(Value::Int64(7))));
        assert_eq!(
            assertion_to_pb(Assertion::assert("e", "a", true)).op,
            pb::Op::Assert as i32
        );
    }

    #[test]
    fn unspecified_op_reads_as_assert() {
        assert_eq!(op_from_pb(pb::Op::Unspecified as i32).unwrap(), Op::Assert);
        assert!(matches!(op_from_pb(99), Err(Error::InvalidResponse(_))));
    }

    #[test]
    fn broken_responses_are_rejected() {
        let good = fact_to_pb(Fact {
            entity: "e".into(),
            attribute: "a".into(),
            value: Value::Bool(true),
            source: String::new(),
            confidence: None,
            op: Op::Assert,
            tx: 1,
            recorded_at: UNIX_EPOCH,
        });
        let no_value = pb::Fact {
            value: None,
            ..good.clone()
        };
        let empty_value = pb::Fact {
            value: Some(pb::Value { kind: None }),
            ..good.clone()
        };
        let no_time = pb::Fact {
            recorded_at: None,
            ..good.clone()
        };
        for bad in [no_value, empty_value, no_time] {
            assert!(matches!(fact_from_pb(bad), Err(Error::InvalidResponse(_))));
        }
        let zero_tx = pb::TransactResponse {
            tx: 0,
            recorded_at: Some(UNIX_EPOCH.into()),
            deduplicated: false,
        };
        assert!(matches!(
            receipt_from_pb(zero_tx),
            Err(Error::InvalidResponse(_))
        ));
    }

    #[test]
    fn empty_page_token_means_last_page() {
        let last = query_page_from_pb(pb::QueryResponse {
            facts: vec![],
            next_page_token: String::new(),
            basis_tx: 4,
        })
        .unwrap();
        assert_eq!(last.next_page_token, None);
        assert_eq!(last.basis_tx, 4);
        let more = history_page_from_pb(pb::HistoryResponse {
            facts: vec![],
            next_page_token: "t".into(),
        })
        .unwrap();
        assert_eq!(more.next_page_token.as_deref(), Some("t"));
    }

    #[test]
    fn requests_carry_page_tokens_and_bounds() {
        let q = query_to_pb(
            Query::attribute("a")
                .value(1i64)
                .source("s")
                .as_of(3)
                .page_size(10),
            Some("tok".into()),
        );
        assert_eq!(
            q,
            pb::QueryRequest {
                attribute: "a".into(),
                value: Some(value_to_pb(Value::Int64(1))),
                source: Some("s".into()),
                as_of_tx: Some(3),
                limit: 10,
                page_token: "tok".into(),
            }
        );
        let h = history_to_pb(
            HistoryQuery::entity("e").attribute("a").since(2).until(5),
            None,
        );
        assert_eq!(h.since_tx, Some(2));
        assert_eq!(h.until_tx, Some(5));
        assert_eq!(h.attribute.as_deref(), Some("a"));
        assert_eq!(h.page_token, "");
    }
}
