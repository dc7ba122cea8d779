//! A client in another language: the Python script in tests/python talks to
//! a real node through stubs generated from the same proto, and the Rust SDK
//! then checks that what Python wrote is there.
//!
//! Needs python3 with venv and pip access the first time: the test runs
//! tests/python/setup.sh when the venv or the stubs are missing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use stemedb_client::{Assertion, Op, Value};
use stemedb_tests::Node;

/// How long setup.sh may take (a cold pip install).
const SETUP_TIMEOUT: Duration = Duration::from_secs(600);
/// How long client.py may take.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

fn python_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("python")
}

/// Runs `program args` in the workspace root; panics with its output
/// unless it exits 0 within `timeout`. Returns stdout.
async fn run_ok(program: &Path, args: &[&str], timeout: Duration, what: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent");
    let child = tokio::process::Command::new(program)
        .args(args)
        .current_dir(root)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(timeout, child)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {timeout:?}"))
        .unwrap_or_else(|e| panic!("{what}: cannot run {}: {e}", program.display()));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{what} failed with {}\n--- stdout ---\n{stdout}\n--- stderr ---\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

async fn ensure_python_env() -> PathBuf {
    let dir = python_dir();
    let python = dir.join(".venv/bin/python");
    let stubs = dir.join("gen/stemedb/v1/store_pb2_grpc.py");
    if !python.is_file() || !stubs.is_file() {
        eprintln!("python_client: preparing {} with setup.sh", dir.display());
        run_ok(
            &dir.join("setup.sh"),
            &[],
            SETUP_TIMEOUT,
            "tests/python/setup.sh (needs python3 with venv, and PyPI for the first install)",
        )
        .await;
    }
    assert!(
        python.is_file() && stubs.is_file(),
        "setup.sh ran but {} or {} is missing",
        python.display(),
        stubs.display()
    );
    python
}

#[tokio::test]
async fn python_client_writes_what_the_rust_sdk_reads() {
    let python = ensure_python_env().await;
    let node = Node::start().await;

    let script = python_dir().join("client.py");
    let script = script.to_str().expect("utf-8 path");
    let stdout = run_ok(
        &python,
        &[script, &node.grpc_addr()],
        CLIENT_TIMEOUT,
        "tests/python/client.py",
    )
    .await;
    let report: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("client.py printed no JSON ({e}): {stdout}"));
    assert_eq!(report["ok"], true, "{report}");
    let entity = report["entity"].as_str().expect("entity in report");
    let key = report["idempotency_key"]
        .as_str()
        .expect("idempotency_key in report");
    let tx = report["tx"].as_u64().expect("tx in report");

    let client = node.client().await;
    let view = client
        .get(entity, None)
        .await
        .expect("get what python wrote");
    assert!(view.basis_tx >= tx);
    let mut facts = view.facts;
    facts.sort_by(|a, b| a.attribute.cmp(&b.attribute));
    let seen: Vec<_> = facts
        .iter()
        .map(|f| {
            (
                f.attribute.as_str(),
                f.value.clone(),
                f.confidence,
                f.source.as_str(),
                f.op,
                f.tx,
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            (
                "age",
                Value::Int64(36),
                Some(0.5),
                "python-client",
                Op::Assert,
                tx
            ),
            (
                "name",
                Value::Text("Ada Lovelace".into()),
                Some(0.9),
                "python-client",
                Op::Assert,
                tx
            ),
        ]
    );
    assert!(
        facts.iter().all(|f| f.recorded_at == facts[0].recorded_at),
        "one tx, one recorded_at"
    );

    // Before python's transaction the entity did not exist.
    if tx > 1 {
        assert!(client
            .get(entity, Some(tx - 1))
            .await
            .unwrap()
            .facts
            .is_empty());
    }

    // The idempotency key python used is honoured across clients: the same
    // key from Rust is answered with python's transaction.
    let again = client
        .transact_with_key(
            vec![Assertion::assert(entity, "name", "Ada Lovelace").source("python-client")],
            key,
        )
        .await
        .expect("transact with python's key");
    assert!(again.deduplicated, "{again:?}");
    assert_eq!(again.tx, tx);
    assert_eq!(
        client.get(entity, None).await.unwrap().facts.len(),
        2,
        "the deduplicated write added nothing"
    );
}
