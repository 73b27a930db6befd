//! thermal-guard: lowers a GPU's limit as it nears a temperature threshold, with
//! hysteresis (see `gpulet_policy_algos::thermal_guard`). Its guarded limits are kept in
//! the host's key-value store, so a re-instantiated or restarted guard keeps holding.
//!
//! Config (JSON, all optional): `{"threshold_c": 83, "hysteresis_c": 5, "step_w": 25}`.

use gpulet_guest::{ConfigError, GpuInfo, Host, PowerAction, PowerPolicy, Snapshot, host};
use gpulet_policy_algos::thermal_guard::{self, Params, State};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    threshold_c: Option<f64>,
    hysteresis_c: Option<f64>,
    step_w: Option<f64>,
}

fn params(c: Config) -> Result<Params, Vec<ConfigError>> {
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

pub struct ThermalGuard {
    params: Params,
}

impl PowerPolicy for ThermalGuard {
    const NAME: &'static str = "thermal-guard";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    type Config = Config;

    fn new(config: Config, _gpus: &[GpuInfo]) -> Result<Self, Vec<ConfigError>> {
        Ok(ThermalGuard { params: params(config)? })
    }

    /// The guarded limits live in the key-value store, not in memory: a fresh instance
    /// (after a fault, a restart) keeps holding the GPUs it held.
    fn decide(&mut self, snapshot: &Snapshot, host: &dyn Host) -> Vec<PowerAction> {
        let gpus = gpulet_guest::gpus(snapshot);
        let mut state: State = host
            .kv_get(STATE_KEY)
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let before = state.clone();
        let actions = thermal_guard::decide(&self.params, &mut state, &gpus);
        if state != before {
            let bytes = serde_json::to_vec(&state).unwrap_or_default();
            if let Err(e) = host.kv_set(STATE_KEY, &bytes) {
                host.log(host::Level::Warn, &format!("cannot save guarded limits: {e}"));
            }
        }
        let guarded = state.iter().filter(|s| s.is_some()).count();
        host.emit_metric("guarded_gpus", guarded as f64, None);
        gpulet_guest::actions(actions)
    }
}

gpulet_guest::power_plugin!(ThermalGuard);

#[cfg(test)]
mod tests {
    use super::*;
    use gpulet_guest::FakeHost;
    use gpulet_guest::sdk::{start, test_snapshot};

    /// Natively, against a fake host: a hot GPU is stepped down, and a fresh instance
    /// (what the host makes after a fault) keeps holding it, from the key-value store.
    #[test]
    fn a_fresh_instance_keeps_holding_what_the_last_one_guarded() {
        let host = FakeHost::default();
        let mut guard = start("{}", &[], ThermalGuard::new).ok().unwrap();
        let a = guard.decide(&test_snapshot(1, 700.0, &[60.0, 90.0]), &host);
        assert_eq!(a.len(), 1, "{a:?}");
        assert_eq!(a[0].gpu, 1);
        assert!(a[0].limit_w < 700.0, "{a:?}");
        assert!(host.kv.borrow().contains_key(STATE_KEY));
        assert_eq!(host.metrics.borrow().last().unwrap().1, 1.0, "one GPU guarded");

        let mut fresh = start("{}", &[], ThermalGuard::new).ok().unwrap();
        let b = fresh.decide(&test_snapshot(2, a[0].limit_w, &[60.0, 82.0]), &host);
        assert!(b.iter().any(|x| x.gpu == 1 && x.limit_w <= a[0].limit_w), "still held: {b:?}");
    }

    #[test]
    fn a_bad_config_names_its_path() {
        let e = start(r#"{"threshold_c": 5}"#, &[], ThermalGuard::new).err().unwrap();
        assert_eq!(e[0].path, "$.threshold_c");
    }
}
