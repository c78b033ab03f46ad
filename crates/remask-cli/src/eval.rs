//! `remask eval`: how good a checkpoint is, measured on held-out data.
//!
//! Four measurements, each a markdown section on stdout and a key of the
//! `--json` file; all deterministic (fixed seeds, and temperature 0 with
//! low-confidence remasking unless the flags say otherwise):
//!
//! - `masked`: LLaDA's pre-training task on held-out prose. Hide a fraction of
//!   the tokens of a window and predict all of them in one forward pass; the
//!   argmax accuracy and the cross-entropy of the hidden tokens.
//! - `sft`: the held-out question/answer pairs of the SFT data (definitions,
//!   example sentences), answered with the sampler and scored with SQuAD's
//!   exact match and token F1.
//! - `sweep`: quality against speed on the definition questions, the trade
//!   the LLaDA paper discusses: commit k tokens per step, with and without
//!   semi-autoregressive blocks, and the adaptive commit rules (threshold,
//!   factor, entropy) at several settings, each against the one-token-per-step
//!   answers (token agreement).
//! - `infill`: fill the first half of a held-out sentence given its second
//!   half (only a bidirectional model can), next to the usual direction,
//!   continuing a sentence from its first half.
//!
//! The data are the `*_valid` files of `training/data/prepare.py`.

use crate::default_model::{self, is_random};
use crate::generate::RuleArgs;
use crate::{CliError, CliResult, Globals};
use remask_engine::{Backend, Engine, Packing, Shard, StepBatch, StepRequest, cache_ids};
use remask_model::{Checkpoint, Message, TextCodec};
use remask_sampler::{
    BatchStep, CacheMode, Canvas, CommitRule, InvalidRequest, Remasking, SamplerConfig, TokenSpace,
};
use serde_json::{Value, json};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

const PROSE_FILE: &str = "pretrain_valid.txt";
const PAIRS_FILE: &str = "sft_valid.jsonl";
/// The mask ratios of the masked-token task: light, half, and nearly all
/// (close to generating from scratch).
const RATIOS: [f64; 3] = [0.15, 0.5, 0.9];
/// Tokens committed per step in the sweep.
const SWEEP_K: [usize; 4] = [1, 2, 4, 8];
/// The semi-autoregressive block length of the sweep.
const SWEEP_BLOCK: usize = 8;
/// The adaptive rules of the sweep, at settings from cautious to eager.
const SWEEP_RULES: [CommitRule; 9] = [
    CommitRule::Threshold(0.9),
    CommitRule::Threshold(0.7),
    CommitRule::Threshold(0.5),
    CommitRule::Factor(0.5),
    CommitRule::Factor(1.0),
    CommitRule::Factor(2.0),
    CommitRule::Entropy(0.1),
    CommitRule::Entropy(0.5),
    CommitRule::Entropy(2.0),
];
/// The sweep's rows with a K/V cache (blocks of `SWEEP_BLOCK`, one token per
/// step under the fixed rule).
const SWEEP_CACHED: [(CommitRule, CacheMode); 6] = [
    (CommitRule::Fixed, CacheMode::Prefix),
    (CommitRule::Fixed, CacheMode::Dual),
    (CommitRule::Threshold(0.5), CacheMode::Dual),
    (CommitRule::Factor(1.0), CacheMode::Dual),
    (CommitRule::Factor(2.0), CacheMode::Prefix),
    (CommitRule::Factor(2.0), CacheMode::Dual),
];
/// Words of the sentences of the infill task.
const INFILL_WORDS: std::ops::RangeInclusive<usize> = 10..=30;
/// Examples printed per table.
const EXAMPLES: usize = 5;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Section {
    Masked,
    Sft,
    Sweep,
    Infill,
}

#[derive(clap::Args)]
pub struct EvalArgs {
    /// Checkpoint directory, or a Hugging Face Hub model ORG/NAME[@REVISION] (default: the embedded default model).
    #[arg(long, env = "REMASK_MODEL")]
    pub model: Option<PathBuf>,
    /// Directory of the held-out data: pretrain_valid.txt and sft_valid.jsonl,
    /// as written by training/data/prepare.py.
    #[arg(long, env = "REMASK_DATA", default_value = "training/data/out")]
    pub data: PathBuf,
    /// Also write every number and the examples to this JSON file.
    #[arg(long = "json", env = "REMASK_JSON_FILE")]
    pub json: Option<PathBuf>,
    /// Which measurements to run, comma-separated.
    #[arg(
        long,
        env = "REMASK_SECTIONS",
        value_delimiter = ',',
        default_value = "masked,sft,sweep,infill"
    )]
    pub sections: Vec<Section>,
    /// Tokens per window of the masked-token task (capped at the model's
    /// max_sequence_length).
    #[arg(long, env = "REMASK_WINDOW", default_value_t = 128)]
    pub window: usize,
    /// Windows of the masked-token task, at most.
    #[arg(long, env = "REMASK_LIMIT_WINDOWS", default_value_t = 200)]
    pub limit_windows: usize,
    /// Question/answer pairs per kind (define, example), at most.
    #[arg(long, env = "REMASK_LIMIT_PAIRS", default_value_t = 200)]
    pub limit_pairs: usize,
    /// Definition questions of the sweep, at most (default: --limit-pairs).
    #[arg(long, env = "REMASK_LIMIT_SWEEP")]
    pub limit_sweep: Option<usize>,
    /// Sentences of the infill task, at most.
    #[arg(long, env = "REMASK_LIMIT_INFILL", default_value_t = 50)]
    pub limit_infill: usize,
    /// Tokens generated per answer.
    #[arg(long, env = "REMASK_ANSWER_LENGTH", default_value_t = 32)]
    pub answer_length: usize,
    /// Semi-autoregressive block length of the question/answer task (one token
    /// per step).
    ///
    /// Blocks, because SFT pads answers with EOS, which the model then
    /// predicts confidently at the far end of an answer: without blocks
    /// low-confidence remasking fills the tail with EOS first (the LLaDA paper
    /// samples its instruct model semi-autoregressively for this reason).
    #[arg(long, env = "REMASK_BLOCK_LENGTH", default_value_t = 8)]
    pub block_length: usize,
    /// Canvases (or windows) per forward pass.
    #[arg(long, env = "REMASK_BATCH", default_value_t = 16)]
    pub batch: usize,
    /// Seed of the hidden positions (and of the sampler's random draws, if any).
    #[arg(long, env = "REMASK_SEED", default_value_t = 0)]
    pub seed: u64,
    /// How committed positions are chosen: low_confidence or random.
    #[arg(long, env = "REMASK_REMASKING", default_value = "low_confidence")]
    pub remasking: Remasking,
    /// 0 for greedy; above 0, Gumbel-max sampling at this temperature.
    #[arg(
        long,
        env = "REMASK_TEMPERATURE",
        default_value_t = 0.0,
        allow_negative_numbers = true
    )]
    pub temperature: f64,
    /// The commit rule of the sft and infill sections (the sweep runs every
    /// rule); and --no-early-stop.
    #[command(flatten)]
    pub rule: RuleArgs,
    #[command(flatten)]
    pub device: crate::device::DeviceArgs,
}

/// Everything the measurements share besides the weights.
struct Setup {
    args: EvalArgs,
    dir: PathBuf,
    codec: TextCodec,
    space: TokenSpace,
    /// The prompt of text that starts a document: BOS.
    bos_prompt: Vec<u32>,
    embedding_size: usize,
    window: usize,
    prose: Vec<String>,
    pairs: Vec<Pair>,
}

#[derive(serde::Deserialize)]
struct Pair {
    prompt: String,
    response: String,
    kind: String,
}

pub fn run(mut args: EvalArgs, globals: &Globals) -> CliResult {
    if args.window == 0 {
        return Err(CliError::Usage("--window must be at least 1".into()));
    }
    if args.answer_length == 0 || args.batch == 0 || args.block_length == 0 {
        return Err(CliError::Usage(
            "--answer-length, --batch and --block-length must be at least 1".into(),
        ));
    }
    if !args.answer_length.is_multiple_of(args.block_length) {
        return Err(CliError::Usage(format!(
            "--answer-length {} is not a multiple of --block-length {}",
            args.answer_length, args.block_length
        )));
    }
    let mut seen = Vec::new();
    args.sections.retain(|s| {
        let first = !seen.contains(s);
        seen.push(*s);
        first
    });
    let wants = |s: Section| args.sections.contains(&s);
    // The cheap checks first: a missing data file says so before the weights load.
    let prose = if wants(Section::Masked) || wants(Section::Infill) {
        read_prose(&args.data.join(PROSE_FILE))?
    } else {
        Vec::new()
    };
    let pairs = if wants(Section::Sft) || wants(Section::Sweep) {
        read_pairs(&args.data.join(PAIRS_FILE))?
    } else {
        Vec::new()
    };

    let dir = default_model::resolve(args.model.clone(), globals)?;
    let ckpt = Checkpoint::open(&dir)?;
    let codec = TextCodec::load(&dir)?;
    let special = codec.special_tokens(&ckpt.config)?;
    let space = remask_engine::token_space(&ckpt.config, &special);
    let window = args.window.min(space.max_sequence_length);
    if window < args.window {
        eprintln!(
            "eval: --window {} is over the model's max_sequence_length: using {window}",
            args.window
        );
    }
    // Whatever the tokenizer puts before plain text (BOS); without one, EOS,
    // which is what precedes a document in the training stream.
    let mut bos_prompt = codec.encode("")?;
    if bos_prompt.is_empty() {
        bos_prompt = vec![special.bos.unwrap_or(special.eos)];
    }
    // Reject bad sampler flags now rather than after the first section.
    Canvas::new(
        &bos_prompt,
        answer_config(&args, args.block_length, 1, args.rule.rule()?),
        space,
    )?;
    let random = is_random(&ckpt.config);
    if random {
        eprintln!(
            "remask: note: {} has random weights: expect scores near 0",
            dir.display()
        );
    }
    let setup = Setup {
        dir,
        codec,
        space,
        bos_prompt,
        embedding_size: ckpt.config.embedding_size(),
        window,
        prose,
        pairs,
        args,
    };

    if setup.args.device.is_cuda()? {
        #[cfg(feature = "cuda")]
        {
            let gpu = setup.args.device.cuda("eval")?;
            let engine = Engine::from_backends(vec![gpu], &ckpt, Shard::full(&ckpt.config))?;
            return evaluate(&setup, &engine, random);
        }
    }
    let engine = Engine::load_shard(&ckpt, Shard::full(&ckpt.config), 1)?;
    evaluate(&setup, &engine, random)
}

/// The sampler settings for answers of `--answer-length` tokens: `k` tokens
/// per step under the fixed rule, or an adaptive rule.
fn answer_config(
    args: &EvalArgs,
    block_length: usize,
    k: usize,
    rule: CommitRule,
) -> SamplerConfig {
    SamplerConfig {
        gen_length: args.answer_length,
        steps: if rule.is_adaptive() {
            0
        } else {
            args.answer_length / k
        },
        block_length,
        rule,
        early_stop: !args.rule.no_early_stop,
        remasking: args.remasking,
        temperature: args.temperature,
        cfg_scale: 0.0,
        seed: args.seed,
        logits_eos_inf: false,
        confidence_eos_eot_inf: false,
        cache: args.rule.cache.unwrap_or_default(),
        logprobs: None,
        truncate: Default::default(),
    }
}

fn missing_data(path: &Path) -> CliError {
    CliError::Usage(format!(
        "{} not found: --data must name the held-out data of training/data/prepare.py \
         (make it with `training/data/fetch.sh && python3 training/data/prepare.py`)",
        path.display()
    ))
}

fn read_text(path: &Path) -> CliResult<String> {
    if !path.is_file() {
        return Err(missing_data(path));
    }
    std::fs::read_to_string(path)
        .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", path.display())))
}

/// One paragraph per non-empty line.
fn read_prose(path: &Path) -> CliResult<Vec<String>> {
    Ok(read_text(path)?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(String::from)
        .collect())
}

fn read_pairs(path: &Path) -> CliResult<Vec<Pair>> {
    read_text(path)?
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| CliError::Usage(format!("{} line {}: {e}", path.display(), i + 1)))
        })
        .collect()
}

/// The loaded model and how to drive it.
struct Runner<'a, B: Backend> {
    engine: &'a Engine<B>,
    batch: usize,
}

impl<B: Backend> Runner<'_, B> {
    /// Runs every canvas to completion, `batch` canvases per forward pass
    /// (`BatchStep`, as the scheduler steps); batching does not change the
    /// result (each sequence attends only to itself). Finished canvases
    /// leave their chunk's batch at once.
    /// A canvas's K/V stores are named by its place in the chunk.
    fn complete(&self, canvases: &mut [Canvas], what: &str) -> CliResult {
        let total = canvases.len();
        let mut done = 0;
        for chunk in canvases.chunks_mut(self.batch) {
            loop {
                let mut running: Vec<(u64, &mut Canvas)> = chunk
                    .iter_mut()
                    .enumerate()
                    .filter(|(_, c)| !c.is_done())
                    .map(|(i, c)| (i as u64, c))
                    .collect();
                if running.is_empty() {
                    break;
                }
                let step = BatchStep::new(running.iter().map(|(_, c)| &**c));
                let active = step.active();
                let predictions = if active.is_empty() {
                    Vec::new()
                } else {
                    let requests: Vec<StepRequest> = active
                        .iter()
                        .map(|&i| (running[i].0, &*running[i].1, &step.plans()[i]))
                        .collect();
                    self.engine
                        .run(&StepBatch::new(&requests))
                        .map_err(|e| CliError::Internal(e.into()))?
                };
                step.commit(running.iter_mut().map(|(_, c)| &mut **c), predictions);
            }
            let ids: Vec<u64> = (0..chunk.len() as u64).flat_map(cache_ids).collect();
            self.engine.release(&ids);
            done += chunk.len();
            eprintln!("eval: {what}: {done}/{total}");
        }
        Ok(())
    }
}

fn evaluate<B: Backend>(setup: &Setup, engine: &Engine<B>, random: bool) -> CliResult {
    let runner = Runner {
        engine,
        batch: setup.args.batch,
    };
    let args = &setup.args;
    let mut md = String::new();
    let _ = writeln!(md, "# remask eval: {}\n", setup.dir.display());
    let _ = writeln!(
        md,
        "Data: `{}`. Sampler: temperature {}, {} remasking, seed {}; {} canvases per forward pass; {} threads.{}\n",
        args.data.display(),
        args.temperature,
        args.remasking,
        args.seed,
        args.batch,
        rayon::current_num_threads(),
        if random {
            " The checkpoint has random weights."
        } else {
            ""
        }
    );
    let mut out = serde_json::Map::new();
    out.insert("model".into(), json!(setup.dir));
    out.insert("random_weights".into(), json!(random));
    out.insert(
        "settings".into(),
        json!({
            "data": args.data,
            "window": setup.window,
            "limit_windows": args.limit_windows,
            "limit_pairs": args.limit_pairs,
            "limit_sweep": args.limit_sweep.unwrap_or(args.limit_pairs),
            "limit_infill": args.limit_infill,
            "answer_length": args.answer_length,
            "block_length": args.block_length,
            "batch": args.batch,
            "seed": args.seed,
            "temperature": args.temperature,
            "remasking": args.remasking.to_string(),
            "backend": args.device.backend,
            "threads": rayon::current_num_threads(),
            "max_sequence_length": setup.space.max_sequence_length,
        }),
    );
    let mut define_cache = None;
    for &section in &args.sections {
        let t = Instant::now();
        let mut value = match section {
            Section::Masked => masked(setup, &runner, &mut md)?,
            Section::Sft => sft(setup, &runner, &mut md, &mut define_cache)?,
            Section::Sweep => sweep(setup, &runner, &mut md, &mut define_cache)?,
            Section::Infill => infill(setup, &runner, &mut md)?,
        };
        let wall_s = t.elapsed().as_secs_f64();
        let _ = writeln!(md, "_Section wall time: {wall_s:.1} s._\n");
        value["wall_s"] = json!(wall_s);
        let key = match section {
            Section::Masked => "masked",
            Section::Sft => "sft",
            Section::Sweep => "sweep",
            Section::Infill => "infill",
        };
        out.insert(key.into(), value);
    }
    print!("{md}");
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&Value::Object(out)).expect("serialisable");
        std::fs::write(path, text + "\n")
            .map_err(|e| CliError::Usage(format!("cannot write {}: {e}", path.display())))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// 1. Masked tokens
// ---------------------------------------------------------------------------

/// A uniform number in [0, 1) from (seed, window, position): a SplitMix64
/// hash, so the hidden positions depend on nothing else (not on batching).
fn unit(seed: u64, window: u64, position: u64) -> f64 {
    fn mix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    let h = mix(mix(mix(seed) ^ window) ^ position);
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// The first maximal index of `row`, skipping `skip` (the mask: the sampler
/// never proposes it either).
fn argmax_except(row: &[f32], skip: u32) -> u32 {
    let mut best = (f32::NEG_INFINITY, u32::MAX);
    for (i, &l) in row.iter().enumerate() {
        if i as u32 != skip && (l > best.0 || best.1 == u32::MAX) {
            best = (l, i as u32);
        }
    }
    best.1
}

fn logsumexp(row: &[f32]) -> f64 {
    let max = row.iter().fold(f64::NEG_INFINITY, |m, &l| m.max(l as f64));
    max + row
        .iter()
        .map(|&l| (l as f64 - max).exp())
        .sum::<f64>()
        .ln()
}

/// Held-out prose as the model saw it in training (each paragraph as
/// `encode` gives it, BOS first, then EOS), cut into windows; per mask ratio,
/// one forward pass per window predicts every hidden token at once. A
/// position is hidden at ratio r when its uniform number is below r, so the
/// hidden sets of the ratios are nested.
fn masked<B: Backend>(setup: &Setup, runner: &Runner<B>, md: &mut String) -> CliResult<Value> {
    let args = &setup.args;
    let mut stream = Vec::new();
    for paragraph in &setup.prose {
        stream.extend(setup.codec.encode(paragraph)?);
        stream.push(setup.space.eos);
    }
    let windows = spread(
        stream.chunks_exact(setup.window).collect(),
        args.limit_windows,
    );
    let mask = setup.space.mask;
    let width = setup.embedding_size;
    let mut rows_out = Vec::new();
    for ratio in RATIOS {
        let (mut hidden, mut correct, mut nll) = (0usize, 0usize, 0f64);
        for (b, group) in windows.chunks(runner.batch).enumerate() {
            let mut ids = Vec::with_capacity(group.len() * setup.window);
            let (mut rows, mut targets) = (Vec::new(), Vec::new());
            for (j, w) in group.iter().enumerate() {
                let index = (b * runner.batch + j) as u64;
                for (p, &t) in w.iter().enumerate() {
                    if unit(args.seed, index, p as u64) < ratio {
                        rows.push(ids.len());
                        targets.push(t);
                        ids.push(mask);
                    } else {
                        ids.push(t);
                    }
                }
            }
            if rows.is_empty() {
                continue;
            }
            let packing = Packing::new(group.iter().map(|w| w.len()));
            let logits = runner.engine.logits(&ids, &packing, Some(&rows));
            for (row, &t) in logits.chunks_exact(width).zip(&targets) {
                correct += usize::from(argmax_except(row, mask) == t);
                nll += logsumexp(row) - row[t as usize] as f64;
            }
            hidden += targets.len();
        }
        eprintln!(
            "eval: masked tokens, ratio {ratio}: {} windows",
            windows.len()
        );
        rows_out.push(json!({
            "ratio": ratio,
            "hidden": hidden,
            "correct": correct,
            "accuracy": ratio_of(correct as f64, hidden),
            "cross_entropy": ratio_of(nll, hidden),
        }));
    }

    let _ = writeln!(md, "## Masked-token accuracy (held-out prose)\n");
    let _ = writeln!(
        md,
        "{} windows of {} tokens ({} tokens of `{PROSE_FILE}`, paragraphs as BOS text EOS); \
         each position hidden with the given probability, all hidden tokens predicted in one \
         forward pass (LLaDA's pre-training task). Accuracy: argmax equals the hidden token; \
         cross-entropy in nats per hidden token.\n",
        windows.len(),
        setup.window,
        stream.len()
    );
    let _ = writeln!(
        md,
        "| mask ratio | hidden tokens | accuracy | cross-entropy |"
    );
    let _ = writeln!(md, "|---:|---:|---:|---:|");
    for r in &rows_out {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            r["ratio"],
            r["hidden"],
            num(&r["accuracy"]),
            num(&r["cross_entropy"])
        );
    }
    md.push('\n');
    Ok(json!({
        "window": setup.window,
        "windows": windows.len(),
        "stream_tokens": stream.len(),
        "ratios": rows_out,
    }))
}

/// At most `limit` of `items`, evenly spaced, so that a limit still samples
/// the whole held-out set.
fn spread<T>(items: Vec<T>, limit: usize) -> Vec<T> {
    let n = items.len();
    if n <= limit {
        return items;
    }
    let mut keep = (0..limit).map(|i| i * n / limit).peekable();
    items
        .into_iter()
        .enumerate()
        .filter_map(|(j, item)| keep.next_if_eq(&j).map(|_| item))
        .collect()
}

/// `sum / n`, or null for nothing measured.
fn ratio_of(sum: f64, n: usize) -> Value {
    if n == 0 {
        Value::Null
    } else {
        json!(sum / n as f64)
    }
}

/// A JSON number for a table: three decimals, or a dash for null.
fn num(v: &Value) -> String {
    v.as_f64().map_or("–".into(), |x| format!("{x:.3}"))
}

// ---------------------------------------------------------------------------
// 2. and 3. Question/answer pairs
// ---------------------------------------------------------------------------

/// SQuAD's answer normalisation: lowercase, drop punctuation (ASCII as
/// SQuAD, and the typographic quotes and dashes of old books) and the
/// articles a/an/the, split on whitespace.
fn normalize(text: &str) -> Vec<String> {
    let kept: String = text
        .to_lowercase()
        .chars()
        .filter(|c| !c.is_ascii_punctuation() && !"‘’“”–—…".contains(*c))
        .collect();
    kept.split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .map(String::from)
        .collect()
}

fn exact_match(prediction: &str, truth: &str) -> bool {
    normalize(prediction) == normalize(truth)
}

/// SQuAD's token F1: the harmonic mean of precision and recall of the bag of
/// normalised words. Two empty answers agree (1); one empty scores 0.
fn token_f1(prediction: &str, truth: &str) -> f64 {
    let (p, t) = (normalize(prediction), normalize(truth));
    if p.is_empty() || t.is_empty() {
        return f64::from(u8::from(p == t));
    }
    let mut left: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for w in &t {
        *left.entry(w).or_default() += 1;
    }
    let mut same = 0;
    for w in &p {
        if let Some(n) = left.get_mut(w.as_str()).filter(|n| **n > 0) {
            *n -= 1;
            same += 1;
        }
    }
    if same == 0 {
        return 0.0;
    }
    let precision = same as f64 / p.len() as f64;
    let recall = same as f64 / t.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// The answers to a set of pairs under one sampler setting.
struct Answers {
    /// (pair index, answer text) for the pairs that fit the model.
    texts: Vec<(usize, String)>,
    /// The answers' token ids, in the order of `texts`.
    ids: Vec<Vec<u32>>,
    /// Pairs whose prompt plus answer is longer than max_sequence_length.
    skipped: usize,
    forwards: usize,
    /// Tokens committed from predictions, over all answers.
    committed: usize,
    wall_s: f64,
    config: SamplerConfig,
}

impl Answers {
    fn scores(&self, pairs: &[&Pair]) -> (f64, f64) {
        let n = self.texts.len().max(1) as f64;
        let em = self
            .texts
            .iter()
            .filter(|(i, a)| exact_match(a, &pairs[*i].response))
            .count() as f64;
        let f1: f64 = self
            .texts
            .iter()
            .map(|(i, a)| token_f1(a, &pairs[*i].response))
            .sum();
        (em / n, f1 / n)
    }

    /// The numbers of one setting, for the JSON file.
    fn summary(&self, pairs: &[&Pair]) -> Value {
        let n = self.texts.len();
        let (em, f1) = self.scores(pairs);
        let per = |x: f64| if n == 0 { Value::Null } else { json!(x) };
        json!({
            "n": n,
            "skipped_too_long": self.skipped,
            "exact_match": per(em),
            "f1": per(f1),
            "rule": self.config.rule.to_string(),
            "steps": self.config.steps,
            "block_length": self.config.block_length,
            "forwards_per_answer": per(self.forwards as f64 / n.max(1) as f64),
            "tokens_per_forward": per(self.committed as f64 / self.forwards.max(1) as f64),
            "ms_per_answer": per(self.wall_s * 1e3 / n.max(1) as f64),
        })
    }

    /// Token agreement with `other`'s answers to the same pairs: positions
    /// where both answers hold the same token, over the longer answer's
    /// length (1 when both are empty), averaged over the answers.
    fn agreement(&self, other: &Answers) -> f64 {
        let n = self.ids.len().max(1) as f64;
        self.ids
            .iter()
            .zip(&other.ids)
            .map(|(a, b)| {
                let same = a.iter().zip(b).filter(|(x, y)| x == y).count();
                match a.len().max(b.len()) {
                    0 => 1.0,
                    len => same as f64 / len as f64,
                }
            })
            .sum::<f64>()
            / n
    }
}

fn answer<B: Backend>(
    setup: &Setup,
    runner: &Runner<B>,
    pairs: &[&Pair],
    config: SamplerConfig,
    what: &str,
) -> CliResult<Answers> {
    let t = Instant::now();
    let (mut canvases, mut index, mut skipped) = (Vec::new(), Vec::new(), 0);
    for (i, pair) in pairs.iter().enumerate() {
        let prompt = setup.codec.encode_chat(&[Message {
            role: "user".into(),
            content: pair.prompt.clone(),
        }])?;
        match Canvas::new(&prompt, config, setup.space) {
            Ok(c) => {
                canvases.push(c);
                index.push(i);
            }
            Err(InvalidRequest::TooLong { .. }) => skipped += 1,
            Err(e) => return Err(e.into()),
        }
    }
    runner.complete(&mut canvases, what)?;
    let forwards = canvases.iter().map(Canvas::forwards).sum();
    let committed = canvases.iter().map(Canvas::committed).sum();
    let ids = canvases.iter().map(|c| c.answer().to_vec()).collect();
    let texts = canvases
        .iter()
        .zip(index)
        .map(|(c, i)| {
            let ids = c.answer();
            Ok((i, setup.codec.decode(ids, true)?))
        })
        .collect::<CliResult<Vec<_>>>()?;
    Ok(Answers {
        texts,
        ids,
        skipped,
        forwards,
        committed,
        wall_s: t.elapsed().as_secs_f64(),
        config,
    })
}

/// The first `limit` pairs of one kind, in file order.
fn of_kind<'a>(pairs: &'a [Pair], kind: &str, limit: usize) -> Vec<&'a Pair> {
    pairs
        .iter()
        .filter(|p| p.kind == kind)
        .take(limit)
        .collect()
}

/// Markdown table cell text: one line, no pipes.
fn cell(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}

/// Definition answers of the sft section, kept for the sweep when it runs the
/// same setting on the same questions.
type DefineCache = Option<(usize, Answers)>;

fn sft<B: Backend>(
    setup: &Setup,
    runner: &Runner<B>,
    md: &mut String,
    cache: &mut DefineCache,
) -> CliResult<Value> {
    let args = &setup.args;
    let config = answer_config(args, args.block_length, 1, args.rule.rule()?);
    let _ = writeln!(md, "## Question answering (held-out SFT pairs)\n");
    let _ = writeln!(
        md,
        "Prompt: the chat template around the question; {} tokens generated, commit rule {} \
         (fixed: one token per step), blocks of {}; the answer ends at the first EOS or end of \
         turn. Exact match and token F1 as in SQuAD (lowercase, no punctuation or articles).\n",
        config.gen_length, config.rule, config.block_length
    );
    let _ = writeln!(
        md,
        "| kind | pairs | exact match | token F1 | skipped (too long) |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|");
    let mut kinds = serde_json::Map::new();
    let mut examples_md = String::new();
    for kind in ["define", "example"] {
        let pairs = of_kind(&setup.pairs, kind, args.limit_pairs);
        let answers = answer(setup, runner, &pairs, config, kind)?;
        let mut value = answers.summary(&pairs);
        let _ = writeln!(
            md,
            "| {kind} | {} | {} | {} | {} |",
            value["n"],
            num(&value["exact_match"]),
            num(&value["f1"]),
            value["skipped_too_long"]
        );
        value["answers"] = answers
            .texts
            .iter()
            .map(|(i, a)| {
                let p = pairs[*i];
                json!({
                    "prompt": p.prompt,
                    "reference": p.response,
                    "answer": a,
                    "exact_match": exact_match(a, &p.response),
                    "f1": token_f1(a, &p.response),
                })
            })
            .collect();
        let _ = writeln!(examples_md, "\n| {kind}: prompt | reference | answer |");
        let _ = writeln!(examples_md, "|---|---|---|");
        for (i, a) in answers.texts.iter().take(EXAMPLES) {
            let p = pairs[*i];
            let _ = writeln!(
                examples_md,
                "| {} | {} | {} |",
                cell(&p.prompt),
                cell(&p.response),
                cell(a)
            );
        }
        kinds.insert(kind.into(), value);
        if kind == "define" {
            *cache = Some((pairs.len(), answers));
        }
    }
    let _ = writeln!(md, "{examples_md}");
    Ok(json!({
        "answer_length": config.gen_length,
        "steps": config.steps,
        "block_length": config.block_length,
        "kinds": kinds,
    }))
}

/// Quality against speed on the definition questions: k tokens per step
/// (steps = answer_length / k), over the whole answer or in blocks of 8, and
/// the adaptive rules in blocks of 8; every row against the one-token-per-step
/// answers in blocks of 8 (token agreement).
fn sweep<B: Backend>(
    setup: &Setup,
    runner: &Runner<B>,
    md: &mut String,
    cache: &mut DefineCache,
) -> CliResult<Value> {
    let args = &setup.args;
    let limit = args.limit_sweep.unwrap_or(args.limit_pairs);
    let pairs = of_kind(&setup.pairs, "define", limit);
    let block = SWEEP_BLOCK.min(args.answer_length);
    let mut blocks = vec![args.answer_length];
    if block < args.answer_length {
        blocks.push(block);
    }
    // Every setting: (rule, k per step, block length, cache); the baseline
    // first.
    let mode = args.rule.cache.unwrap_or_default();
    let mut settings = vec![(CommitRule::Fixed, 1, block, mode)];
    for &k in &SWEEP_K {
        for &b in &blocks {
            if (k, b) != (1, block) {
                settings.push((CommitRule::Fixed, k, b, mode));
            }
        }
    }
    settings.extend(SWEEP_RULES.iter().map(|&r| (r, 1, block, mode)));
    settings.extend(
        SWEEP_CACHED
            .iter()
            .filter(|(_, c)| *c != mode)
            .map(|&(r, c)| (r, 1, block, c)),
    );
    let mut table = String::new();
    let _ = writeln!(
        table,
        "| rule | steps | block length | cache | exact match | token F1 | agreement with k=1 | forwards / answer | tokens / forward | ms / answer |"
    );
    let _ = writeln!(table, "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|");
    let mut rows = Vec::new();
    let (mut answered, mut skipped) = (0, 0);
    let mut baseline: Option<Answers> = None;
    let fmt = |v: &Value| v.as_f64().map_or("–".into(), |x| format!("{x:.1}"));
    for (rule, k, block, cache_mode) in settings {
        let config = SamplerConfig {
            cache: cache_mode,
            ..answer_config(args, block, k, rule)
        };
        let name = match rule {
            CommitRule::Fixed => format!("fixed, k={k}"),
            r => r.to_string(),
        };
        let fits = args.answer_length.is_multiple_of(k)
            && Canvas::new(&setup.bos_prompt, config, setup.space).is_ok();
        if !fits {
            let _ = writeln!(
                table,
                "| {name} | – | {block} | {cache_mode} | not possible: {} is not a whole number of steps per block | | | | | |",
                args.answer_length
            );
            rows.push(json!({"rule": name, "block_length": block, "cache": cache_mode.as_str(), "skipped": true}));
            continue;
        }
        let cached = cache
            .take_if(|(n, a)| *n == pairs.len() && a.config == config)
            .map(|(_, a)| a);
        let answers = match cached {
            Some(a) => a,
            None => answer(
                setup,
                runner,
                &pairs,
                config,
                &format!("sweep {name} block={block}"),
            )?,
        };
        let mut value = answers.summary(&pairs);
        let agreement = baseline.as_ref().map_or(1.0, |b| answers.agreement(b));
        value["agreement_with_k1"] = json!(agreement);
        value["setting"] = json!(name);
        value["cache"] = json!(cache_mode.as_str());
        (answered, skipped) = (answers.texts.len(), answers.skipped);
        let _ = writeln!(
            table,
            "| {name} | {} | {block} | {cache_mode} | {} | {} | {agreement:.3} | {} | {} | {} |",
            if rule.is_adaptive() {
                "–".to_string()
            } else {
                config.steps.to_string()
            },
            num(&value["exact_match"]),
            num(&value["f1"]),
            fmt(&value["forwards_per_answer"]),
            value["tokens_per_forward"]
                .as_f64()
                .map_or("–".into(), |x| format!("{x:.2}")),
            fmt(&value["ms_per_answer"]),
        );
        rows.push(value);
        if baseline.is_none() {
            baseline = Some(answers);
        }
    }
    let _ = writeln!(md, "## Quality against speed (definition questions)\n");
    let _ = writeln!(
        md,
        "{answered} questions ({skipped} more too long for the model), answers of {} tokens{}. \
         The fixed rule commits k tokens per step; the adaptive rules (threshold, factor, entropy) \
         commit as many as the model is sure of, until the block is complete. Agreement: the share \
         of answer positions holding the same token as the fixed k=1 answer in blocks of {block}. \
         Tokens per forward: tokens the model committed over its forward passes. Cache: the K/V \
         cache of the steps after a block's first (prefix: the block and what follows it are fed; \
         dual: the block only), an approximation of the reference. Forward passes and \
         wall time per answer; the time is amortised over up to {} answers per forward pass.\n",
        args.answer_length,
        if args.rule.no_early_stop {
            ", every step run (no early stop)"
        } else {
            ", each finished once its answer is final (early stop)"
        },
        args.batch
    );
    let _ = writeln!(md, "{table}");
    Ok(json!({ "questions": answered, "skipped_too_long": skipped, "rows": rows }))
}

// ---------------------------------------------------------------------------
// 4. Infill
// ---------------------------------------------------------------------------

/// Whether a word ends a sentence: a final `.`, `!` or `?` (before closing
/// quotes or brackets), unless it is a title or an initial ("Mrs.", "J.").
fn ends_sentence(word: &str) -> bool {
    let core = word.trim_end_matches(['"', '\'', ')', ']', '’', '”']);
    if !core.ends_with(['.', '!', '?']) {
        return false;
    }
    let stem = core.trim_start_matches(['"', '\'', '(', '‘', '“']);
    let stem = stem.trim_end_matches('.');
    let title = matches!(
        stem,
        "Mr" | "Mrs" | "Ms" | "Dr" | "St" | "Capt" | "Col" | "Gen" | "Rev" | "Lt" | "Sr" | "Jr"
    );
    let initial = stem.chars().count() == 1 && stem.chars().all(char::is_uppercase);
    !(core.ends_with('.') && (title || initial))
}

/// The sentences of a paragraph, words joined by single spaces.
fn sentences(paragraph: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current: Vec<&str> = Vec::new();
    for word in paragraph.split_whitespace() {
        current.push(word);
        if ends_sentence(word) {
            out.push(current.join(" "));
            current.clear();
        }
    }
    if !current.is_empty() {
        out.push(current.join(" "));
    }
    out
}

/// A held-out sentence split in two halves by words, and in tokens exactly
/// where the model's tokenization of the whole sentence splits.
struct Halves {
    sentence: String,
    first_text: String,
    second_text: String,
    first: Vec<u32>,
    second: Vec<u32>,
}

fn split_sentence(setup: &Setup, sentence: &str) -> CliResult<Option<Halves>> {
    let words: Vec<&str> = sentence.split(' ').collect();
    let k = words.len() / 2;
    let first_text = words[..k].join(" ");
    // Byte offset of the first word of the second half.
    let boundary = first_text.len() + 1;
    let encoding = setup
        .codec
        .tokenizer()
        .encode(sentence, false)
        .map_err(|e| anyhow::anyhow!("tokenizing a sentence: {e}"))?;
    // A token ends before the boundary's space or starts the second half
    // (byte-level BPE glues a word's leading space to it).
    let (mut first, mut second) = (Vec::new(), Vec::new());
    for (&id, &(_, end)) in encoding.get_ids().iter().zip(encoding.get_offsets()) {
        if end < boundary {
            if !second.is_empty() {
                return Ok(None); // offsets out of order: no clean split
            }
            first.push(id);
        } else {
            second.push(id);
        }
    }
    if first.is_empty() || second.is_empty() {
        return Ok(None);
    }
    Ok(Some(Halves {
        sentence: sentence.to_string(),
        first_text,
        second_text: words[k..].join(" "),
        first,
        second,
    }))
}

/// Greedy settings over the whole gap: one token per step, or the rule of
/// the flags.
fn gap_config(args: &EvalArgs, gap: usize) -> CliResult<SamplerConfig> {
    let rule = args.rule.rule()?;
    Ok(SamplerConfig {
        gen_length: gap,
        steps: if rule.is_adaptive() { 0 } else { gap },
        block_length: gap,
        rule,
        early_stop: !args.rule.no_early_stop,
        remasking: args.remasking,
        temperature: args.temperature,
        cfg_scale: 0.0,
        seed: args.seed,
        logits_eos_inf: false,
        confidence_eos_eot_inf: false,
        cache: args.rule.cache.unwrap_or_default(),
        logprobs: None,
        truncate: Default::default(),
    })
}

/// Token accuracy and word F1 of generated halves against the originals,
/// and the generated texts.
fn half_scores(
    setup: &Setup,
    generated: &[&[u32]],
    truth: &[(&[u32], &str)],
) -> CliResult<(Value, Vec<String>)> {
    let (mut same, mut total, mut f1) = (0, 0, 0.0);
    let mut texts = Vec::new();
    for (g, (t, text)) in generated.iter().zip(truth) {
        same += g.iter().zip(t.iter()).filter(|(a, b)| a == b).count();
        total += t.len();
        let decoded = setup.codec.decode(g, true)?;
        f1 += token_f1(&decoded, text);
        texts.push(decoded);
    }
    let value = json!({
        "token_accuracy": ratio_of(same as f64, total),
        "word_f1": ratio_of(f1, truth.len()),
        "tokens": total,
    });
    Ok((value, texts))
}

/// Infill: BOS, a gap as long as the first half's tokens, then the second half
/// as a fixed suffix; one token per step. Next to it the usual direction on
/// the same sentences: BOS and the first half as the prompt, the second half
/// generated.
fn infill<B: Backend>(setup: &Setup, runner: &Runner<B>, md: &mut String) -> CliResult<Value> {
    let args = &setup.args;
    let mut candidates = Vec::new();
    let mut skipped = 0;
    for paragraph in &setup.prose {
        for s in sentences(paragraph) {
            if !INFILL_WORDS.contains(&s.split(' ').count()) {
                continue;
            }
            match split_sentence(setup, &s)? {
                Some(h)
                    if setup.bos_prompt.len() + h.first.len() + h.second.len()
                        <= setup.space.max_sequence_length =>
                {
                    candidates.push(h)
                }
                _ => skipped += 1,
            }
        }
    }
    let found = candidates.len();
    let halves = spread(candidates, args.limit_infill);
    let mut backward = halves
        .iter()
        .map(|h| {
            let config = gap_config(args, h.first.len())?;
            Ok(Canvas::infill(
                &setup.bos_prompt,
                &h.second,
                config,
                setup.space,
            )?)
        })
        .collect::<CliResult<Vec<_>>>()?;
    let mut forward = halves
        .iter()
        .map(|h| {
            let prompt = [setup.bos_prompt.as_slice(), &h.first].concat();
            Ok(Canvas::new(
                &prompt,
                gap_config(args, h.second.len())?,
                setup.space,
            )?)
        })
        .collect::<CliResult<Vec<_>>>()?;
    let t = Instant::now();
    runner.complete(&mut backward, "infill (first half given the second)")?;
    let backward_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    runner.complete(&mut forward, "continuation (second half given the first)")?;
    let forward_s = t.elapsed().as_secs_f64();

    let gen_b: Vec<&[u32]> = backward.iter().map(Canvas::generated).collect();
    let gen_f: Vec<&[u32]> = forward.iter().map(Canvas::generated).collect();
    let truth_b: Vec<(&[u32], &str)> = halves
        .iter()
        .map(|h| (h.first.as_slice(), h.first_text.as_str()))
        .collect();
    let truth_f: Vec<(&[u32], &str)> = halves
        .iter()
        .map(|h| (h.second.as_slice(), h.second_text.as_str()))
        .collect();
    let (mut back, back_texts) = half_scores(setup, &gen_b, &truth_b)?;
    let (mut fwd, fwd_texts) = half_scores(setup, &gen_f, &truth_f)?;
    back["wall_s"] = json!(backward_s);
    fwd["wall_s"] = json!(forward_s);
    let forwards = |c: &[Canvas]| c.iter().map(Canvas::forwards).sum::<usize>();
    back["forwards"] = json!(forwards(&backward));
    fwd["forwards"] = json!(forwards(&forward));

    let _ = writeln!(md, "## Infill and continuation (held-out sentences)\n");
    let _ = writeln!(
        md,
        "{} sentences of {}-{} words, spread over the {found} of `{PROSE_FILE}` ({skipped} more did \
         not fit the model or split cleanly into tokens). \
         Infill: BOS, a gap as long as the first half, then the second half fixed; the model \
         writes the first half. Continuation: BOS and the first half, the model writes the \
         second half. No blocks; commit rule {} (fixed: one token per step). Token accuracy is \
         position by position against the original tokens; word F1 as in SQuAD.\n",
        halves.len(),
        INFILL_WORDS.start(),
        INFILL_WORDS.end(),
        args.rule.rule()?
    );
    let _ = writeln!(
        md,
        "| direction | tokens | token accuracy | word F1 | forward passes |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|");
    for (name, v) in [
        ("infill: first half given the second", &back),
        ("continuation: second half given the first", &fwd),
    ] {
        let _ = writeln!(
            md,
            "| {name} | {} | {} | {} | {} |",
            v["tokens"],
            num(&v["token_accuracy"]),
            num(&v["word_f1"]),
            v["forwards"]
        );
    }
    let _ = writeln!(
        md,
        "\n| original | infilled first half | continued second half |"
    );
    let _ = writeln!(md, "|---|---|---|");
    let mut examples = Vec::new();
    for (i, h) in halves.iter().enumerate() {
        let (b, f) = (&back_texts[i], &fwd_texts[i]);
        if i < EXAMPLES {
            let _ = writeln!(
                md,
                "| {} | {} … {} | {} … {} |",
                cell(&h.sentence),
                cell(b),
                cell(&h.second_text),
                cell(&h.first_text),
                cell(f)
            );
        }
        examples.push(json!({
            "sentence": h.sentence,
            "first_half": h.first_text,
            "second_half": h.second_text,
            "infilled_first_half": b,
            "continued_second_half": f,
        }));
    }
    md.push('\n');
    Ok(json!({
        "sentences": halves.len(),
        "candidates": found,
        "skipped": skipped,
        "infill": back,
        "continuation": fwd,
        "examples": examples,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalization_drops_case_punctuation_and_articles() {
        assert_eq!(
            normalize("The  Cat, sat on a MAT!"),
            ["cat", "sat", "on", "mat"]
        );
        assert_eq!(
            normalize("An apple-tree’s “shade”"),
            ["appletrees", "shade"]
        );
        // Articles only as whole words.
        assert_eq!(normalize("theatre another"), ["theatre", "another"]);
        assert!(normalize(" .,;  the ").is_empty());
    }

    #[test]
    fn exact_match_after_normalization() {
        assert!(exact_match("the House.", "house"));
        assert!(exact_match("A strap; under the tail", "strap under tail"));
        assert!(!exact_match("a house", "a horse"));
        assert!(!exact_match("house house", "house"));
    }

    #[test]
    fn token_f1_by_hand() {
        // prediction {cat, sat}, truth {cat, sat, on, mat}: P 1, R 1/2, F1 2/3.
        assert!((token_f1("The cat sat.", "the cat sat on the mat") - 2.0 / 3.0).abs() < 1e-12);
        // prediction {big, dog, dog}, truth {dog, barked}: one shared: P 1/3, R 1/2, F1 0.4.
        assert!((token_f1("big dog dog", "a dog barked") - 0.4).abs() < 1e-12);
        assert_eq!(token_f1("nothing shared", "at all here"), 0.0);
        assert_eq!(token_f1("Same words.", "same WORDS"), 1.0);
        // Empty after normalisation: only another empty answer matches it.
        assert_eq!(token_f1("", "a word"), 0.0);
        assert_eq!(token_f1("the", ""), 1.0);
    }

    #[test]
    fn sentences_split_at_ends_but_not_titles_or_initials() {
        let p = "Mr. Darcy came. \"Did he?\" asked J. Smith! It rained";
        assert_eq!(
            sentences(p),
            [
                "Mr. Darcy came.",
                "\"Did he?\"",
                "asked J. Smith!",
                "It rained"
            ]
        );
    }

    #[test]
    fn hidden_positions_follow_the_ratio_and_the_seed() {
        let hidden = |seed, r| {
            (0..10_000)
                .filter(|&p| unit(seed, 3, p) < r)
                .collect::<Vec<u64>>()
        };
        let (a, b) = (hidden(0, 0.15), hidden(0, 0.5));
        assert!((a.len() as f64 / 10_000.0 - 0.15).abs() < 0.02);
        assert!((b.len() as f64 / 10_000.0 - 0.5).abs() < 0.02);
        assert!(a.iter().all(|p| b.contains(p)), "the ratios are nested");
        assert_ne!(hidden(1, 0.5), b);
        assert_eq!(hidden(0, 0.5), b);
    }

    #[test]
    fn spread_keeps_evenly_spaced_items_in_order() {
        assert_eq!(spread((0..10).collect(), 3), [0, 3, 6]);
        assert_eq!(spread((0..4).collect(), 4), [0, 1, 2, 3]);
        assert_eq!(spread((0..4).collect(), 9), [0, 1, 2, 3]);
        assert!(spread((0..4).collect::<Vec<_>>(), 0).is_empty());
    }

    #[test]
    fn argmax_skips_the_mask_and_takes_the_first_maximum() {
        assert_eq!(argmax_except(&[0.0, 3.0, 1.0, 3.0], 9), 1);
        assert_eq!(argmax_except(&[0.0, 3.0, 1.0, 3.0], 1), 3);
        assert_eq!(argmax_except(&[5.0, 1.0], 0), 1);
    }
}
