//! Fault-injection process tests: walld built with the `failpoints`
//! feature reads `FAILPOINTS` at start (fail::FailScenario).
#![cfg(feature = "failpoints")]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use stemedb_proto::wal::v1 as pb;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsync_error_is_fail_stop_with_exit_70_and_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut walld = Walld::new(tmp.path());
    walld.start(
        &["--fatal-exit-delay-ms", "1500"],
        &[("FAILPOINTS", "wal::fsync::fault=40*off->return")],
    );
    let mut client = walld.client().await;
    let epoch = open_writer(&mut client, "f").await;
    let mut acked = BTreeMap::new();
    let mut failure = None;
    for i in 0..1000u32 {
        let r = format!("rec-{i}-").into_bytes().repeat(20);
        match append(&mut client, epoch, vec![r.clone()]).await {
            Ok(ack) => {
                acked.insert(ack.first_lsn, r);
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let failure = failure.expect("the injected fsync fault never fired");
    assert!(failure.message().contains("WAL fsync failed"), "{failure}");
    assert!(!acked.is_empty());
    // Later appends fail too, and Status says FAILED.
    let later = append(&mut client, epoch, vec![b"later".to_vec()])
        .await
        .unwrap_err();
    assert!(later.message().contains("WAL fsync failed"), "{later}");
    assert_eq!(later.code(), Code::Unavailable);
    let s = status(&mut client).await;
    assert_eq!(s.state, pb::WalState::Failed as i32);
    assert!(s.reason.contains("WAL fsync failed"), "{}", s.reason);
    assert!(s.fsync_errors >= 1);
    let exit = walld.wait_exit(Duration::from_secs(20));
    assert_eq!(exit.code(), Some(70), "{}", walld.log());
    assert!(walld.log().contains("fatal WAL error"));
    // After a restart without the failpoint nothing acknowledged is lost.
    walld.start(&[], &[]);
    let mut client = walld.client().await;
    check_acked(&read_all(&mut client, 1).await.unwrap(), 1, &acked);
    let epoch = open_writer(&mut client, "g").await;
    append(&mut client, epoch, vec![b"alive".to_vec()])
        .await
        .unwrap();
    assert_eq!(walld.stop().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_fsync_logs_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let mut walld = Walld::new(tmp.path());
    walld.start(
        &["--slow-fsync-ms", "100"],
        &[("FAILPOINTS", "wal::fsync::fault=sleep(150)")],
    );
    let mut client = walld.client().await;
    let epoch = open_writer(&mut client, "slow").await;
    append(
        &mut client,
        epoch,
        vec![b"slow".to_vec(), b"fsync".to_vec()],
    )
    .await
    .unwrap();
    assert_eq!(walld.stop().code(), Some(0));
    let log = walld.log();
    let line = log
        .lines()
        .find(|l| l.contains("slow fsync"))
        .unwrap_or_else(|| panic!("no slow fsync warning:\n{log}"));
    assert!(
        line.contains("WARN") && line.contains("ms") && line.contains("records"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_enospc_on_write_fails_appends_then_heals() {
    let tmp = tempfile::tempdir().unwrap();
    let mut walld = Walld::new(tmp.path());
    walld.start(
        &[],
        &[(
            "FAILPOINTS",
            "wal::write::fault=30*off->5*return(enospc)->off",
        )],
    );
    let mut client = walld.client().await;
    let epoch = open_writer(&mut client, "w").await;
    let mut acked = BTreeMap::new();
    let mut full = 0;
    for i in 0..100u32 {
        let r = format!("w-{i}").into_bytes();
        match append(&mut client, epoch, vec![r.clone()]).await {
            Ok(ack) => {
                acked.insert(ack.first_lsn, r);
            }
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
                assert!(e.message().contains("WAL disk is full"), "{e}");
                full += 1;
            }
        }
    }
    assert!(full > 0 && full <= 5, "{full} appends failed");
    assert_eq!(
        status(&mut client).await.state,
        pb::WalState::Serving as i32
    );
    check_acked(&read_all(&mut client, 1).await.unwrap(), 1, &acked);
    assert_eq!(walld.stop().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_applies_backpressure_then_resource_exhausted() {
    let tmp = tempfile::tempdir().unwrap();
    let mut walld = Walld::new(tmp.path());
    let args = ["--queue-depth-max", "2", "--queue-wait-ms-max", "50"];
    walld.start(&args, &[("FAILPOINTS", "wal::fsync::fault=sleep(300)")]);
    let mut client = walld.client().await;
    let epoch = open_writer(&mut client, "q").await;
    let mut tasks = Vec::new();
    for i in 0..8u8 {
        let mut client = walld.client().await;
        tasks.push(tokio::spawn(async move {
            append(&mut client, epoch, vec![vec![i; 10]]).await
        }));
    }
    let mut ok = 0;
    let mut exhausted = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
                assert!(e.message().contains("queue_depth_max 2"), "{e}");
                exhausted += 1;
            }
        }
    }
    assert!(ok >= 1 && exhausted >= 1, "ok {ok}, exhausted {exhausted}");
    assert_eq!(walld.stop().code(), Some(0));
}
