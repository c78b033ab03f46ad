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
            Prediction {
                token: if token >= MASK { token + 1 } else { token },
                confidence,
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
            ..SamplerConfig::default()
        };
        let mut infill = Canvas::infill(&prompt, &suffix, config, space()).unwrap();
        let mut plain = Canvas::new(&prompt, config, space()).unwrap();
        let end = prompt.len() + config.gen_length;
        while !infill.is_done() {
            let plan = infill.plan();
            prop_assert_eq!(&plan, &plain.plan());
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
