//! Integration tests: the whole agent in-process against the simulator, the config
//! contract, the command line as a user runs it, and the docs against the code. One
//! test binary (faster to link than one per file).

mod agent_loop;
mod authoring;
mod broker;
mod calibrate;
mod cli;
mod config;
mod consumer;
mod containment;
mod docs;
mod jobs;
mod languages;
mod layering;
mod mqtt;
mod nvml;
mod plugins;
mod policies;
mod replay;
mod reporters;
mod schema;
mod service;
mod socket;
mod top;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use gpulet::agent::Agent;
use gpulet::clock::VirtualClock;
use gpulet::config::Config;
use gpulet::gpu::sim::SimHandle;
use gpulet::setup;
use gpulet::telemetry::JsonLines;
use serde_json::Value;

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// A writer that keeps what is written, shared with the test.
#[derive(Clone, Default)]
pub struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    /// Every line written, parsed as JSON.
    pub fn records(&self) -> Vec<Value> {
        let bytes = self.0.lock().unwrap().clone();
        String::from_utf8(bytes)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }
}

/// An agent on a virtual clock over the simulated node `toml` describes, its telemetry
/// captured.
pub struct Harness {
    pub agent: Agent,
    pub clock: VirtualClock,
    pub sim: SimHandle,
    pub out: Capture,
}

pub fn harness(toml: &str) -> Harness {
    harness_in(toml, &repo())
}

/// As [`harness`], with relative paths in the config resolved against `dir`.
pub fn harness_in(toml: &str, dir: &Path) -> Harness {
    let mut config = Config::parse(toml).unwrap();
    config.validate().unwrap();
    // Ticks driven by hand, outside a runtime: nothing to serve a socket on.
    config.socket.enabled = false;
    let clock = VirtualClock::new(1_800_000_000_000);
    let out = Capture::default();
    // Assembled as `gpulet run` assembles it (`setup::node`), on a virtual clock.
    let node = setup::node(
        &config,
        dir,
        Arc::new(clock.clone()),
        Some(vec![Box::new(JsonLines::new(out.clone()))]),
        None,
    )
    .unwrap();
    let (agent, sim) = (node.agent, node.sim.unwrap());
    Harness { agent, clock, sim, out }
}
