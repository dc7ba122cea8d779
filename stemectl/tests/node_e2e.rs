//! stemectl's node commands (admin HTTP), `--file` loads, completions and
//! tokens against a real node (walld + stemed from the workspace build).
//!
//! Needs the binaries: `cargo build --workspace --bins` first.

use std::io::Write;
use std::process::{Output, Stdio};

use serde_json::Value as Json;
use stemedb_tests::{free_port, Node, NodeOptions};

/// A stemectl pointed at one node's gRPC and admin addresses.
struct Ctl {
    addr: String,
    admin: String,
    env: Vec<(String, String)>,
}

impl Ctl {
    fn for_node(node: &Node) -> Ctl {
        Ctl {
            addr: node.grpc_url(),
            admin: node.admin_url(),
            env: Vec::new(),
        }
    }

    fn command(&self, args: &[&str]) -> std::process::Command {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_stemectl"));
        cmd.args(["--addr", &self.addr, "--admin-addr", &self.admin])
            .args(args)
            // The environment of whoever runs the tests must not leak in.
            .env_remove("STEMEDB_TOKEN")
            .env_remove("STEMEDB_OUTPUT")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run stemectl")
    }

    /// Runs with stdin fed from `input`.
    fn run_with_stdin(&self, args: &[&str], input: &[u8]) -> Output {
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn stemectl");
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().unwrap()
    }

    /// Expects exit 0; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        expect_ok(args, self.run(args))
    }

    /// Expects exit 0 and one JSON object on stdout (`--output json`).
    fn json(&self, args: &[&str]) -> Json {
        let mut all = vec!["--output", "json"];
        all.extend_from_slice(args);
        let stdout = self.ok(&all);
        serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("stemectl {args:?}: not one JSON object ({e}): {stdout}"))
    }

    /// Expects exit `code` and returns stderr.
    fn fails(&self, code: i32, args: &[&str]) -> String {
        expect_code(code, args, self.run(args))
    }
}

fn expect_ok(args: &[&str], out: Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "stemectl {args:?} exited {}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn expect_code(code: i32, args: &[&str], out: Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(code),
        "stemectl {args:?}\nstdout: {}\nstderr: {stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
}

#[tokio::test]
async fn drain_rate_limit_status_and_wal_status_against_a_live_node() {
    let node = Node::start().await;
    let ctl = Ctl::for_node(&node);

    // status and wal status, in both output modes (`text` is `table`).
    let status = ctl.json(&["status"]);
    assert_eq!(status["state"], "serving", "{status}");
    assert_eq!(status["ready"], true, "{status}");
    let table = ctl.ok(&["status"]);
    assert!(
        table.contains("state") && table.contains("serving"),
        "{table}"
    );
    assert!(ctl.ok(&["--output", "text", "status"]).contains("serving"));
    let wal = ctl.json(&["wal", "status"]);
    assert_eq!(wal["walld"]["state"], "serving", "{wal}");
    assert_eq!(wal["walld"]["reachable"], true, "{wal}");
    assert!(
        wal["durable_lsn"].is_u64() && wal["applied_lsn"].is_u64(),
        "{wal}"
    );
    let wal_table = ctl.ok(&["wal", "status"]);
    for row in ["walld state", "durable lsn", "applied lsn", "segments"] {
        assert!(wal_table.contains(row), "no {row:?} in\n{wal_table}");
    }

    // Drain: status says so, writes fail with exit 3 naming the drain,
    // reads still work; undrain restores writes.
    ctl.ok(&["assert", "user:1", "name", "Ada"]);
    let drained = ctl.json(&["drain", "--wait", "--wait-timeout", "10s"]);
    assert_eq!(drained["state"], "draining", "{drained}");
    assert_eq!(drained["writes_in_flight"], 0, "{drained}");
    assert_eq!(ctl.json(&["status"])["state"], "draining");
    assert!(ctl.ok(&["status"]).contains("draining"));
    let stderr = ctl.fails(3, &["assert", "user:1", "name", "Bea"]);
    assert!(stderr.contains("node is draining"), "{stderr}");
    assert!(
        stderr.contains("stemectl undrain"),
        "says what to do next: {stderr}"
    );
    let view = ctl.json(&["get", "user:1"]);
    assert_eq!(
        view["facts"].as_array().unwrap().len(),
        1,
        "reads are served: {view}"
    );
    assert!(
        ctl.ok(&["drain"]).contains("draining"),
        "a second drain is harmless"
    );
    assert_eq!(ctl.json(&["undrain"])["state"], "serving");
    assert!(ctl.ok(&["undrain"]).contains("serving"));
    ctl.ok(&["assert", "user:1", "name", "Bea"]);

    // Rate limit: set, show (both modes, and in status), clear.
    assert_eq!(
        ctl.json(&["rate-limit", "set", "500"])["max_writes_per_sec"],
        500
    );
    assert_eq!(ctl.json(&["rate-limit", "show"])["max_writes_per_sec"], 500);
    assert!(ctl.ok(&["rate-limit", "show"]).contains("500 assertions/s"));
    assert_eq!(ctl.json(&["status"])["max_writes_per_sec"], 500);
    assert!(ctl.ok(&["status"]).contains("500 assertions/s"));
    assert_eq!(
        ctl.json(&["rate-limit", "clear"])["max_writes_per_sec"],
        Json::Null
    );
    assert!(ctl.ok(&["rate-limit", "show"]).contains("none"));
    // `set 0` would silently mean "no limit": it is a usage error instead.
    ctl.fails(2, &["rate-limit", "set", "0"]);
}

fn facts_file(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "{{\"entity\": \"load:{}\", \"attribute\": \"seq\", \"value\": {i}, \"source\": \"loader\"}}\n",
                i / 20
            )
        })
        .collect()
}

fn count(ctl: &Ctl, attribute: &str) -> usize {
    ctl.ok(&["--output", "json", "query", attribute])
        .lines()
        .count()
}

#[tokio::test]
async fn assert_file_loads_in_batches_and_a_rerun_is_deduplicated() {
    let node = Node::start().await;
    let ctl = Ctl::for_node(&node);
    let path = node.dir.path().join("facts.jsonl");
    std::fs::write(&path, facts_file(2500)).unwrap();
    let path = path.to_str().unwrap();

    let first = ctl.json(&["assert", "--file", path]);
    assert_eq!(
        (
            &first["lines"],
            &first["assertions"],
            &first["transactions"],
            &first["deduplicated"]
        ),
        (
            &Json::from(2500),
            &Json::from(2500),
            &Json::from(3),
            &Json::from(0)
        ),
        "{first}"
    );
    assert_eq!(count(&ctl, "seq"), 2500);
    let again = ctl.json(&["assert", "--file", path]);
    assert_eq!(again["deduplicated"], 3, "{again}");
    assert_eq!(again["last_tx"], first["last_tx"], "{again}");
    assert_eq!(count(&ctl, "seq"), 2500, "the rerun applied nothing");
    let table = ctl.ok(&["assert", "--file", path]);
    assert!(table.contains("3 already applied"), "{table}");

    // Stdin, and retract --file: lines without "op" are retractions.
    let stdin_lines = "{\"entity\": \"s:1\", \"attribute\": \"colour\", \"value\": \"red\"}\n\n{\"entity\": \"s:2\", \"attribute\": \"colour\", \"value\": \"blue\", \"confidence\": 0.5}\n";
    let args = ["--output", "json", "assert", "--file", "-", "--batch", "1"];
    let out = expect_ok(&args, ctl.run_with_stdin(&args, stdin_lines.as_bytes()));
    assert!(out.contains("\"transactions\":2"), "{out}");
    assert_eq!(count(&ctl, "colour"), 2);
    let args = ["retract", "--file", "-", "--source", "stemectl"];
    expect_ok(&args, ctl.run_with_stdin(&args, stdin_lines.as_bytes()));
    assert_eq!(count(&ctl, "colour"), 0, "retracted");

    // A bad line stops the load: its number and field are named, and
    // nothing from it on is sent.
    let mut bad = facts_file(3);
    bad.push_str(
        "{\"entity\": \"bad:1\", \"attribute\": \"seq\", \"value\": 1, \"confidence\": 2}\n",
    );
    bad.push_str("{\"entity\": \"after:1\", \"attribute\": \"tail\", \"value\": 1}\n");
    let args = ["assert", "--file", "-", "--batch", "2"];
    let stderr = expect_code(2, &args, ctl.run_with_stdin(&args, bad.as_bytes()));
    assert!(
        stderr.contains("line 4") && stderr.contains("\"confidence\""),
        "{stderr}"
    );
    assert!(
        stderr.contains("2 assertion(s) before it were applied"),
        "{stderr}"
    );
    assert_eq!(
        count(&ctl, "tail"),
        0,
        "nothing after the bad line was sent"
    );
    let view = ctl.json(&["get", "bad:1"]);
    assert!(view["facts"].as_array().unwrap().is_empty(), "{view}");

    // Usage errors: no fact and no file, a fact and a file.
    ctl.fails(2, &["assert"]);
    ctl.fails(2, &["assert", "e", "a", "v", "--file", path]);
    ctl.fails(2, &["assert", "e", "a", "v", "--batch", "5"]);
    let stderr = ctl.fails(2, &["assert", "--file", "/nonexistent/facts.jsonl"]);
    assert!(stderr.contains("cannot open"), "{stderr}");
}

#[tokio::test]
async fn tokens_are_sent_to_admin_http_and_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let admin_token = dir.path().join("admin.token");
    std::fs::write(&admin_token, "adm1n\n").unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "wr1te write\nre4d read\n").unwrap();
    let options = NodeOptions {
        stemed_env: vec![
            // Loopback is not trusted, so admin calls from here need the token.
            (
                "STEMEDB_AUTH_TRUSTED_NETWORKS".into(),
                r#"["10.0.0.0/8"]"#.into(),
            ),
            (
                "STEMEDB_AUTH_ADMIN_TOKEN_FILE".into(),
                admin_token.display().to_string(),
            ),
            (
                "STEMEDB_AUTH_TOKENS_FILE".into(),
                tokens.display().to_string(),
            ),
        ],
        ..NodeOptions::default()
    };
    let node = Node::start_with(options).await;
    let mut ctl = Ctl::for_node(&node);

    let stderr = ctl.fails(3, &["status"]);
    assert!(
        stderr.contains("401") && stderr.contains("--token"),
        "{stderr}"
    );
    ctl.fails(3, &["--token", "wrong", "status"]);
    assert_eq!(
        ctl.json(&["--token", "adm1n", "status"])["state"],
        "serving"
    );
    assert_eq!(
        ctl.json(&["--token", "adm1n", "rate-limit", "show"])["max_writes_per_sec"],
        Json::Null
    );

    let stderr = ctl.fails(3, &["assert", "e", "a", "v"]);
    assert!(
        stderr.contains("Unauthenticated") && stderr.contains("--token"),
        "{stderr}"
    );
    let stderr = ctl.fails(3, &["--token", "re4d", "assert", "e", "a", "v"]);
    assert!(stderr.contains("PermissionDenied"), "{stderr}");
    // The token from the environment, through every data path: unary,
    // paged stream, watch stream.
    ctl.env.push(("STEMEDB_TOKEN".into(), "wr1te".into()));
    ctl.ok(&["assert", "e", "a", "v"]);
    ctl.env[0].1 = "re4d".into();
    assert_eq!(
        ctl.json(&["get", "e"])["facts"].as_array().unwrap().len(),
        1
    );
    assert_eq!(count(&ctl, "a"), 1);
    assert!(ctl.ok(&["watch", "--count", "1"]).contains("tx 1"));
}

#[tokio::test]
async fn unreachable_node_exits_4_and_says_what_to_check() {
    let closed = format!("http://127.0.0.1:{}", free_port());
    let ctl = Ctl {
        addr: closed.clone(),
        admin: closed.clone(),
        env: Vec::new(),
    };
    for args in [
        &["status"][..],
        &["wal", "status"],
        &["drain"],
        &["undrain"],
        &["rate-limit", "show"],
    ] {
        let stderr = ctl.fails(4, args);
        assert!(
            stderr.contains(&format!("cannot reach stemed admin at {closed}"))
                && stderr.contains("--admin-addr"),
            "{args:?}: {stderr}"
        );
    }
    let stderr = ctl.fails(4, &["get", "e"]);
    assert!(
        stderr.contains("cannot reach stemed gRPC") && stderr.contains("--addr"),
        "{stderr}"
    );
    ctl.fails(2, &["--admin-addr", "ftp://x", "status"]);
    ctl.fails(2, &["--output", "yaml", "status"]);
}

#[test]
fn completions_and_help_examples() {
    let ctl = Ctl {
        addr: "http://127.0.0.1:1".into(),
        admin: "http://127.0.0.1:1".into(),
        env: Vec::new(),
    };
    let bash = ctl.ok(&["completions", "bash"]);
    assert!(
        bash.contains("_stemectl") && bash.contains("complete"),
        "{bash}"
    );
    assert!(ctl
        .ok(&["completions", "zsh"])
        .contains("#compdef stemectl"));
    assert!(ctl
        .ok(&["completions", "fish"])
        .contains("complete -c stemectl"));
    ctl.fails(2, &["completions", "tcsh"]);
    // Every subcommand's help has examples.
    let subcommands: &[&[&str]] = &[
        &[],
        &["assert"],
        &["retract"],
        &["get"],
        &["query"],
        &["history"],
        &["watch"],
        &["bench"],
        &["drain"],
        &["undrain"],
        &["rate-limit"],
        &["rate-limit", "show"],
        &["rate-limit", "set"],
        &["rate-limit", "clear"],
        &["status"],
        &["wal"],
        &["wal", "status"],
        &["completions"],
    ];
    for sub in subcommands {
        let mut args = sub.to_vec();
        args.push("--help");
        let help = ctl.ok(&args);
        assert!(
            help.contains("Examples:\n  stemectl "),
            "{sub:?} --help has no examples:\n{help}"
        );
    }
}

/// Runs `openssl` with `args` in `dir`, expecting success.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run openssl (the TLS test makes its certificates with it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for localhost and 127.0.0.1, and a client
/// certificate, as PEM files in `dir`.
fn make_certs(dir: &std::path::Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend_from_slice(&ec);
    ca.extend_from_slice(&[
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=stemectl test CA",
    ]);
    openssl(dir, &ca);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for (name, cn) in [
        ("server", "/CN=localhost"),
        ("client", "/CN=stemectl test client"),
    ] {
        let (key, csr, pem, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.ext"),
        );
        let mut req = vec!["req"];
        req.extend_from_slice(&ec);
        req.extend_from_slice(&["-keyout", &key, "-out", &csr, "-subj", cn]);
        openssl(dir, &req);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                &ext,
            ],
        );
    }
}

#[tokio::test]
async fn mtls_for_admin_http_and_grpc() {
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let p = |n: &str| certs.path().join(n).display().to_string();
    let node = Node::start_with(NodeOptions {
        stemed_env: vec![
            ("STEMEDB_TLS_CERT_FILE".into(), p("server.pem")),
            ("STEMEDB_TLS_KEY_FILE".into(), p("server.key")),
            ("STEMEDB_TLS_CLIENT_CA_FILE".into(), p("ca.pem")),
        ],
        ready_curl: Some(vec![
            "--cacert".into(),
            p("ca.pem"),
            "--cert".into(),
            p("client.pem"),
            "--key".into(),
            p("client.key"),
        ]),
        ..NodeOptions::default()
    })
    .await;
    let mut ctl = Ctl {
        addr: format!("https://127.0.0.1:{}", node.grpc_port),
        admin: format!("https://localhost:{}", node.admin_port),
        env: vec![("STEMEDB_CA_FILE".into(), p("ca.pem"))],
    };

    // https:// without a CA to trust is a usage error that names the flag.
    let mut no_ca = Ctl {
        env: Vec::new(),
        ..ctl
    };
    let stderr = no_ca.fails(2, &["status"]);
    assert!(stderr.contains("--ca-file"), "{stderr}");
    no_ca.fails(2, &["get", "e"]);
    // Without a client certificate the server refuses: a connection error.
    no_ca.env = vec![("STEMEDB_CA_FILE".into(), p("ca.pem"))];
    no_ca.fails(4, &["status"]);
    let stderr = no_ca.fails(4, &["get", "e"]);
    assert!(stderr.contains("--client-cert"), "{stderr}");
    ctl = no_ca;

    ctl.env
        .push(("STEMEDB_CLIENT_CERT".into(), p("client.pem")));
    ctl.env.push(("STEMEDB_CLIENT_KEY".into(), p("client.key")));
    assert_eq!(ctl.json(&["status"])["state"], "serving");
    assert_eq!(
        ctl.json(&["rate-limit", "set", "9000"])["max_writes_per_sec"],
        9000
    );
    ctl.ok(&["assert", "tls:1", "name", "Ada"]);
    assert_eq!(
        ctl.json(&["get", "tls:1"])["facts"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // A CA that did not sign the server's certificate is refused.
    let other = tempfile::tempdir().unwrap();
    make_certs(other.path());
    let wrong_ca = other.path().join("ca.pem").display().to_string();
    let stderr = ctl.fails(4, &["--ca-file", &wrong_ca, "status"]);
    assert!(stderr.contains("TLS handshake"), "{stderr}");
    ctl.fails(4, &["--ca-file", &wrong_ca, "get", "tls:1"]);
}
