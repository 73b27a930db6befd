//! priority-backfill: starts queued jobs by priority (then age), and backfills: the first
//! job that cannot start gets GPUs reserved from the running jobs' time limits, and a
//! job behind it starts now only where it cannot delay it (see
//! `gpulet_policy_algos::sched::priority_backfill` for the rule). Every decision is made
//! from its input alone.
//!
//! Config (JSON): `{}`. It takes no options: it has nothing to tune that would not change
//! the rule itself, and a key it does not know is refused with its path.

gpulet_scheduler_guest::export_algorithm!(
    "priority-backfill",
    gpulet_policy_algos::sched::priority_backfill::decide
);
