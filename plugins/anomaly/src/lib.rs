//! anomaly: a reporter that flags GPUs behaving unlike their peers, or stuck throttled
//! (see `gpulet_policy_algos::anomaly`). It publishes metrics and events; it never
//! proposes a limit.
//!
//! What it flags:
//! - **power-departure** / **temp-departure**: a busy GPU (utilisation at or above
//!   `min_util_pct`) whose power differs from the median of its peers (the other healthy
//!   GPUs within `util_band_pct` utilisation points of it, at least two of them) by more
//!   than `power_dev_pct` % of that median, or whose temperature differs from theirs by
//!   more than `temp_dev_c` °C;
//! - **throttle-stuck**: a GPU whose clock is held down by the same reason for
//!   `throttle_ticks` ticks in a row (`gpu-idle` never counts; `sw-power-cap` only with
//!   `"ignore_power_cap": false`, since a power policy caps on purpose);
//! - and a `…-cleared` event for each when it ends.
//!
//! Every tick it publishes `anomaly.flagged_gpus`, and per compared GPU
//! `anomaly.power_dev_pct` and `anomaly.temp_dev_c` (signed departures from the peers'
//! median).
//!
//! Why debounce: a reading past a threshold for one tick (a kernel launch, a fan spinning
//! up, a sample taken mid-transition) is noise more often than a fault, and an event every
//! tick buries the one that matters. A departure is flagged only after `debounce_ticks`
//! ticks in a row, and reported twice in all: once at its onset and once when it has been
//! absent `debounce_ticks` ticks in a row.
//!
//! Config (JSON, all optional, defaults shown): `{"power_dev_pct": 15, "temp_dev_c": 15,
//! "util_band_pct": 10, "min_util_pct": 50, "debounce_ticks": 10, "throttle_ticks": 30,
//! "ignore_power_cap": true}`.
//!
//! State in plugin memory: the algorithms crate's state is not serialisable, so it cannot
//! go to the host's key-value store. Losing it on a re-instantiation restarts the
//! debounce counters: a departure still present is reported again, and one flagged before
//! gets no clear event.

use gpulet_guest::{
    ConfigError, GpuInfo, Health, Host, Metric, ReportEvent, ReportItem, ReporterPolicy, Snapshot,
    Throttle,
};
use gpulet_policy_algos::anomaly::{self, Params, Reading, State};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    power_dev_pct: Option<f64>,
    temp_dev_c: Option<f64>,
    util_band_pct: Option<f64>,
    min_util_pct: Option<f64>,
    debounce_ticks: Option<u32>,
    throttle_ticks: Option<u32>,
    ignore_power_cap: Option<bool>,
}

fn params(c: Config) -> Result<Params, Vec<ConfigError>> {
    let d = Params::default();
    let p = Params {
        power_dev_pct: c.power_dev_pct.unwrap_or(d.power_dev_pct),
        temp_dev_c: c.temp_dev_c.unwrap_or(d.temp_dev_c),
        util_band_pct: c.util_band_pct.unwrap_or(d.util_band_pct),
        min_util_pct: c.min_util_pct.unwrap_or(d.min_util_pct),
        debounce_ticks: c.debounce_ticks.unwrap_or(d.debounce_ticks),
        throttle_ticks: c.throttle_ticks.unwrap_or(d.throttle_ticks),
        ignore_power_cap: c.ignore_power_cap.unwrap_or(d.ignore_power_cap),
    };
    let mut errs = Vec::new();
    let check = gpulet_guest::check_range;
    check(&mut errs, "$.power_dev_pct", p.power_dev_pct, 1.0, 100.0, "percent of the median");
    check(&mut errs, "$.temp_dev_c", p.temp_dev_c, 1.0, 50.0, "°C");
    check(&mut errs, "$.util_band_pct", p.util_band_pct, 0.0, 50.0, "utilisation points");
    check(&mut errs, "$.min_util_pct", p.min_util_pct, 0.0, 100.0, "percent");
    check(&mut errs, "$.debounce_ticks", p.debounce_ticks.into(), 1.0, 100.0, "ticks");
    check(&mut errs, "$.throttle_ticks", p.throttle_ticks.into(), 1.0, 86_400.0, "ticks");
    if errs.is_empty() { Ok(p) } else { Err(errs) }
}

/// The snapshot's GPUs as the detector sees them.
fn readings(s: &Snapshot) -> Vec<Reading> {
    const FLAGS: [(Throttle, anomaly::Throttle); 6] = [
        (Throttle::GPU_IDLE, anomaly::Throttle::GPU_IDLE),
        (Throttle::SW_POWER_CAP, anomaly::Throttle::SW_POWER_CAP),
        (Throttle::HW_SLOWDOWN, anomaly::Throttle::HW_SLOWDOWN),
        (Throttle::SW_THERMAL, anomaly::Throttle::SW_THERMAL),
        (Throttle::HW_THERMAL, anomaly::Throttle::HW_THERMAL),
        (Throttle::HW_POWER_BRAKE, anomaly::Throttle::HW_POWER_BRAKE),
    ];
    s.gpus
        .iter()
        .map(|g| {
            let mut throttle = anomaly::Throttle::NONE;
            for (wit, ours) in FLAGS {
                if g.throttle.contains(wit) {
                    throttle |= ours;
                }
            }
            Reading {
                index: g.index,
                power_w: g.power_w,
                temp_c: g.temp_c,
                util_pct: g.util_pct,
                limit_w: g.power_limit_w,
                throttle,
                health: match g.health {
                    Health::Ok => anomaly::Health::Ok,
                    Health::Degraded => anomaly::Health::Degraded,
                    Health::Lost => anomaly::Health::Lost,
                },
            }
        })
        .collect()
}

struct Anomaly {
    params: Params,
    state: State,
}

impl ReporterPolicy for Anomaly {
    const NAME: &'static str = "anomaly";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    type Config = Config;

    fn new(config: Config, _gpus: &[GpuInfo]) -> Result<Self, Vec<ConfigError>> {
        Ok(Anomaly { params: params(config)?, state: State::default() })
    }

    fn report(&mut self, snapshot: &Snapshot, _host: &dyn Host) -> Vec<ReportItem> {
        let r = anomaly::report(&self.params, &mut self.state, &readings(snapshot));
        let metrics = r.metrics.into_iter().map(|m| {
            ReportItem::Metric(Metric { name: m.name.to_owned(), value: m.value, gpu: m.gpu })
        });
        let events = r.events.into_iter().map(|e| {
            ReportItem::Event(ReportEvent {
                kind: e.kind.as_str().to_owned(),
                message: e.message,
                gpu: Some(e.gpu),
            })
        });
        metrics.chain(events).collect()
    }
}

gpulet_guest::reporter_plugin!(Anomaly);
