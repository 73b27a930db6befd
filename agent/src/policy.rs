//! Decisions and the built-in static policy.
//!
//! Whatever proposes a limit — the configured static caps or a Wasm plugin — produces a
//! [`PowerDecision`]; the decision stage that composes them is
//! [`crate::plugin::chain::PolicyChain`], and every decision then goes through the guard
//! ([`crate::guard`]) before anything reaches a GPU.

use crate::config::PowerConfig;

/// A proposed power limit for one GPU, with who proposed it and why (both end up in the
/// audit trail).
#[derive(Debug, Clone, PartialEq)]
pub struct PowerDecision {
    pub gpu: u32,
    pub limit_w: f64,
    pub reason: String,
    /// `static`, or the plugin's name.
    pub source: String,
}

/// The configured caps, the same every tick: `power.gpu[i].limit_w`, else
/// `power.limit_w`, else no opinion. Deciding every tick (not once) makes the cap desired
/// state: if someone changes the limit behind the agent's back, the next tick puts it back.
#[derive(Debug, Clone, PartialEq)]
pub struct StaticPolicy {
    caps: Vec<PowerDecision>,
}

impl StaticPolicy {
    pub fn new(power: &PowerConfig, gpu_count: u32) -> StaticPolicy {
        let caps = (0..gpu_count)
            .filter_map(|gpu| {
                let own = power.gpus.iter().position(|g| g.index == gpu).and_then(|i| {
                    power.gpus[i]
                        .limit_w
                        .map(|w| (w, format!("static cap power.gpu[{i}].limit_w = {w} W")))
                });
                let all = power.limit_w.map(|w| (w, format!("static cap power.limit_w = {w} W")));
                own.or(all).map(|(limit_w, reason)| PowerDecision {
                    gpu,
                    limit_w,
                    reason,
                    source: "static".into(),
                })
            })
            .collect();
        StaticPolicy { caps }
    }

    pub fn decide(&self) -> &[PowerDecision] {
        &self.caps
    }
}
