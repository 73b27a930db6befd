//! The command line as a user runs it: exit codes, outputs, signals.

use std::io::Write as _;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::repo;

fn gpulet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gpulet")).args(args).current_dir(repo()).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn config_file(toml: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    f.write_all(toml.as_bytes()).unwrap();
    f
}

fn json_lines(out: &[u8]) -> Vec<Value> {
    text(out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

const FAST: &str =
    "tick = \"20ms\"\n[[sim.gpu]]\npreset = \"l40s\"\nworkload = \"inference\"\ncount = 2\n";

#[test]
fn version_and_usage() {
    let out = gpulet(&["--version"]);
    assert!(out.status.success());
    assert_eq!(text(&out.stdout).trim(), format!("gpulet {}", env!("CARGO_PKG_VERSION")));
    assert_eq!(gpulet(&[]).status.code(), Some(2), "no command is a usage error");
    assert_eq!(gpulet(&["frobnicate"]).status.code(), Some(2));
    assert_eq!(gpulet(&["run"]).status.code(), Some(2), "run needs --config");
}

#[test]
fn check_config_exit_codes() {
    for example in ["examples/gpulet.toml", "examples/demo.toml"] {
        let out = gpulet(&["check-config", example]);
        assert_eq!(out.status.code(), Some(0), "{example}: {}", text(&out.stderr));
        assert!(text(&out.stdout).contains("valid"));
    }
    let bad = config_file("tick = \"1ms\"\n[power]\nbudget_w = -1\n");
    let out = gpulet(&["check-config", bad.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("tick: \"1ms\" is out of range") && err.contains("power.budget_w: -1 W"),
        "{err}"
    );

    let out = gpulet(&["check-config", "no/such/file.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("cannot read no/such/file.toml"));

    // Valid, but a plugin without grants can decide nothing: said, exit 0.
    let ungranted = config_file(&format!(
        "[[plugin]]\nname = \"budget\"\npath = {:?}\n",
        gpulet_plugin_artifacts::POWER_BUDGET
    ));
    let out = gpulet(&["check-config", ungranted.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("warning: plugin[0] (budget) has no grants")
            && text(&out.stderr).contains("it can decide nothing"),
        "{}",
        text(&out.stderr)
    );

    // Running it, the rejections reach the log too: once, not once a tick.
    let lowering = config_file(&format!(
        "tick = \"20ms\"\n[telemetry]\nsink = \"none\"\n[[plugin]]\nname = \"low\"\npath = {:?}\nconfig = {{ mode = \"lower\" }}\n",
        gpulet_plugin_artifacts::FIXTURE
    ));
    let out = gpulet(&["run", "--config", lowering.path().to_str().unwrap(), "--ticks", "10"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert_eq!(err.matches("plugin decisions rejected").count(), 1, "{err}");
    assert!(err.contains("lacks the \"lower\" grant"), "{err}");

    let hw = config_file("[[power.gpu]]\nindex = 12\nlimit_w = 300\n");
    let out = gpulet(&["check-config", hw.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "checked against the simulated node's GPUs too");
    assert!(text(&out.stderr).contains("GPU 12 does not exist"));
}

#[test]
fn run_emits_one_record_per_tick_and_stops_after_ticks() {
    let cfg = config_file(FAST);
    let out = gpulet(&["run", "--config", cfg.path().to_str().unwrap(), "--ticks", "3"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let records = json_lines(&out.stdout);
    assert_eq!(
        records.iter().map(|r| r["seq"].as_u64().unwrap()).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    assert_eq!(records[0]["gpus"].as_array().unwrap().len(), 2);
}

/// gpulet with NVML pointed at a library that is not there (as on a machine without the
/// NVIDIA driver).
fn gpulet_without_nvml(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gpulet"))
        .args(args)
        .env("GPULET_NVML_LIBRARY", "/nonexistent/libnvidia-ml.so.1")
        .current_dir(repo())
        .output()
        .unwrap()
}

#[test]
fn run_with_nvml_and_no_driver_says_what_to_do() {
    let cfg = config_file("backend = \"nvml\"\n");
    let out =
        gpulet_without_nvml(&["run", "--config", cfg.path().to_str().unwrap(), "--ticks", "1"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("cannot load /nonexistent/libnvidia-ml.so.1")
            && err.contains("Install the NVIDIA driver"),
        "{err}"
    );
    assert!(out.stdout.is_empty(), "no fallback to the simulator");

    let cfg = config_file(FAST);
    let out = gpulet_without_nvml(&[
        "run",
        "--config",
        cfg.path().to_str().unwrap(),
        "--backend",
        "nvml",
        "--ticks",
        "1",
    ]);
    assert_eq!(out.status.code(), Some(1), "--backend overrides the config");
}

#[test]
fn sigterm_stops_the_agent_cleanly_after_a_whole_tick() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("t.jsonl");
    let cfg = config_file(&format!(
        "{FAST}[telemetry]\nsink = \"file\"\npath = {:?}\n",
        log.to_str().unwrap()
    ));
    let child = Command::new(env!("CARGO_BIN_EXE_gpulet"))
        .args(["run", "--config", cfg.path().to_str().unwrap()])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while std::fs::read_to_string(&log).map_or(0, |s| s.lines().count()) < 3 {
        assert!(start.elapsed() < Duration::from_secs(20), "no telemetry from the agent");
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("shutdown requested"));
    let written = std::fs::read(&log).unwrap();
    assert!(written.ends_with(b"\n"), "the last record is whole");
    let records = json_lines(&written);
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r["seq"], i as u64);
    }
}

#[test]
fn demo_shows_a_live_view_or_json() {
    // The first screen: a Wasm policy moving watts to the busy GPUs, with its reasons,
    // the reporter flagging the GPU whose fan fails at 120 s, and the useful work gained
    // over the static split on the same node.
    let out = gpulet(&["demo", "--ticks", "200", "--speed", "0"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let view = text(&out.stdout);
    assert!(
        view.lines()
            .next()
            .unwrap()
            .contains("Wasm policies power-budget then thermal-guard, reporter anomaly"),
        "{view}"
    );
    assert!(view.contains("by power-budget (demand"), "{view}");
    assert!(view.contains("anomaly: temp-departure: GPU 1 runs at"), "{view}");
    assert!(view.contains("by thermal-guard"), "{view}");
    let last = view.lines().rfind(|l| l.contains("| work ")).unwrap();
    let gain: f64 =
        last.split("| work ").nth(1).unwrap().split('%').next().unwrap().parse().unwrap();
    assert!(gain > 0.0, "the policy did more useful work than the split: {last}");

    let out = gpulet(&["demo", "--ticks", "3", "--speed", "0", "--no-plugins"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let view = text(&out.stdout);
    assert!(
        view.starts_with("gpulet demo: node \"demo-node\", 8 simulated GPUs, node budget 4000 W"),
        "{view}"
    );
    let ticks: Vec<&str> =
        view.lines().filter(|l| l.trim_start().starts_with(char::is_numeric)).collect();
    assert_eq!(ticks.len(), 3, "{view}");
    assert!(
        ticks[0].trim_start().starts_with("0s")
            && ticks[0].contains("/4000")
            && ticks[0].contains("|7:"),
        "{view}"
    );
    assert!(view.contains("GPU 0: limit 700 -> 500 W by guard"), "{view}");

    let out = gpulet(&["demo", "--ticks", "2", "--speed", "0", "--json"]);
    assert!(out.status.success());
    let records = json_lines(&out.stdout);
    assert_eq!(records.len(), 2);
    assert_eq!(records[1]["budget_w"], 4000.0);
}

#[test]
fn inventory_lists_the_gpus() {
    let out = gpulet(&["inventory", "--json"]);
    assert!(out.status.success());
    let inv: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(inv.len(), 8);
    assert_eq!(inv[0]["power_limit"]["max_w"], 700.0);
    assert!(inv[0]["uuid"].as_str().unwrap().starts_with("GPU-"));
    assert!(inv[0]["fields"].as_array().unwrap().iter().any(|f| f == "energy_j"));

    let out = gpulet(&["inventory", "--config", "examples/gpulet.toml"]);
    assert!(out.status.success());
    let table = text(&out.stdout);
    assert!(table.contains("NVIDIA A100-SXM4-40GB") && table.contains("NVIDIA L40S"), "{table}");

    let out = gpulet_without_nvml(&["inventory", "--backend", "nvml"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn plugin_check_and_run_for_authors() {
    let budget = gpulet_plugin_artifacts::POWER_BUDGET;
    let out = gpulet(&["plugin", "check", budget]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let report = text(&out.stdout);
    assert!(
        report.contains("power-budget 0.1.0 (power plugin, API 0.1.2)")
            && report.contains("wasi:cli/stdout"),
        "{report}"
    );

    // The author's tools keep compiled plugins in the user's cache: a second check of a
    // component does not compile it again. Reporters are checked too.
    let cache = tempfile::tempdir().unwrap();
    for want in ["(compiled)", "(from the compile cache)"] {
        let out = Command::new(env!("CARGO_BIN_EXE_gpulet"))
            .args(["plugin", "check", gpulet_plugin_artifacts::ANOMALY])
            .env("XDG_CACHE_HOME", cache.path())
            .output()
            .unwrap();
        let report = text(&out.stdout);
        assert!(
            report.contains("anomaly 0.1.0 (reporter plugin") && report.contains(want),
            "{report}"
        );
    }

    let out = gpulet(&["plugin", "check", budget, "--config", r#"{"margin_w": -1}"#]);
    assert_eq!(out.status.code(), Some(2), "an invalid config is a config error");
    assert!(
        text(&out.stderr).contains("$.margin_w: -1 is out of range; accepted: 0 to 500"),
        "{}",
        text(&out.stderr)
    );

    // A refused import is refused before the component is compiled (a default
    // JavaScript build imports wasi:http, and compiling it takes tens of seconds): no
    // compiled code reaches the cache.
    let empty = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_gpulet"))
        .args(["plugin", "check", gpulet_plugin_artifacts::FIXTURE_FORBIDDEN_IMPORT])
        .env("XDG_CACHE_HOME", empty.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("imports gpulet-test:forbidden/raw-network@0.1.0"));
    let cached = std::fs::read_dir(empty.path().join("gpulet/plugins")).map_or(0, |d| d.count());
    assert_eq!(cached, 0, "nothing was compiled");

    let out = gpulet(&["plugin", "check", "examples/snapshot.json"]);
    assert_eq!(out.status.code(), Some(1), "not a component");
    assert!(
        text(&out.stderr).contains("is not a valid WebAssembly component"),
        "{}",
        text(&out.stderr)
    );

    let out = gpulet(&["plugin", "run", budget, "--snapshot", "examples/snapshot.json", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let actions = v["actions"].as_array().unwrap();
    assert_eq!(actions.len(), 4);
    let total: f64 = actions.iter().map(|a| a["limit_w"].as_f64().unwrap()).sum();
    assert!(total <= 2000.0 + 1e-6, "the example's 2000 W budget: {total}");
    assert!(actions[0]["reason"].as_str().unwrap().contains("held down by its cap"));

    let out = gpulet(&[
        "plugin",
        "run",
        gpulet_plugin_artifacts::FIXTURE,
        "--snapshot",
        "examples/snapshot.json",
        "--config",
        r#"{"mode":"loop"}"#,
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("ran past its deadline and was stopped"));
}

#[test]
fn sighup_reloads_plugins_in_a_running_agent() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("gpulet.toml");
    let log = dir.path().join("t.jsonl");
    let write = |mode: &str| {
        let toml = format!(
            "{FAST}[telemetry]\nsink = \"file\"\npath = {log:?}\n[plugins]\ncache_dir = \"c\"\nstate_dir = \"s\"\n[[plugin]]\nname = \"fx\"\npath = {:?}\nconfig = {{ mode = {mode:?} }}\n",
            gpulet_plugin_artifacts::FIXTURE
        );
        std::fs::write(&cfg, toml).unwrap();
    };
    write("ok");
    let child = Command::new(env!("CARGO_BIN_EXE_gpulet"))
        .args(["run", "--config", cfg.to_str().unwrap()])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let wait_for = |what: &str| {
        let start = Instant::now();
        while !std::fs::read_to_string(&log).unwrap_or_default().contains(what) {
            assert!(start.elapsed() < Duration::from_secs(30), "no {what} in telemetry");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_for("\"plugin-loaded\"");
    write("bogus");
    let kill = |sig: &str| {
        assert!(
            Command::new("kill").args([sig, &child.id().to_string()]).status().unwrap().success()
        )
    };
    kill("-HUP");
    wait_for("\"kept_previous\":true");
    kill("-TERM");
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}
