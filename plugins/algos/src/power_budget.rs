//! Split a node power budget across GPUs by demand.
//!
//! Each GPU's demand is what it draws plus a margin, or its upper bound when it is held
//! down by its current cap (it would draw more: only a higher limit reveals how much).
//! If the demands fit the budget, each GPU gets its demand and the rest is spread in
//! proportion to each GPU's remaining headroom, so that a burst finds watts waiting. If
//! they do not fit, the budget is water-filled: one level `L` such that each GPU gets
//! `clamp(L, min, demand)` and the sum is the budget. GPUs with equal demand get equal
//! watts (the best split when their work-versus-watts curves are alike and concave), and
//! GPUs that need less than the level keep what they need.
//!
//! With `use_curves` and a work-per-watt curve for every GPU (`gpulet calibrate`, work
//! per second in one unit for the whole node), an over-subscribed budget is split by the
//! curves instead of by one level: every GPU starts at its floor and the watts go to the
//! GPUs whose curves gain the most work per watt there, none past its demand. For
//! concave curves that is the split with the most total work (each GPU ends where an
//! extra watt buys the same work); GPUs with the same curve still get the same watts.
//!
//! It converges in a tick or two without oscillating: a GPU granted less than its demand
//! stays capped and keeps asking for its upper bound, which yields the same level again;
//! a GPU granted its demand draws less than its limit and keeps asking the same amount.
//! Lost GPUs are left alone and their bound is kept out of the budget, as the host does.

use crate::{Action, Gpu};

/// Tunables, from the plugin's config.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    /// Watts added to a GPU's draw to make its demand.
    pub margin_w: f64,
    /// A GPU drawing within this fraction of its limit counts as held down by it, even
    /// if the driver has not said so yet.
    pub capped_within: f64,
    /// Fraction of the budget kept back: GPUs held at their caps hover around them (the
    /// firmware's control error), so limits that add up to exactly the budget would let
    /// the node's mean power stray just above it.
    pub reserve: f64,
    /// Split an over-subscribed budget by the GPUs' work-per-watt curves (where every
    /// GPU has one) instead of one water level. Off by default: on the simulator it does
    /// not beat the water level (the calibration load is not the job; see
    /// `BENCHMARKS.md`), so it stays an operator's choice until measured on hardware.
    pub use_curves: bool,
}

impl Default for Params {
    fn default() -> Self {
        Params { margin_w: 25.0, capped_within: 0.03, reserve: 0.01, use_curves: false }
    }
}

/// The limits for one tick. No budget, no actions.
pub fn decide(p: &Params, budget_w: Option<f64>, gpus: &[Gpu]) -> Vec<Action> {
    let Some(budget) = budget_w else { return Vec::new() };
    let mut avail = budget * (1.0 - p.reserve);
    // (index into gpus, demand, why)
    let mut managed: Vec<(usize, f64, &'static str)> = Vec::with_capacity(gpus.len());
    for (i, g) in gpus.iter().enumerate() {
        if g.lost {
            avail -= g.limit_w.unwrap_or(g.max_w);
            continue;
        }
        let held = g.capped
            || matches!((g.power_w, g.limit_w), (Some(p_w), Some(l)) if p_w >= l * (1.0 - p.capped_within));
        let (demand, why) = match g.power_w {
            _ if held => (g.max_w, "held down by its cap"),
            Some(w) => ((w + p.margin_w).clamp(g.min_w, g.max_w), "draw plus margin"),
            None => (g.max_w, "power unreadable"),
        };
        managed.push((i, demand, why));
    }
    let total: f64 = managed.iter().map(|m| m.1).sum();
    let mut out = Vec::with_capacity(managed.len());
    if total <= avail {
        let headroom: f64 = managed.iter().map(|&(i, d, _)| gpus[i].max_w - d).sum();
        let spare = avail - total;
        for &(i, d, why) in &managed {
            let g = &gpus[i];
            let extra = if headroom > 0.0 { spare * (g.max_w - d) / headroom } else { 0.0 };
            let limit = (d + extra).min(g.max_w);
            let reason = format!(
                "demand {} W ({why}) fits the {} W budget; +{} W spare headroom",
                w(d),
                w(budget),
                w(extra)
            );
            out.push(action(g.index, limit, reason));
        }
    } else if let Some(split) = curve_split(avail, &managed, gpus).filter(|_| p.use_curves) {
        for (&(i, d, why), limit) in managed.iter().zip(split) {
            let g = &gpus[i];
            let gain = g.curve.as_ref().map_or(0.0, |c| {
                let (slope, _) = c.slope_at(limit);
                100.0 * slope * 100.0 / c.at(limit).max(1e-12)
            });
            let reason = format!(
                "demand {} W ({why}); budget {} W split by the work-per-watt curves: 100 W more would add {gain:.1}% work here",
                w(d),
                w(budget)
            );
            out.push(action(g.index, limit, reason));
        }
    } else {
        let level = water_level(avail, &managed, gpus);
        for &(i, d, why) in &managed {
            let g = &gpus[i];
            let limit = level.clamp(g.min_w, d.max(g.min_w));
            let reason = format!(
                "demand {} W ({why}); budget {} W water-filled at {} W",
                w(d),
                w(budget),
                w(level)
            );
            out.push(action(g.index, limit, reason));
        }
    }
    out
}

/// Whole watts for reasons: integer formatting costs a fraction of float formatting, and
/// reasons are built on every call.
fn w(x: f64) -> u32 {
    x.round() as u32
}

fn action(gpu: u32, limit_w: f64, reason: String) -> Action {
    // Whole milliwatts, rounded down: what NVML takes, and never over the budget.
    Action { gpu, limit_w: (limit_w * 1000.0).floor() / 1000.0, reason }
}

/// Limits for `managed` adding up to `avail`, by the GPUs' curves: from the floors, the
/// watts go to the GPUs with the steepest curve at their current limit, growing
/// together while they tie, each up to its demand. `None` unless every GPU has a curve.
fn curve_split(avail: f64, managed: &[(usize, f64, &str)], gpus: &[Gpu]) -> Option<Vec<f64>> {
    let curves: Vec<_> = managed.iter().map(|m| gpus[m.0].curve.as_ref()).collect::<Option<_>>()?;
    let cap: Vec<f64> = managed.iter().map(|&(i, d, _)| d.max(gpus[i].min_w)).collect();
    let mut x: Vec<f64> = managed.iter().map(|&(i, _, _)| gpus[i].min_w).collect();
    let mut left = avail - x.iter().sum::<f64>();
    // Each round ends at a curve's point or a cap: at most (points + 1) rounds per GPU.
    while left > 1e-6 {
        let slopes: Vec<Option<(f64, f64)>> = (0..x.len())
            .map(|j| (x[j] < cap[j] - 1e-9).then(|| curves[j].slope_at(x[j])))
            .collect();
        let Some(best) = slopes.iter().flatten().map(|s| s.0).reduce(f64::max) else { break };
        let tied: Vec<usize> =
            (0..x.len()).filter(|&j| slopes[j].is_some_and(|s| s.0 >= best - 1e-12)).collect();
        let room = tied
            .iter()
            .map(|&j| slopes[j].map_or(0.0, |s| s.1).min(cap[j] - x[j]))
            .fold(f64::INFINITY, f64::min);
        let step = room.min(left / tied.len() as f64);
        for &j in &tied {
            x[j] += step;
        }
        left -= step * tied.len() as f64;
    }
    Some(x)
}

/// The level `L` with `sum(clamp(L, min, max(demand, min))) = avail`, by bisection
/// (60 halvings: far below a milliwatt).
fn water_level(avail: f64, managed: &[(usize, f64, &str)], gpus: &[Gpu]) -> f64 {
    let fill = |level: f64| -> f64 {
        managed.iter().map(|&(i, d, _)| level.clamp(gpus[i].min_w, d.max(gpus[i].min_w))).sum()
    };
    let (mut lo, mut hi) = (0.0, managed.iter().map(|m| m.1).fold(0.0, f64::max));
    for _ in 0..60 {
        let mid = (lo + hi) / 2.0;
        if fill(mid) > avail { hi = mid } else { lo = mid }
    }
    lo
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(index: u32, power: f64, limit: f64, capped: bool) -> Gpu {
        Gpu {
            index,
            power_w: Some(power),
            limit_w: Some(limit),
            temp_c: Some(50.0),
            util_pct: Some(50.0),
            capped,
            lost: false,
            min_w: 200.0,
            max_w: 700.0,
            default_w: 700.0,
            proposed_w: None,
            curve: None,
        }
    }

    fn limits(a: &[Action]) -> Vec<f64> {
        a.iter().map(|a| a.limit_w.round()).collect()
    }

    #[test]
    fn busy_gpus_get_the_watts_idle_ones_do_not_need() {
        let gpus = [
            gpu(0, 500.0, 500.0, true),
            gpu(1, 500.0, 500.0, true),
            gpu(2, 80.0, 500.0, false),
            gpu(3, 80.0, 500.0, false),
        ];
        let a = decide(&Params::default(), Some(1616.0), &gpus);
        // Idle GPUs keep their floor (200 W, above 80 + 25); busy ones share the rest
        // (1616 W less the 1% reserve).
        assert_eq!(limits(&a), vec![600.0, 600.0, 200.0, 200.0]);
        let sum: f64 = a.iter().map(|a| a.limit_w).sum();
        assert!(sum <= 1600.0 + 1e-9);
    }

    #[test]
    fn when_everything_fits_the_spare_watts_go_to_headroom() {
        let gpus = [gpu(0, 300.0, 700.0, false), gpu(1, 100.0, 700.0, false)];
        let a = decide(&Params { reserve: 0.0, ..Params::default() }, Some(1400.0), &gpus);
        assert_eq!(limits(&a), vec![700.0, 700.0]);
        let a = decide(&Params::default(), Some(1000.0), &gpus);
        let sum: f64 = a.iter().map(|a| a.limit_w).sum();
        assert!(
            (sum - 990.0).abs() < 0.01 && a[0].limit_w > 325.0 && a[1].limit_w > 200.0,
            "{a:?}"
        );
    }

    #[test]
    fn it_settles_without_oscillating() {
        // Feed each allocation back as the next tick's limits, with power = min(want, limit).
        let want: [f64; 4] = [650.0, 650.0, 300.0, 90.0];
        let mut lim = [700.0; 4];
        let mut history = Vec::new();
        for _ in 0..6 {
            let gpus: Vec<Gpu> = (0..4)
                .map(|i| {
                    let p = want[i].min(lim[i]);
                    gpu(i as u32, p, lim[i], p >= lim[i] * 0.99)
                })
                .collect();
            let a = decide(&Params::default(), Some(1600.0), &gpus);
            for x in &a {
                lim[x.gpu as usize] = x.limit_w;
            }
            history.push(lim);
        }
        assert_eq!(history[3], history[5], "{history:?}");
        assert!(history[5][2] >= 300.0, "the 300 W GPU gets what it needs: {history:?}");
    }

    #[test]
    fn with_curves_the_watts_go_where_they_buy_the_most_work() {
        use crate::Curve;
        // GPU 0 gains much from watts (compute-bound), GPU 1 little (memory-bound).
        let steep = Curve::new(vec![(200.0, 0.5), (450.0, 0.85), (700.0, 1.0)]).unwrap();
        let flat = Curve::new(vec![(200.0, 0.9), (450.0, 0.97), (700.0, 1.0)]).unwrap();
        let mut gpus = [gpu(0, 650.0, 650.0, true), gpu(1, 650.0, 650.0, true)];
        let p = Params { reserve: 0.0, use_curves: true, ..Params::default() };
        let equal = limits(&decide(&p, Some(900.0), &gpus));
        assert_eq!(equal, vec![450.0, 450.0], "no curves: one water level");
        gpus[0].curve = Some(steep.clone());
        gpus[1].curve = Some(flat.clone());
        let off = Params { use_curves: false, ..p.clone() };
        assert_eq!(limits(&decide(&off, Some(900.0), &gpus)), equal, "curves not asked for");
        let a = decide(&p, Some(900.0), &gpus);
        // The steep GPU's first segment (0.0014/W) beats the flat one's (0.00028/W), and
        // so does its second (0.0006/W): it takes all 500 W above the floors.
        assert_eq!(limits(&a), vec![700.0, 200.0], "{a:?}");
        let work = |l: &[f64]| steep.at(l[0]) + flat.at(l[1]);
        assert!(work(&limits(&a)) > work(&equal) + 0.05);
        assert!(a[0].reason.contains("work-per-watt curves"), "{}", a[0].reason);
        // Identical curves: equal watts, as without curves.
        gpus[1].curve = Some(steep);
        assert_eq!(limits(&decide(&p, Some(900.0), &gpus)), vec![450.0, 450.0]);
        // A GPU without a curve: the level for everyone.
        gpus[1].curve = None;
        assert_eq!(limits(&decide(&p, Some(900.0), &gpus)), vec![450.0, 450.0]);
    }

    #[test]
    fn curves_never_give_a_gpu_more_than_it_asks_for() {
        let c = crate::Curve::new(vec![(200.0, 0.5), (700.0, 1.0)]).unwrap();
        let mut gpus = [gpu(0, 650.0, 650.0, true), gpu(1, 250.0, 700.0, false)];
        for g in &mut gpus {
            g.curve = Some(c.clone());
        }
        let p = Params { reserve: 0.0, use_curves: true, ..Params::default() };
        let a = decide(&p, Some(900.0), &gpus);
        // GPU 1 asks for 275 W (draw + margin); GPU 0 gets the rest.
        assert_eq!(limits(&a), vec![625.0, 275.0]);
    }

    #[test]
    fn no_budget_no_actions_and_lost_gpus_are_reserved() {
        assert!(decide(&Params::default(), None, &[gpu(0, 1.0, 1.0, false)]).is_empty());
        let mut lost = gpu(1, 0.0, 0.0, false);
        lost.lost = true;
        lost.limit_w = None;
        let a = decide(&Params::default(), Some(1000.0), &[gpu(0, 650.0, 650.0, true), lost]);
        assert_eq!(a.len(), 1);
        assert!(
            (a[0].limit_w - 290.0).abs() < 0.01,
            "990 W (1% reserve) minus the lost GPU's 700 W bound: {a:?}"
        );
    }
}
