//! The sandboxed Wasm policy plugins: loading, sandboxing, calling, composing.
//!
//! - [`engine`]: the one wasmtime `Engine` (epoch interruption, a ticker thread), the
//!   `Linker` with what a plugin may import, the import allowlist, compiling and the
//!   on-disk cache of compiled plugins ([`cache`]).
//! - [`host`]: what a plugin's `Store` holds and the host imports it may call (log,
//!   key-value store [`kv`], metrics), with the memory cap.
//! - [`sandbox`]: what any plugin runs in, whatever its world: its limits, a store per
//!   instance with the memory cap and deadline, one call timed and its fault classified.
//! - [`power`]: the `power` world's binding: start a power plugin (instantiate, check
//!   its API version, `validate-config`, `init`) and call `decide-power` in its sandbox,
//!   re-instantiating after a fault.
//! - [`chain`]: the decision stage the agent calls: the static caps, then the power
//!   plugins in configured order, with grants, fault counting, quarantine and fallback.
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
pub mod sandbox;
pub mod thread;

/// Host bindings of the `power` world of `wit/v0.1.1`. Plugins built against 0.1.0 link
/// to them too: 0.1.1 only adds, and the linker resolves a 0.1.0 import to its 0.1.1
/// definition (semver-compatible).
pub mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit/v0.1.1",
        world: "power",
    });
}

pub use bindings::gpulet::policy::types as wit;

/// The contract version this host implements; a plugin must report the same
/// major.minor (`0.1`) in `info`.
pub const API_VERSION: &str = "0.1.1";

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
        "{path} is not a power plugin: it does not export the `power` world of gpulet:policy@{API_VERSION} ({error})"
    )]
    WrongWorld { path: String, error: String },
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
