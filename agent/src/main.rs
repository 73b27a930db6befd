//! The `gpulet` command line. Exit codes: 0 success; 1 a runtime failure; 2 a usage or
//! configuration error.

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use gpulet::agent::{Pacing, shutdown_signal};
use gpulet::calibrate;
use gpulet::clock::{Clock, SystemClock};
use gpulet::config::{BackendKind, Config, ConfigError, ConfigErrors, Loaded};
use gpulet::error::Error;
use gpulet::plugin::dry_run::{self, SnapshotFile};
use gpulet::{cuda, demo, mqtt, setup};

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
        /// Also publish the demo node to this broker (mqtt://HOST[:PORT]); watch it with
        /// `mosquitto_sub -v -t 'gpulet/v1/#'`.
        #[arg(long, value_name = "URL")]
        mqtt: Option<String>,
    },
    /// Send a command to a node over MQTT, wait for its result and print it (JSON lines).
    /// Exit 0 if it succeeded, 1 otherwise.
    Cmd {
        /// The broker: mqtt://HOST[:PORT] or mqtts://HOST[:PORT].
        #[arg(long, value_name = "URL")]
        broker: String,
        #[arg(long, value_name = "NODE")]
        node: String,
        /// set-power-budget, set-power-limit, reload-plugins, rebirth or ping.
        #[arg(value_name = "COMMAND")]
        command: String,
        /// The arguments, a JSON object, e.g. '{"watts": 4000}'.
        #[arg(long, default_value = "{}", value_name = "JSON")]
        args: String,
        /// Sign with this private key (from `gpulet keygen`).
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
        #[arg(long, default_value = "gpulet/v1", value_name = "ROOT")]
        root: String,
        #[arg(long, default_value = "10s", value_name = "DURATION")]
        timeout: humantime::Duration,
        /// For mqtts://: the CA certificate (PEM).
        #[arg(long, value_name = "FILE")]
        ca_file: Option<PathBuf>,
        #[arg(long, value_name = "NAME")]
        username: Option<String>,
        #[arg(long, value_name = "FILE")]
        password_file: Option<PathBuf>,
        /// Publish the command retained (nodes refuse it; for testing that they do).
        #[arg(long, hide = true)]
        retain: bool,
    },
    /// Make an Ed25519 key pair for signed commands: PREFIX.key (private, mode 0600) and
    /// PREFIX.pub (for mqtt.commands.public_key_files).
    Keygen {
        #[arg(value_name = "PREFIX")]
        prefix: PathBuf,
    },
    /// Simulate a fleet against a broker: N nodes of simulated GPUs in this process, each
    /// with its own MQTT connection and outbox, publishing at 1 Hz; a consumer counts what
    /// arrives. Prints a JSON report. A load tool for sizing a broker's ingest.
    FleetSim {
        #[arg(long, value_name = "N")]
        nodes: u32,
        #[arg(long, value_name = "URL")]
        broker: String,
        #[arg(long, default_value = "60s", value_name = "DURATION")]
        duration: humantime::Duration,
        #[arg(long, default_value_t = 8, value_name = "N")]
        gpus: u32,
        /// Keep the outboxes here (default: a temporary folder, removed at the end).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// Sync each tick's records to disk, as a real agent does by default.
        #[arg(long)]
        fsync: bool,
        #[arg(long, default_value = "gpulet/v1", value_name = "ROOT")]
        root: String,
    },
    /// Tools for plugin authors.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Measure each GPU's useful work per second at a range of power limits (a compute
    /// kernel through CUDA on real GPUs) and write the curves to `[calibration] file`,
    /// where the agent reads them. Sets power limits: run as root, with the GPUs idle;
    /// the limits found are put back at the end. On the simulator it takes no real time.
    Calibrate {
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Override the config's backend.
        #[arg(long, value_enum)]
        backend: Option<Backend>,
        /// Limits measured, from the maximum to the minimum (2 to 50).
        #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u32).range(2..=50))]
        steps: u32,
        /// Time at each limit before measuring.
        #[arg(long, default_value = "3s", value_name = "DURATION")]
        warmup: humantime::Duration,
        /// Time measured at each limit.
        #[arg(long, default_value = "5s", value_name = "DURATION")]
        measure: humantime::Duration,
        /// Write here instead of `[calibration] file`.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Print the calibration as JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// A quick health check of each GPU through CUDA: allocate, write and read back
    /// memory (256 MiB), run a kernel and check its result against the CPU. Exit 0 if no
    /// GPU failed (MIG or busy GPUs are skipped), 1 otherwise.
    Diag {
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Memory written and read back per GPU, MiB (1 to 65536).
        #[arg(long, default_value_t = cuda::DIAG_MEMORY_MIB, value_parser = clap::value_parser!(u32).range(1..=65536))]
        memory_mib: u32,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
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

#[derive(Debug, Subcommand)]
enum PluginCommand {
    /// Load a plugin as the agent would and report its kind, API version, imports and
    /// whether its config is valid. Exit 0 if it would run, 2 if its config is invalid,
    /// 1 if it cannot load.
    Check {
        #[arg(value_name = "FILE.wasm")]
        file: PathBuf,
        /// The plugin's config, JSON.
        #[arg(long, default_value = "{}", value_name = "JSON")]
        config: String,
    },
    /// Call a plugin once on a snapshot (JSON, see examples/snapshot.json) and print its
    /// decisions and reasons. Nothing reaches a GPU; grants and bounds are not applied.
    Run {
        #[arg(value_name = "FILE.wasm")]
        file: PathBuf,
        #[arg(long, value_name = "FILE")]
        snapshot: PathBuf,
        /// The plugin's config, JSON.
        #[arg(long, default_value = "{}", value_name = "JSON")]
        config: String,
        /// Print JSON instead of lines.
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
    // rustls needs exactly one process-wide crypto provider (rumqttc pitfall 10).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let default_level = match cli.command {
        Command::Demo { .. } | Command::FleetSim { .. } | Command::Cmd { .. } => {
            tracing::Level::WARN
        }
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
            block_on(async move {
                let (c, base) = (&loaded.config, &loaded.base_dir);
                let mut node = setup::node(c, base, SystemClock::new(), None, Some(config))?;
                node.run(ticks, Pacing::RealTime, shutdown_signal()).await;
                node.stop().await;
                Ok::<_, Error>(())
            })??;
            Ok(())
        }
        Command::Cmd {
            broker,
            node,
            command,
            args,
            key,
            root,
            timeout,
            ca_file,
            username,
            password_file,
            retain,
        } => {
            let usage =
                |k: &str, e: String| Error::from(ConfigErrors(vec![ConfigError::invalid(k, e)]));
            let args: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&args)
                .map_err(|e| usage("--args", format!("not a JSON object: {e}")))?;
            let read = |k: &str, p: &PathBuf| {
                std::fs::read(p).map_err(|e| usage(k, format!("cannot read {}: {e}", p.display())))
            };
            let key = match &key {
                Some(p) => Some(
                    mqtt::command::signing_key(&String::from_utf8_lossy(&read("--key", p)?))
                        .map_err(|e| usage("--key", e))?,
                ),
                None => None,
            };
            let tls = match &ca_file {
                Some(p) => Some(Arc::new(
                    mqtt::tls_config(Some(&read("--ca-file", p)?), None)
                        .map_err(|(_, e)| usage("--ca-file", e))?,
                )),
                None => None,
            };
            let password = match &password_file {
                Some(p) => {
                    String::from_utf8_lossy(&read("--password-file", p)?).trim_end().to_owned()
                }
                None => String::new(),
            };
            let opts = mqtt::send::SendOptions {
                url: broker,
                root,
                node,
                command,
                args,
                key,
                timeout: timeout.into(),
                tls,
                credentials: username.map(|u| (u, password)),
                retain,
            };
            let results = block_on(mqtt::send::send(opts))?.map_err(Error::Command)?;
            for r in &results {
                println!("{r}");
            }
            match results.last().and_then(|r| r["status"].as_str()) {
                Some("succeeded") => Ok(()),
                other => Err(Error::Command(format!(
                    "the command did not succeed ({})",
                    other.unwrap_or("no result")
                ))),
            }
        }
        Command::FleetSim { nodes, broker, duration, gpus, dir, fsync, root } => {
            let report = gpulet::fleet_sim::run(gpulet::fleet_sim::Options {
                nodes,
                broker,
                duration: duration.into(),
                gpus,
                dir,
                fsync,
                root,
            })?;
            println!("{}", serde_json::to_string_pretty(&report).expect("report serialises"));
            if report.lost > 0 {
                return Err(Error::Command(format!("{} messages lost", report.lost)));
            }
            Ok(())
        }
        Command::Keygen { prefix } => {
            let (private, public) = mqtt::command::keygen().map_err(Error::Runtime)?;
            let with = |ext: &str| {
                let mut p = prefix.clone().into_os_string();
                p.push(ext);
                PathBuf::from(p)
            };
            let (key_path, pub_path) = (with(".key"), with(".pub"));
            let write_private = || -> std::io::Result<()> {
                use std::io::Write as _;
                use std::os::unix::fs::OpenOptionsExt as _;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&key_path)?;
                writeln!(f, "{private}")
            };
            write_private().map_err(|e| {
                Error::Command(format!(
                    "cannot write {}: {e} (an existing key is never overwritten)",
                    key_path.display()
                ))
            })?;
            std::fs::write(&pub_path, format!("{public}\n"))
                .map_err(|e| Error::Command(format!("cannot write {}: {e}", pub_path.display())))?;
            println!("private key: {} (keep it secret)", key_path.display());
            println!("public key:  {} = {public}", pub_path.display());
            Ok(())
        }
        Command::CheckConfig { file } => {
            let loaded = Config::load(&file)?;
            check_deeper(&loaded)?;
            println!("{}: valid", file.display());
            Ok(())
        }
        Command::Demo { ticks, json, speed, mqtt } => {
            let speed = (speed > 0.0).then_some(speed);
            block_on(demo::run(demo::Options { ticks, json, speed, mqtt }))??;
            Ok(())
        }
        Command::Plugin(PluginCommand::Check { file, config }) => {
            let (_, report) = dry_run::start(&file, &config, &[])?;
            println!(
                "{}: {} {} ({} plugin, API {})",
                file.display(),
                report.name,
                report.version,
                report.kind,
                report.api_version
            );
            println!("loaded in {:.1} ms; config valid", report.compile_ms);
            println!("imports:");
            for i in &report.imports {
                println!("  {i}");
            }
            Ok(())
        }
        Command::Plugin(PluginCommand::Run { file, snapshot, config, json }) => {
            let snap = SnapshotFile::read(&snapshot)
                .map_err(|e| ConfigErrors(vec![ConfigError::invalid("--snapshot", e)]))?;
            let wsnap = snap
                .to_wit()
                .map_err(|e| ConfigErrors(vec![ConfigError::invalid("--snapshot", e)]))?;
            let (mut plugin, _) = dry_run::start(&file, &config, &snap.gpu_infos())?;
            let out = plugin
                .decide(&wsnap, &snap.curves())
                .map_err(|f| Error::PluginCall(f.to_string()))?;
            if json {
                let actions: Vec<_> = out
                    .actions
                    .iter()
                    .map(|a| serde_json::json!({"gpu": a.gpu, "limit_w": a.limit_w, "reason": a.reason}))
                    .collect();
                println!("{}", serde_json::json!({"actions": actions, "metrics": out.metrics}));
            } else {
                if out.actions.is_empty() {
                    println!("no actions");
                }
                for a in &out.actions {
                    println!("GPU {}: {:.1} W  ({})", a.gpu, a.limit_w, a.reason);
                }
                for m in &out.metrics {
                    println!(
                        "metric {} = {}{}",
                        m.name,
                        m.value,
                        m.gpu.map_or(String::new(), |g| format!(" (GPU {g})"))
                    );
                }
            }
            Ok(())
        }
        Command::Calibrate { config, backend, steps, warmup, measure, out, json } => {
            let loaded = load_or_demo(config, backend)?;
            let settings =
                calibrate::Settings { steps, warmup: warmup.into(), measure: measure.into() };
            if settings.measure < calibrate::SAMPLE_EVERY {
                return Err(ConfigErrors(vec![ConfigError::invalid(
                    "--measure",
                    format!("{measure} is too short; accepted: 100ms or more"),
                )])
                .into());
            }
            let path = out.unwrap_or_else(|| loaded.base_dir.join(&loaded.config.calibration.file));
            let wall = SystemClock::new();
            let c = match loaded.config.backend {
                BackendKind::Sim => calibrate::simulated(
                    &loaded.config.sim,
                    &loaded.base_dir,
                    settings,
                    wall.wall_ms(),
                )?,
                BackendKind::Nvml => {
                    // CUDA first: without it nothing is touched.
                    cuda::available()?;
                    let opened =
                        setup::open_backend(&loaded.config, &loaded.base_dir, wall.clone())?;
                    let mut backend = opened.backend;
                    let mut load =
                        cuda::CudaLoad::start(backend.inventory(), calibrate::calibratable)?;
                    // The limits found are kept where the agent keeps its own, so that the
                    // agent puts them back if calibration dies; SIGINT and SIGTERM stop
                    // the sweep and put them back at once.
                    let keep = loaded.config.nvml.restore_limits.then(|| {
                        loaded
                            .base_dir
                            .join(&loaded.config.nvml.state_dir)
                            .join("start-limits.json")
                    });
                    let safety = calibrate::Safety { keep, ..Default::default() };
                    let stop = safety.stop.clone();
                    let created = wall.wall_ms();
                    block_on(async move {
                        let sweep = tokio::task::spawn_blocking(move || {
                            calibrate::run(&mut *backend, &mut load, settings, created, &safety)
                        });
                        tokio::pin!(sweep);
                        tokio::select! {
                            r = &mut sweep => r,
                            () = shutdown_signal() => {
                                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                                sweep.await
                            }
                        }
                    })?
                    .map_err(|e| Error::Command(format!("calibration stopped: {e}")))??
                }
            };
            c.save(&path)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&c).expect("calibration serialises"));
            } else {
                println!(
                    "{} load on {}, work in {}; written to {}",
                    c.load,
                    c.backend,
                    c.unit,
                    path.display()
                );
                for g in &c.gpus {
                    println!("GPU {} {} ({})", g.index, g.name, g.uuid);
                    println!(
                        "  {:>8} {:>8} {:>12} {:>9} {:>10}",
                        "limit W", "power W", c.unit, "relative", "per kW"
                    );
                    for p in &g.points {
                        println!(
                            "  {:>8.0} {:>8.1} {:>12.4} {:>9.3} {:>10.4}",
                            p.limit_w,
                            p.power_w,
                            p.work_per_s,
                            p.relative,
                            p.work_per_s / p.power_w.max(1e-9) * 1000.0
                        );
                    }
                }
            }
            Ok(())
        }
        Command::Diag { config, memory_mib, json } => {
            let loaded = load_or_demo(config, Some(Backend::Nvml))?;
            cuda::available()?;
            let opened = setup::open_backend(&loaded.config, &loaded.base_dir, SystemClock::new())?;
            let reports = cuda::diag(opened.backend.inventory(), memory_mib)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&reports).expect("reports serialise"));
            } else {
                for r in &reports {
                    let num = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
                    let status = match (&r.skipped, r.ok) {
                        (Some(_), _) => "skipped",
                        (None, true) => "ok",
                        (None, false) => "FAILED",
                    };
                    println!(
                        "GPU {} {}: {status}  write {} GB/s, read {} GB/s, kernel {} ms ({} GFLOP/s){}",
                        r.gpu,
                        r.uuid,
                        num(r.write_gb_s),
                        num(r.read_gb_s),
                        num(r.kernel_ms),
                        num(r.gflop_s),
                        r.error
                            .as_ref()
                            .or(r.skipped.as_ref())
                            .map_or(String::new(), |e| format!("\n  {e}"))
                    );
                }
            }
            let failed = reports.iter().filter(|r| r.failed()).count();
            if failed > 0 {
                return Err(Error::Command(format!(
                    "{failed} of {} GPUs failed the check",
                    reports.len()
                )));
            }
            Ok(())
        }
        Command::Inventory { config, backend, json } => {
            let loaded = load_or_demo(config, backend)?;
            let opened = setup::open_backend(&loaded.config, &loaded.base_dir, SystemClock::new())?;
            let inventory = opened.backend.inventory();
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(inventory).expect("inventory serialises")
                );
            } else {
                println!("backend: {}", opened.backend.kind());
                if let Some(d) = opened.backend.driver() {
                    println!(
                        "driver: {}, CUDA {}",
                        d.version,
                        d.cuda.as_deref().unwrap_or("unknown")
                    );
                }
                for g in inventory {
                    let fields: Vec<_> = g.fields.iter().map(|f| f.name()).collect();
                    println!(
                        "{:>2}  {}  {}  {:<24} {:>6} MiB  power {}..{} W (default {}), settable: {}; MIG: {}; fields: {}",
                        g.index,
                        g.uuid,
                        g.pci_bus_id.as_deref().unwrap_or("-"),
                        g.name,
                        g.memory_total_mib,
                        g.power_limit.min_w,
                        g.power_limit.max_w,
                        g.power_limit.default_w,
                        if g.can_set_power_limit { "yes" } else { "no" },
                        match g.mig_enabled {
                            Some(true) => "on",
                            Some(false) => "off",
                            None => "n/a",
                        },
                        fields.join(",")
                    );
                }
            }
            Ok(())
        }
    }
}

/// The config at `path`, or the demo node's without one; `backend` overrides its backend.
fn load_or_demo(path: Option<PathBuf>, backend: Option<Backend>) -> Result<Loaded, Error> {
    let mut loaded = match path {
        Some(path) => Config::load(&path)?,
        None => Loaded { config: demo::config(), base_dir: PathBuf::from(".") },
    };
    if let Some(b) = backend {
        loaded.config.backend = b.into();
    }
    Ok(loaded)
}

/// What can be checked beyond the file itself: for a simulated node, build it (traces
/// load, fault GPUs exist) and check the power config against its GPUs; every plugin is
/// loaded and started against its GPUs (against none for other backends).
fn check_deeper(loaded: &Loaded) -> Result<(), Error> {
    let (config, base_dir) = (&loaded.config, &loaded.base_dir);
    let mut inventory = Vec::new();
    if config.backend == BackendKind::Sim {
        let opened = setup::open_backend(config, base_dir, SystemClock::new())?;
        inventory = opened.backend.inventory().to_vec();
        gpulet::guard::PowerGuard::new(&inventory, &config.power)?;
    }
    let mut chain = setup::policy_chain(config, base_dir, inventory.len())?;
    let failed = chain.load(&setup::plugin_specs(config, base_dir), &inventory, &mut Vec::new());
    let errors: Vec<ConfigError> = failed
        .into_iter()
        .map(|(name, e)| {
            let i = config.plugin.iter().position(|p| p.name == name).unwrap_or_default();
            ConfigError::invalid(format!("plugin[{i}]"), e.to_string())
        })
        .collect();
    if errors.is_empty() { Ok(()) } else { Err(ConfigErrors(errors).into()) }
}

/// The agent is one loop: a single-threaded runtime is all it needs, and the smallest.
fn block_on<F: Future>(f: F) -> Result<F::Output, Error> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::Runtime)?;
    Ok(rt.block_on(f))
}
