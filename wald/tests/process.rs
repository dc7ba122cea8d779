//! Process tests against the real walld binary over its Unix socket.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use rand::{Rng, SeedableRng};
use stemedb_proto::wal::v1 as pb;
use tonic::Code;

type Acked = Arc<Mutex<BTreeMap<u64, Vec<u8>>>>;

/// Appends from `clients` tasks, `appends` each (0 = until an error), and
/// records every acknowledged LSN with its bytes.
async fn load(walld: &Walld, epoch: u64, clients: usize, appends: usize, seed: u64, acked: Acked) {
    let mut tasks = Vec::new();
    for c in 0..clients {
        let mut client = walld.client().await;
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ ((c as u64 + 1) * 0x9E37_79B9));
            for i in 0.. {
                if appends > 0 && i >= appends {
                    break;
                }
                let n = rng.gen_range(1..5);
                let records: Vec<Vec<u8>> = (0..n)
                    .map(|k| {
                        let len = rng.gen_range(0..600);
                        let mut r = format!("c{c}-i{i}-k{k}-").into_bytes();
                        r.extend((0..len).map(|_| rng.gen::<u8>()));
                        r
                    })
                    .collect();
                match append(&mut client, epoch, records.clone()).await {
                    Ok(ack) => {
                        assert_eq!(ack.last_lsn - ack.first_lsn + 1, n as u64);
                        assert!(ack.durable_lsn >= ack.last_lsn, "acked before durable");
                        let mut acked = acked.lock().unwrap();
                        for (k, r) in records.into_iter().enumerate() {
                            assert!(
                                acked.insert(ack.first_lsn + k as u64, r).is_none(),
                                "LSN handed out twice"
                            );
                        }
                    }
                    Err(_) if appends == 0 => break,
                    Err(e) => panic!("append failed: {e}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_read_back_identical_dense_and_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let mut walld = Walld::new(tmp.path());
    walld.start(&[], &[]);
    let mut client = walld.client().await;
    let epoch = open_writer(&mut client, "test").await;
    // A follower sees every record as it becomes durable.
    let mut follower = walld.client().await;
    let mut stream = follower
        .read(pb::ReadRequest {
            from_lsn: 1,
            follow: true,
            max_bytes_per_message: 4096,
        })
        .await
        .unwrap()
        .into_inner();
    let acked: Acked = Default::default();
    load(&walld, epoch, 8, 150, seed(), acked.clone()).await;
    let acked = acked.lock().unwrap().clone();
    let last = *acked.keys().last().unwrap();
    let records = read_all(&mut client, 1).await.unwrap();
    assert_eq!(records.len() as u64, last);
    check_acked(&records, 1, &acked);
    let mut followed = Vec::new();
    while followed.len() < last as usize {
        let message = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        followed.extend(message.records.into_iter().map(|r| (r.lsn, r.data)));
    }
    check_acked(&followed, 1, &acked);
    let s = status(&mut client).await;
    assert_eq!(s.state, pb::WalState::Serving as i32);
    assert_eq!(s.durable_lsn, last);
    assert!(s.segment_count > 3, "tiny segments must rotate");
    assert!(s.fsync_count > 0 && s.fsync_count <= 8 * 150 + 64);
    assert_eq!(s.fsync_duration_quantiles.len(), 3);
    assert_eq!(s.fsync_latency_seconds.as_ref().unwrap().buckets.len(), 18);
    assert!(s.fs_free_bytes > 0);
    assert!(s
        .config
        .iter()
        .any(|e| e.key == "segment_bytes" && e.value == SEGMENT_BYTES));
    // Truncation drops whole old segments; reading below is OUT_OF_RANGE.
    let t = client
        .truncate(pb::TruncateRequest {
            below_lsn: last / 2,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(t.segments_removed > 0 && t.first_lsn > 1 && t.first_lsn <= last / 2);
    let err = read_all(&mut client, 1).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange);
    assert!(
        err.message().contains(&t.first_lsn.to_string()),
        "{}",
        err.message()
    );
    let tail = read_all(&mut client, t.first_lsn).await.unwrap();
    assert_eq!(tail.len() as u64, last - t.first_lsn + 1);
    // Bad requests name the problem.
    let empty = append(&mut client, epoch, vec![]).await.unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument);
    assert!(walld.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_many_times_loses_nothing_acknowledged() {
    let seed = seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let tmp = tempfile::tempdir().unwrap();
    let mut walld = Walld::new(tmp.path());
    let acked: Acked = Default::default();
    for round in 0..12 {
        walld.start(&[], &[]);
        let mut client = walld.client().await;
        let records = read_all(&mut client, 1).await.unwrap();
        check_acked(&records, 1, &acked.lock().unwrap());
        let epoch = open_writer(&mut client, "killer").await;
        let load = load(&walld, epoch, 4, 0, seed.wrapping_add(round), acked.clone());
        let delay = Duration::from_millis(rng.gen_range(20..150));
        tokio::select! {
            _ = load => panic!("load ended before the kill"),
            _ = tokio::time::sleep(delay) => {}
        }
        walld.kill9();
    }
    walld.start(&[], &[]);
    let mut client = walld.client().await;
    let records = read_all(&mut client, 1).await.unwrap();
    let acked = acked.lock().unwrap();
    assert!(
        acked.len() > 100,
        "too little load to mean anything: {}",
        acked.len()
    );
    check_acked(&records, 1, &acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_fencing_survives_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let mut walld = Walld::new(tmp.path());
    walld.start(&[], &[]);
    let mut client = walld.client().await;
    let none = append(&mut client, 0, vec![b"x".to_vec()])
        .await
        .unwrap_err();
    assert_eq!(none.code(), Code::FailedPrecondition, "{none}");
    let e1 = open_writer(&mut client, "a").await;
    assert_eq!(
        append(&mut client, e1, vec![b"one".to_vec()])
            .await
            .unwrap()
            .first_lsn,
        1
    );
    let e2 = open_writer(&mut client, "b").await;
    assert_eq!(e2, e1 + 1);
    let fenced = append(&mut client, e1, vec![b"stale".to_vec()])
        .await
        .unwrap_err();
    assert_eq!(fenced.code(), Code::FailedPrecondition);
    assert!(
        fenced.message().contains(&e1.to_string()) && fenced.message().contains(&e2.to_string()),
        "{fenced}"
    );
    assert_eq!(
        append(&mut client, e2, vec![b"two".to_vec()])
            .await
            .unwrap()
            .first_lsn,
        2
    );
    assert!(walld.stop().success());
    walld.start(&[], &[]);
    let mut client = walld.client().await;
    let stale = append(&mut client, e1, vec![b"x".to_vec()])
        .await
        .unwrap_err();
    assert_eq!(
        stale.code(),
        Code::FailedPrecondition,
        "the fence must survive a restart: {stale}"
    );
    let e3 = open_writer(&mut client, "c").await;
    assert_eq!(e3, e2 + 1, "the epoch must be persisted");
    let stale = append(&mut client, e2, vec![b"x".to_vec()])
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition);
    assert_eq!(
        append(&mut client, e3, vec![b"three".to_vec()])
            .await
            .unwrap()
            .first_lsn,
        3
    );
    let records = read_all(&mut client, 1).await.unwrap();
    let datas: Vec<&[u8]> = records.iter().map(|(_, d)| &d[..]).collect();
    assert_eq!(datas, vec![&b"one"[..], b"two", b"three"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_with_other_uids_are_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let mut walld = Walld::new(tmp.path());
    walld.start(&["--allowed-uids", "65534"], &[]);
    let mut client = walld.client().await;
    let err = client.status(pb::StatusRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    let err = client
        .open_writer(pb::OpenWriterRequest {
            writer_id: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let socket_mode = std::fs::metadata(&walld.socket)
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()));
    assert_eq!(socket_mode.unwrap() & 0o777, 0o660);
    let code = walld.stop();
    assert!(code.success(), "{code}: {}", walld.log());
    assert!(walld.log().contains("peer rejected"), "{}", walld.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_appends_and_exits_0() {
    let tmp = tempfile::tempdir().unwrap();
    let mut walld = Walld::new(tmp.path());
    walld.start(&[], &[]);
    let mut client = walld.client().await;
    let epoch = open_writer(&mut client, "t").await;
    let acked: Acked = Default::default();
    let load = tokio::spawn({
        let acked = acked.clone();
        let clients: Vec<Client> = futures::future::join_all((0..4).map(|_| walld.client())).await;
        async move {
            let mut tasks = Vec::new();
            for (c, mut client) in clients.into_iter().enumerate() {
                let acked = acked.clone();
                tasks.push(tokio::spawn(async move {
                    for i in 0.. {
                        let r = format!("sigterm-{c}-{i}").into_bytes();
                        match append(&mut client, epoch, vec![r.clone()]).await {
                            Ok(ack) => {
                                acked.lock().unwrap().insert(ack.first_lsn, r);
                            }
                            Err(_) => break,
                        }
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        }
    });
    while acked.lock().unwrap().len() < 200 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let status = walld.stop();
    assert_eq!(status.code(), Some(0), "{}", walld.log());
    load.await.unwrap();
    assert!(walld.log().contains("draining"));
    walld.start(&[], &[]);
    let mut client = walld.client().await;
    let records = read_all(&mut client, 1).await.unwrap();
    check_acked(&records, 1, &acked.lock().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_activation_serves_the_passed_socket() {
    let tmp = tempfile::tempdir().unwrap();
    let mut walld = Walld::new(tmp.path());
    let notify = tmp.path().join("notify.sock");
    let mut cmd = std::process::Command::new("/usr/bin/systemd-socket-activate");
    cmd.arg("-l").arg(&walld.socket);
    cmd.arg(format!("--setenv=NOTIFY_SOCKET={}", notify.display()));
    cmd.arg(env!("CARGO_BIN_EXE_walld"));
    cmd.arg("--dir")
        .arg(&walld.dir)
        .arg("--socket")
        .arg(tmp.path().join("unused.sock"));
    cmd.arg("--allow-root");
    walld.prepare_env(&mut cmd, &[]);
    walld.spawn_unready(cmd);
    // systemd-socket-activate launches walld on the first connection.
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    while std::os::unix::net::UnixStream::connect(&walld.socket).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "socket never appeared"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    walld.wait_ready();
    let mut client = walld.client().await;
    let epoch = open_writer(&mut client, "sd").await;
    assert_eq!(
        append(&mut client, epoch, vec![b"activated".to_vec()])
            .await
            .unwrap()
            .last_lsn,
        1
    );
    assert!(
        !tmp.path().join("unused.sock").exists(),
        "must not bind its own socket"
    );
    assert!(walld.log().contains("passed by systemd"), "{}", walld.log());
    assert_eq!(walld.stop().code(), Some(0));
}

fn mounted_tmpfs(path: &std::path::Path) -> TmpfsGuard {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the disk-full test mounts a tmpfs and must run as root"
    );
    std::fs::create_dir_all(path).unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(path)
        .status()
        .unwrap()
        .success();
    assert!(ok, "mount -t tmpfs failed");
    TmpfsGuard(path.to_path_buf())
}

struct TmpfsGuard(std::path::PathBuf);

impl Drop for TmpfsGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// Fills the file system at `path` until ENOSPC.
fn fill_up(path: &std::path::Path) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).unwrap();
    let chunk = vec![0x5Au8; 64 * 1024];
    while file.write_all(&chunk).is_ok() {}
    let _ = file.flush();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_is_not_a_crash_and_heals_when_space_is_freed() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("mnt");
    let _tmpfs = mounted_tmpfs(&mnt);
    let mut walld = Walld::new(tmp.path());
    walld.dir = mnt.join("wal");
    walld.start(&[], &[]);
    let mut client = walld.client().await;
    let epoch = open_writer(&mut client, "full").await;
    fill_up(&mnt.join("filler"));
    let mut acked = BTreeMap::new();
    let mut full = None;
    for i in 0..10_000 {
        let r = vec![i as u8; 1000];
        match append(&mut client, epoch, vec![r.clone()]).await {
            Ok(ack) => {
                acked.insert(ack.first_lsn, r);
            }
            Err(e) => {
                full = Some(e);
                break;
            }
        }
    }
    let full = full.expect("the disk never filled up");
    assert_eq!(full.code(), Code::ResourceExhausted, "{full}");
    assert!(full.message().contains("WAL disk is full"), "{full}");
    let s = status(&mut client).await;
    assert_eq!(s.state, pb::WalState::DiskFull as i32);
    check_acked(&read_all(&mut client, 1).await.unwrap(), 1, &acked);
    // Still full: still refused, not crashed.
    let again = append(&mut client, epoch, vec![vec![7u8; 64 * 1024]])
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::ResourceExhausted);
    std::fs::remove_file(mnt.join("filler")).unwrap();
    for i in 0..200u32 {
        let r = format!("after-{i}").into_bytes();
        let ack = append(&mut client, epoch, vec![r.clone()])
            .await
            .expect("appends must heal after space is freed");
        acked.insert(ack.first_lsn, r);
    }
    assert_eq!(
        status(&mut client).await.state,
        pb::WalState::Serving as i32
    );
    check_acked(&read_all(&mut client, 1).await.unwrap(), 1, &acked);
    assert_eq!(walld.stop().code(), Some(0));
    walld.start(&[], &[]);
    let mut client = walld.client().await;
    check_acked(&read_all(&mut client, 1).await.unwrap(), 1, &acked);
    walld.kill9();
}

/// Runs walld to completion (for startup refusals) and returns (code, stderr).
fn run_to_exit(walld: &Walld, args: &[&str]) -> (Option<i32>, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_walld"));
    cmd.arg("--dir")
        .arg(&walld.dir)
        .arg("--socket")
        .arg(&walld.socket)
        .args(args);
    cmd.env_remove("FAILPOINTS")
        .env("STEMEDB_WALLD_LOG", "info");
    let out = cmd.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn startup_refusals_have_distinct_exit_codes() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test checks the root refusal and must run as root"
    );
    let tmp = tempfile::tempdir().unwrap();
    let walld = Walld::new(tmp.path());
    let (code, err) = run_to_exit(&walld, &[]);
    assert_eq!(code, Some(77), "root without --allow-root: {err}");
    assert!(err.contains("refusing to run as root"), "{err}");
    let config = tmp.path().join("walld.toml");
    std::fs::write(&config, "segment_bytes = 65536\nsegmnet_bytes = 1\n").unwrap();
    let (code, err) = run_to_exit(
        &walld,
        &["--allow-root", "--config", config.to_str().unwrap()],
    );
    assert_eq!(code, Some(78), "{err}");
    assert!(
        err.contains("segmnet_bytes"),
        "the unknown key must be named: {err}"
    );
    // Damage in the middle of the log: refuse (65), naming file and offset.
    let mut log = wald::log::Log::open(
        wald::log::LogOptions {
            dir: walld.dir.clone(),
            segment_bytes: 65536,
            recovery_mode: wald::recovery::RecoveryMode::Refuse,
            prepare_in_background: false,
        },
        Arc::new(wald::metrics::Metrics::new(Duration::from_secs(1), 8)),
    )
    .unwrap();
    let batch: Vec<bytes::Bytes> = (0..10)
        .map(|i| bytes::Bytes::from(vec![i as u8 + 1; 100]))
        .collect();
    assert!(log.write_batch(&[&batch[..]]).error.is_none());
    log.sync().unwrap();
    drop(log);
    let segment = walld.dir.join(wald::segment::file_name(1));
    let mut data = std::fs::read(&segment).unwrap();
    data[4096 + 116 * 3 + 40] ^= 0xFF;
    std::fs::write(&segment, &data).unwrap();
    let (code, err) = run_to_exit(&walld, &["--allow-root"]);
    assert_eq!(code, Some(65), "{err}");
    assert!(
        err.contains(&segment.display().to_string()) && err.contains("offset 4444"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_tail_is_logged_and_damage_can_be_truncated() {
    let tmp = tempfile::tempdir().unwrap();
    let mut walld = Walld::new(tmp.path());
    walld.start(&[], &[]);
    let mut client = walld.client().await;
    let epoch = open_writer(&mut client, "torn").await;
    for i in 0..5u8 {
        append(&mut client, epoch, vec![vec![i + 1; 100]])
            .await
            .unwrap();
    }
    assert_eq!(walld.stop().code(), Some(0));
    // A torn frame after the last record: cut and logged with file and offset.
    let segment = walld.dir.join(wald::segment::file_name(1));
    let tail = 4096 + 5 * 116;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&segment)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &[0x42; 30], tail as u64).unwrap();
    walld.start(&[], &[]);
    let log = walld.log();
    let line = log
        .lines()
        .find(|l| l.contains("torn tail"))
        .unwrap_or_else(|| panic!("no torn tail line:\n{log}"));
    assert!(
        line.contains(&segment.display().to_string()) && line.contains(&format!("offset={tail}")),
        "{line}"
    );
    let mut client = walld.client().await;
    assert_eq!(read_all(&mut client, 1).await.unwrap().len(), 5);
    assert_eq!(walld.stop().code(), Some(0));
    // Damage in record 2 (records 3.. follow): refused, then truncated on request.
    let mut data = std::fs::read(&segment).unwrap();
    data[4096 + 116 + 50] ^= 0xFF;
    std::fs::write(&segment, &data).unwrap();
    let (code, err) = run_to_exit(&walld, &["--allow-root"]);
    assert_eq!(code, Some(65), "{err}");
    walld.start(&["--recovery-mode", "truncate-at-damage"], &[]);
    assert!(walld.log().contains("truncating the log at the damage"));
    let mut client = walld.client().await;
    let records = read_all(&mut client, 1).await.unwrap();
    assert_eq!(records, vec![(1, vec![1u8; 100])]);
    let epoch = open_writer(&mut client, "after").await;
    assert_eq!(
        append(&mut client, epoch, vec![b"next".to_vec()])
            .await
            .unwrap()
            .first_lsn,
        2
    );
    assert_eq!(walld.stop().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drops_root_privileges_to_user() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test starts walld as root and must run as root"
    );
    let tmp = tempfile::tempdir().unwrap();
    // nobody must be able to reach the WAL dir inside the temp dir.
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let mut walld = Walld::new(tmp.path());
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_walld"));
    cmd.arg("--dir")
        .arg(&walld.dir)
        .arg("--socket")
        .arg(&walld.socket);
    cmd.args(["--user", "nobody", "--segment-bytes", SEGMENT_BYTES]);
    walld.prepare_env(&mut cmd, &[]);
    walld.spawn_unready(cmd);
    // READY=1 cannot reach a notify socket owned by root once walld is nobody,
    // so wait for the socket to answer instead.
    let mut client = None;
    for _ in 0..500 {
        if std::os::unix::net::UnixStream::connect(&walld.socket).is_ok() {
            client = Some(walld.client().await);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut client = client.unwrap_or_else(|| panic!("walld never listened:\n{}", walld.log()));
    let epoch = open_writer(&mut client, "nobody").await;
    append(&mut client, epoch, vec![b"as nobody".to_vec()])
        .await
        .unwrap();
    let proc_status = std::fs::read_to_string(format!("/proc/{}/status", walld.pid())).unwrap();
    let uid_line = proc_status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap()
        .to_string();
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .unwrap()
        .uid
        .as_raw();
    assert!(
        uid_line
            .split_whitespace()
            .skip(1)
            .all(|u| u == nobody.to_string()),
        "{uid_line}"
    );
    let owner = std::os::unix::fs::MetadataExt::uid(
        &std::fs::metadata(walld.dir.join(wald::segment::file_name(1))).unwrap(),
    );
    assert_eq!(owner, nobody);
    assert_eq!(walld.stop().code(), Some(0), "{}", walld.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_watchdog_health_and_sync_barrier() {
    let tmp = tempfile::tempdir().unwrap();
    let mut walld = Walld::new(tmp.path());
    walld.start(&[], &[("WATCHDOG_USEC", "200000")]);
    assert!(
        walld.wait_notify("WATCHDOG=1", Duration::from_secs(5)),
        "no WATCHDOG=1"
    );
    let channel = tonic::transport::Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn({
            let path = walld.socket.clone();
            move |_: tonic::codegen::http::Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }
        }))
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let reply = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "stemedb.wal.v1.Wal".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        reply.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    // no_sync appends become durable at the next Sync barrier.
    let mut client = walld.client().await;
    let epoch = open_writer(&mut client, "sync").await;
    let ack = client
        .append(pb::AppendRequest {
            epoch,
            records: vec![b"lazy".to_vec(); 3],
            no_sync: true,
        })
        .await
        .unwrap()
        .into_inner();
    let durable = client
        .sync(pb::SyncRequest {})
        .await
        .unwrap()
        .into_inner()
        .durable_lsn;
    assert!(durable >= ack.last_lsn);
    assert_eq!(read_all(&mut client, 1).await.unwrap().len(), 3);
    let s = status(&mut client).await;
    assert_eq!((s.appended_lsn, s.durable_lsn, s.epoch), (3, 3, epoch));
    walld.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(
        walld.wait_notify("STOPPING=1", Duration::from_secs(5)),
        "no STOPPING=1"
    );
    assert_eq!(walld.wait_exit(Duration::from_secs(10)).code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_size_is_bounded_and_the_limit_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let mut walld = Walld::new(tmp.path());
    walld.start(&["--append-bytes-max", "100000"], &[]);
    let mut client = walld.client().await;
    let epoch = open_writer(&mut client, "big").await;
    let ok = append(
        &mut client,
        epoch,
        vec![vec![1u8; 50_000], vec![2u8; 49_000]],
    )
    .await
    .unwrap();
    assert_eq!(ok.last_lsn, 2);
    let over = append(&mut client, epoch, vec![vec![3u8; 100_000]])
        .await
        .unwrap_err();
    assert_eq!(over.code(), Code::InvalidArgument, "{over}");
    assert!(over.message().contains("append_bytes_max 100000"), "{over}");
    // Far above the limit the gRPC message size bound rejects it first.
    let huge = append(&mut client, epoch, vec![vec![4u8; 1 << 20]])
        .await
        .unwrap_err();
    assert!(
        matches!(huge.code(), Code::ResourceExhausted | Code::OutOfRange),
        "{huge}"
    );
    let records = read_all(&mut client, 1).await.unwrap();
    assert_eq!(records.len(), 2);
    assert_eq!(records[0].1.len(), 50_000);
    assert_eq!(walld.stop().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flags_beat_env_beat_config_file() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("walld.toml");
    std::fs::write(
        &config,
        "slow_fsync_ms = 7\nqueue_depth_max = 77\ngroup_commit_max_bytes = 4096\n",
    )
    .unwrap();
    let mut walld = Walld::new(tmp.path());
    let env = [
        ("STEMEDB_WALLD_SLOW_FSYNC_MS", "9"),
        ("STEMEDB_WALLD_QUEUE_DEPTH_MAX", "99"),
        ("STEMEDB_WALLD_ALLOW_ROOT", "1"),
    ];
    walld.start(
        &[
            "--config",
            config.to_str().unwrap(),
            "--queue-depth-max",
            "111",
        ],
        &env,
    );
    let mut client = walld.client().await;
    let config: BTreeMap<String, String> = status(&mut client)
        .await
        .config
        .into_iter()
        .map(|e| (e.key, e.value))
        .collect();
    assert_eq!(config["slow_fsync_ms"], "9", "env beats the file");
    assert_eq!(config["queue_depth_max"], "111", "flags beat env");
    assert_eq!(
        config["group_commit_max_bytes"], "4096",
        "the file beats defaults"
    );
    assert_eq!(config["append_bytes_max"], "16777216", "defaults");
    assert_eq!(walld.stop().code(), Some(0));
}
