//! The OpenAI-compatible HTTP API, next to gRPC on the coordinator:
//! `POST /v1/completions`, `POST /v1/chat/completions` (with `stream: true` as
//! server-sent events), `GET /v1/models`, `GET /v1/models/{id}`,
//! `POST /tokenize`, `POST /detokenize` (vLLM's shapes), `GET /health`,
//! `GET /metrics`. Every error, an unknown route (404), a wrong method (405)
//! and a body over the limit (413) included, is a JSON body in OpenAI's shape.
//!
//! A request parameter is honoured or refused, never silently ignored:
//! OpenAI's and vLLM's parameters that remask does not implement (penalties,
//! `min_p`, tools, ...) are refused with 400 naming them when they
//! ask for anything but the default; fields nobody knows are accepted and
//! logged, as vLLM does.
//!
//! `top_k` and `top_p` truncate the draw at temperature > 0 as vLLM's do
//! (`top_k` an integer, -1 or 0 off, else at least 1; `top_p` in (0, 1];
//! top-k first), exactly on every topology; other values are 400 naming
//! the field. Unset (or null): the server's default, the checkpoint's
//! generation_config.json, else off. At temperature 0 they change nothing.
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
//!
//! `logprobs` (completions: an integer; chat: a boolean with `top_logprobs`)
//! give each answer token's log-probability at the step that committed it
//! and its top alternatives there; a stream sends them with the event whose
//! text completes their tokens' bytes.

use crate::coordinator::{Coordinator, RequestOptions, random_seed};
use crate::scheduler::{Event, Finished, InferError};
use axum::extract::Path;
use axum::extract::{Extension, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use remask_model::Message;
use remask_proto::v1 as pb;
use remask_sampler::TokenLogprob;
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
    let router = Router::new()
        .merge(v1)
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .layer(middleware::from_fn(json_errors))
        .layer(middleware::from_fn(request_id_layer));
    let router = if coordinator.http.allowed_origins.is_empty() {
        router
    } else {
        router.layer(cors(&coordinator.http.allowed_origins))
    };
    router.with_state(coordinator)
}

/// CORS for `--allowed-origins`: none (no headers), a list, or `*`. A
/// browser page of an allowed origin may send the API key and read
/// `X-Request-Id`.
fn cors(origins: &[String]) -> tower_http::cors::CorsLayer {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let origin = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            origins
                .iter()
                .filter_map(|o| header::HeaderValue::from_str(o).ok()),
        )
    };
    CorsLayer::new()
        .allow_origin(origin)
        .allow_methods([axum::http::Method::GET, axum::http::Method::POST])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::HeaderName::from_static("x-request-id"),
        ])
        .expose_headers([header::HeaderName::from_static("x-request-id")])
        .max_age(std::time::Duration::from_secs(600))
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

    /// Names the request field at fault.
    fn param(mut self, param: &str) -> Self {
        self.param = Some(param.to_string());
        self
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
    ("min_p", |v| v.as_f64() == Some(0.0), "only 0 is accepted"),
    (
        "min_tokens",
        |v| v.as_u64() == Some(0),
        "only 0 is accepted",
    ),
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
    "stop",
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
    "logprobs",
    "top_logprobs",
    "top_k",
    "top_p",
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
    if kind == Kind::Chat
        && fields
            .get("echo")
            .is_some_and(|v| v != &Value::Bool(false) && !v.is_null())
    {
        return Err(ApiError::unsupported(
            "echo",
            "echo is a completions parameter (POST /v1/completions)",
        ));
    }
    let own: &[&str] = match kind {
        Kind::Completion => &["prompt", "suffix", "echo"],
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

async fn metrics(State(c): State<Arc<Coordinator>>, headers: HeaderMap) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let (ctype, body) = crate::metrics::exposition(c.metrics.render(), accept);
    ([(header::CONTENT_TYPE, ctype)], body).into_response()
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
    /// Choices per prompt: canvases of their own in the running batch.
    n: Option<u32>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    /// A string or up to 4 strings.
    stop: Option<Value>,
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
    /// Completions: an integer, the alternatives per token (0 to 5); chat:
    /// a boolean (`Sampling::logprobs`).
    logprobs: Option<Value>,
    /// Chat: the alternatives per token (0 to 5), with `logprobs: true`.
    top_logprobs: Option<Value>,
    /// An integer: -1 or 0 off, else at least 1 (`Sampling::truncation`).
    top_k: Option<Value>,
    /// A number in (0, 1].
    top_p: Option<Value>,
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Deserialize)]
struct CompletionRequest {
    /// A string, a list of strings, a list of token ids, or a list of lists
    /// of token ids: one canvas per prompt (times `n`).
    prompt: Value,
    /// OpenAI's infill field: text after the completion, which fills the gap.
    suffix: Option<String>,
    /// The prompt's text before each choice's.
    #[serde(default)]
    echo: bool,
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

/// Canvases one request may ask for (prompts times `n`).
const MAX_CHOICES: usize = 64;

/// The most alternatives per token the API returns (the head's limit).
const MAX_TOP_LOGPROBS: u64 = remask_sampler::MAX_TOP_LOGPROBS as u64;

impl Sampling {
    /// How many alternatives per token to return, `None` for no logprobs:
    /// completions take `logprobs: 0..=5` (OpenAI's legacy field), chat
    /// `logprobs: true` with `top_logprobs: 0..=5`.
    fn logprobs(&self, kind: Kind) -> Result<Option<u32>, ApiError> {
        let count = |v: &Value, param: &str| {
            match v.as_u64() {
            Some(k) if k <= MAX_TOP_LOGPROBS => Ok(k as u32),
            _ => Err(ApiError::bad_request(format!(
                "{param} must be an integer from 0 to {MAX_TOP_LOGPROBS} (the alternatives per token this server returns at most), got {v}"
            ))
            .param(param)),
        }
        };
        let given = |v: &Option<Value>| v.as_ref().filter(|v| !v.is_null()).cloned();
        match kind {
            Kind::Completion => {
                if let Some(v) = given(&self.top_logprobs)
                    && v.as_u64() != Some(0)
                {
                    return Err(ApiError::unsupported(
                        "top_logprobs",
                        "it is a chat parameter: completions take logprobs (an integer from 0 to 5)",
                    ));
                }
                match given(&self.logprobs) {
                    None | Some(Value::Bool(false)) => Ok(None),
                    Some(v) => count(&v, "logprobs").map(Some),
                }
            }
            Kind::Chat => {
                let on = match given(&self.logprobs) {
                    None | Some(Value::Bool(false)) => false,
                    Some(Value::Bool(true)) => true,
                    Some(v) => {
                        return Err(ApiError::bad_request(format!(
                            "logprobs must be a boolean, got {v}"
                        ))
                        .param("logprobs"));
                    }
                };
                let top = given(&self.top_logprobs)
                    .map(|v| count(&v, "top_logprobs"))
                    .transpose()?;
                match (on, top) {
                    (false, Some(k)) if k > 0 => {
                        Err(ApiError::bad_request("top_logprobs needs logprobs: true")
                            .param("top_logprobs"))
                    }
                    (false, _) => Ok(None),
                    (true, top) => Ok(Some(top.unwrap_or(0))),
                }
            }
        }
    }

    /// `top_k` and `top_p` as the gRPC request takes them, checked as vLLM
    /// checks them: `top_k` an integer, -1 or 0 for off (0 on the wire),
    /// else at least 1 (a k beyond the vocabulary keeps every token);
    /// `top_p` a number in (0, 1]. `None`: unset (or null), the server's
    /// default.
    fn truncation(&self) -> Result<(Option<u32>, Option<f64>), ApiError> {
        let given = |v: &Option<Value>| v.as_ref().filter(|v| !v.is_null()).cloned();
        let top_k = given(&self.top_k)
            .map(|v| match (v.as_i64(), v.as_u64()) {
                (Some(-1 | 0), _) => Ok(0),
                (_, Some(k)) => Ok(k.min(u32::MAX as u64) as u32),
                _ => Err(ApiError::bad_request(format!(
                    "top_k must be an integer: -1 or 0 (off), or at least 1, got {v}"
                ))
                .param("top_k")),
            })
            .transpose()?;
        let top_p = given(&self.top_p)
            .map(|v| match v.as_f64() {
                Some(p) if p > 0.0 && p <= 1.0 => Ok(p),
                _ => Err(ApiError::bad_request(format!(
                    "top_p must be a number in (0, 1], got {v}"
                ))
                .param("top_p")),
            })
            .transpose()?;
        Ok((top_k, top_p))
    }

    /// A gRPC request for `prompt_ids`. What the body leaves unset stays
    /// unset: the coordinator fills it from the same defaults as gRPC and
    /// the CLI (the checkpoint's generation_config.json, the server's flags).
    fn request(
        &self,
        prompt_ids: Vec<u32>,
        seed: u64,
        logprobs: Option<u32>,
    ) -> Result<pb::GenerateRequest, ApiError> {
        let remasking = match self.remasking.as_deref() {
            None => pb::Remasking::Unspecified,
            Some("low_confidence") => pb::Remasking::LowConfidence,
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
        let (top_k, top_p) = self.truncation()?;
        Ok(pb::GenerateRequest {
            prompt_ids,
            gen_length: self.max_completion_tokens.or(self.max_tokens),
            steps: self.steps,
            block_length: self.block_length,
            remasking: remasking as i32,
            temperature: self.temperature,
            cfg_scale: self.cfg_scale.unwrap_or(0.0),
            seed: Some(seed),
            logits_eos_inf: self.logits_eos_inf,
            confidence_eos_eot_inf: self.confidence_eos_eot_inf,
            threshold: self.threshold,
            factor: self.factor,
            entropy: self.entropy,
            full_canvas: self.full_canvas,
            cache: cache as i32,
            stop: self.stop_strings()?,
            logprobs: logprobs.is_some(),
            top_logprobs: logprobs,
            top_k,
            top_p,
            ..Default::default()
        })
    }

    fn stop_strings(&self) -> Result<Vec<String>, ApiError> {
        let bad =
            || ApiError::bad_request("stop must be a string or a list of strings").param("stop");
        match &self.stop {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::String(s)) => Ok(vec![s.clone()]),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(str::to_string).ok_or_else(bad))
                .collect(),
            Some(_) => Err(bad()),
        }
    }

    /// The choices of `prompts`: `n` per prompt, in OpenAI's order (every
    /// choice of the first prompt, then the second's...), checked and laid
    /// out before any of them is queued. Choice `i` of a prompt runs with
    /// the seed plus `i`, so several samples differ and each can be
    /// reproduced.
    fn choices(
        &self,
        c: &Coordinator,
        prompts: Vec<Prompt>,
        suffix: &str,
        kind: Kind,
    ) -> Result<Vec<Choice>, ApiError> {
        check_model(c, self.model.as_deref())?;
        let logprobs = self.logprobs(kind)?;
        let n = self.n.unwrap_or(1) as usize;
        if n == 0 {
            return Err(ApiError::bad_request("n must be at least 1").param("n"));
        }
        if prompts.len().saturating_mul(n) > MAX_CHOICES {
            return Err(ApiError::bad_request(format!(
                "{} prompts times n = {n} is more than the {MAX_CHOICES} choices a request may ask for",
                prompts.len()
            ))
            .param("n"));
        }
        // The stop strings, checked once with the field named.
        let stop = self.stop_strings()?;
        if !stop.is_empty() && self.full_canvas {
            return Err(ApiError::bad_request(
                "stop strings end the request early; full_canvas runs every step: give one of them",
            )
            .param("stop"));
        }
        crate::stop::StopStrings::new(stop).map_err(|m| ApiError::bad_request(m).param("stop"))?;
        let seed = self.seed.unwrap_or_else(random_seed);
        let mut choices = Vec::with_capacity(prompts.len() * n);
        for prompt in prompts {
            for i in 0..n {
                let mut grpc =
                    self.request(prompt.ids.clone(), seed.wrapping_add(i as u64), logprobs)?;
                grpc.suffix = suffix.to_string();
                let (canvas, stop) = c.prepare_blocking(&grpc)?;
                choices.push(Choice {
                    canvas,
                    stop,
                    echo: prompt.echo.clone(),
                });
            }
        }
        Ok(choices)
    }
}

/// One prompt of a request: its tokens, and its text for `echo`.
struct Prompt {
    ids: Vec<u32>,
    echo: String,
}

/// One choice, checked and laid out.
struct Choice {
    canvas: remask_sampler::Canvas,
    stop: crate::stop::StopStrings,
    echo: String,
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

/// Token ids of a prompt given as ids.
fn ids_of(items: &[Value]) -> Option<Vec<u32>> {
    items
        .iter()
        .map(|v| v.as_u64().map(|t| t.min(u32::MAX as u64) as u32))
        .collect()
}

/// The prompts of a completion request, tokenized (off the async runtime).
fn prompts_of(c: &Coordinator, prompt: &Value, echo: bool) -> Result<Vec<Prompt>, ApiError> {
    let from_ids = |ids: Vec<u32>| -> Result<Prompt, ApiError> {
        let echo = if echo {
            let vocab = c.meta.config.vocab_size;
            if let Some(t) = ids.iter().find(|&&t| t as usize >= vocab) {
                return Err(ApiError::bad_request(format!(
                    "token {t} is outside the vocabulary of {vocab}"
                )));
            }
            tokio::task::block_in_place(|| c.meta.codec.decode(&ids, true))
                .map_err(|e| ApiError::bad_request(format!("cannot detokenize the prompt: {e}")))?
        } else {
            String::new()
        };
        Ok(Prompt { ids, echo })
    };
    let from_text = |text: &str| -> Result<Prompt, ApiError> {
        Ok(Prompt {
            ids: encode(c, text)?,
            echo: if echo {
                text.to_string()
            } else {
                String::new()
            },
        })
    };
    let bad = || {
        ApiError::bad_request(
            "prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids",
        )
        .param("prompt")
    };
    match prompt {
        Value::String(s) => Ok(vec![from_text(s)?]),
        Value::Array(items) if items.is_empty() => {
            Err(ApiError::bad_request("prompt is empty").param("prompt"))
        }
        Value::Array(items) if items[0].is_u64() => {
            Ok(vec![from_ids(ids_of(items).ok_or_else(bad)?)?])
        }
        Value::Array(items) if items.len() > MAX_CHOICES => Err(ApiError::bad_request(format!(
            "{} prompts are more than the {MAX_CHOICES} a request may give",
            items.len()
        ))
        .param("prompt")),
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => from_text(s),
                Value::Array(ids) if !ids.is_empty() => from_ids(ids_of(ids).ok_or_else(bad)?),
                _ => Err(bad()),
            })
            .collect(),
        _ => Err(bad()),
    }
}

async fn completions(
    State(c): State<Arc<Coordinator>>,
    Extension(id): Extension<RequestId>,
    body: axum::body::Bytes,
) -> Response {
    let result = async {
        let req: CompletionRequest = from_value(checked_body(&body, Kind::Completion)?)?;
        check_model(&c, req.sampling.model.as_deref())?;
        // vLLM answers echo + logprobs with the prompt's log-probabilities
        // (scoring harnesses rely on them). A masked diffusion model never
        // predicts a prompt position, so there are none to give: refused
        // rather than answered with the answer's alone.
        if req.echo && req.sampling.logprobs(Kind::Completion)?.is_some() {
            return Err(ApiError::unsupported(
                "echo",
                "echo with logprobs would need the prompt's log-probabilities, which a masked diffusion model does not compute; use echo or logprobs",
            ));
        }
        let prompts = prompts_of(&c, &req.prompt, req.echo)?;
        let suffix = req.suffix.as_deref().unwrap_or_default();
        let choices = req
            .sampling
            .choices(&c, prompts, suffix, Kind::Completion)?;
        run(c.clone(), choices, &req.sampling, Kind::Completion, id).await
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn chat_completions(
    State(c): State<Arc<Coordinator>>,
    Extension(id): Extension<RequestId>,
    body: axum::body::Bytes,
) -> Response {
    let result = async {
        let req: ChatRequest = from_value(checked_body(&body, Kind::Chat)?)?;
        check_model(&c, req.sampling.model.as_deref())?;
        let prompt = Prompt {
            ids: chat_ids(&c, &req.messages)?,
            echo: String::new(),
        };
        let choices = req.sampling.choices(&c, vec![prompt], "", Kind::Chat)?;
        run(c.clone(), choices, &req.sampling, Kind::Chat, id).await
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

impl Kind {
    fn id_prefix(self) -> &'static str {
        match self {
            Kind::Completion => "cmpl",
            Kind::Chat => "chatcmpl",
        }
    }

    fn object(self, stream: bool) -> &'static str {
        match (self, stream) {
            (Kind::Completion, _) => "text_completion",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
        }
    }

    /// A choice: `text` is the whole text (a result) or a delta (a chunk).
    fn choice(self, index: usize, text: &str, finish: Option<&str>, stream: bool) -> Value {
        match (self, stream) {
            (Kind::Completion, _) => {
                json!({"index": index, "text": text, "logprobs": null, "finish_reason": finish})
            }
            (Kind::Chat, false) => {
                json!({"index": index, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": finish})
            }
            (Kind::Chat, true) => {
                json!({"index": index, "delta": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": finish})
            }
        }
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Usage of finished choices: each prompt counted once, as OpenAI does.
fn usage<'a>(done: impl IntoIterator<Item = &'a Finished>, n: usize) -> Value {
    let (mut p, mut g, mut count) = (0, 0, 0);
    for d in done {
        if count % n.max(1) == 0 {
            p += d.prompt_length;
        }
        g += d.answer_tokens;
        count += 1;
    }
    json!({"prompt_tokens": p, "completion_tokens": g, "total_tokens": p + g})
}

/// remask's own fields of a result.
fn remask_fields(done: &Finished) -> Value {
    json!({
        "forwards": done.forwards, "steps": done.steps, "generated_ids": done.generated_ids,
        "seed": done.seed,
    })
}

/// The finished choice's entry: OpenAI's fields, SGLang's `matched_stop`,
/// and remask's own.
fn finished_choice(kind: Kind, index: usize, text: &str, done: &Finished, stream: bool) -> Value {
    let mut choice = kind.choice(index, text, Some(done.finish_reason.as_str()), stream);
    choice["matched_stop"] = json!(done.matched_stop);
    choice["remask"] = remask_fields(done);
    choice
}

/// A token's text in logprobs: the token decoded alone, special tokens
/// kept (one that holds only part of a character decodes to U+FFFD).
fn token_text(c: &Coordinator, id: u32) -> String {
    c.meta.codec.decode(&[id], false).unwrap_or_default()
}

/// A log-probability in JSON, which has no -inf: a token the sampler's
/// rules exclude gets vLLM's -9999.0.
fn json_logprob(v: f64) -> f64 {
    if v.is_finite() { v } else { -9999.0 }
}

/// The `logprobs` of a choice or chunk for `tokens`, in OpenAI's shape for
/// the endpoint: completions' legacy `{tokens, token_logprobs,
/// top_logprobs, text_offset}` (`offset`: the characters of the choice's
/// text before the first token, the echo included), chat's `{content:
/// [{token, logprob, bytes, top_logprobs}]}`.
fn logprobs_json(c: &Coordinator, kind: Kind, tokens: &[TokenLogprob], offset: usize) -> Value {
    match kind {
        Kind::Completion => {
            let mut at = offset;
            let (mut texts, mut lps, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
            for t in tokens {
                let text = token_text(c, t.token);
                offsets.push(at);
                at += text.chars().count();
                texts.push(text);
                lps.push(json_logprob(t.logprob));
                // Two tokens of one text (bytes of a character each decode
                // to U+FFFD) share a key: the more likely one keeps it.
                let mut top = Map::new();
                for &(id, l) in &t.top {
                    top.entry(token_text(c, id))
                        .or_insert(json!(json_logprob(l)));
                }
                tops.push(Value::Object(top));
            }
            json!({"tokens": texts, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
        }
        Kind::Chat => {
            // `bytes`: the token's own bytes (part of a character where the
            // token holds only part of one): they join to the answer's text.
            let entry = |id: u32, l: f64| json!({"token": token_text(c, id), "logprob": json_logprob(l), "bytes": c.meta.codec.token_bytes(id)});
            let content: Vec<Value> = tokens
                .iter()
                .map(|t| {
                    let mut e = entry(t.token, t.logprob);
                    e["top_logprobs"] =
                        Value::Array(t.top.iter().map(|&(id, l)| entry(id, l)).collect());
                    e
                })
                .collect();
            json!({"content": content, "refusal": null})
        }
    }
}

/// What a stream has sent of a choice's logprobs: a step's logprobs wait
/// until the text of their tokens is sent, so each chunk carries the
/// logprobs of the tokens whose text it carries.
#[derive(Default)]
struct StreamedLogprobs {
    pending: std::collections::VecDeque<TokenLogprob>,
    /// Tokens sent, and the bytes and characters of their texts.
    tokens: usize,
    bytes: usize,
    chars: usize,
}

impl StreamedLogprobs {
    /// The pending tokens whose texts fit in the `sent` bytes of text.
    fn ready(&mut self, c: &Coordinator, sent: usize) -> Vec<TokenLogprob> {
        let mut out = Vec::new();
        while let Some(t) = self.pending.front() {
            // Bytes, not the text decoded alone: a token that holds part
            // of a character waits for the text that completes it.
            let len = c.meta.codec.token_bytes(t.token).len();
            if self.bytes + len > sent {
                break;
            }
            self.bytes += len;
            out.push(self.pending.pop_front().expect("front"));
        }
        out
    }

    /// The chunk's `logprobs` for `tokens`, advancing the offsets.
    fn chunk(&mut self, c: &Coordinator, kind: Kind, tokens: &[TokenLogprob]) -> Value {
        let v = logprobs_json(c, kind, tokens, self.chars);
        self.tokens += tokens.len();
        self.chars += tokens
            .iter()
            .map(|t| token_text(c, t.token).chars().count())
            .sum::<usize>();
        v
    }
}

/// The request's id: `X-Request-Id` when the client sends one (checked),
/// else made up; returned in the response's `X-Request-Id` and in logs.
#[derive(Clone)]
struct RequestId(String);

async fn request_id_layer(mut request: Request, next: Next) -> Response {
    let given = request.headers().get("x-request-id").map(|v| v.as_bytes());
    let id = match crate::coordinator::request_id(given) {
        Ok(id) => id,
        Err(message) => return ApiError::bad_request(message).into_response(),
    };
    request.extensions_mut().insert(RequestId(id.clone()));
    let mut response = next.run(request).await;
    if let Ok(v) = header::HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", v);
    }
    response
}

async fn run(
    c: Arc<Coordinator>,
    choices: Vec<Choice>,
    sampling: &Sampling,
    kind: Kind,
    RequestId(request_id): RequestId,
) -> Result<Response, ApiError> {
    let stream = sampling.stream;
    let with_logprobs = sampling.logprobs(kind)?.is_some();
    let n = sampling.n.unwrap_or(1) as usize;
    let several = choices.len() > 1;
    let mut started = Vec::with_capacity(choices.len());
    for (i, choice) in choices.into_iter().enumerate() {
        let opts = RequestOptions {
            stream,
            deadline: None,
            stop: choice.stop,
            request_id: if several {
                format!("{request_id}-{i}")
            } else {
                request_id.clone()
            },
        };
        // A refusal drops the choices queued so far: they are cancelled at
        // the next step boundary.
        started.push((c.start(choice.canvas, opts)?, choice.echo));
    }
    let id = format!("{}-{request_id}", kind.id_prefix());
    let (created, model) = (now(), c.model_name());
    if !stream {
        let mut entries = Vec::with_capacity(started.len());
        let mut results = Vec::with_capacity(started.len());
        for (index, (mut events, echo)) in started.into_iter().enumerate() {
            let done = loop {
                match events.recv().await {
                    Some(event) => {
                        if let Event::Done(done) = event? {
                            break *done;
                        }
                    }
                    None => {
                        return Err(InferError::Internal(
                            "the request ended without a result".into(),
                        )
                        .into());
                    }
                }
            };
            let text = format!("{echo}{}", done.text);
            let mut entry = finished_choice(kind, index, &text, &done, false);
            if with_logprobs {
                let tokens = done.logprobs.as_deref().unwrap_or_default();
                entry["logprobs"] = logprobs_json(&c, kind, tokens, echo.chars().count());
            }
            entries.push(entry);
            results.push(done);
        }
        return Ok(Json(json!({
            "id": id, "object": kind.object(false), "created": created, "model": model,
            "choices": entries, "usage": usage(&results, n), "remask": remask_fields(&results[0]),
        }))
        .into_response());
    }

    let include_usage = sampling
        .stream_options
        .as_ref()
        .is_some_and(|o| o.include_usage);
    let object = kind.object(true);
    let chunk = move |choices: Vec<Value>, extra: Value| {
        let mut v = json!({"id": id, "object": object, "created": created, "model": model, "choices": choices});
        if let (Value::Object(o), Value::Object(e)) = (&mut v, extra) {
            o.extend(e);
        }
        SseEvent::default().data(v.to_string())
    };
    // Every choice's events on one channel, tagged with the choice; a
    // forwarder ends (dropping its choice, which cancels it) once the
    // client has gone.
    let (merged_tx, mut merged) = tokio::sync::mpsc::unbounded_channel();
    let mut echoes = Vec::with_capacity(started.len());
    for (index, (mut events, echo)) in started.into_iter().enumerate() {
        echoes.push(echo);
        let tx = merged_tx.clone();
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                if tx.send((index, event)).is_err() {
                    return;
                }
            }
        });
    }
    drop(merged_tx);
    let count = echoes.len();
    let keep_alive = c.http.sse_keep_alive;
    let events = async_stream_events(move |tx| async move {
        let mut sent = vec![String::new(); count];
        let mut streamed: Vec<StreamedLogprobs> = (0..count)
            .map(|i| StreamedLogprobs {
                chars: echoes[i].chars().count(),
                ..Default::default()
            })
            .collect();
        for (index, echo) in echoes.iter().enumerate() {
            if !echo.is_empty()
                && tx
                    .send(chunk(vec![kind.choice(index, echo, None, true)], json!({})))
                    .await
                    .is_err()
            {
                return;
            }
        }
        let mut results: Vec<Option<Finished>> = vec![None; count];
        while let Some((index, event)) = merged.recv().await {
            match event {
                Ok(Event::Step(s)) => {
                    let delta = s
                        .text
                        .strip_prefix(sent[index].as_str())
                        .unwrap_or("")
                        .to_string();
                    if !delta.is_empty() {
                        sent[index] = s.text;
                    }
                    let positions: Vec<usize> = s.committed.iter().map(|c| c.position).collect();
                    let tokens: Vec<u32> = s.committed.iter().map(|c| c.token).collect();
                    let mut remask =
                        json!({"step": s.step, "positions": positions, "tokens": tokens});
                    if several {
                        remask["index"] = json!(index);
                    }
                    let mut choice = kind.choice(index, &delta, None, true);
                    if with_logprobs {
                        let st = &mut streamed[index];
                        st.pending.extend(s.logprobs);
                        let ready = st.ready(&c, sent[index].len());
                        if !ready.is_empty() {
                            choice["logprobs"] = st.chunk(&c, kind, &ready);
                        }
                    }
                    let event = chunk(vec![choice], json!({"remask": remask}));
                    if tx.send(event).await.is_err() {
                        return;
                    }
                }
                Ok(Event::Done(done)) => {
                    let done = *done;
                    let rest = done.text.strip_prefix(sent[index].as_str()).unwrap_or("");
                    let mut extra = json!({"remask": remask_fields(&done)});
                    if !several {
                        extra["usage"] = usage([&done], n);
                    }
                    let mut choice = finished_choice(kind, index, rest, &done, true);
                    if with_logprobs {
                        // The result's logprobs are the authority: whatever
                        // the steps have not sent yet.
                        let st = &mut streamed[index];
                        let all = done.logprobs.as_deref().unwrap_or_default();
                        let rest = all[st.tokens.min(all.len())..].to_vec();
                        choice["logprobs"] = st.chunk(&c, kind, &rest);
                    }
                    let event = chunk(vec![choice], extra);
                    results[index] = Some(done);
                    if tx.send(event).await.is_err() {
                        return;
                    }
                    if results.iter().all(Option::is_some) {
                        if several && include_usage {
                            let usage = usage(results.iter().flatten(), n);
                            let _ = tx.send(chunk(Vec::new(), json!({"usage": usage}))).await;
                        }
                        let _ = tx.send(SseEvent::default().data("[DONE]")).await;
                        return;
                    }
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
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(keep_alive))
        .into_response())
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
