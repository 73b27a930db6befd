//! The agent's loop. Everything the agent does happens here, in this order, once per
//! tick:
//!
//! 1. **sample** every GPU and drain the backend's events ([`GpuBackend`]);
//! 2. build one immutable [`NodeSnapshot`];
//! 3. **decide**: the static caps and the Wasm plugins propose power limits
//!    ([`PolicyChain`]);
//! 4. **check**: the guard clamps, fits the budget, rate-limits ([`PowerGuard`]);
//! 5. **apply** what changed, reading back the enforced limit, and audit it;
//! 6. **emit** one telemetry record to every sink ([`Sink`]).
//!
//! [`Agent::run`] drives ticks from a timer until the tick count is reached or a
//! shutdown signal arrives; the reasons the loop wakes are the arms of its one `select!`:
//! shutdown (SIGINT, SIGTERM), reload (SIGHUP: the plugins are reloaded from the config
//! file), clear health (SIGUSR1: the local way to clear every GPU's sticky `degraded`
//! state, as the `clear-health` command does over MQTT), a control request (a fleet command, or the MQTT link asking for the birth
//! message), and the tick timer. Commands run between ticks, never inside one.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio::time::MissedTickBehavior;
use tracing::{debug, error, info, warn};

use crate::calibration::{Calibration, Curve};
use crate::clock::{Clock, VirtualClock};
use crate::gpu::{GpuBackend, GpuInfo, Health};
use crate::guard::{Bounds, PowerGuard};
use crate::jobs::{JobOp, Jobs, Submitter, Who};
use crate::notify::Notifier;
use crate::plugin::chain::{PluginSpec, PolicyChain};
use crate::plugin::reporters::Reporters;
use crate::policy::PowerDecision;
use crate::snapshot::NodeSnapshot;
use crate::telemetry::{AgentStats, Event, Record, Sink};

pub use crate::control::{Desired, Refusal, Request};
pub use status::Status;

mod status;
pub use crate::gpu::restore::{StartLimits, current_limits, read_start_limits, write_start_limits};

/// What an agent is made of; see `setup` for building it from a config.
pub struct Parts {
    pub node: String,
    pub tick: Duration,
    pub backend: Box<dyn GpuBackend>,
    pub policy: PolicyChain,
    /// The reporting stage (`[[reporter]]`), loaded.
    pub reporters: Reporters,
    pub guard: PowerGuard,
    pub sinks: Vec<Box<dyn Sink>>,
    pub clock: Arc<dyn Clock>,
    /// Re-reads the plugin list (from the config file) on SIGHUP; `None`: nothing to
    /// reload from.
    pub reload: Option<Reload>,
    /// Repeats of an XID (same GPU and code) within this are counted, not reported.
    pub xid_debounce: Duration,
    /// The GPUs' work-per-watt curves, from `gpulet calibrate`.
    pub calibration: Option<Calibration>,
}

/// Produces the current plugin lists, or says why it cannot.
pub type Reload = Box<dyn FnMut() -> Result<PluginSpecs, String> + Send>;

/// The plugins a config names: the power plugins in order, and the reporters.
#[derive(Debug, Clone, Default)]
pub struct PluginSpecs {
    pub power: Vec<PluginSpec>,
    pub reporters: Vec<PluginSpec>,
}

/// A limit further than this from the one the agent set is a drift (NVML reports whole
/// milliwatts; firmware may round to a few watts).
const DRIFT_W: f64 = 2.0;

/// What reaches the loop from outside (the MQTT link), handled between ticks.
#[derive(Debug)]
pub enum Control {
    /// Change the desired state; the answer is a detail for the result, or why not.
    Execute { request: Request, done: oneshot::Sender<Result<String, Refusal>> },
    /// The birth message and the state topics.
    Describe { done: oneshot::Sender<Description> },
    /// What the agent is doing now (`gpulet status`, `/metrics`).
    Status { done: oneshot::Sender<Status> },
    /// A local user's request about jobs (`docs/jobs.md`).
    Jobs { op: JobOp, who: Who, done: oneshot::Sender<Result<Value, Refusal>> },
}

#[derive(Debug, Clone)]
pub struct Description {
    pub birth: Value,
    /// Retained `state/<key>` messages.
    pub state: Vec<(String, Value)>,
    pub desired: Desired,
}

pub struct Agent {
    node: String,
    tick: Duration,
    backend: Box<dyn GpuBackend>,
    inventory: Arc<[GpuInfo]>,
    bounds: Arc<[Bounds]>,
    policy: PolicyChain,
    reporters: Reporters,
    guard: PowerGuard,
    reload: Option<Reload>,
    /// Events that happened between ticks (a reload), reported with the next tick.
    pending: Vec<Event>,
    sinks: Vec<Box<dyn Sink>>,
    clock: Arc<dyn Clock>,
    seq: u64,
    /// Health at the previous tick, to report transitions.
    health: Vec<Health>,
    /// The last failure setting each GPU's limit, to audit a repeated failure once.
    last_failure: Vec<Option<String>>,
    /// The limit the agent last set on each GPU (read back), and whether a drift from
    /// it has been reported.
    applied: Vec<Option<f64>>,
    drifted: Vec<bool>,
    /// Whether each sink failed last time, to log a failing sink once.
    sink_failing: Vec<bool>,
    stats: AgentStats,
    control: Option<mpsc::Receiver<Control>>,
    /// Told when what `describe` returns changed outside a control request (a SIGHUP
    /// reload), so that the birth is published again.
    changed: Option<Arc<tokio::sync::Notify>>,
    desired: Desired,
    /// The budget in the config, to return to.
    configured_budget_w: Option<f64>,
    /// Where the limits found at start are kept, to put back at stop.
    start_limits: Option<std::path::PathBuf>,
    /// Limits left by a run that did not stop cleanly, decided at the first tick.
    restore_limits: Option<StartLimits>,
    /// XIDs per (GPU, code) since start, and when each was last seen (backend ms).
    xid_counts: BTreeMap<(u32, u32), u64>,
    xid_last: std::collections::HashMap<(u32, u32), u64>,
    xid_debounce_ms: u64,
    calibration: Option<Calibration>,
    /// Each GPU's curve from `calibration`, matched by UUID.
    curves: Arc<[Option<Arc<Curve>>]>,
    /// systemd's notify protocol (a no-op when not run by a `Type=notify` unit).
    notify: Notifier,
    /// Why the last reload did not fully work, for the status line.
    reload_problem: Option<String>,
    /// Limit changes since the last summary line in the log.
    log_summary: LogSummary,
    /// The last tick's snapshot and events, for `status`.
    last: Option<NodeSnapshot>,
    recent: std::collections::VecDeque<Value>,
    /// The job queue, when `[jobs]` is enabled.
    jobs: Option<Jobs>,
    /// The plugins' metrics of the last tick (`/metrics` shows them).
    plugin_metrics: Vec<crate::plugin::host::PluginMetric>,
}

/// A node under a budget changes limits every few seconds: each change is a
/// `limit-changed` event (the audit trail, in telemetry and over MQTT), and the log gets
/// one line for the first changes and then at most one per [`LOG_SUMMARY_EVERY_MS`], so
/// that a steady node logs a few lines an hour, not one per change.
#[derive(Debug, Default)]
struct LogSummary {
    changes: u64,
    /// When the last summary was logged (agent clock, ms).
    at_ms: Option<u64>,
}

/// How often changes are summed up in the log: 10 minutes.
pub const LOG_SUMMARY_EVERY_MS: u64 = 600_000;

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("node", &self.node)
            .field("backend", &self.backend.kind())
            .field("policy", &self.policy)
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

/// The outcome of one tick, for callers that look (tests, the demo).
#[derive(Debug, Clone)]
pub struct Tick {
    pub snapshot: NodeSnapshot,
    pub events: Vec<Event>,
    pub metrics: Vec<crate::plugin::host::PluginMetric>,
}

/// How the loop is paced.
#[derive(Debug, Clone)]
pub enum Pacing {
    /// One tick per tick period of wall time, on whatever clock the agent has.
    RealTime,
    /// The agent runs on `clock`, which the loop advances by one tick period before each
    /// tick after the first; `speed` is simulated seconds per wall second (`None`: as
    /// fast as possible).
    Virtual { clock: VirtualClock, speed: Option<f64> },
}

impl Agent {
    pub fn new(parts: Parts) -> Agent {
        let inventory: Arc<[GpuInfo]> = parts.backend.inventory().into();
        let n = inventory.len();
        let configured_budget_w = parts.guard.budget_w();
        let curves = match &parts.calibration {
            Some(c) => c.for_inventory(&inventory).into(),
            None => vec![None; n].into(),
        };
        Agent {
            node: parts.node,
            tick: parts.tick,
            backend: parts.backend,
            inventory,
            bounds: parts.guard.bounds().into(),
            policy: parts.policy,
            reporters: parts.reporters,
            guard: parts.guard,
            reload: parts.reload,
            pending: Vec::new(),
            clock: parts.clock,
            seq: 0,
            health: vec![Health::Ok; n],
            last_failure: vec![None; n],
            applied: vec![None; n],
            drifted: vec![false; n],
            sink_failing: vec![false; parts.sinks.len()],
            configured_budget_w,
            sinks: parts.sinks,
            stats: AgentStats::default(),
            control: None,
            changed: None,
            start_limits: None,
            restore_limits: None,
            xid_counts: BTreeMap::new(),
            xid_last: Default::default(),
            xid_debounce_ms: parts.xid_debounce.as_millis() as u64,
            desired: Desired::default(),
            calibration: parts.calibration,
            curves,
            notify: Notifier::from_env(),
            reload_problem: None,
            log_summary: LogSummary::default(),
            last: None,
            recent: Default::default(),
            jobs: None,
            plugin_metrics: Vec::new(),
        }
    }

    /// Run a job queue on this node.
    pub fn set_jobs(&mut self, jobs: Jobs) {
        self.jobs = Some(jobs);
    }

    /// The job queue, if this node has one.
    pub fn jobs(&self) -> Option<&Jobs> {
        self.jobs.as_ref()
    }

    fn queue(&mut self) -> Result<&mut Jobs, Refusal> {
        self.jobs.as_mut().ok_or_else(|| {
            Refusal::Rejected("this node runs no job queue ([jobs] enabled = false)".into())
        })
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn inventory(&self) -> &[GpuInfo] {
        &self.inventory
    }

    /// One pass of sample → snapshot → decide → check → apply → emit.
    pub fn tick(&mut self) -> Tick {
        let started = Instant::now();
        let mut events = std::mem::take(&mut self.pending);
        let mut metrics = Vec::new();

        // 1. Sample.
        let samples = self.backend.sample_all();
        for x in self.backend.drain_events() {
            let count = self.xid_counts.entry((x.gpu, x.code)).or_default();
            *count += 1;
            let last = self.xid_last.insert((x.gpu, x.code), x.at_ms);
            if last.is_some_and(|t| x.at_ms.saturating_sub(t) < self.xid_debounce_ms) {
                continue;
            }
            let uuid = self.inventory.get(x.gpu as usize).map_or("", |g| g.uuid.as_str());
            warn!(gpu = x.gpu, uuid, code = x.code, count = *count, "XID event");
            events.push(Event::xid(x.gpu, uuid, x.code, *count));
        }
        // Limits are desired state: one that moved without the agent is reported.
        for s in &samples {
            let i = s.index as usize;
            let (Some(found), Some(expected)) = (s.power_limit_w.value(), self.applied[i]) else {
                continue;
            };
            let drift = (found - expected).abs() > DRIFT_W;
            if drift && !self.drifted[i] {
                let uuid = self.inventory[i].uuid.clone();
                warn!(gpu = s.index, %uuid, expected_w = expected, found_w = found, "power limit changed behind the agent's back");
                events.push(Event::LimitDrift {
                    gpu: s.index,
                    uuid,
                    expected_w: expected,
                    found_w: found,
                });
            }
            self.drifted[i] = drift;
        }
        for (s, prev) in samples.iter().zip(&mut self.health) {
            if s.health != *prev {
                let uuid = self.inventory[s.index as usize].uuid.clone();
                warn!(gpu = s.index, %uuid, from = prev.name(), to = s.health.name(), "GPU health changed");
                events.push(Event::Health { gpu: s.index, uuid, from: *prev, to: s.health });
                *prev = s.health;
            }
        }

        // 2. Snapshot.
        let ts_ms = self.clock.wall_ms();
        let snapshot = NodeSnapshot {
            seq: self.seq,
            ts_ms,
            utc_offset_s: crate::clock::utc_offset_s(ts_ms),
            now_ms: self.clock.elapsed().as_millis() as u64,
            inventory: self.inventory.clone(),
            samples,
            bounds: self.bounds.clone(),
            budget_w: self.guard.budget_w(),
            curves: self.curves.clone(),
        };

        // The jobs: accounted, reaped, stopped, started (their GPUs then run them).
        if let Some(jobs) = &mut self.jobs {
            jobs.tick(&snapshot, &mut *self.backend);
            events.extend(jobs.take_events());
        }

        // 3. Decide, 4. check.
        let mut decisions = self.policy.decide(&snapshot, &mut events, &mut metrics);
        if !self.desired.limits_w.is_empty() {
            // An operator's limit has the last word (the guard still checks it).
            decisions.retain(|d| !self.desired.limits_w.contains_key(&d.gpu));
            decisions.extend(self.desired.limits_w.iter().map(|(&gpu, &w)| PowerDecision {
                gpu,
                limit_w: w,
                reason: "operator limit (set-power-limit command)".into(),
                source: "operator".into(),
            }));
        }
        // A job's power cap bounds its GPUs from above, whatever decided them (the
        // guard still checks it, and the budget still holds).
        // A cap that ended gives its GPUs back to their policy; where none decides, to
        // their upper bound (the guard still fits the budget).
        if let Some(jobs) = &mut self.jobs {
            for (gpu, job) in jobs.take_released() {
                if !decisions.iter().any(|d| d.gpu == gpu)
                    && let Some(b) = self.bounds.get(gpu as usize)
                {
                    decisions.push(PowerDecision {
                        gpu,
                        limit_w: b.hi,
                        reason: format!("job {job}'s power cap ended"),
                        source: "job".into(),
                    });
                }
            }
        }
        for (gpu, cap, job) in self.jobs.as_ref().map(Jobs::caps).unwrap_or_default() {
            let current = snapshot.samples.get(gpu as usize).and_then(|s| s.power_limit_w.value());
            match decisions.iter_mut().find(|d| d.gpu == gpu) {
                Some(d) if d.limit_w <= cap => {}
                Some(d) => {
                    d.limit_w = cap;
                    d.reason =
                        format!("job {job}'s power cap ({cap} W) over {}: {}", d.source, d.reason);
                    d.source = "job".into();
                }
                // Only ever lower: a limit at or below the cap already is held where it
                // is (proposed, so that the guard does not release it to its upper
                // bound: rule 3), and one that cannot be read is set to the cap.
                None => decisions.push(PowerDecision {
                    gpu,
                    limit_w: current.map_or(cap, |c| c.min(cap)),
                    reason: format!("job {job}'s power cap ({cap} W)"),
                    source: "job".into(),
                }),
            }
        }
        if let Some(saved) = self.restore_limits.take() {
            // The limits from before an unclean stop, for the GPUs no one decides.
            for info in self.inventory.iter() {
                if let Some(&w) = saved.get(&info.uuid)
                    && !decisions.iter().any(|d| d.gpu == info.index)
                {
                    decisions.push(PowerDecision {
                        gpu: info.index,
                        limit_w: w,
                        reason: "the limit from before the last run, which did not stop cleanly"
                            .into(),
                        source: "restore".into(),
                    });
                }
            }
        }
        // The reporters: metrics and events from the same snapshot; they decide nothing.
        self.reporters.report(&snapshot, &mut events, &mut metrics);
        self.stats.plugin_faults +=
            events.iter().filter(|e| matches!(e, Event::PluginFault { .. })).count() as u64;
        let changes = self.guard.check(&snapshot, decisions, &mut events);

        // 5. Apply and audit. Decreases come first; if one fails, the raises wait for the
        // next tick, which plans around the GPU that refused (the guard).
        let mut decrease_failed = false;
        for change in changes {
            let gpu = change.gpu;
            let uuid = &self.inventory[gpu as usize].uuid;
            let raise = change.from_w.is_none_or(|f| change.to_w > f);
            if raise && decrease_failed {
                debug!(gpu, to_w = change.to_w, "raise held back: a decrease failed this tick");
                continue;
            }
            match self.backend.set_power_limit(gpu, change.to_w) {
                Ok(enforced) => {
                    // The audit trail is the `limit-changed` event; the log gets a summary.
                    debug!(gpu, %uuid, from_w = ?change.from_w, to_w = enforced, source = %change.source, reason = %change.reason, "power limit changed");
                    self.log_summary.changes += 1;
                    self.guard.applied(&change, enforced, snapshot.now_ms);
                    // A decrease the GPU took but did not enforce holds the raises too
                    // (unless the node was planned without counting on it: a probe).
                    decrease_failed |= !raise
                        && !change.probe
                        && enforced > change.to_w + crate::guard::OBEY_TOLERANCE_W;
                    self.last_failure[gpu as usize] = None;
                    self.applied[gpu as usize] = Some(enforced);
                    self.drifted[gpu as usize] = false;
                    events.push(Event::LimitChanged {
                        gpu,
                        uuid: uuid.clone(),
                        from_w: change.from_w,
                        to_w: enforced,
                        source: change.source,
                        reason: change.reason,
                    });
                }
                Err(e) => {
                    self.guard.failed(&change, snapshot.now_ms);
                    // A GPU whose limit is unknown (`from_w` None) may have been lowered by
                    // the plan too: its failure holds the raises like a decrease's.
                    decrease_failed |= !change.probe && (!raise || change.from_w.is_none());
                    let error = e.to_string();
                    if self.last_failure[gpu as usize].as_ref() != Some(&error) {
                        warn!(gpu, %uuid, to_w = change.to_w, %error, "power limit change failed");
                        events.push(Event::LimitFailed {
                            gpu,
                            uuid: uuid.clone(),
                            to_w: change.to_w,
                            error: error.clone(),
                        });
                        self.last_failure[gpu as usize] = Some(error);
                    }
                }
            }
        }

        self.log_summary(snapshot.now_ms);

        // 6. Emit.
        let record =
            Record::new(&self.node, self.backend.kind(), &snapshot, &events, &metrics, self.stats);
        for (sink, failing) in self.sinks.iter_mut().zip(&mut self.sink_failing) {
            match sink.emit(&record) {
                Ok(()) if *failing => {
                    info!("telemetry sink recovered");
                    *failing = false;
                }
                Ok(()) => {}
                Err(e) => {
                    self.stats.sink_errors += 1;
                    // Warn when a sink starts failing, not on every tick it goes on failing.
                    if !*failing {
                        warn!(error = %e, "telemetry sink failed; its records are dropped until it recovers");
                    }
                    *failing = true;
                }
            }
        }
        drop(record);
        status::remember(&mut self.recent, snapshot.ts_ms, &events);
        // For `status`: the limits as they are after this tick's changes, read back.
        let mut last = snapshot.clone();
        for e in &events {
            if let Event::LimitChanged { gpu, to_w, .. } = e
                && let Some(s) = last.samples.get_mut(*gpu as usize)
            {
                s.power_limit_w = crate::gpu::Reading::Value(*to_w);
            }
        }
        self.last = Some(last);

        self.seq += 1;
        self.stats.tick_us = started.elapsed().as_micros() as u64;
        self.plugin_metrics.clone_from(&metrics);
        Tick { snapshot, events, metrics }
    }

    /// Reload the plugins from the config: each plugin that loads replaces its running
    /// version; one that fails leaves its previous version running (see
    /// [`PolicyChain::load`]). What happened is reported with the next tick.
    pub fn reload(&mut self) {
        let Some(reload) = &mut self.reload else {
            info!("reload requested, but this agent has no config file to reload from");
            return;
        };
        match reload() {
            Ok(specs) => {
                info!(
                    plugins = specs.power.len(),
                    reporters = specs.reporters.len(),
                    "reloading plugins"
                );
                let mut errors = self.policy.load(&specs.power, &self.inventory, &mut self.pending);
                errors.extend(self.reporters.load(
                    &specs.reporters,
                    &self.inventory,
                    &mut self.pending,
                ));
                self.reload_problem = None;
                if !errors.is_empty() {
                    warn!(
                        failed = errors.len(),
                        "some plugins failed to reload; a power plugin's previous version goes on, a reporter is off until fixed"
                    );
                    let names: Vec<&str> = errors.iter().map(|(n, _)| n.as_str()).collect();
                    self.reload_problem = Some(format!(
                        "plugins that failed to reload (a power plugin's previous version goes on, a reporter is off): {}",
                        names.join(", ")
                    ));
                }
            }
            Err(error) => {
                warn!(%error, "reload failed; everything goes on as before");
                self.reload_problem =
                    Some(format!("the last reload failed, the old config goes on: {error}"));
                self.pending.push(Event::ReloadFailed { error });
            }
        }
    }

    /// Carry out a request from outside. Checks what only the agent can (GPU indices,
    /// bounds); the change takes effect at the next tick, through the guard.
    pub fn execute(&mut self, request: Request) -> Result<String, Refusal> {
        match request {
            Request::SetPowerBudget(w) => {
                if let Some(w) = w {
                    crate::control::check_watts(w).map_err(Refusal::Rejected)?;
                }
                let budget = w.or(self.configured_budget_w);
                self.guard.set_budget(budget);
                self.desired.budget_w = w;
                info!(budget = %crate::control::show_watts(budget), "node power budget set by command");
                Ok(match (w, budget) {
                    (Some(w), _) => format!("node budget {w} W"),
                    (None, Some(c)) => format!("node budget back to the configured {c} W"),
                    (None, None) => "no node budget".into(),
                })
            }
            Request::SetPowerLimit { gpu, watts } => {
                let Some(b) = self.bounds.get(gpu as usize) else {
                    return Err(Refusal::Rejected(format!(
                        "GPU {gpu} does not exist; accepted: 0 to {}",
                        self.bounds.len().saturating_sub(1)
                    )));
                };
                match watts {
                    Some(w) if w < b.lo || w > b.hi => Err(Refusal::Rejected(format!(
                        "{w} W is outside GPU {gpu}'s bounds; accepted: {} to {} W",
                        b.lo, b.hi
                    ))),
                    Some(w) => {
                        self.desired.limits_w.insert(gpu, w);
                        info!(gpu, limit_w = w, "operator limit set by command");
                        Ok(format!("GPU {gpu} limit {w} W"))
                    }
                    None => {
                        self.desired.limits_w.remove(&gpu);
                        info!(gpu, "operator limit removed by command");
                        Ok(format!("GPU {gpu} back to its policy"))
                    }
                }
            }
            Request::ClearHealth { gpu } => {
                if gpu as usize >= self.inventory.len() {
                    return Err(Refusal::Rejected(format!(
                        "GPU {gpu} does not exist; accepted: 0 to {}",
                        self.inventory.len().saturating_sub(1)
                    )));
                }
                self.backend.clear_health(gpu).map_err(|e| Refusal::Failed(e.to_string()))?;
                info!(gpu, "GPU health cleared by command");
                Ok(format!("GPU {gpu} health cleared"))
            }
            Request::SubmitJob { user, job } => {
                let sub = crate::jobs::spec::Submission::parse(job).map_err(Refusal::Rejected)?;
                let id = self.queue()?.submit(sub, Submitter::Fleet { user })?;
                self.schedule_now();
                Ok(format!("job {id} queued"))
            }
            Request::CancelJob { id } => {
                let detail = self.queue()?.cancel(id, Who::Fleet)?;
                self.schedule_now();
                Ok(detail)
            }
            Request::ReloadPlugins => {
                if self.reload.is_none() {
                    return Err(Refusal::Rejected(
                        "this agent has no config file to reload plugins from".into(),
                    ));
                }
                let before = self.pending.len();
                self.reload();
                let failures: Vec<String> = self.pending[before..]
                    .iter()
                    .filter_map(|e| match e {
                        Event::ReloadFailed { error } => Some(error.clone()),
                        Event::PluginLoadFailed { plugin, error, .. } => {
                            Some(format!("{plugin}: {error}"))
                        }
                        _ => None,
                    })
                    .collect();
                if failures.is_empty() {
                    Ok(format!("{} plugins running", self.policy.status().len()))
                } else {
                    Err(Refusal::Failed(failures.join("; ")))
                }
            }
        }
    }

    /// Apply what commands set before a restart; what no longer fits (a GPU gone, new
    /// bounds) is logged and dropped.
    pub fn restore(&mut self, desired: &Desired) {
        let (requests, bad) = desired.requests();
        for why in bad {
            warn!(%why, "a saved desired state fails the command checks; dropped");
        }
        for r in requests {
            if let Err(e) = self.execute(r.clone()) {
                warn!(request = %r, error = %e, "a saved desired state no longer applies; dropped");
            }
        }
    }

    /// The birth message and the retained state (see `docs/mqtt.md`).
    pub fn describe(&self) -> Description {
        let gpus: Vec<Value> = self
            .inventory
            .iter()
            .zip(self.bounds.iter())
            .zip(self.curves.iter())
            .map(|((g, b), curve)| {
                let mut v = serde_json::to_value(g).expect("inventory serialises");
                v["bounds_w"] = json!({"min": b.lo, "max": b.hi});
                v["curve"] = json!(curve.as_ref().map(|c| &c.points));
                v
            })
            .collect();
        let calibration = self.calibration.as_ref().map(|c| {
            json!({"created_ms": c.created_ms, "backend": c.backend, "load": c.load, "unit": c.unit})
        });
        let plugins: Vec<Value> = self
            .policy
            .status()
            .iter()
            .zip(self.policy.load_errors())
            .map(|((name, running), (_, error))| {
                json!({"name": name, "running": running, "error": error})
            })
            .collect();
        let birth = json!({
            "node": self.node,
            "agent_version": env!("CARGO_PKG_VERSION"),
            "schema": crate::telemetry::SCHEMA,
            "backend": self.backend.kind(),
            "driver": self.backend.driver(),
            "tick_ms": self.tick.as_millis() as u64,
            "gpus": gpus,
            "calibration": calibration,
            "plugins": plugins,
        });
        let state = vec![
            (
                "power-budget".to_owned(),
                json!({"budget_w": self.guard.budget_w(), "commanded_w": self.desired.budget_w, "configured_w": self.configured_budget_w}),
            ),
            ("power-limits".to_owned(), json!({"limits_w": self.desired.limits_w})),
        ];
        Description { birth, state, desired: self.desired.clone() }
    }

    /// Take requests from `control` between ticks; tell `changed` when the description
    /// changes by itself.
    pub fn set_control(
        &mut self,
        control: mpsc::Receiver<Control>,
        changed: Arc<tokio::sync::Notify>,
    ) {
        self.control = Some(control);
        self.changed = Some(changed);
    }

    /// Answer a control request; whether a tick should run now (a budget or limit
    /// changed: a decrease must not wait for the next tick).
    fn handle(&mut self, c: Control) -> bool {
        match c {
            Control::Execute { request, done } => {
                let limits =
                    matches!(request, Request::SetPowerBudget(_) | Request::SetPowerLimit { .. });
                let outcome = self.execute(request);
                let ok = outcome.is_ok();
                let _ = done.send(outcome);
                if ok && let Some(c) = &self.changed {
                    // The links keep the desired state and publish the birth again.
                    c.notify_one();
                }
                limits && ok
            }
            Control::Describe { done } => {
                let _ = done.send(self.describe());
                false
            }
            Control::Status { done } => {
                let _ = done.send(self.status());
                false
            }
            Control::Jobs { op, who, done } => {
                let changes = matches!(op, JobOp::Submit(_) | JobOp::Cancel(_));
                let mut answer = self.queue().and_then(|q| q.answer(op, who));
                if changes && answer.is_ok() {
                    self.schedule_now();
                    // A submitted job is shown as it is after scheduling (started, or why
                    // it waits).
                    if let Ok(v) = &answer
                        && let Some(id) = v["job"]["id"].as_u64()
                    {
                        answer = self.queue().and_then(|q| q.answer(JobOp::Get(id), who));
                    }
                }
                let _ = done.send(answer);
                false
            }
        }
    }

    /// Schedule the queue now, on the last tick's picture (a job submitted to an idle
    /// node starts at once, not at the next tick); what happened is reported with the
    /// next tick.
    fn schedule_now(&mut self) {
        let (Some(jobs), Some(last)) = (&mut self.jobs, &self.last) else { return };
        jobs.schedule(last, &mut *self.backend, true);
        self.pending.extend(jobs.take_events());
    }

    /// Keep the limits the GPUs have now in `path`, to put back at [`Agent::stop`]. If
    /// `path` already holds limits, the last run did not stop cleanly: they are put back
    /// now (and reported with the first tick) and kept for this run's stop.
    ///
    /// The limits of an unclean stop are put back through the guard, as decisions of
    /// the first tick for the GPUs no policy decides (source `restore`): a node budget
    /// holds from the first tick. A file that cannot be read (empty or torn by a power
    /// loss, not JSON) is set aside with a `state-set-aside` event and the limits found
    /// now are kept instead; a directory where nothing can be kept costs the put-back at
    /// stop (logged), never the start.
    pub fn keep_start_limits(&mut self, path: std::path::PathBuf) {
        if let Err(why) = crate::state::check_dir(crate::state::parent(&path)) {
            // Nothing read from or kept in a directory another user could write.
            error!(path = %path.display(), %why, "the limits found at start are not kept (nor any left by a crash put back)");
            return;
        }
        match read_start_limits(&path) {
            Ok(Some(saved)) => {
                warn!(path = %path.display(), "the last run did not stop cleanly; putting back the limits from before it, through the guard");
                self.restore_limits = Some(saved);
                self.start_limits = Some(path);
                return;
            }
            Ok(None) => {}
            Err(e) => self.set_aside(&path, &e.to_string()),
        }
        match write_start_limits(&path, &current_limits(&mut *self.backend)) {
            Ok(()) => self.start_limits = Some(path),
            Err(e) => {
                error!(path = %path.display(), error = %e, "cannot keep the limits found at start; they will not be put back at stop")
            }
        }
    }

    /// Move a state file that cannot be used out of the way, and report it.
    pub fn set_aside(&mut self, path: &std::path::Path, error: &str) {
        let moved_to = match crate::state::set_aside(path) {
            Ok(p) => p.display().to_string(),
            Err(e) => format!("(could not be moved: {e})"),
        };
        error!(path = %path.display(), %error, %moved_to, "a state file cannot be read; set aside");
        self.pending.push(Event::StateSetAside {
            path: path.display().to_string(),
            error: error.to_owned(),
            moved_to,
        });
    }

    /// Stop: take no more control requests (a link waiting on one gets its answer: the
    /// agent stopped), and put back the limits found at start (when kept), logging each
    /// change.
    pub fn stop(&mut self) {
        self.control = None;
        if let Some(jobs) = &mut self.jobs {
            // Running jobs go on; the next start re-adopts them.
            jobs.stop();
        }
        for sink in &mut self.sinks {
            sink.close();
        }
        let Some(path) = self.start_limits.take() else { return };
        let saved = match read_start_limits(&path) {
            Ok(saved) => saved.unwrap_or_default(),
            Err(e) => {
                error!(path = %path.display(), error = %e, "the limits kept at start cannot be read; nothing put back, the file kept");
                return;
            }
        };
        let events = self.put_limits(&saved, "the limit from before the agent started");
        let failed = events.iter().any(|e| matches!(e, Event::LimitFailed { .. }));
        if failed {
            warn!(path = %path.display(), "some limits could not be put back; they will be tried again at the next start");
        } else if let Err(e) = std::fs::remove_file(&path) {
            warn!(path = %path.display(), error = %e, "cannot remove the saved start limits");
        }
    }

    /// Set each GPU (by UUID) to a saved limit, within its hardware range; the audit
    /// events. A GPU no longer present is skipped.
    fn put_limits(&mut self, saved: &BTreeMap<String, f64>, reason: &str) -> Vec<Event> {
        let mut events = Vec::new();
        for info in self.inventory.iter() {
            let Some(&w) = saved.get(&info.uuid) else { continue };
            let w = info.power_limit.clamp(w);
            match self.backend.set_power_limit(info.index, w) {
                Ok(enforced) => {
                    info!(gpu = info.index, uuid = %info.uuid, to_w = enforced, "power limit put back");
                    self.applied[info.index as usize] = Some(enforced);
                    events.push(Event::LimitChanged {
                        gpu: info.index,
                        uuid: info.uuid.clone(),
                        from_w: None,
                        to_w: enforced,
                        source: "restore".into(),
                        reason: reason.into(),
                    });
                }
                Err(e) => {
                    warn!(gpu = info.index, uuid = %info.uuid, error = %e, "cannot put a power limit back");
                    events.push(Event::LimitFailed {
                        gpu: info.index,
                        uuid: info.uuid.clone(),
                        to_w: w,
                        error: e.to_string(),
                    });
                }
            }
        }
        events
    }

    /// Report events with the next tick (what happened while setting up).
    pub fn report(&mut self, events: Vec<Event>) {
        self.pending.extend(events);
    }

    /// Clear every GPU's sticky `degraded` state (SIGUSR1): what an operator on the node
    /// does after dealing with the XIDs. Lost GPUs stay lost.
    pub fn clear_all_health(&mut self) {
        for gpu in 0..self.inventory.len() as u32 {
            if let Err(e) = self.backend.clear_health(gpu) {
                warn!(gpu, error = %e, "cannot clear the GPU's health");
            }
        }
        info!("GPU health cleared (SIGUSR1)");
    }

    /// Reload plugins with `reload` on SIGHUP (and on [`Agent::reload`]).
    pub fn set_reload(&mut self, reload: Reload) {
        self.reload = Some(reload);
    }

    /// The decision stage (to inspect its plugins).
    pub fn policy(&self) -> &PolicyChain {
        &self.policy
    }

    /// Tick until `ticks` ticks have run (forever if `None`) or `shutdown` completes.
    /// A shutdown lets the tick in progress finish: a tick is never cut in half.
    pub async fn run(
        &mut self,
        ticks: Option<u64>,
        pacing: Pacing,
        shutdown: impl Future<Output = ()>,
    ) -> u64 {
        let (period, virtual_clock) = match &pacing {
            Pacing::RealTime => (Some(self.tick), None),
            Pacing::Virtual { clock, speed } => {
                (speed.map(|s| self.tick.div_f64(s.max(1e-6))), Some(clock.clone()))
            }
        };
        let mut timer = period.map(|p| {
            let mut t = tokio::time::interval(p);
            t.set_missed_tick_behavior(MissedTickBehavior::Skip);
            t
        });
        tokio::pin!(shutdown);
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .inspect_err(|e| warn!(error = %e, "cannot listen for SIGHUP; plugins will not be reloaded on it"))
            .ok();
        let mut usr1 =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
                .inspect_err(|e| warn!(error = %e, "cannot listen for SIGUSR1; GPU health can be cleared only by command"))
                .ok();
        let mut done = 0u64;
        info!(node = %self.node, backend = self.backend.kind(), gpus = self.inventory.len(), tick = %humantime::format_duration(self.tick), "agent started");
        while ticks.is_none_or(|n| done < n) {
            tokio::select! {
                biased;
                () = &mut shutdown => {
                    info!(ticks = done, "shutdown requested; stopping");
                    self.notify.stopping();
                    break;
                }
                Some(()) = recv(&mut hangup) => {
                    self.notify.reloading();
                    self.reload();
                    if self.notify.enabled() {
                        let status = self.status_line();
                        self.notify.ready(&status);
                    }
                    if let Some(c) = &self.changed {
                        c.notify_one();
                    }
                    continue;
                }
                Some(()) = recv(&mut usr1) => {
                    self.clear_all_health();
                    continue;
                }
                Some(c) = recv_control(&mut self.control) => {
                    // A changed budget or limit is applied now, by an extra tick (after
                    // every request already queued: a burst of changes costs one tick).
                    // The timer's ticks go on as scheduled, and `ticks` counts only them.
                    let mut tick_now = self.handle(c);
                    while let Some(c) = self.control.as_mut().and_then(|rx| rx.try_recv().ok()) {
                        tick_now |= self.handle(c);
                    }
                    if tick_now && done > 0 {
                        self.tick();
                    }
                    continue;
                }
                late = next_tick(&mut timer) => {
                    if late.is_some_and(|l| period.is_some_and(|p| l > p)) {
                        self.stats.ticks_late += 1;
                        debug!(late = ?late, "tick started late");
                    }
                    if done > 0
                        && let Some(c) = &virtual_clock
                    {
                        c.advance(self.tick);
                    }
                }
            }
            self.tick();
            done += 1;
            // systemd: ready after the first tick (the plugins loaded before it), what the
            // agent is doing, and the watchdog ping from this loop itself. (The status
            // line, which locks the MQTT link's state, is built only when systemd listens.)
            if self.notify.enabled() {
                let status = self.status_line();
                if done == 1 {
                    self.notify.ready(&status);
                } else {
                    self.notify.status(&status);
                }
                self.notify.tick();
            }
        }
        done
    }

    /// Log the limit changes since the last summary, if it is time (see [`LogSummary`]).
    fn log_summary(&mut self, now_ms: u64) {
        let s = &mut self.log_summary;
        let due = s.at_ms.is_none_or(|t| now_ms.saturating_sub(t) >= LOG_SUMMARY_EVERY_MS);
        if s.changes > 0 && due {
            let first = s.at_ms.is_none();
            info!(
                changes = s.changes,
                budget = %crate::control::show_watts(self.guard.budget_w()),
                "{}",
                if first {
                    "power limits applied (each change is a limit-changed event; further changes are summed up here every 10 minutes)"
                } else {
                    "power limit changes in the last 10 minutes (each is a limit-changed event)"
                }
            );
            s.changes = 0;
            s.at_ms = Some(now_ms);
        }
    }

    /// One line on what the agent is doing (systemd's `STATUS=`).
    fn status_line(&self) -> String {
        let plugins = self.policy.status();
        let running = plugins.iter().filter(|(_, r)| *r).count();
        let budget = match self.guard.budget_w() {
            Some(b) => format!("node budget {b} W"),
            None => "no node budget".into(),
        };
        let mut line = format!(
            "{} GPUs ({}), {running} of {} plugins running, {budget}",
            self.inventory.len(),
            self.backend.kind(),
            plugins.len(),
        );
        for s in self.sinks.iter().filter_map(|s| s.status()) {
            line.push_str(", ");
            line.push_str(&s);
        }
        if let Some(p) = &self.reload_problem {
            line.push_str("; ");
            line.push_str(p);
        }
        line
    }
}

/// The next signal; never, if there is no listener.
async fn recv(s: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match s {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

/// The next control request; never, if there is no channel (or it closed).
async fn recv_control(c: &mut Option<mpsc::Receiver<Control>>) -> Option<Control> {
    match c {
        Some(rx) => match rx.recv().await {
            Some(c) => Some(c),
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// Wait for the next tick; returns how late it started, if paced by a timer.
async fn next_tick(timer: &mut Option<tokio::time::Interval>) -> Option<Duration> {
    match timer {
        Some(t) => {
            let due = t.tick().await;
            Some(tokio::time::Instant::now().saturating_duration_since(due))
        }
        None => {
            tokio::task::yield_now().await;
            None
        }
    }
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C will stop the agent");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
