//! A job as submitted (`Submission`, the wire form the socket and MQTT share), checked
//! into a [`Spec`] against this node and its submitter. Every check names the field at
//! fault and what is accepted; nothing unchecked reaches the queue.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::gpu::GpuInfo;
use crate::gpu::sim::workload::WorkloadKind;

/// Longest a time limit may be: a year (beyond it, a limit is a typo).
pub const MAX_TIME_LIMIT_S: f64 = 365.0 * 86400.0;
/// The environment's whole size, bytes (names, values and separators).
pub const MAX_ENV_BYTES: usize = 48 * 1024;
/// The command line's whole size, bytes.
pub const MAX_COMMAND_BYTES: usize = 16 * 1024;
/// Labels per job, and the length of a label's key or value, or a job's name.
pub const MAX_LABELS: usize = 32;
pub const MAX_TEXT: usize = 128;

/// What a client sends (`docs/jobs.md`): strict JSON, unknown fields refused.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Submission {
    pub command: Vec<String>,
    /// A count (`2`) or specific GPUs (`["GPU-…", 3]`, UUIDs or indices). Default: 1.
    pub gpus: Option<Value>,
    /// Memory reserved on each GPU, MiB. Default: 0 (and the GPUs exclusive).
    pub mem_mib: Option<Value>,
    /// Default: exclusive unless `mem_mib` is given.
    pub exclusive: Option<bool>,
    #[serde(default)]
    pub priority: i32,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Absolute. Default: the submitter's home directory.
    pub cwd: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub time_limit_s: Option<f64>,
    pub power_cap_w: Option<f64>,
    /// On the simulated backend: what the job's GPUs run while it lives.
    pub workload: Option<WorkloadKind>,
    pub name: Option<String>,
}

/// Which GPUs a job gets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Want {
    Count(u32),
    /// By index (UUIDs resolved at submission).
    Specific(Vec<u32>),
}

impl Want {
    pub fn count(&self) -> usize {
        match self {
            Want::Count(n) => *n as usize,
            Want::Specific(g) => g.len(),
        }
    }
}

/// A checked job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub name: Option<String>,
    pub command: Vec<String>,
    pub gpus: Want,
    pub mem_mib: u64,
    pub exclusive: bool,
    pub priority: i32,
    pub labels: BTreeMap<String, String>,
    pub cwd: PathBuf,
    pub env: BTreeMap<String, String>,
    pub time_limit_ms: Option<u64>,
    pub power_cap_w: Option<f64>,
    pub workload: Option<WorkloadKind>,
}

/// Who submitted a job: the user it runs as.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Owner {
    pub user: String,
    pub uid: u32,
    pub gid: u32,
    /// How it came: `socket` or `mqtt`.
    pub via: String,
}

/// A user, from the system's user database (NSS).
#[derive(Debug, Clone, PartialEq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
    pub groups: Vec<u32>,
}

impl Account {
    pub fn by_uid(uid: u32) -> Result<Account, String> {
        let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .map_err(|e| format!("cannot look up uid {uid}: {e}"))?
            .ok_or_else(|| format!("uid {uid} has no user on this machine"))?;
        Ok(Account::from(user))
    }

    pub fn by_name(name: &str) -> Result<Account, String> {
        let user = nix::unistd::User::from_name(name)
            .map_err(|e| format!("cannot look up user {name:?}: {e}"))?
            .ok_or_else(|| format!("there is no user {name:?} on this machine"))?;
        Ok(Account::from(user))
    }
}

impl From<nix::unistd::User> for Account {
    fn from(u: nix::unistd::User) -> Account {
        let groups = std::ffi::CString::new(u.name.clone())
            .ok()
            .and_then(|n| nix::unistd::getgrouplist(&n, u.gid).ok())
            .map(|g| g.into_iter().map(|g| g.as_raw()).collect())
            .unwrap_or_else(|| vec![u.gid.as_raw()]);
        Account { name: u.name, uid: u.uid.as_raw(), gid: u.gid.as_raw(), home: u.dir, groups }
    }
}

/// A field at fault and why: `mem_mib: -5 is out of range; accepted: 0 to 81559 MiB`.
fn bad(field: &str, why: impl std::fmt::Display) -> String {
    format!("{field}: {why}")
}

impl Submission {
    /// Parse `args` (a JSON object) strictly; an error names the field.
    pub fn parse(args: Value) -> Result<Submission, String> {
        serde_path_to_error::deserialize(args).map_err(|e| {
            let path = e.path().to_string();
            if path == "." { format!("job: {}", e.inner()) } else { bad(&path, e.inner()) }
        })
    }

    /// Check it against this node's GPUs for `account`'s job.
    pub fn check(self, gpus: &[GpuInfo], account: &Account, sim: bool) -> Result<Spec, String> {
        let command = self.command;
        if command.first().is_none_or(|c| c.is_empty()) {
            return Err(bad("command", "empty; accepted: a program and its arguments"));
        }
        if command.iter().any(|a| a.contains('\0')) {
            return Err(bad("command", "an argument contains a NUL byte"));
        }
        if command.iter().map(|a| a.len() + 1).sum::<usize>() > MAX_COMMAND_BYTES {
            return Err(bad("command", format!("longer than {MAX_COMMAND_BYTES} bytes")));
        }
        let want = want(self.gpus, gpus)?;
        let mem_mib = mem(self.mem_mib.as_ref(), &want, gpus)?;
        let exclusive = self.exclusive.unwrap_or(self.mem_mib.is_none());
        if self.labels.len() > MAX_LABELS {
            return Err(bad(
                "labels",
                format!("{} labels; accepted: at most {MAX_LABELS}", self.labels.len()),
            ));
        }
        for (k, v) in &self.labels {
            let key_ok = !k.is_empty()
                && k.len() <= MAX_TEXT
                && k.chars().all(|c| c.is_ascii_alphanumeric() || "._-/".contains(c));
            if !key_ok {
                return Err(bad(
                    "labels",
                    format!(
                        "{k:?} is not a label key; accepted: 1 to {MAX_TEXT} of A-Z a-z 0-9 . _ - /"
                    ),
                ));
            }
            if v.len() > MAX_TEXT || !v.chars().all(crate::control::id_char) {
                return Err(bad(
                    &format!("labels.{k}"),
                    format!("accepted: up to {MAX_TEXT} printable characters"),
                ));
            }
        }
        if let Some(n) = &self.name
            && (n.is_empty() || n.len() > MAX_TEXT || !n.chars().all(crate::control::id_char))
        {
            return Err(bad("name", format!("accepted: 1 to {MAX_TEXT} printable characters")));
        }
        let env = self.env;
        let mut size = 0;
        for (k, v) in &env {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(bad(
                    "env",
                    format!(
                        "{k:?} is not a variable name; accepted: a non-empty name without '=' or NUL"
                    ),
                ));
            }
            if v.contains('\0') {
                return Err(bad(&format!("env.{k}"), "the value contains a NUL byte"));
            }
            size += k.len() + v.len() + 2;
        }
        if size > MAX_ENV_BYTES {
            return Err(bad("env", format!("{size} bytes; accepted: at most {MAX_ENV_BYTES}")));
        }
        let time_limit_ms = match self.time_limit_s {
            None => None,
            Some(s) if s.is_finite() && s > 0.0 && s <= MAX_TIME_LIMIT_S => {
                Some((s * 1000.0).ceil() as u64)
            }
            Some(s) => {
                return Err(bad(
                    "time_limit_s",
                    format!(
                        "{s} is out of range; accepted: more than 0, at most {MAX_TIME_LIMIT_S} s (a year)"
                    ),
                ));
            }
        };
        let power_cap_w = self.power_cap_w.map(|w| cap(w, &want, gpus)).transpose()?;
        if power_cap_w.is_some() && !exclusive {
            return Err(bad(
                "power_cap_w",
                "only an exclusive job may cap its GPUs (on shared GPUs the cap would hold other users' jobs too); accepted: with exclusive, or no cap",
            ));
        }
        if self.workload.is_some() && !sim {
            return Err(bad(
                "workload",
                "only the simulated backend runs workloads; leave it out on a real node",
            ));
        }
        let cwd = match self.cwd {
            Some(c) => PathBuf::from(c),
            None => account.home.clone(),
        };
        check_cwd(&cwd, account)?;
        Ok(Spec {
            name: self.name,
            command,
            gpus: want,
            mem_mib,
            exclusive,
            priority: self.priority,
            labels: self.labels,
            cwd,
            env,
            time_limit_ms,
            power_cap_w,
            workload: self.workload,
        })
    }
}

/// `gpus`: a count, or a list of UUIDs and indices.
fn want(v: Option<Value>, gpus: &[GpuInfo]) -> Result<Want, String> {
    let n = gpus.len();
    let accepted = format!(
        "accepted: a count from 1 to {n}, or a list of GPUs by UUID or index (0 to {})",
        n.saturating_sub(1)
    );
    match v {
        None if n == 0 => Err(bad("gpus", "this node has no GPUs")),
        None => Ok(Want::Count(1)),
        Some(Value::Number(c)) => match c.as_u64() {
            Some(c) if c >= 1 && c as usize <= n => Ok(Want::Count(c as u32)),
            _ => Err(bad("gpus", format!("{c} GPUs; this node has {n}; {accepted}"))),
        },
        Some(Value::Array(items)) => {
            if items.is_empty() {
                return Err(bad("gpus", format!("an empty list; {accepted}")));
            }
            let mut picked = Vec::new();
            for item in items {
                let index = match &item {
                    Value::Number(i) => i.as_u64().filter(|&i| (i as usize) < n).map(|i| i as u32),
                    Value::String(u) => {
                        gpus.iter().find(|g| g.uuid.eq_ignore_ascii_case(u)).map(|g| g.index)
                    }
                    _ => None,
                };
                let Some(index) = index else {
                    return Err(bad(
                        "gpus",
                        format!("{item} is not a GPU of this node; {accepted}"),
                    ));
                };
                if picked.contains(&index) {
                    return Err(bad("gpus", format!("GPU {index} is named twice")));
                }
                picked.push(index);
            }
            Ok(Want::Specific(picked))
        }
        Some(other) => Err(bad("gpus", format!("{other} is neither; {accepted}"))),
    }
}

/// `mem_mib`: whole MiB, at most what the smallest GPU it could get has.
fn mem(v: Option<&Value>, want: &Want, gpus: &[GpuInfo]) -> Result<u64, String> {
    let largest = match want {
        Want::Specific(g) => g.iter().map(|&i| gpus[i as usize].memory_total_mib).min(),
        // Any n of the GPUs: the n-th largest memory is the most all n can have.
        Want::Count(n) => {
            let mut m: Vec<u64> = gpus.iter().map(|g| g.memory_total_mib).collect();
            m.sort_unstable_by(|a, b| b.cmp(a));
            m.get(*n as usize - 1).copied()
        }
    }
    .unwrap_or(0);
    let Some(v) = v else { return Ok(0) };
    match v.as_u64() {
        Some(m) if m <= largest => Ok(m),
        _ => Err(bad(
            "mem_mib",
            format!(
                "{v} is out of range; accepted: whole MiB from 0 to {largest} (the memory of the GPUs it could get)"
            ),
        )),
    }
}

/// `power_cap_w`: a limit its GPUs can take.
fn cap(w: f64, want: &Want, gpus: &[GpuInfo]) -> Result<f64, String> {
    let range: Vec<&GpuInfo> = match want {
        Want::Specific(g) => g.iter().map(|&i| &gpus[i as usize]).collect(),
        Want::Count(_) => gpus.iter().collect(),
    };
    let lo = range.iter().map(|g| g.power_limit.min_w).fold(0.0, f64::max);
    let hi = range.iter().map(|g| g.power_limit.max_w).fold(f64::INFINITY, f64::min);
    if w.is_finite() && w >= lo && w <= hi {
        Ok(w)
    } else {
        Err(bad(
            "power_cap_w",
            format!("{w} W is out of range; accepted: {lo} to {hi} W (what its GPUs take)"),
        ))
    }
}

/// The working directory must exist and `account` must be able to enter it (by its
/// mode bits: owner, group, other; root enters anything).
fn check_cwd(cwd: &std::path::Path, account: &Account) -> Result<(), String> {
    if !cwd.is_absolute() {
        return Err(bad("cwd", format!("{} is not an absolute path", cwd.display())));
    }
    let m = std::fs::metadata(cwd).map_err(|e| bad("cwd", format!("{}: {e}", cwd.display())))?;
    if !m.is_dir() {
        return Err(bad("cwd", format!("{} is not a directory", cwd.display())));
    }
    let bit = if account.uid == 0 {
        return Ok(());
    } else if m.uid() == account.uid {
        0o100
    } else if account.groups.contains(&m.gid()) || m.gid() == account.gid {
        0o010
    } else {
        0o001
    };
    if m.mode() & bit == 0 {
        return Err(bad("cwd", format!("user {} cannot enter {}", account.name, cwd.display())));
    }
    Ok(())
}
