//! The host's rules for a scheduler's decisions. Whatever a scheduler plugin returns,
//! a job starts only if: it is queued and decided once; it gets exactly what it asked
//! for (that many GPUs, or exactly the GPUs it named); each GPU exists, is healthy, is
//! not given twice, is not held exclusively, is empty if the job is exclusive, and has
//! the job's memory free **by reservation** (its memory less what running jobs and the
//! starts before it in the same decision reserved), never by a memory reading. A refused
//! start is audited (`placement-rejected`) and the job stays queued.

use std::collections::{BTreeMap, HashSet};

use gpulet_policy_algos::sched::{Decision, GpuRequest, Input, Node, Queued, Running, Slot};

use super::spec::Want;
use super::{Job, State};
use crate::snapshot::NodeSnapshot;

/// The GPUs as the running jobs hold them.
#[derive(Debug, Clone)]
pub struct View {
    pub slots: Vec<Slot>,
}

impl View {
    pub fn new<'a>(snap: &NodeSnapshot, jobs: impl Iterator<Item = &'a Job>) -> View {
        let mut slots: Vec<Slot> = snap
            .gpus()
            .map(|(info, s)| Slot {
                index: info.index,
                memory_total_mib: info.memory_total_mib,
                reserved_mib: 0,
                jobs: 0,
                exclusive: false,
                usable: super::usable(s.health),
            })
            .collect();
        for j in jobs.filter(|j| j.state == State::Running) {
            for &g in &j.gpus {
                if let Some(s) = slots.get_mut(g as usize) {
                    s.reserved_mib += j.spec.mem_mib;
                    s.jobs += 1;
                    s.exclusive |= j.spec.exclusive;
                }
            }
        }
        View { slots }
    }

    /// What the scheduler decides from: times on the snapshot's clock (`now_ms`), the
    /// queue oldest first.
    pub fn input<'a>(
        &self,
        snap: &NodeSnapshot,
        jobs: impl Iterator<Item = &'a Job>,
        unix_now: u64,
    ) -> Input {
        let on_clock = |unix: u64| snap.now_ms.saturating_sub(unix_now.saturating_sub(unix));
        let mut running = Vec::new();
        let mut queue = Vec::new();
        for j in jobs {
            match j.state {
                State::Running => running.push(Running {
                    id: j.id,
                    owner: j.owner.uid,
                    gpus: j.gpus.clone(),
                    mem_mib: j.spec.mem_mib,
                    exclusive: j.spec.exclusive,
                    priority: j.spec.priority,
                    started_ms: on_clock(j.started_ms.unwrap_or(unix_now)),
                    time_limit_ms: j.spec.time_limit_ms,
                }),
                State::Queued => queue.push(queued(j, on_clock(j.submitted_ms))),
                _ => {}
            }
        }
        Input { now_ms: snap.now_ms, gpus: self.slots.clone(), running, queue }
    }
}

/// A queued job as schedulers see it.
pub fn queued(j: &Job, submitted_ms: u64) -> Queued {
    Queued {
        id: j.id,
        owner: j.owner.uid,
        gpus: match &j.spec.gpus {
            Want::Count(n) => GpuRequest::Count(*n),
            Want::Specific(g) => GpuRequest::Specific(g.clone()),
        },
        mem_mib: j.spec.mem_mib,
        exclusive: j.spec.exclusive,
        priority: j.spec.priority,
        submitted_ms,
        time_limit_ms: j.spec.time_limit_ms,
    }
}

/// A decision, checked.
#[derive(Debug, Default, PartialEq)]
pub struct Checked {
    /// (job, GPUs, the scheduler's reason), in the scheduler's order.
    pub starts: Vec<(u64, Vec<u32>, String)>,
    /// (job, why it waits).
    pub waits: Vec<(u64, String)>,
    /// (job, the GPUs it was given, why the host refused).
    pub rejected: Vec<(u64, Vec<u32>, String)>,
}

/// Check `decisions` against the rules (module docs) on the GPUs of `view`. A job the
/// scheduler said nothing about waits.
pub fn check(view: &View, jobs: &BTreeMap<u64, Job>, decisions: Vec<Decision>) -> Checked {
    let mut node = Node::new(&view.slots);
    let mut out = Checked::default();
    let mut decided = HashSet::new();
    for d in decisions {
        let id = Some(d.job()).filter(|id| jobs.get(id).is_some_and(|j| j.state == State::Queued));
        let Some(id) = id else {
            tracing::warn!(
                job = d.job(),
                "the scheduler decided about a job that is not queued; ignored"
            );
            continue;
        };
        if !decided.insert(id) {
            if let Decision::Start { gpus, .. } = d {
                out.rejected.push((id, gpus, "a second decision about the same job".into()));
            }
            continue;
        }
        match d {
            Decision::Wait { reason, .. } => out.waits.push((id, reason)),
            Decision::Start { gpus, reason, .. } => {
                let job = queued(&jobs[&id], 0);
                match refuse(&node, &job, &gpus) {
                    Some(why) => out.rejected.push((id, gpus, why)),
                    None => {
                        node.take(&job, &gpus);
                        out.starts.push((id, gpus, reason));
                    }
                }
            }
        }
    }
    // Schedulers explain the front of a long queue only (`decision` in the WIT): the
    // rest are shown by their place in it (ids are in submission order).
    let queued = jobs.iter().filter(|(_, j)| j.state == State::Queued);
    for (older, (&id, _)) in queued.enumerate() {
        if !decided.contains(&id) {
            let why = format!(
                "waits; {older} older {} queued (the scheduler explains the front of the queue only)",
                if older == 1 { "job is" } else { "jobs are" }
            );
            out.waits.push((id, why));
        }
    }
    out
}

/// Why `job` may not start on `gpus` now; `None` if it may.
fn refuse(node: &Node, job: &Queued, gpus: &[u32]) -> Option<String> {
    match &job.gpus {
        GpuRequest::Count(n) if gpus.len() != *n as usize => {
            return Some(format!("it asked for {n} GPUs and was given {}", gpus.len()));
        }
        GpuRequest::Specific(want) => {
            let mut a = want.clone();
            let mut b = gpus.to_vec();
            a.sort_unstable();
            b.sort_unstable();
            if a != b {
                return Some(format!("it asked for GPUs {want:?}"));
            }
        }
        _ => {}
    }
    for (k, &g) in gpus.iter().enumerate() {
        if gpus[..k].contains(&g) {
            return Some(format!("GPU {g} is given twice"));
        }
        let Some(slot) = node.slot(g) else {
            return Some(format!("GPU {g} does not exist"));
        };
        if !slot.usable {
            return Some(format!("GPU {g} is unhealthy"));
        }
        if slot.exclusive {
            return Some(format!("GPU {g} is held exclusively by a running job"));
        }
        if job.exclusive && slot.jobs > 0 {
            return Some(format!("the job is exclusive and GPU {g} runs {} jobs", slot.jobs));
        }
        if slot.free_mib() < job.mem_mib {
            return Some(format!(
                "GPU {g} has {} MiB free by reservation; the job reserves {} MiB",
                slot.free_mib(),
                job.mem_mib
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::spec::{Owner, Spec};
    use crate::jobs::{State, Usage};

    fn job(id: u64, want: Want, mem_mib: u64, exclusive: bool) -> Job {
        Job {
            id,
            owner: Owner { user: "u".into(), uid: 1000, gid: 1000, via: "socket".into() },
            spec: Spec {
                name: None,
                command: vec!["true".into()],
                gpus: want,
                mem_mib,
                exclusive,
                priority: 0,
                labels: Default::default(),
                cwd: "/".into(),
                env: Default::default(),
                time_limit_ms: None,
                power_cap_w: None,
                workload: None,
            },
            state: State::Queued,
            submitted_ms: 0,
            started_ms: None,
            ended_ms: None,
            gpus: Vec::new(),
            uuids: Vec::new(),
            process: None,
            why: None,
            exit_code: None,
            signal: None,
            stopping: None,
            usage: Usage::default(),
        }
    }

    fn view(usable: &[bool]) -> View {
        View {
            slots: usable
                .iter()
                .enumerate()
                .map(|(i, &u)| Slot {
                    index: i as u32,
                    memory_total_mib: 1000,
                    reserved_mib: 0,
                    jobs: 0,
                    exclusive: false,
                    usable: u,
                })
                .collect(),
        }
    }

    fn start(id: u64, gpus: Vec<u32>) -> Decision {
        Decision::Start { job: id, gpus, reason: "r".into() }
    }

    #[test]
    fn the_host_refuses_what_breaks_a_rule_and_takes_the_rest() {
        let jobs: BTreeMap<u64, Job> = [
            (1, job(1, Want::Count(1), 0, true)),
            (2, job(2, Want::Count(1), 0, true)),
            (3, job(3, Want::Count(1), 600, false)),
            (4, job(4, Want::Count(1), 600, false)),
            (5, job(5, Want::Specific(vec![2]), 0, false)),
            (6, job(6, Want::Count(2), 0, false)),
        ]
        .into();
        let decisions = vec![
            start(1, vec![0]),
            // The same GPU to a second exclusive job in the same decision.
            start(2, vec![0]),
            start(3, vec![1]),
            // Reservations add up within a decision: 600 + 600 > 1000.
            start(4, vec![1]),
            // Not the GPU it named.
            start(5, vec![3]),
            // Twice the same GPU in one start; then an unhealthy one; then one that does
            // not exist.
            start(6, vec![2, 2]),
            start(6, vec![2, 3]),
            Decision::Wait { job: 77, reason: "not a job".into() },
        ];
        let c = check(&view(&[true, true, true, false]), &jobs, decisions);
        let started: Vec<u64> = c.starts.iter().map(|s| s.0).collect();
        assert_eq!(started, vec![1, 3]);
        let why = |id: u64| c.rejected.iter().find(|r| r.0 == id).map(|r| r.2.clone());
        assert_eq!(why(2).unwrap(), "GPU 0 is held exclusively by a running job");
        assert!(why(4).unwrap().contains("GPU 1 has 400 MiB free by reservation"), "{c:?}");
        assert!(why(5).unwrap().contains("it asked for GPUs [2]"), "{c:?}");
        assert_eq!(why(6).unwrap(), "GPU 2 is given twice");
        // The second decision about job 6 is refused as such.
        assert!(c.rejected.iter().any(|r| r.0 == 6 && r.2.contains("second decision")), "{c:?}");
        let missing = check(&view(&[true]), &jobs, vec![start(1, vec![9])]);
        assert_eq!(missing.rejected[0].2, "GPU 9 does not exist");
        let unhealthy = check(&view(&[false]), &jobs, vec![start(1, vec![0])]);
        assert_eq!(unhealthy.rejected[0].2, "GPU 0 is unhealthy");
        // Jobs the scheduler says nothing about wait, shown by their place in the queue.
        let w = unhealthy.waits.iter().find(|w| w.0 == 2).unwrap();
        assert!(w.1.starts_with("waits; 1 older job is queued"), "{unhealthy:?}");
    }
}
