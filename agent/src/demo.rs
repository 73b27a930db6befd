//! `gpulet demo`: a simulated 8-GPU node under a node power budget, with a compact live
//! view (one line per tick) or the raw telemetry records. Needs no config and no files:
//! its config (`examples/demo.toml`), trace and plugins are built in.
//!
//! The node's power is decided by the shipped Wasm policies (power-budget, then
//! thermal-guard) with the anomaly reporter watching, carried in the binary (built from
//! source by the normal build) and written to a temporary folder at start. The live view
//! compares, tick by tick, the useful work done so far with what the guard's static
//! equal split would have done: the same simulated node (same seed, same workloads) runs
//! beside it without plugins. `--no-plugins` shows the static split alone.

use std::fmt::Write as _;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;

use crate::agent::Agent;
use crate::agent::Pacing;
use crate::clock::VirtualClock;
use crate::config::Config;
use crate::error::Error;
use crate::gpu::Health;
use crate::gpu::sim::SimHandle;
use crate::setup;
use crate::telemetry::{Event, JsonLines, Record, Sink, SinkError};

/// The demo node's config.
pub const DEMO_CONFIG: &str = include_str!("../../examples/demo.toml");

/// The demo's config, parsed and validated.
pub fn config() -> Config {
    let mut config = Config::parse(DEMO_CONFIG).expect("the built-in demo config parses");
    config.validate().expect("the built-in demo config is valid");
    // A demo serves no socket unless asked (`--socket`): it is not the node's service.
    config.socket.enabled = false;
    config
}

/// Options of `gpulet demo`.
#[derive(Debug, Clone)]
pub struct Options {
    pub ticks: Option<u64>,
    pub json: bool,
    /// Simulated seconds per wall second; `None` runs as fast as possible.
    pub speed: Option<f64>,
    /// Publish to this broker too.
    pub mqtt: Option<String>,
    /// Serve the control socket here (`gpulet status --socket PATH`).
    pub socket: Option<PathBuf>,
    /// Serve `/metrics` here.
    pub metrics: Option<std::net::SocketAddr>,
    /// Run without the Wasm policies: the guard's static equal split alone.
    pub no_plugins: bool,
}

/// The power plugins the demo runs, in order, with their grants.
const POWER_PLUGINS: [(&str, &[u8], &str); 2] = [
    ("power-budget", gpulet_plugin_artifacts::POWER_BUDGET_WASM, r#"["lower", "raise"]"#),
    ("thermal-guard", gpulet_plugin_artifacts::THERMAL_GUARD_WASM, r#"["lower"]"#),
];

/// Write the demo's plugins into `dir` and name them in `config`.
fn add_plugins(config: &mut Config, dir: &Path) -> Result<(), Error> {
    let write = |name: &str, bytes: &[u8]| -> Result<PathBuf, Error> {
        let path = dir.join(format!("{name}.wasm"));
        std::fs::write(&path, bytes).map_err(|e| {
            Error::Command(format!("cannot write the demo's plugin {}: {e}", path.display()))
        })?;
        Ok(path)
    };
    let entry = |name: &str, path: &Path, grants: &str| {
        toml::from_str::<crate::config::PluginConfig>(&format!(
            "name = {name:?}\npath = {:?}\ngrants = {grants}",
            path.display().to_string()
        ))
        .expect("a plugin entry parses")
    };
    for (name, bytes, grants) in POWER_PLUGINS {
        let path = write(name, bytes)?;
        config.plugin.push(entry(name, &path, grants));
    }
    let path = write("anomaly", gpulet_plugin_artifacts::ANOMALY_WASM)?;
    config.reporter.push(entry("anomaly", &path, "[]"));
    config.plugins.state_dir = dir.join("state");
    // Compiled once, then loaded from the user's cache at the next demo.
    config.plugins.cache_dir =
        crate::plugin::dry_run::user_cache_dir().unwrap_or_else(|| dir.join("cache"));
    Ok(())
}

/// Build the demo agent on a virtual clock (so `--speed` can run it faster than real
/// time), writing to `out`.
/// With `--mqtt`, the demo's MQTT state (outbox, incarnation, desired state) lives in a
/// fresh temporary directory of its own, removed when it ends: two demos never share an
/// outbox, and a new demo never replays an old one's records or restores its budget.
pub fn agent(
    opts: &Options,
    out: Box<dyn Write + Send>,
) -> Result<(setup::Node, VirtualClock, Vec<tempfile::TempDir>), Error> {
    let mut config = config();
    let mut plugins_dir = None;
    let mut compare = None;
    if !opts.no_plugins {
        let dir = temp_dir("gpulet-demo-plugins-")?;
        add_plugins(&mut config, dir.path())?;
        plugins_dir = Some(dir);
        if !opts.json {
            // The same node without plugins, for the live view's comparison (its injected
            // faults left out: they change no physics, and would be logged twice).
            let mut split = self::config();
            split.sim.faults.clear();
            let (shadow, clock, sim) = setup::quiet_agent(&split, Path::new("."))?;
            if let (Some(clock), Some(sim)) = (clock, sim) {
                compare = Some(Compare { shadow, clock, sim, main: Arc::new(OnceLock::new()) });
            }
        }
    }
    let main_sim = compare.as_ref().map(|c| c.main.clone());
    let mut jobs_dir = None;
    if let Some(path) = &opts.socket {
        config.socket.enabled = true;
        config.socket.path = Some(path.clone());
        // The demo is its user's own: only they may connect.
        config.socket.mode = "0600".into();
        // And it runs a job queue (`gpulet submit --socket PATH -- CMD`), kept in a
        // temporary directory of its own, scheduled by the shipped fifo-binpack plugin
        // where the package installed it (else the same algorithm, built in).
        let dir = temp_dir("gpulet-demo-jobs-")?;
        config.jobs.enabled = true;
        config.jobs.dir = dir.path().to_path_buf();
        config.jobs.allow_root = true;
        let shipped = Path::new(SHIPPED_SCHEDULER);
        if shipped.is_file() {
            config.jobs.scheduler = Some(
                toml::from_str(&format!("name = \"fifo-binpack\"\npath = {:?}", SHIPPED_SCHEDULER))
                    .expect("a plugin entry"),
            );
        }
        jobs_dir = Some(dir);
    }
    if let Some(addr) = opts.metrics {
        config.metrics.enabled = true;
        config.metrics.listen = addr;
    }
    let mut state = None;
    if let Some(url) = &opts.mqtt {
        let mut m: crate::config::MqttConfig = toml::from_str(&format!("url = {url:?}"))
            .map_err(|e| crate::config::ConfigError::invalid("--mqtt", e.message().to_owned()))
            .map_err(crate::config::ConfigErrors::from)?;
        let dir = temp_dir("gpulet-demo-mqtt-")?;
        m.state_dir = dir.path().to_path_buf();
        state = Some(dir);
        config.mqtt = Some(m);
        config.validate()?;
    }
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let clock = VirtualClock::new(now_ms);
    let gpus: usize = config.sim.gpus.iter().map(|g| g.count as usize).sum();
    let sink: Box<dyn Sink> = if opts.json {
        Box::new(JsonLines::new(out))
    } else {
        let policies = if opts.no_plugins {
            "no plugins: the guard's static equal split (drop --no-plugins for the Wasm policies)"
                .to_owned()
        } else {
            let names: Vec<&str> = POWER_PLUGINS.iter().map(|p| p.0).collect();
            format!("Wasm policies {}, reporter anomaly", names.join(" then "))
        };
        Box::new(LiveView { out, tick: config.tick, header_done: false, gpus, policies, compare })
    };
    let node =
        setup::node(&config, Path::new("."), Arc::new(clock.clone()), Some(vec![sink]), None)?;
    if let (Some(main), Some(sim)) = (main_sim, &node.sim) {
        let _ = main.set(sim.clone());
    }
    Ok((node, clock, vec![state, jobs_dir, plugins_dir].into_iter().flatten().collect()))
}

/// Where the package installs the fifo-binpack scheduler plugin.
pub const SHIPPED_SCHEDULER: &str = "/usr/lib/gpulet/plugins/fifo-binpack.wasm";

fn temp_dir(prefix: &str) -> Result<tempfile::TempDir, Error> {
    tempfile::Builder::new().prefix(prefix).tempdir().map_err(|e| {
        Error::Runtime(std::io::Error::other(format!(
            "cannot make the demo's state directory: {e}"
        )))
    })
}

/// Run the demo until `ticks`, Ctrl-C, or its output is closed (`gpulet demo | head`).
pub async fn run(opts: Options) -> Result<u64, Error> {
    let closed = Arc::new(Notify::new());
    let out = ClosedPipeNotifier { out: std::io::stdout(), closed: closed.clone() };
    let (mut node, clock, _state) = agent(&opts, Box::new(out))?;
    let pacing = Pacing::Virtual { clock, speed: opts.speed };
    let stop = async {
        tokio::select! {
            () = crate::agent::shutdown_signal() => {}
            () = closed.notified() => {}
        }
    };
    let ticks = node.run(opts.ticks, pacing, stop).await;
    node.stop().await;
    Ok(ticks)
}

/// Standard output that tells the demo to stop when the reader has gone, as command-line
/// tools do, rather than simulating on for nobody.
struct ClosedPipeNotifier {
    out: std::io::Stdout,
    closed: Arc<Notify>,
}

impl Write for ClosedPipeNotifier {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.out.write(buf).inspect_err(|e| self.notify(e))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush().inspect_err(|e| self.notify(e))
    }
}

impl ClosedPipeNotifier {
    fn notify(&self, e: &std::io::Error) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            self.closed.notify_one();
        }
    }
}

/// The compact live view: a header, then one line per tick, then a line per event.
pub struct LiveView<W: Write + Send> {
    out: W,
    tick: Duration,
    header_done: bool,
    gpus: usize,
    /// What decides the node, for the header.
    policies: String,
    compare: Option<Compare>,
}

/// The same simulated node without plugins, ticked beside the demo's.
struct Compare {
    shadow: Agent,
    clock: VirtualClock,
    sim: SimHandle,
    /// The demo node's simulator (set once the node is built).
    main: Arc<OnceLock<SimHandle>>,
}

impl Compare {
    /// Tick the node without plugins once; the demo node's useful work so far over its.
    fn step(&mut self, tick: Duration) -> Option<f64> {
        self.shadow.tick();
        self.clock.advance(tick);
        let done = self.main.get()?.lock().total_work();
        let split = self.sim.lock().total_work();
        (split > 0.0).then(|| done / split - 1.0)
    }
}

impl<W: Write + Send> Sink for LiveView<W> {
    fn emit(&mut self, r: &Record<'_>) -> Result<(), SinkError> {
        let mut line = String::new();
        if !self.header_done {
            self.header_done = true;
            let budget = r.budget_w.map_or("none".into(), |b| format!("{b:.0} W"));
            writeln!(
                line,
                "gpulet demo: node {:?}, {} simulated GPUs, node budget {budget}; {}. Ctrl-C stops.\n\
                 Each GPU: index:power/limit W, temperature, utilisation.",
                r.node, self.gpus, self.policies
            )
            .expect("write to String");
            if self.compare.is_some() {
                line.push_str(
                    "Last: useful work so far against the static equal split on the same node.\n",
                );
            }
        }
        let t = self.tick.mul_f64(r.seq as f64).as_secs();
        write!(line, "{t:>5}s {:>5.0} W", r.power_w).expect("write to String");
        if let Some(b) = r.budget_w {
            write!(line, "/{b:.0}").expect("write to String");
        }
        for g in &r.gpus {
            line.push_str(" |");
            match (g.health, g.power_w, g.power_limit_w) {
                (Health::Lost, ..) => write!(line, "{}: lost            ", g.index),
                (h, Some(p), Some(l)) => write!(
                    line,
                    "{}:{p:>4.0}/{l:<3.0}W {:>2.0}C {:>3.0}%{}",
                    g.index,
                    g.temp_c.unwrap_or(f64::NAN),
                    g.util_pct.unwrap_or(f64::NAN),
                    if h == Health::Degraded { "!" } else { "" }
                ),
                _ => write!(line, "{}: ?               ", g.index),
            }
            .expect("write to String");
        }
        if let Some(gain) = self.compare.as_mut().and_then(|c| c.step(self.tick)) {
            write!(line, " | work {:+.1}% vs split", gain * 100.0).expect("write to String");
        }
        line.push('\n');
        for e in r.events {
            writeln!(line, "        {}", describe(e)).expect("write to String");
        }
        self.out.write_all(line.as_bytes())?;
        self.out.flush()?;
        Ok(())
    }
}

/// One line for a person.
pub fn describe(e: &Event) -> String {
    match e {
        Event::Xid { gpu, code, severity, action, .. } => {
            format!("GPU {gpu}: XID {code} ({severity}): {action}")
        }
        Event::Health { gpu, from, to, .. } => format!("GPU {gpu}: health {from:?} -> {to:?}"),
        Event::LimitChanged { gpu, from_w, to_w, source, reason, .. } => {
            let from = from_w.map_or("?".into(), |w| format!("{w:.0}"));
            format!("GPU {gpu}: limit {from} -> {to_w:.0} W by {source} ({reason})")
        }
        Event::LimitFailed { gpu, to_w, error, .. } => {
            format!("GPU {gpu}: setting {to_w:.0} W failed: {error}")
        }
        Event::LimitDrift { gpu, expected_w, found_w, .. } => {
            format!(
                "GPU {gpu}: limit moved to {found_w:.0} W behind the agent's back (set {expected_w:.0} W)"
            )
        }
        Event::DecisionRejected { source, gpu, reason } => {
            format!("{source}: decision for GPU {gpu} rejected: {reason}")
        }
        Event::PluginLoaded { plugin, version, compiled, load_ms, .. } => {
            let how = if *compiled { "compiled" } else { "from cache" };
            format!("plugin {plugin} {version} loaded ({how}, {load_ms:.1} ms)")
        }
        Event::PluginLoadFailed { plugin, error, kept_previous } => {
            let kept = if *kept_previous { "; the previous version goes on" } else { "" };
            format!("plugin {plugin} failed to load: {error}{kept}")
        }
        Event::PluginFault { plugin, message, .. } => format!("plugin {plugin} {message}"),
        Event::PluginQuarantined { plugin, failures, window_s, fallback } => {
            format!(
                "plugin {plugin} quarantined after {failures} faults in {window_s} s; fallback: {fallback}"
            )
        }
        Event::Plugin { plugin, report, message, .. } => format!("{plugin}: {report}: {message}"),
        Event::PluginOutputRefused { plugin, reason, example, accepted } => {
            format!("plugin {plugin}: output refused ({reason}): {example}; accepted: {accepted}")
        }
        Event::ReloadFailed { error } => format!("reload failed: {error}"),
        Event::StateSetAside { path, error, moved_to } => {
            format!("state file {path} set aside as {moved_to}: {error}")
        }
        Event::BudgetInfeasible { budget_w, min_total_w } => {
            format!(
                "node budget {budget_w:.0} W is below the GPUs' minimum total {min_total_w:.0} W"
            )
        }
        Event::Job(j) => {
            let mut line = format!("job {} ({}): {}", j.job, j.user, j.event);
            if !j.gpus.is_empty() {
                line.push_str(&format!(" on {} GPU(s)", j.gpus.len()));
            }
            if let Some(e) = j.energy_j {
                line.push_str(&format!(", {e:.0} J"));
            }
            if let Some(r) = &j.reason {
                line.push_str(&format!(": {r}"));
            }
            line
        }
    }
}
