//! The OpenAI-compatible HTTP API, next to gRPC on the coordinator:
//! `POST /v1/completions`, `POST /v1/chat/completions` (with `stream: true` as
//! server-sent events), `GET /v1/models`, `GET /v1/models/{id}`,
//! `POST /tokenize`, `POST /detokenize` (vLLM's shapes), `GET /health`,
//! `GET /metrics`. Every error, an unknown route (404), a wrong method (405)
//! and a body over the limit (413) included, is a JSON body in OpenAI's shape.
//!
//! A request parameter is honoured or refused, never silently ignored:
//! OpenAI's and vLLM's parameters that remask does not implement (penalties,
//! `logprobs`, `stop`, tools, ...) are refused with 400 naming them when they
//! ask for anything but the default; fields nobody knows are accepted and
//! logged, as vLLM does.
//!
//! A diffusion model does not write left to right, so a stream cannot send
//! each token as it is produced. Each denoising step is one event: its
//! `text` (or `delta.content`) is what the step made final at the end of the
//! committed prefix of the answer (the longest run of committed tokens from
//! its start), so concatenating the events gives the answer as OpenAI clients
//! expect; the event's `remask` field carries everything the step committed,
//! anywhere in the canvas (`step`, `positions`, `tokens`: several per step
//! under an adaptive commit rule). Results carry a `remask` object too, with
//! the forward passes the request took.

use crate::coordinator::{Coordinator, final_text, random_seed};
use crate::scheduler::{Event, Finished, InferError};
use axum::extract::Path;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use remask_model::Message;
use remask_proto::v1 as pb;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio_stream::{Stream, StreamExt};
use tonic::{Code, Status};

pub fn router(coordinator: Arc<Coordinator>) -> Router {
    let v1 = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model_card))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route_layer(middleware::from_fn_with_state(
            coordinator.clone(),
            require_key,
        ));
    Router::new()
        .merge(v1)
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .layer(middleware::from_fn(json_errors))
        .with_state(coordinator)
}

/// Errors axum makes itself (no route: 404, wrong method: 405, a body over
/// the limit: 413, ...) in OpenAI's JSON shape; the headers (`Allow`) stay.
async fn json_errors(request: Request, next: Next) -> Response {
    let (method, path) = (request.method().clone(), request.uri().path().to_string());
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (message, code) = match status {
        StatusCode::NOT_FOUND => (format!("Invalid URL ({method} {path})"), "not_found"),
        StatusCode::METHOD_NOT_ALLOWED => (
            format!("method {method} is not allowed on {path}"),
            "method_not_allowed",
        ),
        StatusCode::PAYLOAD_TOO_LARGE => (
            format!("the request body is larger than the server accepts ({method} {path})"),
            "request_too_large",
        ),
        _ => (
            status
                .canonical_reason()
                .unwrap_or("request failed")
                .to_string(),
            "",
        ),
    };
    let (mut parts, _) = response.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    let error = ApiError {
        status,
        message,
        kind: if status.is_client_error() {
            "invalid_request_error"
        } else {
            "server_error"
        },
        code: (!code.is_empty()).then_some(code),
        param: None,
    };
    let body = Json(error.body()).into_response();
    let (body_parts, body) = body.into_parts();
    parts.headers.extend(body_parts.headers);
    Response::from_parts(parts, body)
}

/// An error in OpenAI's shape.
struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    code: Option<&'static str>,
    /// The request field at fault.
    param: Option<String>,
}

impl ApiError {
    fn bad_request(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            code: None,
            param: None,
        }
    }

    /// A parameter remask does not implement, given a value other than its
    /// default.
    fn unsupported(param: &str, accepted: &str) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: format!("'{param}' is not supported by this server (remask); {accepted}"),
            kind: "invalid_request_error",
            code: Some("unsupported_parameter"),
            param: Some(param.to_string()),
        }
    }

    fn model_not_found(c: &Coordinator, m: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "model '{m}' is not served here; GET /v1/models lists '{}'",
                c.model_name()
            ),
            kind: "invalid_request_error",
            code: Some("model_not_found"),
            param: Some("model".into()),
        }
    }

    fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl From<Status> for ApiError {
    fn from(s: Status) -> Self {
        let (status, kind, code) = match s.code() {
            Code::InvalidArgument => (StatusCode::BAD_REQUEST, "invalid_request_error", None),
            Code::Unauthenticated => (
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                Some("invalid_api_key"),
            ),
            Code::ResourceExhausted => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                Some("queue_full"),
            ),
            Code::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("unavailable"),
            ),
            Code::DeadlineExceeded => {
                (StatusCode::GATEWAY_TIMEOUT, "server_error", Some("timeout"))
            }
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", None),
        };
        ApiError {
            status,
            message: s.message().to_string(),
            kind,
            code,
            param: None,
        }
    }
}

impl From<InferError> for ApiError {
    fn from(e: InferError) -> Self {
        match e {
            // Not a rate limit: the request can never run here.
            InferError::TooLarge(message) => ApiError {
                status: StatusCode::BAD_REQUEST,
                message,
                kind: "invalid_request_error",
                code: Some("kv_cache_too_large"),
                param: None,
            },
            e => ApiError::from(Status::from(e)),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            // The queue is full now; a place frees at the next finished request.
            response.headers_mut().insert(
                header::RETRY_AFTER,
                header::HeaderValue::from_static(RETRY_AFTER_S),
            );
        }
        response
    }
}

/// `Retry-After` of a 429, in seconds.
const RETRY_AFTER_S: &str = "1";

/// The parameters of OpenAI's and vLLM's APIs that remask does not
/// implement, with whether a value asks for nothing but the default (then it
/// is accepted): anything else is refused, never silently ignored.
/// (parameter, whether a value is accepted, what is accepted).
type Unsupported = (&'static str, fn(&Value) -> bool, &'static str);

const UNSUPPORTED: &[Unsupported] = &[
    (
        "presence_penalty",
        |v| v.as_f64() == Some(0.0),
        "only 0 is accepted",
    ),
    (
        "frequency_penalty",
        |v| v.as_f64() == Some(0.0),
        "only 0 is accepted",
    ),
    (
        "repetition_penalty",
        |v| v.as_f64() == Some(1.0),
        "only 1 is accepted",
    ),
    (
        "logit_bias",
        |v| v.as_object().is_some_and(Map::is_empty),
        "only an empty map is accepted",
    ),
    ("best_of", |v| v.as_u64() == Some(1), "only 1 is accepted"),
    (
        "logprobs",
        |v| v == &Value::Bool(false),
        "log probabilities are not implemented yet",
    ),
    (
        "top_logprobs",
        |v| v.as_u64() == Some(0),
        "log probabilities are not implemented yet",
    ),
    (
        "top_k",
        |v| matches!(v.as_i64(), Some(-1 | 0)),
        "only -1 or 0 (off) is accepted",
    ),
    ("top_p", |v| v.as_f64() == Some(1.0), "only 1 is accepted"),
    ("min_p", |v| v.as_f64() == Some(0.0), "only 0 is accepted"),
    (
        "min_tokens",
        |v| v.as_u64() == Some(0),
        "only 0 is accepted",
    ),
    (
        "echo",
        |v| v == &Value::Bool(false),
        "only false is accepted",
    ),
    ("stop", is_empty, "stop sequences are not implemented yet"),
    (
        "stop_token_ids",
        is_empty,
        "stop token ids are not implemented yet",
    ),
    (
        "response_format",
        |v| v == &json!({"type": "text"}),
        "only {\"type\": \"text\"} is accepted",
    ),
    ("tools", is_empty, "tool calls are not implemented"),
    ("functions", is_empty, "function calls are not implemented"),
    (
        "tool_choice",
        |v| v == "none",
        "tool calls are not implemented (only \"none\")",
    ),
    (
        "function_call",
        |v| v == "none",
        "function calls are not implemented (only \"none\")",
    ),
];

fn is_empty(v: &Value) -> bool {
    match v {
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

/// Fields both endpoints know (OpenAI's, vLLM's and remask's own), besides
/// the unsupported ones.
const KNOWN: &[&str] = &[
    "model",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "seed",
    "n",
    "stream",
    "stream_options",
    "user",
    "parallel_tool_calls",
    "steps",
    "block_length",
    "remasking",
    "cfg_scale",
    "logits_eos_inf",
    "confidence_eos_eot_inf",
    "threshold",
    "factor",
    "entropy",
    "full_canvas",
    "cache",
];

/// The body as a JSON object, after refusing the parameters remask does not
/// implement and logging the fields it does not know.
fn checked_body(body: &[u8], kind: Kind) -> Result<Value, ApiError> {
    let value: Value = parse(body)?;
    let Value::Object(fields) = &value else {
        return Err(ApiError::bad_request(
            "invalid JSON body: expected an object",
        ));
    };
    for (param, accepted, why) in UNSUPPORTED {
        if let Some(v) = fields.get(*param)
            && !v.is_null()
            && !accepted(v)
        {
            return Err(ApiError::unsupported(param, why));
        }
    }
    if kind == Kind::Chat && fields.get("suffix").is_some_and(|v| !v.is_null()) {
        return Err(ApiError::unsupported(
            "suffix",
            "infilling is a completions parameter (POST /v1/completions)",
        ));
    }
    let own: &[&str] = match kind {
        Kind::Completion => &["prompt", "suffix"],
        Kind::Chat => &["messages"],
    };
    let unknown: Vec<&str> = fields
        .keys()
        .map(String::as_str)
        .filter(|k| {
            !KNOWN.contains(k) && !own.contains(k) && !UNSUPPORTED.iter().any(|(p, ..)| p == k)
        })
        .collect();
    if !unknown.is_empty() {
        tracing::info!(
            fields = ?unknown,
            "the request has fields remask does not know; they are ignored"
        );
    }
    Ok(value)
}

async fn require_key(
    State(c): State<Arc<Coordinator>>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if c.api_keys.allows(auth) {
        next.run(request).await
    } else {
        // The body is not read: close the connection so the client does
        // not send its next request after unread bytes.
        let mut response = ApiError::from(Status::unauthenticated(
            "missing or invalid API key: send `Authorization: Bearer <key>`",
        ))
        .into_response();
        response.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
        response
    }
}

async fn health(State(c): State<Arc<Coordinator>>) -> Response {
    if c.is_ready() {
        (StatusCode::OK, Json(json!({"status": "ok"}))).into_response()
    } else {
        let body =
            json!({"status": "unavailable", "reason": "the cluster has no complete set of shards"});
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}

async fn metrics(State(c): State<Arc<Coordinator>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        c.metrics.render(),
    )
        .into_response()
}

fn check_model(c: &Coordinator, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        Some(m) if m != c.model_name() => Err(ApiError::model_not_found(c, m)),
        _ => Ok(()),
    }
}

fn card(c: &Coordinator) -> Value {
    json!({
        "id": c.model_name(), "object": "model", "created": 0, "owned_by": "remask",
        "max_model_len": c.meta.config.max_sequence_length,
    })
}

async fn models(State(c): State<Arc<Coordinator>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [card(&c)]}))
}

async fn model_card(State(c): State<Arc<Coordinator>>, Path(id): Path<String>) -> Response {
    match check_model(&c, Some(&id)) {
        Ok(()) => Json(card(&c)).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `POST /tokenize`: `{"prompt"}` (with `add_special_tokens`, default true)
/// or `{"messages"}` (the chat template with the generation prompt, as the
/// chat endpoint tokenizes them).
#[derive(Deserialize)]
struct TokenizeRequest {
    model: Option<String>,
    prompt: Option<Value>,
    messages: Option<Vec<ChatMessage>>,
    add_special_tokens: Option<bool>,
    add_generation_prompt: Option<bool>,
}

async fn tokenize(State(c): State<Arc<Coordinator>>, body: axum::body::Bytes) -> Response {
    let result = (|| {
        let req: TokenizeRequest = parse(&body)?;
        check_model(&c, req.model.as_deref())?;
        let tokens = match (&req.prompt, &req.messages) {
            (Some(prompt), None) => {
                let text = text_of(prompt, "prompt")?;
                c.check_text_len("prompt", text.len())?;
                let special = req.add_special_tokens.unwrap_or(true);
                tokio::task::block_in_place(|| {
                    if special {
                        c.meta.codec.encode(&text)
                    } else {
                        c.meta.codec.encode_continuation(&text)
                    }
                })
                .map_err(|e| ApiError::bad_request(format!("cannot tokenize the prompt: {e}")))?
            }
            (None, Some(messages)) => {
                if req.add_generation_prompt == Some(false) {
                    return Err(ApiError::unsupported(
                        "add_generation_prompt",
                        "messages are tokenized as the chat endpoint does, with the generation prompt",
                    ));
                }
                if req.add_special_tokens == Some(true) {
                    return Err(ApiError::unsupported(
                        "add_special_tokens",
                        "the chat template has its special tokens already",
                    ));
                }
                chat_ids(&c, messages)?
            }
            _ => return Err(ApiError::bad_request("give either prompt or messages")),
        };
        Ok(Json(json!({
            "count": tokens.len(), "max_model_len": c.meta.config.max_sequence_length,
            "tokens": tokens, "token_strs": null,
        })))
    })();
    result.map_or_else(IntoResponse::into_response, IntoResponse::into_response)
}

/// `POST /detokenize`: `{"tokens"}` -> `{"prompt"}`, special tokens included.
#[derive(Deserialize)]
struct DetokenizeRequest {
    model: Option<String>,
    tokens: Vec<u32>,
}

async fn detokenize(State(c): State<Arc<Coordinator>>, body: axum::body::Bytes) -> Response {
    let result = (|| {
        let req: DetokenizeRequest = parse(&body)?;
        check_model(&c, req.model.as_deref())?;
        let vocab = c.meta.config.vocab_size;
        if let Some(t) = req.tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(ApiError::bad_request(format!(
                "token {t} is outside the vocabulary of {vocab}"
            )));
        }
        let prompt = tokio::task::block_in_place(|| c.meta.codec.decode(&req.tokens, false))
            .map_err(|e| ApiError::bad_request(format!("cannot detokenize: {e}")))?;
        Ok(Json(json!({"prompt": prompt})))
    })();
    result.map_or_else(IntoResponse::into_response, IntoResponse::into_response)
}

/// Sampler fields of both endpoints: OpenAI's, plus remask's own as extra
/// top-level fields, as vLLM takes its extra sampling parameters (`steps`,
/// `block_length`, `remasking`, `cfg_scale`, the commit rules `threshold`,
/// `factor`, `entropy`, `full_canvas` and the K/V `cache` mode, ...).
#[derive(Deserialize, Default)]
struct Sampling {
    model: Option<String>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f64>,
    seed: Option<u64>,
    n: Option<u32>,
    #[serde(default)]
    stream: bool,
    steps: Option<u32>,
    block_length: Option<u32>,
    remasking: Option<String>,
    cfg_scale: Option<f64>,
    #[serde(default)]
    logits_eos_inf: bool,
    #[serde(default)]
    confidence_eos_eot_inf: bool,
    threshold: Option<f64>,
    factor: Option<f64>,
    entropy: Option<f64>,
    /// Run every step and return the whole canvas (no early stop).
    #[serde(default)]
    full_canvas: bool,
    /// K/V cache mode: "none", "prefix" or "dual" (unset: the server's).
    cache: Option<String>,
}

#[derive(Deserialize)]
struct CompletionRequest {
    prompt: Value,
    /// OpenAI's infill field: text after the completion, which fills the gap.
    suffix: Option<String>,
    #[serde(flatten)]
    sampling: Sampling,
}

#[derive(Deserialize)]
struct ChatRequest {
    messages: Vec<ChatMessage>,
    #[serde(flatten)]
    sampling: Sampling,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    content: Value,
}

impl Sampling {
    /// A gRPC request for `prompt_ids`; defaults: 128 tokens, one step per
    /// token (the fixed schedule), blocks of 32 when that divides the length,
    /// greedy.
    fn request(
        &self,
        c: &Coordinator,
        prompt_ids: Vec<u32>,
    ) -> Result<pb::GenerateRequest, ApiError> {
        check_model(c, self.model.as_deref())?;
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::unsupported("n", "only n = 1 is accepted"));
        }
        let gen_length = self
            .max_completion_tokens
            .or(self.max_tokens)
            .unwrap_or(128);
        let block_length = self
            .block_length
            .unwrap_or(if gen_length.is_multiple_of(32) {
                32
            } else {
                gen_length
            });
        let remasking = match self.remasking.as_deref() {
            None | Some("low_confidence") => pb::Remasking::LowConfidence,
            Some("random") => pb::Remasking::Random,
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "unknown remasking '{other}': expected 'low_confidence' or 'random'"
                )));
            }
        };
        let cache = match self.cache.as_deref() {
            None => pb::CacheMode::Unspecified,
            Some("none") => pb::CacheMode::None,
            Some("prefix") => pb::CacheMode::Prefix,
            Some("dual") => pb::CacheMode::Dual,
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "unknown cache '{other}': expected 'none', 'prefix' or 'dual'"
                )));
            }
        };
        let adaptive = self.threshold.is_some()
            || self.factor.is_some()
            || self.entropy.is_some()
            || c.default_rule.is_adaptive();
        Ok(pb::GenerateRequest {
            prompt_ids,
            gen_length: Some(gen_length),
            // The adaptive rules use no step count.
            steps: self.steps.or((!adaptive).then_some(gen_length)),
            block_length: Some(block_length),
            remasking: remasking as i32,
            temperature: self.temperature.unwrap_or(0.0),
            cfg_scale: self.cfg_scale.unwrap_or(0.0),
            // Unset: a fresh seed, reported in the result's `remask.seed`.
            seed: Some(self.seed.unwrap_or_else(random_seed)),
            logits_eos_inf: self.logits_eos_inf,
            confidence_eos_eot_inf: self.confidence_eos_eot_inf,
            threshold: self.threshold,
            factor: self.factor,
            entropy: self.entropy,
            full_canvas: self.full_canvas,
            cache: cache as i32,
            ..Default::default()
        })
    }
}

fn text_of(v: &Value, what: &str) -> Result<String, ApiError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        // Content parts: [{"type": "text", "text": ...}, ...]
        Value::Array(parts) if what == "content" => parts
            .iter()
            .map(|p| {
                match (
                    p.get("type").and_then(Value::as_str),
                    p.get("text").and_then(Value::as_str),
                ) {
                    (Some("text"), Some(t)) => Ok(t.to_string()),
                    _ => Err(ApiError::bad_request(
                        "only text content parts are supported",
                    )),
                }
            })
            .collect(),
        _ => Err(ApiError::bad_request(format!("{what} must be a string"))),
    }
}

async fn completions(State(c): State<Arc<Coordinator>>, body: axum::body::Bytes) -> Response {
    let result = async {
        let req: CompletionRequest = from_value(checked_body(&body, Kind::Completion)?)?;
        let prompt_ids = match &req.prompt {
            Value::Array(items) if items.iter().all(Value::is_u64) => items
                .iter()
                .map(|v| v.as_u64().unwrap_or(u64::MAX).min(u32::MAX as u64) as u32)
                .collect(),
            Value::Array(items) if items.len() == 1 => encode(&c, &text_of(&items[0], "prompt")?)?,
            Value::Array(_) => {
                return Err(ApiError::bad_request(
                    "prompt must be one string (batches are not supported)",
                ));
            }
            other => encode(&c, &text_of(other, "prompt")?)?,
        };
        let mut grpc = req.sampling.request(&c, prompt_ids)?;
        grpc.suffix = req.suffix.unwrap_or_default();
        run(c.clone(), grpc, req.sampling.stream, Kind::Completion).await
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn chat_completions(State(c): State<Arc<Coordinator>>, body: axum::body::Bytes) -> Response {
    let result = async {
        let req: ChatRequest = from_value(checked_body(&body, Kind::Chat)?)?;
        let prompt_ids = chat_ids(&c, &req.messages)?;
        let grpc = req.sampling.request(&c, prompt_ids)?;
        run(c.clone(), grpc, req.sampling.stream, Kind::Chat).await
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// A conversation in the chat template, tokenized off the async runtime.
fn chat_ids(c: &Coordinator, messages: &[ChatMessage]) -> Result<Vec<u32>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad_request("messages is empty"));
    }
    let messages = messages
        .iter()
        .map(|m| {
            Ok(Message {
                role: m.role.clone(),
                content: text_of(&m.content, "content")?,
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let bytes = messages.iter().map(|m| m.content.len()).sum();
    c.check_text_len("conversation", bytes)?;
    tokio::task::block_in_place(|| c.meta.codec.encode_chat(&messages))
        .map_err(|e| ApiError::bad_request(format!("cannot apply the chat template: {e}")))
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

fn from_value<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, ApiError> {
    serde_json::from_value(value)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

/// Tokenizes a prompt off the async runtime, after refusing text that is
/// certainly too long.
fn encode(c: &Coordinator, text: &str) -> Result<Vec<u32>, ApiError> {
    if text.trim().is_empty() {
        return Err(ApiError::bad_request("the prompt is empty"));
    }
    c.check_text_len("prompt", text.len())?;
    tokio::task::block_in_place(|| c.meta.codec.encode(text))
        .map_err(|e| ApiError::bad_request(format!("cannot tokenize the prompt: {e}")))
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Completion,
    Chat,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn usage(done: &Finished) -> Value {
    let (p, g) = (done.prompt_length, done.answer_tokens);
    json!({"prompt_tokens": p, "completion_tokens": g, "total_tokens": p + g})
}

/// remask's own fields of a result.
fn remask_fields(done: &Finished) -> Value {
    json!({
        "forwards": done.forwards, "steps": done.steps, "generated_ids": done.generated_ids,
        "seed": done.seed,
    })
}

async fn run(
    c: Arc<Coordinator>,
    grpc: pb::GenerateRequest,
    stream: bool,
    kind: Kind,
) -> Result<Response, ApiError> {
    let canvas = c.canvas_blocking(&grpc)?;
    let mut events = c.start(canvas, stream, None)?;
    let id = format!(
        "{}-{:x}",
        if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        },
        rand_id()
    );
    let (created, model) = (now(), c.model_name());
    if !stream {
        while let Some(event) = events.recv().await {
            if let Event::Done(done) = event? {
                let reason = done.finish_reason.as_str();
                let choice = match kind {
                    Kind::Completion => {
                        json!({"index": 0, "text": done.text, "logprobs": null, "finish_reason": reason})
                    }
                    Kind::Chat => {
                        json!({"index": 0, "message": {"role": "assistant", "content": done.text}, "finish_reason": reason})
                    }
                };
                let object = if kind == Kind::Chat {
                    "chat.completion"
                } else {
                    "text_completion"
                };
                return Ok(Json(json!({
                    "id": id, "object": object, "created": created, "model": model,
                    "choices": [choice], "usage": usage(&done), "remask": remask_fields(&done),
                }))
                .into_response());
            }
        }
        return Err(InferError::Internal("the request ended without a result".into()).into());
    }

    let object = if kind == Kind::Chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let chunk = move |delta: &str, finish: Option<&str>, extra: Value| {
        let choice = match kind {
            Kind::Completion => {
                json!({"index": 0, "text": delta, "logprobs": null, "finish_reason": finish})
            }
            Kind::Chat => {
                json!({"index": 0, "delta": {"role": "assistant", "content": delta}, "finish_reason": finish})
            }
        };
        let mut v = json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice]});
        if let (Value::Object(o), Value::Object(e)) = (&mut v, extra) {
            o.extend(e);
        }
        SseEvent::default().data(v.to_string())
    };
    let codec = c.meta.codec.clone();
    let stream = async_stream_events(move |tx| async move {
        let mut sent = String::new();
        while let Some(event) = events.recv().await {
            match event {
                Ok(Event::Step(s)) => {
                    let text = final_text(&codec, &s.final_prefix);
                    let delta = text.strip_prefix(sent.as_str()).unwrap_or("").to_string();
                    if !delta.is_empty() {
                        sent = text;
                    }
                    let positions: Vec<usize> = s.committed.iter().map(|c| c.position).collect();
                    let tokens: Vec<u32> = s.committed.iter().map(|c| c.token).collect();
                    let extra = json!({"remask": {"step": s.step, "positions": positions, "tokens": tokens}});
                    if tx.send(chunk(&delta, None, extra)).await.is_err() {
                        return;
                    }
                }
                Ok(Event::Done(done)) => {
                    let rest = done.text.strip_prefix(sent.as_str()).unwrap_or("");
                    let extra = json!({"usage": usage(&done), "remask": remask_fields(&done)});
                    let reason = done.finish_reason.as_str();
                    let _ = tx.send(chunk(rest, Some(reason), extra)).await;
                    let _ = tx.send(SseEvent::default().data("[DONE]")).await;
                    return;
                }
                Err(error) => {
                    let _ = tx
                        .send(SseEvent::default().data(ApiError::from(error).body().to_string()))
                        .await;
                    let _ = tx.send(SseEvent::default().data("[DONE]")).await;
                    return;
                }
            }
        }
    });
    Ok(Sse::new(stream).into_response())
}

/// A stream fed by a task; the task ends (and the request is cancelled at
/// the next step boundary) when the client goes away.
fn async_stream_events<F, Fut>(f: F) -> impl Stream<Item = Result<SseEvent, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<SseEvent>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok)
}

fn rand_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}
