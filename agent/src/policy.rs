//! The decision stage: given a node snapshot, what should each GPU's power limit be?
//!
//! A [`Policy`] only proposes. Every decision then goes through the guard
//! ([`crate::guard`]) before anything reaches a GPU, so a policy cannot exceed a bound
//! however wrong it is. This change ships the built-in static policy; the sandboxed Wasm
//! policies plug in behind the same trait.

use crate::config::PowerConfig;
use crate::snapshot::NodeSnapshot;

/// A proposed power limit for one GPU, with the reason that ends up in the audit trail.
#[derive(Debug, Clone, PartialEq)]
pub struct PowerDecision {
    pub gpu: u32,
    pub limit_w: f64,
    pub reason: String,
}

pub trait Policy: Send {
    /// Names the policy in audit events (`source`).
    fn name(&self) -> &str;
    /// Proposed limits. GPUs left out get no opinion: without a node budget their limit
    /// is left alone; with one they get their share of it.
    fn decide(&mut self, snap: &NodeSnapshot) -> Vec<PowerDecision>;
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
                own.or(all).map(|(limit_w, reason)| PowerDecision { gpu, limit_w, reason })
            })
            .collect();
        StaticPolicy { caps }
    }
}

impl Policy for StaticPolicy {
    fn name(&self) -> &str {
        "static"
    }

    fn decide(&mut self, _snap: &NodeSnapshot) -> Vec<PowerDecision> {
        self.caps.clone()
    }
}
