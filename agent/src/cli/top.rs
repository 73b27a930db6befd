//! `gpulet top`: a live view of a whole fleet from its MQTT topics, or with `--once
//! --json` a snapshot for scripts. The model is `gpulet::top::Fleet`, fed by
//! `mqtt::watch::Watch`; the view is drawn at most twice a second, whatever the message
//! rate, so that 5,000 nodes cost parsing, not drawing.

use std::time::Duration;

use clap::Args as ClapArgs;
use gpulet::error::Error;
use gpulet::mqtt::watch::Watch;
use gpulet::top::view::{self, Header};
use gpulet::top::{Fleet, SortKey};
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind};

use super::block_on;
use super::cmd::BrokerArgs;

#[derive(Debug, ClapArgs)]
pub struct Args {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Only the nodes whose id matches this glob (`gpu-a*`, `rack-1?-*`).
    #[arg(long, value_name = "GLOB")]
    pub filter: Option<String>,
    /// The rows' order (the `s` key cycles through them).
    #[arg(long, value_enum, default_value_t = SortKey::Power)]
    pub sort: SortKey,
    /// Print one snapshot and exit, after listening for --wait.
    #[arg(long)]
    pub once: bool,
    /// With --once: the snapshot as JSON (`{"summary", "nodes", "events"}`).
    #[arg(long, requires = "once")]
    pub json: bool,
    /// With --once: how long to listen first (retained status and births arrive at once;
    /// telemetry within a tick).
    #[arg(long, default_value = "3s", value_name = "DURATION")]
    pub wait: humantime::Duration,
}

pub fn run(args: Args) -> Result<(), Error> {
    let filter = match &args.filter {
        Some(g) => Some(glob::Pattern::new(g).map_err(|e| {
            Error::from(gpulet::config::ConfigErrors(vec![gpulet::config::ConfigError::invalid(
                "--filter",
                format!("{g:?} is not a glob: {e}"),
            )]))
        })?),
        None => None,
    };
    let (tls, credentials) = args.broker.connection()?;
    let mut watch = Watch::new(&args.broker.broker, &args.broker.root, tls, credentials)
        .map_err(|e| Error::Command(format!("--broker: {e}")))?;
    let mut fleet = Fleet::new(&args.broker.root, filter);
    if args.once {
        let wait: Duration = args.wait.into();
        block_on(async {
            let _ = tokio::time::timeout(wait, async {
                loop {
                    let (topic, payload) = watch.next().await;
                    fleet.apply(&String::from_utf8_lossy(&topic), &payload);
                }
            })
            .await;
        })?;
        if !watch.connected {
            return Err(Error::Command(format!(
                "cannot reach the broker at {}: {}",
                args.broker.broker,
                watch.error.as_deref().unwrap_or("no answer")
            )));
        }
        if args.json {
            println!("{}", fleet.snapshot(args.sort));
        } else {
            println!("{}", fleet.summary());
            for r in fleet.rows(args.sort) {
                let state = match r.online {
                    Some(true) => "online",
                    Some(false) => "offline",
                    None => "unknown",
                };
                let power = r.power_w.map_or("-".into(), |p| format!("{p:.0} W"));
                println!("{:<24} {state:<8} {power:>9}", r.node);
            }
        }
        return Ok(());
    }
    interactive(watch, fleet, args)
}

fn interactive(mut watch: Watch, mut fleet: Fleet, args: Args) -> Result<(), Error> {
    let mut terminal = ratatui::init();
    let mut header = Header {
        broker: args.broker.broker.clone(),
        connected: false,
        error: None,
        sort: args.sort,
        now_ms: gpulet::mqtt::wall_ms(),
    };
    let outcome = block_on(async {
        let mut redraw = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                (topic, payload) = watch.next() => {
                    fleet.apply(&String::from_utf8_lossy(&topic), &payload);
                }
                _ = redraw.tick() => {
                    // Keys, without blocking the runtime.
                    while event::poll(Duration::ZERO).unwrap_or(false) {
                        if let Ok(Event::Key(k)) = event::read()
                            && k.kind == KeyEventKind::Press
                        {
                            match k.code {
                                KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                                KeyCode::Char('s') => header.sort = header.sort.next(),
                                _ => {}
                            }
                        }
                    }
                    header.connected = watch.connected;
                    header.error.clone_from(&watch.error);
                    header.now_ms = gpulet::mqtt::wall_ms();
                    terminal.draw(|f| view::draw(f, &fleet, &header)).map_err(Error::Runtime)?;
                }
            }
        }
    });
    ratatui::restore();
    outcome?
}
