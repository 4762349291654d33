//! OpenTelemetry traces: OTLP over gRPC, configured by the standard `OTEL_*` variables, and the
//! W3C trace context carried in gRPC metadata and in Raft proposals.
//!
//! Tracing is on when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`)
//! is set, unless `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`. The SDK itself reads
//! `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER(_ARG)`,
//! `OTEL_BSP_*` and the exporter's `OTEL_EXPORTER_OTLP_*` settings.
//!
//! Spans meant for traces use the target [`TARGET`]: the log output leaves them out (log lines
//! stay as they were) and the exporter takes only them (plus what `MODE_OTEL_FILTER` adds;
//! `MODE_OTEL_FILTER=off,mode_trace=debug` also traces the Raft transport's calls).

use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The tracing target of spans exported as traces.
pub const TARGET: &str = "mode_trace";

/// The metadata key of the W3C trace context.
const TRACEPARENT: &str = "traceparent";

static PROVIDER: Mutex<Option<SdkTracerProvider>> = Mutex::new(None);
static PROPAGATOR: OnceLock<TraceContextPropagator> = OnceLock::new();

fn propagator() -> &'static TraceContextPropagator {
    PROPAGATOR.get_or_init(TraceContextPropagator::new)
}

/// Whether the environment asks for traces.
pub fn configured() -> bool {
    let set = |k: &str| std::env::var(k).is_ok_and(|v| !v.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
        || std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.eq_ignore_ascii_case("none"));
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// Start the OTLP exporter if the environment asks for it: a layer for the subscriber, or
/// `None` when tracing is off. Must run inside a tokio runtime (the exporter's gRPC client
/// lives on it). `service` names the program unless `OTEL_SERVICE_NAME` does; `attributes` are
/// added to the resource (`mode.node.id`, ...); without `retry` each batch is sent once.
pub fn layer<S>(
    service: &str,
    attributes: Vec<KeyValue>,
    retry: bool,
) -> Result<Option<Box<dyn tracing_subscriber::Layer<S> + Send + Sync>>, String>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a> + Send + Sync,
{
    use tracing_subscriber::Layer as _;
    if !configured() {
        return Ok(None);
    }
    use opentelemetry_otlp::WithTonicConfig as _;
    let mut exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic();
    if !retry {
        // One attempt: a collector that is down costs a refused connection, not the
        // exporter's backoff (0.8 s per modectl call).
        exporter = exporter.with_retry_policy(opentelemetry_otlp::RetryPolicy::disabled());
    }
    let exporter = exporter.build().map_err(|e| {
        format!("cannot set up the OTLP exporter (check OTEL_EXPORTER_OTLP_ENDPOINT): {e}")
    })?;
    let mut resource = Resource::builder().with_attributes(attributes);
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(service.to_string());
    }
    let provider = SdkTracerProvider::builder()
        .with_resource(resource.build())
        .with_batch_exporter(exporter)
        .build();
    let tracer = provider.tracer("mode");
    *PROVIDER.lock().unwrap_or_else(|p| p.into_inner()) = Some(provider);
    let filter_text =
        std::env::var("MODE_OTEL_FILTER").unwrap_or_else(|_| format!("off,{TARGET}=info"));
    let filter = tracing_subscriber::EnvFilter::try_new(&filter_text)
        .map_err(|e| format!("invalid MODE_OTEL_FILTER '{filter_text}': {e}"))?;
    Ok(Some(
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(filter)
            .boxed(),
    ))
}

/// Export what is buffered and stop the exporter (at exit; waits at most `timeout`).
pub async fn shutdown(timeout: Duration) {
    let Some(provider) = PROVIDER.lock().unwrap_or_else(|p| p.into_inner()).take() else {
        return;
    };
    // The SDK blocks while its exporter thread sends over the runtime's gRPC client: never on
    // a runtime thread.
    let flush = tokio::task::spawn_blocking(move || {
        if let Err(e) = provider.shutdown_with_timeout(timeout) {
            eprintln!("warning: exporting the last traces: {e}");
        }
    });
    let _ = tokio::time::timeout(timeout + Duration::from_millis(500), flush).await;
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(k, v);
        }
    }
}

struct HeaderExtractor<'a>(&'a tonic::codegen::http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct TextCarrier<'a>(&'a str);

impl Extractor for TextCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == TRACEPARENT).then_some(self.0)
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT]
    }
}

struct TextSink(Option<String>);

impl Injector for TextSink {
    fn set(&mut self, key: &str, value: String) {
        if key == TRACEPARENT {
            self.0 = Some(value);
        }
    }
}

/// Whether the current span is part of a trace (work done on behalf of a traced request).
/// Background work (heartbeats, reports, events) checks this to stay out of traces.
pub fn in_trace() -> bool {
    tracing::Span::current()
        .context()
        .span()
        .span_context()
        .is_valid()
}

/// Put the current span's trace context into outgoing gRPC metadata.
pub fn inject(metadata: &mut tonic::metadata::MetadataMap) {
    let cx = tracing::Span::current().context();
    if cx.span().span_context().is_valid() {
        propagator().inject_context(&cx, &mut MetadataInjector(metadata));
    }
}

/// The `traceparent` of `span`, if it is part of a trace (stored with proposals and
/// placements so that work done later, elsewhere, joins the same trace).
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut sink = TextSink(None);
    propagator().inject_context(&cx, &mut sink);
    sink.0
}

/// Make `span` a child of the trace context `traceparent` (no-op for `None` or garbage).
pub fn set_parent(span: &tracing::Span, traceparent: Option<&str>) {
    if let Some(tp) = traceparent {
        let cx = propagator().extract(&TextCarrier(tp));
        if cx.span().span_context().is_valid() {
            let _ = span.set_parent(cx);
        }
    }
}

/// The span of one incoming gRPC call, child of the caller's trace context if it sent one.
/// Control API calls are traced at INFO; the Raft transport's and agents' heartbeats (several
/// a second, always) at DEBUG, off unless `MODE_OTEL_FILTER` asks.
pub fn server_span(request: &tonic::codegen::http::Request<()>) -> tracing::Span {
    let path = request.uri().path();
    let cx = propagator().extract(&HeaderExtractor(request.headers()));
    let traced = cx.span().span_context().is_valid();
    // Calls that run all the time start no trace of their own: the Raft transport, agents'
    // heartbeats, and the graph fan-out of the web view.
    let background = matches!(
        path,
        "/mode.v1.Peer/Vote"
            | "/mode.v1.Peer/PreVote"
            | "/mode.v1.Peer/AppendEntries"
            | "/mode.v1.Peer/InstallSnapshot"
            | "/mode.v1.Peer/Heartbeat"
            | "/mode.v1.Peer/ReportInstances"
            | "/mode.v1.Peer/WatchPlacements"
    ) || (path == "/mode.v1.Peer/NodeBeacon" && !traced);
    let span = if background {
        tracing::debug_span!(target: TARGET, "grpc", otel.name = %path, otel.kind = "server", rpc.system = "grpc", rpc.method = %path)
    } else {
        tracing::info_span!(target: TARGET, "grpc", otel.name = %path, otel.kind = "server", rpc.system = "grpc", rpc.method = %path)
    };
    if traced && !span.is_disabled() {
        let _ = span.set_parent(cx);
    }
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_trace_contexts_are_ignored() {
        let span = tracing::Span::none();
        set_parent(&span, Some("not a traceparent"));
        set_parent(&span, None);
        assert_eq!(traceparent(&span), None);
        let mut md = tonic::metadata::MetadataMap::new();
        inject(&mut md);
        assert!(md.get(TRACEPARENT).is_none(), "no trace, nothing injected");
    }
}
