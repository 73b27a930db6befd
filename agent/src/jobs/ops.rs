//! What the control socket asks of the queue (`docs/socket.md`): submit, list, show,
//! cancel, read a job's output. Answers are JSON for the socket's reply.

use std::io::{Read, Seek, SeekFrom};

use serde_json::{Value, json};

use super::spec::Submission;
use super::{Jobs, Submitter, Who, unix_ms};
use crate::control::Refusal;

/// The most output one `logs` request returns, bytes.
pub const MAX_CHUNK: u64 = 32 * 1024;

/// A request about jobs, from a local user.
#[derive(Debug, Clone, PartialEq)]
pub enum JobOp {
    Submit(Value),
    List {
        all: bool,
    },
    Get(u64),
    Cancel(u64),
    /// `stream` is `stdout` or `stderr`; from byte `offset`.
    Log {
        id: u64,
        stream: String,
        offset: u64,
    },
}

impl Jobs {
    /// Answer `op` for `who` (a local user: `Who::Local`).
    pub fn answer(&mut self, op: JobOp, who: Who) -> Result<Value, Refusal> {
        let now = unix_ms();
        match op {
            JobOp::Submit(args) => {
                let Who::Local { uid, .. } = who else {
                    return Err(Refusal::Rejected("a local submission needs a local user".into()));
                };
                let sub = Submission::parse(args).map_err(Refusal::Rejected)?;
                let id = self.submit(sub, Submitter::Local { uid })?;
                Ok(json!({"job": self.view(id, now)}))
            }
            JobOp::List { all } => {
                // Without their environments (the `job` op has them): a list of a
                // thousand jobs stays small.
                let jobs: Vec<Value> = self
                    .list(who, all)
                    .into_iter()
                    .map(|j| {
                        let mut v = self.view(j.id, now);
                        if let Some(spec) = v["spec"].as_object_mut() {
                            spec.remove("env");
                        }
                        v
                    })
                    .collect();
                Ok(json!({"jobs": jobs, "scheduler": self.scheduler_name()}))
            }
            JobOp::Get(id) => {
                self.get(id, who)?;
                Ok(json!({"job": self.view(id, now)}))
            }
            JobOp::Cancel(id) => self.cancel(id, who).map(|detail| json!({"detail": detail})),
            JobOp::Log { id, stream, offset } => {
                let ended = self.get(id, who)?.state.ended();
                if stream != "stdout" && stream != "stderr" {
                    return Err(Refusal::Rejected(format!(
                        "stream: {stream:?}; accepted: stdout, stderr"
                    )));
                }
                let (data, offset, rotated) = read_chunk(&self.log_path(id, &stream), offset);
                Ok(json!({"data": data, "offset": offset, "rotated": rotated, "ended": ended}))
            }
        }
    }

    /// A job as `gpulet jobs --json` shows it: what is kept, plus its run time now.
    fn view(&self, id: u64, now: u64) -> Value {
        let j = &self.jobs[&id];
        let mut v = serde_json::to_value(j).expect("jobs serialise");
        v["runtime_s"] = json!(j.runtime_s(now));
        v
    }
}

/// Up to [`MAX_CHUNK`] bytes of `path` from `offset` (as text; invalid UTF-8 replaced),
/// the offset after them, and whether the file was rotated under the reader (its
/// length is below `offset`: reading goes on from its start).
fn read_chunk(path: &std::path::Path, offset: u64) -> (String, u64, bool) {
    let Ok(mut f) = std::fs::File::open(path) else { return (String::new(), offset, false) };
    let len = f.metadata().map_or(0, |m| m.len());
    let (from, rotated) = if len < offset { (0, true) } else { (offset, false) };
    let mut buf = Vec::new();
    let read = f
        .seek(SeekFrom::Start(from))
        .and_then(|_| f.by_ref().take(MAX_CHUNK).read_to_end(&mut buf));
    if read.is_err() {
        return (String::new(), offset, rotated);
    }
    // Cut at a character boundary: the rest comes with the next chunk.
    let cut = match std::str::from_utf8(&buf) {
        Ok(_) => buf.len(),
        Err(e) if e.error_len().is_none() => e.valid_up_to(),
        Err(_) => buf.len(),
    };
    buf.truncate(cut);
    (String::from_utf8_lossy(&buf).into_owned(), from + cut as u64, rotated)
}
