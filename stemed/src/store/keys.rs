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
//! | 0x03 | AVET attribute, value, entity, source, tx, pos   | claim payload      |
//! | 0x07 | TXLOG tx                                         | `codec::encode_tx` |
//! | 0x08 | IDEM idempotency key (raw utf-8, rest of key)    | tx u64, recorded_at i64 |
//! | 0x0A | ENT entity, tx                                   | the entity's assertions in tx |
//!
//! One ENT entry per (entity, transaction) is both the entity's history (in
//! tx order) and the source of `get` (folded into the live claims as of a
//! basis), so a transaction of n assertions on one entity costs one ENT
//! entry, n AVET entries and one TXLOG entry. Format 1 also kept per-claim
//! EAVT (0x01), AEVT (0x02), VAET (0x04), per-version history HIST (0x05)
//! / HISTA (0x06) and IDEM_BY_TIME (0x09) entries (the idempotency purge now
//! walks the tx log instead); those tags are retired (see
//! `sled_store::migrate_format_1`) and must not be reused.
//!
//! The last 12 bytes of every AVET key are `tx u64 BE | pos u32 BE`,
//! so all versions of one claim are adjacent and in tx order.

use super::codec::{self, Reader};
use super::error::{corrupt, StoreError};
use super::model::{Assertion, Op, Value};

pub(crate) const META: u8 = 0x00;
/// Retired format-1 tags (EAVT, AEVT, VAET, HIST, HISTA, IDEM_BY_TIME),
/// removed by the format-1 migration.
pub(crate) const RETIRED_FORMAT_1: [u8; 6] = [0x01, 0x02, 0x04, 0x05, 0x06, 0x09];
pub(crate) const AVET: u8 = 0x03;
pub(crate) const TXLOG: u8 = 0x07;
pub(crate) const IDEM: u8 = 0x08;
pub(crate) const ENT: u8 = 0x0A;

/// Bytes of `tx u64 BE | pos u32 BE` at the end of AVET keys and history cursors.
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

// Format: { 0x0A | entity esc }   (prefix of the ENT keys of one entity)
pub(crate) fn ent_prefix(entity: &str) -> Vec<u8> {
    let mut k = vec![ENT];
    push_escaped(&mut k, entity.as_bytes());
    k
}

// Format: { 0x0A | entity esc | tx u64 BE }
pub(crate) fn ent_key(entity: &str, tx: u64) -> Vec<u8> {
    let mut k = ent_prefix(entity);
    k.extend_from_slice(&tx.to_be_bytes());
    k
}

/// The tx of an ENT key whose entity prefix is `prefix_len` bytes long.
pub(crate) fn ent_key_tx(key: &[u8], prefix_len: usize) -> Result<u64, StoreError> {
    let tail: [u8; 8] = key
        .get(prefix_len..)
        .and_then(|t| t.try_into().ok())
        .ok_or_else(|| {
            corrupt(format!(
                "ENT key of {} bytes does not end in a tx after its {prefix_len}-byte entity prefix",
                key.len()
            ))
        })?;
    Ok(u64::from_be_bytes(tail))
}

// Format: { recorded_at_micros i64 BE | count u32 BE | count × { pos u32 BE | assertion (codec assertion format) } }
// Positions increase within one value.
pub(crate) fn encode_ent_value(recorded_at_micros: i64, items: &[(u32, &Assertion)]) -> Vec<u8> {
    let mut v = Vec::with_capacity(12 + items.len() * 48);
    v.extend_from_slice(&recorded_at_micros.to_be_bytes());
    let n = u32::try_from(items.len()).expect("a transaction has fewer than u32::MAX assertions");
    v.extend_from_slice(&n.to_be_bytes());
    for (pos, a) in items {
        v.extend_from_slice(&pos.to_be_bytes());
        codec::encode_assertion(&mut v, a);
    }
    v
}

/// One ENT value taken apart: recorded_at and the (pos, assertion) items.
pub(crate) fn decode_ent_value(bytes: &[u8]) -> Result<(i64, Vec<(u32, Assertion)>), StoreError> {
    let mut r = Reader::new(bytes, "entity log entry");
    let at = r.i64()?;
    let n = r.u32()? as usize;
    // Every item takes at least 5 bytes (pos and op), so a corrupt count
    // cannot make this allocate more than the value's own size.
    let mut items = Vec::with_capacity(n.min(r.remaining() / 5));
    let mut previous = None;
    for _ in 0..n {
        let pos = r.u32()?;
        if previous.is_some_and(|p| p >= pos) {
            return Err(corrupt(format!(
                "entity log entry positions are not increasing at {pos}"
            )));
        }
        previous = Some(pos);
        items.push((pos, codec::decode_assertion(&mut r)?));
    }
    r.finish()?;
    Ok((at, items))
}

/// The order of claims within one entity, as `get` returns them: attribute,
/// then value (in the documented value order), then source.
// Format: { attribute esc | value | source esc }
pub(crate) fn claim_order_key(a: &Assertion) -> Vec<u8> {
    let mut k = Vec::with_capacity(a.attribute.len() + a.source.len() + 24);
    push_escaped(&mut k, a.attribute.as_bytes());
    push_value(&mut k, &a.value);
    push_escaped(&mut k, a.source.as_bytes());
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

/// The AVET key of one assertion version.
// Format: AVET { 0x03 | attribute esc | value | entity esc | source esc | tx u64 BE | pos u32 BE }
pub(crate) fn avet_key(a: &Assertion, tx: u64, pos: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(64);
    k.push(AVET);
    push_escaped(&mut k, a.attribute.as_bytes());
    push_value(&mut k, &a.value);
    push_escaped(&mut k, a.entity.as_bytes());
    push_escaped(&mut k, a.source.as_bytes());
    push_version(&mut k, tx, pos);
    k
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

/// The `(tx, pos)` at the end of an AVET key or a history cursor.
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
        fn claim_order_matches_tuple_order(a in arb_claim(), b in arb_claim()) {
            let ka = claim_order_key(&assertion(a.0.clone(), a.1.clone(), a.2.clone(), a.3.clone()));
            let kb = claim_order_key(&assertion(b.0.clone(), b.1.clone(), b.2.clone(), b.3.clone()));
            let expected = a.1.cmp(&b.1)
                .then(cmp_value(&a.2, &b.2))
                .then(a.3.cmp(&b.3));
            prop_assert_eq!(ka.cmp(&kb), expected);
        }

        #[test]
        fn avet_order_matches_tuple_order(a in arb_claim(), b in arb_claim()) {
            let ka = avet_key(&assertion(a.0.clone(), a.1.clone(), a.2.clone(), a.3.clone()), a.4, a.5);
            let kb = avet_key(&assertion(b.0.clone(), b.1.clone(), b.2.clone(), b.3.clone()), b.4, b.5);
            let expected = a.1.cmp(&b.1)
                .then(cmp_value(&a.2, &b.2))
                .then(a.0.cmp(&b.0))
                .then(a.3.cmp(&b.3))
                .then(a.4.cmp(&b.4))
                .then(a.5.cmp(&b.5));
            prop_assert_eq!(ka.cmp(&kb), expected);
        }

        #[test]
        fn avet_keys_decode_back(c in arb_claim()) {
            let a = assertion(c.0.clone(), c.1.clone(), c.2.clone(), c.3.clone());
            let k = avet_key(&a, c.4, c.5);
            let decoded = decode_avet(&k)?;
            prop_assert_eq!(&decoded.entity, &c.0);
            prop_assert_eq!(&decoded.attribute, &c.1);
            let mut re = Vec::new();
            push_value(&mut re, &decoded.value);
            let mut orig = Vec::new();
            push_value(&mut orig, &c.2);
            prop_assert_eq!(re, orig);
            prop_assert_eq!(&decoded.source, &c.3);
            prop_assert_eq!((decoded.tx, decoded.pos), (c.4, c.5));
            prop_assert_eq!(version_of(&k)?, (c.4, c.5));
        }

        #[test]
        fn ent_keys_are_in_tx_order_within_an_entity(e in "[a\u{0}\u{ff}b]{0,4}", f in "[a\u{0}\u{ff}b]{0,4}", t1 in any::<u64>(), t2 in any::<u64>()) {
            let (k1, k2) = (ent_key(&e, t1), ent_key(&e, t2));
            prop_assert_eq!(k1.cmp(&k2), t1.cmp(&t2));
            prop_assert_eq!(ent_key_tx(&k1, ent_prefix(&e).len())?, t1);
            // Another entity's keys never fall under this entity's prefix.
            if e != f {
                prop_assert!(!ent_key(&f, t2).starts_with(&ent_prefix(&e)));
            }
        }

        #[test]
        fn ent_values_decode_back(c in arb_claim(), d in arb_claim(), at in any::<i64>()) {
            let a = assertion(c.0.clone(), c.1.clone(), c.2.clone(), c.3.clone());
            let b = assertion(c.0.clone(), d.1.clone(), d.2.clone(), d.3.clone());
            let v = encode_ent_value(at, &[(3, &a), (9, &b)]);
            let (at2, items) = decode_ent_value(&v)?;
            prop_assert_eq!(at2, at);
            prop_assert_eq!(items.len(), 2);
            prop_assert_eq!(items[0].0, 3);
            prop_assert_eq!(items[1].0, 9);
            prop_assert_eq!(claim_order_key(&items[0].1), claim_order_key(&a));
            prop_assert_eq!(claim_order_key(&items[1].1), claim_order_key(&b));
        }

        #[test]
        fn random_keys_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_avet(&bytes);
            let _ = version_of(&bytes);
            let _ = decode_claim_payload(&bytes);
            let _ = decode_ent_value(&bytes);
            let _ = ent_key_tx(&bytes, 3);
        }
    }

    #[test]
    fn prefix_end_bounds() {
        assert_eq!(prefix_end(&[1, 2]), Some(vec![1, 3]));
        assert_eq!(prefix_end(&[1, 0xFF]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xFF]), None);
    }
}
