//! The shipped power policies, built from source, running the simulated node.

use std::path::Path;
use std::time::Duration;

use gpulet::telemetry::Event;
use gpulet_plugin_artifacts as wasm;

use crate::{Harness, harness_in};

fn node(dir: &Path, gpus: &str, power: &str, plugins: &str) -> Harness {
    harness_in(
        &format!(
            "[plugins]\ncache_dir = \"cache\"\nstate_dir = \"state\"\n[power]\n{power}\n[sim]\nseed = 3\n{gpus}\n{plugins}"
        ),
        dir,
    )
}

fn plugin(name: &str, path: &str, grants: &str, config: &str) -> String {
    format!("[[plugin]]\nname = {name:?}\npath = {path:?}\ngrants = {grants}\nconfig = {config}\n")
}

fn run(h: &mut Harness, ticks: usize) -> Vec<gpulet::agent::Tick> {
    (0..ticks)
        .map(|_| {
            h.clock.advance(Duration::from_secs(1));
            h.agent.tick()
        })
        .collect()
}

const MIXED: &str = r#"
[[sim.gpu]]
preset = "h100-sxm"
workload = "trace"
trace = "builtin:h100x8-gpt-training"
trace_start = "110s"
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

#[test]
fn power_budget_holds_the_budget_and_does_more_work_than_an_equal_split() {
    let budget = 0.6 * 8.0 * 700.0;
    let power = format!("budget_w = {budget}");
    let dir = tempfile::tempdir().unwrap();
    let mut equal = node(dir.path(), MIXED, &power, "");
    let mut split = node(
        dir.path(),
        MIXED,
        &power,
        &plugin("budget", wasm::POWER_BUDGET, "[\"lower\", \"raise\"]", "{}"),
    );
    run(&mut equal, 300);
    let ticks = run(&mut split, 300);
    for t in &ticks[3..] {
        let limits: f64 = t.snapshot.samples.iter().filter_map(|s| s.power_limit_w.value()).sum();
        assert!(limits <= budget + 1e-6, "seq {}: limits {limits} W", t.snapshot.seq);
        assert!(
            t.snapshot.node_power_w() <= budget,
            "seq {}: draw {} W",
            t.snapshot.seq,
            t.snapshot.node_power_w()
        );
        assert!(t.events.iter().all(|e| !matches!(e, Event::PluginFault { .. })));
    }
    let (w_equal, w_split) = (equal.sim.lock().total_work(), split.sim.lock().total_work());
    assert!(
        w_split > w_equal * 1.03,
        "power-budget {w_split:.0} vs equal split {w_equal:.0} GPU-s of work"
    );
    // The idle GPU was given little, the training GPUs much more than an equal share.
    let last = &ticks.last().unwrap().snapshot.samples;
    let idle = last[7].power_limit_w.value().unwrap();
    assert!(idle < budget / 8.0 - 100.0, "idle GPU limit {idle}");
}

#[test]
fn power_budget_converges_within_a_few_ticks_without_oscillating() {
    let gpus = "[[sim.gpu]]\npreset = \"h100-sxm\"\nworkload = \"memory-bound\"\ncount = 2\n[[sim.gpu]]\npreset = \"h100-sxm\"\nworkload = \"idle\"\ncount = 2";
    let dir = tempfile::tempdir().unwrap();
    let mut h = node(
        dir.path(),
        gpus,
        "budget_w = 1300",
        &plugin("budget", wasm::POWER_BUDGET, "[\"lower\", \"raise\"]", "{}"),
    );
    let ticks = run(&mut h, 40);
    let changes: Vec<u64> = ticks
        .iter()
        .filter(|t| t.events.iter().any(|e| matches!(e, Event::LimitChanged { .. })))
        .map(|t| t.snapshot.seq)
        .collect();
    assert!(changes.iter().all(|&s| s < 5), "limits still changing after tick 5: {changes:?}");
    let l = |i: usize| ticks.last().unwrap().snapshot.samples[i].power_limit_w.value().unwrap();
    assert!(
        (l(0) - l(1)).abs() < 1.0 && l(0) > 400.0 && l(2) < 260.0,
        "{} {} {} {}",
        l(0),
        l(1),
        l(2),
        l(3)
    );
}

#[test]
fn thermal_guard_lowers_a_hot_gpu_and_lets_go_with_hysteresis() {
    let dir = tempfile::tempdir().unwrap();
    let gpus = "[[sim.gpu]]\npreset = \"h100-sxm\"\nworkload = \"memory-bound\"";
    let cfg = "{ threshold_c = 60, hysteresis_c = 4, step_w = 25 }";
    let mut h = node(
        dir.path(),
        gpus,
        "",
        &plugin("thermal", wasm::THERMAL_GUARD, "[\"lower\", \"raise\"]", cfg),
    );
    let ticks = run(&mut h, 900);
    let temps: Vec<f64> =
        ticks.iter().map(|t| t.snapshot.samples[0].temp_c.value().unwrap()).collect();
    let first_hot = temps.iter().position(|&t| t >= 60.0).expect("the GPU heats past 60 °C");
    let peak = temps.iter().cloned().fold(0.0, f64::max);
    assert!(peak < 62.0, "the guard holds the temperature near its threshold: peak {peak:.1} °C");
    let lowered = ticks.iter().flat_map(|t| &t.events).filter(|e| matches!(e, Event::LimitChanged { source, to_w, from_w: Some(f), .. } if source == "thermal" && to_w < f)).count();
    let released = ticks.iter().flat_map(|t| &t.events).filter(|e| matches!(e, Event::LimitChanged { source, reason, .. } if source == "thermal" && reason.contains("guard released"))).count();
    assert!(lowered >= 3, "lowered {lowered} times after {first_hot} s");
    assert!(released >= 1, "released {released} times");
    assert!(
        temps[first_hot..].iter().all(|&t| t > 50.0),
        "it does not overshoot far below the band"
    );
}

#[test]
fn idle_saver_parks_an_idle_gpu_and_a_guard_after_a_splitter_only_lowers() {
    let dir = tempfile::tempdir().unwrap();
    let gpus = "[[sim.gpu]]\npreset = \"a100-sxm4\"\nworkload = \"idle\"\n[[sim.gpu]]\npreset = \"a100-sxm4\"\nworkload = \"training\"";
    let plugins = [
        plugin("budget", wasm::POWER_BUDGET, "[\"lower\", \"raise\"]", "{}"),
        plugin("thermal", wasm::THERMAL_GUARD, "[\"lower\"]", "{ threshold_c = 40 }"),
        plugin("idle", wasm::IDLE_SAVER, "[\"lower\", \"raise\"]", "{ idle_for_s = 10 }"),
    ]
    .concat();
    let mut h = node(dir.path(), gpus, "budget_w = 700", &plugins);
    let ticks = run(&mut h, 30);
    let last = &ticks.last().unwrap().snapshot.samples;
    assert_eq!(last[0].power_limit_w.value(), Some(100.0), "the idle GPU is parked at its minimum");
    // The training GPU runs above 40 °C: the guard holds it below the splitter's grant.
    let by_source = |s: &str| {
        ticks
            .iter()
            .flat_map(|t| &t.events)
            .filter(|e| matches!(e, Event::LimitChanged { source, .. } if source == s))
            .count()
    };
    assert!(
        by_source("thermal") > 0 && by_source("idle") > 0,
        "{} {}",
        by_source("thermal"),
        by_source("idle")
    );
    let rejected = ticks
        .iter()
        .flat_map(|t| &t.events)
        .filter(|e| matches!(e, Event::DecisionRejected { .. }))
        .count();
    assert_eq!(rejected, 0);
}

#[test]
fn power_budget_can_split_by_calibrated_curves_on_a_mixed_node() {
    let gpus = "[[sim.gpu]]\npreset = \"h100-sxm\"\nworkload = \"training\"\ncount = 2\n[[sim.gpu]]\npreset = \"l40s\"\nworkload = \"training\"\ncount = 2";
    let power = "budget_w = 900";
    let budget = plugin("budget", wasm::POWER_BUDGET, "[\"lower\", \"raise\"]", "{}");
    let (with, without) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // `gpulet calibrate` on the same node (same seed: same UUIDs).
    let config = gpulet::config::Config::parse(&format!("[sim]\nseed = 3\n{gpus}")).unwrap();
    let settings = gpulet::calibrate::Settings::default();
    gpulet::calibrate::simulated(&config.sim, with.path(), settings, 0)
        .unwrap()
        .save(&with.path().join("cal.json"))
        .unwrap();
    let curved =
        plugin("budget", wasm::POWER_BUDGET, "[\"lower\", \"raise\"]", "{ use_curves = true }");
    let with_curves = format!("{curved}[calibration]\nfile = \"cal.json\"\n");
    let mut a = node(with.path(), gpus, power, &with_curves);
    let mut b = node(without.path(), gpus, power, &budget);
    let ta = run(&mut a, 300);
    run(&mut b, 300);
    for t in &ta[3..] {
        let limits: f64 = t.snapshot.samples.iter().filter_map(|s| s.power_limit_w.value()).sum();
        assert!(limits <= 900.0 + 1e-6, "seq {}: limits {limits} W", t.snapshot.seq);
    }
    let last = &ta.last().unwrap().snapshot.samples;
    let l = |i: usize| last[i].power_limit_w.value().unwrap().round();
    let (wa, wb) = (a.sim.lock().total_work(), b.sim.lock().total_work());
    // The L40S gain twice the H100s' share of their best per watt at the floor: they
    // get the watts above the floors, the H100s stay at theirs.
    let limits: Vec<f64> = (0..4).map(l).collect();
    assert!(limits[0] == 200.0 && limits[1] == 200.0 && limits[2] > 240.0, "{limits:?}");
    let curve_reasons = ta
        .iter()
        .flat_map(|t| &t.events)
        .filter(|e| matches!(e, Event::LimitChanged { reason, .. } if reason.contains("work-per-watt curves")))
        .count();
    assert!(curve_reasons > 0);
    // What it buys on the simulator: nothing measurable (the calibration load is not
    // the job); it must not cost work either. BENCHMARKS.md has the figures.
    assert!(
        (wa / wb - 1.0).abs() < 0.01,
        "with curves {wa:.1} vs without {wb:.1} GPU-s; {limits:?}"
    );
}
