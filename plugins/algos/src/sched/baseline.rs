//! Baselines for the benchmarks: what the shipped schedulers are compared with. Not
//! shipped as plugins.
//!
//! - [`fifo_one_per_gpu`]: plain first come, first served with whole GPUs: a job of n
//!   GPUs takes n GPUs nothing runs on, and the oldest waiting job blocks the rest.
//! - [`task_spooler`]: task-spooler's rule: every job, in queue order, takes the first
//!   GPUs whose free memory *reading* is above its request. Nothing is reserved, so two
//!   jobs may land on one GPU whose reading has room for only one of them: it may
//!   overcommit, which is what the comparison is meant to show.

use super::{Decision, GpuRequest, Input, Node, Queued, Slot, count, fifo_binpack, gpu_list};

/// Plain FIFO, one job per GPU. Every start passes the host's rules.
pub fn fifo_one_per_gpu(input: &Input) -> Vec<Decision> {
    fifo_binpack::fifo(input, |node: &Node, job: &Queued| {
        let empty = |s: &Slot| s.fits(job) && s.jobs == 0;
        let gpus: Vec<u32> = match &job.gpus {
            GpuRequest::Specific(want) => {
                if !want.iter().all(|&i| node.slot(i).is_some_and(empty)) {
                    return Err(format!("needs {} with nothing running", gpu_list(want)));
                }
                want.clone()
            }
            GpuRequest::Count(n) => {
                let free: Vec<u32> =
                    node.slots.iter().filter(|s| empty(s)).map(|s| s.index).collect();
                if free.len() < *n as usize {
                    let need = count(*n as usize, "empty GPU", "empty GPUs");
                    return Err(format!(
                        "needs {need}; {} empty now",
                        count(free.len(), "is", "are")
                    ));
                }
                free[..*n as usize].to_vec()
            }
        };
        Ok((gpus.clone(), format!("one job per GPU: {}", gpu_list(&gpus))))
    })
}

/// task-spooler's rule. `free_mib_reading` holds each GPU's free memory as read from the
/// GPU (one per `input.gpus`, in that order; give a GPU without a reading 0). Health,
/// exclusivity and reservations are not looked at, as task-spooler knows nothing of
/// them; a job that does not fit is passed over, not waited for.
pub fn task_spooler(input: &Input, free_mib_reading: &[u64]) -> Vec<Decision> {
    input
        .queue
        .iter()
        .map(|job| {
            let above = |k: usize| free_mib_reading.get(k).is_some_and(|&f| f > job.mem_mib);
            let gpus = match &job.gpus {
                GpuRequest::Count(n) => {
                    let c: Vec<u32> = (0..input.gpus.len())
                        .filter(|&k| above(k))
                        .map(|k| input.gpus[k].index)
                        .take(*n as usize)
                        .collect();
                    (c.len() == *n as usize).then_some(c)
                }
                GpuRequest::Specific(want) => want
                    .iter()
                    .all(|&i| input.gpus.iter().position(|s| s.index == i).is_some_and(above))
                    .then(|| want.clone()),
            };
            match gpus {
                Some(gpus) => Decision::Start {
                    reason: format!("task-spooler: free memory read above {} MiB", job.mem_mib),
                    job: job.id,
                    gpus,
                },
                None => Decision::wait(
                    job,
                    format!("task-spooler: too few GPUs read more than {} MiB free", job.mem_mib),
                ),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sched::tests::{gpu, job, starts, waits};

    #[test]
    fn one_per_gpu_takes_only_empty_gpus_in_strict_order() {
        let input = Input {
            gpus: vec![gpu(0, 80_000, 1_000), gpu(1, 80_000, 0), gpu(2, 80_000, 0)],
            queue: vec![job("a", 1, 1_000), job("b", 2, 1_000), job("c", 1, 1_000)],
            ..Input::default()
        };
        let out = fifo_one_per_gpu(&input);
        assert_eq!(starts(&out), [("a", vec![1])]);
        assert_eq!(
            waits(&out),
            [
                ("b", "needs 2 empty GPUs; 1 is empty now"),
                ("c", "behind job b (first come, first served)")
            ]
        );
    }

    #[test]
    fn task_spooler_reads_memory_and_may_overcommit() {
        let input = Input {
            gpus: vec![gpu(0, 80_000, 0), gpu(1, 80_000, 0)],
            queue: vec![job("a", 1, 50_000), job("b", 1, 50_000), job("big", 2, 70_000)],
            ..Input::default()
        };
        let out = task_spooler(&input, &[60_000, 75_000]);
        // a and b both see GPU 0's 60000 MiB: together they need 100000.
        assert_eq!(starts(&out), [("a", vec![0]), ("b", vec![0])]);
        assert_eq!(waits(&out)[0].0, "big");
    }
}
