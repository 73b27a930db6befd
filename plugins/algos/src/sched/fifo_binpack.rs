//! fifo-binpack: strict first come, first served, packed onto as few GPUs as possible.
//!
//! Jobs start in queue order (oldest first). When the oldest waiting job cannot start,
//! nothing behind it starts, even if it would fit: a small job never overtakes a big
//! one, so the big one cannot starve. Each job goes where [`Node::best_fit`] puts it:
//! onto the fullest GPUs by reserved memory that still fit it, keeping empty GPUs free
//! for exclusive and large jobs. A job that can never start on this node (see
//! [`Node::never_fits`]) waits without holding up the others.

use super::{Decision, EXPLAIN, Input, Node, Queued};

/// The starts for this tick, in queue order, and why every other job waits.
pub fn decide(input: &Input) -> Vec<Decision> {
    fifo(input, |node, job| node.best_fit(job, &[]))
}

/// Strict first come, first served, with `place` choosing each job's GPUs (or saying
/// why it cannot start): shared with the one-job-per-GPU baseline. Explains the first
/// [`EXPLAIN`] jobs that wait.
pub(crate) fn fifo(
    input: &Input,
    place: impl Fn(&Node, &Queued) -> Result<(Vec<u32>, String), String>,
) -> Vec<Decision> {
    let mut node = Node::new(&input.gpus);
    let mut blocked_by: Option<u64> = None;
    let mut explained = 0;
    let mut out = Vec::new();
    for job in &input.queue {
        if let Some(why) = node.never_fits(job) {
            out.push(Decision::wait(job, why));
            continue;
        }
        if let Some(head) = blocked_by {
            if explained < EXPLAIN {
                explained += 1;
                out.push(Decision::wait(
                    job,
                    format!("behind job {head} (first come, first served)"),
                ));
            }
            continue;
        }
        match place(&node, job) {
            Ok((gpus, reason)) => {
                node.take(job, &gpus);
                out.push(Decision::Start { job: job.id, gpus, reason });
            }
            Err(why) => {
                blocked_by = Some(job.id);
                explained += 1;
                out.push(Decision::wait(job, why));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sched::tests::{gpu, job, running, starts, waits};
    use crate::sched::{GpuRequest, Slot};

    #[test]
    fn packs_onto_the_fullest_gpu_that_fits() {
        let input = Input {
            gpus: vec![gpu(0, 80_000, 0), gpu(1, 80_000, 50_000), gpu(2, 80_000, 20_000)],
            queue: vec![job("a", 1, 20_000), job("b", 1, 20_000), job("c", 1, 40_000)],
            ..Input::default()
        };
        let out = decide(&input);
        // a: GPU 1 (30000 free) is the fullest that fits; b: GPU 1 again (10000 left
        // after a) is too full, so GPU 2 (60000 free); c: GPU 2 (40000 left after b).
        assert_eq!(starts(&out), [("a", vec![1]), ("b", vec![2]), ("c", vec![2])]);
        assert!(waits(&out).is_empty());
    }

    #[test]
    fn empty_gpus_go_smallest_first_and_exclusive_jobs_take_the_lowest_empty_ones() {
        let mut big = job("big", 2, 10_000);
        big.exclusive = true;
        let input = Input {
            gpus: vec![
                gpu(0, 80_000, 0),
                gpu(1, 40_000, 0),
                Slot { jobs: 1, ..gpu(2, 40_000, 0) },
                gpu(3, 40_000, 0),
            ],
            queue: vec![job("small", 1, 30_000), big],
            ..Input::default()
        };
        let out = decide(&input);
        // small: GPU 2 runs a (memoryless) job: packed there, not onto an empty GPU.
        // big: exclusive, the lowest empty GPUs are 0 and 1.
        assert_eq!(starts(&out), [("small", vec![2]), ("big", vec![0, 1])]);
    }

    #[test]
    fn exclusive_jobs_share_nothing_and_nothing_shares_with_them() {
        let mut alone = job("alone", 1, 1_000);
        alone.exclusive = true;
        let input = Input {
            gpus: vec![Slot { jobs: 1, ..gpu(0, 80_000, 1_000) }, gpu(1, 80_000, 0)],
            queue: vec![alone, job("x", 1, 1_000), job("y", 1, 1_000)],
            ..Input::default()
        };
        let out = decide(&input);
        assert_eq!(starts(&out), [("alone", vec![1]), ("x", vec![0]), ("y", vec![0])]);

        let input = Input {
            gpus: vec![Slot { jobs: 1, exclusive: true, ..gpu(0, 80_000, 1_000) }],
            queue: vec![job("x", 1, 1_000)],
            ..Input::default()
        };
        assert_eq!(
            waits(&decide(&input)),
            [("x", "needs 1 GPU with 1000 MiB free; none has it now")]
        );
    }

    #[test]
    fn unhealthy_gpus_are_skipped() {
        let input = Input {
            gpus: vec![Slot { usable: false, ..gpu(0, 80_000, 70_000) }, gpu(1, 80_000, 0)],
            queue: vec![job("a", 1, 1_000)],
            ..Input::default()
        };
        assert_eq!(starts(&decide(&input)), [("a", vec![1])]);
    }

    #[test]
    fn the_head_blocks_everything_behind_it() {
        let input = Input {
            gpus: vec![gpu(0, 80_000, 0), gpu(1, 80_000, 50_000)],
            queue: vec![job("a", 1, 10_000), job("7", 2, 40_000), job("c", 1, 1_000)],
            ..Input::default()
        };
        let out = decide(&input);
        assert_eq!(starts(&out), [("a", vec![1])]);
        assert_eq!(
            waits(&out),
            [
                ("7", "needs 2 GPUs with 40000 MiB free each; 1 has it now"),
                ("c", "behind job 7 (first come, first served)"),
            ]
        );
    }

    #[test]
    fn a_job_that_can_never_start_does_not_block() {
        let input = Input {
            gpus: vec![gpu(0, 80_000, 0), gpu(1, 80_000, 0)],
            queue: vec![job("huge", 3, 1_000), job("b", 1, 1_000)],
            ..Input::default()
        };
        let out = decide(&input);
        assert_eq!(starts(&out), [("b", vec![0])]);
        assert_eq!(
            waits(&out),
            [(
                "huge",
                "needs 3 GPUs with 1000 MiB free each, but can never start on this node: the node has 2 GPUs"
            )]
        );
    }

    #[test]
    fn specific_gpus_or_nothing() {
        let mut named = job("named", 0, 30_000);
        named.gpus = GpuRequest::Specific(vec![2, 0]);
        let mut busy = job("busy", 0, 30_000);
        busy.gpus = GpuRequest::Specific(vec![1]);
        let gpus = vec![gpu(0, 80_000, 0), gpu(1, 80_000, 60_000), gpu(2, 80_000, 0)];
        let out = decide(&Input { gpus: gpus.clone(), queue: vec![named], ..Input::default() });
        assert_eq!(starts(&out), [("named", vec![2, 0])]);
        let out = decide(&Input { gpus, queue: vec![busy], ..Input::default() });
        assert_eq!(
            waits(&out),
            [("busy", "needs GPU 1 with 30000 MiB free; GPU 1 has 20000 MiB free")]
        );
    }

    #[test]
    fn reservations_add_up_within_one_decision() {
        let input = Input {
            gpus: vec![gpu(0, 80_000, 20_000)],
            running: vec![running("r", &[0], 20_000, None)],
            queue: vec![job("a", 1, 30_000), job("b", 1, 30_000), job("c", 1, 30_000)],
            ..Input::default()
        };
        let out = decide(&input);
        // 20000 + 30000 + 30000 fills the 80000 exactly; c finds nothing left.
        assert_eq!(starts(&out), [("a", vec![0]), ("b", vec![0])]);
        assert_eq!(waits(&out), [("c", "needs 1 GPU with 30000 MiB free; none has it now")]);
    }

    #[test]
    fn a_gpu_taken_in_this_decision_is_not_given_to_an_exclusive_job() {
        let mut alone = job("alone", 1, 0);
        alone.exclusive = true;
        let input = Input {
            gpus: vec![gpu(0, 80_000, 0)],
            queue: vec![job("a", 1, 1_000), alone],
            ..Input::default()
        };
        let out = decide(&input);
        assert_eq!(starts(&out), [("a", vec![0])]);
        assert_eq!(waits(&out), [("alone", "needs 1 GPU, to itself; none has it now")]);
    }
}
