//! The decision stage: the static caps, then every power plugin in configured order.
//!
//! Composition rule (also in `docs/plugins.md`):
//!
//! 1. The static caps of `[power]` form the first proposal.
//! 2. Each plugin in `[[plugin]]` order sees the snapshot with the proposal so far
//!    (`proposed-limit-w`) and returns actions. An action for GPU `i` replaces the
//!    proposal for `i` if the plugin holds the grant for its direction: `lower` to
//!    propose less than the proposal so far (or, with none, the limit in force), `raise`
//!    to propose more. Anything else is rejected and audited, and the proposal stands.
//!    So a thermal guard granted only `lower`, placed after a budget splitter, can only
//!    take limits down from what the splitter decided.
//! 3. A plugin that faults (timeout, memory, trap) gives no actions this tick; the
//!    configured fallback stands in for it (`hold`: every GPU without a proposal keeps
//!    its current limit; `defaults`: its default limit). After `max_failures` faults
//!    within `failure_window` it is quarantined: not called again, the fallback in its
//!    place, until the plugins are reloaded.
//! 4. The final proposal goes to the guard, which clamps, fits the budget, rate-limits
//!    and audits, whatever the plugins said.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::engine::PluginEngine;
use super::host::{CallContext, PluginMetric};
use super::kv::KvStore;
use super::power::{Limits, PowerPlugin};
use super::sandbox::FaultWindow;
use super::thread::PluginThread;
use super::{PluginError, wit};
use crate::config::{Fallback, Grant};
use crate::gpu::{Health, Throttle};
use crate::policy::{PowerDecision, StaticPolicy};
use crate::snapshot::NodeSnapshot;
use crate::telemetry::Event;

/// Longest reason kept from a plugin (the audit trail is not a dumping ground).
const MAX_REASON: usize = 300;

/// Everything needed to start one plugin, resolved from its `[[plugin]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginSpec {
    pub name: String,
    pub path: PathBuf,
    /// Its config as JSON.
    pub config: String,
    pub limits: Limits,
    pub grants: Vec<Grant>,
    pub state_bytes: usize,
}

/// Fault counting and what stands in for a failed plugin.
#[derive(Debug, Clone, PartialEq)]
pub struct ChainSettings {
    pub max_failures: u32,
    pub failure_window_ms: u64,
    pub fallback: Fallback,
    /// Where plugins' key-value stores live; `None` keeps them in memory.
    pub state_dir: Option<PathBuf>,
}

struct Slot {
    spec: PluginSpec,
    /// `None` when it failed to load: it runs as quarantined until a reload fixes it.
    plugin: Option<PowerPlugin>,
    failures: FaultWindow,
    quarantined: bool,
    /// Why its last load failed (for the birth message and `gpulet status`).
    error: Option<String>,
    /// Calls since it was (re)loaded, their faults and their time (for `/metrics`).
    calls: u64,
    faults: u64,
    call_time: std::time::Duration,
    /// Rejected actions not yet logged, and when they last were (the log gets one line
    /// a minute at most; each rejection is an event anyway).
    rejected_unlogged: u64,
    rejected_logged_ms: Option<u64>,
}

/// How often a plugin's rejected decisions are logged at most.
const REJECTION_LOG_EVERY_MS: u64 = 60_000;

/// One plugin as `gpulet status` and `/metrics` show it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PluginStatus {
    pub name: String,
    /// The version it reports; `None` when it did not load.
    pub version: Option<String>,
    /// Called each tick: loaded and not quarantined.
    pub running: bool,
    pub quarantined: bool,
    /// Why its last load failed.
    pub error: Option<String>,
    /// Since it was last (re)loaded.
    pub calls: u64,
    pub faults: u64,
    pub call_seconds: f64,
    /// `power` or `reporter`.
    #[serde(default = "power_kind")]
    pub kind: String,
    /// Reporter items refused since it was loaded (`plugin/reporters.rs`).
    #[serde(default)]
    pub refused: u64,
    /// Instances replaced for having outgrown `recycle_mib`, since it was loaded.
    #[serde(default)]
    pub recycled: u64,
}

fn power_kind() -> String {
    "power".into()
}

impl Slot {
    /// Log the rejections among `new` events: the first at once, then at most one line a
    /// minute with the count since, so that a plugin that is refused every tick (no
    /// grants, a GPU that does not exist) is in the log, not only in telemetry.
    fn log_rejections(&mut self, new: &[Event], now_ms: u64) {
        let mut last = None;
        for e in new {
            if let Event::DecisionRejected { reason, .. } = e {
                self.rejected_unlogged += 1;
                last = Some(reason);
            }
        }
        let Some(reason) = last else { return };
        if self
            .rejected_logged_ms
            .is_some_and(|t| now_ms.saturating_sub(t) < REJECTION_LOG_EVERY_MS)
        {
            return;
        }
        tracing::warn!(plugin = %self.spec.name, rejected = self.rejected_unlogged, last = %reason, "plugin decisions rejected (logged at most once a minute; each is a decision-rejected event)");
        self.rejected_unlogged = 0;
        self.rejected_logged_ms = Some(now_ms);
    }
}

/// The decision stage. Its plugins are called on the plugin thread ([`PluginThread`]:
/// never on the agent's async runtime, where a plugin's blocking WASI call would panic);
/// the chain itself moves there for each call and back.
pub struct PolicyChain {
    chain: PluginThread<Chain>,
}

impl std::fmt::Debug for PolicyChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.status().into_iter().map(|(n, _)| n).collect();
        f.debug_struct("PolicyChain").field("plugins", &names).finish_non_exhaustive()
    }
}

impl PolicyChain {
    pub fn new(
        static_caps: StaticPolicy,
        settings: ChainSettings,
        engine: Option<Arc<PluginEngine>>,
    ) -> PolicyChain {
        let chain = Chain { static_caps, slots: Vec::new(), settings, engine };
        PolicyChain { chain: PluginThread::new(chain) }
    }

    /// Start `specs` against the node's GPUs, replacing the running plugins (see
    /// [`Chain::load`]), on the plugin thread. Returns the failures, by plugin name.
    pub fn load(
        &mut self,
        specs: &[PluginSpec],
        inventory: &[crate::gpu::GpuInfo],
        events: &mut Vec<Event>,
    ) -> Vec<(String, PluginError)> {
        let (specs, inventory) = (specs.to_vec(), inventory.to_vec());
        let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
        let outcome = self.chain.call(move |c| {
            let mut events = Vec::new();
            let errors = c.load(&specs, &inventory, &mut events);
            (errors, events)
        });
        match outcome {
            Ok((errors, mut ev)) => {
                events.append(&mut ev);
                errors
            }
            Err(panic) => {
                tracing::error!(%panic, "the plugin host panicked while loading plugins");
                let error = PluginError::Engine(format!("the plugin host panicked: {panic}"));
                names.into_iter().map(|n| (n, error.clone())).collect()
            }
        }
    }

    /// Its fault counting and state directory (the reporting stage shares them).
    pub fn settings(&self) -> ChainSettings {
        self.chain.get().settings.clone()
    }

    /// The plugin engine, if one was made (the reporting stage shares it).
    pub fn engine(&self) -> Option<Arc<PluginEngine>> {
        self.chain.get().engine.clone()
    }

    /// Names of the plugins and whether each is active (not quarantined or failed).
    pub fn status(&self) -> Vec<(&str, bool)> {
        self.chain.get().status()
    }

    /// Each plugin as `gpulet status` and `/metrics` show it.
    pub fn plugins(&self) -> Vec<PluginStatus> {
        self.chain
            .get()
            .slots
            .iter()
            .map(|s| PluginStatus {
                name: s.spec.name.clone(),
                version: s.plugin.as_ref().map(|p| p.info().version.clone()),
                running: !s.quarantined && s.plugin.is_some(),
                quarantined: s.quarantined,
                error: s.error.clone(),
                calls: s.calls,
                faults: s.faults,
                call_seconds: s.call_time.as_secs_f64(),
                kind: power_kind(),
                refused: 0,
                recycled: s.plugin.as_ref().map_or(0, |p| p.recycled()),
            })
            .collect()
    }

    /// Each plugin's last load error, by name (`None`: it loaded).
    pub fn load_errors(&self) -> Vec<(&str, Option<&str>)> {
        self.chain.get().slots.iter().map(|s| (s.spec.name.as_str(), s.error.as_deref())).collect()
    }

    /// The proposals for this tick (see the module docs for the rules), decided on the
    /// plugin thread. Should the host itself panic there, every plugin's fallback stands
    /// in for this tick and their instances start afresh.
    pub fn decide(
        &mut self,
        snap: &NodeSnapshot,
        events: &mut Vec<Event>,
        metrics: &mut Vec<PluginMetric>,
    ) -> Vec<PowerDecision> {
        if self.chain.get().slots.is_empty() {
            // Nothing to call into: no need to leave this thread.
            return self.chain.get_mut().decide(snap, events, metrics);
        }
        let owned = snap.clone();
        let outcome = self.chain.call(move |c| {
            let (mut events, mut metrics) = (Vec::new(), Vec::new());
            let decisions = c.decide(&owned, &mut events, &mut metrics);
            (decisions, events, metrics)
        });
        match outcome {
            Ok((decisions, mut ev, mut m)) => {
                events.append(&mut ev);
                metrics.append(&mut m);
                decisions
            }
            Err(panic) => {
                tracing::error!(%panic, "the plugin host panicked during a decision; the fallbacks stand in");
                events.push(Event::PluginFault {
                    plugin: "*".into(),
                    fault: "host-panic",
                    message: format!("the plugin host panicked: {panic}"),
                });
                self.chain.get_mut().fall_back_all(snap, &panic)
            }
        }
    }

    /// As [`PolicyChain::decide`], but on the caller's thread: for the benchmark that
    /// measures what the plugin thread costs. Not for the agent.
    #[doc(hidden)]
    pub fn decide_on_this_thread(
        &mut self,
        snap: &NodeSnapshot,
        events: &mut Vec<Event>,
        metrics: &mut Vec<PluginMetric>,
    ) -> Vec<PowerDecision> {
        self.chain.get_mut().decide(snap, events, metrics)
    }
}

/// The chain proper: lives on the plugin thread while it is called.
struct Chain {
    static_caps: StaticPolicy,
    slots: Vec<Slot>,
    settings: ChainSettings,
    engine: Option<Arc<PluginEngine>>,
}

impl Chain {
    /// Start `specs` against `snap`'s GPUs, replacing the running plugins. A plugin that
    /// fails to start keeps its previous version running if there was one (same name),
    /// and otherwise sits quarantined; each outcome is an event. Returns the failures, by
    /// plugin name.
    fn load(
        &mut self,
        specs: &[PluginSpec],
        inventory: &[crate::gpu::GpuInfo],
        events: &mut Vec<Event>,
    ) -> Vec<(String, PluginError)> {
        let mut errors = Vec::new();
        let mut old: Vec<Slot> = std::mem::take(&mut self.slots);
        for spec in specs {
            let previous =
                old.iter().position(|s| s.spec.name == spec.name).map(|i| old.swap_remove(i));
            match self.start(spec, inventory) {
                Ok((plugin, loaded)) => {
                    tracing::info!(plugin = %spec.name, version = %plugin.info().version, source = ?loaded.source, load_ms = loaded.load_time.as_millis() as u64, "plugin loaded");
                    events.push(Event::PluginLoaded {
                        plugin: spec.name.clone(),
                        version: plugin.info().version.clone(),
                        path: spec.path.display().to_string(),
                        compiled: loaded.source != super::cache::Source::Cached,
                        load_ms: loaded.load_time.as_secs_f64() * 1000.0,
                    });
                    self.slots.push(Slot {
                        spec: spec.clone(),
                        plugin: Some(plugin),
                        failures: FaultWindow::default(),
                        quarantined: false,
                        error: None,
                        calls: 0,
                        faults: 0,
                        call_time: std::time::Duration::ZERO,
                        rejected_unlogged: 0,
                        rejected_logged_ms: None,
                    });
                }
                Err(e) => {
                    let kept = previous.as_ref().is_some_and(|p| p.plugin.is_some());
                    tracing::error!(plugin = %spec.name, error = %e, kept_previous = kept, "plugin failed to load");
                    events.push(Event::PluginLoadFailed {
                        plugin: spec.name.clone(),
                        error: e.to_string(),
                        kept_previous: kept,
                    });
                    let error = e.to_string();
                    errors.push((spec.name.clone(), e));
                    let mut slot = match previous {
                        Some(p) if kept => p,
                        _ => Slot {
                            spec: spec.clone(),
                            plugin: None,
                            failures: FaultWindow::default(),
                            quarantined: true,
                            error: None,
                            calls: 0,
                            faults: 0,
                            call_time: std::time::Duration::ZERO,
                            rejected_unlogged: 0,
                            rejected_logged_ms: None,
                        },
                    };
                    slot.error = Some(error);
                    self.slots.push(slot);
                }
            }
        }
        errors
    }

    fn start(
        &mut self,
        spec: &PluginSpec,
        inventory: &[crate::gpu::GpuInfo],
    ) -> Result<(PowerPlugin, super::engine::LoadedComponent), PluginError> {
        let engine = match &self.engine {
            Some(e) => e.clone(),
            None => {
                let e = Arc::new(PluginEngine::new(None)?);
                self.engine = Some(e.clone());
                e
            }
        };
        let loaded = engine.load(&spec.path)?;
        let kv = match &self.settings.state_dir {
            Some(dir) => KvStore::open(dir, &spec.name, spec.state_bytes).unwrap_or_else(|e| {
                tracing::warn!(plugin = %spec.name, error = %e, "plugin state kept in memory only");
                KvStore::in_memory(spec.state_bytes)
            }),
            None => KvStore::in_memory(spec.state_bytes),
        };
        let gpus = super::gpu_infos(inventory);
        let plugin = PowerPlugin::start(
            &engine,
            &spec.name,
            loaded.component.clone(),
            spec.config.clone(),
            gpus,
            spec.limits.clone(),
            Arc::new(Mutex::new(kv)),
        )?;
        Ok((plugin, loaded))
    }

    fn status(&self) -> Vec<(&str, bool)> {
        self.slots
            .iter()
            .map(|s| (s.spec.name.as_str(), !s.quarantined && s.plugin.is_some()))
            .collect()
    }

    /// The static caps, then each plugin's fallback in its place, and every instance
    /// dropped (the next call starts afresh): after the host panicked mid-decision.
    fn fall_back_all(&mut self, snap: &NodeSnapshot, why: &str) -> Vec<PowerDecision> {
        let mut proposal = self.static_proposal(snap);
        for slot in &mut self.slots {
            slot.plugin.as_mut().map(PowerPlugin::drop_instance);
            let why = format!("was stopped by a panic of the plugin host ({why})");
            fall_back(&slot.spec.name, self.settings.fallback, &why, snap, &mut proposal);
        }
        proposal.into_iter().flatten().collect()
    }

    fn static_proposal(&self, snap: &NodeSnapshot) -> Vec<Option<PowerDecision>> {
        let mut proposal: Vec<Option<PowerDecision>> = vec![None; snap.samples.len()];
        for d in self.static_caps.decide() {
            if let Some(p) = proposal.get_mut(d.gpu as usize) {
                *p = Some(d.clone());
            }
        }
        proposal
    }

    /// The proposals for this tick (see the module docs for the rules).
    fn decide(
        &mut self,
        snap: &NodeSnapshot,
        events: &mut Vec<Event>,
        metrics: &mut Vec<PluginMetric>,
    ) -> Vec<PowerDecision> {
        let mut proposal = self.static_proposal(snap);
        if self.slots.is_empty() {
            return proposal.into_iter().flatten().collect();
        }
        let mut wsnap = to_wit(snap);
        let cx = CallContext::of(snap);
        for slot in &mut self.slots {
            for (g, p) in wsnap.gpus.iter_mut().zip(&proposal) {
                g.proposed_limit_w = p.as_ref().map(|d| d.limit_w);
            }
            let name = slot.spec.name.as_str();
            let outcome = match (&mut slot.plugin, slot.quarantined) {
                (Some(plugin), false) => {
                    let started = std::time::Instant::now();
                    let out = plugin.decide(&wsnap, &cx);
                    slot.calls += 1;
                    slot.call_time += started.elapsed();
                    Some(out)
                }
                _ => None,
            };
            match outcome {
                Some(Ok(out)) => {
                    metrics.extend(out.metrics);
                    if out.dropped > 0 {
                        tracing::debug!(
                            plugin = name,
                            dropped = out.dropped,
                            "plugin log lines or metrics over the per-call limit were dropped"
                        );
                    }
                    let before = events.len();
                    for a in out.actions {
                        apply(name, &slot.spec.grants, a, snap, &mut proposal, events);
                    }
                    slot.log_rejections(&events[before..], snap.now_ms);
                }
                Some(Err(fault)) => {
                    tracing::warn!(plugin = name, fault = fault.kind(), error = %fault, "plugin fault; a fresh instance will serve the next tick");
                    events.push(Event::PluginFault {
                        plugin: name.to_owned(),
                        fault: fault.kind(),
                        message: fault.to_string(),
                    });
                    let window = self.settings.failure_window_ms;
                    slot.faults += 1;
                    if slot.failures.record(snap.now_ms, window, self.settings.max_failures) {
                        slot.quarantined = true;
                        tracing::error!(
                            plugin = name,
                            failures = slot.failures.len(),
                            "plugin quarantined; its fallback stands in until the plugins are reloaded"
                        );
                        events.push(Event::PluginQuarantined {
                            plugin: name.to_owned(),
                            failures: slot.failures.len() as u32,
                            window_s: window / 1000,
                            fallback: fallback_name(self.settings.fallback),
                        });
                    }
                    fall_back(
                        name,
                        self.settings.fallback,
                        &fault.to_string(),
                        snap,
                        &mut proposal,
                    );
                }
                None => {
                    let why = if slot.plugin.is_none() { "did not load" } else { "is quarantined" };
                    fall_back(name, self.settings.fallback, why, snap, &mut proposal);
                }
            }
        }
        proposal.into_iter().flatten().collect()
    }
}

fn fallback_name(f: Fallback) -> &'static str {
    match f {
        Fallback::Hold => "hold",
        Fallback::Defaults => "defaults",
    }
}

/// One plugin action against the proposal, under the plugin's grants.
fn apply(
    name: &str,
    grants: &[Grant],
    a: wit::PowerAction,
    snap: &NodeSnapshot,
    proposal: &mut [Option<PowerDecision>],
    events: &mut Vec<Event>,
) {
    let reject =
        |reason: String| Event::DecisionRejected { source: name.to_owned(), gpu: a.gpu, reason };
    let Some(slot) = proposal.get_mut(a.gpu as usize) else {
        events.push(reject(format!(
            "GPU {} does not exist; the node has {} GPUs",
            a.gpu,
            snap.samples.len()
        )));
        return;
    };
    if !a.limit_w.is_finite() {
        events.push(reject(format!("limit {} is not a number of watts", a.limit_w)));
        return;
    }
    let i = a.gpu as usize;
    let base = slot
        .as_ref()
        .map(|d| d.limit_w)
        .or(snap.samples[i].power_limit_w.value())
        .unwrap_or(snap.inventory[i].power_limit.default_w);
    let needs = if a.limit_w < base - 1e-9 {
        Some(Grant::Lower)
    } else if a.limit_w > base + 1e-9 {
        Some(Grant::Raise)
    } else {
        None
    };
    if let Some(g) = needs.filter(|g| !grants.contains(g)) {
        let verb = if g == Grant::Lower { "lower" } else { "raise" };
        events.push(reject(format!(
            "may not {verb} limits ({} W to {} W): the plugin lacks the \"{verb}\" grant",
            base, a.limit_w
        )));
        return;
    }
    let mut reason = a.reason;
    if reason.len() > MAX_REASON {
        let cut = (0..=MAX_REASON).rev().find(|&c| reason.is_char_boundary(c)).unwrap_or(0);
        reason.truncate(cut);
        reason.push('…');
    }
    *slot = Some(PowerDecision { gpu: a.gpu, limit_w: a.limit_w, reason, source: name.to_owned() });
}

/// The fallback for a plugin that gave nothing this tick.
fn fall_back(
    name: &str,
    fallback: Fallback,
    why: &str,
    snap: &NodeSnapshot,
    proposal: &mut [Option<PowerDecision>],
) {
    for (i, slot) in proposal.iter_mut().enumerate() {
        if slot.is_some() {
            continue;
        }
        let limit = match fallback {
            Fallback::Hold => snap.samples[i].power_limit_w.value(),
            Fallback::Defaults => Some(snap.inventory[i].power_limit.default_w),
        };
        if let Some(limit_w) = limit {
            let reason =
                format!("fallback ({}) for plugin {name}, which {why}", fallback_name(fallback));
            *slot = Some(PowerDecision { gpu: i as u32, limit_w, reason, source: name.to_owned() });
        }
    }
}

/// The node snapshot as the WIT contract has it.
pub fn to_wit(snap: &NodeSnapshot) -> wit::Snapshot {
    let gpus = snap
        .gpus()
        .zip(snap.bounds.iter())
        .map(|((info, s), b)| {
            let t = s.throttle.value().unwrap_or_default();
            let mut throttle = wit::Throttle::empty();
            for (bit, flag) in [
                (Throttle::GPU_IDLE, wit::Throttle::GPU_IDLE),
                (Throttle::SW_POWER_CAP, wit::Throttle::SW_POWER_CAP),
                (Throttle::HW_SLOWDOWN, wit::Throttle::HW_SLOWDOWN),
                (Throttle::SW_THERMAL, wit::Throttle::SW_THERMAL),
                (Throttle::HW_THERMAL, wit::Throttle::HW_THERMAL),
                (Throttle::HW_POWER_BRAKE, wit::Throttle::HW_POWER_BRAKE),
            ] {
                if t.contains(bit) {
                    throttle |= flag;
                }
            }
            wit::Gpu {
                index: info.index,
                power_w: s.power_w.value(),
                power_limit_w: s.power_limit_w.value(),
                energy_j: s.energy_j.value(),
                temp_c: s.temp_c.value(),
                util_pct: s.util_pct.value(),
                mem_used_mib: s.mem_used_mib.value(),
                sm_clock_mhz: s.sm_clock_mhz.value(),
                throttle,
                health: match s.health {
                    Health::Ok => wit::Health::Ok,
                    Health::Degraded => wit::Health::Degraded,
                    Health::Lost => wit::Health::Lost,
                },
                min_limit_w: b.lo,
                max_limit_w: b.hi,
                default_limit_w: info.power_limit.default_w,
                proposed_limit_w: None,
            }
        })
        .collect();
    wit::Snapshot { seq: snap.seq, now_ms: snap.now_ms, budget_w: snap.budget_w, gpus }
}
