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
use self::workload::{Demand, TraceReplay, Workload, WorkloadKind};
use super::{
    Ecc, Field, FieldSet, GpuBackend, GpuError, GpuInfo, GpuProcess, GpuSample, Health, Reading,
    RemappedRows, XidEvent,
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
    /// For [`WorkloadKind::Trace`]: what to replay.
    pub trace: Option<TraceReplay>,
}

impl GpuSpec {
    pub fn new(preset: &'static Preset, workload: WorkloadKind) -> GpuSpec {
        GpuSpec { preset, workload, trace: None }
    }

    pub fn trace(preset: &'static Preset, replay: TraceReplay) -> GpuSpec {
        GpuSpec { preset, workload: WorkloadKind::Trace, trace: Some(replay) }
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
    /// Its cooling fails (a fan): its thermal resistance doubles, so it runs hotter than
    /// its peers at the same power, and throttles sooner.
    Cooling,
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
    ecc: Ecc,
    remapped: RemappedRows,
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
                    // Hopper, Ampere and Ada remap rows; page retirement is older.
                    fields: FieldSet::ALL.without(Field::RetiredPages),
                    can_set_power_limit: true,
                    pci_bus_id: Some(format!("00000000:{:02X}:00.0", 0x18 + index)),
                    mig_enabled: None,
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
                    ecc: Ecc::default(),
                    remapped: RemappedRows::default(),
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
        self.schedule.sort_by_key(|f| std::cmp::Reverse(f.at));
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

    /// Clear a sticky degraded state, as an operator does after dealing with an XID. A
    /// lost GPU stays lost.
    pub fn clear_degraded(&mut self, gpu: u32) -> Result<(), GpuError> {
        let g = self.gpus.get_mut(gpu as usize).ok_or(GpuError::NoSuchGpu(gpu))?;
        g.degraded = false;
        Ok(())
    }

    /// Inject a fault now. Unknown GPUs are ignored (config validation names them).
    pub fn inject(&mut self, gpu: u32, fault: Fault) {
        let at_ms = self.now.as_millis() as u64;
        let Some(g) = self.gpus.get_mut(gpu as usize) else {
            return;
        };
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
                // The memory errors behind the ECC codes show in the counters too.
                match code {
                    48 | 94 | 95 => {
                        g.ecc.uncorrected += 1;
                        g.remapped.uncorrectable += 1;
                        g.remapped.pending = true;
                    }
                    92 => g.ecc.corrected += 1,
                    _ => {}
                }
                self.events.push(XidEvent { gpu, code, at_ms });
            }
            Fault::Cooling => g.phys.r_th_factor = 2.0,
            Fault::Clear => {
                g.phys.r_th_factor = 1.0;
                g.lost = false;
                g.failing = FieldSet::NONE;
                g.degraded = false;
                // As a reset does: a pending row remapping is done.
                g.remapped.pending = false;
            }
        }
    }

    /// Run `workload` on GPU `gpu` from now on (a job's, while it lives); `None`: idle.
    /// A trace replays the built-in H100 training trace from its start.
    pub fn set_workload(
        &mut self,
        gpu: u32,
        workload: Option<WorkloadKind>,
    ) -> Result<(), GpuError> {
        let g = self.gpus.get_mut(gpu as usize).ok_or(GpuError::NoSuchGpu(gpu))?;
        let kind = workload.unwrap_or(WorkloadKind::Idle);
        let trace = (kind == WorkloadKind::Trace).then(|| {
            let trace = Arc::new(
                trace::Trace::parse(H100_TRAINING_TRACE).expect("the built-in trace parses"),
            );
            let n = trace.gpu_count().max(1);
            TraceReplay { trace, gpu: gpu as usize % n, start_s: 0.0 }
        });
        let seed = self.now.as_nanos() as u64 ^ u64::from(gpu);
        g.workload = Workload::new(kind, trace, seed, g.phys.preset);
        Ok(())
    }

    /// Replace every GPU's workload with a compute-bound full load (what `gpulet
    /// calibrate` runs).
    pub fn run_compute_load(&mut self) {
        for g in &mut self.gpus {
            g.workload = Workload::compute(g.phys.preset);
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
            mem_clock_mhz: self.read(Field::MemClockMhz, p.preset.mem_clock_mhz),
            ecc: self.read(Field::Ecc, self.ecc),
            retired_pages: self.read(Field::RetiredPages, 0),
            remapped_rows: self.read(Field::RemappedRows, self.remapped),
            // A busy GPU has its job's process on it.
            processes: self.read(
                Field::Processes,
                (p.demand.util_pct > 0.0)
                    .then(|| GpuProcess {
                        pid: 4000 + index,
                        used_mib: Some(p.demand.mem_used_mib),
                    })
                    .into_iter()
                    .collect(),
            ),
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

    fn clear_health(&mut self, gpu: u32) -> Result<(), GpuError> {
        self.node.lock().clear_degraded(gpu)
    }

    fn run_workload(&mut self, gpu: u32, workload: Option<WorkloadKind>) -> Result<(), GpuError> {
        let mut node = self.node.lock();
        // The workload changes now, not at the last sample.
        node.advance_to(self.clock.elapsed());
        node.set_workload(gpu, workload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::sim::trace::Trace;

    fn h100() -> &'static Preset {
        Preset::by_key("h100-sxm").unwrap()
    }

    fn mixed(seed: u64) -> SimNode {
        let trace = Arc::new(Trace::parse(H100_TRAINING_TRACE).unwrap());
        let specs = [
            GpuSpec::new(h100(), WorkloadKind::Training),
            GpuSpec::new(h100(), WorkloadKind::Inference),
            GpuSpec::new(Preset::by_key("a100-sxm4").unwrap(), WorkloadKind::MemoryBound),
            GpuSpec::trace(h100(), TraceReplay { trace, gpu: 3, start_s: 100.0 }),
        ];
        SimNode::new(&specs, seed)
    }

    #[test]
    fn energy_is_the_integral_of_power() {
        let mut node = mixed(1);
        let dt = Duration::from_millis(10);
        let mut integral = [0.0; 4];
        for _ in 0..3000 {
            node.advance(dt);
            for (i, s) in node.sample_all().iter().enumerate() {
                integral[i] += s.power_w.value().unwrap() * dt.as_secs_f64();
            }
        }
        for (i, s) in node.sample_all().iter().enumerate() {
            let counter = s.energy_j.value().unwrap();
            assert!(
                (counter - integral[i]).abs() < 1e-6 * counter,
                "GPU {i}: counter {counter} J, integral {} J",
                integral[i]
            );
        }
    }

    #[test]
    fn coarse_samples_of_steady_power_agree_with_the_energy_counter() {
        // Only steady workloads: 1 Hz samples of bursty inference miss bursts, which is
        // why the counter, not sampled power, is what energy accounting uses.
        let mut node = mixed(2);
        let mut prev = node.sample_all();
        let mut est = [0.0; 4];
        for _ in 0..120 {
            node.advance(Duration::from_secs(1));
            let now = node.sample_all();
            for i in 0..4 {
                est[i] +=
                    (prev[i].power_w.value().unwrap() + now[i].power_w.value().unwrap()) / 2.0;
            }
            prev = now;
        }
        for i in [0, 2] {
            let counter = prev[i].energy_j.value().unwrap();
            assert!(
                (counter - est[i]).abs() < 0.02 * counter,
                "GPU {i}: counter {counter}, 1 Hz trapezoid {}",
                est[i]
            );
        }
    }

    #[test]
    fn same_seed_same_run_and_another_seed_another_run() {
        let run = |seed| {
            let mut node = mixed(seed);
            let mut out = Vec::new();
            for _ in 0..200 {
                node.advance(Duration::from_millis(250));
                out.push(node.sample_all());
            }
            (node.inventory(), out, node.total_work())
        };
        let (a, b, c) = (run(5), run(5), run(6));
        assert_eq!(a, b);
        assert_ne!(a.0[0].uuid, c.0[0].uuid);
        assert_ne!(a.1, c.1, "the inference bursts differ with the seed");
    }

    #[test]
    fn the_step_size_does_not_change_when_bursts_happen() {
        let switches = |step_ms: u64| {
            let mut node = SimNode::new(&[GpuSpec::new(h100(), WorkloadKind::Inference)], 9);
            let (mut out, mut last) = (Vec::new(), 0.0);
            while node.now() < Duration::from_secs(60) {
                node.advance(Duration::from_millis(step_ms));
                let util = node.sample_all()[0].util_pct.value().unwrap();
                if util != last {
                    out.push(node.now().as_secs_f64());
                    last = util;
                }
            }
            out
        };
        let (fine, coarse) = (switches(10), switches(40));
        assert!(fine.len() > 10, "a minute of inference has bursts: {fine:?}");
        assert_eq!(fine.len(), coarse.len(), "{fine:?} vs {coarse:?}");
        for (f, c) in fine.iter().zip(&coarse) {
            // Demand is read at the start of each step, so a switch shows within two steps.
            assert!(
                (f - c).abs() <= 0.081,
                "a switch seen at {f} s with 10 ms steps and {c} s with 40 ms steps"
            );
        }
    }

    #[test]
    fn one_gpu_falling_off_the_bus_leaves_the_others_alone() {
        let mut node = mixed(3);
        node.advance(Duration::from_secs(5));
        node.inject(1, Fault::FallOffBus);
        node.advance(Duration::from_secs(1));
        let s = node.sample_all();
        assert_eq!(s[1].health, Health::Lost);
        assert!(matches!(s[1].power_w, Reading::Failed(GpuError::Lost(1))));
        for i in [0, 2, 3] {
            assert_eq!(s[i].health, Health::Ok);
            assert!(s[i].errors().is_empty(), "GPU {i}: {:?}", s[i].errors());
        }
        assert_eq!(node.set_power_limit(1, 500.0), Err(GpuError::Lost(1)));
        assert_eq!(node.drain_events(), vec![XidEvent { gpu: 1, code: 79, at_ms: 5000 }]);
        assert!(node.drain_events().is_empty(), "events are drained once");
    }

    #[test]
    fn a_failing_field_fails_alone_and_unsupported_is_a_value() {
        let mut node = mixed(4);
        node.set_unsupported(0, Field::EnergyJ);
        node.inject(2, Fault::FailField(Field::TempC));
        node.advance(Duration::from_secs(1));
        let s = node.sample_all();
        assert_eq!(s[0].energy_j, Reading::Unsupported);
        assert!(s[0].errors().is_empty(), "unsupported is not an error");
        assert!(s[0].power_w.value().is_some());
        assert_eq!(s[2].errors().len(), 1);
        assert!(matches!(
            s[2].temp_c,
            Reading::Failed(GpuError::FieldFailed { gpu: 2, field: "temp_c", .. })
        ));
        assert!(s[2].power_w.value().is_some());
        node.inject(2, Fault::Clear);
        assert!(node.sample_all()[2].errors().is_empty());
    }

    #[test]
    fn scheduled_faults_fire_at_their_time() {
        let mut node = mixed(5);
        node.schedule([
            ScheduledFault { at: Duration::from_millis(1500), gpu: 0, fault: Fault::Xid(48) },
            ScheduledFault { at: Duration::from_secs(3), gpu: 3, fault: Fault::Clear },
        ]);
        node.advance(Duration::from_secs(1));
        assert!(node.drain_events().is_empty());
        node.advance(Duration::from_secs(1));
        assert_eq!(node.drain_events(), vec![XidEvent { gpu: 0, code: 48, at_ms: 1500 }]);
        assert_eq!(node.sample_all()[0].health, Health::Degraded, "XID 48 degrades the GPU");
    }

    #[test]
    fn limits_outside_the_hardware_range_are_refused() {
        let mut node = mixed(6);
        assert!(matches!(
            node.set_power_limit(0, 100.0),
            Err(GpuError::InvalidArgument { gpu: 0, .. })
        ));
        assert!(matches!(node.set_power_limit(0, f64::NAN), Err(GpuError::InvalidArgument { .. })));
        assert_eq!(node.set_power_limit(9, 300.0), Err(GpuError::NoSuchGpu(9)));
        assert_eq!(node.set_power_limit(0, 450.0), Ok(450.0));
        assert_eq!(node.sample_all()[0].power_limit_w, Reading::Value(450.0));
    }

    #[test]
    fn a_replayed_trace_follows_the_recorded_power_when_uncapped() {
        let trace = Arc::new(Trace::parse(H100_TRAINING_TRACE).unwrap());
        let replay = TraceReplay { trace: trace.clone(), gpu: 0, start_s: 0.0 };
        let mut node = SimNode::new(&[GpuSpec::trace(h100(), replay)], 1);
        let mut cursor = 0;
        for t in [150.0, 300.0, 330.0] {
            node.advance_to(Duration::from_secs_f64(t));
            let recorded = f64::from(trace.at(0, t - 0.05, &mut cursor).power_w);
            let simulated = node.sample_all()[0].power_w.value().unwrap();
            assert!(
                (simulated - recorded).abs() < 0.1 * recorded + 10.0,
                "t={t}: simulated {simulated} W, recorded {recorded} W"
            );
        }
    }
}
