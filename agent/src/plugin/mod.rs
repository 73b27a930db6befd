//! The sandboxed Wasm policy plugins: loading, sandboxing, calling, composing.
//!
//! - [`engine`]: the one wasmtime `Engine` (epoch interruption, a ticker thread), the
//!   `Linker` with what a plugin may import, the import allowlist, compiling and the
//!   on-disk cache of compiled plugins ([`cache`]).
//! - [`host`]: what a plugin's `Store` holds and the host imports it may call (log,
//!   key-value store [`kv`], metrics), with the memory cap.
//! - [`sandbox`]: what any plugin runs in, whatever its world: its limits, a store per
//!   instance with the memory cap and deadline, one call timed and its fault classified.
//! - [`world`]: what every world shares: start a plugin (instantiate, check its API
//!   version, `validate-config`, `init`) and call its export in its sandbox,
//!   re-instantiating after a fault.
//! - [`power`], [`scheduler`], [`reporter`]: the `power`, `job-scheduler` and `reporter`
//!   worlds' bindings: their one export each, and what its results may be.
//! - [`chain`]: the decision stage the agent calls: the static caps, then the power
//!   plugins in configured order, with grants, fault counting, quarantine and fallback.
//! - [`reporters`]: the reporting stage, after the decision: reporter plugins' metrics
//!   and events, checked and bounded, into telemetry; they change no limit.
//! - [`thread`]: the plugin thread, where every call into a plugin runs (never on the
//!   agent's async runtime, where a plugin's blocking WASI call would panic).
//!
//! Why each sandbox measure is there is written where it is set up; the summary is in
//! `docs/plugins.md`.

pub mod cache;
pub mod chain;
pub mod dry_run;
pub mod engine;
pub mod host;
pub mod kv;
pub mod power;
pub mod replay;
pub mod reporter;
pub mod reporters;
pub mod sandbox;
pub mod scheduler;
pub mod thread;
pub mod world;

/// Host bindings of the `power` world of `wit/v0.1.2`. Plugins built against 0.1.0 or
/// 0.1.1 link to them too: each patch version only adds, and the linker resolves an
/// older import to its 0.1.2 definition (semver-compatible).
pub mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit/v0.1.2",
        world: "power",
    });
}

/// Host bindings of the `job-scheduler` world of `wit/v0.1.2`, sharing the `types` and
/// `host` interfaces of [`bindings`] (one host implementation, one set of types).
pub mod scheduler_bindings {
    wasmtime::component::bindgen!({
        path: "../wit/v0.1.2",
        world: "job-scheduler",
        with: {
            "gpulet:policy/types": super::bindings::gpulet::policy::types,
            "gpulet:policy/host": super::bindings::gpulet::policy::host,
        },
    });
}

/// Host bindings of the `reporter` world of `wit/v0.1.2`, on [`bindings`]' types and host.
pub mod reporter_bindings {
    wasmtime::component::bindgen!({
        path: "../wit/v0.1.2",
        world: "reporter",
        with: {
            "gpulet:policy/types": super::bindings::gpulet::policy::types,
            "gpulet:policy/host": super::bindings::gpulet::policy::host,
        },
    });
}

pub use bindings::gpulet::policy::types as wit;
pub use scheduler_bindings::gpulet::policy::scheduling as sched_wit;

/// The node's GPUs as `init` gets them.
pub fn gpu_infos(inventory: &[crate::gpu::GpuInfo]) -> Vec<wit::GpuInfo> {
    inventory
        .iter()
        .map(|g| wit::GpuInfo {
            index: g.index,
            uuid: g.uuid.clone(),
            name: g.name.clone(),
            memory_total_mib: g.memory_total_mib,
        })
        .collect()
}

/// The contract version this host implements; a plugin must report the same
/// major.minor (`0.1`) in `info`.
pub const API_VERSION: &str = "0.1.2";

/// What can go wrong loading a plugin. Each message names the plugin file and what to do.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PluginError {
    #[error("cannot read plugin {path}: {error}")]
    Read { path: String, error: String },
    #[error("{path} is not a valid WebAssembly component: {error}")]
    Compile { path: String, error: String },
    #[error(
        "cannot run plugin {path}: this system refuses to make memory executable ({error}), and plugins are compiled to native code when they load. Under systemd this is MemoryDenyWriteExecute=yes: remove it from gpulet's unit (see packaging/README.md); until then no plugin runs and the configured fallback stands in"
    )]
    NoExecutableMemory { path: String, error: String },
    #[error(
        "{path} imports {import}, which gpulet does not grant to plugins; allowed: gpulet:policy/host and types, and WASI's cli, io, clocks, random, filesystem and sockets interfaces (the last two linked with nothing granted)"
    )]
    ForbiddenImport { path: String, import: String },
    #[error(
        "{path} is not a {world} plugin: it does not export the `{world}` world of gpulet:policy@{API_VERSION} ({error})"
    )]
    WrongWorld { path: String, world: &'static str, error: String },
    #[error(
        "plugin {plugin} was built for gpulet:policy@{found}; this gpulet implements {API_VERSION}: rebuild it against wit/v{API_VERSION}"
    )]
    ApiVersion { plugin: String, found: String },
    #[error("plugin {plugin}: invalid config: {errors}")]
    Config { plugin: String, errors: String },
    #[error("plugin {plugin}: {stage} failed: {error}")]
    Start { plugin: String, stage: &'static str, error: String },
    #[error("cannot set up the plugin engine: {0}")]
    Engine(String),
}
