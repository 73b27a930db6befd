//! The job queue's placement decision, side by side in one run: the shipped schedulers
//! as Wasm components through the host (`schedule-jobs`: the input converted to WIT,
//! the call in the sandbox on this thread, the decisions converted back) and the same
//! algorithms natively, for a queue of 10, 100 and 1,000 jobs on 8 GPUs with 4 running.
//! One queued job in ten has a label (labels cross the boundary as strings, one
//! allocation each; `1000-all-labelled` shows the cost when every job has one). The
//! schedulers explain the first 32 waiting jobs (`gpulet_policy_algos::sched::EXPLAIN`).
//! The target is under 1 ms for 1,000 jobs.
//!
//! Run: `cargo bench -p gpulet --bench jobs`.

use std::hint::black_box;
use std::path::Path;
use std::sync::{Arc, Mutex};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use gpulet::gpu::sim::model::Preset;
use gpulet::gpu::sim::workload::WorkloadKind;
use gpulet::gpu::sim::{GpuSpec, SimNode};
use gpulet::plugin::engine::PluginEngine;
use gpulet::plugin::kv::KvStore;
use gpulet::plugin::power::Limits;
use gpulet::plugin::scheduler::{Labels, SchedulerPlugin};
use gpulet::snapshot::{Bounds, NodeSnapshot};
use gpulet_plugin_artifacts as wasm;
use gpulet_policy_algos::sched::{
    self, GpuRequest, Input, Queued, Running, Slot, fifo_binpack, priority_backfill,
};

const GPUS: u32 = 8;
const MIB: u64 = 81559;

fn snapshot() -> NodeSnapshot {
    let preset = Preset::by_key("h100-sxm").unwrap();
    let node = SimNode::new(&vec![GpuSpec::new(preset, WorkloadKind::Training); GPUS as usize], 1);
    let inventory: Arc<[gpulet::gpu::GpuInfo]> = node.inventory().into();
    let bounds: Arc<[Bounds]> = inventory
        .iter()
        .map(|g| Bounds { lo: g.power_limit.min_w, hi: g.power_limit.max_w })
        .collect();
    NodeSnapshot {
        seq: 1,
        ts_ms: 0,
        utc_offset_s: 0,
        now_ms: 3_600_000,
        curves: vec![None; GPUS as usize].into(),
        samples: node.sample_all(),
        inventory,
        bounds,
        budget_w: None,
    }
}

/// 4 running jobs (one exclusive 2-GPU job, three shared) and `n` queued ones of mixed
/// sizes, priorities and time limits: a queue none of which fits whole.
fn input(n: usize) -> Input {
    let running = vec![
        running(100000, vec![0, 1], 0, true),
        running(100001, vec![2], 60_000, false),
        running(100002, vec![2], 10_000, false),
        running(100003, vec![3], 40_000, false),
    ];
    let mut gpus: Vec<Slot> = (0..GPUS)
        .map(|i| Slot {
            index: i,
            memory_total_mib: MIB,
            reserved_mib: 0,
            jobs: 0,
            exclusive: false,
            usable: true,
        })
        .collect();
    for r in &running {
        for &g in &r.gpus {
            let s = &mut gpus[g as usize];
            s.reserved_mib += r.mem_mib;
            s.jobs += 1;
            s.exclusive |= r.exclusive;
        }
    }
    let queue = (0..n)
        .map(|k| Queued {
            id: k as u64,
            owner: 1000 + (k % 7) as u32,
            gpus: GpuRequest::Count([1, 1, 2, 1, 4][k % 5]),
            mem_mib: [20_000, 30_000, 0, 50_000, 0][k % 5],
            exclusive: matches!(k % 5, 2 | 4),
            priority: [0, 0, 5, 0, 10][k % 5],
            submitted_ms: k as u64,
            time_limit_ms: Some(60_000 * (1 + (k as u64 * 7) % 120)),
        })
        .collect();
    Input { now_ms: 3_600_000, gpus, running, queue }
}

fn running(id: u64, gpus: Vec<u32>, mem_mib: u64, exclusive: bool) -> Running {
    Running {
        id,
        owner: 1000,
        gpus,
        mem_mib,
        exclusive,
        priority: 0,
        started_ms: 0,
        time_limit_ms: Some(7_200_000),
    }
}

fn start(engine: &PluginEngine, path: &str) -> SchedulerPlugin {
    let loaded = engine.load(Path::new(path)).unwrap();
    let infos = (0..GPUS)
        .map(|i| gpulet::plugin::wit::GpuInfo {
            index: i,
            uuid: format!("GPU-{i}"),
            name: "H100".into(),
            memory_total_mib: MIB,
        })
        .collect();
    let kv = Arc::new(Mutex::new(KvStore::in_memory(64 << 10)));
    SchedulerPlugin::start(
        engine,
        "bench",
        loaded.component,
        "{}".into(),
        infos,
        Limits::default(),
        kv,
    )
    .unwrap()
}

fn decision(c: &mut Criterion) {
    let engine = PluginEngine::new(None).unwrap();
    let snap = snapshot();
    let mut g = c.benchmark_group("schedule_decision");
    type Native = fn(&Input) -> Vec<sched::Decision>;
    let schedulers: [(&str, &str, Native); 2] = [
        ("fifo-binpack", wasm::FIFO_BINPACK, fifo_binpack::decide),
        ("priority-backfill", wasm::PRIORITY_BACKFILL, priority_backfill::decide),
    ];
    for (name, path, native) in schedulers {
        let mut plugin = start(&engine, path);
        for (n, every) in [(10usize, 10), (100, 10), (1000, 10), (1000, 1)] {
            let input = input(n);
            let labels: Labels = input
                .queue
                .iter()
                .filter(|q| q.id % every == 0)
                .map(|q| (q.id, "team".to_owned(), "a".to_owned()))
                .collect();
            // The same decisions both ways.
            let (through, _) = plugin.schedule(&snap, &input, &labels).unwrap();
            assert_eq!(
                through,
                native(&input),
                "{name}: the component and the native code disagree"
            );
            let id = if every == 1 { format!("{n}-all-labelled") } else { n.to_string() };
            g.bench_with_input(
                BenchmarkId::new(format!("{name}/wasm"), &id),
                &input,
                |b, input| b.iter(|| black_box(plugin.schedule(&snap, input, &labels).unwrap())),
            );
            if every == 1 {
                continue;
            }
            g.bench_with_input(
                BenchmarkId::new(format!("{name}/native"), n),
                &input,
                |b, input| b.iter(|| black_box(native(input))),
            );
        }
    }
    g.finish();
}

criterion_group!(benches, decision);
criterion_main!(benches);
