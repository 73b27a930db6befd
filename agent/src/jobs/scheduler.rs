//! Who decides what starts: a `job-scheduler` plugin on a thread of its own (never on
//! the async runtime, as every plugin call), or the built-in FIFO bin-packer
//! (`gpulet_policy_algos::sched::fifo_binpack`, the algorithm of the shipped
//! `fifo-binpack` plugin, run natively) when none is configured. A plugin that faults
//! gives no decisions that time and the built-in one decides instead; after
//! `plugins.max_failures` faults within `plugins.failure_window` it is quarantined (not
//! called again until the agent restarts) and the built-in one takes over.

use std::sync::{Arc, Mutex};

use gpulet_policy_algos::sched::{Decision, Input, fifo_binpack};

use crate::plugin::chain::PluginSpec;
use crate::plugin::engine::PluginEngine;
use crate::plugin::kv::KvStore;
use crate::plugin::sandbox::FaultWindow;
use crate::plugin::scheduler::{Labels, SchedulerPlugin};
use crate::plugin::thread::PluginThread;
use crate::plugin::{PluginError, wit};
use crate::snapshot::NodeSnapshot;
use crate::telemetry::Event;

/// The built-in scheduler's name, in events and `gpulet status`.
pub const BUILTIN: &str = "builtin-fifo-binpack";

pub struct Scheduler {
    name: String,
    /// The plugin, on its thread; `None` inside: the built-in scheduler.
    plugin: PluginThread<Option<SchedulerPlugin>>,
    faults: FaultWindow,
    max_failures: u32,
    window_ms: u64,
    quarantined: bool,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler").field("name", &self.name).finish_non_exhaustive()
    }
}

impl Scheduler {
    pub fn builtin() -> Scheduler {
        Scheduler {
            name: BUILTIN.into(),
            plugin: PluginThread::new(None),
            faults: FaultWindow::default(),
            max_failures: 0,
            window_ms: 0,
            quarantined: false,
        }
    }

    /// Start the plugin `spec` (on its thread) for a node of `gpus`.
    pub fn plugin(
        engine: Arc<PluginEngine>,
        spec: &PluginSpec,
        gpus: Vec<wit::GpuInfo>,
        kv: KvStore,
        max_failures: u32,
        window_ms: u64,
    ) -> Result<Scheduler, PluginError> {
        // Starting calls into the plugin (info, validate-config, init): on its thread too.
        let mut thread = PluginThread::new(None::<SchedulerPlugin>);
        let spec2 = spec.clone();
        let started = thread
            .call(move |slot: &mut Option<SchedulerPlugin>| {
                let loaded = engine.load(&spec2.path)?;
                let plugin = SchedulerPlugin::start(
                    &engine,
                    &spec2.name,
                    loaded.component,
                    spec2.config.clone(),
                    gpus,
                    spec2.limits.clone(),
                    Arc::new(Mutex::new(kv)),
                )?;
                *slot = Some(plugin);
                Ok(())
            })
            .map_err(|panic| PluginError::Engine(format!("the plugin host panicked: {panic}")))?;
        started?;
        let version = thread.get().as_ref().map(|p| p.info().version.clone()).unwrap_or_default();
        tracing::info!(plugin = %spec.name, %version, "scheduler plugin loaded");
        Ok(Scheduler {
            name: spec.name.clone(),
            plugin: thread,
            faults: FaultWindow::default(),
            max_failures,
            window_ms,
            quarantined: false,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether a plugin decides (not quarantined, not the built-in one).
    pub fn plugin_running(&self) -> bool {
        self.plugin.get().is_some() && !self.quarantined
    }

    /// The decisions for `input`, and what happened on the way (faults, quarantine).
    pub fn decide(
        &mut self,
        snap: &NodeSnapshot,
        input: &Input,
        labels: &Labels,
    ) -> (Vec<Decision>, Vec<Event>) {
        let mut events = Vec::new();
        if !self.plugin_running() {
            return (fifo_binpack::decide(input), events);
        }
        let (snap2, input2, labels2) = (snap.clone(), input.clone(), labels.clone());
        let outcome = self
            .plugin
            .call(move |p| p.as_mut().expect("running").schedule(&snap2, &input2, &labels2));
        let fault = match outcome {
            Ok(Ok((decisions, _))) => return (decisions, events),
            Ok(Err(fault)) => (fault.kind(), fault.to_string()),
            Err(panic) => ("host-panic", format!("the plugin host panicked: {panic}")),
        };
        self.fault(snap.now_ms, fault.0, fault.1, &mut events);
        (fifo_binpack::decide(input), events)
    }

    /// The host refused `n` of the plugin's placements (`jobs/place.rs`): a fault, counted
    /// toward quarantine like a trap, so that a plugin that breaks the rules every tick
    /// does not fill the outbox with refusals for ever.
    pub fn refused(&mut self, now_ms: u64, n: usize) -> Vec<Event> {
        let mut events = Vec::new();
        if self.plugin_running() {
            let message =
                format!("{n} of its placements broke the host's rules (placement-rejected events)");
            self.fault(now_ms, "output", message, &mut events);
        }
        events
    }

    /// Count a fault; quarantine after `max_failures` within the window.
    fn fault(&mut self, now: u64, kind: &'static str, message: String, events: &mut Vec<Event>) {
        tracing::warn!(plugin = %self.name, fault = kind, %message, "scheduler plugin fault; the built-in scheduler decides this time");
        events.push(Event::PluginFault { plugin: self.name.clone(), fault: kind, message });
        if self.faults.record(now, self.window_ms, self.max_failures) {
            self.quarantined = true;
            tracing::error!(plugin = %self.name, "scheduler plugin quarantined; the built-in scheduler takes over until the agent restarts");
            events.push(Event::PluginQuarantined {
                plugin: self.name.clone(),
                failures: self.faults.len() as u32,
                window_s: self.window_ms / 1000,
                fallback: BUILTIN,
            });
        }
    }
}
