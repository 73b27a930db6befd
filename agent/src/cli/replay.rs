//! `gpulet record`, `gpulet plugin replay` and `gpulet plugin diff`: try a power policy on
//! a recorded day before deploying it (`docs/writing-policies.md`).

use std::path::{Path, PathBuf};

use clap::Args as ClapArgs;
use gpulet::error::Error;
use gpulet::plugin::PluginError;
use gpulet::plugin::dry_run;
use gpulet::plugin::replay::{self, Replayed, Summary, Trace};
use gpulet::plugin::reporter_bindings::Reporter;
use gpulet::plugin::wit::ReportItem;
use gpulet::record::{self, Outcome, Source};
use serde_json::json;

#[derive(Debug, ClapArgs)]
pub struct Record {
    /// Where to write the trace (JSON Lines, `docs/writing-policies.md`).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// How many ticks to record.
    #[arg(long, default_value_t = 60)]
    pub ticks: u64,
    /// The node to record (default: the demo node, simulated). A simulated node runs on
    /// virtual time, as fast as it can; a real one in real time.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

pub fn record(a: Record) -> Result<(), Error> {
    let source = Source::new(a.config.as_deref())?;
    let n = record::record(&source, &a.out, a.ticks)?;
    println!("recorded {n} ticks of {} to {}", source.config.node_id(), a.out.display());
    Ok(())
}

fn read(trace: &Path) -> Result<Trace, Error> {
    Trace::read(trace).map_err(Error::Command)
}

/// `plugin` (a power plugin) over every tick of `trace`.
fn run(plugin: &Path, config: &str, trace: &Trace) -> Result<Vec<Replayed>, Error> {
    let (mut p, _) = dry_run::start(plugin, config, &trace.gpu_infos())?;
    replay::replay(&mut p, trace).map_err(Error::Command)
}

fn show_summary(s: &Summary) {
    println!(
        "{} ticks: {} with actions, {} actions, {} faults",
        s.ticks, s.ticks_with_actions, s.actions, s.faults
    );
    for (g, (asked, recorded)) in s.mean_asked_w.iter().zip(&s.mean_recorded_w).enumerate() {
        let w = |v: &Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.0} W"));
        println!("  GPU {g}: asked {} on average; recorded {}", w(asked), w(recorded));
    }
}

pub fn replay(
    plugin: &Path,
    trace: &Path,
    config: &str,
    json: bool,
    sim: bool,
) -> Result<(), Error> {
    let t = read(trace)?;
    let replayed = match dry_run::start(plugin, config, &t.gpu_infos()) {
        Ok((mut p, _)) => replay::replay(&mut p, &t).map_err(Error::Command)?,
        // Not a power plugin: a reporter is replayed for what it would have reported.
        Err(PluginError::WrongWorld { .. }) => {
            return replay_reporter(plugin, &t, config, json, sim);
        }
        Err(e) => return Err(e.into()),
    };
    let summary = replay::summary(&t, &replayed);
    let closed = if sim {
        Some((record::closed_loop(&t, None)?, record::closed_loop(&t, Some((plugin, config)))?))
    } else {
        None
    };
    if json {
        let ticks: Vec<_> = replayed
            .iter()
            .zip(&t.ticks)
            .map(|(r, rec)| {
                json!({
                    "seq": r.seq,
                    "actions": r.actions.iter().map(|a| json!({"gpu": a.gpu, "limit_w": a.limit_w, "reason": a.reason})).collect::<Vec<_>>(),
                    "fault": r.fault,
                    "recorded_w": rec.limits_w,
                })
            })
            .collect();
        let closed =
            closed.map(|(recorded, plugin)| json!({"recorded": recorded, "plugin": plugin}));
        println!("{}", json!({"ticks": ticks, "summary": summary, "closed_loop": closed}));
        return Ok(());
    }
    for (r, rec) in replayed.iter().zip(&t.ticks) {
        if let Some(f) = &r.fault {
            println!("seq {}: the plugin {f}", r.seq);
        }
        for a in &r.actions {
            let was = rec.limits_w.get(a.gpu as usize).copied().flatten();
            let was = was.map_or("?".to_owned(), |w| format!("{w:.0} W"));
            println!(
                "seq {}: GPU {} -> {:.0} W (recorded {was}): {}",
                r.seq, a.gpu, a.limit_w, a.reason
            );
        }
    }
    show_summary(&summary);
    if let Some((recorded, plugin)) = closed {
        show_closed_loop(&t, &recorded, &plugin);
    }
    Ok(())
}

/// `plugin replay` of a reporter: what it would have reported at each tick (before the
/// host's bounds), and how much of it.
fn replay_reporter(
    plugin: &Path,
    t: &Trace,
    config: &str,
    json: bool,
    sim: bool,
) -> Result<(), Error> {
    if sim {
        return Err(Error::Command(
            "--sim runs the node again with a power plugin in charge; a reporter changes no \
             limit, so there is nothing to run again: replay it without --sim"
                .into(),
        ));
    }
    let (mut p, _) = dry_run::start_as::<Reporter>(plugin, config, &t.gpu_infos(), "reporter")?;
    let reported = replay::report_all(&mut p, t).map_err(Error::Command)?;
    let mut by_kind = std::collections::BTreeMap::<String, usize>::new();
    let (mut metrics, mut faults) = (0, 0);
    let mut ticks = Vec::new();
    for r in &reported {
        faults += usize::from(r.fault.is_some());
        if let Some(f) = &r.fault
            && !json
        {
            println!("seq {}: the plugin {f}", r.seq);
        }
        let (mut ms, mut es) = (Vec::new(), Vec::new());
        for item in &r.items {
            match item {
                ReportItem::Metric(m) => {
                    metrics += 1;
                    ms.push(json!({"name": m.name, "value": m.value, "gpu": m.gpu}));
                }
                ReportItem::Event(e) => {
                    *by_kind.entry(e.kind.clone()).or_default() += 1;
                    if !json {
                        let gpu = e.gpu.map_or(String::new(), |g| format!("GPU {g} "));
                        println!("seq {}: {gpu}{}: {}", r.seq, e.kind, e.message);
                    }
                    es.push(json!({"kind": e.kind, "message": e.message, "gpu": e.gpu}));
                }
            }
        }
        ticks.push(json!({"seq": r.seq, "metrics": ms, "events": es, "fault": r.fault}));
    }
    let events: usize = by_kind.values().sum();
    if json {
        let summary = json!({"ticks": reported.len(), "metrics": metrics, "events": events,
            "events_by_kind": by_kind, "faults": faults});
        println!("{}", json!({"kind": "reporter", "ticks": ticks, "summary": summary}));
        return Ok(());
    }
    println!("{} ticks: {metrics} metrics, {events} events, {faults} faults", reported.len());
    for (kind, n) in &by_kind {
        println!("  {kind}: {n}");
    }
    Ok(())
}

fn show_closed_loop(t: &Trace, recorded: &Outcome, plugin: &Outcome) {
    let pct = |a: f64, b: f64| {
        if b > 0.0 { format!(" ({:+.1}%)", (a - b) / b * 100.0) } else { String::new() }
    };
    println!(
        "closed loop on the simulator, {} ticks of {} ms ({}):",
        recorded.ticks, t.header.tick_ms, t.header.node
    );
    println!("  {:<18} {:>16} {:>24}", "", "recorded config", "with this plugin");
    println!(
        "  {:<18} {:>14.1} GPU-s {:>14.1} GPU-s{}",
        "useful work",
        recorded.work_gpu_s,
        plugin.work_gpu_s,
        pct(plugin.work_gpu_s, recorded.work_gpu_s)
    );
    println!(
        "  {:<18} {:>16.1} kJ {:>14.1} kJ{}",
        "energy",
        recorded.energy_j / 1000.0,
        plugin.energy_j / 1000.0,
        pct(plugin.energy_j, recorded.energy_j)
    );
    println!(
        "  {:<18} {:>16} {:>24}",
        "ticks over budget", recorded.ticks_over_budget, plugin.ticks_over_budget
    );
}

pub fn diff(
    a: &Path,
    b: &Path,
    trace: &Path,
    config_a: &str,
    config_b: &str,
    json: bool,
) -> Result<(), Error> {
    let t = read(trace)?;
    let ra = run(a, config_a, &t)?;
    let rb = run(b, config_b, &t)?;
    let differ = replay::diff(&ra, &rb, 1.0);
    let (sa, sb) = (replay::summary(&t, &ra), replay::summary(&t, &rb));
    if json {
        let ticks: Vec<_> = differ
            .iter()
            .map(|(seq, gpus)| {
                let side = |x: &Option<gpulet::plugin::wit::PowerAction>| {
                    x.as_ref().map(|x| json!({"limit_w": x.limit_w, "reason": x.reason}))
                };
                json!({"seq": seq, "gpus": gpus.iter().map(|(g, x, y)| json!({"gpu": g, "a": side(x), "b": side(y)})).collect::<Vec<_>>()})
            })
            .collect();
        println!("{}", json!({"differ": ticks, "a": sa, "b": sb}));
        return Ok(());
    }
    let side = |x: &Option<gpulet::plugin::wit::PowerAction>| {
        x.as_ref().map_or("nothing".to_owned(), |x| format!("{:.0} W ({})", x.limit_w, x.reason))
    };
    for (seq, gpus) in &differ {
        for (g, x, y) in gpus {
            println!("seq {seq}: GPU {g}: A {} | B {}", side(x), side(y));
        }
    }
    println!("{} of {} ticks decided differently (by more than 1 W)", differ.len(), t.ticks.len());
    println!("A: {}", a.display());
    show_summary(&sa);
    println!("B: {}", b.display());
    show_summary(&sb);
    Ok(())
}
