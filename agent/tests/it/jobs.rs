//! The job queue of the real binary (`gpulet run` on the simulator, `gpulet submit`,
//! `jobs`, `wait`, `logs`, `cancel` as users run them): the environment a job sees and
//! the user it runs as, the bad-input table, cancel and time limits, a job that
//! daemonises (in a cgroup), restart with running and queued jobs after a crash, a torn
//! queue file, and energy attribution against the integral of the GPUs' power.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const NOBODY: u32 = 65534;

fn root() -> bool {
    nix::unistd::geteuid().is_root()
}

struct Agent {
    child: Child,
    socket: PathBuf,
}

/// A config for a simulated node of 8 H100s with the queue in `dir/jobs`; `plugins`
/// goes into `[plugins]`, `extra` into `[jobs]`.
fn config(dir: &Path, plugins: &str, extra: &str) -> String {
    format!(
        "node = \"jobs-1\"\ntick = \"200ms\"\nbackend = \"sim\"\n[telemetry]\nsink = \"file\"\npath = \"telemetry.jsonl\"\n[plugins]\ncache_dir = \"cache\"\nstate_dir = \"plugin-state\"\n{plugins}\n[socket]\npath = {:?}\nmode = \"0666\"\n[jobs]\nenabled = true\ndir = \"jobs\"\nkill_grace = \"1s\"\n{extra}\n",
        dir.join("gpulet.sock").display().to_string()
    )
}

impl Agent {
    fn start(dir: &Path, extra: &str) -> Agent {
        Agent::start_with(dir, "", extra)
    }

    fn start_with(dir: &Path, plugins: &str, extra: &str) -> Agent {
        std::fs::write(dir.join("gpulet.toml"), config(dir, plugins, extra)).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_gpulet"))
            .args(["run", "--config", "gpulet.toml"])
            .current_dir(dir)
            // What the agent has in its environment, a job must not see.
            .env("AGENT_SECRET", "s3cret")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let a = Agent { child, socket: dir.join("gpulet.sock") };
        let t = Instant::now();
        while !a.gpulet(&["jobs"], None).status.success() {
            assert!(t.elapsed() < Duration::from_secs(15), "the agent never answered");
            std::thread::sleep(Duration::from_millis(50));
        }
        a
    }

    fn gpulet(&self, args: &[&str], uid: Option<u32>) -> Output {
        let mut c = Command::new(env!("CARGO_BIN_EXE_gpulet"));
        // `--socket` before the rest: after `submit`'s `--`, it would be the job's.
        c.arg(args[0]).arg("--socket").arg(&self.socket).args(&args[1..]).current_dir("/tmp");
        if let Some(uid) = uid {
            c.uid(uid).gid(uid);
        }
        c.output().unwrap()
    }

    /// `gpulet jobs --all --json`, as root.
    fn jobs(&self) -> Vec<Value> {
        let o = self.gpulet(&["jobs", "--all", "--json"], None);
        assert!(o.status.success(), "{}", text(&o));
        serde_json::from_slice(&o.stdout).unwrap()
    }

    fn job(&self, id: u64) -> Value {
        self.jobs().into_iter().find(|j| j["id"] == json!(id)).expect("the job is listed")
    }

    fn wait_for(&self, id: u64, state: &str) -> Value {
        let t = Instant::now();
        loop {
            let j = self.job(id);
            if j["state"] == json!(state) {
                return j;
            }
            assert!(t.elapsed() < Duration::from_secs(20), "job {id} never became {state}: {j}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill9(mut self) -> String {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        let mut err = String::new();
        self.child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        err
    }

    fn stop(mut self) -> String {
        let _ = Command::new("kill").arg(self.child.id().to_string()).status();
        let status = self.child.wait().unwrap();
        let mut err = String::new();
        self.child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        assert!(status.success(), "gpulet run did not stop cleanly: {err}");
        err
    }
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn submitted_id(o: &Output) -> u64 {
    let t = text(o);
    assert!(o.status.success(), "{t}");
    t.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{t}"))
}

/// A directory others may traverse (jobs of `nobody` log nothing there; the socket is).
fn dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

#[test]
fn a_job_runs_as_its_submitter_on_its_gpus_by_uuid_and_sees_nothing_of_the_agent() {
    assert!(root(), "the job tests run as root (as CI does): they submit as another user");
    let d = dir();
    let a = Agent::start(d.path(), "min_uid = 1");
    let script = "echo CVD=$CUDA_VISIBLE_DEVICES; echo ORDER=$CUDA_DEVICE_ORDER; echo ID=$GPULET_JOB_ID; echo UID=$(id -u) GID=$(id -g); echo SECRET=${AGENT_SECRET:-none}; echo MINE=$MINE USER=$USER; python3 -c 'import os; print(\"FDS\", sorted(os.listdir(\"/proc/self/fd\")))'";
    let o = a.gpulet(
        &[
            "submit",
            "-g",
            "2",
            "--no-env",
            "--env",
            "MINE=yes",
            "--env",
            "USER=root",
            "--",
            "sh",
            "-c",
            script,
        ],
        Some(NOBODY),
    );
    let id = submitted_id(&o);
    let w = a.gpulet(&["wait", &id.to_string()], Some(NOBODY));
    assert_eq!(w.status.code(), Some(0), "{}", text(&w));
    let logs = text(&a.gpulet(&["logs", &id.to_string()], Some(NOBODY)));
    let job = a.job(id);
    let uuids: Vec<&str> =
        job["uuids"].as_array().unwrap().iter().map(|u| u.as_str().unwrap()).collect();
    assert_eq!(uuids.len(), 2);
    assert!(uuids.iter().all(|u| u.starts_with("GPU-")), "{job}");
    assert!(logs.contains(&format!("CVD={}", uuids.join(","))), "{logs}");
    assert!(logs.contains("ORDER=PCI_BUS_ID"), "{logs}");
    assert!(logs.contains(&format!("ID={id}")), "{logs}");
    assert!(logs.contains(&format!("UID={NOBODY} GID={NOBODY}")), "{logs}");
    assert!(logs.contains("SECRET=none") && logs.contains("MINE=yes USER=nobody"), "{logs}");
    // Nothing the agent holds open reaches the job: its stdio, and the one descriptor
    // python opens to list them.
    assert!(logs.contains("FDS ['0', '1', '2', '3']"), "{logs}");
    assert_eq!(job["owner"]["user"], json!("nobody"));

    // A user sees and cancels only their own jobs.
    // uid 1 (`daemon`, admitted by this node's jobs.min_uid = 1): another user.
    let mine = submitted_id(&a.gpulet(&["submit", "--", "sleep", "30"], Some(1)));
    let theirs = a.gpulet(&["jobs", "--all", "--json"], Some(NOBODY));
    let listed: Vec<Value> = serde_json::from_slice(&theirs.stdout).unwrap();
    assert!(listed.iter().all(|j| j["owner"]["uid"] == json!(NOBODY)), "{listed:?}");
    let c = a.gpulet(&["cancel", &mine.to_string()], Some(NOBODY));
    assert!(
        !c.status.success() && text(&c).contains(&format!("there is no job {mine} of yours")),
        "{}",
        text(&c)
    );
    // Jobs do not run as root unless the node allows it.
    let r = a.gpulet(&["submit", "--", "true"], None);
    assert!(!r.status.success() && text(&r).contains("jobs do not run as root"), "{}", text(&r));
    a.stop();
}

#[test]
fn bad_submissions_are_refused_naming_the_field_and_the_queue_is_untouched() {
    let d = dir();
    let a = Agent::start(d.path(), "max_queue = 2\nallow_root = true");
    let hidden = d.path().join("hidden");
    std::fs::create_dir(&hidden).unwrap();
    std::fs::set_permissions(&hidden, std::fs::Permissions::from_mode(0o700)).unwrap();
    let table = bad_submissions(&hidden, 8);
    for (job, as_nobody, says) in &table {
        let uid = as_nobody.then_some(NOBODY);
        let mut req = job.clone();
        req["op"] = json!("submit");
        let reply = socket_request(&a.socket, &req, uid);
        assert_eq!(reply["ok"], json!(false), "{req} was accepted: {reply}");
        let e = reply["error"].as_str().unwrap();
        assert!(e.contains(says.as_str()), "{req}: {e:?} does not say {says:?}");
    }
    assert!(a.jobs().is_empty(), "a refused submission left something in the queue");
    // The queue's bound: two that wait (each wants all 8 GPUs and one holds them).
    let all = json!({"op": "submit", "command": ["true"], "cwd": "/tmp", "gpus": 8});
    let first = socket_request(
        &a.socket,
        &json!({"op": "submit", "command": ["sleep", "30"], "cwd": "/tmp", "gpus": 8}),
        None,
    );
    assert_eq!(first["ok"], json!(true), "{first}");
    assert_eq!(socket_request(&a.socket, &all, None)["ok"], json!(true));
    assert_eq!(socket_request(&a.socket, &all, None)["ok"], json!(true));
    let full = socket_request(&a.socket, &all, None);
    assert!(full["error"].as_str().unwrap().contains("the queue is full"), "{full}");
    a.stop();
}

/// The bad-input table on a node of `n` GPUs: (a submission's fields, whether `nobody`
/// submits it, what the refusal must say). `hidden` is a directory `nobody` cannot
/// enter.
fn bad_submissions(hidden: &Path, n: usize) -> Vec<(Value, bool, String)> {
    let base = json!({"command": ["true"], "cwd": "/tmp"});
    let with = |k: &str, v: Value| {
        let mut r = base.clone();
        r[k] = v;
        r
    };
    let s = |x: &str| x.to_owned();
    vec![
        (with("gpus", json!(n + 1)), false, format!("gpus: {} GPUs; this node has {n}", n + 1)),
        (with("gpus", json!(0)), false, s("gpus: 0 GPUs")),
        (
            with("gpus", json!(["GPU-nope"])),
            false,
            s("gpus: \"GPU-nope\" is not a GPU of this node"),
        ),
        (with("gpus", json!([1, 1])), false, s("gpus: GPU 1 is named twice")),
        (with("mem_mib", json!(-5)), false, s("mem_mib: -5 is out of range")),
        (with("mem_mib", json!(10_000_000)), false, s("mem_mib: 10000000 is out of range")),
        (with("command", json!([])), false, s("command: empty")),
        (with("command", json!([""])), false, s("command: empty")),
        (with("command", json!(["a\u{0}b"])), false, s("command: an argument contains a NUL byte")),
        (with("cwd", json!("/no/such/dir")), false, s("cwd: /no/such/dir")),
        (with("cwd", json!("relative")), false, s("cwd: relative is not an absolute path")),
        (with("cwd", json!(hidden.display().to_string())), true, s("cannot enter")),
        (with("env", json!({"A=B": "x"})), false, s("env: \"A=B\" is not a variable name")),
        (with("env", json!({"A": "x\u{0}"})), false, s("env.A: the value contains a NUL byte")),
        (with("time_limit_s", json!(0)), false, s("time_limit_s: 0 is out of range")),
        (with("power_cap_w", json!(5)), false, s("power_cap_w: 5 W is out of range")),
        (
            with("labels", json!({"bad key": "v"})),
            false,
            s("labels: \"bad key\" is not a label key"),
        ),
        (with("unknown", json!(1)), false, s("unknown field `unknown`")),
        (with("workload", json!("mining")), false, s("workload: unknown variant `mining`")),
    ]
}

/// One request on the socket, as `uid` when given (through a child process).
fn socket_request(socket: &Path, req: &Value, uid: Option<u32>) -> Value {
    let mut c = Command::new("python3");
    c.args([
        "-c",
        "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(sys.argv[2].encode()+b'\\n'); print(s.makefile().readline())",
    ])
    .arg(socket)
    .arg(req.to_string());
    if let Some(uid) = uid {
        c.uid(uid).gid(uid);
    }
    let o = c.output().unwrap();
    serde_json::from_slice(&o.stdout).unwrap_or_else(|_| panic!("{}", text(&o)))
}

/// A cgroup v2 directory this test may make jobs' cgroups in, if the machine has one.
fn test_cgroup() -> Option<PathBuf> {
    for root in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
        let dir = Path::new(root).join(format!("gpulet-test-{}", std::process::id()));
        if Path::new(root).join("cgroup.procs").exists() && std::fs::create_dir(&dir).is_ok() {
            return Some(dir);
        }
    }
    None
}

#[test]
fn cancel_a_time_limit_and_a_job_that_daemonises_all_end_their_processes() {
    let d = dir();
    let cgroup = test_cgroup();
    let extra = match &cgroup {
        Some(c) => format!("cgroup = {:?}\nallow_root = true", c.display().to_string()),
        None => {
            eprintln!(
                "\n*** NO WRITABLE CGROUP V2 ON THIS MACHINE: the daemonising job is tested by process group only ***\n"
            );
            "allow_root = true".into()
        }
    };
    let a = Agent::start(d.path(), &extra);
    // Cancel: a job that ignores SIGTERM gets SIGKILL after the grace period.
    let stubborn =
        submitted_id(&a.gpulet(&["submit", "--", "sh", "-c", "trap '' TERM; sleep 60"], None));
    a.wait_for(stubborn, "running");
    let c = a.gpulet(&["cancel", &stubborn.to_string()], None);
    assert!(c.status.success(), "{}", text(&c));
    let j = a.wait_for(stubborn, "cancelled");
    assert_eq!(j["signal"], json!(9), "{j}");
    assert!(j["why"].as_str().unwrap().contains("SIGKILL"), "{j}");
    // A time limit.
    let limited =
        submitted_id(&a.gpulet(&["submit", "--time-limit", "1s", "--", "sleep", "60"], None));
    let j = a.wait_for(limited, "timed-out");
    assert_eq!(j["signal"], json!(15), "{j}");
    assert_eq!(a.gpulet(&["wait", &limited.to_string()], None).status.code(), Some(1));
    // A job that leaves a daemon behind in a session of its own.
    let pidfile = d.path().join("daemon.pid");
    let script =
        format!("setsid sh -c 'echo $$ > {}; exec sleep 600' & sleep 0.5", pidfile.display());
    let daemon_job = submitted_id(&a.gpulet(&["submit", "--", "sh", "-c", &script], None));
    a.wait_for(daemon_job, "finished");
    let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    let alive = Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z");
    if cgroup.is_some() {
        assert!(!alive, "the daemon the job left is still running (pid {pid})");
        assert!(a.job(daemon_job)["why"].as_str().unwrap().contains("left behind were killed"));
    } else {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    a.stop();
    if let Some(c) = cgroup {
        let _ = std::fs::remove_dir(c);
    }
}

#[test]
fn a_crash_keeps_the_queue_and_running_jobs_are_readopted_or_reported_lost() {
    let d = dir();
    let extra = "allow_root = true";
    let a = Agent::start(d.path(), extra);
    let running = submitted_id(&a.gpulet(&["submit", "-g", "8", "--", "sleep", "600"], None));
    let gone = {
        let j = a.wait_for(running, "running");
        j["process"]["pid"].as_i64().unwrap() as i32
    };
    let queued = submitted_id(&a.gpulet(&["submit", "-g", "8", "--", "true"], None));
    assert_eq!(a.job(queued)["state"], json!("queued"));
    a.kill9();
    // The agent crashed; its job goes on.
    assert!(Path::new(&format!("/proc/{gone}")).exists());
    let a = Agent::start(d.path(), extra);
    let j = a.job(running);
    assert_eq!(j["state"], json!("running"), "re-adopted: {j}");
    assert_eq!(a.job(queued)["state"], json!("queued"));
    // Its process ends (not as the new agent's child): finished, status unknown; then
    // the queued job starts.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(gone), nix::sys::signal::Signal::SIGTERM)
        .unwrap();
    let j = a.wait_for(running, "finished");
    assert!(j["why"].as_str().unwrap().contains("not known"), "{j}");
    a.wait_for(queued, "finished");
    // Crash again with a running job whose process then dies while no agent runs:
    // reported lost at the next start.
    let again = submitted_id(&a.gpulet(&["submit", "--", "sleep", "600"], None));
    let pid = a.wait_for(again, "running")["process"]["pid"].as_i64().unwrap() as i32;
    a.kill9();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL)
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let a = Agent::start(d.path(), extra);
    assert_eq!(a.job(again)["state"], json!("lost"));
    a.kill9();
    // A torn job file is set aside and reported; the other jobs are kept, and ids are
    // not reused.
    let f = d.path().join(format!("jobs/{again}/job.json"));
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let a = Agent::start(d.path(), extra);
    let set_aside = std::fs::read_dir(d.path().join(format!("jobs/{again}")))
        .unwrap()
        .any(|e| e.unwrap().file_name().to_string_lossy().starts_with("job.json.bad-"));
    assert!(set_aside, "the torn job file was not set aside");
    assert_eq!(a.job(running)["state"], json!("finished"), "the other jobs are kept");
    let next = submitted_id(&a.gpulet(&["submit", "--", "true"], None));
    assert!(next > again, "job id {next} reused after a torn file (last was {again})");
    let err = a.stop();
    assert!(err.contains("a job's state file cannot be read"), "{err}");
}

#[test]
fn a_jobs_energy_is_the_integral_of_its_gpus_power_within_one_percent() {
    let d = dir();
    let a = Agent::start(d.path(), "allow_root = true");
    let id = submitted_id(
        &a.gpulet(&["submit", "-g", "2", "--workload", "memory-bound", "--", "sleep", "4"], None),
    );
    let job = a.wait_for(id, "finished");
    a.stop();
    let gpus: Vec<u64> =
        job["gpus"].as_array().unwrap().iter().map(|g| g.as_u64().unwrap()).collect();
    // The records from the tick it started to the tick it ended: trapezoids of each
    // GPU's power over the records' times.
    let records: Vec<Value> = std::fs::read_to_string(d.path().join("telemetry.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let has =
        |r: &Value, ev: &str| {
            r["events"].as_array().into_iter().flatten().any(|e| {
                e["kind"] == json!("job") && e["job"] == json!(id) && e["event"] == json!(ev)
            })
        };
    let start = records.iter().position(|r| has(r, "started")).unwrap();
    let end = records.iter().position(|r| has(r, "finished")).unwrap();
    let mut integral = 0.0;
    for w in records[start..=end].windows(2) {
        let dt = (w[1]["ts_ms"].as_f64().unwrap() - w[0]["ts_ms"].as_f64().unwrap()) / 1000.0;
        for &g in &gpus {
            let p = |r: &Value| r["gpus"][g as usize]["power_w"].as_f64().unwrap();
            integral += (p(&w[0]) + p(&w[1])) / 2.0 * dt;
        }
    }
    let energy = job["usage"]["energy_j"].as_f64().unwrap();
    assert!(integral > 1000.0, "the GPUs were not busy: {integral} J");
    assert!((energy - integral).abs() <= 0.01 * integral, "job {energy} J, integral {integral} J");
    assert_eq!(job["usage"]["shared"], json!(false));
}

#[test]
fn the_shipped_scheduler_plugins_place_jobs_in_the_agent() {
    for (name, path) in [
        ("fifo-binpack", gpulet_plugin_artifacts::FIFO_BINPACK),
        ("priority-backfill", gpulet_plugin_artifacts::PRIORITY_BACKFILL),
    ] {
        let d = dir();
        let extra =
            format!("allow_root = true\n[jobs.scheduler]\nname = {name:?}\npath = {path:?}\n");
        let a = Agent::start(d.path(), &extra);
        let listed = socket_request(&a.socket, &json!({"op": "jobs"}), None);
        assert_eq!(listed["scheduler"], json!(name), "{listed}");
        // Two shared jobs of 30 GiB pack onto one GPU; an exclusive one takes another.
        let a1 = submitted_id(&a.gpulet(&["submit", "--mem", "30000", "--", "sleep", "5"], None));
        let a2 = submitted_id(&a.gpulet(&["submit", "--mem", "30000", "--", "sleep", "5"], None));
        let x = submitted_id(&a.gpulet(&["submit", "--", "sleep", "5"], None));
        let (j1, j2, jx) =
            (a.wait_for(a1, "running"), a.wait_for(a2, "running"), a.wait_for(x, "running"));
        assert_eq!(j1["gpus"], j2["gpus"], "not packed: {j1} {j2}");
        assert_ne!(jx["gpus"], j1["gpus"], "an exclusive job shares a GPU: {jx}");
        let err = a.stop();
        assert!(err.contains("scheduler plugin loaded"), "{err}");
    }
}

#[test]
fn jobs_over_mqtt_submit_cancel_their_events_and_the_bad_input_table() {
    use crate::broker::{AgentThread, Broker, Collector, node_config};
    let broker = Broker::start();
    let mut c = Collector::start(broker.port, "gpulet/v1/#");
    let dir = dir();
    let hidden = dir.path().join("hidden");
    std::fs::create_dir(&hidden).unwrap();
    std::fs::set_permissions(&hidden, std::fs::Permissions::from_mode(0o700)).unwrap();
    let conf = node_config(
        &broker.url(),
        "[mqtt.commands]\nrequire_signed = false\n[jobs]\nenabled = true\ndir = \"jobs\"\nkill_grace = \"1s\"\nfleet_submit = \"unsigned\"\n",
    );
    let agent = AgentThread::start(dir.path(), &conf);
    c.wait(Duration::from_secs(15), "online", |g| {
        g.iter().any(|m| m.topic.ends_with("/status") && m.text().contains("online"))
    });
    let cmd = |name: &str, args: Value| -> Value {
        let shown = format!("{name} {args}");
        crate::mqtt::cmd(&broker, name, args).pop().unwrap_or_else(|| panic!("{shown}: no result"))
    };
    let r = cmd(
        "submit-job",
        json!({"user": "nobody", "command": ["sh", "-c", "id -u; exit 3"], "cwd": "/tmp"}),
    );
    assert_eq!(r["status"], json!("succeeded"), "{r}");
    assert_eq!(r["detail"], json!("job 1 queued"), "{r}");
    let ended =
        c.next_on(0, "gpulet/v1/n1/events/job", |v| v["job"] == 1 && v["event"] == "finished");
    assert_eq!(ended["exit_code"], json!(3), "{ended}");
    assert_eq!(ended["user"], json!("nobody"));
    assert!(ended["energy_j"].as_f64().is_some(), "{ended}");
    // Root is refused unless the node allows it; a user that does not exist, too.
    let r = cmd("submit-job", json!({"user": "root", "command": ["true"], "cwd": "/tmp"}));
    assert!(r["reason"].as_str().unwrap().contains("jobs do not run as root"), "{r}");
    let r =
        cmd("submit-job", json!({"user": "no-such-user-x", "command": ["true"], "cwd": "/tmp"}));
    assert!(r["reason"].as_str().unwrap().contains("there is no user \"no-such-user-x\""), "{r}");
    let r = cmd("submit-job", json!({"user": "daemon", "command": ["true"], "cwd": "/tmp"}));
    assert!(r["reason"].as_str().unwrap().contains("is a system account"), "{r}");
    let r = cmd("submit-job", json!({"command": ["true"]}));
    assert!(r["reason"].as_str().unwrap().contains("user is missing"), "{r}");
    // Cancel over MQTT.
    let r = cmd("submit-job", json!({"user": "nobody", "command": ["sleep", "60"], "cwd": "/tmp"}));
    assert_eq!(r["detail"], json!("job 2 queued"), "{r}");
    c.next_on(0, "gpulet/v1/n1/events/job", |v| v["job"] == 2 && v["event"] == "started");
    let r = cmd("cancel-job", json!({"job": 2}));
    assert_eq!(r["status"], json!("succeeded"), "{r}");
    c.next_on(0, "gpulet/v1/n1/events/job", |v| v["job"] == 2 && v["event"] == "cancelled");
    // The table, with the node's 2 GPUs: each rejected, naming the field.
    for (job, as_nobody, says) in bad_submissions(&hidden, 2) {
        let mut args = job.clone();
        // Over MQTT the command names the user; root is not allowed here.
        let _ = as_nobody;
        args["user"] = json!("nobody");
        let r = cmd("submit-job", args);
        assert_eq!(r["status"], json!("rejected"), "{job} was accepted: {r}");
        let why = r["reason"].as_str().unwrap();
        assert!(why.contains(says.as_str()), "{job}: {why:?} does not say {says:?}");
    }
    let r = cmd("cancel-job", json!({"job": 99}));
    assert!(r["reason"].as_str().unwrap().contains("there is no job 99"), "{r}");
    agent.stop();
}

#[test]
fn a_hostile_scheduler_is_refused_audited_and_its_jobs_stay_queued() {
    let refused = [
        ("twice", "GPU 0 is given twice", ""),
        ("missing", "GPU 99 does not exist", ""),
        (
            "unhealthy",
            "GPU 0 is unhealthy",
            "[[sim.fault]]\nat = \"0s\"\ngpu = 0\nkind = \"xid\"\nxid = 48\n",
        ),
        ("memory", "MiB free by reservation", ""),
        ("wrong-count", "it asked for 1 GPUs and was given 2", ""),
        ("two-starts", "GPU 0 is held exclusively by a running job", ""),
    ];
    for (mode, says, sim) in refused {
        let d = dir();
        let extra = format!(
            "allow_root = true\n[jobs.scheduler]\nname = \"hostile\"\npath = {:?}\nconfig = {{ mode = {mode:?} }}\n{sim}",
            gpulet_plugin_artifacts::FIXTURE_SCHEDULER
        );
        let a = Agent::start_with(d.path(), "max_failures = 100", &extra);
        // For `memory`: a job that takes most of GPU 0 first (the fixture places it
        // there, which is fine), then one that no longer fits there.
        let (first, victim) = if mode == "memory" {
            let big =
                submitted_id(&a.gpulet(&["submit", "--mem", "80000", "--", "sleep", "30"], None));
            a.wait_for(big, "running");
            (Some(big), submitted_id(&a.gpulet(&["submit", "--mem", "20000", "--", "true"], None)))
        } else if mode == "two-starts" {
            let one = submitted_id(&a.gpulet(&["submit", "--", "sleep", "30"], None));
            (Some(one), submitted_id(&a.gpulet(&["submit", "--", "true"], None)))
        } else if mode == "twice" {
            (None, submitted_id(&a.gpulet(&["submit", "-g", "2", "--", "true"], None)))
        } else {
            (None, submitted_id(&a.gpulet(&["submit", "--", "true"], None)))
        };
        std::thread::sleep(Duration::from_millis(800));
        let j = a.job(victim);
        assert_eq!(j["state"], json!("queued"), "{mode}: {j}");
        if let Some(f) = first {
            assert_eq!(a.job(f)["state"], json!("running"), "{mode}");
        }
        a.stop();
        let events: Vec<Value> = std::fs::read_to_string(d.path().join("telemetry.jsonl"))
            .unwrap()
            .lines()
            .flat_map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["events"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .collect();
        let audit = events
            .iter()
            .find(|e| {
                e["kind"] == json!("job")
                    && e["job"] == json!(victim)
                    && e["event"] == json!("placement-rejected")
            })
            .unwrap_or_else(|| panic!("{mode}: no placement-rejected event: {events:?}"));
        assert!(audit["reason"].as_str().unwrap().contains(says), "{mode}: {audit}");
    }
    // A scheduler that traps, floods or keeps breaking the rules faults: the built-in
    // scheduler places the job instead, and after plugins.max_failures faults the plugin
    // is quarantined.
    for mode in ["trap", "flood", "missing"] {
        let d = dir();
        let extra = format!(
            "allow_root = true\n[jobs.scheduler]\nname = \"hostile\"\npath = {:?}\nconfig = {{ mode = {mode:?} }}\n",
            gpulet_plugin_artifacts::FIXTURE_SCHEDULER
        );
        let a = Agent::start(d.path(), &extra);
        let ids: Vec<u64> = (0..4)
            .map(|_| submitted_id(&a.gpulet(&["submit", "--", "sleep", "30"], None)))
            .collect();
        for id in &ids {
            a.wait_for(*id, "running");
        }
        let err = a.stop();
        assert!(err.contains("scheduler plugin fault"), "{mode}: {err}");
        assert!(err.contains("scheduler plugin quarantined"), "{mode}: {err}");
    }
}

#[test]
fn a_jobs_power_cap_goes_through_the_guard_and_is_audited() {
    let d = dir();
    let a = Agent::start(d.path(), "allow_root = true");
    let id = submitted_id(&a.gpulet(
        &["submit", "--power-cap", "300", "--workload", "training", "--", "sleep", "6"],
        None,
    ));
    let gpu = a.wait_for(id, "running")["gpus"][0].as_u64().unwrap() as usize;
    let t = Instant::now();
    loop {
        let o = a.gpulet(&["status", "--json"], None);
        let s: Value = serde_json::from_slice(&o.stdout).unwrap();
        let limit = s["status"]["gpus"][gpu]["limit_w"].as_f64().unwrap();
        if limit <= 302.0 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "GPU {gpu} never capped: {limit} W");
        std::thread::sleep(Duration::from_millis(100));
    }
    // And held there while the job runs: nothing proposes for the GPU but the cap, and
    // the guard must not release it to its upper bound (rule 3) between two raises.
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(3) {
        let o = a.gpulet(&["status", "--json"], None);
        let s: Value = serde_json::from_slice(&o.stdout).unwrap();
        let limit = s["status"]["gpus"][gpu]["limit_w"].as_f64().unwrap();
        assert!(limit <= 302.0, "GPU {gpu} left its job's cap: {limit} W");
        std::thread::sleep(Duration::from_millis(100));
    }
    a.wait_for(id, "finished");
    a.stop();
    let audited =
        std::fs::read_to_string(d.path().join("telemetry.jsonl")).unwrap().lines().any(|l| {
            let r: Value = serde_json::from_str(l).unwrap();
            r["events"].as_array().into_iter().flatten().any(|e| {
                e["kind"] == json!("limit-changed")
                    && e["gpu"] == json!(gpu)
                    && e["source"] == json!("job")
                    && e["to_w"].as_f64().is_some_and(|w| w <= 302.0)
            })
        });
    assert!(audited, "no limit-changed event from the job's cap");
}

#[test]
fn a_jobs_output_is_rotated_past_the_cap_and_read_back_by_its_owner_only() {
    let d = dir();
    // 1 KiB cap; the job writes 64 KiB at once, then waits to be rotated.
    let a = Agent::start(d.path(), "allow_root = true\nlog_max_kib = 1");
    let id = submitted_id(&a.gpulet(
        &[
            "submit",
            "--",
            "sh",
            "-c",
            "head -c 65536 /dev/zero | tr '\\0' x; echo; sleep 1; echo after",
        ],
        None,
    ));
    a.wait_for(id, "finished");
    let dir = d.path().join(format!("jobs/{id}"));
    let rotated = std::fs::metadata(dir.join("stdout.1")).map(|m| m.len()).unwrap_or(0);
    let current = std::fs::read_to_string(dir.join("stdout")).unwrap();
    assert!(rotated > 1024, "nothing was rotated ({rotated} bytes in stdout.1)");
    assert!(current.trim_start_matches('\0').contains("after"), "{current:?}");
    assert!(current.len() <= 1024 + 8, "stdout is {} bytes past a 1 KiB cap", current.len());
    // Another user cannot read it through the socket.
    let theirs = a.gpulet(&["logs", &id.to_string()], Some(NOBODY));
    assert!(
        !theirs.status.success() && text(&theirs).contains("there is no job"),
        "{}",
        text(&theirs)
    );
    a.stop();
}
