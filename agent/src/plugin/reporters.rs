//! The reporting stage: each `reporter` plugin (`[[reporter]]`), once a tick after the
//! decision stage, turns the snapshot into metrics and events. They go into the tick's
//! telemetry record (hence MQTT and the outbox) and `/metrics`, tagged with the
//! plugin's name. A reporter decides nothing: the stage has no path to a limit.
//!
//! Reporters run in the same sandbox as power plugins (deadline, memory cap, faults,
//! re-instantiation after a fault, quarantine after `plugins.max_failures` faults within
//! `plugins.failure_window`, until a reload). What they return is bounded here, whatever
//! the plugin does:
//!
//! - at most [`MAX_ITEMS`] items a tick are kept (metrics and events together);
//! - metric names are 1 to 64 of `[a-z0-9_.]`, event kinds 1 to 32 of `[a-z0-9-]`,
//!   values finite, a GPU one the node has; messages are cut to [`MAX_MESSAGE`] bytes;
//! - events are rate-limited per reporter: a burst of [`EVENT_BURST`], then one every
//!   [`EVENT_REFILL_MS`] (10 a minute): a flapping detector must not flood the outbox.
//!
//! Anything refused is counted (`refused` in `gpulet status`, `gpulet_plugin_refused` in
//! `/metrics`) and reported once per reporter and reason (a `plugin-output-refused` event
//! and a warning with an example), so that a plugin that gets one thing wrong every tick
//! shows up once, not every second.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use super::chain::{ChainSettings, PluginSpec, PluginStatus, to_wit};
use super::engine::PluginEngine;
use super::host::{CallContext, PluginMetric};
use super::kv::KvStore;
use super::reporter::ReporterPlugin;
use super::sandbox::FaultWindow;
use super::thread::PluginThread;
use super::{PluginError, wit};
use crate::snapshot::NodeSnapshot;
use crate::telemetry::Event;

/// Items (metrics and events) kept from one reporter per tick.
pub const MAX_ITEMS: usize = 64;
/// Events a reporter may publish at once before the rate limit holds them back.
pub const EVENT_BURST: f64 = 10.0;
/// One more event allowed every this many milliseconds.
pub const EVENT_REFILL_MS: u64 = 6_000;
/// Longest event message kept, bytes.
pub const MAX_MESSAGE: usize = 300;

/// What a reporter's output may be refused for: the reason's name in events and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Refusal {
    MetricName,
    EventKind,
    NotFinite,
    NoSuchGpu,
    TooManyItems,
    EventRate,
}

impl Refusal {
    fn name(self) -> &'static str {
        match self {
            Refusal::MetricName => "metric-name",
            Refusal::EventKind => "event-kind",
            Refusal::NotFinite => "not-finite",
            Refusal::NoSuchGpu => "no-such-gpu",
            Refusal::TooManyItems => "too-many-items",
            Refusal::EventRate => "event-rate",
        }
    }

    fn accepted(self) -> String {
        match self {
            Refusal::MetricName => "metric names are 1 to 64 of a-z, 0-9, '_' and '.'".into(),
            Refusal::EventKind => "event kinds are 1 to 32 of a-z, 0-9 and '-'".into(),
            Refusal::NotFinite => "metric values are finite numbers".into(),
            Refusal::NoSuchGpu => "a GPU index the node has".into(),
            Refusal::TooManyItems => format!("at most {MAX_ITEMS} metrics and events a tick"),
            Refusal::EventRate => format!(
                "at most {EVENT_BURST} events at once, then one every {} s",
                EVENT_REFILL_MS / 1000
            ),
        }
    }
}

struct Slot {
    spec: PluginSpec,
    /// `None` when it failed to load.
    plugin: Option<ReporterPlugin>,
    error: Option<String>,
    faults: FaultWindow,
    quarantined: bool,
    calls: u64,
    fault_count: u64,
    call_time: std::time::Duration,
    /// Items refused since it was loaded, and the reasons already reported.
    refused: u64,
    reported: BTreeSet<Refusal>,
    /// The event rate limit: tokens left, and when they were last topped up.
    tokens: f64,
    refilled_ms: Option<u64>,
}

/// The reporting stage; its plugins are called on a plugin thread of their own, started
/// with the first reporter (an agent without reporters has no thread for them).
pub struct Reporters {
    slots: Option<PluginThread<Vec<Slot>>>,
    settings: ChainSettings,
    engine: Option<Arc<PluginEngine>>,
}

impl std::fmt::Debug for Reporters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.slots().iter().map(|s| s.spec.name.as_str()).collect();
        f.debug_struct("Reporters").field("plugins", &names).finish_non_exhaustive()
    }
}

impl Reporters {
    /// A stage with no reporters; `engine` compiles them (made at the first load if
    /// `None`).
    pub fn new(settings: ChainSettings, engine: Option<Arc<PluginEngine>>) -> Reporters {
        Reporters { slots: None, settings, engine }
    }

    fn slots(&self) -> &[Slot] {
        self.slots.as_ref().map_or(&[], |t| t.get().as_slice())
    }

    /// Start `specs`, replacing the running reporters. One that fails to load is
    /// reported (log and event) and sits unloaded until a reload fixes it. Returns the
    /// failures, by name.
    pub fn load(
        &mut self,
        specs: &[PluginSpec],
        inventory: &[crate::gpu::GpuInfo],
        events: &mut Vec<Event>,
    ) -> Vec<(String, PluginError)> {
        if specs.is_empty() && self.slots().is_empty() {
            return Vec::new();
        }
        let engine = match &self.engine {
            Some(e) => e.clone(),
            None => match PluginEngine::new(None) {
                Ok(e) => self.engine.insert(Arc::new(e)).clone(),
                Err(e) => return specs.iter().map(|s| (s.name.clone(), e.clone())).collect(),
            },
        };
        let (specs, gpus) = (specs.to_vec(), super::gpu_infos(inventory));
        let state_dir = self.settings.state_dir.clone();
        let thread = self.slots.get_or_insert_with(|| PluginThread::new(Vec::new()));
        let outcome = thread.call(move |slots| {
            let mut events = Vec::new();
            let mut errors = Vec::new();
            *slots = specs
                .into_iter()
                .map(|spec| {
                    let started = start(&engine, &spec, gpus.clone(), state_dir.as_deref());
                    let (plugin, error) = match started {
                        Ok((plugin, loaded)) => {
                            tracing::info!(plugin = %spec.name, version = %plugin.info().version, "reporter plugin loaded");
                            events.push(Event::PluginLoaded {
                                plugin: spec.name.clone(),
                                version: plugin.info().version.clone(),
                                path: spec.path.display().to_string(),
                                compiled: loaded.source != super::cache::Source::Cached,
                                load_ms: loaded.load_time.as_secs_f64() * 1000.0,
                            });
                            (Some(plugin), None)
                        }
                        Err(e) => {
                            tracing::error!(plugin = %spec.name, error = %e, "reporter plugin failed to load");
                            events.push(Event::PluginLoadFailed {
                                plugin: spec.name.clone(),
                                error: e.to_string(),
                                kept_previous: false,
                            });
                            errors.push((spec.name.clone(), e.clone()));
                            (None, Some(e.to_string()))
                        }
                    };
                    Slot {
                        spec,
                        plugin,
                        error,
                        faults: FaultWindow::default(),
                        quarantined: false,
                        calls: 0,
                        fault_count: 0,
                        call_time: std::time::Duration::ZERO,
                        refused: 0,
                        reported: BTreeSet::new(),
                        tokens: EVENT_BURST,
                        refilled_ms: None,
                    }
                })
                .collect();
            (errors, events)
        });
        match outcome {
            Ok((errors, mut ev)) => {
                events.append(&mut ev);
                errors
            }
            Err(panic) => {
                tracing::error!(%panic, "the plugin host panicked while loading reporters");
                let error = PluginError::Engine(format!("the plugin host panicked: {panic}"));
                thread.get_mut().clear();
                Vec::from([("*".to_owned(), error)])
            }
        }
    }

    /// Run every reporter on `snap`; what they report, checked, goes into `events` and
    /// `metrics`.
    pub fn report(
        &mut self,
        snap: &NodeSnapshot,
        events: &mut Vec<Event>,
        metrics: &mut Vec<PluginMetric>,
    ) {
        let Some(thread) = self.slots.as_mut().filter(|t| !t.get().is_empty()) else { return };
        let owned = snap.clone();
        let settings = self.settings.clone();
        let outcome = thread.call(move |slots| {
            let (mut events, mut metrics) = (Vec::new(), Vec::new());
            let wsnap = to_wit(&owned);
            for slot in slots.iter_mut() {
                slot.report(&owned, &wsnap, &settings, &mut events, &mut metrics);
            }
            (events, metrics)
        });
        match outcome {
            Ok((mut ev, mut m)) => {
                events.append(&mut ev);
                metrics.append(&mut m);
            }
            Err(panic) => {
                tracing::error!(%panic, "the plugin host panicked while running reporters; they start afresh next tick");
                events.push(Event::PluginFault {
                    plugin: "*".into(),
                    fault: "host-panic",
                    message: format!("the plugin host panicked: {panic}"),
                });
                for slot in thread.get_mut() {
                    slot.plugin.as_mut().map(ReporterPlugin::drop_instance);
                }
            }
        }
    }

    /// Each reporter as `gpulet status` and `/metrics` show it.
    pub fn plugins(&self) -> Vec<PluginStatus> {
        self.slots()
            .iter()
            .map(|s| PluginStatus {
                name: s.spec.name.clone(),
                version: s.plugin.as_ref().map(|p| p.info().version.clone()),
                running: !s.quarantined && s.plugin.is_some(),
                quarantined: s.quarantined,
                error: s.error.clone(),
                calls: s.calls,
                faults: s.fault_count,
                call_seconds: s.call_time.as_secs_f64(),
                kind: "reporter".into(),
                refused: s.refused,
                recycled: s.plugin.as_ref().map_or(0, |p| p.recycled()),
            })
            .collect()
    }
}

fn start(
    engine: &PluginEngine,
    spec: &PluginSpec,
    gpus: Vec<wit::GpuInfo>,
    state_dir: Option<&std::path::Path>,
) -> Result<(ReporterPlugin, super::engine::LoadedComponent), PluginError> {
    let loaded = engine.load(&spec.path)?;
    let kv = state_dir
        .and_then(|dir| {
            KvStore::open(dir, &spec.name, spec.state_bytes)
                .inspect_err(|e| tracing::warn!(plugin = %spec.name, error = %e, "plugin state kept in memory only"))
                .ok()
        })
        .unwrap_or_else(|| KvStore::in_memory(spec.state_bytes));
    let plugin = ReporterPlugin::start(
        engine,
        &spec.name,
        loaded.component.clone(),
        spec.config.clone(),
        gpus,
        spec.limits.clone(),
        Arc::new(Mutex::new(kv)),
    )?;
    Ok((plugin, loaded))
}

impl Slot {
    fn report(
        &mut self,
        snap: &NodeSnapshot,
        wsnap: &wit::Snapshot,
        settings: &ChainSettings,
        events: &mut Vec<Event>,
        metrics: &mut Vec<PluginMetric>,
    ) {
        let name = self.spec.name.clone();
        let Some(plugin) = self.plugin.as_mut().filter(|_| !self.quarantined) else { return };
        let started = std::time::Instant::now();
        let outcome = plugin.report(wsnap, &CallContext::of(snap));
        self.calls += 1;
        self.call_time += started.elapsed();
        let (items, side) = match outcome {
            Ok(done) => done,
            Err(fault) => {
                tracing::warn!(plugin = %name, fault = fault.kind(), error = %fault, "reporter fault; a fresh instance will serve the next tick");
                events.push(Event::PluginFault {
                    plugin: name.clone(),
                    fault: fault.kind(),
                    message: fault.to_string(),
                });
                self.fault_count += 1;
                let window = settings.failure_window_ms;
                if self.faults.record(snap.now_ms, window, settings.max_failures) {
                    self.quarantined = true;
                    tracing::error!(plugin = %name, "reporter quarantined: not called again until the plugins are reloaded");
                    events.push(Event::PluginQuarantined {
                        plugin: name,
                        failures: self.faults.len() as u32,
                        window_s: window / 1000,
                        fallback: "none",
                    });
                }
                return;
            }
        };
        self.refill(snap.now_ms);
        let gpus = snap.samples.len();
        // What `emit-metric` sent on the side was checked by the host already.
        metrics.extend(side.metrics);
        let mut kept = 0;
        for item in items {
            if kept == MAX_ITEMS {
                self.refuse(Refusal::TooManyItems, "(the rest of this tick's items)", events);
                break;
            }
            let refusal = match item {
                wit::ReportItem::Metric(m) => {
                    let refusal = if !valid(&m.name, 64, |b| b == b'_' || b == b'.') {
                        Some(Refusal::MetricName)
                    } else if !m.value.is_finite() {
                        Some(Refusal::NotFinite)
                    } else if m.gpu.is_some_and(|g| g as usize >= gpus) {
                        Some(Refusal::NoSuchGpu)
                    } else {
                        None
                    };
                    if refusal.is_none() {
                        metrics.push(PluginMetric {
                            plugin: name.clone(),
                            name: m.name,
                            value: m.value,
                            gpu: m.gpu,
                        });
                        kept += 1;
                        continue;
                    }
                    refusal.map(|r| (r, format!("metric {:?} = {}", cut(&m.name, 80), m.value)))
                }
                wit::ReportItem::Event(e) => {
                    let refusal = if !valid(&e.kind, 32, |b| b == b'-') {
                        Some(Refusal::EventKind)
                    } else if e.gpu.is_some_and(|g| g as usize >= gpus) {
                        Some(Refusal::NoSuchGpu)
                    } else if self.tokens < 1.0 {
                        Some(Refusal::EventRate)
                    } else {
                        None
                    };
                    if refusal.is_none() {
                        self.tokens -= 1.0;
                        let uuid = e.gpu.map(|g| snap.inventory[g as usize].uuid.clone());
                        events.push(Event::Plugin {
                            plugin: name.clone(),
                            report: e.kind,
                            message: cut(&e.message, MAX_MESSAGE),
                            gpu: e.gpu,
                            uuid,
                        });
                        kept += 1;
                        continue;
                    }
                    refusal.map(|r| (r, format!("event {:?}", cut(&e.kind, 80))))
                }
            };
            if let Some((refusal, example)) = refusal {
                self.refuse(refusal, &example, events);
            }
        }
    }

    /// Top the event tokens up for the time since the last tick.
    fn refill(&mut self, now_ms: u64) {
        if let Some(last) = self.refilled_ms {
            let gained = now_ms.saturating_sub(last) as f64 / EVENT_REFILL_MS as f64;
            self.tokens = (self.tokens + gained).min(EVENT_BURST);
        }
        self.refilled_ms = Some(now_ms);
    }

    /// Count a refused item; the first of each reason is reported.
    fn refuse(&mut self, refusal: Refusal, example: &str, events: &mut Vec<Event>) {
        self.refused += 1;
        if self.reported.insert(refusal) {
            let plugin = &self.spec.name;
            let accepted = refusal.accepted();
            tracing::warn!(%plugin, reason = refusal.name(), example, %accepted, "reporter output refused (reported once per reason; all are counted)");
            events.push(Event::PluginOutputRefused {
                plugin: plugin.clone(),
                reason: refusal.name(),
                example: example.to_owned(),
                accepted,
            });
        }
    }
}

/// `s` is 1 to `max` bytes of `[a-z0-9]` and what `extra` allows.
fn valid(s: &str, max: usize, extra: impl Fn(u8) -> bool) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || extra(b))
}

/// `s` cut to at most `max` bytes, on a character boundary.
fn cut(s: &str, max: usize) -> String {
    let end = (0..=max.min(s.len())).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0);
    s[..end].to_owned()
}
