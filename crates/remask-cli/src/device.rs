//! `--backend cpu|cuda` and `--device N`, shared by the commands that compute.

use crate::{CliError, CliResult};

#[derive(clap::Args, Clone, Debug)]
pub struct DeviceArgs {
    /// Compute backend: cpu, or cuda (a build with `--features cuda`).
    #[arg(long, env = "REMASK_BACKEND", default_value = "cpu")]
    pub backend: String,
    /// GPU ordinal for --backend cuda.
    #[arg(long, env = "REMASK_DEVICE", default_value_t = 0)]
    pub device: usize,
}

impl DeviceArgs {
    pub fn is_cuda(&self) -> CliResult<bool> {
        match self.backend.as_str() {
            "cpu" => Ok(false),
            "cuda" if cfg!(feature = "cuda") => Ok(true),
            other => Err(CliError::Usage(format!(
                "--backend {other} is not available in this build (cpu{})",
                if cfg!(feature = "cuda") {
                    ", cuda"
                } else {
                    "; build with --features cuda for cuda"
                }
            ))),
        }
    }

    #[cfg(feature = "cuda")]
    pub fn cuda(&self) -> CliResult<remask_engine::cuda::CudaBackend> {
        remask_engine::cuda::CudaBackend::new(self.device)
            .map_err(|e| CliError::Usage(format!("--backend cuda (device {}): {e}", self.device)))
    }
}
