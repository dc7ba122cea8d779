//! Where backups and the WAL archive live: a local directory or
//! `s3://bucket/prefix` (credentials, region and endpoint from the standard
//! `AWS_*` environment variables, e.g. `AWS_ENDPOINT_URL` and
//! `AWS_ALLOW_HTTP=true` for a loopback server).
//!
//! **Architecture Invariant:** an object is never overwritten with
//! different bytes: [`Dest::put_new`] writes only absent objects and treats
//! an existing one with the same bytes as already written.

use std::sync::Arc;

use anyhow::{bail, Context};
use bytes::Bytes;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, PutMode, PutOptions, PutPayload};
use sha2::{Digest, Sha256};

/// A location: a store and a key prefix inside it.
#[derive(Clone)]
pub struct Dest {
    store: Arc<dyn ObjectStore>,
    prefix: Vec<String>,
    /// As given, for messages.
    display: String,
}

/// An object exists with different bytes than the ones being written: it
/// is left alone (never overwritten).
#[derive(Debug)]
pub struct Conflict(pub String);

impl std::fmt::Display for Conflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Conflict {}

/// What [`Dest::put_new`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum PutOutcome {
    Written,
    /// The object already held exactly these bytes.
    AlreadyPresent,
}

pub fn sha256_hex(data: &[u8]) -> String {
    let digest = Sha256::digest(data);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

impl Dest {
    /// Parses `s3://bucket/prefix` or a directory path (created if missing).
    pub fn parse(spec: &str) -> anyhow::Result<Dest> {
        if let Some(rest) = spec.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                bail!("{spec:?}: no bucket (expected s3://bucket/prefix)");
            }
            let store = object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .build()
                .with_context(|| format!("configure S3 for {spec}"))?;
            return Ok(Dest {
                store: Arc::new(store),
                prefix: split(prefix),
                display: spec.trim_end_matches('/').to_string(),
            });
        }
        if spec.contains("://") {
            bail!("{spec:?}: only directories and s3:// locations are supported");
        }
        std::fs::create_dir_all(spec).with_context(|| format!("create directory {spec}"))?;
        let store = object_store::local::LocalFileSystem::new_with_prefix(spec)
            .with_context(|| format!("open directory {spec}"))?;
        Ok(Dest {
            store: Arc::new(store),
            prefix: Vec::new(),
            display: spec.trim_end_matches('/').to_string(),
        })
    }

    /// The same store, one level down.
    pub fn child(&self, name: &str) -> Dest {
        let mut d = self.clone();
        d.prefix.extend(split(name));
        d.display = format!("{}/{name}", self.display);
        d
    }

    /// `display/name`, for messages.
    pub fn describe(&self, name: &str) -> String {
        format!("{}/{name}", self.display)
    }

    fn path(&self, name: &str) -> ObjPath {
        ObjPath::from_iter(
            self.prefix
                .iter()
                .map(String::as_str)
                .chain(split(name).iter().map(String::as_str)),
        )
    }

    fn prefix_path(&self) -> Option<ObjPath> {
        (!self.prefix.is_empty())
            .then(|| ObjPath::from_iter(self.prefix.iter().map(String::as_str)))
    }

    /// Writes `data` at `name` unless an object is there: identical bytes
    /// count as written before; different bytes are an error and are left
    /// alone. The write is read back (size and sha256) before returning.
    pub async fn put_new(&self, name: &str, data: Bytes) -> anyhow::Result<PutOutcome> {
        let path = self.path(name);
        let want = sha256_hex(&data);
        if self.exists(name).await? {
            self.check_same(name, data.len() as u64, &want).await?;
            return Ok(PutOutcome::AlreadyPresent);
        }
        let opts = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        let payload = PutPayload::from_bytes(data.clone());
        match self.store.put_opts(&path, payload, opts).await {
            Ok(_) => {}
            Err(object_store::Error::AlreadyExists { .. }) => {
                // Another writer won the race: only identical bytes are fine.
                self.check_same(name, data.len() as u64, &want).await?;
                return Ok(PutOutcome::AlreadyPresent);
            }
            Err(object_store::Error::NotImplemented) => {
                // No conditional put on this store: the existence check
                // above is the guard.
                self.store
                    .put(&path, PutPayload::from_bytes(data.clone()))
                    .await
                    .with_context(|| format!("upload {}", self.describe(name)))?;
            }
            Err(e) => return Err(e).with_context(|| format!("upload {}", self.describe(name))),
        }
        self.check_same(name, data.len() as u64, &want).await?;
        Ok(PutOutcome::Written)
    }

    /// Reads the object back and compares its size and sha256.
    async fn check_same(&self, name: &str, size: u64, sha256: &str) -> anyhow::Result<()> {
        let meta = self
            .store
            .head(&self.path(name))
            .await
            .with_context(|| format!("read back {}", self.describe(name)))?;
        if meta.size != size {
            return Err(Conflict(format!(
                "{}: holds {} bytes, expected {size}; refusing to overwrite an existing object with different bytes",
                self.describe(name),
                meta.size
            ))
            .into());
        }
        let got = sha256_hex(&self.get(name).await?);
        if got != sha256 {
            return Err(Conflict(format!(
                "{}: sha256 {got}, expected {sha256}; refusing to overwrite an existing object with different bytes",
                self.describe(name)
            ))
            .into());
        }
        Ok(())
    }

    pub async fn exists(&self, name: &str) -> anyhow::Result<bool> {
        match self.store.head(&self.path(name)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e).with_context(|| format!("look up {}", self.describe(name))),
        }
    }

    pub async fn get(&self, name: &str) -> anyhow::Result<Bytes> {
        let r = self
            .store
            .get(&self.path(name))
            .await
            .with_context(|| format!("read {}", self.describe(name)))?;
        r.bytes()
            .await
            .with_context(|| format!("read {}", self.describe(name)))
    }

    /// Overwrites `name` (for a manifest written once, last).
    pub async fn put(&self, name: &str, data: Bytes) -> anyhow::Result<()> {
        self.store
            .put(&self.path(name), PutPayload::from_bytes(data))
            .await
            .with_context(|| format!("write {}", self.describe(name)))?;
        Ok(())
    }

    /// Names of the objects directly below this prefix.
    pub async fn list_files(&self) -> anyhow::Result<Vec<String>> {
        let listed = self
            .store
            .list_with_delimiter(self.prefix_path().as_ref())
            .await
            .with_context(|| format!("list {}", self.display))?;
        let mut names: Vec<String> = listed
            .objects
            .iter()
            .filter_map(|o| o.location.filename().map(str::to_string))
            .collect();
        names.sort();
        Ok(names)
    }

    /// Names of the "directories" directly below this prefix.
    pub async fn list_dirs(&self) -> anyhow::Result<Vec<String>> {
        let listed = self
            .store
            .list_with_delimiter(self.prefix_path().as_ref())
            .await
            .with_context(|| format!("list {}", self.display))?;
        let mut names: Vec<String> = listed
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_string))
            .collect();
        names.sort();
        Ok(names)
    }
}

fn split(s: &str) -> Vec<String> {
    s.split('/')
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect()
}

/// Splits `LOCATION/ID` into the location and the id.
pub fn split_backup(spec: &str) -> anyhow::Result<(Dest, String)> {
    let trimmed = spec.trim_end_matches('/');
    let Some((parent, id)) = trimmed.rsplit_once('/') else {
        bail!("{spec:?}: expected LOCATION/ID, e.g. /var/backups/stemedb/<id> or s3://bucket/prefix/<id>");
    };
    if parent.is_empty() || parent == "s3:/" {
        bail!("{spec:?}: expected LOCATION/ID");
    }
    Ok((Dest::parse(parent)?, id.to_string()))
}
