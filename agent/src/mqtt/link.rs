//! The connection to the broker: two tasks.
//!
//! - The **poll task** owns rumqttc's `EventLoop` and does nothing but poll it (rumqttc
//!   pitfall 1), forward what happens to the link task over an unbounded channel, and back
//!   off (jittered, exponential) after an error (pitfall 2). It pairs each outgoing
//!   `Publish(pkid)` with the head of a FIFO of tags that the link task fills in the
//!   order it publishes (pitfall 5: `publish()` returns no packet id), so that a PUBACK
//!   names the outbox record it acknowledges. After an error it drops everything
//!   rumqttc would retransmit on its own (pitfall 4: its memory queue is not durable;
//!   the outbox is), increments `inc`, and re-arms the Last Will with it.
//! - The **link task** publishes: status, birth and retained state after every CONNACK
//!   (a restarted broker may have lost them; pitfall 3: subscriptions are re-made too),
//!   then outbox records, live first and the backlog from before the connection at a
//!   limited rate, with at most `inflight` unacknowledged. It commits a record on its
//!   PUBACK, reports negative reason codes (pitfall 9), takes commands (acknowledged
//!   only once their id is on disk: pitfall 8), and saves the outbox state every 5 s.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{
    ConnectReturnCode, Filter, LastWill, PubAckReason, Publish, PublishProperties,
    SubscribeReasonCode,
};
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, Incoming};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};

use super::command::{self, Accepted, Command, Envelope, SeenIds};
use super::outbox::Class;
use super::{MAX_TOPIC, Shared, status_payload, valid_topic, wall_ms};
use crate::agent::{Control, Description, Refusal};

/// What a publish is, to the link task when its PUBACK comes.
#[derive(Debug, Clone)]
pub(super) enum Tag {
    /// An outbox record: committed on PUBACK.
    Record(u64),
    /// Status, birth or state: nothing to commit; `topic` for reporting a refusal.
    Plain(String),
}

/// What the poll task tells the link task.
#[derive(Debug)]
pub(super) enum Ev {
    /// `max_packet`: the broker's maximum packet size, if it sets one.
    Connected {
        session_present: bool,
        max_packet: Option<u32>,
    },
    Acked {
        tag: Tag,
        reason: PubAckReason,
    },
    SubAck {
        refused: Vec<String>,
    },
    Command(Publish),
    Disconnected {
        error: String,
    },
}

/// The poll task's side of the FIFO; the link task holds the lock while it publishes so
/// that the order in the FIFO is the order rumqttc sees.
pub(super) type Fifo = Arc<Mutex<VecDeque<Tag>>>;

pub(super) struct Poller {
    pub eventloop: EventLoop,
    pub fifo: Fifo,
    pub shared: Arc<Shared>,
    pub tx: mpsc::UnboundedSender<Ev>,
    pub reconnect_max: Duration,
}

impl Poller {
    pub async fn run(mut self) {
        let mut pkids: HashMap<u16, Tag> = HashMap::new();
        let mut backoff = Duration::ZERO;
        let mut connected_at: Option<Instant> = None;
        let mut quick_drops = 0u32;
        loop {
            match self.eventloop.poll().await {
                Ok(Event::Incoming(Incoming::ConnAck(ack))) => {
                    connected_at = Some(Instant::now());
                    let max_packet = ack.properties.as_ref().and_then(|p| p.max_packet_size);
                    let _ = self
                        .tx
                        .send(Ev::Connected { session_present: ack.session_present, max_packet });
                }
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    let tag = self.fifo.lock().expect("fifo").pop_front();
                    match tag {
                        Some(tag) => {
                            pkids.insert(pkid, tag);
                        }
                        None => warn!(
                            pkid,
                            "an outgoing publish with no tag; its PUBACK will not be paired"
                        ),
                    }
                }
                Ok(Event::Incoming(Incoming::PubAck(ack))) => {
                    if let Some(tag) = pkids.remove(&ack.pkid) {
                        let _ = self.tx.send(Ev::Acked { tag, reason: ack.reason });
                    }
                }
                Ok(Event::Incoming(Incoming::SubAck(ack))) => {
                    let refused = ack
                        .return_codes
                        .iter()
                        .filter(|c| !matches!(c, SubscribeReasonCode::Success(_)))
                        .map(|c| format!("{c:?}"))
                        .collect();
                    let _ = self.tx.send(Ev::SubAck { refused });
                }
                Ok(Event::Incoming(Incoming::Publish(p))) => {
                    let _ = self.tx.send(Ev::Command(p));
                }
                // The link asked for it: a clean stop.
                Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
                Ok(Event::Incoming(Incoming::Disconnect(d))) => {
                    warn!(reason = ?d.reason_code, "the broker sent DISCONNECT");
                }
                Ok(_) => {}
                Err(ConnectionError::RequestsDone) => return,
                Err(e) => {
                    // Drop what rumqttc would resend by itself: the outbox resends it.
                    {
                        let mut fifo = self.fifo.lock().expect("fifo");
                        self.eventloop.clean();
                        self.eventloop.pending.clear();
                        // Events of the lost connection not yet returned (an outgoing
                        // publish among them would take a tag of the next connection).
                        self.eventloop.state.events.clear();
                        self.eventloop.state.collision = None;
                        fifo.clear();
                    }
                    pkids.clear();
                    let error = describe(&e);
                    let was_up = connected_at.take();
                    if let Some(t) = was_up {
                        warn!(%error, "MQTT connection lost; reconnecting");
                        // A second agent with our client id takes the session over and
                        // both flap (rumqttc pitfall 12).
                        if t.elapsed() < Duration::from_secs(5) {
                            quick_drops += 1;
                            if quick_drops == 3 {
                                error!(client_id = %self.eventloop.options.client_id(), "the connection drops right after connecting, again and again: is another client using the same client id?");
                            }
                        } else {
                            quick_drops = 0;
                        }
                        if t.elapsed() > Duration::from_secs(60) {
                            backoff = Duration::ZERO;
                        }
                        let _ = self.tx.send(Ev::Disconnected { error: error.clone() });
                    } else if backoff.is_zero() || backoff >= self.reconnect_max {
                        warn!(%error, "cannot connect to the MQTT broker; retrying");
                    } else {
                        debug!(%error, "cannot connect to the MQTT broker; retrying");
                    }
                    // The next connection gets a new incarnation, and its Will says so.
                    let inc = self.shared.next_inc();
                    let will = LastWill::new(
                        self.shared.topics.status(),
                        status_payload("offline", inc, wall_ms()),
                        QoS::AtLeastOnce,
                        true,
                        None,
                    );
                    self.eventloop.options.set_last_will(will);
                    backoff = (backoff * 2).clamp(Duration::from_millis(100), self.reconnect_max);
                    let jitter =
                        0.5 + f64::from(getrandom::u32().unwrap_or(0)) / f64::from(u32::MAX) / 2.0;
                    tokio::time::sleep(backoff.mul_f64(jitter)).await;
                }
            }
        }
    }
}

fn describe(e: &ConnectionError) -> String {
    match e {
        ConnectionError::ConnectionRefused(
            ConnectReturnCode::NotAuthorized | ConnectReturnCode::BadUserNamePassword,
        ) => {
            format!("{e}: check mqtt.username, mqtt.password_file and the client certificate")
        }
        _ => e.to_string(),
    }
}

/// Settings the link task needs.
pub(super) struct LinkSettings {
    pub inflight: usize,
    pub replay_rate: u32,
    pub commands: Option<command::Policy>,
    pub seen: Option<SeenIds>,
    /// Where what commands set is kept, to restore it at the next start.
    pub desired_path: std::path::PathBuf,
}

pub(super) struct Link {
    pub client: AsyncClient,
    pub fifo: Fifo,
    pub shared: Arc<Shared>,
    pub rx: mpsc::UnboundedReceiver<Ev>,
    pub control: mpsc::Sender<Control>,
    pub settings: LinkSettings,
    pub stop: oneshot::Receiver<oneshot::Sender<()>>,
    pub ever_connected: bool,
    /// The agent's description changed (a SIGHUP reload): publish the birth again.
    pub changed: Arc<tokio::sync::Notify>,
    /// Topics the broker refused on this connection (reported once each).
    pub refused_topics: std::collections::HashSet<String>,
    /// The broker's maximum packet size on this connection: a larger publish would make
    /// the client drop the connection, and a record would be retried on every reconnect.
    pub max_packet: Option<u32>,
    /// The oldest record in flight at the last disconnects, and at how many in a row: a
    /// record the broker answers by dropping the connection would otherwise be resent
    /// first at every reconnect, forever.
    pub suspect: Option<(u64, u32)>,
}

/// A record that was the oldest in flight at this many disconnects in a row is taken for
/// one the broker will not accept, and set aside.
pub const POISON_DISCONNECTS: u32 = 5;

/// Where the link is in sending the outbox.
#[derive(Debug, Default)]
struct Sending {
    connected: bool,
    /// Records from `live_start` on are live; below it, backlog.
    live_start: u64,
    next_live: u64,
    next_backlog: u64,
    inflight: usize,
    /// The records sent on this connection and not yet acknowledged.
    unacked: std::collections::BTreeSet<u64>,
    /// Whether the broker acknowledged any record on this connection.
    acked: bool,
    /// Backlog records that may be sent now (refilled by the rate).
    tokens: f64,
    /// Whether backlog may remain (the rate limiter runs only then).
    backlog: bool,
}

/// How often the outbox's done records are saved.
const SAVE_EVERY: Duration = Duration::from_secs(5);

impl Link {
    pub async fn run(mut self) {
        let mut s = Sending::default();
        // Which records are done, saved every 5 s (a write and an fdatasync: at once a
        // second it was a tenth of the MQTT path's CPU); a crash costs at most 5 s of
        // records sent again, which consumers drop by (node, inc, seq).
        let mut save = tokio::time::interval(SAVE_EVERY);
        save.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let refill = Duration::from_millis(100);
        let mut replay = tokio::time::interval(refill);
        replay.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let shared = self.shared.clone();
        loop {
            tokio::select! {
                ev = self.rx.recv() => match ev {
                    Some(ev) => self.on_event(ev, &mut s).await,
                    None => return,
                },
                () = shared.notify.notified() => {}
                () = self.changed.notified() => self.on_changed(s.connected).await,
                _ = replay.tick(), if s.backlog => {
                    let rate = f64::from(self.settings.replay_rate);
                    s.tokens = (s.tokens + rate * refill.as_secs_f64()).min(rate.max(1.0));
                }
                _ = save.tick() => {
                    let mut outbox = shared.outbox.lock().expect("outbox");
                    if let Err(e) = outbox.save_state() {
                        warn!(error = %e, "cannot save the outbox state");
                    }
                    let lag = outbox.pending(s.next_backlog, s.live_start, usize::MAX).len();
                    shared.stats.lock().expect("stats").replay_lag = lag as u64;
                }
                done = &mut self.stop => {
                    self.stop(&mut s, done.ok()).await;
                    return;
                }
            }
            self.pump(&mut s);
        }
    }

    async fn on_event(&mut self, ev: Ev, s: &mut Sending) {
        match ev {
            Ev::Connected { session_present, max_packet } => {
                let inc = self.shared.inc();
                info!(inc, session_present, "connected to the MQTT broker");
                {
                    let mut st = self.shared.stats.lock().expect("stats");
                    st.connected = true;
                    st.reconnects += u64::from(self.ever_connected);
                }
                self.ever_connected = true;
                self.refused_topics.clear();
                self.max_packet = max_packet;
                let next = self.shared.outbox.lock().expect("outbox").next_seq();
                *s = Sending {
                    connected: true,
                    live_start: next,
                    next_live: next,
                    next_backlog: 0,
                    inflight: 0,
                    unacked: Default::default(),
                    acked: false,
                    tokens: 0.0,
                    backlog: true,
                };
                // Subscriptions are re-made on every connection: rumqttc does not say when a
                // session was lost, and re-subscribing is harmless when it was not.
                if self.settings.commands.is_some() {
                    let mut filter =
                        Filter::new(self.shared.topics.command_filter(), QoS::AtLeastOnce);
                    // Retain-as-published: a command published retained arrives marked so,
                    // and is refused (it would otherwise run again at every reconnect).
                    filter.preserve_retain = true;
                    if let Err(e) = self.client.try_subscribe_many([filter]) {
                        warn!(error = %e, "cannot subscribe to commands");
                    }
                }
                self.publish_plain(
                    &self.shared.topics.status(),
                    true,
                    status_payload("online", inc, wall_ms()).into_bytes(),
                    None,
                );
                self.rebirth().await;
            }
            Ev::Disconnected { error } => {
                self.shared.stats.lock().expect("stats").connected = false;
                debug!(%error, "link: disconnected");
                s.connected = false;
                s.inflight = 0;
                // Counted only when the broker acknowledged nothing on this connection: a
                // link that carried records and then dropped (a flapping network, a
                // broker restart) says nothing against the oldest one.
                if let Some(&oldest) = s.unacked.first().filter(|_| !s.acked) {
                    let n = match self.suspect {
                        Some((seq, n)) if seq == oldest => n + 1,
                        _ => 1,
                    };
                    self.suspect = Some((oldest, n));
                    if n >= POISON_DISCONNECTS {
                        self.suspect = None;
                        self.unsendable(
                            oldest,
                            &format!("the broker dropped the connection {n} times in a row with this record the oldest in flight ({error}); it is set aside so that the rest can go"),
                        );
                    }
                }
                s.unacked.clear();
            }
            Ev::Acked { tag, reason } => {
                let refused =
                    !matches!(reason, PubAckReason::Success | PubAckReason::NoMatchingSubscribers);
                match tag {
                    Tag::Record(seq) => {
                        s.inflight = s.inflight.saturating_sub(1);
                        s.unacked.remove(&seq);
                        s.acked = true;
                        if self.suspect.is_some_and(|(x, _)| x == seq) {
                            self.suspect = None;
                        }
                        let mut outbox = self.shared.outbox.lock().expect("outbox");
                        if refused {
                            // Resending would be refused again: the record is committed,
                            // and the refusal reported.
                            let topic = outbox
                                .read(seq)
                                .ok()
                                .flatten()
                                .map(|m| m.topic)
                                .unwrap_or_default();
                            drop(outbox);
                            self.refused(&topic, reason);
                            outbox = self.shared.outbox.lock().expect("outbox");
                        }
                        outbox.commit(seq);
                        if !refused {
                            self.shared.stats.lock().expect("stats").published += 1;
                        }
                    }
                    Tag::Plain(topic) if refused => self.refused(&topic, reason),
                    Tag::Plain(_) => {}
                }
            }
            Ev::SubAck { refused } => {
                if !refused.is_empty() {
                    let why = format!(
                        "the broker refused the command subscription ({}): this node cannot be sent commands; check the broker's ACL",
                        refused.join(", ")
                    );
                    error!("{why}");
                    self.shared.event(json!({"kind": "mqtt-refused", "topic": self.shared.topics.command_filter(), "reason": why}));
                }
            }
            Ev::Command(p) => self.on_command(p).await,
        }
    }

    /// A PUBACK with a negative reason: counted, and logged and published as an event
    /// once per topic and connection, except a refusal of that event itself (that would
    /// loop).
    fn refused(&mut self, topic: &str, reason: PubAckReason) {
        self.shared.stats.lock().expect("stats").refused += 1;
        if !self.refused_topics.insert(topic.to_owned()) {
            return;
        }
        let own = self.shared.topics.event("mqtt-refused");
        if topic == own {
            error!(topic, ?reason, "the broker refuses this node's mqtt-refused events too");
            return;
        }
        error!(topic, ?reason, "the broker refused a publish; check its ACL for this node");
        self.shared.event(
            json!({"kind": "mqtt-refused", "topic": topic, "reason": format!("{reason:?}")}),
        );
    }

    /// Publish outbox records while the window has room: live first, then backlog as the
    /// rate allows.
    fn pump(&mut self, s: &mut Sending) {
        if !s.connected {
            return;
        }
        while s.inflight < self.settings.inflight {
            let outbox = self.shared.outbox.lock().expect("outbox");
            let live = outbox.pending(s.next_live, u64::MAX, 1).first().copied();
            let (seq, historical) = match live {
                Some(seq) => (seq, false),
                None if s.tokens >= 1.0 => {
                    match outbox.pending(s.next_backlog, s.live_start, 1).first() {
                        Some(&seq) => (seq, true),
                        None => {
                            // The backlog is sent: stop the replay timer (it woke the
                            // runtime ten times a second for the life of the connection).
                            s.backlog = false;
                            return;
                        }
                    }
                }
                None => return,
            };
            let read = outbox.read(seq);
            drop(outbox);
            let msg = match read {
                Ok(Some(m)) if valid_topic(&m.topic, MAX_TOPIC) => m,
                // Never sendable (unreadable, or a topic the client refuses): committed
                // and reported, or it would stay pending forever.
                Ok(Some(m)) => {
                    self.unsendable(seq, &format!("{:?} is not a valid topic", m.topic));
                    continue;
                }
                Ok(None) => continue,
                Err(e) => {
                    self.unsendable(seq, &e.to_string());
                    continue;
                }
            };
            let payload = if historical { mark_historical(&msg.payload) } else { msg.payload };
            let size =
                publish_size(&msg.topic, payload.len(), msg.correlation.as_ref().map(Vec::len));
            if let Some(max) = self.max_packet.filter(|&m| size > m as usize) {
                self.too_large(seq, &msg.topic, size, max);
                continue;
            }
            let props = msg.correlation.map(|c| PublishProperties {
                correlation_data: Some(Bytes::from(c)),
                ..Default::default()
            });
            // The cursors move only once the client took the publish (its channel may
            // be full for a moment; the record is tried again next time).
            if !self.send(Tag::Record(seq), &msg.topic, false, payload, props) {
                return;
            }
            s.inflight += 1;
            s.unacked.insert(seq);
            if historical {
                s.next_backlog = seq + 1;
                s.tokens -= 1.0;
            } else {
                s.next_live = seq + 1;
            }
        }
    }

    /// A record larger than the broker takes: committed, and reported once per topic and
    /// connection (every record of a topic is usually the same size).
    fn too_large(&mut self, seq: u64, topic: &str, size: usize, max: u32) {
        self.shared.outbox.lock().expect("outbox").commit(seq);
        self.shared.stats.lock().expect("stats").refused += 1;
        if !self.refused_topics.insert(format!("{topic} (size)")) {
            return;
        }
        let why = format!(
            "{size} bytes, over the broker's maximum packet size of {max}: raise it (Mosquitto: max_packet_size) or send fewer GPUs per record"
        );
        error!(
            seq,
            topic,
            why,
            "an outbox record is larger than the broker accepts; records like it are dropped"
        );
        self.shared
            .event(json!({"kind": "mqtt-refused", "topic": topic, "seq": seq, "reason": why}));
    }

    /// A record that can never be published: committed, logged, reported.
    fn unsendable(&mut self, seq: u64, why: &str) {
        error!(seq, why, "an outbox record cannot be published; it is dropped");
        self.shared.outbox.lock().expect("outbox").commit(seq);
        self.shared
            .event(json!({"kind": "mqtt-refused", "topic": null, "seq": seq, "reason": why}));
    }

    fn send(
        &self,
        tag: Tag,
        topic: &str,
        retain: bool,
        payload: Vec<u8>,
        props: Option<PublishProperties>,
    ) -> bool {
        let mut fifo = self.fifo.lock().expect("fifo");
        fifo.push_back(tag);
        let r = match props {
            Some(p) => {
                self.client.try_publish_with_properties(topic, QoS::AtLeastOnce, retain, payload, p)
            }
            None => self.client.try_publish(topic, QoS::AtLeastOnce, retain, payload),
        };
        if let Err(e) = r {
            fifo.pop_back();
            warn!(topic, error = %e, "cannot hand a publish to the MQTT client");
            return false;
        }
        true
    }

    fn publish_plain(
        &self,
        topic: &str,
        retain: bool,
        payload: Vec<u8>,
        props: Option<PublishProperties>,
    ) {
        let correlation = props.as_ref().and_then(|p| p.correlation_data.as_ref()).map(Bytes::len);
        let size = publish_size(topic, payload.len(), correlation);
        if let Some(max) = self.max_packet.filter(|&m| size > m as usize) {
            error!(
                topic,
                size,
                max,
                "not published: larger than the broker's maximum packet size (Mosquitto: max_packet_size)"
            );
            return;
        }
        self.send(Tag::Plain(topic.to_owned()), topic, retain, payload, props);
    }

    /// The agent's desired state or birth changed (a command from any transport, a
    /// reload): keep the desired state, and publish the birth and state when connected.
    async fn on_changed(&self, connected: bool) {
        let d = if connected { self.rebirth().await } else { self.describe().await };
        if let Some(d) = d {
            let path = &self.settings.desired_path;
            if let Err(e) = d.desired.save(path) {
                error!(path = %path.display(), error = %e, "cannot save the desired state; a restart will not restore it");
            }
        }
    }

    async fn describe(&self) -> Option<Description> {
        let (done, answer) = oneshot::channel();
        self.control.send(Control::Describe { done }).await.ok()?;
        answer.await.ok()
    }

    /// Publish the birth certificate and the retained state, asking the agent for them.
    async fn rebirth(&self) -> Option<Description> {
        let mut d = self.describe().await?;
        d.birth["inc"] = json!(self.shared.inc());
        d.birth["ts_ms"] = json!(wall_ms());
        self.publish_plain(
            &self.shared.topics.birth(),
            true,
            d.birth.to_string().into_bytes(),
            None,
        );
        for (key, value) in &d.state {
            self.publish_plain(
                &self.shared.topics.state(key),
                true,
                value.to_string().into_bytes(),
                None,
            );
        }
        Some(d)
    }

    async fn on_command(&mut self, p: Publish) {
        let now = wall_ms();
        let topic = String::from_utf8_lossy(&p.topic).into_owned();
        let name = topic.rsplit('/').next().unwrap_or_default().to_owned();
        // Only `<root>/<node>/cmd/<name>`: a persistent session may still deliver what an
        // earlier root or node id subscribed to, and such a command must not run.
        let own = name.len() <= 128
            && name.chars().all(crate::control::id_char)
            && topic == self.shared.topics.command(&name)
            && valid_topic(&topic, MAX_TOPIC);
        if !own {
            warn!(topic = %topic.escape_debug(), expected = %self.shared.topics.command_filter(), "ignoring a message outside this node's command topics (a subscription left from an earlier root or node id?)");
            self.ack(&p);
            return;
        }
        let props = p.properties.clone().unwrap_or_default();
        // A response topic the client could not publish to is ignored (the result then
        // goes to `reply_to` or `cmd-result/<name>`).
        let response = Response {
            name: name.clone(),
            topic: props.response_topic.clone().filter(|t| valid_topic(t, MAX_TOPIC)),
            // (More than 64 KiB cannot be echoed: the outbox stores its length in 16 bits.)
            correlation: props
                .correlation_data
                .clone()
                .filter(|c| c.len() <= usize::from(u16::MAX)),
        };
        let Some(policy) = &self.settings.commands else { return };
        if p.retain && p.payload.is_empty() {
            // Someone clearing a retained command: nothing to run or answer.
            self.ack(&p);
            return;
        }
        let parsed = command::parse(
            &command::Incoming {
                node: &self.shared.topics.node,
                name: &name,
                payload: &p.payload,
                retained: p.retain,
                expiry_s: props.message_expiry_interval,
                now_ms: now,
            },
            policy,
        );
        let accepted = match parsed {
            Ok(a) => a,
            Err((env, why)) => {
                self.ack(&p);
                // Unauthenticated: the result goes only to this node's own result topic,
                // never where the sender asked.
                let response = if env.authenticated {
                    response
                } else {
                    Response { topic: None, correlation: None, ..response }
                };
                self.result(&response, &env, "rejected", Some(&why), None);
                return;
            }
        };
        let env = Envelope {
            id: Some(accepted.id.clone()),
            reply_to: accepted.reply_to.clone(),
            authenticated: true,
        };
        if let Some(seen) = &mut self.settings.seen {
            if seen.contains(&accepted.id) {
                self.ack(&p);
                let why = format!(
                    "command id {:?} was already received; a command is executed at most once",
                    accepted.id
                );
                self.result(&response, &env, "rejected", Some(&why), None);
                return;
            }
            // On disk before the PUBACK: a crash after this cannot execute it twice.
            if let Err(e) = seen.insert(&accepted.id, now) {
                error!(error = %e, "cannot record a command id; the command is not executed");
                self.result(
                    &response,
                    &env,
                    "failed",
                    Some(&format!("cannot record the command id: {e}")),
                    None,
                );
                self.ack(&p);
                return;
            }
        }
        self.ack(&p);
        self.execute(accepted, response).await;
    }

    async fn execute(&mut self, a: Accepted, response: Response) {
        let env =
            Envelope { id: Some(a.id.clone()), reply_to: a.reply_to.clone(), authenticated: true };
        if a.expires_ms.is_some_and(|e| e <= wall_ms()) {
            self.result(
                &response,
                &env,
                "expired",
                Some("the command expired before it could run"),
                None,
            );
            return;
        }
        let request = match a.command {
            Command::Ping => {
                self.result(&response, &env, "accepted", None, None);
                self.result(
                    &response,
                    &env,
                    "succeeded",
                    None,
                    Some(json!({"inc": self.shared.inc()})),
                );
                return;
            }
            Command::Rebirth => {
                self.result(&response, &env, "accepted", None, None);
                self.rebirth().await;
                self.result(&response, &env, "succeeded", None, None);
                return;
            }
            Command::Request(r) => r,
        };
        let (done, answer) = oneshot::channel();
        let stopped = || Err(Refusal::Failed("the agent stopped".into()));
        let outcome = match self.control.send(Control::Execute { request, done }).await {
            Ok(()) => answer.await.unwrap_or_else(|_| stopped()),
            Err(_) => stopped(),
        };
        // The agent checks and applies at once: `accepted` is published with the outcome.
        match outcome {
            Err(Refusal::Rejected(why)) => {
                self.result(&response, &env, "rejected", Some(&why), None)
            }
            Err(Refusal::Failed(why)) => {
                self.result(&response, &env, "accepted", None, None);
                self.result(&response, &env, "failed", Some(&why), None);
            }
            Ok(detail) => {
                self.result(&response, &env, "accepted", None, None);
                self.result(&response, &env, "succeeded", None, Some(json!({"detail": detail})));
                // The agent tells `changed`: the desired state is kept and the birth
                // published again there, as for a command over the socket.
            }
        }
    }

    fn ack(&self, p: &Publish) {
        if let Err(e) = self.client.try_ack(p) {
            warn!(error = %e, "cannot acknowledge a command");
        }
    }

    /// A command result, through the outbox (results are never dropped): to the MQTT 5
    /// response topic with its correlation data, else `reply_to`, else `cmd-result/<name>`.
    fn result(
        &self,
        r: &Response,
        env: &Envelope,
        status: &str,
        reason: Option<&str>,
        extra: Option<serde_json::Value>,
    ) {
        {
            let mut st = self.shared.stats.lock().expect("stats");
            match status {
                "accepted" => st.commands_accepted += 1,
                "rejected" => st.commands_rejected += 1,
                _ => {}
            }
        }
        if status == "rejected" {
            warn!(command = %r.name, id = env.id.as_deref().unwrap_or("(none)"), reason, "command rejected");
        } else {
            info!(command = %r.name, id = env.id.as_deref().unwrap_or("(none)"), status, "command");
        }
        let mut body = json!({"command": r.name, "id": env.id, "status": status, "node": self.shared.topics.node});
        if let Some(reason) = reason {
            body["reason"] = json!(reason);
        }
        if let Some(serde_json::Value::Object(m)) = extra {
            body.as_object_mut().expect("object").extend(m);
        }
        let topic = r
            .topic
            .clone()
            .or_else(|| env.reply_to.clone())
            .unwrap_or_else(|| self.shared.topics.cmd_result(&r.name));
        self.shared.append(Class::Critical, &topic, r.correlation.as_deref(), body);
    }

    /// A clean stop: give the outbox up to 2 s to drain, then publish `offline` (a clean
    /// DISCONNECT suppresses the Will), save the outbox state, disconnect.
    async fn stop(&mut self, s: &mut Sending, done: Option<oneshot::Sender<()>>) {
        // Up to 2 s for what is pending (the backlog at full speed), then `offline`
        // whatever is left (it goes at the next start), then up to 1 s for its PUBACK.
        let drain_until = tokio::time::Instant::now() + Duration::from_secs(2);
        s.tokens = f64::INFINITY;
        let status = self.shared.topics.status();
        let mut offline_sent = false;
        while s.connected {
            self.pump(s);
            let drained = self.shared.outbox.lock().expect("outbox").stats().depth == 0;
            if !offline_sent && (drained || tokio::time::Instant::now() >= drain_until) {
                let offline = status_payload("offline", self.shared.inc(), wall_ms());
                self.publish_plain(&status, true, offline.into_bytes(), None);
                offline_sent = true;
            }
            let wait_until = if offline_sent {
                drain_until.max(tokio::time::Instant::now()) + Duration::from_secs(1)
            } else {
                drain_until
            };
            match tokio::time::timeout_at(wait_until, self.rx.recv()).await {
                Ok(Some(Ev::Acked { tag: Tag::Plain(t), .. })) if t == status && offline_sent => {
                    break;
                }
                Ok(Some(ev @ (Ev::Acked { .. } | Ev::Disconnected { .. }))) => {
                    self.on_event(ev, s).await
                }
                // The agent loop has ended: a command left unacknowledged is delivered
                // again by the broker at the next connection.
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) if offline_sent => break,
                Err(_) => {}
            }
        }
        let _ = self.client.try_disconnect();
        if let Err(e) = self.shared.outbox.lock().expect("outbox").save_state() {
            warn!(error = %e, "cannot save the outbox state");
        }
        if let Some(done) = done {
            let _ = done.send(());
        }
    }
}

/// Where a command's results go.
struct Response {
    name: String,
    topic: Option<String>,
    correlation: Option<Bytes>,
}

/// The encoded size of a QoS 1 PUBLISH of `payload` bytes to `topic`, with correlation
/// data of that many bytes: what a broker's maximum packet size counts.
fn publish_size(topic: &str, payload: usize, correlation: Option<usize>) -> usize {
    let varint = |n: usize| match n {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    };
    let props = correlation.map_or(0, |c| 1 + 2 + c);
    let len = 2 + topic.len() + 2 + varint(props) + props + payload;
    1 + varint(len) + len
}

/// `{"historical":true,…}` from `{…}`: replayed records are marked so that dashboards
/// do not take them for current.
fn mark_historical(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 18);
    out.extend_from_slice(b"{\"historical\":true,");
    out.extend_from_slice(payload.strip_prefix(b"{").unwrap_or(payload));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_size_is_what_rumqttc_encodes() {
        for (topic, payload, correlation) in [
            ("gpulet/v1/n1/telemetry", 2_000, None),
            ("t", 0, None),
            ("gpulet/v1/n1/events/limit-changed", 100, Some(16)),
            ("a/b", 20_000, Some(200)),
            ("x", 3_000_000, None),
        ] {
            let props = correlation.map(|c| PublishProperties {
                correlation_data: Some(Bytes::from(vec![7u8; c])),
                ..Default::default()
            });
            let mut p = Publish::new(topic, QoS::AtLeastOnce, vec![0u8; payload], props);
            p.pkid = 1;
            assert_eq!(publish_size(topic, payload, correlation), p.size(), "{topic} {payload}");
        }
    }
}
