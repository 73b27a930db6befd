//! The job schedulers against two baselines on a synthetic trace, in virtual time.
//!
//! `cargo run --release -p gpulet-policy-algos --example sched_compare -- [--jobs N] [--seed S]`
//!
//! A discrete-event simulation of one 8-GPU node: the events are job arrivals and job
//! ends, and at each event (and only then) the scheduler is asked what starts. Starts
//! are checked by the host's rules (`agent/src/jobs/place.rs`) before they run, except
//! task-spooler's: it knows no reservations, so its starts run as it decides them and
//! every one that overcommits a GPU's memory is counted. The metrics depend only on the
//! seed; the µs per call are wall-clock and vary from run to run.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use gpulet_policy_algos::sched::{
    Decision, GpuRequest, Input, Node, Queued, Running, Slot, baseline, fifo_binpack,
    priority_backfill,
};

const GPUS: u32 = 8;
/// An 80 GB GPU (H100/A100 80GB) as NVML reports it.
const GPU_MIB: u64 = 81_559;
const GIB: u64 = 1024;
const MIN: u64 = 60_000;
const HOUR: u64 = 60 * MIN;
/// Offered load: arrivals come this much faster than the node could serve them even if
/// shared jobs packed perfectly by memory, so a queue builds up and the order and
/// packing of starts decide the waits (on an idle node every scheduler is the same).
const LOAD: f64 = 1.5;
/// A job's memory use ramps up over its first minute: CUDA context and weights first
/// (about a tenth of what it will use), then activations, caches and the allocator's
/// pools. A reading taken meanwhile shows memory the job is about to take: the race of
/// task-spooler#59 that placement by reservation avoids.
const RAMP_MS: u64 = MIN;

/// xorshift64*, seeded through splitmix64 so that seeds 1, 2, 3 are far apart.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// In [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// In [lo, hi].
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

struct Job {
    /// As the scheduler sees it: `submitted_ms` is its arrival, `time_limit_ms` what
    /// its owner declared.
    q: Queued,
    /// How long it really runs.
    run_ms: u64,
}

/// `n` jobs, in arrival order (their ids are their indices), and a summary line.
fn trace(n: usize, rng: &mut Rng) -> (Vec<Job>, String) {
    let mut jobs = Vec::with_capacity(n);
    let mut kinds = [0; 3];
    for k in 0..n {
        let r = rng.unit();
        // (GPUs, MiB reserved on each, exclusive, true run time)
        let (gpus, mem, exclusive, run_ms) = if r < 0.70 {
            // Many small shared jobs: notebooks, evaluations, sweeps' points.
            kinds[0] += 1;
            (1, rng.range(8 * GIB, 20 * GIB), false, rng.range(5 * MIN, 30 * MIN))
        } else if r < 0.96 {
            // Medium: fine-tuning on 1-2 GPUs, shared with a large reservation or alone.
            kinds[1] += 1;
            let (gpus, exclusive) = (rng.range(1, 2) as u32, rng.unit() < 0.3);
            let mem = if exclusive {
                rng.range(40 * GIB, 76 * GIB)
            } else {
                rng.range(30 * GIB, 60 * GIB)
            };
            (gpus, mem, exclusive, rng.range(30 * MIN, 120 * MIN))
        } else {
            // A few large training runs on half or all of the node.
            kinds[2] += 1;
            let gpus = if rng.unit() < 0.5 { 4 } else { 8 };
            (gpus, rng.range(60 * GIB, 76 * GIB), true, rng.range(2 * HOUR, 8 * HOUR))
        };
        let priority = match rng.unit() {
            p if p < 0.80 => 0,
            p if p < 0.95 => 5,
            _ => 10,
        };
        // Users over-declare time limits (a job killed at its limit loses its work), by
        // up to 2×: jobs end well before the limits that backfilling plans with, so its
        // shadow times are pessimistic, as on a real cluster.
        let limit = (run_ms as f64 * (1.0 + rng.unit())).ceil() as u64;
        let q = Queued {
            id: k as u64,
            owner: 1000,
            gpus: GpuRequest::Count(gpus),
            mem_mib: mem,
            exclusive,
            priority,
            submitted_ms: 0,
            time_limit_ms: Some(limit),
        };
        jobs.push(Job { q, run_ms });
    }
    // Poisson arrivals (exponential gaps) at the rate that gives LOAD: a shared job
    // counts for its share of its GPUs' memory, an exclusive one for its GPUs whole.
    let demand: f64 = jobs.iter().map(|j| gpu_ms(&j.q, j.run_ms)).sum();
    let mean_gap = demand / (GPUS as f64 * LOAD * n as f64);
    let mut t = 0.0;
    for j in &mut jobs {
        j.q.submitted_ms = t as u64;
        t += -mean_gap * (1.0 - rng.unit()).ln();
    }
    let span = jobs.last().map_or(0, |j| j.q.submitted_ms) as f64 / HOUR as f64;
    let summary = format!(
        "{n} jobs ({} small, {} medium, {} large) on {GPUS} × {GPU_MIB} MiB GPUs, arriving over \
         {span:.1} h: offered load {LOAD}× the node even with perfect packing",
        kinds[0], kinds[1], kinds[2]
    );
    (jobs, summary)
}

/// GPU-time a job needs with perfect packing, ms.
fn gpu_ms(q: &Queued, run_ms: u64) -> f64 {
    let GpuRequest::Count(n) = q.gpus else { unreachable!("the trace asks for counts") };
    let share = if q.exclusive { 1.0 } else { q.mem_mib as f64 / GPU_MIB as f64 };
    n as f64 * share * run_ms as f64
}

/// The shipped schedulers, then the baselines.
const SCHEDULERS: [&str; 4] =
    ["fifo-binpack", "priority-backfill", "fifo-one-per-gpu", "task-spooler"];

/// A job running since `start`.
struct Run {
    job: usize,
    gpus: Vec<u32>,
    start: u64,
}

#[derive(Default)]
struct Stats {
    makespan_ms: u64,
    /// (wait ms, priority) of every job that started.
    waits: Vec<(u64, i32)>,
    /// GPU-ms with at least one job on the GPU.
    busy_ms: u64,
    /// MiB-ms reserved (at most the GPU's memory).
    resv_mib_ms: f64,
    /// Starts that broke the host's rules (and were not run).
    skipped: u32,
    /// task-spooler's starts that left a GPU with more reserved than it has.
    over_resv: u32,
    calls: u32,
    decide_time: Duration,
    unfinished: usize,
}

/// The GPUs as `running` holds them.
fn slots(jobs: &[Job], running: &[Run]) -> Vec<Slot> {
    let idle = |index| Slot {
        index,
        memory_total_mib: GPU_MIB,
        reserved_mib: 0,
        jobs: 0,
        exclusive: false,
        usable: true,
    };
    let slots: Vec<Slot> = (0..GPUS).map(idle).collect();
    let mut node = Node::new(&slots);
    for r in running {
        node.take(&jobs[r.job].q, &r.gpus);
    }
    node.slots
}

/// Each GPU's free-memory reading at `now`: what the jobs on it use by the ramp model.
fn readings(jobs: &[Job], running: &[Run], now: u64) -> Vec<u64> {
    let mut used = vec![0; GPUS as usize];
    for r in running {
        let mem = jobs[r.job].q.mem_mib;
        let ramped = (now - r.start).min(RAMP_MS);
        for &g in &r.gpus {
            used[g as usize] += mem / 10 + mem * 9 / 10 * ramped / RAMP_MS;
        }
    }
    used.iter().map(|&u| GPU_MIB.saturating_sub(u)).collect()
}

/// The host's rules for starting `job` on `gpus`; the memory rule only `by_reservation`.
fn allowed(node: &Node, job: &Queued, gpus: &[u32], by_reservation: bool) -> bool {
    let GpuRequest::Count(n) = job.gpus else { return false };
    gpus.len() == n as usize
        && gpus.iter().enumerate().all(|(k, g)| {
            !gpus[..k].contains(g)
                && node.slot(*g).is_some_and(|s| {
                    s.usable
                        && !s.exclusive
                        && (!job.exclusive || s.jobs == 0)
                        && (!by_reservation || s.free_mib() >= job.mem_mib)
                })
        })
}

fn simulate(jobs: &[Job], sched: &str) -> Stats {
    let mut st = Stats::default();
    let (mut queue, mut running) = (Vec::<usize>::new(), Vec::<Run>::new());
    let (mut next, mut now) = (0, 0);
    loop {
        let end = running.iter().map(|r| r.start + jobs[r.job].run_ms).min();
        let Some(t) = end.into_iter().chain(jobs.get(next).map(|j| j.q.submitted_ms)).min() else {
            break;
        };
        for s in slots(jobs, &running) {
            st.busy_ms += u64::from(s.jobs > 0) * (t - now);
            st.resv_mib_ms += s.reserved_mib.min(GPU_MIB) as f64 * (t - now) as f64;
        }
        now = t;
        running.retain(|r| r.start + jobs[r.job].run_ms > now);
        if end == Some(now) {
            // A job ended: the last such time is the makespan (the trace starts at 0).
            st.makespan_ms = now;
        }
        while jobs.get(next).is_some_and(|j| j.q.submitted_ms <= now) {
            queue.push(next);
            next += 1;
        }
        if queue.is_empty() {
            continue;
        }
        let input = Input {
            now_ms: now,
            gpus: slots(jobs, &running),
            running: running
                .iter()
                .map(|r| {
                    let q = &jobs[r.job].q;
                    Running {
                        id: q.id,
                        owner: q.owner,
                        gpus: r.gpus.clone(),
                        mem_mib: q.mem_mib,
                        exclusive: q.exclusive,
                        priority: q.priority,
                        started_ms: r.start,
                        time_limit_ms: q.time_limit_ms,
                    }
                })
                .collect(),
            queue: queue.iter().map(|&k| jobs[k].q.clone()).collect(),
        };
        let free = readings(jobs, &running, now);
        let t0 = Instant::now();
        let decisions = match sched {
            "fifo-binpack" => fifo_binpack::decide(&input),
            "priority-backfill" => priority_backfill::decide(&input),
            "fifo-one-per-gpu" => baseline::fifo_one_per_gpu(&input),
            _ => baseline::task_spooler(&input, &free),
        };
        st.decide_time += t0.elapsed();
        st.calls += 1;
        // Apply the starts in order, on a working copy of the GPUs, as the host does;
        // task-spooler's without the memory rule. It knows nothing of exclusivity either,
        // but letting it break that would let it co-locate jobs with exclusive ones at no
        // cost in this model (sharing is free here): the host refuses those starts (they
        // count as skipped) and the job stays queued.
        let trusted = sched == "task-spooler";
        let mut node = Node::new(&input.gpus);
        let mut decided = HashSet::new();
        for d in decisions {
            let k = Some(d.job() as usize).filter(|k| queue.contains(k));
            let Decision::Start { gpus, .. } = d else { continue };
            let Some(k) = k.filter(|&k| decided.insert(k)) else {
                st.skipped += 1;
                continue;
            };
            let q = &jobs[k].q;
            if !allowed(&node, q, &gpus, !trusted) {
                st.skipped += 1;
                continue;
            }
            node.take(q, &gpus);
            // Overcommitted co-located jobs run as if they fitted: this only counts them.
            let over = |g: &u32| node.slot(*g).is_some_and(|s| s.reserved_mib > s.memory_total_mib);
            st.over_resv += u32::from(gpus.iter().any(over));
            st.waits.push((now - q.submitted_ms, q.priority));
            running.push(Run { job: k, gpus, start: now });
        }
        queue.retain(|k| !running.iter().any(|r| r.job == *k));
    }
    st.unfinished = queue.len();
    st
}

fn mean_min(w: impl Iterator<Item = u64>) -> f64 {
    let (sum, n) = w.fold((0, 0), |(s, n), w| (s + w, n + 1));
    sum as f64 / n.max(1) as f64 / MIN as f64
}

fn main() {
    let (mut n, mut seed) = (500usize, 1u64);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args.next().and_then(|v| v.parse::<u64>().ok());
        match (a.as_str(), v) {
            ("--jobs", Some(v)) if v > 0 => n = v as usize,
            ("--seed", Some(v)) => seed = v,
            _ => {
                eprintln!("usage: sched_compare [--jobs N] [--seed S]");
                std::process::exit(2);
            }
        }
    }
    let (jobs, summary) = trace(n, &mut Rng::new(seed));
    println!(
        "`cargo run --release -p gpulet-policy-algos --example sched_compare -- --jobs {n} --seed {seed}`\n"
    );
    println!("seed {seed}: {summary}\n");
    println!(
        "| scheduler | makespan h | mean wait min | p95 wait min | mean wait prio>0 / prio 0 min \
         | GPU util % | resv util % | skipped starts | over-resv starts | calls \
         | µs/call |"
    );
    println!("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for sched in SCHEDULERS {
        let st = simulate(&jobs, sched);
        let mut w: Vec<u64> = st.waits.iter().map(|&(w, _)| w).collect();
        w.sort_unstable();
        let p95 = w.get((w.len() * 95).div_ceil(100).saturating_sub(1)).copied().unwrap_or(0);
        let hi = mean_min(st.waits.iter().filter(|w| w.1 > 0).map(|w| w.0));
        let lo = mean_min(st.waits.iter().filter(|w| w.1 == 0).map(|w| w.0));
        let span = st.makespan_ms.max(1) as f64;
        println!(
            "| {} | {:.1} | {:.0} | {:.0} | {hi:.0} / {lo:.0} | {:.1} | {:.1} | {} | {} | {} | {:.1} |",
            sched,
            st.makespan_ms as f64 / HOUR as f64,
            mean_min(w.iter().copied()),
            p95 as f64 / MIN as f64,
            100.0 * st.busy_ms as f64 / (GPUS as f64 * span),
            100.0 * st.resv_mib_ms / (GPUS as f64 * GPU_MIB as f64 * span),
            st.skipped,
            st.over_resv,
            st.calls,
            st.decide_time.as_secs_f64() * 1e6 / f64::from(st.calls.max(1)),
        );
        if st.unfinished > 0 {
            println!("\n{}: {} jobs never started", sched, st.unfinished);
        }
    }
    println!(
        "\nGPU util: time a GPU runs at least one job; resv util: memory reserved, of all \
         memory. over-resv starts: task-spooler's starts that left a GPU with more reserved \
         than it has (OOM risk once the jobs ramp up). skipped starts: refused by the host's rules, \
         each event they are proposed at (task-spooler's: onto an exclusive job's GPU, or an \
         exclusive job onto a busy one). µs/call: wall-clock time in the scheduler, per decision."
    );
}
