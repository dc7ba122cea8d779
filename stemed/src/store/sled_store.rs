//! The sled-backed assertion store.
//!
//! # Durability contract
//!
//! `apply` inserts every index entry, tx-log entry and idempotency key of
//! its records one by one, and `applied_lsn` last. sled recovers a prefix of
//! its log after a crash (its recovery stops at the first torn message), so
//! a recovered `applied_lsn` of N means every entry of the records up to N
//! was recovered too. Entries of later records may be recovered in part:
//! they have `tx > applied_lsn`, so reads (which filter `tx <= basis`) and
//! idempotency lookups ignore them, and the replay from `applied_lsn() + 1`
//! writes the same keys with the same values again. sled may lose the most
//! recent inserts on a crash unless `flush` returned after them.
//!
//! Why not one `Tree::apply_batch` per call: sled 0.34 rolls its I/O buffer
//! twice per batch, and each roll hands a write to its I/O thread pool,
//! which wakes all of its threads. Per single-assertion transaction that
//! cost more CPU than the inserts themselves (see docs/benchmarks.md).
//!
//! # Invariants
//!
//! - `applied_lsn` (in memory) is published only after the batch that
//!   contains it is committed, so every index entry with `tx <= applied_lsn`
//!   is visible to readers. Reads filter `tx <= basis`, so a concurrently
//!   committing batch is never half-visible.
//! - An entity-cache entry is the current view of its entity at every LSN
//!   from its `basis_tx` up to the moment it is invalidated; `apply`
//!   invalidates every touched entity before publishing its new LSN.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Bound;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, RwLockWriteGuard};
use std::time::Duration;

use rand::RngCore;
use sled::Batch;

use super::codec::{decode_tx, encode_tx};
use super::error::{corrupt, StoreError};
use super::keys::{self, ClaimKey};
use super::live::{claim_prefix, LiveClaims, Next};
use super::model::Op;
use super::model::{ApplyOutcome, Fact, HistoryParams, Page, QueryParams, TxEntry, TxRecord};
use super::page::{self, Cursor, TokenKind, TOKEN_SECRET_BYTES};

/// The on-disk layout version this build reads and writes. Format 1 stores
/// are migrated on open (`migrate_format_1`).
const FORMAT_VERSION: u64 = 2;
const TREE_NAME: &str = "stemedb";
const META_FORMAT_VERSION: &str = "format_version";
const META_APPLIED_LSN: &str = "applied_lsn";
const META_TOKEN_SECRET: &str = "token_secret";
const META_FACT_COUNT: &str = "fact_count";
/// The first tx whose idempotency key the purge has not examined yet.
const META_IDEM_PURGE_NEXT_TX: &str = "idem_purge_next_tx";
/// Claim versions one `query` page reads at most (checked at claim
/// boundaries) before it returns a short page with a next token.
pub const QUERY_SCAN_VERSIONS_MAX: usize = 64 * 1024;
/// Upper bound on transactions one idempotency purge round examines.
pub const PURGE_KEYS_MAX: usize = 4096;

/// What one [`Store::purge_idempotency_round`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PurgeRound {
    pub keys_removed: usize,
    /// The round stopped at its bound with expired transactions left.
    pub more: bool,
}

/// Configuration of [`Store::open`].
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Directory of the sled database.
    pub path: PathBuf,
    /// sled page cache size.
    pub cache_capacity_bytes: u64,
    /// Entities kept in the current-view cache of `get` (0 disables it).
    pub entity_cache_entries: u64,
    /// Estimated bytes the current-view cache may hold.
    pub entity_cache_bytes: u64,
    /// Idempotency keys older than this are removed by `purge_idempotency`.
    pub idempotency_retention: Duration,
}

/// A cheap-to-clone handle to one open store.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

type EntityCache = moka::sync::Cache<String, Arc<CachedEntity>>;

/// The current view of one entity, valid from `basis_tx` until `apply`
/// invalidates it.
struct CachedEntity {
    basis_tx: u64,
    facts: Vec<Fact>,
}

struct Inner {
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    path: std::path::PathBuf,
    db: sled::Db,
    tree: sled::Tree,
    applied_lsn: AtomicU64,
    fact_count: AtomicU64,
    token_secret: [u8; TOKEN_SECRET_BYTES],
    entity_cache: Option<EntityCache>,
    idempotency_retention: Duration,
    /// Versions one query page may scan; [`QUERY_SCAN_VERSIONS_MAX`] unless a
    /// test lowers it.
    scan_budget: AtomicUsize,
    /// Set when a commit failed; see `apply`.
    write_failed: AtomicBool,
    /// Held for writing by `apply` and `purge_idempotency` (one writer at a
    /// time) and for reading by a cache fill, so a fill never races the
    /// commit, invalidate, publish sequence of an `apply`.
    write_gate: RwLock<()>,
}

impl Store {
    /// Opens (or creates) the store at `cfg.path`.
    pub fn open(cfg: StoreConfig) -> Result<Store, StoreError> {
        let db = open_db(&cfg)?;
        let tree = db.open_tree(TREE_NAME)?;
        check_format(&db, &tree, &cfg.path)?;
        let applied_lsn = read_meta_u64(&tree, META_APPLIED_LSN)?.unwrap_or(0);
        let fact_count = read_meta_u64(&tree, META_FACT_COUNT)?.unwrap_or(0);
        let token_secret = load_or_create_secret(&tree)?;
        let entity_cache = (cfg.entity_cache_entries > 0 && cfg.entity_cache_bytes > 0)
            .then(|| entity_cache(cfg.entity_cache_entries, cfg.entity_cache_bytes));
        // sled fsyncs its files but never a directory: make the store's
        // directory entries (and the store directory itself, in its parent
        // and grandparent) durable before anything relies on them.
        sync_dir_tree(&cfg.path)?;
        let inner = Inner {
            cache_hits: AtomicU64::new(0),
            cache_misses: AtomicU64::new(0),
            path: cfg.path.clone(),
            db,
            tree,
            applied_lsn: AtomicU64::new(applied_lsn),
            fact_count: AtomicU64::new(fact_count),
            token_secret,
            entity_cache,
            idempotency_retention: cfg.idempotency_retention,
            scan_budget: AtomicUsize::new(QUERY_SCAN_VERSIONS_MAX),
            write_failed: AtomicBool::new(false),
            write_gate: RwLock::new(()),
        };
        Ok(Store {
            inner: Arc::new(inner),
        })
    }

    /// Lowers the per-page scan budget of `query` so tests exercise short
    /// pages. Not for production use.
    #[doc(hidden)]
    pub fn set_query_scan_budget_for_tests(&self, versions: usize) {
        self.inner
            .scan_budget
            .store(versions.max(1), Ordering::Relaxed);
    }

    /// The LSN of the last WAL record reflected in the store; 0 for a new store.
    pub fn applied_lsn(&self) -> u64 {
        self.inner.applied_lsn.load(Ordering::Acquire)
    }

    fn write_lock(&self) -> RwLockWriteGuard<'_, ()> {
        // The guarded data is `()`, so a poisoned lock protects nothing broken.
        self.inner
            .write_gate
            .write()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Applies WAL records, in strictly increasing and dense LSN order
    /// starting at `applied_lsn() + 1`; a gap or repeat is
    /// `StoreError::LsnOrder` and applies nothing.
    ///
    /// Index entries, the tx log and idempotency keys are inserted first and
    /// `applied_lsn` last (see the durability contract above). A record whose idempotency key was
    /// already applied (before, or earlier in this call) is a `Duplicate`: it
    /// consumes its LSN but adds no facts and no tx-log entry.
    ///
    /// If sled fails while committing, the in-memory tree may hold part of
    /// the batch, so every later `apply` fails with `StoreError::WriteFailed`:
    /// retrying could not be trusted. Restart, reopen and replay from
    /// `applied_lsn() + 1`; partial entries have `tx > applied_lsn` and are
    /// invisible to reads and overwritten by the replay.
    pub fn apply(&self, records: &[(u64, TxRecord)]) -> Result<Vec<ApplyOutcome>, StoreError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let last_lsn = self.applied_lsn() + records.len() as u64;
        self.apply_inner(records, true, last_lsn)
    }

    /// Restore path: applies transactions exported from another store
    /// ([`Store::export_transactions`]), whose LSNs increase but may have
    /// gaps (LSNs the source consumed for duplicate records), then sets
    /// `applied_lsn` to `through_lsn`. Atomic like [`Store::apply`].
    pub fn import(
        &self,
        records: &[(u64, TxRecord)],
        through_lsn: u64,
    ) -> Result<Vec<ApplyOutcome>, StoreError> {
        if let Some((last, _)) = records.last() {
            if *last > through_lsn {
                return Err(StoreError::LsnOrder {
                    expected: through_lsn,
                    got: *last,
                });
            }
        }
        self.apply_inner(records, false, through_lsn)
    }

    /// Raw transaction-log entries `(tx, encoded record)` with `from_tx <=
    /// tx <= to_tx` (clamped to `applied_lsn`), at most `limit`. The log is
    /// append-only and every entry is immutable, so paging through it while
    /// writes continue yields a consistent export as of `to_tx`.
    pub fn export_transactions(
        &self,
        from_tx: u64,
        to_tx: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let to = to_tx.min(self.applied_lsn());
        let mut out = Vec::new();
        if from_tx > to {
            return Ok(out);
        }
        for kv in self
            .inner
            .tree
            .range(keys::txlog_key(from_tx)..=keys::txlog_key(to))
            .take(limit)
        {
            let (k, v) = kv?;
            out.push((keys::decode_txlog_key(&k)?, v.to_vec()));
        }
        Ok(out)
    }

    fn apply_inner(
        &self,
        records: &[(u64, TxRecord)],
        dense: bool,
        last_lsn: u64,
    ) -> Result<Vec<ApplyOutcome>, StoreError> {
        let _gate = self.write_lock();
        if self.inner.write_failed.load(Ordering::Acquire) {
            return Err(StoreError::WriteFailed);
        }
        let first_lsn = self.applied_lsn() + 1;
        let mut staged = Staged::default();
        let mut previous = first_lsn - 1;
        for (i, (lsn, rec)) in records.iter().enumerate() {
            let expected = first_lsn + i as u64;
            let in_order = if dense {
                *lsn == expected
            } else {
                *lsn > previous
            };
            if !in_order {
                return Err(StoreError::LsnOrder {
                    expected,
                    got: *lsn,
                });
            }
            previous = *lsn;
            let outcome = self.stage_record(&mut staged, *lsn, rec)?;
            staged.outcomes.push(outcome);
        }
        if last_lsn < previous || last_lsn < first_lsn - 1 {
            return Err(StoreError::LsnOrder {
                expected: previous,
                got: last_lsn,
            });
        }
        let fact_count = self.inner.fact_count.load(Ordering::Relaxed) + staged.facts_added;
        let meta = [
            (keys::meta_key(META_FACT_COUNT), fact_count.to_be_bytes()),
            // Last: it says which records every entry before it belongs to.
            (keys::meta_key(META_APPLIED_LSN), last_lsn.to_be_bytes()),
        ];
        let tree = &self.inner.tree;
        let inserted = insert_all(tree, staged.writes).and_then(|()| {
            meta.into_iter()
                .try_for_each(|(k, v)| tree.insert(k, &v).map(drop))
        });
        if let Err(e) = inserted {
            self.inner.write_failed.store(true, Ordering::Release);
            return Err(e.into());
        }
        if let Some(cache) = &self.inner.entity_cache {
            for entity in &staged.touched {
                cache.invalidate(entity.as_str());
            }
        }
        self.inner.fact_count.store(fact_count, Ordering::Relaxed);
        self.inner.applied_lsn.store(last_lsn, Ordering::Release);
        Ok(staged.outcomes)
    }

    fn stage_record(
        &self,
        staged: &mut Staged,
        lsn: u64,
        rec: &TxRecord,
    ) -> Result<ApplyOutcome, StoreError> {
        if let Some(key) = &rec.idempotency_key {
            let earlier = match staged.new_keys.get(key) {
                Some(&v) => Some(v),
                None => self.lookup_idempotency(key)?,
            };
            if let Some((original_tx, recorded_at_micros)) = earlier {
                return Ok(ApplyOutcome::Duplicate {
                    original_tx,
                    recorded_at_micros,
                });
            }
            staged
                .new_keys
                .insert(key.clone(), (lsn, rec.recorded_at_micros));
            staged.writes.push((
                keys::idem_key(key),
                keys::encode_idem_value(lsn, rec.recorded_at_micros).to_vec(),
            ));
        }
        stage_indexes(&mut staged.writes, lsn, rec)?;
        for a in &rec.assertions {
            if !staged.touched.contains(&a.entity) {
                staged.touched.insert(a.entity.clone());
            }
        }
        staged
            .writes
            .push((keys::txlog_key(lsn).to_vec(), encode_tx(rec)));
        staged.facts_added += rec.assertions.len() as u64;
        Ok(ApplyOutcome::Applied {
            tx: lsn,
            recorded_at_micros: rec.recorded_at_micros,
        })
    }

    /// The `(tx, recorded_at_micros)` that first applied `key`, if retained.
    pub fn lookup_idempotency(&self, key: &str) -> Result<Option<(u64, i64)>, StoreError> {
        let Some(v) = self.inner.tree.get(keys::idem_key(key))? else {
            return Ok(None);
        };
        let (tx, recorded_at_micros) = keys::decode_idem_value(&v)?;
        // An entry beyond applied_lsn is left over from a failed batch; its
        // record has not been applied (yet), so the key is not taken.
        if tx > self.applied_lsn() {
            return Ok(None);
        }
        Ok(Some((tx, recorded_at_micros)))
    }

    /// `as_of` None or 0 means current; later than current is clamped.
    fn effective_basis(&self, as_of_tx: Option<u64>, current: u64) -> u64 {
        match as_of_tx {
            None | Some(0) => current,
            Some(t) => t.min(current),
        }
    }

    /// Every live claim of `entity` as of `as_of_tx`, in (attribute, value,
    /// source) order, and the basis tx of the answer.
    pub fn get(&self, entity: &str, as_of_tx: Option<u64>) -> Result<(Vec<Fact>, u64), StoreError> {
        let current = self.applied_lsn();
        let basis = self.effective_basis(as_of_tx, current);
        let cache = self
            .inner
            .entity_cache
            .as_ref()
            .filter(|_| basis == current);
        if let Some(cache) = cache {
            if let Some(hit) = cache.get(entity) {
                self.inner.cache_hits.fetch_add(1, Ordering::Relaxed);
                // The entry was current at every LSN from its basis until now.
                return Ok((hit.facts.clone(), hit.basis_tx.max(basis)));
            }
            self.inner.cache_misses.fetch_add(1, Ordering::Relaxed);
        }
        let facts = self.scan_entity(entity, basis)?;
        if let Some(cache) = cache {
            self.fill_cache(cache, entity, basis, &facts);
        }
        Ok((facts, basis))
    }

    /// Caches `facts` as the current view of `entity` if it still is: only
    /// when no apply is running and none published since `basis` was read
    /// (one that did may have touched this entity). Never waits for a running
    /// apply: a busy writer just means this answer is not cached.
    fn fill_cache(&self, cache: &EntityCache, entity: &str, basis: u64, facts: &[Fact]) {
        let _gate = match self.inner.write_gate.try_read() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return,
        };
        if self.applied_lsn() == basis {
            let entry = CachedEntity {
                basis_tx: basis,
                facts: facts.to_vec(),
            };
            cache.insert(entity.to_string(), Arc::new(entry));
        }
    }

    /// Folds the entity's log (one entry per transaction, in tx order) up
    /// to `basis` into its live claims, in claim order (attribute, value,
    /// source). The latest version of a claim wins; within one transaction
    /// the later position wins.
    fn scan_entity(&self, entity: &str, basis: u64) -> Result<Vec<Fact>, StoreError> {
        let prefix = keys::ent_prefix(entity);
        let end = keys::ent_key(entity, basis);
        let mut claims: BTreeMap<Vec<u8>, Fact> = BTreeMap::new();
        for kv in self.inner.tree.range(prefix.clone()..=end) {
            let (k, v) = kv?;
            let tx = keys::ent_key_tx(&k, prefix.len())?;
            let (recorded_at_micros, items) = keys::decode_ent_value(&v)?;
            for (_pos, assertion) in items {
                claims.insert(
                    keys::claim_order_key(&assertion),
                    Fact {
                        assertion,
                        tx,
                        recorded_at_micros,
                    },
                );
            }
        }
        Ok(claims
            .into_values()
            .filter(|f| f.assertion.op == Op::Assert)
            .collect())
    }

    /// Live claims with `q.attribute` (optionally one value and/or source) as
    /// of `q.as_of_tx`, ordered by (value, entity, source), one page of at
    /// most `q.limit` facts. A page may be shorter than the limit (even
    /// empty) and still carry a next token when it scanned
    /// [`QUERY_SCAN_VERSIONS_MAX`] versions; only a missing token means the end.
    pub fn query(&self, q: &QueryParams, page_token: Option<&str>) -> Result<Page, StoreError> {
        let limit = q.limit.max(1);
        let params = page::query_params_hash(q);
        let prefix = keys::avet_prefix(&q.attribute, q.value.as_ref());
        let (basis, start) = match page_token {
            None => (
                self.effective_basis(q.as_of_tx, self.applied_lsn()),
                Bound::Included(prefix.clone()),
            ),
            Some(token) => {
                let cursor = self.open_token(TokenKind::Query, &params, token, &prefix)?;
                // Every version key of the resumed claim is `claim | 12 bytes`,
                // all <= `claim | 0xFF * 12`; every later claim sorts above.
                let mut after = cursor.resume_key;
                after.extend_from_slice(&[0xFF; keys::VERSION_SUFFIX_BYTES]);
                (cursor.basis_tx, Bound::Excluded(after))
            }
        };
        let end = keys::prefix_end(&prefix).map_or(Bound::Unbounded, Bound::Excluded);
        let budget = self.inner.scan_budget.load(Ordering::Relaxed);
        let mut live = LiveClaims::new(
            self.inner.tree.range::<Vec<u8>, _>((start, end)),
            basis,
            budget,
        );
        let mut facts = Vec::with_capacity(limit.min(1024));
        let mut last_claim: Vec<u8> = Vec::new();
        let mut next_page_token = None;
        loop {
            let (k, v) = match live.next_live()? {
                Next::Live(k, v) => (k, v),
                Next::End => break,
                Next::Budget(claim) => {
                    // Scanned a lot without filling the page (a selective
                    // source filter, or many dead versions): return what we
                    // have and let the client continue after this claim.
                    let cursor = Cursor {
                        basis_tx: basis,
                        resume_key: claim,
                    };
                    next_page_token = Some(page::seal(
                        &self.inner.token_secret,
                        TokenKind::Query,
                        &params,
                        &cursor,
                    ));
                    break;
                }
            };
            let ck = keys::decode_avet(&k)?;
            if q.source.as_ref().is_some_and(|s| *s != ck.source) {
                continue;
            }
            if facts.len() == limit {
                let cursor = Cursor {
                    basis_tx: basis,
                    resume_key: last_claim,
                };
                next_page_token = Some(page::seal(
                    &self.inner.token_secret,
                    TokenKind::Query,
                    &params,
                    &cursor,
                ));
                break;
            }
            last_claim = claim_prefix(&k)?.to_vec();
            facts.push(claim_fact(ck, &v)?);
        }
        debug_assert!(facts.len() <= limit);
        Ok(Page {
            facts,
            next_page_token,
            basis_tx: basis,
        })
    }

    fn open_token(
        &self,
        kind: TokenKind,
        params: &page::ParamsHash,
        token: &str,
        prefix: &[u8],
    ) -> Result<Cursor, StoreError> {
        let cursor = page::open(&self.inner.token_secret, kind, params, token)?;
        if !cursor.resume_key.starts_with(prefix) || cursor.basis_tx > self.applied_lsn() {
            return Err(StoreError::InvalidPageToken(
                "resume position does not match the request".into(),
            ));
        }
        Ok(cursor)
    }

    /// Every assertion and retraction of `h.entity` (optionally one
    /// attribute) with `since_tx <= tx <= until_tx`, in (tx, position) order.
    /// `until_tx` is clamped to the basis (applied_lsn at the first page).
    pub fn history(&self, h: &HistoryParams, page_token: Option<&str>) -> Result<Page, StoreError> {
        let limit = h.limit.max(1);
        let params = page::history_params_hash(h);
        let prefix = keys::ent_prefix(&h.entity);
        let since = h.since_tx.unwrap_or(0);
        // The cursor is `prefix | tx | pos` of the last fact returned.
        let (basis, resume) = match page_token {
            None => (self.applied_lsn(), None),
            Some(token) => {
                let cursor = self.open_token(TokenKind::History, &params, token, &prefix)?;
                if cursor.resume_key.len() != prefix.len() + keys::VERSION_SUFFIX_BYTES {
                    return Err(StoreError::InvalidPageToken(
                        "resume position does not match the request".into(),
                    ));
                }
                (cursor.basis_tx, Some(keys::version_of(&cursor.resume_key)?))
            }
        };
        let until = h.until_tx.unwrap_or(u64::MAX).min(basis);
        let mut page = Page {
            facts: Vec::new(),
            next_page_token: None,
            basis_tx: basis,
        };
        let from_tx = match resume {
            Some((tx, _)) => tx.max(since),
            None => since,
        };
        if from_tx > until {
            return Ok(page);
        }
        let start = keys::ent_key(&h.entity, from_tx);
        let end = keys::ent_key(&h.entity, until);
        let mut last = None;
        for kv in self.inner.tree.range(start..=end) {
            let (k, v) = kv?;
            let tx = keys::ent_key_tx(&k, prefix.len())?;
            let (recorded_at_micros, items) = keys::decode_ent_value(&v)?;
            for (pos, assertion) in items {
                if resume.is_some_and(|r| (tx, pos) <= r) {
                    continue;
                }
                if h.attribute
                    .as_ref()
                    .is_some_and(|a| *a != assertion.attribute)
                {
                    continue;
                }
                if page.facts.len() == limit {
                    let (tx, pos) = last.expect("a full page has a last fact");
                    let cursor = Cursor {
                        basis_tx: basis,
                        resume_key: keys::with_version(&prefix, tx, pos),
                    };
                    page.next_page_token = Some(page::seal(
                        &self.inner.token_secret,
                        TokenKind::History,
                        &params,
                        &cursor,
                    ));
                    return Ok(page);
                }
                page.facts.push(Fact {
                    assertion,
                    tx,
                    recorded_at_micros,
                });
                last = Some((tx, pos));
            }
        }
        Ok(page)
    }

    /// Committed transactions with `tx >= from_tx`, in tx order, at most
    /// `limit` (for Watch catch-up). Duplicates consumed an LSN but have no entry.
    pub fn transactions_from(
        &self,
        from_tx: u64,
        limit: usize,
    ) -> Result<Vec<TxEntry>, StoreError> {
        let current = self.applied_lsn();
        let mut out = Vec::new();
        if from_tx > current {
            return Ok(out);
        }
        let range = keys::txlog_key(from_tx)..=keys::txlog_key(current);
        for kv in self.inner.tree.range(range).take(limit) {
            let (k, v) = kv?;
            let tx = keys::decode_txlog_key(&k)?;
            let rec = decode_tx(&v)?;
            let recorded_at_micros = rec.recorded_at_micros;
            let facts = rec
                .assertions
                .into_iter()
                .map(|assertion| Fact {
                    assertion,
                    tx,
                    recorded_at_micros,
                })
                .collect();
            out.push(TxEntry {
                tx,
                recorded_at_micros,
                facts,
            });
        }
        Ok(out)
    }

    /// Flushes sled; returns an LSN that is now durable (every record up to
    /// it survives a crash).
    pub fn flush(&self) -> Result<u64, StoreError> {
        // Read before flushing: the batch of this LSN is already committed in
        // memory, so the flush below makes it (and all before it) durable.
        let lsn = self.applied_lsn();
        self.inner.db.flush()?;
        // sled 0.34's flush writes its buffers but leaves the fsync to a
        // background thread (it waits only for `sync_file_range`), so a
        // checkpoint could truncate WAL records sled has not made durable.
        // Found by the power-loss suite. fsync every file and directory of
        // the store here; only then is `lsn` durable.
        sync_dir_tree(&self.inner.path)?;
        Ok(lsn)
    }

    /// Entity-cache hits and misses of current-view `get`s since open.
    pub fn cache_stats(&self) -> (u64, u64) {
        (
            self.inner.cache_hits.load(Ordering::Relaxed),
            self.inner.cache_misses.load(Ordering::Relaxed),
        )
    }

    /// The store's directory.
    pub fn path(&self) -> &std::path::Path {
        &self.inner.path
    }

    /// [`Store::flush`] on the blocking thread pool.
    pub async fn flush_async(&self) -> Result<u64, StoreError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.flush())
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// Removes every idempotency key recorded more than the retention
    /// before `now_micros`, in rounds of [`purge_idempotency_round`] (the
    /// write gate is released between rounds, so applies interleave);
    /// returns how many keys were removed.
    ///
    /// [`purge_idempotency_round`]: Store::purge_idempotency_round
    pub fn purge_idempotency(&self, now_micros: i64) -> Result<usize, StoreError> {
        let mut removed = 0;
        loop {
            let round = self.purge_idempotency_round(now_micros)?;
            removed += round.keys_removed;
            if !round.more {
                return Ok(removed);
            }
        }
    }

    /// One bounded purge round: walks the transaction log from the purge
    /// cursor (meta `idem_purge_next_tx`) over at most [`PURGE_KEYS_MAX`]
    /// transactions recorded before the cutoff, removing each one's
    /// idempotency key if the key still maps to it, and advances the cursor
    /// in the same batch. It stops at the first transaction recorded at or
    /// after the cutoff: transactions are recorded in LSN order, so the rest
    /// are younger (after a backwards clock step they may not be; their keys
    /// are then kept longer, never dropped early).
    pub fn purge_idempotency_round(&self, now_micros: i64) -> Result<PurgeRound, StoreError> {
        let retention_micros =
            i64::try_from(self.inner.idempotency_retention.as_micros()).unwrap_or(i64::MAX);
        let cutoff = now_micros.saturating_sub(retention_micros);
        let _gate = self.write_lock();
        let from = read_meta_u64(&self.inner.tree, META_IDEM_PURGE_NEXT_TX)?.unwrap_or(1);
        let through = self.applied_lsn();
        let mut round = PurgeRound {
            keys_removed: 0,
            more: false,
        };
        if from > through {
            return Ok(round);
        }
        let mut batch = Batch::default();
        let mut next = from;
        let log = self
            .inner
            .tree
            .range(keys::txlog_key(from)..=keys::txlog_key(through));
        for (examined, kv) in log.enumerate() {
            if examined == PURGE_KEYS_MAX {
                round.more = true;
                break;
            }
            let (k, v) = kv?;
            let tx = keys::decode_txlog_key(&k)?;
            let rec = decode_tx(&v)?;
            if rec.recorded_at_micros >= cutoff {
                break;
            }
            next = tx + 1;
            if let Some(key) = &rec.idempotency_key {
                // A purged key may have been used again by a later tx.
                if self.lookup_idempotency(key)?.is_some_and(|(t, _)| t == tx) {
                    batch.remove(keys::idem_key(key));
                    round.keys_removed += 1;
                }
            }
        }
        if next > from {
            batch.insert(keys::meta_key(META_IDEM_PURGE_NEXT_TX), &next.to_be_bytes());
            self.inner.tree.apply_batch(batch)?;
        }
        Ok(round)
    }

    /// Bytes sled uses on disk (0 if it cannot tell).
    pub fn size_on_disk(&self) -> u64 {
        self.inner.db.size_on_disk().unwrap_or(0)
    }

    /// Assertions stored (applied, non-duplicate), counting retractions.
    pub fn fact_count_estimate(&self) -> u64 {
        self.inner.fact_count.load(Ordering::Relaxed)
    }
}

/// What one `apply` call builds before committing.
#[derive(Default)]
struct Staged {
    /// Keys and values to insert, in order.
    writes: Vec<(Vec<u8>, Vec<u8>)>,
    outcomes: Vec<ApplyOutcome>,
    new_keys: HashMap<String, (u64, i64)>,
    touched: HashSet<String>,
    facts_added: u64,
}

/// A cache bounded both in entries and in bytes: an entry weighs its
/// estimated size, but never less than one slot of `bytes_max / entries_max`,
/// so a total weight within `bytes_max` also means at most `entries_max`
/// entries.
fn entity_cache(entries_max: u64, bytes_max: u64) -> EntityCache {
    let slot = (bytes_max / entries_max).max(1);
    moka::sync::Cache::builder()
        .max_capacity(bytes_max)
        .weigher(move |entity: &String, cached: &Arc<CachedEntity>| {
            let bytes = (entity.len() + cached.estimated_bytes()) as u64;
            u32::try_from(bytes.max(slot)).unwrap_or(u32::MAX)
        })
        .build()
}

impl CachedEntity {
    /// Heap and inline bytes of the cached facts, approximately.
    fn estimated_bytes(&self) -> usize {
        use super::model::Value;
        let value_bytes = |v: &Value| match v {
            Value::Text(s) | Value::Ref(s) => s.len(),
            Value::Bytes(b) => b.len(),
            _ => 0,
        };
        std::mem::size_of::<Self>()
            + self
                .facts
                .iter()
                .map(|f| {
                    let a = &f.assertion;
                    std::mem::size_of::<Fact>()
                        + a.entity.len()
                        + a.attribute.len()
                        + a.source.len()
                        + value_bytes(&a.value)
                })
                .sum::<usize>()
    }
}

fn claim_fact(ck: ClaimKey, payload: &[u8]) -> Result<Fact, StoreError> {
    let p = keys::decode_claim_payload(payload)?;
    let assertion = super::model::Assertion {
        entity: ck.entity,
        attribute: ck.attribute,
        value: ck.value,
        source: ck.source,
        confidence: p.confidence,
        op: p.op,
    };
    Ok(Fact {
        assertion,
        tx: ck.tx,
        recorded_at_micros: p.recorded_at_micros,
    })
}

/// How long `open` waits for the lock of a database that the same process
/// just closed.
const OPEN_LOCK_WAIT_MAX: Duration = Duration::from_secs(5);
const OPEN_LOCK_RETRY_INTERVAL: Duration = Duration::from_millis(10);

/// Opens sled, waiting a bounded time for its file lock. sled releases the
/// lock only when its last background I/O thread drops its handle, which can
/// be shortly after the last `Db` is dropped; an in-process reopen (tests,
/// a restart of the store inside one process) would otherwise fail at random.
/// A lock held by another process still fails after `OPEN_LOCK_WAIT_MAX`.
fn open_db(cfg: &StoreConfig) -> Result<sled::Db, StoreError> {
    let started = std::time::Instant::now();
    loop {
        // No periodic flush of sled's own: the WAL makes writes durable, and
        // checkpoints (`Store::flush`) make sled durable when WAL records are
        // to be released. A 500 ms background flush only competed with WAL
        // fsyncs for the disk and cost ~25% of sled's insert time (measured
        // with 100-key batches).
        let config = sled::Config::new()
            .path(&cfg.path)
            .cache_capacity(cfg.cache_capacity_bytes)
            .flush_every_ms(None);
        match config.open() {
            Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                if started.elapsed() >= OPEN_LOCK_WAIT_MAX {
                    return Err(sled::Error::Io(e).into());
                }
                std::thread::sleep(OPEN_LOCK_RETRY_INTERVAL);
            }
            other => return Ok(other?),
        }
    }
}

fn read_meta_u64(tree: &sled::Tree, name: &str) -> Result<Option<u64>, StoreError> {
    match tree.get(keys::meta_key(name))? {
        None => Ok(None),
        Some(v) => {
            let bytes: [u8; 8] = v
                .as_ref()
                .try_into()
                .map_err(|_| corrupt(format!("meta {name} is {} bytes, expected 8", v.len())))?;
            Ok(Some(u64::from_be_bytes(bytes)))
        }
    }
}

fn check_format(
    db: &sled::Db,
    tree: &sled::Tree,
    path: &std::path::Path,
) -> Result<(), StoreError> {
    match read_meta_u64(tree, META_FORMAT_VERSION)? {
        Some(FORMAT_VERSION) => Ok(()),
        Some(1) => migrate_format_1(db, tree, path),
        Some(found) => Err(StoreError::UnsupportedFormat {
            found,
            supported: FORMAT_VERSION,
        }),
        None if tree.is_empty() => {
            tree.insert(
                keys::meta_key(META_FORMAT_VERSION),
                &FORMAT_VERSION.to_be_bytes(),
            )?;
            Ok(())
        }
        None => Err(corrupt("store has data but no format_version")),
    }
}

/// Entries one migration batch writes or removes at most.
const MIGRATION_BATCH_KEYS_MAX: usize = 4096;

/// Format 1 → 2. Rebuilds the ENT entries from the transaction log (which
/// holds every applied transaction), removes the retired per-claim and
/// per-version entries (AVET is unchanged), makes that durable, and only
/// then records format 2. Interrupted at any point, the store still says
/// format 1 and the next open starts over: re-inserting an ENT entry writes
/// the same bytes, and removing a missing key is a no-op.
fn migrate_format_1(
    db: &sled::Db,
    tree: &sled::Tree,
    path: &std::path::Path,
) -> Result<(), StoreError> {
    let started = std::time::Instant::now();
    tracing::info!(
        path = %path.display(),
        "store format 1: migrating to format 2 (entity log rebuilt from the transaction log)"
    );
    let mut batch = Batch::default();
    let mut staged = 0;
    let mut txs = 0u64;
    for kv in tree.scan_prefix([keys::TXLOG]) {
        let (k, v) = kv?;
        let tx = keys::decode_txlog_key(&k)?;
        let rec = decode_tx(&v)?;
        for (key, value) in entity_log_entries(tx, &rec) {
            batch.insert(key, value);
            staged += 1;
        }
        txs += 1;
        if staged >= MIGRATION_BATCH_KEYS_MAX {
            tree.apply_batch(std::mem::take(&mut batch))?;
            staged = 0;
        }
        if txs.is_multiple_of(100_000) {
            tracing::info!(transactions = txs, "store migration: entity log progress");
        }
    }
    tree.apply_batch(batch)?;
    let mut removed = 0u64;
    for tag in keys::RETIRED_FORMAT_1 {
        loop {
            let mut batch = Batch::default();
            let mut n = 0;
            for kv in tree.scan_prefix([tag]).take(MIGRATION_BATCH_KEYS_MAX) {
                batch.remove(kv?.0);
                n += 1;
            }
            if n == 0 {
                break;
            }
            tree.apply_batch(batch)?;
            removed += n;
        }
    }
    db.flush()?;
    sync_dir_tree(path)?;
    tree.insert(
        keys::meta_key(META_FORMAT_VERSION),
        &FORMAT_VERSION.to_be_bytes(),
    )?;
    db.flush()?;
    sync_dir_tree(path)?;
    tracing::info!(
        transactions = txs,
        retired_entries_removed = removed,
        seconds = started.elapsed().as_secs_f64(),
        "store migrated to format 2"
    );
    Ok(())
}

/// The ENT entries of one transaction: one per entity it touches, holding
/// that entity's assertions with their positions.
fn entity_log_entries(lsn: u64, rec: &TxRecord) -> Vec<(Vec<u8>, Vec<u8>)> {
    let at = rec.recorded_at_micros;
    let positioned = rec.assertions.iter().enumerate().map(|(pos, a)| {
        (
            u32::try_from(pos).expect("validated: fewer than u32::MAX assertions"),
            a,
        )
    });
    // The common case, every assertion on one entity, needs no grouping.
    if let Some(first) = rec.assertions.first() {
        if rec.assertions.iter().all(|a| a.entity == first.entity) {
            let items: Vec<_> = positioned.collect();
            return vec![(
                keys::ent_key(&first.entity, lsn),
                keys::encode_ent_value(at, &items),
            )];
        }
    }
    let mut by_entity: BTreeMap<&str, Vec<(u32, &super::model::Assertion)>> = BTreeMap::new();
    for (pos, a) in positioned {
        by_entity
            .entry(a.entity.as_str())
            .or_default()
            .push((pos, a));
    }
    by_entity
        .into_iter()
        .map(|(entity, items)| {
            (
                keys::ent_key(entity, lsn),
                keys::encode_ent_value(at, &items),
            )
        })
        .collect()
}

/// Inserts one thread takes at least when an `apply` is split across
/// threads (replay and large batches; a thread start costs ~50 µs), so a
/// split starts at twice this many.
const INSERTS_PER_THREAD_MIN: usize = 2048;

/// Inserts `writes` (distinct keys, so in any order). Large sets are split
/// across up to four threads: sled's inserts are concurrent, and replaying
/// the WAL is otherwise bound by one core.
fn insert_all(tree: &sled::Tree, mut writes: Vec<(Vec<u8>, Vec<u8>)>) -> sled::Result<()> {
    let insert = |part: Vec<(Vec<u8>, Vec<u8>)>| {
        part.into_iter()
            .try_for_each(|(k, v)| tree.insert(k, v).map(drop))
    };
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(4)
        .min(writes.len() / INSERTS_PER_THREAD_MIN);
    if threads < 2 {
        return insert(writes);
    }
    let chunk = writes.len().div_ceil(threads);
    let mut parts = Vec::with_capacity(threads);
    while writes.len() > chunk {
        parts.push(writes.split_off(writes.len() - chunk));
    }
    std::thread::scope(|scope| {
        let helpers: Vec<_> = parts
            .into_iter()
            .map(|part| scope.spawn(move || insert(part)))
            .collect();
        let mine = insert(writes);
        helpers
            .into_iter()
            .map(|h| h.join().expect("an insert thread panicked"))
            .fold(mine, |acc, r| acc.and(r))
    })
}

/// The index entries of one transaction: an AVET entry per assertion and
/// an ENT entry per entity.
fn stage_indexes(
    writes: &mut Vec<(Vec<u8>, Vec<u8>)>,
    lsn: u64,
    rec: &TxRecord,
) -> Result<(), StoreError> {
    for (pos, a) in rec.assertions.iter().enumerate() {
        let pos = u32::try_from(pos)
            .map_err(|_| corrupt(format!("tx {lsn} has more than u32::MAX assertions")))?;
        writes.push((
            keys::avet_key(a, lsn, pos),
            keys::encode_claim_payload(a, rec.recorded_at_micros),
        ));
    }
    writes.extend(entity_log_entries(lsn, rec));
    Ok(())
}

fn load_or_create_secret(tree: &sled::Tree) -> Result<[u8; TOKEN_SECRET_BYTES], StoreError> {
    let key = keys::meta_key(META_TOKEN_SECRET);
    if let Some(v) = tree.get(&key)? {
        return v.as_ref().try_into().map_err(|_| {
            corrupt(format!(
                "token secret is {} bytes, expected {TOKEN_SECRET_BYTES}",
                v.len()
            ))
        });
    }
    let mut secret = [0u8; TOKEN_SECRET_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut secret);
    tree.insert(&key, &secret)?;
    // Tokens handed out must stay valid across a restart.
    tree.flush()?;
    Ok(secret)
}

/// Directories below the store that are walked when syncing (sled keeps
/// `blobs/` one level down).
const SYNC_DEPTH_MAX: usize = 3;

/// fsyncs every regular file and directory under `root` (to
/// `SYNC_DEPTH_MAX` levels), then `root`'s parent and grandparent, so that
/// the files' data, their names and the store directory's own name are all
/// durable.
fn sync_dir_tree(root: &std::path::Path) -> Result<(), StoreError> {
    fn walk(dir: &std::path::Path, depth: usize) -> std::io::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_file() {
                match std::fs::File::open(entry.path()) {
                    Ok(f) => f.sync_all()?,
                    // sled removed it (a blob it no longer needs) after the
                    // listing: nothing of it is left to make durable.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            } else if kind.is_dir() && depth < SYNC_DEPTH_MAX {
                walk(&entry.path(), depth + 1)?;
            }
        }
        std::fs::File::open(dir)?.sync_all()
    }
    let io = |e: std::io::Error| StoreError::Io(format!("syncing {}: {e}", root.display()));
    walk(root, 0).map_err(io)?;
    let mut up = root.canonicalize().map_err(io)?;
    for _ in 0..2 {
        if !up.pop() {
            break;
        }
        std::fs::File::open(&up)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::model::{Assertion, Op, Value};

    fn _store_is_send_sync_clone() {
        fn check<T: Send + Sync + Clone + 'static>() {}
        check::<Store>();
    }

    fn open(dir: &std::path::Path) -> Store {
        Store::open(StoreConfig {
            path: dir.to_path_buf(),
            cache_capacity_bytes: 4 << 20,
            entity_cache_entries: 16,
            entity_cache_bytes: 1 << 20,
            idempotency_retention: Duration::from_secs(1),
        })
        .unwrap()
    }

    fn record(key: Option<String>, at: i64, entity: &str) -> TxRecord {
        let a = Assertion {
            entity: entity.into(),
            attribute: "a".into(),
            value: Value::Ref("x".into()),
            source: "s".into(),
            confidence: Some(0.5),
            op: Op::Assert,
        };
        TxRecord {
            idempotency_key: key,
            recorded_at_micros: at,
            assertions: vec![a],
        }
    }

    /// A format-1 store, as that format laid it out: the transaction log,
    /// AVET, and entries under every retired tag. Opening it migrates it.
    #[test]
    fn format_1_stores_are_migrated_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let mut second = record(None, 20, "e");
        second.assertions[0].op = Op::Retract;
        second.assertions.push(Assertion {
            entity: "f".into(),
            attribute: "b".into(),
            value: Value::Int64(7),
            source: "s".into(),
            confidence: None,
            op: Op::Assert,
        });
        let records = [record(None, 10, "e"), second, record(None, 30, "g")];
        {
            let db = sled::Config::new().path(dir.path()).open().unwrap();
            let tree = db.open_tree(TREE_NAME).unwrap();
            for (i, rec) in records.iter().enumerate() {
                let tx = i as u64 + 1;
                tree.insert(keys::txlog_key(tx), encode_tx(rec)).unwrap();
                for (pos, a) in rec.assertions.iter().enumerate() {
                    let payload = keys::encode_claim_payload(a, rec.recorded_at_micros);
                    tree.insert(keys::avet_key(a, tx, pos as u32), payload)
                        .unwrap();
                }
                for tag in keys::RETIRED_FORMAT_1 {
                    tree.insert([tag, b'e', 0, 1, tx as u8], &[1u8]).unwrap();
                }
            }
            tree.insert(keys::meta_key(META_FORMAT_VERSION), &1u64.to_be_bytes())
                .unwrap();
            tree.insert(keys::meta_key(META_APPLIED_LSN), &3u64.to_be_bytes())
                .unwrap();
            db.flush().unwrap();
        }
        let store = open(dir.path());
        let tree = &store.inner.tree;
        for tag in keys::RETIRED_FORMAT_1 {
            assert_eq!(tree.scan_prefix([tag]).count(), 0, "tag {tag:#04x} left");
        }
        assert_eq!(read_meta_u64(tree, META_FORMAT_VERSION).unwrap(), Some(2));
        // e: asserted at 1, retracted at 2; f asserted at 2; g at 3.
        assert_eq!(store.get("e", Some(1)).unwrap().0.len(), 1);
        assert!(store.get("e", None).unwrap().0.is_empty());
        let (f, _) = store.get("f", None).unwrap();
        assert_eq!((f.len(), f[0].tx, f[0].recorded_at_micros), (1, 2, 20));
        assert_eq!(store.get("g", None).unwrap().0[0].tx, 3);
        let h = HistoryParams {
            entity: "e".into(),
            attribute: None,
            since_tx: None,
            until_tx: None,
            limit: 10,
        };
        let history = store.history(&h, None).unwrap().facts;
        let ops: Vec<_> = history.iter().map(|f| (f.tx, f.assertion.op)).collect();
        assert_eq!(ops, vec![(1, Op::Assert), (2, Op::Retract)]);
        drop(store);
        // Reopening a migrated store changes nothing.
        let store = open(dir.path());
        assert_eq!(store.history(&h, None).unwrap().facts, history);
    }

    #[test]
    fn entity_cache_is_bounded_in_bytes_and_in_entries() {
        let cached = |value_bytes: usize| {
            let mut a = record(None, 1, "e").assertions.remove(0);
            a.value = Value::Bytes(vec![7; value_bytes]);
            Arc::new(CachedEntity {
                basis_tx: 1,
                facts: vec![Fact {
                    assertion: a,
                    tx: 1,
                    recorded_at_micros: 1,
                }],
            })
        };
        // Large entities: the byte bound holds (4 entries would fit by count).
        let cache = entity_cache(4, 64 << 10);
        for i in 0..20 {
            cache.insert(format!("e{i}"), cached(30 << 10));
        }
        cache.run_pending_tasks();
        assert!(
            cache.weighted_size() <= 64 << 10,
            "{}",
            cache.weighted_size()
        );
        assert!(cache.entry_count() <= 2, "{}", cache.entry_count());
        // Small entities: the entry bound holds.
        let cache = entity_cache(4, 1 << 20);
        for i in 0..20 {
            cache.insert(format!("e{i}"), cached(8));
        }
        cache.run_pending_tasks();
        assert!(cache.entry_count() <= 4, "{}", cache.entry_count());
    }

    /// What a crash in the middle of an `apply` can leave (sled recovers a
    /// prefix of its inserts): some entries of a record, but not its
    /// `applied_lsn`. Reads and idempotency lookups ignore them, and the
    /// replay applies the record in full.
    #[test]
    fn a_partly_applied_record_is_invisible_and_applied_again_by_the_replay() {
        let dir = tempfile::tempdir().unwrap();
        let second = record(Some("k2".into()), 2, "f");
        {
            let store = open(dir.path());
            store
                .apply(&[(1, record(Some("k1".into()), 1, "e"))])
                .unwrap();
            let mut staged = Staged::default();
            store.stage_record(&mut staged, 2, &second).unwrap();
            // The idempotency key is staged first; keep it and half the rest.
            let keep = staged.writes.len().div_ceil(2);
            assert!(keep >= 1 && keep < staged.writes.len());
            for (k, v) in staged.writes.into_iter().take(keep) {
                store.inner.tree.insert(k, v).unwrap();
            }
            store.flush().unwrap();
        }
        let store = open(dir.path());
        assert_eq!(store.applied_lsn(), 1);
        assert_eq!(store.lookup_idempotency("k2").unwrap(), None);
        assert!(store.get("f", None).unwrap().0.is_empty());
        let outcomes = store.apply(&[(2, second.clone())]).unwrap();
        assert!(
            matches!(outcomes[..], [ApplyOutcome::Applied { tx: 2, .. }]),
            "{outcomes:?}"
        );
        assert_eq!(store.get("f", None).unwrap().0.len(), 1);
        assert_eq!(store.lookup_idempotency("k2").unwrap(), Some((2, 2)));
        assert_eq!(store.transactions_from(2, 10).unwrap().len(), 1);
    }

    #[test]
    fn corrupt_index_entries_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.apply(&[(1, record(None, 1, "e"))]).unwrap();
        let tree = &store.inner.tree;
        // A key in the entity's ENT range that does not decode.
        let mut bad = keys::ent_prefix("e");
        bad.extend_from_slice(&[0x00; 3]);
        tree.insert(&bad, &[1u8, 0]).unwrap();
        assert!(
            matches!(store.get("e", None), Err(StoreError::Corrupt(_))),
            "{:?}",
            store.get("e", None)
        );
        tree.remove(&bad).unwrap();
        // A valid key whose payload is garbage.
        let a = &record(None, 1, "e").assertions[0];
        let good = keys::ent_key(&a.entity, 1);
        tree.insert(&good, &[9u8]).unwrap();
        assert!(matches!(
            store.get("e", Some(1)),
            Err(StoreError::Corrupt(_))
        ));
        // A garbage tx-log record.
        tree.insert(keys::txlog_key(1), &[0u8; 3]).unwrap();
        assert!(matches!(
            store.transactions_from(1, 10),
            Err(StoreError::Corrupt(_))
        ));
        // A garbage applied_lsn.
        tree.insert(keys::meta_key(META_APPLIED_LSN), &[1u8])
            .unwrap();
        drop(store);
        assert!(matches!(
            Store::open(StoreConfig {
                path: dir.path().to_path_buf(),
                cache_capacity_bytes: 4 << 20,
                entity_cache_entries: 0,
                entity_cache_bytes: 0,
                idempotency_retention: Duration::from_secs(1),
            }),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn purge_is_bounded_per_call() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let n = PURGE_KEYS_MAX as u64 + 100;
        let records: Vec<(u64, TxRecord)> = (1..=n)
            .map(|i| (i, record(Some(format!("k{i}")), i as i64, "e")))
            .collect();
        for chunk in records.chunks(512) {
            store.apply(chunk).unwrap();
        }
        let now = n as i64 + 1_000_000 + 10;
        let round = |keys_removed, more| PurgeRound { keys_removed, more };
        let r = store.purge_idempotency_round(now).unwrap();
        assert_eq!(r, round(PURGE_KEYS_MAX, true));
        assert_eq!(
            store.purge_idempotency_round(now).unwrap(),
            round(100, false)
        );
        assert_eq!(store.purge_idempotency_round(now).unwrap(), round(0, false));
        assert_eq!(store.lookup_idempotency("k1").unwrap(), None);
        // A purged key can be used again.
        let out = store
            .apply(&[(n + 1, record(Some("k1".into()), now, "e"))])
            .unwrap();
        assert_eq!(
            out,
            vec![ApplyOutcome::Applied {
                tx: n + 1,
                recorded_at_micros: now
            }]
        );
    }

    #[test]
    fn keys_newer_than_retention_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store
            .apply(&[
                (1, record(Some("old".into()), 0, "e")),
                (2, record(Some("new".into()), 1_500_000, "e")),
            ])
            .unwrap();
        assert_eq!(store.purge_idempotency(2_000_000).unwrap(), 1);
        assert_eq!(store.lookup_idempotency("old").unwrap(), None);
        assert_eq!(
            store.lookup_idempotency("new").unwrap(),
            Some((2, 1_500_000))
        );
    }

    #[tokio::test]
    async fn flush_async_returns_applied_lsn() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store
            .apply(&[
                (1, record(None, 1, "e")),
                (2, record(Some("k".into()), 2, "e")),
            ])
            .unwrap();
        assert_eq!(store.flush_async().await.unwrap(), 2);
        assert!(store.size_on_disk() > 0);
        assert_eq!(store.fact_count_estimate(), 2);
    }

    #[test]
    fn sync_dir_tree_tolerates_files_removed_while_it_walks() {
        // sled deletes blob files it no longer needs at any time; one that
        // vanishes between the listing and its fsync has nothing left to
        // make durable, and must not fail the flush (which stops stemed).
        let dir = tempfile::tempdir().unwrap();
        let blobs = dir.path().join("store").join("blobs");
        std::fs::create_dir_all(&blobs).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let churn = {
            let (blobs, stop) = (blobs.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for i in 0..32 {
                        std::fs::write(blobs.join(format!("{}", n + i)), b"x").unwrap();
                    }
                    for i in 0..32 {
                        std::fs::remove_file(blobs.join(format!("{}", n + i))).unwrap();
                    }
                    n += 32;
                }
            })
        };
        let started = std::time::Instant::now();
        let mut result = Ok(());
        while started.elapsed() < Duration::from_millis(1500) && result.is_ok() {
            result = sync_dir_tree(&dir.path().join("store"));
        }
        stop.store(true, Ordering::Relaxed);
        churn.join().unwrap();
        result.unwrap();
    }
}
