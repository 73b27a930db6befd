//! priority-backfill: priority order, with EASY backfilling.
//!
//! Jobs go by priority (higher first), then by submission (older first). Each is placed
//! as [`Node::best_fit`] places it. The first job that cannot start (the head) gets a
//! reservation: from the running jobs' time limits (`started_ms + time_limit_ms`), the
//! earliest time at which enough GPUs free up for it (the shadow time) and which GPUs
//! those are. Any later job may still start now if it fits now and cannot delay the
//! head: it uses none of the reserved GPUs, or its own time limit ends it by the shadow
//! time. Only the head holds a reservation (EASY backfilling): a backfilled job may delay
//! the jobs further back, never the most important one waiting.
//!
//! A job without a time limit may run for ever, so it only ever backfills onto GPUs not
//! reserved for the head; and when such a job is in the head's way, the shadow time is
//! unknown and only that rule applies.

use super::{
    Decision, EXPLAIN, GpuRequest, Input, Node, Queued, Running, Slot, duration, gpu_list,
};

/// The starts for this tick, in priority order, and why the first [`EXPLAIN`] jobs that
/// wait do.
pub fn decide(input: &Input) -> Vec<Decision> {
    let now = input.now_ms;
    let mut order: Vec<&Queued> = input.queue.iter().collect();
    // Stable: jobs of one priority submitted at the same time keep the queue's order.
    order.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.submitted_ms.cmp(&b.submitted_ms)));
    let mut node = Node::new(&input.gpus);
    // What holds GPUs, and so when they free up: the running jobs, then every job
    // started in this decision (from now, with its own time limit).
    let mut holders: Vec<Running> = input.running.clone();
    let mut head: Option<Reservation> = None;
    let mut explained = 0;
    let mut out = Vec::new();
    for job in order {
        if let Some(why) = node.never_fits(job) {
            // Reserving GPUs for a job that can never use them would only block others.
            out.push(Decision::wait(job, why));
            continue;
        }
        node.explain = explained < EXPLAIN;
        let placed = match &head {
            None => node.best_fit(job, &[]),
            Some(r) => backfill(now, &node, r, job),
        };
        match placed {
            Ok((gpus, reason)) => {
                node.take(job, &gpus);
                holders.push(Running {
                    id: job.id,
                    owner: job.owner,
                    gpus: gpus.clone(),
                    mem_mib: job.mem_mib,
                    exclusive: job.exclusive,
                    priority: job.priority,
                    started_ms: now,
                    time_limit_ms: job.time_limit_ms,
                });
                out.push(Decision::Start { job: job.id, gpus, reason });
            }
            Err(why) if head.is_none() => {
                let r = reserve(now, &node, &holders, job);
                out.push(Decision::wait(job, format!("{why}; {}", r.note)));
                explained += 1;
                head = Some(r);
            }
            Err(why) if node.explain => {
                out.push(Decision::wait(job, why));
                explained += 1;
            }
            Err(_) => {}
        }
    }
    out
}

/// What is held for the head.
struct Reservation<'a> {
    job: &'a Queued,
    /// The GPUs it will start on.
    gpus: Vec<u32>,
    /// When, by the time limits of what runs on them (the shadow time); `None` when that
    /// cannot be known.
    at_ms: Option<u64>,
    /// For the head's owner: what is reserved, and until when.
    note: String,
}

/// The head's reservation: release the jobs holding GPUs in the order their time limits
/// end them, until the head fits.
fn reserve<'a>(now: u64, node: &Node, holders: &[Running], job: &'a Queued) -> Reservation<'a> {
    let mut ending: Vec<(u64, &Running)> =
        holders.iter().filter_map(|h| Some((h.end_ms()?, h))).collect();
    ending.sort_by_key(|&(end, _)| end);
    let mut future = node.clone();
    for (end, h) in ending {
        future.release(h);
        if let Ok((mut gpus, _)) = future.best_fit(job, &[]) {
            gpus.sort_unstable(); // a set: what backfilled jobs keep off
            // A job past its time limit is ending now, not in the past.
            let at = end.max(now);
            let note = format!(
                "{} reserved for it, free in {} by the running jobs' time limits",
                gpu_list(&gpus),
                duration(at - now)
            );
            return Reservation { job, gpus, at_ms: Some(at), note };
        }
    }
    // Every job with a time limit has ended and the head still does not fit: jobs
    // without one (or unhealthy GPUs) are in the way, and nothing says for how long.
    // Reserve the GPUs it would most likely get: those that fit it once every timed job
    // has ended, then those with the fewest jobs left on them (the fewest unknown ends to
    // wait for), then the least memory held, then the lowest index; unhealthy GPUs last,
    // as nothing says when they recover.
    let mut gpus = match &job.gpus {
        GpuRequest::Specific(want) => want.clone(),
        GpuRequest::Count(n) => {
            let mut c: Vec<&Slot> =
                future.slots.iter().filter(|s| s.memory_total_mib >= job.mem_mib).collect();
            c.sort_by_key(|s| (!s.usable, !s.fits(job), s.jobs, s.reserved_mib, s.index));
            c.iter().take(*n as usize).map(|s| s.index).collect()
        }
    };
    gpus.sort_unstable();
    let why = if gpus.iter().any(|&i| future.slot(i).is_some_and(|s| !s.usable)) {
        "an unhealthy GPU"
    } else {
        "a job without a time limit"
    };
    let note = format!("{} reserved for it (when they free up is unknown: {why})", gpu_list(&gpus));
    Reservation { job, gpus, at_ms: None, note }
}

/// Whether `job`, behind the head `r`, may start now without delaying it, and where.
fn backfill(
    now: u64,
    node: &Node,
    r: &Reservation,
    job: &Queued,
) -> Result<(Vec<u32>, String), String> {
    let head = &r.job.id;
    // Off the reserved GPUs it cannot delay the head, however long it runs.
    if let Ok((gpus, why)) = node.best_fit(job, &r.gpus) {
        return Ok((gpus, format!("backfilled beside the GPUs reserved for job {head}: {why}")));
    }
    let (gpus, why) = node.best_fit(job, &[])?;
    // It fits now only on GPUs reserved for the head.
    let fits_before = |at: u64| job.time_limit_ms.is_some_and(|l| now.saturating_add(l) <= at);
    if !node.explain && !r.at_ms.is_some_and(fits_before) {
        return Err(String::new());
    }
    let first = if r.job.priority > job.priority {
        format!("priority {} goes first", r.job.priority)
    } else {
        "queued earlier at the same priority".to_owned()
    };
    match (job.time_limit_ms, r.at_ms) {
        (Some(limit), Some(at)) if now.saturating_add(limit) <= at => Ok((
            gpus,
            format!(
                "backfilled: its time limit ends it before job {head} can start (in {}): {why}",
                duration(at - now)
            ),
        )),
        (Some(limit), Some(at)) => Err(format!(
            "waits for job {head}'s GPUs ({first}): its time limit of {} runs past their start in {}",
            duration(limit),
            duration(at - now)
        )),
        (Some(_), None) => {
            Err(format!("waits for job {head}'s GPUs ({first}): when they free up is unknown"))
        }
        (None, _) => Err(format!(
            "waits for job {head}'s GPUs ({first}): without a time limit it may only use other GPUs"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sched::tests::{gpu, job, name, running, starts, waits};

    const MIN: u64 = 60_000;

    fn timed(mut j: Queued, limit_ms: u64) -> Queued {
        j.time_limit_ms = Some(limit_ms);
        j
    }

    fn prio(mut j: Queued, priority: i32) -> Queued {
        j.priority = priority;
        j
    }

    #[test]
    fn higher_priority_first_then_older() {
        let mut late_high = prio(job("late-high", 1, 50_000), 5);
        late_high.submitted_ms = 10;
        let input = Input {
            gpus: vec![gpu(0, 80_000, 0)],
            queue: vec![job("old-low", 1, 50_000), late_high],
            ..Input::default()
        };
        let out = decide(&input);
        assert_eq!(starts(&out), [("late-high", vec![0])]);
        assert_eq!(name(out[0].job()), "late-high", "starts come in priority order");
    }

    /// Two GPUs, both busy: GPU 0 until 10 min, GPU 1 until 30 min. The head needs both.
    fn busy_node() -> Input {
        Input {
            now_ms: 0,
            gpus: vec![gpu(0, 80_000, 70_000), gpu(1, 80_000, 30_000)],
            running: vec![
                running("r0", &[0], 70_000, Some(10 * MIN)),
                running("r1", &[1], 30_000, Some(30 * MIN)),
            ],
            queue: vec![prio(job("3", 2, 60_000), 5)],
        }
    }

    #[test]
    fn a_short_job_backfills_before_the_head_can_start() {
        let mut input = busy_node();
        input.queue.push(timed(job("short", 1, 40_000), 20 * MIN));
        let out = decide(&input);
        assert_eq!(starts(&out), [("short", vec![1])]);
        assert_eq!(
            waits(&out),
            [(
                "3",
                "needs 2 GPUs with 60000 MiB free each; none has it now; GPUs 0, 1 reserved for it, free in 30 min by the running jobs' time limits"
            )]
        );
    }

    #[test]
    fn a_long_job_does_not_delay_the_head() {
        let mut input = busy_node();
        input.queue.push(timed(job("long", 1, 40_000), 40 * MIN));
        input.queue.push(job("unlimited", 1, 40_000));
        let out = decide(&input);
        assert!(starts(&out).is_empty());
        assert_eq!(
            waits(&out)[1..],
            [
                (
                    "long",
                    "waits for job 3's GPUs (priority 5 goes first): its time limit of 40 min runs past their start in 30 min"
                ),
                (
                    "unlimited",
                    "waits for job 3's GPUs (priority 5 goes first): without a time limit it may only use other GPUs"
                ),
            ]
        );
    }

    #[test]
    fn any_job_may_use_gpus_not_reserved_for_the_head() {
        let mut input = busy_node();
        input.queue[0].gpus = GpuRequest::Count(1);
        input.gpus.push(gpu(2, 80_000, 0));
        input.queue[0].mem_mib = 70_000;
        input.queue.push(job("unlimited", 1, 40_000));
        let out = decide(&input);
        // The head fits on GPU 2 now: it starts, and nothing is reserved.
        assert_eq!(starts(&out), [("3", vec![2]), ("unlimited", vec![1])]);

        let mut input = busy_node();
        input.gpus.push(gpu(2, 80_000, 0));
        input.queue.push(job("unlimited", 1, 40_000));
        let out = decide(&input);
        // The head needs two GPUs: 2 and 0 (free first, in 10 min) are reserved;
        // GPU 1 is not, and the unlimited job packs there.
        assert_eq!(starts(&out), [("unlimited", vec![1])]);
        assert!(waits(&out)[0].1.ends_with(
            "GPUs 0, 2 reserved for it, free in 10 min by the running jobs' time limits"
        ));
    }

    #[test]
    fn when_a_job_without_a_time_limit_is_in_the_way_only_other_gpus_backfill() {
        let mut input = busy_node();
        input.running[1].time_limit_ms = None;
        input.running.push(running("r3", &[3], 75_000, None));
        input.gpus.push(gpu(2, 80_000, 0));
        input.gpus.push(gpu(3, 80_000, 75_000));
        input.queue[0].gpus = GpuRequest::Count(3);
        input.queue.push(timed(job("short", 1, 40_000), MIN));
        input.queue.push(job("tiny", 1, 1_000));
        let out = decide(&input);
        // Once r0 ends, GPUs 0 and 2 fit the head; its third GPU is held by a job
        // without a time limit: GPU 1 (less memory held than GPU 3). "short" would end
        // before anything else does, but the head's start is unknown: it may not use
        // the reserved GPUs, and fits nowhere else (GPU 3 has 5000 MiB free). "tiny"
        // fits on GPU 3.
        assert_eq!(starts(&out), [("tiny", vec![3])]);
        assert_eq!(
            waits(&out),
            [
                (
                    "3",
                    "needs 3 GPUs with 60000 MiB free each; 1 has it now; GPUs 0, 1, 2 reserved for it (when they free up is unknown: a job without a time limit)"
                ),
                (
                    "short",
                    "waits for job 3's GPUs (priority 5 goes first): when they free up is unknown"
                ),
            ]
        );
    }

    #[test]
    fn only_the_head_holds_a_reservation() {
        let mut input = busy_node();
        input.queue.push(prio(job("second", 2, 60_000), 4));
        input.queue.push(timed(job("short", 1, 40_000), 20 * MIN));
        let out = decide(&input);
        // "second" cannot start either, but reserves nothing: "short" still backfills
        // (it ends before the head's start; that it delays "second" is allowed).
        assert_eq!(starts(&out), [("short", vec![1])]);
        assert_eq!(
            waits(&out)[1],
            ("second", "needs 2 GPUs with 60000 MiB free each; none has it now")
        );
    }

    #[test]
    fn jobs_started_in_this_decision_count_towards_the_shadow_time() {
        let input = Input {
            now_ms: 0,
            gpus: vec![gpu(0, 80_000, 0)],
            running: vec![],
            queue: vec![
                prio(timed(job("first", 1, 50_000), 20 * MIN), 9),
                prio(job("head", 1, 50_000), 5),
                timed(job("short", 1, 30_000), 30 * MIN),
            ],
        };
        let out = decide(&input);
        // "first" starts and ends within 20 min; "head" is reserved GPU 0 from then;
        // "short" would run past that.
        assert_eq!(starts(&out), [("first", vec![0])]);
        assert!(
            waits(&out)[0].1.ends_with(
                "GPU 0 reserved for it, free in 20 min by the running jobs' time limits"
            )
        );
        assert!(waits(&out)[1].1.starts_with("waits for job head's GPUs (priority 5 goes first)"));
    }
}
