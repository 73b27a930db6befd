//! Lower a GPU's limit as it nears a temperature threshold, with hysteresis.
//!
//! At or above `threshold_c` the guard takes the GPU's limit down by `step_w` per tick
//! (never below its minimum) and holds it there; between `threshold_c - hysteresis_c`
//! and the threshold it holds the guarded limit; once the GPU has cooled below that, it
//! lets go: one last action puts the limit back to what earlier plugins propose (or the
//! GPU's default when nothing does), and after that it stays silent. While guarding it
//! only ever proposes the lower of its guarded limit and what earlier plugins proposed,
//! so after a budget splitter the `lower` grant is enough; on its own it needs `raise`
//! too, to let go.

use crate::{Action, Gpu};

#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    pub threshold_c: f64,
    pub hysteresis_c: f64,
    pub step_w: f64,
}

impl Default for Params {
    fn default() -> Self {
        Params { threshold_c: 83.0, hysteresis_c: 5.0, step_w: 25.0 }
    }
}

/// Per-GPU guarded limits (None: not guarding). Survives between ticks.
pub type State = Vec<Option<f64>>;

pub fn decide(p: &Params, state: &mut State, gpus: &[Gpu]) -> Vec<Action> {
    if state.len() < gpus.len() {
        state.resize(gpus.len(), None);
    }
    let mut out = Vec::new();
    for (g, guard) in gpus.iter().zip(state.iter_mut()) {
        if g.lost {
            continue;
        }
        let current = g.proposed_w.or(g.limit_w).unwrap_or(g.default_w);
        let Some(t) = g.temp_c else {
            // No reading this tick: a GPU it guards stays held (the host would give a
            // GPU nobody proposes for its upper bound back).
            if let Some(w) = *guard {
                let limit = w.min(current);
                out.push(Action {
                    gpu: g.index,
                    limit_w: limit,
                    reason: format!("temperature unreadable: held at {limit:.0} W"),
                });
            }
            continue;
        };
        if t >= p.threshold_c {
            let from = guard.map_or(current, |w| w.min(current));
            *guard = Some((from - p.step_w).max(g.min_w));
        } else if t < p.threshold_c - p.hysteresis_c && guard.take().is_some() {
            let limit = g.proposed_w.unwrap_or(g.default_w);
            out.push(Action {
                gpu: g.index,
                limit_w: limit,
                reason: format!(
                    "{t:.0} °C, below {:.0} °C: guard released, limit back to {limit:.0} W",
                    p.threshold_c - p.hysteresis_c
                ),
            });
            continue;
        }
        if let Some(w) = *guard {
            let limit = w.min(current);
            out.push(Action {
                gpu: g.index,
                limit_w: limit,
                reason: format!("{t:.0} °C against a {:.0} °C threshold: held at {limit:.0} W until below {:.0} °C", p.threshold_c, p.threshold_c - p.hysteresis_c),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(temp: f64, limit: f64) -> Gpu {
        Gpu {
            index: 0,
            power_w: Some(limit),
            limit_w: Some(limit),
            temp_c: Some(temp),
            util_pct: Some(100.0),
            capped: true,
            lost: false,
            min_w: 200.0,
            max_w: 700.0,
            default_w: 700.0,
            proposed_w: None,
            curve: None,
        }
    }

    #[test]
    fn lowers_step_by_step_holds_in_the_band_and_lets_go_below_it() {
        let p = Params::default();
        let mut s = State::new();
        assert!(decide(&p, &mut s, &[gpu(70.0, 600.0)]).is_empty());
        assert_eq!(decide(&p, &mut s, &[gpu(84.0, 600.0)])[0].limit_w, 575.0);
        assert_eq!(decide(&p, &mut s, &[gpu(85.0, 575.0)])[0].limit_w, 550.0);
        assert_eq!(
            decide(&p, &mut s, &[gpu(80.0, 550.0)])[0].limit_w,
            550.0,
            "held inside the hysteresis band"
        );
        assert_eq!(decide(&p, &mut s, &[gpu(77.0, 550.0)])[0].limit_w, 700.0, "let go below 78 °C");
        assert!(decide(&p, &mut s, &[gpu(70.0, 700.0)]).is_empty(), "and silent after");
    }

    /// A missing reading is no reason to let go: the host would give the GPU its upper
    /// bound back if nothing proposed for it.
    #[test]
    fn a_guarded_gpu_without_a_reading_stays_held() {
        let p = Params::default();
        let mut s = State::new();
        assert_eq!(decide(&p, &mut s, &[gpu(90.0, 600.0)])[0].limit_w, 575.0);
        let mut blind = gpu(0.0, 575.0);
        blind.temp_c = None;
        let a = decide(&p, &mut s, &[blind.clone()]);
        assert_eq!(a[0].limit_w, 575.0, "{a:?}");
        assert!(a[0].reason.contains("unreadable"), "{a:?}");
        assert!(decide(&p, &mut State::new(), &[blind]).is_empty(), "an unguarded one: nothing");
    }

    #[test]
    fn never_above_what_the_chain_proposed_nor_below_the_minimum() {
        let p = Params { step_w: 1000.0, ..Params::default() };
        let mut s = State::new();
        let mut g = gpu(90.0, 600.0);
        g.proposed_w = Some(400.0);
        assert_eq!(decide(&p, &mut s, &[g])[0].limit_w, 200.0);
    }
}
