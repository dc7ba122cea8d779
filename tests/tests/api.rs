//! End-to-end API tests: real walld and stemed processes, the Rust SDK over
//! real gRPC.

use futures::{StreamExt, TryStreamExt};
use std::collections::HashSet;
use std::time::Duration;
use stemedb_client::{Assertion, Client, HistoryQuery, Op, Query, Value};
use stemedb_proto::store::v1 as pb;
use stemedb_tests::Node;

fn claim(e: &str, a: &str, v: impl Into<Value>, s: &str) -> Assertion {
    Assertion::assert(e, a, v).source(s)
}

async fn facts_of(c: &Client, e: &str, as_of: Option<u64>) -> Vec<(String, Value, String, u64)> {
    let mut v: Vec<_> = c
        .get(e, as_of)
        .await
        .unwrap()
        .facts
        .into_iter()
        .map(|f| (f.attribute, f.value, f.source, f.tx))
        .collect();
    v.sort_by(|a, b| format!("{a:?}").cmp(&format!("{b:?}")));
    v
}

#[tokio::test]
async fn transact_then_get_query_history_as_of_and_retract() {
    let node = Node::start().await;
    let c = node.client().await;
    // Something before t1, so that "as of the tx before t1" is a real tx
    // (as_of_tx 0 means "latest").
    c.transact(vec![claim("other", "x", 1i64, "hr")])
        .await
        .unwrap();

    let t1 = c
        .transact(vec![
            claim("user:1", "name", "Ada", "hr"),
            claim("user:1", "name", "Ada L.", "crm").confidence(0.7),
            claim("user:1", "age", 36i64, "hr"),
            claim("user:1", "manager", Value::reference("user:2"), "hr"),
        ])
        .await
        .unwrap();
    assert!(!t1.deduplicated);
    let t2 = c
        .transact(vec![
            Assertion::retract("user:1", "name", "Ada").source("hr"),
            claim("user:1", "name", "Ada Lovelace", "hr"),
        ])
        .await
        .unwrap();
    assert!(t2.tx > t1.tx, "transactions are totally ordered");

    // Current view: every live claim, per source, not collapsed.
    let now = facts_of(&c, "user:1", None).await;
    let mut names: Vec<_> = now
        .iter()
        .filter(|f| f.0 == "name")
        .map(|f| (format!("{:?}", f.1), f.2.clone()))
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec![
            (
                format!("{:?}", Value::Text("Ada L.".into())),
                "crm".to_string()
            ),
            (
                format!("{:?}", Value::Text("Ada Lovelace".into())),
                "hr".to_string()
            ),
        ]
    );
    assert_eq!(now.len(), 4, "{now:?}");
    let crm = c.get("user:1", None).await.unwrap();
    let crm = crm.facts.iter().find(|f| f.source == "crm").unwrap();
    assert_eq!(crm.confidence, Some(0.7));
    assert_eq!(crm.tx, t1.tx);

    // Time travel: as of t1 the retracted claim is still live.
    let then = facts_of(&c, "user:1", Some(t1.tx)).await;
    assert!(then
        .iter()
        .any(|f| f.1 == Value::Text("Ada".into()) && f.2 == "hr"));
    assert!(!then
        .iter()
        .any(|f| f.1 == Value::Text("Ada Lovelace".into())));
    let view = c.get("user:1", Some(t1.tx)).await.unwrap();
    assert_eq!(view.basis_tx, t1.tx);
    // Before anything: empty.
    assert!(facts_of(&c, "user:1", Some(t1.tx - 1)).await.is_empty());

    // Query by attribute, by value, by source.
    let q: Vec<_> = c
        .query(Query::attribute("name"))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(q.len(), 2);
    let q: Vec<_> = c
        .query(Query::attribute("name").value("Ada L."))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(q.len(), 1);
    assert_eq!(q[0].source, "crm");
    let q: Vec<_> = c
        .query(Query::attribute("name").source("hr").as_of(t1.tx))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(q.len(), 1);
    assert_eq!(q[0].value, Value::Text("Ada".into()));

    // History: assertions and retractions in tx order.
    let h: Vec<_> = c
        .history(HistoryQuery::entity("user:1").attribute("name"))
        .try_collect()
        .await
        .unwrap();
    let ops: Vec<_> = h.iter().map(|f| (f.tx, f.op, f.value.clone())).collect();
    assert_eq!(
        ops,
        vec![
            (t1.tx, Op::Assert, Value::Text("Ada".into())),
            (t1.tx, Op::Assert, Value::Text("Ada L.".into())),
            (t2.tx, Op::Retract, Value::Text("Ada".into())),
            (t2.tx, Op::Assert, Value::Text("Ada Lovelace".into())),
        ]
    );
    let h: Vec<_> = c
        .history(HistoryQuery::entity("user:1").since(t2.tx))
        .try_collect()
        .await
        .unwrap();
    assert!(h.iter().all(|f| f.tx == t2.tx) && h.len() == 2);
}

#[tokio::test]
async fn pagination_over_ten_thousand_facts_returns_each_once() {
    let node = Node::start().await;
    let c = node.client().await;
    let n = 10_000usize;
    for chunk in (0..n).collect::<Vec<_>>().chunks(2_000) {
        let batch = chunk
            .iter()
            .map(|i| claim(&format!("item:{i:05}"), "kind", "widget", "inventory"))
            .collect();
        c.transact(batch).await.unwrap();
    }
    let all: Vec<_> = c
        .query(Query::attribute("kind").page_size(333))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(all.len(), n);
    let distinct: HashSet<_> = all.iter().map(|f| f.entity.clone()).collect();
    assert_eq!(distinct.len(), n, "every fact exactly once");

    // A page token is bound to its query and cannot be forged.
    let page = c
        .query_page(Query::attribute("kind").page_size(10), None)
        .await
        .unwrap();
    let token = page.next_page_token.clone().expect("more pages");
    let err = c
        .query_page(Query::attribute("other").page_size(10), Some(token.clone()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::InvalidArgument), "{err}");
    let mut forged = token.into_bytes();
    let mid = forged.len() / 2;
    forged[mid] = if forged[mid] == b'A' { b'B' } else { b'A' };
    let err = c
        .query_page(
            Query::attribute("kind").page_size(10),
            Some(String::from_utf8(forged).unwrap()),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::InvalidArgument), "{err}");
    assert!(err.to_string().contains("page_token"), "{err}");
}

#[tokio::test]
async fn idempotent_retry_survives_a_stemed_restart() {
    let mut node = Node::start().await;
    let c = node.client().await;
    let a = vec![claim("order:1", "total", 42i64, "shop")];
    let first = c
        .transact_with_key(a.clone(), "order-1-create")
        .await
        .unwrap();
    assert!(!first.deduplicated);
    let again = c
        .transact_with_key(a.clone(), "order-1-create")
        .await
        .unwrap();
    assert_eq!((again.tx, again.deduplicated), (first.tx, true));

    // kill -9: sled loses what it had not flushed; replay from the WAL
    // restores the key.
    node.restart_stemed().await;
    let c = node.client().await;
    let after = c.transact_with_key(a, "order-1-create").await.unwrap();
    assert_eq!((after.tx, after.deduplicated), (first.tx, true));
    assert_eq!(c.get("order:1", None).await.unwrap().facts.len(), 1);

    // Concurrent duplicates coalesce into one transaction.
    let mut joins = Vec::new();
    for _ in 0..16 {
        let c = c.clone();
        joins.push(tokio::spawn(async move {
            c.transact_with_key(vec![claim("order:2", "total", 7i64, "shop")], "order-2")
                .await
                .unwrap()
        }));
    }
    let mut txs = HashSet::new();
    let mut fresh = 0;
    for j in joins {
        let r = j.await.unwrap();
        txs.insert(r.tx);
        fresh += usize::from(!r.deduplicated);
    }
    assert_eq!((txs.len(), fresh), (1, 1));
    let h: Vec<_> = c
        .history(HistoryQuery::entity("order:2"))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(h.len(), 1);
}

#[tokio::test]
async fn watch_delivers_every_transaction_once_in_order_and_resumes() {
    let node = Node::start().await;
    let c = node.client().await;
    let mut txs = Vec::new();
    for i in 0..20i64 {
        txs.push(
            c.transact(vec![claim("counter", "value", i, "w")])
                .await
                .unwrap()
                .tx,
        );
    }
    let mut stream = Box::pin(c.watch(0).await.unwrap());
    // Live transactions written while the stream is open.
    let writer = {
        let c = c.clone();
        tokio::spawn(async move {
            let mut out = Vec::new();
            for i in 20..60i64 {
                out.push(
                    c.transact(vec![claim("counter", "value", i, "w")])
                        .await
                        .unwrap()
                        .tx,
                );
            }
            out
        })
    };
    let mut seen = Vec::new();
    while seen.len() < 60 {
        let ev = tokio::time::timeout(Duration::from_secs(20), stream.next())
            .await
            .expect("watch stalled")
            .unwrap()
            .unwrap();
        assert_eq!(ev.facts.len(), 1);
        assert_eq!(ev.facts[0].value, Value::Int64(seen.len() as i64));
        seen.push(ev.tx);
    }
    txs.extend(writer.await.unwrap());
    assert_eq!(seen, txs, "every transaction exactly once, in order");

    // Resume from a tx in the middle.
    let resume_at = txs[30];
    let resumed: Vec<u64> = Box::pin(c.watch(resume_at).await.unwrap())
        .take(30)
        .map(|e| e.unwrap().tx)
        .collect()
        .await;
    assert_eq!(resumed, txs[30..].to_vec());
}

/// Every validation limit at the boundary and one past it, through the
/// public API; the error names the field and the limit.
#[tokio::test]
async fn validation_limits_at_the_boundary() {
    let node = Node::start().await;
    let c = node.client().await;
    let mut raw = c.raw();
    let text = |s: String| pb::Value {
        kind: Some(pb::value::Kind::Text(s)),
    };
    let one = |entity: String, attribute: String, value: pb::Value, source: String, confidence| {
        pb::Assertion {
            entity,
            attribute,
            value: Some(value),
            source,
            confidence,
            op: pb::Op::Assert as i32,
        }
    };
    let ok = |a: pb::Assertion| pb::TransactRequest {
        assertions: vec![a],
        idempotency_key: String::new(),
    };
    let cases: Vec<(pb::TransactRequest, Option<&str>)> = vec![
        (
            ok(one(
                "e".repeat(512),
                "a".into(),
                text("v".into()),
                "s".into(),
                None,
            )),
            None,
        ),
        (
            ok(one(
                "e".repeat(513),
                "a".into(),
                text("v".into()),
                "s".into(),
                None,
            )),
            Some("assertions[0].entity: 513 bytes exceed name_bytes_max (512)"),
        ),
        (
            ok(one(
                "e".into(),
                "a".repeat(512),
                text("v".into()),
                "s".into(),
                None,
            )),
            None,
        ),
        (
            ok(one(
                "e".into(),
                "a".repeat(513),
                text("v".into()),
                "s".into(),
                None,
            )),
            Some("assertions[0].attribute: 513 bytes exceed name_bytes_max (512)"),
        ),
        (
            ok(one(
                "e".into(),
                "a".into(),
                text("v".into()),
                "s".repeat(512),
                None,
            )),
            None,
        ),
        (
            ok(one(
                "e".into(),
                "a".into(),
                text("v".into()),
                "s".repeat(513),
                None,
            )),
            Some("assertions[0].source: 513 bytes exceed name_bytes_max (512)"),
        ),
        (
            ok(one(
                "e".into(),
                "a".into(),
                text("v".repeat(65536)),
                "s".into(),
                None,
            )),
            None,
        ),
        (
            ok(one(
                "e".into(),
                "a".into(),
                text("v".repeat(65537)),
                "s".into(),
                None,
            )),
            Some("assertions[0].value: 65537 bytes exceed value_bytes_max (65536)"),
        ),
        (
            ok(one(
                "e".into(),
                "a".into(),
                text("v".into()),
                "s".into(),
                Some(1.0),
            )),
            None,
        ),
        (
            ok(one(
                "e".into(),
                "a".into(),
                text("v".into()),
                "s".into(),
                Some(1.5),
            )),
            Some("assertions[0].confidence: 1.5 is not a finite number in [0, 1]"),
        ),
        (
            ok(one(
                "e".into(),
                "a".into(),
                text("v".into()),
                "s".into(),
                Some(f64::NAN),
            )),
            Some("assertions[0].confidence"),
        ),
        (
            ok(one(
                String::new(),
                "a".into(),
                text("v".into()),
                "s".into(),
                None,
            )),
            Some("assertions[0].entity: required"),
        ),
        (
            pb::TransactRequest {
                assertions: vec![],
                idempotency_key: String::new(),
            },
            Some("at least 1 assertion"),
        ),
    ];
    for (i, (req, want)) in cases.into_iter().enumerate() {
        let got = raw.transact(req).await;
        match (got, want) {
            (Ok(_), None) => {}
            (Err(s), Some(w)) => {
                assert_eq!(s.code(), tonic::Code::InvalidArgument, "case {i}: {s:?}");
                assert!(
                    s.message().contains(w),
                    "case {i}: {:?} lacks {w:?}",
                    s.message()
                );
            }
            (got, want) => panic!("case {i}: got {got:?}, want {want:?}"),
        }
    }
    // The assertion count limit: 10,000 passes, 10,001 is refused.
    let many = |n: usize| pb::TransactRequest {
        assertions: (0..n)
            .map(|i| {
                one(
                    format!("bulk:{i}"),
                    "a".into(),
                    text("v".into()),
                    "s".into(),
                    None,
                )
            })
            .collect(),
        idempotency_key: String::new(),
    };
    raw.transact(many(10_000)).await.unwrap();
    let s = raw.transact(many(10_001)).await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::InvalidArgument);
    assert!(
        s.message()
            .contains("assertions: 10001 assertions exceed assertions_per_tx_max (10000)"),
        "{}",
        s.message()
    );
    // A missing value names its index.
    let mut bad = one("e".into(), "a".into(), text("v".into()), "s".into(), None);
    bad.value = None;
    let s = raw
        .transact(pb::TransactRequest {
            assertions: vec![
                one("e".into(), "a".into(), text("v".into()), "s".into(), None),
                bad,
            ],
            idempotency_key: String::new(),
        })
        .await
        .unwrap_err();
    assert!(
        s.message().contains("assertions[1].value: required"),
        "{}",
        s.message()
    );
}
