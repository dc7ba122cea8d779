//! Backups, WAL archiving and point-in-time restores, end to end: real
//! walld + stemed processes, the real `stemectl` binary, a directory or a
//! real S3-compatible server (moto) as the destination.
//!
//! Every restored node is checked against the source the same way
//! ([`check_same_as_of`]): Get and History of every written entity as of the
//! restore point, plus the content hash of the restored node's own backup.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use rand::{Rng, SeedableRng};
use stemedb_client::{Assertion, Client, HistoryQuery};
use stemedb_tests::{bin, free_port, http_get, http_request, Node, NodeOptions, READY_TIMEOUT};

/// Entities the workload writes (every check reads all of them).
const ENTITIES: u64 = 12;

fn stemectl(args: &[&str]) -> Output {
    Command::new(bin("stemectl"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run stemectl")
}

fn ok(args: &[&str]) -> String {
    let out = stemectl(args);
    assert!(
        out.status.success(),
        "stemectl {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails(args: &[&str]) -> String {
    let out = stemectl(args);
    assert!(!out.status.success(), "stemectl {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn entity(i: u64) -> String {
    format!("e:{i}")
}

/// Writes `count` transactions: asserts, retractions and repeated
/// idempotency keys (duplicates consume an LSN, so backups have gaps).
async fn write_workload(client: &Client, rng: &mut rand::rngs::StdRng, count: usize) -> u64 {
    let mut last = 0;
    for _ in 0..count {
        let e = entity(rng.gen_range(0..ENTITIES));
        let v: i64 = rng.gen_range(0..5);
        let a = if rng.gen_bool(0.2) {
            Assertion::retract(&e, "n", v)
        } else {
            Assertion::assert(&e, "n", v)
        }
        .source("test");
        let b = Assertion::assert(&e, "label", format!("v{}", rng.gen::<u32>())).source("test");
        let key = format!("k{}", rng.gen_range(0..10_000u32));
        last = client
            .transact_with_key(vec![a, b], key)
            .await
            .unwrap()
            .tx
            .max(last);
    }
    last
}

/// Get and History of every entity on `restored` equal `source` as of `lsn`.
async fn check_same_as_of(source: &Client, restored: &Client, lsn: u64) {
    for i in 0..ENTITIES {
        let e = entity(i);
        let want = source.get(&e, Some(lsn)).await.unwrap();
        let got = restored.get(&e, None).await.unwrap();
        assert_eq!(
            got.basis_tx, lsn,
            "restored node is at LSN {}",
            got.basis_tx
        );
        assert_eq!(got.facts, want.facts, "{e} as of {lsn}");
        let h = |c: &Client| {
            c.history(HistoryQuery::entity(e.as_str()).until(lsn))
                .map(|f| f.unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            h(restored).await,
            h(source).await,
            "history of {e} until {lsn}"
        );
    }
}

/// A walld + stemed pair on restored directories.
struct Restored {
    dir: PathBuf,
    walld: Child,
    stemed: Child,
    admin_port: u16,
    grpc_port: u16,
}

impl Restored {
    async fn start(dir: &Path) -> Restored {
        let socket = dir.join("walld.sock");
        let log = |n: &str| std::fs::File::create(dir.join(format!("{n}.log"))).unwrap();
        let mut w = Command::new(bin("walld"));
        w.arg("--dir")
            .arg(dir.join("wal"))
            .arg("--socket")
            .arg(&socket);
        if nix::unistd::geteuid().is_root() {
            w.arg("--allow-root");
        }
        let walld = w.stdout(log("walld")).stderr(log("walld")).spawn().unwrap();
        let deadline = Instant::now() + READY_TIMEOUT;
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "restored walld not serving");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (admin_port, grpc_port) = (free_port(), free_port());
        let stemed = Command::new(bin("stemed"))
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--grpc-addr")
            .arg(format!("127.0.0.1:{grpc_port}"))
            .arg("--admin-addr")
            .arg(format!("127.0.0.1:{admin_port}"))
            .arg("--wal-socket")
            .arg(&socket)
            .stdout(log("stemed"))
            .stderr(log("stemed"))
            .spawn()
            .unwrap();
        let mut r = Restored {
            dir: dir.to_path_buf(),
            walld,
            stemed,
            admin_port,
            grpc_port,
        };
        while !matches!(http_get(admin_port, "/readyz"), Ok((200, _))) {
            if let Some(status) = r.stemed.try_wait().unwrap() {
                panic!("restored stemed exited with {status}: {}", r.logs());
            }
            assert!(
                Instant::now() < deadline,
                "restored stemed not ready: {}",
                r.logs()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        r
    }

    fn logs(&self) -> String {
        ["walld", "stemed"]
            .iter()
            .map(|n| std::fs::read_to_string(self.dir.join(format!("{n}.log"))).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n---\n")
    }

    async fn client(&self) -> Client {
        Client::connect(format!("http://127.0.0.1:{}", self.grpc_port))
            .await
            .unwrap()
    }

    fn admin_addr(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin_port)
    }
}

impl Drop for Restored {
    fn drop(&mut self) {
        let _ = self.stemed.kill();
        let _ = self.stemed.wait();
        let _ = self.walld.kill();
        let _ = self.walld.wait();
    }
}

fn manifest(backup_dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(backup_dir.join("manifest.json")).unwrap()).unwrap()
}

/// Restores `args` into `dir/{data,wal}`, serves it, checks it against the
/// source as of `lsn` and returns the content sha256 of its own backup.
async fn restore_and_check(source: &Client, dir: &Path, args: &[&str], lsn: u64) -> String {
    let data = dir.join("data");
    let wal = dir.join("wal");
    let mut all: Vec<&str> = vec!["restore"];
    all.extend_from_slice(args);
    all.extend_from_slice(&[
        "--data-dir",
        data.to_str().unwrap(),
        "--wal-dir",
        wal.to_str().unwrap(),
    ]);
    let out = ok(&all);
    assert!(out.contains(&format!("to LSN {lsn}")), "{out}");
    let node = Restored::start(dir).await;
    check_same_as_of(source, &node.client().await, lsn).await;
    let again = dir.join("again");
    let m = ok(&[
        "--admin-addr",
        &node.admin_addr(),
        "--output",
        "json",
        "backup",
        "create",
        "--to",
        again.to_str().unwrap(),
    ]);
    let m: serde_json::Value = serde_json::from_str(&m).unwrap();
    assert_eq!(m["basis_lsn"], lsn);
    m["content_sha256"].as_str().unwrap().to_string()
}

fn flip_byte(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at] ^= 0x20;
    std::fs::write(path, bytes).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_under_writes_restores_the_manifest_lsn() {
    let seed = stemedb_tests::seed("backup_under_writes");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let node = Node::start().await;
    let client = node.client().await;
    let acked_before = write_workload(&client, &mut rng, 150).await;
    let writer = {
        let client = client.clone();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed + 1);
        tokio::spawn(async move { write_workload(&client, &mut rng, 150).await })
    };
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("backups");
    let admin = node.admin_url();
    let out = tokio::task::spawn_blocking({
        let dest = dest.clone();
        move || {
            ok(&[
                "--admin-addr",
                &admin,
                "--output",
                "json",
                "backup",
                "create",
                "--to",
                dest.to_str().unwrap(),
                "--file-bytes-max",
                "4096",
            ])
        }
    })
    .await
    .unwrap();
    writer.await.unwrap();
    let m: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = m["id"].as_str().unwrap().to_string();
    let basis = m["basis_lsn"].as_u64().unwrap();
    assert!(m["files"].as_array().unwrap().len() > 2, "small files: {m}");
    assert!(basis >= acked_before, "{m}");
    let backup = dest.join(&id);
    assert_eq!(manifest(&backup), m);
    assert!(ok(&["backup", "list", dest.to_str().unwrap()]).contains(&id));
    assert!(ok(&["backup", "verify", backup.to_str().unwrap()]).contains("OK"));

    let r = tmp.path().join("r1");
    let content =
        restore_and_check(&client, &r, &["--from", backup.to_str().unwrap()], basis).await;
    assert_eq!(content, m["content_sha256"].as_str().unwrap());

    // A non-empty target is refused without --force.
    let data = r.join("data");
    let wal = r.join("wal");
    let err = fails(&[
        "restore",
        "--from",
        backup.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--wal-dir",
        wal.to_str().unwrap(),
    ]);
    assert!(
        err.contains("not empty") && err.contains("--force"),
        "{err}"
    );

    // A flipped byte fails verify and restore, naming the file.
    flip_byte(&backup.join("data-000002.stx"), 40);
    let err = fails(&["backup", "verify", backup.to_str().unwrap()]);
    assert!(err.contains("data-000002.stx"), "{err}");
    let d2 = tmp.path().join("r2");
    let err = fails(&[
        "restore",
        "--from",
        backup.to_str().unwrap(),
        "--data-dir",
        d2.join("data").to_str().unwrap(),
        "--wal-dir",
        d2.join("wal").to_str().unwrap(),
    ]);
    assert!(err.contains("data-000002.stx"), "{err}");
}

fn archive_options() -> NodeOptions {
    NodeOptions {
        walld_args: vec![
            "--segment-bytes".into(),
            "16384".into(),
            "--archive-required".into(),
        ],
        stemed_env: vec![(
            "STEMEDB_STORAGE_CHECKPOINT_INTERVAL_MS".into(),
            "100".into(),
        )],
        ..NodeOptions::default()
    }
}

fn segments(wal_dir: &Path) -> Vec<u64> {
    let mut v: Vec<u64> = std::fs::read_dir(wal_dir)
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            n.strip_suffix(".wal")?.parse().ok()
        })
        .collect();
    v.sort();
    v
}

fn archived_lsn(wal_dir: &Path) -> u64 {
    let out = ok(&[
        "--output",
        "json",
        "wal",
        "archive-status",
        "--wal-dir",
        wal_dir.to_str().unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["archived_lsn"].as_u64().unwrap()
}

/// One unlabelled sample of stemed's /metrics (walld's figures included).
fn metric(node: &Node, name: &str) -> f64 {
    let (code, body) = http_get(node.admin_port, "/metrics").unwrap();
    assert_eq!(code, 200);
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} missing from /metrics"))
        .trim()
        .parse()
        .unwrap()
}

/// Truncation never outruns archiving: the WAL still holds every record
/// after the archived LSN.
fn check_truncation_follows_archive(wal_dir: &Path) {
    let archived = archived_lsn(wal_dir);
    let first = segments(wal_dir)[0];
    assert!(
        first <= archived + 1,
        "WAL starts at {first} but only {archived} is archived"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pitr_restores_match_the_as_of_views() {
    let seed = stemedb_tests::seed("pitr");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let node = Node::start_with(archive_options()).await;
    let client = node.client().await;
    write_workload(&client, &mut rng, 60).await;
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("backups");
    let out = ok(&[
        "--admin-addr",
        &node.admin_url(),
        "--output",
        "json",
        "backup",
        "create",
        "--to",
        dest.to_str().unwrap(),
    ]);
    let m: serde_json::Value = serde_json::from_str(&out).unwrap();
    let basis = m["basis_lsn"].as_u64().unwrap();
    let backup = dest.join(m["id"].as_str().unwrap());
    write_workload(&client, &mut rng, 400).await;
    // Nothing is archived yet, so checkpoints removed nothing.
    assert_eq!(segments(&node.wal_dir())[0], 1);
    assert!(segments(&node.wal_dir()).len() > 4);
    check_no_overwrite(&node.wal_dir(), tmp.path());
    let lag_before = metric(&node, "stemedb_wal_archive_lag_segments");
    assert!(lag_before >= 4.0, "lag {lag_before}");
    let arch = tmp.path().join("wal-archive");
    ok(&[
        "wal",
        "archive",
        "--wal-dir",
        node.wal_dir().to_str().unwrap(),
        "--to",
        arch.to_str().unwrap(),
        "--once",
    ]);
    let archived = archived_lsn(&node.wal_dir());
    assert!(archived > basis + 100, "archived {archived}, basis {basis}");
    check_truncation_follows_archive(&node.wal_dir());
    assert_eq!(metric(&node, "stemedb_wal_archived_lsn"), archived as f64);
    assert_eq!(metric(&node, "stemedb_wal_archive_lag_segments"), 0.0);
    assert_eq!(metric(&node, "stemedb_wal_archive_failures_total"), 0.0);
    // Archiving again finds every segment identical and uploads nothing new.
    ok(&[
        "wal",
        "archive",
        "--wal-dir",
        node.wal_dir().to_str().unwrap(),
        "--to",
        arch.to_str().unwrap(),
        "--once",
    ]);

    for (i, lsn) in [basis, basis + 1, (basis + archived) / 2, archived]
        .into_iter()
        .enumerate()
    {
        let r = tmp.path().join(format!("r{i}"));
        let lsn_s = lsn.to_string();
        restore_and_check(
            &client,
            &r,
            &[
                "--from",
                backup.to_str().unwrap(),
                "--wal-archive",
                arch.to_str().unwrap(),
                "--to-lsn",
                &lsn_s,
            ],
            lsn,
        )
        .await;
    }
    // --to-time: everything recorded at or before a fact's recorded_at.
    let facts: Vec<_> = client
        .history(
            HistoryQuery::entity(entity(0))
                .since(basis + 1)
                .until(archived),
        )
        .map(|f| f.unwrap())
        .collect()
        .await;
    let f = &facts[facts.len() / 2];
    let micros = f
        .recorded_at
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros();
    // Half a microsecond above, so the f64 parse cannot round below it.
    let t = format!("{}.{:06}5", micros / 1_000_000, micros % 1_000_000);
    let r = tmp.path().join("by-time");
    let (d, w) = (r.join("data"), r.join("wal"));
    let out = ok(&[
        "--output",
        "json",
        "restore",
        "--from",
        backup.to_str().unwrap(),
        "--wal-archive",
        arch.to_str().unwrap(),
        "--to-time",
        &t,
        "--data-dir",
        d.to_str().unwrap(),
        "--wal-dir",
        w.to_str().unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let at = v["restored_lsn"].as_u64().unwrap();
    assert!(
        at >= f.tx && at <= archived,
        "--to-time {t} restored to {at}, fact tx {}",
        f.tx
    );
    let node_t = Restored::start(&r).await;
    check_same_as_of(&client, &node_t.client().await, at).await;

    // Beyond the archive: refused, naming where the archive ends.
    let r = tmp.path().join("beyond");
    let beyond = (archived + 1_000).to_string();
    let err = fails(&[
        "restore",
        "--from",
        backup.to_str().unwrap(),
        "--wal-archive",
        arch.to_str().unwrap(),
        "--to-lsn",
        &beyond,
        "--data-dir",
        r.join("data").to_str().unwrap(),
        "--wal-dir",
        r.join("wal").to_str().unwrap(),
    ]);
    assert!(err.contains(&format!("ends at LSN {archived}")), "{err}");

    // The verify timer's form: the latest backup, and the archive after it.
    let (d, a) = (dest.to_str().unwrap(), arch.to_str().unwrap());
    let out = ok(&["backup", "verify", "--from", d, "--wal", a]);
    assert!(out.contains(&format!("up to LSN {archived}")), "{out}");

    // A flipped byte in an archived segment fails the restore, naming it.
    let mut names: Vec<_> = std::fs::read_dir(&arch)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let victim = names[names.len() / 2].clone();
    flip_byte(&arch.join(&victim), 4096 + 30);
    let r = tmp.path().join("corrupt");
    let err = fails(&[
        "restore",
        "--from",
        backup.to_str().unwrap(),
        "--wal-archive",
        arch.to_str().unwrap(),
        "--data-dir",
        r.join("data").to_str().unwrap(),
        "--wal-dir",
        r.join("wal").to_str().unwrap(),
    ]);
    assert!(err.contains(&victim), "{err}");
    let err = fails(&["backup", "verify", "--from", d, "--wal", a]);
    assert!(err.contains(&victim), "{err}");
}

/// An archived object is never overwritten with different bytes: the
/// archiver fails, counts the failure and leaves the object alone.
fn check_no_overwrite(wal_dir: &Path, tmp: &Path) {
    let copy = tmp.join("wal-copy");
    std::fs::create_dir_all(&copy).unwrap();
    // Sealed segments only (the active one is still being written).
    let all = segments(wal_dir);
    for first in &all[..all.len() - 1] {
        let name = format!("{first:020}.wal");
        std::fs::copy(wal_dir.join(&name), copy.join(&name)).unwrap();
    }
    let arch = tmp.join("arch2");
    let (c, a) = (copy.to_str().unwrap(), arch.to_str().unwrap());
    ok(&["wal", "archive", "--wal-dir", c, "--to", a, "--once"]);
    let victim = arch.join(format!("{:020}.wal", all[0]));
    flip_byte(&victim, 4096 + 20);
    let damaged = std::fs::read(&victim).unwrap();
    std::fs::remove_file(copy.join("archive.state")).unwrap();
    let err = fails(&["wal", "archive", "--wal-dir", c, "--to", a, "--once"]);
    assert!(err.contains("refusing to overwrite"), "{err}");
    assert_eq!(
        std::fs::read(&victim).unwrap(),
        damaged,
        "the object was overwritten"
    );
    let out = ok(&["--output", "json", "wal", "archive-status", "--wal-dir", c]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["archive_failures_total"], 1, "{v}");
    assert_eq!(v["archived_lsn"], 0, "{v}");
}

/// A moto S3 server on loopback, killed on drop.
struct Moto {
    child: Child,
    port: u16,
}

impl Moto {
    fn start() -> Moto {
        let port = free_port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server is missing: pip install 'moto[server]' (see docs/operations/disaster-recovery.md)");
        let deadline = Instant::now() + READY_TIMEOUT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto_server not listening");
            std::thread::sleep(Duration::from_millis(50));
        }
        Moto { child, port }
    }

    fn env(&self) -> Vec<(String, String)> {
        [
            (
                "AWS_ENDPOINT_URL",
                format!("http://127.0.0.1:{}", self.port),
            ),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn stemectl_env(env: &[(String, String)], args: &[&str]) -> Output {
    Command::new(bin("stemectl"))
        .args(args)
        .envs(env.iter().cloned())
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn ok_env(env: &[(String, String)], args: &[&str]) -> String {
    let out = stemectl_env(env, args);
    assert!(
        out.status.success(),
        "stemectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_archive_survives_archiver_kills_and_restores() {
    let seed = stemedb_tests::seed("s3_archive");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let moto = Moto::start();
    let (code, body) = http_request(moto.port, "PUT", "/stemedb", None).unwrap();
    assert_eq!(code, 200, "create bucket: {body}");
    let env = moto.env();
    let node = Node::start_with(archive_options()).await;
    let client = node.client().await;
    write_workload(&client, &mut rng, 50).await;
    let out = ok_env(
        &env,
        &[
            "--admin-addr",
            &node.admin_url(),
            "--output",
            "json",
            "backup",
            "create",
            "--to",
            "s3://stemedb/backups",
            "--file-bytes-max",
            "8192",
        ],
    );
    let m: serde_json::Value = serde_json::from_str(&out).unwrap();
    let backup = format!("s3://stemedb/backups/{}", m["id"].as_str().unwrap());
    assert!(ok_env(&env, &["backup", "list", "s3://stemedb/backups"])
        .contains(m["id"].as_str().unwrap()));
    ok_env(&env, &["backup", "verify", &backup]);

    // The archiver follows while writes go on; it is killed at random
    // moments (mid-upload or not) and restarted.
    let wal = node.wal_dir();
    // Round 0 stalls the server (SIGSTOP) before the archiver starts, so the
    // kill lands in the middle of an upload; the later rounds kill at
    // random moments.
    let moto_pid = nix::unistd::Pid::from_raw(moto.child.id() as i32);
    for round in 0..4 {
        if round == 0 {
            nix::sys::signal::kill(moto_pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
        }
        let mut archiver = Command::new(bin("stemectl"))
            .args([
                "wal",
                "archive",
                "--wal-dir",
                wal.to_str().unwrap(),
                "--to",
                "s3://stemedb/wal",
                "--follow",
                "--interval",
                "20ms",
            ])
            .envs(env.iter().cloned())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        write_workload(&client, &mut rng, 80).await;
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..200))).await;
        let _ = archiver.kill();
        let _ = archiver.wait();
        check_truncation_follows_archive(&wal);
        if round == 0 {
            assert_eq!(
                archived_lsn(&wal),
                0,
                "nothing can be archived while the server is stopped"
            );
            nix::sys::signal::kill(moto_pid, nix::sys::signal::Signal::SIGCONT).unwrap();
        }
        eprintln!("round {round}: archived through {}", archived_lsn(&wal));
    }
    ok_env(
        &env,
        &[
            "wal",
            "archive",
            "--wal-dir",
            wal.to_str().unwrap(),
            "--to",
            "s3://stemedb/wal",
            "--once",
        ],
    );
    let archived = archived_lsn(&wal);
    check_truncation_follows_archive(&wal);
    // Checkpoints did truncate behind the archive.
    assert!(
        segments(&wal)[0] > 1,
        "no truncation happened: {:?}",
        segments(&wal)
    );

    let tmp = tempfile::tempdir().unwrap();
    let r = tmp.path().join("r");
    let data = r.join("data");
    let walr = r.join("wal");
    let out = ok_env(
        &env,
        &[
            "restore",
            "--from",
            &backup,
            "--wal-archive",
            "s3://stemedb/wal",
            "--data-dir",
            data.to_str().unwrap(),
            "--wal-dir",
            walr.to_str().unwrap(),
        ],
    );
    assert!(out.contains(&format!("to LSN {archived}")), "{out}");
    let restored = Restored::start(&r).await;
    check_same_as_of(&client, &restored.client().await, archived).await;
}

fn drill(extra: &[&str]) -> Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/scripts/dr-drill.sh");
    Command::new("bash")
        .arg(script)
        .args(["--tx", "40", "--after-tx", "120", "--bin-dir"])
        .arg(stemedb_tests::bin_dir())
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn dr_drill_passes_and_reports_rpo_and_rto() {
    let out = drill(&[]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("dr-drill: OK"), "{text}");
    assert!(text.contains("RPO: ") && text.contains("RTO: "), "{text}");
    eprintln!("{text}");
    // The drill's own check fails on damage.
    let out = drill(&["--damage-archive"]);
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("FAIL") && text.contains("damaged record"),
        "{text}"
    );
}
