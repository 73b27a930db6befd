//! Telemetry: the record the agent emits once per tick, the events inside it, and the
//! sinks that carry records away.
//!
//! The record is a public contract (documented in `docs/telemetry.md`, which a test checks
//! against this code): dashboards and the MQTT topic tree consume it. Add fields freely;
//! rename or remove one only with a new `schema` version.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::Path;

use serde::Serialize;

use crate::gpu::{Ecc, GpuProcess, Health, RemappedRows, Throttle, xid_info};
use crate::snapshot::NodeSnapshot;

/// The `schema` value of every record of this layout.
pub const SCHEMA: &str = "gpulet.telemetry.v1";

/// One tick's telemetry.
#[derive(Debug, Serialize)]
pub struct Record<'a> {
    pub schema: &'static str,
    pub node: &'a str,
    /// +1 per record, from 0 at agent start; a gap means lost records.
    pub seq: u64,
    pub ts_ms: u64,
    pub backend: &'static str,
    /// Sum of the readable GPUs' power.
    pub power_w: f64,
    pub budget_w: Option<f64>,
    pub gpus: Vec<GpuRecord<'a>>,
    /// What happened during this tick (omitted when nothing did).
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub events: &'a [Event],
    /// Metrics plugins emitted during this tick (omitted when none did).
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub metrics: &'a [PluginMetric],
    pub agent: AgentStats,
}

/// One GPU in a record. A field that is unsupported or failed is `null`; a failure's
/// message is in `errors`, keyed by field name.
#[derive(Debug, Serialize)]
pub struct GpuRecord<'a> {
    pub index: u32,
    pub uuid: &'a str,
    pub power_w: Option<f64>,
    pub power_limit_w: Option<f64>,
    pub energy_j: Option<f64>,
    pub temp_c: Option<f64>,
    pub util_pct: Option<f64>,
    pub mem_used_mib: Option<u64>,
    pub mem_total_mib: u64,
    pub sm_clock_mhz: Option<u32>,
    pub mem_clock_mhz: Option<u32>,
    pub throttle: Option<Throttle>,
    pub ecc: Option<Ecc>,
    pub retired_pages: Option<u32>,
    pub remapped_rows: Option<RemappedRows>,
    pub processes: Option<&'a [GpuProcess]>,
    pub health: Health,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub errors: BTreeMap<&'static str, String>,
}

/// The agent's own numbers, so that its overhead is published, not guessed.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct AgentStats {
    /// Time the previous tick took, sampling to emitting, in microseconds.
    pub tick_us: u64,
    /// Ticks that started later than one tick period after they were due, since start.
    pub ticks_late: u64,
    /// Records a sink failed to take, since start.
    pub sink_errors: u64,
    /// Plugin calls stopped for a timeout, the memory cap or a trap, since start.
    pub plugin_faults: u64,
}

impl<'a> Record<'a> {
    pub fn new(
        node: &'a str,
        backend: &'static str,
        snap: &'a NodeSnapshot,
        events: &'a [Event],
        metrics: &'a [PluginMetric],
        agent: AgentStats,
    ) -> Record<'a> {
        let gpus = snap
            .gpus()
            .map(|(info, s)| GpuRecord {
                index: info.index,
                uuid: &info.uuid,
                power_w: round2(s.power_w.value()),
                power_limit_w: round2(s.power_limit_w.value()),
                energy_j: round2(s.energy_j.value()),
                temp_c: round2(s.temp_c.value()),
                util_pct: round2(s.util_pct.value()),
                mem_used_mib: s.mem_used_mib.value(),
                mem_total_mib: info.memory_total_mib,
                sm_clock_mhz: s.sm_clock_mhz.value(),
                mem_clock_mhz: s.mem_clock_mhz.value(),
                throttle: s.throttle.value(),
                ecc: s.ecc.value(),
                retired_pages: s.retired_pages.value(),
                remapped_rows: s.remapped_rows.value(),
                processes: s.processes.as_ref().map(Vec::as_slice),
                health: s.health,
                errors: s.errors().into_iter().map(|(f, e)| (f.name(), e.to_string())).collect(),
            })
            .collect();
        Record {
            schema: SCHEMA,
            node,
            seq: snap.seq,
            ts_ms: snap.ts_ms,
            backend,
            power_w: round2(Some(snap.node_power_w())).unwrap_or(0.0),
            budget_w: snap.budget_w,
            gpus,
            events,
            metrics,
            agent,
        }
    }
}

/// Two decimals are beyond any sensor's precision and keep records short.
fn round2(v: Option<f64>) -> Option<f64> {
    v.map(|x| (x * 100.0).round() / 100.0)
}

/// Something that happened, reported in the record of the tick it happened in.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Event {
    /// An XID error reported by the driver. `count`: occurrences of this code on this
    /// GPU since the agent started (occurrences within the debounce window of the last
    /// reported one are counted but not reported).
    Xid {
        gpu: u32,
        uuid: String,
        code: u32,
        count: u64,
        severity: &'static str,
        action: &'static str,
    },
    /// A GPU's health changed.
    Health { gpu: u32, uuid: String, from: Health, to: Health },
    /// The audit record of a power-limit change that reached the hardware.
    LimitChanged {
        gpu: u32,
        uuid: String,
        /// The limit enforced before, if it could be read.
        from_w: Option<f64>,
        /// The limit enforced after, read back.
        to_w: f64,
        /// What decided it: `static`, later a plugin's name.
        source: String,
        reason: String,
    },
    /// A power-limit change that the hardware refused.
    LimitFailed { gpu: u32, uuid: String, to_w: f64, error: String },
    /// The enforced limit is no longer the one the agent set (a driver reload, a reset,
    /// someone running `nvidia-smi -pl`). Reported once per drift; where the agent has
    /// a desired limit for the GPU, the next tick puts it back (`limit-changed`).
    LimitDrift { gpu: u32, uuid: String, expected_w: f64, found_w: f64 },
    /// A decision the guard refused outright (not merely clamped).
    DecisionRejected { source: String, gpu: u32, reason: String },
    /// The budget cannot be met even with every GPU at its minimum.
    BudgetInfeasible { budget_w: f64, min_total_w: f64 },
    /// A plugin was (re)loaded and started.
    PluginLoaded {
        plugin: String,
        version: String,
        path: String,
        /// Whether it had to be compiled (no usable cache entry).
        compiled: bool,
        load_ms: f64,
    },
    /// A plugin failed to load, validate its config or start.
    PluginLoadFailed {
        plugin: String,
        error: String,
        /// The previous version of the plugin goes on running (a failed reload).
        kept_previous: bool,
    },
    /// A plugin call was stopped: `fault` is `timeout`, `memory`, `trap` or `restart`.
    PluginFault { plugin: String, fault: &'static str, message: String },
    /// A reporter plugin's event (`report` is the plugin's own kind of event).
    Plugin {
        plugin: String,
        report: String,
        message: String,
        gpu: Option<u32>,
        uuid: Option<String>,
    },
    /// A reporter returned something the host does not accept (`reason`: `metric-name`,
    /// `event-kind`, `not-finite`, `no-such-gpu`, `too-many-items`, `event-rate`).
    /// Reported the first time for each plugin and reason; all are counted.
    PluginOutputRefused { plugin: String, reason: &'static str, example: String, accepted: String },
    /// A plugin faulted too often and is no longer called; `fallback` stands in.
    PluginQuarantined { plugin: String, failures: u32, window_s: u64, fallback: &'static str },
    /// Reloading the config on SIGHUP failed; everything goes on as before.
    ReloadFailed { error: String },
    /// A state file could not be read (empty, torn, not what it should hold); it was
    /// renamed to `moved_to` and the agent went on without it.
    StateSetAside { path: String, error: String, moved_to: String },
    /// Something happened to a job of the queue (`docs/jobs.md`).
    Job(JobEvent),
}

/// A job's event: `event` is `submitted`, `started`, `finished` (with its exit status),
/// `cancelled`, `timed-out`, `failed-to-start`, `lost` or `placement-rejected`. Usage
/// figures are the job's so far (final in the events that end it).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobEvent {
    pub job: u64,
    pub event: &'static str,
    pub user: String,
    pub name: Option<String>,
    /// Its GPUs' UUIDs (none while queued).
    pub gpus: Vec<String>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// Why, for a person: who cancelled, what failed, why a placement was refused.
    pub reason: Option<String>,
    pub energy_j: Option<f64>,
    pub gpu_seconds: Option<f64>,
    pub runtime_s: Option<f64>,
}

impl Event {
    pub fn xid(gpu: u32, uuid: &str, code: u32, count: u64) -> Event {
        let (severity, action) = xid_info(code);
        Event::Xid { gpu, uuid: uuid.to_owned(), code, count, severity, action }
    }
}

/// An event (as telemetry or MQTT carries it) in one line for people: its fields as
/// `key=value`, but for its kind, its UUID and the envelope every event has.
pub fn event_detail(event: &serde_json::Map<String, serde_json::Value>) -> String {
    let fields: Vec<String> = event
        .iter()
        .filter(|(k, _)| {
            !matches!(k.as_str(), "kind" | "ts_ms" | "uuid" | "node" | "inc" | "seq" | "historical")
        })
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => format!("{k}={s}"),
            v => format!("{k}={v}"),
        })
        .collect();
    fields.join(" ")
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("cannot open telemetry file {path}: {error}")]
    Open { path: String, error: io::Error },
    #[error("writing telemetry failed: {0}")]
    Write(#[from] io::Error),
}

/// Where records go. A sink that fails returns the error; the agent counts it, logs it
/// and carries on (telemetry must never stop the control loop).
pub trait Sink: Send {
    fn emit(&mut self, record: &Record<'_>) -> Result<(), SinkError>;
    /// The agent stops: write out anything held back.
    fn close(&mut self) {}
    /// A few words on the sink's state for the service status line (the MQTT link says
    /// whether the broker is connected); `None` for sinks with nothing to say.
    fn status(&self) -> Option<String> {
        None
    }
}

/// One JSON object per line, flushed per record so that a reader (or a crash) sees whole
/// lines.
#[derive(Debug)]
pub struct JsonLines<W: Write + Send> {
    out: BufWriter<W>,
}

impl<W: Write + Send> JsonLines<W> {
    pub fn new(out: W) -> JsonLines<W> {
        JsonLines { out: BufWriter::new(out) }
    }
}

impl JsonLines<File> {
    /// Append to a file, creating it if needed.
    pub fn append(path: &Path) -> Result<JsonLines<File>, SinkError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|error| SinkError::Open { path: path.display().to_string(), error })?;
        Ok(JsonLines::new(file))
    }
}

impl<W: Write + Send> Sink for JsonLines<W> {
    fn emit(&mut self, record: &Record<'_>) -> Result<(), SinkError> {
        serde_json::to_writer(&mut self.out, record).map_err(io::Error::from)?;
        self.out.write_all(b"\n")?;
        self.out.flush()?;
        Ok(())
    }
}

/// A metric a plugin emitted during a call.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PluginMetric {
    pub plugin: String,
    pub name: String,
    pub value: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu: Option<u32>,
}
