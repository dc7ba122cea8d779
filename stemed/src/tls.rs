//! TLS for gRPC (tonic's rustls) and admin HTTP (tokio-rustls), with
//! optional client-certificate verification (mTLS).

use crate::config::TlsConfig;
use anyhow::Context;
use std::path::Path;
use std::sync::Arc;

fn read(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {what} {}", path.display()))
}

/// tonic's server TLS config, or None when TLS is off.
pub fn grpc(c: &TlsConfig) -> anyhow::Result<Option<tonic::transport::ServerTlsConfig>> {
    let (Some(cert), Some(key)) = (&c.cert_file, &c.key_file) else {
        return Ok(None);
    };
    let identity = tonic::transport::Identity::from_pem(
        read(cert, "tls.cert_file")?,
        read(key, "tls.key_file")?,
    );
    let mut tls = tonic::transport::ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &c.client_ca_file {
        tls = tls.client_ca_root(tonic::transport::Certificate::from_pem(read(
            ca,
            "tls.client_ca_file",
        )?));
    }
    Ok(Some(tls))
}

/// A rustls acceptor for admin HTTP, or None when TLS is off.
pub fn admin(c: &TlsConfig) -> anyhow::Result<Option<tokio_rustls::TlsAcceptor>> {
    use tokio_rustls::rustls;
    let (Some(cert), Some(key)) = (&c.cert_file, &c.key_file) else {
        return Ok(None);
    };
    let certs = rustls_pemfile::certs(&mut read(cert, "tls.cert_file")?.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .context("tls.cert_file is not a PEM certificate chain")?;
    let key = rustls_pemfile::private_key(&mut read(key, "tls.key_file")?.as_slice())
        .context("tls.key_file is not a PEM private key")?
        .context("tls.key_file holds no private key")?;
    let builder = rustls::ServerConfig::builder();
    let builder = match &c.client_ca_file {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_pemfile::certs(&mut read(ca, "tls.client_ca_file")?.as_slice()) {
                roots
                    .add(cert.context("tls.client_ca_file is not PEM")?)
                    .context("tls.client_ca_file holds an unusable certificate")?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
                .build()
                .context("cannot build the client certificate verifier")?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .context("tls.cert_file and tls.key_file do not match")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))))
}
