//! The calibration file and its types: each GPU's work-per-watt curve, as `gpulet
//! calibrate` measures it (`calibrate.rs`) and the agent, its birth message and the power
//! plugins read it. A leaf: the agent and the plugin host need the types without the
//! command that makes them.

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::cuda::CudaError;
use crate::gpu::{GpuError, GpuInfo};

/// The `schema` of a calibration file of this layout.
pub const SCHEMA: &str = "gpulet.calibration.v1";
/// A calibration file: one curve per GPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    pub schema: String,
    /// When it was measured, ms since the Unix epoch.
    pub created_ms: u64,
    /// `nvml` or `sim`.
    pub backend: String,
    /// The load that ran: `cuda-fp32-fma` or `sim-compute`.
    pub load: String,
    /// The unit of `work_per_s`.
    pub unit: String,
    pub gpus: Vec<Curve>,
}

/// One GPU's curve, highest limit first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Curve {
    pub index: u32,
    /// The GPU it was measured on: a curve is used only for the GPU with this UUID.
    pub uuid: String,
    pub name: String,
    pub points: Vec<Point>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Point {
    /// The limit the GPU enforced, watts.
    pub limit_w: f64,
    /// Mean power drawn, watts.
    pub power_w: f64,
    /// Work done per second, in the file's unit.
    pub work_per_s: f64,
    /// `work_per_s` over the GPU's best: 1 at the top of the curve.
    pub relative: f64,
}

/// What can go wrong calibrating. Messages say what to do.
#[derive(Debug, thiserror::Error)]
pub enum CalibrateError {
    #[error(transparent)]
    Cuda(#[from] CudaError),
    #[error(
        "calibration sets power limits, and GPU {gpu} refused: {error}. Run `gpulet calibrate` as root (or with CAP_SYS_ADMIN), with the GPUs idle"
    )]
    SetLimit { gpu: u32, error: GpuError },
    #[error(
        "no GPU of this node can be calibrated (none allows setting its power limit outside MIG mode)"
    )]
    NothingToCalibrate,
    #[error("GPU {0} stopped answering during calibration")]
    Lost(u32),
    #[error("calibration interrupted; the limits found at start were put back")]
    Interrupted,
    #[error("calibration file {path}: {error}")]
    File { path: String, error: String },
}

impl Calibration {
    /// Read a calibration file.
    pub fn load(path: &Path) -> Result<Calibration, CalibrateError> {
        let err = |error: String| CalibrateError::File { path: path.display().to_string(), error };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let c: Calibration = serde_json::from_str(&text)
            .map_err(|e| err(format!("{e}; expected a file written by `gpulet calibrate`")))?;
        if c.schema != SCHEMA {
            return Err(err(format!("schema {:?}; this gpulet reads {SCHEMA:?}", c.schema)));
        }
        for g in &c.gpus {
            let bad = g.points.is_empty()
                || g.points.iter().any(|p| {
                    ![p.limit_w, p.power_w, p.work_per_s, p.relative]
                        .iter()
                        .all(|v| v.is_finite() && *v >= 0.0)
                        || p.relative > 1.0
                });
            if bad {
                return Err(err(format!(
                    "GPU {}: points must be finite and non-negative, with relative at most 1",
                    g.index
                )));
            }
        }
        Ok(c)
    }

    /// Write it durably (`state::atomic_write`).
    pub fn save(&self, path: &Path) -> Result<(), CalibrateError> {
        let err = |e: std::io::Error| CalibrateError::File {
            path: path.display().to_string(),
            error: e.to_string(),
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let json = serde_json::to_string_pretty(self).expect("calibration serialises") + "\n";
        crate::state::atomic_write(path, json.as_bytes()).map_err(err)
    }

    /// Each GPU's curve, matched by UUID (a curve of a GPU no longer in the node, or one
    /// swapped in its slot, is not used).
    pub fn for_inventory(&self, inventory: &[GpuInfo]) -> Vec<Option<Arc<Curve>>> {
        inventory
            .iter()
            .map(|g| self.gpus.iter().find(|c| c.uuid == g.uuid).map(|c| Arc::new(c.clone())))
            .collect()
    }
}
