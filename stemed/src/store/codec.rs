//! The WAL record of one transaction: what stemed appends to walld and what
//! `Store::apply` consumes on replay. The record is self-checking (magic,
//! version, CRC32C) so a record from another program or a torn write is
//! rejected as `StoreError::Corrupt` instead of being applied.

use super::error::{corrupt, StoreError};
use super::model::{Assertion, Op, TxRecord, Value};

pub(crate) const TX_MAGIC: u8 = 0xA7;
pub(crate) const TX_VERSION: u8 = 1;
const FLAG_IDEMPOTENCY_KEY: u8 = 0b0000_0001;
const FLAG_CONFIDENCE: u8 = 0b0000_0001;

/// The smallest possible encoded assertion: op, three empty strings,
/// confidence flag, and a Bool value. Used to bound `Vec::with_capacity`
/// when decoding untrusted bytes.
const ASSERTION_BYTES_MIN: usize = 1 + 4 * 3 + 1 + 2;
const HEADER_BYTES: usize = 1 + 1 + 1 + 8;
const CRC_BYTES: usize = 4;

const TAG_TEXT: u8 = 1;
const TAG_INT64: u8 = 2;
const TAG_DOUBLE: u8 = 3;
const TAG_BOOL: u8 = 4;
const TAG_BYTES: u8 = 5;
const TAG_REF: u8 = 6;
const TAG_TIMESTAMP: u8 = 7;

// Format: { magic u8 = 0xA7 | version u8 = 1 | flags u8 (bit 0: idempotency key present)
//         | recorded_at_micros i64 BE | [key_len u32 BE | key utf8]
//         | count u32 BE | assertion * count | crc32c u32 BE (of every byte before it) }
// assertion: { op u8 (1 assert, 2 retract) | entity str | attribute str | source str
//            | conf_flag u8 | [confidence f64 bits BE] | value }
// str: { len u32 BE | utf8 bytes }
// value: { tag u8 | payload } with payload by tag: 1 text str, 2 int64 i64 BE,
//        3 double f64 bits BE, 4 bool u8 (0|1), 5 bytes { len u32 BE | bytes },
//        6 ref str, 7 timestamp { seconds i64 BE | nanos i32 BE }
pub fn encode_tx(rec: &TxRecord) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + rec.assertions.len() * 64);
    out.push(TX_MAGIC);
    out.push(TX_VERSION);
    let flags = if rec.idempotency_key.is_some() {
        FLAG_IDEMPOTENCY_KEY
    } else {
        0
    };
    out.push(flags);
    out.extend_from_slice(&rec.recorded_at_micros.to_be_bytes());
    if let Some(key) = &rec.idempotency_key {
        put_str(&mut out, key);
    }
    let count = u32::try_from(rec.assertions.len()).expect("assertions per tx fit in u32");
    out.extend_from_slice(&count.to_be_bytes());
    for a in &rec.assertions {
        encode_assertion(&mut out, a);
    }
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    out
}

/// Decodes a record written by [`encode_tx`]. Never panics: any malformed
/// input is a `StoreError::Corrupt` naming the first thing found wrong.
pub fn decode_tx(bytes: &[u8]) -> Result<TxRecord, StoreError> {
    if bytes.len() < HEADER_BYTES + 4 + CRC_BYTES {
        return Err(corrupt(format!(
            "tx record is {} bytes, shorter than the minimum {}",
            bytes.len(),
            HEADER_BYTES + 4 + CRC_BYTES
        )));
    }
    let (body, crc_bytes) = bytes.split_at(bytes.len() - CRC_BYTES);
    let mut r = Reader::new(body, "tx record");
    let magic = r.u8()?;
    if magic != TX_MAGIC {
        return Err(corrupt(format!(
            "tx record magic is {magic:#04x}, expected {TX_MAGIC:#04x}"
        )));
    }
    let version = r.u8()?;
    if version != TX_VERSION {
        return Err(corrupt(format!(
            "tx record version is {version}, this build reads {TX_VERSION}"
        )));
    }
    let stored_crc = u32::from_be_bytes([crc_bytes[0], crc_bytes[1], crc_bytes[2], crc_bytes[3]]);
    let actual_crc = crc32c::crc32c(body);
    if stored_crc != actual_crc {
        return Err(corrupt(format!(
            "tx record crc32c is {stored_crc:#010x}, computed {actual_crc:#010x}"
        )));
    }
    let flags = r.u8()?;
    if flags & !FLAG_IDEMPOTENCY_KEY != 0 {
        return Err(corrupt(format!("tx record has unknown flags {flags:#04x}")));
    }
    let recorded_at_micros = r.i64()?;
    let idempotency_key = if flags & FLAG_IDEMPOTENCY_KEY != 0 {
        Some(r.string()?)
    } else {
        None
    };
    let count = r.u32()? as usize;
    if count > r.remaining() / ASSERTION_BYTES_MIN {
        return Err(corrupt(format!(
            "tx record claims {count} assertions but has only {} bytes left",
            r.remaining()
        )));
    }
    let mut assertions = Vec::with_capacity(count);
    for _ in 0..count {
        assertions.push(decode_assertion(&mut r)?);
    }
    r.finish()?;
    Ok(TxRecord {
        idempotency_key,
        recorded_at_micros,
        assertions,
    })
}

/// Appends one assertion in the `assertion` format documented at [`encode_tx`].
pub(crate) fn encode_assertion(out: &mut Vec<u8>, a: &Assertion) {
    out.push(encode_op(a.op));
    put_str(out, &a.entity);
    put_str(out, &a.attribute);
    put_str(out, &a.source);
    match a.confidence {
        Some(c) => {
            out.push(FLAG_CONFIDENCE);
            out.extend_from_slice(&c.to_bits().to_be_bytes());
        }
        None => out.push(0),
    }
    encode_value(out, &a.value);
}

pub(crate) fn decode_assertion(r: &mut Reader<'_>) -> Result<Assertion, StoreError> {
    let op = decode_op(r.u8()?)?;
    let entity = r.string()?;
    let attribute = r.string()?;
    let source = r.string()?;
    let confidence = match r.u8()? {
        0 => None,
        FLAG_CONFIDENCE => Some(f64::from_bits(r.u64()?)),
        other => {
            return Err(corrupt(format!(
                "{}: confidence flag is {other}, expected 0 or 1",
                r.what
            )))
        }
    };
    let value = decode_value(r)?;
    Ok(Assertion {
        entity,
        attribute,
        value,
        source,
        confidence,
        op,
    })
}

pub(crate) fn encode_op(op: Op) -> u8 {
    match op {
        Op::Assert => 1,
        Op::Retract => 2,
    }
}

pub(crate) fn decode_op(byte: u8) -> Result<Op, StoreError> {
    match byte {
        1 => Ok(Op::Assert),
        2 => Ok(Op::Retract),
        other => Err(corrupt(format!(
            "op is {other}, expected 1 (assert) or 2 (retract)"
        ))),
    }
}

fn encode_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Text(s) => {
            out.push(TAG_TEXT);
            put_str(out, s);
        }
        Value::Int64(i) => {
            out.push(TAG_INT64);
            out.extend_from_slice(&i.to_be_bytes());
        }
        Value::Double(d) => {
            out.push(TAG_DOUBLE);
            out.extend_from_slice(&d.to_bits().to_be_bytes());
        }
        Value::Bool(b) => {
            out.push(TAG_BOOL);
            out.push(u8::from(*b));
        }
        Value::Bytes(b) => {
            out.push(TAG_BYTES);
            put_bytes(out, b);
        }
        Value::Ref(s) => {
            out.push(TAG_REF);
            put_str(out, s);
        }
        Value::Timestamp { seconds, nanos } => {
            out.push(TAG_TIMESTAMP);
            out.extend_from_slice(&seconds.to_be_bytes());
            out.extend_from_slice(&nanos.to_be_bytes());
        }
    }
}

fn decode_value(r: &mut Reader<'_>) -> Result<Value, StoreError> {
    let tag = r.u8()?;
    Ok(match tag {
        TAG_TEXT => Value::Text(r.string()?),
        TAG_INT64 => Value::Int64(r.i64()?),
        TAG_DOUBLE => Value::Double(f64::from_bits(r.u64()?)),
        TAG_BOOL => match r.u8()? {
            0 => Value::Bool(false),
            1 => Value::Bool(true),
            other => {
                return Err(corrupt(format!(
                    "{}: bool value is {other}, expected 0 or 1",
                    r.what
                )))
            }
        },
        TAG_BYTES => Value::Bytes(r.bytes()?.to_vec()),
        TAG_REF => Value::Ref(r.string()?),
        TAG_TIMESTAMP => Value::Timestamp {
            seconds: r.i64()?,
            nanos: r.i32()?,
        },
        other => {
            return Err(corrupt(format!(
                "{}: value tag is {other}, expected 1..=7",
                r.what
            )))
        }
    })
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_bytes(out, s.as_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    let len = u32::try_from(b.len()).expect("string or bytes length fits in u32");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(b);
}

/// A cursor over untrusted bytes. Every read is bounds-checked and fails with
/// `StoreError::Corrupt` naming `what` is being read.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    pub(crate) what: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, pos: 0, what }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        if n > self.remaining() {
            return Err(corrupt(format!(
                "{}: truncated at byte {}, needed {n} more bytes but {} remain",
                self.what,
                self.pos,
                self.remaining()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], StoreError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, StoreError> {
        Ok(self.array::<1>()?[0])
    }

    pub(crate) fn u32(&mut self) -> Result<u32, StoreError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub(crate) fn i32(&mut self) -> Result<i32, StoreError> {
        Ok(i32::from_be_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, StoreError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    pub(crate) fn i64(&mut self) -> Result<i64, StoreError> {
        Ok(i64::from_be_bytes(self.array()?))
    }

    pub(crate) fn bytes(&mut self) -> Result<&'a [u8], StoreError> {
        let len = self.u32()? as usize;
        self.take(len)
    }

    pub(crate) fn string(&mut self) -> Result<String, StoreError> {
        let what = self.what;
        let b = self.bytes()?;
        String::from_utf8(b.to_vec())
            .map_err(|_| corrupt(format!("{what}: string is not valid utf-8")))
    }

    /// Fails unless every byte was consumed.
    pub(crate) fn finish(&self) -> Result<(), StoreError> {
        if self.remaining() != 0 {
            return Err(corrupt(format!(
                "{}: {} trailing bytes",
                self.what,
                self.remaining()
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn arb_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            ".{0,12}".prop_map(Value::Text),
            any::<i64>().prop_map(Value::Int64),
            any::<f64>().prop_map(Value::Double),
            any::<bool>().prop_map(Value::Bool),
            proptest::collection::vec(any::<u8>(), 0..12).prop_map(Value::Bytes),
            ".{0,12}".prop_map(Value::Ref),
            (any::<i64>(), any::<i32>())
                .prop_map(|(seconds, nanos)| Value::Timestamp { seconds, nanos }),
        ]
    }

    fn arb_assertion() -> impl Strategy<Value = Assertion> {
        (
            ".{0,8}",
            ".{0,8}",
            arb_value(),
            ".{0,8}",
            proptest::option::of(0.0f64..=1.0),
            any::<bool>(),
        )
            .prop_map(
                |(entity, attribute, value, source, confidence, assert)| Assertion {
                    entity,
                    attribute,
                    value,
                    source,
                    confidence,
                    op: if assert { Op::Assert } else { Op::Retract },
                },
            )
    }

    fn arb_record() -> impl Strategy<Value = TxRecord> {
        (
            proptest::option::of(".{0,16}"),
            any::<i64>(),
            proptest::collection::vec(arb_assertion(), 0..8),
        )
            .prop_map(
                |(idempotency_key, recorded_at_micros, assertions)| TxRecord {
                    idempotency_key,
                    recorded_at_micros,
                    assertions,
                },
            )
    }

    /// Compares records bitwise for doubles, so NaN round trips count as equal.
    fn same(a: &TxRecord, b: &TxRecord) -> bool {
        encode_tx(a) == encode_tx(b)
    }

    proptest! {
        #[test]
        fn round_trip(rec in arb_record()) {
            let bytes = encode_tx(&rec);
            let back = decode_tx(&bytes).expect("decode of encoded record");
            prop_assert!(same(&rec, &back));
            if !format!("{rec:?}").contains("NaN") {
                prop_assert_eq!(rec, back);
            }
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_tx(&bytes);
        }

        #[test]
        fn truncated_or_flipped_is_corrupt(rec in arb_record(), cut in any::<usize>(), flip in any::<(usize, u8)>()) {
            let bytes = encode_tx(&rec);
            let cut = cut % bytes.len();
            prop_assert!(matches!(decode_tx(&bytes[..cut]), Err(StoreError::Corrupt(_))));
            let mut mutated = bytes.clone();
            let (i, x) = flip;
            let x = if x == 0 { 1 } else { x };
            let i = i % mutated.len();
            mutated[i] ^= x;
            prop_assert!(matches!(decode_tx(&mutated), Err(StoreError::Corrupt(_))));
        }

        /// A valid header and CRC around garbage must still not panic.
        #[test]
        fn garbage_with_valid_crc_never_panics(body in proptest::collection::vec(any::<u8>(), 0..128)) {
            let mut bytes = vec![TX_MAGIC, TX_VERSION];
            bytes.extend_from_slice(&body);
            let crc = crc32c::crc32c(&bytes);
            bytes.extend_from_slice(&crc.to_be_bytes());
            let _ = decode_tx(&bytes);
        }
    }

    /// The WAL format is a compatibility promise: records written by an
    /// older build must decode. A change here needs a new version byte.
    #[test]
    fn golden_record_bytes() {
        let rec = TxRecord {
            idempotency_key: Some("k".into()),
            recorded_at_micros: 2,
            assertions: vec![Assertion {
                entity: "e".into(),
                attribute: "a".into(),
                value: Value::Int64(-1),
                source: "s".into(),
                confidence: Some(0.5),
                op: Op::Retract,
            }],
        };
        let body: Vec<u8> = [
            &[TX_MAGIC, TX_VERSION, 1][..],
            &2i64.to_be_bytes(),
            &[0, 0, 0, 1, b'k'],
            &[0, 0, 0, 1],
            &[2, 0, 0, 0, 1, b'e', 0, 0, 0, 1, b'a', 0, 0, 0, 1, b's', 1],
            &0.5f64.to_bits().to_be_bytes(),
            &[TAG_INT64],
            &(-1i64).to_be_bytes(),
        ]
        .concat();
        let mut golden = body.clone();
        golden.extend_from_slice(&crc32c::crc32c(&body).to_be_bytes());
        assert_eq!(encode_tx(&rec), golden);
        assert_eq!(decode_tx(&golden).unwrap(), rec);
    }

    #[test]
    fn names_what_is_wrong() {
        let rec = TxRecord {
            idempotency_key: None,
            recorded_at_micros: 1,
            assertions: vec![],
        };
        let mut bytes = encode_tx(&rec);
        bytes[0] = 0;
        let err = decode_tx(&bytes).unwrap_err().to_string();
        assert!(err.contains("magic"), "{err}");
    }
}
