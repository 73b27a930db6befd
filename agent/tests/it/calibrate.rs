//! `gpulet calibrate` on the simulator, end to end: the command writes the curves, the
//! agent reads them at start and publishes them in its birth message, and hands them to
//! power plugins in the snapshot.

use std::process::Command;

use serde_json::Value;

const NODE: &str = "[[sim.gpu]]\npreset = \"h100-sxm\"\nworkload = \"training\"\ncount = 2\n[[sim.gpu]]\npreset = \"l40s\"\nworkload = \"idle\"\n[calibration]\nfile = \"cal/calibration.json\"\n";

fn calibrate(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::fs::write(dir.join("gpulet.toml"), NODE).unwrap();
    Command::new(env!("CARGO_BIN_EXE_gpulet"))
        .args(["calibrate", "--config", "gpulet.toml"])
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

#[test]
fn calibrate_writes_curves_that_the_agent_publishes() {
    let dir = tempfile::tempdir().unwrap();
    let out = calibrate(dir.path(), &["--steps", "4", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let file: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("cal/calibration.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(printed, file);
    assert_eq!(
        (file["load"].as_str(), file["unit"].as_str()),
        (Some("sim-compute"), Some("GPU-s/s"))
    );
    let gpus = file["gpus"].as_array().unwrap();
    assert_eq!(gpus.len(), 3);
    // The L40S: 350 W down to 100 W in 4 steps, work falling with the limit.
    let l40s: Vec<(f64, f64)> = gpus[2]["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["limit_w"].as_f64().unwrap(), p["relative"].as_f64().unwrap()))
        .collect();
    assert_eq!(l40s.iter().map(|p| p.0).collect::<Vec<_>>(), [350.0, 267.0, 183.0, 100.0]);
    assert!(l40s[0].1 == 1.0 && l40s.windows(2).all(|w| w[1].1 < w[0].1), "{l40s:?}");

    // The agent started on the same node finds the curves by UUID.
    let h = crate::harness_in(NODE, dir.path());
    let birth = h.agent.describe().birth;
    assert_eq!(birth["calibration"]["load"], "sim-compute");
    for (i, g) in birth["gpus"].as_array().unwrap().iter().enumerate() {
        assert_eq!(g["curve"], gpus[i]["points"], "GPU {i}");
    }

    // A damaged file: the agent runs, without curves.
    std::fs::write(dir.path().join("cal/calibration.json"), "{\"schema\":").unwrap();
    let mut h = crate::harness_in(NODE, dir.path());
    h.agent.tick();
    let birth = h.agent.describe().birth;
    assert!(birth["calibration"].is_null() && birth["gpus"][0]["curve"].is_null(), "{birth}");
}

#[test]
fn bad_calibrate_arguments_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    for (args, says) in [
        (&["--steps", "1"][..], "invalid value"),
        (&["--steps", "51"], "invalid value"),
        (&["--measure", "soon"], "invalid value"),
        (&["--measure", "0s"], "--measure: 0s is too short; accepted: 100ms or more"),
    ] {
        let out = calibrate(dir.path(), args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    assert!(!dir.path().join("cal").exists());
}
