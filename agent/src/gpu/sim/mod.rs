//! The simulated backend: a node of GPUs with physics good enough to test power policies
//! against, deterministic under a seed, and as fast as the caller wants (it advances to
//! whatever time its [`Clock`] says).
//!
//! - [`model`]: one GPU's physics (power, clock under a cap, work, heat, energy).
//! - [`workload`]: what each GPU is asked to do over time.
//! - [`trace`]: replaying `nvidia-smi` CSV recordings as workloads.
//!
//! Tests and benchmarks keep a [`SimHandle`] to reach past the [`GpuBackend`] trait:
//! inject faults, read the useful work done, step time.

pub mod model;
pub mod trace;
pub mod workload;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use self::model::{GpuPhysics, Preset};
use self::trace::Trace;
use self::workload::{Demand, Workload, WorkloadKind};
use super::{
    Field, FieldSet, GpuBackend, GpuError, GpuInfo, GpuSample, Health, Reading, XidEvent,
};
use crate::clock::Clock;

/// The real 8× H100 GPT training trace (see `examples/traces/README.md`), built in so that
/// the demo needs no files.
pub const H100_TRAINING_TRACE: &str =
    include_str!("../../../../examples/traces/h100x8-gpt-training.csv");

/// The largest physics step. Coarser calls are split; finer ones are taken as they come.
/// 50 ms resolves the 200 ms firmware lag and the 100 ms traces.
pub const MAX_STEP: Duration = Duration::from_millis(50);

/// What one simulated GPU is: a preset running a workload.
#[derive(Debug, Clone)]
pub struct GpuSpec {
    pub preset: &'static Preset,
    pub workload: WorkloadKind,
    /// For [`WorkloadKind::Trace`]: the trace and which of its GPUs to replay.
    pub trace: Option<(Arc<Trace>, usize)>,
}

impl GpuSpec {
    pub fn new(preset: &'static Preset, workload: WorkloadKind) -> GpuSpec {
        GpuSpec { preset, workload, trace: None }
    }

    pub fn trace(preset: &'static Preset, trace: Arc<Trace>, trace_gpu: usize) -> GpuSpec {
        GpuSpec { preset, workload: WorkloadKind::Trace, trace: Some((trace, trace_gpu)) }
    }
}

/// A fault to inject into one GPU.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    /// The GPU stops answering (XID 79): every field fails, controls fail.
    FallOffBus,
    /// One field starts failing; the others go on.
    FailField(Field),
    /// An XID event; critical codes leave the GPU degraded until cleared.
    Xid(u32),
    /// Undo every fault of this GPU (back on the bus, fields readable, health ok).
    Clear,
}

/// A fault that fires at a simulated time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScheduledFault {
    pub at: Duration,
    pub gpu: u32,
    pub fault: Fault,
}

#[derive(Debug)]
struct SimGpu {
    info: GpuInfo,
    phys: GpuPhysics,
    workload: Workload,
    lost: bool,
    failing: FieldSet,
    degraded: bool,
}

/// A simulated node: GPUs, simulated time, pending events and scheduled faults.
#[derive(Debug)]
pub struct SimNode {
    gpus: Vec<SimGpu>,
    now: Duration,
    events: Vec<XidEvent>,
    /// Sorted by time, earliest last (popped as time passes).
    schedule: Vec<ScheduledFault>,
}

impl SimNode {
    /// A node of `specs.len()` GPUs. Everything random (UUIDs, workload timing) derives
    /// from `seed`.
    pub fn new(specs: &[GpuSpec], seed: u64) -> SimNode {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let gpus = specs
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                let index = i as u32;
                let uuid = format!(
                    "GPU-{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
                    rng.random::<u32>(),
                    rng.random::<u16>(),
                    rng.random::<u16>(),
                    rng.random::<u16>(),
                    rng.random::<u64>() & 0xffff_ffff_ffff
                );
                let info = GpuInfo {
                    index,
                    uuid,
                    name: spec.preset.name.to_owned(),
                    memory_total_mib: spec.preset.memory_total_mib,
                    power_limit: spec.preset.power,
                    fields: FieldSet::ALL,
                    can_set_power_limit: true,
                };
                let workload =
                    Workload::new(spec.workload, spec.trace.clone(), rng.random(), spec.preset);
                SimGpu {
                    info,
                    phys: GpuPhysics::new(spec.preset),
                    workload,
                    lost: false,
                    failing: FieldSet::NONE,
                    degraded: false,
                }
            })
            .collect();
        SimNode { gpus, now: Duration::ZERO, events: Vec::new(), schedule: Vec::new() }
    }

    pub fn len(&self) -> usize {
        self.gpus.len()
    }

    pub fn is_empty(&self) -> bool {
        self.gpus.is_empty()
    }

    /// Simulated time since the node started.
    pub fn now(&self) -> Duration {
        self.now
    }

    /// Faults to fire as simulated time passes.
    pub fn schedule(&mut self, faults: impl IntoIterator<Item = ScheduledFault>) {
        self.schedule.extend(faults);
        self.schedule.sort_by(|a, b| b.at.cmp(&a.at));
    }

    /// Mark a field unsupported on a GPU, as on SKUs that lack it.
    pub fn set_unsupported(&mut self, gpu: u32, field: Field) {
        let info = &mut self.gpus[gpu as usize].info;
        info.fields = info.fields.without(field);
    }

    /// Advance simulated time by `dt`, in steps of at most [`MAX_STEP`].
    pub fn advance(&mut self, dt: Duration) {
        self.advance_to(self.now + dt);
    }

    /// Advance simulated time to `t` (no-op if `t` is not later than now).
    pub fn advance_to(&mut self, t: Duration) {
        while self.now < t {
            // Stop at the next scheduled fault so it fires at its time.
            let mut until = t.min(self.now + MAX_STEP);
            if let Some(f) = self.schedule.last() {
                if f.at <= self.now {
                    let f = self.schedule.pop().expect("just looked");
                    self.inject(f.gpu, f.fault);
                    continue;
                }
                until = until.min(f.at);
            }
            let h = (until - self.now).as_secs_f64();
            let t_s = self.now.as_secs_f64();
            for g in &mut self.gpus {
                let d = if g.lost { Demand::IDLE } else { g.workload.demand(t_s) };
                g.phys.step(d, h);
            }
            self.now = until;
        }
        while self.schedule.last().is_some_and(|f| f.at <= self.now) {
            let f = self.schedule.pop().expect("just looked");
            self.inject(f.gpu, f.fault);
        }
    }

    /// Inject a fault now. Unknown GPUs are ignored (config validation names them).
    pub fn inject(&mut self, gpu: u32, fault: Fault) {
        let at_ms = self.now.as_millis() as u64;
        let Some(g) = self.gpus.get_mut(gpu as usize) else { return };
        match fault {
            Fault::FallOffBus => {
                g.lost = true;
                self.events.push(XidEvent { gpu, code: 79, at_ms });
            }
            Fault::FailField(f) => g.failing = g.failing.with(f),
            Fault::Xid(code) => {
                if code == 79 {
                    g.lost = true;
                }
                if super::xid_degrades(code) {
                    g.degraded = true;
                }
                self.events.push(XidEvent { gpu, code, at_ms });
            }
            Fault::Clear => {
                g.lost = false;
                g.failing = FieldSet::NONE;
                g.degraded = false;
            }
        }
    }

    /// Useful work GPU `gpu` has done, in full-speed GPU-seconds.
    pub fn work_done(&self, gpu: u32) -> f64 {
        self.gpus[gpu as usize].phys.work
    }

    /// Useful work of the whole node.
    pub fn total_work(&self) -> f64 {
        self.gpus.iter().map(|g| g.phys.work).sum()
    }

    /// A GPU's physical state (for tests and oracles).
    pub fn physics(&self, gpu: u32) -> &GpuPhysics {
        &self.gpus[gpu as usize].phys
    }

    pub fn inventory(&self) -> Vec<GpuInfo> {
        self.gpus.iter().map(|g| g.info.clone()).collect()
    }

    pub fn sample_all(&self) -> Vec<GpuSample> {
        self.gpus.iter().map(SimGpu::sample).collect()
    }

    pub fn set_power_limit(&mut self, gpu: u32, watts: f64) -> Result<f64, GpuError> {
        let g = self.gpus.get_mut(gpu as usize).ok_or(GpuError::NoSuchGpu(gpu))?;
        if g.lost {
            return Err(GpuError::Lost(gpu));
        }
        let c = g.info.power_limit;
        if !watts.is_finite() || watts < c.min_w - 0.5 || watts > c.max_w + 0.5 {
            return Err(GpuError::InvalidArgument {
                gpu,
                value: format!("power limit {watts} W"),
                accepted: format!("{} to {} W", c.min_w, c.max_w),
            });
        }
        // NVML takes integer milliwatts.
        g.phys.limit_w = (c.clamp(watts) * 1000.0).round() / 1000.0;
        Ok(g.phys.limit_w)
    }

    pub fn drain_events(&mut self) -> Vec<XidEvent> {
        std::mem::take(&mut self.events)
    }
}

impl SimGpu {
    fn sample(&self) -> GpuSample {
        let index = self.info.index;
        if self.lost {
            return GpuSample::lost(index, &GpuError::Lost(index));
        }
        let p = &self.phys;
        let read = |field: Field, v| -> Reading<f64> { self.read(field, v) };
        GpuSample {
            index,
            power_w: read(Field::PowerW, p.power_w),
            energy_j: read(Field::EnergyJ, p.energy_j),
            temp_c: read(Field::TempC, p.temp_c),
            util_pct: read(Field::UtilPct, p.demand.util_pct),
            mem_used_mib: self.read(Field::MemUsedMib, p.demand.mem_used_mib),
            sm_clock_mhz: self.read(Field::SmClockMhz, p.sm_clock_mhz()),
            power_limit_w: read(Field::PowerLimitW, p.limit_w),
            throttle: self.read(Field::Throttle, p.throttle),
            health: if self.degraded { Health::Degraded } else { Health::Ok },
        }
    }

    fn read<T>(&self, field: Field, v: T) -> Reading<T> {
        if !self.info.fields.contains(field) {
            Reading::Unsupported
        } else if self.failing.contains(field) {
            Reading::Failed(GpuError::FieldFailed {
                gpu: self.info.index,
                field: field.name(),
                message: "injected fault".into(),
            })
        } else {
            Reading::Value(v)
        }
    }
}

/// Shared access to a simulated node, for tests and benchmarks that hand the backend
/// to an agent and still want to inject faults or read the work done.
#[derive(Debug, Clone)]
pub struct SimHandle(Arc<Mutex<SimNode>>);

impl SimHandle {
    pub fn lock(&self) -> MutexGuard<'_, SimNode> {
        // A panic while holding the lock can only come from a bug in the simulator;
        // the node's state is still usable for reading.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// [`GpuBackend`] over a [`SimNode`], advancing it to the clock's time on every sample.
#[derive(Debug)]
pub struct SimBackend {
    node: SimHandle,
    inventory: Vec<GpuInfo>,
    clock: Arc<dyn Clock>,
}

impl SimBackend {
    pub fn new(node: SimNode, clock: Arc<dyn Clock>) -> SimBackend {
        let inventory = node.inventory();
        SimBackend { node: SimHandle(Arc::new(Mutex::new(node))), inventory, clock }
    }

    pub fn handle(&self) -> SimHandle {
        self.node.clone()
    }
}

impl GpuBackend for SimBackend {
    fn kind(&self) -> &'static str {
        "sim"
    }

    fn inventory(&self) -> &[GpuInfo] {
        &self.inventory
    }

    fn sample_all(&mut self) -> Vec<GpuSample> {
        let mut node = self.node.lock();
        node.advance_to(self.clock.elapsed());
        node.sample_all()
    }

    fn set_power_limit(&mut self, gpu: u32, watts: f64) -> Result<f64, GpuError> {
        self.node.lock().set_power_limit(gpu, watts)
    }

    fn drain_events(&mut self) -> Vec<XidEvent> {
        self.node.lock().drain_events()
    }
}
