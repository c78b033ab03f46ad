//! `remask generate --endpoint URL`: the same request through a coordinator's
//! gRPC API, printing the same JSON as the in-process path.

use crate::generate::GenerateArgs;
use crate::{CliError, CliResult};
use remask_cluster::convert::{cache_to_pb, remasking_to_pb};
use remask_proto::v1 as pb;
use remask_proto::v1::generation_client::GenerationClient;
use std::time::Instant;
use tonic::Code;

fn status_error(s: tonic::Status) -> CliError {
    match s.code() {
        Code::InvalidArgument | Code::ResourceExhausted | Code::Unauthenticated => {
            CliError::Usage(format!("invalid request: {}", s.message()))
        }
        _ => CliError::Internal(anyhow::anyhow!("{}: {}", s.code(), s.message())),
    }
}

/// The request, with the API key as `authorization` metadata when given.
fn with_key<T>(key: Option<&str>, message: T) -> CliResult<tonic::Request<T>> {
    let mut r = tonic::Request::new(message);
    if let Some(key) = key {
        let value = format!("Bearer {key}").parse().map_err(|_| {
            CliError::Usage("--api-key has characters a header cannot carry".into())
        })?;
        r.metadata_mut().insert("authorization", value);
    }
    Ok(r)
}

pub fn run(endpoint: &str, args: &GenerateArgs) -> CliResult {
    let request = pb::GenerateRequest {
        prompt: args.prompt.clone().unwrap_or_default(),
        chat: args.chat,
        prompt_ids: args.prompt_ids.clone().unwrap_or_default(),
        gen_length: args
            .gen_length
            .map(|n| {
                u32::try_from(n).map_err(|_| CliError::Usage("--gen-length is too large".into()))
            })
            .transpose()?,
        steps: args
            .steps
            .map(|s| u32::try_from(s).map_err(|_| CliError::Usage("--steps is too large".into())))
            .transpose()?,
        block_length: args
            .block_length
            .map(|n| {
                u32::try_from(n).map_err(|_| CliError::Usage("--block-length is too large".into()))
            })
            .transpose()?,
        remasking: remasking_to_pb(args.remasking) as i32,
        temperature: args.temperature,
        cfg_scale: args.cfg_scale,
        seed: Some(args.seed),
        logits_eos_inf: args.logits_eos_inf,
        confidence_eos_eot_inf: args.confidence_eos_eot_inf,
        suffix: args.suffix.clone().unwrap_or_default(),
        threshold: args.rule.threshold,
        factor: args.rule.factor,
        entropy: args.rule.entropy,
        full_canvas: args.rule.no_early_stop,
        cache: cache_to_pb(args.rule.cache) as i32,
        stop: crate::generate::stop_strings(args).map(|_| args.stop.clone())?,
        logprobs: args.top_logprobs.is_some(),
        top_logprobs: args.top_logprobs.map(u32::from),
        top_k: args.top_k,
        top_p: args.top_p,
    };
    let url = if endpoint.contains("://") {
        endpoint.to_string()
    } else {
        format!("http://{endpoint}")
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Internal(e.into()))?;
    rt.block_on(async {
        let mut endpoint = tonic::transport::Endpoint::from_shared(url.clone())
            .map_err(|e| CliError::Usage(format!("bad --endpoint {url}: {e}")))?;
        let tls = remask_cluster::tls::TlsFiles {
            ca: args.tls_ca.clone(),
            ..Default::default()
        };
        if let Some(config) = tls.client().map_err(|e| CliError::Usage(e.to_string()))? {
            endpoint = endpoint
                .tls_config(config)
                .map_err(|e| CliError::Usage(format!("TLS: {e}")))?;
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| CliError::Usage(format!("cannot connect to {url}: {e}")))?;
        let mut client = GenerationClient::new(channel).max_decoding_message_size(64 << 20);
        let info = client
            .model_info(with_key(args.api_key.as_deref(), pb::ModelInfoRequest {})?)
            .await
            .map_err(status_error)?
            .into_inner();
        let start = Instant::now();
        let done = client
            .generate(with_key(args.api_key.as_deref(), request)?)
            .await
            .map_err(status_error)?
            .into_inner();
        let wall_ms = start.elapsed().as_secs_f64() * 1e3;
        let prompt_ids = &done.token_ids[..done.prompt_length as usize];
        let settings = done.settings.clone().unwrap_or_default();
        if args.json {
            let out = serde_json::json!({
                "token_ids": done.token_ids,
                "prompt_ids": prompt_ids,
                "generated_ids": done.generated_ids,
                "text": done.text,
                "steps": done.steps,
                "forwards": done.forwards,
                "finish_reason": match done.finish_reason() {
                    pb::FinishReason::Stop => "stop",
                    pb::FinishReason::Length => "length",
                    pb::FinishReason::Unspecified => "unspecified",
                },
                "matched_stop": done.matched_stop,
                "completion_tokens": done.completion_tokens,
                "gen_length": settings.gen_length,
                "block_length": settings.block_length,
                "rule": settings.rule,
                "top_k": settings.top_k,
                "top_p": settings.top_p,
                "cache": match settings.cache() {
                    pb::CacheMode::Prefix => "prefix",
                    pb::CacheMode::Dual => "dual",
                    _ => "none",
                },
                "elapsed_ms": done.elapsed_ms,
                "queue_ms": done.queue_ms,
                "forward_ms": done.forward_ms,
                "compute_ms": done.compute_ms,
                "wall_ms": wall_ms,
                "model": info.model,
                "endpoint": url,
                "random_weights": info.random_weights,
                "logprobs": args.top_logprobs.map(|_| crate::generate::logprobs_json(
                    done.logprobs.iter().map(|t| (
                        t.token_id,
                        t.logprob,
                        t.top_logprobs.iter().map(|a| (a.token_id, a.logprob)).collect(),
                    ))
                )),
            });
            println!("{out}");
        } else {
            if info.random_weights {
                eprintln!(
                    "remask: note: {} has random weights: the text is noise",
                    info.model
                );
            }
            println!("{}", done.text);
        }
        Ok(())
    })
}
