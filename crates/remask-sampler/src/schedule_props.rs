//! Property tests of the denoising schedule, with arbitrary predictions.

use crate::rng::{NoiseKey, Stream};
use crate::*;
use proptest::prelude::*;

const MASK: u32 = 50;

fn space() -> TokenSpace {
    TokenSpace {
        vocab_size: 64,
        mask: MASK,
        eos: 1,
        eot: Some(2),
        max_sequence_length: 4096,
    }
}

/// Arbitrary but reproducible predictions: tokens anywhere but the mask,
/// confidences with deliberate ties and -inf.
fn fake_predictions(seed: u64, plan: &StepPlan) -> Vec<Prediction> {
    plan.positions
        .iter()
        .map(|&p| {
            let key = NoiseKey::new(seed, Stream::Gumbel, plan.step as u64, p as u64);
            let token = (key.uniform(0) * 63.0) as u32;
            let confidence = match (key.uniform(1) * 8.0) as u32 {
                0 => f64::NEG_INFINITY,
                1 => 0.5,
                _ => key.uniform(2),
            };
            let entropy = match (key.uniform(4) * 8.0) as u32 {
                0 => f64::INFINITY,
                1 => 0.25,
                _ => key.uniform(3) * 3.0,
            };
            Prediction {
                token: if token >= MASK { token + 1 } else { token },
                confidence,
                entropy,
                logprob: -key.uniform(5),
                top: TopK::default(),
            }
        })
        .collect()
}

proptest! {
    #[test]
    fn schedule_invariants(
        prompt in proptest::collection::vec(0u32..MASK, 1..8),
        block_length in 1usize..12,
        blocks in 1usize..5,
        steps_per_block in 1usize..16,
        seed in any::<u64>(),
    ) {
        let steps_per_block = steps_per_block.min(block_length);
        let config = SamplerConfig {
            gen_length: block_length * blocks,
            steps: steps_per_block * blocks,
            block_length,
            early_stop: false,
            ..SamplerConfig::default()
        };
        let mut canvas = Canvas::new(&prompt, config, space()).unwrap();
        let p = prompt.len();
        while !canvas.is_done() {
            let before = canvas.tokens().to_vec();
            let plan = canvas.plan();
            let block = plan.step / steps_per_block;
            let (start, end) = (p + block * block_length, p + (block + 1) * block_length);
            let preds = fake_predictions(seed, &plan);
            let committed = canvas.commit(&plan, &preds);
            // exactly k commits per step, k from the block's schedule
            let expected_k = transfer_schedule(block_length, steps_per_block)[plan.step % steps_per_block];
            prop_assert_eq!(committed.len(), expected_k);
            let after = canvas.tokens();
            for (i, (&b, &a)) in before.iter().zip(after).enumerate() {
                if b != MASK {
                    // the prompt and committed tokens never change
                    prop_assert_eq!(a, b, "position {} changed", i);
                } else if a != MASK {
                    // nothing committed outside the current block
                    prop_assert!(i >= start && i < end, "position {} outside block {}..{}", i, start, end);
                }
            }
            prop_assert_eq!(&after[..p], &prompt[..]);
            // the committed ones are the most confident of the eligible
            let worst_in = committed.iter().map(|c| c.confidence).fold(f64::INFINITY, f64::min);
            for (pos, pred) in plan.positions.iter().zip(&preds) {
                if !committed.iter().any(|c| c.position == *pos) {
                    prop_assert!(pred.confidence <= worst_in);
                }
            }
        }
        prop_assert_eq!(canvas.step(), config.steps);
        // no mask remains at the end
        prop_assert!(canvas.tokens().iter().all(|&t| t != MASK));
    }
}

#[test]
fn schedule_puts_the_remainder_first() {
    assert_eq!(transfer_schedule(20, 6), vec![4, 4, 3, 3, 3, 3]);
    assert_eq!(transfer_schedule(3, 5), vec![1, 1, 1, 0, 0]);
    assert_eq!(transfer_schedule(8, 1), vec![8]);
}

#[test]
fn bad_requests_are_refused_with_their_reason() {
    let ok = SamplerConfig {
        gen_length: 8,
        steps: 4,
        block_length: 4,
        ..SamplerConfig::default()
    };
    let cases: Vec<(Vec<u32>, SamplerConfig, &str)> = vec![
        (vec![], ok, "empty"),
        (
            vec![1],
            SamplerConfig {
                gen_length: 0,
                ..ok
            },
            "gen_length must be",
        ),
        (vec![1], SamplerConfig { steps: 0, ..ok }, "steps must be"),
        (
            vec![1],
            SamplerConfig {
                block_length: 3,
                ..ok
            },
            "not a multiple of block_length",
        ),
        (
            vec![1],
            SamplerConfig { steps: 3, ..ok },
            "not a multiple of the number of blocks",
        ),
        (
            vec![1],
            SamplerConfig { steps: 16, ..ok },
            "more than gen_length",
        ),
        (
            vec![1],
            SamplerConfig {
                gen_length: 4096,
                block_length: 4096,
                ..ok
            },
            "max_sequence_length",
        ),
        (vec![1, 64], ok, "outside the vocabulary"),
        (vec![MASK], ok, "mask token"),
        (
            vec![1],
            SamplerConfig {
                temperature: -1.0,
                ..ok
            },
            "temperature",
        ),
        (
            vec![1],
            SamplerConfig {
                cfg_scale: f64::NAN,
                ..ok
            },
            "cfg_scale",
        ),
    ];
    for (prompt, config, needle) in cases {
        let err = Canvas::new(&prompt, config, space())
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{err:?} should mention {needle:?}");
    }
}

#[test]
fn guidance_masks_only_the_prompt() {
    let config = SamplerConfig {
        gen_length: 4,
        steps: 4,
        block_length: 4,
        cfg_scale: 1.0,
        ..SamplerConfig::default()
    };
    let mut canvas = Canvas::new(&[5, 6], config, space()).unwrap();
    let plan = canvas.plan();
    let preds = fake_predictions(1, &plan);
    canvas.commit(&plan, &preds);
    let un = canvas.unconditional().unwrap();
    assert_eq!(&un[..2], &[MASK, MASK]);
    assert_eq!(&un[2..], canvas.generated());
}

proptest! {
    /// Infilling: the suffix is never planned, never changed, and the gap is
    /// filled exactly as a canvas without suffix would fill it from the same
    /// predictions.
    #[test]
    fn infill_keeps_the_suffix_and_fills_the_gap(
        prompt in proptest::collection::vec(0u32..MASK, 1..6),
        suffix in proptest::collection::vec(0u32..MASK, 1..6),
        block_length in 1usize..8,
        blocks in 1usize..4,
        seed in any::<u64>(),
    ) {
        let config = SamplerConfig {
            gen_length: block_length * blocks,
            steps: block_length * blocks,
            block_length,
            early_stop: false,
            ..SamplerConfig::default()
        };
        let mut infill = Canvas::infill(&prompt, &suffix, config, space()).unwrap();
        let mut plain = Canvas::new(&prompt, config, space()).unwrap();
        let end = prompt.len() + config.gen_length;
        while !infill.is_done() {
            let plan = infill.plan();
            let other = plain.plan();
            // the same step of the gap (only the fed canvas is longer)
            prop_assert_eq!(
                (plan.step, plan.transfer, &plan.positions),
                (other.step, other.transfer, &other.positions)
            );
            prop_assert!(plan.positions.iter().all(|&p| p >= prompt.len() && p < end));
            let preds = fake_predictions(seed, &plan);
            infill.commit(&plan, &preds);
            plain.commit(&plan, &preds);
            prop_assert_eq!(infill.suffix(), &suffix[..]);
        }
        prop_assert_eq!(infill.generated(), plain.generated());
        prop_assert_eq!(&infill.tokens()[end..], &suffix[..]);
        prop_assert!(!infill.generated().contains(&MASK));
    }
}

#[test]
fn infill_refuses_bad_suffixes_and_guidance_masks_both_ends() {
    let config = SamplerConfig {
        gen_length: 4,
        steps: 4,
        block_length: 4,
        cfg_scale: 1.0,
        ..SamplerConfig::default()
    };
    let err = |suffix: &[u32]| {
        Canvas::infill(&[5], suffix, config, space())
            .unwrap_err()
            .to_string()
    };
    assert!(err(&[3, MASK]).contains("suffix position 1 holds the mask"));
    assert!(err(&[64]).contains("outside the vocabulary"));
    let long = vec![3; 4092];
    assert!(err(&long).contains("suffix (4092)"));

    let canvas = Canvas::infill(&[5, 6], &[7, 8, 9], config, space()).unwrap();
    assert_eq!(canvas.generated(), &[MASK; 4]);
    let un = canvas.unconditional().unwrap();
    assert_eq!(&un[..2], &[MASK, MASK]);
    assert_eq!(&un[6..], &[MASK, MASK, MASK]);
}

#[test]
fn the_answer_ends_at_the_first_eos_or_end_of_turn() {
    let (eos, eot) = (1, 2);
    let s = space();
    assert_eq!(s.answer(&[5, 6, eot, 7, eos]), &[5, 6]);
    assert_eq!(s.answer(&[5, eos, eot]), &[5]);
    assert_eq!(s.answer(&[eos, eos, eos]), &[] as &[u32]);
    assert_eq!(s.answer(&[5, 6, 7]), &[5, 6, 7]);
    // Without an end-of-turn token only EOS stops.
    let plain = TokenSpace { eot: None, ..s };
    assert_eq!(plain.answer(&[5, eot, eos]), &[5, eot]);
}

fn rule_strategy() -> impl Strategy<Value = CommitRule> {
    prop_oneof![
        Just(CommitRule::Fixed),
        (0.01f64..=1.0).prop_map(CommitRule::Threshold),
        (0.01f64..4.0).prop_map(CommitRule::Factor),
        (0.0f64..3.0).prop_map(CommitRule::Entropy),
    ]
}

/// Runs a canvas on `fake_predictions`, checking every step's invariants;
/// returns the finished canvas.
fn run_checked(
    prompt: &[u32],
    config: SamplerConfig,
    seed: u64,
) -> Result<Canvas, proptest::test_runner::TestCaseError> {
    let mut canvas = Canvas::new(prompt, config, space()).unwrap();
    let p = prompt.len();
    let mut forwards = 0;
    while !canvas.is_done() {
        let before = canvas.tokens().to_vec();
        let plan = canvas.plan();
        let block = (plan.positions.first().copied().unwrap_or(p) - p) / config.block_length;
        let (start, end) = (
            p + block * config.block_length,
            p + (block + 1) * config.block_length,
        );
        let preds = fake_predictions(seed, &plan);
        let committed = canvas.commit(&plan, &preds);
        if plan.needs_forward() {
            forwards += 1;
            // every step with a forward pass commits at least one token
            prop_assert!(!committed.is_empty());
        }
        if config.rule.is_adaptive() {
            prop_assert!(plan.needs_forward(), "adaptive steps always run");
        }
        if let CommitRule::Threshold(tau) = config.rule {
            // all but the step's best are at least tau
            for c in committed.iter().skip(1) {
                prop_assert!(c.confidence >= tau, "{} < {}", c.confidence, tau);
            }
            // and no candidate left behind is at least tau
            for (pos, pred) in plan.positions.iter().zip(&preds) {
                if !committed.iter().any(|c| c.position == *pos) {
                    prop_assert!(pred.confidence < tau);
                }
            }
        }
        let after = canvas.tokens();
        let stopped = canvas.is_done() && !canvas.generated().contains(&MASK);
        for (i, (&b, &a)) in before.iter().zip(after).enumerate() {
            let in_block = i >= start && i < end;
            if b != MASK {
                // committed tokens never change (early stop may only turn
                // what follows the answer into EOS)
                prop_assert!(
                    a == b || (stopped && a == space().eos),
                    "position {} changed",
                    i
                );
            } else if a != MASK && !(stopped && a == space().eos) {
                // nothing committed outside the current block
                prop_assert!(in_block, "position {} outside block {}..{}", i, start, end);
            }
        }
        prop_assert_eq!(&after[..p], prompt);
    }
    prop_assert_eq!(canvas.forwards(), forwards);
    prop_assert!(!canvas.generated().contains(&MASK));
    Ok(canvas)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]
    /// Every rule: at least one commit per forward, nothing outside the
    /// block, committed tokens fixed; and early stop never changes the
    /// answer, only how many forwards it takes.
    #[test]
    fn rules_and_early_stop(
        prompt in proptest::collection::vec(0u32..MASK, 1..6),
        block_length in 1usize..10,
        blocks in 1usize..4,
        steps_per_block in 1usize..10,
        rule in rule_strategy(),
        seed in any::<u64>(),
    ) {
        let steps_per_block = steps_per_block.min(block_length);
        let base = SamplerConfig {
            gen_length: block_length * blocks,
            steps: if rule.is_adaptive() { 0 } else { steps_per_block * blocks },
            block_length,
            rule,
            ..SamplerConfig::default()
        };
        let full = run_checked(&prompt, SamplerConfig { early_stop: false, ..base }, seed)?;
        let early = run_checked(&prompt, SamplerConfig { early_stop: true, ..base }, seed)?;
        prop_assert_eq!(early.answer(), full.answer());
        prop_assert_eq!(early.finish_reason(), full.finish_reason());
        prop_assert!(early.forwards() <= full.forwards());
        let g = early.generated();
        let a = early.answer().len();
        if a < g.len() {
            // answer, its stop token, then EOS
            prop_assert!(space().is_stop(g[a]));
            prop_assert!(g[a + 1..].iter().all(|&t| t == space().eos));
        }
        if rule.is_adaptive() {
            prop_assert!(full.forwards() <= base.gen_length);
        } else {
            prop_assert_eq!(full.step(), base.steps);
        }
    }
}

fn pred(confidence: f64, entropy: f64) -> Prediction {
    Prediction {
        token: 7,
        confidence,
        entropy,
        logprob: -1.0,
        top: TopK::default(),
    }
}

/// Commits one step of a fresh one-block canvas of `n` masks.
fn one_step(rule: CommitRule, preds: &[Prediction]) -> Vec<usize> {
    let n = preds.len();
    let config = SamplerConfig {
        gen_length: n,
        steps: 0,
        block_length: n,
        rule,
        early_stop: false,
        ..SamplerConfig::default()
    };
    let mut canvas = Canvas::new(&[3], config, space()).unwrap();
    let plan = canvas.plan();
    let mut got: Vec<usize> = canvas
        .commit(&plan, preds)
        .iter()
        .map(|c| c.position - 1)
        .collect();
    got.sort();
    got
}

#[test]
fn threshold_takes_the_confident_and_always_the_best() {
    let preds = [pred(0.5, 0.), pred(0.95, 0.), pred(0.9, 0.), pred(0.2, 0.)];
    assert_eq!(one_step(CommitRule::Threshold(0.9), &preds), vec![1, 2]);
    assert_eq!(one_step(CommitRule::Threshold(0.99), &preds), vec![1]);
    assert_eq!(
        one_step(CommitRule::Threshold(0.1), &preds),
        vec![0, 1, 2, 3]
    );
    // ties: the lower position is "the best"
    let tied = [pred(0.3, 0.), pred(0.3, 0.)];
    assert_eq!(one_step(CommitRule::Threshold(0.9), &tied), vec![0]);
}

#[test]
fn factor_follows_fast_dllm_including_its_boundary() {
    // f = 1: the n-th passes at c_n >= 1 - 1/(n+1): n=2: 0.667, n=3: 0.75, n=4: 0.8
    let f = CommitRule::Factor(1.0);
    let c = |v: &[f64]| v.iter().map(|&c| pred(c, 0.)).collect::<Vec<_>>();
    // second fails: one token
    assert_eq!(one_step(f, &c(&[0.9, 0.5, 0.1, 0.1])), vec![0]);
    // third fails (not the last): two
    assert_eq!(one_step(f, &c(&[0.9, 0.7, 0.7, 0.1, 0.1])), vec![0, 1]);
    // the first failure is the last candidate: all
    assert_eq!(one_step(f, &c(&[0.9, 0.7, 0.1])), vec![0, 1, 2]);
    // two candidates: both, whatever the second
    assert_eq!(one_step(f, &c(&[0.9, 0.01])), vec![0, 1]);
    // nothing fails: all
    assert_eq!(one_step(f, &c(&[0.99, 0.99, 0.99, 0.99])), vec![0, 1, 2, 3]);
    // one candidate
    assert_eq!(one_step(f, &c(&[0.1])), vec![0]);
    // a -inf best still commits one
    assert_eq!(
        one_step(
            f,
            &c(&[f64::NEG_INFINITY, f64::NEG_INFINITY, f64::NEG_INFINITY])
        ),
        vec![0]
    );
}

#[test]
fn entropy_takes_the_prefix_whose_sum_but_the_last_is_bounded() {
    let h = |v: &[f64]| v.iter().map(|&h| pred(0.5, h)).collect::<Vec<_>>();
    // sorted: 0.1 (pos 2), 0.2 (pos 0), 0.5 (pos 3), 2.0 (pos 1)
    let preds = h(&[0.2, 2.0, 0.1, 0.5]);
    assert_eq!(one_step(CommitRule::Entropy(0.0), &preds), vec![2]);
    assert_eq!(one_step(CommitRule::Entropy(0.1), &preds), vec![0, 2]);
    assert_eq!(one_step(CommitRule::Entropy(0.35), &preds), vec![0, 2, 3]);
    assert_eq!(
        one_step(CommitRule::Entropy(0.85), &preds),
        vec![0, 1, 2, 3]
    );
    // +inf entropy (EOS under confidence_eos_eot_inf) goes last and stops the prefix
    let preds = h(&[f64::INFINITY, 0.1, 0.1]);
    assert_eq!(one_step(CommitRule::Entropy(100.0), &preds), vec![0, 1, 2]);
    let preds = h(&[f64::INFINITY, f64::INFINITY, 0.1]);
    assert_eq!(one_step(CommitRule::Entropy(100.0), &preds), vec![0, 2]);
}

#[test]
fn early_stop_waits_for_every_position_before_the_stop_token() {
    let eos = space().eos;
    let config = SamplerConfig {
        gen_length: 4,
        steps: 4,
        block_length: 4,
        ..SamplerConfig::default()
    };
    let mut canvas = Canvas::new(&[3], config, space()).unwrap();
    // step 0: EOS at position 2 (most confident): positions 0, 1 still masked
    let script = [
        [0.1, 0.2, 0.9, 0.3],
        [0.9, 0.1, 0.0, 0.2],
        [0.0, 0.9, 0.0, 0.1],
    ];
    let tokens = [5, 6, eos, 8];
    for (i, conf) in script.iter().enumerate() {
        assert!(!canvas.is_done(), "done too early at step {i}");
        let plan = canvas.plan();
        let preds: Vec<Prediction> = plan
            .positions
            .iter()
            .map(|&p| Prediction {
                token: tokens[p - 1],
                confidence: conf[p - 1],
                entropy: 0.0,
                logprob: -1.0,
                top: TopK::default(),
            })
            .collect();
        canvas.commit(&plan, &preds);
    }
    // after step 2 positions 0..2 are 5, 6, EOS: final; position 3 never ran
    assert!(canvas.is_done());
    assert_eq!(canvas.generated(), &[5, 6, eos, eos]);
    assert_eq!(canvas.forwards(), 3);
    assert_eq!(canvas.finish_reason(), FinishReason::Stop);
    assert_eq!(canvas.answer(), &[5, 6]);
}

#[test]
fn rules_parse_and_refuse_bad_values() {
    assert_eq!("fixed".parse::<CommitRule>(), Ok(CommitRule::Fixed));
    assert_eq!(
        "threshold=0.9".parse::<CommitRule>(),
        Ok(CommitRule::Threshold(0.9))
    );
    assert_eq!(
        "factor=1".parse::<CommitRule>(),
        Ok(CommitRule::Factor(1.0))
    );
    assert_eq!(
        "entropy=0".parse::<CommitRule>(),
        Ok(CommitRule::Entropy(0.0))
    );
    for bad in [
        "threshold=0",
        "threshold=1.5",
        "factor=0",
        "entropy=-1",
        "entropy=nan",
        "top=3",
        "threshold",
    ] {
        assert!(bad.parse::<CommitRule>().is_err(), "{bad}");
    }
    let cfg = |rule| SamplerConfig {
        gen_length: 8,
        steps: 0,
        block_length: 4,
        rule,
        ..SamplerConfig::default()
    };
    for (rule, needle) in [
        (CommitRule::Threshold(0.0), "threshold"),
        (CommitRule::Threshold(f64::NAN), "threshold"),
        (CommitRule::Factor(-1.0), "factor"),
        (CommitRule::Entropy(f64::INFINITY), "entropy"),
    ] {
        let err = Canvas::new(&[1], cfg(rule), space())
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{err}");
    }
    assert!(Canvas::new(&[1], cfg(CommitRule::Threshold(0.5)), space()).is_ok());
    // fixed still needs steps
    assert!(Canvas::new(&[1], cfg(CommitRule::Fixed), space()).is_err());
    assert_eq!(
        CommitRule::from_parameters(Some(0.9), Some(1.0), None),
        Err(InvalidRequest::TwoRules)
    );
}

proptest! {
    /// The K/V cache modes: the first forward of every block stores over the
    /// whole canvas, the later ones read and feed the block (dual) or the
    /// block and what follows it (prefix); the planned positions always lie
    /// in what is fed; the store is rebuilt from the canvas as the block's
    /// first forward saw it; and the mode never changes which positions a
    /// step plans or how many forwards a request takes for the same
    /// predictions (the fixed rule keeps its k per step).
    #[test]
    fn cache_modes_plan_what_the_store_needs(
        prompt in proptest::collection::vec(0u32..MASK, 1..6),
        block_length in 1usize..8,
        blocks in 1usize..4,
        per_block in 1usize..4,
        seed in any::<u64>(),
        suffix_len in 0usize..3,
    ) {
        use crate::{CacheMode, KvUse};
        let steps = (per_block.min(block_length)) * blocks;
        let run = |cache| {
            let config = SamplerConfig {
                gen_length: block_length * blocks,
                steps,
                block_length,
                early_stop: false,
                cache,
                ..SamplerConfig::default()
            };
            let suffix = vec![3; suffix_len];
            let mut c = Canvas::infill(&prompt, &suffix, config, space()).unwrap();
            let mut plans = Vec::new();
            let mut block_start: Option<Vec<u32>> = None;
            while !c.is_done() {
                let plan = c.plan();
                let len = c.tokens().len();
                let block = (plan.step * blocks / steps) * block_length + prompt.len();
                match (cache, plan.kv) {
                    (CacheMode::None, KvUse::None) => assert_eq!(plan.fed, 0..len),
                    (_, KvUse::Store) => {
                        assert_eq!(plan.fed, 0..len);
                        assert!(c.block_start_tokens().is_none());
                        block_start = Some(c.tokens().to_vec());
                    }
                    (CacheMode::Prefix, KvUse::Read) => assert_eq!(plan.fed, block..len),
                    (CacheMode::Dual, KvUse::Read) => {
                        assert_eq!(plan.fed, block..block + block_length)
                    }
                    other => panic!("{other:?}"),
                }
                if plan.kv == KvUse::Read {
                    assert_eq!(c.block_start_tokens(), block_start.as_deref());
                }
                assert!(plan.positions.iter().all(|p| plan.fed.contains(p)));
                let preds = fake_predictions(seed, &plan);
                c.commit(&plan, &preds);
                plans.push((plan.step, plan.transfer, plan.positions));
            }
            (plans, c.tokens().to_vec(), c.forwards())
        };
        let none = run(CacheMode::None);
        prop_assert_eq!(&run(CacheMode::Prefix), &none);
        prop_assert_eq!(&run(CacheMode::Dual), &none);
    }
}

/// Each answer position keeps the log-probability (and alternatives) of the
/// step that committed it, not of the later steps that still predicted the
/// positions around it; nothing is recorded unless asked for.
#[test]
fn the_canvas_records_logprobs_at_the_committing_step() {
    let config = SamplerConfig {
        gen_length: 8,
        steps: 4,
        block_length: 4,
        early_stop: false,
        logprobs: Some(2),
        ..SamplerConfig::default()
    };
    let mut top = TopK::default();
    let mut canvas = Canvas::new(&[3, 4], config, space()).unwrap();
    let mut committed_at = std::collections::HashMap::new();
    while !canvas.is_done() {
        let plan = canvas.plan();
        let step = plan.step as f64;
        let preds: Vec<Prediction> = plan
            .positions
            .iter()
            .map(|&p| {
                top = TopK::default();
                top.insert(2, 10 + p as u32, -0.1 - step);
                top.insert(2, 20 + p as u32, -0.2 - step);
                Prediction {
                    token: 10 + p as u32,
                    confidence: 1.0 / (1.0 + p as f64),
                    entropy: 0.0,
                    logprob: -0.1 - step,
                    top,
                }
            })
            .collect();
        for c in canvas.commit(&plan, &preds) {
            assert_eq!(c.logprob, -0.1 - step);
            committed_at.insert(c.position, step);
        }
    }
    let logprobs = canvas.logprobs(0..8).unwrap();
    assert_eq!(logprobs.len(), 8);
    for (i, lp) in logprobs.iter().enumerate() {
        let step = committed_at[&(i + 2)];
        assert_eq!(lp.token, 12 + i as u32);
        assert_eq!(lp.logprob, -0.1 - step);
        assert_eq!(
            lp.top,
            [(12 + i as u32, -0.1 - step), (22 + i as u32, -0.2 - step)]
        );
    }
    // Different positions were committed at different steps.
    assert!(committed_at.values().any(|&s| s > 0.0));
    assert_eq!(canvas.logprobs(0..3).unwrap().len(), 3);
    assert_eq!(canvas.logprobs(5..20).unwrap(), logprobs[5..]);
    // Not asked for: nothing kept, nothing asked of the head.
    let plain = Canvas::new(
        &[3, 4],
        SamplerConfig {
            logprobs: None,
            ..config
        },
        space(),
    )
    .unwrap();
    assert!(plain.logprobs(0..8).is_none());
    assert_eq!(plain.predict_options().top_logprobs, 0);
    assert_eq!(
        Canvas::new(&[3, 4], config, space())
            .unwrap()
            .predict_options()
            .top_logprobs,
        2
    );
    let err = Canvas::new(
        &[3],
        SamplerConfig {
            logprobs: Some(6),
            ..config
        },
        space(),
    );
    assert_eq!(err.err(), Some(InvalidRequest::TooManyTopLogprobs(6)));
}
