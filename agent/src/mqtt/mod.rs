//! Fleet reporting and control over MQTT 5. The topic contract is in `docs/mqtt.md`.
//!
//! ```text
//!  agent tick ──▶ MqttSink ──append──▶ Outbox (disk) ──▶ link task ──▶ rumqttc ──▶ broker
//!                                         ▲  commit on PUBACK  │            ▲
//!  agent loop ◀── Control (commands, describe) ◀───────────────┘   poll task ┘
//! ```
//!
//! - [`MqttSink`] writes each tick's telemetry record and events into the [`Outbox`];
//!   the agent never waits on the network.
//! - The link and poll tasks (`link.rs`) own the connection; commands reach the agent
//!   through its control channel and are executed between ticks, by the loop.
//! - Files under `state_dir`: `inc` (the incarnation counter), `outbox/`, `command-ids`
//!   (ids seen, for exactly-once), `desired.json` (what commands set, restored at start).

pub mod command;
mod link;
pub mod outbox;
pub mod send;
pub mod watch;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::LastWill;
use rumqttc::v5::{AsyncClient, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc, oneshot};
use tracing::{error, warn};

use crate::agent::{Control, Desired};
use crate::config::{ConfigError, ConfigErrors, MqttConfig};
use crate::telemetry::{Record, Sink, SinkError};
use link::{Ev, Link, LinkSettings, Poller};
use outbox::{Class, DataLoss, Outbox, OutboxConfig, OutboxStats};

/// The topics of one node (see `docs/mqtt.md`).
#[derive(Debug, Clone)]
pub struct Topics {
    pub root: String,
    pub node: String,
}

impl Topics {
    fn at(&self, leaf: &str) -> String {
        format!("{}/{}/{leaf}", self.root, self.node)
    }
    pub fn status(&self) -> String {
        self.at("status")
    }
    pub fn birth(&self) -> String {
        self.at("birth")
    }
    pub fn telemetry(&self) -> String {
        self.at("telemetry")
    }
    pub fn event(&self, kind: &str) -> String {
        self.at(&format!("events/{kind}"))
    }
    pub fn state(&self, key: &str) -> String {
        self.at(&format!("state/{key}"))
    }
    pub fn command(&self, name: &str) -> String {
        self.at(&format!("cmd/{name}"))
    }
    pub fn command_filter(&self) -> String {
        self.at("cmd/+")
    }
    pub fn cmd_result(&self, name: &str) -> String {
        self.at(&format!("cmd-result/{name}"))
    }
}

/// The `status` payload.
pub fn status_payload(state: &str, inc: u64, ts_ms: u64) -> String {
    json!({"state": state, "inc": inc, "ts_ms": ts_ms}).to_string()
}

pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The link's own numbers, published in every telemetry record as `mqtt`.
#[derive(Debug, Clone, Copy, Default, Serialize, serde::Deserialize)]
pub struct MqttStats {
    pub connected: bool,
    pub inc: u64,
    /// Records waiting in the outbox, and their bytes.
    pub outbox_depth: u64,
    pub outbox_bytes: u64,
    /// Telemetry records the outbox bound dropped, since start.
    pub dropped: u64,
    /// Connections after the first, since start.
    pub reconnects: u64,
    /// Backlog records not yet replayed.
    pub replay_lag: u64,
    /// Records the broker acknowledged, since start.
    pub published: u64,
    /// Publishes the broker refused (negative PUBACK), since start.
    pub refused: u64,
    pub commands_accepted: u64,
    pub commands_rejected: u64,
}

/// What the sink, the link and the poll task share.
pub(crate) struct Shared {
    outbox: Mutex<Outbox>,
    notify: Notify,
    stats: Mutex<MqttStats>,
    topics: Topics,
    inc: AtomicU64,
    inc_path: PathBuf,
}

impl Shared {
    fn inc(&self) -> u64 {
        self.inc.load(Ordering::SeqCst)
    }

    /// The next incarnation, persisted before it is used.
    fn next_inc(&self) -> u64 {
        let inc = self.inc.fetch_add(1, Ordering::SeqCst) + 1;
        if let Err(e) = crate::state::atomic_write(&self.inc_path, inc.to_string().as_bytes()) {
            error!(path = %self.inc_path.display(), error = %e, "cannot persist the incarnation counter; a restart may reuse it");
        }
        self.stats.lock().expect("stats").inc = inc;
        inc
    }

    /// Append a message with `inc` and `seq` added, durably, and wake the link.
    fn append(&self, class: Class, topic: &str, correlation: Option<&[u8]>, mut body: Value) {
        let mut outbox = self.outbox.lock().expect("outbox");
        body["inc"] = json!(self.inc());
        body["seq"] = json!(outbox.next_seq());
        let r = outbox
            .append(class, wall_ms(), topic, correlation, body.to_string().as_bytes())
            .and_then(|_| outbox.flush());
        drop(outbox);
        if let Err(e) = r {
            error!(error = %e, topic, "cannot write to the outbox; this message is lost");
        }
        self.notify.notify_one();
    }

    /// An event of the link itself (`kind` in `body`).
    fn event(&self, mut body: Value) {
        let kind = body["kind"].as_str().unwrap_or("mqtt").to_owned();
        body["node"] = json!(self.topics.node);
        body["ts_ms"] = json!(wall_ms());
        self.append(Class::Critical, &self.topics.event(&kind), None, body);
    }
}

/// `[mqtt]` resolved: files read, URL parsed, keys decoded.
#[derive(Debug)]
pub struct Settings {
    pub topics: Topics,
    pub client_id: String,
    pub host: String,
    pub port: u16,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub credentials: Option<(String, String)>,
    pub keep_alive: Duration,
    pub reconnect_max: Duration,
    pub session_expiry: Duration,
    pub replay_rate: u32,
    pub inflight: usize,
    pub state_dir: PathBuf,
    pub outbox: OutboxConfig,
    pub commands: Option<command::Policy>,
    pub command_id_window: Duration,
}

impl Settings {
    /// Resolve `[mqtt]` (validated) for `node`; paths are relative to `base_dir`.
    pub fn new(cfg: &MqttConfig, node: &str, base_dir: &Path) -> Result<Settings, ConfigErrors> {
        let mut errors = Vec::new();
        let (tls, host, port) = match parse_url(&cfg.url) {
            Ok(x) => x,
            Err(e) => return Err(ConfigError::invalid("mqtt.url", e).into()),
        };
        let read = |key: &str, p: &Path, errors: &mut Vec<ConfigError>| {
            std::fs::read(base_dir.join(p))
                .map_err(|e| {
                    errors.push(ConfigError::invalid(
                        key,
                        format!("cannot read {}: {e}", p.display()),
                    ))
                })
                .ok()
        };
        let password =
            cfg.password_file.as_ref().and_then(|p| read("mqtt.password_file", p, &mut errors));
        let credentials = cfg.username.clone().map(|u| {
            (
                u,
                password
                    .map(|p| String::from_utf8_lossy(&p).trim_end_matches(['\n', '\r']).to_owned())
                    .unwrap_or_default(),
            )
        });
        let tls = if tls {
            let ca = cfg.ca_file.as_ref().and_then(|p| read("mqtt.ca_file", p, &mut errors));
            let cert = cfg.cert_file.as_ref().and_then(|p| read("mqtt.cert_file", p, &mut errors));
            let key = cfg.key_file.as_ref().and_then(|p| read("mqtt.key_file", p, &mut errors));
            match tls_config(ca.as_deref(), cert.as_deref().zip(key.as_deref())) {
                Ok(c) => Some(Arc::new(c)),
                Err((k, e)) => {
                    errors.push(ConfigError::invalid(k, e));
                    None
                }
            }
        } else {
            None
        };
        let mut keys = Vec::new();
        for (i, k) in cfg.commands.public_keys.iter().enumerate() {
            match command::verifying_key(k) {
                Ok(k) => keys.push(k),
                Err(e) => {
                    errors.push(ConfigError::invalid(format!("mqtt.commands.public_keys[{i}]"), e))
                }
            }
        }
        for (i, p) in cfg.commands.public_key_files.iter().enumerate() {
            let key = format!("mqtt.commands.public_key_files[{i}]");
            if let Some(text) = read(&key, p, &mut errors) {
                match command::verifying_key(&String::from_utf8_lossy(&text)) {
                    Ok(k) => keys.push(k),
                    Err(e) => errors.push(ConfigError::invalid(key, e)),
                }
            }
        }
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        let state_dir = base_dir.join(&cfg.state_dir);
        Ok(Settings {
            topics: Topics { root: cfg.root.clone(), node: node.to_owned() },
            client_id: cfg.client_id.clone().unwrap_or_else(|| format!("gpulet-{node}")),
            host,
            port,
            tls,
            credentials,
            keep_alive: cfg.keep_alive,
            reconnect_max: cfg.reconnect_max,
            session_expiry: cfg.session_expiry,
            replay_rate: cfg.replay_rate,
            inflight: cfg.inflight as usize,
            outbox: OutboxConfig {
                dir: state_dir.join("outbox"),
                max_bytes: cfg.outbox.max_kib << 10,
                max_age_ms: cfg.outbox.max_age.as_millis() as u64,
                segment_bytes: cfg.outbox.segment_kib << 10,
                fsync: cfg.outbox.fsync,
            },
            state_dir,
            commands: cfg.commands.enabled.then_some(command::Policy {
                max_payload: (cfg.commands.max_payload_kib as usize) << 10,
                keys,
                require_signed: cfg.commands.require_signed,
                max_validity_ms: cfg.commands.max_validity.as_millis() as u64,
                max_skew_ms: 30_000,
            }),
            command_id_window: cfg.commands.id_window,
        })
    }
}

pub use crate::config::parse_url;

pub fn tls_config(
    ca: Option<&[u8]>,
    client: Option<(&[u8], &[u8])>,
) -> Result<rustls::ClientConfig, (&'static str, String)> {
    let mut roots = rustls::RootCertStore::empty();
    let Some(ca) = ca else {
        return Err((
            "mqtt.ca_file",
            "missing; mqtts:// needs the CA certificate (PEM) that signed the broker's".into(),
        ));
    };
    for cert in rustls_pemfile::certs(&mut &ca[..]) {
        let cert = cert.map_err(|e| ("mqtt.ca_file", format!("not a PEM certificate: {e}")))?;
        roots.add(cert).map_err(|e| ("mqtt.ca_file", format!("unusable CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(("mqtt.ca_file", "holds no PEM certificate".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ("mqtt.url", e.to_string()))?
        .with_root_certificates(roots);
    match client {
        None => Ok(builder.with_no_client_auth()),
        Some((cert, key)) => {
            let certs = rustls_pemfile::certs(&mut &cert[..])
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ("mqtt.cert_file", format!("not a PEM certificate: {e}")))?;
            let key = rustls_pemfile::private_key(&mut &key[..])
                .map_err(|e| ("mqtt.key_file", format!("not a PEM private key: {e}")))?
                .ok_or(("mqtt.key_file", "holds no PEM private key".to_owned()))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| ("mqtt.cert_file", format!("certificate and key do not fit: {e}")))
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("MQTT state folder {path}: {error}")]
    State { path: String, error: std::io::Error },
    #[error(transparent)]
    Outbox(#[from] outbox::OutboxError),
}

/// The running link, to stop it cleanly.
pub struct Mqtt {
    stop: oneshot::Sender<oneshot::Sender<()>>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Mqtt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mqtt").field("topics", &self.shared.topics).finish_non_exhaustive()
    }
}

/// What [`Mqtt::start`] gives: the link, the sink for the agent, and what commands set
/// before the last stop (to restore).
pub struct Started {
    pub mqtt: Mqtt,
    pub sink: MqttSink,
    /// What commands had set before a restart; `Err`: the file that holds it cannot be
    /// read (to be set aside and reported by the agent).
    pub desired: Result<Option<Desired>, (PathBuf, String)>,
}

impl Mqtt {
    /// Open the state, start the poll and link tasks (on the current tokio runtime).
    /// `control` reaches the agent; the agent tells `changed` when its desired state or
    /// birth changed (a command from any transport, a reload): the link keeps the desired
    /// state and publishes the birth again.
    pub fn start(
        s: Settings,
        control: mpsc::Sender<Control>,
        changed: Arc<Notify>,
    ) -> Result<Started, MqttError> {
        let state_err = |p: &Path| {
            let path = p.display().to_string();
            move |error| MqttError::State { path, error }
        };
        // The directory and its ancestors must be the agent's alone (`state::check_dir`):
        // what is kept here decides what the node publishes and which commands ran.
        crate::state::check_dir(&s.state_dir)
            .map_err(|e| state_err(&s.state_dir)(std::io::Error::other(e)))?;
        let inc_path = s.state_dir.join("inc");
        let inc = match std::fs::read_to_string(&inc_path) {
            // Unreadable: go on from the wall clock in ms, above any count this node can
            // have reached, so that `inc` never goes back.
            Ok(t) => t.trim().parse().unwrap_or_else(|_| {
                warn!(path = %inc_path.display(), "the incarnation file is unreadable; going on from the clock");
                wall_ms()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(state_err(&inc_path)(e)),
        };
        let fsync = s.outbox.fsync;
        let outbox = Outbox::open(s.outbox.clone())?;
        let shared = Arc::new(Shared {
            outbox: Mutex::new(outbox),
            notify: Notify::new(),
            stats: Mutex::new(MqttStats::default()),
            topics: s.topics.clone(),
            inc: AtomicU64::new(inc),
            inc_path,
        });
        let inc = shared.next_inc();
        let desired_path = s.state_dir.join("desired.json");
        let desired = Desired::load(&desired_path).map_err(|e| (desired_path.clone(), e));
        let seen = match &s.commands {
            Some(_) => {
                let path = s.state_dir.join("command-ids");
                Some(
                    command::SeenIds::open(
                        &path,
                        s.command_id_window.as_millis() as u64,
                        100_000,
                        fsync,
                        wall_ms(),
                    )
                    .map_err(state_err(&path))?,
                )
            }
            None => None,
        };

        let mut opts = MqttOptions::new(&s.client_id, &s.host, s.port);
        opts.set_keep_alive(s.keep_alive)
            .set_clean_start(false)
            .set_session_expiry_interval(Some(s.session_expiry.as_secs() as u32))
            .set_manual_acks(true)
            // Commands larger than the limit are rejected by the link with a reason; a
            // packet above rumqttc's own limit would drop the connection (pitfall 6).
            .set_max_packet_size(Some(4 << 20))
            // rumqttc sizes its per-connection tables by this (64 Ki entries by default).
            .set_outgoing_inflight_upper_limit(s.inflight as u16)
            .set_last_will(LastWill::new(
                s.topics.status(),
                status_payload("offline", inc, wall_ms()),
                QoS::AtLeastOnce,
                true,
                None,
            ));
        if let Some((u, p)) = &s.credentials {
            opts.set_credentials(u, p);
        }
        if let Some(tls) = &s.tls {
            opts.set_transport(Transport::Tls(TlsConfiguration::Rustls(tls.clone())));
        }
        // Room for the window, status, birth, state, acks and results.
        let (client, eventloop) = AsyncClient::new(opts, s.inflight + 256);
        let fifo = Arc::default();
        let (tx, rx) = mpsc::unbounded_channel::<Ev>();
        let (stop, stop_rx) = oneshot::channel();
        tokio::spawn(
            Poller {
                eventloop,
                fifo: Arc::clone(&fifo),
                shared: shared.clone(),
                tx,
                reconnect_max: s.reconnect_max,
            }
            .run(),
        );
        tokio::spawn(
            Link {
                client,
                fifo,
                shared: shared.clone(),
                rx,
                control,
                settings: LinkSettings {
                    inflight: s.inflight,
                    replay_rate: s.replay_rate,
                    commands: s.commands,
                    seen,
                    desired_path,
                },
                stop: stop_rx,
                ever_connected: false,
                changed,
                refused_topics: Default::default(),
                max_packet: None,
                suspect: None,
            }
            .run(),
        );
        let sink = MqttSink { shared: shared.clone(), loss: None, loss_reported_ms: None };
        Ok(Started { mqtt: Mqtt { stop, shared }, sink, desired })
    }

    /// Drain the outbox for up to 2 s, publish `offline`, save the outbox state,
    /// disconnect. Returns the final numbers (what is still pending goes at the next start).
    pub async fn stop(self) -> MqttStats {
        let (done, wait) = oneshot::channel();
        if self.stop.send(done).is_ok() {
            let _ = wait.await;
        }
        current_stats(&self.shared)
    }

    pub fn stats(&self) -> MqttStats {
        current_stats(&self.shared)
    }

    /// The link's numbers, readable from other tasks (the socket, `/metrics`).
    pub fn stats_source(&self) -> StatsSource {
        StatsSource(self.shared.clone())
    }

    /// Messages ever put through this node's outbox (its next seq).
    pub fn appended(&self) -> u64 {
        self.shared.outbox.lock().expect("outbox").next_seq()
    }
}

/// See [`Mqtt::stats_source`].
#[derive(Clone)]
pub struct StatsSource(Arc<Shared>);

impl StatsSource {
    pub fn get(&self) -> MqttStats {
        current_stats(&self.0)
    }
}

impl std::fmt::Debug for StatsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.get().fmt(f)
    }
}

fn current_stats(shared: &Shared) -> MqttStats {
    let o: OutboxStats = shared.outbox.lock().expect("outbox").stats();
    let mut st = *shared.stats.lock().expect("stats");
    st.outbox_depth = o.depth;
    st.outbox_bytes = o.bytes;
    st.dropped = o.dropped;
    st
}

/// The agent's sink into the outbox: one `telemetry` message and one `events/<kind>`
/// message per event, each tick, synced to disk together.
pub struct MqttSink {
    shared: Arc<Shared>,
    /// Drops not reported yet, and when the last report was (record clock, ms).
    loss: Option<DataLoss>,
    loss_reported_ms: Option<u64>,
}

/// At most one `data-loss` event per this long.
const LOSS_EVENT_MS: u64 = 60_000;

impl MqttSink {
    fn report_loss(
        &mut self,
        outbox: &mut Outbox,
        node: &str,
        ts_ms: u64,
        inc: u64,
    ) -> Result<(), outbox::OutboxError> {
        let Some(loss) = self.loss.take() else { return Ok(()) };
        let v = json!({
            "kind": "data-loss", "node": node, "ts_ms": ts_ms, "inc": inc, "seq": outbox.next_seq(),
            "first_seq": loss.first_seq, "last_seq": loss.last_seq, "records": loss.records, "bytes": loss.bytes,
            "reason": loss.reason,
        });
        outbox.append(
            Class::Critical,
            ts_ms,
            &self.shared.topics.event("data-loss"),
            None,
            v.to_string().as_bytes(),
        )?;
        self.loss_reported_ms = Some(ts_ms);
        Ok(())
    }
}

impl Sink for MqttSink {
    fn status(&self) -> Option<String> {
        // (No counts: the line is sent to systemd whenever it changes.)
        let connected = self.shared.stats.lock().expect("stats").connected;
        Some(if connected { "broker connected" } else { "broker not connected" }.into())
    }

    /// Report drops not reported yet, before the link's last drain.
    fn close(&mut self) {
        if self.loss.is_none() {
            return;
        }
        let sh = self.shared.clone();
        let mut outbox = sh.outbox.lock().expect("outbox");
        let r = self
            .report_loss(&mut outbox, &sh.topics.node, wall_ms(), sh.inc())
            .and_then(|()| outbox.flush());
        if let Err(e) = r {
            error!(error = %e, "cannot write the last data-loss event");
        }
        drop(outbox);
        sh.notify.notify_one();
    }

    fn emit(&mut self, record: &Record<'_>) -> Result<(), SinkError> {
        let sh = self.shared.clone();
        let sh = &*sh;
        let stats = current_stats(sh);
        let inc = sh.inc();
        let mut outbox = sh.outbox.lock().expect("outbox");
        let io = |e: outbox::OutboxError| SinkError::Write(std::io::Error::other(e.to_string()));
        for event in record.events {
            let mut v = serde_json::to_value(event).expect("events serialise");
            let kind = v["kind"].as_str().unwrap_or("event").to_owned();
            v["node"] = json!(record.node);
            v["ts_ms"] = json!(record.ts_ms);
            v["inc"] = json!(inc);
            v["seq"] = json!(outbox.next_seq());
            outbox
                .append(
                    Class::Critical,
                    record.ts_ms,
                    &sh.topics.event(&kind),
                    None,
                    v.to_string().as_bytes(),
                )
                .map_err(io)?;
        }
        let mut v = serde_json::to_value(record).expect("records serialise");
        v["tick"] = v["seq"].take();
        v["inc"] = json!(inc);
        v["seq"] = json!(outbox.next_seq());
        v["mqtt"] = json!(stats);
        outbox
            .append(
                Class::Telemetry,
                record.ts_ms,
                &sh.topics.telemetry(),
                None,
                v.to_string().as_bytes(),
            )
            .map_err(io)?;
        if let Some(loss) = outbox.enforce_bounds(record.ts_ms).map_err(io)? {
            warn!(
                first_seq = loss.first_seq,
                last_seq = loss.last_seq,
                records = loss.records,
                reason = loss.reason,
                "outbox full: oldest telemetry dropped"
            );
            self.loss = Some(match self.loss.take() {
                None => loss,
                Some(acc) => DataLoss {
                    first_seq: acc.first_seq.min(loss.first_seq),
                    last_seq: acc.last_seq.max(loss.last_seq),
                    records: acc.records + loss.records,
                    bytes: acc.bytes + loss.bytes,
                    reason: loss.reason,
                },
            });
        }
        // One data-loss event per minute at most, covering every drop since the last:
        // at the bound, a drop happens every tick, and each event is kept (critical).
        let due =
            self.loss_reported_ms.is_none_or(|t| record.ts_ms.saturating_sub(t) >= LOSS_EVENT_MS);
        if due && self.loss.is_some() {
            self.report_loss(&mut outbox, record.node, record.ts_ms, inc).map_err(io)?;
        }
        outbox.flush().map_err(io)?;
        drop(outbox);
        sh.notify.notify_one();
        Ok(())
    }
}

/// The longest topic MQTT encodes (a 16-bit length).
const MAX_TOPIC: usize = 65_535;

/// Whether `t` is a topic one can publish to, at most `max_len` bytes: every topic gpulet
/// publishes to or takes from a message goes through here. Not empty, no wildcards, not
/// a broker topic (`$…`), and only characters MQTT's UTF-8 rules allow (MQTT 5 §1.5.4):
/// no U+0000, no control characters (U+0001–U+001F, U+007F–U+009F) and no
/// noncharacters (U+FDD0–U+FDEF, and U+xFFFE/U+xFFFF of every plane). Brokers drop the
/// connection of a client that publishes to such a topic (Mosquitto does), so one record
/// addressed there would cut the node off at every reconnect.
pub fn valid_topic(t: &str, max_len: usize) -> bool {
    !t.is_empty()
        && t.len() <= max_len
        && !t.starts_with('$')
        && !t.contains(['+', '#'])
        && t.chars().all(mqtt_char)
}

/// Whether `c` may appear in an MQTT UTF-8 string (see [`valid_topic`]).
pub fn mqtt_char(c: char) -> bool {
    let u = c as u32;
    !(c.is_control() || (0xFDD0..=0xFDEF).contains(&u) || (u & 0xFFFE) == 0xFFFE)
}
