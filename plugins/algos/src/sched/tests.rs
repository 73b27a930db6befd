//! Helpers for the schedulers' tests, and the property test: over seeded random nodes
//! and queues, every start of every scheduler passes the host's rules.

use std::cell::RefCell;

use super::*;

thread_local! {
    /// Job names of this thread's tests: `id(name)` is `1000 + k` for the k-th.
    static NAMES: RefCell<Vec<&'static str>> = const { RefCell::new(Vec::new()) };
}

/// The id of the job the test calls `name`: the number itself for a numeric name (so a
/// reason naming it reads as the test expects), else one from 1000 up.
pub fn id(name: &str) -> u64 {
    name.parse().unwrap_or_else(|_| {
        NAMES.with_borrow_mut(|names| {
            let k = names.iter().position(|&n| n == name).unwrap_or_else(|| {
                names.push(name.to_owned().leak());
                names.len() - 1
            });
            1000 + k as u64
        })
    })
}

/// The name a test gave job `id`.
pub fn name(id: u64) -> &'static str {
    NAMES.with_borrow(|names| match id.checked_sub(1000) {
        Some(k) if (k as usize) < names.len() => names[k as usize],
        _ => id.to_string().leak(),
    })
}

/// `reason` with the ids of named jobs written as their names.
fn named(reason: &str) -> &'static str {
    let mut r = reason.to_owned();
    NAMES.with_borrow(|names| {
        for (k, n) in names.iter().enumerate().rev() {
            r = r.replace(&format!("job {}", 1000 + k), &format!("job {n}"));
        }
    });
    r.leak()
}

/// GPU `index` with `reserved` MiB held by one running job (none when 0).
pub fn gpu(index: u32, total: u64, reserved: u64) -> Slot {
    Slot {
        index,
        memory_total_mib: total,
        reserved_mib: reserved,
        jobs: u32::from(reserved > 0),
        exclusive: false,
        usable: true,
    }
}

/// A shared job asking for any `n` GPUs with `mem` MiB each.
pub fn job(name: &str, n: u32, mem: u64) -> Queued {
    Queued {
        id: id(name),
        owner: 1000,
        gpus: GpuRequest::Count(n),
        mem_mib: mem,
        exclusive: false,
        priority: 0,
        submitted_ms: 0,
        time_limit_ms: None,
    }
}

/// A shared job running on `gpus` since 0.
pub fn running(name: &str, gpus: &[u32], mem: u64, time_limit_ms: Option<u64>) -> Running {
    Running {
        id: id(name),
        owner: 1000,
        gpus: gpus.to_vec(),
        mem_mib: mem,
        exclusive: false,
        priority: 0,
        started_ms: 0,
        time_limit_ms,
    }
}

pub fn starts(out: &[Decision]) -> Vec<(&'static str, Vec<u32>)> {
    out.iter()
        .filter_map(|d| match d {
            Decision::Start { job, gpus, .. } => Some((name(*job), gpus.clone())),
            Decision::Wait { .. } => None,
        })
        .collect()
}

pub fn waits(out: &[Decision]) -> Vec<(&'static str, &'static str)> {
    out.iter()
        .filter_map(|d| match d {
            Decision::Wait { job, reason } => Some((name(*job), named(reason))),
            Decision::Start { .. } => None,
        })
        .collect()
}

#[test]
fn durations_read_well() {
    assert_eq!(duration(0), "0 s");
    assert_eq!(duration(59_000), "59 s");
    assert_eq!(duration(59_001), "1 min");
    assert_eq!(duration(60_000), "1 min");
    assert_eq!(duration(3_540_000), "59 min");
    assert_eq!(duration(3_599_000), "1 h");
    assert_eq!(duration(3_600_001), "1 h 1 min");
    assert_eq!(duration(7_500_000), "2 h 5 min");
}

#[test]
fn never_fits_says_why() {
    let node = Node::new(&[gpu(0, 40_000, 0), gpu(1, 80_000, 0)]);
    let mut j = job("j", 2, 50_000);
    assert_eq!(
        node.never_fits(&j).unwrap(),
        "needs 2 GPUs with 50000 MiB free each, but can never start on this node: the node has 1 GPU with that much memory"
    );
    j.gpus = GpuRequest::Specific(vec![1, 1]);
    assert!(node.never_fits(&j).unwrap().ends_with("it names GPU 1 twice"));
    j.gpus = GpuRequest::Specific(vec![1, 7]);
    assert!(node.never_fits(&j).unwrap().ends_with("GPU 7 does not exist"));
    j.gpus = GpuRequest::Specific(vec![0]);
    assert!(node.never_fits(&j).unwrap().ends_with("GPU 0 has 40000 MiB in all"));
    j.gpus = GpuRequest::Specific(vec![1]);
    assert_eq!(node.never_fits(&j), None);
}

/// A small deterministic generator (Knuth's MMIX LCG): enough to vary the inputs,
/// without a dependency.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// A node with some jobs running (consistent with its slots) and a queue that asks for
/// everything: counts, specific GPUs (some missing or named twice), exclusivity, memory
/// up to a whole GPU, priorities, time limits.
fn random_input(rng: &mut Lcg) -> Input {
    let now = 1_000_000;
    let n = 1 + rng.below(8) as u32;
    let mut gpus: Vec<Slot> = (0..n)
        .map(|i| Slot {
            usable: rng.chance(85),
            ..gpu(i, [16_384, 40_960, 81_920][rng.below(3) as usize], 0)
        })
        .collect();
    let mut running = Vec::new();
    for r in 0..rng.below(8) {
        let mut held = Vec::new();
        for _ in 0..1 + rng.below(2) {
            let i = rng.below(n as u64) as u32;
            if !held.contains(&i) {
                held.push(i);
            }
        }
        let exclusive = rng.chance(20);
        let min_free = held.iter().map(|&i| gpus[i as usize].free_mib()).min().unwrap();
        let ok = held.iter().all(|&i| {
            let s = &gpus[i as usize];
            !s.exclusive && (!exclusive || s.jobs == 0)
        });
        if !ok || min_free == 0 {
            continue;
        }
        let j = Running {
            id: 10_000 + r,
            owner: 1000,
            gpus: held.clone(),
            mem_mib: rng.below(min_free + 1),
            exclusive,
            priority: 0,
            started_ms: now - rng.below(now),
            time_limit_ms: rng.chance(70).then(|| 1 + rng.below(2 * now)),
        };
        for s in gpus.iter_mut().filter(|s| held.contains(&s.index)) {
            s.reserved_mib += j.mem_mib;
            s.jobs += 1;
            s.exclusive |= exclusive;
        }
        running.push(j);
    }
    let queue = (0..rng.below(12))
        .map(|q| Queued {
            id: q,
            owner: 1000,
            gpus: if rng.chance(80) {
                GpuRequest::Count(rng.below(4) as u32 + 1)
            } else {
                // Up to n + 1: now and then a GPU that does not exist, or one twice.
                let named = (0..1 + rng.below(3)).map(|_| rng.below(n as u64 + 1) as u32);
                GpuRequest::Specific(named.collect())
            },
            mem_mib: [0, 1_000, 8_000, 20_000, 40_000, 70_000][rng.below(6) as usize],
            exclusive: rng.chance(25),
            priority: rng.below(5) as i32 - 2,
            submitted_ms: q * 1_000,
            time_limit_ms: rng.chance(60).then(|| 1 + rng.below(2 * now)),
        })
        .collect();
    Input { now_ms: now, gpus, running, queue }
}

/// The host's rules, written out on their own: at most one decision per queued job;
/// every start names existing, usable GPUs, none twice, with the job's memory free by
/// reservation and exclusivity kept, counting the starts before it; and it is what the
/// job asked for.
fn check(input: &Input, out: &[Decision]) -> Result<(), String> {
    let mut slots = input.gpus.clone();
    let mut seen = Vec::new();
    for d in out {
        if seen.contains(&d.job()) {
            return Err(format!("two decisions for {}", d.job()));
        }
        seen.push(d.job());
        let job = input.queue.iter().find(|j| j.id == d.job()).ok_or("not a queued job")?;
        let Decision::Start { gpus, .. } = d else { continue };
        match &job.gpus {
            GpuRequest::Count(n) if gpus.len() != *n as usize => return Err("wrong count".into()),
            GpuRequest::Specific(want) if gpus != want => return Err("not the GPUs named".into()),
            _ => {}
        }
        for (k, i) in gpus.iter().enumerate() {
            if gpus[..k].contains(i) {
                return Err(format!("GPU {i} given twice"));
            }
            let s = slots.iter_mut().find(|s| s.index == *i).ok_or("no such GPU")?;
            if !s.usable {
                return Err(format!("GPU {i} unusable"));
            }
            if s.exclusive || (job.exclusive && s.jobs > 0) {
                return Err(format!("GPU {i} exclusivity"));
            }
            if s.memory_total_mib < s.reserved_mib + job.mem_mib {
                return Err(format!("GPU {i} memory"));
            }
            s.reserved_mib += job.mem_mib;
            s.jobs += 1;
            s.exclusive |= job.exclusive;
        }
    }
    Ok(())
}

#[test]
fn every_start_passes_the_hosts_rules() {
    let mut rng = Lcg(42);
    let mut started = 0;
    for case in 0..5_000 {
        let input = random_input(&mut rng);
        for (name, out) in [
            ("fifo-binpack", fifo_binpack::decide(&input)),
            ("priority-backfill", priority_backfill::decide(&input)),
            ("fifo-one-per-gpu", baseline::fifo_one_per_gpu(&input)),
        ] {
            if let Err(e) = check(&input, &out) {
                panic!("case {case}, {name}: {e}\n{input:#?}\n{out:#?}");
            }
            assert!(out.len() == input.queue.len(), "{name}: a decision for every job");
            started += starts(&out).len();
        }
    }
    assert!(started > 10_000, "the inputs start jobs often enough to test something");
}

#[test]
fn fifo_never_starts_a_job_behind_one_that_waits() {
    let mut rng = Lcg(7);
    for _ in 0..2_000 {
        let input = random_input(&mut rng);
        let node = Node::new(&input.gpus);
        let out = fifo_binpack::decide(&input);
        let first_wait = out
            .iter()
            .zip(&input.queue)
            .position(|(d, j)| matches!(d, Decision::Wait { .. }) && node.never_fits(j).is_none());
        if let Some(w) = first_wait {
            assert!(starts(&out[w..]).is_empty(), "{out:#?}");
        }
    }
}

/// When the head (the first job in priority order that waits, and could ever start)
/// could start: release every holder in the order its time limit ends it until the
/// head fits. `None` when it never does.
fn head_start(input: &Input, extra: &[Running], head: &Queued) -> Option<u64> {
    let mut node = Node::new(&input.gpus);
    for r in extra {
        let as_queued = Queued {
            mem_mib: r.mem_mib,
            exclusive: r.exclusive,
            gpus: GpuRequest::Specific(r.gpus.clone()),
            ..head.clone()
        };
        node.take(&as_queued, &r.gpus);
    }
    let mut holders: Vec<&Running> = input.running.iter().chain(extra).collect();
    holders.retain(|h| h.end_ms().is_some());
    holders.sort_by_key(|h| h.end_ms());
    if node.best_fit(head, &[]).is_ok() {
        return Some(input.now_ms);
    }
    holders.into_iter().find_map(|h| {
        node.release(h);
        node.best_fit(head, &[]).is_ok().then(|| h.end_ms().unwrap().max(input.now_ms))
    })
}

#[test]
fn backfilling_never_delays_the_head() {
    let mut rng = Lcg(11);
    let mut checked = 0;
    for _ in 0..5_000 {
        let input = random_input(&mut rng);
        let node = Node::new(&input.gpus);
        let out = priority_backfill::decide(&input);
        let job = |id: u64| input.queue.iter().find(|j| j.id == id).unwrap();
        let Some(h) = out.iter().position(|d| {
            matches!(d, Decision::Wait { .. }) && node.never_fits(job(d.job())).is_none()
        }) else {
            continue;
        };
        let head = job(out[h].job());
        let as_running = |d: &Decision| match d {
            Decision::Start { job: id, gpus, .. } => Some(Running {
                id: *id,
                owner: 1000,
                gpus: gpus.clone(),
                mem_mib: job(*id).mem_mib,
                exclusive: job(*id).exclusive,
                priority: job(*id).priority,
                started_ms: input.now_ms,
                time_limit_ms: job(*id).time_limit_ms,
            }),
            Decision::Wait { .. } => None,
        };
        let before: Vec<Running> = out[..h].iter().filter_map(as_running).collect();
        let all: Vec<Running> = out.iter().filter_map(as_running).collect();
        if let Some(t) = head_start(&input, &before, head) {
            checked += 1;
            let after = head_start(&input, &all, head);
            assert!(after.is_some_and(|a| a <= t), "head {} delayed: {out:#?}", head.id);
        }
    }
    assert!(checked > 500, "enough heads with a known start ({checked})");
}

#[test]
fn a_long_queue_is_explained_at_its_front_and_wherever_a_job_can_never_start() {
    let mut queue: Vec<Queued> = (0..100).map(|k| job(&k.to_string(), 1, 50_000)).collect();
    queue[70] = job("70", 3, 1_000); // can never start on 2 GPUs
    let input =
        Input { gpus: vec![gpu(0, 80_000, 0), gpu(1, 80_000, 0)], queue, ..Input::default() };
    for (scheduler, out) in [
        ("fifo-binpack", fifo_binpack::decide(&input)),
        ("priority-backfill", priority_backfill::decide(&input)),
    ] {
        assert_eq!(starts(&out), [("0", vec![0]), ("1", vec![1])], "{scheduler}");
        let waits = waits(&out);
        let explained: Vec<&str> = waits.iter().map(|w| w.0).collect();
        let mut expected: Vec<String> = (2..2 + EXPLAIN).map(|k| k.to_string()).collect();
        expected.push("70".into());
        assert_eq!(explained, expected, "{scheduler}");
        assert!(waits.iter().all(|w| !w.1.is_empty()), "{scheduler}: {waits:?}");
    }
}
