//! Containment, tested the way the agent runs: `gpulet run` as a process of its own, on
//! its own runtime and threads, with hostile plugins, commands, files and GPU faults.
//! Each test here is one finding of the containment review (issue 10): it failed before
//! the fix.

use std::collections::BTreeMap;
use std::process::{Command, Output};

use serde_json::Value;

use crate::repo;

fn gpulet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gpulet")).args(args).current_dir(repo()).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn records(out: &[u8]) -> Vec<Value> {
    text(out).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Every event of `kind` in `records`.
fn events<'a>(records: &'a [Value], kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    records
        .iter()
        .flat_map(|r| r["events"].as_array().into_iter().flatten())
        .filter(move |e| e["kind"] == kind)
}

#[test]
fn hostile_plugins_cost_only_themselves_in_gpulet_run() {
    // Each mode once, in one agent: the review's `trap` and `trap-once` ended `gpulet run`
    // on the first tick (a guest's panic message is a blocking WASI write, which panicked
    // inside the agent's runtime).
    let modes = ["trap", "trap-once", "print", "print-loop", "sleep", "kv-flood", "huge"];
    let dir = tempfile::tempdir().unwrap();
    let mut toml = String::from(
        "tick = \"100ms\"\n[[sim.gpu]]\npreset = \"h100-sxm\"\nworkload = \"training\"\ncount = 2\n\
         [plugins]\ncache_dir = \"c\"\nstate_dir = \"s\"\nmax_failures = 100\n",
    );
    for m in modes {
        toml += &format!(
            "[[plugin]]\nname = {m:?}\npath = {:?}\nconfig = {{ mode = {m:?} }}\ngrants = [\"lower\"]\n",
            gpulet_plugin_artifacts::FIXTURE
        );
    }
    let cfg = dir.path().join("gpulet.toml");
    std::fs::write(&cfg, toml).unwrap();
    let out = gpulet(&["run", "--config", cfg.to_str().unwrap(), "--ticks", "5"]);
    assert_eq!(out.status.code(), Some(0), "gpulet run survived: {}", text(&out.stderr));
    let recs = records(&out.stdout);
    assert_eq!(recs.len(), 5, "one record per tick");
    let mut faults: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for e in events(&recs, "plugin-fault") {
        faults.entry(e["plugin"].as_str().unwrap().to_owned()).or_default().push(format!(
            "{}: {}",
            e["fault"].as_str().unwrap(),
            e["message"]
        ));
    }
    let kinds = |m: &str| -> Vec<String> {
        faults
            .get(m)
            .into_iter()
            .flatten()
            .map(|f| f.split(':').next().unwrap().to_owned())
            .collect()
    };
    assert_eq!(kinds("trap"), vec!["trap"; 5], "{faults:?}");
    assert_eq!(kinds("trap-once"), vec!["trap"], "{faults:?}");
    assert!(kinds("print").is_empty(), "printing is allowed: {faults:?}");
    assert_eq!(kinds("print-loop"), vec!["timeout"; 5], "{faults:?}");
    assert_eq!(kinds("sleep"), vec!["trap"; 5], "{faults:?}");
    assert!(faults["sleep"][0].contains("may not block or sleep"), "{faults:?}");
    assert_eq!(kinds("kv-flood"), vec!["timeout"; 5], "{faults:?}");
    assert!(
        kinds("huge").iter().all(|k| k == "output" || k == "timeout") && kinds("huge").len() == 5,
        "{faults:?}"
    );
    assert_eq!(recs[4]["agent"]["plugin_faults"], 5 * 5 + 1);
}

/// `gpulet run` with the kernel refusing executable memory, as systemd's
/// `MemoryDenyWriteExecute=yes` does (`PR_SET_MDWE`, inherited across `execve`).
fn gpulet_without_wx(args: &[&str]) -> Output {
    use std::os::unix::process::CommandExt;
    let mut c = Command::new(env!("CARGO_BIN_EXE_gpulet"));
    c.args(args).current_dir(repo());
    // SAFETY: between fork and exec only `prctl`, which is async-signal-safe, is called.
    #[allow(unsafe_code)]
    unsafe {
        c.pre_exec(|| {
            // PR_SET_MDWE (65), PR_MDWE_REFUSE_EXEC_GAIN (1).
            if libc::prctl(65, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c.output().unwrap()
}

#[test]
fn a_plugin_that_cannot_be_compiled_here_is_loud_and_the_fallback_and_budget_hold() {
    // The review: under MemoryDenyWriteExecute every plugin failed as "not a valid
    // WebAssembly component" and the agent carried on with no policy, quietly.
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "tick = \"50ms\"\n[[sim.gpu]]\npreset = \"l40s\"\nworkload = \"inference\"\ncount = 2\n\
         [power]\nbudget_w = 500\n[plugins]\ncache_dir = \"c\"\nstate_dir = \"s\"\n\
         [[plugin]]\nname = \"budget\"\npath = {:?}\n",
        gpulet_plugin_artifacts::POWER_BUDGET
    );
    let cfg = dir.path().join("gpulet.toml");
    std::fs::write(&cfg, toml).unwrap();
    let out = gpulet_without_wx(&["run", "--config", cfg.to_str().unwrap(), "--ticks", "3"]);
    if out.status.code() == Some(126) || text(&out.stderr).contains("Invalid argument") {
        panic!(
            "this kernel cannot set PR_SET_MDWE (Linux 6.3 or later needed): {}",
            text(&out.stderr)
        );
    }
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("refuses to make memory executable") && err.contains("MemoryDenyWriteExecute"),
        "the real cause and the fix: {err}"
    );
    assert!(err.contains("1 of 1 plugins did not load"), "{err}");
    let recs = records(&out.stdout);
    let failed: Vec<&Value> = events(&recs, "plugin-load-failed").collect();
    assert_eq!(failed.len(), 1);
    assert!(failed[0]["error"].as_str().unwrap().contains("MemoryDenyWriteExecute"));
    // The node is still managed: the budget holds through the guard.
    let total: f64 = recs[2]["gpus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["power_limit_w"].as_f64().unwrap())
        .sum();
    assert!(total <= 500.0 + 0.01, "{total}");
}

#[test]
fn an_mqtt_state_directory_others_can_write_is_refused_naming_it() {
    // The review: state directories were used whatever their owner and mode, and every
    // write followed symlinks. The outbox decides what the fleet hears and which
    // commands ran: gpulet refuses to start the link there, and says where and why.
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let cfg = dir.path().join("gpulet.toml");
    let toml = format!(
        "tick = \"50ms\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:1\"\nstate_dir = {:?}\n",
        open.join("mqtt").to_str().unwrap()
    );
    std::fs::write(&cfg, toml).unwrap();
    let out = gpulet(&["run", "--config", cfg.to_str().unwrap(), "--ticks", "1"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("open is writable by group or others (mode 777)"), "{err}");
    assert!(err.contains("chmod go-w"), "{err}");
}
