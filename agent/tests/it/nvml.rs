//! The NVML backend's real code path (nvml-wrapper, the C ABI, NVML's return codes)
//! against the stand-in `libnvidia-ml` (`nvml-standin/`), which serves the simulator.
//! Each test runs gpulet as a process: the stand-in's state is per process, as a
//! driver's is per machine.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The stand-in library, built beside this test binary by `cargo test` at the workspace
/// root (it is a default member).
fn standin() -> PathBuf {
    // Test binaries and the libraries cargo builds for them share `target/<profile>/deps`.
    let exe = std::env::current_exe().unwrap();
    let lib = exe.parent().unwrap().join("libgpulet_nvml_standin.so");
    assert!(
        lib.exists(),
        "{} is missing: run the tests from the workspace root (`cargo test`), or build it with `cargo build -p gpulet-nvml-standin`",
        lib.display()
    );
    lib
}

fn gpulet(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_gpulet"));
    c.args(args)
        .env("GPULET_NVML_LIBRARY", standin())
        .env("GPULET_NVML_STANDIN", dir)
        .current_dir(dir);
    c
}

/// A 500 W budget over the two GPUs (250 W each), the start limits kept in the test's folder.
const BUDGET: &str =
    "backend = \"nvml\"\ntick = \"50ms\"\n[power]\nbudget_w = 500\n[nvml]\nstate_dir = \"state\"\n";

/// Two L40S on the stand-in.
fn node(dir: &Path) {
    std::fs::write(
        dir.join("node.toml"),
        "[[gpu]]\npreset = \"l40s\"\nworkload = \"inference\"\ncount = 2\n",
    )
    .unwrap();
}

#[test]
fn inventory_through_nvml() {
    let dir = tempfile::tempdir().unwrap();
    let out = gpulet(dir.path(), &["inventory", "--backend", "nvml", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let inv: Value = serde_json::from_slice(&out.stdout).unwrap();
    let gpus = inv.as_array().unwrap();
    assert_eq!(gpus.len(), 8, "the stand-in's default node: 8 × H100");
    assert_eq!(gpus[0]["name"], "NVIDIA H100 80GB HBM3");
    assert_eq!(
        (gpus[3]["power_limit"]["min_w"].as_f64(), gpus[3]["power_limit"]["max_w"].as_f64()),
        (Some(200.0), Some(700.0))
    );
    assert!(gpus[0]["uuid"].as_str().unwrap().starts_with("GPU-"));
    assert!(gpus[0]["memory_total_mib"].as_u64().unwrap() > 80_000);
    // Every field probed: all supported but retired pages (Hopper remaps rows instead).
    let fields = gpus[0]["fields"].as_array().unwrap();
    assert_eq!(fields.len(), 12, "{fields:?}");
    assert!(!fields.iter().any(|f| f == "retired_pages") && fields.iter().any(|f| f == "ecc"));
    assert_eq!(gpus[0]["can_set_power_limit"], true);
    assert_eq!(
        (gpus[1]["pci_bus_id"].as_str(), gpus[1]["mig_enabled"].as_bool()),
        (Some("00000000:19:00.0"), None)
    );
    let out = gpulet(dir.path(), &["inventory", "--backend", "nvml"]).output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("driver: 550.54.15-standin, CUDA 12.4"), "{table}");
}

struct Running {
    child: Child,
    lines: BufReader<ChildStdout>,
}

impl Running {
    fn start(dir: &Path, toml: &str) -> Running {
        std::fs::write(dir.join("gpulet.toml"), toml).unwrap();
        let mut child = gpulet(dir, &["run", "--config", "gpulet.toml"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap());
        Running { child, lines }
    }

    /// Records until one matches `pred` (at most 10 s); returns all read.
    fn until(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        let t = Instant::now();
        let mut seen = Vec::new();
        let mut line = String::new();
        while t.elapsed() < Duration::from_secs(10) {
            line.clear();
            if self.lines.read_line(&mut line).unwrap() == 0 {
                break;
            }
            let v: Value = serde_json::from_str(&line).unwrap();
            let done = pred(&v);
            seen.push(v);
            if done {
                return seen;
            }
        }
        panic!("no record with {what}; last: {:?}", seen.last());
    }
}

impl Running {
    /// The next `n` records.
    fn records(&mut self, n: usize) -> Vec<Value> {
        let count = std::cell::Cell::new(0);
        self.until(&format!("{n} records"), |_| {
            count.set(count.get() + 1);
            count.get() >= n
        })
    }

    /// Send the agent a signal (`-TERM`, `-USR1`).
    fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([sig, &self.child.id().to_string()]).status().unwrap();
        assert!(ok.success());
    }

    /// SIGTERM, and the exit status.
    fn stop(mut self) -> std::process::ExitStatus {
        self.signal("-TERM");
        self.child.wait().unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn control(dir: &Path, line: &str) {
    let mut f =
        std::fs::OpenOptions::new().create(true).append(true).open(dir.join("control")).unwrap();
    writeln!(f, "{line}").unwrap();
}

fn events<'a>(records: &'a [Value], kind: &str) -> Vec<&'a Value> {
    records
        .iter()
        .flat_map(|r| r["events"].as_array().into_iter().flatten())
        .filter(|e| e["kind"] == kind)
        .collect()
}

#[test]
fn the_agent_runs_on_nvml_sets_limits_and_survives_a_lost_gpu() {
    let dir = tempfile::tempdir().unwrap();
    node(dir.path());
    let mut agent = Running::start(dir.path(), BUDGET);
    let first = agent.until("a record", |_| true);
    let r = &first[0];
    assert_eq!(r["backend"], "nvml");
    assert!(r["gpus"][0]["power_w"].as_f64().unwrap() > 0.0);
    assert!(r["gpus"][1]["energy_j"].is_number() && r["gpus"][1]["throttle"].is_array());
    // The budget is applied through NVML, and read back as the enforced limit.
    let changed = events(&first, "limit-changed");
    assert_eq!(changed.len(), 2, "{first:?}");
    assert_eq!(changed[0]["to_w"], 250.0);
    let set = std::fs::read_to_string(dir.path().join("set.log")).unwrap();
    assert_eq!(set.lines().count(), 2, "{set}");
    let later = agent.until("the enforced limits", |r| r["gpus"][0]["power_limit_w"] == 250.0);
    assert!(later.last().unwrap()["gpus"][1]["power_limit_w"] == 250.0);
    // The busy GPU's process, through nvmlDeviceGetComputeRunningProcesses_v3.
    let busy = agent.until("a process on GPU 0", |r| {
        r["gpus"][0]["processes"].as_array().is_some_and(|p| !p.is_empty())
    });
    let g0 = &busy.last().unwrap()["gpus"][0];
    assert_eq!(g0["processes"], serde_json::json!([{"pid": 4000, "used_mib": g0["mem_used_mib"]}]));

    // Someone runs `nvidia-smi -pl 300` on GPU 0: the drift is reported once, and the
    // desired limit put back.
    control(dir.path(), "set 0 300");
    let drift =
        agent.until("the drift", |r| !events(std::slice::from_ref(r), "limit-drift").is_empty());
    let d = events(&drift, "limit-drift")[0].clone();
    assert_eq!(
        (d["gpu"].as_u64(), d["expected_w"].as_f64(), d["found_w"].as_f64()),
        (Some(0), Some(250.0), Some(300.0))
    );
    let mut back = agent.until("the limit put back", |r| r["gpus"][0]["power_limit_w"] == 250.0);
    assert!(events(&back, "limit-drift").is_empty(), "reported once");
    // The drift is seen when sampling; the guard puts the limit back in the same tick.
    back.extend(drift);
    let fixed = events(&back, "limit-changed");
    assert!(
        fixed.iter().any(|e| e["gpu"] == 0 && e["from_w"] == 300.0 && e["to_w"] == 250.0),
        "{back:?}"
    );

    // GPU 1 falls off the bus: it is lost, GPU 0 goes on.
    control(dir.path(), "lost 1");
    let after = agent.until("GPU 1 lost", |r| r["gpus"][1]["health"] == "lost");
    let r = after.last().unwrap();
    assert_eq!(r["gpus"][0]["health"], "ok");
    assert!(r["gpus"][0]["power_w"].as_f64().unwrap() > 0.0);
    assert!(r["gpus"][1]["errors"]["power_w"].as_str().unwrap().contains("not answering"));
    assert_eq!(events(&after, "health").len(), 1);
}

#[test]
fn no_permission_to_set_is_reported_once_and_monitoring_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    node(dir.path());
    control(dir.path(), "deny-set");
    let mut agent = Running::start(dir.path(), BUDGET);
    let records = agent.records(20);
    let failed = events(&records, "limit-failed");
    assert_eq!(failed.len(), 2, "once per GPU, not every tick: {failed:?}");
    assert!(
        failed[0]["error"].as_str().unwrap().contains("run as root or with CAP_SYS_ADMIN"),
        "{}",
        failed[0]
    );
    assert!(records.iter().all(|r| r["gpus"][0]["power_w"].is_number()), "monitoring goes on");
}

#[test]
fn limits_found_at_start_are_put_back_at_stop_and_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    node(dir.path());
    let saved = dir.path().join("state/start-limits.json");
    let set_log = || std::fs::read_to_string(dir.path().join("set.log")).unwrap_or_default();

    // A clean stop puts the L40S's 350 W back.
    let mut agent = Running::start(dir.path(), BUDGET);
    agent.until("the budget applied", |r| r["gpus"][1]["power_limit_w"] == 250.0);
    assert!(saved.exists());
    assert!(agent.stop().success());
    assert_eq!(set_log(), "0 250\n1 250\n0 350\n1 350\n");
    assert!(!saved.exists(), "nothing left to restore");

    // A crash leaves the limits where the agent set them. The next start plans the old
    // ones through the guard (source `restore`, for the GPUs no policy decides): under the
    // budget they stay at 250 W, never above it for a moment, and they are still what
    // the next clean stop puts back.
    let mut agent = Running::start(dir.path(), BUDGET);
    agent.until("the budget applied", |r| r["gpus"][1]["power_limit_w"] == 250.0);
    drop(agent); // SIGKILL
    assert!(saved.exists());
    let before = set_log().len();
    let mut agent = Running::start(dir.path(), BUDGET);
    agent.records(5);
    // (The stand-in's GPUs start again at 350 W in a new process: the agent sets 250.)
    let after = set_log()[before..].to_owned();
    assert!(!after.is_empty());
    for line in after.lines() {
        let w: f64 = line.split(' ').nth(1).unwrap().parse().unwrap();
        assert!(w <= 250.0, "{w} W set: above the budget's share ({after})");
    }
    assert!(agent.stop().success());
    assert!(set_log().ends_with("0 350\n1 350\n"));

    // Without a budget, the restore is a decision like any other and reaches the GPUs.
    let free = "backend = \"nvml\"\ntick = \"50ms\"\n[nvml]\nstate_dir = \"state\"\n";
    std::fs::write(&saved, br#"{"GPU-00000000-0000-4000-8000-000000000000": 300}"#).unwrap();
    let uuid = |r: &Value| r["gpus"][0]["uuid"].as_str().unwrap().to_owned();
    let mut agent = Running::start(dir.path(), free);
    let first = agent.until("a record", |_| true);
    let uuid0 = uuid(&first[0]);
    drop(agent);
    std::fs::write(&saved, format!("{{\"{uuid0}\": 300}}")).unwrap();
    let mut agent = Running::start(dir.path(), free);
    let first = agent.until("a record", |_| true);
    let restored: Vec<_> =
        events(&first, "limit-changed").into_iter().filter(|e| e["source"] == "restore").collect();
    assert_eq!(restored.len(), 1, "{first:?}");
    assert_eq!((restored[0]["gpu"].as_u64(), restored[0]["to_w"].as_f64()), (Some(0), Some(300.0)));
    // The node's own limit, put back: not a policy's to release (guard rule 3).
    let seq = first.last().unwrap()["seq"].as_u64().unwrap();
    let later = agent.until("40 more records", |r| r["seq"].as_u64().unwrap() >= seq + 40);
    assert!(later.iter().all(|r| r["gpus"][0]["power_limit_w"] == 300.0), "{later:?}");
    assert!(agent.stop().success());
}

#[test]
fn a_torn_start_limits_file_is_set_aside_and_the_agent_manages_the_gpus() {
    // An empty file, as a power loss right after a start can leave: the review saw the
    // agent refuse to start, leaving the node without power management.
    let dir = tempfile::tempdir().unwrap();
    node(dir.path());
    std::fs::create_dir_all(dir.path().join("state")).unwrap();
    std::fs::write(dir.path().join("state/start-limits.json"), b"").unwrap();
    let mut agent = Running::start(dir.path(), BUDGET);
    let records = agent.until("the budget applied", |r| r["gpus"][1]["power_limit_w"] == 250.0);
    let aside = events(&records, "state-set-aside");
    assert_eq!(aside.len(), 1, "{records:?}");
    assert!(aside[0]["path"].as_str().unwrap().ends_with("state/start-limits.json"));
    assert!(aside[0]["moved_to"].as_str().unwrap().contains("start-limits.json.bad-"));
    let kept: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("state/start-limits.json")).unwrap())
            .unwrap();
    assert_eq!(kept.as_object().unwrap().len(), 2, "the limits found now are kept instead");
    assert!(agent.stop().success());
}

#[test]
fn a_gpu_that_refuses_a_change_is_planned_at_what_it_enforces() {
    // The review: GPU 0 refuses (but answers) and stays at 350 W; the others were set as
    // if it had obeyed, 100 W over the budget for as long as the fault lasted.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("node.toml"),
        "[[gpu]]\npreset = \"l40s\"\nworkload = \"inference\"\ncount = 4\n",
    )
    .unwrap();
    control(dir.path(), "deny-set 0");
    let toml = "backend = \"nvml\"\ntick = \"50ms\"\n[power]\nbudget_w = 1000\n";
    let mut agent = Running::start(dir.path(), toml);
    let records = agent.records(10);
    let total = |r: &Value| -> f64 {
        r["gpus"].as_array().unwrap().iter().map(|g| g["power_limit_w"].as_f64().unwrap()).sum()
    };
    assert_eq!(records[9]["gpus"][0]["power_limit_w"], 350.0, "GPU 0 kept its limit");
    // The first tick learns that GPU 0 refuses; from the next, the sum holds.
    // (Records round limits to 10 mW; the agent floors them to whole mW.)
    for r in &records[2..] {
        assert!(total(r) <= 1000.0 + 0.03, "{} W over the 1000 W budget: {r}", total(r));
    }
    let others = records[9]["gpus"][1]["power_limit_w"].as_f64().unwrap();
    assert!((others - 650.0 / 3.0).abs() < 0.02, "the rest share 650 W: {others}");
    assert_eq!(events(&records, "limit-failed").len(), 1, "reported once");
}

#[test]
fn xid_events_arrive_through_the_event_api() {
    let dir = tempfile::tempdir().unwrap();
    node(dir.path());
    let toml = "backend = \"nvml\"\ntick = \"50ms\"\n[nvml]\nstate_dir = \"state\"\n";
    let mut agent = Running::start(dir.path(), toml);
    agent.until("a record", |_| true);
    // The XID watcher runs on a thread of its own: inject once it listens.
    wait_for(&dir.path().join("events.log"), "registered 1\n");
    control(dir.path(), "xid 1 48");
    let recs = agent.until("the XID", |r| !events(std::slice::from_ref(r), "xid").is_empty());
    let x = events(&recs, "xid")[0].clone();
    assert_eq!(
        (x["gpu"].as_u64(), x["code"].as_u64(), x["count"].as_u64()),
        (Some(1), Some(48), Some(1))
    );
    assert_eq!(x["severity"], "critical");
    let recs = agent.until("GPU 1 degraded", |r| r["gpus"][1]["health"] == "degraded");
    let last = recs.last().unwrap();
    assert_eq!(last["gpus"][0]["health"], "ok");
    // The double-bit error behind XID 48 is in GPU 1's ECC count and a pending row
    // remapping, read through nvmlDeviceGetTotalEccErrors and nvmlDeviceGetRemappedRows.
    let (g0, g1) = (&last["gpus"][0], &last["gpus"][1]);
    assert_eq!(g1["ecc"], serde_json::json!({"corrected": 0, "uncorrected": 1}));
    assert_eq!(
        g1["remapped_rows"],
        serde_json::json!({"correctable": 0, "uncorrectable": 1, "pending": true, "failed": false})
    );
    assert_eq!(
        (g0["ecc"]["uncorrected"].as_u64(), g0["remapped_rows"]["pending"].as_bool()),
        (Some(0), Some(false))
    );
    assert!(g0["retired_pages"].is_null(), "unsupported on this SKU: {g0}");
    assert_eq!(g0["mem_clock_mhz"].as_u64(), Some(9001), "{g0}");
    // A repeat within the debounce window (10 s by default) is not reported again.
    control(dir.path(), "xid 1 48");
    control(dir.path(), "xid 0 31");
    let recs = agent.until("the other XID", |r| !events(std::slice::from_ref(r), "xid").is_empty());
    let xs = events(&recs, "xid");
    assert_eq!(
        (xs.len(), xs[0]["gpu"].as_u64(), xs[0]["code"].as_u64()),
        (1, Some(0), Some(31)),
        "{xs:?}"
    );
    // On the node, after dealing with it: SIGUSR1 clears the sticky state.
    assert_eq!(recs.last().unwrap()["gpus"][1]["health"], "degraded");
    agent.signal("-USR1");
    let recs = agent.until("GPU 1 healthy again", |r| r["gpus"][1]["health"] == "ok");
    let h = events(&recs, "health");
    assert_eq!((h[0]["gpu"].as_u64(), h[0]["to"].as_str()), (Some(1), Some("ok")), "{h:?}");
}

#[test]
fn energy_is_integrated_where_the_gpu_has_no_counter() {
    let dir = tempfile::tempdir().unwrap();
    node(dir.path());
    control(dir.path(), "unsupported 1 energy_j");
    let toml = "backend = \"nvml\"\ntick = \"50ms\"\n[nvml]\nstate_dir = \"state\"\n";
    let mut agent = Running::start(dir.path(), toml);
    let recs = agent.records(20);
    let e1: Vec<f64> = recs.iter().map(|r| r["gpus"][1]["energy_j"].as_f64().unwrap()).collect();
    assert!(e1[0] < 1.0, "integrated from 0 when the backend opened: {}", e1[0]);
    assert!(e1.windows(2).all(|w| w[1] >= w[0]) && *e1.last().unwrap() > 0.0, "{e1:?}");
    // The same trapezoids over the records' own power and timestamps.
    let at = |i: usize, k: &str| recs[i]["gpus"][1][k].as_f64().unwrap();
    let ts = |i: usize| recs[i]["ts_ms"].as_f64().unwrap() / 1000.0;
    let expected: f64 = (0..19)
        .map(|i| (at(i, "power_w") + at(i + 1, "power_w")) / 2.0 * (ts(i + 1) - ts(i)))
        .sum();
    let got = e1[19] - e1[0];
    assert!((got - expected).abs() < 0.25 * expected, "{got} J vs ~{expected} J");
}

#[test]
fn calibrate_and_diag_without_cuda_say_so_and_touch_nothing() {
    let dir = tempfile::tempdir().unwrap();
    node(dir.path());
    for args in [&["calibrate", "--backend", "nvml"][..], &["diag"]] {
        let out = gpulet(dir.path(), args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        // Here (no driver): libcuda is missing. With a driver, the stand-in's GPUs are
        // not CUDA's.
        assert!(
            err.contains("libcuda.so.1") || err.contains("not visible to CUDA"),
            "{args:?}: {err}"
        );
    }
    assert!(!dir.path().join("set.log").exists(), "no limit was touched");
    assert!(!dir.path().join("calibration.json").exists());
}

/// gpulet with the stand-in as libcuda too (a `libcuda.so.1` link to it in `dir`, found
/// through `LD_LIBRARY_PATH` as the real one is found through the loader's paths).
fn with_cuda(dir: &Path, args: &[&str]) -> Command {
    for name in ["libcuda.so.1", "libcuda.so"] {
        let link = dir.join(name);
        if !link.exists() {
            std::os::unix::fs::symlink(standin(), link).unwrap();
        }
    }
    let mut c = gpulet(dir, args);
    c.env("LD_LIBRARY_PATH", dir);
    c
}

#[test]
fn diag_through_cuda_passes_fails_and_skips_per_gpu() {
    let dir = tempfile::tempdir().unwrap();
    node(dir.path());
    let diag =
        |dir: &Path| with_cuda(dir, &["diag", "--memory-mib", "8", "--json"]).output().unwrap();
    let out = diag(dir.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((r[0]["ok"].as_bool(), r[1]["ok"].as_bool()), (Some(true), Some(true)), "{r}");
    assert_eq!(r[1]["memory_mib"], 8);
    assert!(r[0]["gflop_s"].as_f64().unwrap() > 0.0 && r[0]["read_gb_s"].as_f64().unwrap() > 0.0);
    // GPU 1 computes wrongly, GPU 0 is held by another process.
    control(dir.path(), "cuda-corrupt 1");
    control(dir.path(), "cuda-busy 0");
    let out = diag(dir.path());
    assert_eq!(out.status.code(), Some(1));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(r[0]["skipped"].as_str().unwrap().contains("busy"), "{r}");
    let e = r[1]["error"].as_str().unwrap();
    assert!(e.contains("checking the kernel's result") && e.contains("drain and reset it"), "{e}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("1 of 2 GPUs failed the check"));
}

#[test]
fn calibrate_through_nvml_and_cuda_sweeps_and_puts_the_limits_back() {
    let dir = tempfile::tempdir().unwrap();
    node(dir.path());
    let toml =
        "backend = \"nvml\"\n[nvml]\nstate_dir = \"state\"\n[calibration]\nfile = \"cal.json\"\n";
    std::fs::write(dir.path().join("c.toml"), toml).unwrap();
    let args = [
        "calibrate",
        "--config",
        "c.toml",
        "--steps",
        "3",
        "--warmup",
        "100ms",
        "--measure",
        "300ms",
    ];
    let out = with_cuda(dir.path(), &args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let c: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("cal.json")).unwrap())
            .unwrap();
    assert_eq!((c["load"].as_str(), c["unit"].as_str()), (Some("cuda-fp32-fma"), Some("GFLOP/s")));
    // (The stand-in's kernel runs on this CPU, whatever the limit: only the plumbing
    // counts here, not the curve's shape.)
    let mut work = 0.0;
    for g in c["gpus"].as_array().unwrap() {
        let points = g["points"].as_array().unwrap();
        let limits: Vec<f64> = points.iter().map(|p| p["limit_w"].as_f64().unwrap()).collect();
        assert_eq!(limits, [350.0, 225.0, 100.0]);
        work += points.iter().map(|p| p["work_per_s"].as_f64().unwrap()).sum::<f64>();
    }
    assert!(work > 0.0, "the kernel's launches were counted: {c}");
    // Every limit the sweep set went through NVML, and the ones found were put back.
    let set = std::fs::read_to_string(dir.path().join("set.log")).unwrap();
    let lines: Vec<&str> = set.lines().collect();
    assert_eq!(lines, ["0 350", "1 350", "0 225", "1 225", "0 100", "1 100", "0 350", "1 350"]);
    assert!(!dir.path().join("state/start-limits.json").exists(), "removed once put back");

    // Mid-sweep, at the lowest limit (the second of two steps, 2 s each)...
    let slow =
        ["calibrate", "--config", "c.toml", "--steps", "2", "--warmup", "2s", "--measure", "100ms"];
    let at_lowest = |dir: &Path, stderr: Stdio| {
        let _ = std::fs::remove_file(dir.join("set.log"));
        let child = with_cuda(dir, &slow).stderr(stderr).spawn().unwrap();
        wait_for(&dir.join("set.log"), "0 100\n1 100\n");
        assert!(dir.join("state/start-limits.json").exists(), "kept while the sweep runs");
        child
    };
    // ... SIGTERM: the limits are put back at once, and it says so.
    let mut child = at_lowest(dir.path(), Stdio::piped());
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("calibration interrupted; the limits found at start were put back"),
        "{err}"
    );
    let set = std::fs::read_to_string(dir.path().join("set.log")).unwrap();
    assert!(set.ends_with("0 100\n1 100\n0 350\n1 350\n"), "{set}");
    assert!(!dir.path().join("state/start-limits.json").exists());
    // ... SIGKILL: the agent's next start puts them back.
    let mut child = at_lowest(dir.path(), Stdio::null());
    child.kill().unwrap();
    child.wait().unwrap();
    let out = gpulet(dir.path(), &["run", "--config", "c.toml", "--ticks", "1"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // (The agent puts them back at start, and once more at its own stop.)
    let set = std::fs::read_to_string(dir.path().join("set.log")).unwrap();
    assert!(
        set.contains("0 100\n1 100\n0 350\n1 350\n") && set.ends_with("0 350\n1 350\n"),
        "{set}"
    );
    assert!(!dir.path().join("state/start-limits.json").exists());
}

/// Wait (at most 60 s: a loaded CI machine is slow, a hung sweep is not) until the file
/// at `path` holds `text`.
fn wait_for(path: &Path, text: &str) {
    let t = Instant::now();
    while !std::fs::read_to_string(path).is_ok_and(|s| s.contains(text)) {
        assert!(t.elapsed() < Duration::from_secs(60), "{} never held {text:?}", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}
