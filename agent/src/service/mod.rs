//! The agent as a local service: the control socket (`gpulet status` and the local
//! commands, `docs/socket.md`) and the Prometheus endpoint (`docs/metrics.md`). Both are
//! tokio tasks beside the loop; both reach it only through the control channel, as the
//! MQTT link does, so that a request is answered between ticks and checked by the same
//! `execute`. Neither can stop the agent: a socket or port that cannot be opened is
//! logged, and the agent goes on managing the GPUs without it.

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::agent::{Control, Status};
use crate::config::{MetricsConfig, SocketConfig};
use crate::mqtt::StatsSource;

pub mod client;
pub mod metrics;
pub mod peer;
pub mod socket;

/// How long a request waits for the loop (which answers between ticks): longer means the
/// loop is stuck, which the answer then says.
pub const LOOP_TIMEOUT: Duration = Duration::from_secs(3);

/// What the socket and the endpoint share: the way to the loop, and the MQTT link's
/// numbers when there is a link.
#[derive(Debug, Clone)]
pub struct Handle {
    pub control: mpsc::Sender<Control>,
    pub mqtt: Option<StatsSource>,
}

impl Handle {
    /// The agent's status, from the loop.
    pub async fn status(&self) -> Result<Status, String> {
        let (done, answer) = oneshot::channel();
        self.ask(Control::Status { done }, answer).await
    }

    /// Send `c` to the loop and wait for its answer on `answer`.
    pub async fn ask<T>(&self, c: Control, answer: oneshot::Receiver<T>) -> Result<T, String> {
        let waited = tokio::time::timeout(LOOP_TIMEOUT, async {
            self.control.send(c).await.map_err(|_| "the agent is stopping".to_owned())?;
            answer.await.map_err(|_| "the agent is stopping".to_owned())
        })
        .await;
        waited.unwrap_or_else(|_| {
            Err(format!(
                "the agent's loop did not answer within {} s (a tick is stuck)",
                LOOP_TIMEOUT.as_secs()
            ))
        })
    }
}

/// The socket and the endpoint, running.
#[derive(Debug, Default)]
pub struct Service {
    socket: Option<socket::Served>,
    metrics: Option<tokio::task::JoinHandle<()>>,
}

impl Service {
    /// Serve what the config enables, on the current tokio runtime. What cannot be served
    /// is logged as an error and left out.
    pub fn start(socket: &SocketConfig, metrics: &MetricsConfig, handle: Handle) -> Service {
        let mut service = Service::default();
        let dir = socket.path().parent().map(std::path::Path::to_path_buf);
        if socket.enabled && socket.path.is_none() && dir.as_ref().is_some_and(|d| !d.is_dir()) {
            // Outside the service (no runtime directory): not an error, but say so.
            tracing::warn!(
                path = %socket.path().display(),
                "no runtime directory for the control socket (the service's unit makes it); not served: set socket.path, or socket.enabled = false"
            );
        } else if socket.enabled {
            match socket::serve(socket, handle.clone()) {
                Ok(s) => service.socket = Some(s),
                Err(e) => tracing::error!(
                    path = %socket.path().display(),
                    error = %e,
                    "the control socket is not served (gpulet status and the local commands will not reach this agent); the agent goes on"
                ),
            }
        }
        if metrics.enabled {
            match metrics::serve(metrics.listen, handle) {
                Ok(task) => service.metrics = Some(task),
                Err(e) => tracing::error!(
                    listen = %metrics.listen,
                    error = %e,
                    "the metrics endpoint is not served; the agent goes on"
                ),
            }
        }
        service
    }

    /// Where the socket is served, if it is.
    pub fn socket_path(&self) -> Option<&PathBuf> {
        self.socket.as_ref().map(|s| &s.path)
    }

    /// Stop serving and remove the socket file.
    pub fn stop(self) {
        if let Some(s) = self.socket {
            s.stop();
        }
        if let Some(m) = self.metrics {
            m.abort();
        }
    }
}
