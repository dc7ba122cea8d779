//! The log: appends frames to the active segment, rotates segments, syncs,
//! and lets readers and truncation work on the segment index.
//!
//! # LSN invariants
//! - `first_lsn <= durable_lsn + 1` and `durable_lsn < next_lsn`;
//! - every record with an LSN `<= durable_lsn` is on disk and fdatasynced;
//! - a sealed (non-active) segment is fully durable: rotation syncs first.
//!
//! The log is owned by exactly one thread (the group-commit writer); it is
//! not `Sync`. Readers never touch it: they open segment files by path.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::error::{Result, WalError};
use crate::fs;
use crate::metrics::Metrics;
use crate::record::{self, Decoded};
use crate::recovery::{self, RecoveryMode};
use crate::segment::{self, SegmentEntry, SegmentIndex, HEADER_BYTES};

/// How a log is opened.
#[derive(Debug, Clone)]
pub struct LogOptions {
    pub dir: PathBuf,
    /// Preallocated size of one segment file.
    pub segment_bytes: u64,
    pub recovery_mode: RecoveryMode,
    /// Prepare the next segment in a background thread.
    pub prepare_in_background: bool,
}

/// The segment currently written to.
struct Active {
    file: File,
    first_lsn: u64,
    /// Byte offset where the next frame goes.
    offset: u64,
}

/// What `write_batch` achieved: the LSN ranges of the leading appends that
/// were written, and the error that stopped the rest (if any).
#[derive(Debug, Default)]
pub struct BatchOutcome {
    pub ranges: Vec<(u64, u64)>,
    pub bytes: usize,
    pub error: Option<WalError>,
}

pub struct Log {
    options: LogOptions,
    active: Active,
    next_lsn: u64,
    durable_lsn: u64,
    index: Arc<SegmentIndex>,
    preparer: Preparer,
    metrics: Arc<Metrics>,
    buf: Vec<u8>,
    /// Set after a failed fsync or write; the log accepts nothing more.
    failed: Option<String>,
}

impl Log {
    /// Recovers the log in `options.dir` (see `recovery`) and opens it.
    pub fn open(options: LogOptions, metrics: Arc<Metrics>) -> Result<Log> {
        assert!(options.segment_bytes > HEADER_BYTES);
        fs::create_dir_durable(&options.dir).map_err(|e| WalError::io("create WAL dir", e))?;
        let recovered = recovery::recover(&options.dir, options.recovery_mode)?;
        let preparer = Preparer::new(&options);
        let (segments, active) = match recovered.segments.last() {
            Some(last) => {
                let file = fs::open_rw(&last.path)
                    .map_err(|e| WalError::io(format!("open {}", last.path.display()), e))?;
                let active = Active {
                    file,
                    first_lsn: last.first_lsn,
                    offset: recovered.active_offset,
                };
                (recovered.segments.clone(), active)
            }
            None => {
                let (entry, active) = create_segment(&options, &preparer, recovered.next_lsn)?;
                (vec![entry], active)
            }
        };
        // Recovered records may only be in the page cache (after kill -9):
        // make them durable before calling them durable.
        fs::fdatasync(&active.file).map_err(|e| WalError::FsyncFailed(e.to_string()))?;
        let durable_lsn = recovered.next_lsn - 1;
        tracing::info!(dir = %options.dir.display(), segments = segments.len(),
            first_lsn = segments[0].first_lsn, durable_lsn, "WAL recovered");
        Ok(Log {
            index: Arc::new(SegmentIndex::new(segments)),
            options,
            active,
            next_lsn: recovered.next_lsn,
            durable_lsn,
            preparer,
            metrics,
            buf: Vec::new(),
            failed: None,
        })
    }

    pub fn next_lsn(&self) -> u64 {
        self.next_lsn
    }

    pub fn durable_lsn(&self) -> u64 {
        self.durable_lsn
    }

    pub fn index(&self) -> Arc<SegmentIndex> {
        self.index.clone()
    }

    pub fn dir(&self) -> &Path {
        &self.options.dir
    }

    fn check_failed(&self) -> Result<()> {
        match &self.failed {
            Some(reason) => Err(WalError::Failed(reason.clone())),
            None => Ok(()),
        }
    }

    /// Writes the records of several appends, assigning dense LSNs, with one
    /// write per segment touched. Appends are never split across segments:
    /// when the next one does not fit, the segment is sealed and rotated.
    /// Does not fsync; call `sync`.
    pub fn write_batch(&mut self, batch: &[&[Bytes]]) -> BatchOutcome {
        let mut outcome = BatchOutcome::default();
        if let Err(e) = self.check_failed() {
            outcome.error = Some(e);
            return outcome;
        }
        let mut next = 0;
        while next < batch.len() {
            let (ranges, end) = self.encode_chunk(&batch[next..]);
            if let Err(e) = self.write_chunk() {
                outcome.error = Some(e);
                return outcome;
            }
            self.next_lsn += ranges.iter().map(|(f, l)| l - f + 1).sum::<u64>();
            outcome.bytes += self.buf.len();
            outcome.ranges.extend(ranges);
            next += end;
            if next < batch.len() {
                if let Err(e) = self.rotate() {
                    outcome.error = Some(e);
                    return outcome;
                }
            }
        }
        assert_eq!(outcome.ranges.len(), batch.len());
        outcome
    }

    /// Encodes into `self.buf` the leading appends that fit into the active
    /// segment (at least one if the segment holds no record yet, which lets
    /// a single huge append grow the file past its preallocation).
    fn encode_chunk(&mut self, batch: &[&[Bytes]]) -> (Vec<(u64, u64)>, usize) {
        self.buf.clear();
        let mut ranges = Vec::new();
        let mut lsn = self.next_lsn;
        for records in batch {
            assert!(!records.is_empty());
            let need: usize = records.iter().map(|r| record::frame_bytes(r.len())).sum();
            let room = self
                .options
                .segment_bytes
                .saturating_sub(self.active.offset) as usize;
            let segment_empty = self.active.offset == HEADER_BYTES && self.buf.is_empty();
            if self.buf.len() + need > room && !segment_empty {
                break;
            }
            let first = lsn;
            for data in records.iter() {
                record::encode(lsn, data, &mut self.buf);
                lsn += 1;
            }
            ranges.push((first, lsn - 1));
        }
        let count = ranges.len();
        (ranges, count)
    }

    /// Writes `self.buf` at the end of the active segment.
    fn write_chunk(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        match fs::write_all_at(&self.active.file, &self.buf, self.active.offset) {
            Ok(()) => {
                self.active.offset += self.buf.len() as u64;
                self.metrics
                    .write_bytes
                    .fetch_add(self.buf.len() as u64, Ordering::Relaxed);
                Ok(())
            }
            Err((written, e)) => {
                let error = WalError::io("write WAL segment", e);
                self.erase_partial_write(written)?;
                if !matches!(error, WalError::DiskFull(_)) {
                    self.failed = Some(error.to_string());
                }
                Err(error)
            }
        }
    }

    /// After a failed write, zeroes the bytes that did reach the file, so a
    /// later shorter write cannot leave stale but valid frames behind it.
    /// The next write starts again at the last good offset.
    fn erase_partial_write(&mut self, written: usize) -> Result<()> {
        if written == 0 {
            return Ok(());
        }
        let zeroes = vec![0u8; written];
        if let Err((_, e)) = fs::write_all_at(&self.active.file, &zeroes, self.active.offset) {
            let reason = format!("could not erase a partial WAL write: {e}");
            self.failed = Some(reason.clone());
            return Err(WalError::Failed(reason));
        }
        Ok(())
    }

    /// Makes every written record durable. Returns the fsync duration, or
    /// None if there was nothing to sync.
    pub fn sync(&mut self) -> Result<Option<Duration>> {
        self.check_failed()?;
        let last_lsn = self.next_lsn - 1;
        if self.durable_lsn == last_lsn {
            return Ok(None);
        }
        let start = Instant::now();
        // An fsync error is final: we never retry it. After a failed fsync
        // the kernel may have dropped the dirty pages and marked them clean
        // ("fsyncgate"), so a second fsync can report success for data that
        // never reached the disk. The only honest answer is to stop, and let
        // recovery re-read what is really on disk after a restart.
        if let Err(e) = fs::fdatasync(&self.active.file) {
            self.metrics.fsync_errors.fetch_add(1, Ordering::Relaxed);
            let reason = format!("WAL fsync failed: {e}");
            self.failed = Some(reason);
            return Err(WalError::FsyncFailed(e.to_string()));
        }
        let took = start.elapsed();
        self.metrics.observe_fsync(took);
        assert!(last_lsn >= self.durable_lsn);
        self.durable_lsn = last_lsn;
        Ok(Some(took))
    }

    /// Seals the active segment (syncs it) and switches to a new one that
    /// starts at `next_lsn`.
    fn rotate(&mut self) -> Result<()> {
        let start = Instant::now();
        self.sync()?;
        let (entry, active) = create_segment(&self.options, &self.preparer, self.next_lsn)?;
        assert!(entry.first_lsn > self.active.first_lsn);
        self.index.push(entry);
        self.active = active;
        self.metrics.observe_rotation(start.elapsed());
        Ok(())
    }
}

/// Creates and installs the segment starting at `first_lsn`, using the
/// prepared spare if one is ready.
fn create_segment(
    options: &LogOptions,
    preparer: &Preparer,
    first_lsn: u64,
) -> Result<(SegmentEntry, Active)> {
    let (tmp, file) = match preparer.take() {
        Some(spare) => spare,
        None => {
            let tmp = preparer.tmp_path();
            let file = segment::prepare_tmp(&tmp, options.segment_bytes)?;
            (tmp, file)
        }
    };
    let path = match segment::install(&options.dir, &tmp, &file, first_lsn) {
        Ok(path) => path,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    let active = Active {
        file,
        first_lsn,
        offset: HEADER_BYTES,
    };
    Ok((SegmentEntry { first_lsn, path }, active))
}

/// Prepares the next segment file ahead of time in a thread, so rotation
/// only has to write the header, rename and fsync the directory.
///
/// # States
/// `Empty → Preparing → Ready → (taken by rotation) → Empty`; on an error
/// (such as ENOSPC) it waits `PREPARE_RETRY` and tries again.
struct Preparer {
    shared: Arc<PreparerShared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct PreparerShared {
    dir: PathBuf,
    segment_bytes: u64,
    sequence: AtomicU64,
    state: Mutex<PreparerState>,
    wake: Condvar,
}

#[derive(Default)]
struct PreparerState {
    spare: Option<(PathBuf, File)>,
    stop: bool,
}

const PREPARE_RETRY: Duration = Duration::from_millis(500);

impl Preparer {
    fn new(options: &LogOptions) -> Self {
        let shared = Arc::new(PreparerShared {
            dir: options.dir.clone(),
            segment_bytes: options.segment_bytes,
            sequence: AtomicU64::new(0),
            state: Mutex::new(PreparerState::default()),
            wake: Condvar::new(),
        });
        let thread = options.prepare_in_background.then(|| {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("wal-preparer".into())
                .spawn(move || shared.run())
                .expect("spawn preparer thread")
        });
        Preparer { shared, thread }
    }

    fn tmp_path(&self) -> PathBuf {
        self.shared.tmp_path()
    }

    fn take(&self) -> Option<(PathBuf, File)> {
        let spare = self.shared.lock().spare.take();
        self.shared.wake.notify_all();
        spare
    }
}

impl PreparerShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, PreparerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn tmp_path(&self) -> PathBuf {
        let n = self.sequence.fetch_add(1, Ordering::Relaxed);
        self.dir.join(format!(
            "prepared-{}-{n}{}",
            std::process::id(),
            segment::TMP_SUFFIX
        ))
    }

    fn run(&self) {
        let mut state = self.lock();
        while !state.stop {
            if state.spare.is_some() {
                state = self.wake.wait(state).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            drop(state);
            let tmp = self.tmp_path();
            let result = segment::prepare_tmp(&tmp, self.segment_bytes);
            state = self.lock();
            match result {
                Ok(file) => state.spare = Some((tmp, file)),
                Err(e) => {
                    tracing::debug!(error = %e, "could not prepare the next segment; will retry");
                    state = self
                        .wake
                        .wait_timeout(state, PREPARE_RETRY)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
        if let Some((tmp, _)) = state.spare.take() {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

impl Drop for Preparer {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        if let Some((tmp, _)) = self.shared.lock().spare.take() {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// Removes whole segments whose records are all below `below_lsn` (never
/// the active one). Returns the first LSN still held and the count removed.
pub fn truncate(index: &SegmentIndex, dir: &Path, below_lsn: u64) -> Result<(u64, u64)> {
    let removed = index.take_below(below_lsn);
    for entry in &removed {
        fs::remove_file(&entry.path)
            .map_err(|e| WalError::io(format!("remove {}", entry.path.display()), e))?;
    }
    if !removed.is_empty() {
        fs::fsync_dir(dir).map_err(|e| WalError::FsyncFailed(format!("WAL directory: {e}")))?;
        tracing::info!(
            below_lsn,
            segments_removed = removed.len(),
            first_lsn = index.first_lsn(),
            "WAL truncated"
        );
    }
    Ok((index.first_lsn(), removed.len() as u64))
}

/// Reads durable records in LSN order, segment after segment.
pub struct LogReader {
    index: Arc<SegmentIndex>,
    next_lsn: u64,
    current: Option<ReadSegment>,
}

struct ReadSegment {
    file: File,
    path: PathBuf,
    offset: u64,
    buf: Vec<u8>,
    /// File offset of `buf[0]`.
    buf_offset: u64,
}

const READ_AHEAD_BYTES: usize = 256 * 1024;

impl ReadSegment {
    /// The bytes `[offset, offset + len)`, from the read-ahead buffer or
    /// freshly read. May be shorter at the end of the file.
    fn bytes(&mut self, offset: u64, len: usize, fresh: bool) -> std::io::Result<&[u8]> {
        let cached = offset >= self.buf_offset
            && offset + len as u64 <= self.buf_offset + self.buf.len() as u64;
        if fresh || !cached {
            self.buf.resize(len.max(READ_AHEAD_BYTES), 0);
            let mut filled = 0;
            while filled < self.buf.len() {
                match self
                    .file
                    .read_at(&mut self.buf[filled..], offset + filled as u64)?
                {
                    0 => break,
                    n => filled += n,
                }
            }
            self.buf.truncate(filled);
            self.buf_offset = offset;
        }
        let start = (offset - self.buf_offset) as usize;
        let end = (start + len).min(self.buf.len());
        Ok(&self.buf[start.min(end)..end])
    }

    /// Decodes the frame at the current offset.
    fn frame(&mut self, fresh: bool) -> std::io::Result<Option<(u64, Vec<u8>, usize)>> {
        let offset = self.offset;
        let header = self.bytes(offset, record::FRAME_HEADER_BYTES, fresh)?;
        let Some((len, _)) = record::peek_header(header) else {
            return Ok(None);
        };
        let frame_len = record::frame_bytes(len.min(record::RECORD_BYTES_MAX));
        let frame = self.bytes(offset, frame_len, false)?;
        Ok(match record::decode(frame) {
            Decoded::Record {
                lsn,
                data,
                frame_bytes,
            } => Some((lsn, data.to_vec(), frame_bytes)),
            _ => None,
        })
    }
}

impl LogReader {
    pub fn new(index: Arc<SegmentIndex>, from_lsn: u64) -> Self {
        assert!(from_lsn > 0);
        LogReader {
            index,
            next_lsn: from_lsn,
            current: None,
        }
    }

    pub fn next_lsn(&self) -> u64 {
        self.next_lsn
    }

    fn open(&mut self) -> Result<()> {
        let first_lsn = self.index.first_lsn();
        let entry = self.index.find(self.next_lsn).ok_or(WalError::OutOfRange {
            from_lsn: self.next_lsn,
            first_lsn,
        })?;
        let file = File::open(&entry.path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => WalError::OutOfRange {
                from_lsn: self.next_lsn,
                first_lsn: self.index.first_lsn(),
            },
            _ => WalError::io(format!("open {}", entry.path.display()), e),
        })?;
        self.current = Some(ReadSegment {
            file,
            path: entry.path,
            offset: HEADER_BYTES,
            buf: Vec::new(),
            buf_offset: 0,
        });
        Ok(())
    }

    /// Appends to `out` the records from `next_lsn` up to `durable_lsn`,
    /// stopping once `bytes_max` bytes were collected (at least one record).
    pub fn read(
        &mut self,
        durable_lsn: u64,
        bytes_max: usize,
        records_max: usize,
        out: &mut Vec<(u64, Vec<u8>)>,
    ) -> Result<()> {
        let mut bytes = 0usize;
        let mut fresh = false;
        let mut moves = 0;
        while self.next_lsn <= durable_lsn
            && out.len() < records_max
            && (out.is_empty() || bytes < bytes_max)
        {
            if self.current.is_none() {
                self.open()?;
            }
            let Some(segment) = self.current.as_mut() else {
                unreachable!()
            };
            let frame = segment
                .frame(fresh)
                .map_err(|e| WalError::io("read WAL segment", e))?;
            match frame {
                Some((lsn, data, frame_bytes)) if lsn <= self.next_lsn => {
                    segment.offset += frame_bytes as u64;
                    if lsn == self.next_lsn {
                        bytes += data.len();
                        out.push((lsn, data));
                        self.next_lsn += 1;
                    }
                    fresh = false;
                    moves = 0;
                }
                _ if !fresh => fresh = true,
                _ => {
                    // The end of this segment: the record is in the next one.
                    moves += 1;
                    let path = segment.path.clone();
                    if moves > 1
                        || self
                            .index
                            .find(self.next_lsn)
                            .is_none_or(|e| e.path == path)
                    {
                        return Err(WalError::Failed(format!(
                            "durable record {} not found after {} offset {}",
                            self.next_lsn,
                            path.display(),
                            segment.offset
                        )));
                    }
                    self.current = None;
                    fresh = false;
                }
            }
        }
        Ok(())
    }
}
