//! `gpulet cmd`: send one command to a node and wait for its result, the way an operator
//! (or a test) does it: MQTT 5 response topic and correlation data, message expiry, and
//! a signature when given a key.

use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Filter, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, Incoming, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use serde_json::{Map, Value, json};

use super::command::{self, SigningKey};
use super::{parse_url, wall_ms};

#[derive(Debug, Clone)]
pub struct SendOptions {
    pub url: String,
    pub root: String,
    pub node: String,
    pub command: String,
    /// The command's arguments (a JSON object); `id` is added when missing.
    pub args: Map<String, Value>,
    pub key: Option<SigningKey>,
    pub timeout: Duration,
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    pub credentials: Option<(String, String)>,
    /// Publish the command retained (to test that nodes refuse it).
    pub retain: bool,
}

/// How long a retained `offline` is given to turn out stale before `cmd` says so.
const OFFLINE_GRACE: Duration = Duration::from_secs(2);

/// Every result received, in order, up to the final one (`rejected`, `succeeded`,
/// `failed` or `expired`). Errors say why nothing final came.
pub async fn send(o: SendOptions) -> Result<Vec<Value>, String> {
    let (_, host, port) = parse_url(&o.url)?;
    let suffix = format!("{:08x}", getrandom::u32().unwrap_or_default());
    let client_id = format!("gpulet-cmd-{suffix}");
    let mut opts = MqttOptions::new(&client_id, host, port);
    opts.set_keep_alive(Duration::from_secs(10)).set_max_packet_size(Some(1 << 20));
    if let Some((u, p)) = &o.credentials {
        opts.set_credentials(u, p);
    }
    if let Some(tls) = &o.tls {
        opts.set_transport(Transport::Tls(TlsConfiguration::Rustls(tls.clone())));
    }
    let (client, mut eventloop) = AsyncClient::new(opts, 16);
    let reply_topic = format!("{}/_replies/{client_id}", o.root);
    let mut payload = o.args.clone();
    let id = payload.entry("id").or_insert_with(|| json!(format!("cmd-{suffix}"))).clone();
    if let Some(key) = &o.key {
        let now = wall_ms();
        payload.entry("issued_ms").or_insert(json!(now));
        payload.entry("expires_ms").or_insert(json!(now + o.timeout.as_millis() as u64));
        command::sign(key, &o.node, &o.command, &mut payload);
    }
    let topic = format!("{}/{}/cmd/{}", o.root, o.node, o.command);
    let own_results = format!("{}/{}/cmd-result/{}", o.root, o.node, o.command);
    // The node's retained status says whether it is online, offline (its Will), or was
    // never seen by this broker (none): a command to a node that is not there says so
    // instead of waiting out the timeout like a lost reply.
    let status_topic = format!("{}/{}/status", o.root, o.node);
    let mut node_status: Option<Value> = None;
    // A retained `offline` can be a moment stale (a node reconnecting, a Will published
    // late): it is believed only if no result and no `online` follow within a grace.
    let mut offline_until: Option<tokio::time::Instant> = None;
    let correlation = Bytes::from(id.to_string());
    let deadline = tokio::time::Instant::now() + o.timeout;
    let mut results = Vec::new();
    let mut sent = false;
    loop {
        let until = offline_until.map_or(deadline, |t| t.min(deadline));
        let ev = match tokio::time::timeout_at(until, eventloop.poll()).await {
            Err(_) => {
                let _ = client.disconnect().await;
                return Err(
                    if let Some(v) = node_status.as_ref().filter(|v| v["state"] == "offline") {
                        format!(
                            "node {:?} is offline (its last status, at ts_ms {}): the command waits in its session until it expires in {:?}, and runs if the node is back by then",
                            o.node, v["ts_ms"], o.timeout
                        )
                    } else if sent && node_status.is_none() {
                        format!(
                            "no node {:?} ever reported to this broker (no retained status at {status_topic}): check --node and --root",
                            o.node
                        )
                    } else if sent {
                        format!(
                            "no final result within {:?}; results so far: {results:?}",
                            o.timeout
                        )
                    } else {
                        format!("could not reach the broker at {} within {:?}", o.url, o.timeout)
                    },
                );
            }
            Ok(Err(e)) => return Err(format!("MQTT connection to {}: {e}", o.url)),
            Ok(Ok(ev)) => ev,
        };
        match ev {
            Event::Incoming(Incoming::ConnAck(_)) => {
                // The node's own result topic too: a command it could not authenticate is
                // answered only there (never on a topic the sender chose).
                client
                    .subscribe_many([
                        Filter::new(&reply_topic, QoS::AtLeastOnce),
                        Filter::new(&own_results, QoS::AtLeastOnce),
                        Filter::new(&status_topic, QoS::AtLeastOnce),
                    ])
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Event::Incoming(Incoming::SubAck(_)) if !sent => {
                let props = PublishProperties {
                    response_topic: Some(reply_topic.clone()),
                    correlation_data: Some(correlation.clone()),
                    message_expiry_interval: Some(o.timeout.as_secs().max(1) as u32),
                    ..Default::default()
                };
                let body = serde_json::to_vec(&payload).expect("JSON serialises");
                client
                    .publish_with_properties(&topic, QoS::AtLeastOnce, o.retain, body, props)
                    .await
                    .map_err(|e| e.to_string())?;
                sent = true;
            }
            Event::Incoming(Incoming::Publish(p))
                if p.topic.as_ref() == status_topic.as_bytes() =>
            {
                let Ok(v) = serde_json::from_slice::<Value>(&p.payload) else { continue };
                offline_until =
                    (v["state"] == "offline").then(|| tokio::time::Instant::now() + OFFLINE_GRACE);
                node_status = Some(v);
            }
            Event::Incoming(Incoming::Publish(p)) => {
                let corr = p.properties.as_ref().and_then(|x| x.correlation_data.as_ref());
                let Ok(v) = serde_json::from_slice::<Value>(&p.payload) else { continue };
                let ours = corr == Some(&correlation)
                    || (p.topic.as_ref() == own_results.as_bytes() && v["id"] == id);
                if !ours {
                    continue;
                }
                let status = v["status"].as_str().unwrap_or_default().to_owned();
                results.push(v);
                if matches!(status.as_str(), "rejected" | "succeeded" | "failed" | "expired") {
                    let _ = client.disconnect().await;
                    return Ok(results);
                }
            }
            _ => {}
        }
    }
}
