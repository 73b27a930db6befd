//! The algorithms of the shipped policy plugins, free of any Wasm or WIT types, so that
//! the same code runs inside the plugins and natively (benchmarks, oracles, unit tests).
//!
//! Every function takes the node as a slice of [`Gpu`] and returns [`Action`]s with a
//! reason a person can read; state that must persist between ticks is passed in.

pub mod idle_saver;
pub mod power_budget;
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
}

/// A proposed power limit.
#[derive(Debug, Clone, PartialEq)]
pub struct Action {
    pub gpu: u32,
    pub limit_w: f64,
    pub reason: String,
}
