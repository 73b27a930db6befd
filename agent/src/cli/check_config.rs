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
    Ok(())
}
