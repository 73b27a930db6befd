//! `gpulet fleet-sim`: many simulated nodes in one process, each a whole agent (8
//! simulated GPUs, guard, 1 Hz ticks) with its own MQTT connection and outbox, the real
//! publishing path. A verifying consumer in the same process counts what arrives,
//! de-duplicated on `(node, inc, seq)`. It sizes a broker: the largest fleet it carries
//! with zero loss, and what each node costs.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Filter;
use rumqttc::v5::{AsyncClient, Event, Incoming, MqttOptions};
use serde::Serialize;
use tokio::sync::{Mutex, watch};

use crate::agent::Pacing;
use crate::clock::SystemClock;
use crate::config::Config;
use crate::error::Error;
use crate::mqtt::parse_url;
use crate::setup;

#[derive(Debug, Clone)]
pub struct Options {
    pub nodes: u32,
    pub broker: String,
    pub duration: Duration,
    pub gpus: u32,
    /// Outboxes go here (a temporary folder by default).
    pub dir: Option<PathBuf>,
    /// Sync each tick's records to disk, as an agent does by default.
    pub fsync: bool,
    pub root: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub nodes: u32,
    pub gpus_per_node: u32,
    pub seconds: f64,
    pub fsync: bool,
    /// Messages the nodes put through their outboxes (telemetry and events), from the
    /// first node's start to the last one's clean stop.
    pub sent: u64,
    /// Distinct `(node, inc, seq)` the consumer received.
    pub received: u64,
    /// Still in the outboxes when the nodes stopped (2 s to drain): not lost, they go at
    /// the next start.
    pub pending_at_stop: u64,
    pub lost: u64,
    pub duplicates: u64,
    /// Telemetry records that the nodes' outbox bounds dropped.
    pub dropped_by_outbox: u64,
    pub messages_per_s: f64,
    /// This process (all nodes and the consumers) over `seconds` of steady state: CPU
    /// share of one core, and memory.
    pub cpu_pct: f64,
    pub rss_mib: f64,
    pub cpu_pct_per_node: f64,
    pub rss_kib_per_node: f64,
}

/// What the consumers received: `(inc, seq)` per node.
type Seen = Arc<Mutex<HashMap<String, HashSet<(u64, u64)>>>>;

/// Run the fleet for `duration`, stop every node cleanly, and report.
pub fn run(o: Options) -> Result<Report, Error> {
    let rt =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(Error::Runtime)?;
    rt.block_on(fleet(o))
}

async fn fleet(o: Options) -> Result<Report, Error> {
    let tmp;
    let dir = match &o.dir {
        Some(d) => d.clone(),
        None => {
            tmp = std::env::temp_dir().join(format!("gpulet-fleet-sim-{}", std::process::id()));
            tmp.clone()
        }
    };
    let (_, host, port) =
        parse_url(&o.broker).map_err(|e| Error::Command(format!("--broker: {e}")))?;
    let seen: Seen = Arc::default();
    let duplicates = Arc::new(std::sync::atomic::AtomicU64::new(0));
    // One consumer per 500 nodes, sharing the subscription as an ingest tier does, so
    // that no single consumer's broker queue limits what the fleet is measured at.
    // They run on a thread of their own, so that nodes blocked in fsync cannot starve
    // them into the broker dropping their queue (which would count as loss).
    let consumer_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::Runtime)?;
    let on = consumer_rt.handle().clone();
    std::thread::spawn(move || consumer_rt.block_on(std::future::pending::<()>()));
    for k in 0..o.nodes.div_ceil(500).max(1) {
        consumer(&on, &host, port, &o.root, k, seen.clone(), duplicates.clone()).await?;
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    let started = Instant::now();
    let mut nodes = Vec::new();
    for i in 0..o.nodes {
        let toml = format!(
            "node = \"sim-{i:05}\"\ntick = \"1s\"\n[socket]\nenabled = false\n[telemetry]\nsink = \"none\"\n[sim]\nseed = {i}\n[[sim.gpu]]\npreset = \"h100-sxm\"\nworkload = \"training\"\ncount = {}\n[mqtt]\nurl = {:?}\nroot = {:?}\nstate_dir = {:?}\n[mqtt.outbox]\nfsync = {}\n",
            o.gpus,
            o.broker,
            o.root,
            dir.join(format!("sim-{i:05}")).display().to_string(),
            o.fsync
        );
        let config = Config::parse(&toml).map_err(crate::config::ConfigErrors::from)?;
        config.validate()?;
        let mut stop = stop_rx.clone();
        // Spread the nodes over the tick period, as real nodes are.
        let offset = Duration::from_secs(1).mul_f64(f64::from(i) / f64::from(o.nodes.max(1)));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        nodes.push((
            tokio::spawn(async move {
                tokio::time::sleep(offset).await;
                let base = std::path::Path::new(".");
                let mut node =
                    setup::node(&config, base, SystemClock::new(), Some(Vec::new()), None)?;
                let _ = ready_tx.send(());
                node.run(None, Pacing::RealTime, async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await;
                let appended = node.mqtt.as_ref().expect("[mqtt] is configured").appended();
                let stats = node.stop().await.expect("[mqtt] is configured");
                Ok::<_, Error>((stats, appended))
            }),
            ready_rx,
        ));
    }
    for (_, ready) in &mut nodes {
        let _ = ready.await;
    }
    // Measure the steady state, after every node connected and sent its birth.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    tokio::time::sleep(o.duration).await;
    let cpu = cpu_seconds() - cpu0;
    let seconds = t0.elapsed().as_secs_f64();
    let rss_mib = rss_kib() / 1024.0;
    let _ = stop_tx.send(true);
    let mut sent = 0;
    let mut dropped = 0;
    let mut pending = 0;
    for (task, _) in nodes {
        let (stats, appended) =
            task.await.map_err(|e| Error::Command(format!("a node panicked: {e}")))??;
        sent += appended;
        dropped += stats.dropped;
        pending += stats.outbox_depth;
    }
    // The consumer gets the last messages.
    let mut received = 0;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let r: u64 = seen.lock().await.values().map(|s| s.len() as u64).sum();
        if r + pending >= sent {
            received = r;
            break;
        }
        received = r;
    }
    if o.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let n = f64::from(o.nodes.max(1));
    Ok(Report {
        nodes: o.nodes,
        gpus_per_node: o.gpus,
        seconds,
        fsync: o.fsync,
        sent,
        received,
        pending_at_stop: pending,
        lost: sent.saturating_sub(received + pending),
        duplicates: duplicates.load(std::sync::atomic::Ordering::Relaxed),
        dropped_by_outbox: dropped,
        messages_per_s: received as f64 / started.elapsed().as_secs_f64(),
        cpu_pct: 100.0 * cpu / seconds,
        rss_mib,
        cpu_pct_per_node: 100.0 * cpu / seconds / n,
        rss_kib_per_node: rss_mib * 1024.0 / n,
    })
}

/// The verifying consumer: telemetry and events of every node, QoS 1.
async fn consumer(
    on: &tokio::runtime::Handle,
    host: &str,
    port: u16,
    root: &str,
    k: u32,
    seen: Seen,
    duplicates: Arc<std::sync::atomic::AtomicU64>,
) -> Result<(), Error> {
    let mut opts = MqttOptions::new(
        format!("gpulet-fleet-sim-consumer-{}-{k}", std::process::id()),
        host,
        port,
    );
    opts.set_keep_alive(Duration::from_secs(30)).set_max_packet_size(Some(1 << 20));
    let (client, mut eventloop) = AsyncClient::new(opts, 100);
    let filters =
        [format!("$share/verify/{root}/+/telemetry"), format!("$share/verify/{root}/+/events/#")];
    let root_levels = root.split('/').count();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let mut ready_tx = Some(ready_tx);
    on.spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                    let f = filters.iter().map(|f| Filter::new(f, QoS::AtLeastOnce));
                    let _ = client.try_subscribe_many(f);
                }
                Ok(Event::Incoming(Incoming::SubAck(_))) => {
                    if let Some(tx) = ready_tx.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(Event::Incoming(Incoming::Publish(p))) => {
                    let topic = String::from_utf8_lossy(&p.topic);
                    let node = topic.split('/').nth(root_levels).unwrap_or_default().to_owned();
                    // A full parse, as a real consumer does; only inc and seq are kept.
                    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&p.payload) {
                        let key = (v["inc"].as_u64().unwrap_or(0), v["seq"].as_u64().unwrap_or(0));
                        if !seen.lock().await.entry(node).or_default().insert(key) {
                            duplicates.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), ready_rx)
        .await
        .map_err(|_| {
            Error::Command("the consumer could not subscribe within 10 s; is the broker up?".into())
        })?
        .ok();
    Ok(())
}

/// User + system CPU seconds of this process.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return 0.0 };
    // Fields after the command name (which may hold spaces) start after ") ".
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    ticks / 100.0
}

fn rss_kib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0.0)
}
