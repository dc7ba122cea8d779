//! The etcd load generator against a real etcd (Debian's etcd-server, as
//! bench/compare.sh runs it): what it reports is what etcd stored.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use stemedb_peer_bench::etcd::{self, pb, Op, Plan};

struct Etcd {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start_etcd() -> Etcd {
    let dir = tempfile::tempdir().unwrap();
    let (client, peer) = (free_port(), free_port());
    let url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let child = Command::new("etcd")
        .args(["--name", "t", "--data-dir"])
        .arg(dir.path().join("data"))
        .args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .args(["--listen-peer-urls", &peer_url])
        .args(["--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("t={peer_url}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcd must be installed (apt-get install etcd-server; scripts/test.sh does)");
    let etcd = Etcd {
        child,
        url,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut c) = etcd::connect(&etcd.url, 1, Duration::from_secs(2)).await {
            let probe = pb::RangeRequest {
                key: b"probe".to_vec(),
                ..Default::default()
            };
            if c[0].range(probe).await.is_ok() {
                return etcd;
            }
        }
        assert!(Instant::now() < deadline, "etcd did not start serving");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Keys under `prefix`, counted by etcd.
async fn count(url: &str, prefix: &str) -> i64 {
    let mut end = prefix.as_bytes().to_vec();
    *end.last_mut().unwrap() += 1;
    let mut c = etcd::connect(url, 1, Duration::from_secs(5)).await.unwrap();
    c[0].range(pb::RangeRequest {
        key: prefix.as_bytes().to_vec(),
        range_end: end,
        count_only: true,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .count
}

fn plan(url: &str, op: Op, seed: u64) -> Plan {
    Plan {
        endpoint: url.to_string(),
        concurrency: 4,
        connections: 2,
        op,
        value_bytes: 16,
        // No warmup: every operation started is measured, so the report
        // and etcd's key count must agree exactly.
        warmup: Duration::ZERO,
        duration: Duration::from_millis(400),
        seed,
        timeout: Duration::from_secs(10),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_match_what_etcd_stored() {
    let etcd = start_etcd().await;

    let puts = etcd::run(&plan(&etcd.url, Op::Put, 1)).await.unwrap();
    assert!(puts.writes.count > 0);
    assert_eq!(puts.errors_total, 0, "{:?}", puts.errors);
    assert_eq!(puts.assertions, puts.writes.count);
    let stored = count(&etcd.url, &format!("w/{:016x}/", 1)).await;
    assert_eq!(stored as u64, puts.assertions);

    let txns = etcd::run(&plan(&etcd.url, Op::Txn(100), 2)).await.unwrap();
    assert!(txns.writes.count > 0);
    assert_eq!(txns.errors_total, 0, "{:?}", txns.errors);
    assert_eq!(txns.assertions, 100 * txns.writes.count);
    assert_eq!(txns.tx_size, 100);
    let stored = count(&etcd.url, &format!("w/{:016x}/", 2)).await;
    assert_eq!(stored as u64, txns.assertions);

    etcd::preload(&etcd.url, 250, 320, 4, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(count(&etcd.url, "r/").await, 250);
    let reads = etcd::run(&plan(&etcd.url, Op::Range { keys: 250 }, 3))
        .await
        .unwrap();
    assert!(reads.reads.count > 0);
    assert_eq!((reads.writes.count, reads.errors_total), (0, 0));
    assert!(reads.reads.latency_us.is_some());

    // Reads of keys that were never written are errors, not reads.
    let missing = etcd::run(&plan(&etcd.url, Op::Range { keys: 500 }, 4))
        .await
        .unwrap();
    let not_found = missing.errors.get("NotFound").copied().unwrap_or(0);
    assert!(not_found > 0, "{:?}", missing.errors);
    assert_eq!(missing.errors_total, not_found);
}
