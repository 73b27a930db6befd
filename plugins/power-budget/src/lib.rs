//! power-budget: splits the node power budget across the GPUs by demand, and by their
//! work-per-watt curves where `gpulet calibrate` measured them (see
//! `gpulet_policy_algos::power_budget` for the algorithm). Every tick is decided from the
//! snapshot alone; the curves, which do not change while the instance lives, are fetched
//! once.
//!
//! Config (JSON, all optional):
//! `{"margin_w": 25, "capped_within": 0.03, "reserve": 0.01, "use_curves": false}`.

use gpulet_guest::{ConfigError, GpuInfo, Host, PowerAction, PowerPolicy, Snapshot};
use gpulet_policy_algos::Curve;
use gpulet_policy_algos::power_budget::{self, Params};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    margin_w: Option<f64>,
    capped_within: Option<f64>,
    reserve: Option<f64>,
    use_curves: Option<bool>,
}

fn params(c: Config) -> Result<Params, Vec<ConfigError>> {
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

struct PowerBudget {
    params: Params,
    /// Fetched at the first tick that needs them: they do not change while it lives.
    curves: Option<Vec<Option<Curve>>>,
}

impl PowerPolicy for PowerBudget {
    const NAME: &'static str = "power-budget";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    type Config = Config;

    fn new(config: Config, _gpus: &[GpuInfo]) -> Result<Self, Vec<ConfigError>> {
        Ok(PowerBudget { params: params(config)?, curves: None })
    }

    fn decide(&mut self, snapshot: &Snapshot, host: &dyn Host) -> Vec<PowerAction> {
        let mut gpus = gpulet_guest::gpus(snapshot);
        if self.params.use_curves {
            let curves = self.curves.get_or_insert_with(|| gpulet_guest::curves(snapshot, host));
            for (g, curve) in gpus.iter_mut().zip(curves.iter()) {
                g.curve = curve.clone();
            }
        }
        gpulet_guest::actions(power_budget::decide(&self.params, snapshot.budget_w, &gpus))
    }
}

gpulet_guest::power_plugin!(PowerBudget);
