//! What a Rust policy plugin needs: the SDK ([`sdk`]: a trait per plugin kind, the host
//! behind a trait so that the logic is tested natively, a macro to export), the bindings
//! of the `power` and `reporter` worlds of `wit/v0.1.2` (generated here once; the two
//! share one set of types), and helpers for the boring parts: strict JSON config with
//! paths in the errors, and the snapshot's GPUs as the plain structs of
//! `gpulet-policy-algos`. A plugin:
//!
//! ```ignore
//! struct Cap { limit_w: f64 }
//! impl gpulet_guest::PowerPolicy for Cap {
//!     const NAME: &'static str = "cap";
//!     const VERSION: &'static str = env!("CARGO_PKG_VERSION");
//!     type Config = CapConfig; // serde, deny_unknown_fields
//!     fn new(c: CapConfig, _gpus: &[GpuInfo]) -> Result<Cap, Vec<ConfigError>> { ... }
//!     fn decide(&mut self, s: &Snapshot, host: &dyn Host) -> Vec<PowerAction> { ... }
//! }
//! gpulet_guest::power_plugin!(Cap);
//! ```

#![allow(unsafe_code)] // the generated bindings are unsafe glue

/// The `power` world's bindings.
pub mod power {
    wit_bindgen::generate!({
        path: "../../wit/v0.1.2",
        world: "power",
        pub_export_macro: true,
        export_macro_name: "export_power",
        default_bindings_module: "gpulet_guest::power",
    });
}

/// The `reporter` world's bindings, on the `power` world's types and host imports.
pub mod reporter {
    wit_bindgen::generate!({
        path: "../../wit/v0.1.2",
        world: "reporter",
        with: {
            "gpulet:policy/types@0.1.2": crate::power::gpulet::policy::types,
            "gpulet:policy/host@0.1.2": crate::power::gpulet::policy::host,
        },
        pub_export_macro: true,
        export_macro_name: "export_reporter",
        default_bindings_module: "gpulet_guest::reporter",
    });
}

pub use power::Guest as PowerGuest;
pub use power::export_power;
pub use power::gpulet::policy::host;
pub use power::gpulet::policy::types::{
    ConfigError, CurvePoint, Gpu, GpuInfo, Health, Metric, PluginInfo, PowerAction, ReportEvent,
    ReportItem, Snapshot, Throttle, WallTime,
};

pub mod sdk;
pub use reporter::Guest as ReporterGuest;
pub use reporter::export_reporter;
pub use sdk::{FakeHost, Host, PowerPolicy, ReporterPolicy};

use serde::de::DeserializeOwned;

/// The contract version this crate implements.
pub const API_VERSION: &str = "0.1.2";

/// Parse a plugin's JSON config strictly into `T` (use `#[serde(deny_unknown_fields)]`);
/// an error names the JSON path (`$.margin_w`) and what is wrong.
pub fn parse_config<T: DeserializeOwned>(json: &str) -> Result<T, Vec<ConfigError>> {
    let json = if json.trim().is_empty() { "{}" } else { json };
    let de = &mut serde_json::Deserializer::from_str(json);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { "$".to_owned() } else { format!("$.{path}") };
        vec![ConfigError { path, message: e.inner().to_string() }]
    })
}

/// A config error at `path`.
pub fn config_error(path: &str, message: impl Into<String>) -> ConfigError {
    ConfigError { path: path.to_owned(), message: message.into() }
}

/// Check that a config value lies in `lo..=hi`; if not, push an error naming the value
/// and the accepted range (in `unit`).
pub fn check_range(
    errs: &mut Vec<ConfigError>,
    path: &str,
    value: f64,
    lo: f64,
    hi: f64,
    unit: &str,
) {
    if !(lo..=hi).contains(&value) {
        errs.push(config_error(
            path,
            format!("{value} is out of range; accepted: {lo} to {hi} ({unit})"),
        ));
    }
}

/// The snapshot's GPUs as the algorithms see them.
pub fn gpus(s: &Snapshot) -> Vec<gpulet_policy_algos::Gpu> {
    s.gpus
        .iter()
        .map(|g| gpulet_policy_algos::Gpu {
            index: g.index,
            power_w: g.power_w,
            limit_w: g.power_limit_w,
            temp_c: g.temp_c,
            util_pct: g.util_pct,
            capped: g.throttle.contains(Throttle::SW_POWER_CAP),
            lost: g.health == Health::Lost,
            min_w: g.min_limit_w,
            max_w: g.max_limit_w,
            default_w: g.default_limit_w,
            proposed_w: g.proposed_limit_w,
            curve: None,
        })
        .collect()
}

/// The work-per-watt curve of each GPU of `s` (`host.gpu-curve`), for the algorithms.
/// Curves do not change while a plugin instance lives: fetch them once and keep them.
pub fn curves(s: &Snapshot, host: &dyn Host) -> Vec<Option<gpulet_policy_algos::Curve>> {
    s.gpus
        .iter()
        .map(|g| {
            let points = host.gpu_curve(g.index)?;
            gpulet_policy_algos::Curve::new(
                points.iter().map(|p| (p.limit_w, p.relative)).collect(),
            )
        })
        .collect()
}

/// The algorithms' actions as WIT actions.
pub fn actions(a: Vec<gpulet_policy_algos::Action>) -> Vec<PowerAction> {
    a.into_iter()
        .map(|a| PowerAction { gpu: a.gpu, limit_w: a.limit_w, reason: a.reason })
        .collect()
}

/// Plugin info with this crate's API version.
pub fn info(name: &str, version: &str) -> PluginInfo {
    PluginInfo {
        name: name.to_owned(),
        version: version.to_owned(),
        api_version: API_VERSION.to_owned(),
    }
}
