//! The control socket: a Unix stream socket speaking JSON lines (`docs/socket.md`). One
//! request per line, one reply per line, as many as the caller likes on a connection.
//!
//! Who may do what: connecting is governed by the file's mode and group (`[socket]`);
//! anyone connected may read (`status`); a change (`set-power-budget`…) needs root, the
//! agent's own user, or `admin_group`, judged from the kernel's peer credentials. Each
//! change is logged with the caller's uid and pid (the audit line), refused or not.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, oneshot};
use tracing::{info, warn};

use super::{Handle, peer};
use crate::agent::Control;
use crate::config::SocketConfig;
use crate::control::{REQUEST_NAMES, Refusal, Request};
use crate::jobs::{JobOp, Who};

/// The longest request line.
pub const MAX_LINE: usize = 256 * 1024;
/// Connections served at once; more wait in the kernel's backlog. (Each costs a task
/// and a 8 KiB buffer; a local user holding them all is closed out within `LIFETIME`.)
const MAX_CONNECTIONS: usize = 64;
/// A connection that sends nothing, or does not take its reply, for this long is closed.
const IDLE: Duration = Duration::from_secs(10);
/// And none lasts longer than this (a client that asks again every few seconds, or never
/// reads, cannot keep its slot).
const LIFETIME: Duration = Duration::from_secs(60);

/// The socket, served.
#[derive(Debug)]
pub struct Served {
    pub path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Served {
    /// Stop accepting and remove the socket file.
    pub fn stop(self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Who is asking, from the kernel.
#[derive(Debug, Clone, Copy)]
struct Caller {
    uid: u32,
    gid: u32,
    pid: Option<i32>,
}

struct Ctx {
    handle: Handle,
    own_uid: u32,
    admin_gid: Option<u32>,
    refusals_logged: std::sync::Mutex<std::collections::HashMap<u32, std::time::Instant>>,
}

impl Ctx {
    fn may_change(&self, c: &Caller) -> bool {
        c.uid == 0
            || c.uid == self.own_uid
            || self.admin_gid.is_some_and(|g| peer::in_group(c.uid, c.gid, g))
    }

    /// Whether to log a refusal for `uid` now: the first, then at most one a minute (a
    /// reader sending refused requests in a loop must not flood the journal, where
    /// journald's rate limit would then drop the agent's real warnings).
    fn log_refusal(&self, uid: u32) -> bool {
        let mut last = self.refusals_logged.lock().expect("refusals");
        let now = std::time::Instant::now();
        match last.get(&uid) {
            Some(t) if now.duration_since(*t) < Duration::from_secs(60) => false,
            _ => {
                if last.len() > 1024 {
                    last.clear();
                }
                last.insert(uid, now);
                true
            }
        }
    }
}

/// Bind the socket `cfg` describes (replacing a stale one a crash left), give it its
/// mode and group, and serve it on the current runtime.
pub fn serve(cfg: &SocketConfig, handle: Handle) -> Result<Served, String> {
    let path = cfg.path();
    let group = cfg.group.as_deref().map(peer::group_id).transpose()?;
    let admin_gid = cfg.admin_group.as_deref().map(peer::group_id).transpose()?;
    let dir = crate::state::parent(&path);
    if !dir.is_dir() {
        return Err(format!(
            "the directory {} does not exist (the unit's RuntimeDirectory= makes it; elsewhere set socket.path)",
            dir.display()
        ));
    }
    // Only a directory no other user can write: nobody else can put a socket, a symlink
    // or a listener that never accepts where the agent binds.
    crate::state::check_dir(dir)
        .map_err(|why| format!("not served from {}: {why}", dir.display()))?;
    remove_stale(&path)?;
    let listener = UnixListener::bind(&path).map_err(|e| format!("cannot listen: {e}"))?;
    let placed = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(cfg.mode_bits()))
        .and_then(|()| match group {
            Some(g) => std::os::unix::fs::chown(&path, None, Some(g)),
            None => Ok(()),
        });
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&path);
        return Err(format!("cannot set the socket's mode or group: {e}"));
    }
    let ctx = Arc::new(Ctx {
        handle,
        own_uid: crate::state::euid(),
        admin_gid,
        refusals_logged: Default::default(),
    });
    info!(path = %path.display(), mode = %cfg.mode, group = cfg.group.as_deref().unwrap_or("(the agent's)"), "control socket served");
    let task = tokio::spawn(accept(listener, ctx));
    Ok(Served { path, task })
}

/// A socket file left by a run that did not stop is removed; one another agent still
/// serves, and anything else at the path, is not touched.
fn remove_stale(path: &Path) -> Result<(), String> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(format!("another agent serves {} (socket.path)", path.display()));
            }
            std::fs::remove_file(path).map_err(|e| format!("cannot remove the old socket: {e}"))
        }
        Ok(_) => Err(format!("{} exists and is not a socket; it is left alone", path.display())),
        Err(_) => Ok(()),
    }
}

async fn accept(listener: UnixListener, ctx: Arc<Ctx>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        match listener.accept().await {
            Ok((stream, _)) => {
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(LIFETIME, connection(stream, &ctx)).await;
                    drop(permit);
                });
            }
            Err(e) => {
                warn!(error = %e, "control socket: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn connection(stream: UnixStream, ctx: &Ctx) {
    let caller = match stream.peer_cred() {
        Ok(c) => Caller { uid: c.uid(), gid: c.gid(), pid: c.pid() },
        Err(e) => {
            warn!(error = %e, "control socket: no peer credentials; connection closed");
            return;
        }
    };
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    loop {
        let mut line = Vec::new();
        let mut limited = (&mut read).take(MAX_LINE as u64 + 1);
        match tokio::time::timeout(IDLE, limited.read_until(b'\n', &mut line)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
            Ok(Ok(_)) => {}
        }
        let too_long = line.len() > MAX_LINE;
        let reply = if too_long {
            refusal(None, "bad-request", format!("the request is longer than {MAX_LINE} bytes"))
        } else {
            answer(&line, caller, ctx).await
        };
        let mut out = reply.to_string().into_bytes();
        out.push(b'\n');
        let written = tokio::time::timeout(IDLE, write.write_all(&out)).await;
        if !matches!(written, Ok(Ok(()))) || too_long {
            return;
        }
    }
}

fn refusal(id: Option<&Value>, code: &str, error: String) -> Value {
    let mut v = json!({"ok": false, "code": code, "error": error});
    if let Some(id) = id {
        v["id"] = id.clone();
    }
    v
}

/// The reply to one request line.
async fn answer(line: &[u8], caller: Caller, ctx: &Ctx) -> Value {
    let mut map: Map<String, Value> = match crate::control::strict_json(line) {
        Ok(Value::Object(m)) => m,
        Ok(_) => return refusal(None, "bad-request", "a request is one JSON object".into()),
        Err(e) => return refusal(None, "bad-request", format!("not JSON: {e}")),
    };
    let id = map.remove("id");
    let id = id.as_ref();
    if let Some(v) = map.remove("v")
        && v != json!(1)
    {
        return refusal(
            id,
            "bad-request",
            format!("v: {v} is not a protocol version of this agent; accepted: 1"),
        );
    }
    let op = match map.remove("op") {
        Some(Value::String(op)) => op,
        _ => {
            return refusal(
                id,
                "bad-request",
                format!(
                    "op is missing or not a string; accepted: status, {JOB_OPS}, {REQUEST_NAMES}"
                ),
            );
        }
    };
    let args = Value::Object(map);
    let reply = if let Some(parsed) = job_op(&op, args.clone()) {
        match parsed {
            Err(e) => refusal(id, "bad-request", e),
            Ok(op) => jobs(op, caller, ctx, id).await,
        }
    } else if op == "status" {
        match crate::control::no_args(args) {
            Err(e) => refusal(id, "bad-request", e),
            Ok(()) => match ctx.handle.status().await {
                Ok(status) => json!({
                    "ok": true,
                    "status": status,
                    "mqtt": ctx.handle.mqtt.as_ref().map(|m| m.get()),
                }),
                Err(e) => refusal(id, "unavailable", e),
            },
        }
    } else {
        match Request::parse(&op, args) {
            Err(e) => refusal(id, "bad-request", e),
            Ok(None) => refusal(
                id,
                "bad-request",
                format!("{op:?} is not an op; accepted: status, {JOB_OPS}, {REQUEST_NAMES}"),
            ),
            Ok(Some(request)) => change(request, caller, ctx, id).await,
        }
    };
    let mut reply = reply;
    if let Some(id) = id {
        reply["id"] = id.clone();
    }
    reply
}

/// The job ops, which any user who can connect may ask for their own jobs.
const JOB_OPS: &str = "submit, jobs, job, cancel, logs";

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ListArgs {
    #[serde(default)]
    all: bool,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct IdArgs {
    job: u64,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LogArgs {
    job: u64,
    #[serde(default = "stdout")]
    stream: String,
    #[serde(default)]
    offset: u64,
}

fn stdout() -> String {
    "stdout".into()
}

/// A job op and its arguments, checked; `None`: `op` is not one.
fn job_op(op: &str, args: Value) -> Option<Result<JobOp, String>> {
    let parse = |args: Value| -> Result<JobOp, String> {
        let strict = |e: serde_json::Error| format!("arguments: {e}");
        Ok(match op {
            "submit" => JobOp::Submit(args),
            "jobs" => {
                JobOp::List { all: serde_json::from_value::<ListArgs>(args).map_err(strict)?.all }
            }
            "job" => JobOp::Get(serde_json::from_value::<IdArgs>(args).map_err(strict)?.job),
            "cancel" => JobOp::Cancel(serde_json::from_value::<IdArgs>(args).map_err(strict)?.job),
            _ => {
                let a: LogArgs = serde_json::from_value(args).map_err(strict)?;
                JobOp::Log { id: a.job, stream: a.stream, offset: a.offset }
            }
        })
    };
    matches!(op, "submit" | "jobs" | "job" | "cancel" | "logs").then(|| parse(args))
}

/// A job op for the caller (who sees and cancels their own jobs; root, the agent's user
/// and `admin_group` all). Submissions and cancels are logged with the caller.
async fn jobs(op: JobOp, caller: Caller, ctx: &Ctx, id: Option<&Value>) -> Value {
    let who = Who::Local { uid: caller.uid, admin: ctx.may_change(&caller) };
    let changes = matches!(op, JobOp::Submit(_) | JobOp::Cancel(_));
    let (done, answer) = oneshot::channel();
    let outcome = ctx.handle.ask(Control::Jobs { op, who, done }, answer).await;
    let (uid, pid) = (caller.uid, caller.pid.unwrap_or(0));
    match outcome {
        Ok(Ok(mut v)) => {
            if changes {
                info!(uid, pid, job = %v["job"]["id"], detail = %v["detail"], "local job request done");
            }
            v["ok"] = json!(true);
            v
        }
        Ok(Err(Refusal::Rejected(why))) => refusal(id, "rejected", why),
        Ok(Err(Refusal::Failed(why))) => refusal(id, "failed", why),
        Err(why) => refusal(id, "unavailable", why),
    }
}

/// A change, if the caller may make it; audited either way.
async fn change(request: Request, caller: Caller, ctx: &Ctx, id: Option<&Value>) -> Value {
    let (uid, pid) = (caller.uid, caller.pid.unwrap_or(0));
    if !ctx.may_change(&caller) {
        if ctx.log_refusal(uid) {
            warn!(uid, pid, %request, "local request refused: the caller may only read (further refusals of this uid are not logged for a minute)");
        }
        return refusal(
            id,
            "forbidden",
            format!(
                "uid {uid} may read but not change; accepted: root, the agent's user, or a member of socket.admin_group ({})",
                REQUEST_NAMES
            ),
        );
    }
    let (done, answer) = oneshot::channel();
    let name = request.name();
    let outcome = ctx.handle.ask(Control::Execute { request: request.clone(), done }, answer).await;
    match outcome {
        Ok(Ok(detail)) => {
            info!(uid, pid, request = name, %detail, "local request done");
            json!({"ok": true, "detail": detail})
        }
        Ok(Err(Refusal::Rejected(why))) => {
            info!(uid, pid, request = name, %why, "local request rejected");
            refusal(id, "rejected", why)
        }
        Ok(Err(Refusal::Failed(why))) => {
            warn!(uid, pid, request = name, %why, "local request failed");
            refusal(id, "failed", why)
        }
        Err(why) => {
            warn!(uid, pid, request = name, %why, "local request not answered");
            refusal(
                id,
                "unavailable",
                format!("{why}; the request may still be applied when the loop goes on"),
            )
        }
    }
}
