//! stemectl against a real node (walld + stemed from the workspace build):
//! every data subcommand in JSON mode, the exit codes, and short bench runs.
//!
//! Needs the binaries: `cargo build --workspace --bins` first.

use std::process::Output;

use serde_json::Value as Json;
use stemedb_tests::Node;

fn stemectl(node_url: &str, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_stemectl"))
        .arg("--addr")
        .arg(node_url)
        .arg("--output")
        .arg("json")
        .args(args)
        .output()
        .expect("run stemectl")
}

/// Runs stemectl, expects exit 0, returns stdout parsed as JSON lines.
fn ok(node_url: &str, args: &[&str]) -> Vec<Json> {
    let out = stemectl(node_url, args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stemectl {args:?} exited {}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("stemectl {args:?}: not JSON ({e}): {l}"))
        })
        .collect()
}

fn exit_code(node_url: &str, args: &[&str]) -> i32 {
    stemectl(node_url, args)
        .status
        .code()
        .expect("exited normally")
}

#[tokio::test]
async fn data_commands_round_trip_through_a_real_node() {
    let node = Node::start().await;
    let url = node.grpc_url();
    let url = url.as_str();

    let t1 = ok(
        url,
        &[
            "assert",
            "user:1",
            "name",
            "Ada",
            "--source",
            "hr",
            "--confidence",
            "0.9",
        ],
    );
    let tx1 = t1[0]["tx"].as_u64().unwrap();
    assert_eq!(t1[0]["deduplicated"], false);
    let tx2 = ok(
        url,
        &[
            "assert", "user:1", "age", "36", "--type", "int", "--source", "hr",
        ],
    )[0]["tx"]
        .as_u64()
        .unwrap();
    assert!(tx2 > tx1);
    ok(
        url,
        &[
            "assert", "user:1", "manager", "user:7", "--type", "ref", "--source", "hr",
        ],
    );
    ok(
        url,
        &[
            "assert",
            "user:1",
            "digest",
            "00ff10",
            "--type",
            "bytes-hex",
            "--source",
            "hr",
        ],
    );
    ok(
        url,
        &[
            "assert",
            "user:1",
            "hired",
            "2024-05-01T09:00:00Z",
            "--type",
            "timestamp",
            "--source",
            "hr",
        ],
    );

    let view = &ok(url, &["get", "user:1"])[0];
    let facts = view["facts"].as_array().unwrap();
    assert_eq!(facts.len(), 5, "{view}");
    let by_attr = |a: &str| {
        facts
            .iter()
            .find(|f| f["attribute"] == a)
            .unwrap_or_else(|| panic!("no {a} in {view}"))
    };
    assert_eq!(
        by_attr("name")["value"],
        serde_json::json!({"type": "text", "value": "Ada"})
    );
    assert_eq!(by_attr("name")["confidence"], 0.9);
    assert_eq!(
        by_attr("age")["value"],
        serde_json::json!({"type": "int", "value": 36})
    );
    assert_eq!(by_attr("manager")["value"]["type"], "ref");
    assert_eq!(
        by_attr("digest")["value"],
        serde_json::json!({"type": "bytes-hex", "value": "00ff10"})
    );
    assert_eq!(
        by_attr("hired")["value"],
        serde_json::json!({"type": "timestamp", "value": "2024-05-01T09:00:00Z"})
    );

    let then = &ok(url, &["get", "user:1", "--as-of", &tx1.to_string()])[0];
    assert_eq!(then["facts"].as_array().unwrap().len(), 1, "{then}");

    let found = ok(url, &["query", "age", "--value", "36", "--type", "int"]);
    assert_eq!(found.len(), 1);
    assert_eq!(found[0]["entity"], "user:1");
    assert!(ok(url, &["query", "age", "--value", "37", "--type", "int"]).is_empty());
    assert_eq!(ok(url, &["query", "name", "--limit", "1"]).len(), 1);

    ok(url, &["retract", "user:1", "name", "Ada", "--source", "hr"]);
    let history = ok(url, &["history", "user:1", "--attribute", "name"]);
    let ops: Vec<_> = history
        .iter()
        .map(|f| f["op"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ops, ["assert", "retract"]);

    let events = ok(url, &["watch", "--from", "1", "--count", "3"]);
    let txs: Vec<u64> = events.iter().map(|e| e["tx"].as_u64().unwrap()).collect();
    assert_eq!(txs.len(), 3);
    assert!(txs.windows(2).all(|w| w[0] < w[1]), "{txs:?}");

    // The same idempotency key twice: one transaction.
    let a = ok(
        url,
        &["assert", "k", "a", "1", "--idempotency-key", "cli-key-1"],
    );
    let b = ok(
        url,
        &["assert", "k", "a", "1", "--idempotency-key", "cli-key-1"],
    );
    assert_eq!(a[0]["tx"], b[0]["tx"]);
    assert_eq!(b[0]["deduplicated"], true);
}

#[tokio::test]
async fn exit_codes_distinguish_usage_server_and_connection_errors() {
    let node = Node::start().await;
    let url = node.grpc_url();
    assert_eq!(
        exit_code(&url, &["assert", "e", "a", "four", "--type", "int"]),
        2,
        "bad value for its type"
    );
    assert_eq!(
        exit_code(&url, &["assert", "e", "a", "1", "--confidence", "1.5"]),
        2
    );
    assert_eq!(exit_code(&url, &["no-such-command"]), 2);
    assert_eq!(
        exit_code(&url, &["assert", "", "a", "b"]),
        3,
        "the server rejects an empty entity"
    );
    let dead = format!("http://127.0.0.1:{}", stemedb_tests::free_port());
    assert_eq!(exit_code(&dead, &["get", "e"]), 4);
}

#[tokio::test]
async fn bench_reports_one_json_object() {
    let node = Node::start().await;
    let url = node.grpc_url();
    let closed = ok(
        &url,
        &[
            "bench",
            "--duration",
            "1s",
            "--warmup",
            "200ms",
            "--concurrency",
            "4",
            "--read-ratio",
            "0.5",
            "--preload",
            "2100",
            "--seed",
            "3",
        ],
    );
    assert_eq!(closed.len(), 1);
    let r = &closed[0];
    assert_eq!(
        (
            r["mode"].as_str(),
            r["seed"].as_u64(),
            r["preload"].as_u64()
        ),
        (Some("closed"), Some(3), Some(2100))
    );
    assert!(r["writes"]["count"].as_u64().unwrap() > 0, "{r}");
    assert!(r["reads"]["count"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["errors_total"], 0, "{r}");
    let p = &r["writes"]["latency_us"];
    assert!(
        p["p50"].as_u64() <= p["p99"].as_u64() && p["p99"].as_u64() <= p["max"].as_u64(),
        "{r}"
    );

    let open = &ok(
        &url,
        &[
            "bench",
            "--rate",
            "200",
            "--duration",
            "1s",
            "--warmup",
            "0s",
            "--tx-size",
            "3",
        ],
    )[0];
    assert_eq!(open["mode"], "open");
    let writes = open["writes"]["count"].as_u64().unwrap();
    // 200 ops/s for 1 s; allow for the schedule's edges.
    assert!((150..=201).contains(&writes), "{open}");
    assert_eq!(open["assertions"].as_u64().unwrap(), writes * 3);
}
