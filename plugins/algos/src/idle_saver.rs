//! Park GPUs that have been idle for a while at their minimum limit, and give the limit
//! back as soon as work arrives.
//!
//! A GPU is idle while its utilisation is at or below `idle_util_pct`. After `idle_for_ms`
//! of continuous idleness its limit goes to its minimum; the first tick with utilisation
//! above the threshold proposes the limit the rest of the chain wants (or the GPU's
//! default), once, and the GPU is free again. Time comes from the snapshot (`now_ms`),
//! so a replay behaves the same.

use crate::{Action, Gpu};

#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    pub idle_util_pct: f64,
    pub idle_for_ms: u64,
}

impl Default for Params {
    fn default() -> Self {
        Params { idle_util_pct: 2.0, idle_for_ms: 60_000 }
    }
}

/// Per GPU: since when it has been idle, and whether it is parked.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct State {
    pub idle_since_ms: Vec<Option<u64>>,
    pub parked: Vec<bool>,
}

pub fn decide(p: &Params, state: &mut State, now_ms: u64, gpus: &[Gpu]) -> Vec<Action> {
    if state.parked.len() < gpus.len() {
        state.parked.resize(gpus.len(), false);
        state.idle_since_ms.resize(gpus.len(), None);
    }
    let mut out = Vec::new();
    for (i, g) in gpus.iter().enumerate() {
        if g.lost {
            continue;
        }
        let Some(util) = g.util_pct else {
            // No reading this tick: a parked GPU stays parked (the host would give a GPU
            // nobody proposes for its upper bound back).
            if state.parked[i] {
                out.push(Action {
                    gpu: g.index,
                    limit_w: g.min_w,
                    reason: "utilisation unreadable: kept parked".into(),
                });
            }
            continue;
        };
        if util <= p.idle_util_pct {
            let since = *state.idle_since_ms[i].get_or_insert(now_ms);
            if now_ms.saturating_sub(since) >= p.idle_for_ms {
                state.parked[i] = true;
                out.push(Action {
                    gpu: g.index,
                    limit_w: g.min_w,
                    reason: format!(
                        "idle ({util:.0}% busy) for {} s: parked at its minimum",
                        (now_ms - since) / 1000
                    ),
                });
            }
        } else {
            state.idle_since_ms[i] = None;
            if std::mem::take(&mut state.parked[i]) {
                let limit = g.proposed_w.unwrap_or(g.default_w);
                out.push(Action {
                    gpu: g.index,
                    limit_w: limit,
                    reason: format!("busy again ({util:.0}%): limit back to {limit:.0} W"),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(util: f64) -> Gpu {
        Gpu {
            index: 0,
            power_w: Some(70.0),
            limit_w: Some(700.0),
            temp_c: Some(40.0),
            util_pct: Some(util),
            capped: false,
            lost: false,
            min_w: 200.0,
            max_w: 700.0,
            default_w: 700.0,
            proposed_w: None,
            curve: None,
        }
    }

    #[test]
    fn parks_after_the_idle_time_and_releases_on_work() {
        let p = Params { idle_util_pct: 2.0, idle_for_ms: 10_000 };
        let mut s = State::default();
        assert!(decide(&p, &mut s, 0, &[gpu(0.0)]).is_empty());
        assert!(decide(&p, &mut s, 9_000, &[gpu(1.0)]).is_empty());
        assert_eq!(decide(&p, &mut s, 10_000, &[gpu(0.0)])[0].limit_w, 200.0);
        let back = decide(&p, &mut s, 11_000, &[gpu(90.0)]);
        assert_eq!(back[0].limit_w, 700.0);
        assert!(decide(&p, &mut s, 12_000, &[gpu(90.0)]).is_empty(), "released once");
    }

    #[test]
    fn a_parked_gpu_without_a_reading_stays_parked() {
        let p = Params { idle_util_pct: 2.0, idle_for_ms: 0 };
        let mut s = State::default();
        assert_eq!(decide(&p, &mut s, 0, &[gpu(0.0)])[0].limit_w, 200.0);
        let mut blind = gpu(0.0);
        blind.util_pct = None;
        let a = decide(&p, &mut s, 1_000, &[blind.clone()]);
        assert_eq!(a[0].limit_w, 200.0, "{a:?}");
        assert!(decide(&p, &mut State::default(), 0, &[blind]).is_empty());
    }
}
