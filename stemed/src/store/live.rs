//! Streaming "latest version as of T" over a claim-index scan.
//!
//! Claim-index keys are `claim prefix | tx u64 BE | pos u32 BE`, so all
//! versions of one claim are adjacent and ordered by (tx, pos). Walking a
//! range once, we keep only the latest version with `tx <= basis` of the
//! current claim and emit it when the claim ends, if it is an Assert. Memory
//! is one version per claim regardless of how many versions or claims the
//! range holds.

use sled::IVec;

use super::error::StoreError;
use super::keys::{payload_op, version_of, VERSION_SUFFIX_BYTES};
use super::model::Op;

/// What [`LiveClaims::next_live`] found.
pub(crate) enum Next {
    /// A live claim: its latest version (key, payload) as of the basis.
    Live(IVec, IVec),
    /// The scan budget ran out at the end of this claim (its claim prefix);
    /// resume strictly after it.
    Budget(Vec<u8>),
    End,
}

pub(crate) struct LiveClaims<I> {
    inner: I,
    /// Versions read so far.
    scanned: usize,
    /// `next_live` stops at the first claim boundary after this many versions.
    scan_budget: usize,
    /// A key of the last claim fully processed, where a budget stop resumes.
    last_group: Option<IVec>,
    /// The first version of the next claim, read while finding the end of
    /// the previous one.
    pending: Option<(IVec, IVec)>,
    basis_tx: u64,
}

impl<I: Iterator<Item = sled::Result<(IVec, IVec)>>> LiveClaims<I> {
    pub(crate) fn new(inner: I, basis_tx: u64, scan_budget: usize) -> Self {
        LiveClaims {
            inner,
            scanned: 0,
            scan_budget,
            last_group: None,
            pending: None,
            basis_tx,
        }
    }

    fn pull(&mut self) -> Result<Option<(IVec, IVec)>, StoreError> {
        match self.inner.next() {
            None => Ok(None),
            Some(r) => {
                self.scanned += 1;
                Ok(Some(r?))
            }
        }
    }

    /// The next live claim: its latest version (key, payload) with
    /// `tx <= basis_tx`, when that version is an Assert. Claims are never
    /// split: the budget is checked only where a claim ends.
    pub(crate) fn next_live(&mut self) -> Result<Next, StoreError> {
        loop {
            if self.scanned >= self.scan_budget {
                if let Some(done) = self.last_group.take() {
                    return Ok(Next::Budget(claim_prefix(&done)?.to_vec()));
                }
            }
            let first = match self.pending.take() {
                Some(kv) => kv,
                None => match self.pull()? {
                    Some(kv) => kv,
                    None => return Ok(Next::End),
                },
            };
            let group = first.0.clone();
            let claim_len = group.len() - VERSION_SUFFIX_BYTES.min(group.len());
            let mut best = None;
            self.consider(&mut best, first)?;
            while let Some(kv) = self.pull()? {
                let same_claim =
                    kv.0.len() == group.len() && kv.0[..claim_len] == group[..claim_len];
                if !same_claim {
                    self.pending = Some(kv);
                    break;
                }
                self.consider(&mut best, kv)?;
            }
            self.last_group = Some(group);
            if let Some((k, v)) = best {
                if payload_op(&v)? == Op::Assert {
                    return Ok(Next::Live(k, v));
                }
            }
        }
    }

    fn consider(
        &self,
        best: &mut Option<(IVec, IVec)>,
        kv: (IVec, IVec),
    ) -> Result<(), StoreError> {
        let (tx, _pos) = version_of(&kv.0)?;
        // Versions arrive in (tx, pos) order, so the last one at or below the
        // basis is the claim's state as of the basis; later ones in the same
        // tx win, as specified.
        if tx <= self.basis_tx {
            *best = Some(kv);
        }
        Ok(())
    }
}

/// The claim prefix of a claim-index key (everything before tx and pos).
pub(crate) fn claim_prefix(key: &[u8]) -> Result<&[u8], StoreError> {
    version_of(key)?;
    Ok(&key[..key.len() - VERSION_SUFFIX_BYTES])
}
