//! The file-system seam. Every write, fsync, fallocate, rename and unlink
//! of the WAL goes through this module, so that tests can inject faults
//! with `fail` failpoints named `wal::<op>::fault`. The failpoints compile
//! only with the `failpoints` feature; otherwise `fail_point!` is empty.
//!
//! A failpoint configured with `return` fails with EIO; `return(enospc)`
//! fails with ENOSPC. `sleep(ms)` delays the operation and then performs it.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// Turns the failpoint argument into the injected error.
#[allow(dead_code)]
fn injected(op: &str, arg: Option<String>) -> io::Error {
    match arg.as_deref() {
        Some("enospc") => io::Error::from_raw_os_error(libc::ENOSPC),
        _ => io::Error::other(format!("injected {op} fault")),
    }
}

/// Writes all of `buf` at `offset`. On error returns how many bytes were
/// written before the error, so the caller can erase a partial write.
pub fn write_all_at(file: &File, buf: &[u8], offset: u64) -> Result<(), (usize, io::Error)> {
    fail::fail_point!("wal::write::fault", |arg| Err((0, injected("write", arg))));
    let mut done = 0usize;
    while done < buf.len() {
        match file.write_at(&buf[done..], offset + done as u64) {
            Ok(0) => return Err((done, io::Error::from(io::ErrorKind::WriteZero))),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err((done, e)),
        }
    }
    Ok(())
}

/// fdatasync(2): makes the file data (and the size) durable.
pub fn fdatasync(file: &File) -> io::Result<()> {
    fail::fail_point!("wal::fsync::fault", |arg| Err(injected("fsync", arg)));
    file.sync_data()
}

/// fsync(2): makes data and all metadata durable.
pub fn fsync(file: &File) -> io::Result<()> {
    fail::fail_point!("wal::fsync::fault", |arg| Err(injected("fsync", arg)));
    file.sync_all()
}

/// Makes the directory entries of `dir` durable (after create/rename/unlink).
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    fail::fail_point!("wal::fsync_dir::fault", |arg| Err(injected(
        "fsync_dir",
        arg
    )));
    File::open(dir)?.sync_all()
}

/// Reserves `len` bytes for `file` so later writes cannot hit ENOSPC.
pub fn fallocate(file: &File, len: u64) -> io::Result<()> {
    fail::fail_point!("wal::fallocate::fault", |arg| Err(injected(
        "fallocate",
        arg
    )));
    let len = libc::off_t::try_from(len).map_err(io::Error::other)?;
    // SAFETY: fd is a valid open file for the duration of the call.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) };
    if rc == 0 {
        return Ok(());
    }
    let error = io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::EOPNOTSUPP) {
        // Some file systems cannot preallocate; the segment then grows on write.
        return Ok(());
    }
    Err(error)
}

/// rename(2), atomic within one file system.
pub fn rename(from: &Path, to: &Path) -> io::Result<()> {
    fail::fail_point!("wal::rename::fault", |arg| Err(injected("rename", arg)));
    std::fs::rename(from, to)
}

/// unlink(2).
pub fn remove_file(path: &Path) -> io::Result<()> {
    fail::fail_point!("wal::remove::fault", |arg| Err(injected("remove", arg)));
    std::fs::remove_file(path)
}

/// Creates (truncating) a file for writing and reading, mode 0640.
pub fn create(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    fail::fail_point!("wal::create::fault", |arg| Err(injected("create", arg)));
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o640)
        .open(path)
}

/// Opens an existing file for reading and writing.
pub fn open_rw(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
}

/// Creates the WAL directory (and missing ancestors) if needed, and makes
/// every new directory entry durable by fsyncing its parent.
pub fn create_dir_durable(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let created: Vec<&Path> = dir
        .ancestors()
        .take_while(|a| !a.as_os_str().is_empty() && !a.exists())
        .collect();
    std::fs::create_dir_all(dir)?;
    for new_dir in created.iter().rev() {
        let parent = match new_dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        fsync_dir(parent)?;
    }
    Ok(())
}

/// Free bytes for unprivileged users on the file system holding `path`.
pub fn free_bytes(path: &Path) -> u64 {
    match nix::sys::statvfs::statvfs(path) {
        Ok(s) => s.blocks_available().saturating_mul(s.fragment_size()),
        Err(_) => 0,
    }
}
