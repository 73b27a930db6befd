//! The config contract: what loads, what defaults to what, and what every bad config
//! says.

use std::time::Duration;

use gpulet::config::{BackendKind, Config, SinkKind};

use crate::repo;

/// Parse and validate; the errors as one string.
fn check(toml: &str) -> Result<Config, String> {
    let c = Config::parse(toml).map_err(|e| e.to_string())?;
    c.validate().map_err(|e| e.to_string())?;
    Ok(c)
}

#[test]
fn every_example_config_loads_and_builds() {
    let mut seen = 0;
    let tmp = tempfile::tempdir().unwrap();
    let built = std::path::Path::new(gpulet_plugin_artifacts::POWER_BUDGET).parent().unwrap();
    for entry in std::fs::read_dir(repo().join("examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        // Plugin paths as the examples give them, pointed at where this build put the
        // plugins, and state kept out of the checkout.
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("../target/plugins/wasm32-wasip2/plugin", built.to_str().unwrap())
            .replace("../target/gpulet-", &format!("{}/", tmp.path().display()));
        let config = Config::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        config.validate().unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let base = path.parent().unwrap();
        let clock = gpulet::clock::SystemClock::new();
        let backend = gpulet::setup::open_backend(&config, base, clock.clone()).unwrap();
        let mut agent = gpulet::setup::agent(&config, base, backend, Vec::new(), clock).unwrap();
        let failed: Vec<_> = agent
            .tick()
            .events
            .into_iter()
            .filter(|e| matches!(e, gpulet::telemetry::Event::PluginLoadFailed { .. }))
            .collect();
        assert!(failed.is_empty(), "{}: {failed:?}", path.display());
        assert_eq!(agent.policy().status().len(), config.plugin.len());
        seen += 1;
    }
    assert!(seen >= 3, "examples/gpulet.toml, demo.toml and plugins.toml at least");
}

#[test]
fn an_empty_config_is_valid_and_takes_the_documented_defaults() {
    let c = check("").unwrap();
    assert_eq!(c.tick, Duration::from_secs(1));
    assert_eq!(c.backend, BackendKind::Sim);
    assert_eq!(c.telemetry.sink, SinkKind::Stdout);
    assert_eq!((c.power.budget_w, c.power.limit_w, c.power.deadband_w), (None, None, 1.0));
    assert_eq!(c.power.raise_interval, Duration::from_secs(1));
    assert_eq!(c.sim.seed, 1);
    assert!(!c.node_id().is_empty(), "the node id defaults to the hostname");
}

/// Each bad config, and what the error must say: the key path, the bad value and what
/// is accepted.
const BAD: &[(&str, &str)] = &[
    // Parsing: syntax, unknown keys, wrong types, unknown names.
    ("tick = ", "line 1: "),
    (
        "tik = \"1s\"",
        "unknown field `tik`, expected one of `node`, `tick`, `backend`, `power`, `telemetry`, `sim`",
    ),
    (
        "[power]\nbudget = 3000",
        "line 2: power.budget: unknown field `budget`, expected one of `budget_w`, `min_w`",
    ),
    ("[power]\nbudget_w = \"lots\"", "power.budget_w: invalid type: string \"lots\", expected f64"),
    ("tick = \"fast\"", "tick: "),
    ("backend = \"cuda\"", "backend: unknown variant `cuda`, expected `sim` or `nvml`"),
    ("[[power.gpu]]\nindex = -1", "power.gpu[0].index: invalid value: integer `-1`, expected u32"),
    (
        "[[power.gpu]]\nindex = 0\nlimit = 300",
        "line 3: power.gpu[0].limit: unknown field `limit`, expected one of `index`, `limit_w`",
    ),
    (
        "[telemetry]\nsink = \"kafka\"",
        "telemetry.sink: unknown variant `kafka`, expected one of `stdout`, `file`, `none`",
    ),
    (
        "[[sim.gpu]]\npreset = \"h100-sxm\"\nworkload = \"mining\"",
        "sim.gpu[0].workload: unknown variant `mining`",
    ),
    ("[[sim.gpu]]\npreset = \"h100-sxm\"", "sim.gpu[0]: missing field `workload`"),
    // Validation: values and relations.
    ("node = \"\"", "node: \"\" has 0 characters; accepted: 1 to 128 characters"),
    ("node = \"rack/1\"", "node: \"rack/1\" contains '/', which MQTT topics cannot carry"),
    ("node = \"a+b\"", "node: \"a+b\" contains '+'"),
    ("node = \"a\\tb\"", "node: \"a\\tb\" contains '\\t'"),
    ("tick = \"5ms\"", "tick: \"5ms\" is out of range; accepted: 10ms to 1h"),
    ("tick = \"2h\"", "tick: \"2h\" is out of range; accepted: 10ms to 1h"),
    (
        "[power]\nbudget_w = 0",
        "power.budget_w: 0 W is out of range; accepted: more than 0 up to 100000 W",
    ),
    ("[power]\nbudget_w = -5", "power.budget_w: -5 W is out of range"),
    ("[power]\nbudget_w = nan", "power.budget_w: NaN W is out of range"),
    (
        "[power]\nmin_w = 500\nmax_w = 400",
        "power.min_w: 500 W is above power.max_w (400 W); accepted: min_w ≤ max_w",
    ),
    ("[power]\nlimit_w = 800\nmax_w = 600", "power.limit_w: 800 W is above power.max_w (600 W)"),
    ("[power]\nlimit_w = 100\nmin_w = 150", "power.limit_w: 100 W is below power.min_w (150 W)"),
    ("[power]\ndeadband_w = 80", "power.deadband_w: 80 W is out of range; accepted: 0 to 50 W"),
    (
        "[power]\nraise_interval = \"2h\"",
        "power.raise_interval: \"2h\" is out of range; accepted: 0s to 1h",
    ),
    (
        "[power]\nmax_w = 400\n[[power.gpu]]\nindex = 2\nlimit_w = 450",
        "power.gpu[0].limit_w: 450 W is above power.gpu[0].max_w (400 W)",
    ),
    (
        "[[power.gpu]]\nindex = 1\n[[power.gpu]]\nindex = 1",
        "power.gpu[1].index: GPU 1 is configured twice; accepted: each index once",
    ),
    ("[telemetry]\nsink = \"file\"", "telemetry.path: missing; sink = \"file\" needs a path"),
    ("[telemetry]\npath = \"/tmp/x\"", "telemetry.path: /tmp/x is set but sink is not \"file\""),
    (
        "[[sim.gpu]]\npreset = \"h200\"\nworkload = \"idle\"",
        "sim.gpu[0].preset: \"h200\" is not a known GPU; accepted: h100-sxm, a100-sxm4, l40s",
    ),
    (
        "[[sim.gpu]]\npreset = \"l40s\"\nworkload = \"idle\"\ncount = 0",
        "sim.gpu[0].count: 0 is out of range; accepted: 1 to 64",
    ),
    (
        "[[sim.gpu]]\npreset = \"l40s\"\nworkload = \"idle\"\ncount = 40\n[[sim.gpu]]\npreset = \"l40s\"\nworkload = \"idle\"\ncount = 40",
        "sim.gpu: 80 GPUs in all; accepted: at most 64",
    ),
    (
        "[[sim.gpu]]\npreset = \"l40s\"\nworkload = \"trace\"",
        "sim.gpu[0].trace: missing; workload = \"trace\" needs a CSV path",
    ),
    (
        "[[sim.gpu]]\npreset = \"l40s\"\nworkload = \"idle\"\ntrace = \"x.csv\"",
        "sim.gpu[0].trace: is set but workload is not \"trace\"",
    ),
    (
        "[[sim.gpu]]\npreset = \"l40s\"\nworkload = \"idle\"\ntrace_start = \"5s\"",
        "sim.gpu[0].trace_start: is set without a trace",
    ),
    (
        "[[sim.fault]]\nat = \"1s\"\ngpu = 8\nkind = \"lost\"",
        "sim.fault[0].gpu: 8 does not exist; accepted: 0 to 7 (the simulated node has 8 GPUs)",
    ),
    (
        "[[sim.fault]]\nat = \"1s\"\ngpu = 0\nkind = \"xid\"",
        "sim.fault[0].xid: missing; kind = \"xid\" needs an XID code",
    ),
    (
        "[[sim.fault]]\nat = \"1s\"\ngpu = 0\nkind = \"field\"\nfield = \"fan\"",
        "sim.fault[0].field: \"fan\" is not a field; accepted: power_w, energy_j, temp_c",
    ),
    (
        "[[sim.fault]]\nat = \"1s\"\ngpu = 0\nkind = \"lost\"\nxid = 79",
        "sim.fault[0].xid: is set but kind is not \"xid\"",
    ),
    // [mqtt]
    ("[mqtt]\nroot = \"x\"", "mqtt: missing field `url`"),
    (
        "[mqtt]\nurl = \"mqtt://b\"\nbogus = 1",
        "mqtt.bogus: unknown field `bogus`, expected one of `url`",
    ),
    (
        "[mqtt]\nurl = \"http://b\"",
        "mqtt.url: \"http://b\" has no mqtt:// or mqtts:// scheme; accepted: mqtt://HOST[:PORT]",
    ),
    (
        "[mqtt]\nurl = \"mqtt://b:99999\"",
        "mqtt.url: \"mqtt://b:99999\" has port \"99999\", not a number from 1 to 65535",
    ),
    ("[mqtt]\nurl = \"mqtts://b\"", "mqtt.ca_file: missing; mqtts:// needs the CA certificate"),
    (
        "[mqtt]\nurl = \"mqtt://b\"\nca_file = \"ca.pem\"",
        "mqtt.ca_file: is set but the url is mqtt://",
    ),
    (
        "[mqtt]\nurl = \"mqtts://b\"\nca_file = \"c\"\ncert_file = \"c\"",
        "mqtt.cert_file: cert_file and key_file go together",
    ),
    (
        "[mqtt]\nurl = \"mqtt://b\"\npassword_file = \"p\"",
        "mqtt.password_file: is set without mqtt.username",
    ),
    ("[mqtt]\nurl = \"mqtt://b\"\nroot = \"a/#\"", "mqtt.root: \"a/#\" is not a topic root"),
    (
        "[mqtt]\nurl = \"mqtt://b\"\nroot = \"ops/\\u0001\"",
        "mqtt.root: \"ops/\\u{1}\" is not a topic root",
    ),
    ("[mqtt]\nurl = \"mqtt://b\"\nroot = \"$SYS/x\"", "mqtt.root: \"$SYS/x\" is not a topic root"),
    (
        "[mqtt]\nurl = \"mqtt://b\"\nclient_id = \"gpulet-\\u202en1\"",
        "mqtt.client_id: \"gpulet-\\u{202e}n1\"; accepted: 1 to 128 characters",
    ),
    ("node = \"gpu-\\u200ba01\"", "node: \"gpu-\\u{200b}a01\" contains '\\u{200b}'"),
    (
        "[mqtt]\nurl = \"mqtt://b\"\ninflight = 0",
        "mqtt.inflight: 0 is out of range; accepted: 1 to 1000",
    ),
    (
        "[mqtt]\nurl = \"mqtt://b\"\nkeep_alive = \"0s\"",
        "mqtt.keep_alive: \"0s\" is out of range; accepted: 5s to 1h",
    ),
    (
        "[mqtt]\nurl = \"mqtt://b\"\n[mqtt.outbox]\nmax_kib = 1",
        "mqtt.outbox.max_kib: 1 is out of range",
    ),
    (
        "[mqtt]\nurl = \"mqtt://b\"\n[mqtt.commands]\nrequire_signed = true",
        "mqtt.commands.require_signed: is true but no public key is configured",
    ),
    (
        "[mqtt]\nurl = \"mqtt://b\"\n[mqtt.commands]\nmax_validity = \"2days\"",
        "mqtt.commands.max_validity: \"2days\" is out of range; accepted: 1s up to id_window",
    ),
    // Reporters: no grants, names unique across plugins and reporters.
    (
        "[[reporter]]\nname = \"r\"\npath = \"r.wasm\"\ngrants = [\"lower\"]",
        "reporter[0].grants: a reporter sets no power limits; accepted: none",
    ),
    (
        "[[plugin]]\nname = \"x\"\npath = \"x.wasm\"\n[[reporter]]\nname = \"x\"\npath = \"r.wasm\"",
        "reporter[0].name: \"x\" is used twice or reserved; accepted: a name no other plugin or reporter has",
    ),
    (
        "[[reporter]]\nname = \"R\"\npath = \"r.wasm\"",
        "reporter[0].name: \"R\" is not a plugin name",
    ),
];

#[test]
fn every_bad_config_says_what_is_wrong_and_what_is_accepted() {
    let mut failures = Vec::new();
    for (toml, want) in BAD {
        match check(toml) {
            Ok(_) => failures.push(format!("{toml:?}: accepted, want error containing {want:?}")),
            Err(got) if !got.contains(want) => {
                failures.push(format!("{toml:?}:\n   got  {got:?}\n   want {want:?}"))
            }
            Err(_) => {}
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases wrong:\n{}",
        failures.len(),
        BAD.len(),
        failures.join("\n")
    );
}

#[test]
fn validation_reports_every_problem_at_once() {
    let err = check("tick = \"1ms\"\nnode = \"a/b\"\n[power]\nbudget_w = -1").unwrap_err();
    assert_eq!(err.lines().count(), 3, "{err}");
}

#[test]
fn problems_only_the_hardware_reveals_are_config_errors_at_start() {
    let cases = [
        (
            "[[power.gpu]]\nindex = 8\nlimit_w = 300",
            "power.gpu[0].index: GPU 8 does not exist on this node; accepted: 0 to 7",
        ),
        ("[power]\nmax_w = 100", "power.max_w: 100 W is below what GPU 0 accepts 200 to 700 W"),
        (
            "[[sim.gpu]]\npreset = \"l40s\"\nworkload = \"trace\"\ntrace = \"no/such.csv\"",
            "sim.gpu[0].trace: cannot read trace",
        ),
    ];
    for (toml, want) in cases {
        let c = check(toml).unwrap();
        let clock = gpulet::clock::SystemClock::new();
        let got = gpulet::setup::open_backend(&c, &repo(), clock.clone())
            .and_then(|b| gpulet::setup::agent(&c, &repo(), b, Vec::new(), clock))
            .map(|_| ())
            .unwrap_err();
        assert_eq!(got.exit_code(), 2, "{got}");
        assert!(got.to_string().contains(want), "{toml:?}: got {got}, want {want:?}");
    }
}
