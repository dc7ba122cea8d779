//! The model: what the filesystem looks like now, and what would survive a
//! power loss.
//!
//! **Architecture Invariant:** the backing directory holds exactly the
//! durable state. Everything that is not durable lives in memory:
//! - file data written but not fsynced, as dirty pages over the file's
//!   durable object;
//! - directory entries created, renamed or removed but not yet made durable
//!   by an fsync of the directory.
//!
//! Every inode has one *object* in the backing directory holding its durable
//! bytes: either its durable name (`In { parent, name }`), the root, or, for
//! an inode that has no durable name (created but the directory not yet
//! fsynced, or whose durable name was removed by an fsync of the directory),
//! a file in the hidden staging directory `<backing>/.faultfs/`. A crash wipes
//! the staging directory and rebuilds the model from the backing directory,
//! so afterwards the filesystem shows exactly the durable state.
//!
//! This module knows nothing about FUSE; `fs.rs` translates.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Cache granularity of file data.
pub const PAGE_BYTES: u64 = 4096;
/// Dirty (unsynced) bytes held in memory, at most; beyond it writes fail
/// with ENOSPC rather than exhausting the test machine's memory.
pub const DIRTY_BYTES_MAX: u64 = 1 << 30;
/// Name of the staging directory inside the backing directory. Hidden from
/// the mount; a crash wipes it.
pub const STAGING_NAME: &str = ".faultfs";
/// Inode number of the root directory (FUSE's convention).
pub const ROOT_INO: u64 = 1;

/// An errno value.
pub type Errno = i32;
pub type Result<T> = std::result::Result<T, Errno>;

fn io_errno(e: io::Error) -> Errno {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// Where an inode's durable bytes live in the backing directory.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Obj {
    Root,
    /// `<backing>/.faultfs/<ino>`: no durable name.
    Staged,
    /// The durable entry `name` of durable-or-staged directory `parent`.
    In {
        parent: u64,
        name: OsString,
    },
}

struct Page {
    bytes: Box<[u8]>,
    /// False once an fsync of this page failed: like Linux after a writeback
    /// error, the page stays readable but is never written back, so a later
    /// "successful" fsync does not make it durable (fsyncgate).
    flush: bool,
}

pub struct FileData {
    /// The durable object, open for reading and writing. An open file keeps
    /// working when its object is renamed, so moves need not reopen it.
    object: File,
    pages: BTreeMap<u64, Page>,
    /// Logical size now.
    size: u64,
    /// Smallest size the file was truncated to since its last fsync: the
    /// object's bytes at or after it are logically gone.
    zero_from: Option<u64>,
}

pub struct DirData {
    /// Entries now.
    entries: BTreeMap<OsString, u64>,
    /// Entries as they are in the backing directory.
    durable: BTreeMap<OsString, u64>,
}

pub enum Kind {
    File(FileData),
    Dir(DirData),
}

pub struct Inode {
    pub kind: Kind,
    obj: Obj,
    /// Directory holding the current entry (root: itself).
    parent: u64,
    /// Has a current name (false after unlink, rmdir or being replaced).
    linked: bool,
    /// Open file handles.
    open: u32,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
}

impl Inode {
    pub fn is_dir(&self) -> bool {
        matches!(self.kind, Kind::Dir(_))
    }

    pub fn size(&self) -> u64 {
        match &self.kind {
            Kind::File(f) => f.size,
            Kind::Dir(d) => d.entries.len() as u64,
        }
    }

    pub fn nlink(&self) -> u32 {
        match (&self.kind, self.linked) {
            (_, false) => 0,
            (Kind::File(_), true) => 1,
            (Kind::Dir(d), true) => 2 + d.entries.len() as u32,
        }
    }
}

/// Counters of what the model did, for `stats`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModelStats {
    pub dirty_bytes: u64,
    pub used_bytes: u64,
    pub inodes: u64,
}

pub struct State {
    backing: PathBuf,
    staging: PathBuf,
    inodes: HashMap<u64, Inode>,
    /// Inode numbers are never reused, not even across a crash, so that the
    /// kernel's stale inodes can never alias new ones.
    next_ino: u64,
    /// Open file handles: fh -> ino. A crash drops them all: handles opened
    /// before the power loss belong to processes that no longer exist.
    handles: HashMap<u64, u64>,
    next_fh: u64,
}

impl State {
    /// Loads the durable state of `backing` (wiping leftovers of staging).
    pub fn load(backing: &Path) -> io::Result<State> {
        let mut s = State {
            backing: backing.to_path_buf(),
            staging: backing.join(STAGING_NAME),
            inodes: HashMap::new(),
            next_ino: ROOT_INO + 1,
            handles: HashMap::new(),
            next_fh: 1,
        };
        s.rebuild()?;
        Ok(s)
    }

    /// Power loss: forgets everything that is not durable. Returns what was
    /// lost: (dirty bytes, directory entries whose change was not durable).
    pub fn crash(&mut self) -> io::Result<(u64, u64)> {
        let dirty = self.dirty_bytes();
        let entries = self
            .inodes
            .values()
            .map(|i| match &i.kind {
                Kind::Dir(d) => {
                    let changed = d
                        .entries
                        .iter()
                        .filter(|(n, i)| d.durable.get(*n) != Some(i));
                    let removed = d.durable.keys().filter(|n| !d.entries.contains_key(*n));
                    (changed.count() + removed.count()) as u64
                }
                Kind::File(_) => 0,
            })
            .sum();
        self.rebuild()?;
        Ok((dirty, entries))
    }

    fn rebuild(&mut self) -> io::Result<()> {
        self.inodes.clear();
        self.handles.clear();
        if self.staging.exists() {
            std::fs::remove_dir_all(&self.staging)?;
        }
        std::fs::create_dir(&self.staging)?;
        let meta = std::fs::metadata(&self.backing)?;
        let root = self.inode_from_meta(
            Kind::Dir(DirData {
                entries: BTreeMap::new(),
                durable: BTreeMap::new(),
            }),
            Obj::Root,
            ROOT_INO,
            &meta,
        );
        self.inodes.insert(ROOT_INO, root);
        self.scan(ROOT_INO, &self.backing.clone())
    }

    fn inode_from_meta(&self, kind: Kind, obj: Obj, parent: u64, m: &std::fs::Metadata) -> Inode {
        Inode {
            kind,
            obj,
            parent,
            linked: true,
            open: 0,
            perm: (m.mode() & 0o7777) as u16,
            uid: m.uid(),
            gid: m.gid(),
            atime: m.accessed().unwrap_or(SystemTime::UNIX_EPOCH),
            mtime: m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            ctime: SystemTime::now(),
        }
    }

    /// Adds the durable entries under `path` (the object of `dir`).
    fn scan(&mut self, dir: u64, path: &Path) -> io::Result<()> {
        for entry in std::fs::read_dir(path)? {
            let entry = entry?;
            let name = entry.file_name();
            if dir == ROOT_INO && name == STAGING_NAME {
                continue;
            }
            let meta = entry.metadata()?;
            let obj = Obj::In {
                parent: dir,
                name: name.clone(),
            };
            let ino = self.alloc_ino();
            let inode = if meta.is_dir() {
                let kind = Kind::Dir(DirData {
                    entries: BTreeMap::new(),
                    durable: BTreeMap::new(),
                });
                self.inode_from_meta(kind, obj, dir, &meta)
            } else if meta.is_file() {
                let object = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(entry.path())?;
                let kind = Kind::File(FileData {
                    object,
                    pages: BTreeMap::new(),
                    size: meta.len(),
                    zero_from: None,
                });
                self.inode_from_meta(kind, obj, dir, &meta)
            } else {
                // Symlinks, sockets and devices are not modelled.
                continue;
            };
            let is_dir = inode.is_dir();
            self.inodes.insert(ino, inode);
            let d = self.dir_mut(dir).expect("scan parent is a directory");
            d.entries.insert(name.clone(), ino);
            d.durable.insert(name, ino);
            if is_dir {
                self.scan(ino, &entry.path())?;
            }
        }
        Ok(())
    }

    fn alloc_ino(&mut self) -> u64 {
        let ino = self.next_ino;
        self.next_ino += 1;
        ino
    }

    pub fn inode(&self, ino: u64) -> Result<&Inode> {
        self.inodes.get(&ino).ok_or(libc::ESTALE)
    }

    fn inode_mut(&mut self, ino: u64) -> Result<&mut Inode> {
        self.inodes.get_mut(&ino).ok_or(libc::ESTALE)
    }

    fn dir(&self, ino: u64) -> Result<&DirData> {
        match &self.inode(ino)?.kind {
            Kind::Dir(d) => Ok(d),
            Kind::File(_) => Err(libc::ENOTDIR),
        }
    }

    fn dir_mut(&mut self, ino: u64) -> Result<&mut DirData> {
        match &mut self.inode_mut(ino)?.kind {
            Kind::Dir(d) => Ok(d),
            Kind::File(_) => Err(libc::ENOTDIR),
        }
    }

    fn file_mut(&mut self, ino: u64) -> Result<&mut FileData> {
        match &mut self.inode_mut(ino)?.kind {
            Kind::File(f) => Ok(f),
            Kind::Dir(_) => Err(libc::EISDIR),
        }
    }

    /// The path of `ino`'s object in the backing directory.
    fn obj_path(&self, ino: u64) -> PathBuf {
        // Bounded by the depth of the tree: every `In` parent is a directory
        // that is itself durable or staged.
        match &self.inodes[&ino].obj {
            Obj::Root => self.backing.clone(),
            Obj::Staged => self.staging.join(ino.to_string()),
            Obj::In { parent, name } => self.obj_path(*parent).join(name),
        }
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<u64> {
        self.dir(parent)?
            .entries
            .get(name)
            .copied()
            .ok_or(libc::ENOENT)
    }

    /// The current entries of a directory, in name order.
    pub fn entries(&self, dir: u64) -> Result<Vec<(OsString, u64, bool)>> {
        let d = self.dir(dir)?;
        Ok(d.entries
            .iter()
            .map(|(n, &i)| (n.clone(), i, self.inodes[&i].is_dir()))
            .collect())
    }

    pub fn parent_of(&self, ino: u64) -> Result<u64> {
        Ok(self.inode(ino)?.parent)
    }

    fn check_new_name(&self, parent: u64, name: &OsStr) -> Result<()> {
        if parent == ROOT_INO && name == STAGING_NAME {
            return Err(libc::EPERM);
        }
        if self.dir(parent)?.entries.contains_key(name) {
            return Err(libc::EEXIST);
        }
        Ok(())
    }

    fn new_inode(&mut self, kind: Kind, parent: u64, perm: u16, uid: u32, gid: u32) -> Inode {
        let now = SystemTime::now();
        let _ = self;
        Inode {
            kind,
            obj: Obj::Staged,
            parent,
            linked: true,
            open: 0,
            perm,
            uid,
            gid,
            atime: now,
            mtime: now,
            ctime: now,
        }
    }

    /// Creates a regular file with no durable name yet.
    pub fn create(
        &mut self,
        parent: u64,
        name: &OsStr,
        perm: u16,
        uid: u32,
        gid: u32,
    ) -> Result<u64> {
        self.check_new_name(parent, name)?;
        let ino = self.alloc_ino();
        let object = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(u32::from(perm))
            .open(self.staging.join(ino.to_string()))
            .map_err(io_errno)?;
        let kind = Kind::File(FileData {
            object,
            pages: BTreeMap::new(),
            size: 0,
            zero_from: None,
        });
        let inode = self.new_inode(kind, parent, perm, uid, gid);
        self.inodes.insert(ino, inode);
        self.dir_mut(parent)?.entries.insert(name.to_owned(), ino);
        Ok(ino)
    }

    /// Creates a directory with no durable name yet.
    pub fn mkdir(
        &mut self,
        parent: u64,
        name: &OsStr,
        perm: u16,
        uid: u32,
        gid: u32,
    ) -> Result<u64> {
        self.check_new_name(parent, name)?;
        let ino = self.alloc_ino();
        std::fs::create_dir(self.staging.join(ino.to_string())).map_err(io_errno)?;
        let kind = Kind::Dir(DirData {
            entries: BTreeMap::new(),
            durable: BTreeMap::new(),
        });
        let inode = self.new_inode(kind, parent, perm, uid, gid);
        self.inodes.insert(ino, inode);
        self.dir_mut(parent)?.entries.insert(name.to_owned(), ino);
        Ok(ino)
    }

    pub fn unlink(&mut self, parent: u64, name: &OsStr) -> Result<()> {
        let ino = self.lookup(parent, name)?;
        if self.inode(ino)?.is_dir() {
            return Err(libc::EISDIR);
        }
        self.detach(parent, name, ino)
    }

    pub fn rmdir(&mut self, parent: u64, name: &OsStr) -> Result<()> {
        let ino = self.lookup(parent, name)?;
        if !self.dir(ino)?.entries.is_empty() {
            return Err(libc::ENOTEMPTY);
        }
        self.detach(parent, name, ino)
    }

    fn detach(&mut self, parent: u64, name: &OsStr, ino: u64) -> Result<()> {
        self.dir_mut(parent)?.entries.remove(name);
        self.inode_mut(ino)?.linked = false;
        self.reap(ino);
        Ok(())
    }

    /// Forgets an inode nobody can reach: no current name, no open handle
    /// and no durable name (its object is in staging).
    fn reap(&mut self, ino: u64) {
        let Some(i) = self.inodes.get(&ino) else {
            return;
        };
        let durable_children = matches!(&i.kind, Kind::Dir(d) if !d.durable.is_empty());
        if i.linked || i.open > 0 || i.obj != Obj::Staged || durable_children {
            return;
        }
        let path = self.obj_path(ino);
        let is_dir = i.is_dir();
        self.inodes.remove(&ino);
        let _ = if is_dir {
            std::fs::remove_dir_all(path)
        } else {
            std::fs::remove_file(path)
        };
    }

    /// rename(2) in the current namespace only; durable on fsync of the
    /// directories.
    pub fn rename(
        &mut self,
        p: u64,
        n: &OsStr,
        np: u64,
        nn: &OsStr,
        noreplace: bool,
    ) -> Result<()> {
        let ino = self.lookup(p, n)?;
        if np == ROOT_INO && nn == STAGING_NAME {
            return Err(libc::EPERM);
        }
        self.dir(np)?;
        let is_dir = self.inode(ino)?.is_dir();
        if is_dir {
            // A directory must not move into its own subtree.
            let mut a = np;
            for _ in 0..4096 {
                if a == ino {
                    return Err(libc::EINVAL);
                }
                if a == ROOT_INO {
                    break;
                }
                a = self.inode(a)?.parent;
            }
        }
        if let Ok(target) = self.lookup(np, nn) {
            if target == ino {
                return Ok(());
            }
            if noreplace {
                return Err(libc::EEXIST);
            }
            match (is_dir, self.inode(target)?.is_dir()) {
                (true, false) => return Err(libc::ENOTDIR),
                (false, true) => return Err(libc::EISDIR),
                (true, true) if !self.dir(target)?.entries.is_empty() => {
                    return Err(libc::ENOTEMPTY)
                }
                _ => {}
            }
            self.detach(np, nn, target)?;
        }
        self.dir_mut(p)?.entries.remove(n);
        self.dir_mut(np)?.entries.insert(nn.to_owned(), ino);
        self.inode_mut(ino)?.parent = np;
        Ok(())
    }

    pub fn open(&mut self, ino: u64, truncate: bool) -> Result<u64> {
        self.file_mut(ino)?;
        if truncate {
            self.truncate(ino, 0)?;
        }
        self.inode_mut(ino)?.open += 1;
        let fh = self.next_fh;
        self.next_fh += 1;
        self.handles.insert(fh, ino);
        Ok(fh)
    }

    /// The inode of an open handle; EIO for a handle from before a crash.
    pub fn handle(&self, fh: u64) -> Result<u64> {
        self.handles.get(&fh).copied().ok_or(libc::EIO)
    }

    pub fn release(&mut self, fh: u64) {
        if let Some(ino) = self.handles.remove(&fh) {
            if let Some(i) = self.inodes.get_mut(&ino) {
                i.open = i.open.saturating_sub(1);
            }
            self.reap(ino);
        }
    }

    /// Bytes of all files' logical sizes (what a quota counts).
    pub fn used_bytes(&self) -> u64 {
        self.inodes
            .values()
            .map(|i| match &i.kind {
                Kind::File(f) => f.size,
                Kind::Dir(_) => 0,
            })
            .sum()
    }

    pub fn dirty_bytes(&self) -> u64 {
        self.inodes
            .values()
            .map(|i| match &i.kind {
                Kind::File(f) => f.pages.len() as u64 * PAGE_BYTES,
                Kind::Dir(_) => 0,
            })
            .sum()
    }

    pub fn stats(&self) -> ModelStats {
        ModelStats {
            dirty_bytes: self.dirty_bytes(),
            used_bytes: self.used_bytes(),
            inodes: self.inodes.len() as u64,
        }
    }

    /// Fails with ENOSPC if growing `ino` to `new_size` would pass `quota`.
    pub fn check_growth(&self, ino: u64, new_size: u64, quota: Option<u64>) -> Result<()> {
        let Some(quota) = quota else { return Ok(()) };
        let old = self.inode(ino)?.size();
        if new_size <= old {
            return Ok(());
        }
        if self.used_bytes() - old + new_size > quota {
            return Err(libc::ENOSPC);
        }
        Ok(())
    }

    pub fn read(&mut self, ino: u64, offset: u64, len: u32) -> Result<Vec<u8>> {
        let f = self.file_mut(ino)?;
        let end = (offset + u64::from(len)).min(f.size);
        let mut out = Vec::with_capacity(end.saturating_sub(offset) as usize);
        let mut at = offset;
        while at < end {
            let index = at / PAGE_BYTES;
            let in_page = (at % PAGE_BYTES) as usize;
            let n = ((PAGE_BYTES - in_page as u64).min(end - at)) as usize;
            match f.pages.get(&index) {
                Some(p) => out.extend_from_slice(&p.bytes[in_page..in_page + n]),
                None => {
                    let page = load_page(f, index).map_err(io_errno)?;
                    out.extend_from_slice(&page[in_page..in_page + n]);
                }
            }
            at += n as u64;
        }
        Ok(out)
    }

    pub fn write(&mut self, ino: u64, offset: u64, data: &[u8]) -> Result<u32> {
        let dirty = self.dirty_bytes();
        let f = self.file_mut(ino)?;
        if dirty + data.len() as u64 + PAGE_BYTES > DIRTY_BYTES_MAX {
            return Err(libc::ENOSPC);
        }
        let mut done = 0usize;
        while done < data.len() {
            let at = offset + done as u64;
            let index = at / PAGE_BYTES;
            let in_page = (at % PAGE_BYTES) as usize;
            let n = (PAGE_BYTES as usize - in_page).min(data.len() - done);
            if !f.pages.contains_key(&index) {
                let bytes = if n == PAGE_BYTES as usize {
                    vec![0; PAGE_BYTES as usize].into_boxed_slice()
                } else {
                    load_page(f, index).map_err(io_errno)?
                };
                f.pages.insert(index, Page { bytes, flush: true });
            }
            let p = f.pages.get_mut(&index).expect("page just inserted");
            p.bytes[in_page..in_page + n].copy_from_slice(&data[done..done + n]);
            p.flush = true;
            done += n;
        }
        f.size = f.size.max(offset + data.len() as u64);
        self.touch(ino);
        Ok(data.len() as u32)
    }

    fn touch(&mut self, ino: u64) {
        if let Some(i) = self.inodes.get_mut(&ino) {
            let now = SystemTime::now();
            i.mtime = now;
            i.ctime = now;
        }
    }

    pub fn truncate(&mut self, ino: u64, size: u64) -> Result<()> {
        let f = self.file_mut(ino)?;
        if size < f.size {
            let first_gone = size.div_ceil(PAGE_BYTES);
            f.pages.retain(|&index, _| index < first_gone);
            let tail = (size % PAGE_BYTES) as usize;
            if tail != 0 {
                if let Some(p) = f.pages.get_mut(&(size / PAGE_BYTES)) {
                    p.bytes[tail..].fill(0);
                }
            }
            f.zero_from = Some(f.zero_from.map_or(size, |z| z.min(size)));
        }
        f.size = size;
        self.touch(ino);
        Ok(())
    }

    /// fallocate(2) mode 0 (allocate, extending the size); KEEP_SIZE is
    /// accepted and does nothing. Other modes: EOPNOTSUPP.
    pub fn fallocate(&mut self, ino: u64, offset: u64, len: u64, mode: i32) -> Result<()> {
        let f = self.file_mut(ino)?;
        match mode {
            0 => {
                f.size = f.size.max(offset + len);
                Ok(())
            }
            libc::FALLOC_FL_KEEP_SIZE => Ok(()),
            _ => Err(libc::EOPNOTSUPP),
        }
    }

    /// fsync of a file: writes its dirty pages and size to its object.
    pub fn fsync_file(&mut self, ino: u64) -> Result<()> {
        let f = self.file_mut(ino)?;
        flush_file(f).map_err(io_errno)
    }

    /// A failed fsync of a file: its dirty pages are never written back.
    pub fn poison(&mut self, ino: u64) {
        if let Ok(f) = self.file_mut(ino) {
            for p in f.pages.values_mut() {
                p.flush = false;
            }
        }
    }

    pub fn setattr_meta(
        &mut self,
        ino: u64,
        perm: Option<u16>,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> Result<()> {
        let path = self.obj_path(ino);
        let i = self.inode_mut(ino)?;
        if let Some(p) = perm {
            i.perm = p;
            // Metadata other than size is passed through at once.
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(u32::from(p)));
        }
        if let Some(u) = uid {
            i.uid = u;
        }
        if let Some(g) = gid {
            i.gid = g;
        }
        i.ctime = SystemTime::now();
        Ok(())
    }

    pub fn set_times(
        &mut self,
        ino: u64,
        atime: Option<SystemTime>,
        mtime: Option<SystemTime>,
    ) -> Result<()> {
        let i = self.inode_mut(ino)?;
        if let Some(a) = atime {
            i.atime = a;
        }
        if let Some(m) = mtime {
            i.mtime = m;
        }
        Ok(())
    }

    /// fsync of a directory: makes its current entries durable.
    ///
    /// 1. Durable entries that are gone or point elsewhere now: their objects
    ///    move to staging (they vanish at the next crash unless named again).
    /// 2. Current entries that are not durable: their objects move here from
    ///    staging, or from their old durable directory (so an fsync of the
    ///    target directory of a rename also commits the removal from the
    ///    source directory, as a journaling filesystem would).
    pub fn fsync_dir(&mut self, ino: u64) -> Result<()> {
        let d = self.dir(ino)?;
        let current = d.entries.clone();
        let durable = d.durable.clone();
        let here = self.obj_path(ino);
        for (name, old) in &durable {
            if current.get(name) == Some(old) {
                continue;
            }
            let from = here.join(name);
            self.dir_mut(ino)?.durable.remove(name);
            if self.inodes.contains_key(old) {
                std::fs::rename(&from, self.staging.join(old.to_string())).map_err(io_errno)?;
                self.inode_mut(*old)?.obj = Obj::Staged;
                self.reap(*old);
            } else {
                let _ = std::fs::remove_dir_all(&from).or_else(|_| std::fs::remove_file(&from));
            }
        }
        for (name, new) in &current {
            if self.dir(ino)?.durable.get(name) == Some(new) {
                continue;
            }
            let from = self.obj_path(*new);
            if let Obj::In { parent, name: old } = self.inode(*new)?.obj.clone() {
                self.dir_mut(parent)?.durable.remove(&old);
            }
            std::fs::rename(&from, here.join(name)).map_err(|_| libc::EIO)?;
            self.inode_mut(*new)?.obj = Obj::In {
                parent: ino,
                name: name.clone(),
            };
            self.dir_mut(ino)?.durable.insert(name.clone(), *new);
        }
        Ok(())
    }

    /// The backing filesystem's statvfs, for statfs without a quota.
    pub fn backing(&self) -> &Path {
        &self.backing
    }
}

/// Reads page `index` as it logically is without the cache: the object's
/// bytes, zero past the object's end and past a pending truncation.
fn load_page(f: &FileData, index: u64) -> io::Result<Box<[u8]>> {
    let mut bytes = vec![0u8; PAGE_BYTES as usize].into_boxed_slice();
    let start = index * PAGE_BYTES;
    let mut done = 0usize;
    while done < bytes.len() {
        match f.object.read_at(&mut bytes[done..], start + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    if let Some(z) = f.zero_from {
        if z < start + PAGE_BYTES {
            let from = z.saturating_sub(start) as usize;
            bytes[from..].fill(0);
        }
    }
    Ok(bytes)
}

/// Writes the flushable dirty pages and the size of a file to its object.
fn flush_file(f: &mut FileData) -> io::Result<()> {
    if let Some(z) = f.zero_from.take() {
        if f.object.metadata()?.len() > z {
            f.object.set_len(z)?;
        }
    }
    let size = f.size;
    let mut kept = BTreeMap::new();
    for (index, page) in std::mem::take(&mut f.pages) {
        if !page.flush {
            kept.insert(index, page);
            continue;
        }
        let start = index * PAGE_BYTES;
        if start >= size {
            continue;
        }
        let n = (size - start).min(PAGE_BYTES) as usize;
        f.object.write_all_at(&page.bytes[..n], start)?;
    }
    f.pages = kept;
    if f.object.metadata()?.len() != size {
        f.object.set_len(size)?;
    }
    Ok(())
}
