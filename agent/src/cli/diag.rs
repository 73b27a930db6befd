//! `gpulet diag`: a health check of each GPU through CUDA.

use std::path::PathBuf;

use clap::Args as ClapArgs;
use gpulet::clock::SystemClock;
use gpulet::error::Error;
use gpulet::{cuda, setup};

use super::{Backend, load_or_demo};

#[derive(Debug, ClapArgs)]
pub struct Args {
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Memory written and read back per GPU, MiB (1 to 65536).
    #[arg(long, default_value_t = cuda::DIAG_MEMORY_MIB, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub memory_mib: u32,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> Result<(), Error> {
    let Args { config, memory_mib, json } = args;
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
        return Err(Error::Command(format!("{failed} of {} GPUs failed the check", reports.len())));
    }
    Ok(())
}
