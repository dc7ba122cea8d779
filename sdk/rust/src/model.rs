//! The SDK's domain types. They are not protobuf types: `convert` maps them
//! to and from the wire at the boundary.

use std::time::SystemTime;

/// A value held by a fact. Exactly one kind.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// UTF-8 text.
    Text(String),
    /// A signed 64-bit integer.
    Int64(i64),
    /// A 64-bit float. The server rejects NaN and infinities.
    Double(f64),
    /// A boolean.
    Bool(bool),
    /// Opaque bytes.
    Bytes(Vec<u8>),
    /// The id of another entity.
    Ref(String),
    /// A point in time.
    Timestamp(SystemTime),
}

impl Value {
    /// A reference to the entity `id`.
    pub fn reference(id: impl Into<String>) -> Self {
        Value::Ref(id.into())
    }

    /// The kind's name, as `stemectl --type` spells it.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Value::Text(_) => "text",
            Value::Int64(_) => "int",
            Value::Double(_) => "double",
            Value::Bool(_) => "bool",
            Value::Bytes(_) => "bytes",
            Value::Ref(_) => "ref",
            Value::Timestamp(_) => "timestamp",
        }
    }
}

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(v.to_string())
    }
}

impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(v)
    }
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int64(v)
    }
}

impl From<&String> for Value {
    fn from(v: &String) -> Self {
        Value::Text(v.clone())
    }
}

/// Lets unsuffixed integer literals (which default to `i32`) be values.
impl From<i32> for Value {
    fn from(v: i32) -> Self {
        Value::Int64(i64::from(v))
    }
}

impl From<&[u8]> for Value {
    fn from(v: &[u8]) -> Self {
        Value::Bytes(v.to_vec())
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Double(v)
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Bool(v)
    }
}

impl From<Vec<u8>> for Value {
    fn from(v: Vec<u8>) -> Self {
        Value::Bytes(v)
    }
}

impl From<SystemTime> for Value {
    fn from(v: SystemTime) -> Self {
        Value::Timestamp(v)
    }
}

/// Whether an assertion claims or withdraws a fact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Op {
    /// The source claims the fact.
    #[default]
    Assert,
    /// The source withdraws an earlier claim of the fact.
    Retract,
}

/// One claim to write: `(entity, attribute, value)` by `source`.
///
/// ```
/// use stemedb_client::{Assertion, Value};
/// let a = Assertion::assert("user:1", "name", "Ada").source("hr").confidence(0.9);
/// assert_eq!(a.source, "hr");
/// let b = Assertion::assert("user:1", "age", 36);
/// assert_eq!(b.value, Value::Int64(36));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Assertion {
    /// The entity the claim is about.
    pub entity: String,
    /// The attribute claimed.
    pub attribute: String,
    /// The claimed value.
    pub value: Value,
    /// Who makes the claim. Empty until set with [`Assertion::source`].
    pub source: String,
    /// How sure the source is, in `[0, 1]`; `None` when unstated.
    pub confidence: Option<f64>,
    /// Assert or retract.
    pub op: Op,
}

impl Assertion {
    /// An assertion of `(entity, attribute, value)`, with an empty source.
    pub fn assert(
        entity: impl Into<String>,
        attribute: impl Into<String>,
        value: impl Into<Value>,
    ) -> Self {
        Assertion {
            entity: entity.into(),
            attribute: attribute.into(),
            value: value.into(),
            source: String::new(),
            confidence: None,
            op: Op::Assert,
        }
    }

    /// A retraction of `(entity, attribute, value)`, with an empty source.
    pub fn retract(
        entity: impl Into<String>,
        attribute: impl Into<String>,
        value: impl Into<Value>,
    ) -> Self {
        Assertion {
            op: Op::Retract,
            ..Assertion::assert(entity, attribute, value)
        }
    }

    /// Sets the source making the claim.
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.source = source.into();
        self
    }

    /// Sets the confidence. The server rejects values outside `[0, 1]`.
    pub fn confidence(mut self, confidence: f64) -> Self {
        self.confidence = Some(confidence);
        self
    }
}

/// An assertion as recorded by the store, with the transaction that made it
/// durable.
#[derive(Debug, Clone, PartialEq)]
pub struct Fact {
    /// The entity the claim is about.
    pub entity: String,
    /// The attribute claimed.
    pub attribute: String,
    /// The claimed value.
    pub value: Value,
    /// Who made the claim.
    pub source: String,
    /// How sure the source was; `None` when unstated.
    pub confidence: Option<f64>,
    /// Assert or retract.
    pub op: Op,
    /// The transaction that recorded the claim.
    pub tx: u64,
    /// When that transaction was recorded.
    pub recorded_at: SystemTime,
}

/// The server's acknowledgement of a durable transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxReceipt {
    /// The transaction id.
    pub tx: u64,
    /// When the transaction was recorded.
    pub recorded_at: SystemTime,
    /// True when the idempotency key had been seen before: nothing new was
    /// written and `tx` is the original transaction.
    pub deduplicated: bool,
}

/// Every live claim about one entity, as of `basis_tx`.
#[derive(Debug, Clone, PartialEq)]
pub struct EntityView {
    /// The entity asked about.
    pub entity: String,
    /// Its live claims.
    pub facts: Vec<Fact>,
    /// The transaction this answer reflects.
    pub basis_tx: u64,
}

/// One page of a query or history answer.
#[derive(Debug, Clone, PartialEq)]
pub struct FactPage {
    /// The facts on this page.
    pub facts: Vec<Fact>,
    /// The token for the next page; `None` on the last page.
    pub next_page_token: Option<String>,
    /// The transaction a query page reflects. Always 0 for history pages:
    /// the History RPC does not report one.
    pub basis_tx: u64,
}

/// One transaction delivered by [`Client::watch`](crate::Client::watch).
#[derive(Debug, Clone, PartialEq)]
pub struct TxEvent {
    /// The transaction id.
    pub tx: u64,
    /// When the transaction was recorded.
    pub recorded_at: SystemTime,
    /// The facts the transaction recorded.
    pub facts: Vec<Fact>,
}

/// Live claims for one attribute, optionally narrowed to a value or source.
///
/// ```
/// use stemedb_client::Query;
/// let q = Query::attribute("name").value("Ada").source("hr").as_of(42).page_size(100);
/// assert_eq!(q.as_of_tx, Some(42));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    /// The attribute to match.
    pub attribute: String,
    /// Only facts with this value, when set.
    pub value: Option<Value>,
    /// Only facts from this source, when set.
    pub source: Option<String>,
    /// Answer as of this transaction; `None` means the latest.
    pub as_of_tx: Option<u64>,
    /// Facts per page; 0 lets the server choose.
    pub page_size: u32,
}

impl Query {
    /// A query for every live claim of `attribute`.
    pub fn attribute(attribute: impl Into<String>) -> Self {
        Query {
            attribute: attribute.into(),
            value: None,
            source: None,
            as_of_tx: None,
            page_size: 0,
        }
    }

    /// Only facts with this value.
    pub fn value(mut self, value: impl Into<Value>) -> Self {
        self.value = Some(value.into());
        self
    }

    /// Only facts from this source.
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// Answer as of transaction `tx`.
    pub fn as_of(mut self, tx: u64) -> Self {
        self.as_of_tx = Some(tx);
        self
    }

    /// Facts per page; 0 lets the server choose.
    pub fn page_size(mut self, page_size: u32) -> Self {
        self.page_size = page_size;
        self
    }
}

/// Assertions and retractions of one entity, in tx order.
///
/// ```
/// use stemedb_client::HistoryQuery;
/// let h = HistoryQuery::entity("user:1").attribute("name").since(3).until(9).page_size(50);
/// assert_eq!((h.since_tx, h.until_tx), (Some(3), Some(9)));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryQuery {
    /// The entity whose history to read.
    pub entity: String,
    /// Only this attribute, when set.
    pub attribute: Option<String>,
    /// Inclusive lower bound on tx.
    pub since_tx: Option<u64>,
    /// Inclusive upper bound on tx.
    pub until_tx: Option<u64>,
    /// Facts per page; 0 lets the server choose.
    pub page_size: u32,
}

impl HistoryQuery {
    /// The whole history of `entity`.
    pub fn entity(entity: impl Into<String>) -> Self {
        HistoryQuery {
            entity: entity.into(),
            attribute: None,
            since_tx: None,
            until_tx: None,
            page_size: 0,
        }
    }

    /// Only this attribute.
    pub fn attribute(mut self, attribute: impl Into<String>) -> Self {
        self.attribute = Some(attribute.into());
        self
    }

    /// Only transactions `>= tx`.
    pub fn since(mut self, tx: u64) -> Self {
        self.since_tx = Some(tx);
        self
    }

    /// Only transactions `<= tx`.
    pub fn until(mut self, tx: u64) -> Self {
        self.until_tx = Some(tx);
        self
    }

    /// Facts per page; 0 lets the server choose.
    pub fn page_size(mut self, page_size: u32) -> Self {
        self.page_size = page_size;
        self
    }
}
