//! The Prometheus endpoint: `GET /metrics` in the OpenMetrics text format, encoded by
//! `prometheus-client` from the agent's status at the time of the scrape (asked of the
//! loop, as `gpulet status` does), the MQTT link's numbers and the process's own.
//! Names and their dcgm-exporter counterparts: `docs/metrics.md`.
//!
//! The HTTP side is a few lines on tokio, not a web framework: one path, one method,
//! a bounded request head, a connection each. A loop that does not answer makes the
//! scrape fail (503), so that Prometheus's `up` says so.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::Handle;
use crate::agent::Status;
use crate::mqtt::MqttStats;

/// The content types `/metrics` serves: OpenMetrics to a scraper that asks for it (the
/// Prometheus server does), the Prometheus text format to anything else (`curl`,
/// `promtool check metrics`), as Prometheus's own client libraries do.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// The longest request head read; scrapers send a few hundred bytes.
const MAX_HEAD: usize = 8 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// A whole scrape, request to answer sent.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(15);
const MAX_CONNECTIONS: usize = 4;

/// Listen on `addr` and serve scrapes on the current runtime.
pub fn serve(addr: SocketAddr, handle: Handle) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let std = std::net::TcpListener::bind(addr)?;
    std.set_nonblocking(true)?;
    let listener = TcpListener::from_std(std)?;
    tracing::info!(listen = %addr, "metrics endpoint served at /metrics");
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    Ok(tokio::spawn(async move {
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else { return };
            match listener.accept().await {
                Ok((stream, _)) => {
                    let handle = handle.clone();
                    tokio::spawn(async move {
                        // A scraper that does not read its answer cannot keep a slot.
                        let _ = tokio::time::timeout(SCRAPE_TIMEOUT, scrape(stream, &handle)).await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }))
}

async fn scrape(mut stream: TcpStream, handle: &Handle) {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(READ_TIMEOUT, async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).await.ok().filter(|&n| n > 0)?;
            head.extend_from_slice(&buf[..n]);
            if head.len() > MAX_HEAD {
                return None;
            }
        }
        Some(())
    })
    .await;
    let (status, ctype, body) = match read {
        Ok(Some(())) => respond(&head, handle).await,
        _ => ("400 Bad Request", "text/plain", "a request head of at most 8 KiB\n".into()),
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(reply.as_bytes()).await;
    let _ = stream.write_all(body.as_bytes()).await;
    let _ = stream.shutdown().await;
}

async fn respond(head: &[u8], handle: &Handle) -> (&'static str, &'static str, String) {
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    if path != "/metrics" {
        return ("404 Not Found", "text/plain", "gpulet serves /metrics only\n".into());
    }
    if method != "GET" {
        return ("405 Method Not Allowed", "text/plain", "GET only\n".into());
    }
    match handle.status().await {
        Ok(status) => {
            let mqtt = handle.mqtt.as_ref().map(|m| m.get());
            let body = render(&status, mqtt.as_ref(), &Process::read());
            let head = String::from_utf8_lossy(head).to_ascii_lowercase();
            let accepts_openmetrics = head
                .lines()
                .any(|l| l.starts_with("accept:") && l.contains("application/openmetrics-text"));
            if accepts_openmetrics {
                ("200 OK", OPENMETRICS, body)
            } else {
                ("200 OK", TEXT, to_text_format(&body))
            }
        }
        Err(e) => ("503 Service Unavailable", "text/plain", format!("{e}\n")),
    }
}

type Labels = Vec<(&'static str, String)>;
type G = Family<Labels, Gauge<f64, AtomicU64>>;
type C = Family<Labels, Counter<f64, AtomicU64>>;

/// Registers families by name, kind and unit, and sets them.
struct Builder {
    registry: Registry,
}

impl Builder {
    fn gauge(&mut self, name: &str, help: &str, unit: Option<Unit>) -> G {
        let f = G::default();
        match unit {
            Some(u) => self.registry.register_with_unit(name, help, u, f.clone()),
            None => self.registry.register(name, help, f.clone()),
        }
        f
    }
    fn counter(&mut self, name: &str, help: &str, unit: Option<Unit>) -> C {
        let f = C::default();
        match unit {
            Some(u) => self.registry.register_with_unit(name, help, u, f.clone()),
            None => self.registry.register(name, help, f.clone()),
        }
        f
    }
}

fn set(f: &G, labels: Labels, v: Option<f64>) {
    if let Some(v) = v {
        f.get_or_create(&labels).set(v);
    }
}

fn count(f: &C, labels: Labels, v: Option<f64>) {
    if let Some(v) = v {
        f.get_or_create(&labels).inc_by(v);
    }
}

fn watts() -> Option<Unit> {
    Some(Unit::Other("watts".into()))
}

/// The exposition for one scrape.
pub fn render(s: &Status, mqtt: Option<&MqttStats>, p: &Process) -> String {
    let mut b = Builder { registry: Registry::with_prefix("gpulet") };
    let power = b.gauge("gpu_power", "Power draw", watts());
    let limit = b.gauge("gpu_power_limit", "The power limit the GPU enforces", watts());
    let lo = b.gauge("gpu_power_limit_min", "Lowest limit the agent may set", watts());
    let hi = b.gauge("gpu_power_limit_max", "Highest limit the agent may set", watts());
    let energy = b.counter("gpu_energy", "Energy used since the driver loaded", Some(Unit::Joules));
    let temp = b.gauge("gpu_temperature", "GPU core temperature", Some(Unit::Celsius));
    let util =
        b.gauge("gpu_utilization", "Share of time a kernel ran", Some(Unit::Other("ratio".into())));
    let mem_used = b.gauge("gpu_memory_used", "Frame buffer in use", Some(Unit::Bytes));
    let mem_total = b.gauge("gpu_memory_total", "Frame buffer size", Some(Unit::Bytes));
    let sm_clock = b.gauge("gpu_sm_clock", "SM clock", Some(Unit::Other("hertz".into())));
    let mem_clock = b.gauge("gpu_memory_clock", "Memory clock", Some(Unit::Other("hertz".into())));
    let throttle = b.gauge(
        "gpu_throttle_reason",
        "1 while the GPU clocks down for this reason (NVML clock-event reasons)",
        None,
    );
    let xids = b.counter("gpu_xid_errors", "XID errors since the agent started, by code", None);
    let ecc = b.counter("gpu_ecc_errors", "ECC errors since the driver loaded, by type", None);
    let rows = b.gauge("gpu_remapped_rows", "Memory rows remapped to spares, by cause", None);
    let remap_pending =
        b.gauge("gpu_row_remap_pending", "1 while a row remap waits for a GPU reset", None);
    let remap_failed =
        b.gauge("gpu_row_remap_failed", "1 if a row remap failed (no spare row left)", None);
    let health = b.gauge("gpu_health", "1 for the GPU's health state (ok, degraded, lost)", None);
    let node_power = b.gauge("node_power", "The node's GPUs' power, summed", watts());
    let budget =
        b.gauge("node_power_budget", "The node power budget in force (absent: none)", watts());
    let calls = b.counter("plugin_calls", "Calls into the plugin since it was loaded", None);
    let call_time = b.counter(
        "plugin_call",
        "Time spent in the plugin since it was loaded",
        Some(Unit::Seconds),
    );
    let faults = b.counter(
        "plugin_faults",
        "Plugin calls stopped (timeout, memory, trap) since it was loaded",
        None,
    );
    let quarantined =
        b.gauge("plugin_quarantined", "1 while the plugin is quarantined or failed to load", None);
    let refused = b.counter(
        "plugin_refused",
        "Reporter items refused (bad name, not finite, over the caps) since it was loaded",
        None,
    );
    let plugin_metric = b.gauge(
        "plugin_metric",
        "What a plugin reported at the last tick (its metric name in `name`)",
        None,
    );
    let ticks = b.counter("ticks", "Ticks run since start", None);
    let late = b.counter("ticks_late", "Ticks that started more than a tick late", None);
    let tick_time = b.gauge("tick_duration", "Time the last tick took", Some(Unit::Seconds));
    let sink_errors = b.counter("sink_errors", "Telemetry records a sink failed to take", None);
    let info = b.gauge("build_info", "1, labelled with the agent's version and backend", None);

    for g in &s.gpus {
        let l = || vec![("gpu", g.index.to_string()), ("uuid", g.uuid.clone())];
        let with = |k: &'static str, v: &str| {
            let mut l = l();
            l.push((k, v.to_owned()));
            l
        };
        set(&power, l(), g.power_w);
        set(&limit, l(), g.limit_w);
        set(&lo, l(), Some(g.min_w));
        set(&hi, l(), Some(g.max_w));
        count(&energy, l(), g.energy_j);
        set(&temp, l(), g.temp_c);
        set(&util, l(), g.util_pct.map(|u| u / 100.0));
        set(&mem_used, l(), g.mem_used_mib.map(|m| (m << 20) as f64));
        set(&mem_total, l(), Some((g.mem_total_mib << 20) as f64));
        set(&sm_clock, l(), g.sm_clock_mhz.map(|c| f64::from(c) * 1e6));
        set(&mem_clock, l(), g.mem_clock_mhz.map(|c| f64::from(c) * 1e6));
        if g.throttle_bits.is_some() {
            for reason in crate::gpu::Throttle(u64::MAX).names() {
                let on = g.throttle.iter().any(|t| t == reason);
                set(&throttle, with("reason", reason), Some(f64::from(u8::from(on))));
            }
        }
        count(&ecc, with("type", "corrected"), g.ecc_corrected.map(|v| v as f64));
        count(&ecc, with("type", "uncorrected"), g.ecc_uncorrected.map(|v| v as f64));
        set(&rows, with("cause", "correctable"), g.remapped_rows_correctable.map(f64::from));
        set(&rows, with("cause", "uncorrectable"), g.remapped_rows_uncorrectable.map(f64::from));
        set(&remap_pending, l(), g.remapped_rows_pending.map(|b| f64::from(u8::from(b))));
        set(&remap_failed, l(), g.remapped_rows_failed.map(|b| f64::from(u8::from(b))));
        for state in ["ok", "degraded", "lost"] {
            set(&health, with("state", state), Some(f64::from(u8::from(g.health == state))));
        }
    }
    for x in &s.xids {
        let uuid = s.gpus.get(x.gpu as usize).map_or(String::new(), |g| g.uuid.clone());
        let l = vec![("gpu", x.gpu.to_string()), ("uuid", uuid), ("code", x.code.to_string())];
        count(&xids, l, Some(x.count as f64));
    }
    set(&node_power, vec![], s.power_w);
    set(&budget, vec![], s.budget.budget_w);
    for pl in &s.plugins {
        let l = || vec![("plugin", pl.name.clone())];
        count(&calls, l(), Some(pl.calls as f64));
        count(&call_time, l(), Some(pl.call_seconds));
        count(&faults, l(), Some(pl.faults as f64));
        set(&quarantined, l(), Some(f64::from(u8::from(!pl.running))));
        if pl.kind == "reporter" {
            count(&refused, l(), Some(pl.refused as f64));
        }
    }
    for m in &s.plugin_metrics {
        let mut l = vec![("plugin", m.plugin.clone()), ("name", m.name.clone())];
        if let Some(g) = m.gpu {
            l.push(("gpu", g.to_string()));
        }
        set(&plugin_metric, l, Some(m.value));
    }
    count(&ticks, vec![], Some(s.ticks as f64));
    count(&late, vec![], Some(s.ticks_late as f64));
    set(&tick_time, vec![], Some(s.tick_us as f64 / 1e6));
    count(&sink_errors, vec![], Some(s.sink_errors as f64));
    set(
        &info,
        vec![("version", s.agent_version.clone()), ("backend", s.backend.clone())],
        Some(1.0),
    );

    if let Some(m) = mqtt {
        let connected = b.gauge("mqtt_connected", "1 while the broker is connected", None);
        let reconnects = b.counter("mqtt_reconnects", "Connections after the first", None);
        let published = b.counter("mqtt_published", "Messages the broker acknowledged", None);
        let refused = b.counter("mqtt_refused", "Messages the broker refused", None);
        let pending = b.gauge("outbox_pending_records", "Records waiting in the outbox", None);
        let pending_bytes =
            b.gauge("outbox_pending", "Bytes waiting in the outbox", Some(Unit::Bytes));
        let dropped =
            b.counter("outbox_dropped_records", "Telemetry records the outbox bound dropped", None);
        set(&connected, vec![], Some(f64::from(u8::from(m.connected))));
        count(&reconnects, vec![], Some(m.reconnects as f64));
        count(&published, vec![], Some(m.published as f64));
        count(&refused, vec![], Some(m.refused as f64));
        set(&pending, vec![], Some(m.outbox_depth as f64));
        set(&pending_bytes, vec![], Some(m.outbox_bytes as f64));
        count(&dropped, vec![], Some(m.dropped as f64));
    }

    // The process's own, under the names every Prometheus client library uses.
    let mut process = Registry::with_prefix("process");
    let cpu = C::default();
    process.register_with_unit("cpu", "CPU time used, user and system", Unit::Seconds, cpu.clone());
    let rss = G::default();
    process.register_with_unit("resident_memory", "Resident memory", Unit::Bytes, rss.clone());
    let threads = G::default();
    process.register("threads", "Threads of the process", threads.clone());
    count(&cpu, vec![], p.cpu_seconds);
    set(&rss, vec![], p.rss_bytes);
    set(&threads, vec![], p.threads);

    let mut out = String::new();
    encode_all(&mut out, &[&b.registry, &process]);
    out
}

/// Several registries as one exposition (one `# EOF`).
fn encode_all(out: &mut String, registries: &[&Registry]) {
    for (i, r) in registries.iter().enumerate() {
        let mut part = String::new();
        encode(&mut part, r).expect("writing to a String cannot fail");
        if i + 1 < registries.len() {
            part = part.trim_end_matches("# EOF\n").to_owned();
        }
        out.push_str(&part);
    }
}

/// The same exposition in the Prometheus text format (0.0.4): a counter's `HELP` and
/// `TYPE` name its samples (`x_total`), and there is no `UNIT` or `EOF` line. The samples
/// are the encoder's, untouched.
pub fn to_text_format(openmetrics: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for l in openmetrics.lines() {
        if let Some(name) = l.strip_prefix("# TYPE ").and_then(|r| r.strip_suffix(" counter")) {
            counters.insert(name.to_owned());
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for l in openmetrics.lines() {
        if l.starts_with("# UNIT ") || l == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = l.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters.contains(name).then(|| format!("{p}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(l));
        out.push('\n');
    }
    out
}

/// The process's own numbers, from `/proc/self`.
#[derive(Debug, Clone, Default)]
pub struct Process {
    pub cpu_seconds: Option<f64>,
    pub rss_bytes: Option<f64>,
    pub threads: Option<f64>,
}

impl Process {
    pub fn read() -> Process {
        let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
            return Process::default();
        };
        // The fields after the command name, which may itself hold spaces and parens.
        let fields: Vec<&str> =
            stat.rsplit_once(')').map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
        use nix::unistd::{SysconfVar, sysconf};
        let conf = |v| sysconf(v).ok().flatten().unwrap_or(0) as f64;
        let (ticks, page) = (conf(SysconfVar::CLK_TCK), conf(SysconfVar::PAGE_SIZE));
        let field = |n: usize| fields.get(n).and_then(|f| f.parse::<f64>().ok());
        // `stat` fields 14, 15 (utime, stime), 20 (threads), 24 (rss pages); the list
        // starts at field 3.
        Process {
            cpu_seconds: field(11).zip(field(12)).map(|(u, s)| (u + s) / ticks),
            threads: field(17),
            rss_bytes: field(21).map(|p| p * page),
        }
    }
}
