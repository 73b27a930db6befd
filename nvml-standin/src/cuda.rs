//! The stand-in `libcuda.so.1`: the CUDA driver functions that cudarc calls for `gpulet
//! calibrate` and `gpulet diag`, over the simulated node's GPUs.
//!
//! - Devices are the node's GPUs, in order, with its UUIDs (so gpulet finds them by UUID
//!   as on a real server); each has 1 SM (the kernel's grid stays small).
//! - Device memory is host memory: a device pointer is the address of a host buffer.
//!   Copies and memsets happen at once; streams and events are tokens with nothing
//!   pending.
//! - The only kernel is `burn` (loading a module checks that the PTX has its entry): a
//!   launch computes every thread's result with gpulet's CPU reference, on the calling
//!   thread, for up to 4,096 iterations; longer (timed) runs return at once with zeros,
//!   since the CPU would take minutes. `cuda-corrupt GPU` flips a bit of every result;
//!   `cuda-busy GPU` makes its context unavailable, as exclusive compute mode does.

use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::{CStr, c_char, c_int, c_uint, c_void};
use std::sync::Mutex;

use gpulet::cuda::burn_reference;

type CUresult = c_uint;
type CUdevice = c_int;
/// Contexts, modules, functions, streams and events are opaque pointers to the caller.
type Handle = *mut c_void;
type CUdeviceptr = u64;

const SUCCESS: CUresult = 0;
const INVALID_VALUE: CUresult = 1;
const OUT_OF_MEMORY: CUresult = 2;
const INVALID_DEVICE: CUresult = 101;
const INVALID_IMAGE: CUresult = 200;
const INVALID_CONTEXT: CUresult = 201;
const DEVICE_UNAVAILABLE: CUresult = 46;
const NOT_FOUND: CUresult = 500;
const INVALID_HANDLE: CUresult = 400;

const ATTRIBUTE_MULTIPROCESSOR_COUNT: c_uint = 16;
/// Above this, a launch is not computed (see the module docs).
const MAX_COMPUTED_ITERATIONS: u32 = 4096;
/// Handles given out: a context is `CTX_BASE + device`; the one module and function.
const CTX_BASE: usize = 0x1000;
const MODULE: usize = 0x2000;
const FUNCTION: usize = 0x3000;
const TOKEN: usize = 0x4000;

/// Live allocations: address → buffer (the buffer owns the memory).
static MEMORY: Mutex<Option<HashMap<u64, Vec<u8>>>> = Mutex::new(None);

thread_local! {
    static CURRENT: Cell<usize> = const { Cell::new(0) };
}

/// The simulated GPUs' UUIDs, and whether `gpu` is held or corrupt.
fn devices() -> Vec<(String, bool, bool)> {
    let guard = crate::state();
    let Some(s) = guard.as_ref() else { return Vec::new() };
    s.inventory
        .iter()
        .map(|g| {
            (g.uuid.clone(), s.cuda_busy.contains(&g.index), s.cuda_corrupt.contains(&g.index))
        })
        .collect()
}

fn device(dev: CUdevice) -> Option<(String, bool, bool)> {
    usize::try_from(dev).ok().and_then(|d| devices().into_iter().nth(d))
}

#[unsafe(no_mangle)]
pub extern "C" fn cuInit(_flags: c_uint) -> CUresult {
    SUCCESS
}

/// # Safety
/// `count` must point to an int.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetCount(count: *mut c_int) -> CUresult {
    out!(count, devices().len() as c_int, INVALID_VALUE);
    SUCCESS
}

/// # Safety
/// `out` must point to a `CUdevice`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGet(out: *mut CUdevice, ordinal: c_int) -> CUresult {
    if device(ordinal).is_none() {
        return INVALID_DEVICE;
    }
    out!(out, ordinal, INVALID_VALUE);
    SUCCESS
}

/// # Safety
/// `uuid` must point to 16 bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetUuid(uuid: *mut [u8; 16], dev: CUdevice) -> CUresult {
    let Some((text, _, _)) = device(dev) else { return INVALID_DEVICE };
    let hex: String = text.trim_start_matches("GPU-").chars().filter(|c| *c != '-').collect();
    let mut bytes = [0u8; 16];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = hex.get(2 * i..2 * i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()).unwrap_or(0);
    }
    out!(uuid, bytes, INVALID_VALUE);
    SUCCESS
}

/// # Safety
/// As [`cuDeviceGetUuid`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetUuid_v2(uuid: *mut [u8; 16], dev: CUdevice) -> CUresult {
    // SAFETY: the same contract.
    unsafe { cuDeviceGetUuid(uuid, dev) }
}

/// # Safety
/// `value` must point to an int.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetAttribute(
    value: *mut c_int,
    attribute: c_uint,
    dev: CUdevice,
) -> CUresult {
    if device(dev).is_none() {
        return INVALID_DEVICE;
    }
    // One SM; everything else (memory pools, …) absent.
    out!(value, c_int::from(attribute == ATTRIBUTE_MULTIPROCESSOR_COUNT), INVALID_VALUE);
    SUCCESS
}

/// # Safety
/// `ctx` must point to a context handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDevicePrimaryCtxRetain(ctx: *mut Handle, dev: CUdevice) -> CUresult {
    match device(dev) {
        None => INVALID_DEVICE,
        Some((_, true, _)) => DEVICE_UNAVAILABLE,
        Some(_) => {
            out!(ctx, (CTX_BASE + dev as usize) as Handle, INVALID_VALUE);
            SUCCESS
        }
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn cuDevicePrimaryCtxRelease_v2(_dev: CUdevice) -> CUresult {
    SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn cuCtxSetCurrent(ctx: Handle) -> CUresult {
    CURRENT.with(|c| c.set(ctx as usize));
    SUCCESS
}

/// # Safety
/// `ctx` must point to a context handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxGetCurrent(ctx: *mut Handle) -> CUresult {
    out!(ctx, CURRENT.with(Cell::get) as Handle, INVALID_VALUE);
    SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn cuCtxSynchronize() -> CUresult {
    SUCCESS
}

/// The device of the calling thread's context.
fn current_device() -> Option<usize> {
    CURRENT.with(Cell::get).checked_sub(CTX_BASE)
}

/// # Safety
/// `module` must point to a module handle, `image` to a NUL-terminated PTX text.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuModuleLoadData(module: *mut Handle, image: *const c_void) -> CUresult {
    if image.is_null() {
        return INVALID_VALUE;
    }
    // SAFETY: cudarc passes the PTX as a C string.
    let ptx = unsafe { CStr::from_ptr(image.cast::<c_char>()) }.to_string_lossy();
    if !ptx.contains(".visible .entry burn(") {
        return INVALID_IMAGE;
    }
    out!(module, MODULE as Handle, INVALID_VALUE);
    SUCCESS
}

/// # Safety
/// `func` must point to a function handle, `name` to a C string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuModuleGetFunction(
    func: *mut Handle,
    module: Handle,
    name: *const c_char,
) -> CUresult {
    if module as usize != MODULE || name.is_null() {
        return INVALID_HANDLE;
    }
    // SAFETY: non-null C string from the caller.
    if unsafe { CStr::from_ptr(name) }.to_bytes() != b"burn" {
        return NOT_FOUND;
    }
    out!(func, FUNCTION as Handle, INVALID_VALUE);
    SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn cuModuleUnload(_module: Handle) -> CUresult {
    SUCCESS
}

/// # Safety
/// `ptr` must point to a device pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAlloc_v2(ptr: *mut CUdeviceptr, bytes: usize) -> CUresult {
    if bytes > 1 << 32 {
        return OUT_OF_MEMORY;
    }
    let buf = vec![0u8; bytes.max(1)];
    let addr = buf.as_ptr() as u64;
    MEMORY.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert_default().insert(addr, buf);
    out!(ptr, addr, INVALID_VALUE);
    SUCCESS
}

/// # Safety
/// As [`cuMemAlloc_v2`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAllocAsync(
    ptr: *mut CUdeviceptr,
    bytes: usize,
    _stream: Handle,
) -> CUresult {
    // SAFETY: the same contract.
    unsafe { cuMemAlloc_v2(ptr, bytes) }
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemFree_v2(ptr: CUdeviceptr) -> CUresult {
    let freed =
        MEMORY.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert_default().remove(&ptr);
    if freed.is_some() { SUCCESS } else { INVALID_VALUE }
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemFreeAsync(ptr: CUdeviceptr, _stream: Handle) -> CUresult {
    cuMemFree_v2(ptr)
}

/// Run `f` on the allocation holding `[ptr, ptr + len)`, if there is one.
fn with_memory(ptr: CUdeviceptr, len: usize, f: impl FnOnce(&mut [u8])) -> CUresult {
    let mut guard = MEMORY.lock().unwrap_or_else(|p| p.into_inner());
    let memory = guard.get_or_insert_default();
    let found = memory
        .iter_mut()
        .find(|(base, buf)| ptr >= **base && ptr + len as u64 <= **base + buf.len() as u64);
    match found {
        Some((base, buf)) => {
            let at = (ptr - base) as usize;
            f(&mut buf[at..at + len]);
            SUCCESS
        }
        None => INVALID_VALUE,
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemsetD8Async(ptr: CUdeviceptr, value: u8, n: usize, _s: Handle) -> CUresult {
    with_memory(ptr, n, |m| m.fill(value))
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemsetD8_v2(ptr: CUdeviceptr, value: u8, n: usize) -> CUresult {
    with_memory(ptr, n, |m| m.fill(value))
}

/// # Safety
/// `src` must be valid for `bytes` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpyHtoDAsync_v2(
    dst: CUdeviceptr,
    src: *const c_void,
    bytes: usize,
    _stream: Handle,
) -> CUresult {
    if src.is_null() {
        return INVALID_VALUE;
    }
    // SAFETY: the caller's buffer of `bytes` bytes.
    let src = unsafe { std::slice::from_raw_parts(src.cast::<u8>(), bytes) };
    with_memory(dst, bytes, |m| m.copy_from_slice(src))
}

/// # Safety
/// As [`cuMemcpyHtoDAsync_v2`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpyHtoD_v2(
    dst: CUdeviceptr,
    src: *const c_void,
    n: usize,
) -> CUresult {
    // SAFETY: the same contract.
    unsafe { cuMemcpyHtoDAsync_v2(dst, src, n, std::ptr::null_mut()) }
}

/// # Safety
/// `dst` must be valid for `bytes` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpyDtoHAsync_v2(
    dst: *mut c_void,
    src: CUdeviceptr,
    bytes: usize,
    _stream: Handle,
) -> CUresult {
    if dst.is_null() {
        return INVALID_VALUE;
    }
    // SAFETY: the caller's buffer of `bytes` bytes.
    let dst = unsafe { std::slice::from_raw_parts_mut(dst.cast::<u8>(), bytes) };
    with_memory(src, bytes, |m| dst.copy_from_slice(m))
}

/// # Safety
/// As [`cuMemcpyDtoHAsync_v2`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpyDtoH_v2(dst: *mut c_void, src: CUdeviceptr, n: usize) -> CUresult {
    // SAFETY: the same contract.
    unsafe { cuMemcpyDtoHAsync_v2(dst, src, n, std::ptr::null_mut()) }
}

/// `burn(float *out, unsigned iterations)` over `grid × block` threads.
///
/// # Safety
/// `params` must point to two pointers: to the output's device pointer and to the
/// iteration count.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuLaunchKernel(
    func: Handle,
    grid_x: c_uint,
    grid_y: c_uint,
    grid_z: c_uint,
    block_x: c_uint,
    block_y: c_uint,
    block_z: c_uint,
    _shared: c_uint,
    _stream: Handle,
    params: *mut *mut c_void,
    _extra: *mut *mut c_void,
) -> CUresult {
    if func as usize != FUNCTION || params.is_null() || grid_y * grid_z * block_y * block_z != 1 {
        return INVALID_VALUE;
    }
    let Some(dev) = current_device() else { return INVALID_CONTEXT };
    // SAFETY: `burn`'s two parameters, as the caller's kernel signature says.
    let (out, iterations) = unsafe {
        let p = std::slice::from_raw_parts(params, 2);
        if p[0].is_null() || p[1].is_null() {
            return INVALID_VALUE;
        }
        (*p[0].cast::<CUdeviceptr>(), *p[1].cast::<u32>())
    };
    let threads = (grid_x * block_x) as usize;
    let corrupt = devices().get(dev).is_some_and(|d| d.2);
    let compute = iterations <= MAX_COMPUTED_ITERATIONS;
    with_memory(out, threads * 4, |m| {
        for (id, word) in m.chunks_exact_mut(4).enumerate() {
            let mut v = if compute { burn_reference(id as u32, iterations) } else { 0.0 };
            if corrupt {
                v = f32::from_bits(v.to_bits() ^ 1);
            }
            word.copy_from_slice(&v.to_ne_bytes());
        }
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn cuStreamSynchronize(_stream: Handle) -> CUresult {
    SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn cuStreamWaitEvent(_stream: Handle, _event: Handle, _flags: c_uint) -> CUresult {
    SUCCESS
}

/// # Safety
/// `event` must point to an event handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventCreate(event: *mut Handle, _flags: c_uint) -> CUresult {
    out!(event, TOKEN as Handle, INVALID_VALUE);
    SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn cuEventRecord(_event: Handle, _stream: Handle) -> CUresult {
    SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn cuEventSynchronize(_event: Handle) -> CUresult {
    SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn cuEventQuery(_event: Handle) -> CUresult {
    SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn cuEventDestroy_v2(_event: Handle) -> CUresult {
    SUCCESS
}

/// # Safety
/// `text` must point to a string pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGetErrorString(error: CUresult, text: *mut *const c_char) -> CUresult {
    let s: &'static [u8] = match error {
        SUCCESS => b"no error\0",
        INVALID_VALUE => b"invalid argument\0",
        OUT_OF_MEMORY => b"out of memory\0",
        DEVICE_UNAVAILABLE => b"CUDA-capable device(s) is/are busy or unavailable\0",
        INVALID_DEVICE => b"invalid device ordinal\0",
        INVALID_IMAGE => b"device kernel image is invalid\0",
        INVALID_CONTEXT => b"invalid device context\0",
        NOT_FOUND => b"named symbol not found\0",
        _ => b"unknown error\0",
    };
    out!(text, s.as_ptr().cast(), INVALID_VALUE);
    SUCCESS
}

/// # Safety
/// As [`cuGetErrorString`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGetErrorName(error: CUresult, text: *mut *const c_char) -> CUresult {
    let s: &'static [u8] = match error {
        SUCCESS => b"CUDA_SUCCESS\0",
        DEVICE_UNAVAILABLE => b"CUDA_ERROR_DEVICE_UNAVAILABLE\0",
        OUT_OF_MEMORY => b"CUDA_ERROR_OUT_OF_MEMORY\0",
        _ => b"CUDA_ERROR_UNKNOWN\0",
    };
    out!(text, s.as_ptr().cast(), INVALID_VALUE);
    SUCCESS
}
