//! Power-budget quality on the simulator: useful work under a node budget at 60% of the
//! sum of TDPs, for the static equal split, the power-budget plugin (the real agent, the
//! real component) and an oracle, on a mixed synthetic node and on the real 8 × H100
//! training trace. Prints a Markdown table.
//!
//! The oracle knows what no policy can: every GPU's current demand and its exact
//! work-versus-watts curve. Every 100 ms it re-splits the budget by greedy marginal
//! allocation (optimal for concave curves, to 2 W), and its limits take effect at once.
//!
//! power-budget also runs with `use_curves` on each node, after `gpulet calibrate`'s
//! simulated calibration of that node, and a fourth node mixes two SKUs (where curves
//! differ between GPUs).
//!
//! Run: `cargo bench -p gpulet --bench power_quality`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use gpulet::calibrate;
use gpulet::clock::VirtualClock;
use gpulet::config::Config;
use gpulet::gpu::sim::SimNode;
use gpulet::gpu::sim::model::Preset;
use gpulet::setup;

const SECONDS: u64 = 600;
const SETTLE: usize = 5;

const MIXED: &str = r#"
[[sim.gpu]]
preset = "h100-sxm"
workload = "training"
count = 4
[[sim.gpu]]
preset = "h100-sxm"
workload = "inference"
count = 2
[[sim.gpu]]
preset = "h100-sxm"
workload = "memory-bound"
[[sim.gpu]]
preset = "h100-sxm"
workload = "idle"
"#;

const TRACE_MIXED: &str = r#"
[[sim.gpu]]
preset = "h100-sxm"
workload = "trace"
trace = "builtin:h100x8-gpt-training"
count = 4
[[sim.gpu]]
preset = "h100-sxm"
workload = "inference"
count = 2
[[sim.gpu]]
preset = "h100-sxm"
workload = "idle"
count = 2
"#;

const SKUS: &str = r#"
[[sim.gpu]]
preset = "h100-sxm"
workload = "training"
count = 4
[[sim.gpu]]
preset = "l40s"
workload = "training"
count = 2
[[sim.gpu]]
preset = "l40s"
workload = "inference"
count = 2
"#;

/// What decides the limits in an agent run.
#[derive(Clone, Copy, PartialEq)]
enum Policy {
    /// No plugin: the guard's equal split.
    Equal,
    Budget,
    /// power-budget with `use_curves`, on the node's calibration.
    BudgetCurves,
}

const TRACE: &str = r#"
[[sim.gpu]]
preset = "h100-sxm"
workload = "trace"
trace = "builtin:h100x8-gpt-training"
count = 8
"#;

struct Outcome {
    work: f64,
    /// Ticks (after settling) whose mean node power over the tick, from the energy
    /// counters, exceeded the budget: what a PDU or a breaker sees.
    over_mean: usize,
    max_mean_excess_w: f64,
    /// Ticks whose instantaneous node power sample exceeded it, and by how much at most.
    over_instant: usize,
    max_excess_w: f64,
    ticks: usize,
}

/// Per-tick accounting of node power against the budget.
struct Meter {
    budget: f64,
    last_energy: Option<f64>,
    o: Outcome,
}

impl Meter {
    fn new(budget: f64) -> Meter {
        let o = Outcome {
            work: 0.0,
            over_mean: 0,
            max_mean_excess_w: 0.0,
            over_instant: 0,
            max_excess_w: 0.0,
            ticks: 0,
        };
        Meter { budget, last_energy: None, o }
    }

    /// One 1 s tick: instantaneous node power and the node's energy counter total.
    fn tick(&mut self, settled: bool, power_w: f64, energy_j: f64) {
        let mean = self.last_energy.map(|e| energy_j - e);
        self.last_energy = Some(energy_j);
        if !settled {
            return;
        }
        self.o.ticks += 1;
        if let Some(m) = mean.filter(|m| *m > self.budget) {
            self.o.over_mean += 1;
            self.o.max_mean_excess_w = self.o.max_mean_excess_w.max(m - self.budget);
        }
        if power_w > self.budget {
            self.o.over_instant += 1;
            self.o.max_excess_w = self.o.max_excess_w.max(power_w - self.budget);
        }
    }
}

fn energy(samples: &[gpulet::gpu::GpuSample]) -> f64 {
    samples.iter().filter_map(|s| s.energy_j.value()).sum()
}

fn config(gpus: &str, budget: f64, policy: Policy, dir: &Path) -> Config {
    let plugin = match policy {
        Policy::Equal => String::new(),
        Policy::Budget | Policy::BudgetCurves => format!(
            "[[plugin]]\nname = \"budget\"\npath = {:?}\ngrants = [\"lower\", \"raise\"]\nconfig = {{ use_curves = {} }}\n",
            gpulet_plugin_artifacts::POWER_BUDGET,
            policy == Policy::BudgetCurves
        ),
    };
    let cache = dir.join("cache");
    let state = dir.join("state");
    let calibration = dir.join("calibration.json");
    let toml = format!(
        "[power]\nbudget_w = {budget}\n[plugins]\ncache_dir = {cache:?}\nstate_dir = {state:?}\n[calibration]\nfile = {calibration:?}\n[sim]\nseed = 11\n{gpus}\n{plugin}"
    );
    let c = Config::parse(&toml).unwrap();
    c.validate().unwrap();
    c
}

/// The agent on a virtual clock, 1 s ticks: the equal split (no plugin) or power-budget
/// (with the curves of `gpulet calibrate` on the simulated node).
fn agent_run(gpus: &str, budget: f64, policy: Policy) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let c = config(gpus, budget, policy, dir.path());
    if policy == Policy::BudgetCurves {
        let settings = calibrate::Settings::default();
        let cal = calibrate::simulated(&c.sim, Path::new("."), settings, 0).unwrap();
        cal.save(&c.calibration.file).unwrap();
    }
    let clock = VirtualClock::new(0);
    let backend = setup::open_backend(&c, Path::new("."), Arc::new(clock.clone())).unwrap();
    let sim = backend.sim.clone().unwrap();
    let mut agent =
        setup::agent(&c, Path::new("."), backend, Vec::new(), Arc::new(clock.clone())).unwrap();
    let mut meter = Meter::new(budget);
    for i in 0..SECONDS as usize {
        clock.advance(Duration::from_secs(1));
        let t = agent.tick();
        meter.tick(i >= SETTLE, t.snapshot.node_power_w(), energy(&t.snapshot.samples));
    }
    meter.o.work = sim.lock().total_work();
    meter.o
}

/// The oracle: limits set on the node directly from its true demand every 100 ms.
fn oracle_run(gpus: &str, budget: f64) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let c = config(gpus, budget, Policy::Equal, dir.path());
    let mut node = setup::sim_node(&c.sim, Path::new(".")).unwrap();
    let step = Duration::from_millis(100);
    let mut meter = Meter::new(budget);
    for i in 0..(SECONDS * 10) as usize {
        let limits = oracle_split(&node, budget);
        for (g, l) in limits.iter().enumerate() {
            node.set_power_limit(g as u32, *l).unwrap();
        }
        node.advance(step);
        if i % 10 == 9 {
            let samples = node.sample_all();
            let p: f64 = samples.iter().filter_map(|s| s.power_w.value()).sum();
            meter.tick(i / 10 >= SETTLE, p, energy(&samples));
        }
    }
    meter.o.work = node.total_work();
    meter.o
}

/// Greedy marginal allocation in 2 W steps: each step goes to the GPU whose work rate
/// grows most from it.
fn oracle_split(node: &SimNode, budget: f64) -> Vec<f64> {
    let n = node.len();
    let presets: Vec<&Preset> = (0..n).map(|i| node.physics(i as u32).preset).collect();
    let demand: Vec<_> = (0..n).map(|i| node.physics(i as u32).demand).collect();
    let mut limits: Vec<f64> = presets.iter().map(|p| p.power.min_w).collect();
    let rate = |i: usize, l: f64| presets[i].steady_state(&demand[i], l).1;
    let mut left = budget - limits.iter().sum::<f64>();
    const STEP: f64 = 2.0;
    while left >= STEP {
        let best = (0..n)
            .filter(|&i| limits[i] + STEP <= presets[i].power.max_w)
            .map(|i| (i, rate(i, limits[i] + STEP) - rate(i, limits[i])))
            .max_by(|a, b| a.1.total_cmp(&b.1));
        match best {
            Some((i, gain)) if gain > 1e-12 => {
                limits[i] += STEP;
                left -= STEP;
            }
            _ => break,
        }
    }
    // Whatever no GPU can use goes to headroom, evenly, as a real splitter would.
    for i in 0..n {
        let room = (presets[i].power.max_w - limits[i]).min(left / (n - i) as f64);
        limits[i] += room;
        left -= room;
    }
    limits
}

fn main() {
    // `cargo bench` passes `--bench`; this harness takes no options. Budgets: 60% of the
    // node's TDP.
    let h100s = 0.6 * 8.0 * 700.0;
    println!(
        "| node ({SECONDS} s, budget 60% of TDP) | policy | useful work (GPU-s) | of oracle | ticks above budget: 1 s mean power (max excess) | ticks above budget: instantaneous sample (max excess) |"
    );
    println!("|---|---|---|---|---|---|");
    let nodes = [
        ("mixed synthetic", MIXED, h100s),
        ("4 × real H100 trace, 2 inference, 2 idle", TRACE_MIXED, h100s),
        ("8 × real H100 trace", TRACE, h100s),
        (
            "4 × H100 training, 2 × L40S training, 2 × L40S inference",
            SKUS,
            0.6 * (4.0 * 700.0 + 4.0 * 350.0),
        ),
    ];
    for (name, gpus, budget) in nodes {
        let oracle = oracle_run(gpus, budget);
        let equal = agent_run(gpus, budget, Policy::Equal);
        let split = agent_run(gpus, budget, Policy::Budget);
        let curves = agent_run(gpus, budget, Policy::BudgetCurves);
        for (policy, o) in [
            ("oracle", &oracle),
            ("static equal split", &equal),
            ("power-budget plugin", &split),
            ("power-budget, use_curves", &curves),
        ] {
            println!(
                "| {name} | {policy} | {:.0} | {:.1}% | {} of {} ({:.1} W) | {} of {} ({:.0} W) |",
                o.work,
                100.0 * o.work / oracle.work,
                o.over_mean,
                o.ticks,
                o.max_mean_excess_w,
                o.over_instant,
                o.ticks,
                o.max_excess_w
            );
        }
    }
}
