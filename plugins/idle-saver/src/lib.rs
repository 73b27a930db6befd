//! idle-saver: parks GPUs that have idled for a while at their minimum limit and gives
//! the limit back when work arrives (see `gpulet_policy_algos::idle_saver`). State in
//! plugin memory: losing it on a re-instantiation only restarts the idle timers.
//!
//! Config (JSON, all optional): `{"idle_util_pct": 2, "idle_for_s": 60}`.

use gpulet_guest::{ConfigError, GpuInfo, PluginInfo, PowerAction, PowerGuest, Snapshot};
use gpulet_policy_algos::idle_saver::{self, Params, State};
use serde::Deserialize;
use std::cell::RefCell;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    idle_util_pct: Option<f64>,
    idle_for_s: Option<u64>,
}

fn params(json: &str) -> Result<Params, Vec<ConfigError>> {
    let c: Config = gpulet_guest::parse_config(json)?;
    let d = Params::default();
    let p = Params {
        idle_util_pct: c.idle_util_pct.unwrap_or(d.idle_util_pct),
        idle_for_ms: c.idle_for_s.map_or(d.idle_for_ms, |s| s.saturating_mul(1000)),
    };
    let mut errs = Vec::new();
    gpulet_guest::check_range(&mut errs, "$.idle_util_pct", p.idle_util_pct, 0.0, 50.0, "percent");
    if p.idle_for_ms == 0 || p.idle_for_ms > 86_400_000 {
        errs.push(gpulet_guest::config_error(
            "$.idle_for_s",
            format!("{} is out of range; accepted: 1 to 86400 (seconds)", p.idle_for_ms / 1000),
        ));
    }
    if errs.is_empty() { Ok(p) } else { Err(errs) }
}

thread_local! {
    static STATE: RefCell<(Params, State)> = RefCell::new((Params::default(), State::default()));
}

struct Plugin;

impl PowerGuest for Plugin {
    fn info() -> PluginInfo {
        gpulet_guest::info("idle-saver", env!("CARGO_PKG_VERSION"))
    }

    fn validate_config(config: String) -> Result<(), Vec<ConfigError>> {
        params(&config).map(|_| ())
    }

    fn init(config: String, _gpus: Vec<GpuInfo>) -> Result<(), String> {
        let p = params(&config).map_err(|e| format!("{}: {}", e[0].path, e[0].message))?;
        STATE.with(|s| *s.borrow_mut() = (p, State::default()));
        Ok(())
    }

    fn decide_power(snapshot: Snapshot) -> Vec<PowerAction> {
        let gpus = gpulet_guest::gpus(&snapshot);
        STATE.with(|s| {
            let (p, state) = &mut *s.borrow_mut();
            gpulet_guest::actions(idle_saver::decide(p, state, snapshot.now_ms, &gpus))
        })
    }
}

gpulet_guest::export_power!(Plugin);
