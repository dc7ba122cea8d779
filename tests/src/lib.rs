//! Harness for end-to-end tests: a node made of a real `walld` process and a
//! real `stemed` process (split as in production: stemed connects to
//! walld's socket), on a temporary directory and free loopback ports.
//!
//! The binaries come from the workspace's target directory; the test command
//! builds them first (`cargo build --workspace --bins`).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a process may take to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The directory holding the workspace binaries (target/debug or
/// target/release, whichever built this test).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> -> target/<profile>
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps")
        .to_path_buf()
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.is_file(),
        "{} is missing: build the binaries first with `cargo build --workspace --bins`",
        p.display()
    );
    p
}

/// A seed for randomized tests: `STEMEDB_TEST_SEED` replays one, else the
/// clock. Printed so a failure can be replayed.
pub fn seed(test: &str) -> u64 {
    let seed = std::env::var("STEMEDB_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("{test}: seed {seed} (replay with STEMEDB_TEST_SEED={seed})");
    seed
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind an ephemeral port")
        .local_addr()
        .unwrap()
        .port()
}

#[derive(Clone, Debug)]
pub struct NodeOptions {
    /// Extra flags for walld.
    pub walld_args: Vec<String>,
    /// Extra environment for stemed (e.g. STEMEDB_WAL_GROUP_COMMIT_MAX_WAIT_MS).
    pub stemed_env: Vec<(String, String)>,
    /// Extra flags for stemed.
    pub stemed_args: Vec<String>,
    /// With TLS on admin HTTP: curl arguments (e.g. `--cacert`) used to
    /// probe `https://localhost:PORT/readyz` instead of plain HTTP.
    pub ready_curl: Option<Vec<String>>,
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions {
            // Tiny segments so that rotation and truncation run constantly.
            walld_args: vec!["--segment-bytes".into(), "262144".into()],
            stemed_env: Vec::new(),
            stemed_args: Vec::new(),
            ready_curl: None,
        }
    }
}

pub struct Node {
    pub dir: tempfile::TempDir,
    pub options: NodeOptions,
    walld: Option<Child>,
    stemed: Option<Child>,
    pub grpc_port: u16,
    pub admin_port: u16,
}

impl Node {
    pub async fn start() -> Node {
        Self::start_with(NodeOptions::default()).await
    }

    pub async fn start_with(options: NodeOptions) -> Node {
        let mut node = Node {
            dir: tempfile::tempdir().expect("tempdir"),
            options,
            walld: None,
            stemed: None,
            grpc_port: free_port(),
            admin_port: free_port(),
        };
        node.start_walld().await;
        node.start_stemed().await;
        node
    }

    pub fn wal_dir(&self) -> PathBuf {
        self.dir.path().join("wal")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("walld.sock")
    }

    pub fn grpc_addr(&self) -> String {
        format!("127.0.0.1:{}", self.grpc_port)
    }

    pub fn grpc_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc_port)
    }

    pub fn admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin_port)
    }

    pub async fn client(&self) -> stemedb_client::Client {
        stemedb_client::Client::connect(self.grpc_url())
            .await
            .expect("connect to stemed")
    }

    fn log(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{name}.log")))
            .expect("open log")
    }

    /// The captured stderr of walld and stemed, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for name in ["walld", "stemed"] {
            let text = std::fs::read_to_string(self.dir.path().join(format!("{name}.log")))
                .unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            out.push_str(&format!("--- {name}.log (last 40 lines) ---\n"));
            for l in tail.into_iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    pub async fn start_walld(&mut self) {
        assert!(self.walld.is_none(), "walld already running");
        let _ = std::fs::remove_file(self.socket());
        let mut cmd = Command::new(bin("walld"));
        cmd.arg("--dir")
            .arg(self.wal_dir())
            .arg("--socket")
            .arg(self.socket())
            .args(&self.options.walld_args);
        if nix::unistd::geteuid().is_root() {
            cmd.arg("--allow-root");
        }
        cmd.stdin(Stdio::null())
            .stdout(self.log("walld"))
            .stderr(self.log("walld"));
        self.walld = Some(cmd.spawn().expect("spawn walld"));
        let deadline = Instant::now() + READY_TIMEOUT;
        while std::os::unix::net::UnixStream::connect(self.socket()).is_err() {
            if let Some(status) = self.walld.as_mut().unwrap().try_wait().unwrap() {
                panic!("walld exited with {status} before serving\n{}", self.logs());
            }
            assert!(
                Instant::now() < deadline,
                "walld not ready\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn start_stemed(&mut self) {
        self.spawn_stemed();
        self.wait_ready().await;
    }

    /// Starts stemed and waits for `/healthz` only: for a node that is
    /// expected not to be ready (draining, say).
    pub async fn start_stemed_live(&mut self) {
        self.spawn_stemed();
        let deadline = Instant::now() + READY_TIMEOUT;
        while !matches!(http_get(self.admin_port, "/healthz"), Ok((200, _))) {
            assert!(
                Instant::now() < deadline,
                "stemed not live\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    fn spawn_stemed(&mut self) {
        assert!(self.stemed.is_none(), "stemed already running");
        let mut cmd = Command::new(bin("stemed"));
        cmd.arg("--data-dir")
            .arg(self.data_dir())
            .arg("--grpc-addr")
            .arg(self.grpc_addr())
            .arg("--admin-addr")
            .arg(format!("127.0.0.1:{}", self.admin_port))
            .arg("--wal-socket")
            .arg(self.socket())
            .args(&self.options.stemed_args)
            .envs(self.options.stemed_env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(self.log("stemed"))
            .stderr(self.log("stemed"));
        self.stemed = Some(cmd.spawn().expect("spawn stemed"));
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(c) = self.stemed.as_mut() {
                if let Some(status) = c.try_wait().unwrap() {
                    panic!("stemed exited with {status} before ready\n{}", self.logs());
                }
            }
            if self.probe_ready() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "stemed not ready: {}\n{}",
                self.probe_detail(),
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// What the readiness probe sees, for failure messages.
    fn probe_detail(&self) -> String {
        match &self.options.ready_curl {
            None => format!("{:?}", http_get(self.admin_port, "/readyz")),
            Some(args) => Command::new("curl")
                .arg("-sSv")
                .args(args)
                .arg(format!("https://localhost:{}/readyz", self.admin_port))
                .output()
                .map(|o| String::from_utf8_lossy(&o.stderr).to_string())
                .unwrap_or_else(|e| e.to_string()),
        }
    }

    fn probe_ready(&self) -> bool {
        match &self.options.ready_curl {
            None => matches!(http_get(self.admin_port, "/readyz"), Ok((200, _))),
            Some(args) => Command::new("curl")
                .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
                .args(args)
                .arg(format!("https://localhost:{}/readyz", self.admin_port))
                .output()
                .map(|o| o.stdout == b"200")
                .unwrap_or(false),
        }
    }

    pub fn kill_stemed(&mut self) {
        kill9(self.stemed.take());
    }

    pub fn kill_walld(&mut self) {
        kill9(self.walld.take());
    }

    pub fn stemed_pid(&self) -> Option<u32> {
        self.stemed.as_ref().map(|c| c.id())
    }

    pub fn walld_pid(&self) -> Option<u32> {
        self.walld.as_ref().map(|c| c.id())
    }

    /// SIGTERM a process and wait for it; returns its exit code.
    pub fn terminate_stemed(&mut self) -> Option<i32> {
        terminate(self.stemed.take())
    }

    pub fn terminate_walld(&mut self) -> Option<i32> {
        terminate(self.walld.take())
    }

    pub async fn restart_stemed(&mut self) {
        self.kill_stemed();
        self.start_stemed().await;
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        kill9(self.stemed.take());
        kill9(self.walld.take());
    }
}

fn kill9(child: Option<Child>) {
    if let Some(mut c) = child {
        let _ = c.kill();
        let _ = c.wait();
    }
}

fn terminate(child: Option<Child>) -> Option<i32> {
    let mut c = child?;
    let pid = nix::unistd::Pid::from_raw(c.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = c.try_wait().ok().flatten() {
            return status.code();
        }
        if Instant::now() > deadline {
            let _ = c.kill();
            let _ = c.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A size field of `/proc/<pid>/status` in bytes (`VmRSS`, `VmHWM`, ...);
/// `None` when the process is gone or has no such field.
pub fn proc_status_bytes(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.split(':').next() == Some(field))?;
    // "VmRSS:\t   12345 kB"
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The resident set size of a process, in bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    proc_status_bytes(pid, "VmRSS")
}

/// A minimal HTTP/1.1 GET against 127.0.0.1; returns (status, body).
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    http_request(port, "GET", path, None)
}

pub fn http_request(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    Ok(parse_http_response(&resp))
}

/// (status, body) of a raw HTTP/1.1 response; status 0 when there is no
/// status line.
pub fn parse_http_response(resp: &str) -> (u16, String) {
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}
