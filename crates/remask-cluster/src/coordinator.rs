//! The public `remask.v1.Generation` service. It owns every request's canvas:
//! it validates the request, lays out the canvas, and hands it to the
//! scheduler, which runs the denoising steps on the current pipeline.

use crate::auth::ApiKeys;
use crate::metrics::Metrics;
use crate::pipeline::Pipeline;
use crate::scheduler::{Event, Finished, InferError, Job, Scheduler, StepEvent};
use crate::stop::StopStrings;
use remask_model::{LladaConfig, Message, SpecialTokens, TextCodec};
use remask_proto::v1 as pb;
use remask_proto::v1::generation_server::Generation;
use remask_sampler::{CacheMode, Canvas, CommitRule, Defaults, FinishReason, Remasking, Settings};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// What the coordinator knows of the model: config and tokenizer, no weights.
pub struct ModelMeta {
    /// The model's name in the APIs (`--served-model-name`): never a path.
    pub name: String,
    /// What requests leave unset (the checkpoint's generation_config.json,
    /// the server's flags): the same for gRPC, HTTP and the CLI.
    pub defaults: Defaults,
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
    pub http: HttpOptions,
}

/// How the OpenAI-compatible HTTP API treats its clients.
#[derive(Clone, Debug)]
pub struct HttpOptions {
    /// A comment on an event stream this often while no event comes (a
    /// request waiting in the queue, or a long step), so that proxies do
    /// not cut it off as idle.
    pub sse_keep_alive: Duration,
    /// Origins whose browser pages may call the API (CORS); `*` for any.
    /// Empty: no CORS headers, so browsers keep other sites' pages out.
    pub allowed_origins: Vec<String>,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            sse_keep_alive: Duration::from_secs(15),
            allowed_origins: Vec::new(),
        }
    }
}

/// The channel a request's events arrive on.
pub type Events = mpsc::UnboundedReceiver<Result<Event, InferError>>;

impl From<InferError> for Status {
    fn from(e: InferError) -> Self {
        Status::new(e.code(), e.to_string())
    }
}

fn finish_reason_to_pb(r: FinishReason) -> pb::FinishReason {
    match r {
        FinishReason::Stop => pb::FinishReason::Stop,
        FinishReason::Length => pb::FinishReason::Length,
    }
}

/// The text of a final prefix. A trailing U+FFFD may be a character whose
/// last bytes are not committed yet: it is held back until it is complete.
pub fn final_text(codec: &TextCodec, final_prefix: &[u32]) -> String {
    let text = codec.decode(final_prefix, true).unwrap_or_default();
    text.trim_end_matches('\u{FFFD}').to_string()
}

/// A step of a stream on the wire: the commits and the final text.
fn step_to_pb(s: StepEvent) -> pb::StepUpdate {
    pb::StepUpdate {
        step: s.step as u32,
        positions: s.committed.iter().map(|c| c.position as u32).collect(),
        tokens: s.committed.iter().map(|c| c.token).collect(),
        confidences: s.committed.iter().map(|c| c.confidence).collect(),
        logprobs: if s.with_logprobs {
            s.committed.iter().map(|c| c.logprob).collect()
        } else {
            Vec::new()
        },
        final_text: s.text,
    }
}

/// How a checked request runs besides its canvas.
#[derive(Clone, Debug, Default)]
pub struct RequestOptions {
    /// Send every step's commits, not only the result.
    pub stream: bool,
    pub deadline: Option<Instant>,
    pub stop: StopStrings,
    /// Names the request in logs and its result.
    pub request_id: String,
}

/// The longest request id accepted from a client.
pub const MAX_REQUEST_ID_BYTES: usize = 128;

/// The client's request id (`x-request-id`), checked: visible ASCII, at most
/// `MAX_REQUEST_ID_BYTES`; none: a fresh one.
pub fn request_id(given: Option<&[u8]>) -> Result<String, String> {
    match given {
        None => Ok(format!("{:016x}", random_seed() ^ (random_seed() << 11))),
        Some(id)
            if !id.is_empty()
                && id.len() <= MAX_REQUEST_ID_BYTES
                && id.iter().all(u8::is_ascii_graphic) =>
        {
            Ok(String::from_utf8_lossy(id).into_owned())
        }
        Some(_) => Err(format!(
            "the request id (x-request-id) must be 1 to {MAX_REQUEST_ID_BYTES} visible ASCII characters"
        )),
    }
}

/// A fresh seed for a request that names none: below 2^53, so that it
/// survives JSON clients that read numbers as doubles.
pub fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish() >> 11
}

/// The gRPC result of a finished request.
pub fn response_to_pb(d: Finished) -> pb::GenerateResponse {
    let c = d.config;
    let settings = pb::SamplerSettings {
        gen_length: c.gen_length as u32,
        steps: c.steps as u32,
        block_length: c.block_length as u32,
        temperature: c.temperature,
        remasking: crate::convert::remasking_to_pb(Some(c.remasking)) as i32,
        rule: c.rule.to_string(),
        cache: crate::convert::cache_to_pb(Some(c.cache)) as i32,
        top_k: c.truncate.top_k,
        top_p: c.truncate.top_p,
    };
    pb::GenerateResponse {
        settings: Some(settings),
        seed: d.seed,
        token_ids: d.token_ids,
        generated_ids: d.generated_ids,
        text: d.text,
        steps: d.steps as u32,
        prompt_length: d.prompt_length as u32,
        elapsed_ms: d.elapsed_ms,
        queue_ms: d.queue_ms,
        forward_ms: d.forward_ms,
        compute_ms: d.compute_ms,
        forwards: d.forwards as u32,
        finish_reason: finish_reason_to_pb(d.finish_reason) as i32,
        completion_tokens: d.answer_tokens as u32,
        matched_stop: d.matched_stop,
        request_id: d.request_id,
        logprobs: d
            .logprobs
            .unwrap_or_default()
            .into_iter()
            .map(|t| pb::TokenLogprob {
                token_id: t.token,
                logprob: t.logprob,
                top_logprobs: t
                    .top
                    .into_iter()
                    .map(|(token_id, logprob)| pb::TopLogprob { token_id, logprob })
                    .collect(),
            })
            .collect(),
    }
}

impl Coordinator {
    /// Checks every field and lays out the canvas; any problem is
    /// INVALID_ARGUMENT with a message saying what to change.
    ///
    /// Tokenizing is CPU work proportional to the text: call it off the
    /// async runtime (`canvas_blocking`) so other clients are not delayed.
    pub fn canvas(&self, req: &pb::GenerateRequest) -> Result<Canvas, Status> {
        let invalid = |m: String| Status::invalid_argument(m);
        self.check_text_len("prompt", req.prompt.len())?;
        self.check_text_len("suffix", req.suffix.len())?;
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
            Ok(pb::Remasking::Unspecified) => None,
            Ok(pb::Remasking::LowConfidence) => Some(Remasking::LowConfidence),
            Ok(pb::Remasking::Random) => Some(Remasking::Random),
            Err(_) => return Err(invalid(format!("unknown remasking {}", req.remasking))),
        };
        let rule = match CommitRule::from_parameters(req.threshold, req.factor, req.entropy)
            .map_err(|e| invalid(e.to_string()))?
        {
            CommitRule::Fixed => None,
            rule => Some(rule),
        };
        let cache = match pb::CacheMode::try_from(req.cache) {
            Ok(pb::CacheMode::Unspecified) => None,
            Ok(pb::CacheMode::None) => Some(CacheMode::None),
            Ok(pb::CacheMode::Prefix) => Some(CacheMode::Prefix),
            Ok(pb::CacheMode::Dual) => Some(CacheMode::Dual),
            Err(_) => {
                return Err(invalid(format!(
                    "unknown cache mode {}: expected NONE, PREFIX or DUAL",
                    req.cache
                )));
            }
        };
        let config = self.meta.defaults.resolve(&Settings {
            gen_length: req.gen_length.map(|v| v as usize),
            steps: req.steps.map(|v| v as usize),
            block_length: req.block_length.map(|v| v as usize),
            remasking,
            rule,
            temperature: req.temperature,
            cfg_scale: req.cfg_scale,
            seed: req.seed.unwrap_or_else(random_seed),
            early_stop: !req.full_canvas,
            logits_eos_inf: req.logits_eos_inf,
            confidence_eos_eot_inf: req.confidence_eos_eot_inf,
            cache,
            // top_logprobs implies logprobs; more than 5 is refused by the
            // canvas's checks, naming the field.
            logprobs: (req.logprobs || req.top_logprobs.is_some())
                .then(|| req.top_logprobs.unwrap_or(0) as usize),
            top_k: req.top_k,
            top_p: req.top_p,
        });
        let space = remask_engine::token_space(&self.meta.config, &self.meta.special);
        Canvas::infill(&prompt, &suffix, config, space).map_err(|e| invalid(e.to_string()))
    }

    /// The request's stop strings, checked.
    pub fn stop_strings(&self, req: &pb::GenerateRequest) -> Result<StopStrings, Status> {
        if !req.stop.is_empty() && req.full_canvas {
            return Err(Status::invalid_argument(
                "stop strings end the request early; full_canvas runs every step: give one of them",
            ));
        }
        StopStrings::new(req.stop.clone()).map_err(Status::invalid_argument)
    }

    /// `canvas` and `stop_strings` on a thread of its own (the runtime's
    /// other tasks move to another worker while it tokenizes).
    pub fn prepare_blocking(
        &self,
        req: &pb::GenerateRequest,
    ) -> Result<(Canvas, StopStrings), Status> {
        let stop = self.stop_strings(req)?;
        Ok((tokio::task::block_in_place(|| self.canvas(req))?, stop))
    }

    /// Refuses text that is certainly longer than the model's
    /// max_sequence_length before it is tokenized: a token covers at most
    /// `max_token_bytes` bytes, so more than `max_sequence_length` times that
    /// cannot fit. (A 4 MB prompt took seconds to tokenize only to be
    /// refused.)
    pub fn check_text_len(&self, what: &str, bytes: usize) -> Result<(), Status> {
        let Some(per_token) = self.meta.codec.max_token_bytes() else {
            return Ok(());
        };
        let limit = self
            .meta
            .config
            .max_sequence_length
            .saturating_mul(per_token);
        if bytes > limit {
            return Err(Status::invalid_argument(format!(
                "the {what} is {bytes} bytes: more than the model's max_sequence_length of {} tokens \
                 can hold (a token covers at most {per_token} bytes, so at most {limit} bytes fit)",
                self.meta.config.max_sequence_length
            )));
        }
        Ok(())
    }

    pub fn is_ready(&self) -> bool {
        self.pipeline.borrow().is_some()
    }

    /// The name clients use for the model.
    pub fn model_name(&self) -> String {
        self.meta.name.clone()
    }

    /// Queues a canvas; its events (steps if `opts.stream`, then the result
    /// or an error) arrive on the returned channel.
    pub fn start(&self, canvas: Canvas, opts: RequestOptions) -> Result<Events, InferError> {
        if !self.is_ready() {
            return Err(InferError::no_pipeline());
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let job = Job::new(canvas, tx, opts.stream, opts.deadline)
            .with_stop(opts.stop)
            .with_request_id(opts.request_id);
        self.scheduler.submit(job)?;
        Ok(rx)
    }

    /// Checks a gRPC request and queues it: its events, deadline and id.
    fn submit(
        &self,
        request: &Request<pb::GenerateRequest>,
        stream: bool,
    ) -> Result<(Events, Option<Instant>, String), Status> {
        let request_id = request_id(request.metadata().get("x-request-id").map(|v| v.as_bytes()))
            .map_err(Status::invalid_argument)?;
        let (canvas, stop) = self.prepare_blocking(request.get_ref())?;
        let deadline = grpc_timeout(request.metadata()).map(|t| Instant::now() + t);
        let opts = RequestOptions {
            stream,
            deadline,
            stop,
            request_id: request_id.clone(),
        };
        Ok((self.start(canvas, opts)?, deadline, request_id))
    }
}

/// `x-request-id` metadata of a response.
fn with_request_id<T>(mut response: Response<T>, id: &str) -> Response<T> {
    if let Ok(v) = id.parse() {
        response.metadata_mut().insert("x-request-id", v);
    }
    response
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
        let (mut events, deadline, id) = self.submit(&request, false)?;
        let result = async {
            while let Some(event) = events.recv().await {
                if let Event::Done(done) = event? {
                    return Ok(with_request_id(Response::new(response_to_pb(*done)), &id));
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
        let (events, _, id) = self.submit(&request, true)?;
        let stream =
            tokio_stream::wrappers::UnboundedReceiverStream::new(events).map(move |event| {
                event
                    .map_err(Status::from)
                    .map(|e| pb::GenerateStreamResponse {
                        event: Some(match e {
                            Event::Step(s) => E::Step(step_to_pb(s)),
                            Event::Done(d) => E::Done(response_to_pb(*d)),
                        }),
                    })
            });
        let stream: EventStream = Box::pin(stream);
        Ok(with_request_id(Response::new(stream), &id))
    }

    async fn tokenize(
        &self,
        request: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        let req = request.get_ref();
        self.check_text_len("text", req.text.len())?;
        let codec = &self.meta.codec;
        let ids = tokio::task::block_in_place(|| match (req.chat, req.add_special_tokens) {
            (true, Some(_)) => Err(Status::invalid_argument(
                "add_special_tokens is for text without the chat template: leave it unset with chat",
            )),
            (true, None) => codec
                .encode_chat(&[Message {
                    role: "user".into(),
                    content: req.text.clone(),
                }])
                .map_err(|e| Status::invalid_argument(format!("cannot tokenize the text: {e}"))),
            (false, special) => if special.unwrap_or(true) {
                codec.encode(&req.text)
            } else {
                codec.encode_continuation(&req.text)
            }
            .map_err(|e| Status::invalid_argument(format!("cannot tokenize the text: {e}"))),
        })?;
        Ok(Response::new(pb::TokenizeResponse {
            count: ids.len() as u32,
            token_ids: ids,
            max_model_len: self.meta.config.max_sequence_length as u32,
        }))
    }

    async fn model_info(
        &self,
        _request: Request<pb::ModelInfoRequest>,
    ) -> Result<Response<pb::ModelInfoResponse>, Status> {
        let c = &self.meta.config;
        let pipeline = self.pipeline.borrow().clone();
        Ok(Response::new(pb::ModelInfoResponse {
            model: self.meta.name.clone(),
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
