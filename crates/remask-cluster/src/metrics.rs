//! Prometheus metrics, named as vLLM names its own (with a `remask:` prefix
//! and a `model_name` label), so existing dashboards need only the prefix
//! changed. Served on the HTTP API's `/metrics` (and a worker's
//! `--metrics-listen`) as OpenMetrics to scrapers that ask for it (Prometheus
//! does) and as the Prometheus text format 0.0.4 otherwise (curl, promtool):
//! [`exposition`].
//!
//! `promtool check metrics` finds nothing in either but one thing, which is
//! kept on purpose: "metric names should not contain ':'" for every
//! `remask:` name. The colon is vLLM's convention (`vllm:num_requests_running`)
//! that remask follows so that vLLM dashboards and alerts work with the prefix
//! changed; Prometheus reserves colons for recording rules, which is why its
//! linter flags them. `tests/http/test_promtool.py` allows exactly that finding
//! for exactly the `remask:` names. Otherwise the names follow Prometheus'
//! conventions: base units in the name (`_seconds`, `_bytes`), `_total` on
//! every counter, help text on every metric, snake case.

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
pub struct Failed {
    pub model_name: String,
    /// The gRPC status code name (`cancelled`, `deadline_exceeded`, ...).
    pub code: String,
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
    pub request_failure: Family<Failed, Counter>,
    pub e2e_latency: Family<Model, Histogram>,
    pub queue_time: Family<Model, Histogram>,
    pub first_token_time: Family<Model, Histogram>,
    pub prompt_length: Family<Model, Histogram>,
    pub answer_length: Family<Model, Histogram>,
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

/// Request latencies: 10 ms .. ~1.5 h (a long canvas on a slow CPU takes
/// minutes).
fn request_seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 2.0, 20))
}

/// Token counts: 1 .. 32768.
fn tokens() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 16))
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
            request_failure: Family::default(),
            e2e_latency: Family::new_with_constructor(request_seconds),
            queue_time: Family::new_with_constructor(request_seconds),
            first_token_time: Family::new_with_constructor(request_seconds),
            prompt_length: Family::new_with_constructor(tokens),
            answer_length: Family::new_with_constructor(tokens),
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
            "remask:request_failure",
            "Requests that did not finish, by gRPC status code",
            m.request_failure.clone(),
        );
        r.register(
            "remask:time_to_first_token_seconds",
            "Time from arrival until the answer's first token is final (a diffusion model's analogue of time to first token)",
            m.first_token_time.clone(),
        );
        r.register(
            "remask:request_prompt_tokens",
            "Prompt tokens per finished request",
            m.prompt_length.clone(),
        );
        r.register(
            "remask:request_generation_tokens",
            "Answer tokens per finished request",
            m.answer_length.clone(),
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
        register_process(r);
        Metrics { registry, ..m }
    }

    pub fn failed(&self, code: tonic::Code) -> Failed {
        Failed {
            model_name: self.model.model_name.clone(),
            code: code_name(code),
        }
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabel {
    pub worker: String,
}

/// A worker's own metrics (`remask worker --metrics-listen`): its forward
/// passes, its K/V caches against its budget, and the process.
pub struct WorkerMetrics {
    label: WorkerLabel,
    registry: Registry,
    pub forward_time: Family<WorkerLabel, Histogram>,
    pub kv_cache_bytes: Family<WorkerLabel, Gauge>,
    pub kv_caches: Family<WorkerLabel, Gauge>,
    pub kv_budget_bytes: Family<WorkerLabel, Gauge>,
}

impl WorkerMetrics {
    pub fn new(worker: &str) -> Self {
        let label = WorkerLabel {
            worker: worker.to_string(),
        };
        let m = WorkerMetrics {
            label,
            registry: Registry::default(),
            forward_time: Family::new_with_constructor(seconds),
            kv_cache_bytes: Family::default(),
            kv_caches: Family::default(),
            kv_budget_bytes: Family::default(),
        };
        let mut r = Registry::default();
        r.register(
            "remask:worker_forward_time_seconds",
            "Compute time of one Forward on this worker",
            m.forward_time.clone(),
        );
        r.register(
            "remask:worker_kv_cache_bytes",
            "Bytes of the K/V caches this worker holds",
            m.kv_cache_bytes.clone(),
        );
        r.register(
            "remask:worker_kv_caches",
            "K/V caches (request sequences) this worker holds",
            m.kv_caches.clone(),
        );
        r.register(
            "remask:worker_kv_budget_bytes",
            "Bytes the K/V caches may take on this worker (0: unbounded)",
            m.kv_budget_bytes.clone(),
        );
        register_process(&mut r);
        WorkerMetrics { registry: r, ..m }
    }

    pub fn label(&self) -> &WorkerLabel {
        &self.label
    }

    /// The caches held now (after a step or a release).
    pub fn caches(&self, usage: remask_engine::CacheUsage, budget: Option<usize>) {
        let l = &self.label;
        self.kv_cache_bytes.get_or_create(l).set(usage.bytes as i64);
        self.kv_caches.get_or_create(l).set(usage.caches as i64);
        self.kv_budget_bytes
            .get_or_create(l)
            .set(budget.unwrap_or(0) as i64);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }
}

/// `Code::DeadlineExceeded` as `deadline_exceeded`.
fn code_name(code: tonic::Code) -> String {
    let camel = format!("{code:?}");
    let mut out = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// The build and process metrics every remask server exports.
fn register_process(r: &mut Registry) {
    r.register(
        "remask:build_info",
        "The running build (always 1)",
        build_info(),
    );
    r.register_collector(Box::new(Process {
        start: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64()),
    }));
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Build {
    version: String,
}

fn build_info() -> Family<Build, Gauge> {
    let f = Family::<Build, Gauge>::default();
    f.get_or_create(&Build {
        version: env!("CARGO_PKG_VERSION").to_string(),
    })
    .set(1);
    f
}

/// The process metrics Prometheus' client libraries export (read from
/// /proc on each scrape; absent elsewhere).
#[derive(Debug)]
struct Process {
    /// Unix time of the start, in seconds.
    start: f64,
}

impl prometheus_client::collector::Collector for Process {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        let gauge = |encoder: &mut prometheus_client::encoding::DescriptorEncoder,
                     name: &str,
                     help: &str,
                     value: f64| {
            let g = ConstGauge::new(value);
            let m = encoder.encode_descriptor(name, help, None, g.metric_type())?;
            g.encode(m)
        };
        gauge(
            &mut encoder,
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch",
            self.start,
        )?;
        let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
            return Ok(());
        };
        // Fields after the command name (which may hold spaces): state is
        // field 3; utime 14, stime 15, vsize 23, rss 24 (pages).
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
        let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<f64>().ok());
        // USER_HZ is 100 on every Linux platform remask targets.
        if let (Some(u), Some(s)) = (field(14), field(15)) {
            let c = ConstCounter::new((u + s) / 100.0);
            let m = encoder.encode_descriptor(
                "process_cpu_seconds",
                "User and system CPU time spent, in seconds",
                None,
                c.metric_type(),
            )?;
            c.encode(m)?;
        }
        if let Some(v) = field(23) {
            gauge(
                &mut encoder,
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                v,
            )?;
        }
        if let Some(pages) = field(24) {
            gauge(
                &mut encoder,
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                pages * 4096.0,
            )?;
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            gauge(
                &mut encoder,
                "process_open_fds",
                "Open file descriptors",
                fds.count() as f64,
            )?;
        }
        Ok(())
    }
}

/// The content type of OpenMetrics 1.0 text.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of the Prometheus text format 0.0.4.
pub const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The body of a `/metrics` answer in the format the scraper's `Accept` header
/// asks for, with its content type: OpenMetrics (what the registry writes)
/// when it names `application/openmetrics-text`, as Prometheus' scrapes do,
/// else the Prometheus text format 0.0.4, which every other client (curl,
/// promtool, older scrapers) reads; the client libraries of Go and Python
/// negotiate the same way.
pub fn exposition(openmetrics: String, accept: Option<&str>) -> (&'static str, String) {
    let wants_openmetrics = accept.is_some_and(|a| {
        a.split(',').any(|part| {
            let mut params = part.split(';').map(str::trim);
            params
                .next()
                .is_some_and(|m| m.eq_ignore_ascii_case("application/openmetrics-text"))
                && !params.any(|p| p.replace(' ', "") == "q=0")
        })
    });
    if wants_openmetrics {
        (OPENMETRICS, openmetrics)
    } else {
        (TEXT_FORMAT, text_format(&openmetrics))
    }
}

/// OpenMetrics text as the Prometheus text format 0.0.4: a counter family
/// `x` is described as `x_total` (its samples' name), `# UNIT` lines and the
/// closing `# EOF` go, `unknown` is `untyped`. Samples are the same in both
/// (remask writes no exemplars and no `_created` samples).
fn text_format(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let descriptor = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| Some((p, line.strip_prefix(p)?)));
        match descriptor {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push_str(prefix);
                out.push_str(name);
                if counters.contains(name) && !name.ends_with("_total") {
                    out.push_str("_total");
                }
                out.push(' ');
                out.push_str(if prefix == "# TYPE " && tail == "unknown" {
                    "untyped"
                } else {
                    tail
                });
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_format_is_negotiated() {
        let m = Metrics::new("m");
        m.prompt_tokens.get_or_create(m.model()).inc_by(3);
        m.running.get_or_create(m.model()).set(2);
        let om = m.render();
        assert!(om.ends_with("# EOF\n"), "{om}");
        assert!(om.contains("# TYPE remask:prompt_tokens counter\n"), "{om}");
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(
            exposition(om.clone(), Some(prometheus)),
            (OPENMETRICS, om.clone())
        );
        for accept in [
            None,
            Some("*/*"),
            Some("text/plain"),
            Some("application/openmetrics-text;q=0"),
        ] {
            let (ctype, text) = exposition(om.clone(), accept);
            assert_eq!(ctype, TEXT_FORMAT, "{accept:?}");
            assert!(!text.contains("# EOF"), "{text}");
            assert!(
                text.contains("# HELP remask:prompt_tokens_total Prompt tokens"),
                "{text}"
            );
            assert!(
                text.contains("# TYPE remask:prompt_tokens_total counter\n"),
                "{text}"
            );
            assert!(
                text.contains("\nremask:prompt_tokens_total{model_name=\"m\"} 3\n"),
                "{text}"
            );
            assert!(
                text.contains("# TYPE process_cpu_seconds_total counter\n"),
                "{text}"
            );
            assert!(
                text.contains("# TYPE remask:num_requests_running gauge\n"),
                "{text}"
            );
            // the samples are the same
            let samples = |t: &str| {
                t.lines()
                    .filter(|l| !l.starts_with('#'))
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            };
            assert_eq!(samples(&text), samples(&om));
        }
    }

    #[test]
    fn the_text_has_process_and_build_metrics() {
        let m = Metrics::new("m");
        m.first_token_time.get_or_create(m.model()).observe(1.0);
        m.request_failure
            .get_or_create(&m.failed(tonic::Code::Cancelled))
            .inc();
        let text = m.render();
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_start_time_seconds",
            "remask:build_info{version=",
            "remask:time_to_first_token_seconds_count",
            "remask:request_failure_total{model_name=\"m\",code=\"cancelled\"} 1",
        ] {
            assert!(text.contains(name), "{name} missing:\n{text}");
        }
        assert_eq!(
            code_name(tonic::Code::DeadlineExceeded),
            "deadline_exceeded"
        );
        // Request latencies have buckets past an hour.
        let top = text
            .lines()
            .filter_map(|l| l.strip_prefix("remask:time_to_first_token_seconds_bucket{le=\""))
            .filter_map(|l| l.split('"').next()?.parse::<f64>().ok())
            .fold(0.0, f64::max);
        assert!(top >= 3600.0, "{top}");
    }
}
