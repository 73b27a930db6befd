//! What a Rust job-scheduler plugin needs: the SDK's scheduler kind ([`SchedulerPolicy`],
//! exported with [`scheduler_plugin!`]; a shipped algorithm with [`export_algorithm!`]),
//! the bindings of the `job-scheduler` world of `wit/v0.1.2` (generated here once), the
//! host imports, strict JSON config with paths in the errors, and conversions between
//! the WIT types and the plain ones of `gpulet_policy_algos::sched`.
//!
//! Separate from `gpulet-guest` on purpose: a crate that links the `power` world's
//! bindings would carry them into every scheduler component.

#![allow(unsafe_code)] // the generated bindings are unsafe glue

/// The `job-scheduler` world's bindings.
#[allow(clippy::too_many_arguments)] // generated: the records' fields, flattened into calls
pub mod scheduler {
    wit_bindgen::generate!({
        path: "../../wit/v0.1.2",
        world: "job-scheduler",
        pub_export_macro: true,
        export_macro_name: "export_scheduler",
        default_bindings_module: "gpulet_scheduler_guest::scheduler",
    });
}

pub use scheduler::Guest as SchedulerGuest;
pub use scheduler::export_scheduler;
pub use scheduler::gpulet::policy::host;
pub use scheduler::gpulet::policy::scheduling::{
    Decision, GpuRequest, GpuSlot, JobLabel, QueuedJob, RunningJob, ScheduleInput, Start, Wait,
};
pub use scheduler::gpulet::policy::types::{ConfigError, GpuInfo, PluginInfo};

use gpulet_policy_algos::sched;
use serde::de::DeserializeOwned;

/// The contract version this crate implements.
pub const API_VERSION: &str = "0.1.2";

/// Plugin info with this crate's API version.
pub fn info(name: &str, version: &str) -> PluginInfo {
    PluginInfo {
        name: name.to_owned(),
        version: version.to_owned(),
        api_version: API_VERSION.to_owned(),
    }
}

/// Parse a plugin's JSON config strictly into `T` (use `#[serde(deny_unknown_fields)]`);
/// an error names the JSON path (`$.key`) and what is wrong. An empty config is `{}`.
/// (As `gpulet_guest::parse_config`, whose `ConfigError` is the `power` world's type.)
pub fn parse_config<T: DeserializeOwned>(json: &str) -> Result<T, Vec<ConfigError>> {
    let json = if json.trim().is_empty() { "{}" } else { json };
    let de = &mut serde_json::Deserializer::from_str(json);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { "$".to_owned() } else { format!("$.{path}") };
        vec![ConfigError { path, message: e.inner().to_string() }]
    })
}

/// Check the config of a scheduler that takes no options: `{}` (or nothing). Each key
/// is an error at its path; anything but an object is an error at `$`.
pub fn no_options(json: &str) -> Result<(), Vec<ConfigError>> {
    let map: serde_json::Map<String, serde_json::Value> = parse_config(json)?;
    if map.is_empty() {
        return Ok(());
    }
    Err(map
        .keys()
        .map(|k| ConfigError {
            path: format!("$.{k}"),
            message: "unknown option: this plugin takes none (its config is `{}`)".to_owned(),
        })
        .collect())
}

/// The input as the algorithms see it (labels dropped: no shipped algorithm reads them).
pub fn input(i: ScheduleInput) -> sched::Input {
    sched::Input {
        now_ms: i.snapshot.now_ms,
        gpus: i
            .gpus
            .into_iter()
            .map(|g| sched::Slot {
                index: g.index,
                memory_total_mib: g.memory_total_mib,
                reserved_mib: g.reserved_mib,
                jobs: g.jobs,
                exclusive: g.exclusive,
                usable: g.usable,
            })
            .collect(),
        running: i
            .running
            .into_iter()
            .map(|r| sched::Running {
                id: r.id,
                owner: r.owner,
                gpus: r.gpus,
                mem_mib: r.mem_mib,
                exclusive: r.exclusive,
                priority: r.priority,
                started_ms: r.started_ms,
                time_limit_ms: r.time_limit_ms,
            })
            .collect(),
        queue: i
            .queue
            .into_iter()
            .map(|q| sched::Queued {
                id: q.id,
                owner: q.owner,
                gpus: match q.gpus {
                    GpuRequest::Count(n) => sched::GpuRequest::Count(n),
                    GpuRequest::Specific(g) => sched::GpuRequest::Specific(g),
                },
                mem_mib: q.mem_mib,
                exclusive: q.exclusive,
                priority: q.priority,
                submitted_ms: q.submitted_ms,
                time_limit_ms: q.time_limit_ms,
            })
            .collect(),
    }
}

/// A job scheduler: given the queue, the running jobs and the GPUs' slots, which jobs
/// start where and why the others wait. Its input is all it needs; the host imports
/// (`host::log`, the key-value store) are there for what is not.
pub trait SchedulerPolicy: Sized + 'static {
    /// Its name in `info`.
    const NAME: &'static str;
    /// Its version (`env!("CARGO_PKG_VERSION")`).
    const VERSION: &'static str;
    /// Its config, parsed strictly from the plugin's JSON ([`NoOptions`] for none).
    type Config: DeserializeOwned;
    /// The scheduler for `config` on `gpus` (empty when only the config is validated):
    /// errors name the JSON path and what is accepted.
    fn new(config: Self::Config, gpus: &[GpuInfo]) -> Result<Self, Vec<ConfigError>>;
    /// This tick's starts and waits.
    fn schedule(&mut self, input: ScheduleInput) -> Vec<Decision>;
}

/// The config of a scheduler that takes no options: `{}` (or nothing); each key is an
/// error at its path ([`no_options`]).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(transparent)]
pub struct NoOptions(serde_json::Map<String, serde_json::Value>);

impl NoOptions {
    pub fn check(&self) -> Result<(), Vec<ConfigError>> {
        no_options(&serde_json::Value::Object(self.0.clone()).to_string())
    }
}

/// `validate-config` and `init` for [`scheduler_plugin!`]: the config parsed, then `new`.
#[doc(hidden)]
pub fn start<P: SchedulerPolicy>(json: &str, gpus: &[GpuInfo]) -> Result<P, Vec<ConfigError>> {
    P::new(parse_config(json)?, gpus)
}

/// `init`'s error: the first problem, with its path.
#[doc(hidden)]
pub fn init_error(errors: Vec<ConfigError>) -> String {
    errors.first().map_or_else(|| "invalid config".into(), |e| format!("{}: {}", e.path, e.message))
}

/// Export `$policy` (a [`SchedulerPolicy`]) as the component's `job-scheduler` world:
/// `info`, `validate-config` and `init` from the type, the instance kept between calls.
#[macro_export]
macro_rules! scheduler_plugin {
    ($policy:ty) => {
        const _: () = {
            use $crate::SchedulerPolicy as _;
            ::std::thread_local! {
                static POLICY: ::std::cell::RefCell<::std::option::Option<$policy>> =
                    const { ::std::cell::RefCell::new(None) };
            }
            struct Export;
            impl $crate::SchedulerGuest for Export {
                fn info() -> $crate::PluginInfo {
                    $crate::info(
                        <$policy as $crate::SchedulerPolicy>::NAME,
                        <$policy as $crate::SchedulerPolicy>::VERSION,
                    )
                }
                fn validate_config(
                    config: ::std::string::String,
                ) -> ::std::result::Result<(), ::std::vec::Vec<$crate::ConfigError>> {
                    $crate::start::<$policy>(&config, &[]).map(|_| ())
                }
                fn init(
                    config: ::std::string::String,
                    gpus: ::std::vec::Vec<$crate::GpuInfo>,
                ) -> ::std::result::Result<(), ::std::string::String> {
                    let p = $crate::start::<$policy>(&config, &gpus).map_err($crate::init_error)?;
                    POLICY.with(|c| *c.borrow_mut() = Some(p));
                    Ok(())
                }
                fn schedule_jobs(
                    input: $crate::ScheduleInput,
                ) -> ::std::vec::Vec<$crate::Decision> {
                    POLICY.with(|c| {
                        c.borrow_mut().as_mut().map(|p| p.schedule(input)).unwrap_or_default()
                    })
                }
            }
            $crate::export_scheduler!(Export);
        };
    };
}

/// Export a scheduler plugin named `$name` that takes no options and decides with
/// `$decide` (a function of `gpulet_policy_algos::sched`, `&Input -> Vec<Decision>`):
/// what each shipped scheduler is, so that each is its algorithm and nothing else.
#[macro_export]
macro_rules! export_algorithm {
    ($name:literal, $decide:path) => {
        struct Algorithm;

        impl $crate::SchedulerPolicy for Algorithm {
            const NAME: &'static str = $name;
            const VERSION: &'static str = env!("CARGO_PKG_VERSION");
            type Config = $crate::NoOptions;

            fn new(
                config: $crate::NoOptions,
                _gpus: &[$crate::GpuInfo],
            ) -> Result<Self, Vec<$crate::ConfigError>> {
                config.check().map(|()| Algorithm)
            }

            fn schedule(&mut self, input: $crate::ScheduleInput) -> Vec<$crate::Decision> {
                $crate::decisions($decide(&$crate::input(input)))
            }
        }

        $crate::scheduler_plugin!(Algorithm);
    };
}

/// The algorithms' decisions as WIT decisions.
pub fn decisions(d: Vec<sched::Decision>) -> Vec<Decision> {
    d.into_iter()
        .map(|d| match d {
            sched::Decision::Start { job, gpus, reason } => {
                Decision::Start(Start { job, gpus, reason })
            }
            sched::Decision::Wait { job, reason } => Decision::Wait(Wait { job, reason }),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use scheduler::gpulet::policy::types::Snapshot;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)] // only deserialized
    struct Options {
        margin: Option<u32>,
    }

    #[test]
    fn config_errors_name_the_path() {
        assert!(parse_config::<Options>("").is_ok());
        let e = parse_config::<Options>(r#"{"margin": -1}"#).unwrap_err();
        assert_eq!(e[0].path, "$.margin", "{e:?}");
        let e = parse_config::<Options>(r#"{"margni": 1}"#).unwrap_err();
        assert_eq!(e[0].path, "$.margni", "{e:?}");
        assert!(e[0].message.starts_with("unknown field `margni`"), "{e:?}");
    }

    /// A scheduler on the trait, run natively: its config through `start` (as
    /// `validate-config` and `init` take it), its decisions from its input.
    struct Fifo;

    impl SchedulerPolicy for Fifo {
        const NAME: &'static str = "fifo";
        const VERSION: &'static str = "1.0.0";
        type Config = NoOptions;
        fn new(c: NoOptions, _gpus: &[GpuInfo]) -> Result<Self, Vec<ConfigError>> {
            c.check().map(|()| Fifo)
        }
        fn schedule(&mut self, input: ScheduleInput) -> Vec<Decision> {
            decisions(sched::fifo_binpack::decide(&super::input(input)))
        }
    }

    #[test]
    fn a_scheduler_on_the_trait_runs_natively() {
        let e = start::<Fifo>(r#"{"backfill": true}"#, &[]).err().unwrap();
        assert_eq!(e[0].path, "$.backfill");
        assert_eq!(init_error(e).split(':').next(), Some("$.backfill"));
        let mut f = start::<Fifo>("", &[]).ok().unwrap();
        let input = ScheduleInput {
            snapshot: Snapshot { seq: 1, now_ms: 0, budget_w: None, gpus: vec![] },
            gpus: vec![GpuSlot {
                index: 0,
                uuid: "GPU-0".into(),
                memory_total_mib: 80_000,
                reserved_mib: 0,
                jobs: 0,
                exclusive: false,
                usable: true,
            }],
            running: vec![],
            queue: vec![QueuedJob {
                id: 1,
                owner: 1000,
                gpus: GpuRequest::Count(1),
                mem_mib: 1_000,
                exclusive: false,
                priority: 0,
                submitted_ms: 0,
                time_limit_ms: None,
            }],
            labels: vec![],
        };
        let d = f.schedule(input);
        assert!(matches!(&d[..], [Decision::Start(s)] if s.job == 1 && s.gpus == [0]), "{d:?}");
    }

    #[test]
    fn no_options_means_an_empty_object() {
        assert!(no_options("").is_ok());
        assert!(no_options(" {} ").is_ok());
        let e = no_options(r#"{"backfill": true, "x": 1}"#).unwrap_err();
        let paths: Vec<&str> = e.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["$.backfill", "$.x"]);
        for bad in ["[]", "null", "3"] {
            assert_eq!(no_options(bad).unwrap_err()[0].path, "$", "{bad}");
        }
        assert!(no_options("{").is_err());
    }

    #[test]
    fn conversions_keep_every_field() {
        let i = ScheduleInput {
            snapshot: Snapshot { seq: 1, now_ms: 5_000, budget_w: None, gpus: vec![] },
            gpus: vec![GpuSlot {
                index: 1,
                uuid: "GPU-x".into(),
                memory_total_mib: 80_000,
                reserved_mib: 10_000,
                jobs: 1,
                exclusive: false,
                usable: true,
            }],
            running: vec![RunningJob {
                id: 7,
                owner: 1001,
                gpus: vec![1],
                mem_mib: 10_000,
                exclusive: false,
                priority: 3,
                started_ms: 1_000,
                time_limit_ms: Some(60_000),
            }],
            queue: vec![QueuedJob {
                id: 8,
                owner: 1002,
                gpus: GpuRequest::Specific(vec![1]),
                mem_mib: 20_000,
                exclusive: true,
                priority: -1,
                submitted_ms: 4_000,
                time_limit_ms: None,
            }],
            labels: vec![JobLabel { job: 8, key: "team".into(), value: "a".into() }],
        };
        let s = input(i);
        assert_eq!(s.now_ms, 5_000);
        assert_eq!(
            s.gpus[0],
            sched::Slot {
                index: 1,
                memory_total_mib: 80_000,
                reserved_mib: 10_000,
                jobs: 1,
                exclusive: false,
                usable: true
            }
        );
        assert_eq!(s.running[0].end_ms(), Some(61_000));
        assert_eq!((s.running[0].id, s.running[0].owner, s.running[0].priority), (7, 1001, 3));
        assert_eq!((s.queue[0].id, s.queue[0].owner), (8, 1002));
        assert_eq!(s.queue[0].gpus, sched::GpuRequest::Specific(vec![1]));
        assert_eq!(
            (s.queue[0].mem_mib, s.queue[0].exclusive, s.queue[0].priority),
            (20_000, true, -1)
        );

        let d = decisions(vec![
            sched::Decision::Start { job: 8, gpus: vec![1], reason: "r".into() },
            sched::Decision::Wait { job: 9, reason: "w".into() },
        ]);
        assert!(
            matches!(&d[0], Decision::Start(s) if s.job == 8 && s.gpus == [1] && s.reason == "r")
        );
        assert!(matches!(&d[1], Decision::Wait(w) if w.job == 9 && w.reason == "w"));
    }
}
