//! `gpulet check-config`: exit 0 if the config is valid, 2 with every error otherwise.

use std::path::PathBuf;

use clap::Args as ClapArgs;
use gpulet::config::Config;
use gpulet::error::Error;

use super::check_deeper;

#[derive(Debug, ClapArgs)]
pub struct Args {
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
}

pub fn run(args: Args) -> Result<(), Error> {
    let Args { file } = args;
    let loaded = Config::load(&file)?;
    check_deeper(&loaded)?;
    println!("{}: valid", file.display());
    for w in warnings(&loaded.config) {
        eprintln!("warning: {w}");
    }
    Ok(())
}

/// What is valid but almost certainly not what was meant.
fn warnings(config: &Config) -> Vec<String> {
    config
        .plugin
        .iter()
        .enumerate()
        .filter(|(_, p)| p.grants.is_empty())
        .map(|(i, p)| {
            format!(
                "plugin[{i}] ({}) has no grants, so every limit it proposes is rejected: it can decide nothing; give it grants = [\"lower\"], [\"raise\"] or both (docs/plugins.md)",
                p.name
            )
        })
        .collect()
}
