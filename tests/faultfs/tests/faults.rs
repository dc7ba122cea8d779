//! Self-tests: each fault does what README.md says, on a real FUSE mount.
//! Without FUSE these fail loudly (Mount::new panics); they never skip.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

struct Fixture {
    // Field order: the mount is dropped (unmounted) before the directory.
    mount: faultfs::Mount,
    _dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let mount = faultfs::Mount::new(&dir.path().join("backing"), &dir.path().join("mnt"));
        Fixture { mount, _dir: dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.mount.mountpoint().join(name)
    }

    fn fsync_dir(&self, name: &str) {
        File::open(self.path(name)).unwrap().sync_all().unwrap();
    }
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

fn write_synced(p: &Path, bytes: &[u8]) -> File {
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(p)
        .unwrap();
    f.write_all(bytes).unwrap();
    f.sync_all().unwrap();
    f
}

#[test]
fn crash_drops_unsynced_data_and_keeps_synced_data() {
    let fx = Fixture::new();
    let p = fx.path("f");
    let f = write_synced(&p, &[b'a'; 10_000]);
    fx.fsync_dir("");
    // Overwrite the middle and append, across page boundaries, unsynced.
    f.write_all_at(&[b'b'; 5000], 3000).unwrap();
    f.write_all_at(b"tail", 10_000).unwrap();
    let mut expected_now = vec![b'a'; 10_000];
    expected_now[3000..8000].fill(b'b');
    expected_now.extend_from_slice(b"tail");
    assert_eq!(
        read(&p),
        expected_now,
        "unsynced writes are visible before the crash"
    );
    fx.mount.crash();
    assert_eq!(
        read(&p),
        vec![b'a'; 10_000],
        "only the synced content survives"
    );
    // The handle opened before the crash belongs to a dead process.
    let e = f.write_all_at(b"x", 0).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "stale handle: {e}");
    let s = fx.mount.stats();
    assert_eq!(s.crashes, 1);
    assert_eq!(s.crash_lost_bytes, 3 * 4096, "pages 0..=2 were dirty: {s}");
}

#[test]
fn fdatasync_makes_data_durable_part_by_part() {
    let fx = Fixture::new();
    let p = fx.path("log");
    let f = write_synced(&p, b"");
    fx.fsync_dir("");
    let mut durable = Vec::new();
    for i in 0..20u8 {
        let rec = vec![i; 1000 + i as usize * 37];
        f.write_all_at(&rec, durable.len() as u64).unwrap();
        if i % 3 != 2 {
            f.sync_data().unwrap();
            durable.extend_from_slice(&rec);
        } else {
            break;
        }
    }
    fx.mount.crash();
    assert_eq!(read(&p), durable);
}

#[test]
fn new_file_disappears_unless_its_directory_is_fsynced() {
    let fx = Fixture::new();
    std::fs::create_dir(fx.path("d")).unwrap();
    std::fs::create_dir(fx.path("e")).unwrap();
    fx.fsync_dir("");
    // File fsynced, directory not: gone after the crash.
    write_synced(&fx.path("e/lost"), b"data");
    // File and directory fsynced: survives.
    write_synced(&fx.path("d/kept"), b"data");
    fx.fsync_dir("d");
    write_synced(&fx.path("d/late"), b"data");
    // A directory created but its parent not fsynced: gone, with its content.
    std::fs::create_dir(fx.path("gone")).unwrap();
    write_synced(&fx.path("gone/x"), b"x");
    fx.fsync_dir("gone");
    fx.mount.crash();
    assert!(
        !fx.path("e/lost").exists(),
        "the entry was never made durable"
    );
    assert!(!fx.path("d/late").exists());
    assert_eq!(read(&fx.path("d/kept")), b"data");
    assert!(!fx.path("gone").exists());
    let names: Vec<_> = std::fs::read_dir(fx.path("d"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec!["kept"]);
}

#[test]
fn rename_and_unlink_revert_without_fsync_of_the_directory() {
    let fx = Fixture::new();
    write_synced(&fx.path("a"), b"old");
    write_synced(&fx.path("victim"), b"v");
    fx.fsync_dir("");
    // tmp -> rename over a, without fsync of the directory.
    write_synced(&fx.path("tmp"), b"new");
    std::fs::rename(fx.path("tmp"), fx.path("a")).unwrap();
    std::fs::remove_file(fx.path("victim")).unwrap();
    assert_eq!(read(&fx.path("a")), b"new");
    fx.mount.crash();
    assert_eq!(read(&fx.path("a")), b"old", "the rename was not durable");
    assert_eq!(read(&fx.path("victim")), b"v", "the unlink was not durable");
    assert!(!fx.path("tmp").exists());
    // The same with fsync of the directory: durable.
    write_synced(&fx.path("tmp"), b"new");
    std::fs::rename(fx.path("tmp"), fx.path("a")).unwrap();
    std::fs::remove_file(fx.path("victim")).unwrap();
    fx.fsync_dir("");
    fx.mount.crash();
    assert_eq!(read(&fx.path("a")), b"new");
    assert!(!fx.path("victim").exists());
    assert!(!fx.path("tmp").exists());
}

#[test]
fn rename_between_directories_is_durable_with_the_target_fsync() {
    let fx = Fixture::new();
    std::fs::create_dir(fx.path("src")).unwrap();
    std::fs::create_dir(fx.path("dst")).unwrap();
    fx.fsync_dir("");
    write_synced(&fx.path("src/f"), b"f");
    fx.fsync_dir("src");
    std::fs::rename(fx.path("src/f"), fx.path("dst/g")).unwrap();
    fx.fsync_dir("dst");
    fx.mount.crash();
    assert_eq!(read(&fx.path("dst/g")), b"f");
    assert!(!fx.path("src/f").exists(), "the file is in one place only");
}

#[test]
fn truncate_and_fallocate_are_durable_only_after_fsync() {
    let fx = Fixture::new();
    let p = fx.path("t");
    let f = write_synced(&p, &[7u8; 9000]);
    fx.fsync_dir("");
    f.set_len(100).unwrap();
    f.set_len(5000).unwrap();
    let mut now = vec![7u8; 100];
    now.resize(5000, 0);
    assert_eq!(read(&p), now, "bytes past a truncation read as zero");
    fx.mount.crash();
    assert_eq!(read(&p), vec![7u8; 9000]);
    let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    f.set_len(100).unwrap();
    f.set_len(5000).unwrap();
    f.sync_all().unwrap();
    fx.mount.crash();
    assert_eq!(read(&p), now);
    // fallocate mode 0 extends the size (walld preallocates segments).
    let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    // SAFETY: valid fd for the duration of the call.
    let rc = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, 65536) };
    assert_eq!(rc, 0, "fallocate: {}", std::io::Error::last_os_error());
    assert_eq!(f.metadata().unwrap().len(), 65536);
    // SAFETY: as above.
    let rc = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            10,
        )
    };
    assert_eq!(rc, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EOPNOTSUPP)
    );
    fx.mount.crash();
    assert_eq!(
        std::fs::metadata(&p).unwrap().len(),
        5000,
        "the preallocation was not fsynced"
    );
}

#[test]
fn fail_fsync_returns_eio_exactly_n_times() {
    let fx = Fixture::new();
    let p = fx.path("f");
    let f = write_synced(&p, b"durable");
    fx.fsync_dir("");
    fx.mount.fail_fsync(3);
    let mut results = Vec::new();
    for i in 0..6u8 {
        f.write_all_at(&[b'0' + i], 7 + u64::from(i)).unwrap();
        results.push(f.sync_data().map_err(|e| e.raw_os_error()));
    }
    let eio = Err(Some(libc::EIO));
    assert_eq!(results, vec![eio, eio, eio, Ok(()), Ok(()), Ok(())]);
    let s = fx.mount.stats();
    assert_eq!((s.fsync_failures, s.fail_fsync_armed), (3, 0), "{s}");
    // Directory fsyncs count too.
    fx.mount.fail_fsync(1);
    let e = File::open(fx.mount.mountpoint())
        .unwrap()
        .sync_all()
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
    fx.fsync_dir("");
}

#[test]
fn data_of_a_failed_fsync_is_not_made_durable_by_a_retry() {
    // fsyncgate: after a writeback error Linux marks the pages clean, so a
    // retried fsync succeeds without writing them. faultfs does the same.
    let fx = Fixture::new();
    let p = fx.path("f");
    let f = write_synced(&p, b"durable|");
    fx.fsync_dir("");
    f.write_all_at(b"lost", 8).unwrap();
    fx.mount.fail_fsync(1);
    assert!(f.sync_data().is_err());
    f.sync_data().expect("the retry reports success");
    assert_eq!(read(&p), b"durable|lost", "still readable before the crash");
    fx.mount.crash();
    let got = read(&p);
    assert_ne!(&got[..], b"durable|lost", "the retry made nothing durable");
    assert_eq!(&got[..8], b"durable|");
}

#[test]
fn quota_gives_enospc_and_statfs_reports_it() {
    let fx = Fixture::new();
    let p = fx.path("big");
    let f = write_synced(&p, &[1u8; 40_000]);
    fx.mount.quota(Some(65_536));
    let vfs = nix_statvfs(fx.mount.mountpoint());
    assert_eq!(vfs.0 * vfs.2, 65_536, "total bytes");
    assert_eq!(vfs.1 * vfs.2, (65_536 - 40_000) / 4096 * 4096, "free bytes");
    // Writes inside the current size still work (preallocated space).
    f.write_all_at(&[2u8; 1000], 0).unwrap();
    let e = f.write_all_at(&[3u8; 30_000], 40_000).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
    let e = f.set_len(1 << 20).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
    let mut g = File::create(fx.path("other")).unwrap();
    let e = g.write_all(&[0u8; 30_000]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::StorageFull, "{e}");
    assert!(fx.mount.stats().enospc >= 3);
    fx.mount.quota(None);
    f.write_all_at(&[3u8; 30_000], 40_000).unwrap();
    g.write_all(&[0u8; 30_000]).unwrap();
}

fn nix_statvfs(p: &Path) -> (u64, u64, u64) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: zeroed statvfs is a valid out-parameter; c is NUL-terminated.
    let mut v: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut v) };
    assert_eq!(rc, 0);
    (v.f_blocks, v.f_bavail, v.f_frsize)
}

#[test]
fn delay_fsync_is_measurable_and_does_not_block_other_io() {
    let fx = Fixture::new();
    let p = fx.path("slow");
    let f = write_synced(&p, b"x");
    fx.mount.delay_fsync(150);
    let started = Instant::now();
    f.sync_data().unwrap();
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(150), "fsync took {took:?}");
    assert!(took < Duration::from_secs(5), "fsync took {took:?}");
    // While one fsync sleeps, other operations go on.
    let p2 = p.clone();
    let t = std::thread::spawn(move || {
        let f = OpenOptions::new().write(true).open(p2).unwrap();
        f.sync_data().unwrap();
    });
    std::thread::sleep(Duration::from_millis(30));
    let started = Instant::now();
    let mut buf = Vec::new();
    File::open(&p).unwrap().read_to_end(&mut buf).unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "a read waited for the fsync"
    );
    t.join().unwrap();
    fx.mount.delay_fsync(0);
    let started = Instant::now();
    f.sync_data().unwrap();
    assert!(started.elapsed() < Duration::from_millis(100));
}

#[test]
fn control_protocol_over_the_socket() {
    use std::io::{BufRead, BufReader};
    let fx = Fixture::new();
    let sock = fx._dir.path().join("ctl.sock");
    fx.mount.control().serve(&sock).unwrap();
    let s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    let mut out = s.try_clone().unwrap();
    let mut lines = BufReader::new(s).lines();
    let mut ask = |cmd: &str| {
        writeln!(out, "{cmd}").unwrap();
        lines.next().unwrap().unwrap()
    };
    assert_eq!(ask("fail-fsync 2"), "ok");
    assert!(ask("stats").contains("fail_fsync_armed=2"));
    assert_eq!(ask("quota 4096"), "ok");
    assert_eq!(ask("quota off"), "ok");
    assert_eq!(ask("delay-fsync 0"), "ok");
    std::fs::write(fx.path("gone"), b"x").unwrap();
    assert_eq!(ask("crash"), "ok");
    assert!(!fx.path("gone").exists());
    assert!(ask("bogus").starts_with("err "));
    assert!(ask("quota lots").starts_with("err "));
}

#[test]
fn model_check_random_operations_against_crashes() {
    // A randomized check against a model of the filesystem with inode
    // identity: a name points to an inode; fsync of a file makes its
    // inode's content durable; fsync of the directory makes the name ->
    // inode map durable. After each crash the mount must show exactly the
    // durable names with their inodes' durable content.
    use std::collections::BTreeMap;
    let seed = std::env::var("STEMEDB_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_u64);
    eprintln!("model_check: seed {seed} (replay with STEMEDB_TEST_SEED={seed})");
    let mut rng = seed.max(1);
    let mut next = move |n: u64| {
        // xorshift64*: deterministic, no dependency.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    };
    let fx = Fixture::new();
    let names = ["a", "b", "c", "d"];
    let mut next_inode = 0u64;
    // name -> inode now; inode -> content now; inode -> content as of its
    // last fsync; name -> inode as of the last directory fsync.
    let mut names_now: BTreeMap<&str, u64> = BTreeMap::new();
    let mut content: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut synced: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut names_durable: BTreeMap<&str, u64> = BTreeMap::new();
    let mut crashes = 0;
    for step in 0..600 {
        let name = names[next(names.len() as u64) as usize];
        let p = fx.path(name);
        let ino = names_now.get(name).copied();
        match (next(7), ino) {
            (0 | 6, _) => {
                let ino = ino.unwrap_or_else(|| {
                    next_inode += 1;
                    names_now.insert(name, next_inode);
                    content.insert(next_inode, Vec::new());
                    next_inode
                });
                let v = content.get_mut(&ino).unwrap();
                let len = next(9000) as usize;
                let off = next(v.len() as u64 + 1) as usize;
                let byte = (step % 251) as u8;
                let f = OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&p)
                    .unwrap();
                f.write_all_at(&vec![byte; len], off as u64).unwrap();
                if v.len() < off + len {
                    v.resize(off + len, 0);
                }
                v[off..off + len].fill(byte);
            }
            (1, Some(ino)) => {
                File::options()
                    .write(true)
                    .open(&p)
                    .unwrap()
                    .sync_all()
                    .unwrap();
                synced.insert(ino, content[&ino].clone());
            }
            (2, _) => {
                fx.fsync_dir("");
                names_durable = names_now.clone();
            }
            (3, Some(_)) => {
                std::fs::remove_file(&p).unwrap();
                names_now.remove(name);
            }
            (4, Some(ino)) if next(3) == 0 => {
                let v = content.get_mut(&ino).unwrap();
                let len = next(v.len() as u64 + 1);
                File::options()
                    .write(true)
                    .open(&p)
                    .unwrap()
                    .set_len(len)
                    .unwrap();
                v.truncate(len as usize);
            }
            (5, _) if next(8) == 0 => {
                fx.mount.crash();
                crashes += 1;
                names_now = names_durable.clone();
                content = names_now
                    .values()
                    .map(|i| (*i, synced.get(i).cloned().unwrap_or_default()))
                    .collect();
                synced = content.clone();
                for n in names {
                    let got = std::fs::read(fx.path(n)).ok();
                    let want = names_now.get(n).map(|i| &content[i]);
                    assert_eq!(
                        got.as_ref(),
                        want,
                        "step {step}: {n} after crash (seed {seed})"
                    );
                }
            }
            _ => {}
        }
    }
    assert!(crashes >= 3, "only {crashes} crashes (seed {seed})");
}
