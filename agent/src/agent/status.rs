//! What the agent is doing now, as `gpulet status` and `/metrics` show it: built between
//! ticks when asked ([`super::Control::Status`]), from the last tick's snapshot, the
//! guard, the plugin chain and the counters the loop keeps. A public contract of the
//! control socket (`docs/socket.md`): fields are added freely, never renamed.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::Agent;
use crate::plugin::chain::PluginStatus;
use crate::telemetry::Event;

/// Events kept for `gpulet status`: the last few, newest last.
pub const RECENT_EVENTS: usize = 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub node: String,
    pub agent_version: String,
    pub backend: String,
    pub tick_ms: u64,
    /// Ticks run since start.
    pub ticks: u64,
    /// Wall time of the last tick, ms since the epoch (`None` before the first).
    pub last_tick_ms: Option<u64>,
    pub budget: Budget,
    /// The node's power at the last tick, the readable GPUs summed.
    pub power_w: Option<f64>,
    pub gpus: Vec<GpuStatus>,
    /// The power plugins in order, then the reporters.
    pub plugins: Vec<PluginStatus>,
    /// What the plugins reported at the last tick (`emit-metric`, reporters' metrics).
    #[serde(default)]
    pub plugin_metrics: Vec<crate::plugin::host::PluginMetric>,
    /// XIDs since start, by GPU and code.
    pub xids: Vec<XidCount>,
    /// Each link's state in a few words (the MQTT broker connected or not).
    pub links: Vec<String>,
    /// Why the last reload did not fully work.
    pub reload_problem: Option<String>,
    pub ticks_late: u64,
    pub sink_errors: u64,
    pub plugin_faults: u64,
    /// Time the last tick took, microseconds.
    pub tick_us: u64,
    /// The last events (as in telemetry, with the `ts_ms` of their tick), newest last.
    pub recent_events: Vec<Value>,
    /// The job queue, when the node runs one.
    #[serde(default)]
    pub jobs: Option<JobsStatus>,
}

/// The job queue in numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobsStatus {
    pub queued: usize,
    pub running: usize,
    /// The scheduler plugin's name, or the built-in one's.
    pub scheduler: String,
    /// Whether the scheduler plugin decides (not faulting into quarantine).
    pub plugin_running: bool,
}

/// The node budget and who set it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Budget {
    /// In force: the commanded one, else the configured one.
    pub budget_w: Option<f64>,
    pub commanded_w: Option<f64>,
    pub configured_w: Option<f64>,
    /// `command`, `config` or `none`.
    pub set_by: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuStatus {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub health: String,
    pub power_w: Option<f64>,
    /// The limit the GPU enforces.
    pub limit_w: Option<f64>,
    /// An operator's limit (set-limit), which has the last word within the bounds.
    pub operator_limit_w: Option<f64>,
    /// The range the guard keeps the limit in.
    pub min_w: f64,
    pub max_w: f64,
    /// Since the driver loaded.
    pub energy_j: Option<f64>,
    pub temp_c: Option<f64>,
    pub util_pct: Option<f64>,
    pub mem_used_mib: Option<u64>,
    pub mem_total_mib: u64,
    pub sm_clock_mhz: Option<u32>,
    pub mem_clock_mhz: Option<u32>,
    /// NVML's clock-event reason bits, and their names.
    pub throttle_bits: Option<u64>,
    pub throttle: Vec<String>,
    pub ecc_corrected: Option<u64>,
    pub ecc_uncorrected: Option<u64>,
    pub remapped_rows_correctable: Option<u32>,
    pub remapped_rows_uncorrectable: Option<u32>,
    pub remapped_rows_pending: Option<bool>,
    pub remapped_rows_failed: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct XidCount {
    pub gpu: u32,
    pub code: u32,
    pub count: u64,
}

/// Keep a tick's events for `gpulet status`.
pub(super) fn remember(recent: &mut VecDeque<Value>, ts_ms: u64, events: &[Event]) {
    for e in events {
        let mut v = serde_json::to_value(e).expect("events serialise");
        v["ts_ms"] = ts_ms.into();
        if recent.len() == RECENT_EVENTS {
            recent.pop_front();
        }
        recent.push_back(v);
    }
}

impl Agent {
    /// What the agent is doing now.
    pub fn status(&self) -> Status {
        let budget_w = self.guard.budget_w();
        let set_by = match (self.desired.budget_w, budget_w) {
            (Some(_), _) => "command",
            (None, Some(_)) => "config",
            (None, None) => "none",
        };
        let last = self.last.as_ref();
        let gpus = self
            .inventory
            .iter()
            .zip(self.bounds.iter())
            .map(|(info, b)| {
                let s = last.and_then(|l| l.samples.get(info.index as usize));
                let ecc = s.and_then(|s| s.ecc.value());
                let rows = s.and_then(|s| s.remapped_rows.value());
                let throttle = s.and_then(|s| s.throttle.value());
                GpuStatus {
                    index: info.index,
                    uuid: info.uuid.clone(),
                    name: info.name.clone(),
                    health: s.map_or(self.health[info.index as usize], |s| s.health).name().into(),
                    power_w: s.and_then(|s| s.power_w.value()),
                    limit_w: s.and_then(|s| s.power_limit_w.value()),
                    operator_limit_w: self.desired.limits_w.get(&info.index).copied(),
                    min_w: b.lo,
                    max_w: b.hi,
                    energy_j: s.and_then(|s| s.energy_j.value()),
                    temp_c: s.and_then(|s| s.temp_c.value()),
                    util_pct: s.and_then(|s| s.util_pct.value()),
                    mem_used_mib: s.and_then(|s| s.mem_used_mib.value()),
                    mem_total_mib: info.memory_total_mib,
                    sm_clock_mhz: s.and_then(|s| s.sm_clock_mhz.value()),
                    mem_clock_mhz: s.and_then(|s| s.mem_clock_mhz.value()),
                    throttle_bits: throttle.map(|t| t.0),
                    throttle: throttle
                        .map_or(Vec::new(), |t| t.names().map(str::to_owned).collect()),
                    ecc_corrected: ecc.map(|e| e.corrected),
                    ecc_uncorrected: ecc.map(|e| e.uncorrected),
                    remapped_rows_correctable: rows.map(|r| r.correctable),
                    remapped_rows_uncorrectable: rows.map(|r| r.uncorrectable),
                    remapped_rows_pending: rows.map(|r| r.pending),
                    remapped_rows_failed: rows.map(|r| r.failed),
                }
            })
            .collect();
        Status {
            node: self.node.clone(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            backend: self.backend.kind().into(),
            tick_ms: self.tick.as_millis() as u64,
            ticks: self.seq,
            last_tick_ms: last.map(|l| l.ts_ms),
            budget: Budget {
                budget_w,
                commanded_w: self.desired.budget_w,
                configured_w: self.configured_budget_w,
                set_by: set_by.into(),
            },
            power_w: last.map(|l| l.node_power_w()),
            gpus,
            plugins: {
                let mut all = self.policy.plugins();
                all.extend(self.reporters.plugins());
                all
            },
            plugin_metrics: self.plugin_metrics.clone(),
            xids: self
                .xid_counts
                .iter()
                .map(|(&(gpu, code), &count)| XidCount { gpu, code, count })
                .collect(),
            links: self.sinks.iter().filter_map(|s| s.status()).collect(),
            reload_problem: self.reload_problem.clone(),
            ticks_late: self.stats.ticks_late,
            sink_errors: self.stats.sink_errors,
            plugin_faults: self.stats.plugin_faults,
            tick_us: self.stats.tick_us,
            recent_events: self.recent.iter().cloned().collect(),
            jobs: self.jobs.as_ref().map(|j| {
                let (queued, running) = j.counts();
                JobsStatus {
                    queued,
                    running,
                    scheduler: j.scheduler_name().to_owned(),
                    plugin_running: j.scheduler_running(),
                }
            }),
        }
    }
}
