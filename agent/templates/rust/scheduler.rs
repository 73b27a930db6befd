//! {{name}}: a gpulet job scheduler.
//!
//! While jobs are queued, the agent calls `schedule_jobs` with the queue (oldest first),
//! the running jobs and every GPU's slot (memory, what running jobs reserve, whether one
//! holds it exclusively, whether it is healthy). Each decision starts a job on GPUs or
//! says why it waits; the agent checks every start against its rules before anything
//! runs (the GPUs exist, are usable, have the memory free by reservation, exclusivity
//! holds, no GPU given twice).
//!
//! This one is first come, first served with first fit: each job, oldest first, takes
//! the lowest-numbered GPUs that fit it; the first that cannot start holds the rest
//! back (so that a big job cannot starve). Change `decide` to your policy; keep it a
//! plain function of the input so that `cargo test` checks it natively.
//!
//! Config (JSON): `{}`.

// The generated bindings flatten the queue's records into calls with many arguments.
#![allow(clippy::too_many_arguments)]

wit_bindgen::generate!({ path: "wit", world: "job-scheduler" });

// The world's own types (`ScheduleInput`, `Decision`, `ConfigError`, `GpuInfo`,
// `PluginInfo`) are in scope at the crate root; the rest are in `gpulet::policy`.
use gpulet::policy::scheduling::{GpuRequest, GpuSlot, QueuedJob, Start, Wait};

/// Whether `job` may start on `slot` now (the agent's rule, by reservation).
fn fits(slot: &GpuSlot, job: &QueuedJob) -> bool {
    slot.usable
        && !slot.exclusive
        && slot.memory_total_mib.saturating_sub(slot.reserved_mib) >= job.mem_mib
        && (!job.exclusive || slot.jobs == 0)
}

/// The policy: starts in queue order, and why the first job that cannot start waits.
fn decide(input: &ScheduleInput) -> Vec<Decision> {
    // A working copy: each start takes its share before the next job is placed.
    let mut slots = input.gpus.clone();
    let mut out = Vec::new();
    for job in &input.queue {
        let gpus: Option<Vec<u32>> = match &job.gpus {
            GpuRequest::Count(n) => {
                let free: Vec<u32> = slots
                    .iter()
                    .filter(|s| fits(s, job))
                    .map(|s| s.index)
                    .collect();
                (free.len() >= *n as usize).then(|| free[..*n as usize].to_vec())
            }
            GpuRequest::Specific(want) => want
                .iter()
                .all(|&i| slots.iter().any(|s| s.index == i && fits(s, job)))
                .then(|| want.clone()),
        };
        let Some(gpus) = gpus else {
            let reason =
                "not enough GPUs with its memory free now (first come, first served)".into();
            out.push(Decision::Wait(Wait {
                job: job.id,
                reason,
            }));
            break;
        };
        for s in slots.iter_mut().filter(|s| gpus.contains(&s.index)) {
            s.reserved_mib += job.mem_mib;
            s.jobs += 1;
            s.exclusive |= job.exclusive;
        }
        let reason = format!("first fit on GPUs {gpus:?}");
        out.push(Decision::Start(Start {
            job: job.id,
            gpus,
            reason,
        }));
    }
    out
}

struct Plugin;

impl Guest for Plugin {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "{{name}}".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            api_version: "{{api}}".into(),
        }
    }

    fn validate_config(config: String) -> Result<(), Vec<ConfigError>> {
        let ok = matches!(config.trim(), "" | "{}");
        let message = "this scheduler takes no options; accepted: {}".into();
        if ok {
            Ok(())
        } else {
            Err(vec![ConfigError {
                path: "$".into(),
                message,
            }])
        }
    }

    fn init(config: String, _gpus: Vec<GpuInfo>) -> Result<(), String> {
        Self::validate_config(config).map_err(|e| e[0].message.clone())
    }

    fn schedule_jobs(input: ScheduleInput) -> Vec<Decision> {
        decide(&input)
    }
}

export!(Plugin);

#[cfg(test)]
mod tests {
    use super::*;
    use gpulet::policy::types::Snapshot;

    fn slot(index: u32, reserved_mib: u64) -> GpuSlot {
        GpuSlot {
            index,
            uuid: format!("GPU-{index}"),
            memory_total_mib: 80_000,
            reserved_mib,
            jobs: u32::from(reserved_mib > 0),
            exclusive: false,
            usable: true,
        }
    }

    fn job(id: u64, n: u32, mem_mib: u64) -> QueuedJob {
        QueuedJob {
            id,
            owner: 1000,
            gpus: GpuRequest::Count(n),
            mem_mib,
            exclusive: false,
            priority: 0,
            submitted_ms: 0,
            time_limit_ms: None,
        }
    }

    #[test]
    fn first_fit_in_queue_order_and_the_first_that_cannot_start_holds_the_rest() {
        let input = ScheduleInput {
            snapshot: Snapshot {
                seq: 1,
                now_ms: 0,
                budget_w: None,
                gpus: vec![],
            },
            gpus: vec![slot(0, 70_000), slot(1, 0)],
            running: vec![],
            queue: vec![job(1, 1, 20_000), job(2, 2, 20_000), job(3, 1, 1_000)],
            labels: vec![],
        };
        let out = decide(&input);
        assert!(matches!(&out[0], Decision::Start(s) if s.job == 1 && s.gpus == [1]));
        assert!(matches!(&out[1], Decision::Wait(w) if w.job == 2));
        assert_eq!(out.len(), 2, "job 3 waits behind job 2");
    }
}
