//! Group commit: one writer thread owns the log. Concurrent appends queue
//! up while the current group is written and fsynced, and then go out
//! together as the next group: one write per segment and one fdatasync.
//!
//! **Invariant:** no caller is acknowledged before `durable_lsn` covers its
//! last LSN (unless it asked for `no_sync`). This is asserted in `commit`.
//!
//! The queue is bounded in requests (`queue_depth_max`) and bytes
//! (`queue_bytes_max`); a full queue makes `append` wait up to
//! `queue_wait_max` and then fail with `ResourceExhausted`.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{oneshot, watch, OwnedSemaphorePermit, Semaphore};

use crate::epoch;
use crate::error::{Result, WalError};
use crate::log::Log;
use crate::metrics::Metrics;
use crate::record;

/// Knobs of group commit.
#[derive(Debug, Clone)]
pub struct CommitConfig {
    /// How long a group waits for more appends; 0 flushes as soon as the
    /// queue is empty, so a lone writer never waits.
    pub group_commit_max_wait: Duration,
    pub group_commit_max_bytes: usize,
    pub queue_depth_max: usize,
    pub queue_bytes_max: usize,
    pub queue_wait_max: Duration,
    pub append_bytes_max: usize,
    pub slow_fsync: Duration,
}

/// The serving state reported by Status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalState {
    Serving,
    Failed,
    DiskFull,
}

/// State shared between the writer thread, the gRPC layer and `main`.
#[derive(Debug)]
pub struct WalShared {
    state: Mutex<(WalState, String)>,
    /// The durable LSN; readers with `follow` wait on it.
    pub durable: watch::Sender<u64>,
    pub appended_lsn: AtomicU64,
    pub epoch: AtomicU64,
    /// Becomes true on a fatal error; `main` then exits with code 70.
    pub fatal: watch::Sender<bool>,
    pub metrics: Arc<Metrics>,
}

impl WalShared {
    pub fn state(&self) -> (WalState, String) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_state(&self, state: WalState, reason: String) {
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if guard.0 == WalState::Failed {
            return; // Failed is final.
        }
        *guard = (state, reason);
    }

    pub fn durable_lsn(&self) -> u64 {
        *self.durable.borrow()
    }
}

/// Trace ids named in one slow-fsync warning, at most.
const SLOW_FSYNC_TRACE_IDS_MAX: usize = 32;

/// `wal.group`: a child of the group's first traced append, linked from
/// the others, so every request's trace shows the group and its fsync.
fn group_span(appends: &[AppendJob]) -> tracing::Span {
    let first = appends
        .iter()
        .find(|a| crate::telemetry::has_trace(&a.span))
        .and_then(|a| a.span.id());
    let records: usize = appends.iter().map(|a| a.records.len()).sum();
    let span =
        tracing::info_span!(parent: first.clone(), "wal.group", appends = appends.len(), records);
    for a in appends {
        if a.span.id().is_some() && a.span.id() != first {
            span.follows_from(&a.span);
        }
    }
    span
}

/// The distinct trace ids of a group's appends, comma-separated and bounded.
fn group_trace_ids(appends: &[AppendJob]) -> String {
    let mut ids: Vec<String> = Vec::new();
    for a in appends {
        if ids.len() == SLOW_FSYNC_TRACE_IDS_MAX {
            break;
        }
        if crate::telemetry::has_trace(&a.span) {
            let id = crate::telemetry::trace_id(&a.span);
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
    }
    ids.join(",")
}

/// What an acknowledged append gets back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendAck {
    pub first_lsn: u64,
    pub last_lsn: u64,
    pub durable_lsn: u64,
}

struct AppendJob {
    epoch: u64,
    records: Vec<Bytes>,
    bytes: usize,
    no_sync: bool,
    reply: oneshot::Sender<Result<AppendAck>>,
    _permits: (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>),
    /// The caller's span (`wal.append`), for the group's trace.
    span: tracing::Span,
}

enum Job {
    Append(AppendJob),
    Sync(oneshot::Sender<Result<u64>>, OwnedSemaphorePermit),
    OpenWriter(
        String,
        oneshot::Sender<Result<(u64, u64)>>,
        OwnedSemaphorePermit,
    ),
}

impl Job {
    fn bytes(&self) -> usize {
        match self {
            Job::Append(a) => a.bytes,
            _ => 0,
        }
    }
}

#[derive(Default)]
struct QueueInner {
    jobs: VecDeque<Job>,
    closed: bool,
}

struct Queue {
    inner: Mutex<QueueInner>,
    wake: Condvar,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, QueueInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, job: Job) -> Result<()> {
        let mut q = self.lock();
        if q.closed {
            return Err(WalError::ShuttingDown);
        }
        q.jobs.push_back(job);
        drop(q);
        self.wake.notify_one();
        Ok(())
    }

    /// Blocks for the next group: at least one job, at most `bytes_max`
    /// bytes (unless one job alone is bigger). None once closed and empty.
    fn pop_group(&self, bytes_max: usize, wait_max: Duration) -> Option<Vec<Job>> {
        let mut q = self.lock();
        while q.jobs.is_empty() {
            if q.closed {
                return None;
            }
            q = self.wake.wait(q).unwrap_or_else(|p| p.into_inner());
        }
        let deadline = Instant::now() + wait_max;
        let mut group = Vec::new();
        let mut bytes = 0;
        loop {
            while let Some(job) = q.jobs.front() {
                if !group.is_empty() && bytes + job.bytes() > bytes_max {
                    return Some(group);
                }
                bytes += job.bytes();
                group.extend(q.jobs.pop_front());
            }
            let now = Instant::now();
            if wait_max.is_zero() || bytes >= bytes_max || q.closed || now >= deadline {
                return Some(group);
            }
            q = self
                .wake
                .wait_timeout(q, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_all();
    }
}

/// The handle the gRPC layer uses to talk to the writer thread.
#[derive(Clone)]
pub struct Committer {
    inner: Arc<CommitterInner>,
}

struct CommitterInner {
    queue: Arc<Queue>,
    depth: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    config: CommitConfig,
    shared: Arc<WalShared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Committer {
    /// Starts the writer thread that owns `log`.
    pub fn start(log: Log, config: CommitConfig, metrics: Arc<Metrics>) -> Result<Committer> {
        assert!(config.append_bytes_max <= config.queue_bytes_max);
        assert!(config.queue_bytes_max <= u32::MAX as usize);
        let dir = log.dir().to_path_buf();
        let current_epoch = epoch::load(&dir)?;
        let shared = Arc::new(WalShared {
            state: Mutex::new((WalState::Serving, String::new())),
            durable: watch::channel(log.durable_lsn()).0,
            appended_lsn: AtomicU64::new(log.next_lsn() - 1),
            epoch: AtomicU64::new(current_epoch),
            fatal: watch::channel(false).0,
            metrics: metrics.clone(),
        });
        let queue = Arc::new(Queue {
            inner: Mutex::new(QueueInner::default()),
            wake: Condvar::new(),
        });
        let writer = Writer {
            log,
            dir,
            epoch: current_epoch,
            shared: shared.clone(),
            config: config.clone(),
        };
        let writer_queue = queue.clone();
        let thread = std::thread::Builder::new()
            .name("wal-writer".into())
            .spawn(move || writer.run(&writer_queue))
            .map_err(|e| WalError::io("spawn writer thread", e))?;
        Ok(Committer {
            inner: Arc::new(CommitterInner {
                queue,
                depth: Arc::new(Semaphore::new(config.queue_depth_max)),
                bytes: Arc::new(Semaphore::new(config.queue_bytes_max)),
                config,
                shared,
                thread: Mutex::new(Some(thread)),
            }),
        })
    }

    pub fn shared(&self) -> &Arc<WalShared> {
        &self.inner.shared
    }

    pub fn config(&self) -> &CommitConfig {
        &self.inner.config
    }

    fn check_not_failed(&self) -> Result<()> {
        match self.inner.shared.state() {
            (WalState::Failed, reason) => Err(WalError::Failed(reason)),
            _ => Ok(()),
        }
    }

    fn queue_full(&self) -> WalError {
        let c = &self.inner.config;
        WalError::ResourceExhausted(format!(
            "WAL append queue is full (queue_depth_max {}, queue_bytes_max {}); waited up to the request deadline or queue_wait_ms_max {}",
            c.queue_depth_max, c.queue_bytes_max, c.queue_wait_max.as_millis()))
    }

    /// Waits for a queue slot, at most `wait_max`.
    async fn depth_permit(&self, wait_max: Duration) -> Result<OwnedSemaphorePermit> {
        // The uncontended path needs no timer.
        if let Ok(permit) = self.inner.depth.clone().try_acquire_owned() {
            return Ok(permit);
        }
        let acquire = self.inner.depth.clone().acquire_owned();
        match tokio::time::timeout(wait_max, acquire).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) => Err(WalError::ShuttingDown),
            Err(_) => Err(self.queue_full()),
        }
    }

    /// Waits for `bytes` of queue room, at most `wait_max`.
    async fn bytes_permit(&self, bytes: usize, wait_max: Duration) -> Result<OwnedSemaphorePermit> {
        assert!(bytes <= self.inner.config.queue_bytes_max);
        if let Ok(permit) = self
            .inner
            .bytes
            .clone()
            .try_acquire_many_owned(bytes as u32)
        {
            return Ok(permit);
        }
        let acquire = self.inner.bytes.clone().acquire_many_owned(bytes as u32);
        match tokio::time::timeout(wait_max, acquire).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) => Err(WalError::ShuttingDown),
            Err(_) => Err(self.queue_full()),
        }
    }

    async fn enqueue<T>(&self, job: Job, rx: oneshot::Receiver<Result<T>>) -> Result<T> {
        // Count before pushing so the writer's decrement never runs first.
        let depth = &self.inner.shared.metrics.queue_depth;
        depth.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.inner.queue.push(job) {
            depth.fetch_sub(1, Ordering::Relaxed);
            return Err(e);
        }
        rx.await.unwrap_or(Err(WalError::ShuttingDown))
    }

    /// Appends records; returns once they are durable (unless `no_sync`).
    /// A full queue makes it wait up to `deadline` (the caller's gRPC
    /// deadline), and never longer than `queue_wait_max`.
    pub async fn append(
        &self,
        epoch: u64,
        records: Vec<Bytes>,
        no_sync: bool,
        deadline: Option<Duration>,
    ) -> Result<AppendAck> {
        if records.is_empty() {
            return Err(WalError::InvalidArgument(
                "records must not be empty".into(),
            ));
        }
        let bytes: usize = records.iter().map(|r| record::frame_bytes(r.len())).sum();
        let bytes_max = self.inner.config.append_bytes_max;
        if bytes > bytes_max {
            return Err(WalError::InvalidArgument(format!(
                "append of {bytes} bytes (with {} bytes of framing per record) exceeds append_bytes_max {bytes_max}",
                record::FRAME_HEADER_BYTES
            )));
        }
        self.check_not_failed()?;
        let wait_max = deadline.map_or(self.inner.config.queue_wait_max, |d| {
            d.min(self.inner.config.queue_wait_max)
        });
        let started = Instant::now();
        let depth = self.depth_permit(wait_max).await?;
        let bytes_permit = self
            .bytes_permit(bytes, wait_max.saturating_sub(started.elapsed()))
            .await?;
        let (reply, rx) = oneshot::channel();
        let job = AppendJob {
            epoch,
            records,
            bytes,
            no_sync,
            reply,
            _permits: (depth, Some(bytes_permit)),
            span: tracing::Span::current(),
        };
        self.enqueue(Job::Append(job), rx).await
    }

    /// Returns once everything appended before the call is durable.
    pub async fn sync(&self) -> Result<u64> {
        self.check_not_failed()?;
        let permit = self.depth_permit(self.inner.config.queue_wait_max).await?;
        let (reply, rx) = oneshot::channel();
        self.enqueue(Job::Sync(reply, permit), rx).await
    }

    /// Bumps and persists the writer epoch; returns (epoch, durable_lsn).
    pub async fn open_writer(&self, writer_id: String) -> Result<(u64, u64)> {
        self.check_not_failed()?;
        let permit = self.depth_permit(self.inner.config.queue_wait_max).await?;
        let (reply, rx) = oneshot::channel();
        self.enqueue(Job::OpenWriter(writer_id, reply, permit), rx)
            .await
    }

    /// Stops taking jobs, lets the writer finish every queued group, fsync,
    /// and joins it. Blocking.
    pub fn shutdown(&self) {
        self.inner.queue.close();
        let thread = self
            .inner
            .thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

/// The writer thread's state.
struct Writer {
    log: Log,
    dir: PathBuf,
    epoch: u64,
    shared: Arc<WalShared>,
    config: CommitConfig,
}

impl Writer {
    fn run(mut self, queue: &Queue) {
        while let Some(group) = queue.pop_group(
            self.config.group_commit_max_bytes,
            self.config.group_commit_max_wait,
        ) {
            self.shared
                .metrics
                .queue_depth
                .fetch_sub(group.len() as u64, Ordering::Relaxed);
            self.process(group);
        }
        if self.shared.state().0 != WalState::Failed {
            match self.log.sync() {
                Ok(_) => self.publish(),
                Err(e) => self.fail_stop(&e),
            }
        }
        tracing::info!(durable_lsn = self.log.durable_lsn(), "WAL writer stopped");
    }

    fn failed_reason(&self) -> Option<String> {
        match self.shared.state() {
            (WalState::Failed, reason) => Some(reason),
            _ => None,
        }
    }

    /// Splits a group at OpenWriter jobs so that fencing is ordered with
    /// appends, and commits each part.
    fn process(&mut self, group: Vec<Job>) {
        let mut appends = Vec::new();
        let mut syncs = Vec::new();
        for job in group {
            match job {
                Job::Append(a) => match self.check_epoch(a.epoch) {
                    Ok(()) => appends.push(a),
                    Err(e) => {
                        let _ = a.reply.send(Err(e));
                    }
                },
                Job::Sync(reply, _permit) => syncs.push(reply),
                Job::OpenWriter(id, reply, _permit) => {
                    self.commit(std::mem::take(&mut appends), std::mem::take(&mut syncs));
                    let _ = reply.send(self.open_writer(&id));
                }
            }
        }
        self.commit(appends, syncs);
    }

    fn check_epoch(&self, epoch: u64) -> Result<()> {
        if let Some(reason) = self.failed_reason() {
            return Err(WalError::Failed(reason));
        }
        if self.epoch == 0 {
            return Err(WalError::NoWriter);
        }
        if epoch != self.epoch {
            return Err(WalError::Fenced {
                got: epoch,
                current: self.epoch,
            });
        }
        Ok(())
    }

    fn open_writer(&mut self, writer_id: &str) -> Result<(u64, u64)> {
        if let Some(reason) = self.failed_reason() {
            return Err(WalError::Failed(reason));
        }
        let next = self.epoch + 1;
        if let Err(e) = epoch::store(&self.dir, next) {
            if matches!(e, WalError::FsyncFailed(_)) {
                self.fail_stop(&e);
            }
            return Err(e);
        }
        self.epoch = next;
        self.shared.epoch.store(next, Ordering::Relaxed);
        tracing::info!(
            writer_id,
            epoch = next,
            "writer opened; older epochs are fenced"
        );
        Ok((next, self.log.durable_lsn()))
    }

    /// Writes one group, fsyncs it once, and answers every caller.
    fn commit(&mut self, appends: Vec<AppendJob>, syncs: Vec<oneshot::Sender<Result<u64>>>) {
        if appends.is_empty() && syncs.is_empty() {
            return;
        }
        let group = group_span(&appends);
        let _in_group = group.enter();
        let batch: Vec<&[Bytes]> = appends.iter().map(|a| &a.records[..]).collect();
        let outcome = self.log.write_batch(&batch);
        drop(batch);
        let written = outcome.ranges.len();
        self.shared
            .appended_lsn
            .store(self.log.next_lsn() - 1, Ordering::Relaxed);
        let records: u64 = outcome.ranges.iter().map(|(f, l)| l - f + 1).sum();
        let need_sync = !syncs.is_empty() || appends[..written].iter().any(|a| !a.no_sync);
        let synced = if need_sync {
            self.sync_group(outcome.bytes, records, &appends)
        } else {
            Ok(())
        };
        self.note_outcome(&outcome.error, written);
        if written > 0 {
            self.shared
                .metrics
                .observe_group(records as usize, outcome.bytes);
        }
        let durable_lsn = self.log.durable_lsn();
        for (i, job) in appends.into_iter().enumerate() {
            let reply = match (&synced, outcome.ranges.get(i), &outcome.error) {
                (Err(e), Some(_), _) => Err(e.duplicate()),
                (Ok(()), Some(&(first_lsn, last_lsn)), _) => {
                    // The durability invariant: never acknowledge ahead of the disk.
                    assert!(
                        job.no_sync || durable_lsn >= last_lsn,
                        "ack before durable: {last_lsn} > {durable_lsn}"
                    );
                    Ok(AppendAck {
                        first_lsn,
                        last_lsn,
                        durable_lsn,
                    })
                }
                (_, None, Some(e)) => Err(e.duplicate()),
                (_, None, None) => unreachable!("an unwritten append without an error"),
            };
            let _ = job.reply.send(reply);
        }
        for reply in syncs {
            let _ = reply.send(
                synced
                    .as_ref()
                    .map(|()| durable_lsn)
                    .map_err(|e| e.duplicate()),
            );
        }
    }

    /// fdatasync for a group; warns when slow; fail-stops on error.
    /// The warning names the trace ids of the requests in the group, so a
    /// slow write's trace can be found from the log line.
    fn sync_group(&mut self, bytes: usize, records: u64, appends: &[AppendJob]) -> Result<()> {
        let fsync = tracing::info_span!("wal.fsync", bytes, records);
        match fsync.in_scope(|| self.log.sync()) {
            Ok(took) => {
                if let Some(took) = took.filter(|t| *t >= self.config.slow_fsync) {
                    let trace_ids = group_trace_ids(appends);
                    tracing::warn!(
                        duration_ms = took.as_secs_f64() * 1e3,
                        bytes,
                        records,
                        trace_ids = %trace_ids,
                        "slow fsync: {:.1} ms for {bytes} bytes, {records} records",
                        took.as_secs_f64() * 1e3
                    );
                }
                self.publish();
                Ok(())
            }
            Err(e) => {
                self.fail_stop(&e);
                Err(e)
            }
        }
    }

    /// Moves between SERVING and DISK_FULL, or fail-stops on other errors.
    fn note_outcome(&mut self, error: &Option<WalError>, written: usize) {
        match error {
            Some(e @ WalError::DiskFull(_)) => {
                if self.shared.state().0 != WalState::DiskFull {
                    tracing::error!(error = %e, "WAL disk is full; appends fail until space is freed");
                }
                self.shared.set_state(WalState::DiskFull, e.to_string());
            }
            Some(e) => self.fail_stop(e),
            None if written > 0 && self.shared.state().0 == WalState::DiskFull => {
                tracing::info!("WAL disk has space again; serving");
                self.shared.set_state(WalState::Serving, String::new());
            }
            None => {}
        }
    }

    fn publish(&self) {
        let durable = self.log.durable_lsn();
        self.shared.durable.send_if_modified(|v| {
            assert!(*v <= durable, "durable LSN went backwards");
            let changed = *v != durable;
            *v = durable;
            changed
        });
    }

    /// Fail-stop: the WAL accepts nothing more and walld exits (code 70)
    /// so that the supervisor restarts it and recovery re-reads the disk.
    fn fail_stop(&self, error: &WalError) {
        if self.shared.state().0 == WalState::Failed {
            return;
        }
        let reason = match error {
            WalError::FsyncFailed(_) => error.to_string(),
            other => format!("WAL write path failed: {other}"),
        };
        tracing::error!(%reason, "fatal WAL error: failing every pending and later append, then exiting");
        self.shared.metrics.count_error(error.kind());
        self.shared.set_state(WalState::Failed, reason);
        self.shared.fatal.send_replace(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sync_job() -> Job {
        let permit = Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap();
        Job::Sync(oneshot::channel().0, permit)
    }

    fn append_job(bytes: usize) -> Job {
        let sem = Arc::new(Semaphore::new(2));
        let permits = (
            sem.clone().try_acquire_owned().unwrap(),
            sem.try_acquire_owned().ok(),
        );
        let reply = oneshot::channel().0;
        Job::Append(AppendJob {
            epoch: 1,
            records: vec![Bytes::new()],
            bytes,
            no_sync: false,
            reply,
            _permits: permits,
            span: tracing::Span::none(),
        })
    }

    fn queue() -> Queue {
        Queue {
            inner: Mutex::new(QueueInner::default()),
            wake: Condvar::new(),
        }
    }

    #[test]
    fn groups_are_bounded_in_bytes_but_never_empty() {
        let q = queue();
        for _ in 0..5 {
            q.push(append_job(400)).unwrap();
        }
        let sizes: Vec<usize> = (0..3)
            .map(|_| q.pop_group(1000, Duration::ZERO).unwrap().len())
            .collect();
        assert_eq!(sizes, vec![2, 2, 1]);
        q.push(append_job(5000)).unwrap();
        assert_eq!(
            q.pop_group(1000, Duration::ZERO).unwrap().len(),
            1,
            "one oversized job still goes"
        );
    }

    #[test]
    fn closed_queue_drains_then_ends() {
        let q = queue();
        q.push(sync_job()).unwrap();
        q.close();
        assert!(matches!(q.push(sync_job()), Err(WalError::ShuttingDown)));
        assert_eq!(
            q.pop_group(1 << 20, Duration::from_secs(10)).unwrap().len(),
            1
        );
        assert!(q.pop_group(1 << 20, Duration::ZERO).is_none());
    }

    #[test]
    fn max_wait_collects_late_jobs() {
        let q = Arc::new(queue());
        q.push(append_job(10)).unwrap();
        let late = q.clone();
        let pusher = std::thread::spawn(move || late.push(append_job(10)).unwrap());
        pusher.join().unwrap();
        // Both are queued before the pop: with a wait, one group takes both.
        assert_eq!(
            q.pop_group(1 << 20, Duration::from_millis(1))
                .unwrap()
                .len(),
            2
        );
    }
}
