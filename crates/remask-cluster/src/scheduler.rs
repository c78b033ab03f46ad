//! Step-level continuous batching. One task owns every running canvas; per
//! step it makes one forward pass over all of them (packed, so requests of
//! different lengths and settings share the pass and each gets exactly its
//! solo result), commits each request's predictions with the shared sampler
//! (`BatchStep`: the one place request state moves), and streams what was
//! committed. A request joins at the next step boundary and leaves when its
//! answer is final (early stop) or its canvas complete, when it is
//! cancelled, or past its deadline.
//!
//! A worker failing mid-step loses nothing: the coordinator owns every
//! canvas, and a failed step commits nothing, so the running requests wait
//! (up to `failover_timeout`, and never past their deadline) for the manager
//! to put another worker on the stage, then go on from their committed
//! canvases with the ids they would have had.
//!
//! K/V caches live on the workers, named by the request (`Job::id`); the
//! scheduler releases them when a request leaves, admits a request only
//! while its caches fit every stage's budget (it waits for room rather than
//! evicting another's), and when a worker does not hold a cache a step
//! reads (it restarted or replaced a failed one) it rebuilds it from the
//! canvas with a full forward and runs the step again: the request goes on
//! with the ids it would have had.
//!
//! Events and errors are the scheduler's own types: the gRPC and HTTP layers
//! map them to their wire shapes.

use crate::metrics::Metrics;
use crate::pipeline::{Pipeline, StageFailure, StepError};
use crate::stop::{StopMatch, StopStrings};
use remask_engine::{StepBatch, StepRequest, cache_ids};
use remask_model::TextCodec;
use remask_sampler::{BatchStep, CacheMode, Canvas, Committed, FinishReason, KvUse, TokenLogprob};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// One denoising step of a streaming request.
#[derive(Clone, Debug)]
pub struct StepEvent {
    /// The request's step, from 0.
    pub step: usize,
    /// What the step committed (several tokens under an adaptive rule).
    pub committed: Vec<Committed>,
    /// The answer's final prefix after the step (`Canvas::final_prefix`).
    pub final_prefix: Vec<u32>,
    /// What a text stream may send after the step: the final prefix's text,
    /// without a character still incomplete, and before a stop string
    /// (holding back what could be the start of one).
    pub text: String,
    /// With logprobs: those of the final prefix's tokens that no earlier
    /// event of the request carried (they follow on from them).
    pub logprobs: Vec<TokenLogprob>,
    /// Whether the request asked for logprobs (then `committed` carries
    /// them to the gRPC stream too).
    pub with_logprobs: bool,
}

/// A finished request.
#[derive(Clone, Debug)]
pub struct Finished {
    /// The whole sequence: prompt, generation, suffix.
    pub token_ids: Vec<u32>,
    pub generated_ids: Vec<u32>,
    /// Tokens of the answer (generated ids before the first stop token; with
    /// a stop string, the tokens up to and including it).
    pub answer_tokens: usize,
    /// The answer decoded (before the stop string that ended it, if any).
    pub text: String,
    /// The stop string that ended the answer.
    pub matched_stop: Option<String>,
    /// The caller's name for the request (`X-Request-Id`, or made up).
    pub request_id: String,
    pub prompt_length: usize,
    pub steps: usize,
    /// Forward passes the request took part in.
    pub forwards: usize,
    pub finish_reason: FinishReason,
    pub elapsed_ms: f64,
    pub queue_ms: f64,
    pub forward_ms: f64,
    pub compute_ms: f64,
    /// The seed the request ran with (its own or the one drawn for it).
    pub seed: u64,
    /// The settings it ran with: its own, and the server's defaults for
    /// what it left unset.
    pub config: remask_sampler::SamplerConfig,
    /// Per answer token (`answer_tokens` of them), its log-probability and
    /// alternatives at the step that committed it, when asked for.
    pub logprobs: Option<Vec<TokenLogprob>>,
}

/// What a request's caller receives: steps (when streaming), then `Done`.
#[derive(Clone, Debug)]
pub enum Event {
    Step(StepEvent),
    Done(Box<Finished>),
}

/// Why a request did not finish.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum InferError {
    #[error("cancelled")]
    Cancelled,
    #[error("deadline exceeded after {forwards} forward passes")]
    DeadlineExceeded { forwards: usize },
    #[error("{0}")]
    Unavailable(String),
    #[error("the queue is full ({0} requests waiting): retry later")]
    QueueFull(usize),
    /// The request's K/V caches are larger than a stage's whole budget.
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    Internal(String),
}

impl InferError {
    /// The gRPC status code of the error (the HTTP layer maps that).
    pub fn code(&self) -> tonic::Code {
        match self {
            InferError::Cancelled => tonic::Code::Cancelled,
            InferError::DeadlineExceeded { .. } => tonic::Code::DeadlineExceeded,
            InferError::Unavailable(_) => tonic::Code::Unavailable,
            InferError::QueueFull(_) | InferError::TooLarge(_) => tonic::Code::ResourceExhausted,
            InferError::Internal(_) => tonic::Code::Internal,
        }
    }

    pub fn no_pipeline() -> Self {
        InferError::Unavailable(
            "the cluster has no complete set of shards: waiting for workers".into(),
        )
    }
}

pub type EventSender = mpsc::UnboundedSender<Result<Event, InferError>>;

/// A request waiting for, or holding, a place in the running batch.
pub struct Job {
    /// Names the request's K/V caches on the workers (set at admission).
    id: u64,
    pub canvas: Canvas,
    pub events: EventSender,
    /// Send every step's commits (GenerateStream), not only the result.
    pub stream: bool,
    pub deadline: Option<Instant>,
    pub queued_at: Instant,
    admitted_at: Option<Instant>,
    forward_ms: f64,
    compute_ms: f64,
    /// Steps of this request that failed on a worker.
    failures: u32,
    /// When the answer's first token became final (or the answer ended).
    first_final: Option<Instant>,
    /// The caller's name for the request, in its log lines and result.
    request_id: String,
    stop: StopStrings,
    /// The stop string found in the final prefix, which ended the answer.
    matched: Option<StopMatch>,
    /// Length of the final prefix the stop strings were last looked for in.
    stop_checked: usize,
    /// Final tokens whose logprobs a step event carried already.
    logprobs_sent: usize,
}

/// A request whose steps failed this often on workers is given up (a request
/// that breaks every worker it meets must not go round the cluster forever).
const MAX_STEP_FAILURES: u32 = 3;

impl Job {
    pub fn new(
        canvas: Canvas,
        events: EventSender,
        stream: bool,
        deadline: Option<Instant>,
    ) -> Self {
        Job {
            id: 0,
            canvas,
            events,
            stream,
            deadline,
            queued_at: Instant::now(),
            admitted_at: None,
            forward_ms: 0.0,
            compute_ms: 0.0,
            failures: 0,
            first_final: None,
            request_id: String::new(),
            stop: StopStrings::default(),
            matched: None,
            stop_checked: 0,
            logprobs_sent: 0,
        }
    }

    /// The answer ends before the first of these strings.
    pub fn with_stop(mut self, stop: StopStrings) -> Self {
        self.stop = stop;
        self
    }

    pub fn with_request_id(mut self, id: String) -> Self {
        self.request_id = id;
        self
    }

    /// Looks for the stop strings in what the final prefix gained, and ends
    /// the answer at the first one.
    fn check_stop(&mut self, codec: &TextCodec) {
        if self.matched.is_none() {
            self.matched = self
                .stop
                .check(codec, &mut self.canvas, &mut self.stop_checked);
        }
    }

    /// What a stream may send now (`StepEvent::text`).
    fn sendable_text(&self, codec: &TextCodec) -> String {
        match &self.matched {
            Some(m) => m.text.clone(),
            None => {
                let text = crate::coordinator::final_text(codec, self.canvas.final_prefix());
                self.stop.sendable(&text).to_string()
            }
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct SchedulerConfig {
    /// Requests in one forward pass at most.
    pub max_batch: usize,
    /// Requests waiting for a place at most; beyond, RESOURCE_EXHAUSTED.
    pub max_queue: usize,
    /// How long running requests wait for a stage to get a worker again
    /// after theirs failed or left; then UNAVAILABLE. Zero: at once.
    pub failover_timeout: Duration,
}

#[derive(Clone)]
pub struct Scheduler {
    queue: mpsc::Sender<Job>,
    max_queue: usize,
}

impl Scheduler {
    pub fn start(
        config: SchedulerConfig,
        pipeline: watch::Receiver<Option<Arc<Pipeline>>>,
        failures: mpsc::UnboundedSender<StageFailure>,
        codec: Arc<TextCodec>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (queue, rx) = mpsc::channel(config.max_queue.max(1));
        let ctx = Context {
            pipeline,
            failures,
            codec,
            metrics,
        };
        tokio::spawn(run(rx, config, ctx));
        Scheduler {
            queue,
            max_queue: config.max_queue,
        }
    }

    pub fn submit(&self, job: Job) -> Result<(), InferError> {
        self.queue.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => InferError::QueueFull(self.max_queue),
            mpsc::error::TrySendError::Closed(_) => {
                InferError::Unavailable("the scheduler has stopped".into())
            }
        })
    }
}

/// What the scheduling loop works with besides the jobs.
struct Context {
    pipeline: watch::Receiver<Option<Arc<Pipeline>>>,
    failures: mpsc::UnboundedSender<StageFailure>,
    codec: Arc<TextCodec>,
    metrics: Arc<Metrics>,
}

impl Job {
    /// The names of the K/V caches this request may hold.
    fn caches(&self) -> Vec<u64> {
        if self.canvas.config().cache == CacheMode::None {
            Vec::new()
        } else {
            cache_ids(self.id).to_vec()
        }
    }

    /// K/V bytes this request holds at most on a stage of `bytes_per_position`.
    fn kv_bytes(&self, bytes_per_position: u64) -> u64 {
        let c = &self.canvas;
        if c.config().cache == CacheMode::None {
            return 0;
        }
        let sequences = 1 + u64::from(c.config().cfg_scale > 0.0);
        sequences * c.tokens().len() as u64 * bytes_per_position
    }
}

impl Context {
    fn abort(&self, job: Job, error: InferError) {
        let m = &self.metrics;
        m.request_success.get_or_create(&m.finished("abort")).inc();
        m.request_failure
            .get_or_create(&m.failed(error.code()))
            .inc();
        tracing::info!(
            request_id = job.request_id,
            prompt_tokens = job.canvas.prompt_len(),
            forwards = job.canvas.forwards(),
            duration_ms = job.queued_at.elapsed().as_secs_f64() * 1e3,
            status = ?error.code(),
            error = %error,
            "request failed"
        );
        self.release(&job);
        let _ = job.events.send(Err(error));
    }

    /// Drops the request's K/V caches on the workers of the current
    /// pipeline (a replaced worker's went with it).
    fn release(&self, job: &Job) {
        let pipeline = self.pipeline.borrow().clone();
        if let Some(p) = pipeline {
            p.release(job.caches());
        }
    }
}

/// Whether `job`'s K/V caches fit every stage's budget next to the running
/// requests': `Err` when they never can.
fn fits(job: &Job, running: &[Job], pipeline: Option<&Pipeline>) -> Result<bool, InferError> {
    let Some(pipeline) = pipeline else {
        return Ok(true);
    };
    for (i, stage) in pipeline.stages.iter().enumerate() {
        let kv = stage.kv();
        let Some(budget) = kv.budget else { continue };
        let need = job.kv_bytes(kv.bytes_per_position);
        if need > budget {
            return Err(InferError::TooLarge(format!(
                "the request's K/V caches take {need} bytes on stage {i}, more than its whole \
                 budget of {budget} bytes: use a shorter canvas or --cache none"
            )));
        }
        let used: u64 = running
            .iter()
            .map(|j| j.kv_bytes(kv.bytes_per_position))
            .sum();
        if used + need > budget {
            return Ok(false);
        }
    }
    Ok(true)
}

/// K/V bytes the running requests hold, over all stages.
fn kv_in_use(running: &[Job], pipeline: Option<&Pipeline>) -> u64 {
    pipeline.map_or(0, |p| {
        p.stages
            .iter()
            .map(|s| {
                let per = s.kv().bytes_per_position;
                running.iter().map(|j| j.kv_bytes(per)).sum::<u64>()
            })
            .sum()
    })
}

async fn run(mut queue: mpsc::Receiver<Job>, config: SchedulerConfig, ctx: Context) {
    let max_batch = config.max_batch.max(1);
    let mut running: Vec<Job> = Vec::new();
    // The pipeline a step last failed on, and since when the running
    // requests wait for a working one.
    let mut failed: Option<Arc<Pipeline>> = None;
    let mut waiting_since: Option<Instant> = None;
    let mut pipeline_rx = ctx.pipeline.clone();
    // The next request, waiting for room in the K/V budgets.
    let mut held: Option<Job> = None;
    let mut next_id: u64 = 0;
    loop {
        let m = &ctx.metrics;
        let current = ctx.pipeline.borrow().clone();
        m.waiting
            .get_or_create(m.model())
            .set((queue.len() + usize::from(held.is_some())) as i64);
        m.running.get_or_create(m.model()).set(running.len() as i64);
        m.kv_cache_bytes
            .get_or_create(m.model())
            .set(kv_in_use(&running, current.as_deref()) as i64);
        while running.len() < max_batch {
            let job = match held.take() {
                Some(job) => job,
                None => match queue.try_recv() {
                    Ok(job) => job,
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => return,
                },
            };
            if job.events.is_closed() {
                ctx.abort(job, InferError::Cancelled);
                continue;
            }
            match fits(&job, &running, current.as_deref()) {
                Ok(true) => {
                    running.push(admit(job, next_id));
                    next_id += 1;
                }
                Ok(false) => {
                    held = Some(job);
                    break;
                }
                Err(e) => ctx.abort(job, e),
            }
        }
        if running.is_empty() {
            if let Some(job) = held.take() {
                // Nothing runs, so nothing holds the budget: it fits now
                // (or never, which `fits` said).
                running.push(admit(job, next_id));
                next_id += 1;
                continue;
            }
            match queue.recv().await {
                Some(job) => held = Some(job),
                None => return,
            }
            continue;
        }
        // Cancelled requests (the caller went away) and expired deadlines
        // free their place here, at the step boundary.
        let now = Instant::now();
        for job in std::mem::take(&mut running) {
            if job.events.is_closed() {
                tracing::debug!("request cancelled by the client");
                ctx.abort(job, InferError::Cancelled);
            } else if job.deadline.is_some_and(|d| d <= now) {
                let forwards = job.canvas.forwards();
                ctx.abort(job, InferError::DeadlineExceeded { forwards });
            } else {
                running.push(job);
            }
        }
        if running.is_empty() {
            waiting_since = None;
            continue;
        }
        let current = ctx.pipeline.borrow().clone();
        let usable = current.filter(|p| !failed.as_ref().is_some_and(|f| Arc::ptr_eq(f, p)));
        let Some(pipeline) = usable else {
            // A stage lost its worker: wait for the manager to fill it.
            let since = *waiting_since.get_or_insert_with(Instant::now);
            let give_up = since + config.failover_timeout;
            if Instant::now() >= give_up {
                let error = InferError::Unavailable(format!(
                    "a stage has had no working worker for {:.1} s: {}",
                    since.elapsed().as_secs_f64(),
                    "the cluster has no complete set of shards"
                ));
                for job in running.drain(..) {
                    ctx.abort(job, error.clone());
                }
                continue;
            }
            // Wake for a new pipeline, the give-up time, or at least every
            // 100 ms (cancellations, deadlines and arrivals are handled at
            // the top of the loop).
            let nap = (give_up - Instant::now()).min(Duration::from_millis(100));
            let _ = tokio::time::timeout(nap, pipeline_rx.changed()).await;
            continue;
        };
        if let Some(since) = waiting_since.take() {
            tracing::info!(
                waited_ms = since.elapsed().as_secs_f64() * 1e3,
                requests = running.len(),
                "a worker holds every stage again: the running requests go on"
            );
        }
        failed = None;
        if !step(&mut running, &pipeline, &ctx).await {
            failed = Some(pipeline);
        }
    }
}

fn admit(mut job: Job, id: u64) -> Job {
    job.id = id;
    job.admitted_at = Some(Instant::now());
    job
}

/// One step of every running request; false when the forward pass failed
/// on a worker (nothing was committed: the requests can retry the step).
#[tracing::instrument(skip_all, fields(requests = running.len()))]
async fn step(running: &mut Vec<Job>, pipeline: &Pipeline, ctx: &Context) -> bool {
    let started = Instant::now();
    let m = &ctx.metrics;
    let step = BatchStep::new(running.iter().map(|j| &j.canvas));
    let active = step.active();
    let mut predictions = Vec::new();
    if !active.is_empty() {
        let requests: Vec<StepRequest> = active
            .iter()
            .map(|&i| (running[i].id, &running[i].canvas, &step.plans()[i]))
            .collect();
        let batch = StepBatch::new(&requests);
        // A worker that lost caches (restarted, or the spare that replaced
        // a failed one) gets them rebuilt, then the step runs again; twice
        // at most, as a third miss means the stores do not stay.
        let mut result = pipeline.step(&batch, m).await;
        for _ in 0..2 {
            let Err(StepError::CachesMissing { stage, caches }) = &result else {
                break;
            };
            let rebuild: Vec<(u64, &Canvas)> = running
                .iter()
                .filter(|j| j.caches().iter().any(|c| caches.contains(c)))
                .map(|j| (j.id, &j.canvas))
                .collect();
            tracing::info!(
                stage,
                requests = rebuild.len(),
                "a worker does not hold K/V caches: rebuilding them from the canvases"
            );
            m.kv_cache_rebuilds
                .get_or_create(m.model())
                .inc_by(rebuild.len() as u64);
            let rebuilt = StepBatch::rebuild(&rebuild);
            if rebuilt.seqs.is_empty() {
                break;
            }
            result = match pipeline.step(&rebuilt, m).await {
                Ok(_) => pipeline.step(&batch, m).await,
                Err(e) => Err(e),
            };
        }
        match result {
            Ok((preds, timing)) => {
                for &i in &active {
                    running[i].forward_ms += timing.forward_ms;
                    running[i].compute_ms += timing.compute_ms;
                }
                predictions = preds;
            }
            Err(StepError::CacheFull { stage, message }) => {
                // Admission keeps the caches within the budgets; a stage
                // whose budget is smaller than it said fails the requests
                // that would store, and the others go on.
                tracing::warn!(stage, %message, "a stage's K/V budget is full");
                let storing: Vec<u64> = active
                    .iter()
                    .filter(|&&i| step.plans()[i].kv == KvUse::Store)
                    .map(|&i| running[i].id)
                    .collect();
                for job in std::mem::take(running) {
                    if storing.contains(&job.id) {
                        ctx.abort(job, InferError::TooLarge(message.clone()));
                    } else {
                        running.push(job);
                    }
                }
                return true;
            }
            Err(StepError::CachesMissing { stage, caches }) => {
                let failure = StageFailure {
                    stage,
                    worker: pipeline.workers()[stage].clone(),
                    message: format!("K/V caches {caches:?} are still missing after a rebuild"),
                };
                return fail_step(running, failure, ctx);
            }
            Err(StepError::Failed(failure)) => return fail_step(running, failure, ctx),
        }
    }
    let commits = step.commit(running.iter_mut().map(|j| &mut j.canvas), predictions);
    for ((job, plan), committed) in running.iter_mut().zip(step.plans()).zip(commits) {
        job.check_stop(&ctx.codec);
        if job.first_final.is_none()
            && (!job.canvas.final_prefix().is_empty() || job.canvas.is_done())
        {
            job.first_final = Some(Instant::now());
            m.first_token_time
                .get_or_create(m.model())
                .observe(job.queued_at.elapsed().as_secs_f64());
        }
        if plan.needs_forward() {
            m.tokens_per_forward
                .get_or_create(m.model())
                .observe(committed.len() as f64);
        }
        if job.stream {
            let final_len = job.canvas.final_prefix().len();
            let logprobs = job
                .canvas
                .logprobs(job.logprobs_sent..final_len)
                .unwrap_or_default();
            job.logprobs_sent = job.logprobs_sent.max(final_len);
            let _ = job.events.send(Ok(Event::Step(StepEvent {
                step: plan.step,
                committed,
                final_prefix: job.canvas.final_prefix().to_vec(),
                text: job.sendable_text(&ctx.codec),
                logprobs,
                with_logprobs: job.canvas.config().logprobs.is_some(),
            })));
        }
    }
    m.step_time
        .get_or_create(m.model())
        .observe(started.elapsed().as_secs_f64());
    running.retain(|job| {
        if !job.canvas.is_done() {
            return true;
        }
        let event = finish(job, &ctx.codec);
        match &event {
            Ok(Event::Done(done)) => {
                m.request_success
                    .get_or_create(&m.finished(done.finish_reason.as_str()))
                    .inc();
                m.prompt_tokens
                    .get_or_create(m.model())
                    .inc_by(done.prompt_length as u64);
                m.generation_tokens
                    .get_or_create(m.model())
                    .inc_by(done.answer_tokens as u64);
                m.forwards_per_request
                    .get_or_create(m.model())
                    .observe(done.forwards as f64);
                m.e2e_latency
                    .get_or_create(m.model())
                    .observe(job.queued_at.elapsed().as_secs_f64());
                m.queue_time
                    .get_or_create(m.model())
                    .observe(done.queue_ms / 1e3);
                m.prompt_length
                    .get_or_create(m.model())
                    .observe(done.prompt_length as f64);
                m.answer_length
                    .get_or_create(m.model())
                    .observe(done.answer_tokens as f64);
                tracing::info!(
                    request_id = job.request_id,
                    prompt_tokens = done.prompt_length,
                    answer_tokens = done.answer_tokens,
                    forwards = done.forwards,
                    duration_ms = job.queued_at.elapsed().as_secs_f64() * 1e3,
                    status = done.finish_reason.as_str(),
                    cache = job.canvas.config().cache.as_str(),
                    "request finished"
                );
            }
            Err(e) => {
                m.request_success.get_or_create(&m.finished("abort")).inc();
                m.request_failure.get_or_create(&m.failed(e.code())).inc();
            }
            Ok(Event::Step(_)) => {}
        }
        ctx.release(job);
        let _ = job.events.send(event);
        false
    });
    true
}

/// A failed forward pass: nothing was committed, the requests wait for the
/// stage to be re-assigned (those that failed too often are given up).
fn fail_step(running: &mut Vec<Job>, failure: StageFailure, ctx: &Context) -> bool {
    tracing::warn!(%failure, "forward pass failed; the running requests wait for the stage to be re-assigned");
    for mut job in std::mem::take(running) {
        job.failures += 1;
        if job.failures >= MAX_STEP_FAILURES {
            let error = InferError::Unavailable(format!(
                "{} steps of this request failed on workers; the last: {failure}",
                job.failures
            ));
            ctx.abort(job, error);
        } else {
            running.push(job);
        }
    }
    let _ = ctx.failures.send(failure);
    false
}

fn finish(job: &Job, codec: &TextCodec) -> Result<Event, InferError> {
    let c = &job.canvas;
    let (text, answer_tokens, finish_reason) = match &job.matched {
        Some(m) => (m.text.clone(), m.tokens, FinishReason::Stop),
        None => (
            codec
                .decode(c.answer(), true)
                .map_err(|e| InferError::Internal(format!("cannot decode the generation: {e}")))?,
            c.answer().len(),
            c.finish_reason(),
        ),
    };
    let admitted = job.admitted_at.unwrap_or(job.queued_at);
    Ok(Event::Done(Box::new(Finished {
        token_ids: c.tokens().to_vec(),
        generated_ids: c.generated().to_vec(),
        answer_tokens,
        text,
        matched_stop: job.matched.as_ref().map(|m| m.matched.clone()),
        request_id: job.request_id.clone(),
        prompt_length: c.prompt_len(),
        steps: c.step(),
        forwards: c.forwards(),
        finish_reason,
        elapsed_ms: admitted.elapsed().as_secs_f64() * 1e3,
        queue_ms: (admitted - job.queued_at).as_secs_f64() * 1e3,
        forward_ms: job.forward_ms,
        compute_ms: job.compute_ms,
        seed: c.config().seed,
        config: *c.config(),
        logprobs: c.logprobs(0..answer_tokens),
    })))
}
