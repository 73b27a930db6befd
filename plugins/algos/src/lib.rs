//! The algorithms of the shipped policy plugins, free of any Wasm or WIT types, so that
//! the same code runs inside the plugins and natively (benchmarks, oracles, unit tests).
//!
//! Every power policy takes the node as a slice of [`Gpu`] and returns [`Action`]s with a
//! reason a person can read; state that must persist between ticks is passed in. The job
//! schedulers, in [`sched`], and the anomaly reporter, in [`anomaly`], have types of their
//! own.

pub mod anomaly;
pub mod idle_saver;
pub mod power_budget;
pub mod sched;
pub mod thermal_guard;

/// One GPU as a policy sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Gpu {
    pub index: u32,
    pub power_w: Option<f64>,
    /// The enforced limit now.
    pub limit_w: Option<f64>,
    pub temp_c: Option<f64>,
    pub util_pct: Option<f64>,
    /// The clock is held down by the power limit (`sw-power-cap`).
    pub capped: bool,
    /// Not answering: no readings, no control.
    pub lost: bool,
    pub min_w: f64,
    pub max_w: f64,
    pub default_w: f64,
    /// What earlier plugins of the chain proposed this tick.
    pub proposed_w: Option<f64>,
    /// Work per second against the power limit, from `gpulet calibrate`.
    pub curve: Option<Curve>,
}

/// A GPU's work-per-watt curve: `(limit_w, work per second)` points, in rising limit
/// order, joined by straight lines (extended beyond the first point, flat beyond the
/// last: nothing above it was measured).
#[derive(Debug, Clone, PartialEq)]
pub struct Curve(Vec<(f64, f64)>);

impl Curve {
    /// The curve through `points` (any order); `None` with fewer than two points, or
    /// with values that are not finite.
    pub fn new(mut points: Vec<(f64, f64)>) -> Option<Curve> {
        if points.len() < 2 || points.iter().any(|(x, y)| !x.is_finite() || !y.is_finite()) {
            return None;
        }
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        points.dedup_by(|a, b| a.0 == b.0);
        (points.len() >= 2).then_some(Curve(points))
    }

    /// The gain per watt just above `x`, and how far above `x` that gain holds (to the
    /// next point). Beyond the last point nothing was measured: no gain.
    pub fn slope_at(&self, x: f64) -> (f64, f64) {
        let p = &self.0;
        let k = p.partition_point(|&(lx, _)| lx <= x).clamp(1, p.len());
        if k == p.len() && x >= p[k - 1].0 {
            return (0.0, f64::INFINITY);
        }
        let ((x0, y0), (x1, y1)) = (p[k - 1], p[k]);
        ((y1 - y0) / (x1 - x0), x1 - x)
    }

    /// Work per second at limit `x`.
    pub fn at(&self, x: f64) -> f64 {
        let p = &self.0;
        let k = p.partition_point(|&(lx, _)| lx <= x);
        if k == p.len() {
            return p[k - 1].1;
        }
        let ((x0, y0), (x1, y1)) = (p[k.max(1) - 1], p[k.max(1)]);
        y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    }
}

/// A proposed power limit.
#[derive(Debug, Clone, PartialEq)]
pub struct Action {
    pub gpu: u32,
    pub limit_w: f64,
    pub reason: String,
}
