//! `gpulet inventory`: the GPUs the backend sees.

use clap::Args as ClapArgs;
use gpulet::clock::SystemClock;
use gpulet::error::Error;
use gpulet::setup;

use super::NodeArgs;

#[derive(Debug, ClapArgs)]
pub struct Args {
    #[command(flatten)]
    pub node: NodeArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> Result<(), Error> {
    let Args { node, json } = args;
    let loaded = node.load()?;
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
