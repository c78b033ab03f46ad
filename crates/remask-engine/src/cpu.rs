//! The CPU backend: f32 everywhere, matrix products through the `gemm` crate
//! (packed, SIMD micro-kernels) on rayon's thread pool.

use crate::backend::{Backend, Heads, Packing};
use crate::collective::Collective;
use crate::fastmath;
use rayon::prelude::*;
use remask_model::{Result, TensorRef};
use std::sync::Arc;

/// A row-major f32 matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct Matrix {
    pub data: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

impl Matrix {
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Matrix {
            data: vec![0.0; rows * cols],
            rows,
            cols,
        }
    }
}

/// The CPU backend; with a collective it is one rank of a tensor-parallel
/// group (ranks as threads, see `collective.rs`).
#[derive(Clone, Default)]
pub struct CpuBackend {
    comm: Option<Arc<dyn Collective>>,
}

impl CpuBackend {
    pub fn with_collective(comm: Arc<dyn Collective>) -> Self {
        CpuBackend { comm: Some(comm) }
    }
}

/// Query rows per attention task: bounds the score buffer to
/// `QUERY_CHUNK x seq_len` floats per thread for long sequences.
const QUERY_CHUNK: usize = 128;

/// A pointer that may cross threads; every task writes a disjoint region.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// Through a method, so closures capture the wrapper, not the raw field.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `dst[m x n] = lhs[m x k] * rhs[k x n]` with arbitrary strides
/// (row stride, column stride) for each operand.
#[allow(clippy::too_many_arguments)]
unsafe fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_strides: (isize, isize),
    lhs: *const f32,
    lhs_strides: (isize, isize),
    rhs: *const f32,
    rhs_strides: (isize, isize),
    parallelism: gemm::Parallelism,
) {
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            dst_strides.1,
            dst_strides.0,
            false,
            lhs,
            lhs_strides.1,
            lhs_strides.0,
            rhs,
            rhs_strides.1,
            rhs_strides.0,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

fn threads() -> gemm::Parallelism {
    match rayon::current_num_threads() {
        1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}

impl Backend for CpuBackend {
    type Tensor = Matrix;
    type Weight = Matrix;

    fn load_weight(&self, t: TensorRef<'_>) -> Result<Matrix> {
        let (rows, cols) = match t.shape {
            [n] => (1, *n),
            [r, c] => (*r, *c),
            _ => unreachable!("checkpoint tensors are checked to be 1-D or 2-D"),
        };
        let mut data = vec![0f32; rows * cols];
        // Widen in parallel: the 8B head alone is half a billion values.
        data.par_chunks_mut(1 << 16)
            .zip(t.bytes.par_chunks(t.dtype.size() << 16))
            .for_each(|(out, bytes)| {
                TensorRef {
                    bytes,
                    shape: t.shape,
                    dtype: t.dtype,
                }
                .write_f32(out)
            });
        Ok(Matrix { data, rows, cols })
    }

    fn upload(&self, values: &[f32], rows: usize, cols: usize) -> Matrix {
        assert_eq!(values.len(), rows * cols);
        Matrix {
            data: values.to_vec(),
            rows,
            cols,
        }
    }

    fn embed(&self, table: &Matrix, ids: &[u32]) -> Matrix {
        let d = table.cols;
        let mut out = Matrix::zeros(ids.len(), d);
        for (row, &id) in out.data.chunks_exact_mut(d).zip(ids) {
            let id = id as usize;
            row.copy_from_slice(&table.data[id * d..(id + 1) * d]);
        }
        out
    }

    fn rms_norm(&self, x: &Matrix, weight: &Matrix, eps: f32) -> Matrix {
        let mut out = Matrix::zeros(x.rows, x.cols);
        out.data
            .par_chunks_mut(x.cols)
            .zip(x.data.par_chunks(x.cols))
            .for_each(|(o, row)| {
                let ms = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
                let r = 1.0 / (ms + eps).sqrt();
                for ((o, &v), &w) in o.iter_mut().zip(row).zip(&weight.data) {
                    *o = v * r * w;
                }
            });
        out
    }

    fn linear(&self, x: &Matrix, w: &Matrix) -> Matrix {
        assert_eq!(
            x.cols, w.cols,
            "linear: input width {} vs weight [{}, {}]",
            x.cols, w.rows, w.cols
        );
        let (m, k, n) = (x.rows, x.cols, w.rows);
        let mut out = Matrix::zeros(m, n);
        // SAFETY: shapes checked above; W^T is read through strides.
        unsafe {
            matmul(
                m,
                n,
                k,
                out.data.as_mut_ptr(),
                (n as isize, 1),
                x.data.as_ptr(),
                (k as isize, 1),
                w.data.as_ptr(),
                (1, k as isize),
                threads(),
            );
        }
        out
    }

    fn rope(&self, x: &mut Matrix, head_dim: usize, positions: &[u32], cos: &Matrix, sin: &Matrix) {
        let half = head_dim / 2;
        x.data
            .par_chunks_mut(x.cols)
            .zip(positions)
            .for_each(|(row, &pos)| {
                let p = pos as usize * half;
                let (c, s) = (&cos.data[p..p + half], &sin.data[p..p + half]);
                for head in row.chunks_exact_mut(head_dim) {
                    let (a, b) = head.split_at_mut(half);
                    for i in 0..half {
                        let (x1, x2) = (a[i], b[i]);
                        a[i] = x1 * c[i] - x2 * s[i];
                        b[i] = x2 * c[i] + x1 * s[i];
                    }
                }
            });
    }

    fn attention(
        &self,
        q: &Matrix,
        k: &Matrix,
        v: &Matrix,
        h: Heads,
        queries: &Packing,
        keys: &Packing,
    ) -> Matrix {
        let hd = h.head_dim;
        let group = h.n_heads / h.n_kv_heads;
        let (qs, kvs) = (q.cols as isize, k.cols as isize);
        let scale = 1.0 / (hd as f32).sqrt();
        let mut out = Matrix::zeros(q.rows, q.cols);
        let out_ptr = SendPtr(out.data.as_mut_ptr());
        // (query rows of the sequence, its key rows, head, first query row)
        type Task = (std::ops::Range<usize>, std::ops::Range<usize>, usize, usize);
        let tasks: Vec<Task> = queries
            .sequences()
            .zip(keys.sequences())
            .flat_map(|(qseq, kseq)| {
                (0..h.n_heads).flat_map(move |head| {
                    let (qseq, kseq) = (qseq.clone(), kseq.clone());
                    (qseq.start..qseq.end)
                        .step_by(QUERY_CHUNK)
                        .map(move |q0| (qseq.clone(), kseq.clone(), head, q0))
                })
            })
            .collect();
        tasks.into_par_iter().for_each_init(
            Vec::new,
            |scores: &mut Vec<f32>, (qseq, seq, head, q0)| {
                let t = seq.len();
                let rows = QUERY_CHUNK.min(qseq.end - q0);
                let kv_head = head / group;
                scores.resize(rows * t, 0.0);
                // SAFETY: all offsets stay inside q/k/v/out; each task writes
                // its own (rows, head) block of `out`.
                unsafe {
                    let q_ptr = q.data.as_ptr().add(q0 * q.cols + head * hd);
                    let k_ptr = k.data.as_ptr().add(seq.start * k.cols + kv_head * hd);
                    let v_ptr = v.data.as_ptr().add(seq.start * v.cols + kv_head * hd);
                    // scores = Q K^T
                    matmul(
                        rows,
                        t,
                        hd,
                        scores.as_mut_ptr(),
                        (t as isize, 1),
                        q_ptr,
                        (qs, 1),
                        k_ptr,
                        (1, kvs),
                        gemm::Parallelism::None,
                    );
                    for row in scores.chunks_exact_mut(t) {
                        fastmath::softmax_scaled(row, scale);
                    }
                    // out = P V
                    let o_ptr = out_ptr.get().add(q0 * q.cols + head * hd);
                    matmul(
                        rows,
                        hd,
                        t,
                        o_ptr,
                        (qs, 1),
                        scores.as_ptr(),
                        (t as isize, 1),
                        v_ptr,
                        (kvs, 1),
                        gemm::Parallelism::None,
                    );
                }
            },
        );
        out
    }

    fn silu_mul(&self, gate: &Matrix, up: &Matrix) -> Matrix {
        let mut out = Matrix::zeros(gate.rows, gate.cols);
        out.data
            .par_chunks_mut(1 << 14)
            .zip(
                gate.data
                    .par_chunks(1 << 14)
                    .zip(up.data.par_chunks(1 << 14)),
            )
            .for_each(|(o, (g, u))| fastmath::silu_mul(o, g, u));
        out
    }

    fn add_assign(&self, x: &mut Matrix, y: &Matrix) {
        x.data
            .par_chunks_mut(1 << 14)
            .zip(y.data.par_chunks(1 << 14))
            .for_each(|(x, y)| x.iter_mut().zip(y).for_each(|(x, y)| *x += y));
    }

    fn gather_rows(&self, x: &Matrix, rows: &[usize]) -> Matrix {
        let mut out = Matrix::zeros(rows.len(), x.cols);
        for (o, &r) in out.data.chunks_exact_mut(x.cols).zip(rows) {
            o.copy_from_slice(&x.data[r * x.cols..(r + 1) * x.cols]);
        }
        out
    }

    fn concat_rows(&self, pieces: &[(&Matrix, std::ops::Range<usize>)]) -> Matrix {
        let cols = pieces.first().map_or(0, |(m, _)| m.cols);
        let rows = pieces.iter().map(|(_, r)| r.len()).sum();
        let mut out = Matrix::zeros(0, cols);
        out.rows = rows;
        out.data.reserve_exact(rows * cols);
        for (m, r) in pieces {
            assert_eq!(m.cols, cols, "concat_rows of different widths");
            out.data
                .extend_from_slice(&m.data[r.start * cols..r.end * cols]);
        }
        out
    }

    fn to_host(&self, x: Matrix) -> Vec<f32> {
        x.data
    }

    fn read_host<'a>(&self, x: &'a Matrix) -> std::borrow::Cow<'a, [f32]> {
        std::borrow::Cow::Borrowed(&x.data)
    }

    fn load_hidden(&self, values: &[f32], rows: usize, cols: usize) -> Matrix {
        self.upload(values, rows, cols)
    }

    fn rank_world(&self) -> (usize, usize) {
        self.comm.as_ref().map_or((0, 1), |c| (c.rank(), c.world()))
    }

    fn all_reduce(&self, x: &mut Matrix) {
        if let Some(c) = &self.comm {
            c.all_reduce_sum(&mut x.data);
        }
    }
}
