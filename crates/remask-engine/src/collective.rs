//! Collectives of a tensor-parallel group. The forward pass needs one: the
//! sum of the row-parallel projections' partial outputs over the ranks
//! (all-reduce). Two implementations: here, ranks as threads of one process
//! over host memory (`ThreadRank`), so the tensor-parallel math runs and is
//! tested on any CPU; on GPUs, NCCL over device buffers
//! (`cuda::NcclRank`, feature `cuda`).

use std::sync::{Arc, Barrier, Mutex};

/// One rank's view of its group, over buffers of type `Buf` (host slices by
/// default; device buffers for NCCL).
pub trait Collective<Buf: ?Sized = [f32]>: Send + Sync {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Replaces `data` on every rank by the element-wise sum over the ranks.
    fn all_reduce_sum(&self, data: &mut Buf);
}

/// State shared by the ranks of one thread group.
struct Shared {
    slots: Vec<Mutex<Vec<f32>>>,
    barrier: Barrier,
}

/// One rank of a group of threads.
pub struct ThreadRank {
    rank: usize,
    shared: Arc<Shared>,
}

/// A group of `world` thread ranks; hand one to each rank's thread.
pub fn thread_group(world: usize) -> Vec<ThreadRank> {
    let shared = Arc::new(Shared {
        slots: (0..world).map(|_| Mutex::new(Vec::new())).collect(),
        barrier: Barrier::new(world),
    });
    (0..world)
        .map(|rank| ThreadRank {
            rank,
            shared: shared.clone(),
        })
        .collect()
}

/// Every rank sums in rank order, so all ranks end with identical bits.
impl Collective for ThreadRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.shared.slots.len()
    }

    fn all_reduce_sum(&self, data: &mut [f32]) {
        let s = &self.shared;
        {
            let mut mine = s.slots[self.rank].lock().unwrap();
            mine.clear();
            mine.extend_from_slice(data);
        }
        s.barrier.wait();
        data.fill(0.0);
        for slot in &s.slots {
            let other = slot.lock().unwrap();
            for (d, o) in data.iter_mut().zip(other.iter()) {
                *d += o;
            }
        }
        // Nobody may overwrite a slot before every rank has read it.
        s.barrier.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_ranks_get_the_same_sum() {
        let group = thread_group(4);
        let results: Vec<Vec<f32>> = std::thread::scope(|s| {
            let handles: Vec<_> = group
                .iter()
                .map(|r| {
                    s.spawn(move || {
                        let mut v = vec![r.rank() as f32 + 0.1; 5];
                        r.all_reduce_sum(&mut v);
                        r.all_reduce_sum(&mut v);
                        v
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for v in &results {
            assert_eq!(v, &results[0]);
            assert!((v[0] - 4.0 * (0.1 + 1.1 + 2.1 + 3.1)).abs() < 1e-5);
        }
    }
}
