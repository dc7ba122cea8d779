//! Domain types of the assertion store. These are not protobuf types: the
//! gRPC layer converts at its boundary.

/// A value of a fact. Claims are identified by the *encoded* value
/// (see `keys`), so two doubles are the same value only when their bits are
/// equal: `0.0` and `-0.0` are distinct claims, a NaN matches only the same NaN.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Text(String),
    Int64(i64),
    Double(f64),
    Bool(bool),
    Bytes(Vec<u8>),
    /// The id of another entity.
    Ref(String),
    Timestamp {
        seconds: i64,
        nanos: i32,
    },
}

impl Value {
    /// The documented order of values, which query results follow: by kind
    /// (text < int64 < double < bool < bytes < ref < timestamp), then
    /// naturally within a kind (doubles by `f64::total_cmp`). The key
    /// encoding in `keys.rs` must sort exactly like this; its tests check it.
    pub fn documented_cmp(&self, other: &Value) -> std::cmp::Ordering {
        fn rank(v: &Value) -> u8 {
            match v {
                Value::Text(_) => 1,
                Value::Int64(_) => 2,
                Value::Double(_) => 3,
                Value::Bool(_) => 4,
                Value::Bytes(_) => 5,
                Value::Ref(_) => 6,
                Value::Timestamp { .. } => 7,
            }
        }
        match (self, other) {
            (Value::Text(x), Value::Text(y)) | (Value::Ref(x), Value::Ref(y)) => x.cmp(y),
            (Value::Int64(x), Value::Int64(y)) => x.cmp(y),
            (Value::Double(x), Value::Double(y)) => x.total_cmp(y),
            (Value::Bool(x), Value::Bool(y)) => x.cmp(y),
            (Value::Bytes(x), Value::Bytes(y)) => x.cmp(y),
            (
                Value::Timestamp {
                    seconds: s1,
                    nanos: n1,
                },
                Value::Timestamp {
                    seconds: s2,
                    nanos: n2,
                },
            ) => (s1, n1).cmp(&(s2, n2)),
            _ => rank(self).cmp(&rank(other)),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Assert,
    Retract,
}

/// One claim `(entity, attribute, value, source)` being asserted or retracted.
#[derive(Clone, Debug, PartialEq)]
pub struct Assertion {
    pub entity: String,
    pub attribute: String,
    pub value: Value,
    pub source: String,
    pub confidence: Option<f64>,
    pub op: Op,
}

/// An assertion plus the transaction that made it durable.
#[derive(Clone, Debug, PartialEq)]
pub struct Fact {
    pub assertion: Assertion,
    pub tx: u64,
    pub recorded_at_micros: i64,
}

/// The WAL record of one transaction (see `codec`).
#[derive(Clone, Debug, PartialEq)]
pub struct TxRecord {
    pub idempotency_key: Option<String>,
    pub recorded_at_micros: i64,
    pub assertions: Vec<Assertion>,
}

/// What `Store::apply` did with one record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApplyOutcome {
    Applied {
        tx: u64,
        recorded_at_micros: i64,
    },
    /// The idempotency key was already applied by `original_tx`; this record
    /// consumed its LSN but added nothing.
    Duplicate {
        original_tx: u64,
        recorded_at_micros: i64,
    },
}

/// Parameters of `Store::query`. `limit` is clamped by the caller to `1..=max`.
#[derive(Clone, Debug, PartialEq)]
pub struct QueryParams {
    pub attribute: String,
    pub value: Option<Value>,
    pub source: Option<String>,
    pub as_of_tx: Option<u64>,
    pub limit: usize,
}

/// Parameters of `Store::history`. Bounds on tx are inclusive.
#[derive(Clone, Debug, PartialEq)]
pub struct HistoryParams {
    pub entity: String,
    pub attribute: Option<String>,
    pub since_tx: Option<u64>,
    pub until_tx: Option<u64>,
    pub limit: usize,
}

/// One page of a query or history answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Page {
    pub facts: Vec<Fact>,
    /// `None` when there are no more pages.
    pub next_page_token: Option<String>,
    /// The transaction this answer reflects (fixed by the first page).
    pub basis_tx: u64,
}

/// One committed transaction, for Watch catch-up.
#[derive(Clone, Debug, PartialEq)]
pub struct TxEntry {
    pub tx: u64,
    pub recorded_at_micros: i64,
    pub facts: Vec<Fact>,
}
