//! Reporter plugins in `gpulet run` (its process, runtime and threads), against a real
//! Mosquitto: what a reporter returns reaches the telemetry record, `events/plugin` and
//! `/metrics`, tagged with its name; what breaks the host's bounds is refused, counted
//! and reported once; a reporter that faults (a trap, a loop, a memory bomb, too much
//! output) is quarantined and costs nothing else, and one that does not load stays off.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};

use crate::broker::{Broker, Collector};
use crate::socket::{Agent, http_get};

fn reporter(name: &str, mode: &str) -> String {
    format!(
        "[[reporter]]\nname = {name:?}\npath = {:?}\nconfig = {{ mode = {mode:?} }}\n",
        gpulet_plugin_artifacts::FIXTURE_REPORTER
    )
}

#[test]
fn reporters_reach_mqtt_and_metrics_and_a_misbehaving_one_is_contained() {
    let broker = Broker::start();
    let mut c = Collector::start(broker.port, "gpulet/v1/#");
    let mut extra = format!(
        "[mqtt]\nurl = \"{}\"\nstate_dir = \"mqtt\"\n[plugins]\ncache_dir = \"c\"\nstate_dir = \"s\"\nmax_failures = 3\n\
         [[reporter]]\nname = \"anomaly\"\npath = {:?}\n",
        broker.url(),
        gpulet_plugin_artifacts::ANOMALY
    );
    for (name, mode) in
        [("fine", "fine"), ("bad", "bad"), ("flood", "flood"), ("trap", "trap"), ("huge", "huge")]
    {
        extra += &reporter(name, mode);
    }
    extra += &format!("{}deadline = \"20ms\"\n", reporter("loop", "loop"));
    // (The deadline is generous so that the cap, not the clock, stops it on a busy machine.)
    extra += &format!("{}memory_mib = 16\ndeadline = \"500ms\"\n", reporter("alloc", "alloc"));
    // A reporter that is not a component: refused at load, the agent runs without it.
    let junk = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(junk.path(), b"not a component").unwrap();
    extra += &format!("[[reporter]]\nname = \"junk\"\npath = {:?}\n", junk.path());
    let a = Agent::start_ticking("100ms", &extra, true);
    c.wait(Duration::from_secs(20), "30 records", |g| {
        g.iter().filter(|m| m.topic.ends_with("/telemetry")).count() >= 30
    });
    let status = a.request(&json!({"op": "status"})).unwrap()["status"].clone();
    let (_, scrape) = http_get(a.metrics.unwrap(), None);
    let err = a.stop();

    let records = c.on("/telemetry");
    // `fine`: its metrics in the record, tagged, from the same snapshot as the record.
    let r = records.iter().rev().find(|r| r["metrics"].is_array()).unwrap();
    let metrics = r["metrics"].as_array().unwrap();
    let power = metrics
        .iter()
        .find(|m| m["plugin"] == "fine" && m["name"] == "fixture.power_w" && m["gpu"] == 0)
        .unwrap_or_else(|| panic!("{metrics:?}"));
    let read = r["gpus"][0]["power_w"].as_f64().unwrap();
    assert!((power["value"].as_f64().unwrap() - read).abs() < 0.01, "{power} vs {read}");
    // `flood`: 1,100 items a tick, at most 64 kept.
    for r in &records {
        let kept = r["metrics"]
            .as_array()
            .map_or(0, |m| m.iter().filter(|m| m["plugin"] == "flood").count());
        assert!(kept <= 64, "{kept} flood metrics in one record");
    }
    // `bad`: only its valid metric.
    let bad: Vec<&Value> = records
        .iter()
        .flat_map(|r| r["metrics"].as_array().into_iter().flatten())
        .filter(|m| m["plugin"] == "bad")
        .collect();
    assert!(!bad.is_empty() && bad.iter().all(|m| m["name"] == "fixture.ok"), "{bad:?}");

    // Events: `fine`'s, rate-limited (one a tick asked for, a burst of 10 given, then one
    // every 6 s), with the GPU's UUID.
    let events = c.on("/events/plugin");
    let fine: Vec<&Value> = events.iter().filter(|e| e["plugin"] == "fine").collect();
    assert!(fine.len() >= 10 && fine.len() <= 12, "{} events from fine", fine.len());
    assert_eq!(fine[0]["report"], "tick");
    assert!(fine[0]["uuid"].as_str().unwrap().starts_with("GPU-"), "{}", fine[0]);
    assert!(
        events
            .iter()
            .all(|e| e["plugin"] == "fine" || e["plugin"] == "flood" || e["plugin"] == "anomaly"),
        "{events:?}"
    );

    // Each refusal reported once per plugin and reason, however many ticks repeat it.
    let mut refused: BTreeMap<(String, String), usize> = BTreeMap::new();
    for e in c.on("/events/plugin-output-refused") {
        let key = (e["plugin"].as_str().unwrap().into(), e["reason"].as_str().unwrap().into());
        *refused.entry(key).or_default() += 1;
    }
    let expected: BTreeMap<(String, String), usize> = [
        ("bad", "event-kind"),
        ("bad", "metric-name"),
        ("bad", "no-such-gpu"),
        ("bad", "not-finite"),
        ("fine", "event-rate"),
        ("flood", "too-many-items"),
    ]
    .into_iter()
    .map(|(p, r)| ((p.into(), r.into()), 1))
    .collect();
    assert_eq!(refused, expected);

    // `trap`, `huge`, `loop` and `alloc` fault, are quarantined after 3 faults, and
    // nothing else notices.
    let faults = c.on("/events/plugin-fault");
    for (name, fault) in
        [("trap", "trap"), ("huge", "output"), ("loop", "timeout"), ("alloc", "memory")]
    {
        let mine: Vec<&Value> = faults.iter().filter(|f| f["plugin"] == name).collect();
        assert_eq!(mine.len(), 3, "{name}: {mine:?}");
        assert!(mine.iter().all(|f| f["fault"] == fault), "{mine:?}");
        let q = c.on("/events/plugin-quarantined");
        assert_eq!(q.iter().filter(|q| q["plugin"] == name).count(), 1, "{q:?}");
    }
    assert!(records.len() >= 30, "the agent ticked on");
    // A reporter has no path to a limit.
    let limits = c.on("/events/limit-changed");
    let reporters = ["anomaly", "fine", "bad", "flood", "trap", "huge", "loop", "alloc"];
    assert!(!limits.is_empty(), "the budget's limits were set");
    assert!(
        limits.iter().all(|l| !reporters.contains(&l["source"].as_str().unwrap())),
        "{limits:?}"
    );

    // `gpulet status`: reporters listed after the power plugins, with their counts.
    let plugins = status["plugins"].as_array().unwrap();
    let by_name = |n: &str| plugins.iter().find(|p| p["name"] == n).unwrap().clone();
    assert_eq!(by_name("fine")["kind"], "reporter");
    assert_eq!(by_name("fine")["running"], true);
    assert_eq!(by_name("trap")["quarantined"], true);
    assert!(by_name("bad")["refused"].as_u64().unwrap() >= 4, "{}", by_name("bad"));
    assert_eq!(by_name("anomaly")["running"], true, "{}", by_name("anomaly"));
    let junk = by_name("junk");
    assert_eq!(junk["running"], false, "{junk}");
    assert!(junk["error"].as_str().is_some_and(|e| !e.is_empty()), "{junk}");
    let failed = c.on("/events/plugin-load-failed");
    assert!(failed.iter().any(|f| f["plugin"] == "junk"), "{failed:?}");
    // `/metrics`: the last tick's plugin metrics and the refusals.
    assert!(
        scrape.contains("gpulet_plugin_metric{plugin=\"fine\",name=\"fixture.ticks\"}"),
        "{scrape}"
    );
    assert!(scrape.contains("gpulet_plugin_refused_total{plugin=\"bad\"}"), "{scrape}");
    assert!(err.contains("reporter output refused"), "{err}");
}
