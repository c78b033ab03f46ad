//! `CudaBackend`: the `Backend` trait on one GPU.

use super::compile;
use crate::backend::{Backend, Heads, Packing};
use crate::engine::{Query, query_rows};
use cudarc::cublas::{CudaBlas, result as blas, sys as blas_sys};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig,
    PushKernelArg,
};
use remask_model::{DType, Result, TensorRef};
use remask_sampler::Partial;
use remask_sampler::rng::{NoiseKey, Stream};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// An activation matrix on the GPU (f32, row-major).
pub struct CudaTensor {
    data: CudaSlice<f32>,
    rows: usize,
    cols: usize,
}

/// A weight on the GPU: matrices in bf16, vectors and tables in f32.
pub enum CudaWeight {
    Bf16 {
        data: CudaSlice<u16>,
        rows: usize,
        cols: usize,
    },
    F32 {
        data: CudaSlice<f32>,
        rows: usize,
        cols: usize,
    },
}

/// An NCCL communicator; NCCL calls on one communicator are serialised.
struct Nccl(Mutex<cudarc::nccl::Comm>);
// SAFETY: the communicator is only used under the mutex.
unsafe impl Send for Nccl {}
unsafe impl Sync for Nccl {}

pub struct CudaBackend {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    kernels: HashMap<&'static str, CudaFunction>,
    nccl: Option<Nccl>,
}

#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("{0} not found: is this a GPU machine? Put the CUDA 13 libraries on LD_LIBRARY_PATH")]
    Missing(&'static str),
    #[error("CUDA driver: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    #[error("cuBLAS: {0:?}")]
    Blas(#[from] cudarc::cublas::result::CublasError),
    #[error("NVRTC could not compile the kernels: {0:?}")]
    Compile(cudarc::nvrtc::CompileError),
    #[error("NCCL: {0:?}")]
    Nccl(cudarc::nccl::result::NcclError),
}

const BLOCK: u32 = 256;

fn grid(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n as u32).div_ceil(BLOCK).max(1), 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl CudaBackend {
    /// The backend on GPU `device`, kernels compiled for its architecture.
    pub fn new(device: usize) -> std::result::Result<Self, CudaError> {
        // cudarc panics on a missing library: look first, and say what to do.
        // SAFETY: only probes for the libraries.
        for (name, present) in unsafe {
            [
                (
                    "libcuda (the NVIDIA driver)",
                    cudarc::driver::sys::is_culib_present(),
                ),
                ("libcublas", cudarc::cublas::sys::is_culib_present()),
                ("libnvrtc", cudarc::nvrtc::sys::is_culib_present()),
            ]
        } {
            if !present {
                return Err(CudaError::Missing(name));
            }
        }
        let ctx = CudaContext::new(device)?;
        let (major, minor) = ctx.compute_capability()?;
        let arch: &'static str = Box::leak(format!("sm_{major}{minor}").into_boxed_str());
        let module = ctx.load_module(compile(arch).map_err(CudaError::Compile)?)?;
        let kernels = super::KERNEL_NAMES
            .iter()
            .map(|&n| Ok((n, module.load_function(n)?)))
            .collect::<std::result::Result<_, CudaError>>()?;
        let stream = ctx.default_stream();
        Ok(CudaBackend {
            blas: CudaBlas::new(stream.clone())?,
            stream,
            kernels,
            nccl: None,
        })
    }

    /// One rank of a tensor-parallel group over NCCL. `id` comes from rank 0
    /// (`cudarc::nccl::Id::new()`), handed to the others by the coordinator.
    pub fn with_nccl(
        mut self,
        rank: usize,
        world: usize,
        id: cudarc::nccl::Id,
    ) -> std::result::Result<Self, CudaError> {
        let comm = cudarc::nccl::Comm::from_rank(self.stream.clone(), rank, world, id)
            .map_err(CudaError::Nccl)?;
        self.nccl = Some(Nccl(Mutex::new(comm)));
        Ok(self)
    }

    /// Waits for the queued work (for timing).
    pub fn synchronize(&self) {
        self.stream.synchronize().expect("CUDA: synchronize");
    }

    fn f(&self, name: &str) -> &CudaFunction {
        &self.kernels[name]
    }

    fn zeros(&self, rows: usize, cols: usize) -> CudaTensor {
        CudaTensor {
            data: self
                .stream
                .alloc_zeros(rows * cols)
                .expect("CUDA: out of memory"),
            rows,
            cols,
        }
    }

    fn upload_u32(&self, v: &[u32]) -> CudaSlice<u32> {
        self.stream.clone_htod(v).expect("CUDA: copy to the device")
    }

    /// `out = x W^T` with bf16 inputs (the activations rounded to bf16) and
    /// f32 accumulation and output.
    fn gemm(&self, x: &CudaTensor, w: &CudaSlice<u16>, out_features: usize) -> CudaTensor {
        let (m, k) = (x.rows, x.cols);
        let mut xb: CudaSlice<u16> = self.stream.alloc_zeros(m * k).expect("CUDA: out of memory");
        let n = (m * k) as i64;
        let mut launch = self.stream.launch_builder(self.f("to_bf16"));
        launch.arg(&mut xb).arg(&x.data).arg(&n);
        unsafe { launch.launch(grid(m * k)) }.expect("CUDA: to_bf16");
        let mut out = self.zeros(m, out_features);
        let (alpha, beta) = (1.0f32, 0.0f32);
        {
            let (wp, _w) = w.device_ptr(&self.stream);
            let (xp, _x) = xb.device_ptr(&self.stream);
            let (op, _o) = out.data.device_ptr_mut(&self.stream);
            // Column-major: out^T (out_features x m) = W (out x k) . x^T (k x m).
            unsafe {
                blas::gemm_ex(
                    *self.blas.handle(),
                    blas_sys::cublasOperation_t::CUBLAS_OP_T,
                    blas_sys::cublasOperation_t::CUBLAS_OP_N,
                    out_features as i32,
                    m as i32,
                    k as i32,
                    &alpha as *const f32 as *const _,
                    wp as *const _,
                    blas_sys::cudaDataType::CUDA_R_16BF,
                    k as i32,
                    xp as *const _,
                    blas_sys::cudaDataType::CUDA_R_16BF,
                    k as i32,
                    &beta as *const f32 as *const _,
                    op as *mut _,
                    blas_sys::cudaDataType::CUDA_R_32F,
                    out_features as i32,
                    blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
                )
            }
            .expect("cuBLAS: gemm");
        }
        out
    }
}

fn bf16_bits(t: &TensorRef<'_>) -> Vec<u16> {
    match t.dtype {
        DType::BF16 => t
            .bytes
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect(),
        _ => t
            .to_f32()
            .into_iter()
            .map(|v| half::bf16::from_f32(v).to_bits())
            .collect(),
    }
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Weight = CudaWeight;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn load_weight(&self, t: TensorRef<'_>) -> Result<CudaWeight> {
        Ok(match t.shape {
            [r, c] => CudaWeight::Bf16 {
                data: self
                    .stream
                    .clone_htod(&bf16_bits(&t))
                    .expect("CUDA: copy to the device"),
                rows: *r,
                cols: *c,
            },
            _ => self.upload(&t.to_f32(), 1, t.shape.iter().product()),
        })
    }

    fn upload(&self, values: &[f32], rows: usize, cols: usize) -> CudaWeight {
        CudaWeight::F32 {
            data: self
                .stream
                .clone_htod(values)
                .expect("CUDA: copy to the device"),
            rows,
            cols,
        }
    }

    fn embed(&self, table: &CudaWeight, ids: &[u32]) -> CudaTensor {
        let CudaWeight::Bf16 { data, cols, .. } = table else {
            panic!("the embedding is a bf16 matrix")
        };
        let mut out = self.zeros(ids.len(), *cols);
        let ids_d = self.upload_u32(ids);
        let (rows, d) = (ids.len() as i32, *cols as i32);
        let mut l = self.stream.launch_builder(self.f("embed"));
        l.arg(&mut out.data)
            .arg(data)
            .arg(&ids_d)
            .arg(&rows)
            .arg(&d);
        unsafe { l.launch(grid(ids.len() * *cols)) }.expect("CUDA: embed");
        out
    }

    fn rms_norm(&self, x: &CudaTensor, weight: &CudaWeight, eps: f32) -> CudaTensor {
        let CudaWeight::F32 { data: w, .. } = weight else {
            panic!("norm weights are f32 vectors")
        };
        let mut out = self.zeros(x.rows, x.cols);
        let d = x.cols as i32;
        let mut l = self.stream.launch_builder(self.f("rms_norm"));
        l.arg(&mut out.data).arg(&x.data).arg(w).arg(&d).arg(&eps);
        let cfg = LaunchConfig {
            grid_dim: (x.rows as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { l.launch(cfg) }.expect("CUDA: rms_norm");
        out
    }

    fn linear(&self, x: &CudaTensor, w: &CudaWeight) -> CudaTensor {
        let CudaWeight::Bf16 { data, rows, cols } = w else {
            panic!("projections are bf16 matrices")
        };
        assert_eq!(x.cols, *cols, "linear: input width vs weight");
        self.gemm(x, data, *rows)
    }

    fn rope(
        &self,
        x: &mut CudaTensor,
        head_dim: usize,
        positions: &[u32],
        cos: &CudaWeight,
        sin: &CudaWeight,
    ) {
        let (CudaWeight::F32 { data: c, .. }, CudaWeight::F32 { data: s, .. }) = (cos, sin) else {
            panic!("RoPE tables are f32")
        };
        let pos = self.upload_u32(positions);
        let (rows, cols, hd) = (x.rows as i32, x.cols as i32, head_dim as i32);
        let mut l = self.stream.launch_builder(self.f("rope"));
        l.arg(&mut x.data)
            .arg(&pos)
            .arg(c)
            .arg(s)
            .arg(&rows)
            .arg(&cols)
            .arg(&hd);
        unsafe { l.launch(grid(x.rows * x.cols / 2)) }.expect("CUDA: rope");
    }

    fn attention(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        h: Heads,
        packing: &Packing,
    ) -> CudaTensor {
        let mut start = Vec::with_capacity(q.rows);
        let mut len = Vec::with_capacity(q.rows);
        let mut longest = 0;
        for seq in packing.sequences() {
            longest = longest.max(seq.len());
            for _ in seq.clone() {
                start.push(seq.start as u32);
                len.push(seq.len() as u32);
            }
        }
        let (start, len) = (self.upload_u32(&start), self.upload_u32(&len));
        let mut out = self.zeros(q.rows, q.cols);
        let (nh, nkv, hd) = (h.n_heads as i32, h.n_kv_heads as i32, h.head_dim as i32);
        let scale = 1.0 / (h.head_dim as f32).sqrt();
        let mut l = self.stream.launch_builder(self.f("attention"));
        l.arg(&mut out.data)
            .arg(&q.data)
            .arg(&k.data)
            .arg(&v.data)
            .arg(&start)
            .arg(&len);
        l.arg(&nh).arg(&nkv).arg(&hd).arg(&scale);
        let cfg = LaunchConfig {
            grid_dim: (q.rows as u32, h.n_heads as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: (longest * 4) as u32,
        };
        unsafe { l.launch(cfg) }.expect("CUDA: attention");
        out
    }

    fn silu_mul(&self, gate: &CudaTensor, up: &CudaTensor) -> CudaTensor {
        let mut out = self.zeros(gate.rows, gate.cols);
        let n = (gate.rows * gate.cols) as i64;
        let mut l = self.stream.launch_builder(self.f("silu_mul"));
        l.arg(&mut out.data).arg(&gate.data).arg(&up.data).arg(&n);
        unsafe { l.launch(grid(n as usize)) }.expect("CUDA: silu_mul");
        out
    }

    fn add_assign(&self, x: &mut CudaTensor, y: &CudaTensor) {
        let n = (x.rows * x.cols) as i64;
        let mut l = self.stream.launch_builder(self.f("add_assign"));
        l.arg(&mut x.data).arg(&y.data).arg(&n);
        unsafe { l.launch(grid(n as usize)) }.expect("CUDA: add_assign");
    }

    fn gather_rows(&self, x: &CudaTensor, rows: &[usize]) -> CudaTensor {
        let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let idx = self.upload_u32(&idx);
        let mut out = self.zeros(rows.len(), x.cols);
        let (n, cols) = (rows.len() as i32, x.cols as i32);
        let mut l = self.stream.launch_builder(self.f("gather_rows"));
        l.arg(&mut out.data)
            .arg(&x.data)
            .arg(&idx)
            .arg(&n)
            .arg(&cols);
        unsafe { l.launch(grid(rows.len() * x.cols)) }.expect("CUDA: gather_rows");
        out
    }

    fn to_host(&self, x: CudaTensor) -> Vec<f32> {
        self.stream
            .clone_dtoh(&x.data)
            .expect("CUDA: copy to the host")
    }

    fn load_hidden(&self, values: &[f32], rows: usize, cols: usize) -> CudaTensor {
        CudaTensor {
            data: self
                .stream
                .clone_htod(values)
                .expect("CUDA: copy to the device"),
            rows,
            cols,
        }
    }

    fn rank_world(&self) -> (usize, usize) {
        self.nccl.as_ref().map_or((0, 1), |c| {
            let c = c.0.lock().unwrap();
            (c.rank(), c.world_size())
        })
    }

    fn all_reduce(&self, x: &mut CudaTensor) {
        if let Some(c) = &self.nccl {
            c.0.lock()
                .unwrap()
                .all_reduce_in_place(&mut x.data, &cudarc::nccl::ReduceOp::Sum)
                .expect("NCCL: all-reduce");
        }
    }

    /// The fused head reduction on the GPU: only four numbers per position
    /// come back.
    fn head_partials(
        &self,
        logits: CudaTensor,
        vocab: Range<usize>,
        queries: &[Query],
    ) -> Vec<Vec<Partial>> {
        let mut cond = Vec::new();
        let mut uncond = Vec::new();
        let (mut keys, mut temp, mut cfg, mut mask, mut eos, mut flags) = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        );
        let mut first = 0u32;
        for q in queries {
            let n = q.positions.len() as u32;
            for (j, &pos) in q.positions.iter().enumerate() {
                cond.push(first + j as u32);
                uncond.push(q.uncond_base.map_or(-1, |_| (first + n + j as u32) as i32));
                keys.push(NoiseKey::new(q.options.seed, Stream::Gumbel, q.step, pos as u64).raw());
                temp.push(q.options.temperature);
                cfg.push(q.options.cfg_scale);
                mask.push(q.options.mask);
                eos.push(q.options.eos);
                flags.push(u32::from(q.options.logits_eos_inf));
            }
            first += if q.uncond_base.is_some() { 2 * n } else { n };
        }
        let p = cond.len();
        debug_assert_eq!(first as usize, query_rows(queries).len());
        let s = &self.stream;
        let up = "CUDA: copy the head queries to the device";
        let (cond, uncond, keys) = (
            s.clone_htod(&cond).expect(up),
            s.clone_htod(&uncond).expect(up),
            s.clone_htod(&keys).expect(up),
        );
        let (temp, cfg, mask, eos, flags) = (
            s.clone_htod(&temp).expect(up),
            s.clone_htod(&cfg).expect(up),
            s.clone_htod(&mask).expect(up),
            s.clone_htod(&eos).expect(up),
            s.clone_htod(&flags).expect(up),
        );
        let mut score: CudaSlice<f64> = s.alloc_zeros(p).expect("CUDA: out of memory");
        let mut token: CudaSlice<u32> = s.alloc_zeros(p).expect("CUDA: out of memory");
        let mut logit: CudaSlice<f64> = s.alloc_zeros(p).expect("CUDA: out of memory");
        let mut lse: CudaSlice<f64> = s.alloc_zeros(p).expect("CUDA: out of memory");
        let (width, offset) = (vocab.len() as i32, vocab.start as i32);
        let mut l = s.launch_builder(self.f("head_partials"));
        l.arg(&mut score)
            .arg(&mut token)
            .arg(&mut logit)
            .arg(&mut lse);
        l.arg(&logits.data).arg(&width).arg(&offset);
        l.arg(&cond)
            .arg(&uncond)
            .arg(&keys)
            .arg(&temp)
            .arg(&cfg)
            .arg(&mask)
            .arg(&eos)
            .arg(&flags);
        let launch = LaunchConfig {
            grid_dim: (p.max(1) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        if p > 0 {
            unsafe { l.launch(launch) }.expect("CUDA: head_partials");
        }
        let down = "CUDA: copy the partials to the host";
        let (score, token, logit, lse) = (
            s.clone_dtoh(&score).expect(down),
            s.clone_dtoh(&token).expect(down),
            s.clone_dtoh(&logit).expect(down),
            s.clone_dtoh(&lse).expect(down),
        );
        let mut i = 0;
        queries
            .iter()
            .map(|q| {
                q.positions
                    .iter()
                    .map(|_| {
                        let part = Partial {
                            score: score[i],
                            token: token[i],
                            logit: logit[i],
                            lse: lse[i],
                        };
                        i += 1;
                        part
                    })
                    .collect()
            })
            .collect()
    }
}
