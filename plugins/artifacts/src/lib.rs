//! gpulet's policy plugins, built from source for wasm32-wasip2 by this crate's build
//! script: their paths (for the host's tests and benchmarks) and their bytes (`gpulet
//! demo` carries the shipped power plugins and the anomaly reporter in its binary).

include!(concat!(env!("OUT_DIR"), "/artifacts.rs"));

/// Every plugin, with its crate name.
pub const ALL: &[(&str, &str)] = &[
    ("power-budget", POWER_BUDGET),
    ("thermal-guard", THERMAL_GUARD),
    ("idle-saver", IDLE_SAVER),
    ("fifo-binpack", FIFO_BINPACK),
    ("priority-backfill", PRIORITY_BACKFILL),
    ("fixture", FIXTURE),
    ("fixture-forbidden-import", FIXTURE_FORBIDDEN_IMPORT),
    ("fixture-v010", FIXTURE_V010),
    ("fixture-scheduler", FIXTURE_SCHEDULER),
    ("fixture-reporter", FIXTURE_REPORTER),
    ("anomaly", ANOMALY),
];
