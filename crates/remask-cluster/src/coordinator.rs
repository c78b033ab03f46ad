//! The public `remask.v1.Generation` service. It owns every request's canvas:
//! it validates the request, lays out the canvas, and hands it to the
//! scheduler, which runs the denoising steps on the current pipeline.

use crate::auth::ApiKeys;
use crate::metrics::Metrics;
use crate::pipeline::Pipeline;
use crate::scheduler::{Event, Job, Scheduler};
use remask_model::{LladaConfig, Message, SpecialTokens, TextCodec};
use remask_proto::v1 as pb;
use remask_proto::v1::generation_server::Generation;
use remask_sampler::{Canvas, Remasking, SamplerConfig};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// What the coordinator knows of the model: config and tokenizer, no weights.
pub struct ModelMeta {
    pub dir: String,
    pub config: LladaConfig,
    pub codec: Arc<TextCodec>,
    pub special: SpecialTokens,
    pub random_weights: bool,
}

pub struct Coordinator {
    pub meta: ModelMeta,
    pub scheduler: Scheduler,
    pub pipeline: watch::Receiver<Option<Arc<Pipeline>>>,
    pub stages: usize,
    pub metrics: Arc<Metrics>,
    pub api_keys: ApiKeys,
}

impl Coordinator {
    /// Checks every field and lays out the canvas; any problem is
    /// INVALID_ARGUMENT with a message saying what to change.
    pub fn canvas(&self, req: &pb::GenerateRequest) -> Result<Canvas, Status> {
        let invalid = |m: String| Status::invalid_argument(m);
        let prompt = match (req.prompt.is_empty(), req.prompt_ids.is_empty()) {
            (false, false) => {
                return Err(invalid("give either prompt or prompt_ids, not both".into()));
            }
            // An infill may have nothing before the gap (the BOS alone).
            (true, true) if !req.suffix.is_empty() => self.meta.codec.encode(""),
            (false, true) if req.prompt.trim().is_empty() && !req.suffix.is_empty() => {
                self.meta.codec.encode("")
            }
            (true, true) => {
                return Err(invalid(
                    "the prompt is empty: give prompt or prompt_ids".into(),
                ));
            }
            (false, true) if req.prompt.trim().is_empty() => {
                return Err(invalid("the prompt is empty: give some text".into()));
            }
            (false, true) if req.chat => self.meta.codec.encode_chat(&[Message {
                role: "user".into(),
                content: req.prompt.clone(),
            }]),
            (false, true) => self.meta.codec.encode(&req.prompt),
            (true, false) => {
                if req.chat {
                    return Err(invalid("chat needs prompt text, not prompt_ids".into()));
                }
                Ok(req.prompt_ids.clone())
            }
        }
        .map_err(|e| invalid(format!("cannot tokenize the prompt: {e}")))?;
        let suffix = if req.suffix.is_empty() {
            Vec::new()
        } else {
            self.meta
                .codec
                .encode_continuation(&req.suffix)
                .map_err(|e| invalid(format!("cannot tokenize the suffix: {e}")))?
        };
        let remasking = match pb::Remasking::try_from(req.remasking) {
            Ok(pb::Remasking::Unspecified | pb::Remasking::LowConfidence) => {
                Remasking::LowConfidence
            }
            Ok(pb::Remasking::Random) => Remasking::Random,
            Err(_) => return Err(invalid(format!("unknown remasking {}", req.remasking))),
        };
        let defaults = SamplerConfig::default();
        let config = SamplerConfig {
            gen_length: req.gen_length.map_or(defaults.gen_length, |v| v as usize),
            steps: req.steps.map_or(defaults.steps, |v| v as usize),
            block_length: req
                .block_length
                .map_or(defaults.block_length, |v| v as usize),
            remasking,
            temperature: req.temperature,
            cfg_scale: req.cfg_scale,
            seed: req.seed,
            logits_eos_inf: req.logits_eos_inf,
            confidence_eos_eot_inf: req.confidence_eos_eot_inf,
        };
        let space = remask_engine::token_space(&self.meta.config, &self.meta.special);
        Canvas::infill(&prompt, &suffix, config, space).map_err(|e| invalid(e.to_string()))
    }

    pub fn is_ready(&self) -> bool {
        self.pipeline.borrow().is_some()
    }

    /// The name clients use for the model (the checkpoint directory's name).
    pub fn model_name(&self) -> String {
        model_name(&self.meta.dir)
    }

    /// Queues a canvas; its events (steps if `stream`, then the result or an
    /// error) arrive on the returned channel.
    pub fn start(
        &self,
        canvas: Canvas,
        stream: bool,
        deadline: Option<Instant>,
    ) -> Result<mpsc::UnboundedReceiver<Result<Event, Status>>, Status> {
        if !self.is_ready() {
            return Err(Status::unavailable(
                "the cluster has no complete set of shards: waiting for workers",
            ));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        self.scheduler
            .submit(Job::new(canvas, tx, stream, deadline))?;
        Ok(rx)
    }

    #[allow(clippy::type_complexity)]
    fn submit<T>(
        &self,
        request: &Request<T>,
        canvas: Canvas,
        stream: bool,
    ) -> Result<
        (
            mpsc::UnboundedReceiver<Result<Event, Status>>,
            Option<Instant>,
        ),
        Status,
    > {
        let deadline = grpc_timeout(request.metadata()).map(|t| Instant::now() + t);
        Ok((self.start(canvas, stream, deadline)?, deadline))
    }
}

/// The last component of a checkpoint path.
pub fn model_name(dir: &str) -> String {
    std::path::Path::new(dir)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.to_string())
}

/// How much earlier than the client's deadline a unary call gives up.
const DEADLINE_MARGIN: Duration = Duration::from_millis(10);

/// The `grpc-timeout` header ("<digits><unit>", unit one of H M S m u n).
fn grpc_timeout(meta: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let v = meta.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Generation for Coordinator {
    #[tracing::instrument(skip_all)]
    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::GenerateResponse>, Status> {
        let canvas = self.canvas(request.get_ref())?;
        let (mut events, deadline) = self.submit(&request, canvas, false)?;
        let result = async {
            while let Some(event) = events.recv().await {
                if let Event::Done(done) = event? {
                    return Ok(Response::new(done));
                }
            }
            Err(Status::internal("the request ended without a result"))
        };
        match deadline {
            // Answer DEADLINE_EXCEEDED a little before tonic's own timer
            // would (it answers CANCELLED); the scheduler frees the place
            // at the next step boundary once `events` is dropped.
            Some(d) => {
                tokio::time::timeout_at(d.checked_sub(DEADLINE_MARGIN).unwrap_or(d).into(), result)
                    .await
                    .unwrap_or_else(|_| Err(Status::deadline_exceeded("deadline exceeded")))
            }
            None => result.await,
        }
    }

    type GenerateStreamStream = EventStream;

    #[tracing::instrument(skip_all)]
    async fn generate_stream(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        use pb::generate_stream_response::Event as E;
        let canvas = self.canvas(request.get_ref())?;
        let (events, _) = self.submit(&request, canvas, true)?;
        let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(events).map(|event| {
            event.map(|e| pb::GenerateStreamResponse {
                event: Some(match e {
                    Event::Step(s) => E::Step(s),
                    Event::Done(d) => E::Done(d),
                }),
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn model_info(
        &self,
        _request: Request<pb::ModelInfoRequest>,
    ) -> Result<Response<pb::ModelInfoResponse>, Status> {
        let c = &self.meta.config;
        let pipeline = self.pipeline.borrow().clone();
        Ok(Response::new(pb::ModelInfoResponse {
            model: self.meta.dir.clone(),
            model_type: c.model_type.clone().unwrap_or_else(|| "llada".into()),
            d_model: c.d_model as u32,
            n_layers: c.n_layers as u32,
            n_heads: c.n_heads as u32,
            vocab_size: c.vocab_size as u32,
            max_sequence_length: c.max_sequence_length as u32,
            mask_token_id: self.meta.special.mask,
            eos_token_id: self.meta.special.eos,
            random_weights: self.meta.random_weights,
            stages: self.stages as u32,
            stages_ready: pipeline.as_ref().map_or(0, |p| p.stages.len() as u32),
            workers: pipeline.map(|p| p.workers()).unwrap_or_default(),
        }))
    }
}

use tokio_stream::StreamExt;
