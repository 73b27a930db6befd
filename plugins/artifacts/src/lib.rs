//! Paths of gpulet's policy plugins, built from source for wasm32-wasip2 by this crate's
//! build script. For the host's tests and benchmarks.

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
];
