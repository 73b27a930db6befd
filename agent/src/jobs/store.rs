//! The queue on disk: `queue.json` in the jobs directory, written whole through
//! `state::atomic_write` (so a crash leaves the old queue or the new one). A file that
//! cannot be read is set aside (`queue.json.bad-<ms>`) with a `state-set-aside` event,
//! and the ids go on after the highest job directory found, so that no id is reused
//! and no job's logs are taken over.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::Job;
use crate::telemetry::Event;

const FILE: &str = "queue.json";
const VERSION: u32 = 1;

#[derive(Serialize)]
struct OnDiskRef<'a> {
    version: u32,
    next_id: u64,
    jobs: Vec<&'a Job>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OnDisk {
    version: u32,
    next_id: u64,
    jobs: Vec<Job>,
}

/// What was kept.
#[derive(Debug, Default)]
pub struct Saved {
    pub next_id: u64,
    pub jobs: Vec<Job>,
}

/// The queue in `dir`; an event when its file had to be set aside.
pub fn load(dir: &Path) -> (Saved, Option<Event>) {
    let path = dir.join(FILE);
    let parsed = crate::state::read(&path).map_err(|e| e.to_string()).and_then(|bytes| {
        let Some(bytes) = bytes else { return Ok(None) };
        let d: OnDisk = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
        if d.version != VERSION {
            return Err(format!(
                "version {} is not one this agent reads; accepted: {VERSION}",
                d.version
            ));
        }
        Ok(Some(d))
    });
    match parsed {
        Ok(None) => (Saved { next_id: first_free_id(dir), jobs: Vec::new() }, None),
        Ok(Some(d)) => {
            let next_id = d.next_id.max(d.jobs.iter().map(|j| j.id + 1).max().unwrap_or(1));
            (Saved { next_id, jobs: d.jobs }, None)
        }
        Err(error) => {
            let moved_to = match crate::state::set_aside(&path) {
                Ok(p) => p.display().to_string(),
                Err(e) => format!("(could not be moved: {e})"),
            };
            tracing::error!(path = %path.display(), %error, %moved_to, "the job queue cannot be read; set aside, the queue starts empty (its jobs are in the file set aside)");
            let event = Event::StateSetAside { path: path.display().to_string(), error, moved_to };
            (Saved { next_id: first_free_id(dir), jobs: Vec::new() }, Some(event))
        }
    }
}

/// After the highest job directory in `dir` (each job's logs are in `<dir>/<id>/`).
fn first_free_id(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .max()
        .map_or(1, |m| m + 1)
}

/// Write the queue.
pub fn save<'a>(
    dir: &Path,
    next_id: u64,
    jobs: impl Iterator<Item = &'a Job>,
) -> std::io::Result<()> {
    let d = OnDiskRef { version: VERSION, next_id, jobs: jobs.collect() };
    crate::state::atomic_write(&dir.join(FILE), &serde_json::to_vec(&d).expect("jobs serialise"))
}
