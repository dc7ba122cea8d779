//! Logs, traces and the gRPC request layer.
//!
//! - **Logs**: `tracing` to stderr, `text` or `json` (`[telemetry]
//!   log_format`). Each request runs inside a `grpc.request` span whose
//!   `trace_id` field is printed with every line logged inside it.
//! - **Traces**: a `tracing-opentelemetry` layer is always installed, so
//!   every span has W3C ids even without an exporter. When
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` (or `[telemetry] otlp_endpoint`) is set,
//!   spans are exported over OTLP/gRPC (tonic) in batches.
//! - **Propagation**: [`GrpcLayer`] extracts `traceparent` from the
//!   client's metadata; `wal_link` injects the current context into every
//!   request to walld with [`inject`].
//! - **Metrics**: [`GrpcLayer`] records `stemedb_api_request_duration_seconds`
//!   by method and status code (see `metrics.rs`).

use crate::config::TelemetryConfig;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The environment variable that turns OTLP export on.
pub const OTLP_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// The tracer provider. Call [`Telemetry::shutdown`] before the runtime
/// stops, from a blocking context: it flushes the span exporter, whose
/// channel lives on the runtime.
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Exports what is still buffered; bounded by the SDK's own timeout.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            eprintln!("stemed: span exporter shutdown: {e}");
        }
    }
}

/// The OTLP endpoint in force: the environment wins over the config file.
pub fn otlp_endpoint(config: &TelemetryConfig) -> Option<String> {
    std::env::var(OTLP_ENDPOINT_ENV)
        .ok()
        .filter(|v| !v.is_empty())
        .or_else(|| config.otlp_endpoint.clone().filter(|v| !v.is_empty()))
}

/// Installs logging and tracing. Must run inside the tokio runtime when an
/// OTLP endpoint is set (the tonic channel is created on it).
pub fn init(config: &TelemetryConfig) -> Telemetry {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name("stemed")
        .build();
    let mut builder = SdkTracerProvider::builder().with_resource(resource);
    let mut export_error = None;
    if let Some(endpoint) = otlp_endpoint(config) {
        use opentelemetry_otlp::WithExportConfig;
        match opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .build()
        {
            Ok(exporter) => builder = builder.with_batch_exporter(exporter),
            Err(e) => export_error = Some(format!("OTLP exporter for {endpoint}: {e}")),
        }
    }
    let provider = builder.build();
    let tracer = provider.tracer("stemed");
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log_level));
    let otel = tracing_opentelemetry::layer().with_tracer(tracer);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    if config.log_format == "json" {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    // `spans` lists every enclosing span, so a line logged
                    // in a nested stage still shows the request's trace_id.
                    .with_current_span(true)
                    .with_span_list(true)
                    .with_writer(std::io::stderr),
            )
            .init();
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(ansi)
                    .with_writer(std::io::stderr),
            )
            .init();
    }
    if let Some(e) = export_error {
        tracing::warn!(error = %e, "spans will not be exported");
    }
    Telemetry { provider }
}

/// The trace id of `span` as 32 hex digits (all zeros when tracing is off).
pub fn trace_id(span: &tracing::Span) -> String {
    span.context().span().span_context().trace_id().to_string()
}

struct HeaderExtract<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtract<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct MetadataInject<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInject<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            value.parse(),
        ) {
            self.0.insert(k, v);
        }
    }
}

/// Writes the current span's context (`traceparent`) into `metadata`.
pub fn inject(metadata: &mut tonic::metadata::MetadataMap) {
    let cx = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&cx, &mut MetadataInject(metadata));
}

/// The methods of `stemedb.v1.Store`; any other path is labelled `other`,
/// so a client cannot grow the label set.
const STORE_METHODS: &[&str] = &["Transact", "Get", "Query", "History", "Watch"];
const STORE_PREFIX: &str = "/stemedb.v1.Store/";

fn method_label(path: &str) -> Option<&'static str> {
    let method = path.strip_prefix(STORE_PREFIX)?;
    Some(
        STORE_METHODS
            .iter()
            .find(|m| **m == method)
            .copied()
            .unwrap_or("other"),
    )
}

/// The gRPC status of a response whose headers are in: trailers-only
/// responses (every error tonic returns from a unary handler) carry
/// `grpc-status` in the headers; its absence means OK so far.
fn code_label<B>(response: &http::Response<B>) -> &'static str {
    let code = response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(tonic::Code::Ok, tonic::Code::from_i32);
    code_name(code)
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "Canceled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

/// Tower layer on the gRPC server: one `grpc.request` span per call of
/// `stemedb.v1.Store` (child of the client's `traceparent`), and the request
/// duration histogram.
/// Watch is a stream, so its recorded duration ends when its headers are
/// sent, not when the stream closes.
#[derive(Clone, Copy, Default)]
pub struct GrpcLayer;

impl<S> tower::Layer<S> for GrpcLayer {
    type Service = GrpcService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcService { inner }
    }
}

#[derive(Clone)]
pub struct GrpcService<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, R> tower::Service<http::Request<B>> for GrpcService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path().to_string();
        let Some(method) = method_label(&path) else {
            // Health checks and reflection: no span, no histogram, so load
            // balancer probes do not flood the trace backend.
            return Box::pin(self.inner.call(request));
        };
        let parent = TraceContextPropagator::new().extract(&HeaderExtract(request.headers()));
        let span = tracing::info_span!(
            "grpc.request",
            otel.name = %path,
            rpc.system = "grpc",
            rpc.method = method,
            trace_id = tracing::field::Empty,
        );
        let _ = span.set_parent(parent);
        span.record("trace_id", trace_id(&span).as_str());
        let started = Instant::now();
        let future = self.inner.call(request).instrument(span.clone());
        Box::pin(async move {
            let result = future.await;
            let code = match &result {
                Ok(response) => code_label(response),
                Err(_) => "Unavailable",
            };
            let seconds = started.elapsed().as_secs_f64();
            tracing::debug!(parent: &span, code, seconds, "request finished");
            crate::metrics::observe_request(method, code, seconds);
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_labels_are_bounded() {
        assert_eq!(method_label("/stemedb.v1.Store/Transact"), Some("Transact"));
        assert_eq!(method_label("/stemedb.v1.Store/Nope"), Some("other"));
        assert_eq!(method_label("/grpc.health.v1.Health/Check"), None);
    }
}
