//! `faultfs BACKING MOUNTPOINT CONTROL_SOCKET`: mounts faultfs and serves
//! the control protocol (README.md) until SIGINT or SIGTERM, then unmounts.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn main() {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [backing, mountpoint, socket] = args.as_slice() else {
        eprintln!("usage: faultfs BACKING MOUNTPOINT CONTROL_SOCKET");
        std::process::exit(2);
    };
    let mount = match faultfs::Mount::try_new(backing, mountpoint) {
        Ok(m) => m,
        Err(e) => {
            eprintln!(
                "faultfs: cannot mount {}: {e} (FUSE needs /dev/fuse and fusermount3: apt-get install fuse3)",
                mountpoint.display()
            );
            std::process::exit(1);
        }
    };
    if let Err(e) = mount.control().serve(socket) {
        eprintln!("faultfs: cannot serve {}: {e}", socket.display());
        std::process::exit(1);
    }
    // SAFETY: the handler only stores to an atomic, which is signal-safe.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGTERM,
            on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
    eprintln!(
        "faultfs: {} mounted over {}, control socket {}",
        mount.mountpoint().display(),
        backing.display(),
        socket.display()
    );
    while !STOP.load(Ordering::SeqCst) {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = std::fs::remove_file(socket);
    drop(mount);
}
