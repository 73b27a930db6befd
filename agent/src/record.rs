//! `gpulet record` and the closed-loop replay: run a node for some ticks and write what
//! its plugins saw and what the agent did (a trace, `plugin/replay.rs`); and, for a
//! simulator recording, run the same node again with another power plugin in charge and
//! compare what both runs achieved.
//!
//! A simulator recording runs on a virtual clock, as fast as the machine allows; a live
//! node's runs in real time. Both build the agent as `gpulet run` does
//! (`setup::agent`), without its sinks, socket or MQTT: a recording changes nothing but
//! the limits the configured policies would set anyway.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::agent::{Agent, Tick};
use crate::clock::VirtualClock;
use crate::config::{Config, Grant, PluginConfig};
use crate::error::Error;
use crate::plugin::chain::to_wit;
use crate::plugin::dry_run::{CurvePointFile, SnapshotFile};
use crate::plugin::replay::{
    Change, FORMAT, Header, HeaderGpu, TickLine, Trace, TraceWriter, VERSION,
};
use crate::setup;
use crate::telemetry::Event;

/// A node to run: its config, where its relative paths point, and the config's text
/// (kept in a simulator recording so that it can be run again).
#[derive(Debug, Clone)]
pub struct Source {
    pub config: Config,
    pub base_dir: PathBuf,
    pub text: String,
}

impl Source {
    /// The demo node (`gpulet demo`'s config), or the config file at `path`.
    pub fn new(path: Option<&Path>) -> Result<Source, Error> {
        match path {
            None => Ok(Source {
                config: crate::demo::config(),
                base_dir: PathBuf::from("."),
                text: crate::demo::DEMO_CONFIG.to_owned(),
            }),
            Some(path) => {
                let loaded = Config::load(path)?;
                let text = std::fs::read_to_string(path)
                    .map_err(|e| Error::Command(format!("cannot read {}: {e}", path.display())))?;
                Ok(Source { config: loaded.config, base_dir: loaded.base_dir, text })
            }
        }
    }
}

/// One tick, then the wait until the next (virtual time moves on at once).
fn step(agent: &mut Agent, clock: &Option<VirtualClock>, tick: Duration) -> Tick {
    let t = agent.tick();
    match clock {
        Some(c) => c.advance(tick),
        None => std::thread::sleep(tick),
    }
    t
}

/// Run `source` for `ticks` ticks, writing the trace to `out`. Returns the ticks written.
pub fn record(source: &Source, out: &Path, ticks: u64) -> Result<u64, Error> {
    let (mut agent, clock, _) = setup::quiet_agent(&source.config, &source.base_dir)?;
    let tick = source.config.tick;
    let file = std::fs::File::create(out)
        .map_err(|e| Error::Command(format!("cannot write {}: {e}", out.display())))?;
    let io = |e: std::io::Error| Error::Command(format!("cannot write {}: {e}", out.display()));
    let mut writer = None;
    for _ in 0..ticks {
        let t = step(&mut agent, &clock, tick);
        let w = match &mut writer {
            Some(w) => w,
            None => {
                let header = header(source, &agent, &t, clock.is_some());
                writer.insert(
                    TraceWriter::new(
                        std::io::BufWriter::new(file.try_clone().map_err(io)?),
                        &header,
                    )
                    .map_err(io)?,
                )
            }
        };
        w.tick(&tick_line(&t)).map_err(io)?;
    }
    Ok(ticks)
}

fn header(source: &Source, agent: &Agent, first: &Tick, sim: bool) -> Header {
    let curves = &first.snapshot.curves;
    Header {
        format: FORMAT.into(),
        version: VERSION,
        node: agent.node().to_owned(),
        backend: if sim { "sim" } else { "nvml" }.into(),
        tick_ms: source.config.tick.as_millis() as u64,
        gpus: agent
            .inventory()
            .iter()
            .map(|g| HeaderGpu {
                index: g.index,
                uuid: g.uuid.clone(),
                name: g.name.clone(),
                memory_total_mib: g.memory_total_mib,
                curve: curves.get(g.index as usize).cloned().flatten().map(|c| {
                    c.points
                        .iter()
                        .map(|p| CurvePointFile {
                            limit_w: p.limit_w,
                            power_w: p.power_w,
                            work_per_s: p.work_per_s,
                            relative: p.relative,
                        })
                        .collect()
                }),
            })
            .collect(),
        config: sim.then(|| source.text.clone()),
        base_dir: sim.then(|| {
            std::fs::canonicalize(&source.base_dir)
                .unwrap_or_else(|_| source.base_dir.clone())
                .display()
                .to_string()
        }),
    }
}

fn tick_line(t: &Tick) -> TickLine {
    let mut snapshot = SnapshotFile::from_wit(&to_wit(&t.snapshot));
    snapshot.ts_ms = Some(t.snapshot.ts_ms);
    snapshot.utc_offset_s = Some(t.snapshot.utc_offset_s);
    let changes: Vec<Change> = t
        .events
        .iter()
        .filter_map(|e| match e {
            Event::LimitChanged { gpu, to_w, source, reason, .. } => Some(Change {
                gpu: *gpu,
                to_w: *to_w,
                source: source.clone(),
                reason: reason.clone(),
            }),
            _ => None,
        })
        .collect();
    let limits_w = snapshot
        .gpus
        .iter()
        .map(|g| {
            changes.iter().rev().find(|c| c.gpu == g.index).map(|c| c.to_w).or(g.power_limit_w)
        })
        .collect();
    TickLine { ts_ms: t.snapshot.ts_ms, snapshot, changes, limits_w }
}

/// What one closed-loop run achieved.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Outcome {
    pub ticks: usize,
    /// Useful work, in full-speed GPU-seconds (the simulator's measure).
    pub work_gpu_s: f64,
    pub energy_j: f64,
    /// Ticks whose node power exceeded the budget in force by more than 1%.
    pub ticks_over_budget: usize,
}

/// Run the recorded simulator node again for as many ticks as `trace` has: with its own
/// plugins (`plugin` `None`), or with `plugin` (a power plugin's path and JSON config,
/// granted `lower` and `raise`) in their place. Plugin state goes to a temporary folder.
pub fn closed_loop(trace: &Trace, plugin: Option<(&Path, &str)>) -> Result<Outcome, Error> {
    let h = &trace.header;
    let (Some(text), "sim") = (&h.config, h.backend.as_str()) else {
        return Err(Error::Command(
            "this trace is not a simulator recording: a closed-loop replay runs the recorded simulator node again (record one with `gpulet record` on a simulated node)".into(),
        ));
    };
    let mut config = Config::parse(text).map_err(|e| crate::config::ConfigErrors(vec![e]))?;
    config.validate()?;
    let state = tempfile::tempdir()
        .map_err(|e| Error::Command(format!("cannot make a temporary folder: {e}")))?;
    config.plugins.state_dir = state.path().join("state");
    if let Some((path, json)) = plugin {
        let value: serde_json::Value =
            serde_json::from_str(if json.trim().is_empty() { "{}" } else { json })
                .map_err(|e| Error::Command(format!("--config: {e}")))?;
        let table: toml::Table = toml::Table::try_from(&value)
            .map_err(|e| Error::Command(format!("--config: not an object of TOML values: {e}")))?;
        let template: PluginConfig = toml::from_str(&format!(
            "name = \"candidate\"\npath = {:?}",
            path.display().to_string()
        ))
        .expect("a minimal plugin entry parses");
        config.plugin = vec![PluginConfig {
            config: table,
            grants: vec![Grant::Lower, Grant::Raise],
            path: std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()),
            ..template
        }];
    }
    let base_dir = PathBuf::from(h.base_dir.clone().unwrap_or_else(|| ".".into()));
    let source = Source { config, base_dir, text: text.clone() };
    let (mut agent, clock, sim) = setup::quiet_agent(&source.config, &source.base_dir)?;
    let sim =
        sim.ok_or_else(|| Error::Command("the recorded config is not a simulated node".into()))?;
    let work_before = sim.lock().total_work();
    let mut energy_first: Option<f64> = None;
    let mut energy_last = 0.0;
    let mut over = 0;
    for _ in &trace.ticks {
        let t = step(&mut agent, &clock, source.config.tick);
        let s = &t.snapshot.samples;
        let energy: f64 = s.iter().filter_map(|g| g.energy_j.value()).sum();
        energy_first.get_or_insert(energy);
        energy_last = energy;
        let power: f64 = s.iter().filter_map(|g| g.power_w.value()).sum();
        if t.snapshot.budget_w.is_some_and(|b| power > b * 1.01) {
            over += 1;
        }
    }
    let work_gpu_s = sim.lock().total_work() - work_before;
    Ok(Outcome {
        ticks: trace.ticks.len(),
        work_gpu_s,
        energy_j: energy_last - energy_first.unwrap_or(energy_last),
        ticks_over_budget: over,
    })
}
