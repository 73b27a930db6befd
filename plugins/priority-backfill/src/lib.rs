//! priority-backfill: starts queued jobs by priority (then age), and backfills: the first
//! job that cannot start gets GPUs reserved from the running jobs' time limits, and a
//! job behind it starts now only where it cannot delay it (see
//! `gpulet_policy_algos::sched::priority_backfill` for the rule). Every decision is made
//! from its input alone.
//!
//! Config (JSON): `{}`. It takes no options: it has nothing to tune that would not change
//! the rule itself, and a key it does not know is refused with its path.

use gpulet_policy_algos::sched::priority_backfill;
use gpulet_scheduler_guest::{ConfigError, Decision, GpuInfo, PluginInfo, ScheduleInput};

struct Plugin;

impl gpulet_scheduler_guest::SchedulerGuest for Plugin {
    fn info() -> PluginInfo {
        gpulet_scheduler_guest::info("priority-backfill", env!("CARGO_PKG_VERSION"))
    }

    fn validate_config(config: String) -> Result<(), Vec<ConfigError>> {
        gpulet_scheduler_guest::no_options(&config)
    }

    fn init(config: String, _gpus: Vec<GpuInfo>) -> Result<(), String> {
        Self::validate_config(config).map_err(|e| format!("{}: {}", e[0].path, e[0].message))
    }

    fn schedule_jobs(input: ScheduleInput) -> Vec<Decision> {
        let input = gpulet_scheduler_guest::input(input);
        gpulet_scheduler_guest::decisions(priority_backfill::decide(&input))
    }
}

gpulet_scheduler_guest::export_scheduler!(Plugin);
