//! The `power` world's binding: a power plugin is an [`Instance`] of it, and its export
//! `decide-power` returns at most [`MAX_ACTIONS`] actions.

use wasmtime::Store;
use wasmtime::component::InstancePre;

use super::bindings::{Power, PowerPre};
use super::host::{CallContext, HostState, PluginMetric};
pub use super::sandbox::{Fault, Limits};
use super::wit;
use super::world::Instance;

/// Most actions one `decide-power` call may return (a node has at most a few dozen
/// GPUs; more is a plugin out of control, and each action may become an audit event).
pub const MAX_ACTIONS: usize = 1024;

/// What one call returned, with what the plugin emitted on the side.
#[derive(Debug, Default)]
pub struct CallOutput {
    pub actions: Vec<wit::PowerAction>,
    pub metrics: Vec<PluginMetric>,
    /// Log lines and metrics dropped by the host's per-call limits.
    pub dropped: u32,
}

/// A power plugin, started.
pub type PowerPlugin = Instance<Power>;

super::world::impl_world!(Power, PowerPre, "power");

impl Instance<Power> {
    /// Call `decide-power` on `snapshot`, whose context is `cx` (what `gpu-curve` and
    /// `wall-clock` answer).
    pub fn decide(
        &mut self,
        snapshot: &wit::Snapshot,
        cx: &CallContext,
    ) -> Result<CallOutput, Fault> {
        let (actions, side) = self.call(
            cx,
            |b, s| b.call_decide_power(s, snapshot),
            |a: &Vec<wit::PowerAction>| (a.len() > MAX_ACTIONS).then_some((a.len(), MAX_ACTIONS)),
        )?;
        Ok(CallOutput { actions, metrics: side.metrics, dropped: side.dropped })
    }
}
