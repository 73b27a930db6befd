//! What every plugin world shares: an instance in its [`Sandbox`], started (link,
//! instantiate, check the API version, validate the config, `init`) and called, made
//! afresh after a fault. A world's binding (`power.rs`, `scheduler.rs`) says how its
//! bindings are made and adds its one export and what its results may be.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wasmtime::Store;
use wasmtime::component::{Component, InstancePre};

use super::engine::PluginEngine;
use super::host::{CallContext, HostState};
use super::kv::KvStore;
use super::sandbox::{Fault, Limits, Sandbox, Side};
use super::{API_VERSION, PluginError, wit};

/// A WIT world's generated host bindings: what [`Instance`] needs of them. The calls of
/// the `base` world every plugin exports are the same in each; only the bindings' types
/// differ.
pub trait World: Sized + Send + 'static {
    /// The world's name, in errors: `power`, `job-scheduler`.
    const NAME: &'static str;
    /// The pre-linked component.
    type Pre: Send;
    fn pre(linked: InstancePre<HostState>) -> wasmtime::Result<Self::Pre>;
    fn instantiate(pre: &Self::Pre, store: &mut Store<HostState>) -> wasmtime::Result<Self>;
    fn info(&self, store: &mut Store<HostState>) -> wasmtime::Result<wit::PluginInfo>;
    fn validate_config(
        &self,
        store: &mut Store<HostState>,
        config: &str,
    ) -> wasmtime::Result<Result<(), Vec<wit::ConfigError>>>;
    fn init(
        &self,
        store: &mut Store<HostState>,
        config: &str,
        gpus: &[wit::GpuInfo],
    ) -> wasmtime::Result<Result<(), String>>;
}

/// `impl World` for a world's generated bindings `$world` (with `$pre`, its pre-linked
/// form): the `base` world's calls are the same in every world.
macro_rules! impl_world {
    ($world:ty, $pre:ident, $name:literal) => {
        impl $crate::plugin::world::World for $world {
            const NAME: &'static str = $name;
            type Pre = $pre<HostState>;
            fn pre(linked: InstancePre<HostState>) -> wasmtime::Result<Self::Pre> {
                $pre::new(linked)
            }
            fn instantiate(
                pre: &Self::Pre,
                store: &mut Store<HostState>,
            ) -> wasmtime::Result<Self> {
                pre.instantiate(store)
            }
            fn info(&self, store: &mut Store<HostState>) -> wasmtime::Result<wit::PluginInfo> {
                self.call_info(store)
            }
            fn validate_config(
                &self,
                store: &mut Store<HostState>,
                config: &str,
            ) -> wasmtime::Result<Result<(), Vec<wit::ConfigError>>> {
                self.call_validate_config(store, config)
            }
            fn init(
                &self,
                store: &mut Store<HostState>,
                config: &str,
                gpus: &[wit::GpuInfo],
            ) -> wasmtime::Result<Result<(), String>> {
                self.call_init(store, config, gpus)
            }
        }
    };
}
pub(crate) use impl_world;

/// One plugin of world `W`, in its sandbox.
pub struct Instance<W: World> {
    sandbox: Sandbox,
    info: wit::PluginInfo,
    config: String,
    gpus: Vec<wit::GpuInfo>,
    pre: W::Pre,
    live: Option<(Store<HostState>, W)>,
    /// Instances replaced for having outgrown `recycle_mib`.
    recycled: u64,
    /// Off when the plugin's memory after `init` is already past `recycle_mib`: it would
    /// start a fresh instance at every call.
    recycle: bool,
}

impl<W: World> std::fmt::Debug for Instance<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance")
            .field("world", &W::NAME)
            .field("name", &self.sandbox.name())
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

/// No snapshot: outside the world's decision call (`info`, `validate-config`, `init`).
fn no_snapshot() -> CallContext {
    CallContext::default()
}

impl<W: World> Instance<W> {
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
    ) -> Result<Instance<W>, PluginError> {
        let shown = name.to_owned();
        let stage = |stage: &'static str| {
            let plugin = shown.clone();
            move |error: String| PluginError::Start { plugin, stage, error }
        };
        let linked = engine
            .linker()
            .instantiate_pre(&component)
            .map_err(|e| stage("linking")(format!("{e:#}")))?;
        let pre = W::pre(linked).map_err(|e| PluginError::WrongWorld {
            path: shown.clone(),
            world: W::NAME,
            error: format!("{e:#}"),
        })?;
        let mut plugin: Instance<W> = Instance {
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
            recycled: 0,
            recycle: true,
        };
        let _calling = plugin.sandbox.calling();
        let (mut store, bindings) = plugin.instantiate().map_err(stage("instantiation"))?;
        let (info, _) = plugin
            .sandbox
            .call(&mut store, &no_snapshot(), |s| bindings.info(s))
            .map_err(|f| stage("info")(f.to_string()))?;
        if major_minor(&info.api_version) != major_minor(API_VERSION) {
            return Err(PluginError::ApiVersion { plugin: shown, found: info.api_version });
        }
        let config = plugin.config.clone();
        let (verdict, _) = plugin
            .sandbox
            .call(&mut store, &no_snapshot(), |s| bindings.validate_config(s, &config))
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
        if plugin.sandbox.outgrown(&store) {
            plugin.recycle = false;
            tracing::warn!(
                plugin = %shown,
                memory_mib = store.data().limits.largest >> 20,
                "recycle_mib is below the plugin's memory once started: recycling is off (raise recycle_mib above it)"
            );
        }
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

    fn instantiate(&self) -> Result<(Store<HostState>, W), String> {
        let mut store = self.sandbox.store();
        let bindings = W::instantiate(&self.pre, &mut store).map_err(|e| format!("{e:#}"))?;
        Ok((store, bindings))
    }

    fn init(&self, store: &mut Store<HostState>, bindings: &W) -> Result<(), String> {
        let (r, _) = self
            .sandbox
            .call(store, &no_snapshot(), |s| bindings.init(s, &self.config, &self.gpus))
            .map_err(|f| f.to_string())?;
        r
    }

    /// Call the world's export (`f`) on the live instance (a fresh one if a fault dropped
    /// the last), with `cx` for `gpu-curve` and `wall-clock`. A result that `too_many` finds too long
    /// (`Some((returned, max))`) is a fault too. On a fault the instance is dropped; the
    /// next call starts a fresh one.
    pub fn call<R>(
        &mut self,
        cx: &CallContext,
        f: impl FnOnce(&W, &mut Store<HostState>) -> wasmtime::Result<R>,
        too_many: impl FnOnce(&R) -> Option<(usize, usize)>,
    ) -> Result<(R, Side), Fault> {
        let _calling = self.sandbox.calling();
        if self.live.is_none() {
            let (mut store, bindings) = self.instantiate().map_err(Fault::Restart)?;
            self.init(&mut store, &bindings).map_err(Fault::Restart)?;
            self.live = Some((store, bindings));
        }
        let (store, bindings) = self.live.as_mut().expect("just made");
        let fault = match self.sandbox.call(store, cx, |s| f(bindings, s)) {
            Ok((r, _)) if let Some((returned, max)) = too_many(&r) => {
                Fault::Output { returned, max }
            }
            Ok(done) => {
                // Dropped now, between calls and not as a fault: its memory goes back to
                // the system at once, and the next call starts a fresh instance.
                if self.recycle && self.sandbox.outgrown(store) {
                    self.live = None;
                    self.recycled += 1;
                    tracing::debug!(plugin = %self.name(), recycled = self.recycled, "past recycle_mib: a fresh instance for the next call");
                }
                return Ok(done);
            }
            Err(f) => f,
        };
        self.live = None;
        Err(fault)
    }

    /// Instances replaced for having outgrown `recycle_mib`, since it was started.
    pub fn recycled(&self) -> u64 {
        self.recycled
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
