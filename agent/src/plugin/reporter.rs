//! The `reporter` world's binding: a reporter plugin is an [`Instance`] of it; its export
//! `report` returns metrics and events for the tick. What the host keeps of them is
//! decided by the reporting stage (`reporters.rs`); here only an output so long that the
//! plugin is plainly out of control is a fault.

use wasmtime::Store;
use wasmtime::component::InstancePre;

use super::host::{CallContext, HostState};
use super::reporter_bindings::{Reporter, ReporterPre};
use super::sandbox::{Fault, Side};
use super::wit;
use super::world::Instance;

/// Most items one `report` call may return before the call counts as a fault (the
/// stage keeps far fewer: [`super::reporters::MAX_ITEMS`]).
pub const MAX_RETURNED: usize = 4096;

/// A reporter plugin, started.
pub type ReporterPlugin = Instance<Reporter>;

super::world::impl_world!(Reporter, ReporterPre, "reporter");

impl Instance<Reporter> {
    /// Call `report` on `snapshot`, whose context is `cx`.
    pub fn report(
        &mut self,
        snapshot: &wit::Snapshot,
        cx: &CallContext,
    ) -> Result<(Vec<wit::ReportItem>, Side), Fault> {
        self.call(
            cx,
            |b, s| b.call_report(s, snapshot),
            |items: &Vec<wit::ReportItem>| {
                (items.len() > MAX_RETURNED).then_some((items.len(), MAX_RETURNED))
            },
        )
    }
}
