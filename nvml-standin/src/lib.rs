//! A stand-in `libnvidia-ml.so` for machines without a GPU: the NVML C functions that
//! gpulet's NVML backend calls, served by gpulet's simulated node, so that the real NVML
//! code path (nvml-wrapper, symbol loading, the C ABI, return codes) runs in CI.
//!
//! Control, for tests, through the folder named by `GPULET_NVML_STANDIN` (optional):
//!
//! - `node.toml`: the simulated node, as the `[sim]` table of a gpulet config (default:
//!   8 × H100 training).
//! - `control`: lines appended by a test, applied in order at the next NVML call:
//!   `lost GPU`, `xid GPU CODE`, `clear GPU`, `deny-set` / `allow-set` (setting a limit
//!   returns NVML_ERROR_NO_PERMISSION, as without root; `deny-set GPU`: only on that GPU,
//!   which goes on answering everything else), `set GPU WATTS` (someone else
//!   changes a limit, as `nvidia-smi -pl` would), `unsupported GPU FIELD` (the SKU lacks
//!   a field, e.g. `energy_j` before Volta). An `xid` reaches the event API
//!   (`nvmlEventSetWait_v2`) for GPUs registered for XID events.
//! - `set.log`: one line `GPU WATTS` per limit this library was asked to set.
//! - `events.log`: one line `registered GPU` per GPU registered for XID events (an XID
//!   injected before that is not delivered, as with NVML).
//!
//! The simulation follows the wall clock from `nvmlInit`.
//!
//! The same library is also a stand-in `libcuda.so.1` (`cuda.rs`): linked under that name
//! (tests make a symlink), it serves the CUDA driver functions `gpulet calibrate` and
//! `gpulet diag` use, for the same simulated GPUs (same UUIDs), with two more control
//! lines: `cuda-busy GPU` (another process holds it) and `cuda-corrupt GPU` (its kernel
//! results are wrong).

// This crate is an FFI boundary: every exported function is `extern "C"` and writes its
// results through pointers its caller passes, as NVML's do. Each checks its pointers for
// null first. (Elsewhere `unsafe` is confined to cudarc launches and one raw NVML call.)
#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_uint, c_ulonglong};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Instant;

use gpulet::config::SimConfig;
use gpulet::gpu::sim::{Fault, SimNode};
use gpulet::gpu::{GpuInfo, GpuSample, Health, Reading};
use nvml_wrapper_sys::bindings::{
    nvmlDevice_t, nvmlEventData_t, nvmlEventSet_t, nvmlEventTypeXidCriticalError as XID_EVENT,
    nvmlMemory_v2_t, nvmlPciInfo_t, nvmlProcessInfo_t,
    nvmlReturn_enum_NVML_ERROR_GPU_IS_LOST as GPU_IS_LOST,
    nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_SIZE as INSUFFICIENT_SIZE,
    nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT as INVALID_ARGUMENT,
    nvmlReturn_enum_NVML_ERROR_NO_PERMISSION as NO_PERMISSION,
    nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED as NOT_SUPPORTED,
    nvmlReturn_enum_NVML_ERROR_TIMEOUT as TIMEOUT,
    nvmlReturn_enum_NVML_ERROR_UNINITIALIZED as UNINITIALIZED,
    nvmlReturn_enum_NVML_ERROR_UNKNOWN as UNKNOWN, nvmlReturn_enum_NVML_SUCCESS as SUCCESS,
    nvmlReturn_t, nvmlUtilization_t,
};

struct Standin {
    node: SimNode,
    inventory: Vec<GpuInfo>,
    started: Instant,
    dir: Option<PathBuf>,
    /// Lines of `control` applied so far.
    applied: usize,
    deny_set: bool,
    /// GPUs that refuse limit changes (`deny-set GPU`).
    deny_gpus: Vec<u32>,
    /// Samples of the current instant (NVML is asked one field at a time).
    cache: Option<Vec<GpuSample>>,
    /// GPUs registered for XID events, and XIDs not yet waited for.
    xid_gpus: Vec<u32>,
    xids: std::collections::VecDeque<(u32, u32)>,
    /// CUDA faults (see `cuda.rs`): GPUs another process holds, GPUs computing wrongly.
    cuda_busy: Vec<u32>,
    cuda_corrupt: Vec<u32>,
}

static STATE: Mutex<Option<Standin>> = Mutex::new(None);

impl Standin {
    fn open() -> Result<Standin, String> {
        let dir = std::env::var_os("GPULET_NVML_STANDIN").map(PathBuf::from);
        let cfg: SimConfig = match dir.as_ref().map(|d| d.join("node.toml")).filter(|p| p.exists())
        {
            Some(p) => {
                let text = std::fs::read_to_string(&p).map_err(|e| e.to_string())?;
                toml::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))?
            }
            None => SimConfig::default(),
        };
        let base = dir.clone().unwrap_or_default();
        let node = gpulet::setup::sim_node(&cfg, &base).map_err(|e| e.to_string())?;
        let inventory = node.inventory();
        Ok(Standin {
            node,
            inventory,
            started: Instant::now(),
            dir,
            applied: 0,
            deny_set: false,
            deny_gpus: Vec::new(),
            cache: None,
            xid_gpus: Vec::new(),
            xids: Default::default(),
            cuda_busy: Vec::new(),
            cuda_corrupt: Vec::new(),
        })
    }

    /// Follow the wall clock (in steps of at least 5 ms: NVML is asked one field at a
    /// time, and a driver's readings are not fresher than that either) and apply new
    /// control lines.
    fn update(&mut self) {
        let now = self.started.elapsed();
        if now.saturating_sub(self.node.now()).as_millis() >= 5 {
            self.node.advance_to(now);
            self.cache = None;
        }
        let Some(dir) = &self.dir else { return };
        let Ok(text) = std::fs::read_to_string(dir.join("control")) else { return };
        let lines: Vec<String> = text.lines().skip(self.applied).map(str::to_owned).collect();
        for line in lines {
            self.applied += 1;
            let w: Vec<&str> = line.split_whitespace().collect();
            let num = |i: usize| w.get(i).and_then(|x| x.parse::<f64>().ok());
            let gpu = num(1).map(|g| g as u32);
            match (w.first().copied(), gpu) {
                (Some("lost"), Some(g)) => self.node.inject(g, Fault::FallOffBus),
                (Some("xid"), Some(g)) => {
                    self.node.inject(g, Fault::Xid(num(2).unwrap_or(0.0) as u32))
                }
                (Some("clear"), Some(g)) => self.node.inject(g, Fault::Clear),
                (Some("set"), Some(g)) => {
                    let _ = self.node.set_power_limit(g, num(2).unwrap_or(0.0));
                }
                (Some("unsupported"), Some(g)) => {
                    match w.get(2).and_then(|f| gpulet::gpu::Field::from_name(f)) {
                        Some(f) => self.node.set_unsupported(g, f),
                        None => eprintln!("nvml stand-in: unknown field in {line:?}"),
                    }
                }
                (Some("cuda-busy"), Some(g)) => self.cuda_busy.push(g),
                (Some("cuda-corrupt"), Some(g)) => self.cuda_corrupt.push(g),
                (Some("deny-set"), Some(g)) => self.deny_gpus.push(g),
                (Some("deny-set"), None) => self.deny_set = true,
                (Some("allow-set"), _) => {
                    self.deny_set = false;
                    self.deny_gpus.clear();
                }
                _ => eprintln!("nvml stand-in: ignoring control line {line:?}"),
            }
            self.cache = None;
        }
        for x in self.node.drain_events() {
            if self.xid_gpus.contains(&x.gpu) {
                self.xids.push_back((x.gpu, x.code));
            }
        }
    }

    /// Append `line` to the file `name` of the control folder, if there is one.
    fn log(&self, name: &str, line: &str) {
        let Some(dir) = &self.dir else { return };
        let file = std::fs::OpenOptions::new().create(true).append(true).open(dir.join(name));
        if let Ok(mut f) = file {
            let _ = writeln!(f, "{line}");
        }
    }

    fn sample(&mut self, gpu: u32) -> Option<GpuSample> {
        if self.cache.is_none() {
            self.cache = Some(self.node.sample_all());
        }
        self.cache.as_ref().and_then(|s| s.get(gpu as usize).cloned())
    }
}

/// The stand-in's state, made on first use (CUDA has no `nvmlInit`; either library may
/// come first).
fn state() -> std::sync::MutexGuard<'static, Option<Standin>> {
    let mut guard = STATE.lock().unwrap_or_else(|p| p.into_inner());
    if guard.is_none() {
        match Standin::open() {
            Ok(s) => *guard = Some(s),
            Err(e) => eprintln!("nvml stand-in: {e}"),
        }
    }
    if let Some(s) = guard.as_mut() {
        s.update();
    }
    guard
}

/// Run `f` on the stand-in's state, or say it is not initialised.
fn with(f: impl FnOnce(&mut Standin) -> nvmlReturn_t) -> nvmlReturn_t {
    let mut guard = STATE.lock().unwrap_or_else(|p| p.into_inner());
    match guard.as_mut() {
        Some(s) => {
            s.update();
            f(s)
        }
        None => UNINITIALIZED,
    }
}

fn index(device: nvmlDevice_t) -> u32 {
    (device as usize).wrapping_sub(1) as u32
}

/// One field of a GPU's sample, as NVML returns it.
fn field<T: Copy>(
    s: &mut Standin,
    device: nvmlDevice_t,
    get: impl Fn(&GpuSample) -> &Reading<T>,
    out: impl FnOnce(T),
) -> nvmlReturn_t {
    let Some(sample) = s.sample(index(device)) else { return INVALID_ARGUMENT };
    if sample.health == Health::Lost {
        return GPU_IS_LOST;
    }
    match get(&sample) {
        Reading::Value(v) => {
            out(*v);
            SUCCESS
        }
        Reading::Unsupported => NOT_SUPPORTED,
        Reading::Failed(_) => UNKNOWN,
    }
}

/// Copy `text` into a C buffer of `len` bytes, NUL-terminated.
///
/// # Safety
/// `buf` must be valid for `len` bytes.
unsafe fn put_str(text: &str, buf: *mut c_char, len: c_uint) -> nvmlReturn_t {
    if buf.is_null() {
        return INVALID_ARGUMENT;
    }
    let bytes = text.as_bytes();
    if bytes.len() + 1 > len as usize {
        return INSUFFICIENT_SIZE;
    }
    // SAFETY: checked above that the buffer holds the text and its NUL.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr().cast::<c_char>(), buf, bytes.len());
        *buf.add(bytes.len()) = 0;
    }
    SUCCESS
}

/// Write `value` through `ptr`; a null pointer returns `null` (by default NVML's
/// INVALID_ARGUMENT; `cuda.rs` passes CUDA's).
macro_rules! out {
    ($ptr:expr, $value:expr) => {
        out!($ptr, $value, INVALID_ARGUMENT)
    };
    ($ptr:expr, $value:expr, $null:expr) => {{
        let p = $ptr;
        if p.is_null() {
            return $null;
        }
        // SAFETY: non-null, and the caller passes a pointer to a value of this type.
        unsafe { *p = $value };
    }};
}

mod cuda;

#[unsafe(no_mangle)]
pub extern "C" fn nvmlInit_v2() -> nvmlReturn_t {
    if state().is_some() { SUCCESS } else { UNKNOWN }
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlInitWithFlags(_flags: c_uint) -> nvmlReturn_t {
    nvmlInit_v2()
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlShutdown() -> nvmlReturn_t {
    SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlErrorString(result: nvmlReturn_t) -> *const c_char {
    let s: &'static [u8] = match result {
        SUCCESS => b"Success\0",
        UNINITIALIZED => b"Uninitialized\0",
        INVALID_ARGUMENT => b"Invalid Argument\0",
        NOT_SUPPORTED => b"Not Supported\0",
        NO_PERMISSION => b"Insufficient Permissions\0",
        INSUFFICIENT_SIZE => b"Insufficient Size\0",
        GPU_IS_LOST => b"GPU is lost\0",
        _ => b"Unknown Error\0",
    };
    s.as_ptr().cast()
}

/// # Safety
/// `version` must be valid for `length` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(
    version: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    // SAFETY: the caller's buffer, as NVML's contract.
    with(|_| unsafe { put_str("550.54.15-standin", version, length) })
}

/// # Safety
/// `version` must point to an int.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetCudaDriverVersion_v2(version: *mut c_int) -> nvmlReturn_t {
    with(|_| {
        out!(version, 12040);
        SUCCESS
    })
}

/// # Safety
/// `count` must point to an unsigned int.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(count: *mut c_uint) -> nvmlReturn_t {
    with(|s| {
        out!(count, s.inventory.len() as c_uint);
        SUCCESS
    })
}

/// # Safety
/// `device` must point to a device handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(
    i: c_uint,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    with(|s| {
        if i as usize >= s.inventory.len() {
            return INVALID_ARGUMENT;
        }
        // Handles are the index plus one, as an opaque pointer (never dereferenced).
        out!(device, (i as usize + 1) as nvmlDevice_t);
        SUCCESS
    })
}

fn info(s: &Standin, device: nvmlDevice_t) -> Option<&GpuInfo> {
    s.inventory.get(index(device) as usize)
}

/// # Safety
/// `name` must be valid for `length` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetName(
    device: nvmlDevice_t,
    name: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    with(|s| match info(s, device) {
        // SAFETY: the caller's buffer, as NVML's contract.
        Some(g) => unsafe { put_str(&g.name, name, length) },
        None => INVALID_ARGUMENT,
    })
}

/// # Safety
/// `uuid` must be valid for `length` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUUID(
    device: nvmlDevice_t,
    uuid: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    with(|s| match info(s, device) {
        // SAFETY: the caller's buffer, as NVML's contract.
        Some(g) => unsafe { put_str(&g.uuid, uuid, length) },
        None => INVALID_ARGUMENT,
    })
}

/// # Safety
/// `pci` must point to an `nvmlPciInfo_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPciInfo_v3(
    device: nvmlDevice_t,
    pci: *mut nvmlPciInfo_t,
) -> nvmlReturn_t {
    with(|s| {
        let Some(g) = info(s, device) else { return INVALID_ARGUMENT };
        if pci.is_null() {
            return INVALID_ARGUMENT;
        }
        let bus = 0x18 + g.index;
        let id = format!("00000000:{bus:02X}:00.0");
        // SAFETY: non-null, the caller's struct.
        let p = unsafe { &mut *pci };
        p.domain = 0;
        p.bus = bus;
        p.device = 0;
        p.pciDeviceId = 0x2330_10de;
        p.pciSubSystemId = 0x16c1_10de;
        p.busIdLegacy = [0; 16];
        p.busId = [0; 32];
        for (i, b) in id.bytes().enumerate() {
            p.busId[i] = b as c_char;
            if i < 15 {
                p.busIdLegacy[i] = b as c_char;
            }
        }
        SUCCESS
    })
}

/// # Safety
/// `memory` must point to an `nvmlMemory_v2_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: nvmlDevice_t,
    memory: *mut nvmlMemory_v2_t,
) -> nvmlReturn_t {
    with(|s| {
        let Some(total) = info(s, device).map(|g| g.memory_total_mib << 20) else {
            return INVALID_ARGUMENT;
        };
        if memory.is_null() {
            return INVALID_ARGUMENT;
        }
        field(
            s,
            device,
            |x| &x.mem_used_mib,
            |used| {
                // SAFETY: non-null, the caller's struct.
                let m = unsafe { &mut *memory };
                m.total = total;
                m.used = used << 20;
                m.free = total.saturating_sub(used << 20);
                m.reserved = 0;
            },
        )
    })
}

/// # Safety
/// `min` and `max` must point to unsigned ints.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPowerManagementLimitConstraints(
    device: nvmlDevice_t,
    min: *mut c_uint,
    max: *mut c_uint,
) -> nvmlReturn_t {
    with(|s| {
        let Some(c) = info(s, device).map(|g| g.power_limit) else { return INVALID_ARGUMENT };
        out!(min, (c.min_w * 1000.0) as c_uint);
        out!(max, (c.max_w * 1000.0) as c_uint);
        SUCCESS
    })
}

/// # Safety
/// `limit` must point to an unsigned int.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPowerManagementDefaultLimit(
    device: nvmlDevice_t,
    limit: *mut c_uint,
) -> nvmlReturn_t {
    with(|s| {
        let Some(c) = info(s, device).map(|g| g.power_limit) else { return INVALID_ARGUMENT };
        out!(limit, (c.default_w * 1000.0) as c_uint);
        SUCCESS
    })
}

/// # Safety
/// `limit` must point to an unsigned int.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetEnforcedPowerLimit(
    device: nvmlDevice_t,
    limit: *mut c_uint,
) -> nvmlReturn_t {
    if limit.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: non-null, the caller's value.
    with(|s| {
        field(
            s,
            device,
            |x| &x.power_limit_w,
            |w| unsafe { *limit = (w * 1000.0).round() as c_uint },
        )
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceSetPowerManagementLimit(
    device: nvmlDevice_t,
    limit: c_uint,
) -> nvmlReturn_t {
    with(|s| {
        let gpu = index(device);
        if s.deny_set || s.deny_gpus.contains(&gpu) {
            return NO_PERMISSION;
        }
        let Some(g) = s.inventory.get(gpu as usize) else { return INVALID_ARGUMENT };
        let w = f64::from(limit) / 1000.0;
        if w < g.power_limit.min_w || w > g.power_limit.max_w {
            return INVALID_ARGUMENT;
        }
        match s.node.set_power_limit(gpu, w) {
            Ok(_) => {
                s.cache = None;
                s.log("set.log", &format!("{gpu} {w}"));
                SUCCESS
            }
            Err(gpulet::gpu::GpuError::Lost(_)) => GPU_IS_LOST,
            Err(_) => UNKNOWN,
        }
    })
}

/// # Safety
/// `power` must point to an unsigned int.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPowerUsage(
    device: nvmlDevice_t,
    power: *mut c_uint,
) -> nvmlReturn_t {
    if power.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: non-null, the caller's value.
    with(|s| {
        field(s, device, |x| &x.power_w, |w| unsafe { *power = (w * 1000.0).round() as c_uint })
    })
}

/// # Safety
/// `energy` must point to an unsigned long long.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTotalEnergyConsumption(
    device: nvmlDevice_t,
    energy: *mut c_ulonglong,
) -> nvmlReturn_t {
    if energy.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: non-null, the caller's value.
    with(|s| {
        field(s, device, |x| &x.energy_j, |j| unsafe { *energy = (j * 1000.0) as c_ulonglong })
    })
}

/// # Safety
/// `temp` must point to an unsigned int.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTemperature(
    device: nvmlDevice_t,
    _sensor: c_uint,
    temp: *mut c_uint,
) -> nvmlReturn_t {
    if temp.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: non-null, the caller's value.
    with(|s| field(s, device, |x| &x.temp_c, |c| unsafe { *temp = c.round() as c_uint }))
}

/// # Safety
/// `util` must point to an `nvmlUtilization_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUtilizationRates(
    device: nvmlDevice_t,
    util: *mut nvmlUtilization_t,
) -> nvmlReturn_t {
    if util.is_null() {
        return INVALID_ARGUMENT;
    }
    with(|s| {
        field(
            s,
            device,
            |x| &x.util_pct,
            |u| {
                // SAFETY: non-null, the caller's struct.
                let p = unsafe { &mut *util };
                p.gpu = u.round() as c_uint;
                p.memory = (u * 0.6).round() as c_uint;
            },
        )
    })
}

/// # Safety
/// `clock` must point to an unsigned int.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetClockInfo(
    device: nvmlDevice_t,
    kind: c_uint,
    clock: *mut c_uint,
) -> nvmlReturn_t {
    if clock.is_null() {
        return INVALID_ARGUMENT;
    }
    // NVML_CLOCK_SM = 1 and NVML_CLOCK_MEM = 2 are the ones the simulator has.
    fn sm(x: &GpuSample) -> &Reading<u32> {
        &x.sm_clock_mhz
    }
    fn mem(x: &GpuSample) -> &Reading<u32> {
        &x.mem_clock_mhz
    }
    let get = match kind {
        1 => sm,
        2 => mem,
        _ => return NOT_SUPPORTED,
    };
    // SAFETY: non-null, the caller's value.
    with(|s| field(s, device, get, |mhz| unsafe { *clock = mhz }))
}

/// # Safety
/// `count` must point to an unsigned long long.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTotalEccErrors(
    device: nvmlDevice_t,
    error_type: c_uint,
    _counter_type: c_uint,
    count: *mut c_ulonglong,
) -> nvmlReturn_t {
    if count.is_null() || error_type > 1 {
        return INVALID_ARGUMENT;
    }
    // NVML_MEMORY_ERROR_TYPE_CORRECTED = 0, _UNCORRECTED = 1. Only volatile counts are
    // simulated; the aggregate ones read the same.
    with(|s| {
        field(
            s,
            device,
            |x| &x.ecc,
            // SAFETY: non-null, the caller's value.
            |e| unsafe { *count = if error_type == 0 { e.corrected } else { e.uncorrected } },
        )
    })
}

/// # Safety
/// `count` must point to an unsigned int. No page is ever retired in the simulator.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetRetiredPages(
    device: nvmlDevice_t,
    _cause: c_uint,
    count: *mut c_uint,
    _addresses: *mut c_ulonglong,
) -> nvmlReturn_t {
    if count.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: non-null, the caller's value.
    with(|s| field(s, device, |x| &x.retired_pages, |_| unsafe { *count = 0 }))
}

/// # Safety
/// Each pointer must point to an unsigned int.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetRemappedRows(
    device: nvmlDevice_t,
    corr: *mut c_uint,
    unc: *mut c_uint,
    pending: *mut c_uint,
    failed: *mut c_uint,
) -> nvmlReturn_t {
    if corr.is_null() || unc.is_null() || pending.is_null() || failed.is_null() {
        return INVALID_ARGUMENT;
    }
    with(|s| {
        field(
            s,
            device,
            |x| &x.remapped_rows,
            |r| {
                // SAFETY: non-null, the caller's values.
                unsafe {
                    *corr = r.correctable;
                    *unc = r.uncorrectable;
                    *pending = c_uint::from(r.pending);
                    *failed = c_uint::from(r.failed);
                }
            },
        )
    })
}

/// # Safety
/// `count` must point to an unsigned int, and `infos` (unless null) to `*count`
/// process records.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v3(
    device: nvmlDevice_t,
    count: *mut c_uint,
    infos: *mut nvmlProcessInfo_t,
) -> nvmlReturn_t {
    if count.is_null() {
        return INVALID_ARGUMENT;
    }
    with(|s| {
        let Some(sample) = s.sample(index(device)) else { return INVALID_ARGUMENT };
        let procs = match &sample.processes {
            _ if sample.health == Health::Lost => return GPU_IS_LOST,
            Reading::Value(p) => p,
            Reading::Unsupported => return NOT_SUPPORTED,
            Reading::Failed(_) => return UNKNOWN,
        };
        // SAFETY: non-null, the caller's value.
        let room = unsafe { std::mem::replace(&mut *count, procs.len() as c_uint) };
        if (room as usize) < procs.len() || (infos.is_null() && !procs.is_empty()) {
            return INSUFFICIENT_SIZE;
        }
        for (i, p) in procs.iter().enumerate() {
            let info = nvmlProcessInfo_t {
                pid: p.pid,
                usedGpuMemory: p.used_mib.map_or(c_ulonglong::MAX, |m| m << 20),
                gpuInstanceId: c_uint::MAX,
                computeInstanceId: c_uint::MAX,
            };
            // SAFETY: the caller said `infos` holds `room` records; i < procs.len() <= room.
            unsafe { *infos.add(i) = info };
        }
        SUCCESS
    })
}

/// # Safety
/// `count` must point to an unsigned int. The simulated GPUs run no graphics.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetGraphicsRunningProcesses_v3(
    _device: nvmlDevice_t,
    count: *mut c_uint,
    _infos: *mut nvmlProcessInfo_t,
) -> nvmlReturn_t {
    out!(count, 0);
    SUCCESS
}

/// # Safety
/// `reasons` must point to an unsigned long long.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCurrentClocksThrottleReasons(
    device: nvmlDevice_t,
    reasons: *mut c_ulonglong,
) -> nvmlReturn_t {
    if reasons.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: non-null, the caller's value.
    with(|s| field(s, device, |x| &x.throttle, |t| unsafe { *reasons = t.0 }))
}

/// MIG is not simulated: NOT_SUPPORTED, as on GPUs without it.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetMigMode(
    _device: nvmlDevice_t,
    _current: *mut c_uint,
    _pending: *mut c_uint,
) -> nvmlReturn_t {
    NOT_SUPPORTED
}

/// # Safety
/// `set` must point to an event set handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetCreate(set: *mut nvmlEventSet_t) -> nvmlReturn_t {
    with(|_| {
        // One set per process is all the backend uses; its handle is opaque.
        out!(set, 1usize as nvmlEventSet_t);
        SUCCESS
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlEventSetFree(_set: nvmlEventSet_t) -> nvmlReturn_t {
    SUCCESS
}

/// # Safety
/// `types` must point to an unsigned long long.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetSupportedEventTypes(
    device: nvmlDevice_t,
    types: *mut c_ulonglong,
) -> nvmlReturn_t {
    with(|s| {
        if info(s, device).is_none() {
            return INVALID_ARGUMENT;
        }
        out!(types, c_ulonglong::from(XID_EVENT));
        SUCCESS
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceRegisterEvents(
    device: nvmlDevice_t,
    types: c_ulonglong,
    _set: nvmlEventSet_t,
) -> nvmlReturn_t {
    with(|s| {
        let gpu = index(device);
        if info(s, device).is_none() || types & !c_ulonglong::from(XID_EVENT) != 0 {
            return NOT_SUPPORTED;
        }
        s.xid_gpus.push(gpu);
        // As with NVML, an XID before the registration is not delivered: tests wait for
        // this line before injecting one.
        s.log("events.log", &format!("registered {gpu}"));
        SUCCESS
    })
}

/// Wait up to `timeout_ms` for an XID of a registered GPU.
///
/// # Safety
/// `data` must point to an `nvmlEventData_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetWait_v2(
    _set: nvmlEventSet_t,
    data: *mut nvmlEventData_t,
    timeout_ms: c_uint,
) -> nvmlReturn_t {
    if data.is_null() {
        return INVALID_ARGUMENT;
    }
    let until = Instant::now() + std::time::Duration::from_millis(u64::from(timeout_ms));
    loop {
        let mut next = None;
        let r = with(|s| {
            next = s.xids.pop_front();
            SUCCESS
        });
        if r != SUCCESS {
            return r;
        }
        if let Some((gpu, code)) = next {
            // SAFETY: non-null, the caller's struct.
            let d = unsafe { &mut *data };
            d.device = (gpu as usize + 1) as nvmlDevice_t;
            d.eventType = c_ulonglong::from(XID_EVENT);
            d.eventData = c_ulonglong::from(code);
            d.gpuInstanceId = u32::MAX;
            d.computeInstanceId = u32::MAX;
            return SUCCESS;
        }
        if Instant::now() >= until {
            return TIMEOUT;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// # Safety
/// `index` must point to an unsigned int.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetIndex(
    device: nvmlDevice_t,
    index_out: *mut c_uint,
) -> nvmlReturn_t {
    with(|s| {
        let Some(g) = info(s, device) else { return INVALID_ARGUMENT };
        out!(index_out, g.index);
        SUCCESS
    })
}
