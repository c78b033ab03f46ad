//! `remask generate`: one request, in process.

use crate::default_model::{self, is_random};
use crate::display::{LiveCanvas, render};
use crate::{CliError, CliResult, Globals};
use remask_cluster::stop::StopStrings;
use remask_engine::Engine;
use remask_model::{Checkpoint, Message, TextCodec};
use remask_sampler::{
    CacheMode, Canvas, CommitRule, Prediction, Remasking, Settings, StepPlan, denoise,
};
use std::path::PathBuf;
use std::time::Instant;

/// `--json`'s `logprobs`: per answer token `{token_id, logprob,
/// top_logprobs: [[id, logprob], ...]}` (in process and through a
/// coordinator alike).
pub fn logprobs_json(
    tokens: impl Iterator<Item = (u32, f64, Vec<(u32, f64)>)>,
) -> serde_json::Value {
    tokens
        .map(
            |(id, lp, top)| serde_json::json!({"token_id": id, "logprob": lp, "top_logprobs": top}),
        )
        .collect()
}

/// One denoising step's predictions for one canvas.
type StepFn = dyn Fn(&Canvas, &StepPlan) -> Result<Vec<Prediction>, remask_engine::KvError>;

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// Checkpoint directory in the Hugging Face layout, or a Hub model ORG/NAME[@REVISION] (from the HF cache, downloaded when missing unless HF_HUB_OFFLINE=1; default: the embedded default model).
    #[arg(long, env = "REMASK_MODEL", conflicts_with = "endpoint")]
    pub model: Option<PathBuf>,
    /// Send the request to a coordinator (host:port or URL) instead of running in process.
    #[arg(long, env = "REMASK_ENDPOINT")]
    pub endpoint: Option<String>,
    /// API key for --endpoint (sent as `authorization: Bearer <key>`).
    #[arg(
        long,
        env = "REMASK_API_KEY",
        requires = "endpoint",
        hide_env_values = true
    )]
    pub api_key: Option<String>,
    /// CA (PEM) to verify an https:// --endpoint with.
    #[arg(long, env = "REMASK_TLS_CA", requires = "endpoint")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// Prompt text.
    #[arg(
        long,
        env = "REMASK_PROMPT",
        required_unless_present = "prompt_ids",
        conflicts_with = "prompt_ids"
    )]
    pub prompt: Option<String>,
    /// Wrap the prompt in the checkpoint's chat template as a user turn.
    #[arg(
        long,
        env = "REMASK_CHAT",
        requires = "prompt",
        conflicts_with = "prompt_ids"
    )]
    pub chat: bool,
    /// With --chat: let the prompt hold the tokenizer's special tokens as
    /// text (they become real control tokens); refused otherwise.
    #[arg(long, env = "REMASK_ALLOW_SPECIAL_TOKENS_IN_CHAT", requires = "chat")]
    pub allow_special_tokens_in_chat: bool,
    /// Infilling: fixed text after the generated span; the generation fills the
    /// gap between the prompt and it (e.g. the first half of a sentence from
    /// its second half, with an empty prompt).
    #[arg(long, env = "REMASK_SUFFIX")]
    pub suffix: Option<String>,
    /// Prompt as token ids, comma-separated.
    #[arg(long, env = "REMASK_PROMPT_IDS", value_delimiter = ',')]
    pub prompt_ids: Option<Vec<u32>>,
    // Every setting left unset takes the checkpoint's generation_config.json
    // where it says, else remask's defaults: the same as gRPC and HTTP
    // requests that leave it unset (with --endpoint: the server's).
    /// Tokens to generate (default 128, or generation_config.json's
    /// max_new_tokens).
    #[arg(long, env = "REMASK_GEN_LENGTH")]
    pub gen_length: Option<usize>,
    /// Denoising steps in total (over all blocks) of the fixed schedule
    /// (default: one per token); the adaptive rules (--threshold, --factor,
    /// --entropy) need none.
    #[arg(long, env = "REMASK_STEPS")]
    pub steps: Option<usize>,
    /// Semi-autoregressive block length (default 32 when that divides
    /// gen_length, else gen_length: one block).
    #[arg(long, env = "REMASK_BLOCK_LENGTH")]
    pub block_length: Option<usize>,
    /// How committed positions are chosen: low_confidence (default) or
    /// random.
    #[arg(long, env = "REMASK_REMASKING")]
    pub remasking: Option<Remasking>,
    #[command(flatten)]
    pub rule: RuleArgs,
    /// 0 for greedy (default); above 0, Gumbel-max sampling at this
    /// temperature.
    #[arg(long, env = "REMASK_TEMPERATURE", allow_negative_numbers = true)]
    pub temperature: Option<f64>,
    /// With --temperature > 0: draw only among the K most likely tokens
    /// (ties with the K-th kept; 0: off). Default: the checkpoint's
    /// generation_config.json, else off.
    #[arg(long, env = "REMASK_TOP_K")]
    pub top_k: Option<u32>,
    /// With --temperature > 0: draw only among the fewest most likely
    /// tokens holding this much of the tempered probability, in (0, 1]
    /// (after --top-k; 1: off). Default: generation_config.json, else off.
    #[arg(long, env = "REMASK_TOP_P", allow_negative_numbers = true)]
    pub top_p: Option<f64>,
    /// Classifier-free guidance scale (0: off).
    #[arg(
        long,
        env = "REMASK_CFG_SCALE",
        default_value_t = 0.0,
        allow_negative_numbers = true
    )]
    pub cfg_scale: f64,
    /// Seed of temperature sampling and random remasking (default 0, also
    /// with --endpoint; a server draws a fresh one only for requests that
    /// name none, as HTTP and gRPC clients may).
    #[arg(long, env = "REMASK_SEED", default_value_t = 0)]
    pub seed: u64,
    /// Never predict EOS (its logit is set to -inf).
    #[arg(long, env = "REMASK_LOGITS_EOS_INF")]
    pub logits_eos_inf: bool,
    /// Commit EOS and end-of-turn predictions last.
    #[arg(long, env = "REMASK_CONFIDENCE_EOS_EOT_INF")]
    pub confidence_eos_eot_inf: bool,
    /// With --json: each answer token's log-probability at the step that
    /// committed it and this many most likely alternatives there (0 to 5),
    /// as `logprobs` (the gRPC and HTTP `top_logprobs`).
    #[arg(long, env = "REMASK_TOP_LOGPROBS", value_parser = clap::value_parser!(u8).range(0..=5))]
    pub top_logprobs: Option<u8>,
    #[command(flatten)]
    pub device: crate::device::DeviceArgs,
    /// Split the model over this many tensor-parallel ranks (threads on the
    /// CPU). With --backend cuda the ranks are GPUs: 0 to N-1, or those of --devices
    /// (then 1 or their number).
    #[arg(
        long,
        env = "REMASK_TENSOR_PARALLEL",
        default_value_t = 1,
        conflicts_with = "endpoint"
    )]
    pub tensor_parallel: usize,
    /// End the answer before the first of these strings in its text (up to
    /// 4; repeat the flag): the generation finishes as soon as that text is
    /// final, as a server's `stop`.
    #[arg(long, env = "REMASK_STOP")]
    pub stop: Vec<String>,
    /// Print one JSON object instead of text.
    #[arg(long, env = "REMASK_JSON")]
    pub json: bool,
}

/// The commit rule: LLaDA's fixed schedule unless one of these is given.
#[derive(clap::Args, Clone, Copy, Debug, Default)]
pub struct RuleArgs {
    /// Commit every candidate with confidence >= T, and always the most
    /// confident (Fast-dLLM's threshold rule), 0 < T <= 1; a block runs
    /// until it is complete.
    #[arg(
        long,
        env = "REMASK_THRESHOLD",
        group = "commit_rule",
        allow_negative_numbers = true
    )]
    pub threshold: Option<f64>,
    /// Commit the n-th most confident (n >= 2) while c_n >= 1 - F/(n+1)
    /// (Fast-dLLM's factor rule), F > 0.
    #[arg(
        long,
        env = "REMASK_FACTOR",
        group = "commit_rule",
        allow_negative_numbers = true
    )]
    pub factor: Option<f64>,
    /// Commit the lowest-entropy candidates while the sum of their
    /// entropies but the largest stays <= G (EB-sampler), G >= 0.
    #[arg(
        long,
        env = "REMASK_ENTROPY",
        group = "commit_rule",
        allow_negative_numbers = true
    )]
    pub entropy: Option<f64>,
    /// Run every step as the reference does and return the whole canvas,
    /// instead of finishing once the answer is final.
    #[arg(long, env = "REMASK_NO_EARLY_STOP")]
    pub no_early_stop: bool,
    /// Reuse keys and values across the steps of a block (Fast-dLLM's
    /// caches, an approximation of the reference): `none` (every step a
    /// full forward), `prefix` (later steps feed the block and what follows
    /// it) or `dual` (later steps feed only the block). Default: none
    /// (with --endpoint: the server's default).
    #[arg(long, env = "REMASK_CACHE")]
    pub cache: Option<CacheMode>,
}

/// `--stop`, checked as a server checks `stop`.
pub fn stop_strings(args: &GenerateArgs) -> CliResult<StopStrings> {
    if !args.stop.is_empty() && args.rule.no_early_stop {
        return Err(CliError::Usage(
            "--stop ends the answer early: it cannot be combined with --no-early-stop".into(),
        ));
    }
    StopStrings::new(args.stop.clone()).map_err(|e| CliError::Usage(format!("--stop: {e}")))
}

impl RuleArgs {
    pub fn rule(&self) -> CliResult<CommitRule> {
        let rule = CommitRule::from_parameters(self.threshold, self.factor, self.entropy)
            .map_err(|e| CliError::Usage(e.to_string()))?;
        Ok(rule)
    }

    /// The rule the flags name, `None` when they name none (the default
    /// applies).
    pub fn given_rule(&self) -> CliResult<Option<CommitRule>> {
        Ok(Some(self.rule()?).filter(|r| *r != CommitRule::Fixed))
    }
}

#[tracing::instrument(skip_all, fields(gen_length = ?args.gen_length))]
pub fn run(args: GenerateArgs, globals: &Globals) -> CliResult {
    if let Some(endpoint) = &args.endpoint {
        return crate::remote::run(endpoint, &args);
    }
    // Flag mistakes first, before the model is read.
    args.device.gpus(args.tensor_parallel)?;
    let dir = default_model::resolve(args.model.clone(), globals)?;
    let ckpt = Checkpoint::open(&dir)?;
    let codec =
        TextCodec::load(&dir)?.allow_special_tokens_in_chat(args.allow_special_tokens_in_chat);
    let special = codec.special_tokens(&ckpt.config)?;
    let random = is_random(&ckpt.config);

    let prompt = match (&args.prompt, &args.prompt_ids) {
        // An infill may have nothing before the gap (the BOS alone).
        (Some(text), _) if text.trim().is_empty() && args.suffix.is_none() => {
            return Err(CliError::Usage(
                "the prompt is empty: give some text".into(),
            ));
        }
        (Some(text), _) if args.chat => codec.encode_chat(&[Message {
            role: "user".into(),
            content: text.clone(),
        }])?,
        (Some(text), _) => codec.encode(text)?,
        (None, Some(ids)) => ids.clone(),
        (None, None) => unreachable!("clap requires one of them"),
    };
    let suffix = match &args.suffix {
        Some(text) => codec.encode_continuation(text)?,
        None => Vec::new(),
    };
    let config = crate::defaults::load(&dir, None, None)?.resolve(&Settings {
        gen_length: args.gen_length,
        steps: args.steps,
        block_length: args.block_length,
        remasking: args.remasking,
        rule: args.rule.given_rule()?,
        temperature: args.temperature,
        cfg_scale: args.cfg_scale,
        seed: args.seed,
        early_stop: !args.rule.no_early_stop,
        logits_eos_inf: args.logits_eos_inf,
        confidence_eos_eot_inf: args.confidence_eos_eot_inf,
        cache: args.rule.cache,
        logprobs: args.top_logprobs.map(usize::from),
        top_k: args.top_k,
        top_p: args.top_p,
    });
    let space = remask_engine::token_space(&ckpt.config, &special);
    // Check the request before the (possibly slow) weight load.
    let mut canvas = Canvas::infill(&prompt, &suffix, config, space)?;
    let stop = stop_strings(&args)?;
    if random && !args.json {
        eprintln!(
            "remask: note: {} has random weights: the text is noise",
            dir.display()
        );
    }

    let t_load = Instant::now();
    // One rank, or a tensor-parallel group of thread ranks or GPUs: same
    // predictions.
    let engine: Box<StepFn> = if args.device.is_cuda()? {
        #[cfg(feature = "cuda")]
        {
            // The head is reduced on the GPUs: only partials come back.
            let gpus = args.device.cuda_engine(&ckpt, args.tensor_parallel)?;
            Box::new(move |c, p| Ok(gpus.predict(&[(0, c, p)])?.remove(0)))
        }
        #[cfg(not(feature = "cuda"))]
        unreachable!("is_cuda() is false without the feature")
    } else {
        let cpu = Engine::load(&ckpt, args.tensor_parallel)?;
        Box::new(move |c, p| Ok(cpu.predict(&[(0, c, p)])?.remove(0)))
    };
    let load_ms = t_load.elapsed().as_secs_f64() * 1e3;

    let mut live = if args.json { None } else { LiveCanvas::new() };
    let decode = |ids: &[u32]| codec.decode(ids, true).unwrap_or_default();
    let (mut matched, mut checked) = (None, 0);
    let t_gen = Instant::now();
    denoise(
        &mut canvas,
        |c, p| engine(c, p),
        |c, _| {
            if matched.is_none() {
                matched = stop.check(&codec, c, &mut checked);
            }
            if let Some(live) = live.as_mut() {
                live.draw(&render(c.generated(), special.mask, decode));
            }
        },
    )
    .map_err(|e| CliError::Internal(e.into()))?;
    let elapsed_ms = t_gen.elapsed().as_secs_f64() * 1e3;
    if let Some(live) = live {
        live.finish();
    }

    // The text stops at the first EOS / end of turn (or before the stop
    // string); the ids are all there.
    let (text, completion_tokens, finish_reason) = match &matched {
        Some(m) => (m.text.clone(), m.tokens, "stop"),
        None => (
            codec.decode(canvas.answer(), true)?,
            canvas.answer().len(),
            canvas.finish_reason().as_str(),
        ),
    };
    if args.json {
        let out = serde_json::json!({
            "token_ids": canvas.tokens(),
            "prompt_ids": prompt,
            "generated_ids": canvas.generated(),
            "suffix_ids": canvas.suffix(),
            "text": text,
            "steps": canvas.step(),
            "forwards": canvas.forwards(),
            "committed": canvas.committed(),
            "completion_tokens": completion_tokens,
            "finish_reason": finish_reason,
            "matched_stop": matched.as_ref().map(|m| m.matched.as_str()),
            "rule": config.rule.to_string(),
            "cache": config.cache.as_str(),
            "gen_length": config.gen_length,
            "block_length": config.block_length,
            "top_k": config.truncate.top_k,
            "top_p": config.truncate.top_p,
            "elapsed_ms": elapsed_ms,
            "load_ms": load_ms,
            "model": dir,
            "random_weights": random,
            "logprobs": canvas.logprobs(0..canvas.answer().len()).map(|l| logprobs_json(
                l.iter().map(|t| (t.token, t.logprob, t.top.clone()))
            )),
        });
        println!("{out}");
    } else {
        println!("{text}");
    }
    Ok(())
}
