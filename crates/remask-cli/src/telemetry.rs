//! Logs on stderr (text or JSON) and, with `--otlp-endpoint`, the same
//! tracing spans (requests, denoising steps) exported over OTLP/gRPC.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::sync::OnceLock;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Flushes exported spans when dropped (at the end of `main`).
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

/// The log level: `REMASK_LOG`, else `RUST_LOG`, else `default` (servers:
/// one line per request at info; other commands: warnings only).
pub fn init(json: bool, otlp_endpoint: Option<&str>, default: &str) -> Result<Telemetry, String> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("REMASK_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_env("RUST_LOG"))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let logs = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        // Colours only on a terminal: escape codes in a log file or a
        // collector's input are noise.
        use std::io::IsTerminal;
        tracing_subscriber::fmt::layer()
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .boxed()
    };
    let provider = otlp_endpoint.map(exporter).transpose()?;
    // Spans go to OTLP whatever the log level: the filter applies to the logs only.
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("remask"))
            .with_filter(tracing_subscriber::EnvFilter::new(
                "remask_cluster=info,remask_cli=info",
            ))
    });
    tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(otel)
        .init();
    Ok(Telemetry { provider })
}

fn exporter(endpoint: &str) -> Result<SdkTracerProvider, String> {
    // The tonic exporter's connection lives on a runtime of its own, so
    // spans are exported the same way from every command.
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    let rt = RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("otlp")
            .enable_all()
            .build()
            .expect("a runtime for the OTLP exporter")
    });
    let _guard = rt.enter();
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| format!("--otlp-endpoint {endpoint}: {e}"))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name("remask")
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}
