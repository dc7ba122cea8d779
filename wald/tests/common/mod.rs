//! Helpers for process tests: start a real walld on a temp dir, wait for
//! READY=1 on a notify socket, talk gRPC over its Unix socket.
#![allow(dead_code)]

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use stemedb_proto::wal::v1 as pb;
use stemedb_proto::wal::v1::wal_client::WalClient;
use tonic::transport::{Channel, Endpoint};

pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
pub const SEGMENT_BYTES: &str = "65536";

pub type Client = WalClient<Channel>;

/// A walld child process with its own directory.
pub struct Walld {
    pub child: Option<Child>,
    pub root: PathBuf,
    pub socket: PathBuf,
    pub dir: PathBuf,
    pub stderr: PathBuf,
    notify: UnixDatagram,
    notify_path: PathBuf,
    starts: u32,
}

/// The test seed: STEMEDB_TEST_SEED or the time. Printed so a run can be replayed.
pub fn seed() -> u64 {
    let seed = std::env::var("STEMEDB_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("STEMEDB_TEST_SEED={seed}");
    seed
}

impl Walld {
    /// A walld layout under `root` (not started).
    pub fn new(root: &Path) -> Walld {
        let notify_path = root.join("notify.sock");
        let _ = std::fs::remove_file(&notify_path);
        let notify = UnixDatagram::bind(&notify_path).unwrap();
        Walld {
            child: None,
            root: root.to_path_buf(),
            socket: root.join("walld.sock"),
            dir: root.join("wal"),
            stderr: root.join("stderr.log"),
            notify,
            notify_path,
            starts: 0,
        }
    }

    /// The command line used for every start, before extra arguments.
    pub fn command(&self, extra: &[&str], env: &[(&str, &str)]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_walld"));
        cmd.arg("--dir")
            .arg(&self.dir)
            .arg("--socket")
            .arg(&self.socket);
        cmd.args(["--allow-root", "--segment-bytes", SEGMENT_BYTES]);
        cmd.args(extra);
        self.prepare_env(&mut cmd, env);
        cmd
    }

    pub fn prepare_env(&self, cmd: &mut Command, env: &[(&str, &str)]) {
        cmd.env_remove("FAILPOINTS")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID");
        cmd.env("NOTIFY_SOCKET", &self.notify_path);
        cmd.env("STEMEDB_WALLD_LOG", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr)
            .unwrap();
        cmd.stdout(Stdio::null()).stderr(Stdio::from(log));
    }

    /// Starts walld and waits for READY=1.
    pub fn start(&mut self, extra: &[&str], env: &[(&str, &str)]) {
        let cmd = self.command(extra, env);
        self.spawn(cmd);
    }

    pub fn spawn(&mut self, cmd: Command) {
        self.spawn_unready(cmd);
        self.wait_ready();
    }

    pub fn spawn_unready(&mut self, mut cmd: Command) {
        assert!(self.child.is_none());
        self.starts += 1;
        self.child = Some(cmd.spawn().expect("spawn walld"));
    }

    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        self.notify
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.notify.recv(&mut buf) {
                if String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .any(|l| l == "READY=1")
                {
                    return;
                }
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("walld exited before READY=1 with {status}:\n{}", self.log());
            }
        }
        panic!("walld not ready after {READY_TIMEOUT:?}:\n{}", self.log());
    }

    /// Waits for one sd_notify line (e.g. "WATCHDOG=1") on the notify socket.
    pub fn wait_notify(&self, line: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        self.notify
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.notify.recv(&mut buf) {
                if String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .any(|l| l == line)
                {
                    return true;
                }
            }
        }
        false
    }

    /// Everything walld wrote to stderr so far, without ANSI colour codes.
    pub fn log(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.stderr).unwrap_or_default())
    }

    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.as_ref().unwrap().id() as i32)
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(self.pid(), signal).unwrap();
    }

    pub fn kill9(&mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Waits for the process to exit (bounded).
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("walld did not exit within {timeout:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn stop(&mut self) -> ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        self.wait_exit(Duration::from_secs(20))
    }

    pub async fn client(&self) -> Client {
        connect(&self.socket).await
    }
}

impl Drop for Walld {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A gRPC client over the Unix socket at `path`.
pub async fn connect(path: &Path) -> Client {
    let path = path.to_path_buf();
    let channel = Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: tonic::codegen::http::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .expect("connect to walld");
    WalClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

pub async fn open_writer(client: &mut Client, id: &str) -> u64 {
    client
        .open_writer(pb::OpenWriterRequest {
            writer_id: id.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .epoch
}

pub async fn append(
    client: &mut Client,
    epoch: u64,
    records: Vec<Vec<u8>>,
) -> Result<pb::AppendResponse, tonic::Status> {
    client
        .append(pb::AppendRequest {
            epoch,
            records,
            no_sync: false,
        })
        .await
        .map(|r| r.into_inner())
}

/// Every durable record from `from_lsn` (no follow).
pub async fn read_all(
    client: &mut Client,
    from_lsn: u64,
) -> Result<Vec<(u64, Vec<u8>)>, tonic::Status> {
    let mut stream = client
        .read(pb::ReadRequest {
            from_lsn,
            follow: false,
            max_bytes_per_message: 0,
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(message) = stream.message().await? {
        out.extend(message.records.into_iter().map(|r| (r.lsn, r.data)));
    }
    Ok(out)
}

pub async fn status(client: &mut Client) -> pb::StatusResponse {
    client
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// Checks that `records` is dense from `first` and holds every acked record unchanged.
pub fn check_acked(
    records: &[(u64, Vec<u8>)],
    first: u64,
    acked: &std::collections::BTreeMap<u64, Vec<u8>>,
) {
    for (i, (lsn, _)) in records.iter().enumerate() {
        assert_eq!(*lsn, first + i as u64, "LSNs must be dense and in order");
    }
    for (lsn, data) in acked {
        let index = (lsn - first) as usize;
        let Some((got_lsn, got)) = records.get(index) else {
            panic!(
                "acknowledged LSN {lsn} is missing (log ends at {})",
                first + records.len() as u64 - 1
            );
        };
        assert_eq!(got_lsn, lsn);
        assert!(got == data, "acknowledged LSN {lsn} changed");
    }
}

/// Removes ANSI escape sequences (`ESC [ ... letter`) from log text.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        for d in chars.by_ref() {
            if d.is_ascii_alphabetic() {
                break;
            }
        }
    }
    out
}
