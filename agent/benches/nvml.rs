//! One sample of 8 GPUs through the NVML backend, against the stand-in libnvidia-ml
//! (the real NVML code path: nvml-wrapper, the C ABI, 136 calls), next to the same node
//! sampled directly from the simulator, and a whole agent tick on NVML.
//! Run: `cargo build --release -p gpulet-nvml-standin && cargo bench -p gpulet --bench nvml`.

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use gpulet::clock::SystemClock;
use gpulet::config::{BackendKind, Config};
use gpulet::gpu::GpuBackend;
use gpulet::gpu::nvml::NvmlBackend;
use gpulet::gpu::sim::SimBackend;
use gpulet::setup;
use gpulet::telemetry::JsonLines;

fn standin() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    [
        deps.join("libgpulet_nvml_standin.so"),
        deps.parent().unwrap().join("libgpulet_nvml_standin.so"),
    ]
    .into_iter()
    .find(|p| p.exists())
    .expect("build the stand-in first: cargo build --release -p gpulet-nvml-standin")
}

fn nvml(c: &mut Criterion) {
    let lib = standin();
    let mut g = c.benchmark_group("sample_8_gpus");
    let mut backend = NvmlBackend::open(lib.as_os_str()).unwrap();
    g.bench_function("nvml_backend_via_standin", |b| b.iter(|| black_box(backend.sample_all())));
    // The same simulated node without NVML in between: what the stand-in itself costs.
    let config = Config::parse("").unwrap();
    let node = setup::sim_node(&config.sim, Path::new(".")).unwrap();
    let mut sim = SimBackend::new(node, SystemClock::new());
    g.bench_function("simulator_direct", |b| b.iter(|| black_box(sim.sample_all())));
    g.finish();

    let mut g = c.benchmark_group("tick_8_gpus_nvml");
    let mut config = Config::parse("[power]\nbudget_w = 4000\n").unwrap();
    config.backend = BackendKind::Nvml;
    config.nvml.library = Some(lib.clone());
    let clock = SystemClock::new();
    let backend = setup::open_backend(&config, Path::new("."), clock.clone()).unwrap();
    let sink = Box::new(JsonLines::new(std::io::sink()));
    let mut agent =
        setup::agent(&config, Path::new("."), backend, vec![sink], clock as Arc<_>).unwrap();
    g.bench_function("agent_tick_json_record", |b| b.iter(|| black_box(agent.tick())));
    g.finish();
}

criterion_group!(benches, nvml);
criterion_main!(benches);
