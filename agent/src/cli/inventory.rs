//! `gpulet inventory`: the GPUs the backend sees.

use std::path::PathBuf;

use clap::Args as ClapArgs;
use gpulet::clock::SystemClock;
use gpulet::error::Error;
use gpulet::setup;

use super::{Backend, load_or_demo};

#[derive(Debug, ClapArgs)]
pub struct Args {
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Override the config's backend.
    #[arg(long, value_enum)]
    pub backend: Option<Backend>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> Result<(), Error> {
    let Args { config, backend, json } = args;
    let loaded = load_or_demo(config, backend)?;
    let opened = setup::open_backend(&loaded.config, &loaded.base_dir, SystemClock::new())?;
    let inventory = opened.backend.inventory();
    if json {
        println!("{}", serde_json::to_string_pretty(inventory).expect("inventory serialises"));
    } else {
        println!("backend: {}", opened.backend.kind());
        if let Some(d) = opened.backend.driver() {
            println!("driver: {}, CUDA {}", d.version, d.cuda.as_deref().unwrap_or("unknown"));
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
