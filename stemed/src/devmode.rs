//! Dev mode: with no `[wal] socket` configured, stemed runs its own walld as
//! a child process, with the WAL and socket inside the data directory, and
//! restarts it if it exits. Production uses the walld that systemd starts.

use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::process::{Child, Command};
use tokio::sync::Mutex;

pub struct ChildWalld {
    child: Arc<Mutex<Option<Child>>>,
    stopping: Arc<AtomicBool>,
    pub socket: PathBuf,
    pub wal_dir: PathBuf,
}

/// Finds walld: the configured path, else next to this executable, else `PATH`.
pub fn find_walld(configured: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = configured {
        if p.is_file() {
            return Ok(p.to_path_buf());
        }
        bail!("wal.walld_bin {} does not exist", p.display());
    }
    let exe = std::env::current_exe().context("cannot locate the stemed executable")?;
    if let Some(dir) = exe.parent() {
        let beside = dir.join("walld");
        if beside.is_file() {
            return Ok(beside);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("walld");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    bail!(
        "walld not found next to {} or on PATH; build both binaries with `cargo build --release --bins`, or set wal.walld_bin (STEMEDB_WAL_WALLD_BIN, or --walld-bin)",
        exe.display()
    )
}

impl ChildWalld {
    pub async fn start(bin: PathBuf, data_dir: &Path) -> anyhow::Result<ChildWalld> {
        let wal_dir = data_dir.join("wal");
        let socket = data_dir.join("walld.sock");
        let child = spawn(&bin, &wal_dir, &socket)?;
        let me = ChildWalld {
            child: Arc::new(Mutex::new(Some(child))),
            stopping: Arc::new(AtomicBool::new(false)),
            socket,
            wal_dir,
        };
        me.supervise(bin);
        Ok(me)
    }

    fn supervise(&self, bin: PathBuf) {
        let child = self.child.clone();
        let stopping = self.stopping.clone();
        let (wal_dir, socket) = (self.wal_dir.clone(), self.socket.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                if stopping.load(Ordering::Acquire) {
                    return;
                }
                let mut guard = child.lock().await;
                let exited = match guard.as_mut() {
                    Some(c) => c.try_wait().ok().flatten(),
                    None => return,
                };
                if let Some(status) = exited {
                    tracing::warn!(%status, "walld exited; restarting it in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    match spawn(&bin, &wal_dir, &socket) {
                        Ok(c) => *guard = Some(c),
                        Err(e) => tracing::error!(error = %e, "cannot restart walld"),
                    }
                }
            }
        });
    }

    /// SIGTERM, then wait up to 10 s (walld finishes its groups and fsyncs),
    /// then SIGKILL.
    pub async fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        let mut guard = self.child.lock().await;
        let Some(mut c) = guard.take() else { return };
        if let Some(pid) = c.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        match tokio::time::timeout(Duration::from_secs(10), c.wait()).await {
            Ok(Ok(status)) => tracing::info!(%status, "walld stopped"),
            _ => {
                tracing::warn!("walld did not stop within 10 s; killing it");
                let _ = c.kill().await;
            }
        }
    }
}

fn spawn(bin: &Path, wal_dir: &Path, socket: &Path) -> anyhow::Result<Child> {
    let mut cmd = Command::new(bin);
    cmd.arg("--dir").arg(wal_dir).arg("--socket").arg(socket);
    if nix::unistd::geteuid().is_root() {
        // Dev mode as root (CI, containers): walld would otherwise refuse.
        cmd.arg("--allow-root");
    }
    cmd.stdin(Stdio::null());
    // The child must not outlive us if we are killed.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.kill_on_drop(true);
    cmd.spawn()
        .with_context(|| format!("cannot start walld from {}", bin.display()))
}
