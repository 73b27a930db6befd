//! Recorded traces and what a power plugin would have decided on them: the format
//! `gpulet record` writes, and `gpulet plugin replay` and `plugin diff`.
//!
//! A trace is JSON Lines (`docs/writing-policies.md` documents it): a [`Header`] (the
//! format name and version, the node, its GPUs with their curves, the tick period and,
//! for a simulator recording, the config it ran, so the run can be repeated), then one
//! [`TickLine`] per tick: the snapshot the plugins saw (the `plugin run` snapshot file
//! format), the limits the agent applied that tick and why, and the limits in force
//! after it. Version 1; a reader refuses any other, naming it.

use std::io::{BufRead, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::dry_run::{CurvePointFile, SnapshotFile};
use super::host::{CallContext, Curves, WallTime};
use super::power::PowerPlugin;
use super::reporter::ReporterPlugin;
use super::wit;

/// What the first line says a trace is.
pub const FORMAT: &str = "gpulet-trace";
/// The version this gpulet writes and reads.
pub const VERSION: u32 = 1;

/// A trace's first line.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    pub format: String,
    pub version: u32,
    pub node: String,
    /// `sim` or `nvml`.
    pub backend: String,
    pub tick_ms: u64,
    pub gpus: Vec<HeaderGpu>,
    /// The config the node ran (TOML), for a simulator recording: a closed-loop replay
    /// runs it again. `None` for a live node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
    /// Where that config's relative paths point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_dir: Option<String>,
}

/// A GPU as the trace's header has it: what `init` and `gpu-curve` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderGpu {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub memory_total_mib: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub curve: Option<Vec<CurvePointFile>>,
}

/// One tick of a trace.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TickLine {
    /// Wall time of the tick, ms since the epoch.
    pub ts_ms: u64,
    pub snapshot: SnapshotFile,
    /// The limits applied this tick.
    #[serde(default)]
    pub changes: Vec<Change>,
    /// Each GPU's limit after the tick (`None`: unknown).
    pub limits_w: Vec<Option<f64>>,
}

impl TickLine {
    /// What `wall-clock` answers on this tick: its recorded time and UTC offset (0 in a
    /// trace recorded before gpulet kept the offset).
    pub fn wall(&self) -> WallTime {
        self.snapshot.wall().unwrap_or(WallTime { unix_ms: self.ts_ms, utc_offset_s: 0 })
    }
}

/// A limit the agent applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Change {
    pub gpu: u32,
    pub to_w: f64,
    pub source: String,
    pub reason: String,
}

/// A trace, read whole.
#[derive(Debug, Clone)]
pub struct Trace {
    pub header: Header,
    pub ticks: Vec<TickLine>,
}

impl Trace {
    /// Read `path`; an error names the line and what is wrong.
    pub fn read(path: &Path) -> Result<Trace, String> {
        let shown = path.display();
        let file = std::fs::File::open(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
        let mut lines = std::io::BufReader::new(file).lines().enumerate();
        let parse = |n: usize, line: Result<String, std::io::Error>| -> Result<String, String> {
            line.map_err(|e| format!("{shown}: line {}: {e}", n + 1))
        };
        let (n, first) = lines.next().ok_or_else(|| format!("{shown} is empty; not a trace"))?;
        let first = parse(n, first)?;
        let de = &mut serde_json::Deserializer::from_str(&first);
        let header: Header = serde_path_to_error::deserialize(de).map_err(|e| {
            format!("{shown}: line 1 is not a trace header: {}: {}", e.path(), e.inner())
        })?;
        if header.format != FORMAT || header.version != VERSION {
            return Err(format!(
                "{shown}: a {:?} version {} file; this gpulet reads {FORMAT:?} version {VERSION}",
                header.format, header.version
            ));
        }
        let mut ticks = Vec::new();
        for (n, line) in lines {
            let line = parse(n, line)?;
            if line.trim().is_empty() {
                continue;
            }
            let de = &mut serde_json::Deserializer::from_str(&line);
            let tick: TickLine = serde_path_to_error::deserialize(de)
                .map_err(|e| format!("{shown}: line {}: {}: {}", n + 1, e.path(), e.inner()))?;
            ticks.push(tick);
        }
        Ok(Trace { header, ticks })
    }

    /// What `init` is told about the GPUs.
    pub fn gpu_infos(&self) -> Vec<wit::GpuInfo> {
        self.header
            .gpus
            .iter()
            .map(|g| wit::GpuInfo {
                index: g.index,
                uuid: g.uuid.clone(),
                name: g.name.clone(),
                memory_total_mib: g.memory_total_mib,
            })
            .collect()
    }

    /// The GPUs' curves, for `gpu-curve`.
    pub fn curves(&self) -> Curves {
        let as_file = SnapshotFile {
            seq: 0,
            now_ms: 0,
            ts_ms: None,
            utc_offset_s: None,
            budget_w: None,
            gpus: self
                .header
                .gpus
                .iter()
                .map(|g| super::dry_run::GpuFile {
                    index: g.index,
                    uuid: Some(g.uuid.clone()),
                    power_w: None,
                    power_limit_w: None,
                    energy_j: None,
                    temp_c: None,
                    util_pct: None,
                    mem_used_mib: None,
                    sm_clock_mhz: None,
                    throttle: Vec::new(),
                    health: "ok".into(),
                    min_limit_w: 0.0,
                    max_limit_w: 0.0,
                    default_limit_w: 0.0,
                    proposed_limit_w: None,
                    curve: g.curve.clone(),
                })
                .collect(),
        };
        as_file.curves()
    }
}

/// Writes a trace, a line at a time (a recording cut short is still readable).
#[derive(Debug)]
pub struct TraceWriter<W: Write> {
    out: W,
}

impl<W: Write> TraceWriter<W> {
    pub fn new(mut out: W, header: &Header) -> std::io::Result<TraceWriter<W>> {
        serde_json::to_writer(&mut out, header)?;
        out.write_all(b"\n")?;
        Ok(TraceWriter { out })
    }

    pub fn tick(&mut self, tick: &TickLine) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.out, tick)?;
        self.out.write_all(b"\n")?;
        self.out.flush()
    }
}

/// What a plugin decided on one recorded tick.
#[derive(Debug, Clone)]
pub struct Replayed {
    pub seq: u64,
    /// Its actions (empty if it faulted).
    pub actions: Vec<wit::PowerAction>,
    /// Why the call failed, if it did.
    pub fault: Option<String>,
}

/// Run `plugin` over every tick of `trace`, as the first plugin of the chain (nothing
/// proposed before it). A fault is recorded and the next tick gets a fresh instance, as
/// in the agent.
pub fn replay(plugin: &mut PowerPlugin, trace: &Trace) -> Result<Vec<Replayed>, String> {
    each_tick(trace, |snap, cx| match plugin.decide(snap, cx) {
        Ok(out) => Replayed { seq: snap.seq, actions: out.actions, fault: None },
        Err(f) => Replayed { seq: snap.seq, actions: Vec::new(), fault: Some(f.to_string()) },
    })
}

/// `call` on every tick of `trace`: its snapshot as a plugin sees it and what the host
/// imports answer on it (the header's curves, the tick's wall time).
fn each_tick<T>(
    trace: &Trace,
    mut call: impl FnMut(&wit::Snapshot, &CallContext) -> T,
) -> Result<Vec<T>, String> {
    let curves = trace.curves();
    trace
        .ticks
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let snap = t.snapshot.to_wit().map_err(|e| format!("tick {}: {e}", i + 1))?;
            Ok(call(&snap, &CallContext { curves: curves.clone(), wall: Some(t.wall()) }))
        })
        .collect()
}

/// What a reporter returned at one tick of a trace.
#[derive(Debug, Clone)]
pub struct Reported {
    pub seq: u64,
    /// As the plugin returned them, before the host's bounds (names, items per tick,
    /// event rate: `docs/plugins.md`, "Reporters") keep or refuse them.
    pub items: Vec<wit::ReportItem>,
    pub fault: Option<String>,
}

/// Run reporter `plugin` over every tick of `trace` (a fault is recorded and the next
/// tick gets a fresh instance, as in the agent).
pub fn report_all(plugin: &mut ReporterPlugin, trace: &Trace) -> Result<Vec<Reported>, String> {
    each_tick(trace, |snap, cx| match plugin.report(snap, cx) {
        Ok((items, _)) => Reported { seq: snap.seq, items, fault: None },
        Err(f) => Reported { seq: snap.seq, items: Vec::new(), fault: Some(f.to_string()) },
    })
}

/// A replay in numbers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub ticks: usize,
    pub ticks_with_actions: usize,
    pub actions: usize,
    pub faults: usize,
    /// Per GPU: the mean limit the plugin asked for over the ticks it asked, and the
    /// mean limit in force in the recording over all ticks (`None`: never).
    pub mean_asked_w: Vec<Option<f64>>,
    pub mean_recorded_w: Vec<Option<f64>>,
}

pub fn summary(trace: &Trace, replayed: &[Replayed]) -> Summary {
    let n = trace.header.gpus.len();
    let mean = |values: Vec<f64>| {
        (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
    };
    let asked = (0..n as u32)
        .map(|g| {
            mean(
                replayed
                    .iter()
                    .flat_map(|r| r.actions.iter().filter(move |a| a.gpu == g))
                    .map(|a| a.limit_w)
                    .collect(),
            )
        })
        .collect();
    let recorded = (0..n)
        .map(|g| {
            mean(trace.ticks.iter().filter_map(|t| t.limits_w.get(g).copied().flatten()).collect())
        })
        .collect();
    Summary {
        ticks: replayed.len(),
        ticks_with_actions: replayed.iter().filter(|r| !r.actions.is_empty()).count(),
        actions: replayed.iter().map(|r| r.actions.len()).sum(),
        faults: replayed.iter().filter(|r| r.fault.is_some()).count(),
        mean_asked_w: asked,
        mean_recorded_w: recorded,
    }
}

/// One GPU on which two replays differ at a tick: its index and each side's action.
pub type Differs = (u32, Option<wit::PowerAction>, Option<wit::PowerAction>);

/// Where two replays of one trace decide differently: per tick (by seq), the GPUs whose
/// asked limit differs by more than `tolerance_w` (or that only one of them decides).
pub fn diff(a: &[Replayed], b: &[Replayed], tolerance_w: f64) -> Vec<(u64, Vec<Differs>)> {
    a.iter()
        .zip(b)
        .filter_map(|(ra, rb)| {
            let find = |r: &Replayed, g: u32| r.actions.iter().rev().find(|x| x.gpu == g).cloned();
            let mut gpus: Vec<u32> = ra.actions.iter().chain(&rb.actions).map(|x| x.gpu).collect();
            gpus.sort_unstable();
            gpus.dedup();
            let differ: Vec<_> = gpus
                .into_iter()
                .map(|g| (g, find(ra, g), find(rb, g)))
                .filter(|(_, x, y)| match (x, y) {
                    (Some(x), Some(y)) => (x.limit_w - y.limit_w).abs() > tolerance_w,
                    _ => true,
                })
                .collect();
            (!differ.is_empty()).then_some((ra.seq, differ))
        })
        .collect()
}
