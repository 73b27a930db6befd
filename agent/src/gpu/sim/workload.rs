//! Workload profiles: what a simulated GPU is asked to do over time, as its *uncapped*
//! demand. The physics model then decides what a cap makes of it.
//!
//! Every random choice comes from the GPU's own seeded generator and is drawn at an event
//! boundary (a burst starts or ends), never per step, so a run is the same whatever the
//! step size, for a given seed.

use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::model::Preset;
use super::trace::Trace;

/// The workload's demand at an instant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Demand {
    /// How busy the GPU is, 0..1: the share of dynamic power it would draw uncapped.
    pub activity: f64,
    /// How memory-bound the work is, 0..1: how little it slows when the clock drops.
    pub mem_bound: f64,
    /// What NVML would report as utilisation.
    pub util_pct: f64,
    pub mem_used_mib: u64,
}

impl Demand {
    pub const IDLE: Demand =
        Demand { activity: 0.0, mem_bound: 0.0, util_pct: 0.0, mem_used_mib: 17 };
}

/// The workload kinds, as named in config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WorkloadKind {
    Idle,
    /// Steady compute-bound training, with a short checkpoint stall every minute.
    Training,
    /// Memory-bandwidth-bound work (large embeddings, attention decode).
    MemoryBound,
    /// Bursty inference: request bursts at random, idle between.
    Inference,
    /// A replayed `nvidia-smi` CSV trace.
    Trace,
}

impl WorkloadKind {
    pub const ACCEPTED: &'static str = "idle, training, memory-bound, inference, trace";
}

/// Which part of a trace a GPU replays.
#[derive(Debug, Clone)]
pub struct TraceReplay {
    pub trace: Arc<Trace>,
    /// Which GPU of the trace.
    pub gpu: usize,
    /// Where in the trace to start, seconds.
    pub start_s: f64,
}

/// Memory-boundness assumed for a replayed trace (a training job: mostly compute).
pub const TRACE_MEM_BOUND: f64 = 0.2;

const TRAINING_PERIOD_S: f64 = 60.0;
const TRAINING_STALL_S: f64 = 4.0;
const INFERENCE_GAP_MEAN_S: f64 = 3.0;
const INFERENCE_BURST_MEAN_S: f64 = 1.5;

/// A running workload: a profile and its state.
#[derive(Debug)]
pub struct Workload {
    kind: Profile,
    rng: ChaCha8Rng,
    preset: &'static Preset,
}

#[derive(Debug)]
enum Profile {
    Idle,
    Training { phase_s: f64 },
    MemoryBound,
    Inference { in_burst: bool, next_switch_s: f64 },
    Trace { trace: Arc<Trace>, gpu: usize, start_s: f64, cursor: usize },
    Compute,
}

impl Workload {
    pub fn idle(preset: &'static Preset) -> Workload {
        Workload::new(WorkloadKind::Idle, None, 0, preset)
    }

    /// `gpulet calibrate`'s load: every SM busy with arithmetic, nearly nothing from memory.
    pub fn compute(preset: &'static Preset) -> Workload {
        Workload { kind: Profile::Compute, rng: ChaCha8Rng::seed_from_u64(0), preset }
    }

    /// A workload of `kind`; `trace` is required for [`WorkloadKind::Trace`] (config
    /// validation sees to it; without one the GPU idles).
    pub fn new(
        kind: WorkloadKind,
        trace: Option<TraceReplay>,
        seed: u64,
        preset: &'static Preset,
    ) -> Workload {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let kind = match kind {
            WorkloadKind::Idle => Profile::Idle,
            WorkloadKind::Training => {
                // Desynchronise GPUs' checkpoint stalls a little, as real ranks are.
                Profile::Training { phase_s: rng.random_range(0.0..TRAINING_PERIOD_S) }
            }
            WorkloadKind::MemoryBound => Profile::MemoryBound,
            WorkloadKind::Inference => {
                let next = exp_sample(&mut rng, INFERENCE_GAP_MEAN_S);
                Profile::Inference { in_burst: false, next_switch_s: next }
            }
            WorkloadKind::Trace => match trace {
                Some(r) => {
                    Profile::Trace { trace: r.trace, gpu: r.gpu, start_s: r.start_s, cursor: 0 }
                }
                None => Profile::Idle,
            },
        };
        Workload { kind, rng, preset }
    }

    /// The demand at simulated time `t_s` (seconds since start). Calls come with
    /// non-decreasing `t_s`.
    pub fn demand(&mut self, t_s: f64) -> Demand {
        let total = self.preset.memory_total_mib as f64;
        match &mut self.kind {
            Profile::Idle => Demand::IDLE,
            Profile::Training { phase_s } => {
                let in_stall = (t_s + *phase_s) % TRAINING_PERIOD_S < TRAINING_STALL_S;
                let mem_used_mib = (total * 0.78) as u64;
                if in_stall {
                    Demand { activity: 0.02, mem_bound: 0.15, util_pct: 0.0, mem_used_mib }
                } else {
                    Demand { activity: 0.82, mem_bound: 0.15, util_pct: 100.0, mem_used_mib }
                }
            }
            Profile::Compute => {
                Demand { activity: 1.0, mem_bound: 0.02, util_pct: 100.0, mem_used_mib: 1024 }
            }
            Profile::MemoryBound => Demand {
                activity: 0.7,
                mem_bound: 0.75,
                util_pct: 96.0,
                mem_used_mib: (total * 0.6) as u64,
            },
            Profile::Inference { in_burst, next_switch_s } => {
                while t_s >= *next_switch_s {
                    *in_burst = !*in_burst;
                    let mean =
                        if *in_burst { INFERENCE_BURST_MEAN_S } else { INFERENCE_GAP_MEAN_S };
                    *next_switch_s += exp_sample(&mut self.rng, mean);
                }
                let mem_used_mib = (total * 0.45) as u64;
                if *in_burst {
                    Demand { activity: 0.9, mem_bound: 0.5, util_pct: 100.0, mem_used_mib }
                } else {
                    Demand { activity: 0.04, mem_bound: 0.5, util_pct: 3.0, mem_used_mib }
                }
            }
            Profile::Trace { trace, gpu, start_s, cursor } => {
                let p = trace.at(*gpu, t_s + *start_s, cursor);
                // The trace holds uncapped power; at full clock P = idle + a·dyn.
                let preset = self.preset;
                Demand {
                    activity: ((f64::from(p.power_w) - preset.idle_w) / preset.dyn_w)
                        .clamp(0.0, 1.0),
                    mem_bound: TRACE_MEM_BOUND,
                    util_pct: f64::from(p.util_pct),
                    mem_used_mib: u64::from(p.mem_used_mib),
                }
            }
        }
    }
}

/// An exponentially distributed duration with the given mean, at least 50 ms.
fn exp_sample(rng: &mut ChaCha8Rng, mean: f64) -> f64 {
    let u: f64 = rng.random_range(f64::EPSILON..1.0);
    (-u.ln() * mean).max(0.05)
}
