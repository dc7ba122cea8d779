//! The FUSE side: translates kernel requests into calls on the model
//! (`state.rs`) and applies the injected faults. The only module that knows
//! `fuser`.
//!
//! Every reply sets zero TTLs and every open sets `FOPEN_DIRECT_IO`, so the
//! kernel caches neither data nor attributes: after a crash, what a reader
//! sees comes from the model, not from the kernel's page cache.

use crate::state::{State, PAGE_BYTES, ROOT_INO};
use crate::Faults;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use std::ffi::OsStr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

const TTL: Duration = Duration::ZERO;

/// Shared between the FUSE session and the controls.
pub struct Shared {
    pub state: Mutex<State>,
    pub faults: Faults,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the model as it was at the
        // panic; tests would rather see that state than a poisoned error.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct FaultFs {
    pub shared: Arc<Shared>,
}

fn errno(e: i32) -> Errno {
    Errno::from_i32(e)
}

fn attr(s: &State, ino: u64) -> Result<FileAttr, i32> {
    let i = s.inode(ino)?;
    let size = i.size();
    Ok(FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: i.atime,
        mtime: i.mtime,
        ctime: i.ctime,
        crtime: i.ctime,
        kind: if i.is_dir() {
            FileType::Directory
        } else {
            FileType::RegularFile
        },
        perm: i.perm,
        nlink: i.nlink(),
        uid: i.uid,
        gid: i.gid,
        rdev: 0,
        blksize: PAGE_BYTES as u32,
        flags: 0,
    })
}

fn reply_entry(s: &State, ino: Result<u64, i32>, reply: ReplyEntry) {
    match ino.and_then(|ino| attr(s, ino)) {
        Ok(a) => reply.entry(&TTL, &a, Generation(0)),
        Err(e) => reply.error(errno(e)),
    }
}

fn reply_empty(r: Result<(), i32>, reply: ReplyEmpty) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(e)),
    }
}

fn time(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    }
}

impl FaultFs {
    /// Replies to an fsync after the configured delay, without holding up
    /// the session thread (a slow disk does not block other writers).
    fn reply_fsync(&self, r: Result<(), i32>, reply: ReplyEmpty) {
        let delay_ms = self.shared.faults.delay_fsync_ms.load(Ordering::Relaxed);
        if delay_ms == 0 {
            return reply_empty(r, reply);
        }
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(delay_ms));
            reply_empty(r, reply);
        });
    }

    /// Takes one injected fsync failure, if any are armed.
    fn take_fsync_failure(&self) -> bool {
        let f = &self.shared.faults;
        f.fsyncs.fetch_add(1, Ordering::Relaxed);
        let failed = f
            .fail_fsync
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok();
        if failed {
            f.fsync_failures.fetch_add(1, Ordering::Relaxed);
        }
        failed
    }

    fn quota(&self) -> Option<u64> {
        match self.shared.faults.quota_bytes.load(Ordering::Relaxed) {
            u64::MAX => None,
            q => Some(q),
        }
    }

    fn enospc(&self) -> i32 {
        self.shared.faults.enospc.fetch_add(1, Ordering::Relaxed);
        libc::ENOSPC
    }
}

impl Filesystem for FaultFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let s = self.shared.lock();
        let ino = s.lookup(parent.0, name);
        reply_entry(&s, ino, reply);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let s = self.shared.lock();
        match attr(&s, ino.0) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let quota = self.quota();
        let mut s = self.shared.lock();
        let r = (|| {
            if let Some(size) = size {
                if s.check_growth(ino.0, size, quota).is_err() {
                    return Err(self.enospc());
                }
                s.truncate(ino.0, size)?;
            }
            let perm = mode.map(|m| (m & 0o7777) as u16);
            s.setattr_meta(ino.0, perm, uid, gid)?;
            s.set_times(ino.0, atime.map(time), mtime.map(time))?;
            attr(&s, ino.0)
        })();
        match r {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & libc::S_IFMT != libc::S_IFREG {
            return reply.error(Errno::EPERM);
        }
        let mut s = self.shared.lock();
        let perm = (mode & !umask & 0o7777) as u16;
        let ino = s.create(parent.0, name, perm, req.uid(), req.gid());
        reply_entry(&s, ino, reply);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let mut s = self.shared.lock();
        let perm = (mode & !umask & 0o7777) as u16;
        let ino = s.mkdir(parent.0, name, perm, req.uid(), req.gid());
        reply_entry(&s, ino, reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.shared.lock().unlink(parent.0, name);
        reply_empty(r, reply);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.shared.lock().rmdir(parent.0, name);
        reply_empty(r, reply);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.intersects(RenameFlags::RENAME_EXCHANGE | RenameFlags::RENAME_WHITEOUT) {
            return reply.error(Errno::EINVAL);
        }
        let noreplace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        let r = self
            .shared
            .lock()
            .rename(parent.0, name, newparent.0, newname, noreplace);
        reply_empty(r, reply);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let truncate = flags.0 & libc::O_TRUNC != 0;
        match self.shared.lock().open(ino.0, truncate) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let mut s = self.shared.lock();
        let perm = (mode & !umask & 0o7777) as u16;
        let r = s
            .create(parent.0, name, perm, req.uid(), req.gid())
            .and_then(|ino| Ok((ino, s.open(ino, false)?)))
            .and_then(|(ino, fh)| Ok((attr(&s, ino)?, fh)));
        match r {
            Ok((a, fh)) => reply.created(
                &TTL,
                &a,
                Generation(0),
                FileHandle(fh),
                FopenFlags::FOPEN_DIRECT_IO,
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let mut s = self.shared.lock();
        match s.handle(fh.0).and_then(|ino| s.read(ino, offset, size)) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let quota = self.quota();
        let mut s = self.shared.lock();
        let r = s.handle(fh.0).and_then(|ino| {
            if s.check_growth(ino, offset + data.len() as u64, quota)
                .is_err()
            {
                return Err(self.enospc());
            }
            s.write(ino, offset, data)
        });
        match r {
            Ok(n) => {
                let f = &self.shared.faults;
                f.writes.fetch_add(1, Ordering::Relaxed);
                f.bytes_written.fetch_add(u64::from(n), Ordering::Relaxed);
                reply.written(n)
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2) makes nothing durable.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.shared.lock().release(fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut s = self.shared.lock();
        let r = s.handle(fh.0).and_then(|ino| {
            if self.take_fsync_failure() {
                s.poison(ino);
                return Err(libc::EIO);
            }
            s.fsync_file(ino)
        });
        drop(s);
        self.reply_fsync(r, reply);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let s = self.shared.lock();
        let (entries, parent) = match s.entries(ino.0).and_then(|e| Ok((e, s.parent_of(ino.0)?))) {
            Ok(v) => v,
            Err(e) => return reply.error(errno(e)),
        };
        let dots = [
            (".".into(), ino.0, true),
            (
                "..".into(),
                if ino.0 == ROOT_INO { ino.0 } else { parent },
                true,
            ),
        ];
        for (i, (name, child, is_dir)) in dots.into_iter().chain(entries).enumerate() {
            if (i as u64) < offset {
                continue;
            }
            let kind = if is_dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            };
            if reply.add(INodeNo(child), i as u64 + 1, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let r = if self.take_fsync_failure() {
            Err(libc::EIO)
        } else {
            self.shared.lock().fsync_dir(ino.0)
        };
        self.reply_fsync(r, reply);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = self.shared.lock();
        let bsize = PAGE_BYTES;
        if let Some(quota) = self.quota() {
            let blocks = quota / bsize;
            let free = quota.saturating_sub(s.used_bytes()) / bsize;
            return reply.statfs(
                blocks,
                free,
                free,
                1 << 20,
                1 << 20,
                bsize as u32,
                255,
                bsize as u32,
            );
        }
        match nix::sys::statvfs::statvfs(s.backing()) {
            Ok(v) => reply.statfs(
                v.blocks(),
                v.blocks_free(),
                v.blocks_available(),
                v.files(),
                v.files_free(),
                v.block_size() as u32,
                255,
                v.fragment_size() as u32,
            ),
            Err(e) => reply.error(errno(e as i32)),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let quota = self.quota();
        let mut s = self.shared.lock();
        let r = if mode == 0 && s.check_growth(ino.0, offset + length, quota).is_err() {
            Err(self.enospc())
        } else {
            s.fallocate(ino.0, offset, length, mode)
        };
        reply_empty(r, reply);
    }
}
