//! Operating a node: drain and rate limits, and the node-state file that
//! makes both survive a restart.
//!
//! An operator who drained a node for a disk replacement must not see it
//! rejoin by surprise after a restart, and a write limit set during an
//! incident must hold until someone changes it. Both live in
//! `<data_dir>/node-state.json`, written tmp → fsync → rename → fsync(dir).

use crate::write_path::{Admission, WriteError};
use governor::{clock::Clock, DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::{Deserialize, Serialize};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

const NODE_STATE_VERSION: u32 = 1;

/// What persists across restarts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeState {
    pub draining: bool,
    /// The write limit set through the admin API, in assertions per second:
    /// `None` when never set (the config's `rate_limit.writes_per_sec`
    /// applies), `Some(0)` when explicitly removed.
    pub max_writes_per_sec: Option<u32>,
}

// Format: JSON { "version": u32, "crc32c": u32 of the canonical JSON of
// "state", "state": NodeState }.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeStateFile {
    version: u32,
    crc32c: u32,
    state: NodeState,
}

pub fn load_state(path: &Path) -> anyhow::Result<NodeState> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(NodeState::default()),
        Err(e) => anyhow::bail!("cannot read node state {}: {e}", path.display()),
    };
    let file: NodeStateFile = serde_json::from_slice(&bytes)
        .map_err(|e| anyhow::anyhow!("node state {} is corrupt: {e}", path.display()))?;
    anyhow::ensure!(
        file.version == NODE_STATE_VERSION,
        "node state {} has version {}, this stemed reads version {NODE_STATE_VERSION}",
        path.display(),
        file.version
    );
    let canonical = serde_json::to_vec(&file.state)?;
    anyhow::ensure!(
        crc32c::crc32c(&canonical) == file.crc32c,
        "node state {} fails its checksum; fix or remove it (it holds drain and rate-limit settings)",
        path.display()
    );
    Ok(file.state)
}

pub fn save_state(path: &Path, state: &NodeState) -> anyhow::Result<()> {
    use std::io::Write;
    let canonical = serde_json::to_vec(state)?;
    let file = NodeStateFile {
        version: NODE_STATE_VERSION,
        crc32c: crc32c::crc32c(&canonical),
        state: state.clone(),
    };
    let tmp = path.with_extension("json.tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(&file)?)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// A write limit: governor's GCRA with a burst of a tenth of a second, so
/// the rate holds over short windows too.
struct WriteLimit {
    per_sec: u32,
    burst: u32,
    limiter: DefaultDirectRateLimiter,
}

impl WriteLimit {
    fn new(per_sec: u32) -> Option<WriteLimit> {
        let rate = NonZeroU32::new(per_sec)?;
        let burst = (per_sec / 10).max(1);
        let quota =
            Quota::per_second(rate).allow_burst(NonZeroU32::new(burst).expect("burst >= 1"));
        Some(WriteLimit {
            per_sec,
            burst,
            limiter: RateLimiter::direct(quota),
        })
    }
}

pub struct Ops {
    state_path: PathBuf,
    state: Mutex<NodeState>,
    draining: AtomicBool,
    config_writes_per_sec: u32,
    write_limit: RwLock<Option<Arc<WriteLimit>>>,
    queries: Option<DefaultDirectRateLimiter>,
    watches: Option<DefaultDirectRateLimiter>,
    pub rate_limited: AtomicU64,
}

/// A refusal by a rate limit, with when to retry.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimited {
    pub message: String,
    pub retry_after: Duration,
}

impl Ops {
    pub fn open(data_dir: &Path, config: &crate::config::RateLimitConfig) -> anyhow::Result<Ops> {
        let state_path = data_dir.join("node-state.json");
        let state = load_state(&state_path)?;
        let per_rpc =
            |n: u32| NonZeroU32::new(n).map(|r| RateLimiter::direct(Quota::per_second(r)));
        let ops = Ops {
            state_path,
            draining: AtomicBool::new(state.draining),
            config_writes_per_sec: config.writes_per_sec,
            write_limit: RwLock::new(None),
            queries: per_rpc(config.queries_per_sec),
            watches: per_rpc(config.watch_streams_per_sec),
            rate_limited: AtomicU64::new(0),
            state: Mutex::new(state),
        };
        ops.install_write_limit(ops.effective_write_limit());
        Ok(ops)
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Persists first, then takes effect: a drain the operator saw
    /// acknowledged is one that survives a crash.
    pub fn set_draining(&self, draining: bool) -> anyhow::Result<()> {
        let mut state = self.state.lock().expect("node state poisoned");
        let mut next = state.clone();
        next.draining = draining;
        save_state(&self.state_path, &next)?;
        *state = next;
        self.draining.store(draining, Ordering::Release);
        Ok(())
    }

    /// The write limit in force, in assertions per second; `None` means
    /// unlimited.
    pub fn effective_write_limit(&self) -> Option<u32> {
        let state = self.state.lock().expect("node state poisoned");
        let n = state
            .max_writes_per_sec
            .unwrap_or(self.config_writes_per_sec);
        (n > 0).then_some(n)
    }

    /// Sets (Some(n > 0)) or removes (None or Some(0)) the write limit,
    /// persisted, effective at once.
    pub fn set_write_limit(&self, per_sec: Option<u32>) -> anyhow::Result<Option<u32>> {
        {
            let mut state = self.state.lock().expect("node state poisoned");
            let mut next = state.clone();
            next.max_writes_per_sec = Some(per_sec.unwrap_or(0));
            save_state(&self.state_path, &next)?;
            *state = next;
        }
        let effective = self.effective_write_limit();
        self.install_write_limit(effective);
        Ok(effective)
    }

    fn install_write_limit(&self, per_sec: Option<u32>) {
        let limit = per_sec.and_then(WriteLimit::new).map(Arc::new);
        *self.write_limit.write().expect("write limit poisoned") = limit;
    }

    pub fn check_query(&self) -> Result<(), RateLimited> {
        check_one(self.queries.as_ref(), "queries", &self.rate_limited)
    }

    pub fn check_watch(&self) -> Result<(), RateLimited> {
        check_one(self.watches.as_ref(), "watch streams", &self.rate_limited)
    }

    fn check_write(&self, assertions: usize) -> Result<(), RateLimited> {
        let Some(limit) = self
            .write_limit
            .read()
            .expect("write limit poisoned")
            .clone()
        else {
            return Ok(());
        };
        let n = u32::try_from(assertions).unwrap_or(u32::MAX);
        let refused = |retry_after: Duration, message: String| {
            self.rate_limited.fetch_add(1, Ordering::Relaxed);
            Err(RateLimited {
                message,
                retry_after,
            })
        };
        let Some(cells) = NonZeroU32::new(n) else {
            return Ok(());
        };
        match limit.limiter.check_n(cells) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => {
                let wait = not_until.wait_time_from(governor::clock::DefaultClock::default().now());
                refused(
                    wait,
                    format!(
                        "write rate limit of {} assertions/s reached; retry in {} ms",
                        limit.per_sec,
                        wait.as_millis().max(1)
                    ),
                )
            }
            Err(_) => refused(
                Duration::from_secs(1),
                format!(
                    "a transaction of {n} assertions exceeds the burst of the write rate limit ({} assertions, a tenth of max_writes_per_sec {}); split it or raise the limit",
                    limit.burst, limit.per_sec
                ),
            ),
        }
    }
}

fn check_one(
    limiter: Option<&DefaultDirectRateLimiter>,
    what: &str,
    counter: &AtomicU64,
) -> Result<(), RateLimited> {
    let Some(l) = limiter else { return Ok(()) };
    l.check().map_err(|not_until| {
        counter.fetch_add(1, Ordering::Relaxed);
        let wait = not_until.wait_time_from(governor::clock::DefaultClock::default().now());
        RateLimited {
            message: format!(
                "{what} rate limit reached; retry in {} ms",
                wait.as_millis().max(1)
            ),
            retry_after: wait,
        }
    })
}

impl Admission for Ops {
    fn admit(&self, assertions: usize) -> Result<(), WriteError> {
        if self.draining() {
            return Err(WriteError::Unavailable("node is draining".into()));
        }
        self.check_write(assertions)
            .map_err(|r| WriteError::RateLimited {
                message: r.message,
                retry_after: r.retry_after,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_state_round_trips_and_rejects_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node-state.json");
        assert_eq!(load_state(&path).unwrap(), NodeState::default());
        let s = NodeState {
            draining: true,
            max_writes_per_sec: Some(500),
        };
        save_state(&path, &s).unwrap();
        assert_eq!(load_state(&path).unwrap(), s);
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("500", "900");
        std::fs::write(&path, text).unwrap();
        let err = load_state(&path).unwrap_err().to_string();
        assert!(err.contains("checksum"), "{err}");
    }

    #[test]
    fn drain_and_limit_persist() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = crate::config::RateLimitConfig::default();
        let ops = Ops::open(dir.path(), &cfg).unwrap();
        ops.set_draining(true).unwrap();
        ops.set_write_limit(Some(500)).unwrap();
        drop(ops);
        let ops = Ops::open(dir.path(), &cfg).unwrap();
        assert!(ops.draining());
        assert_eq!(ops.effective_write_limit(), Some(500));
        assert!(matches!(ops.admit(1), Err(WriteError::Unavailable(m)) if m == "node is draining"));
        ops.set_write_limit(None).unwrap();
        let cfg = crate::config::RateLimitConfig {
            writes_per_sec: 100,
            ..Default::default()
        };
        // An explicit removal beats the config's limit after restart.
        drop(ops);
        let ops = Ops::open(dir.path(), &cfg).unwrap();
        assert_eq!(ops.effective_write_limit(), None);
    }

    #[test]
    fn oversized_transaction_names_the_burst() {
        let dir = tempfile::tempdir().unwrap();
        let ops = Ops::open(dir.path(), &Default::default()).unwrap();
        ops.set_write_limit(Some(100)).unwrap();
        let err = ops.check_write(11).unwrap_err();
        assert!(err.message.contains("burst"), "{}", err.message);
        ops.check_write(10).unwrap();
    }
}
