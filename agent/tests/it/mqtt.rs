//! The agent against a real Mosquitto: the topic contract, nothing lost across broker
//! and agent crashes, the outbox bound, commands (good, malformed, signed) and TLS/ACLs.

use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use gpulet::mqtt::command::{self, keygen, signing_key};
use gpulet::mqtt::send::{SendOptions, send};
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use serde_json::{Value, json};

use crate::broker::{AgentThread, Broker, Collector, contiguous_seqs, node_config};

const T: Duration = Duration::from_secs(15);

/// A command to node `n1` through `broker`, unsigned; its results.
pub fn cmd(broker: &Broker, name: &str, args: Value) -> Vec<Value> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(send(SendOptions {
        url: broker.url(),
        root: "gpulet/v1".into(),
        node: "n1".into(),
        command: name.into(),
        args: args.as_object().unwrap().clone(),
        key: None,
        timeout: Duration::from_secs(10),
        tls: None,
        credentials: None,
        retain: false,
    }))
    .unwrap()
}

#[test]
fn telemetry_and_events_arrive_in_order_status_and_birth_are_retained() {
    let broker = Broker::start();
    let mut c = Collector::start(broker.port, "gpulet/v1/#");
    let dir = tempfile::tempdir().unwrap();
    let agent =
        AgentThread::start(dir.path(), &node_config(&broker.url(), "[power]\nbudget_w = 400\n"));
    c.wait(T, "20 telemetry records", |g| {
        g.iter().filter(|m| m.topic.ends_with("/telemetry")).count() >= 20
    });
    agent.stop();
    c.wait(T, "offline", |g| {
        g.iter().any(|m| m.topic.ends_with("/status") && m.text().contains("offline"))
    });

    // Contiguous, each with inc and seq; in order, but for what was written before the
    // first connection: replayed after live data, marked historical.
    let stream = crate::broker::streamed(&c.got);
    let live: Vec<u64> = stream
        .iter()
        .filter(|m| !m.text().starts_with("{\"historical\":true"))
        .map(|m| m.json()["seq"].as_u64().unwrap())
        .collect();
    assert!(live.windows(2).all(|w| w[1] == w[0] + 1), "live data in order: {live:?}");
    assert!(stream.iter().all(|m| m.json()["inc"] == 1));
    contiguous_seqs(&c.got);
    assert!(c.got.iter().any(|m| m.topic == "gpulet/v1/n1/events/limit-changed"));
    let t = c.on("/telemetry").pop().unwrap();
    assert_eq!(
        (t["schema"].as_str(), t["node"].as_str()),
        (Some("gpulet.telemetry.v1"), Some("n1"))
    );
    assert!(t["mqtt"]["connected"].as_bool().unwrap() && t["tick"].is_u64());
    assert!(
        !c.got.iter().any(|m| m.retain && m.topic.contains("/telemetry")),
        "telemetry is not retained"
    );

    // The last status (offline) and the birth are retained: a late consumer gets them.
    let mut late = Collector::start(broker.port, "gpulet/v1/+/+");
    late.wait(T, "retained status and birth", |g| g.len() >= 2);
    let status = late.on("/status").pop().unwrap();
    assert_eq!((status["state"].as_str(), status["inc"].as_u64()), (Some("offline"), Some(1)));
    assert!(late.got.iter().all(|m| m.retain));
    let birth = late.on("/birth").pop().unwrap();
    assert_eq!(birth["gpus"].as_array().unwrap().len(), 2);
    assert_eq!(
        (birth["inc"].as_u64(), birth["schema"].as_str()),
        (Some(1), Some("gpulet.telemetry.v1"))
    );
    assert!(birth["gpus"][0]["bounds_w"]["max"].as_f64().unwrap() > 0.0);
}

#[test]
fn a_broker_crash_mid_stream_loses_nothing() {
    let mut broker = Broker::start();
    let mut c = Collector::start(broker.port, "gpulet/v1/#");
    let dir = tempfile::tempdir().unwrap();
    let agent = AgentThread::start(dir.path(), &node_config(&broker.url(), ""));
    c.wait(T, "telemetry", |g| g.iter().filter(|m| m.topic.ends_with("/telemetry")).count() >= 10);
    let subs = c.subscriptions();
    broker.kill();
    std::thread::sleep(Duration::from_millis(1500));
    broker.restart();
    // The agent's backoff has reached several hundred ms; the collector retries every
    // 20 ms, so it is back before the agent replays.
    c.wait_resubscribed(subs);
    let before = c.got.len();
    // The status goes online again with a new incarnation, and the birth is re-sent.
    let online = c.next_on(before, "gpulet/v1/n1/status", |v| v["state"] == "online");
    assert!(online["inc"].as_u64().unwrap() > 1, "{online}");
    c.next_on(before, "gpulet/v1/n1/birth", |v| v["inc"] == online["inc"]);
    // Live data goes on; the outage's backlog is replayed, marked historical.
    c.wait(T, "replayed backlog", |g| {
        g[before..].iter().any(|m| m.text().starts_with("{\"historical\":true"))
    });
    c.wait(T, "more live telemetry", |g| {
        g[before..].iter().filter(|m| m.topic.ends_with("/telemetry")).count() >= 40
    });
    // A command after the restart still runs (subscriptions were re-made).
    let results = cmd(&broker, "ping", json!({}));
    assert_eq!(results.last().unwrap()["status"], "succeeded", "{results:?}");
    let from = c.got.len();
    agent.stop();
    c.next_on(from, "gpulet/v1/n1/status", |v| v["state"] == "offline");
    let n = contiguous_seqs(&c.got);
    assert!(n >= 50, "{n}");
}

/// The agent as a process: SIGKILL fires the Will; killed while the broker is down, it
/// loses nothing once both are back.
#[test]
fn will_on_sigkill_and_an_agent_crash_during_an_outage_loses_nothing() {
    let mut broker = Broker::start();
    let mut c = Collector::start(broker.port, "gpulet/v1/#");
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("gpulet.toml");
    std::fs::write(&conf, node_config(&broker.url(), "")).unwrap();
    let log = dir.path().join("agent.log");
    let spawn = || {
        let err = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        Command::new(env!("CARGO_BIN_EXE_gpulet"))
            .args(["--log-level", "debug", "run", "--config", conf.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap()
    };
    let _log_on_panic = scopeguard_log(&log);
    let mut agent = spawn();
    c.wait(T, "online", |g| {
        g.iter().any(|m| m.topic.ends_with("/status") && m.text().contains("online"))
    });
    c.wait(T, "telemetry", |g| g.iter().filter(|m| m.topic.ends_with("/telemetry")).count() >= 5);
    agent.kill().unwrap();
    agent.wait().unwrap();
    let will = c.next_on(0, "gpulet/v1/n1/status", |v| v["state"] == "offline");
    assert_eq!(will["inc"], 1, "the Will names the incarnation it ends");

    // Restart, then the broker goes down; the agent buffers, and is killed too.
    let mut agent = spawn();
    c.next_on(0, "gpulet/v1/n1/status", |v| v["state"] == "online" && v["inc"] == 2);
    c.wait(T, "telemetry of inc 2", |g| {
        g.iter().any(|m| m.topic.ends_with("/telemetry") && m.json()["inc"] == 2)
    });
    broker.kill();
    std::thread::sleep(Duration::from_millis(1500));
    agent.kill().unwrap();
    agent.wait().unwrap();
    let subs = c.subscriptions();
    broker.restart();
    c.wait_resubscribed(subs);
    let mut agent = spawn();
    let before = c.got.len();
    c.wait(T, "backlog replayed", |g| {
        g[before..].iter().filter(|m| m.text().starts_with("{\"historical\":true")).count() >= 20
    });
    c.wait(T, "live telemetry", |g| {
        g[before..]
            .iter()
            .filter(|m| m.topic.ends_with("/telemetry") && !m.text().starts_with("{\"historical"))
            .count()
            >= 5
    });
    // A SIGHUP reload publishes the birth again (its plugin list may have changed).
    let births =
        |g: &[crate::broker::Msg]| g.iter().filter(|m| m.topic.ends_with("/birth")).count();
    let before_hup = births(&c.got);
    let ok = Command::new("kill").args(["-HUP", &agent.id().to_string()]).status().unwrap();
    assert!(ok.success());
    c.wait(T, "the birth after SIGHUP", |g| births(g) > before_hup);
    let state = std::fs::read_to_string(dir.path().join("state/inc")).unwrap();
    assert!(state.trim().parse::<u64>().unwrap() >= 3);
    sigterm(&agent);
    assert!(agent.wait().unwrap().success());
    let n = contiguous_seqs(&c.got);
    assert!(n >= 40, "{n}");
}

/// Prints the agent's log if the test panics while this lives.
fn scopeguard_log(path: &std::path::Path) -> impl Drop + '_ {
    struct G<'a>(&'a std::path::Path);
    impl Drop for G<'_> {
        fn drop(&mut self) {
            if std::thread::panicking() {
                eprintln!("agent log:\n{}", std::fs::read_to_string(self.0).unwrap_or_default());
            }
        }
    }
    G(path)
}

fn sigterm(child: &std::process::Child) {
    let ok = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(ok.success());
}

#[test]
fn the_outbox_bound_drops_oldest_telemetry_and_says_so() {
    let mut broker = Broker::start();
    let port = broker.port;
    broker.kill();
    let dir = tempfile::tempdir().unwrap();
    // No broker: records pile up in a 4 KiB outbox.
    let agent = AgentThread::start(
        dir.path(),
        &node_config(&broker.url(), "[mqtt.outbox]\nmax_kib = 4\nsegment_kib = 4\n"),
    );
    std::thread::sleep(Duration::from_millis(1500));
    broker.restart();
    assert_eq!(broker.port, port);
    let mut c = Collector::start(broker.port, "gpulet/v1/#");
    c.wait(T, "data-loss event", |g| g.iter().any(|m| m.topic.ends_with("/events/data-loss")));
    c.wait(T, "a telemetry record counting drops", |g| {
        g.iter().any(|m| {
            m.topic.ends_with("/telemetry") && m.json()["mqtt"]["dropped"].as_u64() > Some(0)
        })
    });
    let from = c.got.len();
    agent.stop();
    c.next_on(from, "gpulet/v1/n1/status", |v| v["state"] == "offline");
    let loss = c.on("/events/data-loss").remove(0);
    assert_eq!(loss["reason"], "max_bytes");
    assert!(
        loss["records"].as_u64().unwrap() > 0
            && loss["last_seq"].as_u64() >= loss["first_seq"].as_u64()
    );
    // The dropped seqs are exactly the gaps: nothing else is missing.
    let mut seen: Vec<u64> = c
        .got
        .iter()
        .filter(|m| m.topic.contains("/telemetry") || m.topic.contains("/events/"))
        .map(|m| m.json()["seq"].as_u64().unwrap())
        .collect();
    seen.sort_unstable();
    seen.dedup();
    let received = seen.clone();
    for l in c.on("/events/data-loss") {
        // Every seq in a loss range was received (critical records are kept) or is
        // counted as dropped. (A record dropped while in flight can arrive all the same:
        // the count may over-report, never under-report.)
        let (a, b) = (l["first_seq"].as_u64().unwrap(), l["last_seq"].as_u64().unwrap());
        let kept = received.iter().filter(|s| (a..=b).contains(*s)).count() as u64;
        let size = b - a + 1;
        assert!(kept + l["records"].as_u64().unwrap() >= size, "{l}");
        seen.extend(a..=b);
    }
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen, (0..seen.len() as u64).collect::<Vec<_>>());
}

#[test]
fn commands_change_the_desired_state_once() {
    let broker = Broker::start();
    let mut c = Collector::start(broker.port, "gpulet/v1/#");
    let dir = tempfile::tempdir().unwrap();
    let conf = node_config(&broker.url(), "[power]\nbudget_w = 400\n");
    let agent = AgentThread::start(dir.path(), &conf);
    c.wait(T, "online", |g| {
        g.iter().any(|m| m.topic.ends_with("/status") && m.text().contains("online"))
    });

    let r = cmd(&broker, "set-power-budget", json!({"id": "b1", "watts": 300}));
    let statuses: Vec<&str> = r.iter().map(|v| v["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["accepted", "succeeded"], "{r:?}");
    let from = c.got.len();
    c.next_on(from, "gpulet/v1/n1/telemetry", |v| v["budget_w"] == 300.0);
    let st = c.next_on(0, "gpulet/v1/n1/state/power-budget", |v| v["commanded_w"] == 300.0);
    assert_eq!(st["configured_w"], 400.0);
    // The same id again: not executed twice.
    let r = cmd(&broker, "set-power-budget", json!({"id": "b1", "watts": 350}));
    assert_eq!(r.last().unwrap()["status"], "rejected");
    assert!(r.last().unwrap()["reason"].as_str().unwrap().contains("already received"));
    // An operator limit, checked against the GPU's bounds by the agent.
    let r = cmd(&broker, "set-power-limit", json!({"gpu": 1, "watts": 5000}));
    assert!(
        r.last().unwrap()["reason"].as_str().unwrap().contains("outside GPU 1's bounds"),
        "{r:?}"
    );
    let r = cmd(&broker, "set-power-limit", json!({"gpu": 1, "watts": 150}));
    assert_eq!(r.last().unwrap()["status"], "succeeded", "{r:?}");
    let from = c.got.len();
    c.next_on(from, "gpulet/v1/n1/events/limit-changed", |v| {
        v["gpu"] == 1 && v["source"] == "operator"
    });
    agent.stop();

    // A restart restores what the commands set, and still refuses the old id.
    let agent = AgentThread::start(dir.path(), &conf);
    let from = c.got.len();
    c.next_on(from, "gpulet/v1/n1/telemetry", |v| v["budget_w"] == 300.0);
    let r = cmd(&broker, "set-power-budget", json!({"id": "b1", "watts": null}));
    assert_eq!(r.last().unwrap()["status"], "rejected");
    let r = cmd(&broker, "set-power-budget", json!({"id": "b2", "watts": null}));
    assert_eq!(r.last().unwrap()["status"], "succeeded");
    let from = c.got.len();
    c.next_on(from, "gpulet/v1/n1/telemetry", |v| v["budget_w"] == 400.0);
    let from = c.got.len();
    agent.stop();
    c.next_on(from, "gpulet/v1/n1/status", |v| v["state"] == "offline");
    contiguous_seqs(&c.got);
}

#[test]
fn malformed_commands_are_rejected_with_a_reason_and_nothing_else() {
    let broker = Broker::start();
    let mut c = Collector::start(broker.port, "gpulet/v1/#");
    let dir = tempfile::tempdir().unwrap();
    let agent = AgentThread::start(
        dir.path(),
        &node_config(&broker.url(), "[mqtt.commands]\nmax_payload_kib = 1\n"),
    );
    c.wait(T, "online", |g| {
        g.iter().any(|m| m.topic.ends_with("/status") && m.text().contains("online"))
    });
    let big = format!("{{\"id\":\"big\",\"pad\":\"{}\"}}", "x".repeat(2000));
    let cases: Vec<(&str, String, bool, &str)> = vec![
        ("ping", "not json".into(), false, "not valid JSON"),
        ("ping", "[1,2]".into(), false, "not a JSON object"),
        ("ping", "{}".into(), false, "id is missing"),
        ("set-power-budget", r#"{"id":"t1","watts":"lots"}"#.into(), false, "watts: invalid type"),
        ("set-power-budget", r#"{"id":"t2","watts":1e9}"#.into(), false, "out of range"),
        (
            "set-power-budget",
            r#"{"id":"t3","watts":300,"extra":1}"#.into(),
            false,
            "unknown field `extra`",
        ),
        (
            "set-power-limit",
            r#"{"id":"t4","gpu":7,"watts":200}"#.into(),
            false,
            "GPU 7 does not exist",
        ),
        ("ping", r#"{"id":"t5","node":"n2"}"#.into(), false, "meant for node \"n2\""),
        ("reboot", r#"{"id":"t6"}"#.into(), false, "is not a command"),
        ("ping", r#"{"id":"t7"}"#.into(), true, "retained"),
        ("ping", big, false, "too large"),
        ("ping", r#"{"id":"t8","expires_ms":1000}"#.into(), false, "expired"),
    ];
    for (name, payload, retain, want) in &cases {
        let from = c.got.len();
        c.publish(&format!("gpulet/v1/n1/cmd/{name}"), payload.as_bytes(), *retain, None);
        let topic = format!("gpulet/v1/n1/cmd-result/{name}");
        let r = c.next_on(from, &topic, |v| v["status"] == "rejected" || v["status"] == "failed");
        assert!(r["reason"].as_str().unwrap().contains(want), "{payload}: {r}");
        if *retain {
            c.publish(&format!("gpulet/v1/n1/cmd/{name}"), b"", true, None);
        }
    }
    // Still connected, and a good command with a response topic and correlation data
    // is answered there.
    let from = c.got.len();
    let props = PublishProperties {
        response_topic: Some("ops/replies".into()),
        correlation_data: Some(Bytes::from_static(b"corr-1")),
        ..Default::default()
    };
    c.client.subscribe("ops/replies", rumqttc::v5::mqttbytes::QoS::AtLeastOnce).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    c.publish("gpulet/v1/n1/cmd/ping", br#"{"id":"ok1"}"#, false, Some(props));
    c.wait(T, "the reply on the response topic", |g| {
        g[from..].iter().any(|m| m.topic == "ops/replies" && m.text().contains("succeeded"))
    });
    let reply = c.got[from..]
        .iter()
        .find(|m| m.topic == "ops/replies" && m.text().contains("succeeded"))
        .unwrap();
    assert_eq!(reply.correlation.as_deref(), Some(&b"corr-1"[..]));
    // A response topic the client cannot publish to (a wildcard) is ignored: the result
    // goes to cmd-result instead of being stuck in the outbox.
    let from = c.got.len();
    let props = PublishProperties { response_topic: Some("ops/#".into()), ..Default::default() };
    c.publish("gpulet/v1/n1/cmd/ping", br#"{"id":"ok2"}"#, false, Some(props));
    c.next_on(from, "gpulet/v1/n1/cmd-result/ping", |v| {
        v["id"] == "ok2" && v["status"] == "succeeded"
    });
    let t = c.next_on(c.got.len(), "gpulet/v1/n1/telemetry", |_| true);
    assert_eq!(t["mqtt"]["commands_rejected"].as_u64(), Some(cases.len() as u64));
    assert_eq!(t["mqtt"]["commands_accepted"].as_u64(), Some(2));
    agent.stop();
    let statuses = c.on("/status");
    assert_eq!(statuses.iter().filter(|s| s["state"] == "online").count(), 1, "never disconnected");
}

#[test]
fn signed_commands_tamper_replay_and_time_cases() {
    let broker = Broker::start();
    let mut c = Collector::start(broker.port, "gpulet/v1/#");
    let dir = tempfile::tempdir().unwrap();
    let (private, public) = keygen().unwrap();
    let key = signing_key(&private).unwrap();
    let extra = format!("[mqtt.commands]\nrequire_signed = true\npublic_keys = [\"{public}\"]\n");
    let agent = AgentThread::start(dir.path(), &node_config(&broker.url(), &extra));
    c.wait(T, "online", |g| {
        g.iter().any(|m| m.topic.ends_with("/status") && m.text().contains("online"))
    });
    let now = gpulet::mqtt::wall_ms();
    let signed = |node: &str, name: &str, id: &str, issued: u64, expires: u64| {
        let mut m = json!({"id": id, "watts": 300, "issued_ms": issued, "expires_ms": expires})
            .as_object()
            .unwrap()
            .clone();
        command::sign(&key, node, name, &mut m);
        serde_json::to_string(&m).unwrap()
    };
    let good = signed("n1", "set-power-budget", "s1", now, now + 60_000);
    let (other_key, _) = keygen().unwrap();
    let mut foreign =
        json!({"id": "s7", "watts": 300, "issued_ms": now, "expires_ms": now + 60_000})
            .as_object()
            .unwrap()
            .clone();
    command::sign(&signing_key(&other_key).unwrap(), "n1", "set-power-budget", &mut foreign);
    let cases: Vec<(String, &str)> = vec![
        (good.clone(), "succeeded"),
        (good.clone(), "already received"),
        (good.replace("\"watts\":300", "\"watts\":900"), "does not match"),
        (signed("n2", "set-power-budget", "s3", now, now + 60_000), "does not match"),
        (signed("n1", "set-power-budget", "s4", now - 120_000, now - 60_000), "expired"),
        (signed("n1", "set-power-budget", "s5", now + 120_000, now + 180_000), "in the future"),
        (signed("n1", "set-power-budget", "s6", now, now + 3_600_000), "accepted: 0 to 300000 ms"),
        (serde_json::to_string(&foreign).unwrap(), "does not match"),
        (r#"{"id":"s8","watts":300}"#.into(), "not signed"),
    ];
    for (payload, want) in &cases {
        let from = c.got.len();
        c.publish("gpulet/v1/n1/cmd/set-power-budget", payload.as_bytes(), false, None);
        let r = c.next_on(from, "gpulet/v1/n1/cmd-result/set-power-budget", |v| {
            v["status"] != "accepted"
        });
        let text = r.to_string();
        assert!(text.contains(want), "{payload}: {text}");
    }
    // `gpulet cmd --key` signs the same way.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let r = rt
        .block_on(send(SendOptions {
            url: broker.url(),
            root: "gpulet/v1".into(),
            node: "n1".into(),
            command: "ping".into(),
            args: Default::default(),
            key: Some(key.clone()),
            timeout: Duration::from_secs(10),
            tls: None,
            credentials: None,
            retain: false,
        }))
        .unwrap();
    assert_eq!(r.last().unwrap()["status"], "succeeded");
    agent.stop();
}

#[test]
fn tls_with_client_certificates_and_an_acl_refusal_reported() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Mosquitto drops root privileges: its files must be readable by others.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    let openssl = |args: &str| {
        let out = Command::new("openssl")
            .args(args.split_whitespace())
            .current_dir(d)
            .output()
            .unwrap_or_else(|e| {
                panic!("openssl: {e}; install the Debian package openssl (.ci/test does)")
            });
        assert!(out.status.success(), "openssl {args}: {}", String::from_utf8_lossy(&out.stderr));
    };
    std::fs::write(d.join("san.ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n").unwrap();
    openssl(
        "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key -out ca.crt -days 2 -subj /CN=test-ca",
    );
    for name in ["server", "client"] {
        let cn = if name == "server" { "localhost" } else { "n1" };
        openssl(&format!(
            "req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout {name}.key -out {name}.csr -subj /CN={cn}"
        ));
        openssl(&format!(
            "x509 -req -in {name}.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out {name}.crt -days 2 -extfile san.ext"
        ));
    }
    for f in ["ca.crt", "server.crt", "server.key"] {
        std::fs::set_permissions(d.join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    // TLS listener requiring a client certificate whose CN becomes the user name; the ACL
    // lets a node write only its own status, birth, state, events and results; not
    // its telemetry here, to see the refusal reported.
    let tls_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let acl = d.join("acl");
    std::fs::write(
        &acl,
        "user n1\ntopic write gpulet/v1/n1/status\ntopic write gpulet/v1/n1/birth\ntopic write gpulet/v1/n1/state/#\ntopic write gpulet/v1/n1/events/#\ntopic write gpulet/v1/n1/cmd-result/#\ntopic read gpulet/v1/n1/cmd/#\n\npattern read #\npattern write gpulet/v1/+/cmd/#\n",
    )
    .unwrap();
    let extra = format!(
        "listener {tls_port} 127.0.0.1\ncafile {0}/ca.crt\ncertfile {0}/server.crt\nkeyfile {0}/server.key\nrequire_certificate true\nuse_identity_as_username true\nacl_file {0}/acl\n",
        d.display()
    );
    let broker = Broker::with(&format!("per_listener_settings false\n{extra}"));
    let mut c = Collector::start(broker.port, "gpulet/v1/#");
    let conf = format!(
        "node = \"n1\"\ntick = \"50ms\"\n[telemetry]\nsink = \"none\"\n[[sim.gpu]]\npreset = \"l40s\"\nworkload = \"inference\"\n[mqtt]\nurl = \"mqtts://localhost:{tls_port}\"\nstate_dir = \"state\"\nca_file = \"ca.crt\"\ncert_file = \"client.crt\"\nkey_file = \"client.key\"\n"
    );
    let agent = AgentThread::start(d, &conf);
    c.wait(T, "online over TLS", |g| {
        g.iter().any(|m| m.topic == "gpulet/v1/n1/status" && m.text().contains("online"))
    });
    let refused = c.next_on(0, "gpulet/v1/n1/events/mqtt-refused", |_| true);
    assert_eq!(refused["topic"], "gpulet/v1/n1/telemetry");
    assert!(refused["reason"].as_str().unwrap().contains("NotAuthorized"), "{refused}");
    assert!(!c.got.iter().any(|m| m.topic == "gpulet/v1/n1/telemetry"));
    agent.stop();
    let _ = &broker;
}

#[test]
fn keygen_and_cmd_from_the_command_line() {
    use std::os::unix::fs::PermissionsExt;
    let gpulet =
        |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_gpulet")).args(args).output().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("ops");
    let out = gpulet(&["keygen", prefix.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let key = dir.path().join("ops.key");
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    let again = gpulet(&["keygen", prefix.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("never overwritten"));

    let broker = Broker::start();
    let mut c = Collector::start(broker.port, "gpulet/v1/+/status");
    let extra = "[mqtt.commands]\nrequire_signed = true\npublic_key_files = [\"ops.pub\"]\n";
    let agent = AgentThread::start(dir.path(), &node_config(&broker.url(), extra));
    c.wait(T, "online", |g| g.iter().any(|m| m.text().contains("online")));
    let url = broker.url();
    let signed = gpulet(&[
        "cmd",
        "--broker",
        &url,
        "--node",
        "n1",
        "set-power-budget",
        "--args",
        r#"{"watts": 300}"#,
        "--key",
        key.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&signed.stdout);
    assert!(signed.status.success(), "{stdout} {}", String::from_utf8_lossy(&signed.stderr));
    assert!(stdout.contains("\"accepted\"") && stdout.contains("\"succeeded\""), "{stdout}");
    let unsigned = gpulet(&["cmd", "--broker", &url, "--node", "n1", "ping"]);
    assert_eq!(unsigned.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unsigned.stdout).contains("not signed"));
    let bad = gpulet(&["cmd", "--broker", &url, "--node", "n1", "ping", "--args", "[1]"]);
    assert_eq!(bad.status.code(), Some(2), "a usage error");
    // A node this broker never saw, then one that went offline: said so, not a timeout
    // like a lost reply.
    let unknown = gpulet(&["cmd", "--broker", &url, "--node", "nope", "ping", "--timeout", "2s"]);
    let err = String::from_utf8_lossy(&unknown.stderr);
    assert!(err.contains("no node \"nope\" ever reported to this broker"), "{err}");
    agent.stop();
    c.wait(T, "offline", |g| g.iter().any(|m| m.text().contains("offline")));
    let offline = gpulet(&["cmd", "--broker", &url, "--node", "n1", "ping", "--timeout", "5s"]);
    let err = String::from_utf8_lossy(&offline.stderr);
    assert_eq!(offline.status.code(), Some(1));
    assert!(err.contains("node \"n1\" is offline"), "{err}");
    // Every command and its arguments are in `cmd --help`.
    let help = String::from_utf8_lossy(&gpulet(&["cmd", "--help"]).stdout).into_owned();
    for c in [
        "set-power-budget",
        "set-power-limit",
        "clear-health",
        "reload-plugins",
        "rebirth",
        "ping",
        "_replies",
    ] {
        assert!(help.contains(c), "{c} not in cmd --help:\n{help}");
    }
}

#[test]
fn the_demo_publishes_to_a_broker() {
    let broker = Broker::start();
    let mut c = Collector::start(broker.port, "gpulet/v1/demo-node/#");
    let out = Command::new(env!("CARGO_BIN_EXE_gpulet"))
        .args(["demo", "--ticks", "5", "--speed", "0", "--json", "--mqtt", &broker.url()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    c.wait(T, "the demo's telemetry, birth and offline status", |g| {
        g.iter().filter(|m| m.topic.ends_with("/telemetry")).count() >= 5
            && g.iter().any(|m| m.topic.ends_with("/birth"))
            && g.iter().any(|m| m.topic.ends_with("/status") && m.text().contains("offline"))
    });
    // A second demo starts afresh: its own state directory, so no replay of the first
    // one's records and the same first incarnation (the review: one fixed /tmp folder).
    let from = c.got.len();
    let out = Command::new(env!("CARGO_BIN_EXE_gpulet"))
        .args(["demo", "--ticks", "20", "--speed", "20", "--json", "--mqtt", &broker.url()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // (One second of wall time: long enough to connect, so its status goes out.)
    let offline = c.next_on(from, "gpulet/v1/demo-node/status", |v| v["state"] == "offline");
    assert_eq!(offline["inc"], 1, "a fresh incarnation counter, so a fresh state: {offline}");
    let second = c.got[from..].iter().filter(|m| m.topic.ends_with("/telemetry"));
    assert!(second.map(|m| m.json()).all(|t| t["inc"] == 1), "nothing carried over");
}

/// The review: an unreadable `desired.json` silently dropped a commanded budget; now it
/// is set aside and reported, and the agent runs on the configured budget.
#[test]
fn an_unreadable_desired_state_is_set_aside_and_reported() {
    let broker = Broker::start();
    let mut c = Collector::start(broker.port, "gpulet/v1/#");
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("state")).unwrap();
    std::fs::write(dir.path().join("state/desired.json"), b"{\"budget_w\": 30").unwrap();
    let agent =
        AgentThread::start(dir.path(), &node_config(&broker.url(), "[power]\nbudget_w = 400\n"));
    let e = c.next_on(0, "gpulet/v1/n1/events/state-set-aside", |_| true);
    assert!(e["path"].as_str().unwrap().ends_with("state/desired.json"), "{e}");
    assert!(e["error"].as_str().unwrap().contains("EOF"), "{e}");
    let st = c.next_on(0, "gpulet/v1/n1/state/power-budget", |_| true);
    assert_eq!((st["budget_w"].as_f64(), &st["commanded_w"]), (Some(400.0), &Value::Null));
    agent.stop();
    let aside = std::fs::read_dir(dir.path().join("state"))
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("desired.json.bad-"));
    assert!(aside, "kept beside it for the operator");
}

#[test]
fn records_larger_than_the_broker_takes_are_dropped_reported_once_and_the_link_stays_up() {
    // A telemetry record of 2 GPUs is over 1 KB; events and command results are smaller.
    let broker = Broker::with("max_packet_size 700\n");
    let mut c = Collector::start(broker.port, "gpulet/v1/#");
    let dir = tempfile::tempdir().unwrap();
    let agent =
        AgentThread::start(dir.path(), &node_config(&broker.url(), "[power]\nbudget_w = 400\n"));
    c.wait(T, "the refusal", |g| g.iter().any(|m| m.topic.ends_with("/events/mqtt-refused")));
    // The connection stays up (no drop and retry of the same record): a command is
    // answered, and records keep being dropped without reconnecting.
    let results = cmd(&broker, "ping", json!({}));
    assert_eq!(results.last().unwrap()["status"], "succeeded", "{results:?}");
    std::thread::sleep(Duration::from_millis(500));
    agent.stop();
    c.wait(T, "offline", |g| {
        g.iter().any(|m| m.topic.ends_with("/status") && m.text().contains("offline"))
    });
    assert!(!c.got.iter().any(|m| m.topic.ends_with("/telemetry")));
    let online = c.on("/status").iter().filter(|s| s["state"] == "online").count();
    assert_eq!(online, 1, "one connection");
    let refused = c.on("/events/mqtt-refused");
    let telemetry: Vec<&Value> = refused
        .iter()
        .filter(|e| e["topic"].as_str().is_some_and(|t| t.ends_with("/telemetry")))
        .collect();
    assert_eq!(telemetry.len(), 1, "reported once per topic and connection: {refused:?}");
    let why = telemetry[0]["reason"].as_str().unwrap();
    assert!(why.contains("over the broker's maximum packet size of 700"), "{why}");
}

/// The review: one unsigned command whose `reply_to` held a control character or a
/// noncharacter made the agent publish its rejection there; Mosquitto dropped the
/// connection as malformed at every reconnect, for good.
#[test]
fn a_hostile_reply_topic_never_cuts_the_node_off() {
    let broker = Broker::start();
    let mut c = Collector::start(broker.port, "#");
    let dir = tempfile::tempdir().unwrap();
    let (_, public) = keygen().unwrap();
    let extra = format!("[mqtt.commands]\nrequire_signed = true\npublic_keys = [\"{public}\"]\n");
    let agent = AgentThread::start(dir.path(), &node_config(&broker.url(), &extra));
    c.wait(T, "online", |g| {
        g.iter().any(|m| m.topic.ends_with("/status") && m.text().contains("online"))
    });
    for (i, bad) in
        ["\\u0001", "\\u007f", "\\u0085", "\\uffff", "\\ufdd0", "victims/topic"].iter().enumerate()
    {
        let from = c.got.len();
        let payload = format!(r#"{{"id":"h{i}","reply_to":"ops/{bad}"}}"#);
        c.publish("gpulet/v1/n1/cmd/ping", payload.as_bytes(), false, None);
        let r = c.next_on(from, "gpulet/v1/n1/cmd-result/ping", |v| v["id"] == format!("h{i}"));
        assert_eq!(r["status"], "rejected", "{r}");
    }
    // An MQTT 5 response topic, unauthenticated: ignored too. (One with a control
    // character cannot be tested here: Mosquitto drops the publisher's connection.)
    let props = PublishProperties {
        response_topic: Some("victims/response".into()),
        correlation_data: Some(Bytes::from_static(b"c")),
        ..Default::default()
    };
    let from = c.got.len();
    c.publish("gpulet/v1/n1/cmd/ping", br#"{"id":"h9"}"#, false, Some(props));
    c.next_on(from, "gpulet/v1/n1/cmd-result/ping", |v| v["id"] == "h9");
    // Nothing went anywhere else, and the node never lost its connection.
    std::thread::sleep(Duration::from_millis(500));
    c.drain();
    assert!(
        !c.got.iter().any(|m| m.topic.starts_with("ops/") || m.topic.starts_with("victims")),
        "a result went where an unauthenticated sender asked"
    );
    let online: Vec<Value> =
        c.on("gpulet/v1/n1/status").into_iter().filter(|v| v["state"] == "online").collect();
    assert_eq!(online.len(), 1, "reconnected: {online:?}");
    agent.stop();
}

/// The review: after `mqtt.root` changed (same client id), the persistent session still
/// delivered commands published to the old tree, and they ran.
#[test]
fn commands_from_an_earlier_root_are_ignored() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let old = node_config(&broker.url(), "root = \"old/v1\"\n");
    let mut c = Collector::start(broker.port, "#");
    let agent = AgentThread::start(dir.path(), &old);
    c.wait(T, "online under the old root", |g| {
        g.iter().any(|m| m.topic == "old/v1/n1/status" && m.text().contains("online"))
    });
    agent.stop();
    // While the agent is down, a command to the old tree: the session keeps it.
    c.publish("old/v1/n1/cmd/set-power-budget", br#"{"id":"stale","watts":300}"#, false, None);
    std::thread::sleep(Duration::from_millis(200));
    let from = c.got.len();
    let agent = AgentThread::start(dir.path(), &node_config(&broker.url(), ""));
    let st = c.next_on(from, "gpulet/v1/n1/state/power-budget", |_| true);
    std::thread::sleep(Duration::from_millis(1000));
    c.drain();
    assert_eq!(st["commanded_w"], Value::Null, "{st}");
    assert!(
        !c.got[from..].iter().any(|m| m.topic.contains("cmd-result")),
        "the stale command was answered (so it ran)"
    );
    // Commands to the node's tree still run.
    assert_eq!(cmd(&broker, "ping", json!({})).last().unwrap()["status"], "succeeded");
    agent.stop();
}
