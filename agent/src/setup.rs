//! Assembling an agent from a validated configuration: the backend, the policy, the
//! guard and the sinks. The checks that need the hardware (GPU indices, bounds against
//! the GPUs' own ranges, trace files) happen here and fail with config errors.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::agent::{Agent, Control, Desired, Parts, PluginSpecs, Reload};
use crate::calibration::Calibration;
use crate::clock::{Clock, SystemClock, VirtualClock};
use crate::config::{
    BUILTIN_TRACE, BackendKind, Config, ConfigError, ConfigErrors, FaultKind, SimConfig, SinkKind,
};
use crate::error::Error;
use crate::gpu::sim::model::Preset;
use crate::gpu::sim::trace::Trace;
use crate::gpu::sim::workload::{TraceReplay, WorkloadKind};
use crate::gpu::sim::{self, Fault, GpuSpec, ScheduledFault, SimBackend, SimHandle, SimNode};
use crate::gpu::{Field, GpuBackend};
use crate::guard::PowerGuard;
use crate::jobs::{Jobs, Scheduler};
use crate::mqtt::{Mqtt, Settings};
use crate::plugin::chain::{ChainSettings, PluginSpec, PolicyChain};
use crate::plugin::engine::PluginEngine;
use crate::plugin::reporters::Reporters;
use crate::plugin::sandbox::Limits;
use crate::policy::StaticPolicy;
use crate::service::{Handle, Service};
use crate::telemetry::{JsonLines, Sink};

/// A backend opened from config, with the simulator's handle when it is simulated.
pub struct Backend {
    pub backend: Box<dyn GpuBackend>,
    pub sim: Option<SimHandle>,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend").field("kind", &self.backend.kind()).finish_non_exhaustive()
    }
}

/// Open the configured backend. `base_dir` resolves relative trace paths.
pub fn open_backend(
    config: &Config,
    base_dir: &Path,
    clock: Arc<dyn Clock>,
) -> Result<Backend, Error> {
    match config.backend {
        BackendKind::Sim => {
            let node = sim_node(&config.sim, base_dir)?;
            let backend = SimBackend::new(node, clock);
            let sim = Some(backend.handle());
            Ok(Backend { backend: Box::new(backend), sim })
        }
        BackendKind::Nvml => {
            let library = match (&config.nvml.library, std::env::var_os("GPULET_NVML_LIBRARY")) {
                (Some(path), _) => base_dir.join(path).into_os_string(),
                (None, Some(env)) => env,
                (None, None) => crate::gpu::nvml::DEFAULT_LIBRARY.into(),
            };
            let backend = crate::gpu::nvml::NvmlBackend::open(&library)?;
            Ok(Backend { backend: Box::new(backend), sim: None })
        }
    }
}

/// The simulated node `[sim]` describes; 8 × H100 training when it lists no GPUs.
pub fn sim_node(cfg: &SimConfig, base_dir: &Path) -> Result<SimNode, ConfigErrors> {
    let mut specs = Vec::new();
    let mut traces: HashMap<&str, Arc<Trace>> = HashMap::new();
    let mut errors = Vec::new();
    if cfg.gpus.is_empty() {
        let h100 = Preset::by_key("h100-sxm").expect("built-in preset");
        specs = vec![GpuSpec::new(h100, WorkloadKind::Training); 8];
    }
    for (i, g) in cfg.gpus.iter().enumerate() {
        let preset = Preset::by_key(&g.preset).expect("validated");
        let trace = match g.trace.as_deref() {
            None => None,
            Some(name) => {
                if !traces.contains_key(name) {
                    let loaded = if name == BUILTIN_TRACE {
                        Trace::parse(sim::H100_TRAINING_TRACE)
                    } else {
                        Trace::load(&base_dir.join(name))
                    };
                    match loaded {
                        Ok(t) => {
                            traces.insert(name, Arc::new(t));
                        }
                        Err(e) => {
                            errors.push(ConfigError::invalid(
                                format!("sim.gpu[{i}].trace"),
                                e.to_string(),
                            ));
                            continue;
                        }
                    }
                }
                Some(traces[name].clone())
            }
        };
        for _ in 0..g.count {
            let index = specs.len();
            specs.push(match &trace {
                Some(t) => GpuSpec::trace(
                    preset,
                    TraceReplay {
                        trace: t.clone(),
                        gpu: g.trace_gpu.unwrap_or(index),
                        start_s: g.trace_start.as_secs_f64(),
                    },
                ),
                None => GpuSpec::new(preset, g.workload),
            });
        }
    }
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    let mut node = SimNode::new(&specs, cfg.seed);
    node.schedule(cfg.faults.iter().map(|f| ScheduledFault {
        at: f.at,
        gpu: f.gpu,
        fault: match f.kind {
            FaultKind::Lost => Fault::FallOffBus,
            FaultKind::Field => {
                Fault::FailField(f.field.as_deref().and_then(Field::from_name).expect("validated"))
            }
            FaultKind::Xid => Fault::Xid(f.xid.expect("validated")),
            FaultKind::Cooling => Fault::Cooling,
            FaultKind::Clear => Fault::Clear,
        },
    }));
    Ok(node)
}

/// The sinks `[telemetry]` describes.
pub fn sinks(config: &Config) -> Result<Vec<Box<dyn Sink>>, Error> {
    Ok(match config.telemetry.sink {
        SinkKind::Stdout => vec![Box::new(JsonLines::new(std::io::stdout()))],
        SinkKind::File => {
            let path = config.telemetry.path.as_deref().expect("validated");
            vec![Box::new(JsonLines::append(path)?)]
        }
        SinkKind::None => Vec::new(),
    })
}

/// A node assembled and started: the agent, its MQTT link, and the simulator's handle
/// when it runs on one.
pub struct Node {
    pub agent: Agent,
    pub mqtt: Option<Mqtt>,
    pub sim: Option<SimHandle>,
    /// The control socket and the metrics endpoint, as far as they are served.
    pub service: Service,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("agent", &self.agent).finish_non_exhaustive()
    }
}

/// The one way to assemble a node, as `gpulet run` runs it; the demo, fleet-sim, the
/// tests and the benchmarks use it too, so that what they test is what runs. In order:
/// the backend, the sinks (`sinks`, or the config's `[telemetry]` when `None`), the MQTT
/// link when `[mqtt]` is configured (which must then run inside the tokio runtime that
/// will run the agent), the agent with its plugins, reloading from `config_file` on
/// SIGHUP, the desired state commands had set, and on NVML the start limits kept to be
/// put back.
pub fn node(
    config: &Config,
    base_dir: &Path,
    clock: Arc<dyn Clock>,
    sinks: Option<Vec<Box<dyn Sink>>>,
    config_file: Option<PathBuf>,
) -> Result<Node, Error> {
    let backend = open_backend(config, base_dir, clock.clone())?;
    let sim = backend.sim.clone();
    let mut sinks = match sinks {
        Some(s) => s,
        None => self::sinks(config)?,
    };
    // Every transport (the MQTT link, the control socket) reaches the loop through one
    // channel; the loop tells `changed` when its desired state or birth changed.
    let (control, requests) = tokio::sync::mpsc::channel(64);
    let changed = Arc::new(tokio::sync::Notify::new());
    let linked = mqtt(config, base_dir, &mut sinks, control.clone(), changed.clone())?;
    let mut agent = agent(config, base_dir, backend, sinks, clock)?;
    agent.set_control(requests, changed);
    if let Some(path) = config_file {
        agent.set_reload(reloader(path));
    }
    if config.jobs.enabled {
        match jobs(config, base_dir, agent.inventory(), sim.is_some()) {
            Ok(j) => agent.set_jobs(j),
            Err(e) => {
                tracing::error!(error = %e, "the job queue is not run (jobs cannot be submitted); the agent goes on")
            }
        }
    }
    let mqtt = linked.map(|l| l.attach(&mut agent));
    if config.backend == BackendKind::Nvml && config.nvml.restore_limits {
        agent.keep_start_limits(base_dir.join(&config.nvml.state_dir).join("start-limits.json"));
    }
    let handle = Handle { control, mqtt: mqtt.as_ref().map(Mqtt::stats_source) };
    let service = if !(config.socket.enabled || config.metrics.enabled) {
        Service::default()
    } else if tokio::runtime::Handle::try_current().is_err() {
        // Only a caller that drives ticks by hand builds a node outside a runtime.
        tracing::error!("the control socket and metrics endpoint need a tokio runtime; not served");
        Service::default()
    } else {
        Service::start(&config.socket, &config.metrics, handle)
    };
    Ok(Node { agent, mqtt, sim, service })
}

impl Node {
    /// Tick until `ticks` or `shutdown` (see [`Agent::run`]).
    pub async fn run(
        &mut self,
        ticks: Option<u64>,
        pacing: crate::agent::Pacing,
        shutdown: impl Future<Output = ()>,
    ) -> u64 {
        self.agent.run(ticks, pacing, shutdown).await
    }

    /// Stop in order: the socket and endpoint (no more local requests), the agent (no
    /// more commands; the start limits put back), then the link (the outbox drained for
    /// up to 2 s, `offline` published).
    pub async fn stop(mut self) -> Option<crate::mqtt::MqttStats> {
        std::mem::take(&mut self.service).stop();
        self.agent.stop();
        match self.mqtt.take() {
            Some(m) => Some(m.stop().await),
            None => None,
        }
    }
}

/// A whole agent from a validated config, its backend and its sinks. Relative paths in
/// the config are relative to `base_dir`. Plugins that fail to load do not stop the
/// agent: they are reported (log and event) and their fallback stands in.
pub fn agent(
    config: &Config,
    base_dir: &Path,
    backend: Backend,
    sinks: Vec<Box<dyn Sink>>,
    clock: Arc<dyn Clock>,
) -> Result<Agent, Error> {
    let inventory = backend.backend.inventory().to_vec();
    let guard = PowerGuard::new(&inventory, &config.power)?;
    let mut policy = policy_chain(config, base_dir, inventory.len())?;
    let mut events = Vec::new();
    let specs = plugin_specs(config, base_dir);
    let failed = policy.load(&specs.power, &inventory, &mut events);
    if !failed.is_empty() {
        let names: Vec<&str> = failed.iter().map(|(n, _)| n.as_str()).collect();
        tracing::error!(
            failed = ?names,
            fallback = ?config.plugins.fallback,
            "{} of {} plugins did not load; their fallback stands in for them (see the errors above)",
            failed.len(),
            specs.power.len()
        );
    }
    let mut reporters = Reporters::new(policy.settings(), policy.engine());
    reporters.load(&specs.reporters, &inventory, &mut events);
    let mut agent = Agent::new(Parts {
        node: config.node_id(),
        tick: config.tick,
        backend: backend.backend,
        policy,
        reporters,
        guard,
        sinks,
        clock,
        reload: None,
        xid_debounce: config.health.xid_debounce,
        calibration: calibration(config, base_dir),
    });
    agent.report(events);
    Ok(agent)
}

/// An agent for `config`, quiet (no sinks, socket, metrics, MQTT or jobs), on a virtual
/// clock for the simulator (returned, with the simulator, so that the caller paces it):
/// what `gpulet record`, a closed-loop replay and the demo's comparison run.
pub fn quiet_agent(
    config: &Config,
    base_dir: &Path,
) -> Result<(Agent, Option<VirtualClock>, Option<SimHandle>), Error> {
    let mut config = config.clone();
    config.mqtt = None;
    config.socket.enabled = false;
    config.metrics.enabled = false;
    config.jobs.enabled = false;
    let (clock, virtual_clock): (Arc<dyn Clock>, _) = match config.backend {
        BackendKind::Sim => {
            let c = VirtualClock::new(SystemClock::new().wall_ms());
            (Arc::new(c.clone()), Some(c))
        }
        BackendKind::Nvml => (SystemClock::new(), None),
    };
    let backend = open_backend(&config, base_dir, clock.clone())?;
    let sim = backend.sim.clone();
    let agent = agent(&config, base_dir, backend, Vec::new(), clock)?;
    Ok((agent, virtual_clock, sim))
}

/// The calibration file, if there is a usable one. A missing file is normal (never
/// calibrated); a bad one is reported and the agent runs without curves.
fn calibration(config: &Config, base_dir: &Path) -> Option<Calibration> {
    let path = base_dir.join(&config.calibration.file);
    if !path.exists() {
        tracing::info!(path = %path.display(), "no calibration (run `gpulet calibrate`): power plugins get no work-per-watt curves");
        return None;
    }
    match Calibration::load(&path) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(error = %e, "calibration ignored: power plugins get no work-per-watt curves");
            None
        }
    }
}

/// The decision stage for `config`, with no plugins started yet. The plugin engine is
/// made only when plugins are configured (a reload that adds some makes it then).
pub fn policy_chain(config: &Config, base_dir: &Path, gpus: usize) -> Result<PolicyChain, Error> {
    // An engine that cannot be made costs the plugins (each fails to load, loudly, and
    // its fallback stands in), never the start.
    let engine = if config.plugin.is_empty() && config.reporter.is_empty() {
        None
    } else {
        PluginEngine::new(Some(&base_dir.join(&config.plugins.cache_dir)))
            .inspect_err(|e| tracing::error!(error = %e, "cannot set up the plugin engine"))
            .ok()
            .map(Arc::new)
    };
    let settings = ChainSettings {
        max_failures: config.plugins.max_failures,
        failure_window_ms: config.plugins.failure_window.as_millis() as u64,
        fallback: config.plugins.fallback,
        state_dir: Some(base_dir.join(&config.plugins.state_dir)),
    };
    Ok(PolicyChain::new(StaticPolicy::new(&config.power, gpus as u32), settings, engine))
}

/// The `[[plugin]]` and `[[reporter]]` entries, resolved: paths against `base_dir`,
/// configs as JSON.
pub fn plugin_specs(config: &Config, base_dir: &Path) -> PluginSpecs {
    let resolve = |list: &[crate::config::PluginConfig]| {
        list.iter().map(|p| plugin_spec(p, base_dir)).collect()
    };
    PluginSpecs { power: resolve(&config.plugin), reporters: resolve(&config.reporter) }
}

fn plugin_spec(p: &crate::config::PluginConfig, base_dir: &Path) -> PluginSpec {
    PluginSpec {
        name: p.name.clone(),
        path: base_dir.join(&p.path),
        config: serde_json::to_string(&p.config).expect("a TOML table serialises as JSON"),
        limits: Limits {
            deadline: p.deadline,
            memory_bytes: (p.memory_mib as usize) << 20,
            recycle_bytes: p.recycle_mib.map(|m| (m as usize) << 20),
        },
        grants: p.grants.clone(),
        state_bytes: (p.state_kib as usize) << 10,
    }
}

/// The job queue `[jobs]` describes, with its scheduler. A scheduler plugin that does
/// not load is reported and the built-in scheduler stands in; a cgroup that cannot be
/// used costs the tracking of daemonising jobs (logged), not the queue.
pub fn jobs(
    config: &Config,
    base_dir: &Path,
    inventory: &[crate::gpu::GpuInfo],
    sim: bool,
) -> Result<Jobs, String> {
    let j = &config.jobs;
    let cgroup_root = match j.cgroup.as_str() {
        "off" => None,
        "own" => crate::jobs::launch::own_cgroup()
            .inspect_err(|e| tracing::warn!(error = %e, "jobs.cgroup = \"own\", but the agent's cgroup cannot be found; jobs are tracked by process group only"))
            .ok(),
        path => Some(PathBuf::from(path)),
    };
    if let Some(dir) = &cgroup_root
        && !dir.join("cgroup.procs").exists()
    {
        return Err(format!("jobs.cgroup: {} is not a cgroup v2 directory", dir.display()));
    }
    let submit_gid = j.submit_group.as_deref().map(crate::service::peer::group_id).transpose()?;
    let settings = crate::jobs::Settings {
        dir: base_dir.join(&j.dir),
        max_queue: j.max_queue,
        keep_finished: j.keep_finished,
        kill_grace: j.kill_grace,
        log_max_bytes: j.log_max_kib << 10,
        cgroup_root,
        allow_root: j.allow_root,
        submit_gid,
        min_uid: j.min_uid,
        fleet_submit: j.fleet_submit != "off",
    };
    let scheduler = match &j.scheduler {
        None => Scheduler::builtin(),
        Some(p) => {
            let spec = plugin_spec(p, base_dir);
            let started = PluginEngine::new(Some(&base_dir.join(&config.plugins.cache_dir)))
                .map(Arc::new)
                .and_then(|engine| {
                    let kv = crate::plugin::kv::KvStore::open(
                        &base_dir.join(&config.plugins.state_dir),
                        &spec.name,
                        spec.state_bytes,
                    )
                    .unwrap_or_else(|_| crate::plugin::kv::KvStore::in_memory(spec.state_bytes));
                    Scheduler::plugin(
                        engine,
                        &spec,
                        crate::plugin::gpu_infos(inventory),
                        kv,
                        config.plugins.max_failures,
                        config.plugins.failure_window.as_millis() as u64,
                    )
                });
            started.unwrap_or_else(|e| {
                tracing::error!(plugin = %spec.name, error = %e, "the scheduler plugin did not load; the built-in FIFO bin-packer schedules instead");
                Scheduler::builtin()
            })
        }
    };
    Jobs::open(settings, inventory.into(), sim, scheduler)
}

/// What SIGHUP runs: read and validate the config file again, and give its plugin list.
pub fn reloader(path: PathBuf) -> Reload {
    Box::new(move || {
        let loaded = Config::load(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(plugin_specs(&loaded.config, &loaded.base_dir))
    })
}

/// The MQTT link, started, waiting to be attached to its agent.
pub struct Linked {
    pub mqtt: Mqtt,
    desired: Result<Option<Desired>, (PathBuf, String)>,
}

impl std::fmt::Debug for Linked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.mqtt.fmt(f)
    }
}

impl Linked {
    /// Give the agent what commands had set before a restart.
    pub fn attach(self, agent: &mut Agent) -> Mqtt {
        match &self.desired {
            Ok(Some(d)) => agent.restore(d),
            Ok(None) => {}
            Err((path, error)) => agent.set_aside(path, error),
        }
        self.mqtt
    }
}

/// Start the MQTT link when `[mqtt]` is configured; its sink joins `sinks`. Must run
/// inside the tokio runtime that will run the agent.
pub fn mqtt(
    config: &Config,
    base_dir: &Path,
    sinks: &mut Vec<Box<dyn Sink>>,
    control: tokio::sync::mpsc::Sender<Control>,
    changed: Arc<tokio::sync::Notify>,
) -> Result<Option<Linked>, Error> {
    let Some(m) = &config.mqtt else { return Ok(None) };
    let started = Mqtt::start(Settings::new(m, &config.node_id(), base_dir)?, control, changed)?;
    sinks.push(Box::new(started.sink));
    Ok(Some(Linked { mqtt: started.mqtt, desired: started.desired }))
}
