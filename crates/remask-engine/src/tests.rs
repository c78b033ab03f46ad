//! Properties of the forward pass that hold for any weights.

use super::*;
use remask_model::{Checkpoint, DType, InitOptions, Preset, init_checkpoint};

fn checkpoint(preset: &str, opts: InitOptions) -> (tempfile::TempDir, Checkpoint) {
    let dir = tempfile::tempdir().unwrap();
    init_checkpoint(Preset::get(preset).unwrap(), &opts, dir.path()).unwrap();
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    (dir, ckpt)
}

fn tiny(opts: InitOptions) -> (tempfile::TempDir, Checkpoint) {
    checkpoint("tiny", opts)
}

/// The small preset (8 heads, 4 KV heads, mlp 704, embedding 2304: all
/// divisible by 4 ranks), f32, seed 3, and its special tokens.
fn small_tp() -> (tempfile::TempDir, Checkpoint, remask_model::SpecialTokens) {
    let (dir, ckpt) = checkpoint(
        "small",
        InitOptions {
            dtype: DType::F32,
            seed: 3,
            ..InitOptions::default()
        },
    );
    let special = remask_model::TextCodec::load(dir.path())
        .unwrap()
        .special_tokens(&ckpt.config)
        .unwrap();
    (dir, ckpt, special)
}

fn f32_opts() -> InitOptions {
    InitOptions {
        dtype: DType::F32,
        ..InitOptions::default()
    }
}

fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[test]
fn packed_sequences_equal_their_solo_runs() {
    let (_dir, ckpt) = tiny(f32_opts());
    let engine = Engine::load(&ckpt, 1).unwrap();
    let a: Vec<u32> = (0..37).map(|i| (i * 7 % 300) as u32).collect();
    let b: Vec<u32> = (0..150).map(|i| (i * 13 % 300) as u32).collect();
    let solo_a = engine.logits(&a, &Packing::new([a.len()]), None);
    let solo_b = engine.logits(&b, &Packing::new([b.len()]), None);
    let both = engine.logits(
        &[a.clone(), b.clone()].concat(),
        &Packing::new([a.len(), b.len()]),
        None,
    );
    let split = solo_a.len();
    assert!(max_rel_diff(&solo_a, &both[..split]) < 1e-5);
    assert!(max_rel_diff(&solo_b, &both[split..]) < 1e-5);
}

#[test]
fn attention_is_bidirectional() {
    let (_dir, ckpt) = tiny(f32_opts());
    let engine = Engine::load(&ckpt, 1).unwrap();
    let a: Vec<u32> = vec![5, 6, 7, 8, 9];
    let mut b = a.clone();
    b[4] = 10;
    let p = Packing::new([5]);
    let la = engine.logits(&a, &p, Some(&[0]));
    let lb = engine.logits(&b, &p, Some(&[0]));
    assert!(
        max_rel_diff(&la, &lb) > 1e-4,
        "the last token must change the first position"
    );
}

#[test]
fn gathered_rows_equal_full_logits() {
    let (_dir, ckpt) = tiny(f32_opts());
    let engine = Engine::load(&ckpt, 1).unwrap();
    let ids: Vec<u32> = (0..20).collect();
    let p = Packing::new([20]);
    let v = engine.config().embedding_size();
    let full = engine.logits(&ids, &p, None);
    let some = engine.logits(&ids, &p, Some(&[3, 17]));
    assert_eq!(&some[..v], &full[3 * v..4 * v]);
    assert_eq!(&some[v..], &full[17 * v..18 * v]);
}

#[test]
fn layer_shards_compose_to_the_whole_model() {
    let (_dir, ckpt) = tiny(f32_opts());
    let be = CpuBackend::default();
    let whole = Llada::load(&be, &ckpt, Shard::full(&ckpt.config)).unwrap();
    let first = Llada::load(
        &be,
        &ckpt,
        Shard {
            layers: 0..1,
            embedding: true,
            head: false,
        },
    )
    .unwrap();
    let last = Llada::load(
        &be,
        &ckpt,
        Shard {
            layers: 1..2,
            embedding: false,
            head: true,
        },
    )
    .unwrap();
    let ids: Vec<u32> = (0..12).collect();
    let p = Packing::new([12]);
    let feed = || crate::kv::Feed::plain([12]);
    let hidden = first.layers(&be, first.embed(&be, &ids), &mut feed());
    let hidden = be.load_hidden(&be.to_host(hidden), 12, ckpt.config.d_model);
    let staged = last.head(&be, &last.layers(&be, hidden, &mut feed()), None);
    assert_eq!(staged, whole.logits(&be, &ids, &p, None));
}

/// Tensor parallelism over 2 and 4 thread ranks computes the same model:
/// logits within 1e-4 of one rank, and the same generated ids.
#[test]
fn tensor_parallel_ranks_match_one_rank() {
    use remask_sampler::{Canvas, Remasking, SamplerConfig, denoise};
    let (_dir, ckpt, special) = small_tp();
    let one = Engine::load(&ckpt, 1).unwrap();
    let ids: Vec<u32> = (0..45).map(|i| (i * 31 % 1900) as u32).collect();
    let packing = Packing::new([20, 25]);
    let want = one.logits(&ids, &packing, None);
    let space = crate::token_space(&ckpt.config, &special);
    let configs = [
        SamplerConfig {
            gen_length: 16,
            steps: 8,
            block_length: 8,
            ..SamplerConfig::default()
        },
        SamplerConfig {
            gen_length: 16,
            steps: 16,
            block_length: 16,
            temperature: 0.8,
            seed: 5,
            ..SamplerConfig::default()
        },
        SamplerConfig {
            gen_length: 12,
            steps: 6,
            block_length: 4,
            cfg_scale: 1.0,
            ..SamplerConfig::default()
        },
        SamplerConfig {
            gen_length: 8,
            steps: 8,
            block_length: 8,
            remasking: Remasking::Random,
            seed: 9,
            ..SamplerConfig::default()
        },
        SamplerConfig {
            gen_length: 16,
            steps: 16,
            block_length: 16,
            temperature: 1.2,
            seed: 6,
            truncate: remask_sampler::Truncate {
                top_k: 20,
                top_p: 0.8,
            },
            ..SamplerConfig::default()
        },
    ];
    let generate = |predict: &dyn Fn(
        &Canvas,
        &remask_sampler::StepPlan,
    ) -> Vec<remask_sampler::Prediction>,
                    config: SamplerConfig| {
        let mut canvas = Canvas::new(&[5, 6, 7, 8], config, space).unwrap();
        let r: Result<(), std::convert::Infallible> =
            denoise(&mut canvas, |c, p| Ok(predict(c, p)), |_, _| {});
        r.unwrap();
        canvas.tokens().to_vec()
    };
    for world in [2, 4] {
        let tp = Engine::load(&ckpt, world).unwrap();
        let got = tp.logits(&ids, &packing, None);
        assert_eq!(got.len(), want.len());
        let rel = max_rel_diff(&want, &got);
        assert!(rel < 1e-4, "TP={world}: relative logit difference {rel}");
        for config in configs {
            let a = generate(
                &|c, p| one.predict(&[(0, c, p)]).unwrap().pop().unwrap(),
                config,
            );
            let b = generate(
                &|c, p| tp.predict(&[(0, c, p)]).unwrap().pop().unwrap(),
                config,
            );
            assert_eq!(a, b, "TP={world}, {config:?}");
        }
    }
    // A split that does not divide is refused with a reason.
    let err = Engine::load(&ckpt, 3).err().unwrap().to_string();
    assert!(err.contains("not divisible"), "{err}");
}

/// The step path (the backend reduces the head to partials) predicts what
/// the full logits predict; on the CPU it checks the default reduction, on a
/// GPU the same code runs the CUDA kernel.
#[test]
fn fused_head_matches_host_head() {
    use remask_sampler::{Canvas, SamplerConfig, TokenSpace};
    let (_dir, ckpt) = tiny(f32_opts());
    let engine = Engine::load(&ckpt, 1).unwrap();
    let space = TokenSpace {
        vocab_size: ckpt.config.vocab_size,
        mask: ckpt.config.mask_token_id.unwrap(),
        eos: ckpt.config.eos_token_id.unwrap(),
        eot: None,
        max_sequence_length: 512,
    };
    for config in [
        SamplerConfig {
            gen_length: 8,
            steps: 4,
            block_length: 8,
            ..SamplerConfig::default()
        },
        SamplerConfig {
            gen_length: 8,
            steps: 8,
            block_length: 8,
            temperature: 0.9,
            cfg_scale: 0.5,
            seed: 4,
            logprobs: Some(5),
            ..SamplerConfig::default()
        },
    ] {
        let canvas = Canvas::new(&[3, 4, 5], config, space).unwrap();
        let plan = canvas.plan();
        let batch = StepBatch::new(&[(0, &canvas, &plan)]);
        let rows = query_rows(&batch.queries);
        let packing = Packing::new(batch.fed_lengths());
        let logits = engine.logits(&batch.ids, &packing, Some(&rows));
        let vocab = 0..engine.config().embedding_size();
        let host = combine_ranks(
            &[partial_queries(&logits, vocab, &batch.queries, &[])],
            &batch.queries,
        );
        let fused = engine.run(&batch).unwrap();
        for (h, f) in host[0].iter().zip(&fused[0]) {
            assert_eq!(h.token, f.token);
            assert!((h.confidence - f.confidence).abs() < 1e-9, "{h:?} {f:?}");
            assert!((h.entropy - f.entropy).abs() < 1e-9, "{h:?} {f:?}");
            assert!((h.logprob - f.logprob).abs() < 1e-9, "{h:?} {f:?}");
            assert_eq!(h.top.len(), f.top.len());
            for ((ht, hl), (ft, fl)) in h.top.iter().zip(f.top.iter()) {
                assert_eq!(ht, ft);
                assert!((hl - fl).abs() < 1e-9);
            }
        }
    }
}

/// Log-probabilities and the top-k under tensor parallelism: each rank
/// reduces its vocabulary slice (its top-k, logsumexp) and the slices
/// combine to one rank's numbers, within the logits' own difference.
#[test]
fn tensor_parallel_logprobs_match_one_rank() {
    use remask_sampler::{Canvas, SamplerConfig};
    let (_dir, ckpt, special) = small_tp();
    let space = crate::token_space(&ckpt.config, &special);
    let one = Engine::load(&ckpt, 1).unwrap();
    for (temperature, cfg_scale) in [(0.0, 0.0), (0.8, 1.0)] {
        let config = SamplerConfig {
            gen_length: 8,
            steps: 8,
            block_length: 8,
            temperature,
            cfg_scale,
            seed: 2,
            logprobs: Some(5),
            ..SamplerConfig::default()
        };
        let canvas = Canvas::new(&[5, 6, 7, 8], config, space).unwrap();
        let plan = canvas.plan();
        let want = one.predict(&[(0, &canvas, &plan)]).unwrap().pop().unwrap();
        for world in [2, 4] {
            let tp = Engine::load(&ckpt, world).unwrap();
            let got = tp.predict(&[(0, &canvas, &plan)]).unwrap().pop().unwrap();
            for (w, g) in want.iter().zip(&got) {
                assert_eq!(w.token, g.token, "TP={world}");
                assert!((w.logprob - g.logprob).abs() < 1e-4, "{w:?} {g:?}");
                assert_eq!(g.top.len(), 5);
                for ((wt, wl), (gt, gl)) in w.top.iter().zip(g.top.iter()) {
                    assert_eq!(wt, gt, "TP={world}: top tokens");
                    assert!((wl - gl).abs() < 1e-4, "{wl} vs {gl}");
                    assert!(gl <= 0.0);
                }
                if temperature == 0.0 {
                    assert_eq!(g.top.iter().next(), Some((g.token, g.logprob)));
                }
            }
        }
    }
}

/// A truncated draw (top-k, top-p, both) on any number of ranks is the
/// whole row's: each rank's slice goes through the select's rounds and the
/// thresholds are the ones `predict` finds on the assembled row of the same
/// logits, so the tokens are the same, exactly; confidences, entropies and
/// logprobs stay the untruncated ones.
#[test]
fn truncated_draws_on_split_vocabularies_equal_the_whole_row() {
    use remask_sampler::{Canvas, PredictOptions, SamplerConfig, Truncate, predict};
    let (_dir, ckpt, special) = small_tp();
    let space = crate::token_space(&ckpt.config, &special);
    for world in [1, 2, 4] {
        let engine = Engine::load(&ckpt, world).unwrap();
        for (top_k, top_p, cfg_scale) in
            [(1, 1.0, 0.0), (7, 1.0, 0.0), (0, 0.6, 1.0), (50, 0.9, 0.0)]
        {
            let config = SamplerConfig {
                gen_length: 16,
                steps: 16,
                block_length: 16,
                temperature: 1.5,
                cfg_scale,
                seed: 11,
                logprobs: Some(2),
                truncate: Truncate { top_k, top_p },
                ..SamplerConfig::default()
            };
            let canvas = Canvas::new(&[5, 6, 7, 8], config, space).unwrap();
            let plan = canvas.plan();
            let batch = StepBatch::new(&[(0, &canvas, &plan)]);
            let rows = query_rows(&batch.queries);
            let packing = Packing::new(batch.fed_lengths());
            let logits = engine.logits(&batch.ids, &packing, Some(&rows));
            let width = engine.config().embedding_size();
            let q = &batch.queries[0];
            let n = q.positions.len();
            let got = engine.run(&batch).unwrap().pop().unwrap();
            let untruncated = PredictOptions {
                truncate: Truncate::OFF,
                ..q.options
            };
            let mut differs = 0;
            for (j, g) in got.iter().enumerate() {
                let row = |i: usize| &logits[i * width..(i + 1) * width];
                let un = q.uncond_base.map(|_| row(n + j));
                let pos = q.positions[j] as u64;
                let want = predict(row(j), un, &q.options, q.step, pos, &mut Vec::new());
                assert_eq!(g.token, want.token, "TP={world} k={top_k} p={top_p}");
                assert!((g.confidence - want.confidence).abs() < 1e-9);
                assert!((g.logprob - want.logprob).abs() < 1e-9);
                let free = predict(row(j), un, &untruncated, q.step, pos, &mut Vec::new());
                assert!((g.entropy - free.entropy).abs() < 1e-9);
                differs += usize::from(free.token != g.token);
                if top_k == 1 {
                    // top-k 1: the argmax, whatever the noise.
                    let greedy = PredictOptions {
                        temperature: 0.0,
                        ..untruncated
                    };
                    let argmax = predict(row(j), un, &greedy, q.step, pos, &mut Vec::new());
                    assert_eq!(g.token, argmax.token);
                }
            }
            // At temperature 1.5 over random weights the untruncated draw
            // wanders: truncation must show.
            assert!(
                differs > 0,
                "TP={world} k={top_k} p={top_p}: nothing truncated"
            );
        }
    }
}

/// A checkpoint of generated weights (`model init --on-device-weights`)
/// computes exactly what the bf16 files of the same seed compute: the CPU
/// backend's default `generated_weight` draws the values on the host and
/// loads them as those bf16 files hold them. Under tensor parallelism the
/// ranks draw only their blocks, and match one rank within 1e-4 and the
/// same split of the files exactly.
#[test]
fn generated_weights_equal_the_bf16_files() {
    let bf16 = |generated| InitOptions {
        seed: 21,
        generated,
        ..InitOptions::default()
    };
    let (_files_dir, files) = tiny(bf16(false));
    let (generated_dir, generated) = tiny(bf16(true));
    assert!(generated.is_generated() && !files.is_generated());
    assert!(std::fs::read_dir(generated_dir.path()).unwrap().all(|e| {
        !e.unwrap()
            .file_name()
            .to_string_lossy()
            .contains("safetensors")
    }));
    let ids: Vec<u32> = (0..30).map(|i| (i * 17 % 400) as u32).collect();
    let packing = Packing::new([12, 18]);
    let logits = |ckpt: &Checkpoint| Engine::load(ckpt, 1).unwrap().logits(&ids, &packing, None);
    let want = logits(&files);
    assert_eq!(logits(&generated), want);
    // Pipeline stages load their own layers of a generated checkpoint too.
    let be = CpuBackend::default();
    let stage = |layers, embedding, head| {
        Llada::load(
            &be,
            &generated,
            Shard {
                layers,
                embedding,
                head,
            },
        )
        .unwrap()
    };
    let (first, last) = (stage(0..1, true, false), stage(1..2, false, true));
    let feed = || crate::kv::Feed::plain([12, 18]);
    let hidden = first.layers(&be, first.embed(&be, &ids), &mut feed());
    assert_eq!(
        last.head(&be, &last.layers(&be, hidden, &mut feed()), None),
        want
    );

    let tp_files = Engine::load(&files, 2)
        .unwrap()
        .logits(&ids, &packing, None);
    let tp_generated = Engine::load(&generated, 2)
        .unwrap()
        .logits(&ids, &packing, None);
    assert_eq!(tp_generated, tp_files);
    let rel = max_rel_diff(&want, &tp_generated);
    assert!(rel < 1e-4, "TP=2: relative logit difference {rel}");
}

/// Tensor-parallel blocks of bf16 and f16 files are sliced in their stored
/// dtype (what the CUDA backend needs): the same model as one rank.
#[test]
fn tensor_parallel_blocks_of_half_precision_files() {
    for dtype in [DType::BF16, DType::F16] {
        let (_dir, ckpt) = tiny(InitOptions {
            dtype,
            seed: 2,
            ..InitOptions::default()
        });
        let ids: Vec<u32> = (0..20).map(|i| (i * 29 % 400) as u32).collect();
        let packing = Packing::new([20]);
        let one = Engine::load(&ckpt, 1).unwrap();
        let want = one.logits(&ids, &packing, None);
        let got = Engine::load(&ckpt, 2).unwrap().logits(&ids, &packing, None);
        let rel = max_rel_diff(&want, &got);
        assert!(
            rel < 1e-4,
            "{dtype:?} TP=2: relative logit difference {rel}"
        );
    }
}

/// `Engine::from_backends` (how GPU groups are built) takes the ranks in
/// any order: each backend knows its place through `rank_world()`.
#[test]
fn tp_engine_from_backends_in_any_order() {
    let (_dir, ckpt) = tiny(f32_opts());
    let reversed: Vec<CpuBackend> = crate::collective::thread_group(2)
        .into_iter()
        .rev()
        .map(|rank| CpuBackend::with_collective(std::sync::Arc::new(rank)))
        .collect();
    let tp = Engine::from_backends(reversed, &ckpt, Shard::full(&ckpt.config)).unwrap();
    assert_eq!(tp.world(), 2);
    let want = Engine::load(&ckpt, 2).unwrap();
    let (ids, packing) = ([5u32, 6, 7, 8, 9], Packing::new([5]));
    let rel = max_rel_diff(
        &want.logits(&ids, &packing, None),
        &tp.logits(&ids, &packing, None),
    );
    assert!(rel < 1e-6, "relative logit difference {rel}");
}

fn cache_space(ckpt: &Checkpoint) -> remask_sampler::TokenSpace {
    remask_sampler::TokenSpace {
        vocab_size: ckpt.config.vocab_size,
        mask: ckpt.config.mask_token_id.unwrap(),
        eos: ckpt.config.eos_token_id.unwrap(),
        eot: None,
        max_sequence_length: 512,
    }
}

/// A step that reads a K/V store made from the same canvas computes what
/// a full forward computes (the store holds exactly those keys and
/// values): both modes, with guidance (two stores per request), on one rank
/// and on two.
#[test]
fn a_cached_step_on_an_unchanged_canvas_equals_the_full_step() {
    use remask_sampler::{CacheMode, Canvas, KvUse, SamplerConfig};
    let (_dir, ckpt) = tiny(f32_opts());
    let space = cache_space(&ckpt);
    for world in [1, 2] {
        let engine = Engine::load(&ckpt, world).unwrap();
        for cache in [CacheMode::Prefix, CacheMode::Dual] {
            let config = SamplerConfig {
                gen_length: 24,
                steps: 24,
                block_length: 8,
                cfg_scale: 0.5,
                cache,
                ..SamplerConfig::default()
            };
            let canvas = Canvas::new(&[3, 4, 5, 6, 7], config, space).unwrap();
            let store = canvas.plan();
            assert_eq!(store.kv, KvUse::Store);
            let full = engine.predict(&[(7, &canvas, &store)]).unwrap();
            // The same step as a read of the store just made.
            let block = 5..13;
            let read = remask_sampler::StepPlan {
                kv: KvUse::Read,
                fed: match cache {
                    CacheMode::Prefix => 5..29,
                    _ => block,
                },
                ..store.clone()
            };
            let cached = engine.predict(&[(7, &canvas, &read)]).unwrap();
            for (a, b) in full[0].iter().zip(&cached[0]) {
                assert_eq!(a.token, b.token, "TP={world} {cache:?}");
                assert!((a.confidence - b.confidence).abs() < 1e-5, "{a:?} {b:?}");
            }
            assert_eq!(engine.cache_usage().caches, 2);
            assert_eq!(engine.release(&cache_ids(7)), 2);
            assert_eq!(engine.cache_usage(), CacheUsage::default());
        }
    }
}

/// The whole of a cached generation under tensor parallelism is the one of
/// one rank (every rank keeps its own heads' K/V), and packing it with other
/// requests changes nothing; the cache does change the ids here, so the
/// comparison tests something.
#[test]
fn cached_generations_do_not_depend_on_tensor_parallelism_or_batching() {
    use remask_sampler::{BatchStep, CacheMode, Canvas, CommitRule, SamplerConfig};
    let (_dir, ckpt) = tiny(f32_opts());
    let space = cache_space(&ckpt);
    let one = Engine::load(&ckpt, 1).unwrap();
    let two = Engine::load(&ckpt, 2).unwrap();
    let run = |engine: &Engine, configs: &[SamplerConfig]| {
        let mut canvases: Vec<Canvas> = configs
            .iter()
            .map(|&c| Canvas::new(&[9, 8, 7, 1], c, space).unwrap())
            .collect();
        while canvases.iter().any(|c| !c.is_done()) {
            let mut running: Vec<(u64, &mut Canvas)> = canvases
                .iter_mut()
                .enumerate()
                .filter(|(_, c)| !c.is_done())
                .map(|(i, c)| (i as u64, c))
                .collect();
            let step = BatchStep::new(running.iter().map(|(_, c)| &**c));
            let requests: Vec<StepRequest> = step
                .active()
                .iter()
                .map(|&i| (running[i].0, &*running[i].1, &step.plans()[i]))
                .collect();
            let predictions = engine.run(&StepBatch::new(&requests)).unwrap();
            step.commit(running.iter_mut().map(|(_, c)| &mut **c), predictions);
        }
        let ids: Vec<u64> = (0..configs.len() as u64).flat_map(cache_ids).collect();
        engine.release(&ids);
        assert_eq!(engine.cache_usage().caches, 0);
        canvases
            .iter()
            .map(|c| (c.tokens().to_vec(), c.forwards()))
            .collect::<Vec<_>>()
    };
    let config = |cache, rule| SamplerConfig {
        gen_length: 24,
        steps: 12,
        block_length: 8,
        rule,
        early_stop: false,
        cache,
        ..SamplerConfig::default()
    };
    let configs: Vec<SamplerConfig> = [CacheMode::None, CacheMode::Prefix, CacheMode::Dual]
        .into_iter()
        .flat_map(|m| {
            [CommitRule::Fixed, CommitRule::Factor(3.0)]
                .into_iter()
                .map(move |r| config(m, r))
        })
        .collect();
    let solo: Vec<_> = configs.iter().map(|c| run(&one, &[*c]).remove(0)).collect();
    assert_eq!(run(&one, &configs), solo, "batched");
    assert_eq!(run(&two, &configs), solo, "TP=2");
    // fixed keeps its k per step: 12 forwards with and without a cache
    assert!(solo.iter().step_by(2).all(|(_, f)| *f == 12));
    assert!(
        solo[0].0 != solo[4].0 || solo[1].0 != solo[5].0,
        "the cache changed nothing"
    );
}

/// A step that reads a store this engine does not hold is refused before
/// any rank starts, naming the store; so is one that would store past the
/// budget; and nothing is kept of either.
#[test]
fn missing_stores_and_a_full_budget_are_refused() {
    use remask_sampler::{CacheMode, Canvas, KvUse, SamplerConfig};
    let (_dir, ckpt) = tiny(f32_opts());
    let space = cache_space(&ckpt);
    let per_position = Engine::load(&ckpt, 1).unwrap().kv_bytes_per_position();
    let engine = Engine::load(&ckpt, 2)
        .unwrap()
        .with_kv_budget(Some(per_position * 20));
    assert_eq!(engine.kv_bytes_per_position(), per_position);
    let config = SamplerConfig {
        gen_length: 8,
        steps: 8,
        block_length: 8,
        cache: CacheMode::Dual,
        ..SamplerConfig::default()
    };
    let canvas = Canvas::new(&[3, 4, 5], config, space).unwrap();
    let read = remask_sampler::StepPlan {
        kv: KvUse::Read,
        fed: 3..11,
        ..canvas.plan()
    };
    let err = engine.predict(&[(4, &canvas, &read)]).unwrap_err();
    assert_eq!(err, crate::KvError::Missing(vec![8]));
    assert!(err.to_string().contains("rebuild"), "{err}");
    // 11 positions fit a budget of 20; a second request's 11 do not.
    engine.predict(&[(0, &canvas, &canvas.plan())]).unwrap();
    let full = engine.predict(&[(1, &canvas, &canvas.plan())]).unwrap_err();
    assert!(matches!(full, crate::KvError::Full { .. }), "{full}");
    // One pass reading the same store twice (only a rogue caller sends it).
    let read = remask_sampler::StepPlan {
        kv: KvUse::Read,
        fed: 3..11,
        ..canvas.plan()
    };
    let twice = engine
        .predict(&[(0, &canvas, &read), (0, &canvas, &read)])
        .unwrap_err();
    assert!(twice.to_string().contains("an earlier sequence"), "{twice}");
    assert_eq!(engine.cache_usage().caches, 1);
    assert_eq!(engine.cache_usage().bytes, 11 * per_position);
}
