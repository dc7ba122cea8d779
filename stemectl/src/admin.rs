//! A small HTTP/1.1 client for stemed's admin API (one connection per
//! request; the CLI makes a handful).
//!
//! Errors are typed for the exit code: the node could not be reached →
//! [`ConnectionError`] (exit 4); it answered with a non-2xx status or
//! something that is not JSON → [`ServerError`] (exit 3). Each message
//! says what to do next.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

use crate::cli::Cli;
use crate::connect::admin_tls;
use crate::exit::{ConnectionError, ServerError, UsageError};

/// The largest admin response body we read, in bytes. Status bodies are a
/// few hundred bytes; this only bounds a misbehaving server.
const RESPONSE_BYTES_MAX: usize = 1024 * 1024;

/// An admin API endpoint with its credentials.
pub struct Admin {
    /// As given, for messages.
    addr: String,
    host: String,
    port: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
    token: Option<String>,
    timeout: Duration,
}

impl Admin {
    /// From the global flags (`--admin-addr`, `--token`, the TLS flags,
    /// `--timeout`).
    pub fn from_cli(cli: &Cli) -> anyhow::Result<Admin> {
        let addr = cli.admin_addr.trim_end_matches('/').to_string();
        let uri: http::Uri = addr
            .parse()
            .map_err(|e| UsageError(format!("--admin-addr {addr:?} is not a URL: {e}")))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => {
                return Err(UsageError(format!(
                    "--admin-addr {addr:?} must start with http:// or https://"
                ))
                .into())
            }
        };
        if !matches!(uri.path(), "" | "/") {
            return Err(UsageError(format!(
                "--admin-addr {addr:?} must not have a path (like http://127.0.0.1:18180)"
            ))
            .into());
        }
        let host = uri
            .host()
            .ok_or_else(|| UsageError(format!("--admin-addr {addr:?} has no host")))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tls = if https {
            Some(admin_tls(&cli.tls, &addr)?)
        } else {
            None
        };
        Ok(Admin {
            addr,
            host,
            port,
            tls,
            token: cli.token.clone(),
            timeout: cli.timeout,
        })
    }

    /// `GET path`, the response's JSON.
    pub async fn get(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        self.call(http::Method::GET, path, None).await
    }

    /// `POST path` with an optional JSON body, the response's JSON.
    pub async fn post(
        &self,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<serde_json::Value> {
        self.call(http::Method::POST, path, body).await
    }

    async fn call(
        &self,
        method: http::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<serde_json::Value> {
        let what = format!("{method} {}{path}", self.addr);
        let exchange = self.exchange(method, path, body);
        let (status, bytes) = match tokio::time::timeout(self.timeout, exchange).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(ConnectionError(format!(
                    "{what}: no answer within --timeout {:?} — is the node overloaded or the address wrong? set --admin-addr or raise --timeout",
                    self.timeout
                ))
                .into())
            }
        };
        let json: Option<serde_json::Value> = serde_json::from_slice(&bytes).ok();
        if !status.is_success() {
            let detail = json
                .as_ref()
                .and_then(|j| j.get("error"))
                .and_then(|e| e.as_str())
                .map(str::to_string)
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).trim().to_string());
            let next = match status.as_u16() {
                401 | 403 => " — pass the admin token with --token or STEMEDB_TOKEN",
                404 => " — is --admin-addr the admin port (18180 by default), not gRPC?",
                429 => " — rate limited: retry later",
                _ => "",
            };
            return Err(ServerError(format!("{what}: HTTP {status}: {detail}{next}")).into());
        }
        json.ok_or_else(|| {
            ServerError(format!(
                "{what}: answer is not JSON — is --admin-addr a stemed admin port?"
            ))
            .into()
        })
    }

    /// One request on a fresh connection: status and body.
    async fn exchange(
        &self,
        method: http::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<(http::StatusCode, Bytes)> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| self.unreachable(&e))?;
        tcp.set_nodelay(true).ok();
        let request = self.request(method, path, body)?;
        match &self.tls {
            None => self.send(tcp, request).await,
            Some(config) => {
                let name = rustls::pki_types::ServerName::try_from(self.host.clone())
                    .map_err(|e| UsageError(format!("--admin-addr host {:?}: {e}", self.host)))?;
                let stream = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| {
                        ConnectionError(format!(
                            "TLS handshake with stemed admin at {} failed: {e} — check --ca-file, --client-cert and --client-key",
                            self.addr
                        ))
                    })?;
                self.send(stream, request).await
            }
        }
    }

    fn request(
        &self,
        method: http::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<http::Request<Full<Bytes>>> {
        let authority = if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        };
        let mut builder = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, authority)
            .header(http::header::ACCEPT, "application/json");
        if let Some(token) = &self.token {
            let mut value =
                http::HeaderValue::try_from(format!("Bearer {token}")).map_err(|_| {
                    UsageError("--token contains characters not allowed in a header".into())
                })?;
            value.set_sensitive(true);
            builder = builder.header(http::header::AUTHORIZATION, value);
        }
        let body = match body {
            Some(json) => {
                builder = builder.header(http::header::CONTENT_TYPE, "application/json");
                Bytes::from(json.to_string())
            }
            None => Bytes::new(),
        };
        Ok(builder.body(Full::new(body))?)
    }

    async fn send<S>(
        &self,
        stream: S,
        request: http::Request<Full<Bytes>>,
    ) -> anyhow::Result<(http::StatusCode, Bytes)>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let broken = |e: hyper::Error| {
            ConnectionError(format!(
                "stemed admin at {} closed the connection: {e} — is --admin-addr an admin port, and https:// if the node uses TLS?",
                self.addr
            ))
        };
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(broken)?;
        // The connection task ends when the exchange does (the sender is
        // dropped) or breaks; a break also fails the exchange below.
        tokio::spawn(connection);
        let response = sender.send_request(request).await.map_err(broken)?;
        let status = response.status();
        let body = Limited::new(response.into_body(), RESPONSE_BYTES_MAX)
            .collect()
            .await
            .map_err(|e| {
                ServerError(format!(
                    "reading the answer of stemed admin at {}: {e}",
                    self.addr
                ))
            })?
            .to_bytes();
        Ok((status, body))
    }

    fn unreachable(&self, e: &std::io::Error) -> ConnectionError {
        ConnectionError(format!(
            "cannot reach stemed admin at {}: {e} — is stemed running? set --admin-addr or STEMEDB_ADMIN_ADDR",
            self.addr
        ))
    }
}
