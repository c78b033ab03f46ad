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
use remask_engine::{CpuBackend, Matrix, Query, partial_queries};
use remask_model::{GeneratedTensor, Init, Preset};
use remask_sampler::{PredictOptions, Remasking};
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

/// The fused head reduction against the host's `partial_queries`: greedy,
/// Gumbel (temperature), guidance with the prompt-masked twin, the EOS
/// logit at -inf, and a vocabulary slice that does not start at 0.
#[test]
fn head_partials_match_the_host_reduction() {
    let Some(emu) = emu() else { return };
    let width = 1000;
    let vocab = 3000..4000;
    let options = |temperature: f64, cfg_scale: f64, logits_eos_inf: bool| PredictOptions {
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
    };
    // Top-k of 0 (the default), 3 and 5 in one launch.
    let with_top = |o: PredictOptions, k: u8| PredictOptions {
        top_logprobs: k,
        ..o
    };
    let queries = vec![
        Query {
            cond_base: 0,
            uncond_base: None,
            first: 0,
            positions: vec![0, 2, 5],
            step: 3,
            options: options(0.0, 0.0, false),
        },
        Query {
            cond_base: 10,
            uncond_base: Some(20),
            first: 0,
            positions: vec![1, 4],
            step: 7,
            options: with_top(options(0.8, 1.5, true), 3),
        },
        Query {
            cond_base: 30,
            uncond_base: None,
            first: 0,
            positions: vec![3],
            step: 0,
            options: with_top(options(1.0, 0.0, true), 5),
        },
    ];
    let rows = remask_engine::query_rows(&queries).len();
    // Logits as the head leaves them: one row per queried row, a planted
    // winner on the EOS id and the mask id in some rows.
    let mut logits: Vec<f32> = values(rows * width, 12).iter().map(|x| x * 6.0).collect();
    for r in 0..rows {
        if r % 2 == 0 {
            logits[r * width + 100] = 20.0; // EOS (3100)
        }
        logits[r * width + 999] = 25.0; // the mask
    }
    let want = partial_queries(&logits, vocab.clone(), &queries, &[]);
    let hq = launch::head_queries(&queries);
    let p = hq.cond.len();
    let (mut score, mut token, mut logit, mut lse, mut mean) = (
        vec![0f64; p],
        vec![0u32; p],
        vec![0f64; p],
        vec![0f64; p],
        vec![0f64; p],
    );
    let slots = p * launch::HEAD_TOP_MAX;
    let (mut top_logit, mut top_token) = (vec![0f64; slots], vec![-7i32; slots]);
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
            *const u32
        ),
        (
            score.as_mut_ptr(),
            token.as_mut_ptr(),
            logit.as_mut_ptr(),
            lse.as_mut_ptr(),
            mean.as_mut_ptr(),
            top_logit.as_mut_ptr(),
            top_token.as_mut_ptr(),
            logits.as_ptr(),
            width as i32,
            vocab.start as i32,
            hq.cond.as_ptr(),
            hq.uncond.as_ptr(),
            hq.keys.as_ptr(),
            hq.temperature.as_ptr(),
            hq.cfg_scale.as_ptr(),
            hq.mask.as_ptr(),
            hq.eos.as_ptr(),
            hq.flags.as_ptr()
        )
    );
    let want: Vec<_> = want.into_iter().flatten().collect();
    assert_eq!(want.len(), p);
    for (i, w) in want.iter().enumerate() {
        assert_eq!(token[i], w.token, "position {i}: token");
        assert!(
            (score[i] - w.score).abs() <= 1e-9 * w.score.abs().max(1.0),
            "score {i}"
        );
        assert!((logit[i] - w.logit).abs() <= 1e-6, "logit {i}");
        assert!(
            (lse[i] - w.lse).abs() <= 1e-6 * w.lse.abs().max(1.0),
            "lse {i}"
        );
        // The softmax-weighted mean logit, which gives the entropy.
        assert!(
            (mean[i] - w.mean_logit).abs() <= 1e-6 * w.mean_logit.abs().max(1.0),
            "mean logit {i}: {} vs {}",
            mean[i],
            w.mean_logit
        );
        // The top-k: the same tokens in the same order, the same logits
        // (f32 values, exactly); slots past k never written.
        let k = (hq.flags[i] >> 1) as usize;
        let got = launch::head_top(&top_logit, &top_token, i, k);
        assert_eq!(got.len(), w.top.len(), "position {i}: top-k length");
        assert_eq!(got, w.top, "position {i}: top-k");
        assert!(k == 0 || got.len() == k);
        assert!(
            top_token[i * launch::HEAD_TOP_MAX + k..(i + 1) * launch::HEAD_TOP_MAX]
                .iter()
                .all(|&t| t == -7)
        );
    }
    assert!(hq.flags.iter().any(|&f| f >> 1 == 5));
    // The planted mask never wins; the EOS wins exactly where it is allowed.
    assert!(token.iter().all(|&t| t != 3999));
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
