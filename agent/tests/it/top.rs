//! `gpulet top` against a simulated fleet (`gpulet fleet-sim`, a process of its own) on
//! a real Mosquitto: the `--once --json` snapshot, a filter, and the interactive view
//! driven through a real terminal (tmux: a pseudo-terminal, keys, the screen captured).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::broker::Broker;

const NODES: usize = 30;

fn fleet(broker: &Broker) -> Child {
    Command::new(env!("CARGO_BIN_EXE_gpulet"))
        .args([
            "fleet-sim",
            "--nodes",
            &NODES.to_string(),
            "--broker",
            &broker.url(),
            "--duration",
            "60s",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn snapshot(broker: &Broker, extra: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_gpulet"))
        .args(["top", "--broker", &broker.url(), "--once", "--json", "--wait", "3s"])
        .args(extra)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn top_once_json_sees_the_whole_simulated_fleet() {
    let broker = Broker::start();
    let mut sim = fleet(&broker);
    // Until every node has reported (fleet-sim connects them over a second or two).
    let t = Instant::now();
    let v = loop {
        let v = snapshot(&broker, &[]);
        if v["summary"]["online"].as_u64() == Some(NODES as u64)
            && v["nodes"].as_array().unwrap().iter().all(|n| n["power_w"].as_f64().is_some())
        {
            break v;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "the fleet never showed whole: {v}");
    };
    let s = &v["summary"];
    assert_eq!(s["gpus"].as_u64(), Some(8 * NODES as u64), "{s}");
    assert_eq!(s["unhealthy_gpus"].as_u64(), Some(0));
    // Sorted by power, the largest first.
    let powers: Vec<f64> =
        v["nodes"].as_array().unwrap().iter().map(|n| n["power_w"].as_f64().unwrap()).collect();
    assert!(powers.windows(2).all(|w| w[0] >= w[1]), "{powers:?}");
    for n in v["nodes"].as_array().unwrap() {
        assert_eq!(n["gpus"].as_u64(), Some(8));
        assert!(n["hottest"][1].as_f64().unwrap() > 20.0, "{n}");
    }
    // A filter keeps the matching nodes.
    let f = snapshot(&broker, &["--filter", "sim-0000?", "--sort", "node"]);
    let names: Vec<&str> =
        f["nodes"].as_array().unwrap().iter().map(|n| n["node"].as_str().unwrap()).collect();
    assert_eq!(names, (0..10).map(|i| format!("sim-{i:05}")).collect::<Vec<_>>());
    // A node that goes away shows offline (its Will or clean stop).
    let _ = sim.kill();
    let _ = sim.wait();
    let t = Instant::now();
    loop {
        let v = snapshot(&broker, &[]);
        if v["summary"]["offline"].as_u64() == Some(NODES as u64) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the nodes never showed offline: {}",
            v["summary"]
        );
    }
}

fn tmux(args: &[&str]) -> String {
    let out = Command::new("tmux").args(args).output().unwrap_or_else(|e| {
        panic!("tmux is not installed ({e}): Debian's tmux, which .ci/test installs")
    });
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_interactive_view_in_a_terminal() {
    let broker = Broker::start();
    let mut sim = fleet(&broker);
    let session = format!("gpulet-top-{}", std::process::id());
    let cmd = format!("{} top --broker {}", env!("CARGO_BIN_EXE_gpulet"), broker.url());
    tmux(&["new-session", "-d", "-s", &session, "-x", "160", "-y", "45", &cmd]);
    let screen = || tmux(&["capture-pane", "-p", "-t", &session]);
    let wait_for = |what: &str| {
        let t = Instant::now();
        loop {
            let s = screen();
            if s.contains(what) {
                return s;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "{what:?} never showed:\n{s}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let s = wait_for(&format!("nodes {NODES} ({NODES} online, 0 offline)"));
    assert!(
        s.contains("gpulet top")
            && s.contains("connected")
            && s.contains("NODE")
            && s.contains("sim-000"),
        "{s}"
    );
    assert!(s.contains("sorted by power"), "{s}");
    tmux(&["send-keys", "-t", &session, "s"]);
    wait_for("sorted by power/budget");
    tmux(&["send-keys", "-t", &session, "q"]);
    let t = Instant::now();
    while Command::new("tmux").args(["has-session", "-t", &session]).status().unwrap().success() {
        assert!(t.elapsed() < Duration::from_secs(10), "q did not quit");
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = sim.kill();
    let _ = sim.wait();
}
