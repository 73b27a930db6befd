//! The queue on disk: each job in `<dir>/<id>/job.json` (beside its logs), written whole
//! through `state::atomic_write` when it changes, so that a change costs one small file
//! whatever the queue's length, and a crash leaves each job as it was or as it became;
//! and the next id in `<dir>/next-id`. A job file that cannot be read is set aside
//! (`job.json.bad-<ms>`) with a `state-set-aside` event, never a reason to drop the rest;
//! ids go on after the highest kept anywhere, never reused.

use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use super::Job;
use crate::telemetry::Event;

const JOB: &str = "job.json";
const NEXT_ID: &str = "next-id";

/// What was kept.
#[derive(Debug, Default)]
pub struct Saved {
    pub next_id: u64,
    pub jobs: Vec<Job>,
}

/// The jobs kept in `dir`, and an event for each file that had to be set aside.
pub fn load(dir: &Path) -> (Saved, Vec<Event>) {
    let mut saved = Saved { next_id: 1, jobs: Vec::new() };
    let mut events = Vec::new();
    let mut set_aside = |path: &Path, error: String| {
        let moved_to = match crate::state::set_aside(path) {
            Ok(p) => p.display().to_string(),
            Err(e) => format!("(could not be moved: {e})"),
        };
        tracing::error!(path = %path.display(), %error, %moved_to, "a job's state file cannot be read; set aside (the job is no longer managed: see the file)");
        events.push(Event::StateSetAside { path: path.display().to_string(), error, moved_to });
    };
    let next = dir.join(NEXT_ID);
    match crate::state::read(&next)
        .map(|b| b.map(|b| String::from_utf8_lossy(&b).trim().parse::<u64>()))
    {
        Ok(None) => {}
        Ok(Some(Ok(n))) => saved.next_id = n,
        Ok(Some(Err(e))) => set_aside(&next, format!("not a job id: {e}")),
        Err(e) => set_aside(&next, e.to_string()),
    }
    let mut ids: Vec<u64> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .collect();
    ids.sort_unstable();
    for id in ids {
        saved.next_id = saved.next_id.max(id + 1);
        let path = dir.join(id.to_string()).join(JOB);
        let parsed = crate::state::read(&path).map_err(|e| e.to_string()).and_then(|b| {
            b.map(|b| serde_json::from_slice::<Job>(&b).map_err(|e| e.to_string())).transpose()
        });
        match parsed {
            Ok(Some(job)) if job.id == id => saved.jobs.push(job),
            Ok(Some(job)) => {
                set_aside(&path, format!("it holds job {} in the directory of job {id}", job.id))
            }
            // A directory without a job file: its logs, from a job set aside earlier.
            Ok(None) => {}
            Err(e) => set_aside(&path, e),
        }
    }
    (saved, events)
}

/// Keep `job`.
pub fn save_job(dir: &Path, job: &Job) -> std::io::Result<()> {
    let jdir = dir.join(job.id.to_string());
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&jdir)?;
    crate::state::atomic_write(&jdir.join(JOB), &serde_json::to_vec(job).expect("jobs serialise"))
}

/// Keep the next id.
pub fn save_next_id(dir: &Path, next: u64) -> std::io::Result<()> {
    crate::state::atomic_write(&dir.join(NEXT_ID), next.to_string().as_bytes())
}
