//! Write-path behaviour with real processes: group commit windows,
//! checkpoints and WAL truncation, and the link to walld going away.

use std::collections::HashMap;
use std::time::{Duration, Instant};
use stemedb_client::{Assertion, ClientOptions, Value};
use stemedb_tests::{http_get, Node, NodeOptions};

fn metrics(node: &Node) -> HashMap<String, f64> {
    let (code, body) = http_get(node.admin_port, "/metrics").unwrap();
    assert_eq!(code, 200);
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// Runs `writers` closed-loop writers for `per_writer` transactions each and
/// returns walld's fsyncs per transaction.
async fn fsyncs_per_tx(node: &Node, writers: usize, per_writer: usize) -> f64 {
    let before = metrics(node)["stemedb_wal_fsync_total"];
    let mut joins = Vec::new();
    for w in 0..writers {
        let c = node.client().await;
        joins.push(tokio::spawn(async move {
            for i in 0..per_writer {
                c.transact(vec![
                    Assertion::assert(format!("g:{w}:{i}"), "n", i as i64).source("gc")
                ])
                .await
                .unwrap();
            }
        }));
    }
    for j in joins {
        j.await.unwrap();
    }
    let after = metrics(node)["stemedb_wal_fsync_total"];
    (after - before) / (writers * per_writer) as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_larger_group_commit_window_lowers_fsyncs_per_transaction() {
    let immediate = Node::start().await;
    let ratio_immediate = fsyncs_per_tx(&immediate, 8, 40).await;
    drop(immediate);
    let windowed = Node::start_with(NodeOptions {
        stemed_env: vec![("STEMEDB_WAL_GROUP_COMMIT_MAX_WAIT_MS".into(), "10".into())],
        ..NodeOptions::default()
    })
    .await;
    let ratio_windowed = fsyncs_per_tx(&windowed, 8, 40).await;
    eprintln!("fsyncs per transaction: window 0 ms {ratio_immediate:.3}, window 10 ms {ratio_windowed:.3}");
    assert!(
        ratio_windowed < ratio_immediate * 0.6,
        "a 10 ms window should at least nearly halve fsyncs per tx: {ratio_windowed:.3} vs {ratio_immediate:.3}"
    );
}

#[tokio::test]
async fn checkpoints_truncate_the_wal_and_restart_still_recovers_everything() {
    let mut node = Node::start_with(NodeOptions {
        stemed_env: vec![(
            "STEMEDB_STORAGE_CHECKPOINT_INTERVAL_MS".into(),
            "200".into(),
        )],
        ..NodeOptions::default()
    })
    .await;
    let c = node.client().await;
    let blob = "x".repeat(8 * 1024);
    let mut txs = Vec::new();
    // ~2.5 MB of records over 256 KiB segments.
    for i in 0..300i64 {
        let r = c
            .transact(vec![Assertion::assert(
                format!("cp:{i}"),
                "blob",
                blob.clone(),
            )
            .source("cp")])
            .await
            .unwrap();
        txs.push(r.tx);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = metrics(&node);
        let first = m["stemedb_wal_first_lsn"];
        let flushed = m["stemedb_checkpoint_flushed_lsn"];
        assert!(
            first <= flushed + 1.0,
            "truncation passed the checkpoint: first_lsn {first}, flushed {flushed}"
        );
        if first > 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the WAL was never truncated: {m:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // More writes after the checkpoint, then a crash: recovery replays the
    // suffix from the WAL on top of the flushed store.
    for i in 300..340i64 {
        let r = c
            .transact(vec![Assertion::assert(
                format!("cp:{i}"),
                "blob",
                blob.clone(),
            )
            .source("cp")])
            .await
            .unwrap();
        txs.push(r.tx);
    }
    node.restart_stemed().await;
    let c = node.client().await;
    for (i, tx) in txs.iter().enumerate() {
        let v = c.get(&format!("cp:{i}"), None).await.unwrap();
        assert_eq!(v.facts.len(), 1, "cp:{i} after restart");
        assert_eq!(v.facts[0].tx, *tx);
        assert_eq!(v.facts[0].value, Value::Text(blob.clone()));
    }
    // The second Get of an entity is answered from the entity cache.
    c.get("cp:0", None).await.unwrap();
    let m = metrics(&node);
    assert!(m["stemedb_entity_cache_misses_total"] >= 340.0, "{m:?}");
    assert!(m["stemedb_entity_cache_hits_total"] >= 1.0, "{m:?}");
}

#[tokio::test]
async fn writes_fail_unavailable_while_walld_is_away_then_resume() {
    let mut node = Node::start().await;
    let c = stemedb_client::Client::connect_with(
        node.grpc_url(),
        ClientOptions {
            retry_max: 0,
            ..ClientOptions::default()
        },
    )
    .await
    .unwrap();
    let before = c
        .transact(vec![Assertion::assert("link", "n", 1i64).source("t")])
        .await
        .unwrap();
    node.kill_walld();
    // The batcher notices at its next append; readiness follows.
    let deadline = Instant::now() + Duration::from_secs(10);
    let err = loop {
        match c
            .transact(vec![Assertion::assert("link", "n", 2i64).source("t")])
            .await
        {
            Err(e) => break e,
            Ok(_) => {
                assert!(
                    Instant::now() < deadline,
                    "writes kept succeeding without walld"
                );
            }
        }
    };
    assert_eq!(err.code(), Some(tonic::Code::Unavailable), "{err}");
    assert!(
        err.to_string().contains("walld") || err.to_string().contains("WAL"),
        "the message says why: {err}"
    );
    let (code, body) = http_get(node.admin_port, "/readyz").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("walld"), "{body}");
    // Reads keep working from the store.
    assert_eq!(c.get("link", None).await.unwrap().facts[0].tx, before.tx);

    node.start_walld().await;
    node.wait_ready().await;
    let after = c
        .transact(vec![Assertion::assert("link", "n", 3i64).source("t")])
        .await
        .unwrap();
    assert!(after.tx > before.tx);
}
