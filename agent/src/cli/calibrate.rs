//! `gpulet calibrate`: work-per-watt curves of each GPU, by a limit sweep under a compute load.

use std::path::PathBuf;

use clap::Args as ClapArgs;
use gpulet::agent::shutdown_signal;
use gpulet::clock::{Clock, SystemClock};
use gpulet::config::{BackendKind, ConfigError, ConfigErrors};
use gpulet::error::Error;
use gpulet::{calibrate, cuda, setup};

use super::{NodeArgs, block_on};

#[derive(Debug, ClapArgs)]
pub struct Args {
    #[command(flatten)]
    pub node: NodeArgs,
    /// Limits measured, from the maximum to the minimum (2 to 50).
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u32).range(2..=50))]
    pub steps: u32,
    /// Time at each limit before measuring.
    #[arg(long, default_value = "3s", value_name = "DURATION")]
    pub warmup: humantime::Duration,
    /// Time measured at each limit.
    #[arg(long, default_value = "5s", value_name = "DURATION")]
    pub measure: humantime::Duration,
    /// Write here instead of `[calibration] file`.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Print the calibration as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> Result<(), Error> {
    let Args { node, steps, warmup, measure, out, json } = args;
    let loaded = node.load()?;
    let settings = calibrate::Settings { steps, warmup: warmup.into(), measure: measure.into() };
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
        BackendKind::Sim => {
            calibrate::simulated(&loaded.config.sim, &loaded.base_dir, settings, wall.wall_ms())?
        }
        BackendKind::Nvml => {
            // CUDA first: without it nothing is touched.
            cuda::available()?;
            let opened = setup::open_backend(&loaded.config, &loaded.base_dir, wall.clone())?;
            let mut backend = opened.backend;
            let mut load = cuda::CudaLoad::start(backend.inventory(), calibrate::calibratable)?;
            // The limits found are kept where the agent keeps its own, so that the
            // agent puts them back if calibration dies; SIGINT and SIGTERM stop
            // the sweep and put them back at once.
            let keep = loaded.config.nvml.restore_limits.then(|| {
                loaded.base_dir.join(&loaded.config.nvml.state_dir).join("start-limits.json")
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
