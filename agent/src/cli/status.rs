//! `gpulet status`: what a running agent is doing, over its control socket. The exit code
//! is a monitoring check's (Nagios, Icinga, Sensu, a systemd `ExecCondition`): 0 all is
//! well; 1 a warning (a GPU degraded, a plugin not running, the broker not connected, a
//! reload that failed); 2 critical (a GPU lost, the agent's loop not answering); 3
//! unknown (no agent at the socket).

use clap::Args as ClapArgs;
use gpulet::agent::Status;
use gpulet::error::Error;
use gpulet::mqtt::MqttStats;
use gpulet::service::client;
use serde_json::{Value, json};

use super::local::SocketArg;

#[derive(Debug, ClapArgs)]
pub struct Args {
    /// Print the agent's reply as JSON (`{"status": …, "mqtt": …}`, docs/socket.md).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub socket: SocketArg,
}

pub fn run(args: Args) -> Result<(), Error> {
    let unknown = |message: String| Error::Exit { code: 3, message };
    let reply = client::request(&args.socket.socket, &json!({"op": "status"}))
        .map_err(|e| unknown(e.to_string()))?;
    if reply["ok"] != json!(true) {
        let why = reply["error"].as_str().unwrap_or("no reason given").to_owned();
        if args.json {
            println!("{reply}");
        }
        // The agent answered but its loop did not: it is not managing its GPUs.
        let code = if reply["code"] == "unavailable" { 2 } else { 3 };
        return Err(Error::Exit { code, message: why });
    }
    let status: Status = serde_json::from_value(reply["status"].clone())
        .map_err(|e| unknown(format!("the agent's status is not what this gpulet reads: {e}")))?;
    let mqtt: Option<MqttStats> = serde_json::from_value(reply["mqtt"].clone()).ok().flatten();
    if args.json {
        println!("{reply}");
    } else {
        print!("{}", render(&status, mqtt.as_ref()));
    }
    let (code, problems) = verdict(&status, mqtt.as_ref());
    if code == 0 { Ok(()) } else { Err(Error::Exit { code, message: problems.join("; ") }) }
}

/// The check's outcome: its exit code and what is wrong.
pub fn verdict(s: &Status, mqtt: Option<&MqttStats>) -> (u8, Vec<String>) {
    let mut code = 0;
    let mut problems = Vec::new();
    let mut flag = |c: u8, p: String| {
        code = code.max(c);
        problems.push(p);
    };
    for g in &s.gpus {
        match g.health.as_str() {
            "ok" => {}
            "lost" => flag(2, format!("critical: GPU {} is lost", g.index)),
            h => flag(1, format!("warning: GPU {} is {h}", g.index)),
        }
    }
    for p in s.plugins.iter().filter(|p| !p.running) {
        let why = if p.quarantined && p.error.is_none() { "quarantined" } else { "not loaded" };
        flag(1, format!("warning: plugin {} is {why}", p.name));
    }
    if mqtt.is_some_and(|m| !m.connected) {
        flag(1, "warning: the broker is not connected".into());
    }
    if let Some(r) = &s.reload_problem {
        flag(1, format!("warning: {r}"));
    }
    (code, problems)
}

fn opt<T: std::fmt::Display>(v: Option<T>, unit: &str) -> String {
    v.map_or("-".into(), |v| format!("{v}{unit}"))
}

fn watts(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.0} W"))
}

/// The status as a person reads it.
pub fn render(s: &Status, mqtt: Option<&MqttStats>) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let ago = s.last_tick_ms.map_or("no tick yet".into(), |t| {
        let ms = gpulet::mqtt::wall_ms().saturating_sub(t);
        format!("last {:.1} s ago", ms as f64 / 1000.0)
    });
    let _ = writeln!(
        o,
        "node {} · gpulet {} · {} backend · tick {} ms · {} ticks, {ago}",
        s.node, s.agent_version, s.backend, s.tick_ms, s.ticks
    );
    let b = &s.budget;
    let budget = match (b.budget_w, b.set_by.as_str()) {
        (None, _) => "no node budget".into(),
        (Some(w), "command") => {
            format!("node budget {w:.0} W, set by command (configured: {})", watts(b.configured_w))
        }
        (Some(w), _) => format!("node budget {w:.0} W, from the config"),
    };
    let _ = writeln!(o, "{budget} · power now {}", watts(s.power_w));
    let _ = writeln!(
        o,
        "\n{:<4} {:<9} {:>8} {:>14} {:>13} {:>7} {:>6}  UUID",
        "GPU", "HEALTH", "POWER", "LIMIT", "RANGE", "TEMP", "UTIL"
    );
    for g in &s.gpus {
        let limit = match g.operator_limit_w {
            Some(w) => format!("{} (op {w:.0})", watts(g.limit_w)),
            None => watts(g.limit_w),
        };
        let _ = writeln!(
            o,
            "{:<4} {:<9} {:>8} {:>14} {:>13} {:>7} {:>6}  {}",
            g.index,
            g.health,
            watts(g.power_w),
            limit,
            format!("{:.0}–{:.0} W", g.min_w, g.max_w),
            opt(g.temp_c.map(|t| format!("{t:.0}")), " °C"),
            opt(g.util_pct.map(|u| format!("{u:.0}")), " %"),
            g.uuid
        );
    }
    if s.plugins.is_empty() {
        let _ = writeln!(o, "\nplugins: none (static limits)");
    } else {
        let _ = writeln!(o, "\nplugins:");
        for p in &s.plugins {
            let state = match (p.running, p.quarantined, &p.error) {
                (true, _, _) => "running".to_owned(),
                (false, _, Some(e)) => format!("not loaded: {e}"),
                (false, true, None) => "quarantined (its fallback stands in)".into(),
                (false, false, None) => "stopped".into(),
            };
            let _ = writeln!(
                o,
                "  {:<16} {:<8} {state} · {} calls, {} faults, {:.3} s",
                p.name,
                p.version.as_deref().unwrap_or("-"),
                p.calls,
                p.faults,
                p.call_seconds
            );
        }
    }
    match mqtt {
        Some(m) => {
            let _ = writeln!(
                o,
                "\nbroker: {} · outbox {} records ({} bytes) · {} dropped · {} reconnects",
                if m.connected { "connected" } else { "NOT connected" },
                m.outbox_depth,
                m.outbox_bytes,
                m.dropped,
                m.reconnects
            );
        }
        None => {
            let _ = writeln!(o, "\nbroker: none configured");
        }
    }
    if let Some(r) = &s.reload_problem {
        let _ = writeln!(o, "reload: {r}");
    }
    if let Some(j) = &s.jobs {
        let how = if j.plugin_running || j.scheduler == gpulet::jobs::scheduler::BUILTIN {
            ""
        } else {
            ", built-in stands in"
        };
        let _ = writeln!(
            o,
            "jobs: {} running, {} queued (scheduler {}{how}; gpulet jobs)",
            j.running, j.queued, j.scheduler
        );
    }
    if !s.xids.is_empty() {
        let xids: Vec<String> =
            s.xids.iter().map(|x| format!("GPU {} XID {} ×{}", x.gpu, x.code, x.count)).collect();
        let _ = writeln!(o, "XIDs since start: {}", xids.join(", "));
    }
    if !s.recent_events.is_empty() {
        let _ = writeln!(o, "\nrecent events:");
        for e in &s.recent_events {
            let _ = writeln!(o, "  {}", event_line(e));
        }
    }
    o
}

/// One event as a line: its kind, then its fields.
fn event_line(e: &Value) -> String {
    let Value::Object(m) = e else { return e.to_string() };
    let kind = m.get("kind").and_then(Value::as_str).unwrap_or("event");
    format!("{kind} {}", gpulet::telemetry::event_detail(m))
}
