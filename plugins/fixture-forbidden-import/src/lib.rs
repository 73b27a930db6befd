//! A power plugin that also imports `gpulet-test:forbidden/raw-network`, which is on no
//! allowlist: the host must refuse it at load and name that import.

#![allow(unsafe_code)] // generated bindings

wit_bindgen::generate!({ path: "wit", world: "forbidden", generate_all });

struct Plugin;

impl Guest for Plugin {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "forbidden".into(),
            version: "0.1.0".into(),
            api_version: "0.1.0".into(),
        }
    }
    fn validate_config(_config: String) -> Result<(), Vec<ConfigError>> {
        Ok(())
    }
    fn init(_config: String, _gpus: Vec<GpuInfo>) -> Result<(), String> {
        Ok(())
    }
    fn decide_power(_snapshot: Snapshot) -> Vec<PowerAction> {
        gpulet_test::forbidden::raw_network::send("127.0.0.1:9", b"hello");
        Vec::new()
    }
}

export!(Plugin);
