//! thermal-guard: lowers a GPU's limit as it nears a temperature threshold, with
//! hysteresis (see `gpulet_policy_algos::thermal_guard`). Its guarded limits are kept in
//! the host's key-value store, so a re-instantiated or restarted guard keeps holding.
//!
//! Config (JSON, all optional): `{"threshold_c": 83, "hysteresis_c": 5, "step_w": 25}`.

use gpulet_guest::{ConfigError, GpuInfo, PluginInfo, PowerAction, PowerGuest, Snapshot, host};
use gpulet_policy_algos::thermal_guard::{self, Params, State};
use serde::Deserialize;
use std::cell::RefCell;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    threshold_c: Option<f64>,
    hysteresis_c: Option<f64>,
    step_w: Option<f64>,
}

fn params(json: &str) -> Result<Params, Vec<ConfigError>> {
    let c: Config = gpulet_guest::parse_config(json)?;
    let d = Params::default();
    let p = Params {
        threshold_c: c.threshold_c.unwrap_or(d.threshold_c),
        hysteresis_c: c.hysteresis_c.unwrap_or(d.hysteresis_c),
        step_w: c.step_w.unwrap_or(d.step_w),
    };
    let mut errs = Vec::new();
    gpulet_guest::check_range(&mut errs, "$.threshold_c", p.threshold_c, 30.0, 110.0, "°C");
    gpulet_guest::check_range(&mut errs, "$.hysteresis_c", p.hysteresis_c, 0.5, 30.0, "°C");
    gpulet_guest::check_range(&mut errs, "$.step_w", p.step_w, 1.0, 500.0, "watts");
    if errs.is_empty() { Ok(p) } else { Err(errs) }
}

const STATE_KEY: &str = "guarded";

thread_local! {
    static PARAMS: RefCell<Params> = RefCell::new(Params::default());
}

fn load_state() -> State {
    host::kv_get(STATE_KEY).and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
}

struct Plugin;

impl PowerGuest for Plugin {
    fn info() -> PluginInfo {
        gpulet_guest::info("thermal-guard", env!("CARGO_PKG_VERSION"))
    }

    fn validate_config(config: String) -> Result<(), Vec<ConfigError>> {
        params(&config).map(|_| ())
    }

    fn init(config: String, _gpus: Vec<GpuInfo>) -> Result<(), String> {
        let p = params(&config).map_err(|e| format!("{}: {}", e[0].path, e[0].message))?;
        PARAMS.with(|c| *c.borrow_mut() = p);
        Ok(())
    }

    fn decide_power(snapshot: Snapshot) -> Vec<PowerAction> {
        let gpus = gpulet_guest::gpus(&snapshot);
        let mut state = load_state();
        let before = state.clone();
        let actions = PARAMS.with(|p| thermal_guard::decide(&p.borrow(), &mut state, &gpus));
        if state != before {
            let bytes = serde_json::to_vec(&state).unwrap_or_default();
            if let Err(e) = host::kv_set(STATE_KEY, &bytes) {
                host::log(host::Level::Warn, &format!("cannot save guarded limits: {e}"));
            }
        }
        let guarded = state.iter().filter(|s| s.is_some()).count();
        host::emit_metric("guarded_gpus", guarded as f64, None);
        gpulet_guest::actions(actions)
    }
}

gpulet_guest::export_power!(Plugin);
