//! faultfs: a fault-injecting FUSE filesystem for StemeDB reliability tests.
//!
//! It passes through to a backing directory but keeps everything that was
//! not made durable (file data not fsynced, directory entries not made
//! durable by an fsync of their directory) in its own memory. On command it
//! crashes (forgets all of that, like a power loss), fails the next N fsyncs
//! with EIO, fails growth beyond a byte quota with ENOSPC, or delays every
//! fsync.
//!
//! ```no_run
//! let m = faultfs::Mount::new("/tmp/backing".as_ref(), "/tmp/mnt".as_ref());
//! std::fs::write("/tmp/mnt/a", b"lost").unwrap(); // not fsynced
//! m.crash();
//! assert!(!std::path::Path::new("/tmp/mnt/a").exists());
//! ```
//!
//! The same controls are served as line commands on a Unix socket by the
//! `faultfs` binary; see README.md.
//!
//! **Architecture Invariant:** the backing directory holds exactly the
//! durable state at every moment (`state.rs`). faultfs does not fsync the
//! backing directory itself: it simulates a power loss of the mount, not of
//! the host.

mod fs;
mod state;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use state::{ModelStats, DIRTY_BYTES_MAX, PAGE_BYTES, STAGING_NAME};

/// How long a mount may take to appear.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest control command line accepted.
const CONTROL_LINE_BYTES_MAX: u64 = 256;

/// The injected faults and counters, shared with the FUSE session.
#[derive(Debug)]
pub struct Faults {
    /// fsync/fdatasync/fsyncdir calls still to fail with EIO.
    fail_fsync: AtomicU64,
    /// Quota on the sum of file sizes; `u64::MAX` means none.
    quota_bytes: AtomicU64,
    delay_fsync_ms: AtomicU64,
    fsyncs: AtomicU64,
    fsync_failures: AtomicU64,
    enospc: AtomicU64,
    writes: AtomicU64,
    bytes_written: AtomicU64,
    crashes: AtomicU64,
    crash_lost_bytes: AtomicU64,
    crash_lost_entries: AtomicU64,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            fail_fsync: AtomicU64::new(0),
            quota_bytes: AtomicU64::new(u64::MAX),
            delay_fsync_ms: AtomicU64::new(0),
            fsyncs: AtomicU64::new(0),
            fsync_failures: AtomicU64::new(0),
            enospc: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            crashes: AtomicU64::new(0),
            crash_lost_bytes: AtomicU64::new(0),
            crash_lost_entries: AtomicU64::new(0),
        }
    }
}

/// What faultfs did since it was mounted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// fsync, fdatasync and fsyncdir calls (failed ones included).
    pub fsyncs: u64,
    /// Of which failed with an injected EIO.
    pub fsync_failures: u64,
    /// Writes, truncates and fallocates refused with ENOSPC by the quota.
    pub enospc: u64,
    pub writes: u64,
    pub bytes_written: u64,
    pub crashes: u64,
    /// Dirty bytes (in pages) the crashes forgot, summed.
    pub crash_lost_bytes: u64,
    /// Directory entry changes (creates, renames, unlinks) the crashes
    /// forgot, summed.
    pub crash_lost_entries: u64,
    /// fsync failures still armed.
    pub fail_fsync_armed: u64,
    pub model: ModelStats,
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "fsyncs={} fsync_failures={} fail_fsync_armed={} enospc={} writes={} bytes_written={} \
             crashes={} crash_lost_bytes={} crash_lost_entries={} dirty_bytes={} \
             used_bytes={} inodes={}",
            self.fsyncs,
            self.fsync_failures,
            self.fail_fsync_armed,
            self.enospc,
            self.writes,
            self.bytes_written,
            self.crashes,
            self.crash_lost_bytes,
            self.crash_lost_entries,
            self.model.dirty_bytes,
            self.model.used_bytes,
            self.model.inodes
        )
    }
}

/// The controls of one mount. Cheap to clone; usable from any thread.
#[derive(Clone)]
pub struct Control {
    shared: Arc<fs::Shared>,
}

impl Control {
    /// Power loss: drops every unsynced byte and every directory entry not
    /// made durable, and invalidates every open handle (later operations on
    /// them fail with EIO: they belong to processes that died with the
    /// power). Afterwards the mount shows exactly the durable state.
    pub fn crash(&self) {
        let mut s = self.shared.lock();
        let (bytes, entries) = s
            .crash()
            .expect("faultfs: rebuilding from the backing directory");
        let f = &self.shared.faults;
        f.crashes.fetch_add(1, Ordering::Relaxed);
        f.crash_lost_bytes.fetch_add(bytes, Ordering::Relaxed);
        f.crash_lost_entries.fetch_add(entries, Ordering::Relaxed);
    }

    /// Fails the next `n` fsync/fdatasync/fsyncdir calls with EIO. A failed
    /// fsync of a file drops its dirty pages from durability (they stay
    /// readable until a crash), as Linux does after a writeback error.
    pub fn fail_fsync(&self, n: u64) {
        self.shared.faults.fail_fsync.store(n, Ordering::Release);
    }

    /// Limits the sum of all file sizes to `bytes`: writes, truncates and
    /// fallocates that would grow past it fail with ENOSPC. `None` lifts it.
    pub fn quota(&self, bytes: Option<u64>) {
        let q = bytes.unwrap_or(u64::MAX);
        self.shared.faults.quota_bytes.store(q, Ordering::Release);
    }

    /// Delays the answer of every fsync by `ms` milliseconds (0: none).
    pub fn delay_fsync(&self, ms: u64) {
        self.shared
            .faults
            .delay_fsync_ms
            .store(ms, Ordering::Release);
    }

    pub fn stats(&self) -> Stats {
        let f = &self.shared.faults;
        let model = self.shared.lock().stats();
        Stats {
            fsyncs: f.fsyncs.load(Ordering::Relaxed),
            fsync_failures: f.fsync_failures.load(Ordering::Relaxed),
            enospc: f.enospc.load(Ordering::Relaxed),
            writes: f.writes.load(Ordering::Relaxed),
            bytes_written: f.bytes_written.load(Ordering::Relaxed),
            crashes: f.crashes.load(Ordering::Relaxed),
            crash_lost_bytes: f.crash_lost_bytes.load(Ordering::Relaxed),
            crash_lost_entries: f.crash_lost_entries.load(Ordering::Relaxed),
            fail_fsync_armed: f.fail_fsync.load(Ordering::Relaxed),
            model,
        }
    }

    /// Runs one line command of the control protocol (README.md) and
    /// returns the answer line: `ok [...]` or `err <reason>`.
    pub fn command(&self, line: &str) -> String {
        let words: Vec<&str> = line.split_whitespace().collect();
        let number = |w: Option<&&str>| w.and_then(|w| w.parse::<u64>().ok());
        match words.as_slice() {
            ["crash"] => {
                self.crash();
                "ok".into()
            }
            ["fail-fsync", n] => match number(Some(n)) {
                Some(n) => {
                    self.fail_fsync(n);
                    "ok".into()
                }
                None => format!("err fail-fsync needs a count, got {n:?}"),
            },
            ["quota", "off"] => {
                self.quota(None);
                "ok".into()
            }
            ["quota", b] => match number(Some(b)) {
                Some(b) => {
                    self.quota(Some(b));
                    "ok".into()
                }
                None => format!("err quota needs BYTES or off, got {b:?}"),
            },
            ["delay-fsync", ms] => match number(Some(ms)) {
                Some(ms) => {
                    self.delay_fsync(ms);
                    "ok".into()
                }
                None => format!("err delay-fsync needs milliseconds, got {ms:?}"),
            },
            ["stats"] => format!("ok {}", self.stats()),
            _ => format!(
                "err unknown command {line:?}: expected crash, fail-fsync N, quota BYTES|off, \
                 delay-fsync MS or stats"
            ),
        }
    }

    /// Serves the line protocol on a Unix socket at `path`, in a background
    /// thread, one thread per connection.
    pub fn serve(&self, path: &Path) -> std::io::Result<()> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        let control = self.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let control = control.clone();
                std::thread::spawn(move || control.serve_one(stream));
            }
        });
        Ok(())
    }

    fn serve_one(&self, stream: UnixStream) {
        let Ok(mut out) = stream.try_clone() else {
            return;
        };
        let mut reader = BufReader::new(stream);
        loop {
            let mut line = String::new();
            match (&mut reader)
                .take(CONTROL_LINE_BYTES_MAX)
                .read_line(&mut line)
            {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let answer = self.command(line.trim());
            if writeln!(out, "{answer}").is_err() {
                return;
            }
        }
    }
}

use std::io::Read as _;

/// A mounted faultfs. Dropping it unmounts.
pub struct Mount {
    session: Option<fuser::BackgroundSession>,
    control: Control,
    mountpoint: PathBuf,
    /// The FUSE connection id (the mount's device number), for aborting it.
    connection: u64,
}

impl Mount {
    /// Mounts faultfs over `backing` at `mountpoint` (both created if
    /// missing). Panics with a clear message if FUSE is unavailable: the
    /// reliability suite must not silently skip.
    pub fn new(backing: &Path, mountpoint: &Path) -> Mount {
        Self::try_new(backing, mountpoint).unwrap_or_else(|e| {
            panic!(
                "faultfs: cannot mount {} over {}: {e}\n\
                 FUSE is required: /dev/fuse must exist and `fusermount3` must be installed \
                 (Debian: apt-get install fuse3); run as root or with access to /dev/fuse",
                mountpoint.display(),
                backing.display()
            )
        })
    }

    pub fn try_new(backing: &Path, mountpoint: &Path) -> std::io::Result<Mount> {
        if !Path::new("/dev/fuse").exists() {
            return Err(std::io::Error::other("/dev/fuse does not exist"));
        }
        std::fs::create_dir_all(backing)?;
        std::fs::create_dir_all(mountpoint)?;
        let backing = backing.canonicalize()?;
        let mountpoint = mountpoint.canonicalize()?;
        let state = state::State::load(&backing)?;
        let shared = Arc::new(fs::Shared {
            state: Mutex::new(state),
            faults: Faults::default(),
        });
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName("faultfs".into()),
            fuser::MountOption::Subtype("faultfs".into()),
        ];
        let filesystem = fs::FaultFs {
            shared: shared.clone(),
        };
        let session = fuser::spawn_mount(filesystem, &mountpoint, &config)?;
        let mut mount = Mount {
            session: Some(session),
            control: Control { shared },
            mountpoint,
            connection: 0,
        };
        mount.connection = mount.wait_mounted()?;
        Ok(mount)
    }

    /// Waits for the mount to appear; returns its device number.
    fn wait_mounted(&self) -> std::io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        let parent = self.mountpoint.parent().unwrap_or(Path::new("/"));
        let deadline = Instant::now() + MOUNT_TIMEOUT;
        loop {
            let here = std::fs::metadata(&self.mountpoint)?.dev();
            if here != std::fs::metadata(parent)?.dev() {
                return Ok(here);
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::other("the mount did not appear"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The controls, to hand to another thread.
    pub fn control(&self) -> Control {
        self.control.clone()
    }

    /// See [`Control::crash`].
    pub fn crash(&self) {
        self.control.crash();
    }

    /// See [`Control::fail_fsync`].
    pub fn fail_fsync(&self, n: u64) {
        self.control.fail_fsync(n);
    }

    /// See [`Control::quota`].
    pub fn quota(&self, bytes: Option<u64>) {
        self.control.quota(bytes);
    }

    /// See [`Control::delay_fsync`].
    pub fn delay_fsync(&self, ms: u64) {
        self.control.delay_fsync(ms);
    }

    pub fn stats(&self) -> Stats {
        self.control.stats()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let Some(session) = self.session.take() else {
            return;
        };
        if session.umount_and_join().is_err() {
            // Busy: something still has a file open. The session runs in
            // this process, so a thread of ours blocked in a request would
            // never get its answer once the session ends, and the process
            // could not exit. Abort the connection first (every pending and
            // later request fails with ENOTCONN), then detach lazily.
            abort_connection(self.connection);
            let _ = std::process::Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(&self.mountpoint)
                .status();
        }
    }
}

/// Aborts FUSE connection `dev` through fusectl (mounted if needed).
fn abort_connection(dev: u64) {
    let connections = Path::new("/sys/fs/fuse/connections");
    if std::fs::read_dir(connections).is_ok_and(|mut d| d.next().is_none()) {
        let _ = std::process::Command::new("mount")
            .args(["-t", "fusectl", "none"])
            .arg(connections)
            .status();
    }
    let _ = std::fs::write(connections.join(dev.to_string()).join("abort"), "1");
}
