//! The docs against the code: every key the agent emits is documented.

use std::collections::BTreeSet;

use gpulet::gpu::Health;
use gpulet::telemetry::Event;
use serde_json::Value;

use crate::{harness, repo};

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
    // A record with a failing field, so that `errors` is there too.
    let mut h = harness(
        "[power]\nbudget_w = 1000\n[[sim.fault]]\nat = \"0s\"\ngpu = 0\nkind = \"field\"\nfield = \"temp_c\"\n",
    );
    h.agent.tick();
    let mut found = BTreeSet::new();
    for r in h.out.records() {
        keys(&r, &mut found);
    }
    let u = || "GPU-x".to_owned();
    let events = [
        Event::xid(0, "GPU-x", 79),
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
        Event::DecisionRejected { source: u(), gpu: 0, reason: u() },
        Event::BudgetInfeasible { budget_w: 1.0, min_total_w: 2.0 },
    ];
    for e in &events {
        let v = serde_json::to_value(e).unwrap();
        keys(&v, &mut found);
        found.insert(v["kind"].as_str().unwrap().to_owned());
    }
    let missing: Vec<_> = found.iter().filter(|k| !doc.contains(&format!("`{k}`"))).collect();
    assert!(missing.is_empty(), "docs/telemetry.md does not document: {missing:?}");
    assert!(found.contains("errors") && found.contains("budget-infeasible"));
}
