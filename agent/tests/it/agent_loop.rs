//! The whole agent, in-process, against the simulator.

use std::future::Future;
use std::time::Duration;

use gpulet::agent::Pacing;
use gpulet::demo::DEMO_CONFIG;
use gpulet::telemetry::{Event, SCHEMA};
use serde_json::Value;

use crate::harness;

fn block_on<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
}

fn run_ticks(h: &mut crate::Harness, n: u64) {
    let pacing = Pacing::Virtual { clock: h.clock.clone(), speed: None };
    let done = block_on(h.agent.run(Some(n), pacing, std::future::pending()));
    assert_eq!(done, n);
}

fn gpus(r: &Value) -> &Vec<Value> {
    r["gpus"].as_array().unwrap()
}

#[test]
fn telemetry_is_contiguous_and_energy_only_grows() {
    let mut h = harness(DEMO_CONFIG);
    run_ticks(&mut h, 300);
    let records = h.out.records();
    assert_eq!(records.len(), 300);
    let mut last_energy = [-1.0; 8];
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r["schema"], SCHEMA);
        assert_eq!(r["node"], "demo-node");
        assert_eq!(r["seq"], i as u64, "seq is contiguous from 0");
        assert_eq!(
            r["ts_ms"],
            1_800_000_000_000u64 + 1000 * i as u64,
            "one tick per simulated second"
        );
        assert_eq!(gpus(r).len(), 8);
        for g in gpus(r) {
            let idx = g["index"].as_u64().unwrap() as usize;
            let e = g["energy_j"].as_f64().unwrap();
            assert!(
                e >= last_energy[idx],
                "record {i}, GPU {idx}: energy fell from {} to {e}",
                last_energy[idx]
            );
            last_energy[idx] = e;
        }
    }
    // 300 s of an 8-GPU node at a few hundred watts each.
    let total: f64 = last_energy.iter().sum();
    assert!(total > 300.0 * 8.0 * 70.0 && total < 300.0 * 4000.0, "{total} J");
}

#[test]
fn the_node_budget_holds_on_every_tick_once_applied() {
    let mut h = harness(DEMO_CONFIG);
    run_ticks(&mut h, 400);
    let records = h.out.records();
    let first = &records[0];
    let changes = first["events"].as_array().unwrap();
    assert_eq!(changes.len(), 8, "the first tick brings every GPU under the budget");
    assert!(changes.iter().all(|e| e["kind"] == "limit-changed" && e["source"] == "guard"));
    for r in &records[1..] {
        let limits: f64 = gpus(r).iter().map(|g| g["power_limit_w"].as_f64().unwrap()).sum();
        assert!(limits <= 4000.0 + 1e-6, "seq {}: limits add up to {limits} W", r["seq"]);
        let power = r["power_w"].as_f64().unwrap();
        assert!(power <= 4000.0, "seq {}: node draws {power} W", r["seq"]);
    }
    // The trace GPUs do real work and are capped by the equal split.
    let capped = records
        .iter()
        .flat_map(gpus)
        .filter(|g| g["throttle"].as_array().unwrap().iter().any(|t| t == "sw_power_cap"));
    assert!(capped.count() > 100);
}

#[test]
fn a_failing_gpu_or_field_leaves_the_rest_of_the_node_reporting() {
    let mut h = harness(
        r#"
        tick = "1s"
        [sim]
        [[sim.gpu]]
        preset = "a100-sxm4"
        workload = "training"
        count = 4
        [[sim.fault]]
        at = "3500ms"
        gpu = 1
        kind = "field"
        field = "temp_c"
        [[sim.fault]]
        at = "5500ms"
        gpu = 2
        kind = "lost"
        "#,
    );
    run_ticks(&mut h, 10);
    let records = h.out.records();
    let at = |seq: usize, gpu: usize| &gpus(&records[seq])[gpu];
    // Before the faults, everything reads.
    assert!(at(3, 1)["temp_c"].is_f64() && at(3, 2)["power_w"].is_f64());
    // GPU 1's temperature fails alone.
    assert!(at(4, 1)["temp_c"].is_null());
    assert!(at(4, 1)["errors"]["temp_c"].as_str().unwrap().contains("reading temp_c failed"));
    assert!(at(4, 1)["power_w"].is_f64());
    assert_eq!(at(4, 1)["health"], "ok");
    // GPU 2 falls off the bus: lost, every field null, each with the reason.
    assert_eq!(at(6, 2)["health"], "lost");
    for f in ["power_w", "energy_j", "temp_c", "power_limit_w", "sm_clock_mhz"] {
        assert!(at(6, 2)[f].is_null(), "{f}");
        assert!(at(6, 2)["errors"][f].as_str().unwrap().contains("not answering"), "{f}");
    }
    // The others go on as before.
    for seq in 6..10 {
        for gpu in [0, 3] {
            assert!(at(seq, gpu)["errors"].is_null(), "seq {seq}, GPU {gpu}");
            assert!(at(seq, gpu)["power_w"].as_f64().unwrap() > 50.0);
        }
    }
    // The transition and the XID are reported once, in the tick they happened.
    let kinds: Vec<(u64, String)> =
        records
            .iter()
            .flat_map(|r| {
                r["events"].as_array().into_iter().flatten().map(move |e| {
                    (r["seq"].as_u64().unwrap(), e["kind"].as_str().unwrap().to_owned())
                })
            })
            .collect();
    assert_eq!(kinds, vec![(6, "xid".to_owned()), (6, "health".to_owned())]);
    let xid = &records[6]["events"][0];
    assert_eq!(
        (
            xid["gpu"].as_u64(),
            xid["code"].as_u64(),
            xid["severity"].as_str(),
            xid["count"].as_u64()
        ),
        (Some(2), Some(79), Some("critical"), Some(1))
    );
}

#[test]
fn a_critical_xid_degrades_until_cleared_and_repeats_are_debounced() {
    use gpulet::agent::Request;
    use gpulet::gpu::sim::Fault;
    let mut h = harness("[health]\nxid_debounce = \"5s\"\n");
    let tick = |h: &mut crate::Harness| {
        h.clock.advance(Duration::from_secs(1));
        h.agent.tick()
    };
    h.agent.tick();
    h.sim.lock().inject(1, Fault::Xid(48));
    let t = tick(&mut h);
    assert!(
        matches!(
            t.events[..],
            [
                Event::Xid { gpu: 1, code: 48, count: 1, .. },
                Event::Health { gpu: 1, to: gpulet::gpu::Health::Degraded, .. }
            ]
        ),
        "{:?}",
        t.events
    );
    // The same XID again within the window: counted, not reported; after it: reported.
    h.sim.lock().inject(1, Fault::Xid(48));
    assert!(tick(&mut h).events.is_empty());
    for _ in 0..5 {
        tick(&mut h);
    }
    h.sim.lock().inject(1, Fault::Xid(48));
    let t = tick(&mut h);
    assert!(
        matches!(t.events[..], [Event::Xid { gpu: 1, code: 48, count: 3, .. }]),
        "{:?}",
        t.events
    );
    // Degraded is sticky until someone clears it.
    assert_eq!(t.snapshot.samples[1].health, gpulet::gpu::Health::Degraded);
    assert!(h.agent.execute(Request::ClearHealth { gpu: 9 }).is_err());
    h.agent.execute(Request::ClearHealth { gpu: 1 }).unwrap();
    let t = tick(&mut h);
    assert!(
        matches!(t.events[..], [Event::Health { gpu: 1, to: gpulet::gpu::Health::Ok, .. }]),
        "{:?}",
        t.events
    );
}

#[test]
fn a_limit_changed_behind_the_agents_back_is_put_back_and_audited() {
    let mut h = harness(
        r#"
        [power]
        limit_w = 300
        [sim]
        [[sim.gpu]]
        preset = "a100-sxm4"
        workload = "training"
        count = 2
        "#,
    );
    let t = h.agent.tick();
    assert_eq!(t.events.len(), 2);
    h.sim.lock().set_power_limit(1, 400.0).unwrap(); // someone ran `nvidia-smi -pl 400`
    h.clock.advance(Duration::from_secs(1));
    let t = h.agent.tick();
    assert_eq!(
        t.snapshot.samples[1].power_limit_w.value(),
        Some(400.0),
        "the snapshot shows what was enforced"
    );
    match &t.events[..] {
        [
            Event::LimitDrift { gpu: 1, expected_w: 300.0, found_w: 400.0, .. },
            Event::LimitChanged {
                gpu: 1, from_w: Some(400.0), to_w: 300.0, source, reason, ..
            },
        ] => {
            assert_eq!(source, "static");
            assert!(reason.contains("power.limit_w = 300 W"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    h.clock.advance(Duration::from_secs(1));
    assert!(h.agent.tick().events.is_empty(), "nothing to do once it holds");
}

#[test]
fn the_loop_stops_on_shutdown_and_paces_by_speed() {
    let mut h = harness(DEMO_CONFIG);
    // 1 s ticks at 50× speed: 20 ms of wall time per tick; stop after ~100 ms.
    let pacing = Pacing::Virtual { clock: h.clock.clone(), speed: Some(50.0) };
    let done = block_on(
        h.agent.run(None, pacing, async { tokio::time::sleep(Duration::from_millis(100)).await }),
    );
    assert!((1..=8).contains(&done), "{done} ticks in 100 ms at 20 ms a tick");
    assert_eq!(h.out.records().len() as u64, done, "every tick that ran was emitted whole");
}

#[test]
fn inventory_describes_every_gpu() {
    let h = harness(DEMO_CONFIG);
    let inv = h.agent.inventory();
    assert_eq!(inv.len(), 8);
    let mut uuids: Vec<_> = inv.iter().map(|g| g.uuid.as_str()).collect();
    uuids.sort();
    uuids.dedup();
    assert_eq!(uuids.len(), 8);
    assert!(
        inv.iter().all(|g| g.name.contains("H100")
            && g.power_limit.max_w == 700.0
            && g.can_set_power_limit)
    );
}
