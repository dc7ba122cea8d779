//! Observability end to end, against real processes:
//!
//! - a real Prometheus (Debian's `prometheus`, `/usr/bin/prometheus`)
//!   scrapes a live node under write load; every recording and alerting
//!   rule of `monitoring/prometheus/alerts.yml` and every panel query of the
//!   Grafana dashboard runs without error through its HTTP API;
//! - `promtool check metrics` accepts the whole exposition;
//! - an in-process OTLP receiver (opentelemetry-proto's tonic server) gets
//!   the spans of both stemed and walld, and one Transact is one trace;
//! - a slow fsync (failpoint) shows in walld's log with the trace ids of
//!   its group, and in the summary's 0.99 quantile.
//!
//! Needs `prometheus`, `promtool` and `curl` on PATH, and the binaries
//! built with `cargo build --workspace --bins --features wald/failpoints`.

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use stemedb_client::Assertion;
use stemedb_proto::store::v1 as pb;
use stemedb_tests::{bin, free_port, http_get, Node};

/// Bound on every wait in this file.
const WAIT_MAX: Duration = Duration::from_secs(60);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A Prometheus server scraping one stemed every second, with our rules.
struct Prometheus {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(admin_port: u16) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let rules = repo().join("monitoring/prometheus/alerts.yml");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: stemedb\n    static_configs:\n      - targets: ['127.0.0.1:{admin_port}']\n",
            rules.canonicalize().unwrap().display()
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn prometheus (Debian package `prometheus`)");
        Prometheus { child, port, dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// GET on the HTTP API through curl (responses are chunked).
    fn get(&self, path: &str, query: Option<&str>) -> serde_json::Value {
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "--max-time", "10", "--get"]);
        if let Some(q) = query {
            cmd.arg("--data-urlencode").arg(format!("query={q}"));
        }
        let out = cmd
            .arg(format!("http://127.0.0.1:{}{path}", self.port))
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    }

    /// An instant query; panics with Prometheus' error if it fails.
    fn query(&self, expr: &str) -> Vec<serde_json::Value> {
        let v = self.get("/api/v1/query", Some(expr));
        assert_eq!(
            v["status"],
            "success",
            "query {expr:?} failed: {v}\n{}",
            self.log()
        );
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// Waits until `expr` returns at least one series.
    async fn wait_for(&self, expr: &str) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + WAIT_MAX;
        loop {
            let v = self.get("/api/v1/query", Some(expr));
            if let Some(r) = v["data"]["result"].as_array().filter(|r| !r.is_empty()) {
                return r.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no series for {expr:?}: {v}\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Closed-loop writers until `stop` is set, each at most `tx_max` transactions.
fn write_load(
    node: &Node,
    writers: usize,
    tx_max: usize,
) -> (Arc<AtomicBool>, Vec<tokio::task::JoinHandle<()>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let url = node.grpc_url();
    let joins = (0..writers)
        .map(|w| {
            let (stop, url) = (stop.clone(), url.clone());
            tokio::spawn(async move {
                let c = stemedb_client::Client::connect(url).await.unwrap();
                for i in 0..tx_max {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    c.transact(vec![Assertion::assert(
                        format!("obs:{w}:{i}"),
                        "n",
                        i as i64,
                    )
                    .source("obs")])
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    (stop, joins)
}

fn rule_queries(rules: &serde_json::Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for g in rules["data"]["groups"].as_array().unwrap() {
        for r in g["rules"].as_array().unwrap() {
            out.push((
                r["name"].as_str().unwrap().to_string(),
                r["query"].as_str().unwrap().to_string(),
                r["health"].as_str().unwrap_or("").to_string(),
            ));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_a_live_node_and_every_rule_and_panel_query_runs() {
    let node = Node::start().await;
    let (stop, writers) = write_load(&node, 4, 5000);
    let prom = Prometheus::start(node.admin_port);

    let p99 = prom
        .wait_for(r#"stemedb_wal_fsync_duration_seconds{quantile="0.99"}"#)
        .await;
    let value: f64 = p99[0]["value"][1].as_str().unwrap().parse().unwrap();
    assert!(value > 0.0 && value < 10.0, "fsync p99 {value}");
    // Two scrapes with writes between them make every rate() non-empty.
    prom.wait_for("rate(stemedb_assertions_ingested_total[5s]) > 0")
        .await;
    prom.wait_for(
        r#"rate(stemedb_api_request_duration_seconds_count{method="Transact",code="OK"}[5s]) > 0"#,
    )
    .await;

    // Every rule is loaded, evaluated without error, and its query runs.
    let expected_alerts = [
        "WALFsyncSlow",
        "WALFsyncDegrading",
        "WALFsyncFailure",
        "WALDiskFull",
        "HighStorageErrorRate",
        "DiskUtilizationHigh",
        "DiskQueueDepthHigh",
        "HighWriteLatency",
        "WritesRateLimited",
        "ApplyLagHigh",
        "NodeDraining",
        "StemeDBDown",
    ];
    let deadline = Instant::now() + WAIT_MAX;
    let rules = loop {
        let rules = rule_queries(&prom.get("/api/v1/rules", None));
        if !rules.is_empty() && rules.iter().all(|(_, _, h)| h == "ok") {
            break rules;
        }
        assert!(
            Instant::now() < deadline,
            "rules not healthy: {rules:?}\n{}",
            prom.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    for name in expected_alerts {
        assert!(
            rules.iter().any(|(n, _, _)| n == name),
            "alert {name} not loaded"
        );
    }
    for (name, query, _) in &rules {
        prom.query(query);
        eprintln!("rule ok: {name}");
    }
    // The recorded write p99 exists for this node.
    prom.wait_for("stemedb:api_write_latency_p99:seconds_rate5m")
        .await;

    // Every dashboard panel query runs; the panels the issue lists exist.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("monitoring/grafana/stemedb-wal-performance.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(dashboard["title"], "StemeDB WAL Performance");
    let panels = dashboard["panels"].as_array().unwrap();
    for want in [
        "fsync duration quantiles",
        "fsync rate",
        "group size",
        "Write throughput",
        "write latency",
        "Queue depth",
        "Apply lag",
        "WAL disk free",
    ] {
        assert!(
            panels
                .iter()
                .any(|p| p["title"].as_str().unwrap().contains(want)),
            "no panel for {want}"
        );
    }
    for p in panels {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"]
                .as_str()
                .unwrap()
                .replace("$instance", ".*")
                .replace("$__rate_interval", "5s");
            let result = prom.query(&expr);
            assert!(
                !result.is_empty(),
                "panel {:?}: {expr:?} is empty",
                p["title"]
            );
        }
    }

    // The core series are there, with values.
    for series in [
        "stemedb_wal_up == 1",
        "stemedb_wal_fsync_total > 0",
        "stemedb_wal_fsync_latency_seconds_count > 0",
        r#"stemedb_wal_state{state="serving"} == 1"#,
        "stemedb_wal_fs_free_bytes > 0",
        "stemedb_wal_durable_lsn > 0",
        "stemedb_assertions_ingested_total > 0",
        r#"stemedb_api_request_duration_seconds_bucket{method="Transact",le="+Inf"} > 0"#,
        "stemedb_apply_lag_records",
        "stemedb_write_bytes_in_flight",
        "stemedb_write_queue_depth",
        "stemedb_node_draining == 0",
        "stemedb_storage_bytes > 0",
        r#"up{job="stemedb"} == 1"#,
    ] {
        assert!(!prom.query(series).is_empty(), "{series} is empty");
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exposition_passes_promtool_and_survives_walld_going_away() {
    let mut node = Node::start().await;
    let c = node.client().await;
    for i in 0..5 {
        c.transact(vec![
            Assertion::assert(format!("p:{i}"), "n", i).source("obs")
        ])
        .await
        .unwrap();
    }
    let (code, body) = http_get(node.admin_port, "/metrics").unwrap();
    assert_eq!(code, 200);
    promtool_accepts(&body);
    assert!(body.contains("stemedb_wal_up 1\n"), "{body}");
    for q in ["0.5", "0.9", "0.99"] {
        assert!(
            body.contains(&format!(
                "stemedb_wal_fsync_duration_seconds{{quantile=\"{q}\"}} "
            )),
            "{body}"
        );
    }
    for doubled in ["_seconds_seconds", "_bytes_bytes", "_total_total"] {
        assert!(!body.contains(doubled), "{doubled} in\n{body}");
    }
    // Every family has HELP and TYPE; counters end in _total.
    for line in body.lines().filter(|l| l.starts_with("# TYPE ")) {
        let mut words = line.split_whitespace().skip(2);
        let (name, kind) = (words.next().unwrap(), words.next().unwrap());
        assert!(
            body.contains(&format!("# HELP {name} ")),
            "no HELP for {name}"
        );
        if kind == "counter" {
            assert!(name.ends_with("_total"), "counter {name}");
        }
    }

    node.kill_walld();
    let (code, body) = http_get(node.admin_port, "/metrics").unwrap();
    assert_eq!(code, 200, "the scrape must succeed without walld");
    assert!(body.contains("stemedb_wal_up 0\n"), "{body}");
    assert!(!body.contains("stemedb_wal_fsync_total"), "{body}");
    promtool_accepts(&body);
}

fn promtool_accepts(exposition: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn promtool (Debian package `prometheus`)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{exposition}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// walld and stemed started by hand, to give walld its own environment.
struct Pair {
    dir: tempfile::TempDir,
    walld: Child,
    stemed: Child,
    grpc_port: u16,
    admin_port: u16,
}

impl Pair {
    async fn start(
        walld_env: &[(&str, &str)],
        walld_args: &[&str],
        stemed_env: &[(&str, &str)],
    ) -> Pair {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("walld.sock");
        let log =
            |name: &str| std::fs::File::create(dir.path().join(format!("{name}.log"))).unwrap();
        let walld = Command::new(bin("walld"))
            .arg("--dir")
            .arg(dir.path().join("wal"))
            .arg("--socket")
            .arg(&socket)
            .arg("--allow-root")
            .args(walld_args)
            .envs(walld_env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log("walld"))
            .stderr(log("walld"))
            .spawn()
            .unwrap();
        let deadline = Instant::now() + WAIT_MAX;
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "walld not ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (grpc_port, admin_port) = (free_port(), free_port());
        let stemed = Command::new(bin("stemed"))
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--grpc-addr")
            .arg(format!("127.0.0.1:{grpc_port}"))
            .arg("--admin-addr")
            .arg(format!("127.0.0.1:{admin_port}"))
            .arg("--wal-socket")
            .arg(&socket)
            .envs(stemed_env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log("stemed"))
            .stderr(log("stemed"))
            .spawn()
            .unwrap();
        let pair = Pair {
            dir,
            walld,
            stemed,
            grpc_port,
            admin_port,
        };
        while !matches!(http_get(admin_port, "/readyz"), Ok((200, _))) {
            assert!(
                Instant::now() < deadline,
                "stemed not ready\n{}",
                pair.logs()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        pair
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    fn logs(&self) -> String {
        format!(
            "--- walld ---\n{}\n--- stemed ---\n{}",
            self.log("walld"),
            self.log("stemed")
        )
    }

    /// One Transact carrying the client's W3C `traceparent`.
    async fn transact(&self, trace_id: &str, entity: &str) {
        let mut raw =
            stemedb_client::Client::connect(format!("http://127.0.0.1:{}", self.grpc_port))
                .await
                .unwrap()
                .raw();
        let mut req = tonic::Request::new(pb::TransactRequest {
            assertions: vec![pb::Assertion {
                entity: entity.into(),
                attribute: "n".into(),
                value: Some(pb::Value {
                    kind: Some(pb::value::Kind::Int64(1)),
                }),
                source: "obs".into(),
                confidence: None,
                op: pb::Op::Assert as i32,
            }],
            idempotency_key: String::new(),
        });
        req.metadata_mut().insert(
            "traceparent",
            format!("00-{trace_id}-00f067aa0ba902b7-01")
                .parse()
                .unwrap(),
        );
        raw.transact(req).await.unwrap();
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        let _ = self.stemed.kill();
        let _ = self.stemed.wait();
        let _ = self.walld.kill();
        let _ = self.walld.wait();
    }
}

/// (service.name, span name, trace id) of every span received.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<(String, String, String)>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref()?.value.clone())
                .map(|v| match v {
                    AnyValue::StringValue(s) => s,
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    let id: String = s.trace_id.iter().map(|b| format!("{b:02x}")).collect();
                    spans.push((service.clone(), s.name, id));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

async fn start_receiver() -> (Receiver, u16) {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let service = TraceServiceServer::new(receiver.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (receiver, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_transact_is_one_trace_across_stemed_and_walld() {
    let (receiver, port) = start_receiver().await;
    let endpoint = format!("http://127.0.0.1:{port}");
    let otel = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let stemed_env = [
        otel[0],
        otel[1],
        ("STEMEDB_TELEMETRY_LOG_FORMAT", "json"),
        ("RUST_LOG", "info,stemed::telemetry=debug"),
    ];
    let pair = Pair::start(&otel, &["--log-format", "json"], &stemed_env).await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    pair.transact(trace_id, "trace:1").await;

    let deadline = Instant::now() + WAIT_MAX;
    let spans = loop {
        let spans: Vec<(String, String)> = receiver
            .spans
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, _, t)| t == trace_id)
            .map(|(s, n, _)| (s.clone(), n.clone()))
            .collect();
        let has = |svc: &str, name: &str| spans.iter().any(|(s, n)| s == svc && n == name);
        if has("stemed", "/stemedb.v1.Store/Transact")
            && has("stemed", "write.wal_append")
            && has("stemed", "write.apply")
            && has("walld", "wal.append")
            && has("walld", "wal.group")
            && has("walld", "wal.fsync")
        {
            break spans;
        }
        assert!(
            Instant::now() < deadline,
            "incomplete trace {trace_id}: {spans:?}\nall: {:?}\n{}",
            receiver.spans.lock().unwrap(),
            pair.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("trace {trace_id}: {spans:?}");
    for stage in ["write.validate", "write.admit", "write.commit"] {
        assert!(
            spans.iter().any(|(_, n)| n == stage),
            "no {stage} span: {spans:?}"
        );
    }

    // Logs: JSON lines from both; the request's log line carries the trace id.
    let stemed_log = pair.log("stemed");
    let line = stemed_log
        .lines()
        .find(|l| l.contains("request finished"))
        .unwrap_or_else(|| panic!("no request log line\n{stemed_log}"));
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["span"]["trace_id"], trace_id, "{line}");
    let walld_log = pair.log("walld");
    for l in walld_log.lines() {
        serde_json::from_str::<serde_json::Value>(l)
            .unwrap_or_else(|e| panic!("walld log line is not JSON ({e}): {l}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_fsync_warns_with_its_trace_ids_and_raises_the_p99() {
    let pair = Pair::start(
        &[("FAILPOINTS", "wal::fsync::fault=sleep(150)")],
        &["--slow-fsync-ms", "100"],
        &[],
    )
    .await;
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    for i in 0..3 {
        pair.transact(trace_id, &format!("slow:{i}")).await;
    }
    let log = pair.log("walld");
    let warning = log
        .lines()
        .find(|l| l.contains("slow fsync") && l.contains(trace_id))
        .unwrap_or_else(|| {
            panic!(
                "no slow fsync warning naming {trace_id} (is walld built with \
                 `cargo build --workspace --bins --features wald/failpoints`?)\n{log}"
            )
        });
    assert!(warning.contains("WARN"), "{warning}");

    let (code, body) = http_get(pair.admin_port, "/metrics").unwrap();
    assert_eq!(code, 200);
    let p99: f64 = body
        .lines()
        .find_map(|l| l.strip_prefix("stemedb_wal_fsync_duration_seconds{quantile=\"0.99\"} "))
        .unwrap_or_else(|| panic!("no p99 line\n{body}"))
        .parse()
        .unwrap();
    assert!(p99 > 0.1, "fsync p99 {p99} with a 150 ms fsync");
}

/// Every alert names a runbook that exists. (The runbooks' commands are run
/// against a live node by tests/tests/runbooks.rs.)
#[test]
fn every_alert_names_an_existing_runbook() {
    let alerts = std::fs::read_to_string(repo().join("monitoring/prometheus/alerts.yml")).unwrap();
    let urls: Vec<&str> = alerts
        .lines()
        .filter_map(|l| l.trim().strip_prefix("runbook_url: "))
        .collect();
    assert!(urls.len() >= 12, "{urls:?}");
    for url in urls {
        assert!(repo().join(url).is_file(), "runbook {url} is missing");
    }
}
