//! `gpulet plugin check` and `gpulet plugin run`: a plugin author's tools. `check` loads a
//! component as the agent would (import allowlist, world, API version, config
//! validation); `run` calls it once on a snapshot read from a JSON file and shows what it
//! decided and why, without any GPU, grant or guard in the way.

use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::engine::{LoadedComponent, PluginEngine};
use super::host::{CallContext, Curves, WallTime};
use super::kv::KvStore;
use super::power::{Limits, PowerPlugin};
use super::world::{Instance, World};
use super::{PluginError, wit};
use crate::calibration::{Curve, Point};

/// What `plugin check` found.
#[derive(Debug, Serialize)]
pub struct Report {
    pub name: String,
    pub version: String,
    pub api_version: String,
    pub kind: &'static str,
    pub imports: Vec<String>,
    pub compile_ms: f64,
    /// Loaded from the compile cache (not compiled now).
    pub cached: bool,
}

/// Load and start a plugin of any world the host runs (`power`, `job-scheduler`,
/// `reporter`) with `config` (JSON), for `plugin check`.
pub fn check(path: &Path, config: &str) -> Result<Report, PluginError> {
    let engine = author_engine()?;
    let loaded = engine.load(path)?;
    let name = name_of(path);
    // Each world the host runs, tried in turn: the first whose exports the component
    // has decides its kind.
    type Start =
        fn(&PluginEngine, &str, &LoadedComponent, &str) -> Result<wit::PluginInfo, PluginError>;
    let worlds: [(&'static str, Start); 3] = [
        ("power", started::<super::bindings::Power>),
        ("job-scheduler", started::<super::scheduler_bindings::JobScheduler>),
        ("reporter", started::<super::reporter_bindings::Reporter>),
    ];
    let mut last = None;
    for (kind, start) in worlds {
        match start(&engine, &name, &loaded, config) {
            Ok(info) => {
                return Ok(Report {
                    name: info.name,
                    version: info.version,
                    api_version: info.api_version,
                    kind,
                    imports: loaded.imports.clone(),
                    compile_ms: loaded.load_time.as_secs_f64() * 1000.0,
                    cached: loaded.source == super::cache::Source::Cached,
                });
            }
            Err(PluginError::WrongWorld { path, error, .. }) => last = Some((path, error)),
            Err(e) => return Err(e),
        }
    }
    let (path, error) = last.expect("three worlds tried");
    Err(PluginError::WrongWorld { path, world: "power, job-scheduler or reporter", error })
}

/// Start `loaded` as a plugin of world `W` (no GPUs, default limits) and say who it is.
fn started<W: World>(
    engine: &PluginEngine,
    name: &str,
    loaded: &LoadedComponent,
    config: &str,
) -> Result<wit::PluginInfo, PluginError> {
    let kv = Arc::new(Mutex::new(KvStore::in_memory(64 << 10)));
    let component = loaded.component.clone();
    Instance::<W>::start(engine, name, component, config.to_owned(), vec![], Limits::default(), kv)
        .map(|p| p.info().clone())
}

fn name_of(path: &Path) -> String {
    path.file_stem().map_or("plugin".into(), |s| s.to_string_lossy().replace('_', "-"))
}

/// The engine of the author's tools, with a compile cache of the user's own:
/// `$XDG_CACHE_HOME/gpulet/plugins`, else `~/.cache/gpulet/plugins` (with the agent's
/// checks: the folders must be the user's or root's and writable by no one else).
/// Without it every `plugin check` or `run` of a large component (a Python or JavaScript
/// policy embeds an interpreter) compiles it again, for seconds each time.
pub fn author_engine() -> Result<PluginEngine, PluginError> {
    PluginEngine::new(user_cache_dir().as_deref())
}

/// The user's own compile cache: `$XDG_CACHE_HOME/gpulet/plugins`, else
/// `~/.cache/gpulet/plugins`, made if missing; `None` when neither can be made.
pub fn user_cache_dir() -> Option<std::path::PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))?;
    let dir = base.join("gpulet").join("plugins");
    std::fs::create_dir_all(&dir)
        .inspect_err(
            |e| tracing::warn!(dir = %dir.display(), error = %e, "no plugin cache of the user's"),
        )
        .ok()?;
    Some(dir)
}

/// Load and start a power plugin with `config` (JSON); `gpus` are what `init` is told.
pub fn start(
    path: &Path,
    config: &str,
    gpus: &[wit::GpuInfo],
) -> Result<(PowerPlugin, Report), PluginError> {
    start_as(path, config, gpus, "power")
}

/// Load and start a plugin of world `W` (`kind` names it in the report).
pub fn start_as<W: World>(
    path: &Path,
    config: &str,
    gpus: &[wit::GpuInfo],
    kind: &'static str,
) -> Result<(Instance<W>, Report), PluginError> {
    let engine = author_engine()?;
    let loaded = engine.load(path)?;
    let name = name_of(path);
    let kv = Arc::new(Mutex::new(KvStore::in_memory(64 << 10)));
    let plugin = Instance::<W>::start(
        &engine,
        &name,
        loaded.component,
        config.to_owned(),
        gpus.to_vec(),
        Limits::default(),
        kv,
    )?;
    let info = plugin.info().clone();
    let report = Report {
        name: info.name,
        version: info.version,
        api_version: info.api_version,
        kind,
        compile_ms: loaded.load_time.as_secs_f64() * 1000.0,
        cached: loaded.source == super::cache::Source::Cached,
        imports: loaded.imports,
    };
    Ok((plugin, report))
}

/// A snapshot as a JSON file: the WIT `snapshot` record with snake_case keys; `throttle`
/// is a list of reason names, `health` one of `ok`, `degraded`, `lost`. See
/// `examples/snapshot.json`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotFile {
    #[serde(default)]
    pub seq: u64,
    #[serde(default)]
    pub now_ms: u64,
    /// Wall-clock time of the snapshot, ms since the epoch, and the node's UTC offset
    /// then (what `wall-clock` answers; absent: the time now, offset 0 if only the time
    /// is given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utc_offset_s: Option<i32>,
    pub budget_w: Option<f64>,
    pub gpus: Vec<GpuFile>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GpuFile {
    pub index: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    pub power_w: Option<f64>,
    pub power_limit_w: Option<f64>,
    pub energy_j: Option<f64>,
    pub temp_c: Option<f64>,
    pub util_pct: Option<f64>,
    pub mem_used_mib: Option<u64>,
    pub sm_clock_mhz: Option<u32>,
    #[serde(default)]
    pub throttle: Vec<String>,
    #[serde(default = "ok")]
    pub health: String,
    pub min_limit_w: f64,
    pub max_limit_w: f64,
    pub default_limit_w: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proposed_limit_w: Option<f64>,
    /// The GPU's work-per-watt curve (what `gpu-curve` answers), highest limit first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub curve: Option<Vec<CurvePointFile>>,
}

/// A point of a curve in a snapshot file: the fields of WIT's `curve-point`.
#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CurvePointFile {
    pub limit_w: f64,
    pub power_w: f64,
    pub work_per_s: f64,
    pub relative: f64,
}

fn ok() -> String {
    "ok".into()
}

/// The names of `t`'s reasons, as snapshot files write them.
const THROTTLE_NAMES: [(wit::Throttle, &str); 6] = [
    (wit::Throttle::GPU_IDLE, "gpu_idle"),
    (wit::Throttle::SW_POWER_CAP, "sw_power_cap"),
    (wit::Throttle::HW_SLOWDOWN, "hw_slowdown"),
    (wit::Throttle::SW_THERMAL, "sw_thermal"),
    (wit::Throttle::HW_THERMAL, "hw_thermal"),
    (wit::Throttle::HW_POWER_BRAKE, "hw_power_brake"),
];

impl SnapshotFile {
    /// The file form of a WIT snapshot (what `gpulet record` writes each tick).
    pub fn from_wit(s: &wit::Snapshot) -> SnapshotFile {
        let gpus = s
            .gpus
            .iter()
            .map(|g| GpuFile {
                index: g.index,
                uuid: None,
                power_w: g.power_w,
                power_limit_w: g.power_limit_w,
                energy_j: g.energy_j,
                temp_c: g.temp_c,
                util_pct: g.util_pct,
                mem_used_mib: g.mem_used_mib,
                sm_clock_mhz: g.sm_clock_mhz,
                throttle: THROTTLE_NAMES
                    .iter()
                    .filter(|(bit, _)| g.throttle.contains(*bit))
                    .map(|(_, name)| (*name).to_owned())
                    .collect(),
                health: match g.health {
                    wit::Health::Ok => "ok",
                    wit::Health::Degraded => "degraded",
                    wit::Health::Lost => "lost",
                }
                .into(),
                min_limit_w: g.min_limit_w,
                max_limit_w: g.max_limit_w,
                default_limit_w: g.default_limit_w,
                proposed_limit_w: None,
                curve: None,
            })
            .collect();
        SnapshotFile {
            seq: s.seq,
            now_ms: s.now_ms,
            ts_ms: None,
            utc_offset_s: None,
            budget_w: s.budget_w,
            gpus,
        }
    }

    pub fn read(path: &Path) -> Result<SnapshotFile, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let de = &mut serde_json::Deserializer::from_str(&text);
        serde_path_to_error::deserialize(de)
            .map_err(|e| format!("{}: {}: {}", path.display(), e.path(), e.inner()))
    }

    /// The WIT snapshot, or what is wrong with the file.
    pub fn to_wit(&self) -> Result<wit::Snapshot, String> {
        let gpus = self
            .gpus
            .iter()
            .enumerate()
            .map(|(i, g)| {
                let mut throttle = wit::Throttle::empty();
                for t in &g.throttle {
                    throttle |= match THROTTLE_NAMES.iter().find(|(_, name)| name == t) {
                        Some((bit, _)) => *bit,
                        None => return Err(format!("gpus[{i}].throttle: {t:?} is not a reason; accepted: gpu_idle, sw_power_cap, hw_slowdown, sw_thermal, hw_thermal, hw_power_brake")),
                    };
                }
                let health = match g.health.as_str() {
                    "ok" => wit::Health::Ok,
                    "degraded" => wit::Health::Degraded,
                    "lost" => wit::Health::Lost,
                    other => return Err(format!("gpus[{i}].health: {other:?}; accepted: ok, degraded, lost")),
                };
                Ok(wit::Gpu {
                    index: g.index,
                    power_w: g.power_w,
                    power_limit_w: g.power_limit_w,
                    energy_j: g.energy_j,
                    temp_c: g.temp_c,
                    util_pct: g.util_pct,
                    mem_used_mib: g.mem_used_mib,
                    sm_clock_mhz: g.sm_clock_mhz,
                    throttle,
                    health,
                    min_limit_w: g.min_limit_w,
                    max_limit_w: g.max_limit_w,
                    default_limit_w: g.default_limit_w,
                    proposed_limit_w: g.proposed_limit_w,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(wit::Snapshot { seq: self.seq, now_ms: self.now_ms, budget_w: self.budget_w, gpus })
    }

    /// What `gpu-curve` and `wall-clock` answer on this snapshot.
    pub fn context(&self) -> CallContext {
        CallContext { curves: self.curves(), wall: self.wall() }
    }

    /// The snapshot's wall-clock time, if it has one.
    pub fn wall(&self) -> Option<WallTime> {
        self.ts_ms.map(|unix_ms| WallTime { unix_ms, utc_offset_s: self.utc_offset_s.unwrap_or(0) })
    }

    /// The GPUs' curves, for `gpu-curve`, at their GPUs' indices.
    pub fn curves(&self) -> Curves {
        let n = self.gpus.iter().map(|g| g.index as usize + 1).max().unwrap_or(0);
        let mut curves = vec![None; n];
        for g in &self.gpus {
            let Some(points) = &g.curve else { continue };
            curves[g.index as usize] = Some(Arc::new(Curve {
                index: g.index,
                uuid: g.uuid.clone().unwrap_or_default(),
                name: "from snapshot".into(),
                points: points
                    .iter()
                    .map(|p| Point {
                        limit_w: p.limit_w,
                        power_w: p.power_w,
                        work_per_s: p.work_per_s,
                        relative: p.relative,
                    })
                    .collect(),
            }));
        }
        curves.into()
    }

    /// What `init` is told about the GPUs.
    pub fn gpu_infos(&self) -> Vec<wit::GpuInfo> {
        self.gpus
            .iter()
            .map(|g| wit::GpuInfo {
                index: g.index,
                uuid: g.uuid.clone().unwrap_or_else(|| format!("GPU-{}", g.index)),
                name: "from snapshot".into(),
                memory_total_mib: 0,
            })
            .collect()
    }
}
