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

pub async fn run(cli: &Cli, cfg: &CreateConfig) -> anyhow::Result<Manifest> {
    let root = Dest::parse(&cfg.to)?;
    let mut body = open_export(cli, cfg.at_lsn).await?;
    let mut buf: Vec<u8> = Vec::new();
    let mut basis: Option<u64> = None;
    let created = std::time::SystemTime::now();
    let micros = created
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as i64;
    let mut progress = Progress::new("backup");
    let mut hash = ContentHash::default();
    let mut files: Vec<DataFile> = Vec::new();
    let mut open: Option<Open> = None;
    let mut dest: Option<Dest> = None;
    let mut id = String::new();
    let mut ended = false;
    while !ended {
        let Some(frame) = body.frame().await else {
            bail!("export stream ended without its end frame (node restarted?)");
        };
        let frame = frame.map_err(|e| ConnectionError(format!("reading the export: {e}")))?;
        let Ok(chunk) = frame.into_data() else {
            continue;
        };
        progress.bytes += chunk.len() as u64;
        buf.extend_from_slice(&chunk);
        if buf.len() > STREAM_BUFFER_BYTES_MAX {
            bail!("export frame larger than {STREAM_BUFFER_BYTES_MAX} bytes");
        }
        let mut at = 0;
        if basis.is_none() {
            if buf.len() < 16 {
                continue;
            }
            let (b, n) = stemed::export::decode_header(&buf).map_err(|e| ServerError(e))?;
            basis = Some(b);
            at = n;
            id = format!("{b:020}-{micros}");
            dest = Some(root.child(&id));
            open = Some(Open::new(1, b));
        }
        let b = basis.expect("set above");
        loop {
            let Some((f, n)) =
                stemed::export::decode_frame(&buf[at..]).map_err(|e| ServerError(e))?
            else {
                break;
            };
            at += n;
            let cur = open.as_mut().expect("opened with the header");
            match f {
                stemed::export::Frame::End => {
                    ended = true;
                    break;
                }
                stemed::export::Frame::Tx { tx, data } => {
                    let rec = stemed::store::codec::decode_tx(&data)
                        .map_err(|e| ServerError(format!("export tx {tx}: {e}")))?;
                    hash.add(tx, &data);
                    stemed::export::encode_frame(tx, &data, &mut cur.buf);
                    let e = &mut cur.entry;
                    if e.first_tx == 0 {
                        e.first_tx = tx;
                    }
                    e.last_tx = tx;
                    e.transactions += 1;
                    e.assertions += rec.assertions.len() as u64;
                    progress.tick(tx, b);
                    if cur.buf.len() as u64 >= cfg.file_bytes_max {
                        let full = open.take().expect("open");
                        files.push(seal(dest.as_ref().expect("dest"), full).await?);
                        open = Some(Open::new(files.len() + 1, b));
                    }
                }
            }
        }
        buf.drain(..at);
    }
    let basis = basis.expect("ended implies a header");
    let dest = dest.expect("ended implies a header");
    if let Some(last) = open.take() {
        if last.entry.transactions > 0 || files.is_empty() {
            files.push(seal(&dest, last).await?);
        }
    }
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        id,
        basis_lsn: basis,
        created_at: crate::timefmt::format_rfc3339(created),
        created_at_unix_micros: micros,
        source_admin_addr: cli.admin_addr.clone(),
        transactions: files.iter().map(|f| f.transactions).sum(),
        assertions: files.iter().map(|f| f.assertions).sum(),
        content_sha256: hash.finish(),
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
