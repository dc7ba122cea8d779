//! The client against an in-process mock of the Store service: retries with
//! the same idempotency key, deadlines, pagination and watch resumption.
//!
//! The mock is a tiny model of the store (a `Vec` of facts), with knobs to
//! inject the failures each test needs.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::{Stream, StreamExt, TryStreamExt};
use stemedb_client::proto as pb;
use stemedb_client::proto::store_server::{Store, StoreServer};
use stemedb_client::{Assertion, Client, ClientOptions, Error, HistoryQuery, Op, Query, Value};
use tonic::{Request, Response, Status};

#[derive(Default)]
struct Model {
    facts: Vec<pb::Fact>,
    last_tx: u64,
    receipts: HashMap<String, pb::TransactResponse>,
    keys_seen: Vec<String>,
    timeouts_seen: Vec<Option<String>>,
}

#[derive(Default, Clone)]
struct Mock {
    model: Arc<Mutex<Model>>,
    /// Transact applies the write, then answers UNAVAILABLE this many
    /// times: the acknowledgement is lost.
    lose_acks: Arc<AtomicU32>,
    /// Transact refuses with UNAVAILABLE, without applying, this many times.
    refuse: Arc<AtomicU32>,
    /// The first this-many watch streams break with UNAVAILABLE after one
    /// event.
    break_watches: Arc<AtomicU32>,
    transact_calls: Arc<AtomicU32>,
    /// Get sleeps this long before answering.
    get_delay: Arc<Mutex<Duration>>,
    watch_opens: Arc<Mutex<Vec<u64>>>,
}

fn take_one(counter: &AtomicU32) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

fn page<T: Clone>(items: &[T], limit: u32, token: &str) -> Result<(Vec<T>, String), Status> {
    let offset: usize = if token.is_empty() {
        0
    } else {
        token
            .parse()
            .map_err(|_| Status::invalid_argument("bad page_token"))?
    };
    let limit = if limit == 0 { 100 } else { limit as usize };
    let end = (offset + limit).min(items.len());
    let next = if end < items.len() {
        end.to_string()
    } else {
        String::new()
    };
    Ok((items[offset.min(end)..end].to_vec(), next))
}

#[tonic::async_trait]
impl Store for Mock {
    async fn transact(
        &self,
        request: Request<pb::TransactRequest>,
    ) -> Result<Response<pb::TransactResponse>, Status> {
        self.transact_calls.fetch_add(1, Ordering::SeqCst);
        if take_one(&self.refuse) {
            return Err(Status::unavailable("refusing"));
        }
        let timeout = request
            .metadata()
            .get("grpc-timeout")
            .map(|v| v.to_str().unwrap().to_string());
        let req = request.into_inner();
        let mut m = self.model.lock().unwrap();
        m.timeouts_seen.push(timeout);
        m.keys_seen.push(req.idempotency_key.clone());
        let response = match m.receipts.get(&req.idempotency_key) {
            Some(r) if !req.idempotency_key.is_empty() => pb::TransactResponse {
                deduplicated: true,
                ..*r
            },
            _ => {
                m.last_tx += 1;
                let tx = m.last_tx;
                let recorded_at = Some(prost_types_now());
                for a in req.assertions {
                    m.facts.push(pb::Fact {
                        entity: a.entity,
                        attribute: a.attribute,
                        value: a.value,
                        source: a.source,
                        confidence: a.confidence,
                        op: a.op,
                        tx,
                        recorded_at,
                    });
                }
                let r = pb::TransactResponse {
                    tx,
                    recorded_at,
                    deduplicated: false,
                };
                m.receipts.insert(req.idempotency_key, r);
                r
            }
        };
        drop(m);
        if take_one(&self.lose_acks) {
            return Err(Status::unavailable("ack lost"));
        }
        Ok(Response::new(response))
    }

    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        let delay = *self.get_delay.lock().unwrap();
        tokio::time::sleep(delay).await;
        let req = request.into_inner();
        let m = self.model.lock().unwrap();
        let as_of = req.as_of_tx.filter(|t| *t != 0).unwrap_or(m.last_tx);
        let facts = m
            .facts
            .iter()
            .filter(|f| f.entity == req.entity && f.tx <= as_of)
            .cloned()
            .collect();
        Ok(Response::new(pb::GetResponse {
            entity: req.entity,
            facts,
            basis_tx: as_of,
        }))
    }

    async fn query(
        &self,
        request: Request<pb::QueryRequest>,
    ) -> Result<Response<pb::QueryResponse>, Status> {
        let req = request.into_inner();
        let m = self.model.lock().unwrap();
        let matching: Vec<_> = m
            .facts
            .iter()
            .filter(|f| f.attribute == req.attribute)
            .filter(|f| req.value.is_none() || f.value == req.value)
            .filter(|f| req.source.as_ref().is_none_or(|s| *s == f.source))
            .cloned()
            .collect();
        let token = if req.attribute == "loop" {
            ""
        } else {
            req.page_token.as_str()
        };
        let (facts, mut next_page_token) = page(&matching, req.limit, token)?;
        if req.attribute == "loop" {
            // A broken server: hands back the token it was given.
            next_page_token = "loop".into();
        }
        Ok(Response::new(pb::QueryResponse {
            facts,
            next_page_token,
            basis_tx: m.last_tx,
        }))
    }

    async fn history(
        &self,
        request: Request<pb::HistoryRequest>,
    ) -> Result<Response<pb::HistoryResponse>, Status> {
        let req = request.into_inner();
        let m = self.model.lock().unwrap();
        let matching: Vec<_> = m
            .facts
            .iter()
            .filter(|f| f.entity == req.entity)
            .filter(|f| {
                req.since_tx.is_none_or(|t| f.tx >= t) && req.until_tx.is_none_or(|t| f.tx <= t)
            })
            .cloned()
            .collect();
        let (facts, next_page_token) = page(&matching, req.limit, &req.page_token)?;
        Ok(Response::new(pb::HistoryResponse {
            facts,
            next_page_token,
        }))
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let from_tx = request.into_inner().from_tx.max(1);
        self.watch_opens.lock().unwrap().push(from_tx);
        let m = self.model.lock().unwrap();
        let breaking = take_one(&self.break_watches);
        // A breaking stream first re-sends the tx before from_tx, as a
        // server replaying from an older checkpoint might, delivers two
        // transactions and then fails.
        let first = if breaking {
            from_tx.saturating_sub(1).max(1)
        } else {
            from_tx
        };
        let mut events: Vec<Result<pb::WatchResponse, Status>> = (first..=m.last_tx)
            .map(|tx| {
                let facts: Vec<_> = m.facts.iter().filter(|f| f.tx == tx).cloned().collect();
                Ok(pb::WatchResponse {
                    tx,
                    recorded_at: facts[0].recorded_at,
                    facts,
                })
            })
            .collect();
        if breaking {
            events.truncate(2);
            events.push(Err(Status::unavailable("node restarting")));
        }
        Ok(Response::new(Box::pin(futures::stream::iter(events))))
    }
}

fn prost_types_now() -> prost_types::Timestamp {
    SystemTime::now().into()
}

async fn start(mock: Mock) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(StoreServer::new(mock))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    format!("http://{addr}")
}

fn fast_options() -> ClientOptions {
    ClientOptions {
        retry_backoff_initial: Duration::from_millis(1),
        retry_backoff_max: Duration::from_millis(5),
        ..ClientOptions::default()
    }
}

async fn seeded(mock: &Mock, entities: usize, per_entity: usize) -> Client {
    seeded_with(mock, fast_options(), entities, per_entity).await
}

async fn seeded_with(
    mock: &Mock,
    options: ClientOptions,
    entities: usize,
    per_entity: usize,
) -> Client {
    let client = Client::connect_with(start(mock.clone()).await, options)
        .await
        .unwrap();
    for e in 0..entities {
        let batch = (0..per_entity)
            .map(|i| Assertion::assert(format!("e{e}"), "n", i as i64).source("seed"))
            .collect();
        client.transact(batch).await.unwrap();
    }
    client
}

#[tokio::test]
async fn lost_ack_is_retried_with_the_same_key_and_lands_once() {
    let mock = Mock::default();
    mock.lose_acks.store(2, Ordering::SeqCst);
    let client = Client::connect_with(start(mock.clone()).await, fast_options())
        .await
        .unwrap();
    let receipt = client
        .transact(vec![Assertion::assert("e", "name", "Ada")
            .source("s")
            .confidence(0.5)])
        .await
        .unwrap();
    assert!(
        receipt.deduplicated,
        "the third attempt finds the key already applied"
    );
    assert_eq!(receipt.tx, 1);
    let m = mock.model.lock().unwrap();
    assert_eq!(m.facts.len(), 1, "the write landed exactly once");
    assert_eq!(m.keys_seen.len(), 3);
    assert!(
        m.keys_seen.iter().all(|k| *k == m.keys_seen[0]),
        "every attempt used one key: {:?}",
        m.keys_seen
    );
    assert_eq!(uuid_version(&m.keys_seen[0]), Some('4'));
    assert!(
        m.timeouts_seen.iter().all(|t| t.is_some()),
        "grpc-timeout is sent on every attempt"
    );
}

fn uuid_version(key: &str) -> Option<char> {
    (key.len() == 36).then(|| key.chars().nth(14)).flatten()
}

#[tokio::test]
async fn refusals_are_retried_until_retry_max() {
    let mock = Mock::default();
    mock.refuse.store(3, Ordering::SeqCst);
    let options = ClientOptions {
        retry_max: 2,
        ..fast_options()
    };
    let client = Client::connect_with(start(mock.clone()).await, options)
        .await
        .unwrap();
    let err = client
        .transact(vec![Assertion::assert("e", "a", true)])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::Unavailable));
    assert_eq!(mock.transact_calls.load(Ordering::SeqCst), 3);
    // The fourth attempt is let through.
    let receipt = client
        .transact(vec![Assertion::assert("e", "a", true)])
        .await
        .unwrap();
    assert!(!receipt.deduplicated);
}

#[tokio::test]
async fn empty_key_is_never_retried() {
    let mock = Mock::default();
    mock.refuse.store(1, Ordering::SeqCst);
    let client = Client::connect_with(start(mock.clone()).await, fast_options())
        .await
        .unwrap();
    let err = client
        .transact_with_key(vec![Assertion::assert("e", "a", 1i64)], "")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::Unavailable));
    assert_eq!(mock.transact_calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn explicit_key_deduplicates() {
    let mock = Mock::default();
    let client = Client::connect_with(start(mock.clone()).await, fast_options())
        .await
        .unwrap();
    let a = vec![Assertion::assert("e", "a", 1i64)];
    let first = client.transact_with_key(a.clone(), "k1").await.unwrap();
    let again = client.transact_with_key(a, "k1").await.unwrap();
    assert!(!first.deduplicated && again.deduplicated);
    assert_eq!(first.tx, again.tx);
    assert_eq!(first.recorded_at, again.recorded_at);
}

#[tokio::test]
async fn get_converts_every_field_and_honours_as_of() {
    let mock = Mock::default();
    let client = Client::connect_with(start(mock.clone()).await, fast_options())
        .await
        .unwrap();
    let t1 = client
        .transact(vec![
            Assertion::assert("user:1", "name", "Ada")
                .source("hr")
                .confidence(0.9),
            Assertion::assert("user:1", "friend", Value::reference("user:2")).source("hr"),
        ])
        .await
        .unwrap();
    client
        .transact(vec![
            Assertion::retract("user:1", "name", "Ada").source("hr")
        ])
        .await
        .unwrap();
    let then = client.get("user:1", Some(t1.tx)).await.unwrap();
    assert_eq!(then.basis_tx, t1.tx);
    assert_eq!(then.facts.len(), 2);
    let name = &then.facts[0];
    assert_eq!(
        (name.attribute.as_str(), &name.value, name.source.as_str()),
        ("name", &Value::Text("Ada".into()), "hr")
    );
    assert_eq!(
        (name.confidence, name.op, name.tx, name.recorded_at),
        (Some(0.9), Op::Assert, t1.tx, t1.recorded_at)
    );
    assert_eq!(then.facts[1].value, Value::Ref("user:2".into()));
    let now = client.get("user:1", None).await.unwrap();
    assert_eq!(now.facts.len(), 3);
    assert_eq!(now.facts[2].op, Op::Retract);
}

#[tokio::test]
async fn query_and_history_follow_page_tokens() {
    let mock = Mock::default();
    let client = seeded(&mock, 3, 25).await;
    let all: Vec<_> = client
        .query(Query::attribute("n").page_size(7))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(all.len(), 75);
    let one: Vec<_> = client
        .query(Query::attribute("n").value(3i64).page_size(1))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(one.len(), 3, "one per entity");
    let first = client
        .query_page(Query::attribute("n").page_size(10), None)
        .await
        .unwrap();
    assert_eq!(first.facts.len(), 10);
    assert_eq!(first.basis_tx, 3);
    let second = client
        .query_page(Query::attribute("n").page_size(10), first.next_page_token)
        .await
        .unwrap();
    assert_eq!(second.facts[0], all[10]);

    let history: Vec<_> = client
        .history(HistoryQuery::entity("e1").page_size(4))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(history.len(), 25);
    assert!(history.iter().all(|f| f.tx == 2));
    let none: Vec<_> = client
        .history(HistoryQuery::entity("e1").since(3))
        .try_collect()
        .await
        .unwrap();
    assert!(none.is_empty());
    let last = client
        .history_page(HistoryQuery::entity("e2").page_size(100), None)
        .await
        .unwrap();
    assert_eq!((last.facts.len(), last.next_page_token), (25, None));
}

#[tokio::test]
async fn query_stream_ends_after_an_error() {
    let mock = Mock::default();
    let client = Client::connect_with(start(mock.clone()).await, fast_options())
        .await
        .unwrap();
    client
        .transact(vec![Assertion::assert("e", "loop", 1i64).source("s")])
        .await
        .unwrap();
    // Page 1 ends with token "loop"; page 2 hands "loop" back: that is an
    // error, and the stream ends there instead of looping forever.
    let results: Vec<_> = client.query(Query::attribute("loop")).collect().await;
    assert_eq!(results.len(), 2, "{results:?}");
    assert!(results[0].is_ok());
    assert!(
        matches!(results[1], Err(Error::InvalidResponse(_))),
        "{results:?}"
    );

    // A page token the mock cannot parse yields INVALID_ARGUMENT, and a
    // stream that starts with an error yields only it.
    let err = client
        .query_page(Query::attribute("n"), Some("junk".into()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::InvalidArgument));
}

#[tokio::test]
async fn watch_resumes_after_the_last_delivered_tx() {
    let mock = Mock::default();
    let client = seeded(&mock, 5, 2).await;
    mock.break_watches.store(2, Ordering::SeqCst);
    let events: Vec<_> = client.watch(0).await.unwrap().try_collect().await.unwrap();
    let txs: Vec<u64> = events.iter().map(|e| e.tx).collect();
    assert_eq!(txs, vec![1, 2, 3, 4, 5], "no tx skipped or repeated");
    assert!(events.iter().all(|e| e.facts.len() == 2));
    assert_eq!(*mock.watch_opens.lock().unwrap(), vec![1, 3, 4]);
}

#[tokio::test]
async fn watch_gives_up_after_retry_max_reopens_without_progress() {
    let mock = Mock::default();
    let options = ClientOptions {
        retry_max: 3,
        ..fast_options()
    };
    let client = seeded_with(&mock, options, 1, 1).await;
    mock.break_watches.store(100, Ordering::SeqCst);
    let results: Vec<_> = client.watch(2).await.unwrap().collect().await;
    // Every broken stream re-sends tx 1, which precedes from_tx: it is
    // dropped, so no reopening makes progress.
    assert_eq!(results.len(), 1, "{results:?}");
    assert!(
        matches!(results[0], Err(Error::Transport(_))),
        "{results:?}"
    );
    assert_eq!(
        mock.watch_opens.lock().unwrap().len(),
        4,
        "one open and retry_max reopens"
    );
}

#[tokio::test]
async fn slow_answers_hit_the_deadline() {
    let mock = Mock::default();
    *mock.get_delay.lock().unwrap() = Duration::from_secs(5);
    let options = ClientOptions {
        timeout: Duration::from_millis(100),
        ..fast_options()
    };
    let client = Client::connect_with(start(mock.clone()).await, options)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let err = client.get("e", None).await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::DeadlineExceeded), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "not retried, not waited out"
    );
}

#[tokio::test]
async fn connection_refused_is_a_transport_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let err = Client::connect(format!("http://{addr}")).await.unwrap_err();
    assert!(matches!(err, Error::Transport(_)), "{err:?}");
    let err = Client::connect("not a url").await.unwrap_err();
    assert!(matches!(err, Error::Transport(_)), "{err:?}");
}
