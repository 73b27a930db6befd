//! The `gpulet` command line: parse, set up logging, run the subcommand (`cli/`), map
//! its error to the exit code (0 success; 1 a runtime failure; 2 a usage or
//! configuration error).

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    // rustls needs exactly one process-wide crypto provider (rumqttc pitfall 10).
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(cli.log_level.unwrap_or(cli.command.default_log_level()))
        .init();
    match cli::run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gpulet: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
