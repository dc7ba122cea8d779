//! Logs and traces of walld.
//!
//! - **Logs**: `tracing` to stderr as `text` or `json` (`--log-format`),
//!   filtered by `STEMEDB_WALLD_LOG` (default `info`).
//! - **Traces**: a `tracing-opentelemetry` layer is always installed, so
//!   spans carry W3C ids; with `OTEL_EXPORTER_OTLP_ENDPOINT` set they are
//!   exported over OTLP/gRPC in batches.
//! - **Propagation**: `grpc` extracts the caller's `traceparent` into the
//!   `wal.append` span; the writer's `wal.group` span is a child of the
//!   group's first append and links the others; `wal.fsync` is its child.

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The environment variable that turns OTLP export on.
pub const OTLP_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// The tracer provider; [`Telemetry::shutdown`] flushes buffered spans.
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Call while the runtime that `init` ran in is still alive.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            eprintln!("walld: span exporter shutdown: {e}");
        }
    }
}

/// Installs logging and tracing. With an OTLP endpoint it must run inside
/// a tokio runtime context (the tonic channel is created on it).
pub fn init(json: bool) -> Telemetry {
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name("walld")
        .build();
    let mut builder = SdkTracerProvider::builder().with_resource(resource);
    let mut export_error = None;
    if let Some(endpoint) = std::env::var(OTLP_ENDPOINT_ENV)
        .ok()
        .filter(|v| !v.is_empty())
    {
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
    let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer("walld"));
    let filter = tracing_subscriber::EnvFilter::try_from_env("STEMEDB_WALLD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    if json {
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
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                    .with_writer(std::io::stderr),
            )
            .init();
    }
    if let Some(e) = export_error {
        tracing::warn!(error = %e, "spans will not be exported");
    }
    Telemetry { provider }
}

struct MetadataExtract<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for MetadataExtract<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// A span named `name` whose parent is the caller's `traceparent`, if any.
/// Its `trace_id` field is printed with every log line inside it.
pub fn request_span(name: &'static str, metadata: &tonic::metadata::MetadataMap) -> tracing::Span {
    let parent = TraceContextPropagator::new().extract(&MetadataExtract(metadata));
    let span = tracing::info_span!(
        "wal.request",
        otel.name = name,
        trace_id = tracing::field::Empty
    );
    let _ = span.set_parent(parent);
    span.record("trace_id", trace_id(&span).as_str());
    span
}

/// The trace id of `span` as 32 hex digits (all zeros when it has none).
pub fn trace_id(span: &tracing::Span) -> String {
    span.context().span().span_context().trace_id().to_string()
}

/// True when `span` belongs to a sampled trace with a real id.
pub fn has_trace(span: &tracing::Span) -> bool {
    span.context().span().span_context().is_valid()
}
