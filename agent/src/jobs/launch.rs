//! Starting and stopping a job's processes: the only code in gpulet that spawns one.
//!
//! A job starts as its submitter (uid, gid, supplementary groups) when the agent runs as
//! root, in a process group of its own, and, where the agent has a cgroup v2 subtree
//! (`jobs.cgroup`), in a cgroup of its own, so that a job that daemonises (forks and
//! leaves its process group with `setsid`) is still tracked and killed. Its environment
//! is only what it was submitted with plus what gpulet sets (`CUDA_VISIBLE_DEVICES` by
//! UUID, `CUDA_DEVICE_ORDER=PCI_BUS_ID`, `GPULET_JOB_ID`, the user's `HOME`, `USER`,
//! `LOGNAME`, and a `PATH` unless it brought one): nothing of the agent's own.
//!
//! A process is known by its pid *and* its start time (`/proc/<pid>/stat`, field 22) in
//! this boot (`/proc/sys/kernel/random/boot_id`): a pid alone may be reused by the time
//! a restarted agent looks again.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::{Gid, Pid, Uid};

use super::spec::{Account, Spec};

/// The `PATH` a job gets when it brings none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A process, as this boot knows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Process {
    pub pid: i32,
    /// Clock ticks after boot (`/proc/<pid>/stat`, field 22).
    pub start_time: u64,
    pub boot_id: String,
    /// The job's own cgroup, when it has one.
    pub cgroup: Option<PathBuf>,
}

/// A job just started.
#[derive(Debug)]
pub struct Started {
    pub child: Child,
    pub process: Process,
}

/// What the launcher needs beyond the job.
#[derive(Debug, Clone)]
pub struct Launch<'a> {
    pub id: u64,
    pub spec: &'a Spec,
    pub account: &'a Account,
    /// The GPUs' UUIDs, in the order the job was given them.
    pub uuids: Vec<String>,
    /// Where its output goes: `stdout` and `stderr` in this directory.
    pub log_dir: &'a Path,
    /// The cgroup v2 directory to make the job's cgroup in.
    pub cgroup_root: Option<&'a Path>,
    /// Drop to the account's ids (the agent runs as root); otherwise the job runs as the
    /// agent's user, which is then the submitter's.
    pub as_user: bool,
}

/// Start the job. An error says why in words for `failed-to-start`.
pub fn start(l: &Launch<'_>) -> Result<Started, String> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(l.log_dir)
        .map_err(|e| format!("cannot make its log directory {}: {e}", l.log_dir.display()))?;
    let out = log_file(&l.log_dir.join("stdout"))?;
    let err = log_file(&l.log_dir.join("stderr"))?;
    let cgroup = l.cgroup_root.map(|root| root.join(format!("job-{}", l.id)));
    let procs = match &cgroup {
        Some(dir) => {
            match std::fs::create_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(format!("cannot make its cgroup {}: {e}", dir.display())),
            }
            Some(
                OpenOptions::new()
                    .write(true)
                    .open(dir.join("cgroup.procs"))
                    .map_err(|e| format!("cannot open its cgroup {}: {e}", dir.display()))?,
            )
        }
        None => None,
    };

    let mut cmd = Command::new(&l.spec.command[0]);
    cmd.args(&l.spec.command[1..])
        .env_clear()
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0);
    cmd.env("PATH", DEFAULT_PATH);
    cmd.envs(&l.spec.env);
    // Who the job runs as is gpulet's to say, not the submitted environment's.
    cmd.env("HOME", &l.account.home).env("USER", &l.account.name).env("LOGNAME", &l.account.name);
    // What gpulet sets has the last word: CUDA's own order is fastest-first, which is
    // neither NVML's nor nvidia-smi's (task-spooler#73); UUIDs mean the same GPU whatever
    // the order.
    cmd.env("CUDA_VISIBLE_DEVICES", l.uuids.join(","))
        .env("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        .env("NVIDIA_VISIBLE_DEVICES", l.uuids.join(","))
        .env("GPULET_JOB_ID", l.id.to_string());
    if let Some(name) = &l.spec.name {
        cmd.env("GPULET_JOB_NAME", name);
    }
    let ids = l.as_user.then(|| {
        let groups: Vec<Gid> = l.account.groups.iter().map(|&g| Gid::from_raw(g)).collect();
        (Uid::from_raw(l.account.uid), Gid::from_raw(l.account.gid), groups)
    });
    let cwd = std::ffi::CString::new(l.spec.cwd.as_os_str().as_encoded_bytes())
        .map_err(|_| "its working directory contains a NUL byte".to_owned())?;
    // Between fork and exec, in the child: join the cgroup (before anything can fork),
    // drop to the submitter, and only then enter the working directory, with the
    // submitter's own permissions (std's `current_dir` would enter it as root, before
    // the closure). std's `uid()` cannot be used either: it drops the supplementary
    // groups, and a closure runs after it, no longer root enough to set them.
    let child_setup = move || -> std::io::Result<()> {
        if let Some(f) = &procs {
            // "0": the writing process itself.
            nix::unistd::write(f, b"0")?;
        }
        if let Some((uid, gid, groups)) = &ids {
            nix::unistd::setgroups(groups)?;
            nix::unistd::setgid(*gid)?;
            nix::unistd::setuid(*uid)?;
        }
        nix::unistd::chdir(cwd.as_c_str())?;
        close_on_exec_from(3);
        Ok(())
    };
    #[allow(unsafe_code)]
    // SAFETY: the closure runs in the forked child before exec, where only
    // async-signal-safe calls are allowed: it makes raw system calls (write, setgroups,
    // setgid, setuid, chdir, close_range) on values prepared before the fork, and
    // allocates nothing.
    unsafe {
        cmd.pre_exec(child_setup);
    }
    let child = cmd.spawn().map_err(|e| {
        if let Some(dir) = &cgroup {
            let _ = std::fs::remove_dir(dir);
        }
        format!("cannot start {:?}: {e}", l.spec.command[0])
    })?;
    let pid = child.id() as i32;
    let process =
        Process { pid, start_time: start_time(pid).unwrap_or(0), boot_id: boot_id(), cgroup };
    Ok(Started { child, process })
}

/// Mark every descriptor from `first` on close-on-exec: nothing the agent holds (a
/// socket, a library's handle opened without `O_CLOEXEC`) reaches a job. std's own
/// (its exec-error pipe) is close-on-exec already; the job's stdio are 0 to 2.
fn close_on_exec_from(first: u32) {
    #[allow(unsafe_code)]
    // SAFETY: close_range(2) with CLOSE_RANGE_CLOEXEC only sets a flag on descriptors of
    // this process; it takes no pointers. Its failure (a kernel before 5.11) leaves the
    // descriptors as they were, which std's own close-on-exec discipline covers.
    unsafe {
        libc::syscall(libc::SYS_close_range, first, u32::MAX, libc::CLOSE_RANGE_CLOEXEC);
    }
}

/// A log file for a job's output: appended to (so that a rotation's truncation leaves
/// the writer at the new end), never through a symlink.
fn log_file(path: &Path) -> Result<File, String> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| format!("cannot open its log {}: {e}", path.display()))
}

/// A process's start time, in clock ticks after boot; `None` when it is gone.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold anything, spaces and
    // parentheses included: count fields after its last `)`.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// This boot's id.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

impl Process {
    /// Whether the process is still the one started (same boot, same pid, same start
    /// time). A zombie counts as gone.
    pub fn alive(&self) -> bool {
        if self.boot_id != boot_id() {
            return false;
        }
        let zombie = std::fs::read_to_string(format!("/proc/{}/stat", self.pid))
            .ok()
            .and_then(|s| s.rfind(')').map(|i| s[i + 1..].trim_start().starts_with('Z')))
            .unwrap_or(true);
        start_time(self.pid) == Some(self.start_time) && !zombie
    }

    /// Send `signal` to the job: its process group, and every process of its cgroup
    /// (which holds those that left the group). SIGKILL uses `cgroup.kill`. `child`: the
    /// process is this agent's unreaped child, so its pid cannot have been reused;
    /// otherwise the group is signalled only while the process is still the one started.
    pub fn signal(&self, signal: Signal, child: bool) {
        if child || self.alive() {
            let _ = killpg(Pid::from_raw(self.pid), signal);
        }
        let Some(dir) = &self.cgroup else { return };
        if signal == Signal::SIGKILL
            && OpenOptions::new()
                .write(true)
                .open(dir.join("cgroup.kill"))
                .and_then(|mut f| f.write_all(b"1"))
                .is_ok()
        {
            return;
        }
        // Before Linux 5.14 (no cgroup.kill), or another signal: each process.
        for pid in self.cgroup_pids() {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), signal);
        }
    }

    /// The processes in the job's cgroup.
    pub fn cgroup_pids(&self) -> Vec<i32> {
        let Some(dir) = &self.cgroup else { return Vec::new() };
        std::fs::read_to_string(dir.join("cgroup.procs"))
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// After the job: kill what is left in its cgroup and remove it. Whether anything
    /// was left (a daemon the job started).
    pub fn clean_up(&self) -> bool {
        let Some(dir) = &self.cgroup else { return false };
        let left = !self.cgroup_pids().is_empty();
        if left {
            self.signal(Signal::SIGKILL, false);
            // The kernel empties the cgroup once the processes are gone; a cgroup with
            // processes cannot be removed, so wait a little for it.
            for _ in 0..50 {
                if self.cgroup_pids().is_empty() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        }
        let _ = std::fs::remove_dir(dir);
        left
    }
}

/// The cgroup v2 directory the agent itself is in (`0::<path>` in `/proc/self/cgroup`,
/// under the cgroup2 mount of `/proc/self/mountinfo`).
pub fn own_cgroup() -> Result<PathBuf, String> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
    let path = cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("the agent is in no cgroup v2 hierarchy")?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
    // `id parent major:minor root mountpoint options… - fstype source superopts`
    let mount = mounts
        .lines()
        .find(|l| l.split(" - ").nth(1).is_some_and(|t| t.starts_with("cgroup2 ")))
        .and_then(|l| l.split_whitespace().nth(4))
        .ok_or("no cgroup2 file system is mounted")?;
    Ok(Path::new(mount).join(path.trim_start_matches('/')))
}

/// Kill whatever is in the cgroup `dir` and remove it (a job whose start was cut short).
pub fn remove_cgroup(dir: &Path) {
    if dir.is_dir() {
        let p = Process {
            pid: 0,
            start_time: 0,
            boot_id: String::new(),
            cgroup: Some(dir.to_path_buf()),
        };
        p.clean_up();
    }
}
