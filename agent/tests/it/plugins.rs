//! The plugin host, with real components built from source (plugins/artifacts): the
//! fixture misbehaving on request, and the shipped policies on the simulator.

use std::path::Path;
use std::time::{Duration, Instant};

use gpulet::plugin::cache::Source;
use gpulet::plugin::engine::PluginEngine;
use gpulet::telemetry::Event;
use gpulet_plugin_artifacts as wasm;

use crate::{Harness, harness_in};

/// An agent on a 2 × A100 training node (or `gpus`) with one plugin entry.
fn with_plugin(dir: &Path, plugin: &str, extra: &str) -> Harness {
    harness_in(
        &format!(
            r#"
            [plugins]
            cache_dir = "cache"
            state_dir = "state"
            {extra}
            [[sim.gpu]]
            preset = "a100-sxm4"
            workload = "training"
            count = 2
            {plugin}
            "#
        ),
        dir,
    )
}

fn fixture(mode: &str, grants: &str) -> String {
    format!(
        "[[plugin]]\nname = \"fx\"\npath = {:?}\nconfig = {{ mode = {mode:?} }}\ngrants = {grants}\n",
        wasm::FIXTURE
    )
}

fn tick(h: &mut Harness) -> gpulet::agent::Tick {
    h.clock.advance(Duration::from_secs(1));
    h.agent.tick()
}

fn faults(events: &[Event]) -> Vec<&'static str> {
    events
        .iter()
        .filter_map(|e| if let Event::PluginFault { fault, .. } = e { Some(*fault) } else { None })
        .collect()
}

#[test]
fn an_infinite_loop_is_stopped_at_its_deadline_and_the_next_tick_runs_on_time() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = with_plugin(dir.path(), &fixture("loop", "[]"), "max_failures = 100");
    for _ in 0..3 {
        let start = Instant::now();
        let t = tick(&mut h);
        let took = start.elapsed();
        assert_eq!(faults(&t.events), vec!["timeout"]);
        // 20 ms deadline, 1 ms epochs; generous slack for a loaded 2-core CI machine.
        assert!(took < Duration::from_millis(250), "a tick with a looping plugin took {took:?}");
        assert_eq!(t.snapshot.samples.len(), 2, "the tick completed");
    }
}

#[test]
fn a_memory_bomb_hits_the_cap_and_the_agent_stays_bounded() {
    fn rss_mib() -> u64 {
        let s = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() / 1024
    }
    let dir = tempfile::tempdir().unwrap();
    // A long deadline, so that it is the memory cap that stops it.
    let plugin = format!("{}memory_mib = 64\ndeadline = \"500ms\"\n", fixture("alloc", "[]"));
    let mut h = with_plugin(dir.path(), &plugin, "max_failures = 100");
    tick(&mut h);
    let before = rss_mib();
    for _ in 0..10 {
        assert_eq!(faults(&tick(&mut h).events), vec!["memory"]);
    }
    let grown = rss_mib().saturating_sub(before);
    // Ten 64 MiB bombs: 640 MiB if instances leaked.
    assert!(grown < 200, "RSS grew by {grown} MiB over ten memory bombs");
}

#[test]
fn a_trap_is_followed_by_a_fresh_instance_whose_state_survived() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = with_plugin(dir.path(), &fixture("trap-once", "[\"lower\"]"), "");
    let t = tick(&mut h);
    assert_eq!(faults(&t.events), vec!["trap"]);
    let t = tick(&mut h);
    assert!(faults(&t.events).is_empty());
    let applied = t.events.iter().any(|e| matches!(e, Event::LimitChanged { gpu: 0, to_w, source, .. } if *to_w == 300.0 && source == "fx"));
    assert!(applied, "the fresh instance's decision reached the GPU: {:?}", t.events);
}

#[test]
fn out_of_range_and_forbidden_actions_are_clamped_or_rejected_and_audited() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = with_plugin(dir.path(), &fixture("out-of-range", "[\"lower\", \"raise\"]"), "");
    // Lower GPU 0 first so that the 1 MW proposal is a raise and gets clamped to 400 W.
    h.sim.lock().set_power_limit(0, 250.0).unwrap();
    let t = tick(&mut h);
    let clamped = t.events.iter().find_map(|e| match e {
        Event::LimitChanged { gpu: 0, to_w, reason, .. } => Some((*to_w, reason.clone())),
        _ => None,
    });
    let (to_w, reason) = clamped.expect("GPU 0 changed");
    assert_eq!(to_w, 400.0);
    assert!(reason.contains("clamped from 1000000 W to bounds 100..400 W"), "{reason}");
    let rejected: Vec<String> = t
        .events
        .iter()
        .filter_map(|e| match e {
            Event::DecisionRejected { source, gpu, reason } if source == "fx" => {
                Some(format!("{gpu}: {reason}"))
            }
            _ => None,
        })
        .collect();
    assert_eq!(rejected.len(), 2, "{rejected:?}");
    assert!(rejected[0].contains("99: GPU 99 does not exist"), "{rejected:?}");
    assert!(rejected[1].contains("1: limit NaN is not a number"), "{rejected:?}");

    // A plugin granted only "lower" cannot raise.
    let dir = tempfile::tempdir().unwrap();
    let mut h = with_plugin(dir.path(), &fixture("raise", "[\"lower\"]"), "");
    h.sim.lock().set_power_limit(1, 250.0).unwrap();
    let t = tick(&mut h);
    let denied = t.events.iter().any(|e| matches!(e, Event::DecisionRejected { gpu: 1, reason, .. } if reason.contains("may not raise limits (250 W to 400 W)")));
    assert!(denied, "{:?}", t.events);
    assert!(!t.events.iter().any(|e| matches!(e, Event::LimitChanged { .. })), "nothing changed");
}

#[test]
fn a_plugin_trying_files_or_sockets_gets_nothing() {
    for (mode, want) in
        [("file", "open /etc/passwd failed"), ("socket", "connect 127.0.0.1:1 failed")]
    {
        let dir = tempfile::tempdir().unwrap();
        let mut h = with_plugin(dir.path(), &fixture(mode, "[\"lower\"]"), "");
        let t = tick(&mut h);
        let reason = t
            .events
            .iter()
            .find_map(|e| {
                if let Event::LimitChanged { reason, .. } = e { Some(reason.clone()) } else { None }
            })
            .unwrap_or_else(|| panic!("{mode}: {:?}", t.events));
        assert!(reason.starts_with(want), "{mode}: {reason}");
    }
}

#[test]
fn after_k_failures_a_plugin_is_quarantined_and_its_fallback_holds() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = with_plugin(
        dir.path(),
        &fixture("trap", "[\"lower\"]"),
        "max_failures = 3\nfailure_window = \"1m\"",
    );
    let limits = |t: &gpulet::agent::Tick| {
        t.snapshot.samples.iter().map(|s| s.power_limit_w.value()).collect::<Vec<_>>()
    };
    let first = tick(&mut h);
    let second = tick(&mut h);
    let third = tick(&mut h);
    assert_eq!(
        [faults(&first.events), faults(&second.events), faults(&third.events)].concat(),
        vec!["trap"; 3]
    );
    let records = h.out.records();
    assert_eq!(records.last().unwrap()["agent"]["plugin_faults"], 3, "every fault is counted");
    let q = third.events.iter().find(|e| matches!(e, Event::PluginQuarantined { .. }));
    assert_eq!(
        q,
        Some(&Event::PluginQuarantined {
            plugin: "fx".into(),
            failures: 3,
            window_s: 60,
            fallback: "hold"
        })
    );
    for _ in 0..3 {
        let t = tick(&mut h);
        assert!(faults(&t.events).is_empty(), "a quarantined plugin is not called");
        assert!(
            t.events.iter().all(|e| !matches!(e, Event::LimitChanged { .. })),
            "hold: {:?}",
            t.events
        );
        assert_eq!(limits(&t), limits(&first));
    }
    assert_eq!(h.agent.policy().status(), vec![("fx", false)]);
}

#[test]
fn hot_reload_keeps_the_old_plugin_when_the_new_one_is_broken() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gpulet.toml");
    let write = |plugin: &str| {
        let toml = format!(
            "[plugins]\ncache_dir = \"cache\"\nstate_dir = \"state\"\n[[sim.gpu]]\npreset = \"a100-sxm4\"\nworkload = \"training\"\n{plugin}"
        );
        std::fs::write(&file, toml).unwrap();
    };
    write(&fixture("ok", "[\"lower\"]"));
    let mut h = with_plugin(dir.path(), &fixture("ok", "[\"lower\"]"), "");
    h.agent.set_reload(gpulet::setup::reloader(file.clone()));
    assert!(tick(&mut h).events.iter().any(|e| matches!(e, Event::LimitChanged { gpu: 0, .. })));

    // A config the plugin rejects, then a file that is not a component: both refused,
    // the running plugin goes on.
    let garbage = dir.path().join("broken.wasm");
    std::fs::write(&garbage, b"\0asm not really").unwrap();
    for bad in [
        fixture("no-such-mode", "[\"lower\"]"),
        format!("[[plugin]]\nname = \"fx\"\npath = {garbage:?}\ngrants = [\"lower\"]\n"),
    ] {
        write(&bad);
        h.agent.reload();
        let t = tick(&mut h);
        let failed = t.events.iter().find_map(|e| match e {
            Event::PluginLoadFailed { plugin, kept_previous, error } => {
                Some((plugin.clone(), *kept_previous, error.clone()))
            }
            _ => None,
        });
        let (plugin, kept, error) = failed.unwrap_or_else(|| panic!("{:?}", t.events));
        assert_eq!((plugin.as_str(), kept), ("fx", true), "{error}");
        assert_eq!(h.agent.policy().status(), vec![("fx", true)]);
    }
    // The old plugin still decides: move GPU 0 away and it is put back.
    h.sim.lock().set_power_limit(0, 350.0).unwrap();
    let t = tick(&mut h);
    assert!(t.events.iter().any(|e| matches!(e, Event::LimitChanged { gpu: 0, to_w, source, .. } if *to_w == 300.0 && source == "fx")), "{:?}", t.events);

    // A good new config replaces it; an invalid config file changes nothing.
    write(&fixture("lower", "[\"lower\"]"));
    h.agent.reload();
    assert!(
        tick(&mut h)
            .events
            .iter()
            .any(|e| matches!(e, Event::PluginLoaded { plugin, .. } if plugin == "fx"))
    );
    std::fs::write(&file, "tick = \"1ns\"").unwrap();
    h.agent.reload();
    assert!(tick(&mut h).events.iter().any(|e| matches!(e, Event::ReloadFailed { error } if error.contains("tick: \"1ns\" is out of range"))));
}

#[test]
fn the_compile_cache_survives_restart_and_rejects_tampered_entries() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let path = Path::new(wasm::POWER_BUDGET);
    let first = PluginEngine::new(Some(&cache)).unwrap().load(path).unwrap();
    assert_eq!(first.source, Source::Compiled);
    // A restart: a new engine, the same directory.
    let engine = PluginEngine::new(Some(&cache)).unwrap();
    let second = engine.load(path).unwrap();
    assert_eq!(second.source, Source::Cached);
    assert!(
        second.load_time < first.load_time,
        "cached {:?} vs compiled {:?}",
        second.load_time,
        first.load_time
    );

    let entry = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "cwasm"))
        .unwrap();
    let mut bytes = std::fs::read(&entry).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff; // tampered code
    std::fs::write(&entry, &bytes).unwrap();
    let third = PluginEngine::new(Some(&cache)).unwrap().load(path).unwrap();
    assert_eq!(third.source, Source::Rebuilt);
    assert_eq!(
        PluginEngine::new(Some(&cache)).unwrap().load(path).unwrap().source,
        Source::Cached,
        "and the rebuilt entry is good"
    );

    std::fs::write(&entry, b"short").unwrap(); // truncated
    assert_eq!(
        PluginEngine::new(Some(&cache)).unwrap().load(path).unwrap().source,
        Source::Rebuilt
    );
    std::fs::remove_file(entry.with_extension("sha256")).unwrap(); // its digest lost
    assert_eq!(
        PluginEngine::new(Some(&cache)).unwrap().load(path).unwrap().source,
        Source::Rebuilt
    );
    assert_eq!(
        PluginEngine::new(Some(&cache)).unwrap().load(path).unwrap().source,
        Source::Cached,
        "and the entry is mapped from the cache again"
    );

    // A directory others can write to is not trusted at all.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m));
    mode(&cache, 0o777).unwrap();
    assert_eq!(
        PluginEngine::new(Some(&cache)).unwrap().load(path).unwrap().source,
        Source::Compiled
    );
    // Nor one under a directory others can write to, also when that happens after start
    // (the review: a parent writable by others let a user swap the cache before a reload).
    mode(&cache, 0o700).unwrap();
    let engine = PluginEngine::new(Some(&cache)).unwrap();
    assert_eq!(engine.load(path).unwrap().source, Source::Cached);
    mode(dir.path(), 0o777).unwrap();
    assert_eq!(engine.load(path).unwrap().source, Source::Compiled, "re-checked at every load");
    mode(dir.path(), 0o700).unwrap();
}

#[test]
fn a_component_importing_anything_else_is_refused_naming_the_import() {
    let engine = PluginEngine::new(None).unwrap();
    let err = engine.load(Path::new(wasm::FIXTURE_FORBIDDEN_IMPORT)).unwrap_err().to_string();
    assert!(
        err.contains(
            "imports gpulet-test:forbidden/raw-network@0.1.0, which gpulet does not grant"
        ),
        "{err}"
    );
}

/// A plugin whose heap only grows (1 MiB a call, as a JavaScript heap whose collector
/// has not run) is given a fresh instance between calls once past `recycle_mib`: no
/// fault, no quarantine, the memory handed back. Without it, the cap stops it.
#[test]
fn a_plugin_past_recycle_mib_gets_a_fresh_instance_without_a_fault() {
    let run = |recycle: &str| {
        let dir = tempfile::tempdir().unwrap();
        let entry = format!("{}memory_mib = 8\n{recycle}", fixture("leak", "[]"));
        let mut h = with_plugin(dir.path(), &entry, "max_failures = 100");
        let mut held = Vec::new();
        let mut faulted = Vec::new();
        for _ in 0..12 {
            let t = tick(&mut h);
            faulted.extend(faults(&t.events));
            held.extend(t.metrics.iter().map(|m| m.value as u32));
        }
        let status = h.agent.status().plugins.remove(0);
        (held, faulted, status.recycled)
    };
    let (held, faulted, recycled) = run("recycle_mib = 4\n");
    assert!(faulted.is_empty(), "{faulted:?}");
    assert!(recycled >= 2, "{recycled} recycles: {held:?}");
    assert!(held.iter().all(|&m| m <= 4), "never past 4 MiB held: {held:?}");
    assert!(held.windows(2).any(|w| w[1] < w[0]), "a fresh instance starts over: {held:?}");

    let (held, faulted, recycled) = run("");
    assert_eq!(recycled, 0);
    assert!(faulted.contains(&"memory"), "without it the cap stops it: {faulted:?} {held:?}");
}

/// A running plugin's code is mapped from the cache; an entry truncated or rewritten in
/// place (an operator's `truncate`, a full disk) must not reach it: a mapped file cut
/// short kills the process that touches it (SIGBUS, which would end this test binary).
#[test]
fn an_entry_truncated_in_place_under_a_running_plugin_does_not_reach_it() {
    let dir = tempfile::tempdir().unwrap();
    drop(with_plugin(dir.path(), &fixture("count", "[]"), "")); // fills the cache
    let mut h = with_plugin(dir.path(), &fixture("count", "[]"), "");
    assert_eq!(tick(&mut h).metrics.len(), 1);
    for entry in std::fs::read_dir(dir.path().join("cache")).unwrap() {
        let entry = entry.unwrap().path();
        std::fs::OpenOptions::new().write(true).open(&entry).unwrap().set_len(0).unwrap();
    }
    for _ in 0..3 {
        let t = tick(&mut h);
        assert!(faults(&t.events).is_empty(), "{:?}", t.events);
        assert_eq!(t.metrics.len(), 1, "{:?}", t.events);
    }
}

/// `host.wall-clock` in the agent: the tick's wall time (its telemetry `ts_ms`) and the
/// node's UTC offset then.
#[test]
fn the_wall_clock_answers_the_snapshots_time() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = with_plugin(dir.path(), &fixture("clock", "[\"lower\"]"), "");
    for _ in 0..2 {
        let t = tick(&mut h);
        let m: Vec<(String, f64)> = t.metrics.iter().map(|m| (m.name.clone(), m.value)).collect();
        let ts = t.snapshot.ts_ms;
        let offset = gpulet::clock::utc_offset_s(ts);
        assert_eq!(m, [("unix_ms".into(), ts as f64), ("utc_offset_s".into(), f64::from(offset))]);
    }
}

#[test]
fn plugin_state_and_metrics_survive_an_agent_restart() {
    let dir = tempfile::tempdir().unwrap();
    let count = |h: &mut Harness| {
        let t = tick(h);
        assert_eq!(t.metrics.len(), 1, "{:?}", t.events);
        (t.metrics[0].name.clone(), t.metrics[0].value)
    };
    let mut h = with_plugin(dir.path(), &fixture("count", "[]"), "");
    for n in 1..=3 {
        assert_eq!(count(&mut h), ("calls".into(), f64::from(n)));
    }
    let records = h.out.records();
    assert_eq!(records.last().unwrap()["metrics"][0]["plugin"], "fx", "metrics are in telemetry");
    drop(h);
    let mut h = with_plugin(dir.path(), &fixture("count", "[]"), "");
    assert_eq!(count(&mut h), ("calls".into(), 4.0), "the key-value store outlived the agent");
}

#[test]
fn power_plugins_get_the_calibrated_curves_and_0_1_0_plugins_still_run() {
    let dir = tempfile::tempdir().unwrap();
    // Calibrate the same node as `with_plugin`'s (same GPUs, same seed: same UUIDs), and
    // keep GPU 0's curve only.
    let node = "[[sim.gpu]]\npreset = \"a100-sxm4\"\nworkload = \"training\"\ncount = 2\n";
    let config = gpulet::config::Config::parse(node).unwrap();
    let settings = gpulet::calibrate::Settings { steps: 4, ..Default::default() };
    let mut c = gpulet::calibrate::simulated(&config.sim, dir.path(), settings, 0).unwrap();
    c.gpus.truncate(1);
    c.save(&dir.path().join("cal.json")).unwrap();

    let mut h =
        with_plugin(dir.path(), &fixture("curve", "[]"), "[calibration]\nfile = \"cal.json\"");
    let t = tick(&mut h);
    let got: Vec<(String, f64, Option<u32>)> =
        t.metrics.iter().map(|m| (m.name.clone(), m.value, m.gpu)).collect();
    let lowest = c.gpus[0].points[3].relative;
    assert!(lowest > 0.3 && lowest < 0.9, "{lowest}");
    assert_eq!(
        got,
        [("curve.points".into(), 4.0, Some(0)), ("curve.relative_min".into(), lowest, Some(0))]
    );

    // A plugin built against wit/v0.1.0 links to this 0.1.2 host and runs unchanged.
    let old = format!(
        "[[plugin]]\nname = \"old\"\npath = {:?}\ngrants = [\"lower\"]\n",
        wasm::FIXTURE_V010
    );
    let mut h = with_plugin(dir.path(), &old, "");
    let t = tick(&mut h);
    assert!(
        t.events.iter().all(|e| !matches!(e, Event::PluginLoadFailed { .. })),
        "{:?}",
        t.events
    );
    assert_eq!(t.metrics.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), ["v010.calls"]);
    let lowered = t
        .events
        .iter()
        .filter(|e| matches!(e, Event::LimitChanged { to_w, .. } if *to_w == 100.0))
        .count();
    assert_eq!(lowered, 2, "{:?}", t.events);
}
