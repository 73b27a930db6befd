//! fifo-binpack: starts queued jobs strictly first come, first served, packing them onto
//! as few GPUs as possible by reserved memory (see `gpulet_policy_algos::sched::fifo_binpack`
//! for the rule). Every decision is made from its input alone.
//!
//! Config (JSON): `{}`. It takes no options: it has nothing to tune that would not change
//! the rule itself, and a key it does not know is refused with its path.

gpulet_scheduler_guest::export_algorithm!(
    "fifo-binpack",
    gpulet_policy_algos::sched::fifo_binpack::decide
);
