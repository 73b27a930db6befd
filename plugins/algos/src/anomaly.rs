//! Flag GPUs that behave unlike their peers, or that stay throttled: the `anomaly`
//! reporter's rule. It only reports; it never proposes a limit.
//!
//! **Departures from peers.** GPUs doing the same work should draw about the same power
//! and run at about the same temperature; one that does not may have a failing fan, a
//! blocked airflow, a bad power stage or a hung kernel. A GPU is compared when it is busy
//! (utilisation at or above `min_util_pct`) and has at least two peers: the *other*
//! healthy GPUs (neither lost nor degraded) whose utilisation is within `util_band_pct`
//! points of its own and whose power limit is within 2% of its own (GPUs under different
//! caps draw differently by design: a power policy that gives busy GPUs more watts must
//! not look like a fault; seen on the demo node, where a memory-bound GPU at 100 %
//! utilisation and a higher limit was flagged against training GPUs capped lower). For
//! temperature the peers are those drawing within 10 % of its power, whatever their load
//! or limit: the same heat should give about the same temperature, and a GPU that runs
//! hotter has worse cooling. Its power departs when it differs from the peers' median power by
//! more than `power_dev_pct` % of that median; its temperature departs when it differs
//! from the peers' median temperature by more than `temp_dev_c` °C. Power and temperature
//! are compared separately, each with the peers that have that reading. A degraded GPU is
//! still compared (against healthy peers); a lost one is skipped, and what was tracked for
//! it is dropped without a clear event (the host reports the loss itself).
//!
//! **Stuck throttling.** A GPU whose clock is held down by the same reason for
//! `throttle_ticks` consecutive ticks is stuck. `gpu-idle` is never a reason to report,
//! and `sw-power-cap` is ignored unless `ignore_power_cap` is false: a power policy caps
//! GPUs on purpose.
//!
//! **Debounce.** A reading that crosses a threshold for a tick is noise more often than a
//! fault, and a report sent every tick drowns the one that matters. So a departure is
//! flagged only once it has held `debounce_ticks` consecutive ticks, and it is reported
//! twice in all: one event at its onset and one when it clears, after it has been absent
//! `debounce_ticks` consecutive ticks (a GPU no longer compared, because it idles or lost
//! its peers, counts as absent). Stuck throttling is its own debounce at the onset
//! (`throttle_ticks`); it clears after `debounce_ticks` ticks with none of the watched
//! reasons set.
//!
//! Every tick also gives metrics: the number of flagged GPUs, and each compared GPU's
//! departure from its peers' median (signed: positive above). Non-finite readings count
//! as absent, so no metric is ever non-finite.
//!
//! The per-tick [`State`] is passed in by `&mut`. This crate has no serde dependency, so
//! the state is not serialisable: the plugin keeps it in its own memory. Losing it (the
//! host may re-instantiate a plugin at any time) restarts the debounce counters: a
//! departure still present is reported again after `debounce_ticks`, and one flagged
//! before the loss gets no clear event.

use std::collections::BTreeMap;
use std::ops::{BitOr, BitOrAssign};

/// Why a GPU's clock is held down: a bit set of the WIT `throttle` flags.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Throttle(u8);

impl Throttle {
    pub const NONE: Throttle = Throttle(0);
    pub const GPU_IDLE: Throttle = Throttle(1 << 0);
    pub const SW_POWER_CAP: Throttle = Throttle(1 << 1);
    pub const HW_SLOWDOWN: Throttle = Throttle(1 << 2);
    pub const SW_THERMAL: Throttle = Throttle(1 << 3);
    pub const HW_THERMAL: Throttle = Throttle(1 << 4);
    pub const HW_POWER_BRAKE: Throttle = Throttle(1 << 5);

    /// Whether every reason of `other` is set in `self`.
    pub const fn contains(self, other: Throttle) -> bool {
        self.0 & other.0 == other.0
    }

    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl BitOr for Throttle {
    type Output = Throttle;
    fn bitor(self, rhs: Throttle) -> Throttle {
        Throttle(self.0 | rhs.0)
    }
}

impl BitOrAssign for Throttle {
    fn bitor_assign(&mut self, rhs: Throttle) {
        self.0 |= rhs.0;
    }
}

/// Every single reason with its WIT name, in flag order.
const REASONS: [(Throttle, &str); 6] = [
    (Throttle::GPU_IDLE, "gpu-idle"),
    (Throttle::SW_POWER_CAP, "sw-power-cap"),
    (Throttle::HW_SLOWDOWN, "hw-slowdown"),
    (Throttle::SW_THERMAL, "sw-thermal"),
    (Throttle::HW_THERMAL, "hw-thermal"),
    (Throttle::HW_POWER_BRAKE, "hw-power-brake"),
];

/// A GPU's health, as in the WIT `health` enum.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Health {
    #[default]
    Ok,
    /// Answering, but a critical XID says it needs attention: compared, never a peer.
    Degraded,
    /// Not answering: skipped.
    Lost,
}

/// One GPU at one tick, as the detector sees it. A reading is `None` when absent; a
/// non-finite one is treated as absent.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub index: u32,
    pub power_w: Option<f64>,
    pub temp_c: Option<f64>,
    pub util_pct: Option<f64>,
    /// The power limit it enforces (peers must share it).
    pub limit_w: Option<f64>,
    pub throttle: Throttle,
    pub health: Health,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    /// Power departs beyond this share of the peers' median, percent.
    pub power_dev_pct: f64,
    /// Temperature departs beyond this distance from the peers' median, °C.
    pub temp_dev_c: f64,
    /// Peers run within this many utilisation points of the GPU.
    pub util_band_pct: f64,
    /// A GPU is compared only at or above this utilisation, percent.
    pub min_util_pct: f64,
    /// Ticks a departure must hold before it is flagged, and be absent before it clears
    /// (0 counts as 1).
    pub debounce_ticks: u32,
    /// Consecutive ticks at one throttle reason that make it stuck (0 counts as 1).
    pub throttle_ticks: u32,
    /// Never report `sw-power-cap` as stuck.
    pub ignore_power_cap: bool,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            power_dev_pct: 15.0,
            temp_dev_c: 15.0,
            util_band_pct: 10.0,
            min_util_pct: 50.0,
            debounce_ticks: 10,
            throttle_ticks: 30,
            ignore_power_cap: true,
        }
    }
}

/// Node-wide: how many GPUs are flagged (any kind) after this tick.
pub const FLAGGED_GPUS: &str = "anomaly.flagged_gpus";
/// Per compared GPU: its power minus its peers' median, percent of that median.
pub const POWER_DEV_PCT: &str = "anomaly.power_dev_pct";
/// Per compared GPU: its temperature minus its peers' median, °C.
pub const TEMP_DEV_C: &str = "anomaly.temp_dev_c";
/// Every metric name the detector gives.
pub const METRIC_NAMES: [&str; 3] = [FLAGGED_GPUS, POWER_DEV_PCT, TEMP_DEV_C];

/// What an event reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    PowerDeparture,
    PowerDepartureCleared,
    TempDeparture,
    TempDepartureCleared,
    ThrottleStuck,
    ThrottleStuckCleared,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::PowerDeparture,
        Kind::PowerDepartureCleared,
        Kind::TempDeparture,
        Kind::TempDepartureCleared,
        Kind::ThrottleStuck,
        Kind::ThrottleStuckCleared,
    ];

    /// The event kind as published (`[a-z0-9-]`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Kind::PowerDeparture => "power-departure",
            Kind::PowerDepartureCleared => "power-departure-cleared",
            Kind::TempDeparture => "temp-departure",
            Kind::TempDepartureCleared => "temp-departure-cleared",
            Kind::ThrottleStuck => "throttle-stuck",
            Kind::ThrottleStuckCleared => "throttle-stuck-cleared",
        }
    }
}

/// A named value; always finite.
#[derive(Debug, Clone, PartialEq)]
pub struct Metric {
    pub name: &'static str,
    pub value: f64,
    pub gpu: Option<u32>,
}

/// An onset or a clear, about one GPU, with a sentence for a person.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub kind: Kind,
    pub gpu: u32,
    pub message: String,
}

/// One tick's output.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    pub metrics: Vec<Metric>,
    pub events: Vec<Event>,
}

/// What persists between ticks, per GPU index.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct State {
    gpus: BTreeMap<u32, Track>,
}

impl State {
    /// How many GPUs are flagged now (any kind).
    pub fn flagged_gpus(&self) -> usize {
        self.gpus.values().filter(|t| t.any_flagged()).count()
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
struct Track {
    /// Its power averaged over about [`HEAT_TICKS`] ticks (what its temperature follows).
    heat_w: Option<f64>,
    power: Debounce,
    temp: Debounce,
    throttle: Debounce,
    /// Consecutive ticks each watched reason (in [`REASONS`] order) has been set.
    throttle_runs: [u32; 6],
}

impl Track {
    fn any_flagged(&self) -> bool {
        self.power.flagged || self.temp.flagged || self.throttle.flagged
    }
}

/// A flag that goes up after `on_after` consecutive ticks of its condition and down
/// after `off_after` consecutive ticks of its absence.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Debounce {
    flagged: bool,
    /// Consecutive ticks pointing the other way than `flagged`.
    run: u32,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Change {
    Onset,
    Cleared,
}

impl Debounce {
    fn step(&mut self, on: bool, off: bool, on_after: u32, off_after: u32) -> Option<Change> {
        let (towards, after, change) = if self.flagged {
            (off, off_after, Change::Cleared)
        } else {
            (on, on_after, Change::Onset)
        };
        if !towards {
            self.run = 0;
            return None;
        }
        self.run = self.run.saturating_add(1);
        if self.run < after.max(1) {
            return None;
        }
        self.flagged = !self.flagged;
        self.run = 0;
        Some(change)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Measure {
    Power,
    Temp,
}

impl Measure {
    fn of(self, g: &Reading) -> Option<f64> {
        finite(match self {
            Measure::Power => g.power_w,
            Measure::Temp => g.temp_c,
        })
    }
}

/// A GPU against its peers, on one measure.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Comparison {
    value: f64,
    median: f64,
    /// Signed: percent of the median for power, °C for temperature.
    dev: f64,
    peers: usize,
    /// What the peers have in common, its range among them: utilisation (%) for power,
    /// power (W) for temperature.
    basis_lo: f64,
    basis_hi: f64,
}

/// Why a GPU was not compared on a measure.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Skip {
    NoUtil,
    NotBusy(f64),
    NoReading,
    FewPeers(usize),
    NoBaseline,
}

fn finite(x: Option<f64>) -> Option<f64> {
    x.filter(|v| v.is_finite())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

/// Whether `a` and `b` enforce the same power limit (within 2%), or either is unknown.
fn same_limit(a: &Reading, b: &Reading) -> bool {
    match (finite(a.limit_w), finite(b.limit_w)) {
        (Some(x), Some(y)) => (x - y).abs() <= 0.02 * x.max(y),
        _ => true,
    }
}

fn compare(p: &Params, gpus: &[Reading], g: &Reading, m: Measure) -> Result<Comparison, Skip> {
    let util = finite(g.util_pct).ok_or(Skip::NoUtil)?;
    if util < p.min_util_pct {
        return Err(Skip::NotBusy(util));
    }
    let value = m.of(g).ok_or(Skip::NoReading)?;
    // Peers on power: the same utilisation at the same limit. Peers on temperature: the
    // same heat, whatever the load or the limit (a GPU drawing what another draws should
    // run about as hot; one that does not has worse cooling).
    let own_power = finite(g.power_w);
    let basis = |o: &Reading| -> Option<f64> {
        match m {
            Measure::Power => finite(o.util_pct)
                .filter(|u| (u - util).abs() <= p.util_band_pct && same_limit(g, o)),
            Measure::Temp => {
                let own = own_power?;
                finite(o.power_w).filter(|w| (w - own).abs() <= POWER_BAND * own)
            }
        }
    };
    let peers: Vec<(f64, f64)> = gpus
        .iter()
        .filter(|o| o.index != g.index && o.health == Health::Ok)
        .filter_map(|o| Some((basis(o)?, m.of(o)?)))
        .collect();
    if peers.len() < 2 {
        return Err(Skip::FewPeers(peers.len()));
    }
    let basis_lo = peers.iter().map(|&(u, _)| u).fold(f64::INFINITY, f64::min);
    let basis_hi = peers.iter().map(|&(u, _)| u).fold(f64::NEG_INFINITY, f64::max);
    let median = median(peers.iter().map(|&(_, v)| v).collect());
    let dev = match m {
        Measure::Power if median <= 0.0 => return Err(Skip::NoBaseline),
        Measure::Power => (value - median) / median * 100.0,
        Measure::Temp => value - median,
    };
    if !dev.is_finite() || !median.is_finite() {
        return Err(Skip::NoBaseline);
    }
    Ok(Comparison { value, median, dev, peers: peers.len(), basis_lo, basis_hi })
}

/// Temperature peers draw within this share of a GPU's power.
const POWER_BAND: f64 = 0.10;

/// Temperature follows power with a lag (a GPU's thermal time constant is 30 to 40 s):
/// temperatures are compared at power averaged over this many ticks (an exponential
/// average), not at this tick's, or a steady GPU is flagged against bursty peers whose
/// power just rose and whose temperature has not yet (seen on the demo node).
pub const HEAT_TICKS: f64 = 30.0;

fn departs(p: &Params, m: Measure, c: &Comparison) -> bool {
    match m {
        Measure::Power => c.dev.abs() > p.power_dev_pct,
        Measure::Temp => c.dev.abs() > p.temp_dev_c,
    }
}

fn plural(n: impl Into<u64>, one: &str, many: &str) -> String {
    let n = n.into();
    format!("{n} {}", if n == 1 { one } else { many })
}

/// "{what}, {dev} above the {median} median of {n} peers at {lo}-{hi} % utilisation".
fn against_peers(gpu: u32, m: Measure, c: &Comparison, p: &Params, onset: bool) -> String {
    let (reading, unit) = match m {
        Measure::Power => (format!("GPU {gpu} draws {:.0} W", c.value), "W"),
        Measure::Temp => (format!("GPU {gpu} runs at {:.0} °C", c.value), "°C"),
    };
    let dev = match m {
        Measure::Power => format!("{:.0} %", c.dev.abs()),
        Measure::Temp => format!("{:.0} °C", c.dev.abs()),
    };
    let limit = match m {
        Measure::Power => format!("{:.0} %", p.power_dev_pct),
        Measure::Temp => format!("{:.0} °C", p.temp_dev_c),
    };
    let (basis, basis_unit) = match m {
        Measure::Power => ("at", "% utilisation"),
        Measure::Temp => ("drawing", "W on average"),
    };
    let range = if format!("{:.0}", c.basis_lo) == format!("{:.0}", c.basis_hi) {
        format!("{:.0}", c.basis_hi)
    } else {
        format!("{:.0}-{:.0}", c.basis_lo, c.basis_hi)
    };
    let utils = format!("{basis} {range} {basis_unit}");
    let relation = if onset {
        format!("{dev} {}", if c.dev >= 0.0 { "above" } else { "below" })
    } else {
        format!("within {limit} of")
    };
    format!(
        "{reading}, {relation} the {:.0} {unit} median of {} {utils}",
        c.median,
        plural(c.peers as u64, "peer", "peers"),
    )
}

fn skip_reason(p: &Params, m: Measure, s: Skip) -> String {
    match s {
        Skip::NoUtil => "it has no utilisation reading".to_owned(),
        Skip::NotBusy(u) => {
            format!(
                "its utilisation, {u:.0} %, is below the {:.0} % a comparison needs",
                p.min_util_pct
            )
        }
        Skip::NoReading => match m {
            Measure::Power => "it has no power reading".to_owned(),
            Measure::Temp => "it has no temperature reading".to_owned(),
        },
        Skip::FewPeers(n) => match m {
            Measure::Power => format!(
                "{} within {:.0} points of its utilisation at its power limit, 2 needed",
                plural(n as u64, "healthy peer runs", "healthy peers run"),
                p.util_band_pct
            ),
            Measure::Temp => format!(
                "{} within {:.0} % of its power, 2 needed",
                plural(n as u64, "healthy peer draws", "healthy peers draw"),
                POWER_BAND * 100.0
            ),
        },
        Skip::NoBaseline => "its peers' median is no usable baseline".to_owned(),
    }
}

fn departure_event(
    p: &Params,
    gpu: u32,
    m: Measure,
    change: Change,
    now: &Result<Comparison, Skip>,
) -> Event {
    let ticks = plural(p.debounce_ticks.max(1), "tick", "ticks");
    let (kind, name) = match (m, change) {
        (Measure::Power, Change::Onset) => (Kind::PowerDeparture, "power"),
        (Measure::Power, Change::Cleared) => (Kind::PowerDepartureCleared, "power"),
        (Measure::Temp, Change::Onset) => (Kind::TempDeparture, "temperature"),
        (Measure::Temp, Change::Cleared) => (Kind::TempDepartureCleared, "temperature"),
    };
    let message = match (change, now) {
        (Change::Onset, Ok(c)) => format!("{}, for {ticks}", against_peers(gpu, m, c, p, true)),
        (Change::Cleared, Ok(c)) => {
            format!("{}, for {ticks}: {name} departure cleared", against_peers(gpu, m, c, p, false))
        }
        (_, Err(s)) => format!(
            "GPU {gpu}'s {name} departure cleared: not compared with peers for {ticks}, as {}",
            skip_reason(p, m, *s)
        ),
    };
    Event { kind, gpu, message }
}

fn join_names(names: &[&str], last: &str) -> String {
    match names {
        [] => String::new(),
        [one] => (*one).to_owned(),
        [rest @ .., end] => format!("{} {last} {end}", rest.join(", ")),
    }
}

/// One tick: update `state` with `gpus` and say what to publish.
pub fn report(p: &Params, state: &mut State, gpus: &[Reading]) -> Report {
    // GPUs gone or lost: forget them, silently.
    state.gpus.retain(|i, _| gpus.iter().any(|g| g.index == *i && g.health != Health::Lost));
    let watched = |t: Throttle| {
        t != Throttle::GPU_IDLE && !(p.ignore_power_cap && t == Throttle::SW_POWER_CAP)
    };
    let mut metrics = Vec::new();
    let mut events = Vec::new();
    // The same GPUs with their averaged power, for the temperature comparison.
    let heated: Vec<Reading> = gpus
        .iter()
        .map(|g| {
            let track = state.gpus.entry(g.index).or_default();
            track.heat_w = match (track.heat_w, finite(g.power_w)) {
                (Some(avg), Some(w)) => Some(avg + (w - avg) / HEAT_TICKS),
                (None, w) => w,
                (avg, None) => avg,
            };
            Reading { power_w: track.heat_w, ..g.clone() }
        })
        .collect();
    for (g, warm) in gpus.iter().zip(&heated).filter(|(g, _)| g.health != Health::Lost) {
        let track = state.gpus.entry(g.index).or_default();
        for (m, flag, name) in [
            (Measure::Power, &mut track.power, POWER_DEV_PCT),
            (Measure::Temp, &mut track.temp, TEMP_DEV_C),
        ] {
            let now = match m {
                Measure::Power => compare(p, gpus, g, m),
                Measure::Temp => compare(p, &heated, warm, m),
            };
            if let Ok(c) = &now {
                metrics.push(Metric { name, value: c.dev, gpu: Some(g.index) });
            }
            let out = now.as_ref().is_ok_and(|c| departs(p, m, c));
            if let Some(change) = flag.step(out, !out, p.debounce_ticks, p.debounce_ticks) {
                events.push(departure_event(p, g.index, m, change, &now));
            }
        }

        let mut any = false;
        for (run, &(reason, _)) in track.throttle_runs.iter_mut().zip(&REASONS) {
            let set = watched(reason) && g.throttle.contains(reason);
            any |= set;
            *run = if set { run.saturating_add(1) } else { 0 };
        }
        let limit = p.throttle_ticks.max(1);
        let stuck: Vec<&str> = (track.throttle_runs.iter().zip(&REASONS))
            .filter(|&(&run, _)| run >= limit)
            .map(|(_, &(_, name))| name)
            .collect();
        match track.throttle.step(!stuck.is_empty(), !any, 1, p.debounce_ticks) {
            Some(Change::Onset) => {
                let longest = track.throttle_runs.iter().copied().max().unwrap_or(limit);
                events.push(Event {
                    kind: Kind::ThrottleStuck,
                    gpu: g.index,
                    message: format!(
                        "GPU {}'s clock has been held down by {} for {} in a row",
                        g.index,
                        join_names(&stuck, "and"),
                        plural(longest, "tick", "ticks"),
                    ),
                });
            }
            Some(Change::Cleared) => {
                let names: Vec<&str> =
                    REASONS.iter().filter(|&&(r, _)| watched(r)).map(|&(_, n)| n).collect();
                events.push(Event {
                    kind: Kind::ThrottleStuckCleared,
                    gpu: g.index,
                    message: format!(
                        "GPU {}'s clock has not been held down by {} for {}: throttling cleared",
                        g.index,
                        join_names(&names, "or"),
                        plural(p.debounce_ticks.max(1), "tick", "ticks"),
                    ),
                });
            }
            None => {}
        }
    }
    metrics.insert(0, Metric { name: FLAGGED_GPUS, value: state.flagged_gpus() as f64, gpu: None });
    metrics.retain(|m| m.value.is_finite());
    Report { metrics, events }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The defaults, with the short debounce the tests count ticks against.
    fn params() -> Params {
        Params { debounce_ticks: 3, ..Params::default() }
    }

    fn gpu(index: u32, power: f64, temp: f64, util: f64) -> Reading {
        Reading {
            index,
            power_w: Some(power),
            temp_c: Some(temp),
            util_pct: Some(util),
            limit_w: Some(700.0),
            throttle: Throttle::NONE,
            health: Health::Ok,
        }
    }

    #[test]
    fn gpus_under_different_caps_are_not_peers() {
        let p = params();
        let mut s = State::default();
        // GPU 3 draws 520 W at its 700 W limit; the others are capped at 420 W and draw
        // 410 W: a policy's choice, not a fault.
        let mut gpus: Vec<Reading> = (0..3)
            .map(|i| Reading { limit_w: Some(420.0), ..gpu(i, 410.0, 60.0, 100.0) })
            .collect();
        gpus.push(gpu(3, 520.0, 60.0, 100.0));
        for _ in 0..10 {
            assert!(report(&p, &mut s, &gpus).events.is_empty());
        }
    }

    /// Four GPUs at full load; GPU 3 draws `power3`.
    fn node(power3: f64) -> Vec<Reading> {
        vec![
            gpu(0, 400.0, 70.0, 100.0),
            gpu(1, 410.0, 71.0, 98.0),
            gpu(2, 420.0, 72.0, 95.0),
            gpu(3, power3, 71.0, 99.0),
        ]
    }

    fn kinds(r: &Report) -> Vec<(Kind, u32)> {
        r.events.iter().map(|e| (e.kind, e.gpu)).collect()
    }

    fn metric(r: &Report, name: &str, gpu: Option<u32>) -> Option<f64> {
        r.metrics.iter().find(|m| m.name == name && m.gpu == gpu).map(|m| m.value)
    }

    #[test]
    fn a_departure_is_flagged_after_exactly_debounce_ticks() {
        let p = params();
        let mut s = State::default();
        for _ in 0..p.debounce_ticks - 1 {
            let r = report(&p, &mut s, &node(520.0));
            assert!(r.events.is_empty(), "{r:?}");
            assert_eq!(metric(&r, FLAGGED_GPUS, None), Some(0.0));
        }
        let r = report(&p, &mut s, &node(520.0));
        assert_eq!(kinds(&r), [(Kind::PowerDeparture, 3)]);
        assert_eq!(
            r.events[0].message,
            "GPU 3 draws 520 W, 27 % above the 410 W median of 3 peers at 95-100 % \
             utilisation, for 3 ticks"
        );
        assert_eq!(metric(&r, FLAGGED_GPUS, None), Some(1.0));
        let dev = metric(&r, POWER_DEV_PCT, Some(3)).unwrap();
        assert!((dev - 26.829).abs() < 0.01, "{dev}");
        // Held: reported once, not every tick.
        for _ in 0..10 {
            let r = report(&p, &mut s, &node(520.0));
            assert!(r.events.is_empty());
            assert_eq!(metric(&r, FLAGGED_GPUS, None), Some(1.0));
        }
    }

    #[test]
    fn a_one_tick_spike_is_never_flagged() {
        let p = params();
        let mut s = State::default();
        for t in 0..50 {
            let power = if t % 3 == 1 { 900.0 } else { 410.0 };
            let r = report(&p, &mut s, &node(power));
            assert!(r.events.is_empty(), "tick {t}: {r:?}");
        }
        // Two ticks out, one in, two out: the run restarts.
        let mut s = State::default();
        for power in [600.0, 600.0, 410.0, 600.0, 600.0] {
            assert!(report(&p, &mut s, &node(power)).events.is_empty());
        }
    }

    #[test]
    fn a_departure_clears_once_after_debounce_ticks_back_in_line() {
        let p = params();
        let mut s = State::default();
        for _ in 0..3 {
            report(&p, &mut s, &node(300.0));
        }
        assert_eq!(s.flagged_gpus(), 1);
        // A one-tick return does not clear it.
        assert!(report(&p, &mut s, &node(410.0)).events.is_empty());
        assert!(report(&p, &mut s, &node(300.0)).events.is_empty());
        let mut cleared = Vec::new();
        for _ in 0..10 {
            cleared.extend(report(&p, &mut s, &node(412.0)).events);
        }
        assert_eq!(cleared.len(), 1, "{cleared:?}");
        assert_eq!(cleared[0].kind, Kind::PowerDepartureCleared);
        assert_eq!(
            cleared[0].message,
            "GPU 3 draws 412 W, within 15 % of the 410 W median of 3 peers at 95-100 % \
             utilisation, for 3 ticks: power departure cleared"
        );
        assert_eq!(s.flagged_gpus(), 0);
    }

    #[test]
    fn going_idle_clears_a_departure_and_says_why() {
        let p = params();
        let mut s = State::default();
        for _ in 0..3 {
            report(&p, &mut s, &node(300.0));
        }
        let mut idle = node(60.0);
        idle[3].util_pct = Some(0.0);
        let events: Vec<Event> = (0..5).flat_map(|_| report(&p, &mut s, &idle).events).collect();
        assert_eq!(events.len(), 1);
        assert_eq!(
            events[0].message,
            "GPU 3's power departure cleared: not compared with peers for 3 ticks, as its \
             utilisation, 0 %, is below the 50 % a comparison needs"
        );
    }

    #[test]
    fn temperature_departs_on_its_own() {
        let p = params();
        let mut s = State::default();
        let mut hot = node(410.0);
        hot[0].temp_c = Some(88.0);
        let events: Vec<Event> = (0..3).flat_map(|_| report(&p, &mut s, &hot).events).collect();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].kind, Kind::TempDeparture);
        assert_eq!(
            events[0].message,
            "GPU 0 runs at 88 °C, 17 °C above the 71 °C median of 3 peers drawing 410-420 W on \
             average, for 3 ticks"
        );
    }

    #[test]
    fn peers_at_a_different_load_are_not_compared() {
        let p = params();
        let mut s = State::default();
        let gpus = [
            gpu(0, 400.0, 70.0, 100.0),
            gpu(1, 405.0, 70.0, 100.0),
            gpu(2, 410.0, 71.0, 99.0),
            // Half the load, half the power, much cooler: no peers at its load.
            gpu(3, 200.0, 45.0, 60.0),
            gpu(4, 210.0, 46.0, 55.0),
        ];
        for _ in 0..10 {
            let r = report(&p, &mut s, &gpus);
            assert!(r.events.is_empty(), "{r:?}");
            assert_eq!(metric(&r, POWER_DEV_PCT, Some(3)), None, "one peer at its load");
            // The busy three compare among themselves only.
            let dev = metric(&r, POWER_DEV_PCT, Some(0)).unwrap();
            assert!((dev - (400.0 - 407.5) / 407.5 * 100.0).abs() < 1e-9, "{dev}");
        }
    }

    #[test]
    fn fewer_than_two_peers_give_nothing() {
        let p = params();
        let mut s = State::default();
        let gpus = [gpu(0, 400.0, 70.0, 100.0), gpu(1, 700.0, 95.0, 100.0)];
        for _ in 0..10 {
            let r = report(&p, &mut s, &gpus);
            assert!(r.events.is_empty());
            assert_eq!(r.metrics, [Metric { name: FLAGGED_GPUS, value: 0.0, gpu: None }]);
        }
    }

    #[test]
    fn idle_gpus_are_not_compared() {
        let p = params();
        let mut s = State::default();
        let gpus = [gpu(0, 60.0, 35.0, 10.0), gpu(1, 60.0, 35.0, 12.0), gpu(2, 150.0, 60.0, 15.0)];
        for _ in 0..10 {
            let r = report(&p, &mut s, &gpus);
            assert!(r.events.is_empty());
            assert_eq!(r.metrics.len(), 1);
        }
    }

    #[test]
    fn a_stuck_throttle_is_flagged_once_and_cleared_once() {
        let p = params();
        let mut s = State::default();
        let mut gpus = node(410.0);
        gpus[1].throttle = Throttle::HW_SLOWDOWN | Throttle::SW_POWER_CAP;
        let mut onsets = Vec::new();
        for t in 1..=100 {
            let r = report(&p, &mut s, &gpus);
            if t < p.throttle_ticks {
                assert!(r.events.is_empty(), "tick {t}");
            }
            onsets.extend(r.events.into_iter().map(|e| (t, e)));
        }
        assert_eq!(onsets.len(), 1, "{onsets:?}");
        let (t, e) = &onsets[0];
        assert_eq!((*t, e.kind, e.gpu), (30, Kind::ThrottleStuck, 1));
        assert_eq!(
            e.message,
            "GPU 1's clock has been held down by hw-slowdown for 30 ticks in a row"
        );
        // A flicker off and on does not clear it; debounce_ticks off does, once.
        gpus[1].throttle = Throttle::SW_POWER_CAP;
        assert!(report(&p, &mut s, &gpus).events.is_empty());
        gpus[1].throttle = Throttle::HW_SLOWDOWN;
        assert!(report(&p, &mut s, &gpus).events.is_empty());
        gpus[1].throttle = Throttle::SW_POWER_CAP | Throttle::GPU_IDLE;
        let events: Vec<Event> = (0..10).flat_map(|_| report(&p, &mut s, &gpus).events).collect();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].kind, Kind::ThrottleStuckCleared);
        assert_eq!(
            events[0].message,
            "GPU 1's clock has not been held down by hw-slowdown, sw-thermal, hw-thermal or \
             hw-power-brake for 3 ticks: throttling cleared"
        );
    }

    #[test]
    fn a_throttle_must_hold_throttle_ticks_in_a_row() {
        let p = Params { throttle_ticks: 5, ..params() };
        let mut s = State::default();
        let mut gpus = node(410.0);
        for t in 0..40 {
            // Off one tick in five: never five in a row.
            gpus[2].throttle = if t % 5 == 4 { Throttle::NONE } else { Throttle::HW_THERMAL };
            assert!(report(&p, &mut s, &gpus).events.is_empty(), "tick {t}");
        }
    }

    #[test]
    fn sw_power_cap_and_gpu_idle_are_ignored_by_default() {
        let mut gpus = node(410.0);
        gpus[0].throttle = Throttle::SW_POWER_CAP;
        gpus[1].throttle = Throttle::GPU_IDLE;
        let p = params();
        let mut s = State::default();
        for _ in 0..100 {
            assert!(report(&p, &mut s, &gpus).events.is_empty());
        }
        let p = Params { ignore_power_cap: false, ..params() };
        let mut s = State::default();
        let events: Vec<Event> = (0..100).flat_map(|_| report(&p, &mut s, &gpus).events).collect();
        assert_eq!(events.len(), 1);
        assert_eq!((events[0].kind, events[0].gpu), (Kind::ThrottleStuck, 0));
        assert!(events[0].message.contains("sw-power-cap"), "{}", events[0].message);
    }

    #[test]
    fn a_lost_gpu_is_ignored_and_never_a_peer() {
        let p = params();
        let mut s = State::default();
        let mut gpus = node(410.0);
        gpus.push(Reading {
            throttle: Throttle::HW_THERMAL,
            health: Health::Lost,
            ..gpu(4, 900.0, 110.0, 100.0)
        });
        for _ in 0..100 {
            let r = report(&p, &mut s, &gpus);
            assert!(r.events.is_empty(), "{r:?}");
            assert!(r.metrics.iter().all(|m| m.gpu != Some(4)));
        }
        // GPU 3's peers are 0, 1 and 2 (median 410 W, its own draw); with the lost GPU's
        // 900 W among them the median would be 415 W.
        let r = report(&p, &mut s, &gpus);
        let dev = metric(&r, POWER_DEV_PCT, Some(3)).unwrap();
        assert!(dev.abs() < 1e-9, "{dev}");
        assert_eq!(s.flagged_gpus(), 0);
    }

    #[test]
    fn a_gpu_lost_while_flagged_is_forgotten_without_a_clear() {
        let p = params();
        let mut s = State::default();
        for _ in 0..3 {
            report(&p, &mut s, &node(300.0));
        }
        let mut gpus = node(300.0);
        gpus[3] = Reading { health: Health::Lost, power_w: None, temp_c: None, ..gpus[3].clone() };
        let r = report(&p, &mut s, &gpus);
        assert!(r.events.is_empty());
        assert_eq!(metric(&r, FLAGGED_GPUS, None), Some(0.0));
    }

    #[test]
    fn a_degraded_gpu_is_compared_but_never_a_peer() {
        let p = params();
        let mut s = State::default();
        let mut gpus = node(300.0);
        gpus[3].health = Health::Degraded;
        let events: Vec<Event> = (0..3).flat_map(|_| report(&p, &mut s, &gpus).events).collect();
        let events: Vec<(Kind, u32)> = events.iter().map(|e| (e.kind, e.gpu)).collect();
        assert_eq!(events, [(Kind::PowerDeparture, 3)]);
        // GPU 0's peers are 1 and 2 only: median 415.
        let r = report(&p, &mut s, &gpus);
        let dev = metric(&r, POWER_DEV_PCT, Some(0)).unwrap();
        assert!((dev - (400.0 - 415.0) / 415.0 * 100.0).abs() < 1e-9, "{dev}");
    }

    fn valid_metric_name(s: &str) -> bool {
        !s.is_empty()
            && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.".contains(&b))
    }

    fn valid_event_kind(s: &str) -> bool {
        !s.is_empty()
            && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    }

    #[test]
    fn metric_names_and_event_kinds_use_the_allowed_characters() {
        assert!(METRIC_NAMES.iter().all(|n| valid_metric_name(n)));
        assert!(Kind::ALL.iter().all(|k| valid_event_kind(k.as_str())));
        // And what a run with every kind of event actually gives.
        let p = Params { throttle_ticks: 2, ..params() };
        let mut s = State::default();
        // Six GPUs: GPU 3 draws too much (its temperature has no peers at 600 W); GPU 5
        // runs hot at its peers' power (four of them, so its heat moves no one's median).
        let six = |power3: f64| {
            let mut g = node(power3);
            g.extend([gpu(4, 405.0, 70.0, 97.0), gpu(5, 415.0, 71.0, 96.0)]);
            g
        };
        let mut bad = six(600.0);
        bad[5].temp_c = Some(95.0);
        bad[3].throttle = Throttle::HW_POWER_BRAKE;
        let mut seen = Vec::new();
        for t in 0..20 {
            let r = report(&p, &mut s, &if t < 10 { bad.clone() } else { six(410.0) });
            for m in &r.metrics {
                assert!(valid_metric_name(m.name), "{}", m.name);
            }
            seen.extend(r.events.iter().map(|e| e.kind));
        }
        for k in Kind::ALL {
            assert!(seen.contains(&k), "{k:?} never seen: {seen:?}");
            assert!(valid_event_kind(k.as_str()));
        }
        assert_eq!(seen.len(), 6, "one of each: {seen:?}");
    }

    #[test]
    fn non_finite_readings_never_give_non_finite_metrics() {
        let p = params();
        let mut s = State::default();
        let nan = f64::NAN;
        let inf = f64::INFINITY;
        let gpus = [
            gpu(0, nan, 70.0, 100.0),
            gpu(1, 410.0, nan, 100.0),
            gpu(2, 420.0, 71.0, nan),
            gpu(3, inf, -inf, 100.0),
            gpu(4, 400.0, 70.0, 99.0),
            gpu(5, 405.0, 72.0, 98.0),
            gpu(6, 0.0, 70.0, 97.0),
            gpu(7, 1e-300, 70.0, 97.0),
            gpu(8, 1e300, 70.0, 97.0),
        ];
        for _ in 0..10 {
            let r = report(&p, &mut s, &gpus);
            assert!(r.metrics.iter().all(|m| m.value.is_finite()), "{:?}", r.metrics);
            assert!(r.metrics.iter().any(|m| m.name == POWER_DEV_PCT), "still compares");
        }
        // Every power reading at zero: no baseline, no metric, no NaN.
        let zero: Vec<Reading> = (0..4).map(|i| gpu(i, 0.0, 70.0, 100.0)).collect();
        let r = report(&p, &mut s, &zero);
        assert!(r.metrics.iter().all(|m| m.value.is_finite() && m.name != POWER_DEV_PCT));
    }

    #[test]
    fn gpus_that_vanish_are_forgotten() {
        let p = params();
        let mut s = State::default();
        for _ in 0..3 {
            report(&p, &mut s, &node(300.0));
        }
        assert_eq!(s.flagged_gpus(), 1);
        report(&p, &mut s, &node(300.0)[..3]);
        assert_eq!(s.flagged_gpus(), 0);
    }
}
