//! The one wasmtime engine of the process, the linker of what plugins may import, and
//! loading a component: read, compile (or take from the cache), check its imports.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine};

use super::PluginError;
use super::bindings::Power;
use super::cache::{Cache, Source};
use super::host::HostState;

/// How often the epoch advances: the resolution of plugin deadlines.
pub const EPOCH_PERIOD: Duration = Duration::from_millis(1);

/// Interfaces a plugin may import, by `namespace:package/interface` (versions are the
/// linker's business; gpulet's own are checked by the world's API version). Everything
/// else is refused at load. WASI's filesystem and sockets are on the list because Rust's
/// std links them as soon as a plugin mentions a file or a socket; they are linked with
/// nothing granted, so such calls fail at run time. WASI's clocks are on it because std's
/// networking and time types link them; reading them is harmless, but a plugin that does
/// is no longer replayable, which is why the snapshot carries `now-ms`.
pub const ALLOWED_IMPORTS: &[&str] = &[
    "gpulet:policy/host",
    "gpulet:policy/types",
    "gpulet:policy/scheduling",
    "wasi:cli/environment",
    "wasi:cli/exit",
    "wasi:cli/stdin",
    "wasi:cli/stdout",
    "wasi:cli/stderr",
    "wasi:cli/terminal-input",
    "wasi:cli/terminal-output",
    "wasi:cli/terminal-stdin",
    "wasi:cli/terminal-stdout",
    "wasi:cli/terminal-stderr",
    "wasi:clocks/monotonic-clock",
    "wasi:clocks/wall-clock",
    "wasi:io/error",
    "wasi:io/poll",
    "wasi:io/streams",
    "wasi:random/random",
    "wasi:random/insecure",
    "wasi:random/insecure-seed",
    "wasi:filesystem/types",
    "wasi:filesystem/preopens",
    "wasi:sockets/network",
    "wasi:sockets/instance-network",
    "wasi:sockets/tcp",
    "wasi:sockets/tcp-create-socket",
    "wasi:sockets/udp",
    "wasi:sockets/udp-create-socket",
    "wasi:sockets/ip-name-lookup",
];

/// A component ready to instantiate, with how it was obtained.
#[derive(Debug, Clone)]
pub struct LoadedComponent {
    pub path: PathBuf,
    pub component: Component,
    pub source: Source,
    /// Reading, compiling or loading from the cache, and checking.
    pub load_time: Duration,
    /// Every import, as the component names it.
    pub imports: Vec<String>,
}

/// The engine, the linker, the epoch ticker and the cache.
pub struct PluginEngine {
    engine: Engine,
    /// The engine's configuration, for the engine each compile gets (see `compile`).
    config: Config,
    linker: Arc<Linker<HostState>>,
    cache: Option<Cache>,
    ticker: Arc<Ticker>,
}

impl std::fmt::Debug for PluginEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginEngine").field("cache", &self.cache).finish_non_exhaustive()
    }
}

impl PluginEngine {
    /// One engine for every plugin. `cache_dir`: where compiled plugins are kept; `None`
    /// compiles on every load.
    pub fn new(cache_dir: Option<&Path>) -> Result<PluginEngine, PluginError> {
        let mut config = Config::new();
        // Deadlines: compiled code checks an epoch counter that a ticker thread advances.
        config.epoch_interruption(true);
        // No component-model async: a plain call costs a third as much without it.
        config.concurrency_support(false);
        // Compile on the loading thread, not on a pool as large as the machine: the
        // agent's threads and memory must not grow with the host's core count (a
        // 192-core host would otherwise keep 192 idle compiler threads). Compiling is
        // rare (the cache keeps the result).
        config.parallel_compilation(false);
        let engine = Engine::new(&config).map_err(|e| PluginError::Engine(e.to_string()))?;

        let ticker = Ticker::start(&engine)?;

        let mut linker = Linker::<HostState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .map_err(|e| PluginError::Engine(e.to_string()))?;
        refuse_blocking(&mut linker).map_err(|e| PluginError::Engine(e.to_string()))?;
        Power::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
            .map_err(|e| PluginError::Engine(e.to_string()))?;
        // The scheduler world's own interface holds only types: an empty instance.
        super::sched_wit::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
            .map_err(|e| PluginError::Engine(e.to_string()))?;

        let cache = cache_dir.and_then(|dir| match Cache::open(dir) {
            Ok(c) => Some(c),
            Err(why) => {
                tracing::warn!(dir = %dir.display(), %why, "not using the plugin cache; plugins are compiled at every load");
                None
            }
        });
        Ok(PluginEngine { engine, config, linker: Arc::new(linker), cache, ticker })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn linker(&self) -> &Linker<HostState> {
        &self.linker
    }

    /// The epoch ticker, which runs only while a plugin call is in progress.
    pub fn ticker(&self) -> Arc<Ticker> {
        self.ticker.clone()
    }

    /// The native code for `wasm`, compiled by an engine of this engine's configuration
    /// made for the purpose and dropped after: an engine keeps its compiler's working
    /// buffers for the next compile, ~80 MB after a plugin with an interpreter inside,
    /// which the agent would otherwise carry for its whole life to compile nothing more.
    /// The same configuration gives the same compatibility hash, so the code loads into
    /// the long-lived engine.
    fn compile(&self, wasm: &[u8]) -> wasmtime::Result<Vec<u8>> {
        Engine::new(&self.config)?.precompile_component(wasm)
    }

    /// Read, compile (or load from the cache) and check a component's imports.
    pub fn load(&self, path: &Path) -> Result<LoadedComponent, PluginError> {
        let start = Instant::now();
        let shown = path.display().to_string();
        let wasm = std::fs::read(path)
            .map_err(|e| PluginError::Read { path: shown.clone(), error: e.to_string() })?;
        let compile_err = |e: wasmtime::Error| {
            let error = format!("{e:#}");
            // W^X enforced by the kernel (MemoryDenyWriteExecute, PR_SET_MDWE): the
            // component is fine, the environment is not; say so, not "invalid".
            if error.contains("make memory executable") {
                PluginError::NoExecutableMemory { path: shown.clone(), error }
            } else {
                PluginError::Compile { path: shown.clone(), error }
            }
        };
        // Imports first, from the binary: a component with an interpreter takes tens of
        // seconds to compile, and one importing what the host refuses (a default
        // JavaScript build imports wasi:http) is refused before that, not after.
        let imports = top_level_imports(&wasm)
            .map_err(|error| PluginError::Compile { path: shown.clone(), error })?;
        if let Some(bad) = imports.iter().find(|i| !allowed(i)) {
            return Err(PluginError::ForbiddenImport { path: shown, import: bad.clone() });
        }
        let compile = |wasm: &[u8]| self.compile(wasm);
        let loaded = match &self.cache {
            Some(cache) => cache.load(&self.engine, &wasm, &compile),
            None => {
                super::cache::uncached(&self.engine, &wasm, &compile).map(|c| (c, Source::Compiled))
            }
        };
        drop(wasm);
        if !matches!(loaded, Ok((_, Source::Cached))) {
            super::cache::release_scratch();
        }
        let (component, source) = loaded.map_err(compile_err)?;
        Ok(LoadedComponent {
            path: path.to_path_buf(),
            component,
            source,
            load_time: start.elapsed(),
            imports,
        })
    }
}

/// The names a component imports (its own, not those of the modules and components
/// nested in it), read without compiling it. A core module (not a component) imports
/// nothing a component could, and is refused by the compiler next.
fn top_level_imports(wasm: &[u8]) -> Result<Vec<String>, String> {
    use wasmparser::{Parser, Payload};
    let mut imports = Vec::new();
    let mut depth = 0usize;
    for payload in Parser::new(0).parse_all(wasm) {
        match payload.map_err(|e| e.to_string())? {
            Payload::Version { .. } => depth += 1,
            Payload::End(_) => depth = depth.saturating_sub(1),
            Payload::ComponentImportSection(section) if depth == 1 => {
                for import in section {
                    let import = import.map_err(|e| e.to_string())?;
                    // A world's `use` of a type is a type import: no capability.
                    if !matches!(import.ty, wasmparser::ComponentTypeRef::Type(_)) {
                        imports.push(import.name.name.to_owned());
                    }
                }
            }
            _ => {}
        }
    }
    Ok(imports)
}

/// Advances the engine's epoch every [`EPOCH_PERIOD`], but only while some plugin call is
/// in progress: between calls the thread sleeps, so an agent whose plugins run for
/// microseconds once a second does not pay a thousand wake-ups a second for deadlines.
/// Epochs do not advance between calls, which is harmless: every call sets its deadline
/// relative to the epoch at its start.
#[derive(Debug)]
pub struct Ticker {
    active: AtomicUsize,
    thread: std::thread::Thread,
}

impl Ticker {
    fn start(engine: &Engine) -> Result<Arc<Ticker>, PluginError> {
        // The thread holds only a weak reference to the engine, so it ends with it.
        let weak = engine.weak();
        let (tx, rx) = std::sync::mpsc::channel::<Arc<Ticker>>();
        let handle = std::thread::Builder::new()
            .name("gpulet-epoch".into())
            .spawn(move || {
                let Ok(me) = rx.recv() else { return };
                drop(rx);
                loop {
                    if me.active.load(Ordering::Acquire) == 0 {
                        // Woken by the next call; the timeout only checks that the
                        // engine still exists.
                        std::thread::park_timeout(Duration::from_secs(1));
                    } else {
                        std::thread::sleep(EPOCH_PERIOD);
                    }
                    let Some(engine) = weak.upgrade() else { return };
                    if me.active.load(Ordering::Acquire) > 0 {
                        engine.increment_epoch();
                    }
                }
            })
            .map_err(|e| PluginError::Engine(format!("cannot start the epoch ticker: {e}")))?;
        let ticker =
            Arc::new(Ticker { active: AtomicUsize::new(0), thread: handle.thread().clone() });
        tx.send(ticker.clone())
            .map_err(|_| PluginError::Engine("the epoch ticker did not start".into()))?;
        Ok(ticker)
    }

    /// Mark a call in progress until the guard is dropped.
    pub fn call(&self) -> CallGuard<'_> {
        if self.active.fetch_add(1, Ordering::AcqRel) == 0 {
            self.thread.unpark();
        }
        CallGuard(self)
    }
}

/// While alive, the epoch advances.
#[derive(Debug)]
pub struct CallGuard<'a>(&'a Ticker);

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The version of `wasi:io` that wasmtime-wasi defines (a plugin built against an older
/// 0.2.x links to it: semver-compatible).
const WASI_IO: &str = "0.2.12";

/// Replace WASI's two ways of waiting (`poll` and `pollable.block`: a guest's
/// `thread::sleep`, or waiting on a clock or a stream) with a trap. A host call cannot be
/// interrupted by the epoch deadline, so a plugin that slept would hold the tick for as
/// long as it liked; a plugin has nothing to wait for (its input is the snapshot), so
/// waiting is a fault of that plugin, reported as such. Non-blocking calls
/// (`pollable.ready`, stream writes to stdout and stderr, which go nowhere) stay.
fn refuse_blocking(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let mut poll = linker.instance(&format!("wasi:io/poll@{WASI_IO}"))?;
    for name in ["poll", "[method]pollable.block"] {
        poll.func_new(name, move |_, _, _, _| {
            Err(wasmtime::Error::msg(format!(
                "the plugin called wasi:io/poll {name}: plugins may not block or sleep (their input is the snapshot; nothing is worth waiting for)"
            )))
        })?;
    }
    linker.allow_shadowing(false);
    Ok(())
}

/// Whether an import (`ns:pkg/iface@version`) is on the allowlist.
fn allowed(import: &str) -> bool {
    let name = import.split('@').next().unwrap_or(import);
    ALLOWED_IMPORTS.contains(&name)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_allowlist_ignores_versions_but_not_names() {
        assert!(super::allowed("wasi:cli/stdout@0.2.6"));
        assert!(super::allowed("gpulet:policy/host@0.1.0"));
        assert!(!super::allowed("wasi:http/outgoing-handler@0.2.0"));
        assert!(!super::allowed("gpulet-test:forbidden/raw-network@0.1.0"));
    }
}
