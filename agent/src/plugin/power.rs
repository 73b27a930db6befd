//! The `power` world's binding: a power plugin in its [`Sandbox`], started (link,
//! instantiate, check the API version, validate the config, `init`) and called
//! (`decide-power`, at most [`MAX_ACTIONS`] actions).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wasmtime::Store;
use wasmtime::component::Component;

use super::bindings::{Power, PowerPre};
use super::engine::PluginEngine;
use super::host::{Curves, HostState, PluginMetric};
use super::kv::KvStore;
use super::sandbox::Sandbox;
pub use super::sandbox::{Fault, Limits};
use super::{API_VERSION, PluginError, wit};

/// Most actions one `decide-power` call may return (a node has at most a few dozen
/// GPUs; more is a plugin out of control, and each action may become an audit event).
pub const MAX_ACTIONS: usize = 1024;

/// What one call returned, with what the plugin emitted on the side.
#[derive(Debug, Default)]
pub struct CallOutput {
    pub actions: Vec<wit::PowerAction>,
    pub metrics: Vec<PluginMetric>,
    /// Log lines and metrics dropped by the host's per-call limits.
    pub dropped: u32,
}

pub struct PowerPlugin {
    sandbox: Sandbox,
    info: wit::PluginInfo,
    config: String,
    gpus: Vec<wit::GpuInfo>,
    pre: PowerPre<HostState>,
    live: Option<(Store<HostState>, Power)>,
}

impl std::fmt::Debug for PowerPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PowerPlugin")
            .field("name", &self.sandbox.name())
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

/// No curves: outside `decide-power` (`info`, `validate-config`, `init`).
fn no_curves() -> Curves {
    Arc::new([])
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
        let stage = |stage: &'static str| {
            let plugin = shown.clone();
            move |error: String| PluginError::Start { plugin, stage, error }
        };
        let instance_pre = engine
            .linker()
            .instantiate_pre(&component)
            .map_err(|e| stage("linking")(format!("{e:#}")))?;
        let pre = PowerPre::new(instance_pre).map_err(|e| PluginError::WrongWorld {
            path: shown.clone(),
            error: format!("{e:#}"),
        })?;
        let mut plugin = PowerPlugin {
            sandbox: Sandbox::new(engine, name, limits, kv),
            info: wit::PluginInfo {
                name: String::new(),
                version: String::new(),
                api_version: String::new(),
            },
            config,
            gpus,
            pre,
            live: None,
        };
        let _calling = plugin.sandbox.calling();
        let (mut store, bindings) = plugin.instantiate().map_err(stage("instantiation"))?;
        let (info, _) = plugin
            .sandbox
            .call(&mut store, &no_curves(), |s| bindings.call_info(s))
            .map_err(|f| stage("info")(f.to_string()))?;
        if major_minor(&info.api_version) != major_minor(API_VERSION) {
            return Err(PluginError::ApiVersion { plugin: shown, found: info.api_version });
        }
        let config = plugin.config.clone();
        let (verdict, _) = plugin
            .sandbox
            .call(&mut store, &no_curves(), |s| bindings.call_validate_config(s, &config))
            .map_err(|f| stage("validate-config")(f.to_string()))?;
        if let Err(errors) = verdict {
            let errors = errors
                .iter()
                .map(|e| format!("{}: {}", e.path, e.message))
                .collect::<Vec<_>>()
                .join("; ");
            return Err(PluginError::Config { plugin: shown, errors });
        }
        plugin.init(&mut store, &bindings).map_err(stage("init"))?;
        drop(_calling);
        plugin.info = info;
        plugin.live = Some((store, bindings));
        Ok(plugin)
    }

    pub fn name(&self) -> &str {
        self.sandbox.name()
    }

    pub fn info(&self) -> &wit::PluginInfo {
        &self.info
    }

    fn instantiate(&self) -> Result<(Store<HostState>, Power), String> {
        let mut store = self.sandbox.store();
        let bindings = self.pre.instantiate(&mut store).map_err(|e| format!("{e:#}"))?;
        Ok((store, bindings))
    }

    fn init(&self, store: &mut Store<HostState>, bindings: &Power) -> Result<(), String> {
        let (r, _) = self
            .sandbox
            .call(store, &no_curves(), |s| bindings.call_init(s, &self.config, &self.gpus))
            .map_err(|f| f.to_string())?;
        r
    }

    /// Call `decide-power` on `snapshot`, whose GPUs' curves are `curves` (what
    /// `gpu-curve` answers). On a fault the instance is dropped; the next call starts a
    /// fresh one.
    pub fn decide(
        &mut self,
        snapshot: &wit::Snapshot,
        curves: &Curves,
    ) -> Result<CallOutput, Fault> {
        let _calling = self.sandbox.calling();
        if self.live.is_none() {
            let (mut store, bindings) = self.instantiate().map_err(Fault::Restart)?;
            self.init(&mut store, &bindings).map_err(Fault::Restart)?;
            self.live = Some((store, bindings));
        }
        let (store, bindings) = self.live.as_mut().expect("just made");
        let outcome = self.sandbox.call(store, curves, |s| bindings.call_decide_power(s, snapshot));
        let fault = match outcome {
            Ok((actions, _)) if actions.len() > MAX_ACTIONS => {
                Fault::Output { returned: actions.len(), max: MAX_ACTIONS }
            }
            Ok((actions, side)) => {
                return Ok(CallOutput { actions, metrics: side.metrics, dropped: side.dropped });
            }
            Err(f) => f,
        };
        self.live = None;
        Err(fault)
    }

    /// Drop the live instance: the next call starts a fresh one.
    pub fn drop_instance(&mut self) {
        self.live = None;
    }

    /// Time one call takes at most before it is stopped.
    pub fn deadline(&self) -> Duration {
        self.sandbox.limits().deadline
    }

    /// For benchmarks: how long one instantiation and `init` take.
    pub fn time_restart(&mut self) -> Result<Duration, String> {
        let _calling = self.sandbox.calling();
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
