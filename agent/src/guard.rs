//! The guard: every power decision is checked here before it can reach a GPU.
//!
//! The rules, in order (see `ARCHITECTURE.md`, "Invariants"):
//!
//! 1. A decision for a GPU that does not exist, or that is not a finite number, is
//!    rejected and audited.
//! 2. Each limit is clamped into the GPU's effective bounds: the hardware's
//!    [`PowerConstraints`](crate::gpu::PowerConstraints) narrowed by the operator's
//!    `power.min_w`/`max_w` (per GPU or for all).
//! 3. A GPU no policy proposes for asks for its upper bound, the same with and without
//!    a node budget: a limit a plugin set is released when every plugin stops proposing
//!    for the GPU, not left in place for good. Without a budget, only a GPU whose limit
//!    gpulet changed is released (once it is back at its upper bound it is only watched
//!    again): a node without policies never has its limits touched.
//!    With a node budget, GPUs that
//!    are lost or cannot be controlled keep their last known limit, reserved out of the
//!    budget, and so does a GPU that did not obey its last change (the set failed, or it
//!    enforces something other than what was asked): the others share what is left as if
//!    it stayed at the limit it enforces, and it is still asked for its share of that
//!    limit (never more), so that when it obeys again the sum only falls; it is trusted
//!    again once a change to it works, or after [`RETRY_DISOBEYED_MS`].
//!    If the asked-for limits add up to more than the rest of the budget, every
//!    managed GPU's headroom above its lower bound is scaled by the same factor. If even
//!    the lower bounds do not fit, all go to their lower bound and a `budget-infeasible`
//!    event is raised.
//! 4. Changes below the deadband are skipped (but never a decrease needed for the
//!    budget), and a GPU's limit is raised at most once per `raise_interval`; lowering is
//!    never held back.
//! 5. Decreases are applied before increases, so the sum of limits never exceeds the
//!    budget midway; if a decrease fails, the raises of that tick wait (the agent's
//!    apply step) and the next tick plans around the GPU that refused.

use crate::config::{ConfigError, ConfigErrors, PowerConfig};
use crate::gpu::{GpuInfo, Health};
use crate::policy::PowerDecision;
use crate::snapshot::NodeSnapshot;
use crate::telemetry::Event;

pub use crate::snapshot::Bounds;

/// A checked change, ready for the hardware.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub gpu: u32,
    pub from_w: Option<f64>,
    pub to_w: f64,
    pub reason: String,
    /// Who proposed it: `static`, a plugin's name, or `guard` for a budget share.
    pub source: String,
    /// A change asked of a GPU that did not obey its last one: the rest of the node was
    /// planned without counting on it, so its failing holds nothing back.
    pub probe: bool,
}

#[derive(Debug)]
pub struct PowerGuard {
    bounds: Vec<Bounds>,
    controllable: Vec<bool>,
    budget_w: Option<f64>,
    deadband_w: f64,
    raise_interval_ms: u64,
    /// When each GPU's limit was last raised (monotonic ms).
    last_raise_ms: Vec<Option<u64>>,
    /// Whether the budget is currently infeasible (the event fires on the transition).
    infeasible: bool,
    /// GPUs that did not obey their last change, since when (monotonic ms): planned at
    /// what they enforce, asked only to go lower, trusted again after
    /// [`RETRY_DISOBEYED_MS`] or as soon as a change to them works.
    disobeyed: Vec<Option<u64>>,
    /// When each GPU that disobeyed was last asked to change (at most once per
    /// [`PROBE_DISOBEYED_MS`], so one that keeps refusing costs one attempt, not one a tick).
    last_probe: Vec<Option<u64>>,
    /// GPUs whose limit gpulet changed and has not yet released back to their upper bound
    /// (rule 3, without a budget).
    changed: Vec<bool>,
}

/// Why a GPU no policy proposes for asks for its upper bound (rule 3).
pub const RELEASED: &str = "no policy proposes a limit for it: its upper bound";

/// How often a GPU that disobeyed is asked again for its share (never above what it
/// enforces).
pub const PROBE_DISOBEYED_MS: u64 = 5_000;

/// How long a GPU that disobeyed is planned at what it enforces before it is trusted
/// again (a refusal may be transient; a retry that fails again costs nothing: the raises
/// of that tick wait and the GPU is planned around once more).
pub const RETRY_DISOBEYED_MS: u64 = 30_000;

/// Watts rounded down to whole milliwatts (NVML's unit), so that what GPUs enforce never
/// adds up to more than what was planned. (The epsilon keeps a value already in whole mW,
/// such as 128.004, from losing one to binary rounding.)
fn floor_mw(w: f64) -> f64 {
    ((w * 1000.0) + 1e-6).floor() / 1000.0
}

/// An enforced limit further than this from the one asked for is disobedience (NVML
/// works in milliwatts; firmware may round to a few watts).
pub const OBEY_TOLERANCE_W: f64 = 2.0;

impl PowerGuard {
    /// Bounds from the hardware and the operator's config. Fails if the config names a
    /// GPU the node lacks or bounds that leave no room inside the hardware's range.
    pub fn new(inventory: &[GpuInfo], power: &PowerConfig) -> Result<PowerGuard, ConfigErrors> {
        let mut errors = Vec::new();
        let n = inventory.len();
        for (i, g) in power.gpus.iter().enumerate() {
            if g.index as usize >= n {
                let accepted = if n == 0 {
                    "none: the node has no GPUs".into()
                } else {
                    format!("0 to {}", n - 1)
                };
                errors.push(ConfigError::invalid(
                    format!("power.gpu[{i}].index"),
                    format!("GPU {} does not exist on this node; accepted: {accepted}", g.index),
                ));
            }
        }
        let mut bounds = Vec::with_capacity(n);
        for info in inventory {
            let own = power.gpus.iter().position(|g| g.index == info.index);
            let pick = |f: fn(&crate::config::GpuPowerConfig) -> Option<f64>,
                        all: Option<f64>,
                        name: &str| {
                match own
                    .and_then(|i| f(&power.gpus[i]).map(|w| (w, format!("power.gpu[{i}].{name}"))))
                {
                    Some(x) => Some(x),
                    None => all.map(|w| (w, format!("power.{name}"))),
                }
            };
            let hw = info.power_limit;
            let min = pick(|g| g.min_w, power.min_w, "min_w");
            let max = pick(|g| g.max_w, power.max_w, "max_w");
            let lo = min.as_ref().map_or(hw.min_w, |(w, _)| w.max(hw.min_w));
            let hi = max.as_ref().map_or(hw.max_w, |(w, _)| w.min(hw.max_w));
            let range = format!("GPU {} accepts {} to {} W", info.index, hw.min_w, hw.max_w);
            if let Some((w, key)) = &min
                && *w > hw.max_w
            {
                errors.push(ConfigError::invalid(key, format!("{w} W is above what {range}")));
            }
            if let Some((w, key)) = &max
                && *w < hw.min_w
            {
                errors.push(ConfigError::invalid(key, format!("{w} W is below what {range}")));
            }
            bounds.push(Bounds { lo: lo.min(hi), hi });
        }
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        Ok(PowerGuard {
            bounds,
            controllable: inventory.iter().map(|g| g.can_set_power_limit).collect(),
            budget_w: power.budget_w,
            deadband_w: power.deadband_w,
            raise_interval_ms: power.raise_interval.as_millis() as u64,
            last_raise_ms: vec![None; n],
            infeasible: false,
            disobeyed: vec![None; n],
            last_probe: vec![None; n],
            changed: vec![false; n],
        })
    }

    pub fn budget_w(&self) -> Option<f64> {
        self.budget_w
    }

    /// A new node budget (from a command), effective at the next check.
    pub fn set_budget(&mut self, budget_w: Option<f64>) {
        self.budget_w = budget_w;
        self.infeasible = false;
    }

    /// Every GPU's effective bounds, in index order.
    pub fn bounds(&self) -> &[Bounds] {
        &self.bounds
    }

    /// Check the decision stage's proposals against the snapshot; returns the changes to
    /// apply, decreases first, and pushes audit events for what was refused.
    pub fn check(
        &mut self,
        snap: &NodeSnapshot,
        decisions: Vec<PowerDecision>,
        events: &mut Vec<Event>,
    ) -> Vec<Change> {
        let n = self.bounds.len();
        let mut desired: Vec<Option<PowerDecision>> = vec![None; n];
        for mut d in decisions {
            let Some(b) = self.bounds.get(d.gpu as usize) else {
                let reason = format!("GPU {} does not exist; the node has {n} GPUs", d.gpu);
                events.push(Event::DecisionRejected { source: d.source, gpu: d.gpu, reason });
                continue;
            };
            if !d.limit_w.is_finite() {
                let reason = format!("limit {} is not a number of watts", d.limit_w);
                events.push(Event::DecisionRejected { source: d.source, gpu: d.gpu, reason });
                continue;
            }
            let w = d.limit_w.clamp(b.lo, b.hi);
            if w != d.limit_w {
                d.reason = format!(
                    "{}; clamped from {} W to bounds {}..{} W",
                    d.reason, d.limit_w, b.lo, b.hi
                );
                d.limit_w = w;
            }
            // Whole milliwatts, NVML's unit, rounded down: what a GPU enforces never adds
            // up to more than what was planned.
            d.limit_w = floor_mw(d.limit_w).max(b.lo);
            let gpu = d.gpu as usize;
            desired[gpu] = Some(d);
        }

        let current: Vec<Option<f64>> =
            snap.samples.iter().map(|s| s.power_limit_w.value()).collect();
        let lost: Vec<bool> = snap.samples.iter().map(|s| s.health == Health::Lost).collect();
        if self.budget_w.is_none() {
            self.release(&mut desired, &current);
        }
        for d in &mut self.disobeyed {
            if d.is_some_and(|since| snap.now_ms.saturating_sub(since) >= RETRY_DISOBEYED_MS) {
                *d = None;
            }
        }
        // A GPU that disobeyed is asked again at most once per PROBE_DISOBEYED_MS, and
        // only to go lower than what it enforces (so a retry that works can only help).
        for (i, want) in desired.iter_mut().enumerate() {
            if self.disobeyed[i].is_none() {
                continue;
            }
            if !self.may_probe(i, snap.now_ms) {
                *want = None;
            } else if let (Some(d), Some(c)) = (want.as_mut(), current[i])
                && d.limit_w > c
            {
                d.limit_w = c;
                d.reason.push_str("; held at its enforced limit: it did not obey its last change");
            }
        }
        if let Some(budget) = self.budget_w {
            self.fit_budget(budget, &mut desired, &current, &lost, snap.now_ms, events);
        }

        let mut changes = Vec::new();
        // Decreases inside the deadband, held back if the budget allows (below).
        let mut small_decreases = Vec::new();
        for (i, want) in desired.into_iter().enumerate() {
            let Some(PowerDecision { limit_w: to_w, reason, source, .. }) = want else { continue };
            if lost[i] || !self.controllable[i] {
                continue;
            }
            let from_w = current[i];
            if let Some(c) = from_w {
                let raise = to_w > c;
                if (to_w - c).abs() < 1e-3 || (raise && to_w - c < self.deadband_w) {
                    continue;
                }
                if !raise && c - to_w < self.deadband_w {
                    let probe = self.disobeyed[i].is_some();
                    small_decreases.push(Change {
                        gpu: i as u32,
                        from_w,
                        to_w,
                        reason,
                        source,
                        probe,
                    });
                    continue;
                }
                let recently =
                    self.last_raise_ms[i].is_some_and(|t| snap.now_ms < t + self.raise_interval_ms);
                if raise && recently {
                    continue;
                }
            }
            let probe = self.disobeyed[i].is_some();
            changes.push(Change { gpu: i as u32, from_w, to_w, reason, source, probe });
        }
        // A small decrease is churn unless the budget needs it: skip them all if the
        // limits add up within the budget without them.
        if !small_decreases.is_empty() {
            // (A probe is not counted on: its GPU may refuse again.)
            let after = |i: usize| {
                changes
                    .iter()
                    .find(|c| c.gpu as usize == i && !c.probe)
                    .map(|c| c.to_w)
                    .or(current[i])
                    .unwrap_or(self.bounds[i].hi)
            };
            let total: f64 = (0..n).map(after).sum();
            if self.budget_w.is_some_and(|b| total > b + 1e-9) {
                changes.append(&mut small_decreases);
            }
        }
        for c in changes.iter().filter(|c| c.probe) {
            self.last_probe[c.gpu as usize] = Some(snap.now_ms);
        }
        // Decreases first: the sum of limits only ever falls until the raises.
        changes.sort_by(|a, b| {
            let delta = |c: &Change| c.to_w - c.from_w.unwrap_or(f64::INFINITY);
            delta(a).total_cmp(&delta(b))
        });
        changes
    }

    /// Rule 3 without a budget: a GPU nothing proposes for whose limit gpulet changed
    /// asks for its upper bound; one already there is only watched from now on.
    fn release(&mut self, desired: &mut [Option<PowerDecision>], current: &[Option<f64>]) {
        for (i, want) in desired.iter_mut().enumerate() {
            if want.is_some() || !self.changed[i] {
                continue;
            }
            let b = self.bounds[i];
            if current[i].is_some_and(|c| (c - b.hi).abs() < 1e-3) {
                self.changed[i] = false;
            } else {
                *want = Some(released(i, b));
            }
        }
    }

    fn fit_budget(
        &mut self,
        budget: f64,
        desired: &mut [Option<PowerDecision>],
        current: &[Option<f64>],
        lost: &[bool],
        now_ms: u64,
        events: &mut Vec<Event>,
    ) {
        let mut reserved = 0.0;
        let (mut sum, mut sum_lo) = (0.0, 0.0);
        for (i, want) in desired.iter_mut().enumerate() {
            let b = self.bounds[i];
            if lost[i] || !self.controllable[i] {
                // Unmanaged: assume it may draw up to its last known limit.
                reserved += current[i].unwrap_or(b.hi);
                *want = None;
                continue;
            }
            if self.disobeyed[i].is_some() {
                // Planned at what it enforces; asked below for its share, at most that.
                let held = current[i].unwrap_or(b.hi);
                reserved += held;
                if self.may_probe(i, now_ms) {
                    want.get_or_insert_with(|| PowerDecision {
                        gpu: i as u32,
                        limit_w: held,
                        reason: "held at its enforced limit: it did not obey its last change"
                            .into(),
                        source: "guard".into(),
                    });
                }
                continue;
            }
            let d = want.get_or_insert_with(|| released(i, b));
            sum += d.limit_w;
            sum_lo += b.lo;
        }
        let avail = budget - reserved;
        if sum <= avail + 1e-9 {
            self.infeasible = false;
            return;
        }
        let infeasible = sum_lo > avail;
        let k = if infeasible { 0.0 } else { (avail - sum_lo) / (sum - sum_lo) };
        // Every managed GPU scaled by one factor; one that disobeyed is asked for the same
        // share of what it enforces, although the others were planned without counting on
        // it: if it obeys now, the sum only falls.
        for (i, want) in desired.iter_mut().enumerate() {
            let Some(d) = want.as_mut() else { continue };
            let lo = self.bounds[i].lo;
            // Round down to whole milliwatts (NVML's unit) so rounding never overshoots.
            // (Never below the lower bound, which NVML gives in whole milliwatts.)
            d.limit_w = floor_mw(lo + (d.limit_w - lo) * k).max(lo);
            if self.disobeyed[i].is_some() {
                // Never above what it enforces, even under its lower bound (a cap set
                // outside gpulet): what was reserved for it.
                d.limit_w = d.limit_w.min(current[i].unwrap_or(self.bounds[i].hi));
            }
            d.reason.push_str(&format!("; scaled to fit node budget {budget} W"));
        }
        if infeasible && !self.infeasible {
            events
                .push(Event::BudgetInfeasible { budget_w: budget, min_total_w: sum_lo + reserved });
        }
        self.infeasible = infeasible;
    }

    /// Record that a change was applied at `now_ms` and the GPU now enforces
    /// `enforced_w` (read back): a GPU enforcing something else did not obey.
    pub fn applied(&mut self, change: &Change, enforced_w: f64, now_ms: u64) {
        let i = change.gpu as usize;
        // A limit put back from before an unclean stop is the node's own, not one a
        // policy set: nothing to release.
        if change.source != "restore" {
            self.changed[i] = true;
        }
        if change.from_w.is_none_or(|from| change.to_w > from) {
            self.last_raise_ms[i] = Some(now_ms);
        }
        let obeyed = (enforced_w - change.to_w).abs() <= OBEY_TOLERANCE_W;
        self.disobeyed[i] = if obeyed { None } else { Some(self.disobeyed[i].unwrap_or(now_ms)) };
        if obeyed {
            self.last_probe[i] = None;
        }
    }

    /// Record that a change could not be applied at `now_ms`: the GPU is planned at what
    /// it enforces until a change to it works or [`RETRY_DISOBEYED_MS`] passed.
    pub fn failed(&mut self, change: &Change, now_ms: u64) {
        let d = &mut self.disobeyed[change.gpu as usize];
        *d = Some(d.unwrap_or(now_ms));
    }

    /// Whether GPU `i`, which disobeyed, may be asked to change now.
    fn may_probe(&self, i: usize, now_ms: u64) -> bool {
        self.last_probe[i].is_none_or(|t| now_ms.saturating_sub(t) >= PROBE_DISOBEYED_MS)
    }

    /// Whether `gpu` did not obey its last change.
    pub fn disobeyed(&self, gpu: u32) -> bool {
        self.disobeyed.get(gpu as usize).is_some_and(Option::is_some)
    }
}

/// What a GPU no policy proposes for asks (rule 3).
fn released(i: usize, b: Bounds) -> PowerDecision {
    PowerDecision { gpu: i as u32, limit_w: b.hi, reason: RELEASED.into(), source: "guard".into() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, GpuPowerConfig};
    use crate::gpu::{FieldSet, GpuError, GpuSample, PowerConstraints, Reading};

    fn inventory(n: u32) -> Vec<GpuInfo> {
        (0..n)
            .map(|index| GpuInfo {
                index,
                uuid: format!("GPU-{index}"),
                name: "test".into(),
                memory_total_mib: 1,
                power_limit: PowerConstraints { min_w: 200.0, max_w: 700.0, default_w: 700.0 },
                fields: FieldSet::ALL,
                can_set_power_limit: true,
                pci_bus_id: None,
                mig_enabled: None,
            })
            .collect()
    }

    fn snap(limits: &[f64], now_ms: u64) -> NodeSnapshot {
        let known: Vec<Option<f64>> = limits.iter().map(|&l| (l > 0.0).then_some(l)).collect();
        let bounds = vec![Bounds { lo: 200.0, hi: 700.0 }; limits.len()];
        snapshot_of(&known, bounds, now_ms)
    }

    /// A snapshot whose GPU `i` enforces `limits[i]`, or is lost where that is `None`.
    pub(super) fn snapshot_of(
        limits: &[Option<f64>],
        bounds: Vec<Bounds>,
        now_ms: u64,
    ) -> NodeSnapshot {
        let samples = limits
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let mut s = GpuSample::lost(i as u32, &GpuError::Lost(i as u32));
                if let Some(l) = *l {
                    s.power_limit_w = Reading::Value(l);
                    s.health = Health::Ok;
                }
                s
            })
            .collect();
        NodeSnapshot {
            seq: 0,
            ts_ms: 0,
            utc_offset_s: 0,
            now_ms,
            inventory: inventory(limits.len() as u32).into(),
            samples,
            bounds: bounds.into(),
            budget_w: None,
            curves: vec![None; limits.len()].into(),
        }
    }

    fn power(toml: &str) -> PowerConfig {
        let c = Config::parse(&format!("[power]\n{toml}")).unwrap();
        c.validate().unwrap();
        c.power
    }

    fn decide(gpu: u32, limit_w: f64) -> PowerDecision {
        PowerDecision { gpu, limit_w, reason: "test".into(), source: "p".into() }
    }

    fn targets(changes: &[Change]) -> Vec<(u32, f64)> {
        changes.iter().map(|c| (c.gpu, c.to_w)).collect()
    }

    #[test]
    fn decisions_are_clamped_to_hardware_and_operator_bounds() {
        let mut p = power("max_w = 600");
        p.gpus.push(GpuPowerConfig { index: 1, limit_w: None, min_w: Some(300.0), max_w: None });
        let mut g = PowerGuard::new(&inventory(3), &p).unwrap();
        let mut ev = Vec::new();
        let c = g.check(
            &snap(&[700.0; 3], 0),
            vec![decide(0, 650.0), decide(1, 250.0), decide(2, 100.0)],
            &mut ev,
        );
        assert_eq!(
            targets(&c),
            vec![(2, 200.0), (1, 300.0), (0, 600.0)],
            "decreases, largest first"
        );
        assert!(c[2].reason.contains("clamped from 650 W to bounds 200..600 W"), "{}", c[2].reason);
        assert!(ev.is_empty());
    }

    #[test]
    fn bad_decisions_are_rejected_and_audited() {
        let mut g = PowerGuard::new(&inventory(2), &power("")).unwrap();
        let mut ev = Vec::new();
        let c = g.check(
            &snap(&[700.0; 2], 0),
            vec![decide(5, 300.0), decide(0, f64::NAN), decide(1, 400.0)],
            &mut ev,
        );
        assert_eq!(targets(&c), vec![(1, 400.0)]);
        assert_eq!(ev.len(), 2);
        assert!(
            matches!(&ev[0], Event::DecisionRejected { source, gpu: 5, reason } if source == "p" && reason.contains("does not exist"))
        );
        assert!(
            matches!(&ev[1], Event::DecisionRejected { gpu: 0, reason, .. } if reason.contains("not a number"))
        );
    }

    /// Rule 3: a cap a plugin set is released when it stops proposing, with or without
    /// a budget; a node whose limits gpulet never changed is only watched.
    #[test]
    fn a_gpu_no_policy_proposes_for_asks_for_its_upper_bound_with_or_without_a_budget() {
        for budget in ["", "budget_w = 5600"] {
            let mut g = PowerGuard::new(&inventory(2), &power(budget)).unwrap();
            let mut ev = Vec::new();
            // GPU 1 was set to 450 W by hand before the agent: never touched.
            let c = g.check(&snap(&[700.0, 450.0], 0), vec![decide(0, 300.0)], &mut ev);
            let want: &[(u32, f64)] =
                if budget.is_empty() { &[(0, 300.0)] } else { &[(0, 300.0), (1, 700.0)] };
            assert_eq!(targets(&c), want, "{budget:?}");
            for c in &c {
                g.applied(c, c.to_w, 0);
            }
            let after = if budget.is_empty() { 450.0 } else { 700.0 };
            // The plugin stops proposing: GPU 0 asks for its upper bound again.
            let c = g.check(&snap(&[300.0, after], 1_000), vec![], &mut ev);
            assert_eq!(targets(&c), [(0, 700.0)], "{budget:?}");
            assert_eq!(c[0].source, "guard");
            assert_eq!(c[0].reason, RELEASED);
            g.applied(&c[0], 700.0, 1_000);
            // Back at its upper bound: only watched, without a budget (a limit set by hand
            // afterwards stays); with one, every GPU keeps asking for its share.
            let c = g.check(&snap(&[700.0, after], 2_000), vec![], &mut ev);
            assert!(c.is_empty(), "{budget:?}: {c:?}");
            let c = g.check(&snap(&[400.0, after], 3_000), vec![], &mut ev);
            let want: &[(u32, f64)] = if budget.is_empty() { &[] } else { &[(0, 700.0)] };
            assert_eq!(targets(&c), want, "{budget:?}");
            assert!(ev.is_empty());
        }
    }

    #[test]
    fn a_budget_scales_headroom_above_the_minimum() {
        let mut g = PowerGuard::new(&inventory(4), &power("budget_w = 2000")).unwrap();
        let mut ev = Vec::new();
        // GPU 0 asks 700, GPU 1 asks 450, GPUs 2 and 3 ask nothing (their upper bound).
        let c = g.check(&snap(&[700.0; 4], 0), vec![decide(0, 700.0), decide(1, 450.0)], &mut ev);
        // sum 2550, mins 800: k = (2000 - 800) / (2550 - 800)
        let k = 1200.0 / 1750.0;
        let total: f64 = c.iter().map(|c| c.to_w).sum();
        assert!(total <= 2000.0 && total > 1999.9, "{total}");
        assert!((c.iter().find(|c| c.gpu == 1).unwrap().to_w - (200.0 + 250.0 * k)).abs() < 0.01);
        assert!(c.iter().all(|c| c.reason.contains("scaled to fit node budget 2000 W")));
    }

    #[test]
    fn an_infeasible_budget_puts_every_gpu_at_its_minimum_and_says_so_once() {
        let mut g = PowerGuard::new(&inventory(2), &power("budget_w = 300")).unwrap();
        let mut ev = Vec::new();
        let c = g.check(&snap(&[700.0; 2], 0), vec![], &mut ev);
        assert_eq!(targets(&c), vec![(0, 200.0), (1, 200.0)]);
        assert_eq!(ev, vec![Event::BudgetInfeasible { budget_w: 300.0, min_total_w: 400.0 }]);
        g.check(&snap(&[200.0; 2], 1000), vec![], &mut ev);
        assert_eq!(ev.len(), 1, "not repeated while it stays infeasible");
    }

    #[test]
    fn a_lost_gpu_keeps_its_last_limit_reserved_from_the_budget() {
        let mut g = PowerGuard::new(&inventory(3), &power("budget_w = 1500")).unwrap();
        let mut s = snap(&[700.0, 700.0, 700.0], 0);
        s.samples[2] = GpuSample::lost(2, &GpuError::Lost(2));
        let c = g.check(&s, vec![], &mut Vec::new());
        // Nothing is known of GPU 2's limit: its upper bound (700) is reserved.
        assert_eq!(targets(&c), vec![(0, 400.0), (1, 400.0)]);
    }

    #[test]
    fn small_changes_and_fast_raises_are_held_back_but_decreases_never() {
        let mut g =
            PowerGuard::new(&inventory(1), &power("deadband_w = 5\nraise_interval = \"10s\""))
                .unwrap();
        let mut ev = Vec::new();
        assert!(
            g.check(&snap(&[500.0], 0), vec![decide(0, 503.0)], &mut ev).is_empty(),
            "inside the deadband"
        );
        let c = g.check(&snap(&[500.0], 0), vec![decide(0, 600.0)], &mut ev);
        assert_eq!(targets(&c), vec![(0, 600.0)]);
        g.applied(&c[0], 600.0, 0);
        assert!(
            g.check(&snap(&[600.0], 5000), vec![decide(0, 650.0)], &mut ev).is_empty(),
            "raised 5 s ago"
        );
        assert_eq!(
            targets(&g.check(&snap(&[600.0], 5000), vec![decide(0, 300.0)], &mut ev)),
            vec![(0, 300.0)]
        );
        assert_eq!(
            targets(&g.check(&snap(&[300.0], 10_000), vec![decide(0, 650.0)], &mut ev)),
            vec![(0, 650.0)]
        );
    }

    #[test]
    fn config_that_does_not_fit_the_hardware_is_refused_at_start() {
        let mut p = power("min_w = 800");
        p.gpus.push(GpuPowerConfig { index: 7, limit_w: Some(300.0), min_w: None, max_w: None });
        let errs = PowerGuard::new(&inventory(2), &p).unwrap_err().to_string();
        assert!(
            errs.contains(
                "power.gpu[0].index: GPU 7 does not exist on this node; accepted: 0 to 1"
            ),
            "{errs}"
        );
        assert!(
            errs.contains("power.min_w: 800 W is above what GPU 0 accepts 200 to 700 W"),
            "{errs}"
        );
    }

    #[test]
    fn a_gpu_that_refused_once_is_asked_again_and_the_budget_recovers() {
        // The review: after one transient failure the GPU stayed planned at its limit for
        // good, and the sum stayed over the budget.
        let mut g = PowerGuard::new(&inventory(2), &power("budget_w = 900")).unwrap();
        let mut ev = Vec::new();
        let c = g.check(&snap(&[700.0, 700.0], 0), vec![], &mut ev);
        assert_eq!(targets(&c), vec![(0, 450.0), (1, 450.0)]);
        g.failed(&c[0], 0);
        g.applied(&c[1], 450.0, 0);
        assert!(g.disobeyed(0));
        // Planned at 700 W: GPU 1 takes what is left, and GPU 0 is asked to go lower.
        let c = g.check(&snap(&[700.0, 450.0], 1000), vec![], &mut ev);
        let t = targets(&c);
        assert!(t.contains(&(1, 200.0)), "{t:?}");
        let asked = t.iter().find(|(gpu, _)| *gpu == 0).expect("GPU 0 asked again").1;
        assert!(asked < 700.0, "{t:?}");
        // It obeys now: trusted again, and the next plan shares the budget.
        g.applied(c.iter().find(|c| c.gpu == 0).unwrap(), asked, 1000);
        assert!(!g.disobeyed(0));
        let c = g.check(&snap(&[asked, 200.0], 2000), vec![], &mut ev);
        assert_eq!(targets(&c), vec![(0, 450.0), (1, 450.0)]);
        // A GPU stuck low after a failed raise is retried after RETRY_DISOBEYED_MS.
        let mut g = PowerGuard::new(&inventory(1), &power("")).unwrap();
        let c = g.check(&snap(&[200.0], 0), vec![decide(0, 300.0)], &mut ev);
        g.failed(&c[0], 0);
        assert!(g.check(&snap(&[200.0], 1000), vec![decide(0, 300.0)], &mut ev).is_empty());
        let later = g.check(&snap(&[200.0], RETRY_DISOBEYED_MS), vec![decide(0, 300.0)], &mut ev);
        assert_eq!(targets(&later), vec![(0, 300.0)]);
    }

    #[test]
    fn small_decreases_are_churn_unless_the_budget_needs_them() {
        let mut g =
            PowerGuard::new(&inventory(2), &power("budget_w = 1000\ndeadband_w = 2")).unwrap();
        let mut ev = Vec::new();
        // 499.5 + 400 fits 1000 as it is: the 0.5 W trim is skipped.
        let c =
            g.check(&snap(&[500.0, 400.0], 0), vec![decide(0, 499.5), decide(1, 400.0)], &mut ev);
        assert!(c.is_empty(), "{c:?}");
        // 600.5 + 400 does not fit: the same-sized trim is applied.
        let c =
            g.check(&snap(&[600.5, 400.0], 0), vec![decide(0, 600.0), decide(1, 400.0)], &mut ev);
        assert_eq!(targets(&c), vec![(0, 600.0)]);
    }
}

/// Property tests: for any plugin output and any pattern of GPUs refusing changes or
/// being lost, what reaches a GPU is within its bounds, and the sum of enforced limits
/// comes within the budget and stays there whenever the budget is feasible.
#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;
    use crate::config::Config;
    use crate::gpu::{FieldSet, PowerConstraints};

    /// One GPU of the simulated world.
    #[derive(Debug, Clone)]
    struct Gpu {
        lo: f64,
        hi: f64,
        enforced: f64,
        /// Refuses every change.
        refuses: bool,
        /// Refuses on the first four ticks whose bit is set (a transient fault), then obeys.
        flaky: u8,
        lost: bool,
    }

    fn gpu() -> impl Strategy<Value = Gpu> {
        // Bounds in whole milliwatts, as NVML reports them.
        (100_000..300_000u32, 100_000..500_000u32, 0.0..1.0f64, 0..3u8, 1..16u8, 0..8u8).prop_map(
            |(lo, span, at, kind, flaky, lost)| Gpu {
                lo: f64::from(lo) / 1000.0,
                hi: f64::from(lo + span) / 1000.0,
                enforced: ((f64::from(lo) + f64::from(span) * at).round()) / 1000.0,
                // One GPU in eight is lost; a third refuse every change, a third now
                // and then: common, to find the edges.
                refuses: kind == 1,
                flaky: if kind == 2 { flaky } else { 0 },
                lost: lost == 0,
            },
        )
    }

    /// What a plugin might return: anything at all.
    fn watts() -> impl Strategy<Value = f64> {
        prop_oneof![
            Just(f64::NAN),
            Just(f64::INFINITY),
            Just(f64::NEG_INFINITY),
            Just(1e300),
            Just(-0.0),
            -1e6..1e6f64,
            0.0..800.0f64,
        ]
    }

    fn decisions() -> impl Strategy<Value = Vec<(u32, f64)>> {
        prop::collection::vec((0..12u32, watts()), 0..5)
    }

    fn snapshot(world: &[Gpu], now_ms: u64) -> NodeSnapshot {
        let limits: Vec<Option<f64>> =
            world.iter().map(|g| (!g.lost).then_some(g.enforced)).collect();
        let bounds = world.iter().map(|g| Bounds { lo: g.lo, hi: g.hi }).collect();
        tests::snapshot_of(&limits, bounds, now_ms)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

        #[test]
        fn limits_stay_in_bounds_and_within_a_feasible_budget(
            mut world in prop::collection::vec(gpu(), 1..9),
            budget in 100.0..5000.0f64,
            ticks in prop::collection::vec(decisions(), 1..28),
        ) {
            let inventory: Vec<GpuInfo> = world
                .iter()
                .enumerate()
                .map(|(i, g)| GpuInfo {
                    index: i as u32,
                    uuid: format!("GPU-{i}"),
                    name: "test".into(),
                    memory_total_mib: 1,
                    power_limit: PowerConstraints { min_w: g.lo, max_w: g.hi, default_w: g.hi },
                    fields: FieldSet::ALL,
                    can_set_power_limit: true,
                    pci_bus_id: None,
                    mig_enabled: None,
                })
                .collect();
            let config = Config::parse(&format!("[power]\nbudget_w = {budget}\n")).unwrap();
            let mut guard = PowerGuard::new(&inventory, &config.power).unwrap();
            // What the guard can count on: lost GPUs at their upper bound (their limit is
            // unknown), refusing ones where they are, the rest (flaky ones recover after
            // four ticks) at their minimum.
            let floor: f64 = world
                .iter()
                .map(|g| if g.lost { g.hi } else if g.refuses { g.enforced } else { g.lo })
                .sum();
            let feasible = floor <= budget;
            let n = world.len();
            let mut within = false;
            for (t, raw) in ticks.iter().enumerate() {
                let now_ms = t as u64 * 1000;
                let snap = snapshot(&world, now_ms);
                let proposals = raw
                    .iter()
                    .map(|&(gpu, limit_w)| PowerDecision {
                        gpu,
                        limit_w,
                        reason: "prop".into(),
                        source: "plugin".into(),
                    })
                    .collect();
                let changes = guard.check(&snap, proposals, &mut Vec::new());
                // Applied as the agent applies them (decreases first; raises wait once a
                // decrease failed).
                let mut decrease_failed = false;
                for c in &changes {
                    let g = &mut world[c.gpu as usize];
                    prop_assert!(c.to_w.is_finite() && c.to_w >= g.lo && c.to_w <= g.hi,
                        "change {c:?} outside {}..{}", g.lo, g.hi);
                    let raise = c.from_w.is_none_or(|f| c.to_w > f);
                    if raise && decrease_failed {
                        continue;
                    }
                    if g.lost || g.refuses || (t < 4 && g.flaky & (1 << t) != 0) {
                        guard.failed(c, now_ms);
                        decrease_failed |= !c.probe && (!raise || c.from_w.is_none());
                    } else {
                        g.enforced = (c.to_w * 1000.0).round() / 1000.0;
                        guard.applied(c, g.enforced, now_ms);
                    }
                }
                let total: f64 = world.iter().map(|g| g.enforced).sum();
                // Once within the budget, always within: a tick never raises the sum above
                // it, whatever refuses, feasible or not.
                if within {
                    prop_assert!(total <= budget + 1e-6,
                        "tick {t}: {total} W over the budget {budget} W after being within it");
                }
                within = total <= budget + 1e-6;
                // Each refusing GPU costs at most one tick to learn about, and a GPU that
                // refused for a while is asked again (every PROBE_DISOBEYED_MS) until it
                // obeys.
                if feasible && t as u64 > n as u64 + 4 + PROBE_DISOBEYED_MS / 1000 {
                    prop_assert!(within, "tick {t}: {total} W over a feasible budget {budget} W");
                }
            }
        }
    }
}
