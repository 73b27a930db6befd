//! Test fixtures for MQTT: a real Mosquitto on a free loopback port, a collecting client
//! that reconnects on its own, and the agent running in a thread of its own.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use gpulet::clock::SystemClock;
use gpulet::config::Config;
use gpulet::setup;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Filter, PublishProperties};
use rumqttc::v5::{Client, Event, Incoming, MqttOptions};
use serde_json::Value;

/// A Mosquitto of our own. Killed when dropped.
pub struct Broker {
    child: Option<Child>,
    pub port: u16,
    /// Holds the config and log; removed with the broker.
    _dir: tempfile::TempDir,
    conf: PathBuf,
    log: PathBuf,
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Broker {
    pub fn start() -> Broker {
        Broker::with("")
    }

    /// A broker whose config has `extra` added; `{dir}` in it is the broker's folder.
    pub fn with(extra: &str) -> Broker {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let conf = dir.path().join("mosquitto.conf");
        let text = format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 100000\n{}\n",
            extra.replace("{dir}", dir.path().to_str().unwrap())
        );
        std::fs::write(&conf, text).unwrap();
        let log = dir.path().join("mosquitto.log");
        let mut b = Broker { child: None, port, _dir: dir, conf, log };
        b.restart();
        b
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Start (again) on the same port.
    pub fn restart(&mut self) {
        assert!(self.child.is_none());
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&self.conf)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start mosquitto ({e}). The MQTT tests need a real broker: install \
                     the Debian package `mosquitto` (.ci/test does)"
                )
            });
        self.child = Some(child);
        let t = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "mosquitto did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL: the broker vanishes with everything it held in memory.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One message as a consumer sees it.
#[derive(Debug, Clone)]
pub struct Msg {
    pub topic: String,
    pub retain: bool,
    pub payload: Vec<u8>,
    pub correlation: Option<Bytes>,
}

impl Msg {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.payload).unwrap_or_else(|e| panic!("{e}: {}", self.text()))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

/// A consumer subscribed to `filter`, reconnecting by itself (every 20 ms) and
/// re-subscribing after every connection.
pub struct Collector {
    rx: mpsc::Receiver<Msg>,
    pub got: Vec<Msg>,
    pub client: Client,
    /// Subscriptions made so far (one per connection).
    subscribed: Arc<AtomicUsize>,
}

impl Collector {
    pub fn start(port: u16, filter: &str) -> Collector {
        let id = format!("collector-{}", free_port());
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(5)).set_max_packet_size(Some(1 << 20));
        let (client, mut conn) = Client::new(opts, 100);
        let (tx, rx) = mpsc::channel();
        let sub = client.clone();
        let filter = filter.to_owned();
        let (ready_tx, ready) = mpsc::channel();
        let subscribed = Arc::new(AtomicUsize::new(0));
        let count = subscribed.clone();
        std::thread::spawn(move || {
            for ev in conn.iter() {
                match ev {
                    Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                        let mut f = Filter::new(&filter, QoS::AtLeastOnce);
                        f.preserve_retain = true;
                        let _ = sub.try_subscribe_many([f]);
                    }
                    Ok(Event::Incoming(Incoming::SubAck(_))) => {
                        count.fetch_add(1, Ordering::SeqCst);
                        let _ = ready_tx.send(());
                    }
                    Ok(Event::Incoming(Incoming::Publish(p))) => {
                        let msg = Msg {
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            retain: p.retain,
                            payload: p.payload.to_vec(),
                            correlation: p.properties.and_then(|p| p.correlation_data),
                        };
                        if tx.send(msg).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        ready.recv_timeout(Duration::from_secs(10)).expect("collector subscribed");
        Collector { rx, got: Vec::new(), client, subscribed }
    }

    /// After a broker restart: wait until this consumer is subscribed again, so that
    /// what a node sends next is not missed by the test's own consumer.
    pub fn wait_resubscribed(&self, before: usize) {
        let t = Instant::now();
        while self.subscribed.load(Ordering::SeqCst) <= before {
            assert!(t.elapsed() < Duration::from_secs(10), "the collector did not reconnect");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn subscriptions(&self) -> usize {
        self.subscribed.load(Ordering::SeqCst)
    }

    pub fn drain(&mut self) {
        while let Ok(m) = self.rx.try_recv() {
            self.got.push(m);
        }
    }

    /// Wait until `pred` holds for what was received; panics after `timeout`.
    pub fn wait(&mut self, timeout: Duration, what: &str, pred: impl Fn(&[Msg]) -> bool) {
        let t = Instant::now();
        loop {
            self.drain();
            if pred(&self.got) {
                return;
            }
            if t.elapsed() > timeout {
                let tail: Vec<String> = self
                    .got
                    .iter()
                    .rev()
                    .take(8)
                    .map(|m| format!("{} {}", m.topic, m.text()))
                    .collect();
                panic!("timed out waiting for {what}; last received: {tail:#?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Wait for the first message on `topic` after index `from` matching `pred`.
    pub fn next_on(&mut self, from: usize, topic: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.wait(Duration::from_secs(10), topic, |g| {
            g[from.min(g.len())..].iter().any(|m| m.topic == topic && pred(&m.json()))
        });
        self.got[from..].iter().find(|m| m.topic == topic && pred(&m.json())).unwrap().json()
    }

    pub fn on(&mut self, topic_suffix: &str) -> Vec<Value> {
        self.drain();
        self.got.iter().filter(|m| m.topic.ends_with(topic_suffix)).map(Msg::json).collect()
    }

    /// Publish raw (for malformed and hand-made commands).
    pub fn publish(
        &self,
        topic: &str,
        payload: &[u8],
        retain: bool,
        props: Option<PublishProperties>,
    ) {
        match props {
            Some(p) => self.client.publish_with_properties(
                topic,
                QoS::AtLeastOnce,
                retain,
                payload.to_vec(),
                p,
            ),
            None => self.client.publish(topic, QoS::AtLeastOnce, retain, payload.to_vec()),
        }
        .unwrap();
    }
}

/// Every seq of what went through a node's outbox (telemetry, events, command results),
/// de-duplicated and checked to be contiguous from 0; returns the count.
pub fn contiguous_seqs(msgs: &[Msg]) -> u64 {
    let mut seqs: Vec<u64> =
        streamed(msgs).iter().map(|m| m.json()["seq"].as_u64().unwrap()).collect();
    seqs.sort_unstable();
    seqs.dedup();
    for (i, s) in seqs.iter().enumerate() {
        assert_eq!(*s, i as u64, "seq {i} is missing (received {} distinct seqs)", seqs.len());
    }
    seqs.len() as u64
}

/// The agent in a thread of its own, on the real clock, stopped cleanly on request.
pub struct AgentThread {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<JoinHandle<()>>,
}

impl AgentThread {
    pub fn start(dir: &Path, toml: &str) -> AgentThread {
        let config = Config::parse(toml).unwrap();
        config.validate().unwrap();
        let dir = dir.to_path_buf();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let handle = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            // Assembled and stopped as `gpulet run` does (`setup::node`).
            rt.block_on(async move {
                let mut node =
                    setup::node(&config, &dir, SystemClock::new(), Some(Vec::new()), None).unwrap();
                node.run(None, gpulet::agent::Pacing::RealTime, async {
                    let _ = stop_rx.await;
                })
                .await;
                node.stop().await;
            });
        });
        AgentThread { stop: Some(stop), handle: Some(handle) }
    }

    pub fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.handle.take().unwrap().join().unwrap();
    }
}

impl Drop for AgentThread {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
            let _ = self.handle.take().unwrap().join();
        }
    }
}

/// A small, fast node reporting to `url`, its state in `state`.
pub fn node_config(url: &str, extra: &str) -> String {
    format!(
        "node = \"n1\"\ntick = \"50ms\"\n[telemetry]\nsink = \"none\"\n[[sim.gpu]]\npreset = \"l40s\"\nworkload = \"inference\"\ncount = 2\n[mqtt]\nurl = \"{url}\"\nstate_dir = \"state\"\nreconnect_max = \"1s\"\nkeep_alive = \"5s\"\n{extra}"
    )
}

/// The messages that carry an outbox seq: all but status, birth and state.
pub fn streamed(msgs: &[Msg]) -> Vec<&Msg> {
    msgs.iter()
        .filter(|m| {
            !m.retain
                && !m.topic.ends_with("/status")
                && !m.topic.ends_with("/birth")
                && !m.topic.contains("/state/")
        })
        .filter(|m| !m.payload.is_empty() && m.json().get("seq").is_some())
        .collect()
}
