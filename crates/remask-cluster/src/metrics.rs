//! Prometheus metrics, named as vLLM names its own (with a `remask:` prefix
//! and a `model_name` label), so existing dashboards need only the prefix
//! changed. Served as text on the HTTP API's `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Model {
    pub model_name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Finished {
    pub model_name: String,
    pub finished_reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabel {
    pub model_name: String,
    pub stage: String,
    pub worker: String,
}

type GaugeF = Gauge<f64, AtomicU64>;

pub struct Metrics {
    model: Model,
    registry: Registry,
    pub running: Family<Model, Gauge>,
    pub waiting: Family<Model, Gauge>,
    pub prompt_tokens: Family<Model, Counter>,
    pub generation_tokens: Family<Model, Counter>,
    pub request_success: Family<Finished, Counter>,
    pub e2e_latency: Family<Model, Histogram>,
    pub queue_time: Family<Model, Histogram>,
    pub step_time: Family<Model, Histogram>,
    pub tokens_per_forward: Family<Model, Histogram>,
    pub forwards_per_request: Family<Model, Histogram>,
    pub stage_forward_time: Family<StageLabel, Histogram>,
    pub stage_bytes: Family<Model, Histogram>,
    pub kv_cache_bytes: Family<Model, Gauge>,
    pub kv_cache_rebuilds: Family<Model, Counter>,
    pub workers: Family<Model, Gauge>,
    pub shard_coverage: Family<Model, GaugeF>,
}

fn seconds() -> Histogram {
    // 1 ms .. ~1 min
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

impl Metrics {
    pub fn new(model_name: &str) -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            model: Model {
                model_name: model_name.to_string(),
            },
            running: Family::default(),
            waiting: Family::default(),
            prompt_tokens: Family::default(),
            generation_tokens: Family::default(),
            request_success: Family::default(),
            e2e_latency: Family::new_with_constructor(seconds),
            queue_time: Family::new_with_constructor(seconds),
            step_time: Family::new_with_constructor(seconds),
            tokens_per_forward: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(1.0, 2.0, 12))
            }),
            forwards_per_request: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(1.0, 2.0, 14))
            }),
            stage_forward_time: Family::new_with_constructor(seconds),
            stage_bytes: Family::new_with_constructor(|| {
                // 1 KiB .. 1 GiB
                Histogram::new(exponential_buckets(1024.0, 4.0, 11))
            }),
            kv_cache_bytes: Family::default(),
            kv_cache_rebuilds: Family::default(),
            workers: Family::default(),
            shard_coverage: Family::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "remask:num_requests_running",
            "Requests in the running batch",
            m.running.clone(),
        );
        r.register(
            "remask:num_requests_waiting",
            "Requests waiting for a place in the batch",
            m.waiting.clone(),
        );
        r.register(
            "remask:prompt_tokens",
            "Prompt tokens of finished requests",
            m.prompt_tokens.clone(),
        );
        r.register(
            "remask:generation_tokens",
            "Answer tokens of finished requests (before the first stop token)",
            m.generation_tokens.clone(),
        );
        r.register(
            "remask:request_success",
            "Finished requests by finish reason",
            m.request_success.clone(),
        );
        r.register(
            "remask:e2e_request_latency_seconds",
            "Request latency from arrival to result",
            m.e2e_latency.clone(),
        );
        r.register(
            "remask:request_queue_time_seconds",
            "Time waiting for a place in the batch",
            m.queue_time.clone(),
        );
        r.register(
            "remask:time_per_denoising_step_seconds",
            "Wall time of one denoising step of the batch",
            m.step_time.clone(),
        );
        r.register(
            "remask:tokens_committed_per_forward",
            "Tokens a request commits in one forward pass (several under an adaptive commit rule)",
            m.tokens_per_forward.clone(),
        );
        r.register(
            "remask:forwards_per_request",
            "Forward passes a finished request took part in",
            m.forwards_per_request.clone(),
        );
        r.register(
            "remask:stage_forward_time_seconds",
            "Forward time of one stage, transfers included",
            m.stage_forward_time.clone(),
        );
        r.register(
            "remask:stage_transfer_bytes",
            "Hidden-state bytes one stage boundary carries per step",
            m.stage_bytes.clone(),
        );
        r.register(
            "remask:kv_cache_bytes",
            "K/V cache bytes the running requests hold, over all stages",
            m.kv_cache_bytes.clone(),
        );
        r.register(
            "remask:kv_cache_rebuilds",
            "K/V caches rebuilt from the coordinator's canvas after a worker lost them",
            m.kv_cache_rebuilds.clone(),
        );
        r.register(
            "remask:workers",
            "Workers holding a stage",
            m.workers.clone(),
        );
        r.register(
            "remask:shard_coverage",
            "Fraction of the stages with a loaded worker",
            m.shard_coverage.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn finished(&self, reason: &str) -> Finished {
        Finished {
            model_name: self.model.model_name.clone(),
            finished_reason: reason.to_string(),
        }
    }

    pub fn stage(&self, stage: usize, worker: &str) -> StageLabel {
        StageLabel {
            model_name: self.model.model_name.clone(),
            stage: stage.to_string(),
            worker: worker.to_string(),
        }
    }

    /// The exposition text for `/metrics`.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }
}
