//! gpulet: a per-node agent that watches and controls a machine's NVIDIA GPUs, decides
//! through sandboxed policies and reports to the fleet. See `ARCHITECTURE.md` for the map.

pub mod agent;
pub mod calibrate;
pub mod calibration;
pub mod clock;
pub mod config;
pub mod control;
pub mod cuda;
pub mod demo;
pub mod error;
pub mod fleet_sim;
pub mod gpu;
pub mod guard;
pub mod jobs;
pub mod mqtt;
pub mod notify;
pub mod plugin;
pub mod policy;
pub mod record;
pub mod service;
pub mod setup;
pub mod snapshot;
pub mod state;
pub mod telemetry;
pub mod top;
