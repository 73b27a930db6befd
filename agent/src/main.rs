//! The `gpulet` command line: parse, set up logging, run the subcommand (`cli/`), map
//! its error to the exit code (0 success; 1 a runtime failure; 2 a usage or
//! configuration error).

mod cli;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    // rustls needs exactly one process-wide crypto provider (rumqttc pitfall 10).
    let _ = rustls::crypto::ring::default_provider().install_default();
    logging(cli.log_level.unwrap_or(cli.command.default_log_level()));
    match cli::run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gpulet: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Logs go to the journal, with their fields as journal fields, when stderr is the
/// journal stream systemd gave the service (`JOURNAL_STREAM`); otherwise plain text on
/// stderr, with colours only when stderr is a terminal.
fn logging(level: tracing::Level) {
    let filter = LevelFilter::from_level(level);
    if to_journal()
        && let Ok(journal) = tracing_journald::layer()
    {
        tracing_subscriber::registry().with(journal.with_filter(filter)).init();
        return;
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_max_level(level)
        .init();
}

/// Whether stderr is the stream `JOURNAL_STREAM` names (`device:inode`), as
/// sd_journal_stream_fd(3) describes.
fn to_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(stream) = std::env::var("JOURNAL_STREAM").ok() else { return false };
    let Some((dev, ino)) = stream.split_once(':') else { return false };
    std::fs::metadata("/proc/self/fd/2")
        .is_ok_and(|m| dev.parse() == Ok(m.dev()) && ino.parse() == Ok(m.ino()))
}
