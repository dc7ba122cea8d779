//! Opaque, authenticated page tokens.
//!
//! A token carries where the next page resumes (a key in the tree) and the
//! basis tx of the first page, so every page of one paging sequence answers
//! as of the same transaction. It is bound to the request parameters by a
//! hash and authenticated with HMAC-SHA256 under a per-store secret, so a
//! client can neither forge a resume position nor reuse a token with other
//! parameters. The page `limit` is deliberately not bound: a client may change
//! its page size between pages.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use super::error::StoreError;
use super::keys::{push_escaped, push_value};
use super::model::{HistoryParams, QueryParams};

type HmacSha256 = Hmac<Sha256>;

pub(crate) const TOKEN_SECRET_BYTES: usize = 32;
const TOKEN_VERSION: u8 = 1;
const PARAMS_HASH_BYTES: usize = 16;
const MAC_BYTES: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TokenKind {
    Query = 1,
    History = 2,
}

/// Where the next page starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Cursor {
    pub basis_tx: u64,
    /// The last key (or claim prefix) the previous page consumed; the next
    /// page starts strictly after it.
    pub resume_key: Vec<u8>,
}

pub(crate) type ParamsHash = [u8; PARAMS_HASH_BYTES];

fn truncate_hash(h: Sha256) -> ParamsHash {
    let full = h.finalize();
    let mut out = [0u8; PARAMS_HASH_BYTES];
    out.copy_from_slice(&full[..PARAMS_HASH_BYTES]);
    out
}

fn push_opt_u64(buf: &mut Vec<u8>, v: Option<u64>) {
    match v {
        Some(x) => {
            buf.push(1);
            buf.extend_from_slice(&x.to_be_bytes());
        }
        None => buf.push(0),
    }
}

/// Hash of every query parameter except `limit`.
pub(crate) fn query_params_hash(q: &QueryParams) -> ParamsHash {
    let mut buf = vec![TokenKind::Query as u8];
    push_escaped(&mut buf, q.attribute.as_bytes());
    match &q.value {
        Some(v) => {
            buf.push(1);
            push_value(&mut buf, v);
        }
        None => buf.push(0),
    }
    match &q.source {
        Some(s) => {
            buf.push(1);
            push_escaped(&mut buf, s.as_bytes());
        }
        None => buf.push(0),
    }
    push_opt_u64(&mut buf, q.as_of_tx);
    truncate_hash(Sha256::new_with_prefix(&buf))
}

/// Hash of every history parameter except `limit`.
pub(crate) fn history_params_hash(h: &HistoryParams) -> ParamsHash {
    let mut buf = vec![TokenKind::History as u8];
    push_escaped(&mut buf, h.entity.as_bytes());
    match &h.attribute {
        Some(a) => {
            buf.push(1);
            push_escaped(&mut buf, a.as_bytes());
        }
        None => buf.push(0),
    }
    push_opt_u64(&mut buf, h.since_tx);
    push_opt_u64(&mut buf, h.until_tx);
    truncate_hash(Sha256::new_with_prefix(&buf))
}

fn mac(secret: &[u8; TOKEN_SECRET_BYTES], body: &[u8]) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(secret).expect("hmac accepts any key length");
    m.update(body);
    m
}

// Format: { version u8 = 1 | kind u8 | params_hash [16] | basis_tx u64 BE
//         | resume_len u32 BE | resume_key | hmac_sha256 [32] (of every byte before it) }
// then base64url without padding.
pub(crate) fn seal(
    secret: &[u8; TOKEN_SECRET_BYTES],
    kind: TokenKind,
    params: &ParamsHash,
    cursor: &Cursor,
) -> String {
    let mut body = Vec::with_capacity(64 + cursor.resume_key.len());
    body.push(TOKEN_VERSION);
    body.push(kind as u8);
    body.extend_from_slice(params);
    body.extend_from_slice(&cursor.basis_tx.to_be_bytes());
    let len = u32::try_from(cursor.resume_key.len()).expect("resume key fits in u32");
    body.extend_from_slice(&len.to_be_bytes());
    body.extend_from_slice(&cursor.resume_key);
    let tag = mac(secret, &body).finalize().into_bytes();
    body.extend_from_slice(&tag);
    URL_SAFE_NO_PAD.encode(body)
}

/// Verifies and opens a token produced by [`seal`] for the same kind and
/// parameters. Every failure is `InvalidPageToken`.
///
/// There is no length cap of its own: a query token carries the claim key,
/// which holds the value, so a token sealed after a claim with a value of
/// `value_bytes_max` bytes is that long (about 8/3 of it, escaped and in
/// base64). The request size limit of the API bounds the token, and the
/// work here is linear in its length.
pub(crate) fn open(
    secret: &[u8; TOKEN_SECRET_BYTES],
    kind: TokenKind,
    params: &ParamsHash,
    token: &str,
) -> Result<Cursor, StoreError> {
    let invalid = |why: &str| StoreError::InvalidPageToken(why.to_string());
    let raw = URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| invalid("not base64url"))?;
    let header = 1 + 1 + PARAMS_HASH_BYTES + 8 + 4;
    if raw.len() < header + MAC_BYTES {
        return Err(invalid("too short"));
    }
    let (body, tag) = raw.split_at(raw.len() - MAC_BYTES);
    mac(secret, body)
        .verify_slice(tag)
        .map_err(|_| invalid("authentication failed"))?;
    // Authenticated from here on: the fields were written by `seal`, but check anyway.
    if body[0] != TOKEN_VERSION {
        return Err(invalid("unknown version"));
    }
    if body[1] != kind as u8 {
        return Err(invalid("token belongs to another kind of request"));
    }
    if body[2..2 + PARAMS_HASH_BYTES] != params[..] {
        return Err(invalid("token belongs to a request with other parameters"));
    }
    let mut at = 2 + PARAMS_HASH_BYTES;
    let mut basis = [0u8; 8];
    basis.copy_from_slice(&body[at..at + 8]);
    at += 8;
    let mut len = [0u8; 4];
    len.copy_from_slice(&body[at..at + 4]);
    at += 4;
    let resume_len = u32::from_be_bytes(len) as usize;
    if body.len() - at != resume_len {
        return Err(invalid("resume key length mismatch"));
    }
    Ok(Cursor {
        basis_tx: u64::from_be_bytes(basis),
        resume_key: body[at..].to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_rejected(secret: &[u8; 32], params: &ParamsHash, token: &str) {
        match open(secret, TokenKind::Query, params, token) {
            Err(StoreError::InvalidPageToken(_)) => {}
            other => panic!("token {token:?} was not rejected: {other:?}"),
        }
    }

    #[test]
    fn round_trip_and_rejections() {
        let secret = [7u8; 32];
        let params = [1u8; PARAMS_HASH_BYTES];
        let cursor = Cursor {
            basis_tx: 42,
            resume_key: vec![3, 0, 1, 255],
        };
        let token = seal(&secret, TokenKind::Query, &params, &cursor);
        assert_eq!(
            open(&secret, TokenKind::Query, &params, &token).unwrap(),
            cursor
        );

        check_rejected(&[8u8; 32], &params, &token);
        check_rejected(&secret, &[2u8; PARAMS_HASH_BYTES], &token);
        assert!(open(&secret, TokenKind::History, &params, &token).is_err());
        check_rejected(&secret, &params, "");
        check_rejected(&secret, &params, "!!!");
        check_rejected(&secret, &params, &token[..token.len() - 1]);
        let raw = URL_SAFE_NO_PAD.decode(&token).unwrap();
        for i in 0..raw.len() {
            let mut m = raw.clone();
            m[i] ^= 0x10;
            check_rejected(&secret, &params, &URL_SAFE_NO_PAD.encode(m));
        }
    }
}
