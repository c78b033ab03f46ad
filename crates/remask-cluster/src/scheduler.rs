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
//! Events and errors are the scheduler's own types: the gRPC and HTTP layers
//! map them to their wire shapes.

use crate::metrics::Metrics;
use crate::pipeline::{Pipeline, StageFailure};
use remask_engine::StepBatch;
use remask_model::TextCodec;
use remask_sampler::{BatchStep, Canvas, Committed, FinishReason, StepPlan};
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
    /// The answer's final prefix after the step (`Canvas::final_prefix`):
    /// what a text stream may send.
    pub final_prefix: Vec<u32>,
}

/// A finished request.
#[derive(Clone, Debug)]
pub struct Finished {
    /// The whole sequence: prompt, generation, suffix.
    pub token_ids: Vec<u32>,
    pub generated_ids: Vec<u32>,
    /// Tokens of the answer (generated ids before the first stop token).
    pub answer_tokens: usize,
    /// The answer decoded.
    pub text: String,
    pub prompt_length: usize,
    pub steps: usize,
    /// Forward passes the request took part in.
    pub forwards: usize,
    pub finish_reason: FinishReason,
    pub elapsed_ms: f64,
    pub queue_ms: f64,
    pub forward_ms: f64,
    pub compute_ms: f64,
}

/// What a request's caller receives: steps (when streaming), then `Done`.
#[derive(Clone, Debug)]
pub enum Event {
    Step(StepEvent),
    Done(Finished),
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
    #[error("{0}")]
    Internal(String),
}

impl InferError {
    pub fn no_pipeline() -> Self {
        InferError::Unavailable(
            "the cluster has no complete set of shards: waiting for workers".into(),
        )
    }
}

pub type EventSender = mpsc::UnboundedSender<Result<Event, InferError>>;

/// A request waiting for, or holding, a place in the running batch.
pub struct Job {
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
            canvas,
            events,
            stream,
            deadline,
            queued_at: Instant::now(),
            admitted_at: None,
            forward_ms: 0.0,
            compute_ms: 0.0,
            failures: 0,
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

impl Context {
    fn abort(&self, job: Job, error: InferError) {
        self.metrics
            .request_success
            .get_or_create(&self.metrics.finished("abort"))
            .inc();
        let _ = job.events.send(Err(error));
    }
}

async fn run(mut queue: mpsc::Receiver<Job>, config: SchedulerConfig, ctx: Context) {
    let max_batch = config.max_batch.max(1);
    let mut running: Vec<Job> = Vec::new();
    // The pipeline a step last failed on, and since when the running
    // requests wait for a working one.
    let mut failed: Option<Arc<Pipeline>> = None;
    let mut waiting_since: Option<Instant> = None;
    let mut pipeline_rx = ctx.pipeline.clone();
    loop {
        let m = &ctx.metrics;
        m.waiting.get_or_create(m.model()).set(queue.len() as i64);
        m.running.get_or_create(m.model()).set(running.len() as i64);
        while running.len() < max_batch {
            match queue.try_recv() {
                Ok(job) => running.push(admit(job)),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => return,
            }
        }
        if running.is_empty() {
            match queue.recv().await {
                Some(job) => running.push(admit(job)),
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

fn admit(mut job: Job) -> Job {
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
        let requests: Vec<(&Canvas, &StepPlan)> = active
            .iter()
            .map(|&i| (&running[i].canvas, &step.plans()[i]))
            .collect();
        let batch = StepBatch::new(&requests);
        match pipeline.step(&batch, m).await {
            Ok((preds, timing)) => {
                for &i in &active {
                    running[i].forward_ms += timing.forward_ms;
                    running[i].compute_ms += timing.compute_ms;
                }
                predictions = preds;
            }
            Err(failure) => {
                tracing::warn!(%failure, "forward pass failed; the running requests wait for the stage to be re-assigned");
                for job in std::mem::take(running) {
                    let mut job = job;
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
                return false;
            }
        }
    }
    let commits = step.commit(running.iter_mut().map(|j| &mut j.canvas), predictions);
    for ((job, plan), committed) in running.iter().zip(step.plans()).zip(commits) {
        if plan.needs_forward() {
            m.tokens_per_forward
                .get_or_create(m.model())
                .observe(committed.len() as f64);
        }
        if job.stream {
            let _ = job.events.send(Ok(Event::Step(StepEvent {
                step: plan.step,
                committed,
                final_prefix: job.canvas.final_prefix().to_vec(),
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
            }
            _ => {
                m.request_success.get_or_create(&m.finished("abort")).inc();
            }
        }
        let _ = job.events.send(event);
        false
    });
    true
}

fn finish(job: &Job, codec: &TextCodec) -> Result<Event, InferError> {
    let c = &job.canvas;
    let text = codec
        .decode(c.answer(), true)
        .map_err(|e| InferError::Internal(format!("cannot decode the generation: {e}")))?;
    let admitted = job.admitted_at.unwrap_or(job.queued_at);
    Ok(Event::Done(Finished {
        token_ids: c.tokens().to_vec(),
        generated_ids: c.generated().to_vec(),
        answer_tokens: c.answer().len(),
        text,
        prompt_length: c.prompt_len(),
        steps: c.step(),
        forwards: c.forwards(),
        finish_reason: c.finish_reason(),
        elapsed_ms: admitted.elapsed().as_secs_f64() * 1e3,
        queue_ms: (admitted - job.queued_at).as_secs_f64() * 1e3,
        forward_ms: job.forward_ms,
        compute_ms: job.compute_ms,
    }))
}
