//! `gpulet plugin check`, `run`, `replay`, `diff` and `new`: tools for plugin authors.

use std::path::PathBuf;

use clap::Subcommand;
use gpulet::config::{ConfigError, ConfigErrors};
use gpulet::error::Error;
use gpulet::plugin::dry_run::{self, SnapshotFile};

use super::plugin_new::{self, Kind, Lang};

#[derive(Debug, Subcommand)]
pub enum PluginCommand {
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
    /// Run a power plugin over a recorded trace (`gpulet record`) and print what it would
    /// have decided, tick by tick, with its reasons, and a summary. With --sim, on a
    /// simulator recording, run the node again closed-loop with the plugin in charge and
    /// compare useful work, energy and ticks over budget with the recorded config.
    Replay {
        #[arg(value_name = "FILE.wasm")]
        file: PathBuf,
        #[arg(long, value_name = "FILE")]
        trace: PathBuf,
        /// The plugin's config, JSON.
        #[arg(long, default_value = "{}", value_name = "JSON")]
        config: String,
        #[arg(long)]
        sim: bool,
        #[arg(long)]
        json: bool,
    },
    /// Run two power plugins over a recorded trace and print the ticks where they decide
    /// differently, and a summary of each.
    Diff {
        #[arg(value_name = "A.wasm")]
        a: PathBuf,
        #[arg(value_name = "B.wasm")]
        b: PathBuf,
        #[arg(long, value_name = "FILE")]
        trace: PathBuf,
        #[arg(long, default_value = "{}", value_name = "JSON")]
        config_a: String,
        #[arg(long, default_value = "{}", value_name = "JSON")]
        config_b: String,
        #[arg(long)]
        json: bool,
    },
    /// Write a ready plugin project (outside any gpulet checkout): a policy that builds
    /// into a component with one command, with a passing native test and gpulet's WIT
    /// copied in. See its README.md.
    New {
        /// The plugin's name: 1 to 64 of a-z, 0-9 and '-'.
        name: String,
        #[arg(long, value_enum, default_value = "power")]
        kind: Kind,
        #[arg(long, value_enum, default_value = "rust")]
        lang: Lang,
        /// Where to write it (default: ./NAME); a new or empty folder.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

pub fn run(command: PluginCommand) -> Result<(), Error> {
    match command {
        PluginCommand::Replay { file, trace, config, sim, json } => {
            super::replay::replay(&file, &trace, &config, json, sim)
        }
        PluginCommand::Diff { a, b, trace, config_a, config_b, json } => {
            super::replay::diff(&a, &b, &trace, &config_a, &config_b, json)
        }
        PluginCommand::New { name, kind, lang, dir } => {
            let dir = plugin_new::create(&name, kind, lang, dir)?;
            println!("wrote {}: a {kind:?} plugin in {lang:?}; see its README.md", dir.display());
            println!(
                "  cd {} && cargo test && cargo build --release --target wasm32-wasip2",
                dir.display()
            );
            Ok(())
        }
        PluginCommand::Check { file, config } => {
            let report = dry_run::check(&file, &config)?;
            println!(
                "{}: {} {} ({} plugin, API {})",
                file.display(),
                report.name,
                report.version,
                report.kind,
                report.api_version
            );
            let how = if report.cached { "from the compile cache" } else { "compiled" };
            println!("loaded in {:.1} ms ({how}); config valid", report.compile_ms);
            println!("imports:");
            for i in &report.imports {
                println!("  {i}");
            }
            Ok(())
        }
        PluginCommand::Run { file, snapshot, config, json } => {
            let snap = SnapshotFile::read(&snapshot)
                .map_err(|e| ConfigErrors(vec![ConfigError::invalid("--snapshot", e)]))?;
            let wsnap = snap
                .to_wit()
                .map_err(|e| ConfigErrors(vec![ConfigError::invalid("--snapshot", e)]))?;
            let (mut plugin, _) = dry_run::start(&file, &config, &snap.gpu_infos())?;
            let out = plugin
                .decide(&wsnap, &snap.context())
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
    }
}
