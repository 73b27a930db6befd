//! The payload schemas in `docs/schema/` against what the agent really publishes: a node
//! on the simulator with the shipped plugins and a budget, against a real Mosquitto,
//! takes commands (one that succeeds, one rejected); every message it publishes must
//! validate against its topic's schema, and so must the examples in the docs.

use std::time::Duration;

use jsonschema::{Resource, Validator};
use serde_json::{Value, json};

use crate::broker::{AgentThread, Broker, Collector, node_config};
use crate::repo;

const BASE: &str = "https://example.invalid/gpulet/schema/";

fn load(name: &str) -> Value {
    let path = repo().join("docs/schema").join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The validator for one schema, with the others resolvable by their `$id`.
fn validator(name: &str) -> Validator {
    let mut o = jsonschema::options();
    for other in ["event.schema.json", "telemetry.schema.json"] {
        o = o.with_resource(format!("{BASE}{other}"), Resource::from_contents(load(other)));
    }
    o.build(&load(name)).unwrap_or_else(|e| panic!("{name} is not a valid schema: {e}"))
}

/// Which schema a topic's payload follows.
fn schema_of(topic: &str) -> Option<&'static str> {
    let rest = topic.strip_prefix("gpulet/v1/")?;
    if rest.starts_with("_replies/") || rest.contains("/cmd-result/") {
        return Some("cmd-result.schema.json");
    }
    let (_, what) = rest.split_once('/')?;
    Some(match what {
        "status" => "status.schema.json",
        "birth" => "birth.schema.json",
        "telemetry" => "telemetry.schema.json",
        w if w.starts_with("events/") => "event.schema.json",
        _ => return None,
    })
}

fn check(v: &Validator, what: &str, payload: &Value) {
    let errors: Vec<String> =
        v.iter_errors(payload).map(|e| format!("{} at {}", e, e.instance_path())).collect();
    assert!(errors.is_empty(), "{what} does not follow its schema: {errors:#?}\n{payload}");
}

#[test]
fn every_published_payload_and_every_example_follows_its_schema() {
    let broker = Broker::start();
    let mut c = Collector::start(broker.port, "gpulet/v1/#");
    let dir = tempfile::tempdir().unwrap();
    let plugins = gpulet_plugin_artifacts::POWER_BUDGET;
    let reporter = gpulet_plugin_artifacts::FIXTURE_REPORTER;
    let extra = format!(
        "[power]\nbudget_w = 400\n[[plugin]]\nname = \"budget\"\npath = {plugins:?}\ngrants = [\"lower\", \"raise\"]\n[[reporter]]\nname = \"fine\"\npath = {reporter:?}\nconfig = {{ mode = \"fine\" }}\n[[reporter]]\nname = \"bad\"\npath = {reporter:?}\nconfig = {{ mode = \"bad\" }}\n[mqtt.commands]\nrequire_signed = false\n[jobs]\nenabled = true\ndir = \"jobs\"\nallow_root = true\nfleet_submit = \"unsigned\"\n"
    );
    let agent = AgentThread::start(dir.path(), &node_config(&broker.url(), &extra));
    c.wait(Duration::from_secs(15), "online and birth", |g| {
        g.iter().any(|m| m.topic.ends_with("/birth"))
            && g.iter().filter(|m| m.topic.ends_with("/telemetry")).count() >= 5
    });
    let client = c.client.clone();
    for (name, body) in [
        ("ping", json!({"id": "s-1"})),
        ("set-power-limit", json!({"id": "s-2", "gpu": 7, "watts": 100})),
        (
            "submit-job",
            json!({"id": "s-3", "user": "root", "command": ["true"], "cwd": "/", "name": "schema"}),
        ),
    ] {
        client
            .publish(
                format!("gpulet/v1/n1/cmd/{name}"),
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                false,
                body.to_string(),
            )
            .unwrap();
    }
    c.wait(Duration::from_secs(15), "the job's end", |g| {
        g.iter().any(|m| m.topic.ends_with("/events/job") && m.text().contains("\"finished\""))
    });
    c.wait(Duration::from_secs(15), "both commands' results", |g| {
        g.iter()
            .filter(|m| m.topic.contains("/cmd-result/") && m.text().contains("\"succeeded\""))
            .count()
            >= 1
            && g.iter()
                .any(|m| m.topic.contains("/cmd-result/") && m.text().contains("\"rejected\""))
    });
    agent.stop();
    c.wait(Duration::from_secs(15), "offline", |g| {
        g.iter().any(|m| m.text().contains("\"offline\""))
    });

    let mut seen = std::collections::BTreeMap::<&str, usize>::new();
    for m in &c.got {
        if m.payload.is_empty() {
            continue;
        }
        let Some(name) = schema_of(&m.topic) else { continue };
        check(&validator(name), &m.topic, &m.json());
        *seen.entry(name).or_default() += 1;
    }
    for name in [
        "status.schema.json",
        "birth.schema.json",
        "telemetry.schema.json",
        "event.schema.json",
        "cmd-result.schema.json",
    ] {
        assert!(
            seen.get(name).copied().unwrap_or(0) > 0,
            "no message checked against {name}: {seen:?}"
        );
    }
    // The events seen include a plugin's and the guard's.
    let kinds: Vec<String> =
        c.got.iter().filter_map(|m| m.topic.split("/events/").nth(1).map(str::to_owned)).collect();
    assert!(
        kinds.iter().any(|k| k == "plugin-loaded")
            && kinds.iter().any(|k| k == "limit-changed")
            && kinds.iter().any(|k| k == "job")
            && kinds.iter().any(|k| k == "plugin")
            && kinds.iter().any(|k| k == "plugin-output-refused"),
        "{kinds:?}"
    );

    // The examples in the docs.
    let examples = repo().join("docs/schema/examples");
    let mut n = 0;
    for entry in std::fs::read_dir(&examples).unwrap() {
        let path = entry.unwrap().path();
        let file = path.file_name().unwrap().to_str().unwrap().to_owned();
        let schema = format!("{}.schema.json", file.split('.').next().unwrap());
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        check(&validator(&schema), &file, &v);
        n += 1;
    }
    assert!(n >= 5, "an example per schema");
}

/// The field names a consumer config reads must be in the telemetry schema: Telegraf
/// cannot be installed here, so its config (examples/telegraf.conf, TOML) is checked
/// against the schema's names, and so are the fields the Node-RED flow's function reads.
#[test]
fn the_telegraf_and_node_red_examples_read_fields_the_schema_has() {
    let schema = load("telemetry.schema.json");
    let record: Vec<String> = schema["properties"].as_object().unwrap().keys().cloned().collect();
    let gpu: Vec<String> =
        schema["$defs"]["gpu"]["properties"].as_object().unwrap().keys().cloned().collect();
    let conf: toml::Table =
        std::fs::read_to_string(repo().join("examples/telegraf.conf")).unwrap().parse().unwrap();
    let consumer = &conf["inputs"]["mqtt_consumer"][0];
    assert!(consumer["topics"][0].as_str().unwrap().ends_with("gpulet/v1/+/telemetry"));
    let mut checked = 0;
    for j in consumer["json_v2"].as_array().unwrap() {
        assert!(record.contains(&j["timestamp_path"].as_str().unwrap().to_owned()));
        for kind in ["tag", "field"] {
            for f in j.get(kind).and_then(|v| v.as_array()).into_iter().flatten() {
                let path = f["path"].as_str().unwrap();
                assert!(
                    record.iter().any(|k| k == path),
                    "telegraf.conf reads {path:?}, not in the record"
                );
                checked += 1;
            }
        }
        for o in j.get("object").and_then(|v| v.as_array()).into_iter().flatten() {
            assert_eq!(o["path"].as_str(), Some("gpus"));
            for k in
                o["tags"].as_array().unwrap().iter().chain(o["included_keys"].as_array().unwrap())
            {
                let k = k.as_str().unwrap();
                assert!(
                    gpu.iter().any(|g| g == k),
                    "telegraf.conf reads gpus[].{k}, not in the schema"
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 15, "{checked}");

    let flow: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("examples/node-red-flow.json")).unwrap(),
    )
    .unwrap();
    let func = flow.as_array().unwrap().iter().find(|n| n["type"] == "function").unwrap();
    let code = func["func"].as_str().unwrap();
    let mut n = 0;
    for (prefix, names) in [("r.", &record), ("g.", &gpu)] {
        for (i, _) in code.match_indices(prefix) {
            // `g.` in `msg.` is not a GPU's field.
            if code[..i].chars().last().is_some_and(|c| c.is_alphanumeric()) {
                continue;
            }
            let name: String =
                code[i + 2..].chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            assert!(
                names.contains(&name),
                "the Node-RED flow reads {prefix}{name}, not in the schema"
            );
            n += 1;
        }
    }
    assert!(n >= 8, "{n}");
}
