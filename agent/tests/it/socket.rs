//! The control socket and the metrics endpoint of the real binary (`gpulet run`), as an
//! operator and as a hostile local user meet them: `gpulet status` and the local commands,
//! permissions from the kernel's peer credentials, bad requests, a stale socket file,
//! `promtool check metrics` and a real Prometheus server scraping the endpoint.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::broker::free_port;

/// `gpulet run` with a socket (and, with `metrics`, the endpoint) in `dir`.
pub(crate) struct Agent {
    child: Child,
    // Holds the config; removed with the agent.
    _dir: tempfile::TempDir,
    socket: PathBuf,
    pub(crate) metrics: Option<u16>,
}

impl Agent {
    fn start(extra: &str, metrics: bool) -> Agent {
        Agent::start_ticking("200ms", extra, metrics)
    }

    /// With a tick period of `tick`.
    pub(crate) fn start_ticking(tick: &str, extra: &str, metrics: bool) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        // Others may traverse the folder: the permission tests connect as another user.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let socket = dir.path().join("gpulet.sock");
        let port = metrics.then(free_port);
        let metrics_toml = port.map_or(String::new(), |p| {
            format!("[metrics]\nenabled = true\nlisten = \"127.0.0.1:{p}\"\n")
        });
        let toml = format!(
            "node = \"sock-1\"\ntick = \"{tick}\"\n[telemetry]\nsink = \"none\"\n[power]\nbudget_w = 4000\n{metrics_toml}[socket]\npath = {:?}\n{extra}\n",
            socket.display().to_string()
        );
        let a = Agent::spawn(dir, &toml, &socket, port);
        a.wait_ready();
        a
    }

    /// `gpulet run` with `toml` as its config, in `dir`.
    fn spawn(dir: tempfile::TempDir, toml: &str, socket: &Path, metrics: Option<u16>) -> Agent {
        std::fs::write(dir.path().join("gpulet.toml"), toml).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_gpulet"))
            .args(["run", "--config", "gpulet.toml"])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Agent { child, _dir: dir, socket: socket.to_path_buf(), metrics }
    }

    /// Until `status` answers with a tick run (10 s at most).
    fn wait_ready(&self) {
        let t = Instant::now();
        loop {
            if let Ok(r) = self.request(&json!({"op": "status"}))
                && r["status"]["ticks"].as_u64() > Some(0)
            {
                return;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "the socket never answered");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub(crate) fn request(&self, r: &Value) -> std::io::Result<Value> {
        let mut s = UnixStream::connect(&self.socket)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        writeln!(s, "{r}")?;
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line)?;
        Ok(serde_json::from_str(&line).unwrap())
    }

    /// The CLI against this agent's socket, as `uid` when given.
    fn gpulet(&self, args: &[&str], uid: Option<u32>) -> Output {
        let mut c = Command::new(env!("CARGO_BIN_EXE_gpulet"));
        c.args(args).arg("--socket").arg(&self.socket);
        if let Some(uid) = uid {
            c.uid(uid).gid(uid);
        }
        c.output().unwrap()
    }

    pub(crate) fn stop(mut self) -> String {
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

/// `nobody`: a caller that is neither root nor the agent's user.
const NOBODY: u32 = 65534;

fn root() -> bool {
    std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap()) == 0
}

#[test]
fn status_and_the_local_commands_work_over_the_socket() {
    // A tick an hour: only the tick a change runs at once can apply it.
    let a = Agent::start_ticking("1h", "", false);
    let out = a.gpulet(&["status"], None);
    let shown = text(&out);
    assert_eq!(out.status.code(), Some(0), "{shown}");
    assert!(
        shown.contains("node sock-1") && shown.contains("node budget 4000 W, from the config"),
        "{shown}"
    );
    assert_eq!(shown.matches("GPU-").count(), 8, "{shown}");

    // A decrease is in force when the command returns: the next status shows limits that
    // fit it (the loop runs a tick on a budget change, before any other request).
    let out = a.gpulet(&["set-budget", "2000"], None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "node budget 2000 W");
    let s = a.request(&json!({"op": "status"})).unwrap();
    let limits: f64 = s["status"]["gpus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["limit_w"].as_f64().unwrap())
        .sum();
    assert!(limits <= 2000.0 + 1e-6, "limits {limits} W over the new budget: {s}");
    assert_eq!(
        s["status"]["budget"],
        json!({"budget_w": 2000.0, "commanded_w": 2000.0, "configured_w": 4000.0, "set_by": "command"})
    );

    let out = a.gpulet(&["set-limit", "3", "250"], None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = a.gpulet(&["set-limit", "3", "5000"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("outside GPU 3's bounds; accepted: 200 to 700 W"),
        "{}",
        text(&out)
    );
    let out = a.gpulet(&["set-limit", "9", "300"], None);
    assert!(text(&out).contains("GPU 9 does not exist; accepted: 0 to 7"), "{}", text(&out));
    let out = a.gpulet(&["clear-health", "2"], None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    // No config file plugins were loaded from: reload says what it did.
    let out = a.gpulet(&["reload"], None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = a.gpulet(&["set-budget", "none"], None);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "node budget back to the configured 4000 W"
    );

    let out = a.gpulet(&["status", "--json"], None);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"]["gpus"][3]["operator_limit_w"], json!(250.0));
    assert!(
        v["status"]["recent_events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "limit-changed")
    );
    let log = a.stop();
    // Every change is in the journal with the caller's uid, in words, not Rust's.
    let uid = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap());
    assert!(log.contains("local request done") && log.contains(&format!("uid={uid}")), "{log}");
    assert!(
        log.contains("budget=2000 W") && !log.contains("Some(") && !log.contains("None"),
        "{log}"
    );
}

#[test]
fn a_caller_who_may_only_read_is_refused_a_change() {
    if !root() {
        eprintln!("SKIPPED LOUDLY: needs root to run the client as another user (CI runs as root)");
        return;
    }
    let a = Agent::start("mode = \"0666\"\n", false);
    let out = a.gpulet(&["status"], Some(NOBODY));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = a.gpulet(&["set-budget", "1000"], Some(NOBODY));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("uid 65534 may read but not change")
            && text(&out).contains("(forbidden)"),
        "{}",
        text(&out)
    );
    let s = a.request(&json!({"op": "status"})).unwrap();
    assert_eq!(s["status"]["budget"]["budget_w"], json!(4000.0), "the refused change happened");
    let log = a.stop();
    assert!(log.contains("local request refused") && log.contains("uid=65534"), "{log}");

    // A member of socket.admin_group may change things (nobody's group is nogroup).
    let a = Agent::start("mode = \"0666\"\nadmin_group = \"nogroup\"\n", false);
    let out = a.gpulet(&["set-budget", "1000"], Some(NOBODY));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let log = a.stop();
    assert!(log.contains("local request done") && log.contains("uid=65534"), "{log}");

    // The default mode (0660, the agent's group): another user cannot even connect, and
    // status says so with the monitoring code for "unknown".
    let a = Agent::start("", false);
    let out = a.gpulet(&["status"], Some(NOBODY));
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(text(&out).contains("cannot reach the agent"), "{}", text(&out));
    a.stop();
}

#[test]
fn hostile_requests_get_errors_and_the_agent_goes_on() {
    let a = Agent::start("", false);
    let cases: &[(&[u8], &str)] = &[
        (b"not json\n", "not JSON"),
        (b"[1,2]\n", "a request is one JSON object"),
        (b"{\"op\":\"status\",\"op\":\"set-power-budget\"}\n", "appears twice"),
        (
            b"{\"op\":\"rm -rf\"}\n",
            "is not an op; accepted: status, submit, jobs, job, cancel, logs, set-power-budget",
        ),
        (b"{\"id\":7}\n", "op is missing"),
        (b"{\"op\":\"status\",\"v\":2}\n", "accepted: 1"),
        (b"{\"op\":\"set-power-budget\",\"watts\":1e300}\n", "out of range"),
        (b"{\"op\":\"set-power-budget\"}\n", "watts is missing"),
        (b"{\"op\":\"set-power-limit\",\"gpu\":-1,\"watts\":300}\n", "gpu"),
        (b"{\"op\":\"status\",\"extra\":1}\n", "unknown field `extra`"),
    ];
    for (req, want) in cases {
        let mut s = UnixStream::connect(&a.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(req).unwrap();
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["ok"], json!(false), "{line}");
        assert!(
            v["error"].as_str().unwrap().contains(want),
            "{:?}: {line}",
            String::from_utf8_lossy(req)
        );
    }
    // The id is echoed, on errors too.
    let v = a.request(&json!({"op": "nope", "id": "r-1"})).unwrap();
    assert_eq!(v["id"], json!("r-1"));
    // A line longer than 256 KiB (room for a job's whole environment) is refused and the
    // connection closed.
    let mut s = UnixStream::connect(&a.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(&vec![b' '; 260 * 1024]);
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    assert!(line.contains("longer than 262144 bytes"), "{line}");
    // More connections left open and idle than are served at once (64) keep the next
    // caller out only until they are closed for idling (10 s).
    let idle: Vec<UnixStream> = (0..70).map(|_| UnixStream::connect(&a.socket).unwrap()).collect();
    let t = Instant::now();
    assert_eq!(a.request(&json!({"op": "status"})).unwrap()["ok"], json!(true));
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    drop(idle);
    // Several requests on one connection.
    let mut s = UnixStream::connect(&a.socket).unwrap();
    writeln!(s, "{}\n{}", json!({"op":"status","id":1}), json!({"op":"status","id":2})).unwrap();
    let mut r = BufReader::new(&s);
    for id in [1, 2] {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!((v["ok"].clone(), v["id"].clone()), (json!(true), json!(id)));
    }
    a.wait_ready();
    a.stop();
}

#[test]
fn a_stale_socket_is_replaced_and_anything_else_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gpulet.sock");
    // A socket nobody serves: what a crash leaves.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let a = Agent::start_at(&path);
    a.wait_ready();
    // A second agent on the same path does not take the first one's socket.
    let b = Agent::start_unready_at(&path);
    std::thread::sleep(Duration::from_secs(1));
    a.wait_ready();
    let log_b = b.stop();
    assert!(log_b.contains("another agent serves"), "{log_b}");
    a.stop();
    assert!(!path.exists(), "the socket file is removed at stop");

    // A regular file at the path: left alone; the agent runs without a socket.
    std::fs::write(&path, "keep me").unwrap();
    let c = Agent::start_unready_at(&path);
    std::thread::sleep(Duration::from_secs(1));
    let log = c.stop();
    assert!(log.contains("exists and is not a socket; it is left alone"), "{log}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "keep me");
}

impl Agent {
    fn start_at(path: &Path) -> Agent {
        let a = Agent::start_unready_at(path);
        a.wait_ready();
        a
    }

    fn start_unready_at(path: &Path) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let toml = format!(
            "node = \"sock-2\"\ntick = \"200ms\"\n[telemetry]\nsink = \"none\"\n[socket]\npath = {:?}\n",
            path.display().to_string()
        );
        Agent::spawn(dir, &toml, path, None)
    }
}

pub(crate) fn http_get(port: u16, accept: Option<&str>) -> (String, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let accept = accept.map_or(String::new(), |a| format!("Accept: {a}\r\n"));
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\n{accept}\r\n").unwrap();
    let mut all = String::new();
    s.read_to_string(&mut all).unwrap();
    let (head, body) = all.split_once("\r\n\r\n").unwrap();
    (head.to_owned(), body.to_owned())
}

#[test]
fn metrics_pass_promtool_and_a_real_prometheus_scrapes_them() {
    let a = Agent::start("", true);
    let port = a.metrics.unwrap();
    let (head, body) = http_get(port, None);
    assert!(
        head.starts_with("HTTP/1.1 200") && head.contains("text/plain; version=0.0.4"),
        "{head}"
    );
    for name in [
        "gpulet_gpu_power_watts{",
        "gpulet_gpu_energy_joules_total{",
        "gpulet_gpu_temperature_celsius{",
        "gpulet_gpu_power_limit_watts{",
        "gpulet_gpu_health{",
        "gpulet_node_power_budget_watts{} 4000",
        "process_resident_memory_bytes",
    ] {
        assert!(body.contains(name), "{name} missing:\n{body}");
    }
    // promtool (Debian's `prometheus` package) checks the exposition.
    let promtool = which("promtool");
    let mut check = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(out.status.success(), "promtool check metrics: {}\n{body}", text(&out));
    // OpenMetrics to a scraper that asks for it.
    let (head, body) = http_get(port, Some("application/openmetrics-text;version=1.0.0"));
    assert!(head.contains("application/openmetrics-text") && body.ends_with("# EOF\n"), "{head}");

    // A real Prometheus server, on a free loopback port, scrapes every second.
    let prom_port = free_port();
    let pdir = tempfile::tempdir().unwrap();
    std::fs::write(
        pdir.path().join("prometheus.yml"),
        format!("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: gpulet\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"),
    )
    .unwrap();
    let mut prom = Command::new(which("prometheus"))
        .arg(format!("--config.file={}", pdir.path().join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", pdir.path().join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let query = "gpulet_gpu_power_watts%7Bgpu%3D%220%22%7D";
    let t = Instant::now();
    let answer = loop {
        let got = std::net::TcpStream::connect(("127.0.0.1", prom_port)).ok().and_then(|mut s| {
            write!(s, "GET /api/v1/query?query={query} HTTP/1.0\r\n\r\n").ok()?;
            let mut all = String::new();
            s.read_to_string(&mut all).ok()?;
            let body = all.split_once("\r\n\r\n")?.1.to_owned();
            let v: Value = serde_json::from_str(&body).ok()?;
            (!v["data"]["result"].as_array()?.is_empty()).then_some(v)
        });
        if let Some(v) = got {
            break v;
        }
        if t.elapsed() > Duration::from_secs(60) {
            let _ = prom.kill();
            panic!("Prometheus never had gpulet_gpu_power_watts{{gpu=\"0\"}}");
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let _ = prom.kill();
    let _ = prom.wait();
    let r = &answer["data"]["result"][0];
    assert_eq!(r["metric"]["job"], json!("gpulet"));
    let w: f64 = r["value"][1].as_str().unwrap().parse().unwrap();
    assert!(w > 0.0 && w < 1000.0, "{answer}");
    a.stop();
}

/// A program from Debian's packages that `.ci/test` installs; loud if it is missing.
fn which(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/sbin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} is not installed (Debian package `prometheus`; .ci/test installs it)");
}
