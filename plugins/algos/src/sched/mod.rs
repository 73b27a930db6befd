//! Job scheduling: which queued jobs start now, and on which GPUs.
//!
//! Plain Rust mirrors of the `scheduling` interface of `wit/v0.1.2` (only the fields an
//! algorithm reads: no UUIDs or labels), the placement rule every scheduler shares, the two shipped schedulers ([`fifo_binpack`], [`priority_backfill`]) and the
//! baselines the benchmarks compare them with ([`baseline`]).
//!
//! Memory is placed by reservation: a GPU has `memory_total_mib - reserved_mib` free for
//! a new job, whatever its memory reading says (a job that just started may not have
//! allocated yet). Within one decision every start is added to a working copy of the
//! GPUs ([`Node`]), so a later job sees what earlier ones took: reservations add up and
//! an exclusive job never lands on a GPU another start just took.
//!
//! Reasons are for people and cost a string each across the sandbox's boundary: the
//! schedulers explain the first [`EXPLAIN`] jobs that wait (and every job that can never
//! start) and say nothing of the rest of a long queue, which the host shows by its place
//! in the queue. Formatting is skipped, not just discarded, for the jobs not explained
//! ([`Node::explain`]): at 1,000 queued jobs it was most of a decision's cost.

pub mod baseline;
pub mod fifo_binpack;
pub mod priority_backfill;

/// How many waiting jobs a scheduler explains (besides those that can never start).
pub const EXPLAIN: usize = 32;

/// A GPU as the queue sees it (`gpu-slot`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub index: u32,
    pub memory_total_mib: u64,
    /// Memory reserved by running jobs, MiB.
    pub reserved_mib: u64,
    /// Running jobs on it.
    pub jobs: u32,
    /// A running job holds it exclusively.
    pub exclusive: bool,
    /// Healthy: it may take jobs.
    pub usable: bool,
}

/// Which GPUs a job asks for (`gpu-request`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuRequest {
    /// Any this many GPUs.
    Count(u32),
    /// Exactly these GPUs, by index.
    Specific(Vec<u32>),
}

/// A job waiting in the queue (`queued-job`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    pub id: u64,
    /// The submitter's uid.
    pub owner: u32,
    pub gpus: GpuRequest,
    /// Memory it reserves on each of its GPUs, MiB.
    pub mem_mib: u64,
    /// It wants its GPUs to itself.
    pub exclusive: bool,
    /// Higher goes first.
    pub priority: i32,
    pub submitted_ms: u64,
    pub time_limit_ms: Option<u64>,
}

/// A job running now (`running-job`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Running {
    pub id: u64,
    /// The submitter's uid.
    pub owner: u32,
    /// The GPUs it holds, by index.
    pub gpus: Vec<u32>,
    /// Memory it reserves on each of them, MiB.
    pub mem_mib: u64,
    pub exclusive: bool,
    pub priority: i32,
    pub started_ms: u64,
    pub time_limit_ms: Option<u64>,
}

impl Running {
    /// When its time limit ends it, if it has one.
    pub fn end_ms(&self) -> Option<u64> {
        self.time_limit_ms.map(|l| self.started_ms.saturating_add(l))
    }
}

/// One decision about one queued job (`decision`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Start the job on these GPUs.
    Start { job: u64, gpus: Vec<u32>, reason: String },
    /// Leave it queued, saying why (shown to its owner).
    Wait { job: u64, reason: String },
}

impl Decision {
    /// The job it is about.
    pub fn job(&self) -> u64 {
        match self {
            Decision::Start { job, .. } | Decision::Wait { job, .. } => *job,
        }
    }

    fn wait(job: &Queued, reason: String) -> Decision {
        Decision::Wait { job: job.id, reason }
    }
}

/// Everything one decision is made from (`schedule-input`, less the snapshot).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Input {
    pub now_ms: u64,
    /// Every GPU, in index order.
    pub gpus: Vec<Slot>,
    pub running: Vec<Running>,
    /// The queue, oldest first.
    pub queue: Vec<Queued>,
}

impl Slot {
    /// Memory free for placement, by reservation.
    pub fn free_mib(&self) -> u64 {
        self.memory_total_mib.saturating_sub(self.reserved_mib)
    }

    /// Whether `job` may start on this GPU now: the host's rule.
    pub fn fits(&self, job: &Queued) -> bool {
        self.usable
            && !self.exclusive
            && self.free_mib() >= job.mem_mib
            && (!job.exclusive || self.jobs == 0)
    }

    /// Why `job` may not start here now (for a slot that does not fit it).
    fn why_not(&self, job: &Queued) -> String {
        let i = self.index;
        if !self.usable {
            format!("GPU {i} is unhealthy")
        } else if self.exclusive {
            format!("GPU {i} is held exclusively")
        } else if job.exclusive && self.jobs > 0 {
            format!("GPU {i} runs {}", count(self.jobs as usize, "job", "jobs"))
        } else if self.free_mib() < job.mem_mib {
            format!("GPU {i} has {} MiB free", self.free_mib())
        } else {
            format!("GPU {i} is reserved for a job that goes first")
        }
    }
}

/// The GPUs as one decision goes: what the running jobs hold plus what the starts
/// decided so far take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub slots: Vec<Slot>,
    /// Whether [`Node::best_fit`] says why a job does not fit (on by default); off, it
    /// returns an empty reason without formatting one. A start's reason is always given.
    pub explain: bool,
}

impl Node {
    pub fn new(slots: &[Slot]) -> Node {
        Node { slots: slots.to_vec(), explain: true }
    }

    /// GPU `index` (looked up by index, not position).
    pub fn slot(&self, index: u32) -> Option<&Slot> {
        self.slots.iter().find(|s| s.index == index)
    }

    /// Record that `job` starts on `gpus`.
    pub fn take(&mut self, job: &Queued, gpus: &[u32]) {
        for s in self.slots.iter_mut().filter(|s| gpus.contains(&s.index)) {
            s.reserved_mib = s.reserved_mib.saturating_add(job.mem_mib);
            s.jobs += 1;
            s.exclusive |= job.exclusive;
        }
    }

    /// Record that `job` ended, giving back what it held.
    pub fn release(&mut self, job: &Running) {
        for s in self.slots.iter_mut().filter(|s| job.gpus.contains(&s.index)) {
            s.reserved_mib = s.reserved_mib.saturating_sub(job.mem_mib);
            s.jobs = s.jobs.saturating_sub(1);
            if job.exclusive {
                s.exclusive = false;
            }
        }
    }

    /// Why `job` can never start on this node, even with every GPU idle and healthy: it
    /// names a GPU that does not exist (or one twice), or asks for more GPUs or memory
    /// than there are. Such a job must not hold up the queue behind it.
    pub fn never_fits(&self, job: &Queued) -> Option<String> {
        let why = match &job.gpus {
            GpuRequest::Specific(want) => want.iter().enumerate().find_map(|(k, &i)| {
                if want[..k].contains(&i) {
                    return Some(format!("it names GPU {i} twice"));
                }
                match self.slot(i) {
                    None => Some(format!("GPU {i} does not exist")),
                    Some(s) if s.memory_total_mib < job.mem_mib => {
                        Some(format!("GPU {i} has {} MiB in all", s.memory_total_mib))
                    }
                    Some(_) => None,
                }
            }),
            GpuRequest::Count(n) => {
                let big = self.slots.iter().filter(|s| s.memory_total_mib >= job.mem_mib).count();
                (big < *n as usize).then(|| {
                    let size = if big < self.slots.len() { " with that much memory" } else { "" };
                    format!("the node has {}{size}", count(big, "GPU", "GPUs"))
                })
            }
        }?;
        Some(format!("{}, but can never start on this node: {why}", needs(job)))
    }

    /// Where `job` starts now, and why there; or why it cannot. GPUs in `avoid` are not
    /// used (a backfilled job keeps off GPUs reserved for another).
    ///
    /// Best fit by reserved memory, to pack jobs onto as few GPUs as possible and keep
    /// empty ones for jobs that need them whole: GPUs already running jobs first, and
    /// among those the one with the least free memory that still fits; then empty GPUs,
    /// smallest first. An exclusive job takes the lowest-numbered empty GPUs. A
    /// `Specific` request starts on exactly the GPUs it names, or not at all.
    pub fn best_fit(&self, job: &Queued, avoid: &[u32]) -> Result<(Vec<u32>, String), String> {
        if let Some(why) = self.never_fits(job) {
            return Err(why);
        }
        let ok = |s: &Slot| s.fits(job) && !avoid.contains(&s.index);
        match &job.gpus {
            GpuRequest::Specific(want) => {
                if want.iter().filter_map(|&i| self.slot(i)).all(ok) {
                    Ok((want.clone(), format!("on the GPUs it named ({})", gpu_list(want))))
                } else if !self.explain {
                    Err(String::new())
                } else {
                    let slots = want.iter().filter_map(|&i| self.slot(i));
                    let bad: Vec<String> =
                        slots.filter(|s| !ok(s)).map(|s| s.why_not(job)).collect();
                    Err(format!("{}; {}", needs(job), bad.join("; ")))
                }
            }
            GpuRequest::Count(n) => {
                let mut c: Vec<&Slot> = self.slots.iter().filter(|s| ok(s)).collect();
                if c.len() < *n as usize {
                    if !self.explain {
                        return Err(String::new());
                    }
                    let have = match c.len() {
                        0 => "none has it".to_owned(),
                        1 => "1 has it".to_owned(),
                        k => format!("{k} have it"),
                    };
                    return Err(format!("{}; {have} now", needs(job)));
                }
                if job.exclusive {
                    c.sort_by_key(|s| s.index);
                } else {
                    c.sort_by_key(|s| (s.jobs == 0, s.free_mib(), s.index));
                }
                c.truncate(*n as usize);
                let gpus: Vec<u32> = c.iter().map(|s| s.index).collect();
                let reason = if job.exclusive {
                    format!("{} to itself: the lowest-numbered empty ones", gpu_list(&gpus))
                } else {
                    let each: Vec<String> = c
                        .iter()
                        .map(|s| {
                            let jobs = match s.jobs {
                                0 => "empty".to_owned(),
                                j => count(j as usize, "job", "jobs"),
                            };
                            format!("GPU {} ({jobs}, {} MiB free)", s.index, s.free_mib())
                        })
                        .collect();
                    format!("packed by reserved memory onto {}", each.join(", "))
                };
                Ok((gpus, reason))
            }
        }
    }
}

/// What `job` asks for, as a person reads it: "needs 2 GPUs with 40000 MiB free each".
fn needs(job: &Queued) -> String {
    let (what, n) = match &job.gpus {
        GpuRequest::Count(n) => (count(*n as usize, "GPU", "GPUs"), *n as usize),
        GpuRequest::Specific(g) => (gpu_list(g), g.len()),
    };
    let each = if n > 1 { " each" } else { "" };
    let mem = if job.mem_mib > 0 {
        format!(" with {} MiB free{each}", job.mem_mib)
    } else {
        String::new()
    };
    let alone = if job.exclusive { ", to itself" } else { "" };
    format!("needs {what}{mem}{alone}")
}

/// "GPU 3", "GPUs 0, 3".
fn gpu_list(gpus: &[u32]) -> String {
    let list: Vec<String> = gpus.iter().map(u32::to_string).collect();
    let word = if gpus.len() == 1 { "GPU" } else { "GPUs" };
    format!("{word} {}", list.join(", "))
}

/// "1 job", "2 jobs".
fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// A duration as a person reads it, rounded up: "40 s", "25 min", "1 h", "2 h 5 min".
fn duration(ms: u64) -> String {
    let s = ms.div_ceil(1000);
    let min = s.div_ceil(60);
    if s < 60 {
        format!("{s} s")
    } else if min < 60 {
        format!("{min} min")
    } else if min.is_multiple_of(60) {
        format!("{} h", min / 60)
    } else {
        format!("{} h {} min", min / 60, min % 60)
    }
}

#[cfg(test)]
mod tests;
