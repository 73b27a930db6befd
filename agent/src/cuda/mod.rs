//! CUDA, for `gpulet calibrate` and `gpulet diag`: a compute load on each GPU and a quick
//! health check, through cudarc with `libcuda.so` loaded at run time. The agent itself
//! never uses CUDA; without it these two commands fail with a message saying what to
//! install, and everything else runs.
//!
//! The kernel is embedded PTX ([`BURN_PTX`]): no CUDA toolkit at build or run time, the
//! driver compiles it for the GPU. It does FP32 FMAs in registers, the compute-bound
//! work whose speed the power limit governs, and its output is checked bit for bit
//! against the same arithmetic on the CPU ([`burn_reference`]).
//!
//! CUDA numbers GPUs its own way (fastest first, minus what `CUDA_VISIBLE_DEVICES`
//! hides), so each GPU is found by its UUID, never by index.

// cudarc's kernel launch and its check for the library are `unsafe`: the launch because
// the argument list must match the kernel's signature (here: a pointer to `n` floats and
// an unsigned count, checked where `launch` is called), the check because loading a
// library runs its initialisers (libcuda's, which are what loading it is for).
#![allow(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DriverError, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::Ptx;
use serde::Serialize;

use crate::gpu::GpuInfo;

/// The kernel (see the comments in the file).
pub const BURN_PTX: &str = include_str!("burn.ptx");
const THREADS_PER_BLOCK: u32 = 256;
/// Blocks per SM: enough warps to keep every FP32 pipe busy.
const BLOCKS_PER_SM: u32 = 8;
/// FLOPs per thread per iteration: 16 FMAs.
const FLOP_PER_ITERATION: u64 = 32;
/// How long one launch of the calibration load should take: long enough that launch
/// overhead is negligible, short enough that stopping is quick and the work count fine.
const LAUNCH_TARGET: Duration = Duration::from_millis(20);

/// What can go wrong with CUDA. Messages say what to check.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CudaError {
    #[error(
        "CUDA is not available: libcuda.so.1 (the NVIDIA driver's CUDA library) was not found. Install the NVIDIA driver, or in a container run with the NVIDIA container toolkit (--gpus all) so that the driver's libraries are mounted"
    )]
    NoLibrary,
    #[error("GPU {gpu} ({uuid}) is not visible to CUDA: check CUDA_VISIBLE_DEVICES")]
    NotVisible { gpu: u32, uuid: String },
    #[error("GPU {gpu}: {step} failed: {error}")]
    Step { gpu: u32, step: &'static str, error: String },
    /// Another process holds the GPU (exclusive compute mode) or its memory.
    #[error("GPU {gpu} is busy ({step}: {error}): another process holds it or its memory")]
    Busy { gpu: u32, step: &'static str, error: String },
    #[error("CUDA: {0}")]
    Other(String),
}

/// Whether `libcuda` can be loaded; the error says how to get it.
pub fn available() -> Result<(), CudaError> {
    // SAFETY: loading libcuda runs its initialisers, which is what any CUDA use does;
    // the library is NVIDIA's driver library or nothing.
    if unsafe { cudarc::driver::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(CudaError::NoLibrary)
    }
}

/// `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, as NVML writes it.
fn uuid_string(bytes: &[std::ffi::c_char; 16]) -> String {
    let b: Vec<u8> = bytes.iter().map(|&c| c as u8).collect();
    let hex =
        |r: std::ops::Range<usize>| b[r].iter().map(|x| format!("{x:02x}")).collect::<String>();
    format!("GPU-{}-{}-{}-{}-{}", hex(0..4), hex(4..6), hex(6..8), hex(8..10), hex(10..16))
}

/// A CUDA context on the GPU NVML calls `gpu`, found by UUID (without making a context
/// on any other GPU: each costs hundreds of MiB of GPU memory).
fn context(gpu: &GpuInfo) -> Result<Arc<CudaContext>, CudaError> {
    use cudarc::driver::result::{device, init};
    available()?;
    let i = gpu.index;
    init().map_err(failed(i, "initialising CUDA (cuInit)"))?;
    let count = device::get_count().map_err(failed(i, "counting the GPUs"))?;
    for ordinal in 0..count.max(0) {
        let dev = device::get(ordinal).map_err(failed(i, "opening a GPU"))?;
        let uuid = device::get_uuid(dev).map_err(failed(i, "reading a GPU's UUID"))?;
        if uuid_string(&uuid.bytes).eq_ignore_ascii_case(&gpu.uuid) {
            return CudaContext::new(ordinal as usize).map_err(failed(i, "creating a context"));
        }
    }
    Err(CudaError::NotVisible { gpu: i, uuid: gpu.uuid.clone() })
}

/// The kernel loaded on a context, with a grid that fills the GPU and its output buffer.
struct Burner {
    gpu: u32,
    stream: Arc<CudaStream>,
    func: CudaFunction,
    grid: u32,
    out: CudaSlice<f32>,
}

impl Burner {
    fn new(gpu: u32, ctx: &Arc<CudaContext>) -> Result<Burner, CudaError> {
        let module =
            ctx.load_module(Ptx::from_src(BURN_PTX)).map_err(failed(gpu, "loading the kernel"))?;
        let func = module.load_function("burn").map_err(failed(gpu, "loading the kernel"))?;
        let sms = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(failed(gpu, "reading the SM count"))?;
        let grid = sms.max(1) as u32 * BLOCKS_PER_SM;
        let stream = ctx.default_stream();
        let out = stream
            .alloc_zeros::<f32>((grid * THREADS_PER_BLOCK) as usize)
            .map_err(failed(gpu, "allocating the kernel's output"))?;
        Ok(Burner { gpu, stream, func, grid, out })
    }

    fn threads(&self) -> u32 {
        self.grid * THREADS_PER_BLOCK
    }

    /// Run the kernel once and wait for it.
    fn run(&mut self, iterations: u32) -> Result<(), CudaError> {
        let cfg = LaunchConfig {
            grid_dim: (self.grid, 1, 1),
            block_dim: (THREADS_PER_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = self.stream.launch_builder(&self.func);
        launch.arg(&mut self.out).arg(&iterations);
        // SAFETY: `burn(float *out, unsigned iterations)` writes out[id] for each of the
        // grid × block threads, and `out` holds exactly that many floats.
        unsafe { launch.launch(cfg) }.map_err(failed(self.gpu, "launching the kernel"))?;
        self.stream.synchronize().map_err(failed(self.gpu, "running the kernel"))
    }

    /// What each thread stored in the last run.
    fn result(&self) -> Result<Vec<f32>, CudaError> {
        self.stream.clone_dtoh(&self.out).map_err(failed(self.gpu, "reading the kernel's result"))
    }
}

/// The error of a CUDA call made for `step` on GPU `gpu`.
fn failed(gpu: u32, step: &'static str) -> impl Fn(DriverError) -> CudaError {
    use cudarc::driver::sys::CUresult;
    move |e| match e.0 {
        CUresult::CUDA_ERROR_OUT_OF_MEMORY | CUresult::CUDA_ERROR_DEVICE_UNAVAILABLE => {
            CudaError::Busy { gpu, step, error: e.to_string() }
        }
        _ => CudaError::Step { gpu, step, error: e.to_string() },
    }
}

/// What the kernel stores for thread `id` after `iterations`, computed on the CPU.
pub fn burn_reference(id: u32, iterations: u32) -> f32 {
    const A: f32 = 0.999;
    const B: f32 = 0.001;
    let base = id as f32 * (1.0 / 32768.0);
    let mut x: [f32; 8] = std::array::from_fn(|k| if k == 0 { base } else { base + k as f32 });
    for _ in 0..iterations {
        for _ in 0..2 {
            for v in &mut x {
                *v = v.mul_add(A, B);
            }
        }
    }
    x.iter().skip(1).fold(x[0], |s, v| s + v)
}

/// The calibration load: the kernel running back to back on each GPU, each on a thread
/// of its own, counting the FLOPs of every launch that finished.
pub struct CudaLoad {
    /// Per GPU of the inventory; `None` for one without the load.
    flops: Vec<Option<Arc<AtomicU64>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Result<(), CudaError>>>,
    started: Instant,
}

impl CudaLoad {
    /// Start the load on the GPUs of `inventory` that `on` picks (concurrently, as a real
    /// job would run).
    pub fn start(
        inventory: &[GpuInfo],
        on: impl Fn(&GpuInfo) -> bool,
    ) -> Result<CudaLoad, CudaError> {
        available()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flops = vec![None; inventory.len()];
        let mut load = CudaLoad { flops, stop, threads: Vec::new(), started: Instant::now() };
        for g in inventory.iter().filter(|g| on(g)) {
            let (counter, stop) = (Arc::new(AtomicU64::new(0)), load.stop.clone());
            load.flops[g.index as usize] = Some(counter.clone());
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let g = g.clone();
            let t = std::thread::Builder::new()
                .name(format!("gpulet-burn-{}", g.index))
                .spawn(move || burn_loop(&g, &counter, &stop, &ready_tx))
                .map_err(|e| CudaError::Other(format!("cannot start a thread: {e}")))?;
            // Each GPU's context and kernel are ready (or failed) before the next starts.
            if ready_rx.recv().is_err() {
                load.stop();
                return Err(stopped(t));
            }
            load.threads.push(t);
        }
        load.started = Instant::now();
        Ok(load)
    }

    /// FLOPs done on each GPU of the inventory since the start, in GFLOP (0 where there
    /// is no load). An error if a GPU's load stopped (its thread says why).
    pub fn gflop(&mut self) -> Result<Vec<f64>, CudaError> {
        if let Some(i) = self.threads.iter().position(JoinHandle::is_finished) {
            let t = self.threads.remove(i);
            self.stop();
            return Err(stopped(t));
        }
        Ok(self
            .flops
            .iter()
            .map(|f| f.as_ref().map_or(0.0, |f| f.load(Ordering::Relaxed) as f64 / 1e9))
            .collect())
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for CudaLoad {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Why a load thread ended before it was told to.
fn stopped(t: JoinHandle<Result<(), CudaError>>) -> CudaError {
    match t.join() {
        Ok(Err(e)) => e,
        Ok(Ok(())) => CudaError::Other("a GPU's load stopped".into()),
        Err(_) => CudaError::Other("a GPU's load thread panicked".into()),
    }
}

fn burn_loop(
    gpu: &GpuInfo,
    flops: &AtomicU64,
    stop: &AtomicBool,
    ready: &std::sync::mpsc::Sender<()>,
) -> Result<(), CudaError> {
    let ctx = context(gpu)?;
    let mut burner = Burner::new(gpu.index, &ctx)?;
    // Size a launch to about LAUNCH_TARGET from one timed launch (after a first one that
    // pays for the module's load).
    let probe = 2048;
    burner.run(probe)?;
    let t = Instant::now();
    burner.run(probe)?;
    let per_iteration = t.elapsed().as_secs_f64() / f64::from(probe);
    let iterations =
        (LAUNCH_TARGET.as_secs_f64() / per_iteration.max(1e-9)).clamp(256.0, 1e8) as u32;
    let per_launch = u64::from(burner.threads()) * u64::from(iterations) * FLOP_PER_ITERATION;
    let _ = ready.send(());
    while !stop.load(Ordering::Relaxed) {
        burner.run(iterations)?;
        flops.fetch_add(per_launch, Ordering::Relaxed);
    }
    Ok(())
}

/// One GPU's health check.
#[derive(Debug, Clone, Serialize)]
pub struct DiagReport {
    pub gpu: u32,
    pub uuid: String,
    /// Every step passed.
    pub ok: bool,
    /// Why the GPU was not checked (MIG, held by another process): not a failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    /// What failed, and how.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Memory written and read back.
    pub memory_mib: u64,
    /// What each step measured (absent for a step not reached).
    pub write_gb_s: Option<f64>,
    pub read_gb_s: Option<f64>,
    pub kernel_ms: Option<f64>,
    pub gflop_s: Option<f64>,
}

impl DiagReport {
    /// Checked and found wanting (a skipped GPU did not fail).
    pub fn failed(&self) -> bool {
        !self.ok && self.skipped.is_none()
    }
}

/// Memory tested per GPU by default: enough to cross many pages and DRAM channels, small
/// enough to run beside a job.
pub const DIAG_MEMORY_MIB: u32 = 256;
/// The checked run: short, since the CPU recomputes a sample of its threads.
const CHECK_ITERATIONS: u32 = 1024;
/// Every thread of the first and last block, and one in this many between, are
/// recomputed on the CPU (a few hundred thousand FMAs: milliseconds, also without a
/// hardware FMA).
const CHECK_EVERY: usize = 101;
/// The timed run: long enough (milliseconds) to measure the FP32 rate.
const TIME_ITERATIONS: u32 = 65_536;

/// `gpulet diag`: on each GPU, a context, `memory_mib` written with a pattern and read
/// back, and the kernel run, timed and checked against the CPU.
pub fn diag(gpus: &[GpuInfo], memory_mib: u32) -> Result<Vec<DiagReport>, CudaError> {
    available()?;
    Ok(gpus.iter().map(|g| diag_one(g, memory_mib)).collect())
}

fn diag_one(gpu: &GpuInfo, memory_mib: u32) -> DiagReport {
    let mut r = DiagReport {
        gpu: gpu.index,
        uuid: gpu.uuid.clone(),
        ok: false,
        skipped: None,
        error: None,
        memory_mib: u64::from(memory_mib),
        write_gb_s: None,
        read_gb_s: None,
        kernel_ms: None,
        gflop_s: None,
    };
    if gpu.mig_enabled == Some(true) {
        r.skipped = Some("MIG is enabled: CUDA sees its instances, not the GPU; run diag in a container given one instance".into());
        return r;
    }
    match diag_steps(gpu, (memory_mib as usize) << 20, &mut r) {
        Ok(()) => r.ok = true,
        Err(e @ CudaError::Busy { .. }) => r.skipped = Some(e.to_string()),
        Err(e) => r.error = Some(e.to_string()),
    }
    r
}

fn diag_steps(gpu: &GpuInfo, bytes: usize, r: &mut DiagReport) -> Result<(), CudaError> {
    let i = gpu.index;
    let step = |step| failed(i, step);
    let ctx = context(gpu)?;
    let stream = ctx.default_stream();
    let words = bytes / 4;
    // A pattern where every word differs from its neighbours and from its address.
    let pattern: Vec<u32> =
        (0..words as u32).map(|w| w.wrapping_mul(2_654_435_761) ^ 0xA5A5_A5A5).collect();
    let gb = bytes as f64 / 1e9;
    let t = Instant::now();
    let dev = stream.clone_htod(&pattern).map_err(step("allocating and writing memory"))?;
    stream.synchronize().map_err(step("writing memory"))?;
    r.write_gb_s = Some(gb / t.elapsed().as_secs_f64());
    let t = Instant::now();
    let back = stream.clone_dtoh(&dev).map_err(step("reading memory back"))?;
    r.read_gb_s = Some(gb / t.elapsed().as_secs_f64());
    if let Some(w) = back.iter().zip(&pattern).position(|(a, b)| a != b) {
        return Err(CudaError::Step {
            gpu: i,
            step: "reading memory back",
            error: format!(
                "word {w} reads {:#010x}, {:#010x} was written: the GPU's memory is corrupting data; drain and reset it",
                back[w], pattern[w]
            ),
        });
    }
    drop(dev);
    let mut burner = Burner::new(i, &ctx)?;
    burner.run(CHECK_ITERATIONS)?;
    let out = burner.result()?;
    let block = THREADS_PER_BLOCK as usize;
    let sampled = (0..out.len())
        .filter(|&id| id < block || id >= out.len().saturating_sub(block) || id % CHECK_EVERY == 0);
    for id in sampled {
        let (got, want) = (out[id], burn_reference(id as u32, CHECK_ITERATIONS));
        if got.to_bits() != want.to_bits() {
            return Err(CudaError::Step {
                gpu: i,
                step: "checking the kernel's result",
                error: format!(
                    "thread {id} computed {got}, the CPU {want}: the GPU computes wrongly; drain and reset it"
                ),
            });
        }
    }
    let t = Instant::now();
    burner.run(TIME_ITERATIONS)?;
    let secs = t.elapsed().as_secs_f64();
    r.kernel_ms = Some(secs * 1000.0);
    let flop = f64::from(burner.threads()) * f64::from(TIME_ITERATIONS) * FLOP_PER_ITERATION as f64;
    r.gflop_s = Some(flop / secs / 1e9);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reference_converges_as_the_kernel_does() {
        // x ← 0.999·x + 0.001 tends to 1: eight chains sum to about 8.
        assert!((burn_reference(5, 100_000) - 8.0).abs() < 1e-3);
        // Zero iterations: the seeds' sum, 8·base + 28.
        assert_eq!(burn_reference(0, 0), 28.0);
        assert_eq!(burn_reference(32768, 0), 36.0);
    }

    #[test]
    fn uuids_are_written_as_nvml_writes_them() {
        let b: [std::ffi::c_char; 16] = std::array::from_fn(|i| (i as u8 * 17) as std::ffi::c_char);
        assert_eq!(uuid_string(&b), "GPU-00112233-4455-6677-8899-aabbccddeeff");
    }

    #[test]
    fn the_kernel_is_ptx_with_the_entry_point_launched() {
        assert!(BURN_PTX.contains(".visible .entry burn(") && BURN_PTX.contains(".target sm_50"));
    }
}
