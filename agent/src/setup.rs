//! Assembling an agent from a validated configuration: the backend, the policy, the
//! guard and the sinks. The checks that need the hardware (GPU indices, bounds against
//! the GPUs' own ranges, trace files) happen here and fail with config errors.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use crate::agent::{Agent, Parts};
use crate::clock::Clock;
use crate::config::{
    BUILTIN_TRACE, BackendKind, Config, ConfigError, ConfigErrors, FaultKind, SimConfig, SinkKind,
};
use crate::error::Error;
use crate::gpu::sim::model::Preset;
use crate::gpu::sim::trace::Trace;
use crate::gpu::sim::workload::{TraceReplay, WorkloadKind};
use crate::gpu::sim::{self, Fault, GpuSpec, ScheduledFault, SimBackend, SimHandle, SimNode};
use crate::gpu::{Field, GpuBackend, GpuError};
use crate::guard::PowerGuard;
use crate::policy::StaticPolicy;
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
        BackendKind::Nvml => Err(Error::Gpu(GpuError::Unavailable {
            backend: "nvml",
            why: "this version of gpulet has no NVML support yet; use backend = \"sim\"".into(),
        })),
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

/// A whole agent from a validated config, its backend and its sinks.
pub fn agent(
    config: &Config,
    backend: Backend,
    sinks: Vec<Box<dyn Sink>>,
    clock: Arc<dyn Clock>,
) -> Result<Agent, Error> {
    let guard = PowerGuard::new(backend.backend.inventory(), &config.power)?;
    let policy = StaticPolicy::new(&config.power, backend.backend.inventory().len() as u32);
    Ok(Agent::new(Parts {
        node: config.node_id(),
        tick: config.tick,
        backend: backend.backend,
        policy: Box::new(policy),
        guard,
        sinks,
        clock,
    }))
}
