//! The limits found at start, kept on disk (`start-limits.json` in `[nvml] state_dir`)
//! while an agent or a calibration runs, so that the node is handed back as it was
//! found: at a clean stop, or by the next start after a crash.

use std::collections::BTreeMap;

use super::GpuBackend;

/// The limits found at start, by GPU UUID, as kept on disk (`start-limits.json` in
/// `[nvml] state_dir`) while an agent or a calibration runs: a file left behind means
/// that run did not stop cleanly, and the next one puts these back.
pub type StartLimits = BTreeMap<String, f64>;

/// Each GPU's enforced limit now, by UUID.
pub fn current_limits(backend: &mut dyn GpuBackend) -> StartLimits {
    let inventory = backend.inventory().to_vec();
    backend
        .sample_all()
        .iter()
        .filter_map(|s| Some((inventory[s.index as usize].uuid.clone(), s.power_limit_w.value()?)))
        .collect()
}

/// The kept limits, or `None` when there is no file. Not JSON, or a limit that is not a
/// finite positive number, is an error naming the file.
pub fn read_start_limits(path: &std::path::Path) -> std::io::Result<Option<StartLimits>> {
    let Some(bytes) = crate::state::read(path)? else { return Ok(None) };
    let limits: StartLimits = serde_json::from_slice(&bytes)
        .map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))?;
    if let Some((uuid, w)) = limits.iter().find(|(_, w)| !(w.is_finite() && **w > 0.0)) {
        return Err(std::io::Error::other(format!(
            "{}: {uuid}: {w} is not a power limit",
            path.display()
        )));
    }
    Ok(Some(limits))
}

/// Keep `limits` at `path`, durably (`state::atomic_write`), in a directory checked as
/// state (`state::check_dir`: made if missing).
pub fn write_start_limits(path: &std::path::Path, limits: &StartLimits) -> std::io::Result<()> {
    crate::state::check_dir(crate::state::parent(path)).map_err(std::io::Error::other)?;
    crate::state::atomic_write(path, &serde_json::to_vec(limits).expect("limits serialise"))
}
