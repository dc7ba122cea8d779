//! Hostile clients against real walld and stemed processes: oversized and
//! malformed gRPC requests, ten thousand concurrent streams, connections
//! that never speak HTTP/2, and admin HTTP clients that send garbage, huge
//! bodies or one byte a second. Each gets a clear status (or is cut off
//! within a named timeout), the node keeps serving everyone else, and its
//! memory stays bounded.

use futures::StreamExt;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};
use stemedb_proto::store::v1 as pb;
use stemedb_tests::{http_get, http_request, Node, NodeOptions};
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

/// `[limits]` defaults (stemed/src/config.rs), as the errors name them.
const GRPC_MESSAGE_BYTES_MAX: usize = 16 << 20;
const TX_BYTES_MAX: usize = 8 << 20;
const NAME_BYTES_MAX: usize = 512;
const VALUE_BYTES_MAX: usize = 64 * 1024;
const IDEMPOTENCY_KEY_BYTES_MAX: usize = 256;
const WATCH_STREAMS_MAX: usize = 1024;
/// Admin HTTP bounds (stemed/src/admin.rs).
const ADMIN_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const ADMIN_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const ADMIN_BODY_BYTES_MAX: usize = 64 * 1024;

fn text(s: impl Into<String>) -> pb::Value {
    pb::Value {
        kind: Some(pb::value::Kind::Text(s.into())),
    }
}

fn assertion(entity: &str, attribute: &str, value: pb::Value, source: &str) -> pb::Assertion {
    pb::Assertion {
        entity: entity.into(),
        attribute: attribute.into(),
        value: Some(value),
        source: source.into(),
        confidence: None,
        op: pb::Op::Assert as i32,
    }
}

fn tx(assertions: Vec<pb::Assertion>) -> pb::TransactRequest {
    pb::TransactRequest {
        assertions,
        idempotency_key: String::new(),
    }
}

async fn channel(node: &Node) -> Channel {
    Endpoint::from_shared(node.grpc_url())
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect to stemed")
}

/// A raw client without the SDK's validation, and with no client-side
/// message limits, so that only the server's limits apply.
async fn raw(node: &Node) -> pb::store_client::StoreClient<Channel> {
    pb::store_client::StoreClient::new(channel(node).await)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX)
}

/// A normal write and read-back still work.
async fn serves_normally(node: &Node, entity: &str) {
    let mut c = raw(node).await;
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        c.transact(tx(vec![assertion(entity, "ok", text("yes"), "hostile")])),
    )
    .await
    .expect("a normal write answers within 10 s")
    .unwrap_or_else(|s| panic!("a normal write failed: {s:?}\n{}", node.logs()));
    let got = c
        .get(pb::GetRequest {
            entity: entity.into(),
            as_of_tx: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(got.basis_tx >= r.into_inner().tx);
    assert_eq!(got.facts.len(), 1, "{got:?}");
}

fn expect_status<T: std::fmt::Debug>(
    what: &str,
    got: Result<T, tonic::Status>,
    codes: &[Code],
    needles: &[&str],
) {
    let s = match got {
        Ok(v) => panic!("{what}: succeeded ({v:?}), want {codes:?}"),
        Err(s) => s,
    };
    assert!(
        codes.contains(&s.code()),
        "{what}: code {:?} ({:?}), want one of {codes:?}",
        s.code(),
        s.message()
    );
    for n in needles {
        assert!(
            s.message().contains(n),
            "{what}: message {:?} lacks {n:?}",
            s.message()
        );
    }
}

/// stemed's resident set, from /proc.
fn rss_bytes(pid: u32) -> u64 {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return 0; // gone: the test's own checks say why
    };
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/<pid>/status");
    kb * 1024
}

/// stemed's thread count, from /proc (the blocking pool grows under load).
fn threads(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn admin_status(node: &Node) -> serde_json::Value {
    let (code, body) = http_get(node.admin_port, "/v1/admin/status").unwrap();
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Mirrors of the request messages with `bytes` where the API has
/// `string`, so that invalid UTF-8 reaches the server as it would from a
/// client in another language.
mod wire {
    use stemedb_proto::store::v1 as pb;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Assertion {
        #[prost(bytes = "vec", tag = "1")]
        pub entity: Vec<u8>,
        #[prost(bytes = "vec", tag = "2")]
        pub attribute: Vec<u8>,
        #[prost(message, optional, tag = "3")]
        pub value: Option<pb::Value>,
        #[prost(bytes = "vec", tag = "4")]
        pub source: Vec<u8>,
        #[prost(int32, tag = "6")]
        pub op: i32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TransactRequest {
        #[prost(message, repeated, tag = "1")]
        pub assertions: Vec<Assertion>,
        #[prost(bytes = "vec", tag = "2")]
        pub idempotency_key: Vec<u8>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct GetRequest {
        #[prost(bytes = "vec", tag = "1")]
        pub entity: Vec<u8>,
    }
}

async fn raw_unary<Req, Resp>(
    channel: &Channel,
    path: &'static str,
    req: Req,
) -> Result<Resp, tonic::Status>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
    grpc.unary(
        tonic::Request::new(req),
        tonic::codegen::http::uri::PathAndQuery::from_static(path),
        codec,
    )
    .await
    .map(|r| r.into_inner())
}

/// Reads until EOF or error; returns how long that took, or None if the
/// peer kept the connection open past `within`.
fn closed_within(s: &mut TcpStream, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        let left = within.checked_sub(started.elapsed())?;
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match s.read(&mut buf) {
            Ok(0) => return Some(started.elapsed()),
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if started.elapsed() >= within {
                    return None;
                }
            }
            Err(_) => return Some(started.elapsed()),
        }
    }
}

/// GET `path` on the admin port and how long it took.
fn timed_get(node: &Node, path: &str) -> (u16, Duration) {
    let started = Instant::now();
    let (code, body) =
        http_get(node.admin_port, path).unwrap_or_else(|e| panic!("GET {path}: {e}"));
    assert!(
        code == 200,
        "GET {path} under attack: {code} {body}\n{}",
        node.logs()
    );
    (code, started.elapsed())
}

/// A request larger than `grpc_message_bytes_max` is refused before it is
/// decoded, one between `tx_bytes_max` and it is refused by the write path,
/// an entity whose answer would exceed the message limit gets a clear
/// status; the node serves normally after each.
#[tokio::test]
async fn oversized_messages_get_a_status_naming_the_limit() {
    let node = Node::start().await;
    let mut c = raw(&node).await;

    // 17 MiB in one value: over the message limit.
    let huge = pb::Value {
        kind: Some(pb::value::Kind::Bytes(vec![
            7u8;
            GRPC_MESSAGE_BYTES_MAX
                + (1 << 20)
        ])),
    };
    let got = c
        .transact(tx(vec![assertion("big:1", "blob", huge, "hostile")]))
        .await;
    expect_status(
        "17 MiB request",
        got,
        &[Code::OutOfRange],
        &[&GRPC_MESSAGE_BYTES_MAX.to_string()],
    );
    serves_normally(&node, "after:oversized").await;

    // 9.4 MiB of valid 64 KiB values: under the message limit, over the
    // transaction limit.
    let many: Vec<_> = (0..150)
        .map(|i| {
            assertion(
                "big:2",
                &format!("part{i}"),
                pb::Value {
                    kind: Some(pb::value::Kind::Bytes(vec![1u8; VALUE_BYTES_MAX])),
                },
                "hostile",
            )
        })
        .collect();
    expect_status(
        "9.4 MiB transaction",
        c.transact(tx(many)).await,
        &[Code::InvalidArgument],
        &["tx_bytes_max", &TX_BYTES_MAX.to_string()],
    );
    serves_normally(&node, "after:tx-too-big").await;

    // An entity whose live facts are larger than one message: three
    // transactions of 100 x 64 KiB on one entity, then Get it.
    for t in 0..3 {
        let parts: Vec<_> = (0..100)
            .map(|i| {
                assertion(
                    "big:3",
                    &format!("t{t}p{i}"),
                    pb::Value {
                        kind: Some(pb::value::Kind::Bytes(vec![2u8; VALUE_BYTES_MAX])),
                    },
                    "hostile",
                )
            })
            .collect();
        c.transact(tx(parts)).await.expect("6.5 MiB transaction");
    }
    let got = c
        .get(pb::GetRequest {
            entity: "big:3".into(),
            as_of_tx: None,
        })
        .await;
    expect_status(
        "Get of a 19.7 MiB entity",
        got.map(|r| r.into_inner().facts.len()),
        &[Code::OutOfRange],
        &[&GRPC_MESSAGE_BYTES_MAX.to_string()],
    );
    serves_normally(&node, "after:big-answer").await;
}

/// Values the proto allows but the API does not: each is INVALID_ARGUMENT
/// naming the field (and the limit, where one applies); values exactly at
/// every limit succeed and read back.
#[tokio::test]
async fn invalid_values_are_refused_naming_the_field_and_max_fields_succeed() {
    let node = Node::start().await;
    let mut c = raw(&node).await;
    let ch = channel(&node).await;

    // Every field at its limit at once succeeds and reads back intact.
    let entity = "e".repeat(NAME_BYTES_MAX);
    let at_limit = pb::TransactRequest {
        assertions: vec![
            assertion(
                &entity,
                &"a".repeat(NAME_BYTES_MAX),
                pb::Value {
                    kind: Some(pb::value::Kind::Bytes(vec![0xff; VALUE_BYTES_MAX])),
                },
                &"s".repeat(NAME_BYTES_MAX),
            ),
            assertion(
                &entity,
                "ref",
                pb::Value {
                    kind: Some(pb::value::Kind::Ref("r".repeat(NAME_BYTES_MAX))),
                },
                "s",
            ),
            assertion(
                &entity,
                "ts",
                pb::Value {
                    kind: Some(pb::value::Kind::Timestamp(prost_types::Timestamp {
                        seconds: i64::MAX,
                        nanos: 999_999_999,
                    })),
                },
                "s",
            ),
            assertion(
                &entity,
                "big",
                pb::Value {
                    kind: Some(pb::value::Kind::Double(f64::MAX)),
                },
                "s",
            ),
        ],
        idempotency_key: "k".repeat(IDEMPOTENCY_KEY_BYTES_MAX),
    };
    c.transact(at_limit)
        .await
        .unwrap_or_else(|s| panic!("every field at its limit: {s:?}"));
    let got = c
        .get(pb::GetRequest {
            entity: entity.clone(),
            as_of_tx: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.facts.len(), 4);
    let blob = got
        .facts
        .iter()
        .find(|f| f.attribute.len() == NAME_BYTES_MAX)
        .unwrap();
    assert_eq!(
        blob.value,
        Some(pb::Value {
            kind: Some(pb::value::Kind::Bytes(vec![0xff; VALUE_BYTES_MAX]))
        })
    );

    let value = |k: pb::value::Kind| pb::Value { kind: Some(k) };
    let one = |a: pb::Assertion| tx(vec![assertion("ok", "ok", text("v"), "s"), a]);
    let cases: Vec<(&str, pb::TransactRequest, Vec<String>)> = vec![
        (
            "empty attribute",
            one(assertion("e", "", text("v"), "s")),
            vec!["assertions[1].attribute: required".into()],
        ),
        (
            "empty source",
            one(assertion("e", "a", text("v"), "")),
            vec!["assertions[1].source: required".into()],
        ),
        (
            "value with no kind",
            one(pb::Assertion {
                value: Some(pb::Value { kind: None }),
                ..assertion("e", "a", text("v"), "s")
            }),
            vec!["assertions[1].value".into(), "kind".into()],
        ),
        (
            "bytes one past the limit",
            one(assertion(
                "e",
                "a",
                value(pb::value::Kind::Bytes(vec![0; VALUE_BYTES_MAX + 1])),
                "s",
            )),
            vec![format!(
                "assertions[1].value: {} bytes exceed value_bytes_max ({VALUE_BYTES_MAX})",
                VALUE_BYTES_MAX + 1
            )],
        ),
        (
            "ref one past the limit",
            one(assertion(
                "e",
                "a",
                value(pb::value::Kind::Ref("r".repeat(NAME_BYTES_MAX + 1))),
                "s",
            )),
            vec![format!(
                "assertions[1].value.ref: {} bytes exceed name_bytes_max ({NAME_BYTES_MAX})",
                NAME_BYTES_MAX + 1
            )],
        ),
        (
            "empty ref",
            one(assertion("e", "a", value(pb::value::Kind::Ref(String::new())), "s")),
            vec!["assertions[1].value.ref".into()],
        ),
        (
            "NaN double",
            one(assertion("e", "a", value(pb::value::Kind::Double(f64::NAN)), "s")),
            vec!["assertions[1].value.double".into(), "not finite".into()],
        ),
        (
            "infinite double",
            one(assertion(
                "e",
                "a",
                value(pb::value::Kind::Double(f64::NEG_INFINITY)),
                "s",
            )),
            vec!["assertions[1].value.double".into(), "not finite".into()],
        ),
        (
            "infinite confidence",
            one(pb::Assertion {
                confidence: Some(f64::INFINITY),
                ..assertion("e", "a", text("v"), "s")
            }),
            vec!["assertions[1].confidence".into(), "[0, 1]".into()],
        ),
        (
            "timestamp nanos of 1e9",
            one(assertion(
                "e",
                "a",
                value(pb::value::Kind::Timestamp(prost_types::Timestamp {
                    seconds: 0,
                    nanos: 1_000_000_000,
                })),
                "s",
            )),
            vec!["assertions[1].value.timestamp.nanos".into()],
        ),
        (
            "negative timestamp nanos",
            one(assertion(
                "e",
                "a",
                value(pb::value::Kind::Timestamp(prost_types::Timestamp {
                    seconds: 0,
                    nanos: -1,
                })),
                "s",
            )),
            vec!["assertions[1].value.timestamp.nanos".into()],
        ),
        (
            "unknown op",
            one(pb::Assertion {
                op: 7,
                ..assertion("e", "a", text("v"), "s")
            }),
            vec!["assertions[1].op: unknown value 7".into()],
        ),
        (
            "negative op",
            one(pb::Assertion {
                op: -1,
                ..assertion("e", "a", text("v"), "s")
            }),
            vec!["assertions[1].op: unknown value -1".into()],
        ),
        (
            "idempotency key one past the limit",
            pb::TransactRequest {
                idempotency_key: "k".repeat(IDEMPOTENCY_KEY_BYTES_MAX + 1),
                ..tx(vec![assertion("e", "a", text("v"), "s")])
            },
            vec![format!(
                "idempotency_key: {} bytes exceed idempotency_key_bytes_max ({IDEMPOTENCY_KEY_BYTES_MAX})",
                IDEMPOTENCY_KEY_BYTES_MAX + 1
            )],
        ),
    ];
    for (what, req, needles) in cases {
        let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
        expect_status(
            what,
            c.transact(req).await,
            &[Code::InvalidArgument],
            &needles,
        );
    }

    // Reads with bad arguments.
    expect_status(
        "Get with no entity",
        c.get(pb::GetRequest::default()).await,
        &[Code::InvalidArgument],
        &["entity: required"],
    );
    expect_status(
        "Query with no attribute",
        c.query(pb::QueryRequest::default()).await,
        &[Code::InvalidArgument],
        &["attribute: required"],
    );
    expect_status(
        "Query with a value of no kind",
        c.query(pb::QueryRequest {
            attribute: "a".into(),
            value: Some(pb::Value { kind: None }),
            ..Default::default()
        })
        .await,
        &[Code::InvalidArgument],
        &["value"],
    );
    expect_status(
        "Query past page_limit_max",
        c.query(pb::QueryRequest {
            attribute: "a".into(),
            limit: u32::MAX,
            ..Default::default()
        })
        .await,
        &[Code::InvalidArgument],
        &["limit", "page_limit_max (1000)"],
    );
    for token in ["garbage", "\u{0}\u{1}", &"z".repeat(4096)] {
        expect_status(
            "Query with a forged page token",
            c.query(pb::QueryRequest {
                attribute: "a".into(),
                page_token: token.into(),
                ..Default::default()
            })
            .await,
            &[Code::InvalidArgument],
            &["page_token"],
        );
        expect_status(
            "History with a forged page token",
            c.history(pb::HistoryRequest {
                entity: "e".into(),
                page_token: token.into(),
                ..Default::default()
            })
            .await,
            &[Code::InvalidArgument],
            &["page_token"],
        );
    }
    expect_status(
        "History with since after until",
        c.history(pb::HistoryRequest {
            entity: "e".into(),
            since_tx: Some(9),
            until_tx: Some(3),
            ..Default::default()
        })
        .await,
        &[Code::InvalidArgument],
        &["since_tx", "until_tx"],
    );

    // Invalid UTF-8 where the API has strings.
    let bad_utf8 = vec![b'e', 0xff, 0xfe];
    let raw_assertion = |entity: Vec<u8>, attribute: Vec<u8>, source: Vec<u8>| wire::Assertion {
        entity,
        attribute,
        value: Some(text("v")),
        source,
        op: 0,
    };
    let utf8_cases = vec![
        (
            "entity",
            raw_assertion(bad_utf8.clone(), b"a".to_vec(), b"s".to_vec()),
            Vec::new(),
        ),
        (
            "attribute",
            raw_assertion(b"e".to_vec(), bad_utf8.clone(), b"s".to_vec()),
            Vec::new(),
        ),
        (
            "source",
            raw_assertion(b"e".to_vec(), b"a".to_vec(), bad_utf8.clone()),
            Vec::new(),
        ),
        (
            "idempotency_key",
            raw_assertion(b"e".to_vec(), b"a".to_vec(), b"s".to_vec()),
            bad_utf8.clone(),
        ),
    ];
    for (field, a, key) in utf8_cases {
        let got = raw_unary::<_, pb::TransactResponse>(
            &ch,
            "/stemedb.v1.Store/Transact",
            wire::TransactRequest {
                assertions: vec![a],
                idempotency_key: key,
            },
        )
        .await;
        expect_status(
            &format!("invalid UTF-8 in {field}"),
            got,
            &[Code::InvalidArgument],
            &[field, "UTF-8"],
        );
    }
    let got = raw_unary::<_, pb::GetResponse>(
        &ch,
        "/stemedb.v1.Store/Get",
        wire::GetRequest {
            entity: bad_utf8.clone(),
        },
    )
    .await;
    expect_status(
        "invalid UTF-8 in Get.entity",
        got,
        &[Code::InvalidArgument],
        &["entity", "UTF-8"],
    );
    // Bytes that are not a protobuf message at all.
    #[derive(Clone, PartialEq, prost::Message)]
    struct Junk {
        #[prost(bytes = "vec", tag = "1")]
        a: Vec<u8>,
    }
    // Field 1 (assertions) as a length-delimited blob of 0xff: a truncated
    // varint inside the nested message.
    let got = raw_unary::<_, pb::TransactResponse>(
        &ch,
        "/stemedb.v1.Store/Transact",
        Junk { a: vec![0xff; 64] },
    )
    .await;
    expect_status(
        "undecodable Transact body",
        got,
        &[Code::InvalidArgument],
        &["decode"],
    );

    // None of it was written, and the node still serves.
    let got = c
        .get(pb::GetRequest {
            entity: "e".into(),
            as_of_tx: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(got.facts.is_empty(), "{:?}", got.facts);
    serves_normally(&node, "after:invalid").await;
}

/// Ten thousand unary calls at once over ten connections, twice, then ten
/// thousand Watch streams at once over forty, twice: every call ends with OK or a clear
/// status within its deadline, at most `watch_streams_max` watches are
/// open, stemed's memory stays bounded and does not grow from one burst to
/// the next, and the node serves normally afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_concurrent_streams_end_with_clear_statuses_and_bounded_memory() {
    const CALLS: usize = 10_000;
    const CHANNELS: usize = 10;
    // Open watches hold their HTTP/2 stream until they are dropped, and a
    // connection carries at most grpc_streams_per_connection_max (256)
    // streams; a call beyond that waits for one to end. So that no watch
    // waits on watches of its own test, each watch connection carries at
    // most 250 of them.
    const WATCH_CHANNELS: usize = 40;
    const RSS_MAX: u64 = 300 << 20;
    let node = Node::start().await;
    let pid = node.stemed_pid().unwrap();
    let mut c = raw(&node).await;
    let seeded = c
        .transact(tx((0..100)
            .map(|i| assertion(&format!("burst:{i}"), "n", text(format!("{i}")), "hostile"))
            .collect()))
        .await
        .unwrap()
        .into_inner()
        .tx;
    let mut clients = Vec::new();
    for _ in 0..WATCH_CHANNELS {
        clients.push(raw(&node).await);
    }
    let rss_start = rss_bytes(pid);
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(rss_start));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_bytes(pid), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    let mut after_burst = Vec::new();
    for round in 0..2 {
        let started = Instant::now();
        let calls = (0..CALLS).map(|i| {
            let mut c = clients[i % CHANNELS].clone();
            async move {
                let entity = format!("burst:{}", i % 100);
                let call = async {
                    match i % 3 {
                        0 => c
                            .get(pb::GetRequest {
                                entity,
                                as_of_tx: None,
                            })
                            .await
                            .map(|r| r.into_inner().facts.len()),
                        1 => c
                            .query(pb::QueryRequest {
                                attribute: "n".into(),
                                limit: 10,
                                ..Default::default()
                            })
                            .await
                            .map(|r| r.into_inner().facts.len()),
                        _ => c
                            .history(pb::HistoryRequest {
                                entity,
                                ..Default::default()
                            })
                            .await
                            .map(|r| r.into_inner().facts.len()),
                    }
                };
                tokio::time::timeout(Duration::from_secs(60), call).await
            }
        });
        let results: Vec<_> = futures::stream::iter(calls)
            .buffer_unordered(CALLS)
            .collect()
            .await;
        let mut ok = 0;
        for r in results {
            match r {
                Err(_) => panic!("round {round}: a call hung for 60 s\n{}", node.logs()),
                Ok(Ok(n)) => {
                    assert!(n >= 1);
                    ok += 1;
                }
                Ok(Err(s)) => {
                    assert!(
                        matches!(s.code(), Code::ResourceExhausted | Code::Unavailable)
                            && !s.message().is_empty(),
                        "round {round}: unclear status {s:?}"
                    );
                }
            }
        }
        // Let the server drop what the burst allocated.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rss = rss_bytes(pid);
        eprintln!(
            "unary round {round}: {ok}/{CALLS} OK in {:?}; rss {} MiB (start {} MiB, peak {} MiB)",
            started.elapsed(),
            rss >> 20,
            rss_start >> 20,
            peak.load(std::sync::atomic::Ordering::Relaxed) >> 20
        );
        assert!(ok >= CALLS * 9 / 10, "round {round}: only {ok} calls OK");
        after_burst.push(rss);
    }
    assert!(
        after_burst[1] <= after_burst[0] + (32 << 20),
        "stemed grew from {} MiB to {} MiB between two identical bursts",
        after_burst[0] >> 20,
        after_burst[1] >> 20
    );

    let mut rss_watching = Vec::new();
    let mut after_watches = Vec::new();
    // Round 0 also grows the blocking pool and the allocator's thread
    // heaps to their working size; rounds 1 and 2 must then be alike.
    for round in 0..3 {
        // Ten thousand watches at once: up to watch_streams_max open, the rest
        // refused with the limit named.
        let started = Instant::now();
        let watches = (0..CALLS).map(|i| {
            let mut c = clients[i % WATCH_CHANNELS].clone();
            async move {
                tokio::time::timeout(
                    Duration::from_secs(60),
                    c.watch(pb::WatchRequest { from_tx: seeded }),
                )
                .await
            }
        });
        let results: Vec<_> = futures::stream::iter(watches)
            .buffer_unordered(CALLS)
            .collect()
            .await;
        let mut open = Vec::new();
        let mut refused = 0;
        for r in results {
            match r {
                Err(_) => panic!("a Watch call hung for 60 s\n{}", node.logs()),
                Ok(Ok(stream)) => open.push(stream.into_inner()),
                Ok(Err(s)) => {
                    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                    assert!(
                        s.message()
                            .contains(&format!("watch_streams_max ({WATCH_STREAMS_MAX})")),
                        "{s:?}"
                    );
                    refused += 1;
                }
            }
        }
        eprintln!(
            "watch round {round}: {} open, {refused} refused in {:?}; {} threads",
            open.len(),
            started.elapsed(),
            threads(pid)
        );
        assert!(
            open.len() <= WATCH_STREAMS_MAX,
            "{} watches open",
            open.len()
        );
        assert!(
            open.len() >= WATCH_STREAMS_MAX / 2,
            "only {} watches open",
            open.len()
        );
        assert_eq!(open.len() + refused, CALLS);
        // Every open stream delivers.
        let firsts =
            futures::future::join_all(open.iter_mut().map(|s| async {
                tokio::time::timeout(Duration::from_secs(30), s.message()).await
            }))
            .await;
        for f in firsts {
            let m = f
                .expect("an open watch delivers within 30 s")
                .unwrap()
                .unwrap();
            assert_eq!(m.tx, seeded);
        }
        assert_eq!(
            admin_status(&node)["watch_streams"].as_u64(),
            Some(open.len() as u64)
        );
        rss_watching.push(rss_bytes(pid));
        // Closing them frees the slots, and a new watch is served.
        drop(open);
        serves_normally(&node, &format!("after:burst{round}")).await;
        let deadline = Instant::now() + Duration::from_secs(20);
        while admin_status(&node)["watch_streams"].as_u64() != Some(0) {
            assert!(
                Instant::now() < deadline,
                "watch streams not released: {}",
                admin_status(&node)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let rss = rss_bytes(pid);
        eprintln!(
            "watch round {round} closed: rss {} MiB, {} threads",
            rss >> 20,
            threads(pid)
        );
        after_watches.push(rss);
    }
    assert!(
        after_watches[2] <= after_watches[1] + (32 << 20),
        "stemed grew from {} MiB to {} MiB between two identical watch bursts",
        after_watches[1] >> 20,
        after_watches[2] >> 20
    );
    let mut w = c
        .watch(pb::WatchRequest { from_tx: seeded })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(w.message().await.unwrap().unwrap().tx, seeded);
    sampler.abort();
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
    let rss_end = rss_bytes(pid);
    eprintln!(
        "rss: start {} MiB, peak {} MiB, with watches open {:?} MiB, end {} MiB",
        rss_start >> 20,
        peak >> 20,
        rss_watching.iter().map(|r| r >> 20).collect::<Vec<_>>(),
        rss_end >> 20
    );
    assert!(peak < RSS_MAX, "stemed peaked at {} MiB", peak >> 20);
}

/// A gRPC connection that never sends the HTTP/2 preface (or sends half of
/// it) does not block anyone and is closed after
/// `grpc_handshake_timeout_ms`; one that speaks HTTP/1.1 is closed at once; past `grpc_connections_max` a connection
/// is closed at once, and freed slots are reused.
#[tokio::test]
async fn grpc_clients_that_never_speak_http2_are_cut_off_and_connections_are_capped() {
    const HANDSHAKE_MS: u64 = 5_000;
    const CONNECTIONS_MAX: usize = 12;
    let node = Node::start_with(NodeOptions {
        stemed_env: vec![
            (
                "STEMEDB_LIMITS_GRPC_HANDSHAKE_TIMEOUT_MS".into(),
                HANDSHAKE_MS.to_string(),
            ),
            (
                "STEMEDB_LIMITS_GRPC_CONNECTIONS_MAX".into(),
                CONNECTIONS_MAX.to_string(),
            ),
        ],
        ..NodeOptions::default()
    })
    .await;
    let connect = || TcpStream::connect(("127.0.0.1", node.grpc_port)).unwrap();
    // Silent ones, and ones that stop in the middle of the preface.
    let mut idle: Vec<TcpStream> = (0..5).map(|_| connect()).collect();
    for _ in 0..5 {
        let mut s = connect();
        s.write_all(b"PRI * HTTP/2.0\r\n").unwrap();
        idle.push(s);
    }
    let opened = Instant::now();
    // Meanwhile a real client is served promptly.
    let started = Instant::now();
    serves_normally(&node, "while:idle").await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "a normal client waited {:?} behind idle connections",
        started.elapsed()
    );
    // The cap: 10 idle + 2 more fill it (once the server has seen the
    // client of serves_normally go); the next is closed at once.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut fill = vec![connect(), connect()];
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut over = connect();
    let t = closed_within(&mut over, Duration::from_secs(1));
    assert!(
        t.is_some(),
        "connection {} past grpc_connections_max ({CONNECTIONS_MAX}) was kept open\n{}",
        CONNECTIONS_MAX + 1,
        node.logs()
    );
    // Every idle connection is closed by the server, not before the
    // handshake timeout and not long after.
    idle.append(&mut fill);
    for s in &mut idle {
        let left = (opened + Duration::from_millis(HANDSHAKE_MS * 3))
            .saturating_duration_since(Instant::now());
        assert!(
            closed_within(s, left).is_some(),
            "an idle connection was still open {:?} after it connected",
            opened.elapsed()
        );
        assert!(
            opened.elapsed() >= Duration::from_millis(HANDSHAKE_MS - 500),
            "an idle connection was closed after {:?}, before grpc_handshake_timeout_ms",
            opened.elapsed()
        );
    }
    let all_closed = opened.elapsed();
    eprintln!("idle gRPC connections closed {all_closed:?} after connecting");
    // HTTP/1.1 on the gRPC port is closed at once, not at the timeout.
    let mut h1 = connect();
    h1.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert!(
        closed_within(&mut h1, Duration::from_secs(1)).is_some(),
        "an HTTP/1.1 request on the gRPC port was kept open"
    );
    // The slots are free again: a full set of real clients is served.
    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS_MAX {
        clients.push(raw(&node).await);
    }
    for c in &mut clients {
        c.get(pb::GetRequest {
            entity: "while:idle".into(),
            as_of_tx: None,
        })
        .await
        .unwrap();
    }
}

/// CPU seconds stemed has used, from /proc/<pid>/stat (utime + stime).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

/// Out of file descriptors, the gRPC accept loop backs off
/// (`ACCEPT_ERROR_BACKOFF`) instead of spinning on the connection the
/// kernel keeps offering, and serves again once descriptors are free.
#[tokio::test]
async fn grpc_accept_errors_back_off_and_the_node_recovers() {
    let node = Node::start_with(NodeOptions {
        stemed_env: vec![(
            "STEMEDB_LIMITS_GRPC_HANDSHAKE_TIMEOUT_MS".into(),
            "60000".into(),
        )],
        ..NodeOptions::default()
    })
    .await;
    let pid = node.stemed_pid().unwrap();
    let prlimit = |soft: &str| {
        let out = std::process::Command::new("prlimit")
            .arg(format!("--pid={pid}"))
            .arg(format!("--nofile={soft}:"))
            .output()
            .expect("prlimit (util-linux)");
        assert!(out.status.success(), "prlimit: {out:?}");
    };
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let soft_before = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .unwrap()
        .to_string();
    let open_fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    prlimit(&(open_fds + 4).to_string());
    // A few take the last descriptors; the rest wait in the backlog while
    // every accept fails with EMFILE.
    let held: Vec<TcpStream> = (0..20)
        .map(|_| TcpStream::connect(("127.0.0.1", node.grpc_port)).unwrap())
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (cpu0, t0) = (cpu_seconds(pid), Instant::now());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let busy = (cpu_seconds(pid) - cpu0) / t0.elapsed().as_secs_f64();
    let log = std::fs::read_to_string(node.dir.path().join("stemed.log")).unwrap();
    prlimit(&soft_before);
    drop(held);
    eprintln!(
        "stemed used {:.0}% of a core while out of descriptors",
        busy * 100.0
    );
    assert!(
        log.contains("gRPC accept failed"),
        "no accept failure logged: the test did not exhaust descriptors\n{}",
        node.logs()
    );
    assert!(
        busy < 0.15,
        "stemed used {:.0}% of a core while out of descriptors",
        busy * 100.0
    );
    let started = Instant::now();
    serves_normally(&node, "after:emfile").await;
    eprintln!(
        "served again {:?} after descriptors were freed",
        started.elapsed()
    );
}

/// With TLS, a client that starts the TLS handshake and stalls, and one
/// that completes nothing at all, are closed after
/// `grpc_handshake_timeout_ms`, while a TLS client is served meanwhile.
#[tokio::test]
async fn grpc_tls_handshakes_that_stall_are_cut_off() {
    const HANDSHAKE_MS: u64 = 3_000;
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert_pem, key_pem) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_pem, cert.cert.pem()).unwrap();
    std::fs::write(&key_pem, cert.key_pair.serialize_pem()).unwrap();
    let node = Node::start_with(NodeOptions {
        stemed_env: vec![
            (
                "STEMEDB_TLS_CERT_FILE".into(),
                cert_pem.display().to_string(),
            ),
            ("STEMEDB_TLS_KEY_FILE".into(), key_pem.display().to_string()),
            (
                "STEMEDB_LIMITS_GRPC_HANDSHAKE_TIMEOUT_MS".into(),
                HANDSHAKE_MS.to_string(),
            ),
        ],
        ready_curl: Some(vec!["--cacert".into(), cert_pem.display().to_string()]),
        ..NodeOptions::default()
    })
    .await;
    let connect = || TcpStream::connect(("127.0.0.1", node.grpc_port)).unwrap();
    let silent = connect();
    // A TLS record header announcing a 512-byte ClientHello, and 100 bytes
    // of it: more than the 24 bytes of an HTTP/2 preface, never finished.
    let mut stalled = connect();
    let mut hello = vec![
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    hello.resize(100, 0x42);
    stalled.write_all(&hello).unwrap();
    let opened = Instant::now();
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(cert.cert.pem()))
        .domain_name("localhost");
    let ch = Endpoint::from_shared(format!("https://localhost:{}", node.grpc_port))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .expect("a TLS client connects while others stall");
    pb::store_client::StoreClient::new(ch)
        .transact(tx(vec![assertion("tls:1", "a", text("v"), "s")]))
        .await
        .expect("a TLS client is served while others stall");
    assert!(
        opened.elapsed() < Duration::from_secs(2),
        "the TLS client waited {:?}",
        opened.elapsed()
    );
    for (what, mut s) in [("silent", silent), ("stalled handshake", stalled)] {
        let left = (opened + Duration::from_millis(HANDSHAKE_MS * 3))
            .saturating_duration_since(Instant::now());
        assert!(
            closed_within(&mut s, left).is_some(),
            "{what}: still open {:?} after it connected",
            opened.elapsed()
        );
        assert!(
            opened.elapsed() >= Duration::from_millis(HANDSHAKE_MS - 500),
            "{what}: closed after {:?}, before grpc_handshake_timeout_ms",
            opened.elapsed()
        );
    }
    eprintln!(
        "stalled TLS connections closed {:?} after connecting",
        opened.elapsed()
    );
}

/// One HTTP/2 frame: 9-byte header, then the payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// The frames a server sent: (type, stream, payload).
fn h2_frames(mut b: &[u8]) -> Vec<(u8, u32, Vec<u8>)> {
    let mut out = Vec::new();
    while b.len() >= 9 {
        let len = (b[0] as usize) << 16 | (b[1] as usize) << 8 | b[2] as usize;
        if b.len() < 9 + len {
            break;
        }
        let stream = u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff;
        out.push((b[3], stream, b[9..9 + len].to_vec()));
        b = &b[9 + len..];
    }
    out
}

/// A client whose every request is malformed (HEADERS without `:path`)
/// makes the server reset each stream; past
/// `grpc_error_resets_per_connection_max` the server closes the connection
/// with GOAWAY ENHANCE_YOUR_CALM instead of resetting forever, and serves
/// everyone else throughout.
#[tokio::test]
async fn grpc_clients_that_provoke_endless_resets_are_disconnected() {
    const RESETS_MAX: usize = 100;
    const MALFORMED: u32 = 2_000;
    let node = Node::start_with(NodeOptions {
        stemed_env: vec![(
            "STEMEDB_LIMITS_GRPC_ERROR_RESETS_PER_CONNECTION_MAX".into(),
            RESETS_MAX.to_string(),
        )],
        ..NodeOptions::default()
    })
    .await;
    let mut s = TcpStream::connect(("127.0.0.1", node.grpc_port)).unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(h2_frame(0x4, 0, 0, &[])); // SETTINGS
                                          // HPACK: :method GET, :scheme http, :authority "x"; no :path.
    let block = [0x82, 0x86, 0x01, 0x01, b'x'];
    for n in 0..MALFORMED {
        // HEADERS, END_STREAM | END_HEADERS.
        out.extend(h2_frame(0x1, 0x5, 2 * n + 1, &block));
    }
    let writer = {
        let mut w = s.try_clone().unwrap();
        std::thread::spawn(move || {
            let _ = w.write_all(&out);
        })
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    writer.join().unwrap();
    let frames = h2_frames(&got);
    let resets = frames.iter().filter(|f| f.0 == 0x3).count();
    let goaway = frames.iter().find(|f| f.0 == 0x7);
    eprintln!(
        "{MALFORMED} malformed requests: {resets} RST_STREAM, GOAWAY {:?}",
        goaway.map(|g| (&g.2[4..8], String::from_utf8_lossy(&g.2[8..])))
    );
    let goaway = goaway.unwrap_or_else(|| {
        panic!(
            "no GOAWAY after {resets} resets: the server resets without limit\n{}",
            node.logs()
        )
    });
    // Error code 0xb: ENHANCE_YOUR_CALM.
    assert_eq!(&goaway.2[4..8], &[0, 0, 0, 0xb], "GOAWAY {:?}", goaway.2);
    assert_eq!(&goaway.2[8..], b"too_many_internal_resets");
    assert!(
        resets <= RESETS_MAX + 1,
        "{resets} streams reset, over grpc_error_resets_per_connection_max ({RESETS_MAX})"
    );
    serves_normally(&node, "after:resets").await;
}

/// HTTP/2 rapid reset (CVE-2023-44487): 10,000 Get streams each cancelled
/// right after its HEADERS, far faster than the server can answer. The
/// server cuts the connection off with GOAWAY ENHANCE_YOUR_CALM (h2's bound
/// on streams reset before they are accepted), its memory stays bounded,
/// and it serves everyone else.
#[tokio::test]
async fn grpc_rapid_reset_is_cut_off() {
    const STREAMS: u32 = 10_000;
    let node = Node::start().await;
    let pid = node.stemed_pid().unwrap();
    let rss_before = rss_bytes(pid);
    let mut s = TcpStream::connect(("127.0.0.1", node.grpc_port)).unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(h2_frame(0x4, 0, 0, &[]));
    // HPACK: :method POST, :scheme http, :path, :authority, content-type, te.
    let mut block = vec![0x83, 0x86, 0x04, 21];
    block.extend_from_slice(b"/stemedb.v1.Store/Get");
    block.extend_from_slice(&[0x01, 0x01, b'x', 0x0f, 0x10, 16]);
    block.extend_from_slice(b"application/grpc");
    block.extend_from_slice(&[0x00, 2, b't', b'e', 8]);
    block.extend_from_slice(b"trailers");
    for n in 0..STREAMS {
        let id = 2 * n + 1;
        out.extend(h2_frame(0x1, 0x4, id, &block)); // HEADERS, END_HEADERS
        out.extend(h2_frame(0x3, 0, id, &[0, 0, 0, 0x8])); // RST_STREAM CANCEL
    }
    let writer = {
        let mut w = s.try_clone().unwrap();
        std::thread::spawn(move || {
            let _ = w.write_all(&out);
        })
    };
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    writer.join().unwrap();
    let frames = h2_frames(&got);
    let goaway = frames.iter().find(|f| f.0 == 0x7);
    let rss_after = rss_bytes(pid);
    eprintln!(
        "rapid reset of {STREAMS} streams: {} frames back, GOAWAY {:?}; rss {} -> {} MiB",
        frames.len(),
        goaway.map(|g| (&g.2[4..8], String::from_utf8_lossy(&g.2[8..]))),
        rss_before >> 20,
        rss_after >> 20
    );
    let goaway = goaway.unwrap_or_else(|| panic!("no GOAWAY\n{}", node.logs()));
    assert_eq!(&goaway.2[4..8], &[0, 0, 0, 0xb], "GOAWAY {:?}", goaway.2);
    assert_eq!(&goaway.2[8..], b"too_many_resets");
    assert!(
        rss_after < rss_before + (64 << 20),
        "rss grew from {} to {} MiB",
        rss_before >> 20,
        rss_after >> 20
    );
    serves_normally(&node, "after:rapid-reset").await;
}

/// `grpc_streams_per_connection_max` is what the server advertises as
/// SETTINGS_MAX_CONCURRENT_STREAMS: with 4, a fifth Watch on the same
/// connection waits until one of the four ends, while other connections
/// are served.
#[tokio::test]
async fn streams_per_connection_are_capped() {
    let node = Node::start_with(NodeOptions {
        stemed_env: vec![(
            "STEMEDB_LIMITS_GRPC_STREAMS_PER_CONNECTION_MAX".into(),
            "4".into(),
        )],
        ..NodeOptions::default()
    })
    .await;
    let mut c = raw(&node).await;
    let mut open = Vec::new();
    for _ in 0..4 {
        let w = tokio::time::timeout(
            Duration::from_secs(5),
            c.watch(pb::WatchRequest { from_tx: 1 }),
        )
        .await
        .expect("watch within the cap answers")
        .unwrap();
        open.push(w.into_inner());
    }
    let mut fifth = c.clone();
    let mut fifth = tokio::spawn(async move { fifth.watch(pb::WatchRequest { from_tx: 1 }).await });
    assert!(
        tokio::time::timeout(Duration::from_secs(1), &mut fifth)
            .await
            .is_err(),
        "a fifth stream was opened on a connection capped at 4"
    );
    serves_normally(&node, "while:capped").await;
    drop(open.pop());
    let w = tokio::time::timeout(Duration::from_secs(5), fifth)
        .await
        .expect("the fifth watch starts once a stream ends")
        .unwrap();
    assert!(w.is_ok(), "{w:?}");
}

/// With `auth.tokens_file`, what `ops.rs::grpc_roles_are_enforced` does
/// not cover: the streaming call, reflection, the other reads and bodies
/// that do not decode are all refused before any work without a valid
/// token, forged and oversized tokens included, and the node keeps serving.
#[tokio::test]
async fn unauthenticated_grpc_calls_are_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "reader-tok read\nwriter-tok write\n").unwrap();
    let node = Node::start_with(NodeOptions {
        stemed_env: vec![(
            "STEMEDB_AUTH_TOKENS_FILE".into(),
            tokens.display().to_string(),
        )],
        ..NodeOptions::default()
    })
    .await;
    let ch = channel(&node).await;
    let with = |token: Option<String>| {
        pb::store_client::StoreClient::with_interceptor(
            ch.clone(),
            move |mut r: tonic::Request<()>| {
                if let Some(t) = &token {
                    r.metadata_mut()
                        .insert("authorization", format!("Bearer {t}").parse().unwrap());
                }
                Ok(r)
            },
        )
    };
    let unauthenticated = [
        None,
        Some("bogus".to_string()),
        Some(String::new()),
        Some("reader-tok ".repeat(300)),
        Some("r".repeat(8 * 1024)),
    ];
    for token in unauthenticated {
        let what = format!(
            "token {:?}",
            token.as_deref().map(|t| &t[..t.len().min(20)])
        );
        let mut c = with(token);
        expect_status(
            &format!("Watch, {what}"),
            c.watch(pb::WatchRequest { from_tx: 1 }).await.map(|_| ()),
            &[Code::Unauthenticated],
            &[],
        );
        expect_status(
            &format!("Query, {what}"),
            c.query(pb::QueryRequest {
                attribute: "a".into(),
                ..Default::default()
            })
            .await,
            &[Code::Unauthenticated],
            &[],
        );
        expect_status(
            &format!("History, {what}"),
            c.history(pb::HistoryRequest {
                entity: "e".into(),
                ..Default::default()
            })
            .await,
            &[Code::Unauthenticated],
            &[],
        );
    }
    // A body that does not decode is refused for want of a token, not
    // decoded first.
    let got = raw_unary::<_, pb::TransactResponse>(
        &ch,
        "/stemedb.v1.Store/Transact",
        wire::TransactRequest {
            assertions: vec![wire::Assertion {
                entity: vec![0xff],
                ..Default::default()
            }],
            idempotency_key: Vec::new(),
        },
    )
    .await;
    expect_status(
        "undecodable Transact without a token",
        got,
        &[Code::Unauthenticated],
        &["authorization"],
    );
    // Reflection reveals the schema only to token holders.
    let mut reflection = tonic_reflection_client(&ch, None).await;
    assert_eq!(reflection, Code::Unauthenticated);
    reflection = tonic_reflection_client(&ch, Some("reader-tok")).await;
    assert_eq!(reflection, Code::Ok);
    // A reader may watch, not write.
    let mut reader = with(Some("reader-tok".into()));
    reader
        .watch(pb::WatchRequest { from_tx: 1 })
        .await
        .expect("a read token may watch");
    expect_status(
        "Transact with a read token",
        reader
            .transact(tx(vec![assertion("e", "a", text("v"), "s")]))
            .await,
        &[Code::PermissionDenied],
        &["Write"],
    );
    // Headers larger than the server accepts: a clear refusal, and the
    // node goes on.
    let huge = with(Some("x".repeat(64 * 1024)));
    let got = huge
        .clone()
        .get(pb::GetRequest {
            entity: "e".into(),
            as_of_tx: None,
        })
        .await;
    expect_status(
        "64 KiB authorization header",
        got,
        &[Code::ResourceExhausted],
        &[],
    );
    let mut writer = with(Some("writer-tok".into()));
    writer
        .transact(tx(vec![assertion("auth:ok", "a", text("v"), "s")]))
        .await
        .expect("a write token writes after the hostile calls");
}

/// The reflection service's answer to a `list_services` call: its code.
async fn tonic_reflection_client(ch: &Channel, token: Option<&'static str>) -> Code {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::{
        server_reflection_request::MessageRequest, ServerReflectionRequest,
    };
    let mut c =
        ServerReflectionClient::with_interceptor(ch.clone(), move |mut r: tonic::Request<()>| {
            if let Some(t) = token {
                r.metadata_mut()
                    .insert("authorization", format!("Bearer {t}").parse().unwrap());
            }
            Ok(r)
        });
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    match c.server_reflection_info(futures::stream::iter([req])).await {
        Err(s) => s.code(),
        Ok(r) => match r.into_inner().message().await {
            Ok(Some(_)) => Code::Ok,
            Ok(None) => Code::Unknown,
            Err(s) => s.code(),
        },
    }
}

/// A raw HTTP/1.1 exchange on the admin port: (status, body).
fn admin_raw(node: &Node, request: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", node.admin_port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    read_response(&mut s)
}

fn read_response(s: &mut TcpStream) -> (u16, String) {
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    stemedb_tests::parse_http_response(&String::from_utf8_lossy(&buf))
}

fn post(path: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

/// The `error` of a JSON error body.
fn json_error(code: u16, body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("{code}: error body is not JSON ({e}): {body:?}"));
    v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{code}: no error field: {body}"))
        .to_string()
}

/// Malformed JSON to every POST endpoint is 400 with a JSON error naming
/// the problem, and changes nothing.
#[tokio::test]
async fn admin_malformed_json_is_400_naming_the_problem() {
    let node = Node::start().await;
    let deep = "[".repeat(50_000);
    let cases: Vec<(&[u8], &str)> = vec![
        (b"", "not JSON"),
        (b"{not json", "not JSON"),
        (b"\xff\xfe{}", "not JSON"),
        (deep.as_bytes(), "not JSON"),
        (b"[500]", "JSON object"),
        (b"500", "JSON object"),
        (br#"{"max_writes_per_sec": "lots"}"#, "max_writes_per_sec"),
        (br#"{"max_writes_per_sec": 1e300}"#, "max_writes_per_sec"),
        (br#"{"max_writes_per_sec": -1}"#, "max_writes_per_sec"),
        (br#"{"max_writes_per_sec": 99999999999}"#, "exceeds"),
        (
            br#"{"max_writes_per_sec": 5, "burst": 9}"#,
            "unknown field \"burst\"",
        ),
        (
            br#"{"max_writes_per_sec": 5}{"max_writes_per_sec": 6}"#,
            "not JSON",
        ),
    ];
    for (body, needle) in cases {
        let (code, text) = admin_raw(&node, &post("/v1/admin/rate-limit", body));
        assert_eq!(
            code,
            400,
            "{:?}: {code} {text}",
            String::from_utf8_lossy(body)
        );
        let e = json_error(code, &text);
        assert!(
            e.contains(needle),
            "{:?}: {e:?} lacks {needle:?}",
            String::from_utf8_lossy(&body[..body.len().min(40)])
        );
    }
    let (code, text) = http_get(node.admin_port, "/v1/admin/rate-limit").unwrap();
    assert_eq!(code, 200);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&text).unwrap()["max_writes_per_sec"],
        serde_json::Value::Null,
        "a refused body changed the limit"
    );
    // drain and undrain take no body: garbage is refused and the node
    // keeps serving; an empty body or {} is what operators send.
    for path in ["/v1/admin/node/drain", "/v1/admin/node/undrain"] {
        for body in [&b"{not json"[..], b"[1]", br#"{"force": true}"#] {
            let (code, text) = admin_raw(&node, &post(path, body));
            assert_eq!(
                code,
                400,
                "{path} {:?}: {code} {text}",
                String::from_utf8_lossy(body)
            );
            assert!(json_error(code, &text).contains("body"), "{path}: {text}");
        }
        assert_eq!(
            http_get(node.admin_port, "/readyz").unwrap().0,
            200,
            "{path}"
        );
    }
    for body in [&b""[..], b"{}", b" {} \n"] {
        let (code, text) = admin_raw(&node, &post("/v1/admin/node/drain", body));
        assert_eq!(code, 200, "drain {body:?}: {text}");
        let (code, text) = admin_raw(&node, &post("/v1/admin/node/undrain", body));
        assert_eq!(code, 200, "undrain {body:?}: {text}");
    }
    // Unknown routes and methods are JSON errors too.
    let (code, text) = http_request(node.admin_port, "POST", "/v1/admin/nope", Some("{}")).unwrap();
    assert_eq!(code, 404);
    json_error(code, &text);
    let (code, _) = http_request(node.admin_port, "DELETE", "/v1/admin/rate-limit", None).unwrap();
    assert_eq!(code, 405);
    serves_normally(&node, "after:bad-json").await;
}

/// A 10 MB body is refused with 413 as soon as its headers say so, or once
/// `BODY_BYTES_MAX` has been read of a chunked one, without waiting for the
/// rest; other clients are served meanwhile.
#[tokio::test]
async fn admin_huge_bodies_are_413_without_reading_them() {
    let node = Node::start().await;
    const HUGE: usize = 10 << 20;
    for path in [
        "/v1/admin/rate-limit",
        "/v1/admin/node/drain",
        "/v1/admin/node/undrain",
    ] {
        // Headers only: the body is never sent.
        let mut s = TcpStream::connect(("127.0.0.1", node.admin_port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let started = Instant::now();
        write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {HUGE}\r\n\r\n{{\"max_writes_per_sec\": "
        )
        .unwrap();
        let (code, body) = read_response(&mut s);
        assert_eq!(code, 413, "{path}: {body}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{path}: 413 took {:?}",
            started.elapsed()
        );
        assert!(
            json_error(code, &body).contains(&ADMIN_BODY_BYTES_MAX.to_string()),
            "{path}: {body}"
        );
    }
    // Chunked, no length: refused once the limit is passed, long before
    // 10 MB.
    let mut s = TcpStream::connect(("127.0.0.1", node.admin_port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(
        b"POST /v1/admin/rate-limit HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
    )
    .unwrap();
    let chunk = vec![b' '; 16 * 1024];
    let mut sent = 0;
    while sent <= ADMIN_BODY_BYTES_MAX {
        write!(s, "{:x}\r\n", chunk.len()).unwrap();
        s.write_all(&chunk).unwrap();
        s.write_all(b"\r\n").unwrap();
        sent += chunk.len();
    }
    let (code, body) = read_response(&mut s);
    assert_eq!(code, 413, "chunked {sent} bytes: {body}");
    assert_eq!(http_get(node.admin_port, "/readyz").unwrap().0, 200);
    let (code, text) = http_get(node.admin_port, "/v1/admin/rate-limit").unwrap();
    assert_eq!(code, 200);
    assert!(text.contains("null"), "{text}");
}

/// Fifty clients that send their headers one byte a second, one that sends
/// nothing, and one whose body trickles: `/metrics` and `/readyz` stay
/// prompt (< 1 s) for everyone else, the header dawdlers are closed at
/// `HEADER_TIMEOUT`, and the slow body gets 408 at `REQUEST_TIMEOUT`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_slow_loris_clients_are_cut_off_while_others_are_served() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const SLOW: usize = 50;
    let node = Node::start().await;
    let port = node.admin_port;
    let slow_headers = |first: &'static [u8], trickle: bool| async move {
        let started = Instant::now();
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        s.write_all(first).await.unwrap();
        let mut buf = [0u8; 1024];
        let mut reply = Vec::new();
        while started.elapsed() < Duration::from_secs(45) {
            if trickle && s.write_all(b"a").await.is_err() {
                break;
            }
            match tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
                Err(_) => continue,
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => reply.extend_from_slice(&buf[..n]),
            }
        }
        (
            started.elapsed(),
            String::from_utf8_lossy(&reply).to_string(),
        )
    };
    let mut header_tasks = Vec::new();
    for _ in 0..SLOW {
        header_tasks.push(tokio::spawn(slow_headers(
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ",
            true,
        )));
    }
    let silent = tokio::spawn(slow_headers(b"", false));
    let slow_body = tokio::spawn(slow_headers(
        b"POST /v1/admin/rate-limit HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{",
        true,
    ));
    // Others are served promptly all along.
    let mut worst = Duration::ZERO;
    let until = Instant::now() + ADMIN_HEADER_TIMEOUT + Duration::from_secs(3);
    let mut probes = 0;
    while Instant::now() < until {
        for path in ["/metrics", "/readyz"] {
            let n = &node;
            let (_, took) = tokio::task::block_in_place(|| timed_get(n, path));
            worst = worst.max(took);
            probes += 1;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("{probes} probes under {SLOW} slow clients, slowest {worst:?}");
    assert!(worst < Duration::from_secs(1), "a probe took {worst:?}");
    for t in header_tasks {
        let (took, reply) = t.await.unwrap();
        assert!(
            took <= ADMIN_HEADER_TIMEOUT + Duration::from_secs(3),
            "a header dawdler was kept {took:?} ({reply:?})"
        );
        assert!(
            took >= ADMIN_HEADER_TIMEOUT - Duration::from_secs(1),
            "a header dawdler was cut after {took:?}, before HEADER_TIMEOUT"
        );
    }
    let (took, reply) = silent.await.unwrap();
    assert!(
        took <= ADMIN_HEADER_TIMEOUT + Duration::from_secs(3),
        "a silent connection was kept {took:?} ({reply:?})"
    );
    let (took, reply) = slow_body.await.unwrap();
    eprintln!("slow body cut after {took:?}: {reply:?}");
    assert!(
        took <= ADMIN_REQUEST_TIMEOUT + Duration::from_secs(3),
        "a trickling body was kept {took:?}"
    );
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply:?}");
    assert_eq!(http_get(port, "/readyz").unwrap().0, 200);
}
