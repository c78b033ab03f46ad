//! A tensor-parallel group of GPUs in one process: one `CudaBackend` per
//! listed GPU, joined by NCCL.
//!
//! The group lives inside one worker process: rank 0's NCCL unique id is
//! made here and handed to the other ranks' threads directly. Groups across
//! processes or machines would need the id sent over the network; they are
//! out of scope (tensor parallelism inside a node, pipeline stages across
//! nodes).

use super::{CudaBackend, CudaError};
use crate::collective::Collective;
use cudarc::driver::{CudaSlice, CudaStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};

/// One GPU's rank in an NCCL group: the GPU implementation of `Collective`,
/// over device buffers. Calls on one communicator are serialised.
pub struct NcclRank {
    comm: Mutex<cudarc::nccl::Comm>,
    rank: usize,
    world: usize,
}

// SAFETY: the communicator is only used under the mutex.
unsafe impl Send for NcclRank {}
unsafe impl Sync for NcclRank {}

impl NcclRank {
    /// Joins the group of `id` as `rank` of `world`, on `stream`'s GPU
    /// (`ncclCommInitRank`: blocks until every rank has joined).
    pub fn join(
        stream: Arc<CudaStream>,
        rank: usize,
        world: usize,
        id: cudarc::nccl::Id,
    ) -> Result<Self, CudaError> {
        let comm =
            cudarc::nccl::Comm::from_rank(stream, rank, world, id).map_err(CudaError::Nccl)?;
        Ok(NcclRank {
            comm: Mutex::new(comm),
            rank,
            world,
        })
    }
}

impl Collective<CudaSlice<f32>> for NcclRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    /// NCCL's sum, queued on the rank's stream like any kernel.
    fn all_reduce_sum(&self, data: &mut CudaSlice<f32>) {
        self.comm
            .lock()
            .unwrap()
            .all_reduce_in_place(data, &cudarc::nccl::ReduceOp::Sum)
            .expect("NCCL: all-reduce");
    }
}

/// The backends of a tensor-parallel group over `devices`, in rank order
/// (rank i on `devices[i]`), for `Engine::from_backends`. One device is a
/// plain backend (world 1, no NCCL).
pub fn tp_group(devices: &[usize]) -> Result<Vec<CudaBackend>, CudaError> {
    check_devices(devices)?;
    if let [device] = devices {
        return Ok(vec![CudaBackend::new(*device)?]);
    }
    // cudarc panics on a missing library: look first, and say what to do.
    // SAFETY: only probes for the libraries.
    for (name, present) in unsafe {
        [
            (
                "libcuda (the NVIDIA driver)",
                cudarc::driver::sys::is_culib_present(),
            ),
            ("libnccl (NCCL)", cudarc::nccl::sys::is_culib_present()),
        ]
    } {
        if !present {
            return Err(CudaError::Missing(name));
        }
    }
    let world = devices.len();
    let id = cudarc::nccl::Id::new().map_err(CudaError::Nccl)?;
    let opened = Barrier::new(world);
    let failed = AtomicBool::new(false);
    // Each rank on its own thread: `ncclCommInitRank` blocks until every rank
    // has joined. A rank joins only once every GPU has opened, so that a bad
    // ordinal is an error rather than the other ranks waiting forever; the
    // context `CudaBackend::new` makes current on the thread is the device
    // NCCL binds the rank to.
    let ranks: Vec<Result<Option<CudaBackend>, CudaError>> = std::thread::scope(|s| {
        let handles: Vec<_> = devices
            .iter()
            .enumerate()
            .map(|(rank, &device)| {
                let (opened, failed) = (&opened, &failed);
                s.spawn(move || {
                    // A panic, too, must reach the barrier, or the other
                    // ranks would wait there forever.
                    let backend = std::panic::catch_unwind(|| CudaBackend::new(device));
                    if !matches!(backend, Ok(Ok(_))) {
                        failed.store(true, Ordering::SeqCst);
                    }
                    opened.wait();
                    match backend.unwrap_or_else(|panic| std::panic::resume_unwind(panic)) {
                        Err(e) => Err(e),
                        Ok(_) if failed.load(Ordering::SeqCst) => Ok(None),
                        Ok(b) => b.with_nccl(rank, world, id).map(Some),
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a GPU rank panicked while starting"))
            .collect()
    });
    let ranks = ranks.into_iter().collect::<Result<Vec<_>, _>>()?;
    Ok(ranks
        .into_iter()
        .map(|b| b.expect("no rank failed, so every rank joined"))
        .collect())
}

/// A non-empty list without repeats, checked before CUDA is touched: two
/// ranks on one GPU would deadlock NCCL's initialisation.
fn check_devices(devices: &[usize]) -> Result<(), CudaError> {
    if devices.is_empty() {
        return Err(CudaError::NoDevices);
    }
    for (i, d) in devices.iter().enumerate() {
        if devices[..i].contains(d) {
            return Err(CudaError::DuplicateDevice(*d));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bad lists are refused before any CUDA library is loaded, so this
    /// runs on any machine.
    #[test]
    fn tp_group_rejects_duplicate_and_empty_device_lists() {
        let err = tp_group(&[0, 1, 0]).err().expect("a duplicate is refused");
        assert!(matches!(err, CudaError::DuplicateDevice(0)), "{err:?}");
        assert_eq!(err.to_string(), "--devices lists GPU 0 twice");
        let err = tp_group(&[]).err().expect("an empty list is refused");
        assert!(matches!(err, CudaError::NoDevices), "{err:?}");
        assert!(check_devices(&[3, 1, 2]).is_ok());
    }
}
