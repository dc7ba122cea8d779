//! The gRPC client. The only module that makes calls; `convert` does the
//! wire mapping.

use std::time::Duration;

use futures::stream::{self, Stream, TryStreamExt};
use stemedb_proto::store::v1 as pb;
use stemedb_proto::store::v1::store_client::StoreClient;
use tonic::transport::{Channel, Endpoint};

use crate::convert;
use crate::model::{
    Assertion, EntityView, Fact, FactPage, HistoryQuery, Query, TxEvent, TxReceipt,
};
use crate::retry::RetryPolicy;
use crate::Error;

/// The largest response or request message the client accepts, in bytes.
/// Above tonic's 4 MiB default because a query page of large values can
/// legitimately exceed it.
const MESSAGE_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Tuning for a [`Client`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientOptions {
    /// The deadline of each unary attempt, sent to the server as
    /// `grpc-timeout` and enforced locally. Watch streams have none.
    pub timeout: Duration,
    /// How long to wait for the TCP connection to be established.
    pub connect_timeout: Duration,
    /// Retries after the first attempt of a retryable failure
    /// (UNAVAILABLE or a transport error); 0 disables retrying.
    pub retry_max: u32,
    /// The cap of the first retry backoff; later caps double.
    pub retry_backoff_initial: Duration,
    /// The largest backoff cap.
    pub retry_backoff_max: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            retry_max: 8,
            retry_backoff_initial: Duration::from_millis(20),
            retry_backoff_max: Duration::from_secs(1),
        }
    }
}

impl ClientOptions {
    /// The retry policy these options describe.
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            retries_max: self.retry_max,
            backoff_initial: self.retry_backoff_initial,
            backoff_max: self.retry_backoff_max,
        }
    }
}

/// A connection to a StemeDB node. Cheap to clone; clones share the
/// underlying HTTP/2 connection, which reconnects on its own after a
/// failure.
///
/// Every unary call is retried on UNAVAILABLE and transport errors, with
/// jittered exponential backoff (see [`ClientOptions`]). Reads are
/// naturally idempotent; writes are retried only with the same
/// idempotency key, so a retried write never lands twice.
#[derive(Debug, Clone)]
pub struct Client {
    inner: StoreClient<Channel>,
    options: ClientOptions,
}

impl Client {
    /// Connects with default [`ClientOptions`]. `url` is like
    /// `http://127.0.0.1:18181`.
    pub async fn connect(url: impl Into<String>) -> Result<Client, Error> {
        Client::connect_with(url, ClientOptions::default()).await
    }

    /// Connects with the given options. Fails with [`Error::Transport`] if
    /// the URL is malformed or the node cannot be reached.
    pub async fn connect_with(
        url: impl Into<String>,
        options: ClientOptions,
    ) -> Result<Client, Error> {
        let url = url.into();
        let endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| Error::Transport(format!("invalid url {url:?}: {e}")))?
            .tcp_nodelay(true)
            .connect_timeout(options.connect_timeout);
        let channel = endpoint.connect().await.map_err(|e| match Error::from(e) {
            Error::Transport(msg) => Error::Transport(format!("cannot connect to {url}: {msg}")),
            other => other,
        })?;
        Ok(Client::from_channel(channel, options))
    }

    /// Wraps an existing channel, for callers that build their own
    /// [`Endpoint`] (for example to share one channel between clients).
    pub fn from_channel(channel: Channel, options: ClientOptions) -> Client {
        let inner = StoreClient::new(channel)
            .max_decoding_message_size(MESSAGE_BYTES_MAX)
            .max_encoding_message_size(MESSAGE_BYTES_MAX);
        Client { inner, options }
    }

    /// A client sharing this one's connection, with other options (for
    /// example no retries for a benchmark, more for setup).
    pub fn with_options(&self, options: ClientOptions) -> Client {
        Client {
            inner: self.inner.clone(),
            options,
        }
    }

    /// The options this client was built with.
    pub fn options(&self) -> &ClientOptions {
        &self.options
    }

    /// The generated gRPC client, for callers that need raw requests.
    /// It shares this client's connection but applies no timeout or retry.
    pub fn raw(&self) -> StoreClient<Channel> {
        self.inner.clone()
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.options.timeout);
        request
    }

    /// Applies `assertions` atomically and durably under a fresh
    /// idempotency key (a UUID v4). Retries reuse the key, so the
    /// transaction lands at most once.
    pub async fn transact(&self, assertions: Vec<Assertion>) -> Result<TxReceipt, Error> {
        self.transact_with_key(assertions, uuid::Uuid::new_v4().to_string())
            .await
    }

    /// Like [`Client::transact`], with the caller's idempotency key. A call
    /// with a key the server has already seen returns the original
    /// transaction with [`TxReceipt::deduplicated`] set.
    ///
    /// An empty key asks for no deduplication; such a call is never retried,
    /// because a retry could apply the assertions twice.
    pub async fn transact_with_key(
        &self,
        assertions: Vec<Assertion>,
        idempotency_key: impl Into<String>,
    ) -> Result<TxReceipt, Error> {
        let message = pb::TransactRequest {
            assertions: assertions
                .into_iter()
                .map(convert::assertion_to_pb)
                .collect(),
            idempotency_key: idempotency_key.into(),
        };
        let mut policy = self.options.retry_policy();
        if message.idempotency_key.is_empty() {
            policy.retries_max = 0;
        }
        let response = policy
            .run(|| {
                let mut inner = self.inner.clone();
                let request = self.request(message.clone());
                async move { Ok(inner.transact(request).await?.into_inner()) }
            })
            .await?;
        convert::receipt_from_pb(response)
    }

    /// Every live claim about `entity`, as of `as_of_tx` (`None`: the
    /// latest applied transaction).
    pub async fn get(&self, entity: &str, as_of_tx: Option<u64>) -> Result<EntityView, Error> {
        let message = pb::GetRequest {
            entity: entity.to_string(),
            as_of_tx,
        };
        let response = self
            .options
            .retry_policy()
            .run(|| {
                let mut inner = self.inner.clone();
                let request = self.request(message.clone());
                async move { Ok(inner.get(request).await?.into_inner()) }
            })
            .await?;
        convert::entity_view_from_pb(response)
    }

    /// One page of a query. Pass the previous page's
    /// [`FactPage::next_page_token`] to continue.
    pub async fn query_page(
        &self,
        q: Query,
        page_token: Option<String>,
    ) -> Result<FactPage, Error> {
        let message = convert::query_to_pb(q, page_token);
        let response = self
            .options
            .retry_policy()
            .run(|| {
                let mut inner = self.inner.clone();
                let request = self.request(message.clone());
                async move { Ok(inner.query(request).await?.into_inner()) }
            })
            .await?;
        convert::query_page_from_pb(response)
    }

    /// All facts matching `q`, following page tokens until the last page.
    /// The stream ends after the first error.
    pub fn query(&self, q: Query) -> impl Stream<Item = Result<Fact, Error>> + Send + 'static {
        let client = self.clone();
        paginate(move |token| {
            let client = client.clone();
            let q = q.clone();
            async move { client.query_page(q, token).await }
        })
    }

    /// One page of an entity's history. Pass the previous page's
    /// [`FactPage::next_page_token`] to continue.
    pub async fn history_page(
        &self,
        h: HistoryQuery,
        page_token: Option<String>,
    ) -> Result<FactPage, Error> {
        let message = convert::history_to_pb(h, page_token);
        let response = self
            .options
            .retry_policy()
            .run(|| {
                let mut inner = self.inner.clone();
                let request = self.request(message.clone());
                async move { Ok(inner.history(request).await?.into_inner()) }
            })
            .await?;
        convert::history_page_from_pb(response)
    }

    /// The whole history matching `h`, in tx order, following page tokens.
    /// The stream ends after the first error.
    pub fn history(
        &self,
        h: HistoryQuery,
    ) -> impl Stream<Item = Result<Fact, Error>> + Send + 'static {
        let client = self.clone();
        paginate(move |token| {
            let client = client.clone();
            let h = h.clone();
            async move { client.history_page(h, token).await }
        })
    }

    async fn open_watch(&self, from_tx: u64) -> Result<tonic::Streaming<pb::WatchResponse>, Error> {
        self.options
            .retry_policy()
            .run(|| {
                let mut inner = self.inner.clone();
                // No deadline: a watch is meant to stay open.
                let request = tonic::Request::new(pb::WatchRequest { from_tx });
                async move { Ok(inner.watch(request).await?.into_inner()) }
            })
            .await
    }

    /// Streams one [`TxEvent`] per transaction from `from_tx` on (0 or 1:
    /// from the beginning), then live ones as they commit.
    ///
    /// The returned stream survives node restarts: on UNAVAILABLE or a
    /// transport error it reopens the watch from the transaction after the
    /// last one delivered, so no transaction is skipped or repeated. It
    /// gives up, yielding the error, after `retry_max` consecutive failed
    /// reopenings. Opening the first watch fails like any other call. The
    /// stream ends when the server ends the watch without an error.
    pub async fn watch(
        &self,
        from_tx: u64,
    ) -> Result<impl Stream<Item = Result<TxEvent, Error>> + Send + 'static, Error> {
        let first = self.open_watch(from_tx).await?;
        let state = WatchState {
            client: self.clone(),
            stream: Some(first),
            next_tx: from_tx,
            reopens_without_event: 0,
            done: false,
        };
        Ok(stream::unfold(state, |mut state| async move {
            let item = state.next_event().await?;
            Some((item, state))
        }))
    }
}

/// Turns a page fetcher into a stream of facts. Ends after the last page or
/// after the first error.
fn paginate<F, Fut>(fetch: F) -> impl Stream<Item = Result<Fact, Error>> + Send + 'static
where
    F: Fn(Option<String>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<FactPage, Error>> + Send + 'static,
{
    // State: the token of the page to fetch next; `None` once done.
    let start: Option<Option<String>> = Some(None);
    stream::try_unfold((fetch, start), |(fetch, next)| async move {
        let Some(token) = next else {
            return Ok(None);
        };
        let page = fetch(token.clone()).await?;
        if page.next_page_token.is_some() && page.next_page_token == token {
            // A server that hands back the token it was given would make
            // us loop forever.
            return Err(Error::InvalidResponse(format!(
                "server repeated page token {:?}",
                page.next_page_token
            )));
        }
        let next = page.next_page_token.map(Some);
        Ok(Some((page.facts, (fetch, next))))
    })
    .map_ok(|facts| stream::iter(facts.into_iter().map(Ok)))
    .try_flatten()
}

/// The state of a resumable watch.
///
/// # Invariants
/// Events are delivered in strictly increasing tx order; after a reopen,
/// any event below `next_tx` is dropped as already delivered.
struct WatchState {
    client: Client,
    stream: Option<tonic::Streaming<pb::WatchResponse>>,
    /// The smallest tx not yet delivered.
    next_tx: u64,
    /// Consecutive reopenings since the last delivered event; bounded by
    /// `retry_max` so a node that accepts and instantly drops watches
    /// cannot make us spin.
    reopens_without_event: u32,
    done: bool,
}

impl WatchState {
    async fn next_event(&mut self) -> Option<Result<TxEvent, Error>> {
        loop {
            if self.done {
                return None;
            }
            let Some(stream) = self.stream.as_mut() else {
                if let Err(e) = self.reopen().await {
                    self.done = true;
                    return Some(Err(e));
                }
                continue;
            };
            match stream.message().await {
                // The server ended the watch (for example on shutdown
                // without an error status).
                Ok(None) => return None,
                Ok(Some(message)) => match convert::tx_event_from_pb(message) {
                    Ok(event) if event.tx < self.next_tx => continue,
                    Ok(event) => {
                        self.next_tx = event.tx + 1;
                        self.reopens_without_event = 0;
                        return Some(Ok(event));
                    }
                    Err(e) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                },
                Err(status) => {
                    let e = Error::from(status);
                    if !e.is_retryable() {
                        self.done = true;
                        return Some(Err(e));
                    }
                    self.stream = None;
                }
            }
        }
    }

    async fn reopen(&mut self) -> Result<(), Error> {
        let policy = self.client.options.retry_policy();
        if self.reopens_without_event >= policy.retries_max {
            return Err(Error::Transport(format!(
                "watch dropped {} times in a row without delivering a transaction",
                self.reopens_without_event
            )));
        }
        let jitter_unit = rand::random::<f64>();
        tokio::time::sleep(policy.delay(self.reopens_without_event, jitter_unit)).await;
        self.reopens_without_event += 1;
        self.stream = Some(self.client.open_watch(self.next_tx.max(1)).await?);
        Ok(())
    }
}
