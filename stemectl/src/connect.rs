//! Building connections from the global flags: the gRPC [`Client`] (TLS,
//! bearer token) and the TLS config of the admin HTTP client.
//!
//! **Architecture Invariant:** this module and `admin` are the only places
//! that know about transports; commands get a ready [`Client`] or
//! [`Admin`](crate::admin::Admin).

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use hyper_util::rt::{TokioExecutor, TokioIo};
use stemedb_client::{Client, ClientOptions};
use tokio_rustls::rustls;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::cli::{Cli, TlsArgs};
use crate::exit::{ConnectionError, UsageError};

/// Buffer of the in-memory pipe between the SDK's channel and the token
/// shim, in bytes. Large enough for a full HTTP/2 window of frames.
const SHIM_PIPE_BYTES: usize = 1024 * 1024;

/// The PEM files named by the TLS flags, read once.
struct TlsFiles {
    ca: Option<Vec<u8>>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

fn read_pem(path: &Path, flag: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| {
        UsageError(format!(
            "{flag} {}: cannot read: {e}; check the path",
            path.display()
        ))
        .into()
    })
}

fn tls_files(tls: &TlsArgs) -> anyhow::Result<TlsFiles> {
    let ca = match &tls.ca_file {
        Some(p) => Some(read_pem(p, "--ca-file")?),
        None => None,
    };
    let identity = match (&tls.client_cert, &tls.client_key) {
        (Some(c), Some(k)) => Some((read_pem(c, "--client-cert")?, read_pem(k, "--client-key")?)),
        // clap makes the two flags require each other.
        _ => None,
    };
    Ok(TlsFiles { ca, identity })
}

fn is_https(url: &str) -> bool {
    url.get(..8)
        .is_some_and(|p| p.eq_ignore_ascii_case("https://"))
}

/// Connects to `--addr` with the TLS flags (for an https:// address) and,
/// with `--token`, a bearer token on every call. Connection failures are
/// [`ConnectionError`]s (exit 4) that say what to check.
pub async fn grpc(cli: &Cli, options: ClientOptions) -> anyhow::Result<Client> {
    let options = ClientOptions {
        timeout: cli.timeout,
        ..options
    };
    let mut endpoint = Endpoint::from_shared(cli.addr.clone())
        .map_err(|e| UsageError(format!("--addr {:?} is not a URL: {e}", cli.addr)))?
        .tcp_nodelay(true)
        .connect_timeout(options.connect_timeout);
    if is_https(&cli.addr) {
        let files = tls_files(&cli.tls)?;
        let Some(ca) = files.ca else {
            return Err(UsageError(format!(
                "--addr {} is https:// but no --ca-file (STEMEDB_CA_FILE) names the CA to trust",
                cli.addr
            ))
            .into());
        };
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        if let Some((cert, key)) = files.identity {
            config = config.identity(Identity::from_pem(cert, key));
        }
        endpoint = endpoint
            .tls_config(config)
            .map_err(|e| UsageError(format!("TLS flags: {e}")))?;
    }
    let channel = endpoint.connect().await.map_err(|e| {
        let e = stemedb_client::Error::from(e);
        ConnectionError(format!(
            "cannot reach stemed gRPC at {}: {} — is stemed running? set --addr or STEMEDB_ADDR",
            cli.addr,
            e.to_string().trim_start_matches("transport error: ")
        ))
    })?;
    let channel = match &cli.token {
        Some(token) => with_bearer_token(channel, token)?,
        None => channel,
    };
    Ok(Client::from_channel(channel, options))
}

/// A channel that forwards every request to `inner` with an
/// `authorization: Bearer <token>` header added.
///
/// Why a shim: the SDK's [`Client`] is built on a plain [`Channel`], and a
/// tonic channel has no way to add a header to every request (an
/// interceptor changes the client's type). So the returned channel talks
/// HTTP/2 over an in-memory pipe to a tiny hyper server in this process,
/// which adds the header and hands the request to `inner`. Streaming
/// (watch, paged queries) passes through unchanged.
fn with_bearer_token(inner: Channel, token: &str) -> anyhow::Result<Channel> {
    let mut value = http::HeaderValue::try_from(format!("Bearer {token}"))
        .map_err(|_| UsageError("--token contains characters not allowed in a header".into()))?;
    value.set_sensitive(true);
    let connector = tower::service_fn(move |_: http::Uri| {
        let inner = inner.clone();
        let value = value.clone();
        async move {
            let (client_end, server_end) = tokio::io::duplex(SHIM_PIPE_BYTES);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |mut request: http::Request<hyper::body::Incoming>| {
                        request
                            .headers_mut()
                            .insert(http::header::AUTHORIZATION, value.clone());
                        let request = request.map(tonic::body::Body::new);
                        tower::ServiceExt::oneshot(inner.clone(), request)
                    },
                );
                // The pipe closes when the SDK's channel is dropped; there
                // is nobody to report an error to, and the call that broke
                // already got its own error.
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(server_end), service)
                    .await;
            });
            Ok::<_, std::io::Error>(TokioIo::new(client_end))
        }
    });
    Ok(Endpoint::from_static("http://stemectl-token-shim").connect_with_connector_lazy(connector))
}

/// The rustls client config for an https:// admin address: the CA of
/// `--ca-file` and, for mTLS, the client certificate.
pub fn admin_tls(tls: &TlsArgs, admin_addr: &str) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let files = tls_files(tls)?;
    let Some(ca) = files.ca else {
        return Err(UsageError(format!(
            "--admin-addr {admin_addr} is https:// but no --ca-file (STEMEDB_CA_FILE) names the CA to trust"
        ))
        .into());
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut ca.as_slice()) {
        let cert = cert.map_err(|e| UsageError(format!("--ca-file: not PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| UsageError(format!("--ca-file: bad certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(UsageError("--ca-file holds no PEM certificate".into()).into());
    }
    // An explicit provider: the process default is ambiguous when more than
    // one rustls backend is compiled in.
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("rustls protocol versions")?
    .with_root_certificates(roots);
    let config = match files.identity {
        Some((cert, key)) => {
            let certs = rustls_pemfile::certs(&mut cert.as_slice())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| UsageError(format!("--client-cert: not PEM: {e}")))?;
            let key = rustls_pemfile::private_key(&mut key.as_slice())
                .map_err(|e| UsageError(format!("--client-key: not PEM: {e}")))?
                .ok_or_else(|| UsageError("--client-key holds no PEM private key".into()))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| UsageError(format!("--client-cert/--client-key: {e}")))?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_is_detected_case_insensitively() {
        assert!(is_https("https://db1:18181"));
        assert!(is_https("HTTPS://db1"));
        assert!(!is_https("http://db1"));
        assert!(!is_https("http"));
    }
}
