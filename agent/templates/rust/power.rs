//! {{name}}: a gpulet power policy.
//!
//! Each tick the agent calls `decide_power` with a snapshot of the node and applies what
//! it returns through its guard (bounds, budget, rate limit, audit). This one parks idle
//! GPUs: a GPU below `idle_util_pct` utilisation gets `idle_limit_w` (or its lowest
//! limit), a busy one its highest. Change `decide` to your policy; keep it a plain
//! function of the snapshot so that `cargo test` checks it natively.
//!
//! Config (JSON, all optional): `{"idle_util_pct": 5, "idle_limit_w": 200}`. It needs the
//! grants `lower` and `raise` (`grants = ["lower", "raise"]`).

wit_bindgen::generate!({ path: "wit", world: "power" });

use std::cell::RefCell;

// The world's own types (`Snapshot`, `PowerAction`, `ConfigError`, `GpuInfo`,
// `PluginInfo`) are in scope at the crate root; the rest are in `gpulet::policy::types`.
use gpulet::policy::host;
use serde::Deserialize;

/// The config, checked strictly: an unknown key is an error.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_idle_util_pct")]
    idle_util_pct: f64,
    idle_limit_w: Option<f64>,
}

fn default_idle_util_pct() -> f64 {
    5.0
}

/// Parse and check the config; each error names its JSON path.
fn parse(json: &str) -> Result<Config, Vec<ConfigError>> {
    let json = if json.trim().is_empty() { "{}" } else { json };
    let c: Config = serde_json::from_str(json).map_err(|e| {
        vec![ConfigError {
            path: "$".into(),
            message: e.to_string(),
        }]
    })?;
    if !(0.0..=100.0).contains(&c.idle_util_pct) {
        let message = format!(
            "{} is out of range; accepted: 0 to 100 (%)",
            c.idle_util_pct
        );
        return Err(vec![ConfigError {
            path: "$.idle_util_pct".into(),
            message,
        }]);
    }
    if c.idle_limit_w.is_some_and(|w| w.is_nan() || w <= 0.0) {
        let message = "accepted: a positive number of watts".into();
        return Err(vec![ConfigError {
            path: "$.idle_limit_w".into(),
            message,
        }]);
    }
    Ok(c)
}

/// The policy: a limit for every GPU with a utilisation reading.
fn decide(c: &Config, snapshot: &Snapshot) -> Vec<PowerAction> {
    snapshot
        .gpus
        .iter()
        .filter_map(|g| {
            let util = g.util_pct?;
            let (limit_w, reason) = if util < c.idle_util_pct {
                let w = c
                    .idle_limit_w
                    .unwrap_or(g.min_limit_w)
                    .clamp(g.min_limit_w, g.max_limit_w);
                (
                    w,
                    format!(
                        "idle ({util:.0} % < {:.0} %): parked at {w:.0} W",
                        c.idle_util_pct
                    ),
                )
            } else {
                (
                    g.max_limit_w,
                    format!("busy ({util:.0} %): its highest limit"),
                )
            };
            Some(PowerAction {
                gpu: g.index,
                limit_w,
                reason,
            })
        })
        .collect()
}

thread_local! {
    /// The config `init` was given (an instance is re-made after a fault, and `init`
    /// called again, so nothing else needs keeping).
    static CONFIG: RefCell<Option<Config>> = const { RefCell::new(None) };
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

    fn init(config: String, gpus: Vec<GpuInfo>) -> Result<(), String> {
        let c = parse(&config).map_err(|e| format!("{}: {}", e[0].path, e[0].message))?;
        host::log(
            host::Level::Info,
            &format!("started on {} GPUs with {c:?}", gpus.len()),
        );
        CONFIG.with(|slot| *slot.borrow_mut() = Some(c));
        Ok(())
    }

    fn decide_power(snapshot: Snapshot) -> Vec<PowerAction> {
        CONFIG.with(|c| {
            c.borrow()
                .as_ref()
                .map(|c| decide(c, &snapshot))
                .unwrap_or_default()
        })
    }
}

export!(Plugin);

#[cfg(test)]
mod tests {
    use super::*;
    use gpulet::policy::types::{Gpu, Health, Throttle};

    fn gpu(index: u32, util: f64) -> Gpu {
        Gpu {
            index,
            power_w: Some(300.0),
            power_limit_w: Some(700.0),
            energy_j: None,
            temp_c: Some(60.0),
            util_pct: Some(util),
            mem_used_mib: None,
            sm_clock_mhz: None,
            throttle: Throttle::empty(),
            health: Health::Ok,
            min_limit_w: 200.0,
            max_limit_w: 700.0,
            default_limit_w: 700.0,
            proposed_limit_w: None,
        }
    }

    #[test]
    fn idle_gpus_are_parked_and_busy_ones_get_their_highest_limit() {
        let snapshot = Snapshot {
            seq: 1,
            now_ms: 0,
            budget_w: None,
            gpus: vec![gpu(0, 1.0), gpu(1, 90.0)],
        };
        let actions = decide(&parse("{}").unwrap(), &snapshot);
        let limits: Vec<(u32, f64)> = actions.iter().map(|a| (a.gpu, a.limit_w)).collect();
        assert_eq!(limits, [(0, 200.0), (1, 700.0)]);
        assert!(actions[0].reason.starts_with("idle"));
    }

    #[test]
    fn a_bad_config_names_its_path() {
        assert_eq!(
            parse(r#"{"idle_util_pct": 200}"#).unwrap_err()[0].path,
            "$.idle_util_pct"
        );
        assert!(
            parse(r#"{"idle": 1}"#).unwrap_err()[0]
                .message
                .contains("unknown field")
        );
    }
}
