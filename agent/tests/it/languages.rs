//! Policies in other languages, as their authors make them: a project from `gpulet
//! plugin new --lang python|js` (made from `examples/python-policy` and
//! `examples/js-policy`), its native tests, its build (componentize-py, componentize-js),
//! `plugin check`, and a run by `gpulet run` on the simulator. Their toolchains are
//! pinned by the build scripts and installed by `.ci/test`; a missing one fails loudly,
//! naming the fix.

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

/// A fresh project from `gpulet plugin new NAME --lang LANG`, in `dir`.
fn new_project(dir: &Path, name: &str, lang: &str) -> PathBuf {
    let project = dir.join(name);
    let _ = std::fs::remove_dir_all(&project);
    run(
        Command::new(env!("CARGO_BIN_EXE_gpulet"))
            .args(["plugin", "new", name, "--lang", lang, "--dir"])
            .arg(&project),
        "gpulet plugin new",
    );
    assert!(project.join("wit/policy.wit").exists());
    project
}

/// `plugin check` of the built `policy.wasm` in `dir` (a power plugin named `name`, of
/// this contract, importing nothing the host refuses: a default JavaScript build would
/// import wasi:http), then a run in the agent.
fn check_and_run(dir: &Path, name: &str) {
    let out = run(
        Command::new(env!("CARGO_BIN_EXE_gpulet"))
            .args(["plugin", "check"])
            .arg(dir.join("policy.wasm"))
            .env("XDG_CACHE_HOME", dir.join("xdg")),
        "gpulet plugin check",
    );
    assert!(
        out.contains(name)
            && out.contains("(power plugin, API 0.1.2)")
            && !out.contains("wasi:http"),
        "{out}"
    );
    check_limits(run_in_agent(&dir.join("policy.wasm"), dir));
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
/// reason, the busy ones at their highest (350 W), unless the simulated training's
/// checkpoint stall (4 s a minute, at a random phase, on the wall clock the run started
/// at) had a busy GPU idle at the end: then it is parked, with the policy's reason.
fn check_limits((changes, limits): (Vec<Value>, Vec<f64>)) {
    let last = |gpu: u64| changes.iter().rev().find(|e| e["gpu"] == gpu);
    let parked =
        |gpu: u64| last(gpu).is_some_and(|e| e["reason"].as_str().unwrap().starts_with("idle ("));
    for gpu in [0, 1] {
        let w = limits[gpu as usize];
        assert!(w == 350.0 || (w == 100.0 && parked(gpu)), "GPU {gpu}: {limits:?} {changes:#?}");
    }
    assert_eq!(limits[2..], [100.0, 100.0], "{changes:#?}");
    assert!(parked(2) && parked(3), "{changes:#?}");
}

#[test]
fn a_python_policy_builds_and_runs_in_the_agent() {
    let venv = repo().join("target/py");
    assert!(
        venv.join("bin/python").exists(),
        "\n*** {} is missing: .ci/test makes it (python3 -m venv target/py) ***\n",
        venv.display()
    );
    let dir = work("python");
    let project = new_project(&dir, "py-policy", "python");
    // Its logic, natively.
    run(
        Command::new(venv.join("bin/python")).args(["-m", "unittest", "-q"]).current_dir(&project),
        "the Python unit tests",
    );
    run(
        Command::new(project.join("build.sh")).env("VENV", &venv).env("OUT", &dir),
        "the project's build.sh",
    );
    check_and_run(&dir, "py-policy");
}

#[test]
fn a_javascript_policy_builds_and_runs_in_the_agent() {
    let node = Command::new("node").arg("--version").output();
    assert!(
        node.is_ok_and(|o| o.status.success()),
        "\n*** Node.js is missing: the JavaScript policy needs node (20 or newer) and npm ***\n"
    );
    let dir = work("js");
    let project = new_project(&dir, "js-policy", "js");
    // The build installs the pinned packages (npm ci).
    run(Command::new(project.join("build.sh")).env("OUT", &dir), "the project's build.sh");
    run(
        Command::new("node").args(["--test", "policy.test.js"]).current_dir(&project),
        "the JavaScript unit tests",
    );
    check_and_run(&dir, "js-policy");
}
