//! Operating a node, end to end against real processes: the runbook's curl
//! commands byte for byte, drain, rate limits, auth, TLS and config checks.

use std::process::Command;
use std::time::{Duration, Instant};
use stemedb_client::{Assertion, ClientOptions, Query};
use stemedb_proto::store::v1 as pb;
use stemedb_tests::{bin, http_get, http_request, Node, NodeOptions};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// The tests of this file take turns: the rate-limit accuracy test
/// measures a rate over 5 s, and other nodes starting on the same two cores
/// would slow its client below the 5x it must offer.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs a runbook command as written, with only the port substituted.
fn runbook(node: &Node, command: &str) -> String {
    let command = command.replace("18180", &node.admin_port.to_string());
    let out = Command::new("bash")
        .arg("-c")
        .arg(&command)
        .output()
        .unwrap();
    assert!(out.status.success(), "{command}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

async fn health(node: &Node) -> ServingStatus {
    let channel = tonic::transport::Endpoint::from_shared(node.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut h = HealthClient::new(channel);
    let r = h
        .check(HealthCheckRequest {
            service: "stemedb.v1.Store".into(),
        })
        .await
        .unwrap()
        .into_inner();
    ServingStatus::try_from(r.status).unwrap()
}

fn one(entity: &str) -> Vec<Assertion> {
    vec![Assertion::assert(entity, "n", 1i64).source("ops")]
}

#[tokio::test]
async fn runbook_drain_and_rate_limit_commands_work_as_written() {
    let _turn = SERIAL.lock().await;
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
    let before = c.transact(one("before-drain")).await.unwrap();
    assert_eq!(health(&node).await, ServingStatus::Serving);

    let out = runbook(
        &node,
        "curl -X POST http://localhost:18180/v1/admin/node/drain",
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["state"], "draining", "{out}");
    assert!(v["writes_in_flight"].is_u64(), "{out}");

    let (code, body) = http_get(node.admin_port, "/readyz").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("node is draining"), "{body}");
    assert_eq!(health(&node).await, ServingStatus::NotServing);
    let err = c.transact(one("during-drain")).await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::Unavailable));
    assert!(err.to_string().contains("node is draining"), "{err}");
    assert_eq!(
        c.get("before-drain", None).await.unwrap().facts[0].tx,
        before.tx
    );

    // Drain survives a restart: the node must not rejoin by surprise.
    node.kill_stemed();
    // /readyz stays 503 after the restart, so wait for liveness only.
    node.start_stemed_live().await;
    let (code, _) = http_get(node.admin_port, "/readyz").unwrap();
    assert_eq!(code, 503);
    assert_eq!(health(&node).await, ServingStatus::NotServing);

    let out = runbook(
        &node,
        "curl -X POST http://localhost:18180/v1/admin/node/undrain",
    );
    assert!(out.contains("\"serving\""), "{out}");
    node.wait_ready().await;
    assert_eq!(health(&node).await, ServingStatus::Serving);
    let c = node.client().await;
    c.transact(one("after-undrain")).await.unwrap();

    // The rate-limit command, body sent as curl sends it
    // (application/x-www-form-urlencoded).
    let out = runbook(
        &node,
        "curl -X POST http://localhost:18180/v1/admin/rate-limit \\\n  -d '{\"max_writes_per_sec\": 500}'",
    );
    assert!(out.contains("500"), "{out}");
    let (_, body) = http_get(node.admin_port, "/v1/admin/rate-limit").unwrap();
    assert!(body.contains("500"), "{body}");
    // It persists across a restart until changed.
    node.restart_stemed().await;
    let (_, body) = http_get(node.admin_port, "/v1/admin/rate-limit").unwrap();
    assert!(body.contains("500"), "{body}");
    let (code, body) = http_request(
        node.admin_port,
        "POST",
        "/v1/admin/rate-limit",
        Some(r#"{"max_writes_per_sec": null}"#),
    )
    .unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("null"), "{body}");

    // The metrics command of the runbook prints the summary lines.
    let out = runbook(
        &node,
        "curl -s http://localhost:18180/metrics | grep wal_fsync_duration_seconds",
    );
    for q in ["0.5", "0.9", "0.99"] {
        assert!(
            out.contains(&format!(
                "stemedb_wal_fsync_duration_seconds{{quantile=\"{q}\"}} "
            )),
            "{out}"
        );
    }
    let out = runbook(
        &node,
        "curl -s http://localhost:18180/metrics | grep wal_fsync_total",
    );
    assert!(out.contains("stemedb_wal_fsync_total "), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_holds_within_ten_percent_and_refusals_are_whole() {
    let _turn = SERIAL.lock().await;
    let node = Node::start().await;
    let (code, body) = http_request(
        node.admin_port,
        "POST",
        "/v1/admin/rate-limit",
        Some(r#"{"max_writes_per_sec": 500}"#),
    )
    .unwrap();
    assert_eq!(code, 200, "{body}");
    // 5 assertions per transaction: the limit admits 100 tx/s; the client
    // offers 5x that for 5 s.
    let per_tx = 5usize;
    let window = Duration::from_secs(5);
    let offered_tx_per_sec = 500u64;
    let workers = 10u64;
    let start = Instant::now();
    let mut joins = Vec::new();
    for w in 0..workers {
        let mut raw = node.client().await.raw();
        joins.push(tokio::spawn(async move {
            let mut accepted = Vec::new();
            let mut refused = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_micros(
                1_000_000 * workers / offered_tx_per_sec,
            ));
            let mut i = 0u64;
            while start.elapsed() < window {
                tick.tick().await;
                let entity = format!("rl:{w}:{i}");
                i += 1;
                let req = pb::TransactRequest {
                    assertions: (0..per_tx)
                        .map(|k| pb::Assertion {
                            entity: entity.clone(),
                            attribute: format!("a{k}"),
                            value: Some(pb::Value {
                                kind: Some(pb::value::Kind::Int64(k as i64)),
                            }),
                            source: "rl".into(),
                            confidence: None,
                            op: pb::Op::Assert as i32,
                        })
                        .collect(),
                    idempotency_key: String::new(),
                };
                match raw.transact(req).await {
                    Ok(_) => accepted.push(entity),
                    Err(s) => {
                        assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{s:?}");
                        assert!(s.metadata().get("retry-after-ms").is_some(), "{s:?}");
                        assert!(!s.details().is_empty(), "RetryInfo details missing: {s:?}");
                        refused.push(entity);
                    }
                }
            }
            (accepted, refused)
        }));
    }
    let (mut accepted, mut refused) = (Vec::new(), Vec::new());
    for j in joins {
        let (a, r) = j.await.unwrap();
        accepted.extend(a);
        refused.extend(r);
    }
    let assertions = (accepted.len() * per_tx) as f64;
    let expected = 500.0 * window.as_secs_f64();
    eprintln!(
        "accepted {} tx ({assertions} assertions, expected {expected}), refused {}",
        accepted.len(),
        refused.len()
    );
    assert!(
        (assertions - expected).abs() <= expected * 0.10,
        "accepted {assertions} assertions in 5 s, expected {expected} ± 10%"
    );
    assert!(refused.len() > accepted.len(), "the client did not push 5x");
    // Every accepted transaction is whole, every refused one absent.
    let c = node.client().await;
    let facts: Vec<_> = futures::TryStreamExt::try_collect(
        c.query(Query::attribute("a0").source("rl").page_size(1000)),
    )
    .await
    .unwrap();
    assert_eq!(facts.len(), accepted.len());
    for e in accepted.iter().step_by(17) {
        assert_eq!(c.get(e, None).await.unwrap().facts.len(), per_tx, "{e}");
    }
    for e in refused.iter().step_by(97) {
        assert!(c.get(e, None).await.unwrap().facts.is_empty(), "{e}");
    }
}

#[tokio::test]
async fn admin_from_an_untrusted_address_needs_the_token() {
    let _turn = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, "t0ken-for-tests\n").unwrap();
    let node = Node::start_with(NodeOptions {
        stemed_env: vec![
            // Loopback is not trusted here, so this test's requests are
            // "from an untrusted address".
            (
                "STEMEDB_AUTH_TRUSTED_NETWORKS".into(),
                r#"["10.0.0.0/8"]"#.into(),
            ),
            (
                "STEMEDB_AUTH_ADMIN_TOKEN_FILE".into(),
                token_file.display().to_string(),
            ),
        ],
        ..NodeOptions::default()
    })
    .await;
    let url = format!("http://127.0.0.1:{}", node.admin_port);
    let curl = |args: &[&str]| {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(
        curl(&["-X", "POST", &format!("{url}/v1/admin/node/drain")]),
        "401"
    );
    assert_eq!(curl(&[&format!("{url}/v1/admin/status")]), "401");
    assert_eq!(
        curl(&[
            "-H",
            "Authorization: Bearer wrong",
            &format!("{url}/v1/admin/status")
        ]),
        "401"
    );
    assert_eq!(
        curl(&[
            "-H",
            "Authorization: Bearer t0ken-for-tests",
            &format!("{url}/v1/admin/status")
        ]),
        "200"
    );
    for open in ["/metrics", "/healthz", "/readyz"] {
        assert_eq!(curl(&[&format!("{url}{open}")]), "200", "{open}");
    }
    let log = std::fs::read_to_string(node.dir.path().join("stemed.log")).unwrap();
    assert!(!log.contains("t0ken-for-tests"), "a token reached the log");
}

#[tokio::test]
async fn admin_rejects_bad_bodies_with_clear_errors() {
    let _turn = SERIAL.lock().await;
    let node = Node::start().await;
    let post = |body: &str| {
        http_request(node.admin_port, "POST", "/v1/admin/rate-limit", Some(body)).unwrap()
    };
    let (code, body) = post("{not json");
    assert_eq!(code, 400);
    assert!(body.contains("not JSON"), "{body}");
    let (code, body) = post(r#"{"max_writes_per_sec": -5}"#);
    assert_eq!(code, 400);
    assert!(body.contains("max_writes_per_sec"), "{body}");
    let (code, _) = post(&format!(r#"{{"pad": "{}"}}"#, "x".repeat(70 * 1024)));
    assert_eq!(code, 413);
    // A client that never finishes its headers is cut off, and others are
    // served meanwhile.
    let mut slow = std::net::TcpStream::connect(("127.0.0.1", node.admin_port)).unwrap();
    std::io::Write::write_all(&mut slow, b"GET /healthz HTTP/1.1\r\nHost: x\r\n").unwrap();
    assert_eq!(http_get(node.admin_port, "/healthz").unwrap().0, 200);
}

#[tokio::test]
async fn grpc_roles_are_enforced() {
    let _turn = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "# token role\nreader-tok read\nwriter-tok write\n").unwrap();
    let node = Node::start_with(NodeOptions {
        stemed_env: vec![(
            "STEMEDB_AUTH_TOKENS_FILE".into(),
            tokens.display().to_string(),
        )],
        ..NodeOptions::default()
    })
    .await;
    let channel = tonic::transport::Endpoint::from_shared(node.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let with = |token: Option<&'static str>| {
        pb::store_client::StoreClient::with_interceptor(
            channel.clone(),
            move |mut r: tonic::Request<()>| {
                if let Some(t) = token {
                    r.metadata_mut()
                        .insert("authorization", format!("Bearer {t}").parse().unwrap());
                }
                Ok(r)
            },
        )
    };
    let tx = || pb::TransactRequest {
        assertions: vec![pb::Assertion {
            entity: "auth:1".into(),
            attribute: "a".into(),
            value: Some(pb::Value {
                kind: Some(pb::value::Kind::Bool(true)),
            }),
            source: "t".into(),
            confidence: None,
            op: 0,
        }],
        idempotency_key: String::new(),
    };
    let get = || pb::GetRequest {
        entity: "auth:1".into(),
        as_of_tx: None,
    };
    fn code<T>(r: Result<T, tonic::Status>) -> Option<tonic::Code> {
        r.err().map(|s| s.code())
    }
    assert_eq!(
        code(with(None).transact(tx()).await),
        Some(tonic::Code::Unauthenticated)
    );
    assert_eq!(
        code(with(Some("bogus")).get(get()).await),
        Some(tonic::Code::Unauthenticated)
    );
    assert_eq!(
        code(with(Some("reader-tok")).transact(tx()).await),
        Some(tonic::Code::PermissionDenied)
    );
    assert_eq!(code(with(Some("writer-tok")).transact(tx()).await), None);
    assert_eq!(code(with(Some("reader-tok")).get(get()).await), None);
    // Health checks stay open for load balancers.
    assert_eq!(health(&node).await, ServingStatus::Serving);
}

#[tokio::test]
async fn tls_and_mtls_end_to_end() {
    let _turn = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    // Distinct names: rcgen's default subject is the same for every cert,
    // which would make each leaf look self-signed.
    let named = |p: &mut rcgen::CertificateParams, cn: &str| {
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    };
    named(&mut ca_params, "StemeDB test CA");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let server_key = rcgen::KeyPair::generate().unwrap();
    let mut server_params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
    named(&mut server_params, "localhost");
    server_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let server = server_params.signed_by(&server_key, &ca, &ca_key).unwrap();
    let client_key = rcgen::KeyPair::generate().unwrap();
    let mut client_params = rcgen::CertificateParams::new(vec!["client".into()]).unwrap();
    named(&mut client_params, "client");
    client_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let client = client_params.signed_by(&client_key, &ca, &ca_key).unwrap();
    std::fs::write(p("ca.pem"), ca.pem()).unwrap();
    std::fs::write(p("server.pem"), server.pem()).unwrap();
    std::fs::write(p("server.key"), server_key.serialize_pem()).unwrap();
    std::fs::write(p("client.pem"), client.pem()).unwrap();
    std::fs::write(p("client.key"), client_key.serialize_pem()).unwrap();
    let s = |n: &str| p(n).display().to_string();
    let curl_auth = vec![
        "--cacert".to_string(),
        s("ca.pem"),
        "--cert".into(),
        s("client.pem"),
        "--key".into(),
        s("client.key"),
    ];
    let node = Node::start_with(NodeOptions {
        stemed_env: vec![
            ("STEMEDB_TLS_CERT_FILE".into(), s("server.pem")),
            ("STEMEDB_TLS_KEY_FILE".into(), s("server.key")),
            ("STEMEDB_TLS_CLIENT_CA_FILE".into(), s("ca.pem")),
        ],
        ready_curl: Some(curl_auth.clone()),
        ..NodeOptions::default()
    })
    .await;
    // Admin over mTLS with curl.
    let admin = format!("https://localhost:{}/v1/admin/status", node.admin_port);
    let out = Command::new("curl")
        .arg("-s")
        .args(&curl_auth)
        .arg(&admin)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["state"], "serving");
    // Without a client certificate the handshake fails.
    let out = Command::new("curl")
        .args(["-s", "--cacert", &s("ca.pem"), &admin])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "mTLS admin accepted a client without a certificate"
    );

    // gRPC over mTLS.
    let tls = |identity: bool| {
        let mut t = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca.pem()))
            .domain_name("localhost");
        if identity {
            t = t.identity(tonic::transport::Identity::from_pem(
                client.pem(),
                client_key.serialize_pem(),
            ));
        }
        t
    };
    let url = format!("https://localhost:{}", node.grpc_port);
    let channel = tonic::transport::Endpoint::from_shared(url.clone())
        .unwrap()
        .tls_config(tls(true))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let c = stemedb_client::Client::from_channel(channel, ClientOptions::default());
    let r = c.transact(one("tls:1")).await.unwrap();
    assert_eq!(c.get("tls:1", None).await.unwrap().facts[0].tx, r.tx);
    let refused = match tonic::transport::Endpoint::from_shared(url)
        .unwrap()
        .tls_config(tls(false))
        .unwrap()
        .connect()
        .await
    {
        Err(_) => true,
        Ok(ch) => stemedb_client::Client::from_channel(
            ch,
            ClientOptions {
                retry_max: 0,
                ..ClientOptions::default()
            },
        )
        .get("tls:1", None)
        .await
        .is_err(),
    };
    assert!(refused, "gRPC accepted a client without a certificate");
}

#[tokio::test]
async fn check_config_names_unknown_keys_bad_values_and_bad_env() {
    let _turn = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let check = |toml: &str, env: &[(&str, &str)]| {
        let f = dir.path().join("api.toml");
        std::fs::write(&f, toml).unwrap();
        let out = Command::new(bin("stemed"))
            .arg("check-config")
            .arg("--config")
            .arg(&f)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, _) = check(
        "[wal]\ngroup_commit_max_wait_ms = 10\ngroup_commit_max_bytes = 1048576\n",
        &[],
    );
    assert_eq!(code, Some(0));
    let (code, err) = check("[wal]\ngroup_commit_max_wiat_ms = 10\n", &[]);
    assert_eq!(code, Some(1));
    assert!(err.contains("group_commit_max_wiat_ms"), "{err}");
    let (code, err) = check("[limits]\nvalue_bytes_max = \"big\"\n", &[]);
    assert_eq!(code, Some(1));
    assert!(err.contains("value_bytes_max"), "{err}");
    let (code, err) = check("", &[("STEMEDB_RATE_LIMIT_WRITES_PER_SEC", "-3")]);
    assert_eq!(code, Some(1));
    assert!(err.contains("STEMEDB_RATE_LIMIT_WRITES_PER_SEC"), "{err}");
    let (code, err) = check("", &[("STEMEDB_STORAGE_DATADIR", "/x")]);
    assert_eq!(code, Some(1));
    assert!(err.contains("STEMEDB_STORAGE_DATADIR"), "{err}");
    // An override reaches the effective config.
    let out = Command::new(bin("stemed"))
        .arg("print-config")
        .env("STEMEDB_WAL_GROUP_COMMIT_MAX_WAIT_MS", "25")
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("group_commit_max_wait_ms = 25"), "{text}");
}
