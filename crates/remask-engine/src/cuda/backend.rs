//! `CudaBackend`: the `Backend` trait on one GPU.

use super::NcclRank;
use super::compile;
use crate::backend::{Backend, Heads, Packing};
use crate::collective::Collective;
use crate::launch::{self, AttentionPlan};
use crate::query::Query;
use cudarc::cublas::{CudaBlas, result as blas, sys as blas_sys};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig,
    PushKernelArg,
};
use remask_model::{DType, Result, TensorRef};
use remask_sampler::Partial;
use remask_sampler::truncate::{BINS, Bins, Round};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// An activation matrix on the GPU (f32, row-major).
pub struct CudaTensor {
    data: CudaSlice<f32>,
    rows: usize,
    cols: usize,
    /// The values rounded to bf16 for cuBLAS, made by the first matrix
    /// product that reads this tensor and reused by the next ones (q, k and v
    /// share their input, as do ff_proj and up_proj); dropped on mutation.
    bf16: std::sync::OnceLock<CudaSlice<u16>>,
}

impl CudaTensor {
    fn new(data: CudaSlice<f32>, rows: usize, cols: usize) -> Self {
        CudaTensor {
            data,
            rows,
            cols,
            bf16: std::sync::OnceLock::new(),
        }
    }

    /// The f32 values, for a kernel that changes them.
    fn data_mut(&mut self) -> &mut CudaSlice<f32> {
        self.bf16.take();
        &mut self.data
    }
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

pub struct CudaBackend {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    kernels: HashMap<&'static str, CudaFunction>,
    /// This GPU's rank in its tensor-parallel group (NCCL), if any.
    comm: Option<Box<dyn Collective<CudaSlice<f32>>>>,
    /// Index arrays that stay the same through a forward pass (RoPE
    /// positions, attention tiles), uploaded once instead of once per layer:
    /// a copy from pageable host memory may block the host until the stream
    /// drains, which would stall the kernel launches behind the GPU.
    indices: Mutex<HashMap<&'static str, IndexArray>>,
    /// The tensor-core attention kernel where the head dim has one
    /// (`REMASK_CUDA_ATTENTION=tiled`, the default), else the row kernel.
    tiled_attention: bool,
}

/// An index array on the host and its copy on the device.
type IndexArray = (Vec<u32>, Arc<CudaSlice<u32>>);

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
    #[error("REMASK_CUDA_ATTENTION={0}: use tiled (the default) or rows")]
    AttentionKernel(String),
    #[error("--devices lists GPU {0} twice")]
    DuplicateDevice(usize),
    #[error("a tensor-parallel group needs at least one GPU")]
    NoDevices,
}

fn config(g: launch::Geometry) -> LaunchConfig {
    LaunchConfig {
        grid_dim: g.grid,
        block_dim: g.block,
        shared_mem_bytes: g.shared_bytes,
    }
}

/// One thread per element.
fn grid(n: usize) -> LaunchConfig {
    config(launch::elementwise(n))
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
        let tiled_attention = match std::env::var("REMASK_CUDA_ATTENTION").as_deref() {
            Err(_) | Ok("tiled") => true,
            Ok("rows") => false,
            Ok(other) => return Err(CudaError::AttentionKernel(other.to_string())),
        };
        let ctx = CudaContext::new(device)?;
        // SAFETY: one stream per backend, so cudarc's cross-stream event
        // tracking (an event record per argument per launch) is pure overhead.
        unsafe { ctx.disable_event_tracking() };
        // Keep freed memory in the stream-ordered pool across synchronisations
        // (the default threshold 0 hands it back to the driver at every sync,
        // and each denoising step would then pay for fresh allocations).
        // SAFETY: the device's own default pool; the attribute is a u64.
        unsafe {
            use cudarc::driver::{result, sys};
            let pool = result::device::get_default_mem_pool(ctx.cu_device())?;
            let mut keep = u64::MAX;
            result::mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut keep as *mut u64 as *mut std::ffi::c_void,
            )?;
        }
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
            comm: None,
            indices: Mutex::new(HashMap::new()),
            tiled_attention,
        })
    }

    /// Rank `rank` of a tensor-parallel group of `world` GPUs over NCCL. `id`
    /// is rank 0's (`cudarc::nccl::Id::new()`), the same for every rank (see
    /// `tp_group`). Blocks until every rank has joined.
    pub fn with_nccl(
        mut self,
        rank: usize,
        world: usize,
        id: cudarc::nccl::Id,
    ) -> std::result::Result<Self, CudaError> {
        let comm = NcclRank::join(self.stream.clone(), rank, world, id)?;
        self.comm = Some(Box::new(comm));
        Ok(self)
    }

    /// Waits for the queued work (for timing).
    pub fn synchronize(&self) {
        self.stream.synchronize().expect("CUDA: synchronize");
    }

    fn f(&self, name: &str) -> &CudaFunction {
        &self.kernels[name]
    }

    /// An activation every element of which the next kernel writes: no memset.
    fn uninit(&self, rows: usize, cols: usize) -> CudaTensor {
        // SAFETY: every caller launches a kernel that writes all of it before
        // anything reads it.
        let data = unsafe { self.stream.alloc(rows * cols) }.expect("CUDA: out of memory");
        CudaTensor::new(data, rows, cols)
    }

    fn upload_u32(&self, v: &[u32]) -> CudaSlice<u32> {
        self.stream.clone_htod(v).expect("CUDA: copy to the device")
    }

    /// `v` on the device, uploaded only when it differs from the last array
    /// of this `slot` (the same positions and tiles serve every layer).
    fn cached_u32(&self, slot: &'static str, v: &[u32]) -> Arc<CudaSlice<u32>> {
        let mut cache = self.indices.lock().unwrap();
        if let Some((host, dev)) = cache.get(slot)
            && host.as_slice() == v
        {
            return dev.clone();
        }
        let dev = Arc::new(self.upload_u32(v));
        cache.insert(slot, (v.to_vec(), dev.clone()));
        dev
    }

    /// `out = x W^T` with bf16 inputs (the activations rounded to bf16) and
    /// f32 accumulation and output.
    fn gemm(&self, x: &CudaTensor, w: &CudaSlice<u16>, out_features: usize) -> CudaTensor {
        // The ranks of a group run on threads of their own, and raw cuBLAS
        // calls use the calling thread's current context.
        self.stream
            .context()
            .bind_to_thread()
            .expect("CUDA: bind the context");
        let (m, k) = (x.rows, x.cols);
        let xb = x.bf16.get_or_init(|| {
            // SAFETY: to_bf16 writes all m * k elements.
            let mut xb: CudaSlice<u16> =
                unsafe { self.stream.alloc(m * k) }.expect("CUDA: out of memory");
            let n = (m * k) as i64;
            let mut launch = self.stream.launch_builder(self.f("to_bf16"));
            launch.arg(&mut xb).arg(&x.data).arg(&n);
            unsafe { launch.launch(grid(m * k)) }.expect("CUDA: to_bf16");
            xb
        });
        // beta = 0: cuBLAS writes every element.
        let mut out = self.uninit(m, out_features);
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

    /// Matrices of a generated checkpoint are drawn on the GPU by
    /// `init_normal_bf16`, straight into bf16: no host memory, no copy.
    /// Vectors (norm weights, a few KB) take the host path.
    fn generated_weight(
        &self,
        t: &remask_model::GeneratedTensor,
        rows: Range<usize>,
        cols: Range<usize>,
    ) -> CudaWeight {
        let [_, full_cols] = t.shape[..] else {
            return crate::backend::generated_on_host(self, t, rows, cols);
        };
        let n = rows.len() * cols.len();
        let mut data: CudaSlice<u16> = self.stream.alloc_zeros(n).expect("CUDA: out of memory");
        let (stddev, one_plus) = match t.init {
            remask_model::Init::Normal(s) => (s, 0i32),
            remask_model::Init::OnePlus(s) => (s, 1i32),
        };
        let (n_rows, n_cols) = (rows.len() as i32, cols.len() as i32);
        let (full_cols, row0, col0) = (full_cols as i64, rows.start as i64, cols.start as i64);
        let mut l = self.stream.launch_builder(self.f("init_normal_bf16"));
        l.arg(&mut data).arg(&n_rows).arg(&n_cols);
        l.arg(&full_cols).arg(&row0).arg(&col0);
        l.arg(&t.seed).arg(&t.tensor).arg(&stddev).arg(&one_plus);
        unsafe { l.launch(grid(n)) }.expect("CUDA: init_normal_bf16");
        CudaWeight::Bf16 {
            data,
            rows: rows.len(),
            cols: cols.len(),
        }
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
        let mut out = self.uninit(ids.len(), *cols);
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
        let mut out = self.uninit(x.rows, x.cols);
        let d = x.cols as i32;
        let mut l = self.stream.launch_builder(self.f("rms_norm"));
        l.arg(&mut out.data).arg(&x.data).arg(w).arg(&d).arg(&eps);
        unsafe { l.launch(config(launch::per_row(x.rows))) }.expect("CUDA: rms_norm");
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
        let pos = self.cached_u32("positions", positions);
        let (rows, cols, hd) = (x.rows as i32, x.cols as i32, head_dim as i32);
        let mut l = self.stream.launch_builder(self.f("rope"));
        l.arg(x.data_mut())
            .arg(pos.as_ref())
            .arg(c)
            .arg(s)
            .arg(&rows)
            .arg(&cols)
            .arg(&hd);
        unsafe { l.launch(grid((rows * cols / 2) as usize)) }.expect("CUDA: rope");
    }

    fn attention(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        h: Heads,
        queries: &Packing,
        keys: &Packing,
    ) -> CudaTensor {
        // Both kernels write every row of every head.
        let mut out = self.uninit(q.rows, q.cols);
        let (nh, nkv, hd) = (h.n_heads as i32, h.n_kv_heads as i32, h.head_dim as i32);
        let scale = 1.0 / (h.head_dim as f32).sqrt();
        match launch::attention(h, queries, keys, self.tiled_attention) {
            AttentionPlan::Tiled {
                kernel,
                tiles,
                geometry,
            } => {
                let tiles = self.cached_u32("attention tiles", &tiles);
                let mut l = self.stream.launch_builder(self.f(kernel));
                l.arg(&mut out.data)
                    .arg(&q.data)
                    .arg(&k.data)
                    .arg(&v.data)
                    .arg(tiles.as_ref());
                l.arg(&nh).arg(&nkv).arg(&scale);
                unsafe { l.launch(config(geometry)) }.expect("CUDA: attention_tc");
            }
            AttentionPlan::Rows {
                start,
                len,
                geometry,
            } => {
                let (start, len) = (self.upload_u32(&start), self.upload_u32(&len));
                let mut l = self.stream.launch_builder(self.f("attention"));
                l.arg(&mut out.data)
                    .arg(&q.data)
                    .arg(&k.data)
                    .arg(&v.data)
                    .arg(&start)
                    .arg(&len);
                l.arg(&nh).arg(&nkv).arg(&hd).arg(&scale);
                unsafe { l.launch(config(geometry)) }.expect("CUDA: attention");
            }
        }
        out
    }

    fn silu_mul(&self, gate: &CudaTensor, up: &CudaTensor) -> CudaTensor {
        let mut out = self.uninit(gate.rows, gate.cols);
        let n = (gate.rows * gate.cols) as i64;
        let mut l = self.stream.launch_builder(self.f("silu_mul"));
        l.arg(&mut out.data).arg(&gate.data).arg(&up.data).arg(&n);
        unsafe { l.launch(grid(n as usize)) }.expect("CUDA: silu_mul");
        out
    }

    fn add_assign(&self, x: &mut CudaTensor, y: &CudaTensor) {
        let n = (x.rows * x.cols) as i64;
        let mut l = self.stream.launch_builder(self.f("add_assign"));
        l.arg(x.data_mut()).arg(&y.data).arg(&n);
        unsafe { l.launch(grid(n as usize)) }.expect("CUDA: add_assign");
    }

    fn gather_rows(&self, x: &CudaTensor, rows: &[usize]) -> CudaTensor {
        let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let idx = self.upload_u32(&idx);
        let mut out = self.uninit(rows.len(), x.cols);
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

    fn concat_rows(&self, pieces: &[(&CudaTensor, std::ops::Range<usize>)]) -> CudaTensor {
        let cols = pieces.first().map_or(0, |(t, _)| t.cols);
        let rows = pieces.iter().map(|(_, r)| r.len()).sum();
        let mut out = self.uninit(rows, cols);
        let mut at = 0;
        for (t, r) in pieces {
            assert_eq!(t.cols, cols, "concat_rows of different widths");
            let n = r.len() * cols;
            let src = t.data.slice(r.start * cols..r.end * cols);
            let mut dst = out.data.slice_mut(at..at + n);
            self.stream
                .memcpy_dtod(&src, &mut dst)
                .expect("CUDA: copy rows");
            at += n;
        }
        out
    }

    fn to_host(&self, x: CudaTensor) -> Vec<f32> {
        self.stream
            .clone_dtoh(&x.data)
            .expect("CUDA: copy to the host")
    }

    fn read_host<'a>(&self, x: &'a CudaTensor) -> std::borrow::Cow<'a, [f32]> {
        std::borrow::Cow::Owned(
            self.stream
                .clone_dtoh(&x.data)
                .expect("CUDA: copy to the host"),
        )
    }

    fn load_hidden(&self, values: &[f32], rows: usize, cols: usize) -> CudaTensor {
        let data = self
            .stream
            .clone_htod(values)
            .expect("CUDA: copy to the device");
        CudaTensor::new(data, rows, cols)
    }

    fn rank_world(&self) -> (usize, usize) {
        self.comm.as_ref().map_or((0, 1), |c| (c.rank(), c.world()))
    }

    fn all_reduce(&self, x: &mut CudaTensor) {
        if let Some(c) = &self.comm {
            c.all_reduce_sum(x.data_mut());
        }
    }

    /// The fused head reduction on the GPU: only six numbers per position
    /// come back, and the top-k (at most 5 pairs) when a request asks.
    fn head_partials(
        &self,
        logits: &CudaTensor,
        vocab: Range<usize>,
        queries: &[Query],
        floors: &[u32],
    ) -> Vec<Vec<Partial>> {
        let hq = launch::head_queries(queries, floors);
        let p = hq.cond.len();
        let s = &self.stream;
        let up = "CUDA: copy the head queries to the device";
        let (cond, uncond, keys) = (
            s.clone_htod(&hq.cond).expect(up),
            s.clone_htod(&hq.uncond).expect(up),
            s.clone_htod(&hq.keys).expect(up),
        );
        let (temp, cfg, mask, eos, flags, floors) = (
            s.clone_htod(&hq.temperature).expect(up),
            s.clone_htod(&hq.cfg_scale).expect(up),
            s.clone_htod(&hq.mask).expect(up),
            s.clone_htod(&hq.eos).expect(up),
            s.clone_htod(&hq.flags).expect(up),
            s.clone_htod(&hq.floors).expect(up),
        );
        let mut score: CudaSlice<f64> = s.alloc_zeros(p).expect("CUDA: out of memory");
        let mut token: CudaSlice<u32> = s.alloc_zeros(p).expect("CUDA: out of memory");
        let mut logit: CudaSlice<f64> = s.alloc_zeros(p).expect("CUDA: out of memory");
        let mut lse: CudaSlice<f64> = s.alloc_zeros(p).expect("CUDA: out of memory");
        let mut mean: CudaSlice<f64> = s.alloc_zeros(p).expect("CUDA: out of memory");
        let mut max: CudaSlice<f64> = s.alloc_zeros(p).expect("CUDA: out of memory");
        // The top-k slots only when some position asks for them (k = 0 is
        // the default path: one slot, never written, never copied back).
        let k_max = queries
            .iter()
            .map(|q| (q.options.top_logprobs as usize).min(launch::HEAD_TOP_MAX))
            .max()
            .unwrap_or(0);
        let slots = if k_max > 0 {
            (p * launch::HEAD_TOP_MAX).max(1)
        } else {
            1
        };
        let mut top_logit: CudaSlice<f64> = s.alloc_zeros(slots).expect("CUDA: out of memory");
        let mut top_token: CudaSlice<i32> = s.alloc_zeros(slots).expect("CUDA: out of memory");
        let (width, offset) = (vocab.len() as i32, vocab.start as i32);
        let mut l = s.launch_builder(self.f("head_partials"));
        l.arg(&mut score)
            .arg(&mut token)
            .arg(&mut logit)
            .arg(&mut lse)
            .arg(&mut mean)
            .arg(&mut max)
            .arg(&mut top_logit)
            .arg(&mut top_token);
        l.arg(&logits.data).arg(&width).arg(&offset);
        l.arg(&cond)
            .arg(&uncond)
            .arg(&keys)
            .arg(&temp)
            .arg(&cfg)
            .arg(&mask)
            .arg(&eos)
            .arg(&flags)
            .arg(&floors);
        if p > 0 {
            unsafe { l.launch(config(launch::head_geometry(p))) }.expect("CUDA: head_partials");
        }
        let down = "CUDA: copy the partials to the host";
        let (top_logit, top_token) = if k_max > 0 {
            (
                s.clone_dtoh(&top_logit).expect(down),
                s.clone_dtoh(&top_token).expect(down),
            )
        } else {
            (Vec::new(), Vec::new())
        };
        let out = launch::HeadOutputs {
            score: s.clone_dtoh(&score).expect(down),
            token: s.clone_dtoh(&token).expect(down),
            logit: s.clone_dtoh(&logit).expect(down),
            lse: s.clone_dtoh(&lse).expect(down),
            mean: s.clone_dtoh(&mean).expect(down),
            max: s.clone_dtoh(&max).expect(down),
            top_logit,
            top_token,
        };
        launch::head_partials(queries, &out)
    }

    /// A select round on the GPU: only the bins (256 counts and masses per
    /// position) come back; nothing is launched when no position has a
    /// round.
    fn head_histograms(
        &self,
        logits: &CudaTensor,
        vocab: Range<usize>,
        queries: &[Query],
        rounds: &[Option<Round>],
    ) -> Vec<Bins> {
        let hq = launch::head_queries(queries, &[]);
        let p = hq.cond.len();
        if !rounds.iter().any(Option::is_some) {
            return vec![Bins::default(); p];
        }
        let hr = launch::head_rounds(rounds, p);
        let s = &self.stream;
        let up = "CUDA: copy the select round to the device";
        let (cond, uncond, cfg) = (
            s.clone_htod(&hq.cond).expect(up),
            s.clone_htod(&hq.uncond).expect(up),
            s.clone_htod(&hq.cfg_scale).expect(up),
        );
        let (mask, eos, flags) = (
            s.clone_htod(&hq.mask).expect(up),
            s.clone_htod(&hq.eos).expect(up),
            s.clone_htod(&hq.flags).expect(up),
        );
        let (keys, scale) = (
            s.clone_htod(&hr.keys).expect(up),
            s.clone_htod(&hr.scale).expect(up),
        );
        let n = p * BINS;
        let mut count: CudaSlice<u64> = s.alloc_zeros(n).expect("CUDA: out of memory");
        let mut mass: CudaSlice<u64> = s.alloc_zeros(n).expect("CUDA: out of memory");
        let (width, offset) = (vocab.len() as i32, vocab.start as i32);
        let mut l = s.launch_builder(self.f("head_histograms"));
        l.arg(&mut count).arg(&mut mass);
        l.arg(&logits.data).arg(&width).arg(&offset);
        l.arg(&cond)
            .arg(&uncond)
            .arg(&cfg)
            .arg(&mask)
            .arg(&eos)
            .arg(&flags)
            .arg(&keys)
            .arg(&scale);
        unsafe { l.launch(config(launch::head_geometry(p))) }.expect("CUDA: head_histograms");
        let down = "CUDA: copy the bins to the host";
        launch::head_bins(
            &s.clone_dtoh(&count).expect(down),
            &s.clone_dtoh(&mass).expect(down),
        )
    }
}
