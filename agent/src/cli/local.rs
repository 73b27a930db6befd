//! The local commands: `set-budget`, `set-limit`, `reload`, `clear-health`. Each is the
//! same request as the MQTT command of the same meaning, sent over the control socket
//! (`docs/socket.md`); the agent checks it as it checks a fleet command, and only root,
//! the agent's user or `socket.admin_group` may make it. Exit 0 if it succeeded, 1 if it
//! was refused or failed.

use std::path::PathBuf;

use clap::Args as ClapArgs;
use gpulet::error::Error;
use gpulet::service::client;
use serde_json::{Value, json};

/// `--socket PATH`, shared by every command that talks to a running agent.
#[derive(Debug, Clone, ClapArgs)]
pub struct SocketArg {
    /// The agent's control socket (default: the service's, in its runtime directory).
    #[arg(long, value_name = "PATH", default_value = gpulet::config::DEFAULT_SOCKET)]
    pub socket: PathBuf,
}

/// Watts, or `none` to clear.
#[derive(Debug, Clone, Copy)]
pub struct Watts(Option<f64>);

fn watts(s: &str) -> Result<Watts, String> {
    if s == "none" {
        return Ok(Watts(None));
    }
    let w: f64 = s.parse().map_err(|_| format!("{s:?} is not a number of watts, or none"))?;
    gpulet::control::check_watts(w).map(|w| Watts(Some(w)))
}

#[derive(Debug, ClapArgs)]
pub struct SetBudget {
    /// The node power budget in watts, or `none` to return to the configured one.
    #[arg(value_name = "WATTS", value_parser = watts)]
    pub watts: Watts,
    #[command(flatten)]
    pub socket: SocketArg,
}

#[derive(Debug, ClapArgs)]
pub struct SetLimit {
    /// The GPU's index.
    #[arg(value_name = "GPU")]
    pub gpu: u32,
    /// Its limit in watts (within its bounds), or `none` to give it back to the policy.
    #[arg(value_name = "WATTS", value_parser = watts)]
    pub watts: Watts,
    #[command(flatten)]
    pub socket: SocketArg,
}

#[derive(Debug, ClapArgs)]
pub struct ClearHealth {
    /// The GPU's index.
    #[arg(value_name = "GPU")]
    pub gpu: u32,
    #[command(flatten)]
    pub socket: SocketArg,
}

pub fn set_budget(a: SetBudget) -> Result<(), Error> {
    send(&a.socket, json!({"op": "set-power-budget", "watts": a.watts.0}))
}

pub fn set_limit(a: SetLimit) -> Result<(), Error> {
    send(&a.socket, json!({"op": "set-power-limit", "gpu": a.gpu, "watts": a.watts.0}))
}

pub fn reload(a: SocketArg) -> Result<(), Error> {
    send(&a, json!({"op": "reload-plugins"}))
}

pub fn clear_health(a: ClearHealth) -> Result<(), Error> {
    send(&a.socket, json!({"op": "clear-health", "gpu": a.gpu}))
}

/// Send, print what was done, or fail with why not.
fn send(socket: &SocketArg, request: Value) -> Result<(), Error> {
    let reply =
        client::request(&socket.socket, &request).map_err(|e| Error::Command(e.to_string()))?;
    if reply["ok"] == json!(true) {
        println!("{}", reply["detail"].as_str().unwrap_or("done"));
        Ok(())
    } else {
        Err(Error::Command(format!(
            "{} ({})",
            reply["error"].as_str().unwrap_or("refused"),
            reply["code"].as_str().unwrap_or("error")
        )))
    }
}
