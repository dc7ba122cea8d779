//! `backup create`: streams `GET /v1/admin/export` into data files of
//! bounded size, uploads and reads back each one, then writes the manifest.
//!
//! The export is a consistent snapshot as of its basis LSN while writes
//! continue (the tx log is append-only), so the backup is online.

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

use super::dest::{sha256_hex, Dest};
use super::manifest::{ContentHash, DataFile, Manifest, FORMAT_VERSION, MANIFEST_NAME};
use super::progress::Progress;
use crate::cli::Cli;
use crate::exit::{ConnectionError, ServerError, UsageError};

/// Frames buffered from the HTTP body before decoding, at most.
const STREAM_BUFFER_BYTES_MAX: usize = 256 * 1024 * 1024;

pub struct CreateConfig {
    pub to: String,
    pub at_lsn: Option<u64>,
    pub file_bytes_max: u64,
}

/// The data file being filled.
struct Open {
    buf: Vec<u8>,
    entry: DataFile,
}

impl Open {
    fn new(index: usize, basis: u64) -> Open {
        Open {
            buf: stemed::export::encode_header(basis),
            entry: DataFile {
                name: format!("data-{index:06}.stx"),
                bytes: 0,
                sha256: String::new(),
                crc32c: 0,
                transactions: 0,
                assertions: 0,
                first_tx: 0,
                last_tx: 0,
            },
        }
    }
}

/// Splits the frames of one export into data files and uploads each.
struct Writer {
    dest: Dest,
    basis: u64,
    file_bytes_max: u64,
    open: Open,
    files: Vec<DataFile>,
    hash: ContentHash,
}

impl Writer {
    async fn add(&mut self, tx: u64, data: &[u8], progress: &mut Progress) -> anyhow::Result<()> {
        let rec = stemed::store::codec::decode_tx(data)
            .map_err(|e| ServerError(format!("export tx {tx}: {e}")))?;
        self.hash.add(tx, data);
        stemed::export::encode_frame(tx, data, &mut self.open.buf);
        let e = &mut self.open.entry;
        if e.first_tx == 0 {
            e.first_tx = tx;
        }
        e.last_tx = tx;
        e.transactions += 1;
        e.assertions += rec.assertions.len() as u64;
        progress.tick(tx, self.basis);
        if self.open.buf.len() as u64 >= self.file_bytes_max {
            let next = Open::new(self.files.len() + 2, self.basis);
            let full = std::mem::replace(&mut self.open, next);
            self.files.push(seal(&self.dest, full).await?);
        }
        Ok(())
    }

    async fn finish(mut self) -> anyhow::Result<(Vec<DataFile>, String)> {
        if self.open.entry.transactions > 0 || self.files.is_empty() {
            self.files.push(seal(&self.dest, self.open).await?);
        }
        Ok((self.files, self.hash.finish()))
    }
}

/// The next data chunk of the body, counted in `progress`.
async fn next_chunk(
    body: &mut hyper::body::Incoming,
    progress: &mut Progress,
) -> anyhow::Result<Bytes> {
    loop {
        let Some(frame) = body.frame().await else {
            bail!("export stream ended without its end frame (node restarted?)");
        };
        let frame = frame.map_err(|e| ConnectionError(format!("reading the export: {e}")))?;
        if let Ok(chunk) = frame.into_data() {
            progress.bytes += chunk.len() as u64;
            return Ok(chunk);
        }
    }
}

pub async fn run(cli: &Cli, cfg: &CreateConfig) -> anyhow::Result<Manifest> {
    let root = Dest::parse(&cfg.to)?;
    let mut body = open_export(cli, cfg.at_lsn).await?;
    let created = std::time::SystemTime::now();
    let micros = created
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as i64;
    let mut progress = Progress::new("backup");
    let mut buf: Vec<u8> = Vec::new();
    while buf.len() < 16 {
        buf.extend_from_slice(&next_chunk(&mut body, &mut progress).await?);
    }
    let (basis, mut at) = stemed::export::decode_header(&buf).map_err(ServerError)?;
    let id = format!("{basis:020}-{micros}");
    let mut writer = Writer {
        dest: root.child(&id),
        basis,
        file_bytes_max: cfg.file_bytes_max,
        open: Open::new(1, basis),
        files: Vec::new(),
        hash: ContentHash::default(),
    };
    'stream: loop {
        while let Some((f, n)) = stemed::export::decode_frame(&buf[at..]).map_err(ServerError)? {
            at += n;
            match f {
                stemed::export::Frame::End => break 'stream,
                stemed::export::Frame::Tx { tx, data } => {
                    writer.add(tx, &data, &mut progress).await?
                }
            }
        }
        buf.drain(..at);
        at = 0;
        buf.extend_from_slice(&next_chunk(&mut body, &mut progress).await?);
        if buf.len() > STREAM_BUFFER_BYTES_MAX {
            bail!("export frame larger than {STREAM_BUFFER_BYTES_MAX} bytes");
        }
    }
    let dest = writer.dest.clone();
    let (files, content_sha256) = writer.finish().await?;
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        id,
        basis_lsn: basis,
        created_at: crate::timefmt::format_rfc3339(created),
        created_at_unix_micros: micros,
        source_admin_addr: cli.admin_addr.clone(),
        transactions: files.iter().map(|f| f.transactions).sum(),
        assertions: files.iter().map(|f| f.assertions).sum(),
        content_sha256,
        files,
    };
    manifest
        .validate()
        .map_err(|e| anyhow::anyhow!("backup manifest: {e}"))?;
    let json = serde_json::to_vec_pretty(&manifest)?;
    dest.put(MANIFEST_NAME, Bytes::from(json)).await?;
    progress.print(basis, basis);
    Ok(manifest)
}

/// Ends the file, uploads it and reads it back.
async fn seal(dest: &Dest, mut open: Open) -> anyhow::Result<DataFile> {
    stemed::export::encode_end(&mut open.buf);
    let mut entry = open.entry;
    entry.bytes = open.buf.len() as u64;
    entry.sha256 = sha256_hex(&open.buf);
    entry.crc32c = crc32c::crc32c(&open.buf);
    dest.put_new(&entry.name, Bytes::from(open.buf)).await?;
    Ok(entry)
}

/// Starts `GET /v1/admin/export` and returns the streaming body.
async fn open_export(cli: &Cli, at_lsn: Option<u64>) -> anyhow::Result<hyper::body::Incoming> {
    let addr = cli.admin_addr.trim_end_matches('/');
    let Some(hostport) = addr.strip_prefix("http://") else {
        return Err(UsageError(format!(
            "--admin-addr {addr:?}: backup create supports http:// admin addresses only"
        ))
        .into());
    };
    let tcp = tokio::net::TcpStream::connect(hostport)
        .await
        .map_err(|e| ConnectionError(format!("cannot reach stemed admin at {addr}: {e}")))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| ConnectionError(format!("stemed admin at {addr}: {e}")))?;
    tokio::spawn(conn);
    let path = match at_lsn {
        Some(n) => format!("/v1/admin/export?to_lsn={n}"),
        None => "/v1/admin/export".to_string(),
    };
    let mut req = http::Request::builder()
        .method(http::Method::GET)
        .uri(&path)
        .header(http::header::HOST, hostport);
    if let Some(token) = &cli.token {
        req = req.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let req = req.body(Empty::<Bytes>::new())?;
    let resp = sender
        .send_request(req)
        .await
        .with_context(|| format!("GET {addr}{path}"))?;
    if !resp.status().is_success() {
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        return Err(ServerError(format!(
            "GET {addr}{path}: HTTP {status}: {}",
            String::from_utf8_lossy(&body).trim()
        ))
        .into());
    }
    Ok(resp.into_body())
}
