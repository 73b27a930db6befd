//! The docs against the code: every key the agent emits is documented.

use std::collections::BTreeSet;

use gpulet::gpu::Health;
use gpulet::telemetry::Event;
use serde_json::Value;

use crate::repo;

fn keys(v: &Value, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                out.insert(k.clone());
                keys(v, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|v| keys(v, out)),
        _ => {}
    }
}

#[test]
fn every_telemetry_key_and_event_kind_is_in_docs_telemetry_md() {
    let doc = std::fs::read_to_string(repo().join("docs/telemetry.md")).unwrap();
    // A record with a failing field (`errors`) and a plugin's metric (`metrics`).
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "[power]\nbudget_w = 1000\n[plugins]\ncache_dir = \"c\"\nstate_dir = \"s\"\n[[sim.fault]]\nat = \"0s\"\ngpu = 0\nkind = \"field\"\nfield = \"temp_c\"\n[[plugin]]\nname = \"fx\"\npath = {:?}\nconfig = {{ mode = \"count\" }}\n",
        gpulet_plugin_artifacts::FIXTURE
    );
    let mut h = crate::harness_in(&toml, dir.path());
    h.agent.tick();
    let mut found = BTreeSet::new();
    for r in h.out.records() {
        keys(&r, &mut found);
    }
    let u = || "GPU-x".to_owned();
    let events = [
        Event::xid(0, "GPU-x", 79, 1),
        Event::Health { gpu: 0, uuid: u(), from: Health::Ok, to: Health::Lost },
        Event::LimitChanged {
            gpu: 0,
            uuid: u(),
            from_w: None,
            to_w: 1.0,
            source: u(),
            reason: u(),
        },
        Event::LimitFailed { gpu: 0, uuid: u(), to_w: 1.0, error: u() },
        Event::LimitDrift { gpu: 0, uuid: u(), expected_w: 1.0, found_w: 2.0 },
        Event::DecisionRejected { source: u(), gpu: 0, reason: u() },
        Event::BudgetInfeasible { budget_w: 1.0, min_total_w: 2.0 },
        Event::PluginLoaded { plugin: u(), version: u(), path: u(), compiled: true, load_ms: 1.0 },
        Event::PluginLoadFailed { plugin: u(), error: u(), kept_previous: false },
        Event::PluginFault { plugin: u(), fault: "trap", message: u() },
        Event::PluginQuarantined { plugin: u(), failures: 3, window_s: 60, fallback: "hold" },
        Event::ReloadFailed { error: u() },
        Event::StateSetAside { path: u(), error: u(), moved_to: u() },
    ];
    for e in &events {
        let v = serde_json::to_value(e).unwrap();
        keys(&v, &mut found);
        found.insert(v["kind"].as_str().unwrap().to_owned());
    }
    let missing: Vec<_> = found.iter().filter(|k| !doc.contains(&format!("`{k}`"))).collect();
    assert!(missing.is_empty(), "docs/telemetry.md does not document: {missing:?}");
    assert!(
        found.contains("errors")
            && found.contains("metrics")
            && found.contains("budget-infeasible")
    );
}
