//! What a plugin's `Store` holds, and the host side of the `host` interface.
//!
//! Every host import is cheap and never blocks (an epoch deadline cannot interrupt a
//! host call, so a slow import would be a way around it): logging is rate-limited per
//! call, the key-value store is in memory and saved once after the call, metrics go to a
//! buffer the chain drains after the call. What host imports cost is timed anyway
//! (`host_time`) and charged to the plugin's deadline after the call.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::bindings::gpulet::policy::{host, types};
use super::kv::KvStore;

/// Log lines a plugin may write per call; more are counted and dropped.
pub const MAX_LOGS_PER_CALL: u32 = 20;
/// Metrics a plugin may emit per call.
pub const MAX_METRICS_PER_CALL: usize = 256;

pub use crate::telemetry::PluginMetric;

pub struct HostState {
    plugin: String,
    wasi: WasiCtx,
    table: ResourceTable,
    pub(crate) limits: MemoryCap,
    kv: Arc<Mutex<KvStore>>,
    pub(crate) metrics: Vec<PluginMetric>,
    logs: u32,
    pub(crate) dropped: u32,
    /// Time spent in this call's host imports.
    pub(crate) host_time: Duration,
    /// What `gpu-curve` and `wall-clock` answer: the snapshot being decided's (none
    /// outside a call on a snapshot).
    pub(crate) cx: CallContext,
}

/// Each GPU's curve, as the snapshot carries it.
pub type Curves = Arc<[Option<Arc<crate::calibration::Curve>>]>;

/// What the host imports answer during one call on a snapshot: taken from the snapshot,
/// so that a replay of it answers the same.
#[derive(Debug, Clone, Default)]
pub struct CallContext {
    /// The GPUs' work-per-watt curves (`gpu-curve`).
    pub curves: Curves,
    /// The snapshot's wall-clock time and UTC offset (`wall-clock`); `None`: the time now.
    pub wall: Option<WallTime>,
}

impl CallContext {
    /// The context of a snapshot the agent took.
    pub fn of(snap: &crate::snapshot::NodeSnapshot) -> CallContext {
        CallContext {
            curves: snap.curves.clone(),
            wall: Some(WallTime { unix_ms: snap.ts_ms, utc_offset_s: snap.utc_offset_s }),
        }
    }
}

/// A wall-clock time and the node's UTC offset then (`types.wall-time`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WallTime {
    pub unix_ms: u64,
    pub utc_offset_s: i32,
}

impl WallTime {
    pub fn now() -> WallTime {
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        WallTime { unix_ms, utc_offset_s: crate::clock::utc_offset_s(unix_ms) }
    }
}

impl HostState {
    pub fn new(plugin: &str, memory_bytes: usize, kv: Arc<Mutex<KvStore>>) -> HostState {
        // Nothing granted: no preopened directories, no environment, no arguments, no
        // network (every address denied, TCP and UDP off). Stdout and stderr go nowhere.
        let wasi = WasiCtxBuilder::new()
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        HostState {
            plugin: plugin.to_owned(),
            wasi,
            table: ResourceTable::new(),
            limits: MemoryCap { max_bytes: memory_bytes, denied: false, largest: 0 },
            kv,
            metrics: Vec::new(),
            logs: 0,
            dropped: 0,
            host_time: Duration::ZERO,
            cx: CallContext::default(),
        }
    }

    /// Reset the per-call counters before a call on a snapshot whose context is `cx`.
    pub(crate) fn begin_call(&mut self, cx: CallContext) {
        self.cx = cx;
        self.logs = 0;
        self.dropped = 0;
        self.host_time = Duration::ZERO;
        self.limits.denied = false;
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

/// The memory cap: a plugin's linear memories may not grow past `max_bytes`. Growing
/// fails (`memory.grow` returns -1, which Rust turns into an abort, a trap) and `denied`
/// records it, so the fault is reported as memory, not as a generic trap.
#[derive(Debug)]
pub struct MemoryCap {
    pub max_bytes: usize,
    pub denied: bool,
    /// The largest size a memory of this instance has been given (`recycle_mib`).
    pub largest: usize,
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_bytes {
            self.denied = true;
            return Ok(false);
        }
        self.largest = self.largest.max(desired);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }

    fn instances(&self) -> usize {
        32
    }
    fn tables(&self) -> usize {
        32
    }
    fn memories(&self) -> usize {
        4
    }
}

impl types::Host for HostState {}
impl super::sched_wit::Host for HostState {}

impl HostState {
    /// Save what the call changed in the key-value store.
    pub(crate) fn save_kv(&mut self) {
        if let Err(e) = self.kv().save() {
            tracing::warn!(plugin = %self.plugin, error = %e, "plugin state not saved; tried again after the next call");
        }
    }

    fn kv(&self) -> std::sync::MutexGuard<'_, KvStore> {
        self.kv.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn log_line(&mut self, level: host::Level, message: String) {
        self.logs += 1;
        if self.logs > MAX_LOGS_PER_CALL {
            self.dropped += 1;
            return;
        }
        let plugin = self.plugin.as_str();
        let message: String = message.chars().take(1000).collect();
        match level {
            host::Level::Trace => tracing::trace!(plugin, "{message}"),
            host::Level::Debug => tracing::debug!(plugin, "{message}"),
            host::Level::Info => tracing::info!(plugin, "{message}"),
            host::Level::Warn => tracing::warn!(plugin, "{message}"),
            host::Level::Error => tracing::error!(plugin, "{message}"),
        }
    }
}

impl host::Host for HostState {
    fn log(&mut self, level: host::Level, message: String) {
        let t = Instant::now();
        self.log_line(level, message);
        self.host_time += t.elapsed();
    }

    fn kv_get(&mut self, key: String) -> Option<Vec<u8>> {
        let t = Instant::now();
        let v = self.kv().get(&key);
        self.host_time += t.elapsed();
        v
    }

    fn kv_set(&mut self, key: String, value: Vec<u8>) -> Result<(), String> {
        let t = Instant::now();
        let r = self.kv().set(&key, value);
        self.host_time += t.elapsed();
        r
    }

    fn kv_delete(&mut self, key: String) {
        let t = Instant::now();
        self.kv().delete(&key);
        self.host_time += t.elapsed();
    }

    fn emit_metric(&mut self, name: String, value: f64, gpu: Option<u32>) {
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.');
        if !valid || !value.is_finite() || self.metrics.len() >= MAX_METRICS_PER_CALL {
            self.dropped += 1;
            return;
        }
        self.metrics.push(PluginMetric { plugin: self.plugin.clone(), name, value, gpu });
    }

    fn gpu_curve(&mut self, gpu: u32) -> Option<Vec<types::CurvePoint>> {
        let curve = self.cx.curves.get(gpu as usize)?.as_ref()?;
        Some(
            curve
                .points
                .iter()
                .map(|p| types::CurvePoint {
                    limit_w: p.limit_w,
                    power_w: p.power_w,
                    work_per_s: p.work_per_s,
                    relative: p.relative,
                })
                .collect(),
        )
    }

    fn wall_clock(&mut self) -> types::WallTime {
        let w = self.cx.wall.unwrap_or_else(WallTime::now);
        types::WallTime { unix_ms: w.unix_ms, utc_offset_s: w.utc_offset_s }
    }
}
