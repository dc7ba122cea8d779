//! Everything in `deploy/`, tested rather than just written: the systemd
//! units (`systemd-analyze verify` and `security`), socket activation of
//! walld and stemed as the units do it, `install.sh` in a throwaway root,
//! failover on drain behind a real nginx, and the envoy config's structure.
//!
//! Needs `systemd` (systemd-analyze, systemd-socket-activate) and `nginx`
//! from Debian; the test command installs them when missing.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use stemedb_client::{Assertion, ClientOptions};
use stemedb_tests::{bin, free_port, http_get, Node, NodeOptions, READY_TIMEOUT};

/// The repository root (tests/ is one level below it).
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the repository")
        .to_path_buf()
}

fn deploy(path: &str) -> PathBuf {
    repo().join("deploy").join(path)
}

/// The unit files of deploy/systemd, sorted.
fn units() -> Vec<PathBuf> {
    let mut units: Vec<PathBuf> = std::fs::read_dir(deploy("systemd"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("service" | "socket" | "timer")
            )
        })
        .collect();
    units.sort();
    units
}

/// A copy of the units in which only the binaries' directory differs:
/// `/usr/local/bin/` becomes a directory of links to the built binaries,
/// because `systemd-analyze verify` checks that ExecStart= is executable.
fn units_with_built_binaries() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let bin_dir = dir.path().join("bin");
    std::fs::create_dir(&bin_dir).unwrap();
    for b in ["walld", "stemed", "stemectl"] {
        std::os::unix::fs::symlink(bin(b), bin_dir.join(b)).unwrap();
    }
    for unit in units() {
        let text = std::fs::read_to_string(&unit).unwrap();
        let text = text.replace("/usr/local/bin/", &format!("{}/", bin_dir.display()));
        std::fs::write(dir.path().join(unit.file_name().unwrap()), text).unwrap();
    }
    dir
}

#[test]
fn units_verify_without_warnings_and_services_score_at_most_3() {
    let names: Vec<String> = units()
        .iter()
        .map(|u| u.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for required in [
        "stemedb-walld.socket",
        "stemedb-walld.service",
        "stemedb-api.service",
        "stemedb-api.socket",
        "stemedb-backup.service",
        "stemedb-backup.timer",
        "stemedb-wal-archive.service",
        "stemedb-wal-archive.timer",
        "stemedb-verify.service",
        "stemedb-verify.timer",
    ] {
        assert!(names.iter().any(|n| n == required), "{required} is missing");
    }
    let dir = units_with_built_binaries();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&names)
        .current_dir(dir.path())
        .output()
        .expect("run systemd-analyze (apt-get install systemd)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {}\n{stderr}",
        out.status
    );

    let doc = std::fs::read_to_string(repo().join("docs/operations/deployment.md")).unwrap();
    for name in names.iter().filter(|n| n.ends_with(".service")) {
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=true"])
            .arg(format!("./{name}"))
            .current_dir(dir.path())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.trim().is_empty(),
            "{name}: {stderr}"
        );
        let score: f64 = stdout
            .lines()
            .find_map(|l| l.split_once(&format!("exposure level for {name}: ")))
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{name}: no exposure level in\n{stdout}"));
        eprintln!("{name}: exposure {score:.1}");
        assert!(score <= 3.0, "{name}: exposure {score} above 3.0\n{stdout}");
        let row = format!("| `{name}` | {score:.1} |");
        assert!(
            doc.contains(&row),
            "docs/operations/deployment.md must record {row}"
        );
    }
}

/// A process started by `systemd-socket-activate`, killed on drop.
struct Activated {
    child: Child,
    log: PathBuf,
}

impl Activated {
    fn spawn(
        listen: &[String],
        env: &[(&str, String)],
        program: &Path,
        args: &[String],
        log: PathBuf,
    ) -> Activated {
        let mut cmd = Command::new("systemd-socket-activate");
        for l in listen {
            cmd.arg(format!("--listen={l}"));
        }
        for (k, v) in env {
            cmd.arg(format!("--setenv={k}={v}"));
        }
        let file = std::fs::File::create(&log).unwrap();
        cmd.arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        Activated {
            child: cmd
                .spawn()
                .expect("run systemd-socket-activate (apt-get install systemd)"),
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Activated {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads notify datagrams until one contains `state` (e.g. `READY=1`).
fn wait_notify(socket: &UnixDatagram, state: &str, what: &Activated) -> String {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match socket.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                seen.push_str(&msg);
                seen.push('|');
                if msg.lines().any(|l| l == state) {
                    return seen;
                }
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("notify socket: {e}"),
        }
    }
    panic!(
        "no {state} on the notify socket (got {seen:?})\n{}",
        what.log()
    );
}

fn notify_socket(path: &Path) -> UnixDatagram {
    let s = UnixDatagram::bind(path).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    s
}

#[tokio::test]
async fn walld_and_stemed_run_socket_activated_like_the_units() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // walld: one Unix socket (stemedb-walld.socket), Type=notify with a
    // watchdog (WatchdogSec=), its example config.
    let wal_socket = d.join("walld.sock");
    let walld_notify = notify_socket(&d.join("walld.notify"));
    let mut walld_args = vec![
        "--config".to_string(),
        deploy("config/walld.toml").display().to_string(),
        "--dir".into(),
        d.join("wal").display().to_string(),
    ];
    if nix::unistd::geteuid().is_root() {
        walld_args.push("--allow-root".into());
    }
    let walld = Activated::spawn(
        &[wal_socket.display().to_string()],
        &[
            (
                "NOTIFY_SOCKET",
                d.join("walld.notify").display().to_string(),
            ),
            ("WATCHDOG_USEC", "2000000".into()),
        ],
        &bin("walld"),
        &walld_args,
        d.join("walld.log"),
    );
    // systemd-socket-activate starts the program on the first connection.
    let deadline = Instant::now() + READY_TIMEOUT;
    let _first = loop {
        match std::os::unix::net::UnixStream::connect(&wal_socket) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("walld socket: {e}\n{}", walld.log()),
        }
    };
    wait_notify(&walld_notify, "READY=1", &walld);
    wait_notify(&walld_notify, "WATCHDOG=1", &walld);

    // stemed: two TCP sockets in the order of stemedb-api.socket (gRPC,
    // then admin), its example config. The configured addresses must be
    // ignored in favour of the passed sockets.
    let (grpc, admin, lb, unused) = (free_port(), free_port(), free_port(), free_port());
    let stemed_notify = notify_socket(&d.join("stemed.notify"));
    let stemed = Activated::spawn(
        &[format!("127.0.0.1:{grpc}"), format!("127.0.0.1:{admin}")],
        &[
            (
                "NOTIFY_SOCKET",
                d.join("stemed.notify").display().to_string(),
            ),
            ("STEMEDB_SERVER_GRPC_ADDR", format!("127.0.0.1:{unused}")),
            ("STEMEDB_SERVER_ADMIN_ADDR", format!("127.0.0.1:{unused}")),
            ("STEMEDB_SERVER_LB_GRPC_ADDR", format!("127.0.0.1:{lb}")),
            ("STEMEDB_TELEMETRY_LOG_FORMAT", "text".into()),
        ],
        &bin("stemed"),
        &[
            "--config".into(),
            deploy("config/api.toml").display().to_string(),
            "--data-dir".into(),
            d.join("data").display().to_string(),
            "--wal-socket".into(),
            wal_socket.display().to_string(),
        ],
        d.join("stemed.log"),
    );
    let deadline = Instant::now() + READY_TIMEOUT;
    let _first = loop {
        match std::net::TcpStream::connect(("127.0.0.1", admin)) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("stemed admin socket: {e}\n{}", stemed.log()),
        }
    };
    wait_notify(&stemed_notify, "READY=1", &stemed);
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", unused)).is_err(),
        "stemed bound server.grpc_addr although systemd passed its sockets"
    );
    assert_eq!(
        http_get(admin, "/readyz").unwrap().0,
        200,
        "{}",
        stemed.log()
    );

    // A write end to end through the passed gRPC socket, and the same fact
    // read back through the load-balancer listener.
    let c = stemedb_client::Client::connect(format!("http://127.0.0.1:{grpc}"))
        .await
        .unwrap();
    let receipt = c
        .transact(vec![
            Assertion::assert("activated", "ok", true).source("deploy")
        ])
        .await
        .unwrap_or_else(|e| panic!("write: {e}\n{}\n{}", stemed.log(), walld.log()));
    let lb_client = stemedb_client::Client::connect(format!("http://127.0.0.1:{lb}"))
        .await
        .unwrap();
    let view = lb_client.get("activated", None).await.unwrap();
    assert_eq!(view.facts[0].tx, receipt.tx);

    // A socket unit with one ListenStream= line instead of two: stemed
    // refuses to guess which socket is which and exits naming the layout.
    let (only, lb2) = (free_port(), free_port());
    let mut wrong = Activated::spawn(
        &[format!("127.0.0.1:{only}")],
        &[("STEMEDB_SERVER_LB_GRPC_ADDR", format!("127.0.0.1:{lb2}"))],
        &bin("stemed"),
        &[
            "--config".into(),
            deploy("config/api.toml").display().to_string(),
            "--data-dir".into(),
            d.join("data-wrong").display().to_string(),
            "--wal-socket".into(),
            wal_socket.display().to_string(),
        ],
        d.join("stemed-wrong.log"),
    );
    let deadline = Instant::now() + READY_TIMEOUT;
    // Connects until systemd-socket-activate listens; the first one starts
    // stemed.
    while std::net::TcpStream::connect(("127.0.0.1", only)).is_err() {
        assert!(Instant::now() < deadline, "no socket\n{}", wrong.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = loop {
        if let Some(status) = wrong.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "stemed ran with one passed socket\n{}",
            wrong.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success(), "{}", wrong.log());
    assert!(wrong.log().contains("needs exactly two"), "{}", wrong.log());
}

/// Every path under `root` with its type, owner, mode, size, mtime and
/// content: equal snapshots mean that nothing changed.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
        let mut line = format!(
            "{:o} {}:{} {} {}.{}",
            m.mode(),
            m.uid(),
            m.gid(),
            m.len(),
            m.mtime(),
            m.mtime_nsec()
        );
        if m.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        } else if m.is_file() && m.len() < 1 << 20 {
            line.push_str(&format!(" {:?}", std::fs::read(&p).unwrap()));
        }
        out.insert(p.strip_prefix(root).unwrap().to_path_buf(), line);
    }
    out
}

fn run_install(root: &Path) -> String {
    let out = Command::new("sh")
        .arg(deploy("install.sh"))
        .env("DESTDIR", root)
        .env("BIN_SRC", stemedb_tests::bin_dir())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "install.sh failed:\n{text}");
    text
}

fn id_in(root: &Path, file: &str, name: &str) -> u32 {
    let text = std::fs::read_to_string(root.join("etc").join(file)).unwrap();
    text.lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f[0] == name).then(|| f[2].parse().unwrap())
        })
        .unwrap_or_else(|| panic!("{name} is not in etc/{file}"))
}

#[test]
fn install_script_is_idempotent_in_a_throwaway_root() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "install_script_is_idempotent_in_a_throwaway_root needs root (useradd, chown): not run"
        );
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    // A minimal root: only root's own entries.
    std::fs::create_dir_all(r.join("etc")).unwrap();
    for (file, line) in [
        ("passwd", "root:x:0:0:root:/root:/bin/sh\n"),
        ("group", "root:x:0:\n"),
        ("shadow", "root:*:19000:0:99999:7:::\n"),
        ("gshadow", "root:*::\n"),
    ] {
        std::fs::write(r.join("etc").join(file), line).unwrap();
    }
    let first = run_install(r);
    assert!(first.contains("created user stemedb-wal"), "{first}");

    let gid_db = id_in(r, "group", "stemedb");
    let uid_db = id_in(r, "passwd", "stemedb");
    let uid_wal = id_in(r, "passwd", "stemedb-wal");
    let gid_wal = id_in(r, "group", "stemedb-wal");
    let stat = |p: &str| {
        let m = std::fs::metadata(r.join(p.trim_start_matches('/'))).unwrap();
        (m.uid(), m.gid(), m.mode() & 0o7777)
    };
    assert_eq!(stat("/var/lib/stemedb/wal"), (uid_wal, gid_wal, 0o750));
    assert_eq!(stat("/var/lib/stemedb/data"), (uid_db, gid_db, 0o750));
    assert_eq!(stat("/etc/stemedb"), (0, 0, 0o755));
    assert_eq!(stat("/var/backups/stemedb"), (0, 0, 0o755));
    assert_eq!(
        stat("/var/backups/stemedb/snapshots"),
        (uid_db, gid_db, 0o750)
    );
    assert_eq!(stat("/etc/stemedb/api.toml"), (0, gid_db, 0o640));
    assert_eq!(stat("/etc/stemedb/walld.toml"), (0, gid_wal, 0o640));
    assert_eq!(stat("/var/backups/stemedb/wal"), (uid_wal, gid_db, 0o2750));
    assert_eq!(stat("/usr/local/bin/stemed"), (0, 0, 0o755));
    for unit in units() {
        let installed = r.join("etc/systemd/system").join(unit.file_name().unwrap());
        assert_eq!(
            std::fs::read(&installed).unwrap(),
            std::fs::read(&unit).unwrap()
        );
    }
    // walld lets group stemedb (stemed) in by its numeric gid.
    let walld_toml = std::fs::read_to_string(r.join("etc/stemedb/walld.toml")).unwrap();
    assert!(
        walld_toml.contains(&format!("allowed_gids = [{gid_db}]")),
        "{walld_toml}"
    );
    // The installed config passes stemed's own check.
    let check = Command::new(r.join("usr/local/bin/stemed"))
        .args(["check-config", "--config"])
        .arg(r.join("etc/stemedb/api.toml"))
        .output()
        .unwrap();
    assert!(check.status.success(), "{check:?}");

    // Each daemon's user reaches what its unit needs and nothing of the
    // other's (test(1) as that uid and gid, with no supplementary groups).
    std::fs::set_permissions(r, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let can = |uid: u32, gid: u32, test: &str, path: &str| {
        Command::new("setpriv")
            .args([
                &format!("--reuid={uid}"),
                &format!("--regid={gid}"),
                "--clear-groups",
                "test",
                test,
            ])
            .arg(r.join(path))
            .status()
            .unwrap()
            .success()
    };
    let wal = (uid_wal, gid_wal);
    let api = (uid_db, gid_db);
    for (who, test, path, expected) in [
        (wal, "-r", "etc/stemedb/walld.toml", true),
        (wal, "-w", "var/lib/stemedb/wal", true),
        (wal, "-w", "var/backups/stemedb/wal", true),
        (wal, "-r", "etc/stemedb/api.toml", false),
        (wal, "-w", "var/lib/stemedb/data", false),
        (api, "-r", "etc/stemedb/api.toml", true),
        (api, "-w", "var/lib/stemedb/data", true),
        (api, "-w", "var/backups/stemedb/snapshots", true),
        (api, "-x", "var/backups/stemedb/wal", true),
        (api, "-r", "etc/stemedb/walld.toml", false),
        (api, "-x", "var/lib/stemedb/wal", false),
        (api, "-w", "var/backups/stemedb/wal", false),
    ] {
        assert_eq!(
            can(who.0, who.1, test, path),
            expected,
            "uid {} test {test} {path}",
            who.0
        );
    }

    // An operator edits the config; a second run must keep the edit and
    // change nothing at all.
    let api_toml = r.join("etc/stemedb/api.toml");
    let edited = format!(
        "{}# local edit\n",
        std::fs::read_to_string(&api_toml).unwrap()
    );
    std::fs::write(&api_toml, &edited).unwrap();
    let before = snapshot(r);
    let second = run_install(r);
    assert_eq!(
        second.trim(),
        "install.sh: done",
        "second run did something:\n{second}"
    );
    let after = snapshot(r);
    for (path, line) in &before {
        assert_eq!(after.get(path), Some(line), "{} changed", path.display());
    }
    assert_eq!(before.len(), after.len(), "the second run added files");
    assert_eq!(std::fs::read_to_string(&api_toml).unwrap(), edited);
}

/// A real nginx with deploy/nginx/stemedb.conf, in which only the node
/// addresses and the listen ports are replaced.
struct Nginx {
    child: Child,
    dir: tempfile::TempDir,
    grpc_port: u16,
    admin_port: u16,
}

impl Nginx {
    fn start(nodes: [&Node; 2], lb_ports: [u16; 2]) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        let (grpc_port, admin_port) = (free_port(), free_port());
        let mut conf = std::fs::read_to_string(deploy("nginx/stemedb.conf")).unwrap();
        let substitutions = [
            (
                "stemed-1:18182".to_string(),
                format!("127.0.0.1:{}", lb_ports[0]),
            ),
            (
                "stemed-2:18182".to_string(),
                format!("127.0.0.1:{}", lb_ports[1]),
            ),
            (
                "stemed-1:18180".to_string(),
                format!("127.0.0.1:{}", nodes[0].admin_port),
            ),
            (
                "stemed-2:18180".to_string(),
                format!("127.0.0.1:{}", nodes[1].admin_port),
            ),
            (
                "listen 18181 ".to_string(),
                format!("listen 127.0.0.1:{grpc_port} "),
            ),
            (
                "listen 18190;".to_string(),
                format!("listen 127.0.0.1:{admin_port};"),
            ),
        ];
        for (from, to) in &substitutions {
            assert!(conf.contains(from.as_str()), "stemedb.conf has no {from:?}");
            conf = conf.replace(from.as_str(), to);
        }
        assert!(
            !conf.contains("server stemed-"),
            "an upstream was left unsubstituted"
        );
        std::fs::write(dir.path().join("stemedb.conf"), conf).unwrap();
        let d = dir.path().display();
        let user = if nix::unistd::geteuid().is_root() {
            "user root;"
        } else {
            ""
        };
        let main = format!(
            "{user}\ndaemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
             events {{ worker_connections 512; }}\n\
             http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
               include {d}/stemedb.conf;\n}}\n"
        );
        std::fs::write(dir.path().join("nginx.conf"), main).unwrap();
        let nginx = Path::new("/usr/sbin/nginx");
        assert!(nginx.exists(), "nginx is missing (apt-get install nginx)");
        let test = Command::new(nginx)
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .arg("-t")
            .output()
            .unwrap();
        assert!(
            test.status.success(),
            "nginx -t: {}",
            String::from_utf8_lossy(&test.stderr)
        );
        let child = Command::new(nginx)
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("stderr.log")).unwrap())
            .spawn()
            .unwrap();
        let nginx = Nginx {
            child,
            dir,
            grpc_port,
            admin_port,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        while std::net::TcpStream::connect(("127.0.0.1", grpc_port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nginx did not listen\n{}",
                nginx.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        nginx
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    /// SIGTERM, so that the master stops its workers: killing the master
    /// alone would leave the workers running, holding the ports.
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn applied_lsn(node: &Node) -> u64 {
    let (code, body) = http_get(node.admin_port, "/v1/admin/status").unwrap();
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["applied_lsn"].as_u64().unwrap()
}

/// Writers at once through nginx.
const NGINX_WRITERS: usize = 4;
/// Writes of all writers before node 1 is drained.
const NGINX_WRITES_BEFORE_DRAIN: usize = 100;
/// Writes each writer makes after the drain has returned.
const NGINX_WRITES_AFTER_DRAIN: usize = 50;
/// Bound on one writer's writes, whatever the drain takes.
const NGINX_WRITES_PER_WRITER_MAX: usize = 5_000;

#[tokio::test]
async fn nginx_fails_over_on_drain_with_no_client_visible_error() {
    let lb_ports = [free_port(), free_port()];
    let node_with_lb = |port: u16| NodeOptions {
        stemed_env: vec![(
            "STEMEDB_SERVER_LB_GRPC_ADDR".into(),
            format!("127.0.0.1:{port}"),
        )],
        ..NodeOptions::default()
    };
    let n1 = Node::start_with(node_with_lb(lb_ports[0])).await;
    let n2 = Node::start_with(node_with_lb(lb_ports[1])).await;
    let nginx = Nginx::start([&n1, &n2], lb_ports);
    // The client retries nothing: every error would be visible.
    let client = stemedb_client::Client::connect_with(
        format!("http://127.0.0.1:{}", nginx.grpc_port),
        ClientOptions {
            retry_max: 0,
            ..ClientOptions::default()
        },
    )
    .await
    .unwrap();
    let write = |c: stemedb_client::Client, entity: String| async move {
        c.transact(vec![Assertion::assert(entity, "n", 1i64).source("nginx")])
            .await
    };

    // Round robin: both nodes take writes.
    let (a0, b0) = (applied_lsn(&n1), applied_lsn(&n2));
    for i in 0..20 {
        write(client.clone(), format!("warmup-{i}"))
            .await
            .unwrap_or_else(|e| panic!("write {i} through nginx: {e}\n{}", nginx.log()));
    }
    assert!(
        applied_lsn(&n1) > a0 && applied_lsn(&n2) > b0,
        "both nodes must take writes"
    );
    let (code, _) = http_get(nginx.admin_port, "/node/1/readyz").unwrap();
    assert_eq!(code, 200);

    // Writers run before, while and after node 1 is drained with stemectl.
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let drained_flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (progress_tx, mut progress) = tokio::sync::watch::channel(0usize);
    let progress_tx = Arc::new(progress_tx);
    let mut writers = Vec::new();
    for w in 0..NGINX_WRITERS {
        let (c, done, progress_tx) = (client.clone(), done.clone(), progress_tx.clone());
        let drained_flag = drained_flag.clone();
        writers.push(tokio::spawn(async move {
            let mut errors = Vec::new();
            let mut after_drain = 0;
            for i in 0..NGINX_WRITES_PER_WRITER_MAX {
                let drained = drained_flag.load(std::sync::atomic::Ordering::Acquire);
                if let Err(e) = write(c.clone(), format!("w{w}-{i}")).await {
                    errors.push(format!("writer {w} write {i}: {e}"));
                }
                let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                progress_tx.send_replace(n);
                after_drain += usize::from(drained);
                if after_drain >= NGINX_WRITES_AFTER_DRAIN {
                    break;
                }
            }
            (errors, after_drain)
        }));
    }
    progress
        .wait_for(|n| *n >= NGINX_WRITES_BEFORE_DRAIN)
        .await
        .unwrap();
    let admin = n1.admin_url();
    let drained = tokio::task::spawn_blocking(move || {
        Command::new(bin("stemectl"))
            .args(["--admin-addr", &admin, "drain"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(drained.status.success(), "stemectl drain: {drained:?}");
    let at_drain = applied_lsn(&n1);
    drained_flag.store(true, std::sync::atomic::Ordering::Release);
    let mut errors = Vec::new();
    for w in writers {
        let (e, after_drain) = w.await.unwrap();
        assert_eq!(
            after_drain, NGINX_WRITES_AFTER_DRAIN,
            "a writer stopped early"
        );
        errors.extend(e);
    }
    let total = done.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("{total} writes through nginx, drain after {NGINX_WRITES_BEFORE_DRAIN}");
    assert!(
        errors.is_empty(),
        "{} of {total} writes failed through nginx:\n{}\n--- nginx ---\n{}",
        errors.len(),
        errors.join("\n"),
        nginx.log()
    );
    // After the drain every write went to node 2.
    assert_eq!(
        applied_lsn(&n1),
        at_drain,
        "node 1 took writes after its drain"
    );
    let (code, _) = http_get(nginx.admin_port, "/node/1/readyz").unwrap();
    assert_eq!(code, 503);
    let (code, _) = http_get(nginx.admin_port, "/node/2/readyz").unwrap();
    assert_eq!(code, 200);

    // Undrained, node 1 listens again and writes keep succeeding.
    let out = Command::new(bin("stemectl"))
        .args(["--admin-addr", &n1.admin_url(), "undrain"])
        .output()
        .unwrap();
    assert!(out.status.success(), "stemectl undrain: {out:?}");
    let deadline = Instant::now() + READY_TIMEOUT;
    while std::net::TcpStream::connect(("127.0.0.1", lb_ports[0])).is_err() {
        assert!(
            Instant::now() < deadline,
            "node 1's load-balancer listener did not reopen"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for i in 0..20 {
        write(client.clone(), format!("after-undrain-{i}"))
            .await
            .unwrap_or_else(|e| panic!("write {i} after undrain: {e}\n{}", nginx.log()));
    }
}

#[test]
fn envoy_config_structure() {
    let text = std::fs::read_to_string(deploy("envoy/stemedb.yaml")).unwrap();
    let y: serde_yaml::Value = serde_yaml::from_str(&text).expect("stemedb.yaml is YAML");
    let get = |v: &serde_yaml::Value, path: &[&str]| -> serde_yaml::Value {
        let mut cur = v.clone();
        for key in path {
            cur = match key.parse::<usize>() {
                Ok(i) => cur.get(i).cloned(),
                Err(_) => cur.get(*key).cloned(),
            }
            .unwrap_or_else(|| panic!("envoy config has no {}", path.join(".")));
        }
        cur
    };
    let str_at = |v: &serde_yaml::Value, path: &[&str]| -> String {
        get(v, path)
            .as_str()
            .unwrap_or_else(|| panic!("{} is not a string", path.join(".")))
            .to_string()
    };

    let clusters = get(&y, &["static_resources", "clusters"]);
    let cluster = get(&clusters, &["0"]);
    assert_eq!(str_at(&cluster, &["name"]), "stemedb");
    // gRPC needs HTTP/2 to the upstreams.
    get(
        &cluster,
        &[
            "typed_extension_protocol_options",
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config",
            "http2_protocol_options",
        ],
    );
    let endpoints = get(
        &cluster,
        &["load_assignment", "endpoints", "0", "lb_endpoints"],
    );
    assert!(
        endpoints.as_sequence().unwrap().len() >= 2,
        "at least two nodes"
    );
    // Active grpc.health.v1 checks of stemedb.v1.Store, which a drained node
    // reports NOT_SERVING.
    let hc = get(&cluster, &["health_checks", "0"]);
    assert_eq!(
        str_at(&hc, &["grpc_health_check", "service_name"]),
        "stemedb.v1.Store"
    );
    for key in [
        "timeout",
        "interval",
        "unhealthy_threshold",
        "healthy_threshold",
    ] {
        get(&hc, &[key]);
    }
    assert_eq!(get(&hc, &["unhealthy_threshold"]).as_u64(), Some(1));
    // Outlier detection ejects a failing node.
    let od = get(&cluster, &["outlier_detection"]);
    assert!(get(&od, &["consecutive_5xx"]).as_u64().unwrap() >= 1);
    get(&od, &["base_ejection_time"]);

    // The route retries UNAVAILABLE on another host.
    let hcm = get(
        &y,
        &[
            "static_resources",
            "listeners",
            "0",
            "filter_chains",
            "0",
            "filters",
            "0",
            "typed_config",
        ],
    );
    assert_eq!(str_at(&hcm, &["codec_type"]), "HTTP2");
    let route = get(
        &hcm,
        &["route_config", "virtual_hosts", "0", "routes", "0", "route"],
    );
    assert_eq!(str_at(&route, &["cluster"]), "stemedb");
    let retry = get(&route, &["retry_policy"]);
    let retry_on = str_at(&retry, &["retry_on"]);
    assert!(
        retry_on.split(',').any(|c| c.trim() == "unavailable"),
        "{retry_on}"
    );
    assert!(get(&retry, &["num_retries"]).as_u64().unwrap() >= 1);
    assert_eq!(
        str_at(&retry, &["retry_host_predicate", "0", "name"]),
        "envoy.retry_host_predicates.previous_hosts"
    );
    let filters = get(&hcm, &["http_filters"]);
    assert_eq!(
        str_at(&filters, &["0", "name"]),
        "envoy.filters.http.router"
    );
}
