//! The GPU abstraction: what the agent needs from a node's GPUs, behind one trait.
//!
//! The agent never talks to hardware directly. It sees a [`GpuBackend`]: an inventory
//! read once at start, a sample of every GPU per tick, a queue of asynchronous events
//! (XIDs), and one control, the power limit. Two sides implement it: [`sim`], a physical
//! model of a node used by the demo, the tests and the benchmarks, and [`nvml`], real
//! GPUs through NVML (tested in CI against a stand-in `libnvidia-ml` built from [`sim`]).
//!
//! Errors stay per GPU and per field. A GPU that stops answering marks its own sample
//! [`Health::Lost`] and its fields [`Reading::Failed`]; the other GPUs' samples are
//! untouched. A field the SKU does not have is [`Reading::Unsupported`], a value rather
//! than an error, and the inventory says so up front.

pub mod nvml;
pub mod restore;
pub mod sim;

use std::fmt;

use serde::Serialize;

/// One GPU's static description, read once when the backend opens.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuInfo {
    /// The backend's index for the GPU (NVML order, which is PCI bus order).
    pub index: u32,
    /// `GPU-xxxxxxxx-…`, stable across reboots; what jobs and operators should use.
    pub uuid: String,
    /// Marketing name, e.g. `NVIDIA H100 80GB HBM3`.
    pub name: String,
    pub memory_total_mib: u64,
    pub power_limit: PowerConstraints,
    /// The sample fields this GPU can report. Fields outside the set always read
    /// [`Reading::Unsupported`].
    pub fields: FieldSet,
    /// Whether the power limit can be set on this GPU at all.
    pub can_set_power_limit: bool,
    /// `DDDDDDDD:BB:DD.F`, when the backend knows it.
    pub pci_bus_id: Option<String>,
    /// Whether MIG is enabled; `None` where the GPU has no MIG.
    pub mig_enabled: Option<bool>,
}

/// The driver a backend talks to.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Driver {
    pub version: String,
    /// The CUDA version the driver supports, e.g. `12.4`.
    pub cuda: Option<String>,
}

/// The power-limit range the hardware accepts, in watts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PowerConstraints {
    pub min_w: f64,
    pub max_w: f64,
    /// The limit the GPU comes up with after a reset.
    pub default_w: f64,
}

impl PowerConstraints {
    pub fn clamp(&self, watts: f64) -> f64 {
        watts.clamp(self.min_w, self.max_w)
    }
}

/// A sample field, named as in telemetry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Field {
    PowerW,
    EnergyJ,
    TempC,
    UtilPct,
    MemUsedMib,
    SmClockMhz,
    PowerLimitW,
    Throttle,
    MemClockMhz,
    Ecc,
    RetiredPages,
    RemappedRows,
    Processes,
}

impl Field {
    pub const ALL: [Field; 13] = [
        Field::PowerW,
        Field::EnergyJ,
        Field::TempC,
        Field::UtilPct,
        Field::MemUsedMib,
        Field::SmClockMhz,
        Field::PowerLimitW,
        Field::Throttle,
        Field::MemClockMhz,
        Field::Ecc,
        Field::RetiredPages,
        Field::RemappedRows,
        Field::Processes,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Field::PowerW => "power_w",
            Field::EnergyJ => "energy_j",
            Field::TempC => "temp_c",
            Field::UtilPct => "util_pct",
            Field::MemUsedMib => "mem_used_mib",
            Field::SmClockMhz => "sm_clock_mhz",
            Field::PowerLimitW => "power_limit_w",
            Field::Throttle => "throttle",
            Field::MemClockMhz => "mem_clock_mhz",
            Field::Ecc => "ecc",
            Field::RetiredPages => "retired_pages",
            Field::RemappedRows => "remapped_rows",
            Field::Processes => "processes",
        }
    }

    pub fn from_name(name: &str) -> Option<Field> {
        Field::ALL.into_iter().find(|f| f.name() == name)
    }

    fn bit(self) -> u16 {
        1 << self as u16
    }
}

/// A set of [`Field`]s, as a bitmask (cheap to copy into every sample).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct FieldSet(u16);

impl FieldSet {
    pub const ALL: FieldSet = FieldSet((1 << Field::ALL.len()) - 1);
    pub const NONE: FieldSet = FieldSet(0);

    pub fn contains(self, f: Field) -> bool {
        self.0 & f.bit() != 0
    }
    pub fn with(self, f: Field) -> FieldSet {
        FieldSet(self.0 | f.bit())
    }
    pub fn without(self, f: Field) -> FieldSet {
        FieldSet(self.0 & !f.bit())
    }
    pub fn iter(self) -> impl Iterator<Item = Field> {
        Field::ALL.into_iter().filter(move |f| self.contains(*f))
    }
}

impl fmt::Debug for FieldSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

impl Serialize for FieldSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

/// One field of a sample: a value, or why there is none.
#[derive(Debug, Clone, PartialEq)]
pub enum Reading<T> {
    Value(T),
    /// The GPU does not have this field (known from the inventory; not an error).
    Unsupported,
    /// Reading it failed this time; the message says why.
    Failed(GpuError),
}

impl<T: Copy> Reading<T> {
    pub fn value(&self) -> Option<T> {
        self.as_ref().copied()
    }
}

impl<T> Reading<T> {
    pub fn as_ref(&self) -> Option<&T> {
        match self {
            Reading::Value(v) => Some(v),
            _ => None,
        }
    }

    /// The same reading in another unit or type.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Reading<U> {
        match self {
            Reading::Value(v) => Reading::Value(f(v)),
            Reading::Unsupported => Reading::Unsupported,
            Reading::Failed(e) => Reading::Failed(e),
        }
    }
}

/// Why a GPU clocks below its maximum, as NVML's clock-event reasons (same bits).
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Throttle(pub u64);

impl Throttle {
    pub const GPU_IDLE: Throttle = Throttle(0x1);
    pub const SW_POWER_CAP: Throttle = Throttle(0x4);
    pub const HW_SLOWDOWN: Throttle = Throttle(0x8);
    pub const SW_THERMAL: Throttle = Throttle(0x20);
    pub const HW_THERMAL: Throttle = Throttle(0x40);
    pub const HW_POWER_BRAKE: Throttle = Throttle(0x80);

    const NAMES: [(Throttle, &'static str); 6] = [
        (Throttle::GPU_IDLE, "gpu_idle"),
        (Throttle::SW_POWER_CAP, "sw_power_cap"),
        (Throttle::HW_SLOWDOWN, "hw_slowdown"),
        (Throttle::SW_THERMAL, "sw_thermal"),
        (Throttle::HW_THERMAL, "hw_thermal"),
        (Throttle::HW_POWER_BRAKE, "hw_power_brake"),
    ];

    pub fn contains(self, other: Throttle) -> bool {
        self.0 & other.0 == other.0
    }
    pub fn names(self) -> impl Iterator<Item = &'static str> {
        Self::NAMES.into_iter().filter(move |(t, _)| self.contains(*t)).map(|(_, n)| n)
    }
}

impl std::ops::BitOr for Throttle {
    type Output = Throttle;
    fn bitor(self, rhs: Throttle) -> Throttle {
        Throttle(self.0 | rhs.0)
    }
}

impl fmt::Debug for Throttle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.names()).finish()
    }
}

impl Serialize for Throttle {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.names())
    }
}

/// ECC error counts since the driver loaded (NVML's volatile counters), summed over
/// every memory location.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Ecc {
    /// Single-bit errors, corrected in hardware. A steady rise foretells failure.
    pub corrected: u64,
    /// Double-bit errors: the data was lost; the job that owned it is suspect.
    pub uncorrected: u64,
}

/// Row remapping (Ampere and later): memory rows replaced by spares after errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct RemappedRows {
    /// Rows remapped after correctable errors.
    pub correctable: u32,
    /// Rows remapped after uncorrectable errors.
    pub uncorrectable: u32,
    /// A remapping waits for the GPU to be reset.
    pub pending: bool,
    /// A remapping failed (no spare row left): the GPU should be replaced.
    pub failed: bool,
}

/// A process using a GPU (compute or graphics context).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct GpuProcess {
    pub pid: u32,
    /// GPU memory it holds; absent where the driver does not say (MIG, WDDM).
    pub used_mib: Option<u64>,
}

/// A GPU's health as the backend sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    Ok,
    /// Still answering, but an XID or error says it needs attention. Sticky until cleared.
    Degraded,
    /// Not answering (fallen off the bus, driver lost it).
    Lost,
}

impl Health {
    /// As serialised: `ok`, `degraded`, `lost`.
    pub fn name(self) -> &'static str {
        match self {
            Health::Ok => "ok",
            Health::Degraded => "degraded",
            Health::Lost => "lost",
        }
    }
}

/// One GPU's readings at one instant.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuSample {
    pub index: u32,
    pub power_w: Reading<f64>,
    /// Cumulative since the driver loaded; only ever grows.
    pub energy_j: Reading<f64>,
    pub temp_c: Reading<f64>,
    pub util_pct: Reading<f64>,
    pub mem_used_mib: Reading<u64>,
    pub sm_clock_mhz: Reading<u32>,
    /// The limit the GPU actually enforces (not merely the one last requested).
    pub power_limit_w: Reading<f64>,
    pub throttle: Reading<Throttle>,
    pub mem_clock_mhz: Reading<u32>,
    pub ecc: Reading<Ecc>,
    /// Pages retired after ECC errors (before Ampere; later GPUs remap rows instead).
    pub retired_pages: Reading<u32>,
    pub remapped_rows: Reading<RemappedRows>,
    pub processes: Reading<Vec<GpuProcess>>,
    pub health: Health,
}

impl GpuSample {
    /// A sample of a GPU that does not answer: every field failed, health lost.
    pub fn lost(index: u32, err: &GpuError) -> GpuSample {
        GpuSample {
            index,
            power_w: Reading::Failed(err.clone()),
            energy_j: Reading::Failed(err.clone()),
            temp_c: Reading::Failed(err.clone()),
            util_pct: Reading::Failed(err.clone()),
            mem_used_mib: Reading::Failed(err.clone()),
            sm_clock_mhz: Reading::Failed(err.clone()),
            power_limit_w: Reading::Failed(err.clone()),
            throttle: Reading::Failed(err.clone()),
            mem_clock_mhz: Reading::Failed(err.clone()),
            ecc: Reading::Failed(err.clone()),
            retired_pages: Reading::Failed(err.clone()),
            remapped_rows: Reading::Failed(err.clone()),
            processes: Reading::Failed(err.clone()),
            health: Health::Lost,
        }
    }

    /// The field errors of this sample, by field name, for telemetry.
    pub fn errors(&self) -> Vec<(Field, &GpuError)> {
        fn e<T>(f: Field, r: &Reading<T>) -> Option<(Field, &GpuError)> {
            match r {
                Reading::Failed(err) => Some((f, err)),
                _ => None,
            }
        }
        [
            e(Field::PowerW, &self.power_w),
            e(Field::EnergyJ, &self.energy_j),
            e(Field::TempC, &self.temp_c),
            e(Field::UtilPct, &self.util_pct),
            e(Field::MemUsedMib, &self.mem_used_mib),
            e(Field::SmClockMhz, &self.sm_clock_mhz),
            e(Field::PowerLimitW, &self.power_limit_w),
            e(Field::Throttle, &self.throttle),
            e(Field::MemClockMhz, &self.mem_clock_mhz),
            e(Field::Ecc, &self.ecc),
            e(Field::RetiredPages, &self.retired_pages),
            e(Field::RemappedRows, &self.remapped_rows),
            e(Field::Processes, &self.processes),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

/// Something a GPU reported between two samples.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct XidEvent {
    pub gpu: u32,
    pub code: u32,
    /// Milliseconds since the backend opened (monotonic).
    pub at_ms: u64,
}

/// What can go wrong talking to a GPU. Messages say what an operator should check.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GpuError {
    #[error(
        "GPU {0} is not answering (fallen off the bus?): check `dmesg` for XID 79 and the GPU's PCIe link"
    )]
    Lost(u32),
    #[error("GPU {gpu} does not support {what}")]
    NotSupported { gpu: u32, what: &'static str },
    #[error("no permission to {what} on GPU {gpu}: run as root or with CAP_SYS_ADMIN")]
    NoPermission { gpu: u32, what: &'static str },
    #[error("GPU {gpu}: {value} is out of range; accepted: {accepted}")]
    InvalidArgument { gpu: u32, value: String, accepted: String },
    #[error("there is no GPU {0} on this node")]
    NoSuchGpu(u32),
    #[error("GPU {gpu}: reading {field} failed: {message}")]
    FieldFailed { gpu: u32, field: &'static str, message: String },
    #[error("backend {backend} is not available in this build: {why}")]
    Unavailable { backend: &'static str, why: String },
    #[error("{0}")]
    Other(String),
}

/// The hardware seen by the agent. The contract every backend keeps:
///
/// - `inventory` is fixed for the backend's lifetime, indexed `0..n` in order.
/// - `sample_all` returns one sample per GPU of the inventory, in index order, and never
///   fails as a whole: a GPU's or a field's failure is recorded in that GPU's sample.
///   It must not block for long (it runs on the tick).
/// - `set_power_limit` takes watts within the GPU's [`PowerConstraints`] (callers
///   clamp first; a backend rejects anything outside with [`GpuError::InvalidArgument`])
///   and returns the limit the GPU enforces afterwards, read back.
/// - `drain_events` returns the events seen since the last call, without blocking.
pub trait GpuBackend: Send {
    /// Short name for logs and telemetry: `sim`, `nvml`.
    fn kind(&self) -> &'static str;
    fn inventory(&self) -> &[GpuInfo];
    fn sample_all(&mut self) -> Vec<GpuSample>;
    fn set_power_limit(&mut self, gpu: u32, watts: f64) -> Result<f64, GpuError>;
    fn drain_events(&mut self) -> Vec<XidEvent>;
    /// Clear a sticky `degraded` state (after an operator dealt with its cause). A lost
    /// GPU stays lost: it is not answering.
    fn clear_health(&mut self, gpu: u32) -> Result<(), GpuError>;
    /// The driver, where there is one.
    fn driver(&self) -> Option<Driver> {
        None
    }
    /// Make GPU `gpu` run a simulated workload (a job's, on the simulator); `None`
    /// returns it to idle. Real GPUs run what their jobs run: unsupported.
    fn run_workload(
        &mut self,
        gpu: u32,
        workload: Option<sim::workload::WorkloadKind>,
    ) -> Result<(), GpuError> {
        let _ = workload;
        Err(GpuError::NotSupported { gpu, what: "simulated workloads" })
    }
}

/// What an XID code means for an operator: a severity and what to do. The common codes
/// only; unknown codes are reported as `unknown` with the advice to look them up.
pub fn xid_info(code: u32) -> (&'static str, &'static str) {
    match code {
        13 => ("warn", "graphics engine exception: usually an application bug; check the job"),
        31 => ("warn", "GPU memory page fault: usually an application bug; check the job"),
        43 => ("info", "GPU stopped processing (user app fault); no action unless repeated"),
        45 => ("info", "preemptive cleanup after an application stopped; no action"),
        48 => ("critical", "double-bit ECC error: drain the GPU and reset it"),
        63 | 64 => ("warn", "ECC page retirement or row remap: reset the GPU when idle"),
        74 => ("critical", "NVLink error: check the NVLink/NVSwitch fabric, reset the GPU"),
        79 => ("critical", "GPU has fallen off the bus: drain the node, check PCIe and power"),
        92 => ("warn", "high single-bit ECC rate: watch; replace if it grows"),
        94 => ("warn", "contained ECC error: restart the affected application"),
        95 => ("critical", "uncontained ECC error: drain the GPU and reset it"),
        _ => ("unknown", "unknown XID: look it up in NVIDIA's XID catalogue"),
    }
}

/// Whether an XID leaves the GPU degraded until someone clears it.
pub fn xid_degrades(code: u32) -> bool {
    matches!(xid_info(code).0, "critical") || matches!(code, 63 | 64 | 92)
}
