//! How the CUDA kernels (`cuda/kernels.cu`) are launched: grid, block,
//! shared memory and the small index arrays the host prepares for them.
//! Plain Rust without the CUDA libraries, so that the CPU emulation test
//! (`tests/kernels_emulated.rs`) runs the kernels under exactly the plans the
//! GPU gets.

use crate::backend::{Heads, Packing};
use crate::query::{Query, query_rows};
use remask_sampler::Partial;
use remask_sampler::rng::{NoiseKey, Stream};
use remask_sampler::truncate::{BINS, Bins, Round};

/// The CUDA source of every kernel.
pub const KERNELS: &str = include_str!("cuda/kernels.cu");

/// Threads per block of the element-wise kernels.
pub const BLOCK: u32 = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_bytes: u32,
}

/// One thread per element, `BLOCK` per block.
pub fn elementwise(n: usize) -> Geometry {
    Geometry {
        grid: ((n as u32).div_ceil(BLOCK).max(1), 1, 1),
        block: (BLOCK, 1, 1),
        shared_bytes: 0,
    }
}

/// One block of `BLOCK` threads per row.
pub fn per_row(rows: usize) -> Geometry {
    Geometry {
        grid: (rows.max(1) as u32, 1, 1),
        block: (BLOCK, 1, 1),
        shared_bytes: 0,
    }
}

/// Query rows per block of the tiled attention kernel (4 warps of 16).
pub const ATTENTION_TILE: usize = 64;

/// Which attention kernel runs, on what.
#[derive(Clone, Debug, PartialEq)]
pub enum AttentionPlan {
    /// `attention_tc_<head_dim>`: tensor cores, flash-style; `tiles` holds
    /// (first query row, end, sequence start, sequence end) per block.
    Tiled {
        kernel: &'static str,
        tiles: Vec<u32>,
        geometry: Geometry,
    },
    /// `attention`: one block per (row, head), for other head dims; `start`
    /// and `len` give each row's sequence.
    Rows {
        start: Vec<u32>,
        len: Vec<u32>,
        geometry: Geometry,
    },
}

/// The head dims with a tiled kernel (multiples of 16 up to 128).
pub fn tiled_attention_kernel(head_dim: usize) -> Option<&'static str> {
    match head_dim {
        16 => Some("attention_tc_16"),
        32 => Some("attention_tc_32"),
        64 => Some("attention_tc_64"),
        128 => Some("attention_tc_128"),
        _ => None,
    }
}

/// The plan for `heads`, the query rows of each sequence (`queries`)
/// attending to its key rows (`keys`; the same packing but for a step that
/// reads a K/V store): tiled where the head dim allows and `tiled` is set
/// (`REMASK_CUDA_ATTENTION=rows` clears it, to compare the two kernels on
/// one GPU or to step around the tiled one). Both kernels index queries and
/// keys separately, so neither needs to know which case it is.
pub fn attention(heads: Heads, queries: &Packing, keys: &Packing, tiled: bool) -> AttentionPlan {
    let pairs = || queries.sequences().zip(keys.sequences());
    if let Some(kernel) = tiled_attention_kernel(heads.head_dim).filter(|_| tiled) {
        let mut tiles = Vec::new();
        for (qseq, kseq) in pairs() {
            for q0 in qseq.clone().step_by(ATTENTION_TILE) {
                let q_end = (q0 + ATTENTION_TILE).min(qseq.end);
                tiles.extend([q0, q_end, kseq.start, kseq.end].map(|v| v as u32));
            }
        }
        let n = (tiles.len() / 4) as u32;
        return AttentionPlan::Tiled {
            kernel,
            tiles,
            geometry: Geometry {
                grid: (n.max(1), heads.n_heads as u32, 1),
                block: (128, 1, 1),
                shared_bytes: 0,
            },
        };
    }
    let (mut start, mut len, mut longest) = (Vec::new(), Vec::new(), 0);
    for (qseq, kseq) in pairs() {
        longest = longest.max(kseq.len());
        for _ in qseq {
            start.push(kseq.start as u32);
            len.push(kseq.len() as u32);
        }
    }
    AttentionPlan::Rows {
        geometry: Geometry {
            grid: (start.len().max(1) as u32, heads.n_heads as u32, 1),
            block: (128, 1, 1),
            shared_bytes: (longest * 4) as u32,
        },
        start,
        len,
    }
}

/// The per-position inputs of the fused head reduction (`head_partials`),
/// one entry per queried position in `query_rows` order of the conditional
/// rows.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HeadQueries {
    /// Row of the position's logits.
    pub cond: Vec<u32>,
    /// Row of its prompt-masked twin under guidance, else -1.
    pub uncond: Vec<i32>,
    /// The Gumbel key of (seed, step, position).
    pub keys: Vec<u64>,
    pub temperature: Vec<f64>,
    pub cfg_scale: Vec<f64>,
    pub mask: Vec<u32>,
    pub eos: Vec<u32>,
    /// Bit 0: the EOS logit is set to -inf; bits 1 and up: how many of the
    /// largest guided logits to return (`top_logprobs`, at most
    /// `HEAD_TOP_MAX`).
    pub flags: Vec<u32>,
    /// The draw keeps the keys at least this (a truncated draw's
    /// threshold; 0: every token).
    pub floors: Vec<u32>,
}

/// The inputs of `queries`, the draw of queried position `i` (in query
/// order) truncated to `floors[i]` (`Backend::head_partials`; empty or
/// short: 0 for the rest).
pub fn head_queries(queries: &[Query], floors: &[u32]) -> HeadQueries {
    let mut h = HeadQueries::default();
    let mut first = 0u32;
    for q in queries {
        let n = q.positions.len() as u32;
        for (j, &pos) in q.positions.iter().enumerate() {
            h.cond.push(first + j as u32);
            h.uncond
                .push(q.uncond_base.map_or(-1, |_| (first + n + j as u32) as i32));
            h.keys
                .push(NoiseKey::new(q.options.seed, Stream::Gumbel, q.step, pos as u64).raw());
            h.temperature.push(q.options.temperature);
            h.cfg_scale.push(q.options.cfg_scale);
            h.mask.push(q.options.mask);
            h.eos.push(q.options.eos);
            let k = (q.options.top_logprobs as u32).min(HEAD_TOP_MAX as u32);
            h.flags.push(u32::from(q.options.logits_eos_inf) | (k << 1));
            h.floors
                .push(floors.get(h.floors.len()).copied().unwrap_or(0));
        }
        first += if q.uncond_base.is_some() { 2 * n } else { n };
    }
    debug_assert_eq!(first as usize, query_rows(queries).len());
    h
}

/// Slots per position of the head reduction's top-k outputs
/// (`HEAD_TOP_MAX` in kernels.cu; `remask_sampler::MAX_TOP_LOGPROBS`).
pub const HEAD_TOP_MAX: usize = remask_sampler::MAX_TOP_LOGPROBS;

/// The head reduction's top-k outputs of position `i` (`out_top_logit`,
/// `out_top_token`, `HEAD_TOP_MAX` slots per position, the first `k`
/// written) as a slice's `TopK`: guided logits, ids -1 past the end.
pub fn head_top(logits: &[f64], tokens: &[i32], i: usize, k: usize) -> remask_sampler::TopK {
    let mut top = remask_sampler::TopK::default();
    for j in 0..k.min(HEAD_TOP_MAX) {
        let (l, t) = (logits[i * HEAD_TOP_MAX + j], tokens[i * HEAD_TOP_MAX + j]);
        if t >= 0 {
            top.insert(k, t as u32, l);
        }
    }
    top
}

/// What `head_partials` writes, back on the host: one entry per queried
/// position, and `HEAD_TOP_MAX` top-k slots per position (empty when no
/// position asks for top logprobs).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HeadOutputs {
    pub score: Vec<f64>,
    pub token: Vec<u32>,
    pub logit: Vec<f64>,
    pub lse: Vec<f64>,
    pub mean: Vec<f64>,
    pub max: Vec<f64>,
    pub top_logit: Vec<f64>,
    pub top_token: Vec<i32>,
}

/// The kernel's outputs as each query's partials (what the host's
/// `partial_queries` returns).
pub fn head_partials(queries: &[Query], out: &HeadOutputs) -> Vec<Vec<Partial>> {
    let mut i = 0;
    queries
        .iter()
        .map(|q| {
            let k = (q.options.top_logprobs as usize).min(HEAD_TOP_MAX);
            q.positions
                .iter()
                .map(|_| {
                    let part = Partial {
                        score: out.score[i],
                        token: out.token[i],
                        logit: out.logit[i],
                        lse: out.lse[i],
                        mean_logit: out.mean[i],
                        top: head_top(&out.top_logit, &out.top_token, i, k),
                        max: out.max[i],
                    };
                    i += 1;
                    part
                })
                .collect()
        })
        .collect()
}

/// The per-position inputs of `head_histograms` for one select round, in
/// query order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HeadRounds {
    /// (active, floor, prefix, level) per position; active 0: the position
    /// has no round, and its bins stay zero.
    pub keys: Vec<u32>,
    /// (temperature, max) per position: what the masses are relative to.
    pub scale: Vec<f64>,
}

/// The rounds of `positions` queried positions (`rounds` short: no round
/// for the rest, as `histogram_queries` reads them).
pub fn head_rounds(rounds: &[Option<Round>], positions: usize) -> HeadRounds {
    let mut h = HeadRounds::default();
    for i in 0..positions {
        match rounds.get(i).copied().flatten() {
            Some(r) => {
                h.keys.extend([1, r.floor, r.prefix, r.level]);
                h.scale.extend([r.temperature, r.max]);
            }
            None => {
                h.keys.extend([0; 4]);
                h.scale.extend([0.0; 2]);
            }
        }
    }
    h
}

/// `head_histograms`' bins (`BINS` counts and masses per position) as one
/// `Bins` per position.
pub fn head_bins(count: &[u64], mass: &[u64]) -> Vec<Bins> {
    count
        .chunks_exact(BINS)
        .zip(mass.chunks_exact(BINS))
        .map(|(c, m)| Bins {
            count: c.try_into().expect("BINS counts"),
            mass: m.try_into().expect("BINS masses"),
        })
        .collect()
}

/// `head_partials` and `head_histograms`: one block of 256 threads per
/// queried position.
pub fn head_geometry(positions: usize) -> Geometry {
    Geometry {
        grid: (positions.max(1) as u32, 1, 1),
        block: (256, 1, 1),
        shared_bytes: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_tiles_cover_every_row_once_within_its_sequence() {
        let heads = Heads {
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 64,
        };
        let packing = Packing::new([1, 64, 65, 130, 7]);
        let AttentionPlan::Tiled {
            kernel,
            tiles,
            geometry,
        } = attention(heads, &packing, &packing, true)
        else {
            panic!("head dim 64 is tiled")
        };
        assert_eq!(kernel, "attention_tc_64");
        let mut covered = vec![0; packing.tokens()];
        for t in tiles.chunks_exact(4) {
            let (q0, q1, s0, s1) = (t[0] as usize, t[1] as usize, t[2] as usize, t[3] as usize);
            assert!(s0 <= q0 && q0 < q1 && q1 <= s1 && q1 - q0 <= ATTENTION_TILE);
            assert!(packing.sequences().any(|s| s == (s0..s1)));
            for c in &mut covered[q0..q1] {
                *c += 1;
            }
        }
        assert!(covered.iter().all(|&c| c == 1));
        assert_eq!(geometry.grid, ((tiles.len() / 4) as u32, 4, 1));
    }

    #[test]
    fn other_head_dims_fall_back_to_rows() {
        let heads = Heads {
            n_heads: 2,
            n_kv_heads: 2,
            head_dim: 24,
        };
        let p = Packing::new([3, 5]);
        let plan = attention(heads, &p, &p, true);
        let AttentionPlan::Rows {
            start,
            len,
            geometry,
        } = plan
        else {
            panic!("head dim 24 has no tiled kernel")
        };
        assert_eq!(start, [0, 0, 0, 3, 3, 3, 3, 3]);
        assert_eq!(len, [3, 3, 3, 5, 5, 5, 5, 5]);
        assert_eq!(geometry.shared_bytes, 20);
        // Head dims with a tiled kernel take the row kernel when asked.
        let h64 = Heads {
            head_dim: 64,
            ..heads
        };
        let p = Packing::new([3, 5]);
        let plan = attention(h64, &p, &p, false);
        assert!(matches!(plan, AttentionPlan::Rows { .. }));
    }
}
