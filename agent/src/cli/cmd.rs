//! `gpulet cmd`: send a fleet command over MQTT and print its results.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args as ClapArgs;
use gpulet::config::{ConfigError, ConfigErrors};
use gpulet::error::Error;
use gpulet::mqtt;

use super::block_on;

/// How to reach the fleet's broker: shared by `cmd` and `top`.
#[derive(Debug, ClapArgs)]
pub struct BrokerArgs {
    /// The broker: mqtt://HOST[:PORT] or mqtts://HOST[:PORT].
    #[arg(long, value_name = "URL")]
    pub broker: String,
    #[arg(long, default_value = "gpulet/v1", value_name = "ROOT")]
    pub root: String,
    /// For mqtts://: the CA certificate (PEM).
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    #[arg(long, value_name = "NAME")]
    pub username: Option<String>,
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
}

type Tls = Option<Arc<rustls::ClientConfig>>;

impl BrokerArgs {
    /// The TLS configuration and the credentials, from the files named.
    pub fn connection(&self) -> Result<(Tls, Option<(String, String)>), Error> {
        let tls = match &self.ca_file {
            Some(p) => Some(Arc::new(
                mqtt::tls_config(Some(&read("--ca-file", p)?), None)
                    .map_err(|(_, e)| usage("--ca-file", e))?,
            )),
            None => None,
        };
        let password = match &self.password_file {
            Some(p) => String::from_utf8_lossy(&read("--password-file", p)?).trim_end().to_owned(),
            None => String::new(),
        };
        Ok((tls, self.username.clone().map(|u| (u, password))))
    }
}

fn usage(k: &str, e: String) -> Error {
    Error::from(ConfigErrors(vec![ConfigError::invalid(k, e)]))
}

fn read(k: &str, p: &PathBuf) -> Result<Vec<u8>, Error> {
    std::fs::read(p).map_err(|e| usage(k, format!("cannot read {}: {e}", p.display())))
}

#[derive(Debug, ClapArgs)]
pub struct Args {
    #[command(flatten)]
    pub broker: BrokerArgs,
    #[arg(long, value_name = "NODE")]
    pub node: String,
    /// The command, with its arguments in --args:
    ///   set-power-budget  {"watts": W}           node budget; null: back to the configured one
    ///   set-power-limit   {"gpu": I, "watts": W} one GPU's limit; null: back to its policy
    ///   clear-health      {"gpu": I}             clear a GPU's sticky degraded state
    ///   reload-plugins    {}                     reload the plugins from the config file
    ///   rebirth           {}                     publish the birth and state again
    ///   ping              {}                     answer, changing nothing
    ///   submit-job        {"user": U, "command": [..], ...}  queue a job (docs/jobs.md)
    ///   cancel-job        {"job": N}             cancel a job
    /// Results arrive on <ROOT>/_replies/<client id> (the ACL must let this client read
    /// there and the nodes write there; docs/mqtt.md).
    #[arg(value_name = "COMMAND", verbatim_doc_comment)]
    pub command: String,
    /// The arguments, a JSON object, e.g. '{"watts": 4000}'.
    #[arg(long, default_value = "{}", value_name = "JSON")]
    pub args: String,
    /// Sign with this private key (from `gpulet keygen`).
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    #[arg(long, default_value = "10s", value_name = "DURATION")]
    pub timeout: humantime::Duration,
    /// Publish the command retained (nodes refuse it; for testing that they do).
    #[arg(long, hide = true)]
    pub retain: bool,
}

pub fn run(args: Args) -> Result<(), Error> {
    let Args { broker, node, command, args, key, timeout, retain } = args;
    let args: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&args)
        .map_err(|e| usage("--args", format!("not a JSON object: {e}")))?;
    let key = match &key {
        Some(p) => Some(
            mqtt::command::signing_key(&String::from_utf8_lossy(&read("--key", p)?))
                .map_err(|e| usage("--key", e))?,
        ),
        None => None,
    };
    let (tls, credentials) = broker.connection()?;
    let opts = mqtt::send::SendOptions {
        url: broker.broker,
        root: broker.root,
        node,
        command,
        args,
        key,
        timeout: timeout.into(),
        tls,
        credentials,
        retain,
    };
    let results = block_on(mqtt::send::send(opts))?.map_err(Error::Command)?;
    for r in &results {
        println!("{r}");
    }
    match results.last().and_then(|r| r["status"].as_str()) {
        Some("succeeded") => Ok(()),
        other => Err(Error::Command(format!(
            "the command did not succeed ({})",
            other.unwrap_or("no result")
        ))),
    }
}
