//! The top-level error: each layer's error, wrapped, with the process exit code it maps to.

use crate::config::ConfigErrors;
use crate::gpu::GpuError;
use crate::plugin::PluginError;
use crate::telemetry::SinkError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration:\n{0}")]
    Config(#[from] ConfigErrors),
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Plugin(#[from] PluginError),
    #[error(transparent)]
    Mqtt(#[from] crate::mqtt::MqttError),
    #[error(transparent)]
    Calibrate(#[from] crate::calibration::CalibrateError),
    #[error(transparent)]
    Cuda(#[from] crate::cuda::CudaError),
    #[error("the plugin {0}")]
    PluginCall(String),
    #[error("{0}")]
    Command(String),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    /// A command that chose its own exit code (`gpulet status`: a monitoring check's).
    #[error("{message}")]
    Exit { code: u8, message: String },
}

impl Error {
    /// 2 for configuration (and usage) errors, which the operator fixes in the file;
    /// the chosen code for `Exit`; 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config(_) | Error::Plugin(PluginError::Config { .. }) => 2,
            Error::Exit { code, .. } => *code,
            _ => 1,
        }
    }
}
