//! A power plugin built against `wit/v0.1.0`, as plugins written before 0.1.1 were: the
//! host (which implements 0.1.1) must load it and run it unchanged. It proposes each
//! GPU's lower bound and emits one metric through the 0.1.0 `host` import.

#![allow(unsafe_code)] // generated bindings

wit_bindgen::generate!({ path: "../../wit/v0.1.0", world: "power" });

use gpulet::policy::host;

struct Plugin;

impl Guest for Plugin {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "fixture-v010".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            api_version: "0.1.0".into(),
        }
    }
    fn validate_config(_config: String) -> Result<(), Vec<ConfigError>> {
        Ok(())
    }
    fn init(_config: String, _gpus: Vec<GpuInfo>) -> Result<(), String> {
        Ok(())
    }
    fn decide_power(snapshot: Snapshot) -> Vec<PowerAction> {
        host::emit_metric("v010.calls", 1.0, None);
        snapshot
            .gpus
            .iter()
            .map(|g| PowerAction {
                gpu: g.index,
                limit_w: g.min_limit_w,
                reason: "fixture-v010: the lower bound".into(),
            })
            .collect()
    }
}

export!(Plugin);
