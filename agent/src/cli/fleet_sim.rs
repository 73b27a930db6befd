//! `gpulet fleet-sim`: many simulated nodes against a broker, and what arrives.

use std::path::PathBuf;

use clap::Args as ClapArgs;
use gpulet::error::Error;

#[derive(Debug, ClapArgs)]
pub struct Args {
    #[arg(long, value_name = "N")]
    pub nodes: u32,
    #[arg(long, value_name = "URL")]
    pub broker: String,
    #[arg(long, default_value = "60s", value_name = "DURATION")]
    pub duration: humantime::Duration,
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub gpus: u32,
    /// Keep the outboxes here (default: a temporary folder, removed at the end).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Sync each tick's records to disk, as a real agent does by default.
    #[arg(long)]
    pub fsync: bool,
    #[arg(long, default_value = "gpulet/v1", value_name = "ROOT")]
    pub root: String,
}

pub fn run(args: Args) -> Result<(), Error> {
    let Args { nodes, broker, duration, gpus, dir, fsync, root } = args;
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
