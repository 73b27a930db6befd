//! The publishing path's local cost: the outbox alone (append, sync, replay), and one
//! agent tick with the MQTT sink next to the JSON-lines sink. No broker is reached: the
//! link is started but its runtime is never driven, so records stay in the outbox.
//! Run: `cargo bench -p gpulet --bench outbox`.

mod common;

use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

use common::demo_agent;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use gpulet::mqtt::outbox::{Class, Outbox, OutboxConfig};
use gpulet::mqtt::{Mqtt, Settings};
use gpulet::telemetry::{JsonLines, Sink};

/// An MQTT sink writing to an outbox in `dir`, its link never run.
fn mqtt_sink(dir: &Path, fsync: bool) -> (Box<dyn Sink>, Mqtt, tokio::runtime::Runtime) {
    let toml = format!(
        "url = \"mqtt://127.0.0.1:9\"\nstate_dir = {:?}\n[outbox]\nfsync = {fsync}\nmax_kib = 1048576\n",
        dir.display().to_string()
    );
    let cfg: gpulet::config::MqttConfig = toml::from_str(&toml).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let _guard = rt.enter();
    // No agent answers the link's requests: the link is never run.
    let (control, _) = tokio::sync::mpsc::channel(1);
    let changed = std::sync::Arc::new(tokio::sync::Notify::new());
    let settings = Settings::new(&cfg, "bench", Path::new(".")).unwrap();
    let started = Mqtt::start(settings, control, changed).unwrap();
    (Box::new(started.sink), started.mqtt, rt)
}

/// One telemetry message as the sink writes it (8 GPUs), for the raw outbox benches.
fn telemetry_payload() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let (sink, mqtt, _rt) = mqtt_sink(dir.path(), false);
    let (mut agent, _) = demo_agent(vec![sink]);
    agent.tick();
    let s = mqtt.stats();
    eprintln!(
        "outbox: {} records, {} bytes pending: {:.0} bytes per record (frame included) for 8 GPUs and their events",
        s.outbox_depth,
        s.outbox_bytes,
        s.outbox_bytes as f64 / s.outbox_depth as f64
    );
    vec![b'x'; (s.outbox_bytes / s.outbox_depth) as usize]
}

/// An unbounded outbox in `dir`.
fn open(dir: &Path, fsync: bool) -> Outbox {
    let max = u64::MAX >> 1;
    let cfg = OutboxConfig {
        dir: dir.to_path_buf(),
        max_bytes: max,
        max_age_ms: max,
        segment_bytes: 1 << 20,
        fsync,
    };
    Outbox::open(cfg).unwrap()
}

fn outbox(c: &mut Criterion) {
    let payload = telemetry_payload();
    let mut g = c.benchmark_group("outbox");
    g.throughput(Throughput::Elements(1));
    for fsync in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let mut o = open(dir.path(), fsync);
        let name = if fsync { "append_and_fsync" } else { "append_no_sync" };
        g.bench_function(name, |b| {
            b.iter(|| {
                let seq =
                    o.append(Class::Telemetry, 0, "gpulet/v1/n/telemetry", None, &payload).unwrap();
                o.flush().unwrap();
                // Acknowledged at once, as with a broker keeping up: the outbox stays small.
                o.commit(seq);
                black_box(seq)
            })
        });
    }
    // Replay: read a pending record back and commit it, as after a reconnect.
    let dir = tempfile::tempdir().unwrap();
    let mut o = open(dir.path(), false);
    g.bench_function("replay_read_and_commit", |b| {
        b.iter_custom(|iters| {
            // A backlog of `iters` records (not timed), then replayed (timed).
            let first = o.next_seq();
            for _ in 0..iters {
                o.append(Class::Telemetry, 0, "gpulet/v1/n/telemetry", None, &payload).unwrap();
            }
            o.flush().unwrap();
            let t = std::time::Instant::now();
            for seq in first..first + iters {
                let m = o.read(seq).unwrap().unwrap();
                o.commit(seq);
                black_box(m.payload.len());
            }
            t.elapsed()
        })
    });
    g.finish();
    reopen(c, &payload);
}

/// Opening an outbox of 40,000 pending records whose acknowledgements came back out of
/// order (every other one done: 20,000 done ranges), as after a long outage: the review
/// measured 11.6 s (a linear scan of the ranges per record).
fn reopen(c: &mut Criterion, payload: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut o = open(dir.path(), false);
        for i in 0..80_000u64 {
            let seq =
                o.append(Class::Telemetry, 0, "gpulet/v1/n/telemetry", None, payload).unwrap();
            if i % 2 == 1 {
                o.commit(seq);
            }
        }
        o.flush().unwrap();
        o.save_state().unwrap();
    }
    let mut g = c.benchmark_group("outbox_open");
    g.sample_size(10);
    g.bench_function("40k_pending_20k_done_ranges", |b| {
        b.iter(|| black_box(open(dir.path(), false).stats().depth))
    });
    g.finish();
}

fn tick_with_mqtt(c: &mut Criterion) {
    let mut g = c.benchmark_group("tick_8_gpus_sink");
    let (mut agent, _) = demo_agent(vec![Box::new(JsonLines::new(std::io::sink()))]);
    g.bench_function("json_lines", |b| b.iter(|| black_box(agent.tick())));
    for fsync in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let (sink, _mqtt, _rt) = mqtt_sink(dir.path(), fsync);
        let (mut agent, _) = demo_agent(vec![sink]);
        let name = if fsync { "mqtt_outbox_fsync" } else { "mqtt_outbox_no_sync" };
        g.bench_function(name, |b| b.iter(|| black_box(agent.tick())));
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = outbox, tick_with_mqtt
}
criterion_main!(benches);
