//! The physics of one simulated GPU: power, clock under a cap, useful work, temperature
//! and the energy counter.
//!
//! The model, per time step `h` (see `ARCHITECTURE.md` for why each part is there):
//!
//! - Let `r = f / f_max` be the SM clock ratio, `a` the workload's activity (0..1) and
//!   `m` its memory-boundness (0..1). Power is
//!   `P(r) = idle + a · dyn · (w + (1 − w) · r^γ)`, with `w = 0.35 · m` the part of the
//!   dynamic power (memory, I/O) that does not scale with the SM clock, and `γ = 2.5`
//!   (dynamic power goes with f·V², and V rises with f in the DVFS range).
//! - The firmware picks the highest clock whose power fits under the enforced limit
//!   (lower still above the slowdown temperature; the idle clock when there is no work);
//!   the actual clock follows that target with a first-order lag, as the power
//!   controller of a real GPU does: [`CLOCK_TAU_DOWN_S`] when slowing down, so a newly
//!   lowered cap takes effect within about half a second, and the slower
//!   [`CLOCK_TAU_UP_S`] when boosting, so a GPU waking from idle ramps up to its cap
//!   rather than overshooting it.
//! - Useful work per second is `a · 1 / ((1 − m) / r + m)`: the compute part of each unit
//!   of work takes longer at a lower clock, the memory part does not. Compute-bound work
//!   slows in proportion to the clock, memory-bound work much less.
//! - Temperature follows power through a thermal RC: `T → amb + P·R` with time constant
//!   `tau_th`.
//! - The energy counter is the integral of power over the steps.

use super::workload::Demand;
use crate::gpu::{PowerConstraints, Throttle};

/// Exponent of the SM clock in dynamic power.
pub const CLOCK_EXP: f64 = 2.5;
/// Time constants of the firmware's clock control, in seconds: slowing down (to meet a
/// cap) is faster than boosting.
pub const CLOCK_TAU_DOWN_S: f64 = 0.1;
pub const CLOCK_TAU_UP_S: f64 = 0.25;
/// Share of dynamic power that does not scale with the clock, per unit of memory-boundness.
const MEM_POWER_SHARE: f64 = 0.35;
/// Below this activity the GPU counts as idle (clocks drop, `gpu_idle` reason).
const IDLE_ACTIVITY: f64 = 0.03;
/// Clock reduction per degree above the slowdown temperature.
const THERMAL_SLOPE: f64 = 0.05;

/// A GPU model: the numbers the simulator needs about one SKU.
#[derive(Debug, Clone, PartialEq)]
pub struct Preset {
    /// The name used in config: `h100-sxm`, `a100-sxm4`, `l40s`.
    pub key: &'static str,
    pub name: &'static str,
    pub memory_total_mib: u64,
    pub power: PowerConstraints,
    /// Power at zero activity.
    pub idle_w: f64,
    /// Dynamic power at full activity and maximum clock.
    pub dyn_w: f64,
    pub max_clock_mhz: u32,
    pub min_clock_mhz: u32,
    /// The memory clock (fixed: HBM and GDDR run at one clock under load).
    pub mem_clock_mhz: u32,
    pub ambient_c: f64,
    /// Thermal resistance, °C per watt.
    pub r_th: f64,
    /// Thermal time constant, seconds.
    pub tau_th_s: f64,
    /// Above this temperature the firmware lowers the clock.
    pub slowdown_c: f64,
}

pub const PRESETS: [Preset; 3] = [
    Preset {
        key: "h100-sxm",
        name: "NVIDIA H100 80GB HBM3",
        memory_total_mib: 81559,
        power: PowerConstraints { min_w: 200.0, max_w: 700.0, default_w: 700.0 },
        idle_w: 70.0,
        dyn_w: 640.0,
        max_clock_mhz: 1980,
        mem_clock_mhz: 2619,
        min_clock_mhz: 345,
        ambient_c: 28.0,
        r_th: 0.075,
        tau_th_s: 40.0,
        slowdown_c: 87.0,
    },
    Preset {
        key: "a100-sxm4",
        name: "NVIDIA A100-SXM4-40GB",
        memory_total_mib: 40960,
        power: PowerConstraints { min_w: 100.0, max_w: 400.0, default_w: 400.0 },
        idle_w: 55.0,
        dyn_w: 360.0,
        max_clock_mhz: 1410,
        mem_clock_mhz: 1215,
        min_clock_mhz: 210,
        ambient_c: 28.0,
        r_th: 0.12,
        tau_th_s: 35.0,
        slowdown_c: 85.0,
    },
    Preset {
        key: "l40s",
        name: "NVIDIA L40S",
        memory_total_mib: 46068,
        power: PowerConstraints { min_w: 100.0, max_w: 350.0, default_w: 350.0 },
        idle_w: 35.0,
        dyn_w: 330.0,
        max_clock_mhz: 2520,
        mem_clock_mhz: 9001,
        min_clock_mhz: 210,
        ambient_c: 28.0,
        r_th: 0.15,
        tau_th_s: 30.0,
        slowdown_c: 84.0,
    },
];

impl Preset {
    pub fn by_key(key: &str) -> Option<&'static Preset> {
        PRESETS.iter().find(|p| p.key == key)
    }

    pub fn keys() -> String {
        PRESETS.iter().map(|p| p.key).collect::<Vec<_>>().join(", ")
    }

    fn min_ratio(&self) -> f64 {
        f64::from(self.min_clock_mhz) / f64::from(self.max_clock_mhz)
    }

    /// Power at clock ratio `r` under demand `d`.
    pub fn power_at(&self, d: &Demand, r: f64) -> f64 {
        let w = MEM_POWER_SHARE * d.mem_bound;
        self.idle_w + d.activity * self.dyn_w * (w + (1.0 - w) * r.powf(CLOCK_EXP))
    }

    /// Useful work per second at clock ratio `r`, in full-speed GPU-seconds per second.
    pub fn work_rate_at(d: &Demand, r: f64) -> f64 {
        d.activity / ((1.0 - d.mem_bound) / r + d.mem_bound)
    }

    /// The highest clock ratio whose power fits under `limit_w` (the firmware's target,
    /// before thermal slowdown).
    pub fn capped_ratio(&self, d: &Demand, limit_w: f64) -> f64 {
        let rmin = self.min_ratio();
        if d.activity < 1e-9 {
            return 1.0;
        }
        let w = MEM_POWER_SHARE * d.mem_bound;
        let x = ((limit_w - self.idle_w) / (d.activity * self.dyn_w) - w) / (1.0 - w);
        if x >= 1.0 {
            1.0
        } else if x <= 0.0 {
            rmin
        } else {
            x.powf(1.0 / CLOCK_EXP).max(rmin)
        }
    }

    /// Steady state under a limit, ignoring temperature: (power, work rate). The
    /// simulator's view of a GPU's work-versus-watts curve, for oracles and tests.
    pub fn steady_state(&self, d: &Demand, limit_w: f64) -> (f64, f64) {
        let r = self.capped_ratio(d, limit_w);
        (self.power_at(d, r), Self::work_rate_at(d, r))
    }
}

/// The evolving physical state of one GPU.
#[derive(Debug, Clone)]
pub struct GpuPhysics {
    pub preset: &'static Preset,
    /// Enforced power limit, watts.
    pub limit_w: f64,
    /// SM clock ratio, `min_ratio..=1`.
    pub ratio: f64,
    pub temp_c: f64,
    pub power_w: f64,
    pub energy_j: f64,
    /// Useful work done so far, in full-speed GPU-seconds.
    pub work: f64,
    pub throttle: Throttle,
    pub demand: Demand,
    /// The cooling's thermal resistance against the preset's: 1 when healthy, more with a
    /// failed fan (`Fault::Cooling`).
    pub r_th_factor: f64,
}

impl GpuPhysics {
    pub fn new(preset: &'static Preset) -> GpuPhysics {
        let demand = Demand::IDLE;
        GpuPhysics {
            preset,
            limit_w: preset.power.default_w,
            ratio: preset.min_ratio(),
            temp_c: preset.ambient_c + preset.idle_w * preset.r_th,
            power_w: preset.idle_w,
            energy_j: 0.0,
            work: 0.0,
            throttle: Throttle::GPU_IDLE,
            demand,
            r_th_factor: 1.0,
        }
    }

    /// Advance by `h` seconds under demand `d`.
    pub fn step(&mut self, d: Demand, h: f64) {
        let p = self.preset;
        let cap_ratio = p.capped_ratio(&d, self.limit_w);
        let mut target = cap_ratio;
        let mut throttle = Throttle::default();
        if cap_ratio < 1.0 {
            throttle = throttle | Throttle::SW_POWER_CAP;
        }
        if self.temp_c > p.slowdown_c {
            let thermal = (1.0 - (self.temp_c - p.slowdown_c) * THERMAL_SLOPE).max(0.5);
            if thermal < target {
                target = thermal.max(p.min_ratio());
                throttle = throttle | Throttle::SW_THERMAL;
            }
        }
        if d.activity < IDLE_ACTIVITY {
            // No work: the GPU drops to its idle clock; a cap does not bind.
            target = p.min_ratio();
            throttle = Throttle::GPU_IDLE;
        }
        let tau = if target < self.ratio { CLOCK_TAU_DOWN_S } else { CLOCK_TAU_UP_S };
        self.ratio = target + (self.ratio - target) * (-h / tau).exp();
        self.power_w = p.power_at(&d, self.ratio);
        self.energy_j += self.power_w * h;
        self.work += Preset::work_rate_at(&d, self.ratio) * h;
        let t_ss = p.ambient_c + self.power_w * p.r_th * self.r_th_factor;
        self.temp_c = t_ss + (self.temp_c - t_ss) * (-h / p.tau_th_s).exp();
        self.throttle = throttle;
        self.demand = d;
    }

    pub fn sm_clock_mhz(&self) -> u32 {
        (self.ratio * f64::from(self.preset.max_clock_mhz)).round() as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H100: &Preset = &PRESETS[0];
    const COMPUTE: Demand =
        Demand { activity: 0.82, mem_bound: 0.1, util_pct: 100.0, mem_used_mib: 1000 };
    const MEMORY: Demand =
        Demand { activity: 0.82, mem_bound: 0.8, util_pct: 100.0, mem_used_mib: 1000 };

    fn run(g: &mut GpuPhysics, d: Demand, seconds: f64) {
        let h = 0.01;
        for _ in 0..(seconds / h).round() as usize {
            g.step(d, h);
        }
    }

    #[test]
    fn uncapped_power_is_idle_plus_activity_times_dynamic_power() {
        let mut g = GpuPhysics::new(H100);
        run(&mut g, COMPUTE, 5.0);
        let want = H100.idle_w + 0.82 * H100.dyn_w;
        assert!((g.power_w - want).abs() < 0.01, "{} vs {want}", g.power_w);
        assert!(!g.throttle.contains(Throttle::SW_POWER_CAP));
    }

    #[test]
    fn a_cap_lowers_power_within_the_lag_and_lowers_throughput() {
        let mut g = GpuPhysics::new(H100);
        run(&mut g, COMPUTE, 2.0);
        let (w0, p0) = (g.work, g.power_w);
        run(&mut g, COMPUTE, 1.0);
        let uncapped_rate = g.work - w0;

        g.limit_w = 400.0;
        run(&mut g, COMPUTE, 0.05);
        assert!(
            g.power_w > 430.0,
            "the firmware lag means power is still above the cap at 50 ms: {}",
            g.power_w
        );
        assert!(g.power_w < p0, "but it is already falling");
        run(&mut g, COMPUTE, 0.95);
        assert!(
            g.power_w <= 400.0 * 1.01 && g.power_w >= 400.0 * 0.97,
            "within 1 s power settles at the cap: {}",
            g.power_w
        );
        assert!(g.throttle.contains(Throttle::SW_POWER_CAP));
        let w1 = g.work;
        run(&mut g, COMPUTE, 1.0);
        let capped_rate = g.work - w1;
        assert!(
            capped_rate < uncapped_rate * 0.95,
            "throughput falls under the cap: {capped_rate} vs {uncapped_rate}"
        );
        assert!(
            capped_rate > uncapped_rate * 0.6,
            "but not in proportion to power: {capped_rate} vs {uncapped_rate}"
        );
        assert!(g.sm_clock_mhz() < H100.max_clock_mhz);
    }

    #[test]
    fn a_gpu_waking_from_idle_ramps_up_to_its_cap_without_overshoot() {
        let mut g = GpuPhysics::new(H100);
        g.limit_w = 400.0;
        run(&mut g, Demand::IDLE, 5.0);
        assert!(g.throttle.contains(Throttle::GPU_IDLE));
        assert_eq!(g.sm_clock_mhz(), H100.min_clock_mhz);
        let mut peak: f64 = 0.0;
        for _ in 0..200 {
            g.step(COMPUTE, 0.01);
            peak = peak.max(g.power_w);
        }
        assert!(peak <= 400.0 + 1e-6, "peak {peak} W");
        assert!(g.power_w > 395.0, "reaches its cap within 2 s: {}", g.power_w);
    }

    #[test]
    fn memory_bound_work_loses_less_to_a_cap_than_compute_bound_work() {
        let loss = |d: Demand| {
            let (p, full) = H100.steady_state(&d, H100.power.max_w);
            let (_, capped) = H100.steady_state(&d, H100.idle_w + (p - H100.idle_w) * 0.6);
            1.0 - capped / full
        };
        let (c, m) = (loss(COMPUTE), loss(MEMORY));
        assert!(c > 0.05 && m < c / 2.0, "compute loses {c:.3}, memory-bound {m:.3}");
    }

    #[test]
    fn temperature_follows_power_through_a_thermal_rc() {
        let mut g = GpuPhysics::new(H100);
        let t0 = g.temp_c;
        run(&mut g, COMPUTE, H100.tau_th_s);
        let t_ss = H100.ambient_c + g.power_w * H100.r_th;
        let frac = (g.temp_c - t0) / (t_ss - t0);
        assert!((frac - 0.632).abs() < 0.02, "one time constant covers 63% of the step: {frac}");
        run(&mut g, COMPUTE, 10.0 * H100.tau_th_s);
        assert!((g.temp_c - t_ss).abs() < 0.1);
    }

    #[test]
    fn above_the_slowdown_temperature_the_clock_drops() {
        let mut g = GpuPhysics::new(H100);
        run(&mut g, COMPUTE, 2.0);
        g.temp_c = H100.slowdown_c + 5.0;
        g.step(COMPUTE, 0.5);
        assert!(g.throttle.contains(Throttle::SW_THERMAL));
        assert!(g.ratio < 0.95);
    }

    #[test]
    fn capped_ratio_never_goes_below_the_minimum_clock() {
        let r = H100.capped_ratio(&COMPUTE, 1.0);
        assert_eq!(r, f64::from(H100.min_clock_mhz) / f64::from(H100.max_clock_mhz));
        assert_eq!(H100.capped_ratio(&Demand::IDLE, 1.0), 1.0, "an idle GPU is never capped");
    }
}
