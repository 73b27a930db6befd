//! The node snapshot: everything the agent knows about the node at one tick, built once
//! and never changed. Policies decide from it, the guard checks against it, telemetry
//! reports it; none of them can see a different picture of the same tick.

use std::sync::Arc;

use crate::calibration::Curve;
use crate::gpu::{GpuInfo, GpuSample};

#[derive(Debug, Clone)]
pub struct NodeSnapshot {
    /// The telemetry sequence number of this tick.
    pub seq: u64,
    /// Wall-clock time of the sample, milliseconds since the Unix epoch.
    pub ts_ms: u64,
    /// The node's offset from UTC then, seconds east (`host.wall-clock` answers both).
    pub utc_offset_s: i32,
    /// Monotonic milliseconds since the agent started: what policies should use for
    /// time, since it never jumps.
    pub now_ms: u64,
    pub inventory: Arc<[GpuInfo]>,
    /// One per GPU of the inventory, same order.
    pub samples: Vec<GpuSample>,
    /// Each GPU's effective limit range (hardware narrowed by the operator's bounds):
    /// what the guard will apply at most and at least.
    pub bounds: Arc<[Bounds]>,
    /// The node power budget in force, if any.
    pub budget_w: Option<f64>,
    /// Each GPU's work-per-watt curve, where `gpulet calibrate` measured one.
    pub curves: Arc<[Option<Arc<Curve>>]>,
}

impl NodeSnapshot {
    pub fn gpus(&self) -> impl Iterator<Item = (&GpuInfo, &GpuSample)> {
        self.inventory.iter().zip(&self.samples)
    }

    /// Sum of the power of the GPUs whose power could be read.
    pub fn node_power_w(&self) -> f64 {
        self.samples.iter().filter_map(|s| s.power_w.value()).sum()
    }
}

/// A GPU's effective limit range, watts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bounds {
    pub lo: f64,
    pub hi: f64,
}
