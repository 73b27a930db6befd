//! The policy SDK: a plugin is a type implementing [`PowerPolicy`] or [`ReporterPolicy`],
//! exported with [`power_plugin!`](crate::power_plugin) or
//! [`reporter_plugin!`](crate::reporter_plugin), and it reaches the host only through
//! the [`Host`] it is handed, so that its logic runs natively in `cargo test` against a
//! [`FakeHost`] (the key-value store, metrics, logs, curves and wall clock of a test).
//!
//! What the macros do for every plugin (and a plugin no longer writes): `info` from the
//! type's name and version with this crate's API version; `validate-config` and `init`
//! from one constructor, [`PowerPolicy::new`], fed the config parsed strictly into the
//! type's `Config` (errors name the JSON path); the instance kept between calls; the
//! calls handed the real host ([`Wasm`]).

use std::cell::RefCell;
use std::collections::BTreeMap;

use serde::de::DeserializeOwned;

use crate::{ConfigError, CurvePoint, GpuInfo, PowerAction, ReportItem, Snapshot, WallTime, host};

/// What a policy may ask of the host: the `host` interface of the contract.
pub trait Host {
    /// Write to the agent's log (rate-limited by the host).
    fn log(&self, level: host::Level, message: &str);
    /// A value from the plugin's key-value store, which survives re-instantiation and
    /// restarts (memory does not).
    fn kv_get(&self, key: &str) -> Option<Vec<u8>>;
    fn kv_set(&self, key: &str, value: &[u8]) -> Result<(), String>;
    fn kv_delete(&self, key: &str);
    /// A metric in this tick's telemetry, tagged with the plugin's name.
    fn emit_metric(&self, name: &str, value: f64, gpu: Option<u32>);
    /// GPU `gpu`'s calibrated work-per-watt curve, if it has one.
    fn gpu_curve(&self, gpu: u32) -> Option<Vec<CurvePoint>>;
    /// The snapshot's wall-clock time and the node's UTC offset (replayable).
    fn wall_clock(&self) -> WallTime;
}

/// The host the agent is: the component's imports.
pub struct Wasm;

impl Host for Wasm {
    fn log(&self, level: host::Level, message: &str) {
        host::log(level, message)
    }
    fn kv_get(&self, key: &str) -> Option<Vec<u8>> {
        host::kv_get(key)
    }
    fn kv_set(&self, key: &str, value: &[u8]) -> Result<(), String> {
        host::kv_set(key, value)
    }
    fn kv_delete(&self, key: &str) {
        host::kv_delete(key)
    }
    fn emit_metric(&self, name: &str, value: f64, gpu: Option<u32>) {
        host::emit_metric(name, value, gpu)
    }
    fn gpu_curve(&self, gpu: u32) -> Option<Vec<CurvePoint>> {
        host::gpu_curve(gpu)
    }
    fn wall_clock(&self) -> WallTime {
        host::wall_clock()
    }
}

/// A host for native tests: what the policy stored, emitted and logged, and the curves
/// and wall time it is given. One `FakeHost` handed to two instances of a policy is a
/// re-instantiation: the key-value store carries over, memory does not.
pub struct FakeHost {
    pub kv: RefCell<BTreeMap<String, Vec<u8>>>,
    pub metrics: RefCell<Vec<(String, f64, Option<u32>)>>,
    pub logs: RefCell<Vec<(host::Level, String)>>,
    pub curves: BTreeMap<u32, Vec<CurvePoint>>,
    pub wall: WallTime,
}

impl Default for FakeHost {
    fn default() -> Self {
        FakeHost {
            kv: RefCell::default(),
            metrics: RefCell::default(),
            logs: RefCell::default(),
            curves: BTreeMap::new(),
            wall: WallTime { unix_ms: 0, utc_offset_s: 0 },
        }
    }
}

impl Host for FakeHost {
    fn log(&self, level: host::Level, message: &str) {
        self.logs.borrow_mut().push((level, message.to_owned()));
    }
    fn kv_get(&self, key: &str) -> Option<Vec<u8>> {
        self.kv.borrow().get(key).cloned()
    }
    fn kv_set(&self, key: &str, value: &[u8]) -> Result<(), String> {
        self.kv.borrow_mut().insert(key.to_owned(), value.to_vec());
        Ok(())
    }
    fn kv_delete(&self, key: &str) {
        self.kv.borrow_mut().remove(key);
    }
    fn emit_metric(&self, name: &str, value: f64, gpu: Option<u32>) {
        self.metrics.borrow_mut().push((name.to_owned(), value, gpu));
    }
    fn gpu_curve(&self, gpu: u32) -> Option<Vec<CurvePoint>> {
        self.curves.get(&gpu).cloned()
    }
    fn wall_clock(&self) -> WallTime {
        self.wall
    }
}

/// A power policy: given each tick's snapshot, the limits it proposes, with reasons.
pub trait PowerPolicy: Sized + 'static {
    /// Its name in `info` (the operator names the plugin in the config).
    const NAME: &'static str;
    /// Its version (`env!("CARGO_PKG_VERSION")`).
    const VERSION: &'static str;
    /// Its config, parsed strictly from the plugin's JSON: use
    /// `#[serde(deny_unknown_fields)]` and `Option` fields for defaults.
    type Config: DeserializeOwned;
    /// The policy for `config` on `gpus` (empty when only the config is being
    /// validated): errors name the JSON path (`$.margin_w`) and what is accepted.
    fn new(config: Self::Config, gpus: &[GpuInfo]) -> Result<Self, Vec<ConfigError>>;
    /// The limits to propose this tick.
    fn decide(&mut self, snapshot: &Snapshot, host: &dyn Host) -> Vec<PowerAction>;
}

/// A reporter: given each tick's snapshot, metrics and events; never a limit.
pub trait ReporterPolicy: Sized + 'static {
    const NAME: &'static str;
    const VERSION: &'static str;
    type Config: DeserializeOwned;
    fn new(config: Self::Config, gpus: &[GpuInfo]) -> Result<Self, Vec<ConfigError>>;
    fn report(&mut self, snapshot: &Snapshot, host: &dyn Host) -> Vec<ReportItem>;
}

/// `validate-config` and `init` for the macros: the config parsed into `C`, then `new`.
#[doc(hidden)]
pub fn start<C: DeserializeOwned, P>(
    json: &str,
    gpus: &[GpuInfo],
    new: impl FnOnce(C, &[GpuInfo]) -> Result<P, Vec<ConfigError>>,
) -> Result<P, Vec<ConfigError>> {
    new(crate::parse_config(json)?, gpus)
}

/// `init`'s error: the first problem, with its path.
#[doc(hidden)]
pub fn init_error(errors: Vec<ConfigError>) -> String {
    errors.first().map_or_else(|| "invalid config".into(), |e| format!("{}: {}", e.path, e.message))
}

/// Export `$policy` (a [`PowerPolicy`]) as the component's `power` world.
#[macro_export]
macro_rules! power_plugin {
    ($policy:ty) => {
        $crate::__export_policy!(
            $policy,
            PowerPolicy,
            PowerGuest,
            export_power,
            decide_power,
            decide,
            PowerAction
        );
    };
}

/// Export `$policy` (a [`ReporterPolicy`]) as the component's `reporter` world.
#[macro_export]
macro_rules! reporter_plugin {
    ($policy:ty) => {
        $crate::__export_policy!(
            $policy,
            ReporterPolicy,
            ReporterGuest,
            export_reporter,
            report,
            report,
            ReportItem
        );
    };
}

/// What [`power_plugin!`](crate::power_plugin) and
/// [`reporter_plugin!`](crate::reporter_plugin) expand to: the world's `Guest` for
/// `$policy` (a `$policy_trait`), whose export `$export_fn` calls `$method`.
#[doc(hidden)]
#[macro_export]
macro_rules! __export_policy {
    ($policy:ty, $policy_trait:ident, $guest:ident, $export:ident, $export_fn:ident, $method:ident, $item:ident) => {
        const _: () = {
            use $crate::$policy_trait as _;
            ::std::thread_local! {
                static POLICY: ::std::cell::RefCell<::std::option::Option<$policy>> =
                    const { ::std::cell::RefCell::new(None) };
            }
            struct Export;
            impl $crate::$guest for Export {
                fn info() -> $crate::PluginInfo {
                    $crate::info(
                        <$policy as $crate::$policy_trait>::NAME,
                        <$policy as $crate::$policy_trait>::VERSION,
                    )
                }
                fn validate_config(
                    config: ::std::string::String,
                ) -> ::std::result::Result<(), ::std::vec::Vec<$crate::ConfigError>> {
                    $crate::sdk::start(&config, &[], <$policy as $crate::$policy_trait>::new)
                        .map(|_| ())
                }
                fn init(
                    config: ::std::string::String,
                    gpus: ::std::vec::Vec<$crate::GpuInfo>,
                ) -> ::std::result::Result<(), ::std::string::String> {
                    let p =
                        $crate::sdk::start(&config, &gpus, <$policy as $crate::$policy_trait>::new)
                            .map_err($crate::sdk::init_error)?;
                    POLICY.with(|c| *c.borrow_mut() = Some(p));
                    Ok(())
                }
                fn $export_fn(snapshot: $crate::Snapshot) -> ::std::vec::Vec<$crate::$item> {
                    POLICY.with(|c| {
                        c.borrow_mut()
                            .as_mut()
                            .map(|p| p.$method(&snapshot, &$crate::sdk::Wasm))
                            .unwrap_or_default()
                    })
                }
            }
            $crate::$export!(Export);
        };
    };
}

/// A snapshot for native tests: GPUs `0..temps.len()`, 700 W parts (200 to 700 W) at
/// `limit_w`, each at its temperature and busy.
pub fn test_snapshot(seq: u64, limit_w: f64, temps: &[f64]) -> Snapshot {
    use crate::{Gpu, Health, Throttle};
    let gpus = temps
        .iter()
        .enumerate()
        .map(|(i, &t)| Gpu {
            index: i as u32,
            power_w: Some(limit_w * 0.9),
            power_limit_w: Some(limit_w),
            energy_j: None,
            temp_c: Some(t),
            util_pct: Some(100.0),
            mem_used_mib: None,
            sm_clock_mhz: None,
            throttle: Throttle::empty(),
            health: Health::Ok,
            min_limit_w: 200.0,
            max_limit_w: 700.0,
            default_limit_w: 700.0,
            proposed_limit_w: None,
        })
        .collect();
    Snapshot { seq, now_ms: seq * 1000, budget_w: None, gpus }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A policy written against the SDK, tested without Wasm: it counts its calls in
    /// the key-value store and caps GPUs over a temperature.
    struct Counter {
        cap_w: f64,
    }

    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct CounterConfig {
        cap_w: Option<f64>,
    }

    impl PowerPolicy for Counter {
        const NAME: &'static str = "counter";
        const VERSION: &'static str = "1.0.0";
        type Config = CounterConfig;
        fn new(c: CounterConfig, _gpus: &[GpuInfo]) -> Result<Self, Vec<ConfigError>> {
            let cap_w = c.cap_w.unwrap_or(300.0);
            let mut errs = Vec::new();
            crate::check_range(&mut errs, "$.cap_w", cap_w, 100.0, 700.0, "watts");
            if errs.is_empty() { Ok(Counter { cap_w }) } else { Err(errs) }
        }
        fn decide(&mut self, s: &Snapshot, host: &dyn Host) -> Vec<PowerAction> {
            let n = host.kv_get("n").map_or(0, |b| b[0]) + 1;
            host.kv_set("n", &[n]).unwrap();
            host.emit_metric("calls", f64::from(n), None);
            let hour = (host.wall_clock().unix_ms / 3_600_000) % 24;
            s.gpus
                .iter()
                .filter(|g| g.temp_c.is_some_and(|t| t > 80.0))
                .map(|g| PowerAction {
                    gpu: g.index,
                    limit_w: self.cap_w,
                    reason: format!("hot at {hour}h"),
                })
                .collect()
        }
    }

    #[test]
    fn a_policy_runs_natively_against_a_fake_host() {
        let host = FakeHost {
            wall: WallTime { unix_ms: 5 * 3_600_000, utc_offset_s: 0 },
            ..FakeHost::default()
        };
        let mut p = start(r#"{"cap_w": 250}"#, &[], Counter::new).ok().unwrap();
        let a = p.decide(&test_snapshot(1, 700.0, &[70.0, 85.0]), &host);
        assert_eq!(a.len(), 1);
        assert_eq!((a[0].gpu, a[0].limit_w, a[0].reason.as_str()), (1, 250.0, "hot at 5h"));
        // A fresh instance (a re-instantiation) on the same host: the store carried over.
        let mut again = start("{}", &[], Counter::new).ok().unwrap();
        again.decide(&test_snapshot(2, 700.0, &[70.0, 70.0]), &host);
        assert_eq!(host.metrics.borrow().last().unwrap(), &("calls".to_owned(), 2.0, None));
    }

    #[test]
    fn config_errors_name_the_json_path() {
        let e = start(r#"{"cap_w": 50}"#, &[], Counter::new).err().unwrap();
        assert_eq!(e[0].path, "$.cap_w");
        assert!(e[0].message.contains("accepted: 100 to 700"), "{}", e[0].message);
        let e = start(r#"{"cap": 50}"#, &[], Counter::new).err().unwrap();
        assert!(e[0].message.contains("unknown field `cap`"), "{}", e[0].message);
        assert!(init_error(e).starts_with("$.cap: unknown field"));
    }
}
