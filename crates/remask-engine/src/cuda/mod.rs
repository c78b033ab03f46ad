//! The CUDA backend (cargo feature `cuda`): bf16 weights on the GPU, f32
//! activations, matrix products through cuBLAS (bf16 inputs, f32
//! accumulation and output), and our own kernels (`kernels.cu`, compiled by
//! NVRTC at start-up) for everything else, including the fused output-head
//! reduction and the rounds of a truncated draw's select. The CUDA
//! libraries are loaded at run time, so this builds without a CUDA toolkit
//! or a GPU. `tp_group` makes several GPUs of this process one
//! tensor-parallel group over NCCL (for `Engine`).

mod backend;
mod group;
pub use backend::{CudaBackend, CudaError, CudaTensor, CudaWeight};
pub use group::{NcclRank, tp_group};

pub use crate::launch::KERNELS;

/// Kernel names, in the order the backend loads them.
pub const KERNEL_NAMES: &[&str] = &[
    "embed",
    "rms_norm",
    "to_bf16",
    "rope",
    "attention",
    "attention_tc_16",
    "attention_tc_32",
    "attention_tc_64",
    "attention_tc_128",
    "silu_mul",
    "add_assign",
    "gather_rows",
    "head_partials",
    "head_histograms",
    "init_normal_bf16",
];

/// Compiles the kernels to PTX for `arch` (e.g. "compute_90"). Needs only
/// libnvrtc, not a GPU: CI runs it to check the source.
pub fn compile(arch: &'static str) -> Result<cudarc::nvrtc::Ptx, cudarc::nvrtc::CompileError> {
    cudarc::nvrtc::compile_ptx_with_opts(
        KERNELS,
        cudarc::nvrtc::CompileOptions {
            arch: Some(arch),
            use_fast_math: Some(false),
            ..Default::default()
        },
    )
}

#[cfg(test)]
mod tests {
    /// Every kernel compiles for sm_90 (H100/H200) with NVRTC. Skipped, with
    /// a message, where libnvrtc cannot be loaded.
    #[test]
    fn kernels_compile_for_sm90() {
        let loadable =
            std::panic::catch_unwind(|| unsafe { cudarc::nvrtc::sys::is_culib_present() });
        if !matches!(loadable, Ok(true)) {
            eprintln!(
                "libnvrtc not found: set LD_LIBRARY_PATH to a CUDA 13 NVRTC (pip install nvidia-cuda-nvrtc)"
            );
            return;
        }
        let ptx = super::compile("compute_90").unwrap_or_else(|e| panic!("NVRTC: {e:?}"));
        let text = ptx.to_src();
        for name in super::KERNEL_NAMES {
            assert!(
                text.contains(&format!(".entry {name}(")),
                "kernel {name} missing from the PTX"
            );
        }
    }
}
