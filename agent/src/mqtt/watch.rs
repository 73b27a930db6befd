//! A read-only consumer of the fleet's topics, for `gpulet top`: subscribes (QoS 0, a
//! clean session: a viewer needs the present, not a backlog) to every node's status,
//! birth, telemetry and events under a root, and hands each message over. It reconnects
//! by itself; a viewer never publishes.

use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Filter;
use rumqttc::v5::{AsyncClient, Event, EventLoop, Incoming, MqttOptions};

use super::parse_url;

/// The fleet's topics under a root, as they arrive.
pub struct Watch {
    client: AsyncClient,
    eventloop: EventLoop,
    filters: Vec<Filter>,
    pub connected: bool,
    /// The last connection error, for the viewer to show.
    pub error: Option<String>,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch").field("connected", &self.connected).finish_non_exhaustive()
    }
}

impl Watch {
    /// `url`: `mqtt://host[:port]` (TLS through `tls`); `root`: the topic root.
    pub fn new(
        url: &str,
        root: &str,
        tls: Option<std::sync::Arc<rustls::ClientConfig>>,
        credentials: Option<(String, String)>,
    ) -> Result<Watch, String> {
        let (_, host, port) = parse_url(url)?;
        let id = format!("gpulet-top-{:08x}", getrandom::u32().unwrap_or_default());
        let mut opts = MqttOptions::new(id, host, port);
        // Telemetry of a large node is a few KiB; a birth of 8 GPUs with curves more.
        opts.set_keep_alive(Duration::from_secs(30)).set_max_packet_size(Some(1 << 20));
        if let Some((u, p)) = credentials {
            opts.set_credentials(u, p);
        }
        if let Some(tls) = tls {
            opts.set_transport(rumqttc::Transport::Tls(rumqttc::TlsConfiguration::Rustls(tls)));
        }
        let (client, eventloop) = AsyncClient::new(opts, 64);
        let filters = ["status", "birth", "telemetry", "events/#"]
            .iter()
            .map(|t| Filter::new(format!("{root}/+/{t}"), QoS::AtMostOnce))
            .collect();
        Ok(Watch { client, eventloop, filters, connected: false, error: None })
    }

    /// The next message (topic, payload). Connection errors are kept in `error` and
    /// retried every half second; this returns only with a message.
    pub async fn next(&mut self) -> (Bytes, Bytes) {
        loop {
            match self.eventloop.poll().await {
                Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                    self.connected = true;
                    self.error = None;
                    let _ = self.client.subscribe_many(self.filters.clone()).await;
                }
                Ok(Event::Incoming(Incoming::Publish(p))) => return (p.topic, p.payload),
                Ok(_) => {}
                Err(e) => {
                    self.connected = false;
                    self.error = Some(e.to_string());
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }
}
