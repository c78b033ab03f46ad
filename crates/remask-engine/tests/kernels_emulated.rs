//! The CUDA kernels (`src/cuda/kernels.cu`) run on the CPU under an emulation
//! of the CUDA execution model (`tests/cuda_emu/emu.h`: one fiber per CUDA
//! thread, real barriers, warp shuffles, mma.sync with the PTX fragment
//! layout), launched with the plans the GPU gets (`remask_engine::launch`),
//! and compared with the CPU backend, an f64 reference or the host's generated
//! weights. CI has no GPU: this
//! is where the kernel code itself is tested. Needs g++ (C++17); without one
//! every test says so and passes, unless `REMASK_KERNEL_EMU=required` (as
//! `scripts/test.sh` sets it).

use remask_engine::backend::{Backend, Heads, Packing};
use remask_engine::launch::{self, AttentionPlan, Geometry};
use remask_engine::query::{histogram_queries, run_selects, selects};
use remask_engine::{CpuBackend, Matrix, Query, combine_ranks, partial_queries, query_rows};
use remask_model::{GeneratedTensor, Init, Preset};
use remask_sampler::truncate::{BINS, Bins, Round};
use remask_sampler::{Partial, PredictOptions, Remasking, guided_logits, predict};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

/// The compiled emulation; launches are serialised (it has global state).
struct Emu {
    lib: libloading::Library,
    lock: Mutex<()>,
}

fn emu() -> Option<&'static Emu> {
    static EMU: OnceLock<Option<Emu>> = OnceLock::new();
    EMU.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/cuda_emu");
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("remask-cuda-emu.so");
        let status = std::process::Command::new(std::env::var("CXX").unwrap_or("g++".into()))
            .args([
                "-std=c++17",
                "-O1",
                "-fno-strict-aliasing",
                // Rust never fuses a multiply and an add: neither may the kernels here.
                "-ffp-contract=off",
                "-shared",
                "-fPIC",
            ])
            .args(["-Wno-unknown-pragmas", "-o"])
            .arg(&out)
            .arg(dir.join("launch.cpp"))
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("the kernels do not compile for the emulation: g++ {s}"),
            Err(e) if std::env::var("REMASK_KERNEL_EMU").as_deref() == Ok("required") => {
                panic!("no C++ compiler ({e}), and REMASK_KERNEL_EMU=required")
            }
            Err(e) => {
                eprintln!("no C++ compiler ({e}): the kernel emulation tests are skipped");
                return None;
            }
        }
        // SAFETY: our own library, built just now.
        let lib = unsafe { libloading::Library::new(&out) }.expect("load the emulation");
        Some(Emu {
            lib,
            lock: Mutex::new(()),
        })
    })
    .as_ref()
}

/// Calls launcher `name` with the geometry and then the kernel's arguments.
macro_rules! launch {
    ($emu:expr, $name:expr, $geom:expr, ($($ty:ty),*), ($($arg:expr),*)) => {{
        let g: Geometry = $geom;
        let _guard = $emu.lock.lock().unwrap();
        type F = unsafe extern "C" fn(u32, u32, u32, u32, u32, u32, u32, $($ty),*);
        // SAFETY: the launcher's C signature is the one written in launch.cpp.
        unsafe {
            let f: libloading::Symbol<F> = $emu
                .lib
                .get(format!("launch_{}", $name).as_bytes())
                .expect("launcher exported");
            f(g.grid.0, g.grid.1, g.grid.2, g.block.0, g.block.1, g.block.2, g.shared_bytes, $($arg),*)
        }
    }};
}

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let mut z = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed;
            z = (z ^ (z >> 29)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn bf16(v: f32) -> f32 {
    half::bf16::from_f32(v).to_f32()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn matrix(data: Vec<f32>, rows: usize, cols: usize) -> Matrix {
    Matrix { data, rows, cols }
}

/// Attention in f64 on given (already rounded, if wanted) inputs.
fn attention_f64(q: &[f32], k: &[f32], v: &[f32], h: Heads, packing: &Packing) -> Vec<f32> {
    let (qs, kvs, hd) = (
        h.n_heads * h.head_dim,
        h.n_kv_heads * h.head_dim,
        h.head_dim,
    );
    let scale = 1.0 / (hd as f64).sqrt();
    let mut out = vec![0f32; q.len()];
    for seq in packing.sequences() {
        for r in seq.clone() {
            for head in 0..h.n_heads {
                let kvh = head / (h.n_heads / h.n_kv_heads);
                let qr = &q[r * qs + head * hd..][..hd];
                let s: Vec<f64> = seq
                    .clone()
                    .map(|j| {
                        let kr = &k[j * kvs + kvh * hd..][..hd];
                        qr.iter()
                            .zip(kr)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for c in 0..hd {
                    let acc: f64 = seq
                        .clone()
                        .zip(&e)
                        .map(|(j, p)| p * v[j * kvs + kvh * hd + c] as f64)
                        .sum();
                    out[r * qs + head * hd + c] = (acc / z) as f32;
                }
            }
        }
    }
    out
}

/// Runs the attention plan the GPU would get on the emulation.
fn emulated_attention(
    emu: &Emu,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    h: Heads,
    (queries, keys): (&Packing, &Packing),
    tiled: bool,
) -> (Vec<f32>, &'static str) {
    let mut out = vec![f32::NAN; q.len()];
    let (nh, nkv, hd) = (h.n_heads as i32, h.n_kv_heads as i32, h.head_dim as i32);
    let scale = 1.0 / (h.head_dim as f32).sqrt();
    let kernel = match launch::attention(h, queries, keys, tiled) {
        AttentionPlan::Tiled {
            kernel,
            tiles,
            geometry,
        } => {
            launch!(
                emu,
                kernel,
                geometry,
                (
                    *mut f32,
                    *const f32,
                    *const f32,
                    *const f32,
                    *const u32,
                    i32,
                    i32,
                    f32
                ),
                (
                    out.as_mut_ptr(),
                    q.as_ptr(),
                    k.as_ptr(),
                    v.as_ptr(),
                    tiles.as_ptr(),
                    nh,
                    nkv,
                    scale
                )
            );
            kernel
        }
        AttentionPlan::Rows {
            start,
            len,
            geometry,
        } => {
            launch!(
                emu,
                "attention",
                geometry,
                (
                    *mut f32,
                    *const f32,
                    *const f32,
                    *const f32,
                    *const u32,
                    *const u32,
                    i32,
                    i32,
                    i32,
                    f32
                ),
                (
                    out.as_mut_ptr(),
                    q.as_ptr(),
                    k.as_ptr(),
                    v.as_ptr(),
                    start.as_ptr(),
                    len.as_ptr(),
                    nh,
                    nkv,
                    hd,
                    scale
                )
            );
            "attention"
        }
    };
    (out, kernel)
}

/// The tiled tensor-core kernel for every head dim it covers, over sequences
/// that end inside a tile, span several tiles, or hold one token, with
/// grouped KV heads and with scores large enough that the running max moves.
#[test]
fn tiled_attention_matches_f64_on_bf16_inputs() {
    let Some(emu) = emu() else { return };
    for (hd, lengths, amplitude) in [
        (16, vec![1, 64, 65, 130], 1.0),
        (32, vec![70, 3, 129], 4.0),
        (64, vec![100, 28], 8.0),
        (128, vec![80], 2.0),
    ] {
        let h = Heads {
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: hd,
        };
        let packing = Packing::new(lengths.iter().copied());
        let t = packing.tokens();
        let q: Vec<f32> = values(t * 4 * hd, 1)
            .iter()
            .map(|x| x * amplitude)
            .collect();
        let k: Vec<f32> = values(t * 2 * hd, 2)
            .iter()
            .map(|x| x * amplitude)
            .collect();
        let v = values(t * 2 * hd, 3);
        let (out, kernel) = emulated_attention(emu, &q, &k, &v, h, (&packing, &packing), true);
        assert_eq!(kernel, format!("attention_tc_{hd}"));
        // The kernel rounds Q, K, V (and P) to bf16, as a bf16 model does.
        let round = |x: &[f32]| x.iter().map(|&v| bf16(v)).collect::<Vec<_>>();
        let want = attention_f64(&round(&q), &round(&k), &round(&v), h, &packing);
        let err = max_abs_diff(&out, &want);
        assert!(
            err < 1e-2,
            "head dim {hd}: max |diff| {err} vs f64 on bf16 inputs"
        );
        // And against the CPU backend (f32, unrounded): bf16-level agreement
        // where the scores are moderate (large ones amplify bf16 rounding).
        if amplitude > 2.0 {
            continue;
        }
        let cpu = CpuBackend::default().attention(
            &matrix(q.clone(), t, 4 * hd),
            &matrix(k.clone(), t, 2 * hd),
            &matrix(v.clone(), t, 2 * hd),
            h,
            &packing,
            &packing,
        );
        let err = max_abs_diff(&out, &cpu.data);
        assert!(
            err < 2e-2,
            "head dim {hd}: max |diff| {err} vs the CPU backend"
        );
    }
}

/// Head dims without a tiled kernel take the row kernel, exact in f32.
#[test]
fn row_attention_matches_the_cpu_backend() {
    let Some(emu) = emu() else { return };
    let h = Heads {
        n_heads: 3,
        n_kv_heads: 1,
        head_dim: 24,
    };
    let packing = Packing::new([5, 1, 40]);
    let t = packing.tokens();
    let (q, k, v) = (values(t * 72, 4), values(t * 24, 5), values(t * 24, 6));
    let (out, kernel) = emulated_attention(emu, &q, &k, &v, h, (&packing, &packing), true);
    assert_eq!(kernel, "attention");
    let cpu = CpuBackend::default().attention(
        &matrix(q, t, 72),
        &matrix(k, t, 24),
        &matrix(v, t, 24),
        h,
        &packing,
        &packing,
    );
    let err = max_abs_diff(&out, &cpu.data);
    assert!(err < 1e-5, "max |diff| {err}");
}

/// A step that reads a K/V store: each sequence has fewer query rows than
/// keys (the fed block against the whole canvas). Both kernels against the
/// CPU backend.
#[test]
fn attention_with_fewer_queries_than_keys_matches_the_cpu_backend() {
    let Some(emu) = emu() else { return };
    for (hd, tol) in [(24, 1e-5), (64, 2e-2)] {
        let h = Heads {
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: hd,
        };
        let queries = Packing::new([8, 1, 70]);
        let keys = Packing::new([40, 9, 100]);
        let (tq, tk) = (queries.tokens(), keys.tokens());
        let q = values(tq * 4 * hd, 9);
        let (k, v) = (values(tk * 2 * hd, 10), values(tk * 2 * hd, 11));
        let (out, kernel) = emulated_attention(emu, &q, &k, &v, h, (&queries, &keys), true);
        let cpu = CpuBackend::default().attention(
            &matrix(q, tq, 4 * hd),
            &matrix(k, tk, 2 * hd),
            &matrix(v, tk, 2 * hd),
            h,
            &queries,
            &keys,
        );
        let err = max_abs_diff(&out, &cpu.data);
        assert!(err < tol, "{kernel}: max |diff| {err}");
    }
}

#[test]
fn elementwise_kernels_match_the_cpu_backend() {
    let Some(emu) = emu() else { return };
    let cpu = CpuBackend::default();
    let (rows, d) = (7, 300);
    let x = values(rows * d, 7);
    let n = rows * d;

    // rms_norm: one block per row.
    let w = values(d, 8);
    let mut out = vec![0f32; n];
    launch!(
        emu,
        "rms_norm",
        launch::per_row(rows),
        (*mut f32, *const f32, *const f32, i32, f32),
        (out.as_mut_ptr(), x.as_ptr(), w.as_ptr(), d as i32, 1e-5)
    );
    let want = cpu.rms_norm(&matrix(x.clone(), rows, d), &matrix(w, 1, d), 1e-5);
    assert!(max_abs_diff(&out, &want.data) < 1e-5, "rms_norm");

    // silu_mul and add_assign.
    let up = values(n, 9);
    let mut out = vec![0f32; n];
    launch!(
        emu,
        "silu_mul",
        launch::elementwise(n),
        (*mut f32, *const f32, *const f32, i64),
        (out.as_mut_ptr(), x.as_ptr(), up.as_ptr(), n as i64)
    );
    let want = cpu.silu_mul(&matrix(x.clone(), rows, d), &matrix(up.clone(), rows, d));
    assert!(max_abs_diff(&out, &want.data) < 1e-6, "silu_mul");
    let mut acc = x.clone();
    launch!(
        emu,
        "add_assign",
        launch::elementwise(n),
        (*mut f32, *const f32, i64),
        (acc.as_mut_ptr(), up.as_ptr(), n as i64)
    );
    let want: Vec<f32> = x.iter().zip(&up).map(|(a, b)| a + b).collect();
    assert_eq!(acc, want, "add_assign");

    // to_bf16: round to nearest even, as half/torch do.
    let mut bits = vec![0u16; n];
    launch!(
        emu,
        "to_bf16",
        launch::elementwise(n),
        (*mut u16, *const f32, i64),
        (bits.as_mut_ptr(), x.as_ptr(), n as i64)
    );
    let want: Vec<u16> = x
        .iter()
        .map(|&v| half::bf16::from_f32(v).to_bits())
        .collect();
    assert_eq!(bits, want, "to_bf16");

    // gather_rows.
    let pick = [6u32, 0, 3, 3];
    let mut out = vec![0f32; pick.len() * d];
    launch!(
        emu,
        "gather_rows",
        launch::elementwise(pick.len() * d),
        (*mut f32, *const f32, *const u32, i32, i32),
        (out.as_mut_ptr(), x.as_ptr(), pick.as_ptr(), 4, d as i32)
    );
    let idx: Vec<usize> = pick.iter().map(|&r| r as usize).collect();
    assert_eq!(out, cpu.gather_rows(&matrix(x.clone(), rows, d), &idx).data);

    // embed: rows of a bf16 table.
    let (vocab, dim) = (50, 40);
    let table: Vec<u16> = values(vocab * dim, 10)
        .iter()
        .map(|&v| half::bf16::from_f32(v).to_bits())
        .collect();
    let ids = [3u32, 49, 0, 3];
    let mut out = vec![0f32; ids.len() * dim];
    launch!(
        emu,
        "embed",
        launch::elementwise(ids.len() * dim),
        (*mut f32, *const u16, *const u32, i32, i32),
        (
            out.as_mut_ptr(),
            table.as_ptr(),
            ids.as_ptr(),
            4,
            dim as i32
        )
    );
    for (r, &id) in ids.iter().enumerate() {
        for c in 0..dim {
            let want = half::bf16::from_bits(table[id as usize * dim + c]).to_f32();
            assert_eq!(out[r * dim + c], want, "embed");
        }
    }
}

#[test]
fn rope_matches_the_cpu_backend() {
    let Some(emu) = emu() else { return };
    let (rows, hd, heads, max_pos) = (9, 16, 3, 32);
    let half = hd / 2;
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    for p in 0..max_pos {
        for i in 0..half {
            let a = p as f64 / 10000f64.powf(2.0 * i as f64 / hd as f64);
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    let positions: Vec<u32> = (0..rows as u32).map(|r| (r * 7) % 31).collect();
    let x = values(rows * heads * hd, 11);
    let mut got = x.clone();
    let cols = heads * hd;
    launch!(
        emu,
        "rope",
        launch::elementwise(rows * cols / 2),
        (*mut f32, *const u32, *const f32, *const f32, i32, i32, i32),
        (
            got.as_mut_ptr(),
            positions.as_ptr(),
            cos.as_ptr(),
            sin.as_ptr(),
            rows as i32,
            cols as i32,
            hd as i32
        )
    );
    let mut want = matrix(x, rows, cols);
    CpuBackend::default().rope(
        &mut want,
        hd,
        &positions,
        &matrix(cos, max_pos, half),
        &matrix(sin, max_pos, half),
    );
    assert!(max_abs_diff(&got, &want.data) < 1e-6);
}

/// `head_partials` on the emulation, with the inputs `CudaBackend::head_partials`
/// uploads; the top-k slots start at -7, to show the ones never written.
fn emulated_head(
    emu: &Emu,
    logits: &[f32],
    vocab: Range<usize>,
    queries: &[Query],
    floors: &[u32],
) -> launch::HeadOutputs {
    let hq = launch::head_queries(queries, floors);
    let p = hq.cond.len();
    let slots = p * launch::HEAD_TOP_MAX;
    let mut out = launch::HeadOutputs {
        score: vec![0.0; p],
        token: vec![0; p],
        logit: vec![0.0; p],
        lse: vec![0.0; p],
        mean: vec![0.0; p],
        max: vec![0.0; p],
        top_logit: vec![0.0; slots],
        top_token: vec![-7; slots],
    };
    launch!(
        emu,
        "head_partials",
        launch::head_geometry(p),
        (
            *mut f64,
            *mut u32,
            *mut f64,
            *mut f64,
            *mut f64,
            *mut f64,
            *mut f64,
            *mut i32,
            *const f32,
            i32,
            i32,
            *const u32,
            *const i32,
            *const u64,
            *const f64,
            *const f64,
            *const u32,
            *const u32,
            *const u32,
            *const u32
        ),
        (
            out.score.as_mut_ptr(),
            out.token.as_mut_ptr(),
            out.logit.as_mut_ptr(),
            out.lse.as_mut_ptr(),
            out.mean.as_mut_ptr(),
            out.max.as_mut_ptr(),
            out.top_logit.as_mut_ptr(),
            out.top_token.as_mut_ptr(),
            logits.as_ptr(),
            vocab.len() as i32,
            vocab.start as i32,
            hq.cond.as_ptr(),
            hq.uncond.as_ptr(),
            hq.keys.as_ptr(),
            hq.temperature.as_ptr(),
            hq.cfg_scale.as_ptr(),
            hq.mask.as_ptr(),
            hq.eos.as_ptr(),
            hq.flags.as_ptr(),
            hq.floors.as_ptr()
        )
    );
    out
}

/// `head_histograms` on the emulation, with the inputs
/// `CudaBackend::head_histograms` uploads (launched even when no position
/// has a round); the bins start at a sentinel, to show that the kernel
/// writes every one.
fn emulated_histograms(
    emu: &Emu,
    logits: &[f32],
    vocab: Range<usize>,
    queries: &[Query],
    rounds: &[Option<Round>],
) -> Vec<Bins> {
    let hq = launch::head_queries(queries, &[]);
    let p = hq.cond.len();
    let hr = launch::head_rounds(rounds, p);
    let (mut count, mut mass) = (vec![0xDEADu64; p * BINS], vec![0xBEEFu64; p * BINS]);
    launch!(
        emu,
        "head_histograms",
        launch::head_geometry(p),
        (
            *mut u64,
            *mut u64,
            *const f32,
            i32,
            i32,
            *const u32,
            *const i32,
            *const f64,
            *const u32,
            *const u32,
            *const u32,
            *const u32,
            *const f64
        ),
        (
            count.as_mut_ptr(),
            mass.as_mut_ptr(),
            logits.as_ptr(),
            vocab.len() as i32,
            vocab.start as i32,
            hq.cond.as_ptr(),
            hq.uncond.as_ptr(),
            hq.cfg_scale.as_ptr(),
            hq.mask.as_ptr(),
            hq.eos.as_ptr(),
            hq.flags.as_ptr(),
            hr.keys.as_ptr(),
            hr.scale.as_ptr()
        )
    );
    launch::head_bins(&count, &mass)
}

/// The head tests' options: EOS 3100, EoT 3101 and the mask 3999 in the
/// vocabulary slice 3000..4000.
fn head_options(temperature: f64, cfg_scale: f64, logits_eos_inf: bool) -> PredictOptions {
    PredictOptions {
        temperature,
        cfg_scale,
        logits_eos_inf,
        seed: 42,
        eos: 3100,
        eot: Some(3101),
        mask: 3999,
        remasking: Remasking::LowConfidence,
        confidence_eos_eot_inf: false,
        top_logprobs: 0,
        truncate: remask_sampler::Truncate::OFF,
    }
}

/// Greedy, Gumbel (temperature), guidance with the prompt-masked twin,
/// the EOS logit at -inf, top-k logprobs of 0, 3 and 5: 8 positions.
fn head_test_queries() -> Vec<Query> {
    let with_top = |o: PredictOptions, k: u8| PredictOptions {
        top_logprobs: k,
        ..o
    };
    vec![
        Query {
            cond_base: 0,
            uncond_base: None,
            first: 0,
            positions: vec![0, 2, 5],
            step: 3,
            options: head_options(0.0, 0.0, false),
        },
        Query {
            cond_base: 10,
            uncond_base: Some(20),
            first: 0,
            positions: vec![1, 4, 6, 7],
            step: 7,
            options: with_top(head_options(0.8, 1.5, true), 3),
        },
        Query {
            cond_base: 30,
            uncond_base: None,
            first: 0,
            positions: vec![3],
            step: 0,
            options: with_top(head_options(1.0, 0.0, true), 5),
        },
    ]
}

/// Logits as the head leaves them for `queries` (one row per queried row,
/// `width` wide), a planted winner on the EOS id (column 100) and the mask
/// (column 999) in some rows.
fn head_test_logits(queries: &[Query], width: usize) -> Vec<f32> {
    let rows = remask_engine::query_rows(queries).len();
    let mut logits: Vec<f32> = values(rows * width, 12).iter().map(|x| x * 6.0).collect();
    for r in 0..rows {
        if r % 2 == 0 {
            logits[r * width + 100] = 20.0;
        }
        logits[r * width + 999] = 25.0;
    }
    logits
}

/// One kernel partial against the host's: the same token, the numbers up
/// to the rounding of the reductions, the top-k and the maximum exactly.
fn assert_partial(got: &Partial, want: &Partial, what: &str) {
    assert_eq!(got.token, want.token, "{what}: token");
    assert!(
        got.score == want.score
            || (got.score - want.score).abs() <= 1e-9 * want.score.abs().max(1.0),
        "{what}: score {} vs {}",
        got.score,
        want.score
    );
    assert!((got.logit - want.logit).abs() <= 1e-6, "{what}: logit");
    assert!(
        (got.lse - want.lse).abs() <= 1e-6 * want.lse.abs().max(1.0),
        "{what}: lse"
    );
    // The softmax-weighted mean logit, which gives the entropy.
    assert!(
        (got.mean_logit - want.mean_logit).abs() <= 1e-6 * want.mean_logit.abs().max(1.0),
        "{what}: mean logit {} vs {}",
        got.mean_logit,
        want.mean_logit
    );
    // The top-k: the same tokens in the same order, the same logits (f32
    // values, exactly).
    assert_eq!(got.top, want.top, "{what}: top-k");
    assert_eq!(got.max, want.max, "{what}: max");
}

/// The fused head reduction against the host's `partial_queries`, with a
/// vocabulary slice that does not start at 0, untruncated and then with
/// the draw truncated to floors: one that excludes the untruncated winner,
/// one exactly at its key, one in the middle of the logits, one that keeps
/// nothing, 0; greedy positions ignore theirs.
#[test]
fn head_partials_match_the_host_reduction() {
    let Some(emu) = emu() else { return };
    let (width, vocab) = (1000, 3000..4000);
    let queries = head_test_queries();
    let logits = head_test_logits(&queries, width);
    let untruncated: Vec<Partial> = partial_queries(&logits, vocab.clone(), &queries, &[])
        .into_iter()
        .flatten()
        .collect();
    let key = remask_sampler::truncate::key;
    let winner = |i: usize| key(untruncated[i].logit as f32);
    let floors = [
        // Greedy (query 0).
        key(4.0),
        u32::MAX,
        0,
        // Temperature 0.8 with guidance (query 1), and 1.0 (query 2).
        winner(3),
        winner(4) + 1,
        key(4.0),
        u32::MAX,
        0,
    ];
    for floors in [&[][..], &floors] {
        let want = partial_queries(&logits, vocab.clone(), &queries, floors);
        let out = emulated_head(emu, &logits, vocab.clone(), &queries, floors);
        let got = launch::head_partials(&queries, &out);
        let hq = launch::head_queries(&queries, floors);
        let p = hq.cond.len();
        for (i, (g, w)) in got.iter().flatten().zip(want.iter().flatten()).enumerate() {
            assert_partial(g, w, &format!("floors {floors:?}: position {i}"));
            // Top-k slots past k are never written.
            let k = (hq.flags[i] >> 1) as usize;
            assert!(k == 0 || g.top.len() == k);
            assert!(
                out.top_token[i * launch::HEAD_TOP_MAX + k..(i + 1) * launch::HEAD_TOP_MAX]
                    .iter()
                    .all(|&t| t == -7)
            );
        }
        assert_eq!(got.iter().flatten().count(), p);
        assert!(hq.flags.iter().any(|&f| f >> 1 == 5));
        // The planted mask never wins.
        assert!(out.token.iter().all(|&t| t != 3999));
    }
    // The truncation did what it says: greedy positions and floors that
    // keep the winner draw the untruncated token, a floor above it another,
    // a floor above everything cannot win.
    let truncated: Vec<Partial> = partial_queries(&logits, vocab.clone(), &queries, &floors)
        .into_iter()
        .flatten()
        .collect();
    for i in [0, 1, 2, 3, 7] {
        assert_eq!(truncated[i].token, untruncated[i].token, "position {i}");
    }
    assert_ne!(truncated[4].token, untruncated[4].token);
    assert!(truncated[4].score.is_finite() && truncated[5].score.is_finite());
    assert_eq!(truncated[6].score, f64::NEG_INFINITY);
}

/// `head_histograms` against the host's `histogram_queries`, bin for bin:
/// count-only (top-k) and mass (top-p) rounds, with and without a floor,
/// at every level with the prefix of a token of the row, and positions
/// without a round (zero bins), over the slice 3000..4000 with guidance and
/// the EOS logit at -inf.
#[test]
fn head_histograms_match_the_host_select() {
    let Some(emu) = emu() else { return };
    let (width, vocab) = (1000, 3000..4000);
    let queries = head_test_queries();
    let logits = head_test_logits(&queries, width);
    let partials: Vec<Partial> = partial_queries(&logits, vocab.clone(), &queries, &[])
        .into_iter()
        .flatten()
        .collect();
    let key = remask_sampler::truncate::key;
    let round = |i: usize, level: u32, floor: u32, temperature: f64| {
        // The digits above `level` of the row's greedy winner: its bin at
        // that level holds at least it.
        let winner = key(partials[i].logit as f32);
        let prefix = if level == 0 {
            0
        } else {
            winner & !(u32::MAX >> (8 * level))
        };
        Some(Round {
            floor,
            prefix,
            level,
            temperature,
            max: partials[i].max,
        })
    };
    let rounds = [
        None,
        round(1, 0, 0, 0.0),
        round(2, 0, key(2.0), 0.7),
        round(3, 1, 0, 0.0),
        round(4, 2, key(1.0), 1.0),
        round(5, 3, 0, 0.0),
        round(6, 3, 0, 1.3),
        None,
    ];
    let want = histogram_queries(&logits, vocab.clone(), &queries, &rounds);
    let got = emulated_histograms(emu, &logits, vocab.clone(), &queries, &rounds);
    assert_eq!(got.len(), rounds.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "position {i}: {:?}", rounds[i]);
        let counted: u64 = g.count.iter().sum();
        let weighed: u64 = g.mass.iter().sum();
        match rounds[i] {
            None => assert_eq!((counted, weighed), (0, 0), "position {i}"),
            Some(r) => {
                assert!(counted > 0, "position {i}: nothing counted");
                assert_eq!(weighed > 0, r.temperature > 0.0, "position {i}");
            }
        }
    }
    // The first level-0 count round sees every finite guided logit: the
    // mask (and here no EOS: flag 0) excluded.
    assert_eq!(got[1].count.iter().sum::<u64>(), width as u64 - 1);
    // No round anywhere: all zeros.
    let none = emulated_histograms(emu, &logits, vocab, &queries, &[]);
    assert!(none.iter().all(|b| *b == Bins::default()));
}

/// The whole truncated draw as the engine runs it on two GPUs, each
/// holding half the vocabulary: untruncated partials (their maxima), the
/// select's rounds on the emulated `head_histograms`, the thresholds, the
/// truncated partials, `combine`; against `predict` on the whole rows, and
/// each threshold against `truncate::threshold` on the whole guided row.
#[test]
fn truncated_draws_over_two_slices_match_the_whole_row() {
    let Some(emu) = emu() else { return };
    let width = 1000;
    let slices = [0..600, 600..1000];
    let truncated = |temperature: f64, cfg_scale: f64, top_k: u32, top_p: f64| PredictOptions {
        temperature,
        cfg_scale,
        logits_eos_inf: true,
        seed: 9,
        eos: 100,
        eot: None,
        mask: 999,
        remasking: Remasking::LowConfidence,
        confidence_eos_eot_inf: false,
        top_logprobs: 0,
        truncate: remask_sampler::Truncate { top_k, top_p },
    };
    let query = |cond_base: usize, uncond: bool, options: PredictOptions| Query {
        cond_base,
        uncond_base: uncond.then_some(cond_base + 8),
        first: 0,
        positions: (0..8).collect(),
        step: 2,
        options,
    };
    let queries = vec![
        query(0, false, truncated(1.0, 0.0, 5, 1.0)),
        query(8, true, truncated(0.7, 1.0, 0, 0.9)),
        query(24, false, truncated(1.2, 0.0, 50, 0.5)),
        query(32, false, truncated(1.0, 0.0, 1, 1.0)),
        // Greedy and untruncated: no select.
        query(40, false, truncated(0.0, 0.0, 3, 0.5)),
        query(48, false, truncated(1.0, 0.0, 0, 1.0)),
    ];
    let logits = head_test_logits(&queries, width);
    let rows = logits.len() / width;
    let slice_logits: Vec<Vec<f32>> = slices
        .iter()
        .map(|s| {
            (0..rows)
                .flat_map(|r| {
                    logits[r * width..(r + 1) * width][s.clone()]
                        .iter()
                        .copied()
                })
                .collect()
        })
        .collect();
    let partials = |floors: &[u32]| -> Vec<Vec<Vec<Partial>>> {
        slices
            .iter()
            .zip(&slice_logits)
            .map(|(s, l)| {
                launch::head_partials(
                    &queries,
                    &emulated_head(emu, l, s.clone(), &queries, floors),
                )
            })
            .collect()
    };
    let mut rounds = 0;
    let floors = run_selects(selects(&partials(&[]), &queries), |round| {
        rounds += 1;
        slices
            .iter()
            .zip(&slice_logits)
            .map(|(s, l)| emulated_histograms(emu, l, s.clone(), &queries, round))
            .collect()
    });
    assert!(rounds > 0 && rounds <= 8, "{rounds} rounds");
    let predictions = combine_ranks(&partials(&floors), &queries);
    let (mut i, mut scratch) = (0, Vec::new());
    for (qi, q) in queries.iter().enumerate() {
        let n = q.positions.len();
        let first = query_rows(&queries[..qi]).len();
        for (j, &pos) in q.positions.iter().enumerate() {
            let row = |r: usize| &logits[r * width..(r + 1) * width];
            let cond = row(first + j);
            let un = q.uncond_base.map(|_| row(first + n + j));
            let want = predict(cond, un, &q.options, q.step, pos as u64, &mut scratch);
            let got = predictions[qi][j];
            assert_eq!(got.token, want.token, "query {qi} position {pos}");
            assert!((got.confidence - want.confidence).abs() < 1e-9);
            guided_logits(cond, un, 0, &q.options, &mut scratch);
            let threshold = remask_sampler::truncate::threshold(&[&scratch], &q.options);
            assert_eq!(floors[i], threshold, "query {qi} position {pos}");
            let kept = scratch
                .iter()
                .filter(|&&l| l.is_finite() && remask_sampler::truncate::key(l) >= floors[i])
                .count();
            match q.options.truncate.top_k {
                _ if qi >= 4 => assert_eq!(floors[i], 0),
                1 => assert_eq!(kept, 1),
                5 => assert_eq!(kept, 5),
                _ => assert!((1..999).contains(&kept), "query {qi}: {kept} kept"),
            }
            i += 1;
        }
    }
}

// ------------------------------------------------------ generated weights

/// `init_normal_bf16` draws generated weights on the GPU: it must give
/// exactly the bf16 bits of the host path (`GeneratedTensor::bf16_bytes`, the
/// bytes of the files `model init --dtype bf16` writes), for whole tensors
/// and tensor-parallel blocks. On a GPU, `log` and `cos` in double may differ
/// from the host's libm in the last bit, which changes a bf16 value only in
/// the rarest cases; everything else (hash, index, Box-Muller, rounding) is
/// checked here.
/// The block `rows` x `cols` of `t` drawn by `init_normal_bf16`, launched
/// as `CudaBackend::generated_weight` launches it.
fn kernel_block(
    emu: &Emu,
    t: &GeneratedTensor,
    rows: Range<usize>,
    cols: Range<usize>,
) -> Vec<u16> {
    let n = rows.len() * cols.len();
    let mut out = vec![0xffffu16; n];
    let (stddev, one_plus) = match t.init {
        Init::Normal(s) => (s, 0),
        Init::OnePlus(s) => (s, 1),
    };
    launch!(
        emu,
        "init_normal_bf16",
        launch::elementwise(n),
        (*mut u16, i32, i32, i64, i64, i64, u64, u64, f32, i32),
        (
            out.as_mut_ptr(),
            rows.len() as i32,
            cols.len() as i32,
            t.shape[1] as i64,
            rows.start as i64,
            cols.start as i64,
            t.seed,
            t.tensor,
            stddev,
            one_plus
        )
    );
    out
}

fn host_block(t: &GeneratedTensor, rows: Range<usize>, cols: Range<usize>) -> Vec<u16> {
    t.bf16_bytes(rows, cols)
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .collect()
}

#[test]
fn generated_weights_are_the_host_values_bit_for_bit() {
    let Some(emu) = emu() else { return };
    let tiny = Preset::get("tiny").unwrap();
    // The tiny preset's matrices as a checkpoint of seed 5 describes them.
    let dir = tempfile::tempdir().unwrap();
    let opts = remask_model::InitOptions {
        seed: 5,
        generated: true,
        ..Default::default()
    };
    remask_model::init_checkpoint(tiny, &opts, dir.path()).unwrap();
    let ckpt = remask_model::Checkpoint::open(dir.path()).unwrap();
    let (d, e, mlp) = (tiny.d_model, tiny.embedding_size, tiny.mlp_hidden_size);
    let mut checked = 0;
    for (name, shape) in [
        ("model.transformer.wte.weight", [e, d]),
        ("model.transformer.blocks.0.k_proj.weight", [32, d]),
        ("model.transformer.blocks.1.ff_out.weight", [d, mlp]),
        ("model.transformer.ff_out.weight", [e, d]),
    ] {
        let remask_model::WeightSource::Generated(t) = ckpt.weight(name, &shape).unwrap() else {
            panic!("{name} is not generated")
        };
        let (r, c) = (shape[0], shape[1]);
        // The whole tensor, a column-parallel and a row-parallel block, and
        // an odd block that does not fill the last thread block.
        for (rows, cols) in [
            (0..r, 0..c),
            (r / 2..r, 0..c),
            (0..r, c / 2..c),
            (3..r - 5, 7..c - 2),
        ] {
            assert_eq!(
                kernel_block(emu, &t, rows.clone(), cols.clone()),
                host_block(&t, rows.clone(), cols.clone()),
                "{name} rows {rows:?} cols {cols:?}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 16);
    // OnePlus (the + 1 rounded apart from the product), and element indices
    // past 2^32 (the llada-8b head holds 5.2e8 elements; this is safer).
    for (init, shape, rows) in [
        (Init::OnePlus(0.1), vec![40, 70], 0..40),
        (
            Init::Normal(0.02),
            vec![3_000_000, 4096],
            2_999_000..2_999_003,
        ),
    ] {
        let t = GeneratedTensor {
            seed: 123,
            tensor: 9,
            init,
            shape: shape.clone(),
        };
        let cols = 0..shape[1];
        assert_eq!(
            kernel_block(emu, &t, rows.clone(), cols.clone()),
            host_block(&t, rows, cols),
            "{init:?} {shape:?}"
        );
    }
}
