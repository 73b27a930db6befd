//! What the benchmarks share.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use gpulet::agent::Agent;
use gpulet::clock::VirtualClock;
use gpulet::config::Config;
use gpulet::setup;
use gpulet::telemetry::Sink;

/// The demo node (8 × H100, mixed workloads, a node budget) on a virtual clock.
pub fn demo_agent(sinks: Vec<Box<dyn Sink>>) -> (Agent, VirtualClock) {
    let config: Config = gpulet::demo::config();
    let clock = VirtualClock::new(0);
    let backend = setup::open_backend(&config, Path::new("."), Arc::new(clock.clone())).unwrap();
    let mut agent =
        setup::agent(&config, Path::new("."), backend, sinks, Arc::new(clock.clone())).unwrap();
    // Past the first tick's limit changes and into the training part of the trace.
    for _ in 0..30 {
        clock.advance(Duration::from_secs(1));
        agent.tick();
    }
    (agent, clock)
}
