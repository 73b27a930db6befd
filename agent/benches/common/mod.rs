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
    let mut agent =
        setup::node(&config, Path::new("."), Arc::new(clock.clone()), Some(sinks), None)
            .unwrap()
            .agent;
    // Past the first tick's limit changes and into the training part of the trace.
    for _ in 0..30 {
        clock.advance(Duration::from_secs(1));
        agent.tick();
    }
    (agent, clock)
}
