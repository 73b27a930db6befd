//! The layering of `agent/src` (ARCHITECTURE.md, "Layers"), checked from the source: each
//! module imports only modules below it (so there is no import circle), and each
//! hardware or protocol library is used by one module only.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::repo;

/// Bottom up. A module may use only modules before it in this list.
const LAYERS: &[&str] = &[
    "clock",
    "state",
    "notify",
    "control",
    "gpu",
    "cuda",
    "config",
    "calibration",
    "snapshot",
    "telemetry",
    "policy",
    "plugin",
    "guard",
    "jobs",
    "agent",
    "mqtt",
    "service",
    "error",
    "setup",
    "calibrate",
    "demo",
    "record",
    "fleet_sim",
    "top",
];

/// Which library only which parts of the tree may use. (`gpulet fleet-sim` has an MQTT
/// client of its own: the consumer that verifies what the simulated fleet delivered.)
const OWNERS: &[(&str, &[&str])] = &[
    ("nvml_wrapper", &["gpu/nvml.rs"]),
    ("wasmtime", &["plugin/"]),
    ("wasmtime_wasi", &["plugin/"]),
    ("wasmparser", &["plugin/engine.rs"]),
    ("rumqttc", &["mqtt/", "fleet_sim.rs"]),
    ("prometheus_client", &["service/metrics.rs"]),
    ("ratatui", &["top/view.rs"]),
    ("cudarc", &["cuda/"]),
];

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The code of a file without its comments (line comments and doc comments).
fn code(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| l.split("//").next().unwrap().to_owned())
        .filter(|l| !l.trim().is_empty())
        .collect()
}

/// Every `name` after `prefix` (`crate::name`, `nvml_wrapper::…`) in `line`.
fn uses<'a>(line: &'a str, prefix: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    line.match_indices(prefix).filter_map(move |(i, _)| {
        let before = line[..i].chars().last();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            return None;
        }
        let rest = &line[i + prefix.len()..];
        let end = rest.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(rest.len());
        Some(&rest[..end])
    })
}

#[test]
fn each_module_uses_only_the_layers_below_it_and_each_library_has_one_owner() {
    let src = repo().join("agent/src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut wrong = BTreeSet::new();
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap().to_str().unwrap().to_owned();
        // The binary (`main.rs`, `cli/`) sits above every layer and uses the library
        // through `gpulet::`.
        if rel == "main.rs" || rel == "lib.rs" || rel.starts_with("cli/") {
            continue;
        }
        let module = rel.split('/').next().unwrap().trim_end_matches(".rs");
        let rank = LAYERS.iter().position(|m| *m == module);
        assert!(rank.is_some(), "{rel}: module {module} is not in LAYERS (ARCHITECTURE.md)");
        for line in code(f) {
            for used in uses(&line, "crate::") {
                if used == module {
                    continue;
                }
                match LAYERS.iter().position(|m| *m == used) {
                    Some(r) if r < rank.unwrap() => {}
                    _ => {
                        wrong.insert(format!("{rel}: {module} uses {used}, which is not below it"));
                    }
                }
            }
            for (lib, owner) in OWNERS {
                let prefix = format!("{lib}::");
                if uses(&line, &prefix).next().is_some()
                    && !owner.iter().any(|o| rel.starts_with(o))
                {
                    wrong.insert(format!("{rel} uses {lib}, which only {owner:?} may"));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "layering broken:\n{}",
        wrong.into_iter().collect::<Vec<_>>().join("\n")
    );
}
