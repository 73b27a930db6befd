//! Trying a policy on a recording before deploying it, as an operator does with the
//! built binary: `gpulet record` on the simulated demo node, then `plugin replay` (open
//! loop, and closed loop on the simulator with `--sim`) and `plugin diff`.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn gpulet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gpulet")).args(args).output().unwrap()
}

fn ok(out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    text
}

fn record(dir: &Path, ticks: u32) -> String {
    let trace = dir.join("demo.trace").display().to_string();
    ok(&gpulet(&["record", "--out", &trace, "--ticks", &ticks.to_string()]));
    trace
}

#[test]
fn a_recorded_trace_replays_open_and_closed_loop_and_diffs() {
    let dir = tempfile::tempdir().unwrap();
    let trace = record(dir.path(), 30);
    let text = std::fs::read_to_string(&trace).unwrap();
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 31, "a header and a line per tick");
    assert_eq!(
        (lines[0]["format"].as_str(), lines[0]["version"].as_u64()),
        (Some("gpulet-trace"), Some(1))
    );
    assert_eq!(lines[0]["gpus"].as_array().unwrap().len(), 8);
    assert!(
        lines[0]["config"].as_str().unwrap().contains("[[sim.gpu]]"),
        "a simulator recording keeps its config"
    );
    // The demo's static split: 500 W each under its 4000 W budget, applied at the first tick.
    assert_eq!(lines[1]["changes"].as_array().unwrap().len(), 8, "{}", lines[1]);
    assert!(lines[30]["limits_w"].as_array().unwrap().iter().all(|w| w == 500.0), "{}", lines[30]);

    let budget = gpulet_plugin_artifacts::POWER_BUDGET;
    let out = ok(&gpulet(&["plugin", "replay", budget, "--trace", &trace, "--json"]));
    let v: Value = serde_json::from_str(&out).unwrap();
    let ticks = v["ticks"].as_array().unwrap();
    assert_eq!(ticks.len(), 30);
    for t in ticks {
        let asked: f64 =
            t["actions"].as_array().unwrap().iter().map(|a| a["limit_w"].as_f64().unwrap()).sum();
        assert!(asked <= 4000.0 + 1e-6, "power-budget keeps to the budget: {t}");
        assert!(
            t["actions"][0]["reason"].as_str().unwrap().contains("4000 W budget")
                || t["actions"][0]["reason"].as_str().unwrap().contains("budget 4000 W"),
            "{t}"
        );
    }
    assert_eq!(v["summary"]["faults"], 0);
    assert_eq!(v["summary"]["mean_recorded_w"][0], 500.0);
    // Busy GPUs asked for more than the static split gave them; idle ones less.
    let asked: Vec<f64> = v["summary"]["mean_asked_w"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_f64().unwrap())
        .collect();
    assert!(asked.iter().any(|&w| w > 500.0) && asked.iter().any(|&w| w < 500.0), "{asked:?}");

    // Closed loop: the node run again with the plugin in charge; the same numbers twice.
    let closed = |_: ()| -> Value {
        let out = ok(&gpulet(&["plugin", "replay", budget, "--trace", &trace, "--sim", "--json"]));
        serde_json::from_str::<Value>(&out).unwrap()["closed_loop"].clone()
    };
    let c = closed(());
    assert_eq!(c, closed(()), "a closed-loop replay is deterministic");
    let (rec, plug) = (&c["recorded"], &c["plugin"]);
    assert_eq!(rec["ticks"], 30);
    assert_eq!(plug["ticks_over_budget"], 0, "{c}");
    assert!(
        plug["work_gpu_s"].as_f64().unwrap() > rec["work_gpu_s"].as_f64().unwrap(),
        "watts moved to the busy GPUs do more work: {c}"
    );
    // The recorded config run again uses what the recording used.
    let recorded_energy: f64 = {
        let e = |l: &Value| -> f64 {
            l["snapshot"]["gpus"]
                .as_array()
                .unwrap()
                .iter()
                .map(|g| g["energy_j"].as_f64().unwrap())
                .sum()
        };
        e(&lines[30]) - e(&lines[1])
    };
    let rerun = rec["energy_j"].as_f64().unwrap();
    assert!(
        (rerun - recorded_energy).abs() <= 0.01 * recorded_energy,
        "{rerun} vs {recorded_energy}"
    );

    // Diff: a plugin against itself agrees everywhere; against idle-saver it does not.
    let out = ok(&gpulet(&["plugin", "diff", budget, budget, "--trace", &trace]));
    assert!(out.contains("0 of 30 ticks decided differently"), "{out}");
    let idle = gpulet_plugin_artifacts::IDLE_SAVER;
    let out = ok(&gpulet(&["plugin", "diff", budget, idle, "--trace", &trace, "--json"]));
    let v: Value = serde_json::from_str(&out).unwrap();
    let differ = v["differ"].as_array().unwrap();
    assert!(!differ.is_empty() && differ.len() <= 30, "{v}");
    assert_eq!(v["a"]["ticks"], 30);
}

#[test]
fn a_trace_that_is_not_one_is_refused_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let trace = record(dir.path(), 3);
    let budget = gpulet_plugin_artifacts::POWER_BUDGET;
    let text = std::fs::read_to_string(&trace).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let write = |lines: &[String]| {
        let p = dir.path().join("bad.trace");
        std::fs::write(&p, lines.join("\n")).unwrap();
        p.display().to_string()
    };
    let refused = |path: &str, args: &[&str]| -> String {
        let mut all = vec!["plugin", "replay", budget, "--trace", path];
        all.extend_from_slice(args);
        let out = gpulet(&all);
        assert_eq!(out.status.code(), Some(1));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // A torn last line (a recording cut short mid-write).
    let mut torn = lines.clone();
    let cut = torn[3].len() / 2;
    torn[3].truncate(cut);
    let err = refused(&write(&torn), &[]);
    assert!(err.contains("line 4"), "{err}");
    // Another version.
    lines[0] = lines[0].replace("\"version\":1", "\"version\":7");
    let err = refused(&write(&lines), &[]);
    assert!(err.contains("version 7") && err.contains("reads \"gpulet-trace\" version 1"), "{err}");
    // A live node's trace (no config kept) cannot be run closed loop.
    lines[0] = lines[0].replace("\"version\":7", "\"version\":1");
    let mut header: Value = serde_json::from_str(&lines[0]).unwrap();
    header.as_object_mut().unwrap().remove("config");
    header["backend"] = "nvml".into();
    lines[0] = header.to_string();
    let err = refused(&write(&lines), &["--sim"]);
    assert!(err.contains("not a simulator recording"), "{err}");
}

/// `host.wall-clock` answers from the snapshot: in the agent, its time and the node's
/// UTC offset (a POSIX `TZ`, three hours east); in a replay, what was recorded, whatever
/// the replaying machine's time zone and clock say.
#[test]
fn the_wall_clock_is_the_snapshots_recorded_and_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("tz.trace").display().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_gpulet"))
        .args(["record", "--out", &trace, "--ticks", "5"])
        .env("TZ", "XYZ-3")
        .output()
        .unwrap();
    ok(&out);
    let text = std::fs::read_to_string(&trace).unwrap();
    let ticks: Vec<Value> =
        text.lines().skip(1).map(|l| serde_json::from_str(l).unwrap()).collect();
    for t in &ticks {
        assert_eq!(t["snapshot"]["utc_offset_s"], 10_800, "{t}");
        assert_eq!(t["snapshot"]["ts_ms"], t["ts_ms"], "{t}");
    }

    // The agent itself, under the same time zone: the fixture's metrics are the tick's.
    let config = dir.path().join("clock.toml");
    std::fs::write(
        &config,
        format!(
            "[socket]\nenabled = false\n[plugins]\ncache_dir = \"c\"\nstate_dir = \"s\"\n\
             [[sim.gpu]]\npreset = \"l40s\"\nworkload = \"idle\"\n[[plugin]]\nname = \"clock\"\npath = {:?}\n\
             config = {{ mode = \"clock\" }}\n",
            gpulet_plugin_artifacts::FIXTURE
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_gpulet"))
        .args(["run", "--config", config.to_str().unwrap(), "--ticks", "2", "--log-level", "error"])
        .current_dir(dir.path())
        .env("TZ", "XYZ-3")
        .output()
        .unwrap();
    let records: Vec<Value> =
        ok(&out).lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).collect();
    assert_eq!(records.len(), 2);
    for r in &records {
        let metric = |n: &str| {
            r["metrics"].as_array().unwrap().iter().find(|m| m["name"] == n).unwrap()["value"]
                .as_f64()
                .unwrap()
        };
        assert_eq!(metric("unix_ms"), r["ts_ms"].as_f64().unwrap(), "{r}");
        assert_eq!(metric("utc_offset_s"), 10_800.0, "{r}");
    }

    let out = Command::new(env!("CARGO_BIN_EXE_gpulet"))
        .args(["plugin", "replay", gpulet_plugin_artifacts::FIXTURE, "--trace", &trace])
        .args(["--config", r#"{"mode": "clock"}"#, "--json"])
        .env("TZ", "UTC0")
        .output()
        .unwrap();
    let v: Value = serde_json::from_str(&ok(&out)).unwrap();
    let replayed = v["ticks"].as_array().unwrap();
    assert_eq!(replayed.len(), ticks.len());
    for (r, t) in replayed.iter().zip(&ticks) {
        let want = format!("wall {} offset 10800", t["ts_ms"]);
        assert_eq!(r["actions"][0]["reason"], want.as_str(), "{r}");
    }
}

/// A reporter replayed over a recording: what it would have reported, tick by tick. The
/// demo node's GPU 1 loses its cooling at 120 s; the anomaly reporter flags it.
#[test]
fn a_reporter_replays_what_it_would_have_reported() {
    let dir = tempfile::tempdir().unwrap();
    let trace = record(dir.path(), 160);
    let anomaly = gpulet_plugin_artifacts::ANOMALY;
    let out = ok(&gpulet(&["plugin", "replay", anomaly, "--trace", &trace, "--json"]));
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["kind"], "reporter");
    assert_eq!(v["summary"]["ticks"], 160);
    assert_eq!(v["summary"]["faults"], 0);
    assert!(v["summary"]["metrics"].as_u64().unwrap() > 160, "{}", v["summary"]);
    let flagged: Vec<&Value> = v["ticks"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["events"].as_array().unwrap())
        .filter(|e| e["kind"] == "temp-departure")
        .collect();
    assert!(flagged.iter().any(|e| e["gpu"] == 1), "{}", v["summary"]);

    let text = ok(&gpulet(&["plugin", "replay", anomaly, "--trace", &trace]));
    assert!(text.contains("GPU 1 temp-departure: "), "{text}");
    let out = gpulet(&["plugin", "replay", anomaly, "--trace", &trace, "--sim"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("a reporter changes no limit"));
}
