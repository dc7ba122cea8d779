//! `stemectl drain --wait` with a write really in flight: walld's fsyncs
//! are slowed by a failpoint, so the write is held while the node drains;
//! it must complete, and the drain must wait for it.
//!
//! Its own test binary: it sets FAILPOINTS in the environment, which the
//! walld it starts inherits, before any other test could start a node.
//! Needs the binaries built with `--features wald/failpoints` (as the
//! project's test command does).

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use stemedb_tests::Node;

/// How long each of walld's fsyncs sleeps.
const FSYNC_SLEEP_MS: u64 = 800;
/// How long to look for the write in flight.
const OBSERVE_TIMEOUT: Duration = Duration::from_secs(20);

fn stemectl(node: &Node, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stemectl"));
    cmd.args([
        "--addr",
        &node.grpc_url(),
        "--admin-addr",
        &node.admin_url(),
    ])
    .args(args)
    .env_remove("STEMEDB_TOKEN")
    .env_remove("STEMEDB_OUTPUT");
    cmd
}

fn status(node: &Node) -> serde_json::Value {
    let out = stemectl(node, &["--output", "json", "status"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "exit {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test]
async fn drain_wait_waits_for_the_write_in_flight_which_completes() {
    // Only this test runs in this binary, and no thread has started a
    // process yet.
    std::env::set_var(
        "FAILPOINTS",
        format!("wal::fsync::fault=sleep({FSYNC_SLEEP_MS})"),
    );
    let node = Node::start().await;
    std::env::remove_var("FAILPOINTS");

    let write = stemectl(
        &node,
        &["--output", "json", "assert", "held:1", "name", "Ada"],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let deadline = Instant::now() + OBSERVE_TIMEOUT;
    while status(&node)["writes_in_flight"].as_u64() == Some(0) {
        assert!(
            Instant::now() < deadline,
            "no write in flight within {OBSERVE_TIMEOUT:?}: is walld built with --features wald/failpoints?"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let drain = stemectl(&node, &["drain", "--wait", "--wait-timeout", "30s"])
        .output()
        .unwrap();
    assert!(drain.status.success(), "{}", text(&drain));
    let stderr = String::from_utf8_lossy(&drain.stderr);
    assert!(
        stderr.contains("waiting for 1 write(s) in flight")
            && stderr.contains("no writes in flight after"),
        "progress is printed: {}",
        text(&drain)
    );
    assert!(String::from_utf8_lossy(&drain.stdout).contains("0 write(s) in flight"));
    assert_eq!(status(&node)["writes_in_flight"], 0);

    let write = write.wait_with_output().unwrap();
    assert!(
        write.status.success(),
        "the write in flight completes: {}",
        text(&write)
    );
    let view = stemectl(&node, &["--output", "json", "get", "held:1"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&view.stdout).contains("Ada"),
        "{}",
        text(&view)
    );
    let refused = stemectl(&node, &["assert", "held:2", "name", "Bea"])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(3), "{}", text(&refused));
}
