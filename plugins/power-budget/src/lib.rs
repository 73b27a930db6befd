//! power-budget: splits the node power budget across the GPUs by demand, and by their
//! work-per-watt curves where `gpulet calibrate` measured them (see
//! `gpulet_policy_algos::power_budget` for the algorithm). Every tick is decided from the
//! snapshot alone; the curves, which do not change while the instance lives, are fetched
//! once.
//!
//! Config (JSON, all optional):
//! `{"margin_w": 25, "capped_within": 0.03, "reserve": 0.01, "use_curves": false}`.

use gpulet_guest::{ConfigError, GpuInfo, PluginInfo, PowerAction, PowerGuest, Snapshot};
use gpulet_policy_algos::Curve;
use gpulet_policy_algos::power_budget::{self, Params};
use serde::Deserialize;
use std::cell::RefCell;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    margin_w: Option<f64>,
    capped_within: Option<f64>,
    reserve: Option<f64>,
    use_curves: Option<bool>,
}

fn params(json: &str) -> Result<Params, Vec<ConfigError>> {
    let c: Config = gpulet_guest::parse_config(json)?;
    let d = Params::default();
    let p = Params {
        margin_w: c.margin_w.unwrap_or(d.margin_w),
        capped_within: c.capped_within.unwrap_or(d.capped_within),
        reserve: c.reserve.unwrap_or(d.reserve),
        use_curves: c.use_curves.unwrap_or(d.use_curves),
    };
    let mut errs = Vec::new();
    gpulet_guest::check_range(&mut errs, "$.margin_w", p.margin_w, 0.0, 500.0, "watts");
    gpulet_guest::check_range(
        &mut errs,
        "$.capped_within",
        p.capped_within,
        0.0,
        0.5,
        "a fraction of the limit",
    );
    gpulet_guest::check_range(
        &mut errs,
        "$.reserve",
        p.reserve,
        0.0,
        0.2,
        "a fraction of the budget",
    );
    if errs.is_empty() { Ok(p) } else { Err(errs) }
}

thread_local! {
    static PARAMS: RefCell<Params> = RefCell::new(Params::default());
    static CURVES: RefCell<Option<Vec<Option<Curve>>>> = const { RefCell::new(None) };
}

struct Plugin;

impl PowerGuest for Plugin {
    fn info() -> PluginInfo {
        gpulet_guest::info("power-budget", env!("CARGO_PKG_VERSION"))
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
        let mut gpus = gpulet_guest::gpus(&snapshot);
        let use_curves = PARAMS.with(|p| p.borrow().use_curves);
        CURVES.with(|c| {
            if !use_curves {
                return;
            }
            let curves =
                c.borrow_mut().get_or_insert_with(|| gpulet_guest::curves(&snapshot)).clone();
            for (g, curve) in gpus.iter_mut().zip(curves) {
                g.curve = curve;
            }
        });
        PARAMS.with(|p| {
            gpulet_guest::actions(power_budget::decide(&p.borrow(), snapshot.budget_w, &gpus))
        })
    }
}

gpulet_guest::export_power!(Plugin);
