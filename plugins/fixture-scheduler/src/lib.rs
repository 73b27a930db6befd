//! A hostile `job-scheduler` plugin for the host's tests: it places the first queued job
//! as its config says, breaking one of the host's rules, and the host must refuse it,
//! audit it and keep the job queued.
//!
//! Config: `{"mode": M}`:
//!
//! | mode | what it returns |
//! |---|---|
//! | `twice` | the first job on GPU 0 listed twice |
//! | `two-starts` | every queued job on GPU 0 (a second exclusive start there) |
//! | `missing` | the first job on GPU 99 |
//! | `unhealthy` | the first job on the first GPU that is not usable |
//! | `memory` | the first job on the GPU with the least memory free by reservation |
//! | `wrong-count` | the first job on one GPU more than it asked for |
//! | `flood` | a decision per job and 100 more |
//! | `trap` | panics |
//! | `fine` | the first job on the first usable GPUs it fits (to show the host takes it) |

use gpulet_scheduler_guest::{
    ConfigError, Decision, GpuInfo, PluginInfo, ScheduleInput, Start, Wait,
};
use serde::Deserialize;
use std::cell::RefCell;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Config {
    mode: String,
}

thread_local! {
    static MODE: RefCell<String> = const { RefCell::new(String::new()) };
}

struct Plugin;

fn start(job: u64, gpus: Vec<u32>) -> Decision {
    Decision::Start(Start { job, gpus, reason: "fixture".into() })
}

impl gpulet_scheduler_guest::SchedulerGuest for Plugin {
    fn info() -> PluginInfo {
        gpulet_scheduler_guest::info("fixture-scheduler", env!("CARGO_PKG_VERSION"))
    }

    fn validate_config(config: String) -> Result<(), Vec<ConfigError>> {
        gpulet_scheduler_guest::parse_config::<Config>(&config).map(|_| ())
    }

    fn init(config: String, _gpus: Vec<GpuInfo>) -> Result<(), String> {
        let c: Config = gpulet_scheduler_guest::parse_config(&config)
            .map_err(|e| format!("{}: {}", e[0].path, e[0].message))?;
        MODE.with(|m| *m.borrow_mut() = c.mode);
        Ok(())
    }

    fn schedule_jobs(input: ScheduleInput) -> Vec<Decision> {
        let Some(first) = input.queue.first() else { return Vec::new() };
        let id = first.id;
        let want = match &first.gpus {
            gpulet_scheduler_guest::GpuRequest::Count(n) => *n as usize,
            gpulet_scheduler_guest::GpuRequest::Specific(g) => g.len(),
        };
        match MODE.with(|m| m.borrow().clone()).as_str() {
            "twice" => vec![start(id, vec![0, 0])],
            "two-starts" => input.queue.iter().map(|j| start(j.id, vec![0])).collect(),
            "missing" => vec![start(id, vec![99])],
            "unhealthy" => {
                let bad = input.gpus.iter().find(|g| !g.usable).map_or(0, |g| g.index);
                vec![start(id, vec![bad])]
            }
            "memory" => {
                let tight = input
                    .gpus
                    .iter()
                    .min_by_key(|g| g.memory_total_mib - g.reserved_mib.min(g.memory_total_mib))
                    .map_or(0, |g| g.index);
                vec![start(id, vec![tight])]
            }
            "wrong-count" => vec![start(id, (0..want as u32 + 1).collect())],
            "flood" => (0..input.queue.len() + 100)
                .map(|k| Decision::Wait(Wait { job: k as u64, reason: "flood".into() }))
                .collect(),
            "trap" => panic!("the fixture scheduler traps on request"),
            _ => {
                let usable: Vec<u32> = input
                    .gpus
                    .iter()
                    .filter(|g| g.usable && g.jobs == 0)
                    .map(|g| g.index)
                    .take(want)
                    .collect();
                vec![start(id, usable)]
            }
        }
    }
}

gpulet_scheduler_guest::export_scheduler!(Plugin);
