//! {{name}}: a gpulet reporter.
//!
//! Each tick, after the power decisions, the agent calls `report` with the snapshot;
//! what it returns goes into the telemetry record, MQTT and `/metrics`, tagged with the
//! plugin's name. A reporter changes no limit. The agent bounds what it keeps: metric
//! names of `[a-z0-9_.]`, event kinds of `[a-z0-9-]`, finite values, 64 items a tick,
//! a burst of 10 events then one every 6 s.
//!
//! This one publishes each GPU's power headroom (`headroom_w`: its limit less its draw)
//! and an event `hot` when a GPU reaches `hot_c` (once, until it cools below). Change
//! `report_on` to yours; keep it a plain function of the snapshot (and of what it
//! remembers) so that `cargo test` checks it natively.
//!
//! Config (JSON, all optional): `{"hot_c": 85}`.

wit_bindgen::generate!({ path: "wit", world: "reporter" });

use std::cell::RefCell;
use std::collections::BTreeSet;

// The world's own types (`Snapshot`, `ReportItem`, `ConfigError`, `GpuInfo`,
// `PluginInfo`) are in scope at the crate root; the rest are in `gpulet::policy::types`.
use gpulet::policy::types::{Metric, ReportEvent};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_hot_c")]
    hot_c: f64,
}

fn default_hot_c() -> f64 {
    85.0
}

fn parse(json: &str) -> Result<Config, Vec<ConfigError>> {
    let json = if json.trim().is_empty() { "{}" } else { json };
    let c: Config = serde_json::from_str(json).map_err(|e| {
        vec![ConfigError {
            path: "$".into(),
            message: e.to_string(),
        }]
    })?;
    if !(30.0..=120.0).contains(&c.hot_c) {
        let message = format!("{} is out of range; accepted: 30 to 120 (°C)", c.hot_c);
        return Err(vec![ConfigError {
            path: "$.hot_c".into(),
            message,
        }]);
    }
    Ok(c)
}

/// The report for one tick; `hot` holds the GPUs already reported hot.
fn report_on(c: &Config, hot: &mut BTreeSet<u32>, snapshot: &Snapshot) -> Vec<ReportItem> {
    let mut items = Vec::new();
    for g in &snapshot.gpus {
        if let (Some(limit), Some(power)) = (g.power_limit_w, g.power_w) {
            let m = Metric {
                name: "headroom_w".into(),
                value: limit - power,
                gpu: Some(g.index),
            };
            items.push(ReportItem::Metric(m));
        }
        match g.temp_c {
            Some(t) if t >= c.hot_c && hot.insert(g.index) => {
                let message = format!(
                    "GPU {} is at {t:.0} °C (hot from {:.0} °C)",
                    g.index, c.hot_c
                );
                items.push(ReportItem::Event(ReportEvent {
                    kind: "hot".into(),
                    message,
                    gpu: Some(g.index),
                }));
            }
            Some(t) if t < c.hot_c => {
                hot.remove(&g.index);
            }
            _ => {}
        }
    }
    items
}

thread_local! {
    static STATE: RefCell<(Option<Config>, BTreeSet<u32>)> = const { RefCell::new((None, BTreeSet::new())) };
}

struct Plugin;

impl Guest for Plugin {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "{{name}}".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            api_version: "{{api}}".into(),
        }
    }

    fn validate_config(config: String) -> Result<(), Vec<ConfigError>> {
        parse(&config).map(|_| ())
    }

    fn init(config: String, _gpus: Vec<GpuInfo>) -> Result<(), String> {
        let c = parse(&config).map_err(|e| format!("{}: {}", e[0].path, e[0].message))?;
        STATE.with(|s| s.borrow_mut().0 = Some(c));
        Ok(())
    }

    fn report(snapshot: Snapshot) -> Vec<ReportItem> {
        STATE.with(|s| {
            let (config, hot) = &mut *s.borrow_mut();
            config
                .as_ref()
                .map(|c| report_on(c, hot, &snapshot))
                .unwrap_or_default()
        })
    }
}

export!(Plugin);

#[cfg(test)]
mod tests {
    use super::*;
    use gpulet::policy::types::{Gpu, Health, Throttle};

    fn snapshot(temp_c: f64) -> Snapshot {
        let gpu = Gpu {
            index: 0,
            power_w: Some(300.0),
            power_limit_w: Some(700.0),
            energy_j: None,
            temp_c: Some(temp_c),
            util_pct: Some(90.0),
            mem_used_mib: None,
            sm_clock_mhz: None,
            throttle: Throttle::empty(),
            health: Health::Ok,
            min_limit_w: 200.0,
            max_limit_w: 700.0,
            default_limit_w: 700.0,
            proposed_limit_w: None,
        };
        Snapshot {
            seq: 1,
            now_ms: 0,
            budget_w: None,
            gpus: vec![gpu],
        }
    }

    fn events(items: &[ReportItem]) -> usize {
        items
            .iter()
            .filter(|i| matches!(i, ReportItem::Event(_)))
            .count()
    }

    #[test]
    fn headroom_every_tick_and_hot_once_until_it_cools() {
        let c = parse("{}").unwrap();
        let mut hot = BTreeSet::new();
        let first = report_on(&c, &mut hot, &snapshot(90.0));
        assert!(
            matches!(&first[0], ReportItem::Metric(m) if m.name == "headroom_w" && m.value == 400.0)
        );
        assert_eq!(events(&first), 1);
        assert_eq!(
            events(&report_on(&c, &mut hot, &snapshot(91.0))),
            0,
            "still hot: said once"
        );
        assert_eq!(events(&report_on(&c, &mut hot, &snapshot(60.0))), 0);
        assert_eq!(
            events(&report_on(&c, &mut hot, &snapshot(90.0))),
            1,
            "hot again"
        );
    }
}
