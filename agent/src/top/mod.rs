//! `gpulet top`: a whole fleet seen from its MQTT topics (`docs/mqtt.md`). [`Fleet`] is
//! the model: every message a node publishes updates that node's row (online or offline
//! from its status and Will, power and budget, its hottest and its unhealthy GPUs, plugin
//! faults) and notable events go to a short list. It is plain data, fed by
//! `mqtt::watch` and drawn by `view`, so that `--once --json` and the terminal view
//! show the same thing. It parses only the fields it shows: at 5,000 nodes it reads
//! about 5,000 telemetry records a second.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub mod view;

/// Events kept for the view, newest last.
const EVENTS: usize = 200;
/// Nodes kept at most (a broker that lets anyone publish under the root must not grow
/// the view without bound).
const MAX_NODES: usize = 100_000;

#[derive(Debug, Clone, Default, Serialize)]
pub struct NodeRow {
    pub node: String,
    /// From the retained status: `None` until it is seen.
    pub online: Option<bool>,
    pub agent_version: Option<String>,
    /// Wall time of its last telemetry record, ms.
    pub last_ts_ms: Option<u64>,
    pub power_w: Option<f64>,
    pub budget_w: Option<f64>,
    pub gpus: usize,
    /// The hottest GPU: index and °C.
    pub hottest: Option<(u32, f64)>,
    /// GPUs whose health is not `ok`: index and health.
    pub unhealthy: Vec<(u32, String)>,
    /// Plugin calls stopped since the agent started (its telemetry's count).
    pub plugin_faults: u64,
}

impl NodeRow {
    /// Power as a share of the budget, where there is one.
    pub fn budget_share(&self) -> Option<f64> {
        match (self.power_w, self.budget_w) {
            (Some(p), Some(b)) if b > 0.0 => Some(p / b),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct EventLine {
    pub node: String,
    pub kind: String,
    pub ts_ms: u64,
    pub detail: String,
}

/// What the rows are sorted by (the view's `s` key cycles through them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SortKey {
    Node,
    #[default]
    Power,
    Budget,
    Temp,
    Unhealthy,
    Faults,
}

impl SortKey {
    pub fn next(self) -> SortKey {
        match self {
            SortKey::Node => SortKey::Power,
            SortKey::Power => SortKey::Budget,
            SortKey::Budget => SortKey::Temp,
            SortKey::Temp => SortKey::Unhealthy,
            SortKey::Unhealthy => SortKey::Faults,
            SortKey::Faults => SortKey::Node,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            SortKey::Node => "node",
            SortKey::Power => "power",
            SortKey::Budget => "power/budget",
            SortKey::Temp => "hottest GPU",
            SortKey::Unhealthy => "unhealthy GPUs",
            SortKey::Faults => "plugin faults",
        }
    }
}

/// The fleet's totals.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Summary {
    pub nodes: usize,
    pub online: usize,
    pub offline: usize,
    pub gpus: usize,
    pub power_w: f64,
    /// Summed over the nodes that have a budget.
    pub budget_w: f64,
    pub unhealthy_gpus: usize,
    pub plugin_faults: u64,
    /// `limit-changed` events seen (counted, not listed: a fleet under budgets makes many).
    pub limit_changes: u64,
    pub messages: u64,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "nodes {} ({} online, {} offline) · GPUs {} · power {:.1} kW",
            self.nodes,
            self.online,
            self.offline,
            self.gpus,
            self.power_w / 1000.0
        )?;
        if self.budget_w > 0.0 {
            write!(f, " of {:.1} kW budget", self.budget_w / 1000.0)?;
        }
        write!(
            f,
            " · unhealthy GPUs {} · plugin faults {}",
            self.unhealthy_gpus, self.plugin_faults
        )
    }
}

/// The fleet as its topics describe it.
#[derive(Debug)]
pub struct Fleet {
    root: String,
    filter: Option<glob::Pattern>,
    nodes: BTreeMap<String, NodeRow>,
    events: VecDeque<EventLine>,
    limit_changes: u64,
    messages: u64,
}

#[derive(Deserialize)]
struct Telemetry<'a> {
    ts_ms: u64,
    /// Replayed after an outage: older than what the node sends live.
    #[serde(default)]
    historical: bool,
    power_w: f64,
    budget_w: Option<f64>,
    #[serde(borrow)]
    gpus: Vec<Gpu<'a>>,
    agent: Agent,
}

#[derive(Deserialize)]
struct Gpu<'a> {
    index: u32,
    temp_c: Option<f64>,
    health: &'a str,
}

#[derive(Deserialize)]
struct Agent {
    plugin_faults: u64,
}

impl Fleet {
    /// `filter`: a glob over node ids (`gpu-a*`); `None` for every node.
    pub fn new(root: &str, filter: Option<glob::Pattern>) -> Fleet {
        Fleet {
            root: root.to_owned(),
            filter,
            nodes: BTreeMap::new(),
            events: VecDeque::new(),
            limit_changes: 0,
            messages: 0,
        }
    }

    /// Take one message; what cannot be read is skipped (a viewer never stops on a bad
    /// message).
    pub fn apply(&mut self, topic: &str, payload: &[u8]) {
        let Some(rest) = topic.strip_prefix(&self.root).and_then(|r| r.strip_prefix('/')) else {
            return;
        };
        let Some((node, what)) = rest.split_once('/') else { return };
        if self.filter.as_ref().is_some_and(|f| !f.matches(node)) || payload.is_empty() {
            return;
        }
        // A node id is printed to the terminal: nothing that could be an escape sequence.
        if node.is_empty() || node.len() > 128 || !node.chars().all(crate::control::id_char) {
            return;
        }
        if self.nodes.len() >= MAX_NODES && !self.nodes.contains_key(node) {
            return;
        }
        self.messages += 1;
        let row = || NodeRow { node: node.to_owned(), ..NodeRow::default() };
        match what {
            "telemetry" => {
                let Ok(t) = serde_json::from_slice::<Telemetry<'_>>(payload) else { return };
                let r = self.nodes.entry(node.to_owned()).or_insert_with(row);
                // Records replayed after an outage are older than what is shown. (By the
                // flag, not the clock: a node whose clock stepped back still updates.)
                if t.historical && r.last_ts_ms.is_some() {
                    return;
                }
                r.last_ts_ms = Some(t.ts_ms);
                r.power_w = Some(t.power_w);
                r.budget_w = t.budget_w;
                r.gpus = t.gpus.len();
                r.hottest = t
                    .gpus
                    .iter()
                    .filter_map(|g| g.temp_c.map(|c| (g.index, c)))
                    .max_by(|a, b| a.1.total_cmp(&b.1));
                r.unhealthy = t
                    .gpus
                    .iter()
                    .filter(|g| g.health != "ok")
                    .map(|g| (g.index, g.health.to_owned()))
                    .collect();
                r.plugin_faults = t.agent.plugin_faults;
                // A node that reports is online, whatever an old retained status said.
                r.online = Some(true);
            }
            "status" => {
                let Ok(v) = serde_json::from_slice::<Value>(payload) else { return };
                let r = self.nodes.entry(node.to_owned()).or_insert_with(row);
                r.online = v["state"].as_str().map(|s| s == "online");
            }
            "birth" => {
                let Ok(v) = serde_json::from_slice::<Value>(payload) else { return };
                let r = self.nodes.entry(node.to_owned()).or_insert_with(row);
                r.agent_version = v["agent_version"].as_str().map(str::to_owned);
                r.gpus = v["gpus"].as_array().map_or(r.gpus, Vec::len);
            }
            w if w.starts_with("events/") => {
                let kind = &w["events/".len()..];
                if kind == "limit-changed" {
                    self.limit_changes += 1;
                    return;
                }
                let Ok(Value::Object(m)) = serde_json::from_slice::<Value>(payload) else { return };
                if self.events.len() == EVENTS {
                    self.events.pop_front();
                }
                self.events.push_back(EventLine {
                    node: node.to_owned(),
                    kind: kind.to_owned(),
                    ts_ms: m.get("ts_ms").and_then(Value::as_u64).unwrap_or(0),
                    detail: crate::telemetry::event_detail(&m),
                });
            }
            _ => {}
        }
    }

    pub fn summary(&self) -> Summary {
        let mut s = Summary {
            nodes: self.nodes.len(),
            limit_changes: self.limit_changes,
            messages: self.messages,
            ..Summary::default()
        };
        for r in self.nodes.values() {
            match r.online {
                Some(true) => s.online += 1,
                Some(false) => s.offline += 1,
                None => {}
            }
            s.gpus += r.gpus;
            if r.online != Some(false) {
                s.power_w += r.power_w.unwrap_or(0.0);
                s.budget_w += r.budget_w.unwrap_or(0.0);
            }
            s.unhealthy_gpus += r.unhealthy.len();
            s.plugin_faults += r.plugin_faults;
        }
        s
    }

    /// The rows, sorted (the largest first but by node, which is alphabetical).
    pub fn rows(&self, key: SortKey) -> Vec<&NodeRow> {
        let mut rows: Vec<&NodeRow> = self.nodes.values().collect();
        let f = |v: Option<f64>| v.unwrap_or(f64::NEG_INFINITY);
        match key {
            SortKey::Node => {}
            SortKey::Power => rows.sort_by(|a, b| f(b.power_w).total_cmp(&f(a.power_w))),
            SortKey::Budget => {
                rows.sort_by(|a, b| f(b.budget_share()).total_cmp(&f(a.budget_share())))
            }
            SortKey::Temp => {
                rows.sort_by(|a, b| f(b.hottest.map(|h| h.1)).total_cmp(&f(a.hottest.map(|h| h.1))))
            }
            SortKey::Unhealthy => rows.sort_by_key(|r| std::cmp::Reverse(r.unhealthy.len())),
            SortKey::Faults => rows.sort_by_key(|r| std::cmp::Reverse(r.plugin_faults)),
        }
        rows
    }

    pub fn events(&self) -> impl DoubleEndedIterator<Item = &EventLine> {
        self.events.iter()
    }

    /// The fleet as JSON (`gpulet top --once --json`).
    pub fn snapshot(&self, key: SortKey) -> Value {
        serde_json::json!({
            "root": self.root,
            "sort": key,
            "summary": self.summary(),
            "nodes": self.rows(key),
            "events": self.events.iter().collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_follow_status_telemetry_and_events_and_skip_what_they_cannot_read() {
        let mut f = Fleet::new("gpulet/v1", Some(glob::Pattern::new("n*").unwrap()));
        let tel = |ts: u64, p: f64, t: f64, h: &str| {
            format!(
                r#"{{"ts_ms":{ts},"power_w":{p},"budget_w":1000,"gpus":[{{"index":0,"temp_c":{t},"health":"ok"}},{{"index":1,"temp_c":40,"health":"{h}"}}],"agent":{{"plugin_faults":2}}}}"#
            )
        };
        f.apply("gpulet/v1/n1/status", br#"{"state":"online","inc":1,"ts_ms":1}"#);
        f.apply("gpulet/v1/n1/telemetry", tel(10, 900.0, 70.0, "ok").as_bytes());
        f.apply("gpulet/v1/n2/telemetry", tel(10, 500.0, 90.0, "degraded").as_bytes());
        let old = tel(5, 1.0, 1.0, "ok").replacen('{', r#"{"historical":true,"#, 1);
        f.apply("gpulet/v1/n2/telemetry", old.as_bytes()); // replayed: ignored
        f.apply("gpulet/v1/n\u{1b}[2J/telemetry", tel(10, 5.0, 5.0, "ok").as_bytes()); // escape
        f.apply("gpulet/v1/n1/telemetry", b"{not json");
        f.apply("gpulet/v1/x9/telemetry", tel(10, 5.0, 5.0, "ok").as_bytes()); // filtered
        f.apply("other/n1/telemetry", tel(10, 5.0, 5.0, "ok").as_bytes());
        f.apply("gpulet/v1/n3/status", br#"{"state":"offline","inc":1,"ts_ms":1}"#);
        f.apply(
            "gpulet/v1/n2/events/xid",
            br#"{"kind":"xid","gpu":1,"code":79,"node":"n2","ts_ms":9}"#,
        );
        f.apply("gpulet/v1/n2/events/limit-changed", br#"{"kind":"limit-changed"}"#);
        let s = f.summary();
        assert_eq!((s.nodes, s.online, s.offline, s.gpus, s.unhealthy_gpus), (3, 2, 1, 4, 1));
        assert_eq!(
            (s.power_w, s.budget_w, s.plugin_faults, s.limit_changes),
            (1400.0, 2000.0, 4, 1)
        );
        let by_temp: Vec<&str> = f.rows(SortKey::Temp).iter().map(|r| r.node.as_str()).collect();
        assert_eq!(by_temp, ["n2", "n1", "n3"]);
        let by_power: Vec<&str> = f.rows(SortKey::Power).iter().map(|r| r.node.as_str()).collect();
        assert_eq!(by_power, ["n1", "n2", "n3"]);
        let e: Vec<&EventLine> = f.events().collect();
        assert_eq!(
            (e.len(), e[0].kind.as_str(), e[0].detail.as_str()),
            (1, "xid", "code=79 gpu=1")
        );
    }
}
