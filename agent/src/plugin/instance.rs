//! One power plugin: its component, its `Store` (one per instance, so plugins share
//! nothing), its config, and calling it under a deadline and a memory cap.
//!
//! A trap poisons a store, and a plugin that timed out or ran out of memory may have left
//! its memory in any state: after any fault the store is dropped, and the next call
//! re-instantiates from the pre-linked component and runs `init` again. What a plugin
//! must keep across that lives in its host key-value store.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wasmtime::component::Component;
use wasmtime::{Store, Trap};

use super::bindings::{Power, PowerPre};
use super::engine::{EPOCH_PERIOD, PluginEngine, Ticker};
use super::host::{Curves, HostState, PluginMetric};
use super::kv::KvStore;
use super::{API_VERSION, PluginError, wit};

/// Why a call produced no decisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// It ran past its deadline and was stopped.
    Timeout,
    /// It tried to grow its memory past the cap.
    Memory,
    /// It trapped (a panic, an invalid operation).
    Trap(String),
    /// Re-instantiating or `init` after a fault failed.
    Restart(String),
    /// The host work it asked for (key-value writes, logs) or the lifting of what it
    /// returned took longer than its deadline: host calls cannot be interrupted, so they
    /// are timed and charged to the plugin after the call.
    HostTime(Duration),
    /// It returned more actions than [`MAX_ACTIONS`].
    Output(usize),
}

/// Most actions one `decide-power` call may return (a node has at most a few dozen
/// GPUs; more is a plugin out of control, and each action may become an audit event).
pub const MAX_ACTIONS: usize = 1024;

/// Wall time a call may take beyond its deadline before it is charged as a fault even
/// though the guest's own time stayed within it (scheduling noise on a loaded machine
/// must not fault a healthy plugin).
const WALL_SLACK: Duration = Duration::from_millis(250);

impl Fault {
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Timeout => "timeout",
            Fault::Memory => "memory",
            Fault::Trap(_) => "trap",
            Fault::Restart(_) => "restart",
            Fault::HostTime(_) => "timeout",
            Fault::Output(_) => "output",
        }
    }
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Timeout => write!(f, "ran past its deadline and was stopped"),
            Fault::Memory => write!(f, "tried to grow its memory past its cap and was stopped"),
            Fault::Trap(m) => write!(f, "trapped: {m}"),
            Fault::Restart(m) => write!(f, "could not be restarted: {m}"),
            Fault::HostTime(d) => write!(
                f,
                "took {} ms with the host work it asked for (key-value writes, logs, its output), past its deadline",
                d.as_millis()
            ),
            Fault::Output(n) => {
                write!(f, "returned {n} actions; at most {MAX_ACTIONS} are accepted")
            }
        }
    }
}

/// How a plugin is run: from its `[[plugin]]` config.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub deadline: Duration,
    pub memory_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { deadline: Duration::from_millis(20), memory_bytes: 64 << 20 }
    }
}

/// What one call returned, with what the plugin emitted on the side.
#[derive(Debug, Default)]
pub struct CallOutput {
    pub actions: Vec<wit::PowerAction>,
    pub metrics: Vec<PluginMetric>,
    /// Log lines and metrics dropped by the host's per-call limits.
    pub dropped: u32,
}

pub struct PowerPlugin {
    name: String,
    info: wit::PluginInfo,
    config: String,
    gpus: Vec<wit::GpuInfo>,
    limits: Limits,
    pre: PowerPre<HostState>,
    engine: wasmtime::Engine,
    /// Epochs advance only while a guard from this is alive: hold one around every call.
    ticker: Arc<Ticker>,
    kv: Arc<Mutex<KvStore>>,
    live: Option<(Store<HostState>, Power)>,
}

impl std::fmt::Debug for PowerPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PowerPlugin")
            .field("name", &self.name)
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl PowerPlugin {
    /// Link, instantiate, check the API version, validate the config and `init`. Any
    /// failure is an error naming the plugin and the stage; nothing is left running.
    pub fn start(
        engine: &PluginEngine,
        name: &str,
        component: Component,
        config: String,
        gpus: Vec<wit::GpuInfo>,
        limits: Limits,
        kv: Arc<Mutex<KvStore>>,
    ) -> Result<PowerPlugin, PluginError> {
        let shown = name.to_owned();
        let instance_pre = engine.linker().instantiate_pre(&component).map_err(|e| {
            PluginError::Start { plugin: shown.clone(), stage: "linking", error: format!("{e:#}") }
        })?;
        let pre = PowerPre::new(instance_pre).map_err(|e| PluginError::WrongWorld {
            path: shown.clone(),
            error: format!("{e:#}"),
        })?;
        let mut plugin = PowerPlugin {
            name: name.to_owned(),
            info: wit::PluginInfo {
                name: String::new(),
                version: String::new(),
                api_version: String::new(),
            },
            config,
            gpus,
            limits,
            pre,
            engine: engine.engine().clone(),
            ticker: engine.ticker(),
            kv,
            live: None,
        };
        let ticker = plugin.ticker.clone();
        let _calling = ticker.call();
        let (mut store, bindings) = plugin.instantiate().map_err(|e| PluginError::Start {
            plugin: shown.clone(),
            stage: "instantiation",
            error: e,
        })?;
        store.set_epoch_deadline(plugin.deadline_ticks());
        let info = bindings.call_info(&mut store).map_err(|e| PluginError::Start {
            plugin: shown.clone(),
            stage: "info",
            error: format!("{e:#}"),
        })?;
        if major_minor(&info.api_version) != major_minor(API_VERSION) {
            return Err(PluginError::ApiVersion { plugin: shown, found: info.api_version });
        }
        store.set_epoch_deadline(plugin.deadline_ticks());
        let verdict = bindings.call_validate_config(&mut store, &plugin.config).map_err(|e| {
            PluginError::Start {
                plugin: shown.clone(),
                stage: "validate-config",
                error: format!("{e:#}"),
            }
        })?;
        if let Err(errors) = verdict {
            let errors = errors
                .iter()
                .map(|e| format!("{}: {}", e.path, e.message))
                .collect::<Vec<_>>()
                .join("; ");
            return Err(PluginError::Config { plugin: shown, errors });
        }
        plugin.init(&mut store, &bindings).map_err(|e| PluginError::Start {
            plugin: shown,
            stage: "init",
            error: e,
        })?;
        plugin.info = info;
        plugin.live = Some((store, bindings));
        Ok(plugin)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn info(&self) -> &wit::PluginInfo {
        &self.info
    }

    fn deadline_ticks(&self) -> u64 {
        (self.limits.deadline.as_micros() / EPOCH_PERIOD.as_micros()).max(1) as u64
    }

    fn instantiate(&self) -> Result<(Store<HostState>, Power), String> {
        let state = HostState::new(&self.name, self.limits.memory_bytes, self.kv.clone());
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        store.set_epoch_deadline(self.deadline_ticks());
        let bindings = self.pre.instantiate(&mut store).map_err(|e| format!("{e:#}"))?;
        Ok((store, bindings))
    }

    fn init(&self, store: &mut Store<HostState>, bindings: &Power) -> Result<(), String> {
        store.set_epoch_deadline(self.deadline_ticks());
        let r = bindings.call_init(&mut *store, &self.config, &self.gpus);
        store.data_mut().save_kv();
        r.map_err(|e| format!("{e:#}"))?
    }

    /// Call `decide-power` on `snapshot`, whose GPUs' curves are `curves` (what
    /// `gpu-curve` answers). On a fault the instance is dropped; the next call starts a
    /// fresh one.
    pub fn decide(
        &mut self,
        snapshot: &wit::Snapshot,
        curves: &Curves,
    ) -> Result<CallOutput, Fault> {
        let ticker = self.ticker.clone();
        let _calling = ticker.call();
        if self.live.is_none() {
            let (mut store, bindings) = self.instantiate().map_err(Fault::Restart)?;
            self.init(&mut store, &bindings).map_err(Fault::Restart)?;
            self.live = Some((store, bindings));
        }
        let ticks = self.deadline_ticks();
        let (store, bindings) = self.live.as_mut().expect("just made");
        store.data_mut().begin_call(curves.clone());
        store.set_epoch_deadline(ticks);
        let started = Instant::now();
        let result = bindings.call_decide_power(&mut *store, snapshot);
        let wall = started.elapsed();
        let state = store.data_mut();
        let host_time = state.host_time;
        // What the plugin changed in its key-value store, saved once per call (not charged
        // to the plugin: the disk's fsync is not its doing, and the store's size is capped).
        state.save_kv();
        let output = CallOutput {
            actions: Vec::new(),
            metrics: std::mem::take(&mut state.metrics),
            dropped: state.dropped,
        };
        let deadline = self.limits.deadline;
        match result {
            Ok(_) if host_time > deadline || wall > deadline + WALL_SLACK => {
                self.live = None;
                Err(Fault::HostTime(wall))
            }
            Ok(actions) if actions.len() > MAX_ACTIONS => {
                self.live = None;
                Err(Fault::Output(actions.len()))
            }
            Ok(actions) => Ok(CallOutput { actions, ..output }),
            Err(e) => {
                let fault = if state.limits.denied {
                    Fault::Memory
                } else if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
                    Fault::Timeout
                } else {
                    // The innermost cause says what happened (a guest panic's
                    // `unreachable`, a refused call); the outer ones only where.
                    Fault::Trap(
                        e.root_cause().to_string().lines().next().unwrap_or("trap").to_owned(),
                    )
                };
                self.live = None;
                Err(fault)
            }
        }
    }

    /// Drop the live instance: the next call starts a fresh one.
    pub fn drop_instance(&mut self) {
        self.live = None;
    }

    /// Time one call takes at most before it is stopped.
    pub fn deadline(&self) -> Duration {
        self.limits.deadline
    }

    /// For benchmarks: how long one instantiation and `init` take.
    pub fn time_restart(&mut self) -> Result<Duration, String> {
        let ticker = self.ticker.clone();
        let _calling = ticker.call();
        let t = Instant::now();
        let (mut store, bindings) = self.instantiate()?;
        self.init(&mut store, &bindings)?;
        self.live = Some((store, bindings));
        Ok(t.elapsed())
    }
}

fn major_minor(v: &str) -> (&str, &str) {
    let mut it = v.split('.');
    (it.next().unwrap_or(""), it.next().unwrap_or(""))
}
