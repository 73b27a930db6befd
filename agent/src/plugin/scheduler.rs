//! The `job-scheduler` world's binding: a scheduler plugin is an [`Instance`] of it; its
//! export `schedule-jobs` gets the queue as `gpulet_policy_algos::sched` has it (what
//! the built-in scheduler reads too), converted here and only here, and returns at most
//! one decision per queued job.

use gpulet_policy_algos::sched;
use wasmtime::Store;
use wasmtime::component::InstancePre;

use super::chain::to_wit;
use super::host::HostState;
use super::sandbox::{Fault, Side};
use super::scheduler_bindings::{JobScheduler, JobSchedulerPre};
use super::world::Instance;
use super::{sched_wit as w, wit};
use crate::snapshot::NodeSnapshot;

/// Longest reason kept from a scheduler plugin.
const MAX_REASON: usize = 300;

/// A scheduler plugin, started.
pub type SchedulerPlugin = Instance<JobScheduler>;

/// What the WIT has of the queue that the algorithms do not read: the queued jobs'
/// labels, (job id, key, value).
pub type Labels = Vec<(u64, String, String)>;

super::world::impl_world!(JobScheduler, JobSchedulerPre, "job-scheduler");

impl Instance<JobScheduler> {
    /// Call `schedule-jobs`. More decisions than queued jobs is a fault.
    pub fn schedule(
        &mut self,
        snap: &NodeSnapshot,
        input: &sched::Input,
        labels: &Labels,
    ) -> Result<(Vec<sched::Decision>, Side), Fault> {
        let arg = to_input(snap, input, labels);
        let max = input.queue.len();
        let (decisions, side) = self.call(
            &super::host::CallContext::of(snap),
            |b, s| b.call_schedule_jobs(s, &arg),
            |d: &Vec<w::Decision>| (d.len() > max).then_some((d.len(), max)),
        )?;
        // Reasons end up in events and in `gpulet jobs`: kept short, whatever the plugin
        // returned.
        let short = |mut r: String| {
            if r.len() > MAX_REASON {
                let cut = (0..=MAX_REASON).rev().find(|&i| r.is_char_boundary(i)).unwrap_or(0);
                r.truncate(cut);
            }
            r
        };
        let decisions = decisions
            .into_iter()
            .map(|d| match d {
                w::Decision::Start(s) => {
                    sched::Decision::Start { job: s.job, gpus: s.gpus, reason: short(s.reason) }
                }
                w::Decision::Wait(x) => {
                    sched::Decision::Wait { job: x.job, reason: short(x.reason) }
                }
            })
            .collect();
        Ok((decisions, side))
    }
}

fn to_input(snap: &NodeSnapshot, input: &sched::Input, labels: &Labels) -> w::ScheduleInput {
    w::ScheduleInput {
        snapshot: to_wit(snap),
        gpus: input
            .gpus
            .iter()
            .map(|s| w::GpuSlot {
                index: s.index,
                uuid: snap
                    .inventory
                    .get(s.index as usize)
                    .map_or(String::new(), |g| g.uuid.clone()),
                memory_total_mib: s.memory_total_mib,
                reserved_mib: s.reserved_mib,
                jobs: s.jobs,
                exclusive: s.exclusive,
                usable: s.usable,
            })
            .collect(),
        running: input
            .running
            .iter()
            .map(|r| w::RunningJob {
                id: r.id,
                owner: r.owner,
                gpus: r.gpus.clone(),
                mem_mib: r.mem_mib,
                exclusive: r.exclusive,
                priority: r.priority,
                started_ms: r.started_ms,
                time_limit_ms: r.time_limit_ms,
            })
            .collect(),
        queue: input
            .queue
            .iter()
            .map(|q| w::QueuedJob {
                id: q.id,
                owner: q.owner,
                gpus: match &q.gpus {
                    sched::GpuRequest::Count(n) => w::GpuRequest::Count(*n),
                    sched::GpuRequest::Specific(g) => w::GpuRequest::Specific(g.clone()),
                },
                mem_mib: q.mem_mib,
                exclusive: q.exclusive,
                priority: q.priority,
                submitted_ms: q.submitted_ms,
                time_limit_ms: q.time_limit_ms,
            })
            .collect(),
        labels: labels
            .iter()
            .map(|(job, key, value)| w::JobLabel {
                job: *job,
                key: key.clone(),
                value: value.clone(),
            })
            .collect(),
    }
}
