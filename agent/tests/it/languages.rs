//! Policies in other languages, built from source as their authors build them and run
//! by `gpulet run` on the simulator: `examples/python-policy` (componentize-py) and
//! `examples/js-policy` (componentize-js). Their toolchains are pinned by their build
//! scripts and installed by `.ci/test`; a missing one fails loudly, naming the fix.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::repo;

/// Where the built components and the agent's compile cache go (kept between runs: a
/// component with an interpreter takes tens of seconds to compile the first time).
fn work(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("languages").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn run(c: &mut Command, what: &str) -> String {
    let out = c.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{what} failed:\n{text}");
    text
}

/// `gpulet run` on a small simulated node (2 busy GPUs, 2 idle) with `wasm` as its only
/// power plugin, for 5 simulated seconds; the changes it made (`limit-changed` events)
/// and the limits in force at the end.
fn run_in_agent(wasm: &Path, dir: &Path) -> (Vec<Value>, Vec<f64>) {
    // Raises are not rate-limited here: a GPU parked on the first tick, before its
    // workload started, is given its highest limit back on the next.
    let toml = format!(
        "tick = \"100ms\"\n[power]\nraise_interval = \"0s\"\n[[sim.gpu]]\npreset = \"l40s\"\nworkload = \"training\"\ncount = 2\n\
         [[sim.gpu]]\npreset = \"l40s\"\nworkload = \"idle\"\ncount = 2\n\
         [plugins]\ncache_dir = \"cache\"\nstate_dir = \"state\"\n\
         [[plugin]]\nname = \"policy\"\npath = {:?}\ngrants = [\"lower\", \"raise\"]\nmemory_mib = 256\ndeadline = \"100ms\"\n",
        wasm.display().to_string()
    );
    std::fs::write(dir.join("gpulet.toml"), toml).unwrap();
    let out = run(
        Command::new(env!("CARGO_BIN_EXE_gpulet"))
            .args(["run", "--config", "gpulet.toml", "--ticks", "50", "--log-level", "warn"])
            .current_dir(dir),
        "gpulet run",
    );
    let records: Vec<Value> =
        out.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).collect();
    let events: Vec<Value> =
        records.iter().flat_map(|r| r["events"].as_array().cloned().unwrap_or_default()).collect();
    assert!(
        !events.iter().any(|e| e["kind"] == "plugin-fault" || e["kind"] == "plugin-load-failed"),
        "{events:#?}"
    );
    let last = records.last().expect("records");
    let limits = last["gpus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["power_limit_w"].as_f64().unwrap())
        .collect();
    let changes = events
        .into_iter()
        .filter(|e| e["kind"] == "limit-changed" && e["source"] == "policy")
        .collect();
    (changes, limits)
}

/// The idle GPUs parked at their lowest limit (100 W on an L40S) with the policy's
/// reason, the busy ones at their highest (350 W).
fn check_limits((changes, limits): (Vec<Value>, Vec<f64>)) {
    assert_eq!(limits, [350.0, 350.0, 100.0, 100.0], "{changes:#?}");
    for gpu in [2, 3] {
        let parked = changes.iter().rev().find(|e| e["gpu"] == gpu).unwrap();
        assert!(parked["reason"].as_str().unwrap().starts_with("idle ("), "{parked}");
    }
}

#[test]
fn a_python_policy_builds_and_runs_in_the_agent() {
    let venv = repo().join("target/py");
    assert!(
        venv.join("bin/python").exists(),
        "\n*** {} is missing: .ci/test makes it (python3 -m venv target/py) ***\n",
        venv.display()
    );
    let example = repo().join("examples/python-policy");
    // Its logic, natively.
    run(
        Command::new(venv.join("bin/python")).args(["-m", "unittest", "-q"]).current_dir(&example),
        "the Python unit tests",
    );
    let dir = work("python");
    run(
        Command::new(example.join("build.sh")).env("VENV", &venv).env("OUT", &dir),
        "examples/python-policy/build.sh",
    );
    check_limits(run_in_agent(&dir.join("policy.wasm"), &dir));
}

#[test]
fn a_javascript_policy_builds_and_runs_in_the_agent() {
    let node = Command::new("node").arg("--version").output();
    assert!(
        node.is_ok_and(|o| o.status.success()),
        "\n*** Node.js is missing: the JavaScript policy needs node (20 or newer) and npm ***\n"
    );
    let example = repo().join("examples/js-policy");
    let dir = work("js");
    // The build installs the pinned packages (npm ci) the first time.
    run(Command::new(example.join("build.sh")).env("OUT", &dir), "examples/js-policy/build.sh");
    run(
        Command::new("node").args(["--test", "policy.test.js"]).current_dir(&example),
        "the JavaScript unit tests",
    );
    // No wasi:http, and nothing else the host refuses.
    let out = run(
        Command::new(env!("CARGO_BIN_EXE_gpulet"))
            .args(["plugin", "check"])
            .arg(dir.join("policy.wasm"))
            .env("XDG_CACHE_HOME", dir.join("xdg")),
        "gpulet plugin check",
    );
    assert!(out.contains("(power plugin, API 0.1.2)") && !out.contains("wasi:http"), "{out}");
    check_limits(run_in_agent(&dir.join("policy.wasm"), &dir));
}
