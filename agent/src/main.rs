//! The `gpulet` command line. Exit codes: 0 success; 1 a runtime failure; 2 a usage or
//! configuration error.

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gpulet::agent::{Pacing, shutdown_signal};
use gpulet::clock::SystemClock;
use gpulet::config::{BackendKind, Config, Loaded};
use gpulet::error::Error;
use gpulet::{demo, setup};

#[derive(Debug, Parser)]
#[command(
    name = "gpulet",
    version,
    about = "Watches and controls a node's NVIDIA GPUs, decides through sandboxed policies, reports to the fleet"
)]
struct Cli {
    /// Log level for messages on stderr: error, warn, info, debug, trace.
    #[arg(long, global = true, value_name = "LEVEL")]
    log_level: Option<tracing::Level>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent until stopped (SIGINT/SIGTERM).
    Run {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Stop after this many ticks.
        #[arg(long, value_name = "N")]
        ticks: Option<u64>,
        /// Override the config's backend.
        #[arg(long, value_enum)]
        backend: Option<Backend>,
    },
    /// Check a config file: exit 0 if valid, 2 with every error otherwise.
    CheckConfig {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// A simulated 8-GPU node under a power budget, with a live view. Needs no config.
    Demo {
        /// Stop after this many ticks.
        #[arg(long, value_name = "N")]
        ticks: Option<u64>,
        /// Print the telemetry records (JSON lines) instead of the live view.
        #[arg(long)]
        json: bool,
        /// Simulated seconds per wall second; 0 runs as fast as possible.
        #[arg(long, default_value_t = 1.0, value_name = "X")]
        speed: f64,
    },
    /// List the GPUs the backend sees (the demo node without --config).
    Inventory {
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Override the config's backend.
        #[arg(long, value_enum)]
        backend: Option<Backend>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Backend {
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Demo { .. } => tracing::Level::WARN,
        _ => tracing::Level::INFO,
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(cli.log_level.unwrap_or(default_level))
        .init();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gpulet: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn run(command: Command) -> Result<(), Error> {
    match command {
        Command::Run { config, ticks, backend } => {
            let mut loaded = Config::load(&config)?;
            if let Some(b) = backend {
                loaded.config.backend = b.into();
            }
            let clock = SystemClock::new();
            let opened = setup::open_backend(&loaded.config, &loaded.base_dir, clock.clone())?;
            let sinks = setup::sinks(&loaded.config)?;
            let mut agent = setup::agent(&loaded.config, opened, sinks, clock)?;
            block_on(agent.run(ticks, Pacing::RealTime, shutdown_signal()))?;
            Ok(())
        }
        Command::CheckConfig { file } => {
            let loaded = Config::load(&file)?;
            check_against_sim(&loaded)?;
            println!("{}: valid", file.display());
            Ok(())
        }
        Command::Demo { ticks, json, speed } => {
            let speed = (speed > 0.0).then_some(speed);
            block_on(demo::run(demo::Options { ticks, json, speed }))??;
            Ok(())
        }
        Command::Inventory { config, backend, json } => {
            let mut loaded = match config {
                Some(path) => Config::load(&path)?,
                None => Loaded { config: demo::config(), base_dir: PathBuf::from(".") },
            };
            if let Some(b) = backend {
                loaded.config.backend = b.into();
            }
            let opened = setup::open_backend(&loaded.config, &loaded.base_dir, SystemClock::new())?;
            let inventory = opened.backend.inventory();
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(inventory).expect("inventory serialises")
                );
            } else {
                println!("backend: {}", opened.backend.kind());
                for g in inventory {
                    let fields: Vec<_> = g.fields.iter().map(|f| f.name()).collect();
                    println!(
                        "{:>2}  {}  {:<24} {:>6} MiB  power {}..{} W (default {}), settable: {}; fields: {}",
                        g.index,
                        g.uuid,
                        g.name,
                        g.memory_total_mib,
                        g.power_limit.min_w,
                        g.power_limit.max_w,
                        g.power_limit.default_w,
                        if g.can_set_power_limit { "yes" } else { "no" },
                        fields.join(",")
                    );
                }
            }
            Ok(())
        }
    }
}

/// What can be checked beyond the file itself: for a simulated node, build it (traces
/// load, fault GPUs exist) and check the power config against its GPUs.
fn check_against_sim(loaded: &Loaded) -> Result<(), Error> {
    if loaded.config.backend == BackendKind::Sim {
        let opened = setup::open_backend(&loaded.config, &loaded.base_dir, SystemClock::new())?;
        gpulet::guard::PowerGuard::new(opened.backend.inventory(), &loaded.config.power)?;
    }
    Ok(())
}

/// The agent is one loop: a single-threaded runtime is all it needs, and the smallest.
fn block_on<F: Future>(f: F) -> Result<F::Output, Error> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::Runtime)?;
    Ok(rt.block_on(f))
}
