//! Calibration: how much useful work each GPU does per second at each power limit, the
//! curve the power-budget policy needs to split a budget where it buys the most work.
//!
//! `gpulet calibrate` keeps every GPU busy with a compute load ([`Load`]: the CUDA
//! kernel on real GPUs, a compute-bound job on the simulator), steps the power limit
//! down from the maximum to the minimum through the backend, and at each step measures,
//! after a warm-up, the work done and the energy used. The limits found at start are put
//! back afterwards, also after an error, a panic or SIGINT/SIGTERM, and kept on disk
//! meanwhile so that an agent starting after a crash puts them back ([`Safety`]). The
//! result is kept in a file ([`CalibrationConfig::file`](crate::config::CalibrationConfig));
//! the agent reads it at start, publishes it in the MQTT birth and hands each GPU's curve
//! to power plugins.
//!
//! Points carry `work_per_s` in the load's unit, the same for every GPU of the file (so
//! GPUs compare by it), and `relative`, the same over the GPU's own best (the shape).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pub use crate::calibration::{CalibrateError, Calibration, Curve, Point, SCHEMA};
use crate::clock::VirtualClock;
use crate::cuda::CudaLoad;
use crate::gpu::restore::{current_limits, read_start_limits, write_start_limits};
use crate::gpu::sim::SimHandle;
use crate::gpu::{GpuBackend, GpuInfo};

/// How often power is sampled while measuring (energy is integrated from it on GPUs
/// without a counter); the shortest measuring time.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// How to calibrate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    /// Limits from the maximum to the minimum, both included (at least 2).
    pub steps: u32,
    /// Time at each limit before measuring: the clocks settle within a second, the
    /// temperature (which also moves power) more slowly.
    pub warmup: Duration,
    /// Time measured at each limit.
    pub measure: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { steps: 6, warmup: Duration::from_secs(3), measure: Duration::from_secs(5) }
    }
}

/// A compute load running on every GPU being calibrated.
pub trait Load {
    /// `load` in the file.
    fn name(&self) -> &'static str;
    /// The unit of [`Load::work`] per second.
    fn unit(&self) -> &'static str;
    /// Work done on each GPU of the inventory since the load started.
    fn work(&mut self) -> Result<Vec<f64>, CalibrateError>;
    /// Let `d` pass with the load running.
    fn wait(&mut self, d: Duration);
    /// Time since the load started.
    fn elapsed(&self) -> Duration;
}

/// The CUDA kernel on real GPUs, in GFLOP.
impl Load for CudaLoad {
    fn name(&self) -> &'static str {
        "cuda-fp32-fma"
    }
    fn unit(&self) -> &'static str {
        "GFLOP/s"
    }
    fn work(&mut self) -> Result<Vec<f64>, CalibrateError> {
        Ok(self.gflop()?)
    }
    fn wait(&mut self, d: Duration) {
        std::thread::sleep(d);
    }
    fn elapsed(&self) -> Duration {
        CudaLoad::elapsed(self)
    }
}

/// The simulator's node running a compute-bound job on every GPU, on a virtual clock (a
/// calibration takes no real time). Work in full-speed GPU-seconds.
pub struct SimLoad {
    node: SimHandle,
    clock: VirtualClock,
}

impl SimLoad {
    /// Put the calibration job on every GPU of the node `node` (whose backend runs on
    /// `clock`).
    pub fn start(node: SimHandle, clock: VirtualClock) -> SimLoad {
        node.lock().run_compute_load();
        SimLoad { node, clock }
    }
}

impl Load for SimLoad {
    fn name(&self) -> &'static str {
        "sim-compute"
    }
    fn unit(&self) -> &'static str {
        "GPU-s/s"
    }
    fn work(&mut self) -> Result<Vec<f64>, CalibrateError> {
        let node = self.node.lock();
        Ok((0..node.len() as u32).map(|g| node.work_done(g)).collect())
    }
    fn wait(&mut self, d: Duration) {
        self.clock.advance(d);
    }
    fn elapsed(&self) -> Duration {
        crate::clock::Clock::elapsed(&self.clock)
    }
}

/// `gpulet calibrate` on the simulated node `sim` describes (the same GPUs, UUIDs and
/// physics as the agent's; its scheduled faults left out), on a virtual clock.
pub fn simulated(
    sim: &crate::config::SimConfig,
    base_dir: &Path,
    settings: Settings,
    created_ms: u64,
) -> Result<Calibration, crate::error::Error> {
    let clock = VirtualClock::new(created_ms);
    let sim = crate::config::SimConfig { faults: Vec::new(), ..sim.clone() };
    let node = crate::setup::sim_node(&sim, base_dir)?;
    let mut backend = crate::gpu::sim::SimBackend::new(node, Arc::new(clock.clone()));
    let mut load = SimLoad::start(backend.handle(), clock);
    Ok(run(&mut backend, &mut load, settings, created_ms, &Safety::default())?)
}

/// Whether a GPU can be calibrated: its limit can be set, and it is a whole GPU (MIG
/// instances share its power; CUDA sees the instances, not the GPU).
pub fn calibratable(g: &GpuInfo) -> bool {
    g.can_set_power_limit && g.mig_enabled != Some(true)
}

/// What keeps a sweep from leaving a GPU at a low limit.
#[derive(Debug, Default)]
pub struct Safety {
    /// Where the limits found are kept while the sweep runs, in the agent's
    /// `start-limits.json` format: if calibration dies (SIGKILL, power loss), the agent's
    /// next start puts them back. If the file is already there (an agent or calibration
    /// that did not stop cleanly), its limits are the ones put back.
    pub keep: Option<std::path::PathBuf>,
    /// Set (by SIGINT or SIGTERM) to stop the sweep early; the limits are put back.
    pub stop: Arc<AtomicBool>,
}

/// Measure the curve of every [`calibratable`] GPU, with `load` running. The limits found
/// at start are put back before returning, also on an error or a panic; the limits are
/// kept on disk meanwhile (see [`Safety`]).
pub fn run(
    backend: &mut dyn GpuBackend,
    load: &mut dyn Load,
    settings: Settings,
    created_ms: u64,
    safety: &Safety,
) -> Result<Calibration, CalibrateError> {
    let inventory: Vec<GpuInfo> = backend.inventory().to_vec();
    let gpus: Vec<&GpuInfo> = inventory.iter().filter(|g| calibratable(g)).collect();
    if gpus.is_empty() {
        return Err(CalibrateError::NothingToCalibrate);
    }
    let keep_err = |e: std::io::Error| CalibrateError::File {
        path: safety.keep.as_ref().map_or(String::new(), |p| p.display().to_string()),
        error: format!("cannot keep the limits found while calibrating: {e}"),
    };
    let kept = match &safety.keep {
        Some(path) => read_start_limits(path).map_err(keep_err)?,
        None => None,
    };
    let owned = kept.is_none();
    let originals = match kept {
        Some(limits) => limits,
        None => {
            let found = current_limits(backend);
            if let Some(path) = &safety.keep {
                write_start_limits(path, &found).map_err(keep_err)?;
            }
            found
        }
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        measure(backend, load, settings, &gpus, &safety.stop)
    }));
    let mut restored = true;
    for g in &gpus {
        let to = originals.get(&g.uuid).copied().unwrap_or(g.power_limit.default_w);
        if let Err(e) = backend.set_power_limit(g.index, g.power_limit.clamp(to)) {
            restored = false;
            tracing::error!(gpu = g.index, error = %e, "could not put the power limit back after calibration; the agent's next start tries again");
        }
    }
    if let (true, true, Some(path)) = (restored, owned, &safety.keep)
        && let Err(e) = std::fs::remove_file(path)
    {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove the kept limits");
    }
    let points = match result {
        Ok(r) => r?,
        Err(panic) => std::panic::resume_unwind(panic),
    };
    Ok(Calibration {
        schema: SCHEMA.into(),
        created_ms,
        backend: backend.kind().into(),
        load: load.name().into(),
        unit: load.unit().into(),
        gpus: gpus
            .iter()
            .zip(points)
            .map(|(g, points)| Curve {
                index: g.index,
                uuid: g.uuid.clone(),
                name: g.name.clone(),
                points,
            })
            .collect(),
    })
}

fn measure(
    backend: &mut dyn GpuBackend,
    load: &mut dyn Load,
    settings: Settings,
    gpus: &[&GpuInfo],
    stop: &AtomicBool,
) -> Result<Vec<Vec<Point>>, CalibrateError> {
    let steps = settings.steps.max(2);
    let mut curves = vec![Vec::with_capacity(steps as usize); gpus.len()];
    for k in 0..steps {
        let frac = f64::from(k) / f64::from(steps - 1);
        for g in gpus {
            let c = g.power_limit;
            let w = (c.max_w - (c.max_w - c.min_w) * frac).round();
            backend
                .set_power_limit(g.index, c.clamp(w))
                .map_err(|error| CalibrateError::SetLimit { gpu: g.index, error })?;
        }
        pass(backend, load, settings.warmup, stop)?;
        let (w0, t0) = (load.work()?, load.elapsed());
        let during = pass(backend, load, settings.measure, stop)?;
        let (w1, t1) = (load.work()?, load.elapsed());
        let secs = (t1 - t0).as_secs_f64().max(1e-9);
        for (curve, g) in curves.iter_mut().zip(gpus) {
            let i = g.index as usize;
            let Some(stats) = during.get(i).copied().flatten() else {
                return Err(CalibrateError::Lost(g.index));
            };
            curve.push(Point {
                limit_w: stats.limit_w,
                power_w: round2(stats.power_w),
                work_per_s: (w1[i] - w0[i]) / secs,
                relative: 0.0,
            });
        }
    }
    for curve in &mut curves {
        let best = curve.iter().map(|p| p.work_per_s).fold(0.0, f64::max);
        for p in curve.iter_mut() {
            p.relative = if best > 0.0 { round4(p.work_per_s / best) } else { 0.0 };
            p.work_per_s = round4(p.work_per_s);
        }
    }
    Ok(curves)
}

/// Per GPU over a pass: mean power and the enforced limit at the end.
#[derive(Debug, Clone, Copy)]
struct PassStats {
    power_w: f64,
    limit_w: f64,
}

/// Let `d` pass, sampling every [`SAMPLE_EVERY`]; per GPU its stats, `None` for a GPU
/// that did not answer. Mean power from the energy counter where it moved, else from
/// the power samples.
fn pass(
    backend: &mut dyn GpuBackend,
    load: &mut dyn Load,
    d: Duration,
    stop: &AtomicBool,
) -> Result<Vec<Option<PassStats>>, CalibrateError> {
    let first = backend.sample_all();
    let t0 = load.elapsed();
    let n = first.len();
    let (mut sum, mut count) = (vec![0.0; n], vec![0u32; n]);
    let mut last = first.clone();
    let mut left = d;
    while !left.is_zero() {
        if stop.load(Ordering::Relaxed) {
            return Err(CalibrateError::Interrupted);
        }
        let step = left.min(SAMPLE_EVERY);
        load.wait(step);
        left -= step;
        last = backend.sample_all();
        for (i, s) in last.iter().enumerate() {
            if let Some(p) = s.power_w.value() {
                sum[i] += p;
                count[i] += 1;
            }
        }
    }
    let secs = (load.elapsed() - t0).as_secs_f64();
    Ok((0..n)
        .map(|i| {
            let limit_w = last[i].power_limit_w.value()?;
            let by_energy = match (first[i].energy_j.value(), last[i].energy_j.value()) {
                (Some(a), Some(b)) if b > a && secs > 0.0 => Some((b - a) / secs),
                _ => None,
            };
            let by_samples = (count[i] > 0).then(|| sum[i] / f64::from(count[i]));
            Some(PassStats { power_w: by_energy.or(by_samples)?, limit_w })
        })
        .collect())
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn round4(v: f64) -> f64 {
    (v * 10_000.0).round() / 10_000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::sim::model::Preset;
    use crate::gpu::sim::workload::WorkloadKind;
    use crate::gpu::sim::{GpuSpec, SimBackend, SimNode};

    fn sim(specs: &[GpuSpec]) -> (SimBackend, SimLoad) {
        let clock = VirtualClock::new(0);
        let backend = SimBackend::new(SimNode::new(specs, 7), Arc::new(clock.clone()));
        let load = SimLoad::start(backend.handle(), clock);
        (backend, load)
    }

    #[test]
    fn the_curve_rises_with_the_limit_and_flattens_at_the_top() {
        let h100 = Preset::by_key("h100-sxm").unwrap();
        let l40s = Preset::by_key("l40s").unwrap();
        let (mut backend, mut load) = sim(&[
            GpuSpec::new(h100, WorkloadKind::Idle),
            GpuSpec::new(l40s, WorkloadKind::Training),
        ]);
        backend.set_power_limit(0, 550.0).unwrap();
        let c = run(&mut backend, &mut load, Settings::default(), 42, &Safety::default()).unwrap();
        assert_eq!((c.gpus.len(), c.load.as_str(), c.created_ms), (2, "sim-compute", 42));
        for curve in &c.gpus {
            let p = &curve.points;
            assert_eq!(p.len(), 6);
            assert!(p.windows(2).all(|w| w[0].limit_w > w[1].limit_w), "{p:?}");
            assert!(p.windows(2).all(|w| w[0].work_per_s >= w[1].work_per_s), "{p:?}");
            assert!(p.iter().all(|x| x.power_w <= x.limit_w + 1.0), "under the cap: {p:?}");
            assert_eq!(p[0].relative, 1.0);
            // Power falls faster than work: the lowest limit does the most work per watt.
            let eff = |x: &Point| x.work_per_s / x.power_w;
            assert!(eff(&p[5]) > eff(&p[0]) * 1.2, "{p:?}");
        }
        // The limits found at start are back.
        let s = backend.sample_all();
        assert_eq!(
            (s[0].power_limit_w.value(), s[1].power_limit_w.value()),
            (Some(550.0), Some(350.0))
        );
    }

    #[test]
    fn an_interrupted_sweep_puts_the_limits_back_and_kept_limits_win() {
        let h100 = Preset::by_key("h100-sxm").unwrap();
        let idle = GpuSpec::new(h100, WorkloadKind::Idle);
        let (mut backend, mut load) = sim(&[idle.clone(), idle]);
        backend.set_power_limit(0, 600.0).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let keep = dir.path().join("nvml/start-limits.json");
        let safety = Safety { keep: Some(keep.clone()), stop: Arc::new(AtomicBool::new(true)) };
        let e = run(&mut backend, &mut load, Settings::default(), 0, &safety).unwrap_err();
        assert!(matches!(e, CalibrateError::Interrupted), "{e}");
        let limits = |b: &mut SimBackend| -> Vec<Option<f64>> {
            b.sample_all().iter().map(|s| s.power_limit_w.value()).collect()
        };
        assert_eq!(limits(&mut backend), [Some(600.0), Some(700.0)]);
        assert!(!keep.exists(), "kept while it ran, removed once put back");

        // Limits left by a run that did not stop cleanly are the ones put back, and stay.
        let uuid = backend.inventory()[0].uuid.clone();
        write_start_limits(&keep, &[(uuid, 450.0)].into_iter().collect()).unwrap();
        let safety = Safety { keep: Some(keep.clone()), ..Safety::default() };
        let settings = Settings { steps: 2, ..Settings::default() };
        run(&mut backend, &mut load, settings, 0, &safety).unwrap();
        assert_eq!(limits(&mut backend), [Some(450.0), Some(700.0)]);
        assert!(keep.exists(), "the agent's next start still puts them back");
    }

    #[test]
    fn a_file_round_trips_and_bad_files_are_refused_with_the_reason() {
        let (mut backend, mut load) =
            sim(&[GpuSpec::new(Preset::by_key("a100-sxm4").unwrap(), WorkloadKind::Idle)]);
        let settings = Settings { steps: 3, ..Settings::default() };
        let c = run(&mut backend, &mut load, settings, 1, &Safety::default()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/calibration.json");
        c.save(&path).unwrap();
        assert_eq!(Calibration::load(&path).unwrap(), c);
        let curves = c.for_inventory(backend.inventory());
        assert_eq!(curves[0].as_ref().unwrap().points.len(), 3);
        let mut other = backend.inventory().to_vec();
        other[0].uuid = "GPU-other".into();
        assert_eq!(c.for_inventory(&other), vec![None]);

        let json = serde_json::to_string(&c).unwrap();
        for (bad, says) in [
            ("{", "expected a file written by `gpulet calibrate`"),
            (&json.replace(SCHEMA, "gpulet.calibration.v9"), "this gpulet reads"),
            (&json.replace("\"relative\":1.0", "\"relative\":1.5"), "relative at most 1"),
            (&json.replace("\"unit\"", "\"units\""), "unknown field"),
        ] {
            std::fs::write(&path, bad).unwrap();
            let e = Calibration::load(&path).unwrap_err().to_string();
            assert!(e.contains(says) && e.contains("calibration.json"), "{e}");
        }
    }
}
