//! `--backend cpu|cuda`, `--device N` and `--devices 0,1,...`, shared by the
//! commands that compute.

use crate::{CliError, CliResult};

#[derive(clap::Args, Clone, Debug)]
pub struct DeviceArgs {
    /// Compute backend: cpu, or cuda (a build with `--features cuda`).
    #[arg(long, env = "REMASK_BACKEND", default_value = "cpu")]
    pub backend: String,
    /// One GPU for --backend cuda (default: GPU 0, or GPUs 0 to N-1 for
    /// --tensor-parallel N); --devices for a list.
    #[arg(long, env = "REMASK_DEVICE")]
    pub device: Option<usize>,
    /// GPUs for --backend cuda, comma-separated (e.g. 0,1,2,3): the model is
    /// split over them, one tensor-parallel rank (a thread and an NCCL rank)
    /// per GPU, all in this process; --tensor-parallel, where a command has
    /// it, is then 1 or their number.
    #[arg(long, env = "REMASK_DEVICES", value_name = "LIST")]
    pub devices: Option<String>,
}

impl DeviceArgs {
    /// Whether the backend is CUDA; also refuses GPU flags without it.
    pub fn is_cuda(&self) -> CliResult<bool> {
        let cuda = match self.backend.as_str() {
            "cpu" => false,
            "cuda" if cfg!(feature = "cuda") => true,
            other => {
                return Err(CliError::Usage(format!(
                    "--backend {other} is not available in this build (cpu{})",
                    if cfg!(feature = "cuda") {
                        ", cuda"
                    } else {
                        "; build with --features cuda for cuda"
                    }
                )));
            }
        };
        if !cuda && self.devices.is_some() {
            return Err(CliError::Usage("--devices needs --backend cuda".into()));
        }
        Ok(cuda)
    }

    /// The GPUs to run on, in rank order, for `tensor_parallel` ranks (1 for
    /// the commands without --tensor-parallel); none on the CPU, where the
    /// ranks are threads. See `select_gpus`.
    pub fn gpus(&self, tensor_parallel: usize) -> CliResult<Vec<usize>> {
        if tensor_parallel == 0 {
            return Err(CliError::Usage(
                "--tensor-parallel must be at least 1".into(),
            ));
        }
        if !self.is_cuda()? {
            return Ok(Vec::new());
        }
        select_gpus(self.device, self.devices.as_deref(), tensor_parallel)
    }

    /// A tensor-parallel group over the GPUs (one GPU: a group of one).
    #[cfg(feature = "cuda")]
    pub fn cuda_group(
        &self,
        tensor_parallel: usize,
    ) -> CliResult<Vec<remask_engine::cuda::CudaBackend>> {
        let gpus = self.gpus(tensor_parallel)?;
        remask_engine::cuda::tp_group(&gpus)
            .map_err(|e| CliError::Usage(format!("--backend cuda (GPUs {}): {e}", list(&gpus))))
    }

    /// The whole model over the GPUs, one tensor-parallel rank each.
    #[cfg(feature = "cuda")]
    pub fn cuda_engine(
        &self,
        ckpt: &remask_model::Checkpoint,
        tensor_parallel: usize,
    ) -> CliResult<remask_engine::Engine<remask_engine::cuda::CudaBackend>> {
        let group = self.cuda_group(tensor_parallel)?;
        let shard = remask_engine::Shard::full(&ckpt.config);
        Ok(remask_engine::Engine::from_backends(group, ckpt, shard)?)
    }

    /// The backend on the one GPU of a command that does not split the model.
    #[cfg(feature = "cuda")]
    pub fn cuda(&self, command: &str) -> CliResult<remask_engine::cuda::CudaBackend> {
        let device = match self.gpus(1)?[..] {
            [device] => device,
            ref gpus => {
                return Err(CliError::Usage(format!(
                    "`remask {command}` runs on one GPU; --devices lists {} ({})",
                    gpus.len(),
                    list(gpus)
                )));
            }
        };
        remask_engine::cuda::CudaBackend::new(device)
            .map_err(|e| CliError::Usage(format!("--backend cuda (device {device}): {e}")))
    }
}

/// `0,1,2` as given to --devices.
pub fn list(gpus: &[usize]) -> String {
    gpus.iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// `--devices 0,1,...`: GPU ordinals, at least one, none twice (two ranks on
/// one GPU would hang NCCL's start-up).
pub fn parse_devices(value: &str) -> CliResult<Vec<usize>> {
    let mut gpus: Vec<usize> = Vec::new();
    for item in value.split(',').map(str::trim) {
        let gpu = item.parse::<usize>().map_err(|_| {
            CliError::Usage(format!(
                "--devices: '{item}' is not a GPU ordinal (in '{value}'; e.g. --devices 0,1)"
            ))
        })?;
        if gpus.contains(&gpu) {
            return Err(CliError::Usage(format!("--devices lists GPU {gpu} twice")));
        }
        gpus.push(gpu);
    }
    Ok(gpus)
}

/// The GPUs of --backend cuda, one tensor-parallel rank each: `--devices`
/// (--tensor-parallel then 1 or their number), which wins over `--device`
/// (kept for compatibility; both given and saying different things is a
/// usage error); `--device` names one GPU; with neither, GPUs
/// 0..--tensor-parallel (GPU 0 alone by default), which in a container given
/// that many GPUs is all of them.
fn select_gpus(
    device: Option<usize>,
    devices: Option<&str>,
    tensor_parallel: usize,
) -> CliResult<Vec<usize>> {
    let gpus = match (device, devices.map(parse_devices).transpose()?) {
        (Some(one), Some(gpus)) if gpus != [one] => {
            return Err(CliError::Usage(format!(
                "--device {one} and --devices {} disagree: give only --devices",
                list(&gpus)
            )));
        }
        (_, Some(gpus)) => gpus,
        (Some(one), None) if tensor_parallel > 1 => {
            return Err(CliError::Usage(format!(
                "--tensor-parallel {tensor_parallel} with --backend cuda splits the model over \
                 {tensor_parallel} GPUs, but --device {one} names one: list them with --devices"
            )));
        }
        (Some(one), None) => vec![one],
        (None, None) => (0..tensor_parallel).collect(),
    };
    let n = gpus.len();
    if tensor_parallel != 1 && tensor_parallel != n {
        return Err(CliError::Usage(format!(
            "--tensor-parallel {tensor_parallel} with --backend cuda must be 1 or the number of \
             GPUs in --devices ({n}: {}): each GPU is one rank",
            list(&gpus)
        )));
    }
    Ok(gpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(r: CliResult<impl std::fmt::Debug>) -> String {
        match r {
            Err(CliError::Usage(m)) => m,
            other => panic!("expected a usage error, got {other:?}"),
        }
    }

    fn args(backend: &str, device: Option<usize>, devices: Option<&str>) -> DeviceArgs {
        DeviceArgs {
            backend: backend.into(),
            device,
            devices: devices.map(String::from),
        }
    }

    #[test]
    fn parses_device_lists() {
        assert_eq!(parse_devices("0").unwrap(), vec![0]);
        assert_eq!(parse_devices("0,1,2,3").unwrap(), vec![0, 1, 2, 3]);
        assert_eq!(parse_devices(" 3, 1 ").unwrap(), vec![3, 1]);
        for bad in ["", "0,", "a", "0,-1", "1.5"] {
            let m = usage(parse_devices(bad));
            assert!(m.contains("is not a GPU ordinal"), "{bad}: {m}");
        }
        assert_eq!(usage(parse_devices("0,1,0")), "--devices lists GPU 0 twice");
    }

    #[test]
    fn devices_wins_over_device_unless_they_disagree() {
        assert_eq!(select_gpus(None, None, 1).unwrap(), vec![0]);
        assert_eq!(select_gpus(Some(2), None, 1).unwrap(), vec![2]);
        assert_eq!(select_gpus(None, Some("1,2"), 1).unwrap(), vec![1, 2]);
        assert_eq!(select_gpus(Some(1), Some("1"), 1).unwrap(), vec![1]);
        let m = usage(select_gpus(Some(0), Some("0,1"), 1));
        assert!(m.contains("--device 0 and --devices 0,1 disagree"), "{m}");
    }

    #[test]
    fn tensor_parallel_with_gpus_is_one_or_their_number() {
        assert_eq!(select_gpus(None, Some("2,3"), 2).unwrap(), vec![2, 3]);
        // Without a list, the first GPUs.
        assert_eq!(select_gpus(None, None, 4).unwrap(), vec![0, 1, 2, 3]);
        let m = usage(select_gpus(None, Some("0,1"), 4));
        assert!(
            m.contains("--tensor-parallel 4") && m.contains("(2: 0,1)"),
            "{m}"
        );
        let m = usage(select_gpus(Some(3), None, 2));
        assert!(m.contains("--device 3 names one"), "{m}");
    }

    #[test]
    fn gpu_flags_need_the_cuda_backend() {
        let m = usage(args("cpu", None, Some("0,1")).is_cuda());
        assert_eq!(m, "--devices needs --backend cuda");
        // --device alone stays accepted (and ignored) on the CPU, as before.
        assert!(args("cpu", Some(1), None).gpus(1).unwrap().is_empty());
        assert!(args("cpu", None, None).gpus(4).unwrap().is_empty());
        let m = usage(args("cpu", None, None).gpus(0));
        assert!(m.contains("at least 1"), "{m}");
    }
}
