//! The command line: one file per subcommand, each with its arguments (a clap struct)
//! and its `run`; what they share (the backend override, loading a config or the demo's,
//! the deeper config check, the runtime) is here. Exit codes: 0 success; 1 a runtime
//! failure; 2 a usage or configuration error (`Error::exit_code`).

use std::future::Future;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use gpulet::clock::SystemClock;
use gpulet::config::{BackendKind, Config, ConfigError, ConfigErrors, Loaded};
use gpulet::error::Error;
use gpulet::plugin::reporters::Reporters;
use gpulet::setup;

mod calibrate;
mod check_config;
mod cmd;
mod demo;
mod diag;
mod fleet_sim;
mod inventory;
mod jobs;
mod keygen;
mod local;
mod plugin;
mod plugin_new;
mod replay;
mod run;
mod status;
mod top;

#[derive(Debug, Parser)]
#[command(
    name = "gpulet",
    version,
    about = "Watches and controls a node's NVIDIA GPUs, decides through sandboxed policies, reports to the fleet"
)]
pub struct Cli {
    /// Log level for messages on stderr: error, warn, info, debug, trace.
    #[arg(long, global = true, value_name = "LEVEL")]
    pub log_level: Option<tracing::Level>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent until stopped (SIGINT/SIGTERM).
    Run(run::Args),
    /// Check a config file: exit 0 if valid, 2 with every error otherwise.
    CheckConfig(check_config::Args),
    /// A simulated 8-GPU node under a power budget, with a live view. Needs no config.
    Demo(demo::Args),
    /// Send a command to a node over MQTT, wait for its result and print it (JSON lines).
    /// Exit 0 if it succeeded, 1 otherwise.
    Cmd(cmd::Args),
    /// Make an Ed25519 key pair for signed commands: PREFIX.key (private, mode 0600) and
    /// PREFIX.pub (for mqtt.commands.public_key_files).
    Keygen(keygen::Args),
    /// Simulate a fleet against a broker: N nodes of simulated GPUs in this process, each
    /// with its own MQTT connection and outbox, publishing at 1 Hz; a consumer counts what
    /// arrives. Prints a JSON report. A load tool for sizing a broker's ingest.
    FleetSim(fleet_sim::Args),
    /// Record a node's snapshots and the limits it set, tick by tick, to a trace file for
    /// `gpulet plugin replay` and `plugin diff` (the demo node without --config).
    Record(replay::Record),
    /// Tools for plugin authors.
    #[command(subcommand)]
    Plugin(plugin::PluginCommand),
    /// Measure each GPU's useful work per second at a range of power limits (a compute
    /// kernel through CUDA on real GPUs) and write the curves to `[calibration] file`,
    /// where the agent reads them. Sets power limits: run as root, with the GPUs idle;
    /// the limits found are put back at the end. On the simulator it takes no real time.
    Calibrate(calibrate::Args),
    /// A quick health check of each GPU through CUDA: allocate, write and read back
    /// memory (256 MiB), run a kernel and check its result against the CPU. Exit 0 if no
    /// GPU failed (MIG or busy GPUs are skipped), 1 otherwise.
    Diag(diag::Args),
    /// List the GPUs the backend sees (the demo node without --config).
    Inventory(inventory::Args),
    /// What the running agent is doing, over its control socket. Exit codes for
    /// monitoring checks: 0 OK, 1 warning (a GPU degraded, a plugin not running, the
    /// broker not connected), 2 critical (a GPU lost, the agent's loop stuck), 3 unknown
    /// (no agent at the socket).
    Status(status::Args),
    /// Set the node power budget on the running agent (WATTS, or `none` for the
    /// configured one). Needs root, the agent's user or socket.admin_group.
    SetBudget(local::SetBudget),
    /// Set one GPU's power limit on the running agent (WATTS within its bounds, or `none`
    /// to give it back to the policy). Needs root, the agent's user or socket.admin_group.
    SetLimit(local::SetLimit),
    /// Reload the running agent's plugins from its config file.
    Reload(local::SocketArg),
    /// Clear a GPU's sticky `degraded` health on the running agent (once its XID was dealt
    /// with).
    ClearHealth(local::ClearHealth),
    /// A live view of a whole fleet from its MQTT topics: nodes online and offline, power
    /// against budget, hottest and unhealthy GPUs, plugin faults, recent events. `s`
    /// changes the order, `q` quits; `--once --json` prints a snapshot for scripts.
    Top(top::Args),
    /// Queue a job on this node's GPUs: `gpulet submit -g 2 --mem 20000 -- python
    /// train.py`. It runs as you, with CUDA_VISIBLE_DEVICES set to its GPUs' UUIDs.
    Submit(jobs::Submit),
    /// Your queued and running jobs (`--all`: ended ones too): GPUs, run time, energy,
    /// why a queued job waits.
    Jobs(jobs::List),
    /// Cancel a job (SIGTERM, then SIGKILL after the grace period).
    Cancel(jobs::One),
    /// A job's output (`--stderr`; `-f` to follow until it ends).
    Logs(jobs::Logs),
    /// Wait for a job to end; exit with its exit status.
    Wait(jobs::One),
}

impl Command {
    /// The log level when `--log-level` is not given: tools that print their own
    /// output log only warnings.
    pub fn default_log_level(&self) -> tracing::Level {
        match self {
            Command::Demo(_)
            | Command::FleetSim(_)
            | Command::Cmd(_)
            | Command::Status(_)
            | Command::SetBudget(_)
            | Command::SetLimit(_)
            | Command::Reload(_)
            | Command::ClearHealth(_)
            | Command::Top(_)
            | Command::Submit(_)
            | Command::Jobs(_)
            | Command::Cancel(_)
            | Command::Logs(_)
            | Command::Wait(_) => tracing::Level::WARN,
            _ => tracing::Level::INFO,
        }
    }
}

/// Run a subcommand.
pub fn run(command: Command) -> Result<(), Error> {
    match command {
        Command::Run(a) => run::run(a),
        Command::CheckConfig(a) => check_config::run(a),
        Command::Demo(a) => demo::run(a),
        Command::Cmd(a) => cmd::run(a),
        Command::Keygen(a) => keygen::run(a),
        Command::FleetSim(a) => fleet_sim::run(a),
        Command::Plugin(a) => plugin::run(a),
        Command::Record(a) => replay::record(a),
        Command::Calibrate(a) => calibrate::run(a),
        Command::Diag(a) => diag::run(a),
        Command::Inventory(a) => inventory::run(a),
        Command::Status(a) => status::run(a),
        Command::SetBudget(a) => local::set_budget(a),
        Command::SetLimit(a) => local::set_limit(a),
        Command::Reload(a) => local::reload(a),
        Command::ClearHealth(a) => local::clear_health(a),
        Command::Top(a) => top::run(a),
        Command::Submit(a) => jobs::submit(a),
        Command::Jobs(a) => jobs::list(a),
        Command::Cancel(a) => jobs::cancel(a),
        Command::Logs(a) => jobs::logs(a),
        Command::Wait(a) => jobs::wait(a),
    }
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Backend {
    Sim,
    Nvml,
}

impl From<Backend> for BackendKind {
    fn from(b: Backend) -> BackendKind {
        match b {
            Backend::Sim => BackendKind::Sim,
            Backend::Nvml => BackendKind::Nvml,
        }
    }
}

/// `--config FILE` (optional: the demo node without it) and `--backend`.
#[derive(Debug, clap::Args)]
pub struct NodeArgs {
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Override the config's backend.
    #[arg(long, value_enum)]
    pub backend: Option<Backend>,
}

impl NodeArgs {
    pub fn load(self) -> Result<Loaded, Error> {
        load_or_demo(self.config, self.backend)
    }
}

/// The config at `path`, or the demo node's without one; `backend` overrides its backend.
pub fn load_or_demo(path: Option<PathBuf>, backend: Option<Backend>) -> Result<Loaded, Error> {
    let mut loaded = match path {
        Some(path) => Config::load(&path)?,
        None => Loaded { config: gpulet::demo::config(), base_dir: PathBuf::from(".") },
    };
    if let Some(b) = backend {
        loaded.config.backend = b.into();
    }
    Ok(loaded)
}

/// What can be checked beyond the file itself: for a simulated node, build it (traces
/// load, fault GPUs exist) and check the power config against its GPUs; every plugin is
/// loaded and started against its GPUs (against none for other backends).
pub fn check_deeper(loaded: &Loaded) -> Result<(), Error> {
    let (config, base_dir) = (&loaded.config, &loaded.base_dir);
    let mut inventory = Vec::new();
    if config.backend == BackendKind::Sim {
        let opened = setup::open_backend(config, base_dir, SystemClock::new())?;
        inventory = opened.backend.inventory().to_vec();
        gpulet::guard::PowerGuard::new(&inventory, &config.power)?;
    }
    let mut chain = setup::policy_chain(config, base_dir, inventory.len())?;
    let specs = setup::plugin_specs(config, base_dir);
    let mut failed = chain.load(&specs.power, &inventory, &mut Vec::new());
    let mut reporters = Reporters::new(chain.settings(), chain.engine());
    failed.extend(reporters.load(&specs.reporters, &inventory, &mut Vec::new()));
    let errors: Vec<ConfigError> = failed
        .into_iter()
        .map(|(name, e)| {
            let at = match config.plugin.iter().position(|p| p.name == name) {
                Some(i) => format!("plugin[{i}]"),
                None => {
                    let i = config.reporter.iter().position(|p| p.name == name);
                    format!("reporter[{}]", i.unwrap_or_default())
                }
            };
            ConfigError::invalid(at, e.to_string())
        })
        .collect();
    if errors.is_empty() { Ok(()) } else { Err(ConfigErrors(errors).into()) }
}

/// The agent is one loop: a single-threaded runtime is all it needs, and the smallest.
pub fn block_on<F: Future>(f: F) -> Result<F::Output, Error> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::Runtime)?;
    Ok(rt.block_on(f))
}
