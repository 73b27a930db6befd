//! `gpulet demo`: a simulated 8-GPU node under a power budget, with a live view.

use clap::Args as ClapArgs;
use gpulet::demo;
use gpulet::error::Error;

use super::block_on;

#[derive(Debug, ClapArgs)]
pub struct Args {
    /// Stop after this many ticks.
    #[arg(long, value_name = "N")]
    pub ticks: Option<u64>,
    /// Print the telemetry records (JSON lines) instead of the live view.
    #[arg(long)]
    pub json: bool,
    /// Simulated seconds per wall second; 0 runs as fast as possible.
    #[arg(long, default_value_t = 1.0, value_name = "X")]
    pub speed: f64,
    /// Also publish the demo node to this broker (mqtt://HOST[:PORT]); watch it with
    /// `mosquitto_sub -v -t 'gpulet/v1/#'`.
    #[arg(long, value_name = "URL")]
    pub mqtt: Option<String>,
    /// Serve the control socket here, so that `gpulet status --socket PATH` and the local
    /// commands reach the demo node.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<std::path::PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9402).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
    /// Without the Wasm policies (power-budget, thermal-guard, the anomaly reporter): the
    /// guard's static equal split alone, for comparison.
    #[arg(long)]
    pub no_plugins: bool,
}

pub fn run(args: Args) -> Result<(), Error> {
    let Args { ticks, json, speed, mqtt, socket, metrics, no_plugins } = args;
    let speed = (speed > 0.0).then_some(speed);
    block_on(demo::run(demo::Options { ticks, json, speed, mqtt, socket, metrics, no_plugins }))??;
    Ok(())
}
