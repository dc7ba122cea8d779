//! Order-preserving key encodings of the single sled tree.
//!
//! Every key starts with a one-byte space tag, followed by components whose
//! encodings are self-delimiting and order-preserving, so that
//! `encode(a) < encode(b)` iff `a < b` component-wise and a prefix scan over
//! the first components yields exactly the tuples that share them.
//!
//! Key spaces (all in one tree so one `apply_batch` is atomic over them):
//!
//! | tag  | key                                              | value              |
//! |------|--------------------------------------------------|--------------------|
//! | 0x00 | meta name (raw bytes)                            | meta value         |
//! | 0x01 | EAVT entity, attribute, value, source, tx, pos   | claim payload      |
//! | 0x02 | AEVT attribute, entity, value, source, tx, pos   | claim payload      |
//! | 0x03 | AVET attribute, value, entity, source, tx, pos   | claim payload      |
//! | 0x04 | VAET ref target, attribute, entity, source, tx, pos (Ref values only) | claim payload |
//! | 0x05 | HIST entity, tx, pos                             | history payload    |
//! | 0x06 | HISTA entity, attribute, tx, pos                 | history payload    |
//! | 0x07 | TXLOG tx                                         | `codec::encode_tx` |
//! | 0x08 | IDEM idempotency key (raw utf-8, rest of key)    | tx u64, recorded_at i64 |
//! | 0x09 | IDEM_BY_TIME recorded_at (ordered i64), tx       | idempotency key    |
//!
//! The last 12 bytes of every claim-index key are `tx u64 BE | pos u32 BE`,
//! so all versions of one claim are adjacent and in tx order.

use super::codec::{self, Reader};
use super::error::{corrupt, StoreError};
use super::model::{Assertion, Op, Value};

pub(crate) const META: u8 = 0x00;
pub(crate) const EAVT: u8 = 0x01;
pub(crate) const AEVT: u8 = 0x02;
pub(crate) const AVET: u8 = 0x03;
pub(crate) const VAET: u8 = 0x04;
pub(crate) const HIST: u8 = 0x05;
pub(crate) const HISTA: u8 = 0x06;
pub(crate) const TXLOG: u8 = 0x07;
pub(crate) const IDEM: u8 = 0x08;
pub(crate) const IDEM_BY_TIME: u8 = 0x09;

/// Bytes of `tx u64 BE | pos u32 BE` at the end of claim and history keys.
pub(crate) const VERSION_SUFFIX_BYTES: usize = 12;

const ESCAPE: u8 = 0x00;
const ESCAPED_ZERO: u8 = 0xFF;
const TERMINATOR: u8 = 0x01;

const VTAG_TEXT: u8 = 1;
const VTAG_INT64: u8 = 2;
const VTAG_DOUBLE: u8 = 3;
const VTAG_BOOL: u8 = 4;
const VTAG_BYTES: u8 = 5;
const VTAG_REF: u8 = 6;
const VTAG_TIMESTAMP: u8 = 7;

// Format: { bytes with 0x00 written as 0x00 0xFF | terminator 0x00 0x01 }
// Order-preserving: the terminator sorts below any continuation byte.
pub(crate) fn push_escaped(out: &mut Vec<u8>, bytes: &[u8]) {
    for &b in bytes {
        if b == ESCAPE {
            out.push(ESCAPE);
            out.push(ESCAPED_ZERO);
        } else {
            out.push(b);
        }
    }
    out.push(ESCAPE);
    out.push(TERMINATOR);
}

// Format: { i64 with the sign bit flipped, u64 BE }
pub(crate) fn ordered_i64(i: i64) -> [u8; 8] {
    ((i as u64) ^ (1 << 63)).to_be_bytes()
}

// Format: { f64 bits; sign bit flipped if positive, all bits flipped if negative, u64 BE }
// This orders like `f64::total_cmp`.
pub(crate) fn ordered_f64(d: f64) -> [u8; 8] {
    let bits = d.to_bits();
    let ordered = if bits >> 63 == 1 {
        !bits
    } else {
        bits ^ (1 << 63)
    };
    ordered.to_be_bytes()
}

// Format: { i32 with the sign bit flipped, u32 BE }
fn ordered_i32(i: i32) -> [u8; 4] {
    ((i as u32) ^ (1 << 31)).to_be_bytes()
}

// Format: { tag u8 (1 text, 2 int64, 3 double, 4 bool, 5 bytes, 6 ref, 7 timestamp) | payload }
// payload: text/bytes/ref escaped; int64 ordered i64; double ordered f64;
// bool u8 0|1; timestamp { ordered i64 seconds | ordered i32 nanos }.
pub(crate) fn push_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Text(s) => {
            out.push(VTAG_TEXT);
            push_escaped(out, s.as_bytes());
        }
        Value::Int64(i) => {
            out.push(VTAG_INT64);
            out.extend_from_slice(&ordered_i64(*i));
        }
        Value::Double(d) => {
            out.push(VTAG_DOUBLE);
            out.extend_from_slice(&ordered_f64(*d));
        }
        Value::Bool(b) => {
            out.push(VTAG_BOOL);
            out.push(u8::from(*b));
        }
        Value::Bytes(b) => {
            out.push(VTAG_BYTES);
            push_escaped(out, b);
        }
        Value::Ref(s) => {
            out.push(VTAG_REF);
            push_escaped(out, s.as_bytes());
        }
        Value::Timestamp { seconds, nanos } => {
            out.push(VTAG_TIMESTAMP);
            out.extend_from_slice(&ordered_i64(*seconds));
            out.extend_from_slice(&ordered_i32(*nanos));
        }
    }
}

fn push_version(out: &mut Vec<u8>, tx: u64, pos: u32) {
    out.extend_from_slice(&tx.to_be_bytes());
    out.extend_from_slice(&pos.to_be_bytes());
}

/// A cursor over a key read from disk; every malformed key is `Corrupt`.
pub(crate) struct KeyReader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> KeyReader<'a> {
    /// Starts after checking the space tag.
    pub(crate) fn new(buf: &'a [u8], space: u8) -> Result<Self, StoreError> {
        match buf.first() {
            Some(&t) if t == space => Ok(KeyReader { buf, pos: 1 }),
            Some(&t) => Err(corrupt(format!(
                "key space is {t:#04x}, expected {space:#04x}"
            ))),
            None => Err(corrupt("empty key")),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        if n > self.buf.len() - self.pos {
            return Err(corrupt(format!(
                "key truncated at byte {}, needed {n} more",
                self.pos
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

    pub(crate) fn escaped(&mut self) -> Result<Vec<u8>, StoreError> {
        let mut out = Vec::new();
        loop {
            let b = self.take(1)?[0];
            if b != ESCAPE {
                out.push(b);
                continue;
            }
            match self.take(1)?[0] {
                ESCAPED_ZERO => out.push(0),
                TERMINATOR => return Ok(out),
                other => {
                    return Err(corrupt(format!(
                        "key has escape 0x00 followed by {other:#04x}"
                    )))
                }
            }
        }
    }

    pub(crate) fn string(&mut self) -> Result<String, StoreError> {
        String::from_utf8(self.escaped()?).map_err(|_| corrupt("key string is not valid utf-8"))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, StoreError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, StoreError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub(crate) fn ordered_i64(&mut self) -> Result<i64, StoreError> {
        Ok((self.u64()? ^ (1 << 63)) as i64)
    }

    fn ordered_i32(&mut self) -> Result<i32, StoreError> {
        Ok((self.u32()? ^ (1 << 31)) as i32)
    }

    pub(crate) fn value(&mut self) -> Result<Value, StoreError> {
        let tag = self.take(1)?[0];
        Ok(match tag {
            VTAG_TEXT => Value::Text(self.string()?),
            VTAG_INT64 => Value::Int64(self.ordered_i64()?),
            VTAG_DOUBLE => {
                let o = self.u64()?;
                let bits = if o >> 63 == 1 { o ^ (1 << 63) } else { !o };
                Value::Double(f64::from_bits(bits))
            }
            VTAG_BOOL => match self.take(1)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                other => {
                    return Err(corrupt(format!(
                        "key bool value is {other}, expected 0 or 1"
                    )))
                }
            },
            VTAG_BYTES => Value::Bytes(self.escaped()?),
            VTAG_REF => Value::Ref(
                String::from_utf8(self.escaped()?)
                    .map_err(|_| corrupt("key ref is not valid utf-8"))?,
            ),
            VTAG_TIMESTAMP => Value::Timestamp {
                seconds: self.ordered_i64()?,
                nanos: self.ordered_i32()?,
            },
            other => return Err(corrupt(format!("key value tag is {other}, expected 1..=7"))),
        })
    }

    pub(crate) fn finish(&self) -> Result<(), StoreError> {
        if self.pos != self.buf.len() {
            return Err(corrupt(format!(
                "key has {} trailing bytes",
                self.buf.len() - self.pos
            )));
        }
        Ok(())
    }
}

// Format: { 0x00 | name bytes }
pub(crate) fn meta_key(name: &str) -> Vec<u8> {
    let mut k = vec![META];
    k.extend_from_slice(name.as_bytes());
    k
}

// Format: { 0x01 | entity esc }   (prefix of EAVT keys of one entity)
pub(crate) fn eavt_entity_prefix(entity: &str) -> Vec<u8> {
    let mut k = vec![EAVT];
    push_escaped(&mut k, entity.as_bytes());
    k
}

// Format: { 0x03 | attribute esc | [value] }   (prefix of AVET keys)
pub(crate) fn avet_prefix(attribute: &str, value: Option<&Value>) -> Vec<u8> {
    let mut k = vec![AVET];
    push_escaped(&mut k, attribute.as_bytes());
    if let Some(v) = value {
        push_value(&mut k, v);
    }
    k
}

/// The claim-index keys of one assertion: EAVT, AEVT, AVET and, for Ref
/// values, VAET.
// Format: EAVT { 0x01 | entity esc | attribute esc | value | source esc | tx u64 BE | pos u32 BE }
//         AEVT { 0x02 | attribute esc | entity esc | value | source esc | tx | pos }
//         AVET { 0x03 | attribute esc | value | entity esc | source esc | tx | pos }
//         VAET { 0x04 | ref target esc | attribute esc | entity esc | source esc | tx | pos }
pub(crate) fn claim_keys(a: &Assertion, tx: u64, pos: u32) -> Vec<Vec<u8>> {
    let (e, at, s) = (
        a.entity.as_bytes(),
        a.attribute.as_bytes(),
        a.source.as_bytes(),
    );
    let mut value = Vec::with_capacity(16);
    push_value(&mut value, &a.value);
    let build = |space: u8, parts: &[&[u8]], raw_value_at: Option<usize>| {
        let mut k = Vec::with_capacity(64);
        k.push(space);
        for (i, p) in parts.iter().enumerate() {
            if raw_value_at == Some(i) {
                k.extend_from_slice(p);
            } else {
                push_escaped(&mut k, p);
            }
        }
        push_version(&mut k, tx, pos);
        k
    };
    let mut keys = vec![
        build(EAVT, &[e, at, &value, s], Some(2)),
        build(AEVT, &[at, e, &value, s], Some(2)),
        build(AVET, &[at, &value, e, s], Some(1)),
    ];
    if let Value::Ref(target) = &a.value {
        keys.push(build(VAET, &[target.as_bytes(), at, e, s], None));
    }
    keys
}

/// A claim index key taken apart.
#[derive(Debug, PartialEq)]
pub(crate) struct ClaimKey {
    pub entity: String,
    pub attribute: String,
    pub value: Value,
    pub source: String,
    pub tx: u64,
    pub pos: u32,
}

pub(crate) fn decode_eavt(key: &[u8]) -> Result<ClaimKey, StoreError> {
    let mut r = KeyReader::new(key, EAVT)?;
    let entity = r.string()?;
    let attribute = r.string()?;
    let value = r.value()?;
    let source = r.string()?;
    let (tx, pos) = (r.u64()?, r.u32()?);
    r.finish()?;
    Ok(ClaimKey {
        entity,
        attribute,
        value,
        source,
        tx,
        pos,
    })
}

pub(crate) fn decode_avet(key: &[u8]) -> Result<ClaimKey, StoreError> {
    let mut r = KeyReader::new(key, AVET)?;
    let attribute = r.string()?;
    let value = r.value()?;
    let entity = r.string()?;
    let source = r.string()?;
    let (tx, pos) = (r.u64()?, r.u32()?);
    r.finish()?;
    Ok(ClaimKey {
        entity,
        attribute,
        value,
        source,
        tx,
        pos,
    })
}

/// The `(tx, pos)` at the end of a claim or history key.
pub(crate) fn version_of(key: &[u8]) -> Result<(u64, u32), StoreError> {
    if key.len() < 1 + VERSION_SUFFIX_BYTES {
        return Err(corrupt(format!(
            "key of {} bytes is too short for a version suffix",
            key.len()
        )));
    }
    let s = &key[key.len() - VERSION_SUFFIX_BYTES..];
    let mut tx = [0u8; 8];
    tx.copy_from_slice(&s[..8]);
    let mut pos = [0u8; 4];
    pos.copy_from_slice(&s[8..]);
    Ok((u64::from_be_bytes(tx), u32::from_be_bytes(pos)))
}

// Format: { 0x05 | entity esc }  or  { 0x06 | entity esc | attribute esc }
pub(crate) fn history_prefix(entity: &str, attribute: Option<&str>) -> Vec<u8> {
    let mut k = vec![if attribute.is_some() { HISTA } else { HIST }];
    push_escaped(&mut k, entity.as_bytes());
    if let Some(a) = attribute {
        push_escaped(&mut k, a.as_bytes());
    }
    k
}

// Format: HIST { 0x05 | entity esc | tx u64 BE | pos u32 BE }
//         HISTA { 0x06 | entity esc | attribute esc | tx u64 BE | pos u32 BE }
pub(crate) fn history_keys(a: &Assertion, tx: u64, pos: u32) -> [Vec<u8>; 2] {
    let mut by_entity = history_prefix(&a.entity, None);
    push_version(&mut by_entity, tx, pos);
    let mut by_attr = history_prefix(&a.entity, Some(&a.attribute));
    push_version(&mut by_attr, tx, pos);
    [by_entity, by_attr]
}

/// `prefix | tx | pos` for history range bounds.
pub(crate) fn with_version(prefix: &[u8], tx: u64, pos: u32) -> Vec<u8> {
    let mut k = prefix.to_vec();
    push_version(&mut k, tx, pos);
    k
}

// Format: { 0x07 | tx u64 BE }
pub(crate) fn txlog_key(tx: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = TXLOG;
    k[1..].copy_from_slice(&tx.to_be_bytes());
    k
}

pub(crate) fn decode_txlog_key(key: &[u8]) -> Result<u64, StoreError> {
    let mut r = KeyReader::new(key, TXLOG)?;
    let tx = r.u64()?;
    r.finish()?;
    Ok(tx)
}

// Format: { 0x08 | idempotency key utf-8 (the rest of the key) }
pub(crate) fn idem_key(key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + key.len());
    k.push(IDEM);
    k.extend_from_slice(key.as_bytes());
    k
}

// Format: { 0x09 | recorded_at ordered i64 | tx u64 BE }
pub(crate) fn idem_by_time_key(recorded_at_micros: i64, tx: u64) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = IDEM_BY_TIME;
    k[1..9].copy_from_slice(&ordered_i64(recorded_at_micros));
    k[9..].copy_from_slice(&tx.to_be_bytes());
    k
}

pub(crate) fn decode_idem_by_time_key(key: &[u8]) -> Result<(i64, u64), StoreError> {
    let mut r = KeyReader::new(key, IDEM_BY_TIME)?;
    let at = r.ordered_i64()?;
    let tx = r.u64()?;
    r.finish()?;
    Ok((at, tx))
}

// Format: { tx u64 BE | recorded_at_micros i64 BE }
pub(crate) fn encode_idem_value(tx: u64, recorded_at_micros: i64) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&tx.to_be_bytes());
    v[8..].copy_from_slice(&recorded_at_micros.to_be_bytes());
    v
}

pub(crate) fn decode_idem_value(bytes: &[u8]) -> Result<(u64, i64), StoreError> {
    let mut r = Reader::new(bytes, "idempotency entry");
    let v = (r.u64()?, r.i64()?);
    r.finish()?;
    Ok(v)
}

/// Op, confidence and recorded_at of one claim version.
#[derive(Debug, PartialEq)]
pub(crate) struct ClaimPayload {
    pub op: Op,
    pub confidence: Option<f64>,
    pub recorded_at_micros: i64,
}

// Format: { op u8 (1 assert, 2 retract) | conf_flag u8 | [confidence f64 bits BE] | recorded_at_micros i64 BE }
pub(crate) fn encode_claim_payload(a: &Assertion, recorded_at_micros: i64) -> Vec<u8> {
    let mut v = Vec::with_capacity(18);
    v.push(codec::encode_op(a.op));
    match a.confidence {
        Some(c) => {
            v.push(1);
            v.extend_from_slice(&c.to_bits().to_be_bytes());
        }
        None => v.push(0),
    }
    v.extend_from_slice(&recorded_at_micros.to_be_bytes());
    v
}

pub(crate) fn decode_claim_payload(bytes: &[u8]) -> Result<ClaimPayload, StoreError> {
    let mut r = Reader::new(bytes, "claim payload");
    let op = codec::decode_op(r.u8()?)?;
    let confidence = match r.u8()? {
        0 => None,
        1 => Some(f64::from_bits(r.u64()?)),
        other => {
            return Err(corrupt(format!(
                "claim payload confidence flag is {other}, expected 0 or 1"
            )))
        }
    };
    let recorded_at_micros = r.i64()?;
    r.finish()?;
    Ok(ClaimPayload {
        op,
        confidence,
        recorded_at_micros,
    })
}

/// Just the op of a claim payload, without decoding the rest.
pub(crate) fn payload_op(bytes: &[u8]) -> Result<Op, StoreError> {
    match bytes.first() {
        Some(&b) => codec::decode_op(b),
        None => Err(corrupt("claim payload is empty")),
    }
}

// Format: { recorded_at_micros i64 BE | assertion (codec assertion format) }
pub(crate) fn encode_history_payload(a: &Assertion, recorded_at_micros: i64) -> Vec<u8> {
    let mut v = Vec::with_capacity(64);
    v.extend_from_slice(&recorded_at_micros.to_be_bytes());
    codec::encode_assertion(&mut v, a);
    v
}

pub(crate) fn decode_history_payload(bytes: &[u8]) -> Result<(i64, Assertion), StoreError> {
    let mut r = Reader::new(bytes, "history payload");
    let at = r.i64()?;
    let a = codec::decode_assertion(&mut r)?;
    r.finish()?;
    Ok((at, a))
}

/// The smallest key greater than every key starting with `prefix`, or `None`
/// if there is none (prefix all 0xFF).
pub(crate) fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last != 0xFF {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::codec::tests::arb_value;
    use proptest::prelude::*;
    use std::cmp::Ordering;

    fn cmp_value(a: &Value, b: &Value) -> Ordering {
        a.documented_cmp(b)
    }

    fn assertion(entity: String, attribute: String, value: Value, source: String) -> Assertion {
        Assertion {
            entity,
            attribute,
            value,
            source,
            confidence: None,
            op: Op::Assert,
        }
    }

    fn arb_claim() -> impl Strategy<Value = (String, String, Value, String, u64, u32)> {
        // Small alphabets including NUL and 0xFF-ish chars make prefixes collide often.
        let s = || "[a\u{0}\u{ff}b]{0,4}";
        (s(), s(), arb_value(), s(), any::<u64>(), any::<u32>())
    }

    proptest! {
        #[test]
        fn eavt_order_matches_tuple_order(a in arb_claim(), b in arb_claim()) {
            let ka = &claim_keys(&assertion(a.0.clone(), a.1.clone(), a.2.clone(), a.3.clone()), a.4, a.5)[0];
            let kb = &claim_keys(&assertion(b.0.clone(), b.1.clone(), b.2.clone(), b.3.clone()), b.4, b.5)[0];
            let expected = a.0.cmp(&b.0)
                .then(a.1.cmp(&b.1))
                .then(cmp_value(&a.2, &b.2))
                .then(a.3.cmp(&b.3))
                .then(a.4.cmp(&b.4))
                .then(a.5.cmp(&b.5));
            prop_assert_eq!(ka.cmp(kb), expected);
        }

        #[test]
        fn avet_order_matches_tuple_order(a in arb_claim(), b in arb_claim()) {
            let ka = &claim_keys(&assertion(a.0.clone(), a.1.clone(), a.2.clone(), a.3.clone()), a.4, a.5)[2];
            let kb = &claim_keys(&assertion(b.0.clone(), b.1.clone(), b.2.clone(), b.3.clone()), b.4, b.5)[2];
            let expected = a.1.cmp(&b.1)
                .then(cmp_value(&a.2, &b.2))
                .then(a.0.cmp(&b.0))
                .then(a.3.cmp(&b.3))
                .then(a.4.cmp(&b.4))
                .then(a.5.cmp(&b.5));
            prop_assert_eq!(ka.cmp(kb), expected);
        }

        #[test]
        fn claim_keys_decode_back(c in arb_claim()) {
            let a = assertion(c.0.clone(), c.1.clone(), c.2.clone(), c.3.clone());
            let keys = claim_keys(&a, c.4, c.5);
            for (k, decoded) in [(&keys[0], decode_eavt(&keys[0])?), (&keys[2], decode_avet(&keys[2])?)] {
                prop_assert_eq!(&decoded.entity, &c.0);
                prop_assert_eq!(&decoded.attribute, &c.1);
                let mut re = Vec::new();
                push_value(&mut re, &decoded.value);
                let mut orig = Vec::new();
                push_value(&mut orig, &c.2);
                prop_assert_eq!(re, orig);
                prop_assert_eq!(&decoded.source, &c.3);
                prop_assert_eq!((decoded.tx, decoded.pos), (c.4, c.5));
                prop_assert_eq!(version_of(k)?, (c.4, c.5));
            }
        }

        #[test]
        fn history_order_is_tx_then_pos(e in "[a\u{0}b]{0,4}", t1 in any::<u64>(), p1 in any::<u32>(), t2 in any::<u64>(), p2 in any::<u32>()) {
            let a = assertion(e, "x".into(), Value::Bool(true), "s".into());
            let k1 = &history_keys(&a, t1, p1)[0];
            let k2 = &history_keys(&a, t2, p2)[0];
            prop_assert_eq!(k1.cmp(k2), (t1, p1).cmp(&(t2, p2)));
        }

        #[test]
        fn idem_time_order(a in any::<i64>(), b in any::<i64>()) {
            prop_assert_eq!(idem_by_time_key(a, 1).cmp(&idem_by_time_key(b, 1)), a.cmp(&b));
            prop_assert_eq!(decode_idem_by_time_key(&idem_by_time_key(a, 7))?, (a, 7));
        }

        #[test]
        fn random_keys_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_eavt(&bytes);
            let _ = decode_avet(&bytes);
            let _ = version_of(&bytes);
            let _ = decode_claim_payload(&bytes);
            let _ = decode_history_payload(&bytes);
        }
    }

    #[test]
    fn prefix_end_bounds() {
        assert_eq!(prefix_end(&[1, 2]), Some(vec![1, 3]));
        assert_eq!(prefix_end(&[1, 0xFF]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xFF]), None);
    }
}
