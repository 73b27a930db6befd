//! idle-saver: parks GPUs that have idled for a while at their minimum limit and gives
//! the limit back when work arrives (see `gpulet_policy_algos::idle_saver`). State in
//! plugin memory: losing it on a re-instantiation only restarts the idle timers.
//!
//! Config (JSON, all optional): `{"idle_util_pct": 2, "idle_for_s": 60}`.

use gpulet_guest::{ConfigError, GpuInfo, Host, PowerAction, PowerPolicy, Snapshot};
use gpulet_policy_algos::idle_saver::{self, Params, State};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    idle_util_pct: Option<f64>,
    idle_for_s: Option<u64>,
}

fn params(c: Config) -> Result<Params, Vec<ConfigError>> {
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

struct IdleSaver {
    params: Params,
    state: State,
}

impl PowerPolicy for IdleSaver {
    const NAME: &'static str = "idle-saver";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    type Config = Config;

    fn new(config: Config, _gpus: &[GpuInfo]) -> Result<Self, Vec<ConfigError>> {
        Ok(IdleSaver { params: params(config)?, state: State::default() })
    }

    fn decide(&mut self, snapshot: &Snapshot, _host: &dyn Host) -> Vec<PowerAction> {
        let gpus = gpulet_guest::gpus(snapshot);
        gpulet_guest::actions(idle_saver::decide(
            &self.params,
            &mut self.state,
            snapshot.now_ms,
            &gpus,
        ))
    }
}

gpulet_guest::power_plugin!(IdleSaver);
