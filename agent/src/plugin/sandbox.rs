//! The sandbox every plugin runs in, whatever its world (power today; scheduler and
//! reporter next): its limits, a `Store` per instance with the memory cap and the
//! epoch deadline, and one call under them, timed (host work is charged to the
//! plugin), its key-value store saved after it, its failure classified as a [`Fault`].
//! A world's binding (`power.rs`) adds only its exports and what their results may be.
//!
//! A trap poisons a store, and a plugin that timed out or ran out of memory may have left
//! its memory in any state: after any fault the binding drops the store, and the next
//! call re-instantiates from the pre-linked component and runs `init` again. What a
//! plugin must keep across that lives in its host key-value store.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wasmtime::{Store, Trap};

use super::engine::{CallGuard, EPOCH_PERIOD, PluginEngine, Ticker};
use super::host::{CallContext, HostState, PluginMetric};
use super::kv::KvStore;

/// Why a call produced no decisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// It ran past its deadline and was stopped.
    Timeout,
    /// It tried to grow its memory past the cap.
    Memory,
    /// It trapped (a panic, an invalid operation).
    Trap(String),
    /// Re-instantiating or `init` after a fault failed.
    Restart(String),
    /// The host work it asked for (key-value writes, logs) or the lifting of what it
    /// returned took longer than its deadline: host calls cannot be interrupted, so they
    /// are timed and charged to the plugin after the call.
    HostTime(Duration),
    /// It returned more items than its world accepts (`returned`, `max`).
    Output { returned: usize, max: usize },
}

/// Wall time a call may take beyond its deadline before it is charged as a fault even
/// though the guest's own time stayed within it (scheduling noise on a loaded machine
/// must not fault a healthy plugin).
const WALL_SLACK: Duration = Duration::from_millis(250);

impl Fault {
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Timeout => "timeout",
            Fault::Memory => "memory",
            Fault::Trap(_) => "trap",
            Fault::Restart(_) => "restart",
            Fault::HostTime(_) => "timeout",
            Fault::Output { .. } => "output",
        }
    }
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Timeout => write!(f, "ran past its deadline and was stopped"),
            Fault::Memory => write!(f, "tried to grow its memory past its cap and was stopped"),
            Fault::Trap(m) => write!(f, "trapped: {m}"),
            Fault::Restart(m) => write!(f, "could not be restarted: {m}"),
            Fault::HostTime(d) => write!(
                f,
                "took {} ms with the host work it asked for (key-value writes, logs, its output), past its deadline",
                d.as_millis()
            ),
            Fault::Output { returned, max } => {
                write!(f, "returned {returned} actions; at most {max} are accepted")
            }
        }
    }
}

/// How a plugin is run: from its `[[plugin]]` config.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub deadline: Duration,
    pub memory_bytes: usize,
    /// A fresh instance, between calls, once a memory of the plugin's has grown past
    /// this (`recycle_mib`): for guests whose collector lets the heap grow toward the cap.
    pub recycle_bytes: Option<usize>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { deadline: Duration::from_millis(20), memory_bytes: 64 << 20, recycle_bytes: None }
    }
}

/// One plugin's sandbox: what every instance of it is made with and called under.
pub struct Sandbox {
    name: String,
    limits: Limits,
    engine: wasmtime::Engine,
    /// Epochs advance only while a guard from this is alive: hold one around every call.
    ticker: Arc<Ticker>,
    kv: Arc<Mutex<KvStore>>,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox").field("name", &self.name).field("limits", &self.limits).finish()
    }
}

/// What the plugin emitted beside a call's result.
#[derive(Debug, Default)]
pub struct Side {
    pub metrics: Vec<PluginMetric>,
    /// Log lines and metrics dropped by the host's per-call limits.
    pub dropped: u32,
}

impl Sandbox {
    pub fn new(
        engine: &PluginEngine,
        name: &str,
        limits: Limits,
        kv: Arc<Mutex<KvStore>>,
    ) -> Sandbox {
        Sandbox {
            name: name.to_owned(),
            limits,
            engine: engine.engine().clone(),
            ticker: engine.ticker(),
            kv,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Whether the instance behind `store` has grown past `recycle_mib`.
    pub fn outgrown(&self, store: &Store<HostState>) -> bool {
        self.limits.recycle_bytes.is_some_and(|r| store.data().limits.largest > r)
    }

    fn deadline_ticks(&self) -> u64 {
        (self.limits.deadline.as_micros() / EPOCH_PERIOD.as_micros()).max(1) as u64
    }

    /// Epochs advance while the guard lives: hold it around instantiation and calls.
    pub fn calling(&self) -> CallGuard<'_> {
        self.ticker.call()
    }

    /// A fresh store for an instance: nothing granted, the memory cap, the deadline.
    pub fn store(&self) -> Store<HostState> {
        let state = HostState::new(&self.name, self.limits.memory_bytes, self.kv.clone());
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        store.set_epoch_deadline(self.deadline_ticks());
        store
    }

    /// One call into the plugin (`f`) on `store`, on a snapshot whose context (what
    /// `gpu-curve` and `wall-clock` answer) is `cx`: under the deadline, timed (host work past the deadline is a fault),
    /// the key-value store saved after it, any failure classified. On `Err` the caller
    /// drops the store.
    pub fn call<R>(
        &self,
        store: &mut Store<HostState>,
        cx: &CallContext,
        f: impl FnOnce(&mut Store<HostState>) -> wasmtime::Result<R>,
    ) -> Result<(R, Side), Fault> {
        store.data_mut().begin_call(cx.clone());
        store.set_epoch_deadline(self.deadline_ticks());
        let started = Instant::now();
        let result = f(store);
        let wall = started.elapsed();
        let state = store.data_mut();
        let host_time = state.host_time;
        // What the plugin changed in its key-value store, saved once per call (not charged
        // to the plugin: the disk's fsync is not its doing, and the store's size is capped).
        state.save_kv();
        let side = Side { metrics: std::mem::take(&mut state.metrics), dropped: state.dropped };
        let deadline = self.limits.deadline;
        match result {
            Ok(_) if host_time > deadline || wall > deadline + WALL_SLACK => {
                Err(Fault::HostTime(wall))
            }
            Ok(r) => Ok((r, side)),
            Err(e) => Err(if state.limits.denied {
                Fault::Memory
            } else if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
                Fault::Timeout
            } else {
                // The innermost cause says what happened (a guest panic's `unreachable`,
                // a refused call); the outer ones only where.
                Fault::Trap(e.root_cause().to_string().lines().next().unwrap_or("trap").to_owned())
            }),
        }
    }
}

/// A plugin's recent faults, toward quarantine: `max` faults within a window.
#[derive(Debug, Default)]
pub struct FaultWindow {
    times_ms: std::collections::VecDeque<u64>,
}

impl FaultWindow {
    /// Count a fault at `now_ms` (a clock in ms); whether `max` faults (at least one) now
    /// lie within the last `window_ms`.
    pub fn record(&mut self, now_ms: u64, window_ms: u64, max: u32) -> bool {
        self.times_ms.push_back(now_ms);
        while self.times_ms.front().is_some_and(|&t| now_ms.saturating_sub(t) >= window_ms) {
            self.times_ms.pop_front();
        }
        self.times_ms.len() as u32 >= max.max(1)
    }

    /// Faults within the window at the last count.
    pub fn len(&self) -> usize {
        self.times_ms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.times_ms.is_empty()
    }
}
