//! The job queue (`docs/jobs.md`): jobs submitted over the control socket or MQTT wait
//! in a durable queue; once a tick (and as soon as one is submitted) the scheduler
//! (a `job-scheduler` plugin, or the built-in FIFO bin-packer) decides which start where;
//! the host checks every decision ([`place`]) before [`launch`] starts anything; each
//! running job is accounted its GPUs' energy and reaped when it ends.
//!
//! - [`spec`]: a submission checked into a job spec (every bad input named).
//! - [`launch`]: the only code that spawns a process: as the submitter, in its own
//!   process group and cgroup, with the environment it should see.
//! - [`place`]: the host's rules for a scheduler's decisions.
//! - [`store`]: each job on disk, written before a submission is acknowledged and at
//!   every change.
//! - [`scheduler`]: the scheduler plugin on its thread, with the built-in fallback.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::Child;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::control::Refusal;
use crate::gpu::{GpuBackend, GpuInfo, Health};
use crate::snapshot::NodeSnapshot;
use crate::telemetry::{Event, JobEvent};

pub mod launch;
mod ops;
pub mod place;
pub mod scheduler;
pub mod spec;
mod store;

use launch::Process;
pub use ops::JobOp;
pub use scheduler::Scheduler;
use spec::{Account, Owner, Spec, Submission};

/// What the queue is set up with (from `[jobs]`).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where the jobs (a directory each: its state and its logs) are kept.
    pub dir: PathBuf,
    pub max_queue: usize,
    pub keep_finished: usize,
    pub kill_grace: Duration,
    pub log_max_bytes: u64,
    pub cgroup_root: Option<PathBuf>,
    pub allow_root: bool,
    /// Who may submit (locally, root and the agent's user always may); `None`: anyone
    /// who can connect, and any user a fleet command names.
    pub submit_gid: Option<u32>,
    /// Users below this uid may not run jobs.
    pub min_uid: u32,
    /// Whether fleet commands may queue jobs.
    pub fleet_submit: bool,
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    Queued,
    Running,
    /// It ended by itself (`exit_code` or `signal` say how, when known).
    Finished,
    Cancelled,
    TimedOut,
    FailedToStart,
    /// Its process was gone when the agent came back, or its GPU fell off the bus.
    Lost,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Running => "running",
            State::Finished => "finished",
            State::Cancelled => "cancelled",
            State::TimedOut => "timed-out",
            State::FailedToStart => "failed-to-start",
            State::Lost => "lost",
        }
    }

    pub fn ended(self) -> bool {
        !matches!(self, State::Queued | State::Running)
    }
}

/// Why a running job is being stopped, and since when (SIGTERM sent; SIGKILL after the
/// grace period).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stopping {
    pub since_ms: u64,
    pub to: State,
    pub reason: String,
    pub killed: bool,
}

/// What a job used: energy from its GPUs' counters over its run (a shared GPU's split by
/// reserved memory, `docs/jobs.md`), GPU-seconds, and the most memory its GPUs held.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Usage {
    pub energy_j: f64,
    pub gpu_seconds: f64,
    pub peak_mem_mib: u64,
    /// Some of its GPUs were shared: its energy is a split, not a measurement.
    pub shared: bool,
}

/// A job, as kept on disk and shown by `gpulet jobs --json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Job {
    pub id: u64,
    pub owner: Owner,
    pub spec: Spec,
    pub state: State,
    /// Unix milliseconds.
    pub submitted_ms: u64,
    pub started_ms: Option<u64>,
    pub ended_ms: Option<u64>,
    /// The GPUs it holds (held, once it ended), by index, and their UUIDs.
    pub gpus: Vec<u32>,
    pub uuids: Vec<String>,
    pub process: Option<Process>,
    /// Why it waits (queued), or why it ended as it did.
    pub why: Option<String>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub stopping: Option<Stopping>,
    pub usage: Usage,
}

impl Job {
    /// Its run time so far, seconds.
    pub fn runtime_s(&self, now_ms: u64) -> Option<f64> {
        let start = self.started_ms?;
        Some(self.ended_ms.unwrap_or(now_ms).saturating_sub(start) as f64 / 1000.0)
    }

    fn event(&self, event: &'static str, reason: Option<String>) -> Event {
        let ended = self.state.ended();
        Event::Job(JobEvent {
            job: self.id,
            event,
            user: self.owner.user.clone(),
            name: self.spec.name.clone(),
            gpus: self.uuids.clone(),
            exit_code: self.exit_code,
            signal: self.signal,
            reason,
            energy_j: (ended && self.started_ms.is_some()).then_some(round(self.usage.energy_j)),
            gpu_seconds: (ended && self.started_ms.is_some())
                .then_some(round(self.usage.gpu_seconds)),
            runtime_s: if ended { self.runtime_s(self.ended_ms.unwrap_or(0)) } else { None },
        })
    }
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Who asks, for what they may see and cancel.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Who {
    /// A local user; `admin`: root, the agent's user or `socket.admin_group` (all jobs).
    Local { uid: u32, admin: bool },
    /// A fleet command (trusted as an operator: it may cancel any job).
    Fleet,
}

impl Who {
    fn sees(&self, job: &Job) -> bool {
        match self {
            Who::Local { uid, admin } => *admin || job.owner.uid == *uid,
            Who::Fleet => true,
        }
    }
}

/// Who a job runs as.
#[derive(Debug, Clone, PartialEq)]
pub enum Submitter {
    /// The peer of the control socket.
    Local { uid: u32 },
    /// A user named by a fleet command.
    Fleet { user: String },
}

/// The queue and the running jobs.
pub struct Jobs {
    settings: Settings,
    inventory: Arc<[GpuInfo]>,
    sim: bool,
    jobs: BTreeMap<u64, Job>,
    next_id: u64,
    /// The processes this agent started (re-adopted ones are not its children).
    children: HashMap<u64, Child>,
    scheduler: Scheduler,
    /// Each GPU's energy counter and the agent's clock at the last tick.
    last_energy: Option<(u64, Vec<Option<f64>>)>,
    /// GPUs whose job's power cap ended, for the loop to release (`take_released`).
    released: Vec<(u32, u64)>,
    /// Jobs started since the last tick: accounted from the next interval on (a job's
    /// energy covers the ticks it ran through, whole; the resolution is one tick).
    fresh: std::collections::HashSet<u64>,
    events: Vec<Event>,
    /// The jobs changed since they were last written.
    changed: std::collections::BTreeSet<u64>,
}

impl std::fmt::Debug for Jobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jobs").field("jobs", &self.jobs.len()).finish_non_exhaustive()
    }
}

/// Unix milliseconds now: processes live in real time, whatever the agent's clock.
pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Jobs {
    /// The queue kept in `settings.dir`, its running jobs re-adopted where their
    /// processes still live and reported lost where not. A job file that cannot be
    /// read is set aside and reported (`state-set-aside`); the others are kept.
    pub fn open(
        settings: Settings,
        inventory: Arc<[GpuInfo]>,
        sim: bool,
        scheduler: Scheduler,
    ) -> Result<Jobs, String> {
        crate::state::check_dir(&settings.dir)?;
        let mut jobs = Jobs {
            settings,
            inventory,
            sim,
            jobs: BTreeMap::new(),
            next_id: 1,
            children: HashMap::new(),
            scheduler,
            last_energy: None,
            fresh: Default::default(),
            released: Vec::new(),
            events: Vec::new(),
            changed: Default::default(),
        };
        let (saved, problems) = store::load(&jobs.settings.dir);
        jobs.events.extend(problems);
        jobs.next_id = saved.next_id;
        let now = unix_ms();
        for mut job in saved.jobs {
            if job.state == State::Running && job.process.is_none() {
                // Written as starting, then the agent stopped: it may have run.
                warn!(
                    job = job.id,
                    "a job was being started when the agent stopped; reported lost"
                );
                if let Some(root) = &jobs.settings.cgroup_root {
                    launch::remove_cgroup(&root.join(format!("job-{}", job.id)));
                }
                job.state = State::Lost;
                job.ended_ms = Some(now);
                job.why =
                    Some("the agent stopped while starting it (it may have run briefly)".into());
                jobs.events.push(job.event("lost", job.why.clone()));
                jobs.changed.insert(job.id);
            } else if job.state == State::Running {
                let alive = job.process.as_ref().is_some_and(Process::alive);
                if alive {
                    info!(
                        job = job.id,
                        pid = job.process.as_ref().map(|p| p.pid),
                        "running job re-adopted after a restart"
                    );
                } else {
                    warn!(job = job.id, "a job that ran before the restart is gone; reported lost");
                    if let Some(p) = &job.process {
                        p.clean_up();
                    }
                    job.state = State::Lost;
                    job.ended_ms = Some(now);
                    job.why = Some("its process was gone when the agent restarted".into());
                    jobs.events.push(job.event("lost", job.why.clone()));
                    jobs.changed.insert(job.id);
                }
            }
            jobs.jobs.insert(job.id, job);
        }
        Ok(jobs)
    }

    /// Events since the last call (reported with the next tick).
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// Queued and running jobs.
    pub fn counts(&self) -> (usize, usize) {
        let q = self.jobs.values().filter(|j| j.state == State::Queued).count();
        let r = self.jobs.values().filter(|j| j.state == State::Running).count();
        (q, r)
    }

    pub fn scheduler_name(&self) -> &str {
        self.scheduler.name()
    }

    /// Whether a scheduler plugin decides (configured, loaded, not quarantined).
    pub fn scheduler_running(&self) -> bool {
        self.scheduler.plugin_running()
    }

    /// Queue a job, on disk before the answer. The checks: the submission's own
    /// ([`Submission::check`]), who may submit, and the queue's bound.
    pub fn submit(&mut self, sub: Submission, by: Submitter) -> Result<u64, Refusal> {
        let reject = |why: String| Refusal::Rejected(why);
        let (account, via) = match &by {
            Submitter::Local { uid } => (Account::by_uid(*uid).map_err(reject)?, "socket"),
            Submitter::Fleet { user } => (Account::by_name(user).map_err(reject)?, "mqtt"),
        };
        self.may_submit(&account, &by).map_err(reject)?;
        let queued = self.counts().0;
        if queued >= self.settings.max_queue {
            return Err(reject(format!(
                "the queue is full ({queued} jobs queued; jobs.max_queue is {})",
                self.settings.max_queue
            )));
        }
        let spec = sub.check(&self.inventory, &account, self.sim).map_err(reject)?;
        let id = self.next_id;
        let job = Job {
            id,
            owner: Owner {
                user: account.name,
                uid: account.uid,
                gid: account.gid,
                via: via.into(),
            },
            spec,
            state: State::Queued,
            submitted_ms: unix_ms(),
            started_ms: None,
            ended_ms: None,
            gpus: Vec::new(),
            uuids: Vec::new(),
            process: None,
            why: Some("not yet scheduled".into()),
            exit_code: None,
            signal: None,
            stopping: None,
            usage: Usage::default(),
        };
        let kept = store::save_job(&self.settings.dir, &job)
            .and_then(|()| store::save_next_id(&self.settings.dir, id + 1));
        if let Err(e) = kept {
            // Not kept: not queued. The answer says so, and nothing runs.
            let _ = std::fs::remove_dir_all(self.settings.dir.join(id.to_string()));
            return Err(Refusal::Failed(format!("the queue cannot be written: {e}")));
        }
        self.next_id += 1;
        self.jobs.insert(id, job);
        let job = &self.jobs[&id];
        info!(job = id, user = %job.owner.user, via, command = ?job.spec.command, "job submitted");
        self.events.push(job.event("submitted", None));
        Ok(id)
    }

    fn may_submit(&self, account: &Account, by: &Submitter) -> Result<(), String> {
        let me = crate::state::euid();
        if matches!(by, Submitter::Fleet { .. }) && !self.settings.fleet_submit {
            return Err(
                "this node takes no jobs from fleet commands (jobs.fleet_submit = \"off\")".into(),
            );
        }
        if account.uid != 0 && account.uid < self.settings.min_uid && account.uid != me {
            return Err(format!(
                "user {} (uid {}) is a system account; jobs run as users from uid {} (jobs.min_uid)",
                account.name, account.uid, self.settings.min_uid
            ));
        }
        if account.uid == 0 && !self.settings.allow_root {
            return Err("jobs do not run as root on this node (jobs.allow_root = false); submit as another user".into());
        }
        if me != 0 && account.uid != me {
            return Err(format!(
                "this agent does not run as root, so it runs jobs only as its own user (uid {me}); user {} may not submit",
                account.name
            ));
        }
        let local_admin = matches!(by, Submitter::Local { uid } if *uid == 0 || *uid == me);
        if let Some(g) = self.settings.submit_gid
            && !local_admin
            && !account.groups.contains(&g)
        {
            return Err(format!(
                "user {} may not submit jobs here: not in jobs.submit_group (gid {g})",
                account.name
            ));
        }
        Ok(())
    }

    /// Cancel a job: a queued one leaves the queue; a running one gets SIGTERM now and
    /// SIGKILL after the grace period.
    pub fn cancel(&mut self, id: u64, who: Who) -> Result<String, Refusal> {
        let grace = self.settings.kill_grace;
        let child = self.children.contains_key(&id);
        let job = self.visible_mut(id, who)?;
        let by = match who {
            Who::Local { uid, .. } => format!("cancelled by uid {uid}"),
            Who::Fleet => "cancelled by a fleet command".to_owned(),
        };
        match job.state {
            State::Queued => {
                job.state = State::Cancelled;
                job.ended_ms = Some(unix_ms());
                job.why = Some(by.clone());
                let e = job.event("cancelled", Some(by));
                self.events.push(e);
                self.changed.insert(id);
                self.save_logged();
                Ok(format!("job {id} cancelled (it had not started)"))
            }
            State::Running if job.stopping.is_some() => {
                Ok(format!("job {id} is already being stopped"))
            }
            State::Running => {
                stop(job, State::Cancelled, by, child);
                self.changed.insert(id);
                self.save_logged();
                Ok(format!(
                    "job {id} is being stopped (SIGTERM; SIGKILL after {} s)",
                    grace.as_secs()
                ))
            }
            s => Err(Refusal::Rejected(format!("job {id} has already ended ({})", s.name()))),
        }
    }

    fn visible_mut(&mut self, id: u64, who: Who) -> Result<&mut Job, Refusal> {
        match self.jobs.get_mut(&id) {
            Some(j) if who.sees(j) => Ok(j),
            // Another user's job is "no such job" too: ids are not for probing.
            _ => Err(Refusal::Rejected(format!("there is no job {id} of yours"))),
        }
    }

    /// One job, if `who` may see it.
    pub fn get(&self, id: u64, who: Who) -> Result<&Job, Refusal> {
        match self.jobs.get(&id) {
            Some(j) if who.sees(j) => Ok(j),
            _ => Err(Refusal::Rejected(format!("there is no job {id} of yours"))),
        }
    }

    /// The jobs `who` may see: queued and running, and with `all` the ended ones kept.
    pub fn list(&self, who: Who, all: bool) -> Vec<&Job> {
        self.jobs.values().filter(|j| who.sees(j) && (all || !j.state.ended())).collect()
    }

    /// Where a job's output is.
    pub fn log_path(&self, id: u64, stream: &str) -> PathBuf {
        self.settings.dir.join(id.to_string()).join(stream)
    }

    /// The power caps of the running jobs: (GPU, cap, job).
    pub fn caps(&self) -> Vec<(u32, f64, u64)> {
        self.jobs
            .values()
            .filter(|j| j.state == State::Running)
            .filter_map(|j| j.spec.power_cap_w.map(|w| (j, w)))
            .flat_map(|(j, w)| j.gpus.iter().map(move |&g| (g, w, j.id)))
            .collect()
    }

    /// The GPUs whose job's power cap ended since the last call, with the job.
    pub fn take_released(&mut self) -> Vec<(u32, u64)> {
        std::mem::take(&mut self.released)
    }

    /// The work of one tick, after the snapshot: account the running jobs' energy,
    /// reap those that ended, stop those past their time limit or grace period, rotate
    /// logs, then schedule and start. The queue is written if anything changed.
    pub fn tick(&mut self, snap: &NodeSnapshot, backend: &mut dyn GpuBackend) {
        self.account(snap);
        self.reap(backend);
        self.enforce_limits();
        self.rotate_logs();
        self.schedule(snap, backend, false);
        self.save_logged();
    }

    /// Each running job's share of its GPUs' energy since the last tick: a GPU's energy
    /// (its counter's rise) goes to the jobs on it in proportion to their reserved
    /// memory (equally when none reserved any).
    fn account(&mut self, snap: &NodeSnapshot) {
        let energy: Vec<Option<f64>> = snap.samples.iter().map(|s| s.energy_j.value()).collect();
        let mem: Vec<Option<u64>> = snap.samples.iter().map(|s| s.mem_used_mib.value()).collect();
        let last = self.last_energy.replace((snap.now_ms, energy.clone()));
        let Some((then_ms, before)) = last else { return };
        let dt = snap.now_ms.saturating_sub(then_ms) as f64 / 1000.0;
        // Per GPU: the running jobs on it and their weights.
        let mut on: Vec<Vec<(u64, f64)>> = vec![Vec::new(); energy.len()];
        let fresh = std::mem::take(&mut self.fresh);
        for j in self.jobs.values().filter(|j| j.state == State::Running) {
            if fresh.contains(&j.id) {
                continue;
            }
            for &g in &j.gpus {
                if let Some(v) = on.get_mut(g as usize) {
                    // A job that reserved nothing counts as 1 MiB: it still gets a share.
                    v.push((j.id, j.spec.mem_mib.max(1) as f64));
                }
            }
        }
        for (g, jobs) in on.iter().enumerate() {
            let total: f64 = jobs.iter().map(|(_, w)| w).sum();
            let delta = match (before.get(g).copied().flatten(), energy[g]) {
                (Some(a), Some(b)) if b >= a => b - a,
                _ => 0.0,
            };
            for &(id, w) in jobs {
                let share = if total > 0.0 { w / total } else { 1.0 / jobs.len() as f64 };
                let job = self.jobs.get_mut(&id).expect("listed above");
                job.usage.energy_j += delta * share;
                job.usage.gpu_seconds += dt;
                job.usage.shared |= jobs.len() > 1;
            }
        }
        for j in self.jobs.values_mut().filter(|j| j.state == State::Running) {
            let held: f64 = j
                .gpus
                .iter()
                .filter_map(|&g| {
                    let n = on.get(g as usize).map_or(1, Vec::len).max(1);
                    mem.get(g as usize).copied().flatten().map(|m| m as f64 / n as f64)
                })
                .sum();
            j.usage.peak_mem_mib = j.usage.peak_mem_mib.max(held as u64);
        }
    }

    /// Jobs whose process ended: their outcome, their cgroup emptied, their GPUs freed.
    fn reap(&mut self, backend: &mut dyn GpuBackend) {
        let now = unix_ms();
        let running: Vec<u64> =
            self.jobs.values().filter(|j| j.state == State::Running).map(|j| j.id).collect();
        for id in running {
            let status = match self.children.get_mut(&id) {
                Some(child) => match child.try_wait() {
                    Ok(Some(status)) => Some(Some(status)),
                    Ok(None) => None,
                    Err(e) => {
                        warn!(job = id, error = %e, "cannot wait for a job's process");
                        None
                    }
                },
                // Re-adopted: not this agent's child; gone is all it can see.
                None => {
                    let alive = self.jobs[&id].process.as_ref().is_some_and(Process::alive);
                    (!alive).then_some(None)
                }
            };
            let Some(status) = status else { continue };
            self.children.remove(&id);
            let job = self.jobs.get_mut(&id).expect("listed above");
            let left = job.process.as_ref().is_some_and(Process::clean_up);
            use std::os::unix::process::ExitStatusExt;
            job.exit_code = status.and_then(|s| s.code());
            job.signal = status.and_then(|s| s.signal());
            job.ended_ms = Some(now);
            let (state, event, mut why) = match job.stopping.take() {
                Some(s) => (s.to, if s.to == State::TimedOut { "timed-out" } else { "cancelled" }, s.reason),
                None => (State::Finished, "finished", match status {
                    Some(s) => format!("exited: {s}"),
                    None => "ended while the agent was not its parent (after a restart): its exit status is not known".into(),
                }),
            };
            if left {
                why.push_str("; processes it left behind were killed with its cgroup");
            }
            job.state = state;
            job.why = Some(why.clone());
            info!(job = id, state = state.name(), %why, energy_j = round(job.usage.energy_j), "job ended");
            if job.spec.workload.is_some() {
                for &g in &job.gpus {
                    let _ = backend.run_workload(g, None);
                }
            }
            if job.spec.power_cap_w.is_some() {
                self.released.extend(job.gpus.iter().map(|&g| (g, id)));
            }
            let e = job.event(event, Some(why));
            self.events.push(e);
            self.changed.insert(id);
        }
        self.prune();
    }

    /// Stop what ran past its time limit; SIGKILL what outlived its grace period.
    fn enforce_limits(&mut self) {
        let now = unix_ms();
        let grace = self.settings.kill_grace.as_millis() as u64;
        for job in self.jobs.values_mut().filter(|j| j.state == State::Running) {
            if let Some(s) = &mut job.stopping {
                if !s.killed && now.saturating_sub(s.since_ms) >= grace {
                    warn!(job = job.id, "job still running after its grace period; SIGKILL");
                    if let Some(p) = &job.process {
                        p.signal(Signal::SIGKILL, self.children.contains_key(&job.id));
                    }
                    s.killed = true;
                    s.reason.push_str("; killed (SIGKILL) after the grace period");
                    self.changed.insert(job.id);
                }
                continue;
            }
            let (Some(limit), Some(start)) = (job.spec.time_limit_ms, job.started_ms) else {
                continue;
            };
            if now.saturating_sub(start) >= limit {
                let why = format!("ran past its time limit of {} s", limit as f64 / 1000.0);
                stop(job, State::TimedOut, why, self.children.contains_key(&job.id));
                self.changed.insert(job.id);
            }
        }
    }

    /// Keep each running job's logs under the cap: a log past it is copied to `<name>.1`
    /// (the one before is dropped) and emptied; the job, which appends, goes on writing
    /// at the new end. (What it writes between the copy and the truncation is lost.)
    fn rotate_logs(&mut self) {
        let cap = self.settings.log_max_bytes;
        for job in self.jobs.values().filter(|j| j.state == State::Running) {
            for stream in ["stdout", "stderr"] {
                let path = self.log_path(job.id, stream);
                if std::fs::metadata(&path).is_ok_and(|m| m.len() > cap) {
                    let old = path.with_file_name(format!("{stream}.1"));
                    let rotated = std::fs::copy(&path, &old).and_then(|_| {
                        std::fs::OpenOptions::new().write(true).open(&path)?.set_len(0)
                    });
                    if let Err(e) = rotated {
                        warn!(job = job.id, stream, error = %e, "cannot rotate a job's log");
                    }
                }
            }
        }
    }

    /// Ask the scheduler what starts now, check it, start it. With nothing queued, the
    /// scheduler is not called.
    /// `between_ticks`: called between two ticks (a submission), not by the tick.
    pub fn schedule(
        &mut self,
        snap: &NodeSnapshot,
        backend: &mut dyn GpuBackend,
        between_ticks: bool,
    ) {
        if !self.jobs.values().any(|j| j.state == State::Queued) {
            return;
        }
        let view = place::View::new(snap, self.jobs.values());
        let input = view.input(snap, self.jobs.values(), unix_ms());
        let labels = self
            .jobs
            .values()
            .filter(|j| j.state == State::Queued)
            .flat_map(|j| j.spec.labels.iter().map(|(k, v)| (j.id, k.clone(), v.clone())))
            .collect();
        let (decisions, mut events) = self.scheduler.decide(snap, &input, &labels);
        self.events.append(&mut events);
        let checked = place::check(&view, &self.jobs, decisions);
        for (id, why) in checked.waits {
            if let Some(j) = self.jobs.get_mut(&id)
                && j.state == State::Queued
                && j.why.as_deref() != Some(why.as_str())
            {
                j.why = Some(why);
            }
        }
        if !checked.rejected.is_empty() {
            let mut e = self.scheduler.refused(snap.now_ms, checked.rejected.len());
            self.events.append(&mut e);
        }
        for (id, gpus, why) in checked.rejected {
            let job = &self.jobs[&id];
            warn!(job = id, scheduler = self.scheduler.name(), ?gpus, %why, "placement refused; the job stays queued");
            let reason = format!("{} placed it on GPUs {gpus:?}: {why}", self.scheduler.name());
            self.events.push(job.event("placement-rejected", Some(reason)));
        }
        let started = !checked.starts.is_empty();
        for (id, gpus, why) in checked.starts {
            self.start(id, gpus, why, backend, between_ticks);
        }
        // On disk at once: a restart must find a started job running (to re-adopt it),
        // never queued (to start it twice).
        if started {
            self.save_logged();
        }
    }

    /// Start job `id` on `gpus`. It is written as running (without a process yet)
    /// before anything is spawned: after a crash in between, the next start finds it
    /// running without a process and reports it lost, and never starts it twice.
    fn start(
        &mut self,
        id: u64,
        gpus: Vec<u32>,
        why: String,
        backend: &mut dyn GpuBackend,
        between_ticks: bool,
    ) {
        let uuids: Vec<String> =
            gpus.iter().map(|&g| self.inventory[g as usize].uuid.clone()).collect();
        let log_dir = self.settings.dir.join(id.to_string());
        let job = self.jobs.get_mut(&id).expect("checked");
        let now = unix_ms();
        job.state = State::Running;
        job.started_ms = Some(now);
        job.gpus = gpus;
        job.uuids = uuids.clone();
        job.why = Some("starting".into());
        if let Err(e) = store::save_job(&self.settings.dir, job) {
            warn!(job = id, error = %e, "cannot write a job's state; it is not started (tried again at the next decision)");
            job.state = State::Queued;
            job.started_ms = None;
            job.gpus.clear();
            job.uuids.clear();
            job.why = Some(format!("its state cannot be written: {e}"));
            return;
        }
        let account = Account::by_uid(job.owner.uid);
        let started = account.and_then(|account| {
            launch::start(&launch::Launch {
                id,
                spec: &job.spec,
                account: &account,
                uuids: uuids.clone(),
                log_dir: &log_dir,
                cgroup_root: self.settings.cgroup_root.as_deref(),
                as_user: crate::state::euid() == 0,
            })
        });
        self.changed.insert(id);
        match started {
            Ok(s) => {
                info!(job = id, pid = s.process.pid, gpus = ?job.gpus, user = %job.owner.user, %why, "job started");
                job.process = Some(s.process);
                job.why = Some(why.clone());
                self.children.insert(id, s.child);
                // Started within a tick (after its accounting), a job runs through the
                // whole next interval; started between ticks, only part of it.
                if between_ticks {
                    self.fresh.insert(id);
                }
                if let Some(w) = job.spec.workload {
                    for &g in &job.gpus {
                        if let Err(e) = backend.run_workload(g, Some(w)) {
                            warn!(job = id, gpu = g, error = %e, "cannot run the job's simulated workload");
                        }
                    }
                }
                let e = job.event("started", Some(why));
                self.events.push(e);
            }
            Err(error) => {
                warn!(job = id, %error, "job failed to start");
                job.state = State::FailedToStart;
                job.ended_ms = Some(now);
                job.why = Some(error.clone());
                let e = job.event("failed-to-start", Some(error));
                self.events.push(e);
            }
        }
    }

    /// Drop the oldest ended jobs past `keep_finished`, with their logs.
    fn prune(&mut self) {
        // The longest ended first (not the lowest id: a long job that just ended stays).
        let mut ended: Vec<(u64, u64)> = self
            .jobs
            .values()
            .filter(|j| j.state.ended())
            .map(|j| (j.ended_ms.unwrap_or(0), j.id))
            .collect();
        ended.sort_unstable();
        let ended: Vec<u64> = ended.into_iter().map(|(_, id)| id).collect();
        let excess = ended.len().saturating_sub(self.settings.keep_finished);
        for id in &ended[..excess] {
            self.jobs.remove(id);
            let _ = std::fs::remove_dir_all(self.settings.dir.join(id.to_string()));
        }
    }

    /// Write the jobs that changed; one that cannot be written is tried again at the
    /// next tick.
    fn save_logged(&mut self) {
        let changed = std::mem::take(&mut self.changed);
        for id in changed {
            let Some(job) = self.jobs.get(&id) else { continue };
            if let Err(e) = store::save_job(&self.settings.dir, job) {
                warn!(job = id, dir = %self.settings.dir.display(), error = %e, "cannot write a job's state; tried again next tick");
                self.changed.insert(id);
            }
        }
    }

    /// At the agent's stop: running jobs go on (a restart re-adopts them); the queue
    /// is written.
    pub fn stop(&mut self) {
        self.save_logged();
    }
}

/// Begin stopping a running job: SIGTERM to it now. `child`: its process is this
/// agent's child (see `Process::signal`).
fn stop(job: &mut Job, to: State, reason: String, child: bool) {
    info!(job = job.id, state = to.name(), %reason, "stopping a job (SIGTERM)");
    if let Some(p) = &job.process {
        p.signal(Signal::SIGTERM, child);
    }
    job.stopping = Some(Stopping { since_ms: unix_ms(), to, reason, killed: false });
}

/// Whether a GPU may take jobs.
pub fn usable(h: Health) -> bool {
    h == Health::Ok
}
