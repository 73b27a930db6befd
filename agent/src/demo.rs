//! `gpulet demo`: a simulated 8-GPU node under a node power budget, with a compact live
//! view (one line per tick) or the raw telemetry records. Needs no config and no files:
//! its config (`examples/demo.toml`) and trace are built in.

use std::fmt::Write as _;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;

use crate::agent::Pacing;
use crate::clock::VirtualClock;
use crate::config::Config;
use crate::error::Error;
use crate::gpu::Health;
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
    pub socket: Option<std::path::PathBuf>,
    /// Serve `/metrics` here.
    pub metrics: Option<std::net::SocketAddr>,
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
        Box::new(LiveView::new(out, config.tick, gpus))
    };
    let node =
        setup::node(&config, Path::new("."), Arc::new(clock.clone()), Some(vec![sink]), None)?;
    Ok((node, clock, vec![state, jobs_dir].into_iter().flatten().collect()))
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
}

impl<W: Write + Send> LiveView<W> {
    pub fn new(out: W, tick: Duration, gpus: usize) -> LiveView<W> {
        LiveView { out, tick, header_done: false, gpus }
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
                "gpulet demo: node {:?}, {} simulated GPUs, node budget {budget}. Ctrl-C stops.\n\
                 Each GPU: index:power/limit W, temperature, utilisation.",
                r.node, self.gpus
            )
            .expect("write to String");
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
