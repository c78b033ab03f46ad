//! Step-level continuous batching. One task owns every running canvas; per
//! step it makes one forward pass over all of them (packed, so requests of
//! different lengths and settings share the pass and each gets exactly its
//! solo result), commits each request's predictions with the shared sampler,
//! and streams what was committed. A request joins at the next step boundary
//! and leaves when its canvas is complete, cancelled, or past its deadline.

use crate::metrics::Metrics;
use crate::pipeline::{Pipeline, StageFailure};
use remask_engine::StepBatch;
use remask_model::TextCodec;
use remask_proto::v1 as pb;
use remask_sampler::{Canvas, Prediction, StepPlan};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, watch};
use tonic::Status;

/// What a request's caller receives.
pub enum Event {
    Step(pb::StepUpdate),
    Done(pb::GenerateResponse),
}

pub type EventSender = mpsc::UnboundedSender<Result<Event, Status>>;

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
}

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
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct SchedulerConfig {
    /// Requests in one forward pass at most.
    pub max_batch: usize,
    /// Requests waiting for a place at most; beyond, RESOURCE_EXHAUSTED.
    pub max_queue: usize,
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
        tokio::spawn(run(rx, config.max_batch.max(1), ctx));
        Scheduler {
            queue,
            max_queue: config.max_queue,
        }
    }

    pub fn submit(&self, job: Job) -> Result<(), Status> {
        self.queue.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Status::resource_exhausted(format!(
                "the queue is full ({} requests waiting): retry later",
                self.max_queue
            )),
            mpsc::error::TrySendError::Closed(_) => {
                Status::unavailable("the scheduler has stopped")
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
    fn abort(&self, job: Job, status: Status) {
        self.metrics
            .request_success
            .get_or_create(&self.metrics.finished("abort"))
            .inc();
        let _ = job.events.send(Err(status));
    }
}

async fn run(mut queue: mpsc::Receiver<Job>, max_batch: usize, ctx: Context) {
    let mut running: Vec<Job> = Vec::new();
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
                ctx.abort(job, Status::cancelled("cancelled"));
            } else if job.deadline.is_some_and(|d| d <= now) {
                let status = Status::deadline_exceeded(format!(
                    "deadline exceeded after {} of {} steps",
                    job.canvas.step(),
                    job.canvas.config().steps
                ));
                ctx.abort(job, status);
            } else {
                running.push(job);
            }
        }
        if running.is_empty() {
            continue;
        }
        let Some(pipeline) = ctx.pipeline.borrow().clone() else {
            for job in running.drain(..) {
                ctx.abort(
                    job,
                    Status::unavailable(
                        "the cluster has no complete set of shards: waiting for workers",
                    ),
                );
            }
            continue;
        };
        step(&mut running, &pipeline, &ctx).await;
    }
}

fn admit(mut job: Job) -> Job {
    job.admitted_at = Some(Instant::now());
    job
}

#[tracing::instrument(skip_all, fields(requests = running.len()))]
async fn step(running: &mut Vec<Job>, pipeline: &Pipeline, ctx: &Context) {
    let started = Instant::now();
    let m = &ctx.metrics;
    let plans: Vec<StepPlan> = running.iter().map(|j| j.canvas.plan()).collect();
    // Steps that commit nothing (more steps than masks) need no forward pass.
    let active: Vec<usize> = (0..running.len())
        .filter(|&i| plans[i].transfer > 0)
        .collect();
    let mut predictions: Vec<Option<Vec<Prediction>>> = vec![None; running.len()];
    if !active.is_empty() {
        let requests: Vec<(&Canvas, &StepPlan)> = active
            .iter()
            .map(|&i| (&running[i].canvas, &plans[i]))
            .collect();
        let batch = StepBatch::new(&requests);
        match pipeline.step(&batch, m).await {
            Ok((preds, timing)) => {
                for (&i, p) in active.iter().zip(preds) {
                    predictions[i] = Some(p);
                    running[i].forward_ms += timing.forward_ms;
                    running[i].compute_ms += timing.compute_ms;
                }
            }
            Err(failure) => {
                tracing::warn!(%failure, "forward pass failed; failing the running requests");
                for job in running.drain(..) {
                    let status = Status::unavailable(format!(
                        "a worker failed during the request: {failure}"
                    ));
                    ctx.abort(job, status);
                }
                let _ = ctx.failures.send(failure);
                return;
            }
        }
    }
    for (job, (plan, preds)) in running.iter_mut().zip(plans.iter().zip(predictions)) {
        let preds = preds.unwrap_or_else(|| {
            vec![
                Prediction {
                    token: job.canvas.mask_id(),
                    confidence: f64::NEG_INFINITY
                };
                plan.positions.len()
            ]
        });
        let committed = job.canvas.commit(plan, &preds);
        if plan.transfer > 0 {
            m.tokens_per_step
                .get_or_create(m.model())
                .observe(committed.len() as f64);
        }
        if job.stream {
            let _ = job.events.send(Ok(Event::Step(pb::StepUpdate {
                step: plan.step as u32,
                positions: committed.iter().map(|c| c.position as u32).collect(),
                tokens: committed.iter().map(|c| c.token).collect(),
                confidences: committed.iter().map(|c| c.confidence).collect(),
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
        let c = &job.canvas;
        let reason = if c.generated().contains(&c.predict_options().eos) {
            "stop"
        } else {
            "length"
        };
        m.request_success.get_or_create(&m.finished(reason)).inc();
        m.prompt_tokens
            .get_or_create(m.model())
            .inc_by(c.prompt_len() as u64);
        m.generation_tokens
            .get_or_create(m.model())
            .inc_by(c.generated().len() as u64);
        m.e2e_latency
            .get_or_create(m.model())
            .observe(job.queued_at.elapsed().as_secs_f64());
        let admitted = job.admitted_at.unwrap_or(job.queued_at);
        m.queue_time
            .get_or_create(m.model())
            .observe((admitted - job.queued_at).as_secs_f64());
        let _ = job.events.send(finish(job, &ctx.codec));
        false
    });
}

fn finish(job: &Job, codec: &TextCodec) -> Result<Event, Status> {
    let c = &job.canvas;
    let text = codec
        .decode(c.answer(), true)
        .map_err(|e| Status::internal(format!("cannot decode the generation: {e}")))?;
    let admitted = job.admitted_at.unwrap_or(job.queued_at);
    Ok(Event::Done(pb::GenerateResponse {
        token_ids: c.tokens().to_vec(),
        generated_ids: c.generated().to_vec(),
        text,
        steps: c.step() as u32,
        prompt_length: c.prompt_len() as u32,
        elapsed_ms: admitted.elapsed().as_secs_f64() * 1e3,
        queue_ms: (admitted - job.queued_at).as_secs_f64() * 1e3,
        forward_ms: job.forward_ms,
        compute_ms: job.compute_ms,
    }))
}
