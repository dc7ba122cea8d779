//! Who may do what.
//!
//! - Admin HTTP: requests from `auth.trusted_networks` (default: loopback)
//!   need no token; from anywhere else they need `Authorization: Bearer
//!   <token>` with the token from `auth.admin_token_file`. `/metrics`,
//!   `/healthz` and `/readyz` stay open for probes and scrapers.
//! - gRPC: with `auth.tokens_file` set, every call of `stemedb.v1.Store` and
//!   of reflection needs a bearer token with a role: `read` (Get, Query,
//!   History, Watch), `write` (Transact and reads), `admin` (everything).
//!   Health checks stay open for load balancers.
//!
//! Tokens are compared in constant time and never logged.

use anyhow::Context;
use ipnet::IpNet;
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use subtle::ConstantTimeEq;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Read,
    Write,
    Admin,
}

impl Role {
    fn parse(s: &str) -> Option<Role> {
        match s {
            "read" => Some(Role::Read),
            "write" => Some(Role::Write),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// Reads a one-token file; surrounding whitespace is ignored.
fn read_token(path: &Path) -> anyhow::Result<String> {
    let t = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read token file {}", path.display()))?;
    let t = t.trim().to_string();
    anyhow::ensure!(!t.is_empty(), "token file {} is empty", path.display());
    Ok(t)
}

fn bearer(header: Option<&str>) -> Option<&str> {
    header?.strip_prefix("Bearer ").map(str::trim)
}

fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

#[derive(Clone)]
pub struct AdminAuth {
    trusted: Vec<IpNet>,
    token: Option<String>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum AdminDecision {
    Allow,
    /// 401: no valid token from an untrusted address.
    Deny(&'static str),
}

impl AdminAuth {
    pub fn from_config(c: &crate::config::AuthConfig) -> anyhow::Result<AdminAuth> {
        let trusted = c
            .trusted_networks
            .iter()
            .map(|n| {
                n.parse()
                    .with_context(|| format!("auth.trusted_networks: {n:?}"))
            })
            .collect::<anyhow::Result<_>>()?;
        let token = c.admin_token_file.as_deref().map(read_token).transpose()?;
        Ok(AdminAuth { trusted, token })
    }

    pub fn decide(&self, peer: IpAddr, authorization: Option<&str>) -> AdminDecision {
        let peer = match peer {
            IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map(IpAddr::V4)
                .unwrap_or(IpAddr::V6(v6)),
            v4 => v4,
        };
        if self.trusted.iter().any(|n| n.contains(&peer)) {
            return AdminDecision::Allow;
        }
        match (&self.token, bearer(authorization)) {
            (None, _) => AdminDecision::Deny(
                "admin requests from this address need a token, and none is configured (auth.admin_token_file)",
            ),
            (Some(_), None) => AdminDecision::Deny("missing `Authorization: Bearer <admin token>`"),
            (Some(want), Some(got)) if same(want, got) => AdminDecision::Allow,
            (Some(_), Some(_)) => AdminDecision::Deny("invalid admin token"),
        }
    }
}

#[derive(Clone, Default)]
pub struct GrpcAuth {
    /// None: the API needs no token.
    tokens: Option<HashMap<String, Role>>,
}

impl GrpcAuth {
    pub fn from_config(c: &crate::config::AuthConfig) -> anyhow::Result<GrpcAuth> {
        let Some(path) = &c.tokens_file else {
            return Ok(GrpcAuth::default());
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read auth.tokens_file {}", path.display()))?;
        let mut tokens = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (Some(token), Some(role), None) = (parts.next(), parts.next(), parts.next()) else {
                anyhow::bail!(
                    "{} line {}: expected `TOKEN ROLE` (roles: read, write, admin)",
                    path.display(),
                    i + 1
                );
            };
            let role = Role::parse(role).with_context(|| {
                format!(
                    "{} line {}: unknown role {role:?} (roles: read, write, admin)",
                    path.display(),
                    i + 1
                )
            })?;
            tokens.insert(token.to_string(), role);
        }
        Ok(GrpcAuth {
            tokens: Some(tokens),
        })
    }

    /// The role a gRPC method needs; None: open.
    pub fn required(path: &str) -> Option<Role> {
        if path.starts_with("/grpc.health.") {
            return None;
        }
        if path == "/stemedb.v1.Store/Transact" {
            return Some(Role::Write);
        }
        if path.starts_with("/stemedb.v1.Store/") || path.starts_with("/grpc.reflection.") {
            return Some(Role::Read);
        }
        Some(Role::Admin)
    }

    /// Ok, or the status to answer with.
    pub fn check(&self, path: &str, authorization: Option<&str>) -> Result<(), tonic::Status> {
        let Some(tokens) = &self.tokens else {
            return Ok(());
        };
        let Some(needed) = Self::required(path) else {
            return Ok(());
        };
        let Some(got) = bearer(authorization) else {
            return Err(tonic::Status::unauthenticated(
                "missing `authorization: Bearer <token>` metadata",
            ));
        };
        let role = tokens
            .iter()
            .find(|(t, _)| same(t, got))
            .map(|(_, r)| *r)
            .ok_or_else(|| tonic::Status::unauthenticated("invalid token"))?;
        if role < needed {
            return Err(tonic::Status::permission_denied(format!(
                "this token has role {role:?}; {path} needs {needed:?}"
            )));
        }
        Ok(())
    }
}

/// A tower layer that applies [`GrpcAuth`] before any gRPC service runs.
#[derive(Clone)]
pub struct GrpcAuthLayer(pub std::sync::Arc<GrpcAuth>);

impl<S> tower::Layer<S> for GrpcAuthLayer {
    type Service = GrpcAuthService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcAuthService {
            auth: self.0.clone(),
            inner,
        }
    }
}

#[derive(Clone)]
pub struct GrpcAuthService<S> {
    auth: std::sync::Arc<GrpcAuth>,
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for GrpcAuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let header = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        match self.auth.check(req.uri().path(), header) {
            Ok(()) => Box::pin(self.inner.call(req)),
            Err(status) => Box::pin(async move { Ok(status.into_http()) }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_decisions() {
        let auth = AdminAuth {
            trusted: vec!["127.0.0.0/8".parse().unwrap()],
            token: Some("s3cret".into()),
        };
        let outside: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(
            auth.decide("127.0.0.1".parse().unwrap(), None),
            AdminDecision::Allow
        );
        assert_eq!(
            auth.decide("::ffff:127.0.0.1".parse().unwrap(), None),
            AdminDecision::Allow
        );
        assert!(matches!(auth.decide(outside, None), AdminDecision::Deny(_)));
        assert!(matches!(
            auth.decide(outside, Some("Bearer nope")),
            AdminDecision::Deny(_)
        ));
        assert_eq!(
            auth.decide(outside, Some("Bearer s3cret")),
            AdminDecision::Allow
        );
    }

    #[test]
    fn grpc_roles() {
        let mut tokens = HashMap::new();
        tokens.insert("r".to_string(), Role::Read);
        tokens.insert("w".to_string(), Role::Write);
        let auth = GrpcAuth {
            tokens: Some(tokens),
        };
        let tx = "/stemedb.v1.Store/Transact";
        let get = "/stemedb.v1.Store/Get";
        assert_eq!(
            auth.check(tx, None).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            auth.check(tx, Some("Bearer x")).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            auth.check(tx, Some("Bearer r")).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        auth.check(tx, Some("Bearer w")).unwrap();
        auth.check(get, Some("Bearer r")).unwrap();
        auth.check("/grpc.health.v1.Health/Check", None).unwrap();
    }
}
