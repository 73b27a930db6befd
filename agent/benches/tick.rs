//! The cost of one agent tick on 8 simulated GPUs (no sleep: the tick's own work), and
//! the simulator's speed. Run: `cargo bench -p gpulet --bench tick`.

mod common;

use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

use common::demo_agent;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use gpulet::setup;
use gpulet::telemetry::JsonLines;

fn tick(c: &mut Criterion) {
    let mut g = c.benchmark_group("tick_8_gpus");
    // The agent's work alone: sample, snapshot, decide, check, serialise a record to JSON.
    // Time does not move, so the simulator does no physics.
    let (mut agent, _clock) = demo_agent(vec![Box::new(JsonLines::new(std::io::sink()))]);
    g.bench_function("agent_work_json_record", |b| b.iter(|| black_box(agent.tick())));
    let (mut agent, _clock) = demo_agent(Vec::new());
    g.bench_function("agent_work_no_sink", |b| b.iter(|| black_box(agent.tick())));
    // A whole 1 s tick as the demo runs it, including simulating 1 s of 8 GPUs.
    let (mut agent, clock) = demo_agent(vec![Box::new(JsonLines::new(std::io::sink()))]);
    g.bench_function("with_1s_of_simulation", |b| {
        b.iter(|| {
            clock.advance(Duration::from_secs(1));
            black_box(agent.tick())
        })
    });
    g.finish();
}

fn simulator(c: &mut Criterion) {
    let mut g = c.benchmark_group("simulator");
    let config = gpulet::demo::config();
    let mut node = setup::sim_node(&config.sim, Path::new(".")).unwrap();
    let seconds = 60;
    // Elements are simulated GPU-seconds: criterion's elem/s is GPU-s per wall second.
    g.throughput(Throughput::Elements(node.len() as u64 * seconds));
    g.bench_function("8_gpus_60s", |b| b.iter(|| node.advance(Duration::from_secs(seconds))));
    g.finish();
}

criterion_group!(benches, tick, simulator);
criterion_main!(benches);
