//! Property checks over arbitrary bytes for stemed's untrusted-input
//! decoders: the WAL tx record codec, the write-path validation of incoming
//! assertions, and page tokens. Each check panics when a property fails and
//! is the body of one cargo-fuzz target in `fuzz/`; `tests/fuzz_corpus.rs`
//! replays the committed corpus through the same functions on stable Rust.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::config::Limits;
use crate::store::codec::{decode_tx, encode_tx};
use crate::store::page::{self, Cursor, TokenKind, TOKEN_SECRET_BYTES};
use crate::store::{Assertion, HistoryParams, Op, QueryParams, StoreError, TxRecord, Value};
use crate::write_path::validate;

/// Reads structure out of fuzz input; past the end every read is zero, so
/// any byte string is a valid input.
struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        let b = self.bytes(N);
        a[..b.len()].copy_from_slice(b);
        a
    }

    fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.data.len())
    }

    /// A string: empty, short and arbitrary, or long (around the default
    /// name and value limits).
    fn string(&mut self) -> String {
        match self.u8() % 4 {
            0 => String::new(),
            1 | 2 => {
                let n = usize::from(self.u8() % 24);
                String::from_utf8_lossy(self.bytes(n)).into_owned()
            }
            _ => {
                let c = if self.u8() & 1 == 0 { "e" } else { "é" };
                c.repeat(usize::from(self.u16()) % 1100)
            }
        }
    }

    fn f64(&mut self) -> f64 {
        match self.u8() % 6 {
            0 => f64::NAN,
            1 => f64::INFINITY,
            2 => f64::NEG_INFINITY,
            3 => -0.0,
            4 => f64::from(self.u8()) / 200.0,
            _ => f64::from_bits(self.u64()),
        }
    }

    fn value(&mut self) -> Value {
        match self.u8() % 7 {
            0 => Value::Text(self.string()),
            1 => Value::Int64(self.u64() as i64),
            2 => Value::Double(self.f64()),
            3 => Value::Bool(self.u8() & 1 == 0),
            4 => match self.u8() % 2 {
                0 => {
                    let n = usize::from(self.u8() % 32);
                    Value::Bytes(self.bytes(n).to_vec())
                }
                _ => Value::Bytes(vec![0; usize::from(self.u16() % 2100) * 2]),
            },
            5 => Value::Ref(self.string()),
            _ => Value::Timestamp {
                seconds: self.u64() as i64,
                nanos: match self.u8() % 5 {
                    0 => -1,
                    1 => 0,
                    2 => 999_999_999,
                    3 => 1_000_000_000,
                    _ => self.u32() as i32,
                },
            },
        }
    }

    fn assertion(&mut self) -> Assertion {
        Assertion {
            entity: self.string(),
            attribute: self.string(),
            value: self.value(),
            source: self.string(),
            confidence: match self.u8() % 3 {
                0 => None,
                _ => Some(self.f64()),
            },
            op: if self.u8() & 1 == 0 {
                Op::Assert
            } else {
                Op::Retract
            },
        }
    }

    fn record(&mut self) -> TxRecord {
        let idempotency_key = match self.u8() % 2 {
            0 => None,
            _ => Some(self.string()),
        };
        let recorded_at_micros = self.u64() as i64;
        let assertions = (0..self.u8() % 10).map(|_| self.assertion()).collect();
        TxRecord {
            idempotency_key,
            recorded_at_micros,
            assertions,
        }
    }
}

/// The tx record codec over arbitrary bytes: `decode_tx` never panics and
/// fails only with `Corrupt`; what it accepts is exactly what `encode_tx`
/// writes for the decoded record. And for records built from the input:
/// encode → decode → encode is the identity, and any cut or single flipped
/// bit of the encoding is `Corrupt`.
pub fn tx_codec(data: &[u8]) {
    check_decode_tx(data);

    let mut input = Input::new(data);
    let rec = input.record();
    let bytes = encode_tx(&rec);
    let back = decode_tx(&bytes).unwrap_or_else(|e| panic!("encoded record does not decode: {e}"));
    assert_eq!(encode_tx(&back), bytes, "round trip changed the record");
    if !has_nan(&rec) {
        assert_eq!(back, rec);
    }
    let cut = usize::from(input.u16()) % bytes.len();
    assert!(matches!(
        decode_tx(&bytes[..cut]),
        Err(StoreError::Corrupt(_))
    ));
    let bit = usize::from(input.u16()) % (bytes.len() * 8);
    let mut flipped = bytes;
    flipped[bit / 8] ^= 1 << (bit % 8);
    assert!(
        matches!(decode_tx(&flipped), Err(StoreError::Corrupt(_))),
        "flipping bit {bit} was not detected"
    );
}

/// NaN != NaN, so records holding one are compared by their encoding only.
fn has_nan(rec: &TxRecord) -> bool {
    rec.assertions.iter().any(|a| {
        a.confidence.is_some_and(f64::is_nan) || matches!(a.value, Value::Double(d) if d.is_nan())
    })
}

fn check_decode_tx(data: &[u8]) {
    match decode_tx(data) {
        Ok(rec) => {
            assert_eq!(
                encode_tx(&rec),
                data,
                "decode_tx accepted a non-canonical record"
            );
        }
        Err(StoreError::Corrupt(why)) => assert!(!why.is_empty()),
        Err(other) => panic!("decode_tx failed with {other:?}, not Corrupt"),
    }
}

/// Limits from the input: usually the defaults, sometimes tiny ones so the
/// fuzzer reaches every bound.
fn limits(input: &mut Input<'_>) -> Limits {
    let mut l = Limits::default();
    if input.u8() & 1 == 1 {
        l.assertions_per_tx_max = usize::from(input.u8() % 8) + 1;
        l.value_bytes_max = usize::from(input.u8() % 32);
        l.name_bytes_max = usize::from(input.u8() % 16);
        l.idempotency_key_bytes_max = usize::from(input.u8() % 16);
    }
    l
}

/// What the validation documented in `write_path::validate` must reject
/// first: the start of the error message, which names the field.
fn first_violation(assertions: &[Assertion], key: Option<&str>, l: &Limits) -> Option<String> {
    if assertions.is_empty() {
        return Some("assertions: a transaction needs at least 1 assertion".into());
    }
    if assertions.len() > l.assertions_per_tx_max {
        return Some(format!(
            "assertions: {} assertions exceed",
            assertions.len()
        ));
    }
    if key.is_some_and(|k| k.len() > l.idempotency_key_bytes_max) {
        return Some("idempotency_key: ".into());
    }
    for (i, a) in assertions.iter().enumerate() {
        for (field, s) in [
            ("entity", &a.entity),
            ("attribute", &a.attribute),
            ("source", &a.source),
        ] {
            if s.is_empty() || s.len() > l.name_bytes_max {
                return Some(format!("assertions[{i}].{field}: "));
            }
        }
        let value_field = match &a.value {
            Value::Text(s) if s.len() > l.value_bytes_max => Some("value"),
            Value::Bytes(b) if b.len() > l.value_bytes_max => Some("value"),
            Value::Ref(r) if r.is_empty() || r.len() > l.name_bytes_max => Some("value.ref"),
            Value::Double(d) if !d.is_finite() => Some("value.double"),
            Value::Timestamp { nanos, .. } if !(0..=999_999_999).contains(nanos) => {
                Some("value.timestamp.nanos")
            }
            _ => None,
        };
        if let Some(field) = value_field {
            return Some(format!("assertions[{i}].{field}: "));
        }
        if a.confidence
            .is_some_and(|c| !(c.is_finite() && (0.0..=1.0).contains(&c)))
        {
            return Some(format!("assertions[{i}].confidence: "));
        }
    }
    None
}

/// The write-path validation of incoming assertions, on transactions built
/// from the input: it never panics, rejects exactly what the documented
/// limits reject with an error naming the first bad field, and whatever it
/// accepts encodes and decodes back to the same record.
pub fn assertion_validation(data: &[u8]) {
    let mut input = Input::new(data);
    let l = limits(&mut input);
    let rec = input.record();
    let key = rec.idempotency_key.as_deref();
    let got = validate::transaction(&rec.assertions, key, &l);
    match (got, first_violation(&rec.assertions, key, &l)) {
        (Ok(()), None) => {
            let bytes = encode_tx(&rec);
            let back = decode_tx(&bytes)
                .unwrap_or_else(|e| panic!("a validated record does not decode: {e}"));
            assert_eq!(back, rec, "a validated record changed in the codec");
            assert_eq!(encode_tx(&back), bytes);
        }
        (Err(e), Some(want)) => {
            assert!(
                e.0.starts_with(&want),
                "error {:?} does not start with {want:?}",
                e.0
            );
        }
        (got, want) => panic!("validation returned {got:?}, expected a failure at {want:?}"),
    }
}

fn hmac_tag(secret: &[u8; TOKEN_SECRET_BYTES], body: &[u8]) -> Vec<u8> {
    let mut m = Hmac::<Sha256>::new_from_slice(secret).expect("hmac accepts any key length");
    m.update(body);
    m.finalize().into_bytes().to_vec()
}

fn expect_invalid(result: Result<Cursor, StoreError>, what: &str) {
    match result {
        Err(StoreError::InvalidPageToken(why)) => assert!(!why.is_empty()),
        other => panic!("{what}: expected InvalidPageToken, got {other:?}"),
    }
}

/// The page-token decoder: arbitrary strings, and arbitrary bodies with a
/// valid MAC, never panic and fail only with `InvalidPageToken`; a token
/// sealed the way the store seals it opens back to its cursor, and only for
/// the same secret, kind and parameters.
pub fn page_token(data: &[u8]) {
    let mut input = Input::new(data);
    let mode = input.u8();
    let secret: [u8; TOKEN_SECRET_BYTES] = input.array();
    let (kind, params) = if input.u8() & 1 == 0 {
        let q = QueryParams {
            attribute: input.string(),
            value: (input.u8() & 1 == 0).then(|| input.value()),
            source: (input.u8() & 1 == 0).then(|| input.string()),
            as_of_tx: (input.u8() & 1 == 0).then(|| input.u64()),
            limit: 1,
        };
        (TokenKind::Query, page::query_params_hash(&q))
    } else {
        let h = HistoryParams {
            entity: input.string(),
            attribute: (input.u8() & 1 == 0).then(|| input.string()),
            since_tx: (input.u8() & 1 == 0).then(|| input.u64()),
            until_tx: (input.u8() & 1 == 0).then(|| input.u64()),
            limit: 1,
        };
        (TokenKind::History, page::history_params_hash(&h))
    };
    let other_kind = match kind {
        TokenKind::Query => TokenKind::History,
        TokenKind::History => TokenKind::Query,
    };
    match mode % 3 {
        0 => {
            let token = String::from_utf8_lossy(input.rest());
            expect_invalid(
                page::open(&secret, kind, &params, &token),
                "arbitrary token",
            );
        }
        1 => {
            // Any body under a valid MAC: the checks after authentication.
            let mut raw = input.rest().to_vec();
            let tag = hmac_tag(&secret, &raw);
            let body_len = raw.len();
            raw.extend_from_slice(&tag);
            let token = URL_SAFE_NO_PAD.encode(&raw);
            let body = &raw[..body_len];
            let well_formed = body.len() >= 30
                && body[0] == 1
                && body[1] == kind as u8
                && body[2..18] == params[..]
                && u32::from_be_bytes([body[26], body[27], body[28], body[29]]) as usize
                    == body.len() - 30;
            match page::open(&secret, kind, &params, &token) {
                Ok(cursor) => {
                    assert!(well_formed, "opened a malformed body");
                    let basis: [u8; 8] = body[18..26].try_into().expect("8 bytes");
                    assert_eq!(cursor.basis_tx, u64::from_be_bytes(basis));
                    assert_eq!(cursor.resume_key, body[30..]);
                }
                other => {
                    assert!(!well_formed, "a well-formed body did not open");
                    expect_invalid(other, "authenticated malformed body");
                }
            }
        }
        _ => {
            // What the store does: seal a cursor, open it on the next page.
            let basis_tx = input.u64();
            // Up to twice 64 KiB: a query key holds the escaped value.
            let filler = match input.u8() % 8 {
                0 => usize::from(input.u16()) * 2,
                _ => usize::from(input.u8()),
            };
            let mut resume_key = input.rest().to_vec();
            resume_key.resize(resume_key.len() + filler, 0);
            let cursor = Cursor {
                basis_tx,
                resume_key,
            };
            let token = page::seal(&secret, kind, &params, &cursor);
            match page::open(&secret, kind, &params, &token) {
                Ok(opened) => assert_eq!(opened, cursor),
                Err(e) => panic!(
                    "a sealed token with a {}-byte resume key does not open: {e}",
                    cursor.resume_key.len()
                ),
            }
            expect_invalid(
                page::open(&secret, other_kind, &params, &token),
                "other kind",
            );
            let mut other_params = params;
            other_params[usize::from(mode) % other_params.len()] ^= 1;
            expect_invalid(
                page::open(&secret, kind, &other_params, &token),
                "other parameters",
            );
            let mut other_secret = secret;
            other_secret[usize::from(mode) % TOKEN_SECRET_BYTES] ^= 1;
            expect_invalid(
                page::open(&other_secret, kind, &params, &token),
                "other secret",
            );
            expect_invalid(
                page::open(&secret, kind, &params, &token[..token.len() - 1]),
                "truncated token",
            );
            let at = usize::from(mode) % token.len();
            let mut changed = token.into_bytes();
            changed[at] = if changed[at] == b'A' { b'B' } else { b'A' };
            let changed = String::from_utf8(changed).expect("base64 is ascii");
            expect_invalid(page::open(&secret, kind, &params, &changed), "changed char");
        }
    }
}
