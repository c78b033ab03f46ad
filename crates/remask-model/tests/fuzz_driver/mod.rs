//! The stable driver of the fuzz targets, shared by the fuzz tests of
//! remask-model and remask-cluster (`#[path]`): each target's seeds from
//! `fuzz-corpus/<target>/` of the including crate, then random mutations of
//! them (byte edits and splices), deterministic (fixed RNG seeds). Bounded
//! by a case count, 3000 per target unless `REMASK_FUZZ_CASES` says more, or
//! by time: `REMASK_FUZZ_SECONDS_EACH=N` mutates until N seconds have passed
//! per target (CI's bound). Each target writes its count and rate to stderr,
//! past the test harness's capture, so CI logs show what a run covered.

#![allow(dead_code)]

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz-corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let seeds: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    seeds
}

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn runner(cases: u32, batch: u64) -> TestRunner {
    // Batch 0 has the seed the case-count runs always had.
    let mut seed = [7u8; 32];
    for (s, b) in seed.iter_mut().zip(batch.to_le_bytes()) {
        *s ^= b;
    }
    TestRunner::new_with_rng(
        Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::from_seed(RngAlgorithm::ChaCha, &seed),
    )
}

/// Cases of one batch of a timed run: small enough that the slowest target
/// (a LoadShard reads a checkpoint) overshoots its time by little.
const BATCH: u32 = 64;

/// Runs `case` on values of `strategy`: a fixed number of them, or batches of
/// them until `REMASK_FUZZ_SECONDS_EACH` have passed; a failing case is
/// shrunk and reported by proptest.
pub fn run<S: Strategy>(target: &str, strategy: &S, case: impl Fn(S::Value)) {
    let start = Instant::now();
    let seconds = env_number("REMASK_FUZZ_SECONDS_EACH").map(Duration::from_secs);
    let ran = AtomicU64::new(0);
    for batch in 0u64.. {
        let cases = match seconds {
            Some(_) => BATCH,
            None => env_number("REMASK_FUZZ_CASES").map_or(3000, |n| n.min(u32::MAX as u64) as u32),
        };
        runner(cases, batch)
            .run(strategy, |value| {
                ran.fetch_add(1, Ordering::Relaxed);
                case(value);
                Ok(())
            })
            .unwrap();
        if seconds.is_none_or(|s| start.elapsed() >= s) {
            break;
        }
    }
    let (n, s) = (ran.load(Ordering::Relaxed), start.elapsed().as_secs_f64());
    let _ = writeln!(
        std::io::stderr(),
        "fuzz {target}: {n} cases in {s:.1} s ({:.0}/s)",
        n as f64 / s.max(1e-9)
    );
}

/// One edit of a byte string: overwrite, insert, delete, or copy a span
/// from elsewhere in it (positions taken modulo the length).
#[derive(Clone, Debug)]
pub enum Edit {
    Set(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Splice(usize, usize, usize),
}

pub fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Set(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Insert(i, b)),
        any::<usize>().prop_map(Edit::Delete),
        (any::<usize>(), any::<usize>(), 0..32usize).prop_map(|(a, b, n)| Edit::Splice(a, b, n)),
    ]
}

pub fn apply(mut data: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        let n = data.len().max(1);
        match *e {
            Edit::Set(i, b) if !data.is_empty() => data[i % n] = b,
            Edit::Insert(i, b) => data.insert(i % (data.len() + 1), b),
            Edit::Delete(i) if !data.is_empty() => {
                data.remove(i % n);
            }
            Edit::Splice(from, to, len) if !data.is_empty() => {
                let from = from % n;
                let span: Vec<u8> = data[from..(from + len).min(data.len())].to_vec();
                let to = to % (data.len() + 1);
                data.splice(to..to, span);
            }
            _ => {}
        }
    }
    data
}

/// Every seed of `target`, then its mutations, through `check`.
pub fn mutations(target: &str, check: fn(&[u8])) {
    let seeds = seeds(target);
    for s in &seeds {
        check(s);
    }
    let strategy = (0..seeds.len(), prop::collection::vec(edit(), 1..8));
    run(target, &strategy, |(seed, edits)| {
        check(&apply(seeds[seed].clone(), &edits))
    });
}
