//! `gpulet run`: the agent, until SIGINT or SIGTERM.

use std::path::PathBuf;

use clap::Args as ClapArgs;
use gpulet::agent::{Pacing, shutdown_signal};
use gpulet::clock::SystemClock;
use gpulet::config::Config;
use gpulet::error::Error;
use gpulet::setup;

use super::{Backend, block_on};

#[derive(Debug, ClapArgs)]
pub struct Args {
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Stop after this many ticks.
    #[arg(long, value_name = "N")]
    pub ticks: Option<u64>,
    /// Override the config's backend.
    #[arg(long, value_enum)]
    pub backend: Option<Backend>,
}

pub fn run(args: Args) -> Result<(), Error> {
    let Args { config, ticks, backend } = args;
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
