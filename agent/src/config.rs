//! The agent's configuration: one TOML file, parsed strictly, then validated as a step of
//! its own.
//!
//! Parsing rejects unknown keys and wrong types; validation checks values and how they
//! relate, and collects every problem rather than stopping at the first. Each error names
//! the key path, the bad value and what is accepted. Defaults are the `DEFAULT_*`
//! constants below, and `examples/gpulet.toml` documents every key (a test loads it).
//!
//! What can only be checked against the hardware (a `power.gpu` index the node does not
//! have, bounds outside the GPU's range) is checked when the agent starts, with the same
//! kind of error.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::gpu::Field;
use crate::gpu::sim::model::Preset;
use crate::gpu::sim::workload::WorkloadKind;

pub const DEFAULT_TICK: Duration = Duration::from_secs(1);
pub const MIN_TICK: Duration = Duration::from_millis(10);
pub const MAX_TICK: Duration = Duration::from_secs(3600);
pub const DEFAULT_SEED: u64 = 1;
pub const DEFAULT_DEADBAND_W: f64 = 1.0;
pub const DEFAULT_RAISE_INTERVAL: Duration = Duration::from_secs(1);
/// Largest simulated node.
pub const MAX_SIM_GPUS: u32 = 64;
/// Largest power figure accepted anywhere, in watts (a node budget of 100 kW is already
/// far beyond any one machine).
const MAX_WATTS: f64 = 100_000.0;
/// Trace names that refer to traces built into the binary rather than files.
pub const BUILTIN_TRACE: &str = "builtin:h100x8-gpt-training";

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This node's id in telemetry (and MQTT topics). Default: the hostname.
    pub node: Option<String>,
    /// How often the agent samples, decides and reports.
    #[serde(default = "default_tick", with = "humantime_serde")]
    pub tick: Duration,
    #[serde(default)]
    pub backend: BackendKind,
    #[serde(default)]
    pub power: PowerConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    #[serde(default)]
    pub sim: SimConfig,
    /// Settings shared by all plugins.
    #[serde(default)]
    pub plugins: PluginsConfig,
    /// The power plugins, in the order they run (see `docs/plugins.md`).
    #[serde(default, rename = "plugin")]
    pub plugin: Vec<PluginConfig>,
    /// The reporter plugins (`[[reporter]]`): metrics and events each tick, no limits.
    #[serde(default)]
    pub reporter: Vec<PluginConfig>,
    /// Fleet reporting and commands (see `docs/mqtt.md`); off when absent.
    pub mqtt: Option<MqttConfig>,
    #[serde(default)]
    pub nvml: NvmlConfig,
    #[serde(default)]
    pub health: HealthConfig,
    #[serde(default)]
    pub calibration: CalibrationConfig,
    #[serde(default)]
    pub socket: SocketConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub jobs: JobsConfig,
}

/// `[jobs]`: the job queue (`docs/jobs.md`); off unless enabled.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobsConfig {
    #[serde(default)]
    pub enabled: bool,
    /// The jobs: a directory each, with its state and its logs.
    #[serde(default = "default_jobs_dir")]
    pub dir: PathBuf,
    /// Jobs queued at most (a submission beyond is refused).
    #[serde(default = "default_max_queue")]
    pub max_queue: usize,
    /// Ended jobs kept (for `gpulet jobs --all`, `wait` and `logs`), with their logs.
    #[serde(default = "default_max_queue")]
    pub keep_finished: usize,
    /// From SIGTERM (cancel, time limit) to SIGKILL.
    #[serde(default = "default_kill_grace", with = "humantime_serde")]
    pub kill_grace: Duration,
    /// Each of a job's stdout and stderr is rotated past this (one old file kept), KiB.
    #[serde(default = "default_log_max_kib")]
    pub log_max_kib: u64,
    /// `"off"`, `"own"` (the agent's own cgroup v2, delegated by the unit:
    /// `Delegate=yes`), or the absolute path of a cgroup v2 directory: where each job
    /// gets a cgroup of its own.
    #[serde(default = "default_cgroup")]
    pub cgroup: String,
    /// Whether jobs may run as root (a root submitter, or a fleet command naming root).
    #[serde(default)]
    pub allow_root: bool,
    /// Only members of this group may submit (locally: root and the agent's user
    /// always may). Default: whoever can connect to the socket, and any user a fleet
    /// command names.
    pub submit_group: Option<String>,
    /// Users below this uid (system accounts: postgres, www-data…) may not run jobs.
    #[serde(default = "default_min_uid")]
    pub min_uid: u32,
    /// Whether fleet commands (`submit-job` over MQTT) may queue jobs: `"off"`,
    /// `"signed"` (only with `mqtt.commands.require_signed = true`) or `"unsigned"`
    /// (anyone who may publish to the command topic runs code as any user: a lab's
    /// private broker only).
    #[serde(default = "default_fleet_submit")]
    pub fleet_submit: String,
    /// The scheduler plugin (a `job-scheduler` component); default: the built-in FIFO
    /// bin-packer.
    pub scheduler: Option<PluginConfig>,
}

impl Default for JobsConfig {
    fn default() -> Self {
        JobsConfig {
            enabled: false,
            dir: default_jobs_dir(),
            max_queue: default_max_queue(),
            keep_finished: default_max_queue(),
            kill_grace: default_kill_grace(),
            log_max_kib: default_log_max_kib(),
            cgroup: default_cgroup(),
            allow_root: false,
            submit_group: None,
            min_uid: default_min_uid(),
            fleet_submit: default_fleet_submit(),
            scheduler: None,
        }
    }
}

pub const DEFAULT_JOBS_DIR: &str = "/var/lib/gpulet/jobs";

fn default_jobs_dir() -> PathBuf {
    DEFAULT_JOBS_DIR.into()
}
fn default_max_queue() -> usize {
    1000
}
fn default_kill_grace() -> Duration {
    Duration::from_secs(10)
}
fn default_log_max_kib() -> u64 {
    16 << 10
}
fn default_cgroup() -> String {
    "off".into()
}
fn default_min_uid() -> u32 {
    1000
}
fn default_fleet_submit() -> String {
    "off".into()
}

/// `[socket]`: the local control socket that `gpulet status`, `set-budget`, `set-limit`,
/// `reload` and `clear-health` speak to (`docs/socket.md`). Who may connect is the
/// file's mode and group; who may change anything is root, the agent's own user and
/// `admin_group`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SocketConfig {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Default: `gpulet.sock` in systemd's `$RUNTIME_DIRECTORY`, else
    /// `/run/gpulet/gpulet.sock`.
    pub path: Option<PathBuf>,
    /// The socket file's permission bits, octal: who may connect (and read the status).
    #[serde(default = "default_socket_mode")]
    pub mode: String,
    /// The socket file's group (its members may read the status). Default: the agent's.
    pub group: Option<String>,
    /// Members of this group may change things too.
    pub admin_group: Option<String>,
}

impl Default for SocketConfig {
    fn default() -> Self {
        SocketConfig {
            enabled: true,
            path: None,
            mode: default_socket_mode(),
            group: None,
            admin_group: None,
        }
    }
}

fn default_socket_mode() -> String {
    "0660".into()
}

/// Where the service's socket is when nothing says otherwise (`gpulet status` looks
/// there too).
pub const DEFAULT_SOCKET: &str = "/run/gpulet/gpulet.sock";

impl SocketConfig {
    /// The socket's path: configured, else in systemd's runtime directory, else the
    /// default.
    pub fn path(&self) -> PathBuf {
        match (&self.path, std::env::var_os("RUNTIME_DIRECTORY")) {
            (Some(p), _) => p.clone(),
            // systemd gives a colon-separated list when there are several.
            (None, Some(dirs)) if !dirs.is_empty() => {
                let dirs = dirs.to_string_lossy().into_owned();
                PathBuf::from(dirs.split(':').next().unwrap_or(&dirs)).join("gpulet.sock")
            }
            _ => DEFAULT_SOCKET.into(),
        }
    }

    /// The mode as a number (validated).
    pub fn mode_bits(&self) -> u32 {
        u32::from_str_radix(&self.mode, 8).expect("validated")
    }
}

/// `[metrics]`: the Prometheus endpoint (`docs/metrics.md`); off unless enabled.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    #[serde(default)]
    pub enabled: bool,
    /// Address and port to serve `/metrics` on; loopback by default, as node_exporter
    /// users expect a local scrape or a reverse proxy in front.
    #[serde(default = "default_metrics_listen")]
    pub listen: std::net::SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { enabled: false, listen: default_metrics_listen() }
    }
}

fn default_metrics_listen() -> std::net::SocketAddr {
    ([127, 0, 0, 1], 9402).into()
}

/// `[calibration]`: where `gpulet calibrate` writes the work-per-watt curves and the
/// agent reads them at start.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalibrationConfig {
    #[serde(default = "default_calibration_file")]
    pub file: PathBuf,
}

impl Default for CalibrationConfig {
    fn default() -> Self {
        CalibrationConfig { file: default_calibration_file() }
    }
}

fn default_calibration_file() -> PathBuf {
    "/var/lib/gpulet/calibration.json".into()
}

/// `[health]`: how GPU health events are reported.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Repeats of an XID (same GPU, same code) within this of the last reported one are
    /// counted but not reported again.
    #[serde(default = "default_xid_debounce", with = "humantime_serde")]
    pub xid_debounce: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig { xid_debounce: default_xid_debounce() }
    }
}

fn default_xid_debounce() -> Duration {
    Duration::from_secs(10)
}

/// `[nvml]`: for `backend = "nvml"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NvmlConfig {
    /// The NVML library. Default: `GPULET_NVML_LIBRARY` if set, else the system's
    /// `libnvidia-ml.so.1` (for containers and unusual installs).
    pub library: Option<PathBuf>,
    /// Put the limits found at start back when the agent stops (and at the next start,
    /// if it did not stop cleanly).
    #[serde(default = "yes")]
    pub restore_limits: bool,
    /// Where the limits found at start are kept.
    #[serde(default = "default_nvml_state_dir")]
    pub state_dir: PathBuf,
}

impl Default for NvmlConfig {
    fn default() -> Self {
        NvmlConfig { library: None, restore_limits: true, state_dir: default_nvml_state_dir() }
    }
}

fn default_nvml_state_dir() -> PathBuf {
    "/var/lib/gpulet/nvml".into()
}

fn default_tick() -> Duration {
    DEFAULT_TICK
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// The simulated node of `[sim]`.
    #[default]
    Sim,
    /// Real GPUs through NVML.
    Nvml,
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Sim => "sim",
            BackendKind::Nvml => "nvml",
        }
    }
}

/// Power limits: the static policy's caps, the operator's bounds and the node budget.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PowerConfig {
    /// Node power budget: the sum of the GPUs' limits never exceeds it. When set, the
    /// agent manages every GPU's limit.
    pub budget_w: Option<f64>,
    /// Operator bounds for every GPU, inside the hardware's own.
    pub min_w: Option<f64>,
    pub max_w: Option<f64>,
    /// The static policy's cap for every GPU.
    pub limit_w: Option<f64>,
    /// Changes smaller than this are not applied.
    #[serde(default = "default_deadband")]
    pub deadband_w: f64,
    /// A GPU's limit is raised at most once per this interval (lowering is never held
    /// back: it is the safe direction).
    #[serde(default = "default_raise_interval", with = "humantime_serde")]
    pub raise_interval: Duration,
    /// Per-GPU overrides.
    #[serde(default, rename = "gpu")]
    pub gpus: Vec<GpuPowerConfig>,
}

impl Default for PowerConfig {
    fn default() -> Self {
        PowerConfig {
            budget_w: None,
            min_w: None,
            max_w: None,
            limit_w: None,
            deadband_w: DEFAULT_DEADBAND_W,
            raise_interval: DEFAULT_RAISE_INTERVAL,
            gpus: Vec::new(),
        }
    }
}

fn default_deadband() -> f64 {
    DEFAULT_DEADBAND_W
}
fn default_raise_interval() -> Duration {
    DEFAULT_RAISE_INTERVAL
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuPowerConfig {
    pub index: u32,
    pub limit_w: Option<f64>,
    pub min_w: Option<f64>,
    pub max_w: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    #[serde(default)]
    pub sink: SinkKind,
    /// The file for `sink = "file"` (appended to).
    pub path: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SinkKind {
    /// JSON lines on standard output.
    #[default]
    Stdout,
    /// JSON lines appended to `telemetry.path`.
    File,
    /// No telemetry output.
    None,
}

/// The simulated node, for `backend = "sim"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimConfig {
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// The GPUs, in index order. Default: 8 × `h100-sxm` running `training`.
    #[serde(default, rename = "gpu")]
    pub gpus: Vec<SimGpuConfig>,
    /// Faults to inject at given simulated times.
    #[serde(default, rename = "fault")]
    pub faults: Vec<SimFaultConfig>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig { seed: DEFAULT_SEED, gpus: Vec::new(), faults: Vec::new() }
    }
}

fn default_seed() -> u64 {
    DEFAULT_SEED
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimGpuConfig {
    pub preset: String,
    pub workload: WorkloadKind,
    /// How many GPUs of this kind (default 1).
    #[serde(default = "one")]
    pub count: u32,
    /// For `workload = "trace"`: an `nvidia-smi` CSV (relative to the config file) or
    /// `builtin:h100x8-gpt-training`.
    pub trace: Option<String>,
    /// Which GPU of the trace to replay. Default: the simulated GPU's own index.
    pub trace_gpu: Option<usize>,
    /// Where in the trace to start (it loops at its end). Default: its beginning.
    #[serde(default, with = "humantime_serde")]
    pub trace_start: Duration,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimFaultConfig {
    /// Simulated time since start.
    #[serde(with = "humantime_serde")]
    pub at: Duration,
    pub gpu: u32,
    pub kind: FaultKind,
    /// For `kind = "xid"`.
    pub xid: Option<u32>,
    /// For `kind = "field"`: the telemetry name of the field that starts failing.
    pub field: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FaultKind {
    /// The GPU falls off the bus.
    Lost,
    /// One field starts failing.
    Field,
    /// An XID event.
    Xid,
    /// Its cooling fails: it runs hotter than its peers at the same power.
    Cooling,
    /// All faults of the GPU cleared.
    Clear,
}

pub const DEFAULT_CACHE_DIR: &str = "/var/cache/gpulet/plugins";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/gpulet/plugins";
pub const DEFAULT_MAX_FAILURES: u32 = 3;
pub const DEFAULT_FAILURE_WINDOW: Duration = Duration::from_secs(60);
pub const DEFAULT_DEADLINE: Duration = Duration::from_millis(20);
pub const DEFAULT_MEMORY_MIB: u32 = 64;
pub const DEFAULT_STATE_KIB: u32 = 64;

/// `[plugins]`: what all plugins share.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginsConfig {
    /// Compiled plugins are kept here so that a restart does not recompile. Must belong
    /// to the agent's user and be writable by nobody else, or it is not used.
    #[serde(default = "default_cache_dir")]
    pub cache_dir: PathBuf,
    /// Each plugin's key-value store lives here.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// A plugin that faults this many times within `failure_window` is quarantined.
    #[serde(default = "default_max_failures")]
    pub max_failures: u32,
    #[serde(default = "default_failure_window", with = "humantime_serde")]
    pub failure_window: Duration,
    /// What stands in for a failed or quarantined plugin's decisions.
    #[serde(default)]
    pub fallback: Fallback,
}

impl Default for PluginsConfig {
    fn default() -> Self {
        PluginsConfig {
            cache_dir: default_cache_dir(),
            state_dir: default_state_dir(),
            max_failures: DEFAULT_MAX_FAILURES,
            failure_window: DEFAULT_FAILURE_WINDOW,
            fallback: Fallback::default(),
        }
    }
}

fn default_cache_dir() -> PathBuf {
    DEFAULT_CACHE_DIR.into()
}
fn default_state_dir() -> PathBuf {
    DEFAULT_STATE_DIR.into()
}
fn default_max_failures() -> u32 {
    DEFAULT_MAX_FAILURES
}
fn default_failure_window() -> Duration {
    DEFAULT_FAILURE_WINDOW
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fallback {
    /// Hold every GPU's limit where it is.
    #[default]
    Hold,
    /// Propose every GPU's default limit (still within bounds and the budget).
    Defaults,
}

/// One `[[plugin]]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// Names the plugin in events, audit records, logs and its state file.
    pub name: String,
    /// The component (`.wasm`), relative to the config file.
    pub path: PathBuf,
    /// The plugin's own config, passed to it as JSON.
    #[serde(default)]
    pub config: toml::Table,
    /// Longest a call may run before it is stopped.
    #[serde(default = "default_deadline", with = "humantime_serde")]
    pub deadline: Duration,
    /// Most memory the plugin may have, MiB.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u32,
    /// A fresh instance, between calls, once its memory has grown past this many MiB
    /// (below `memory_mib`); none by default. For guests whose collector lets the heap
    /// grow toward the cap (JavaScript): the agent's memory stays bounded, with no fault.
    #[serde(default)]
    pub recycle_mib: Option<u32>,
    /// Size cap of its key-value store, KiB.
    #[serde(default = "default_state_kib")]
    pub state_kib: u32,
    /// What its decisions may do: "lower" and/or "raise" limits. None by default.
    #[serde(default)]
    pub grants: Vec<Grant>,
}

fn default_deadline() -> Duration {
    DEFAULT_DEADLINE
}
fn default_memory_mib() -> u32 {
    DEFAULT_MEMORY_MIB
}
fn default_state_kib() -> u32 {
    DEFAULT_STATE_KIB
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Grant {
    /// May propose limits below what the chain proposed so far (or the current limit).
    Lower,
    /// May propose limits above it.
    Raise,
}

pub const DEFAULT_MQTT_ROOT: &str = "gpulet/v1";
pub const DEFAULT_MQTT_STATE_DIR: &str = "/var/lib/gpulet/mqtt";

/// `[mqtt]`: the broker, the outbox and commands.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// `mqtt://HOST[:PORT]` (1883) or `mqtts://HOST[:PORT]` (8883, TLS).
    pub url: String,
    /// The topic root; topics are `<root>/<node>/…`.
    #[serde(default = "default_root")]
    pub root: String,
    /// Default: `gpulet-<node>`.
    pub client_id: Option<String>,
    pub username: Option<String>,
    /// A file holding the password (secrets are never inline).
    pub password_file: Option<PathBuf>,
    /// For mqtts://: the CA certificate (PEM) that signed the broker's.
    pub ca_file: Option<PathBuf>,
    /// For mqtts://: a client certificate and its key (PEM), both or neither.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    #[serde(default = "default_keep_alive", with = "humantime_serde")]
    pub keep_alive: Duration,
    /// Longest wait between reconnection attempts (the wait doubles from 100 ms, jittered).
    #[serde(default = "default_reconnect_max", with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// How long the broker keeps the session (and queued commands) while disconnected.
    #[serde(default = "default_session_expiry", with = "humantime_serde")]
    pub session_expiry: Duration,
    /// Backlog records replayed per second after a reconnect (live data goes first).
    #[serde(default = "default_replay_rate")]
    pub replay_rate: u32,
    /// Most records published and not yet acknowledged.
    #[serde(default = "default_inflight")]
    pub inflight: u32,
    /// The outbox, the incarnation counter, command ids and the desired state.
    #[serde(default = "default_mqtt_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default)]
    pub outbox: OutboxSection,
    #[serde(default)]
    pub commands: CommandsConfig,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxSection {
    /// Pending bytes beyond which the oldest telemetry is dropped (events never are).
    #[serde(default = "default_outbox_kib")]
    pub max_kib: u64,
    /// Telemetry older than this is dropped.
    #[serde(default = "default_outbox_age", with = "humantime_serde")]
    pub max_age: Duration,
    #[serde(default = "default_segment_kib")]
    pub segment_kib: u64,
    /// Sync each tick's records to disk before they count as written.
    #[serde(default = "yes")]
    pub fsync: bool,
}

impl Default for OutboxSection {
    fn default() -> Self {
        OutboxSection {
            max_kib: default_outbox_kib(),
            max_age: default_outbox_age(),
            segment_kib: 1024,
            fsync: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandsConfig {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Execute only commands signed by one of the keys (recommended for production).
    #[serde(default)]
    pub require_signed: bool,
    /// Ed25519 public keys, base64 (as `gpulet keygen` writes them).
    #[serde(default)]
    pub public_keys: Vec<String>,
    #[serde(default)]
    pub public_key_files: Vec<PathBuf>,
    /// Longest validity (expires_ms - issued_ms) of a signed command.
    #[serde(default = "default_max_validity", with = "humantime_serde")]
    pub max_validity: Duration,
    /// Command ids are remembered this long (across restarts): a duplicate is rejected.
    #[serde(default = "default_id_window", with = "humantime_serde")]
    pub id_window: Duration,
    #[serde(default = "default_max_payload_kib")]
    pub max_payload_kib: u32,
}

impl Default for CommandsConfig {
    fn default() -> Self {
        CommandsConfig {
            enabled: true,
            require_signed: false,
            public_keys: Vec::new(),
            public_key_files: Vec::new(),
            max_validity: default_max_validity(),
            id_window: default_id_window(),
            max_payload_kib: default_max_payload_kib(),
        }
    }
}

fn default_root() -> String {
    DEFAULT_MQTT_ROOT.into()
}
fn default_keep_alive() -> Duration {
    Duration::from_secs(30)
}
fn default_reconnect_max() -> Duration {
    Duration::from_secs(30)
}
fn default_session_expiry() -> Duration {
    Duration::from_secs(3600)
}
fn default_replay_rate() -> u32 {
    200
}
fn default_inflight() -> u32 {
    32
}
fn default_mqtt_state_dir() -> PathBuf {
    DEFAULT_MQTT_STATE_DIR.into()
}
fn default_outbox_kib() -> u64 {
    64 << 10
}
fn default_outbox_age() -> Duration {
    Duration::from_secs(7 * 86400)
}
fn default_segment_kib() -> u64 {
    1024
}
fn yes() -> bool {
    true
}
fn default_max_validity() -> Duration {
    Duration::from_secs(300)
}
fn default_id_window() -> Duration {
    Duration::from_secs(86400)
}
fn default_max_payload_kib() -> u32 {
    64
}

/// One problem with a configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {error}")]
    Read { path: String, error: String },
    /// The file is not valid TOML or does not fit the schema; `key` is empty for the
    /// top level, `line` is known for most syntax errors.
    #[error("{}", parse_message(*.line, .key, .message))]
    Parse { line: Option<usize>, key: String, message: String },
    /// A value is wrong: `key` is its path, `message` names the value and what is accepted.
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

impl ConfigError {
    pub fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid { key: key.into(), message: message.into() }
    }
}

/// Every problem found in a configuration, one per line when displayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl From<ConfigError> for ConfigErrors {
    fn from(e: ConfigError) -> Self {
        ConfigErrors(vec![e])
    }
}

/// A loaded, validated configuration and where it came from (relative paths in it are
/// relative to that file's folder).
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub base_dir: PathBuf,
}

impl Config {
    /// Read, parse and validate a config file.
    pub fn load(path: &Path) -> Result<Loaded, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.display().to_string(),
            error: e.to_string(),
        })?;
        let config = Config::parse(&text)?;
        config.validate()?;
        let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok(Loaded { config, base_dir })
    }

    /// Parse TOML strictly (unknown keys and wrong types are errors). Does not validate.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let de = toml::Deserializer::parse(text).map_err(|e| parse_error(text, "", &e))?;
        serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let key = if key == "." { String::new() } else { key };
            parse_error(text, &key, e.inner())
        })
    }

    /// Check values and their relations. Returns every problem found.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut v = Validator::default();
        v.node(self.node.as_deref());
        if self.node.is_none() && self.mqtt.is_some() {
            // The hostname becomes the node id in topics: it must fit them too.
            let before = v.errors.len();
            v.node(Some(&self.node_id()));
            for e in &mut v.errors[before..] {
                if let ConfigError::Invalid { message, .. } = e {
                    message.push_str(" (the hostname, used as the node id: set `node`)");
                }
            }
        }
        if self.tick < MIN_TICK || self.tick > MAX_TICK {
            v.err("tick", format!("{} is out of range; accepted: 10ms to 1h", show(self.tick)));
        }
        v.power(&self.power);
        v.telemetry(&self.telemetry);
        v.sim(&self.sim);
        v.plugins(&self.plugins, &self.plugin, &self.reporter);
        if let Some(m) = &self.mqtt {
            v.mqtt(m);
        }
        match u32::from_str_radix(&self.socket.mode, 8) {
            Ok(m) if (0o600..=0o777).contains(&m) && m & 0o600 == 0o600 => {}
            _ => v.err(
                "socket.mode",
                format!(
                    "{:?} is not a mode for the socket; accepted: octal permission bits from \"0600\" to \"0777\" that let the owner read and write",
                    self.socket.mode
                ),
            ),
        }
        for (key, group) in [
            ("socket.group", &self.socket.group),
            ("socket.admin_group", &self.socket.admin_group),
            ("jobs.submit_group", &self.jobs.submit_group),
        ] {
            if let Some(g) = group
                && (g.is_empty()
                    || g.len() > 64
                    || !g.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)))
            {
                v.err(key, format!("{g:?} is not a group name; accepted: 1 to 64 letters, digits, '.', '_' or '-'"));
            }
        }
        v.jobs(&self.jobs);
        let signed = self.mqtt.as_ref().is_some_and(|m| m.commands.require_signed);
        if self.jobs.fleet_submit == "signed" && !signed {
            v.err(
                "jobs.fleet_submit",
                "is \"signed\" but mqtt.commands.require_signed is not true; accepted: require signed commands, or \"off\"",
            );
        }
        if self.health.xid_debounce > MAX_TICK {
            v.err(
                "health.xid_debounce",
                format!("{} is out of range; accepted: 0s to 1h", show(self.health.xid_debounce)),
            );
        }
        if v.errors.is_empty() { Ok(()) } else { Err(ConfigErrors(v.errors)) }
    }

    /// The node id: the configured one, or the hostname.
    pub fn node_id(&self) -> String {
        self.node
            .clone()
            .unwrap_or_else(|| gethostname::gethostname().to_string_lossy().into_owned())
    }
}

/// `mqtt://host[:port]` or `mqtts://host[:port]` → (tls, host, port).
pub fn parse_url(url: &str) -> Result<(bool, String, u16), String> {
    let accepted = "accepted: mqtt://HOST[:PORT] or mqtts://HOST[:PORT]";
    let (tls, rest) = if let Some(r) = url.strip_prefix("mqtt://") {
        (false, r)
    } else if let Some(r) = url.strip_prefix("mqtts://") {
        (true, r)
    } else {
        return Err(format!("{url:?} has no mqtt:// or mqtts:// scheme; {accepted}"));
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
            h,
            p.parse::<u16>().map_err(|_| {
                format!("{url:?} has port {p:?}, not a number from 1 to 65535; {accepted}")
            })?,
        ),
        _ => (rest, if tls { 8883 } else { 1883 }),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.contains(['/', '@', '?']) || port == 0 {
        return Err(format!("{url:?} is not a broker address; {accepted}"));
    }
    Ok((tls, host.to_owned(), port))
}

fn parse_error(text: &str, key: &str, e: &toml::de::Error) -> ConfigError {
    let line = e.span().map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
    // toml's message may span lines; the first says what is wrong.
    let message = e.message().lines().next().unwrap_or("invalid TOML").trim().to_owned();
    ConfigError::Parse { line, key: key.to_owned(), message }
}

fn parse_message(line: Option<usize>, key: &str, message: &str) -> String {
    let mut out = String::new();
    if let Some(line) = line {
        out.push_str(&format!("line {line}: "));
    }
    if !key.is_empty() {
        out.push_str(key);
        out.push_str(": ");
    }
    out.push_str(message);
    out
}

fn show(d: Duration) -> String {
    format!("{:?}", humantime::format_duration(d).to_string())
}

#[derive(Default)]
struct Validator {
    errors: Vec<ConfigError>,
}

impl Validator {
    fn err(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError::invalid(key, message));
    }

    fn node(&mut self, node: Option<&str>) {
        let Some(node) = node else { return };
        let accepted = "1 to 128 characters, none of '+', '#', '/', '$' at the start, control or invisible formatting characters";
        if node.is_empty() || node.len() > 128 {
            self.err(
                "node",
                format!("{node:?} has {} characters; accepted: {accepted}", node.len()),
            );
        } else if let Some(c) = node
            .chars()
            .find(|&c| matches!(c, '+' | '#' | '/') || !crate::control::id_char(c))
            .or(node.starts_with('$').then_some('$'))
        {
            self.err(
                "node",
                format!(
                    "{node:?} contains {c:?}, which MQTT topics cannot carry; accepted: {accepted}"
                ),
            );
        }
    }

    fn watts(&mut self, key: &str, w: Option<f64>) -> Option<f64> {
        let w = w?;
        if !w.is_finite() || w <= 0.0 || w > MAX_WATTS {
            self.err(
                key,
                format!("{w} W is out of range; accepted: more than 0 up to {MAX_WATTS} W"),
            );
            return None;
        }
        Some(w)
    }

    /// min ≤ limit ≤ max among the ones given.
    fn ordered(&mut self, prefix: &str, min: Option<f64>, limit: Option<f64>, max: Option<f64>) {
        let key = |k: &str| format!("{prefix}{k}");
        if let (Some(lo), Some(hi)) = (min, max)
            && lo > hi
        {
            self.err(
                key("min_w"),
                format!("{lo} W is above {} ({hi} W); accepted: min_w ≤ max_w", key("max_w")),
            );
        }
        if let (Some(l), Some(lo)) = (limit, min)
            && l < lo
        {
            self.err(
                key("limit_w"),
                format!(
                    "{l} W is below {} ({lo} W); accepted: min_w ≤ limit_w ≤ max_w",
                    key("min_w")
                ),
            );
        }
        if let (Some(l), Some(hi)) = (limit, max)
            && l > hi
        {
            self.err(
                key("limit_w"),
                format!(
                    "{l} W is above {} ({hi} W); accepted: min_w ≤ limit_w ≤ max_w",
                    key("max_w")
                ),
            );
        }
    }

    fn power(&mut self, p: &PowerConfig) {
        self.watts("power.budget_w", p.budget_w);
        let min = self.watts("power.min_w", p.min_w);
        let max = self.watts("power.max_w", p.max_w);
        let limit = self.watts("power.limit_w", p.limit_w);
        self.ordered("power.", min, limit, max);
        if !(0.0..=50.0).contains(&p.deadband_w) {
            self.err(
                "power.deadband_w",
                format!("{} W is out of range; accepted: 0 to 50 W", p.deadband_w),
            );
        }
        if p.raise_interval > MAX_TICK {
            self.err(
                "power.raise_interval",
                format!("{} is out of range; accepted: 0s to 1h", show(p.raise_interval)),
            );
        }
        let mut seen = HashSet::new();
        for (i, g) in p.gpus.iter().enumerate() {
            let prefix = format!("power.gpu[{i}].");
            if !seen.insert(g.index) {
                self.err(
                    format!("{prefix}index"),
                    format!("GPU {} is configured twice; accepted: each index once", g.index),
                );
            }
            let gmin = self.watts(&format!("{prefix}min_w"), g.min_w).or(min);
            let gmax = self.watts(&format!("{prefix}max_w"), g.max_w).or(max);
            let glimit = self.watts(&format!("{prefix}limit_w"), g.limit_w).or(limit);
            self.ordered(&prefix, gmin, glimit, gmax);
        }
    }

    fn telemetry(&mut self, t: &TelemetryConfig) {
        match (t.sink, &t.path) {
            (SinkKind::File, None) => {
                self.err("telemetry.path", "missing; sink = \"file\" needs a path to append JSON lines to")
            }
            (SinkKind::Stdout | SinkKind::None, Some(p)) => self.err(
                "telemetry.path",
                format!("{} is set but sink is not \"file\"; accepted: a path only with sink = \"file\"", p.display()),
            ),
            _ => {}
        }
    }

    fn sim(&mut self, s: &SimConfig) {
        let mut total: u32 = 0;
        for (i, g) in s.gpus.iter().enumerate() {
            let key = |k: &str| format!("sim.gpu[{i}].{k}");
            if Preset::by_key(&g.preset).is_none() {
                self.err(
                    key("preset"),
                    format!("{:?} is not a known GPU; accepted: {}", g.preset, Preset::keys()),
                );
            }
            if g.count == 0 || g.count > MAX_SIM_GPUS {
                self.err(
                    key("count"),
                    format!("{} is out of range; accepted: 1 to {MAX_SIM_GPUS}", g.count),
                );
            }
            total = total.saturating_add(g.count);
            match (g.workload, &g.trace) {
                (WorkloadKind::Trace, None) => self.err(
                    key("trace"),
                    format!("missing; workload = \"trace\" needs a CSV path or {BUILTIN_TRACE:?}"),
                ),
                (w, Some(_)) if w != WorkloadKind::Trace => self.err(
                    key("trace"),
                    "is set but workload is not \"trace\"; accepted: a trace only with workload = \"trace\"",
                ),
                _ => {}
            }
            if g.trace_gpu.is_some() && g.trace.is_none() {
                self.err(
                    key("trace_gpu"),
                    "is set without a trace; accepted: only with workload = \"trace\"",
                );
            }
            if !g.trace_start.is_zero() && g.trace.is_none() {
                self.err(
                    key("trace_start"),
                    "is set without a trace; accepted: only with workload = \"trace\"",
                );
            }
        }
        if total > MAX_SIM_GPUS {
            self.err("sim.gpu", format!("{total} GPUs in all; accepted: at most {MAX_SIM_GPUS}"));
        }
        let n = if s.gpus.is_empty() { 8 } else { total };
        for (i, f) in s.faults.iter().enumerate() {
            let key = |k: &str| format!("sim.fault[{i}].{k}");
            if f.gpu >= n {
                self.err(
                    key("gpu"),
                    format!(
                        "{} does not exist; accepted: 0 to {} (the simulated node has {n} GPUs)",
                        f.gpu,
                        n - 1
                    ),
                );
            }
            match (f.kind, f.xid, &f.field) {
                (FaultKind::Xid, None, _) => {
                    self.err(key("xid"), "missing; kind = \"xid\" needs an XID code")
                }
                (FaultKind::Field, _, None) => self.err(
                    key("field"),
                    format!("missing; kind = \"field\" needs one of: {}", field_names()),
                ),
                (FaultKind::Field, _, Some(name)) if Field::from_name(name).is_none() => self.err(
                    key("field"),
                    format!("{name:?} is not a field; accepted: {}", field_names()),
                ),
                (k, Some(_), _) if k != FaultKind::Xid => {
                    self.err(key("xid"), "is set but kind is not \"xid\"")
                }
                (k, _, Some(_)) if k != FaultKind::Field => {
                    self.err(key("field"), "is set but kind is not \"field\"")
                }
                _ => {}
            }
        }
    }
}

impl Validator {
    fn plugins(&mut self, p: &PluginsConfig, list: &[PluginConfig], reporters: &[PluginConfig]) {
        if !(1..=100).contains(&p.max_failures) {
            self.err(
                "plugins.max_failures",
                format!("{} is out of range; accepted: 1 to 100", p.max_failures),
            );
        }
        if p.failure_window < Duration::from_secs(1)
            || p.failure_window > Duration::from_secs(86400)
        {
            self.err(
                "plugins.failure_window",
                format!("{} is out of range; accepted: 1s to 1day", show(p.failure_window)),
            );
        }
        // Names are unique across power plugins and reporters: they tag metrics and
        // events, and name each plugin's state file.
        let mut names = HashSet::new();
        let entries = list.iter().enumerate().map(|(i, c)| (format!("plugin[{i}]"), c));
        let reporters = reporters.iter().enumerate().map(|(i, c)| (format!("reporter[{i}]"), c));
        for (at, c) in entries.chain(reporters) {
            if self.plugin_entry(&at, c)
                && (!names.insert(c.name.as_str()) || c.name == "static" || c.name == "guard")
            {
                self.err(format!("{at}.name"), format!("{:?} is used twice or reserved; accepted: a name no other plugin or reporter has, other than \"static\" and \"guard\"", c.name));
            }
            if at.starts_with("reporter") && !c.grants.is_empty() {
                self.err(format!("{at}.grants"), "a reporter sets no power limits; accepted: none");
            }
        }
    }

    /// One plugin's entry (`[[plugin]]`, `[jobs.scheduler]`) under `at`; whether its name
    /// is valid.
    fn plugin_entry(&mut self, at: &str, c: &PluginConfig) -> bool {
        {
            let key = |k: &str| format!("{at}.{k}");
            let valid = !c.name.is_empty()
                && c.name.len() <= 64
                && c.name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !valid {
                self.err(
                    key("name"),
                    format!(
                        "{:?} is not a plugin name; accepted: 1 to 64 of a-z, 0-9 and '-'",
                        c.name
                    ),
                );
            }
            if c.deadline < Duration::from_millis(1) || c.deadline > Duration::from_secs(1) {
                self.err(
                    key("deadline"),
                    format!("{} is out of range; accepted: 1ms to 1s", show(c.deadline)),
                );
            }
            if !(1..=4096).contains(&c.memory_mib) {
                self.err(
                    key("memory_mib"),
                    format!("{} is out of range; accepted: 1 to 4096", c.memory_mib),
                );
            }
            if let Some(r) = c.recycle_mib
                && !(1..c.memory_mib).contains(&r)
            {
                self.err(
                    key("recycle_mib"),
                    format!(
                        "{r} is out of range; accepted: 1 to {} (below memory_mib, the cap it recycles ahead of)",
                        c.memory_mib.saturating_sub(1)
                    ),
                );
            }
            if !(1..=10240).contains(&c.state_kib) {
                self.err(
                    key("state_kib"),
                    format!("{} is out of range; accepted: 1 to 10240", c.state_kib),
                );
            }
            if c.grants.len() != c.grants.iter().collect::<HashSet<_>>().len() {
                self.err(
                    key("grants"),
                    "lists a grant twice; accepted: \"lower\" and \"raise\", each at most once",
                );
            }
            valid
        }
    }

    fn jobs(&mut self, j: &JobsConfig) {
        if !(1..=100_000).contains(&j.max_queue) {
            self.err(
                "jobs.max_queue",
                format!("{} is out of range; accepted: 1 to 100000", j.max_queue),
            );
        }
        if j.keep_finished > 100_000 {
            self.err(
                "jobs.keep_finished",
                format!("{} is out of range; accepted: 0 to 100000", j.keep_finished),
            );
        }
        if j.kill_grace > Duration::from_secs(600) {
            self.err(
                "jobs.kill_grace",
                format!("{} is out of range; accepted: 0s to 10min", show(j.kill_grace)),
            );
        }
        if !(1..=(1 << 20)).contains(&j.log_max_kib) {
            self.err(
                "jobs.log_max_kib",
                format!("{} is out of range; accepted: 1 to 1048576 (1 GiB)", j.log_max_kib),
            );
        }
        if !(matches!(j.cgroup.as_str(), "off" | "own") || Path::new(&j.cgroup).is_absolute()) {
            self.err("jobs.cgroup", format!("{:?} is not a cgroup setting; accepted: \"off\", \"own\" (the agent's cgroup, delegated by the unit) or the absolute path of a cgroup v2 directory", j.cgroup));
        }
        if !matches!(j.fleet_submit.as_str(), "off" | "signed" | "unsigned") {
            self.err(
                "jobs.fleet_submit",
                format!("{:?}; accepted: \"off\", \"signed\", \"unsigned\"", j.fleet_submit),
            );
        }
        if let Some(s) = &j.scheduler {
            self.plugin_entry("jobs.scheduler", s);
            if !s.grants.is_empty() {
                self.err(
                    "jobs.scheduler.grants",
                    "a scheduler sets no power limits; accepted: none",
                );
            }
        }
    }
}

impl Validator {
    fn mqtt(&mut self, m: &MqttConfig) {
        match parse_url(&m.url) {
            Ok((tls, _, _)) => {
                if !tls && (m.ca_file.is_some() || m.cert_file.is_some()) {
                    self.err(
                        "mqtt.ca_file",
                        "is set but the url is mqtt://; accepted: TLS files only with mqtts://",
                    );
                }
                if tls && m.ca_file.is_none() {
                    self.err(
                        "mqtt.ca_file",
                        "missing; mqtts:// needs the CA certificate (PEM) that signed the broker's",
                    );
                }
            }
            Err(e) => self.err("mqtt.url", e),
        }
        if m.cert_file.is_some() != m.key_file.is_some() {
            self.err(
                "mqtt.cert_file",
                "cert_file and key_file go together; accepted: both or neither",
            );
        }
        if m.password_file.is_some() && m.username.is_none() {
            self.err("mqtt.password_file", "is set without mqtt.username");
        }
        let topic_ok = |t: &str| {
            !t.is_empty()
                && t.len() <= 512
                && !t.contains(['+', '#'])
                && !t.starts_with(['/', '$'])
                && !t.ends_with('/')
                && t.chars().all(crate::control::id_char)
        };
        if !topic_ok(&m.root) {
            self.err("mqtt.root", format!("{:?} is not a topic root; accepted: up to 512 bytes of topic levels without '+', '#', control or invisible formatting characters, a leading '$' or a leading or trailing '/'", m.root));
        }
        if let Some(c) = &m.client_id
            && (c.is_empty()
                || c.len() > 128
                || c.contains(['+', '#', '/'])
                || !c.chars().all(crate::control::id_char))
        {
            self.err(
                "mqtt.client_id",
                format!("{c:?}; accepted: 1 to 128 characters without '+', '#', '/', control or invisible formatting characters"),
            );
        }
        let secs = |d: Duration| d.as_secs_f64();
        if !(5.0..=3600.0).contains(&secs(m.keep_alive)) {
            self.err(
                "mqtt.keep_alive",
                format!("{} is out of range; accepted: 5s to 1h", show(m.keep_alive)),
            );
        }
        if !(0.1..=3600.0).contains(&secs(m.reconnect_max)) {
            self.err(
                "mqtt.reconnect_max",
                format!("{} is out of range; accepted: 100ms to 1h", show(m.reconnect_max)),
            );
        }
        if m.session_expiry > Duration::from_secs(u32::MAX as u64) {
            self.err(
                "mqtt.session_expiry",
                format!("{} is out of range; accepted: 0s to 136years", show(m.session_expiry)),
            );
        }
        if !(1..=100_000).contains(&m.replay_rate) {
            self.err(
                "mqtt.replay_rate",
                format!(
                    "{} is out of range; accepted: 1 to 100000 records per second",
                    m.replay_rate
                ),
            );
        }
        if !(1..=1000).contains(&m.inflight) {
            self.err(
                "mqtt.inflight",
                format!("{} is out of range; accepted: 1 to 1000", m.inflight),
            );
        }
        if !(4..=1 << 30).contains(&m.outbox.max_kib) {
            self.err(
                "mqtt.outbox.max_kib",
                format!("{} is out of range; accepted: 4 to 1073741824 (1 TiB)", m.outbox.max_kib),
            );
        }
        if !(4..=1 << 20).contains(&m.outbox.segment_kib) {
            self.err(
                "mqtt.outbox.segment_kib",
                format!("{} is out of range; accepted: 4 to 1048576", m.outbox.segment_kib),
            );
        }
        if m.outbox.max_age < Duration::from_secs(1) {
            self.err(
                "mqtt.outbox.max_age",
                format!("{} is out of range; accepted: at least 1s", show(m.outbox.max_age)),
            );
        }
        let c = &m.commands;
        if c.require_signed && c.public_keys.is_empty() && c.public_key_files.is_empty() {
            self.err("mqtt.commands.require_signed", "is true but no public key is configured; accepted: public_keys or public_key_files");
        }
        if !(1..=1024).contains(&c.max_payload_kib) {
            self.err(
                "mqtt.commands.max_payload_kib",
                format!("{} is out of range; accepted: 1 to 1024", c.max_payload_kib),
            );
        }
        if c.max_validity < Duration::from_secs(1) || c.max_validity > c.id_window {
            self.err("mqtt.commands.max_validity", format!("{} is out of range; accepted: 1s up to id_window ({}), so that a replay is caught by its id or its expiry", show(c.max_validity), show(c.id_window)));
        }
    }
}

fn field_names() -> String {
    Field::ALL.iter().map(|f| f.name()).collect::<Vec<_>>().join(", ")
}
