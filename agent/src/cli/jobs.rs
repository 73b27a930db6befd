//! The job commands (`docs/jobs.md`): `submit`, `jobs`, `cancel`, `logs`, `wait`, each
//! a request over the control socket, whose peer credentials say who asks: a user sees
//! and cancels their own jobs; root, the agent's user and `socket.admin_group` all.

use std::time::Duration;

use clap::Args as ClapArgs;
use gpulet::error::Error;
use gpulet::service::client;
use serde_json::{Map, Value, json};

use super::local::SocketArg;

/// How often `wait` and `logs --follow` ask again.
const POLL: Duration = Duration::from_millis(300);

#[derive(Debug, ClapArgs)]
pub struct Submit {
    /// GPUs: a count, or a comma-separated list of UUIDs and indices.
    #[arg(long, short = 'g', value_name = "N|GPU,…", default_value = "1")]
    pub gpus: String,
    /// Memory to reserve on each GPU, MiB (the GPUs are then shared unless --exclusive).
    #[arg(long, value_name = "MIB")]
    pub mem: Option<u64>,
    /// Its GPUs to itself (the default without --mem).
    #[arg(long)]
    pub exclusive: bool,
    /// Higher runs first (with a priority scheduler).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub priority: i32,
    /// Stop it (SIGTERM, then SIGKILL) after this long: `90s`, `2h`.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub time_limit: Option<Duration>,
    /// A power cap for its GPUs, watts (through the guard; the node budget still holds).
    #[arg(long, value_name = "WATTS")]
    pub power_cap: Option<f64>,
    /// A label, KEY=VALUE (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// A name shown beside its id.
    #[arg(long)]
    pub name: Option<String>,
    /// Its working directory (default: this one).
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<std::path::PathBuf>,
    /// Set a variable, NAME=VALUE (repeatable), beside this shell's environment.
    #[arg(long = "env", value_name = "NAME=VALUE")]
    pub env: Vec<String>,
    /// Send none of this shell's environment, only --env.
    #[arg(long)]
    pub no_env: bool,
    /// On the simulated backend: what its GPUs run while it lives (training,
    /// inference, memory-bound, trace).
    #[arg(long, value_name = "KIND")]
    pub workload: Option<String>,
    #[command(flatten)]
    pub socket: SocketArg,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Debug, ClapArgs)]
pub struct List {
    /// Ended jobs too.
    #[arg(long)]
    pub all: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub socket: SocketArg,
}

#[derive(Debug, ClapArgs)]
pub struct One {
    /// The job's id.
    #[arg(value_name = "ID")]
    pub id: u64,
    #[command(flatten)]
    pub socket: SocketArg,
}

#[derive(Debug, ClapArgs)]
pub struct Logs {
    /// The job's id.
    #[arg(value_name = "ID")]
    pub id: u64,
    /// Its stderr instead of its stdout.
    #[arg(long)]
    pub stderr: bool,
    /// Keep printing until the job ends.
    #[arg(long, short = 'f')]
    pub follow: bool,
    #[command(flatten)]
    pub socket: SocketArg,
}

/// `A=B` → (A, B).
fn pair(s: &str, what: &str) -> Result<(String, String), Error> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| Error::Command(format!("{s:?} is not a {what}; accepted: NAME=VALUE")))
}

pub fn submit(a: Submit) -> Result<(), Error> {
    let gpus: Value = match a.gpus.parse::<u64>() {
        Ok(n) => json!(n),
        Err(_) => Value::Array(
            a.gpus
                .split(',')
                .map(|g| g.trim().parse::<u64>().map_or_else(|_| json!(g.trim()), |i| json!(i)))
                .collect(),
        ),
    };
    let mut env = Map::new();
    if !a.no_env {
        for (k, v) in std::env::vars_os() {
            if let (Some(k), Some(v)) = (k.to_str(), v.to_str()) {
                env.insert(k.to_owned(), json!(v));
            }
        }
    }
    for e in &a.env {
        let (k, v) = pair(e, "variable")?;
        env.insert(k, json!(v));
    }
    let mut labels = Map::new();
    for l in &a.labels {
        let (k, v) = pair(l, "label")?;
        labels.insert(k, json!(v));
    }
    let cwd = match a.cwd {
        Some(c) => c,
        None => std::env::current_dir()
            .map_err(|e| Error::Command(format!("no working directory: {e}")))?,
    };
    let mut req = json!({
        "op": "submit",
        "command": a.command,
        "gpus": gpus,
        "priority": a.priority,
        "cwd": cwd,
        "env": env,
        "labels": labels,
    });
    if let Some(m) = a.mem {
        req["mem_mib"] = json!(m);
    }
    if a.exclusive {
        req["exclusive"] = json!(true);
    }
    if let Some(t) = a.time_limit {
        req["time_limit_s"] = json!(t.as_secs_f64());
    }
    if let Some(w) = a.power_cap {
        req["power_cap_w"] = json!(w);
    }
    if let Some(n) = a.name {
        req["name"] = json!(n);
    }
    if let Some(w) = a.workload {
        req["workload"] = json!(w);
    }
    let reply = ask(&a.socket, req)?;
    let job = &reply["job"];
    println!(
        "job {} {}: {}",
        job["id"],
        job["state"].as_str().unwrap_or("?"),
        job["why"].as_str().unwrap_or("")
    );
    Ok(())
}

pub fn list(a: List) -> Result<(), Error> {
    let reply = ask(&a.socket, json!({"op": "jobs", "all": a.all}))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&reply["jobs"]).expect("JSON"));
        return Ok(());
    }
    println!(
        "{:>5}  {:<10} {:<15} {:<9} {:>9} {:>11} {:>9}  COMMAND / WHY",
        "ID", "USER", "STATE", "GPUS", "RUNTIME", "ENERGY", "GPU·S"
    );
    for j in reply["jobs"].as_array().into_iter().flatten() {
        let gpus: Vec<String> =
            j["gpus"].as_array().into_iter().flatten().map(|g| g.to_string()).collect();
        let runtime = j["runtime_s"].as_f64().map_or("-".into(), |s| format!("{s:.0}s"));
        let energy = j["usage"]["energy_j"].as_f64().map_or("-".into(), |e| {
            let approx = if j["usage"]["shared"] == json!(true) { "~" } else { "" };
            format!("{approx}{:.1} kJ", e / 1000.0)
        });
        let gpu_s = j["usage"]["gpu_seconds"].as_f64().map_or("-".into(), |s| format!("{s:.0}"));
        let command: Vec<&str> = j["spec"]["command"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let state = j["state"].as_str().unwrap_or("?");
        let mut what = command.join(" ");
        if let Some(why) = j["why"].as_str().filter(|_| state != "running") {
            what = format!("{what}  [{why}]");
        }
        println!(
            "{:>5}  {:<10} {:<15} {:<9} {:>9} {:>11} {:>9}  {what}",
            j["id"].as_u64().unwrap_or(0),
            j["owner"]["user"].as_str().unwrap_or("?"),
            state,
            if gpus.is_empty() { "-".into() } else { gpus.join(",") },
            runtime,
            energy,
            gpu_s,
        );
    }
    Ok(())
}

pub fn cancel(a: One) -> Result<(), Error> {
    let reply = ask(&a.socket, json!({"op": "cancel", "job": a.id}))?;
    println!("{}", reply["detail"].as_str().unwrap_or("done"));
    Ok(())
}

pub fn logs(a: Logs) -> Result<(), Error> {
    use std::io::Write;
    let stream = if a.stderr { "stderr" } else { "stdout" };
    let mut offset = 0u64;
    loop {
        let reply =
            ask(&a.socket, json!({"op": "logs", "job": a.id, "stream": stream, "offset": offset}))?;
        let data = reply["data"].as_str().unwrap_or("");
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(data.as_bytes());
        let _ = out.flush();
        offset = reply["offset"].as_u64().unwrap_or(offset);
        if !data.is_empty() {
            continue;
        }
        if !a.follow || reply["ended"] == json!(true) {
            return Ok(());
        }
        std::thread::sleep(POLL);
    }
}

/// Wait for the job to end, print how, and exit as it did: its exit code; 128 + the
/// signal that ended it; 1 if it was cancelled, timed out, failed to start or was lost.
pub fn wait(a: One) -> Result<(), Error> {
    loop {
        let reply = ask(&a.socket, json!({"op": "job", "job": a.id}))?;
        let job = &reply["job"];
        let state = job["state"].as_str().unwrap_or("?");
        if !matches!(state, "queued" | "running") {
            let why = job["why"].as_str().unwrap_or("");
            println!("job {} {state}: {why}", a.id);
            let code = match (state, job["exit_code"].as_i64(), job["signal"].as_i64()) {
                ("finished", Some(c), _) => c as i32,
                ("finished", None, Some(s)) => 128 + s as i32,
                ("finished", None, None) => 0,
                _ => 1,
            };
            std::process::exit(code);
        }
        std::thread::sleep(POLL);
    }
}

/// Send, or fail with why not.
fn ask(socket: &SocketArg, request: Value) -> Result<Value, Error> {
    let reply =
        client::request(&socket.socket, &request).map_err(|e| Error::Command(e.to_string()))?;
    if reply["ok"] == json!(true) {
        Ok(reply)
    } else {
        Err(Error::Command(format!(
            "{} ({})",
            reply["error"].as_str().unwrap_or("refused"),
            reply["code"].as_str().unwrap_or("error")
        )))
    }
}
