//! The NVML backend: real GPUs through `libnvidia-ml.so.1`, loaded at run time
//! (nvml-wrapper, libloading), so that the binary builds and starts on machines without
//! NVIDIA libraries and fails, if asked for NVML there, with a message saying what to do.
//!
//! - The inventory is read once, with a probe of every sample field: a field this SKU
//!   does not have (GeForce, MIG instances) is left out of the GPU's field set, so it is
//!   reported as unsupported once, up front, and never asked for again.
//! - A GPU that stops answering is `Lost` in its own sample; the others go on.
//! - A limit is set in milliwatts and read back as the *enforced* limit.
//! - Energy: the GPU's counter where it has one (Volta and later); otherwise power is
//!   integrated between samples (trapezoids), from 0 when the backend opened.
//! - XID errors arrive through NVML's event API on a thread of their own (waiting on the
//!   event set never blocks the tick); `drain_events` takes what arrived. A critical XID
//!   leaves the GPU `degraded` until cleared.

use std::ffi::OsStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Instant;

use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{
    Clock, EccCounter, MemoryError, RetirementCause, TemperatureSensor,
};
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, Nvml};
use tracing::warn;

use super::{
    Driver, Ecc, Field, FieldSet, GpuBackend, GpuError, GpuInfo, GpuProcess, GpuSample, Health,
    PowerConstraints, Reading, RemappedRows, Throttle, XidEvent,
};

/// Where the library is looked for when neither the config nor the environment says.
pub const DEFAULT_LIBRARY: &str = "libnvidia-ml.so.1";

pub struct NvmlBackend {
    nvml: Arc<Nvml>,
    inventory: Vec<GpuInfo>,
    /// XIDs from the event thread, and the flag that stops it.
    xids: mpsc::Receiver<XidEvent>,
    stop: Arc<AtomicBool>,
    /// Sticky health from XIDs (a lost GPU is seen when sampling).
    health: Vec<Health>,
    /// For GPUs without an energy counter: energy integrated from power.
    integrated: Vec<Option<Integrator>>,
    /// The driver's versions, for the inventory and the birth message.
    pub driver_version: String,
    pub cuda_version: Option<i32>,
}

impl std::fmt::Debug for NvmlBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlBackend")
            .field("gpus", &self.inventory.len())
            .field("driver", &self.driver_version)
            .finish()
    }
}

/// What an NVML error means for GPU `gpu`, in words an operator can act on.
fn gpu_error(gpu: u32, what: &'static str, e: NvmlError) -> GpuError {
    match e {
        NvmlError::GpuLost => GpuError::Lost(gpu),
        NvmlError::NotSupported => GpuError::NotSupported { gpu, what },
        NvmlError::NoPermission => GpuError::NoPermission { gpu, what },
        NvmlError::InvalidArg => GpuError::InvalidArgument {
            gpu,
            value: what.into(),
            accepted: "see the GPU's constraints".into(),
        },
        e => GpuError::FieldFailed { gpu, field: what, message: e.to_string() },
    }
}

impl NvmlBackend {
    /// Load NVML from `library` and read the inventory.
    pub fn open(library: &OsStr) -> Result<NvmlBackend, GpuError> {
        let nvml = Nvml::builder().lib_path(library).init().map_err(|e| {
            let lib = library.to_string_lossy();
            let why = match e {
                NvmlError::LibloadingError(e) => format!(
                    "cannot load {lib}: {e}. Install the NVIDIA driver, or point [nvml] library (or GPULET_NVML_LIBRARY) at libnvidia-ml.so.1"
                ),
                NvmlError::DriverNotLoaded => "the NVIDIA kernel driver is not loaded: check `lsmod | grep nvidia` and `dmesg`".into(),
                NvmlError::NoPermission => "no permission to open the GPUs: check the permissions of /dev/nvidia*".into(),
                e => format!("NVML failed to initialise from {lib}: {e}"),
            };
            GpuError::Unavailable { backend: "nvml", why }
        })?;
        let count = nvml
            .device_count()
            .map_err(|e| GpuError::Other(format!("NVML cannot count the GPUs: {e}")))?;
        let mut inventory = Vec::with_capacity(count as usize);
        let mut integrated = Vec::with_capacity(count as usize);
        for index in 0..count {
            let dev = nvml.device_by_index(index).map_err(|e| gpu_error(index, "open", e))?;
            let name = dev.name().unwrap_or_else(|_| "unknown NVIDIA GPU".into());
            let uuid = dev.uuid().map_err(|e| gpu_error(index, "read its UUID", e))?;
            let memory_total_mib = dev.memory_info().map(|m| m.total >> 20).unwrap_or(0);
            let (power_limit, can_set_power_limit) = match (
                dev.power_management_limit_constraints(),
                dev.power_management_limit_default(),
            ) {
                (Ok(c), Ok(d)) => (
                    PowerConstraints {
                        min_w: f64::from(c.min_limit) / 1000.0,
                        max_w: f64::from(c.max_limit) / 1000.0,
                        default_w: f64::from(d) / 1000.0,
                    },
                    c.max_limit > c.min_limit,
                ),
                // No power management: report the enforced limit as a fixed range.
                _ => {
                    let w =
                        dev.enforced_power_limit().map(|mw| f64::from(mw) / 1000.0).unwrap_or(0.0);
                    (PowerConstraints { min_w: w, max_w: w, default_w: w }, false)
                }
            };
            let mut fields = FieldSet::ALL;
            for f in Field::ALL {
                if let Reading::Unsupported = probe(&dev, f) {
                    fields = fields.without(f);
                }
            }
            let integrate = !fields.contains(Field::EnergyJ) && fields.contains(Field::PowerW);
            integrated.push(integrate.then(Integrator::default));
            let pci_bus_id = dev.pci_info().ok().map(|p| p.bus_id);
            let mig_enabled = dev.mig_mode().ok().map(|m| m.current == 1);
            inventory.push(GpuInfo {
                index,
                uuid,
                name,
                memory_total_mib,
                power_limit,
                fields,
                can_set_power_limit,
                pci_bus_id,
                mig_enabled,
            });
        }
        let driver_version = nvml.sys_driver_version().unwrap_or_default();
        let cuda_version = nvml.sys_cuda_driver_version().ok();
        let nvml = Arc::new(nvml);
        let (tx, xids) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let (n, watcher, flag) = (count, nvml.clone(), stop.clone());
        std::thread::Builder::new()
            .name("gpulet-xid".into())
            .spawn(move || watch_xids(&watcher, n, &tx, &flag))
            .map_err(|e| GpuError::Other(format!("cannot start the XID event thread: {e}")))?;
        let health = vec![Health::Ok; inventory.len()];
        // What the agent reports: energy is there, counted or integrated.
        for (g, i) in inventory.iter_mut().zip(&integrated) {
            if i.is_some() {
                g.fields = g.fields.with(Field::EnergyJ);
            }
        }
        Ok(NvmlBackend {
            nvml,
            inventory,
            xids,
            stop,
            health,
            integrated,
            driver_version,
            cuda_version,
        })
    }
}

impl Drop for NvmlBackend {
    fn drop(&mut self) {
        // The thread sees it within one wait (0.5 s) and ends; nothing waits for it.
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Wait for XID events on every GPU that has them, until `stop`.
fn watch_xids(nvml: &Nvml, gpus: u32, tx: &mpsc::Sender<XidEvent>, stop: &AtomicBool) {
    let started = Instant::now();
    let mut set = match nvml.create_event_set() {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "NVML events are not available: XID errors will not be reported");
            return;
        }
    };
    let mut watched = 0;
    for i in 0..gpus {
        let Ok(dev) = nvml.device_by_index(i) else { continue };
        let supported =
            dev.supported_event_types().is_ok_and(|t| t.contains(EventTypes::CRITICAL_XID_ERROR));
        if !supported {
            warn!(gpu = i, "this GPU does not report XID events through NVML");
            continue;
        }
        match dev.register_events(EventTypes::CRITICAL_XID_ERROR, set) {
            Ok(s) => {
                set = s;
                watched += 1;
            }
            Err(e) => {
                // NVML frees the set on a failed registration: no events at all.
                warn!(gpu = i, error = %e.error, "cannot register for XID events; XID errors will not be reported");
                return;
            }
        }
    }
    if watched == 0 {
        return;
    }
    while !stop.load(Ordering::Relaxed) {
        match set.wait(500) {
            Ok(data) => {
                let code = match data.event_data {
                    Some(XidError::Value(v)) => v as u32,
                    _ => 0,
                };
                let gpu = data.device.index().unwrap_or(u32::MAX);
                let at_ms = started.elapsed().as_millis() as u64;
                if tx.send(XidEvent { gpu, code, at_ms }).is_err() {
                    return;
                }
            }
            Err(NvmlError::Timeout) => {}
            Err(e) => {
                warn!(error = %e, "waiting for NVML events failed; retrying in 1 s");
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        }
    }
}

/// Read one numeric field: a value, unsupported, or failed.
fn probe(dev: &Device<'_>, f: Field) -> Reading<f64> {
    let r: Result<f64, NvmlError> = match f {
        Field::PowerW => dev.power_usage().map(|mw| f64::from(mw) / 1000.0),
        Field::EnergyJ => dev.total_energy_consumption().map(|mj| mj as f64 / 1000.0),
        Field::TempC => dev.temperature(TemperatureSensor::Gpu).map(f64::from),
        Field::UtilPct => dev.utilization_rates().map(|u| f64::from(u.gpu)),
        Field::MemUsedMib => dev.memory_info().map(|m| (m.used >> 20) as f64),
        Field::SmClockMhz => dev.clock_info(Clock::SM).map(f64::from),
        Field::MemClockMhz => dev.clock_info(Clock::Memory).map(f64::from),
        Field::PowerLimitW => dev.enforced_power_limit().map(|mw| f64::from(mw) / 1000.0),
        Field::Throttle => dev.current_throttle_reasons().map(|t| t.bits() as f64),
        Field::Ecc => return read_ecc(dev).map(|e| e.uncorrected as f64),
        Field::RetiredPages => return read_retired_pages(dev).map(f64::from),
        Field::RemappedRows => return read_remapped_rows(dev).map(|r| f64::from(r.uncorrectable)),
        Field::Processes => return read_processes(dev).map(|p| p.len() as f64),
    };
    reading(dev, f, r)
}

fn reading<T>(dev: &Device<'_>, f: Field, r: Result<T, NvmlError>) -> Reading<T> {
    match r {
        Ok(v) => Reading::Value(v),
        // An older driver without the function: the same as a GPU without the field.
        Err(NvmlError::NotSupported | NvmlError::FailedToLoadSymbol(_)) => Reading::Unsupported,
        Err(e) => Reading::Failed(gpu_error(dev.index().unwrap_or(u32::MAX), f.name(), e)),
    }
}

fn read_ecc(dev: &Device<'_>) -> Reading<Ecc> {
    let count = |kind| dev.total_ecc_errors(kind, EccCounter::Volatile);
    let r = count(MemoryError::Corrected)
        .and_then(|corrected| Ok(Ecc { corrected, uncorrected: count(MemoryError::Uncorrected)? }));
    reading(dev, Field::Ecc, r)
}

fn read_retired_pages(dev: &Device<'_>) -> Reading<u32> {
    let count = |cause| dev.retired_pages(cause).map(|p| p.len() as u32);
    let r = count(RetirementCause::MultipleSingleBitEccErrors)
        .and_then(|single| Ok(single + count(RetirementCause::DoubleBitEccError)?));
    reading(dev, Field::RetiredPages, r)
}

/// nvml-wrapper 0.13 has no safe call for `nvmlDeviceGetRemappedRows`: the one raw NVML
/// call in the agent.
#[allow(unsafe_code)]
fn read_remapped_rows(dev: &Device<'_>) -> Reading<RemappedRows> {
    let r =
        (|| {
            let sym =
                dev.nvml().lib().nvmlDeviceGetRemappedRows.as_ref().map_err(|_| {
                    NvmlError::FailedToLoadSymbol("nvmlDeviceGetRemappedRows".into())
                })?;
            let (mut corr, mut unc, mut pending, mut failed) = (0, 0, 0, 0);
            // SAFETY: the handle belongs to the live `Nvml` that `dev` borrows, and the four
            // pointers are to locals of the unsigned-int type NVML writes.
            let ret = unsafe { sym(dev.handle(), &mut corr, &mut unc, &mut pending, &mut failed) };
            nvml_wrapper::error::nvml_try(ret)?;
            Ok(RemappedRows {
                correctable: corr,
                uncorrectable: unc,
                pending: pending != 0,
                failed: failed != 0,
            })
        })();
    reading(dev, Field::RemappedRows, r)
}

/// A field read by its own function, where the GPU has it.
fn typed<T>(
    info: &GpuInfo,
    dev: &Device<'_>,
    f: Field,
    get: fn(&Device<'_>) -> Reading<T>,
) -> Reading<T> {
    if info.fields.contains(f) { get(dev) } else { Reading::Unsupported }
}

/// Compute and graphics processes, one entry per process (a process with both kinds of
/// context is listed by both calls).
fn read_processes(dev: &Device<'_>) -> Reading<Vec<GpuProcess>> {
    let r = dev.running_compute_processes().and_then(|mut all| {
        match dev.running_graphics_processes() {
            Ok(g) => all.extend(g),
            // Data-centre GPUs without a display engine do not list graphics processes
            // (nor do old drivers without the call).
            Err(NvmlError::NotSupported | NvmlError::FailedToLoadSymbol(_)) => {}
            Err(e) => return Err(e),
        }
        let mut seen = std::collections::BTreeMap::new();
        for p in all {
            let used = match p.used_gpu_memory {
                UsedGpuMemory::Used(b) => Some(b >> 20),
                UsedGpuMemory::Unavailable => None,
            };
            let e = seen.entry(p.pid).or_insert(None);
            *e = (*e).max(used);
        }
        Ok(seen.into_iter().map(|(pid, used_mib)| GpuProcess { pid, used_mib }).collect())
    });
    reading(dev, Field::Processes, r)
}

impl GpuBackend for NvmlBackend {
    fn kind(&self) -> &'static str {
        "nvml"
    }

    fn inventory(&self) -> &[GpuInfo] {
        &self.inventory
    }

    fn sample_all(&mut self) -> Vec<GpuSample> {
        let now = Instant::now();
        let mut out = Vec::with_capacity(self.inventory.len());
        for (info, acc) in self.inventory.iter().zip(&mut self.integrated) {
            let i = info.index;
            let dev = match self.nvml.device_by_index(i) {
                Ok(d) => d,
                Err(e) => {
                    out.push(GpuSample::lost(i, &gpu_error(i, "open", e)));
                    continue;
                }
            };
            let read = |f: Field| {
                if info.fields.contains(f) { probe(&dev, f) } else { Reading::Unsupported }
            };
            let power_w = read(Field::PowerW);
            let energy_j = match (acc, &power_w) {
                (Some(acc), Reading::Value(p)) => Reading::Value(acc.add(now, *p)),
                (Some(_), other) => other.clone(),
                (None, _) => read(Field::EnergyJ),
            };
            let sample = GpuSample {
                index: i,
                power_w,
                energy_j,
                temp_c: read(Field::TempC),
                util_pct: read(Field::UtilPct),
                mem_used_mib: read(Field::MemUsedMib).map(|v| v as u64),
                sm_clock_mhz: read(Field::SmClockMhz).map(|v| v as u32),
                power_limit_w: read(Field::PowerLimitW),
                throttle: read(Field::Throttle).map(|v| Throttle(v as u64)),
                mem_clock_mhz: read(Field::MemClockMhz).map(|v| v as u32),
                ecc: typed(info, &dev, Field::Ecc, read_ecc),
                retired_pages: typed(info, &dev, Field::RetiredPages, read_retired_pages),
                remapped_rows: typed(info, &dev, Field::RemappedRows, read_remapped_rows),
                processes: typed(info, &dev, Field::Processes, read_processes),
                health: self.health[i as usize],
            };
            // A GPU that stops answering mid-sample is lost as a whole.
            if sample.errors().iter().any(|(_, e)| matches!(e, GpuError::Lost(_))) {
                out.push(GpuSample::lost(i, &GpuError::Lost(i)));
            } else {
                out.push(sample);
            }
        }
        out
    }

    fn set_power_limit(&mut self, gpu: u32, watts: f64) -> Result<f64, GpuError> {
        let info = self.inventory.get(gpu as usize).ok_or(GpuError::NoSuchGpu(gpu))?;
        let c = info.power_limit;
        if !info.can_set_power_limit {
            return Err(GpuError::NotSupported { gpu, what: "setting the power limit" });
        }
        if !(c.min_w..=c.max_w).contains(&watts) {
            return Err(GpuError::InvalidArgument {
                gpu,
                value: format!("{watts} W"),
                accepted: format!("{} to {} W", c.min_w, c.max_w),
            });
        }
        let mut dev = self.nvml.device_by_index(gpu).map_err(|e| gpu_error(gpu, "open", e))?;
        dev.set_power_management_limit((watts * 1000.0).round() as u32)
            .map_err(|e| gpu_error(gpu, "set the power limit", e))?;
        let enforced = dev
            .enforced_power_limit()
            .map_err(|e| gpu_error(gpu, "read the enforced power limit", e))?;
        Ok(f64::from(enforced) / 1000.0)
    }

    fn drain_events(&mut self) -> Vec<XidEvent> {
        let events: Vec<XidEvent> =
            self.xids.try_iter().filter(|x| (x.gpu as usize) < self.health.len()).collect();
        for x in &events {
            if super::xid_degrades(x.code) {
                self.health[x.gpu as usize] = Health::Degraded;
            }
        }
        events
    }

    fn driver(&self) -> Option<Driver> {
        let cuda = self.cuda_version.map(|v| format!("{}.{}", v / 1000, (v % 1000) / 10));
        Some(Driver { version: self.driver_version.clone(), cuda })
    }

    fn clear_health(&mut self, gpu: u32) -> Result<(), GpuError> {
        let h = self.health.get_mut(gpu as usize).ok_or(GpuError::NoSuchGpu(gpu))?;
        *h = Health::Ok;
        Ok(())
    }
}

/// Energy from power samples, for GPUs without an energy counter.
#[derive(Debug, Default)]
struct Integrator {
    last: Option<(Instant, f64)>,
    joules: f64,
}

impl Integrator {
    /// Add the power seen at `at` (trapezoid from the previous sample); the total, J.
    fn add(&mut self, at: Instant, power_w: f64) -> f64 {
        if let Some((t, p)) = self.last {
            self.joules += (p + power_w) / 2.0 * at.saturating_duration_since(t).as_secs_f64();
        }
        self.last = Some((at, power_w));
        self.joules
    }
}
