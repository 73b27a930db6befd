//! The fleet-side consumer example (`examples/consumer/consumer.py`) against a real
//! Mosquitto and a node run as `gpulet run` runs it: it follows the node's power against
//! its budget, sees it go online and offline, and its signed command is carried out.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::broker::{AgentThread, Broker, Collector, node_config};
use crate::repo;

/// The Python with the example's requirements: `target/py`, which `.ci/test` makes.
fn python() -> std::path::PathBuf {
    let py = repo().join("target/py/bin/python");
    assert!(
        py.exists(),
        "\n*** {} is missing: make it as .ci/test does: python3 -m venv target/py && target/py/bin/pip install -r examples/consumer/requirements.txt ***\n",
        py.display()
    );
    py
}

#[test]
fn the_consumer_example_follows_a_node_and_its_signed_command_is_carried_out() {
    let python = python();
    let broker = Broker::start();
    let mut c = Collector::start(broker.port, "gpulet/v1/#");
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_gpulet"))
        .args(["keygen", dir.path().join("ops").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let extra = "[power]\nbudget_w = 400\n[mqtt.commands]\nrequire_signed = true\npublic_key_files = [\"ops.pub\"]\n";
    let agent = AgentThread::start(dir.path(), &node_config(&broker.url(), extra));
    c.wait(Duration::from_secs(15), "online", |g| {
        g.iter().any(|m| m.topic.ends_with("/status") && m.text().contains("online"))
    });
    let consumer = Command::new(python)
        .arg(repo().join("examples/consumer/consumer.py"))
        .args([
            "--broker",
            &broker.url(),
            "--node",
            "n1",
            "--set-budget",
            "350",
            "--json",
            "--seconds",
            "6",
        ])
        .arg("--key")
        .arg(dir.path().join("ops.key"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The budget it set shows in the node's telemetry; then the node stops.
    c.wait(Duration::from_secs(15), "the new budget", |g| {
        g.iter().any(|m| m.topic.ends_with("/telemetry") && m.json()["budget_w"] == 350.0)
    });
    std::thread::sleep(Duration::from_millis(500));
    agent.stop();
    let out = consumer.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let find = |f: &dyn Fn(&Value) -> bool| lines.iter().position(f);
    let online = find(&|l| l["state"] == "online").expect("online (retained status)");
    // Results: `accepted` on arrival, then `succeeded` once the tick carried it out.
    let result = find(&|l| l["command"] == "set-power-budget" && l["status"] == "succeeded")
        .unwrap_or_else(|| panic!("the command's result: {lines:?}"));
    let after = find(&|l| l["budget_w"] == 350.0).expect("telemetry under the new budget");
    assert!(lines[after]["power_w"].as_f64().unwrap() <= 350.0 * 1.05, "{}", lines[after]);
    let offline = find(&|l| l["state"] == "offline").expect("offline at the clean stop");
    assert!(online < result && result < offline, "{lines:?}");
}
