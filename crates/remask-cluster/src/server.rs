//! Serving a coordinator or a worker: the service itself plus gRPC health and
//! server reflection (v1 and v1alpha, so both grpcurl and buf can list it).

use crate::coordinator::Coordinator;
use crate::listen::{self, Limits};
use crate::pipeline::{MAX_MESSAGE_BYTES, Pipeline};
use crate::worker::WorkerService;
use remask_proto::v1::generation_server::GenerationServer;
use remask_proto::worker::worker_server::WorkerServer;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tonic::codec::CompressionEncoding;
use tonic::transport::Server;
use tonic_health::ServingStatus;

const GENERATION_SERVICE: &str = "remask.v1.Generation";
const WORKER_SERVICE: &str = "remask.worker.v1.Worker";

const HEALTH_SERVICE: &str = "grpc.health.v1.Health";

/// Reflection listing what this process serves: `service` and health (a
/// coordinator does not offer the worker API, nor a worker the public one).
fn reflection(service: &'static str) -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(remask_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name(service)
        .with_service_name(HEALTH_SERVICE)
}

fn reflection_v1(
    service: &'static str,
) -> anyhow::Result<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
> {
    Ok(reflection(service).build_v1()?)
}

fn reflection_v1alpha(
    service: &'static str,
) -> anyhow::Result<
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
> {
    Ok(reflection(service).build_v1alpha()?)
}

/// Serves the Generation API (and, with `http`, the OpenAI-compatible HTTP
/// API) until `shutdown` resolves. Health follows the pipeline: SERVING while
/// every stage has a worker, NOT_SERVING otherwise.
pub async fn serve_coordinator(
    listener: tokio::net::TcpListener,
    http: Option<tokio::net::TcpListener>,
    tls_files: &crate::tls::TlsFiles,
    limits: Limits,
    coordinator: Arc<Coordinator>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let shutdown = futures::FutureExt::shared(Box::pin(shutdown));
    if let Some(http) = http {
        // TLS on the HTTP API too, with the same certificate as gRPC.
        let tls = tls_files.public_server(&[b"h2", b"http/1.1"])?;
        let router = crate::http::router(coordinator.clone());
        tokio::spawn(listen::serve_http(
            http,
            tls,
            limits,
            router,
            shutdown.clone(),
        ));
    }
    let tls = tls_files.public_server(&[b"h2"])?;
    let (reporter, health) = tonic_health::server::health_reporter();
    let mut pipeline: watch::Receiver<Option<Arc<Pipeline>>> = coordinator.pipeline.clone();
    tokio::spawn(async move {
        loop {
            let status = if pipeline.borrow_and_update().is_some() {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            reporter.set_service_status("", status).await;
            reporter
                .set_service_status(GENERATION_SERVICE, status)
                .await;
            if pipeline.changed().await.is_err() {
                return;
            }
        }
    });
    builder(limits)
        .add_service(health)
        .add_service(reflection_v1(GENERATION_SERVICE)?)
        .add_service(reflection_v1alpha(GENERATION_SERVICE)?)
        .add_service(tonic::service::interceptor::InterceptedService::new(
            // gzip: accepted from clients, and used for answers to clients
            // that accept it.
            GenerationServer::from_arc(coordinator.clone())
                .accept_compressed(CompressionEncoding::Gzip)
                .send_compressed(CompressionEncoding::Gzip),
            move |request: tonic::Request<()>| {
                let auth = request
                    .metadata()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok());
                if coordinator.api_keys.allows(auth) {
                    Ok(request)
                } else {
                    Err(tonic::Status::unauthenticated(
                        "missing or invalid API key: send `authorization: Bearer <key>` metadata",
                    ))
                }
            },
        ))
        .serve_with_incoming_shutdown(listen::grpc_incoming(listener, tls, limits), shutdown)
        .await?;
    Ok(())
}

/// Serves a worker's `/metrics` over plain HTTP (Prometheus scrapes it
/// inside the cluster) for as long as the process runs.
pub async fn serve_worker_metrics(
    listener: tokio::net::TcpListener,
    limits: Limits,
    metrics: Arc<crate::metrics::WorkerMetrics>,
) {
    let router = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move |headers: axum::http::HeaderMap| {
            let metrics = metrics.clone();
            async move {
                let accept = headers
                    .get(axum::http::header::ACCEPT)
                    .and_then(|v| v.to_str().ok());
                let (ctype, body) = crate::metrics::exposition(metrics.render(), accept);
                ([(axum::http::header::CONTENT_TYPE, ctype)], body)
            }
        }),
    );
    listen::serve_http(listener, None, limits, router, std::future::pending()).await;
}

/// Serves the Worker API until `shutdown` resolves.
pub async fn serve_worker(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    limits: Limits,
    worker: WorkerService,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    reporter
        .set_service_status(WORKER_SERVICE, ServingStatus::Serving)
        .await;
    builder(limits)
        .add_service(health)
        .add_service(reflection_v1(WORKER_SERVICE)?)
        .add_service(reflection_v1alpha(WORKER_SERVICE)?)
        .add_service(
            WorkerServer::new(worker)
                .accept_compressed(CompressionEncoding::Gzip)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(listen::grpc_incoming(listener, tls, limits), shutdown)
        .await?;
    Ok(())
}

/// tonic's server over connections from `listen::grpc_incoming` (TLS, Nagle
/// off and the preface deadline are done there). HTTP/2 keep-alive pings
/// find peers that went away without closing.
fn builder(limits: Limits) -> Server {
    Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(limits.header_timeout))
}

/// Binds `addr`, with a message that says what to do when it is taken.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e} (is another process using it?)"))
}
