//! Plugin costs, side by side in one run:
//!
//! - one power decision (the power-budget algorithm) on 8 and 64 GPUs: the Wasm
//!   component through the host, the same Rust natively, and the same algorithm in Lua
//!   through mlua (with `--features bench-lua`);
//! - loading each shipped plugin: compiling it, and loading it from the verified cache;
//!   re-instantiating it after a fault;
//! - the decision stage with power-budget on an 8-GPU node, called as the agent calls it
//!   (on the plugin thread, off the async runtime) and on the caller's thread: what
//!   containing WASI's blocking calls costs per tick.
//!
//! Run: `cargo bench -p gpulet --bench plugins --features bench-lua`.

use std::hint::black_box;
use std::path::Path;
use std::sync::{Arc, Mutex};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use gpulet::plugin::engine::PluginEngine;
use gpulet::plugin::host::CallContext;
use gpulet::plugin::kv::KvStore;
use gpulet::plugin::power::{Limits, PowerPlugin};
use gpulet::plugin::wit;
use gpulet_plugin_artifacts as wasm;
use gpulet_policy_algos::power_budget;

/// A node of `n` H100-like GPUs: half busy and capped, a quarter at moderate load, a
/// quarter idle, under a budget of 60% of the sum of TDPs.
fn snapshot(n: u32) -> wit::Snapshot {
    let gpus = (0..n)
        .map(|i| {
            let (power, throttle) = match i % 4 {
                0 | 1 => (498.0, wit::Throttle::SW_POWER_CAP),
                2 => (310.0, wit::Throttle::empty()),
                _ => (71.0, wit::Throttle::GPU_IDLE),
            };
            wit::Gpu {
                index: i,
                power_w: Some(power),
                power_limit_w: Some(500.0),
                energy_j: Some(1e6),
                temp_c: Some(60.0),
                util_pct: Some(if power > 100.0 { 100.0 } else { 0.0 }),
                mem_used_mib: Some(40_000),
                sm_clock_mhz: Some(1700),
                throttle,
                health: wit::Health::Ok,
                min_limit_w: 200.0,
                max_limit_w: 700.0,
                default_limit_w: 700.0,
                proposed_limit_w: None,
            }
        })
        .collect();
    wit::Snapshot { seq: 1, now_ms: 1000, budget_w: Some(0.6 * 700.0 * f64::from(n)), gpus }
}

/// What the guest does before the algorithm, natively.
fn to_algo(s: &wit::Snapshot) -> Vec<gpulet_policy_algos::Gpu> {
    s.gpus
        .iter()
        .map(|g| gpulet_policy_algos::Gpu {
            index: g.index,
            power_w: g.power_w,
            limit_w: g.power_limit_w,
            temp_c: g.temp_c,
            util_pct: g.util_pct,
            capped: g.throttle.contains(wit::Throttle::SW_POWER_CAP),
            lost: g.health == wit::Health::Lost,
            min_w: g.min_limit_w,
            max_w: g.max_limit_w,
            default_w: g.default_limit_w,
            proposed_w: g.proposed_limit_w,
            curve: None,
        })
        .collect()
}

fn start(engine: &PluginEngine, path: &str, gpus: u32) -> PowerPlugin {
    let loaded = engine.load(Path::new(path)).unwrap();
    let infos = (0..gpus)
        .map(|i| wit::GpuInfo {
            index: i,
            uuid: format!("GPU-{i}"),
            name: "H100".into(),
            memory_total_mib: 81559,
        })
        .collect();
    let kv = Arc::new(Mutex::new(KvStore::in_memory(64 << 10)));
    PowerPlugin::start(engine, "bench", loaded.component, "{}".into(), infos, Limits::default(), kv)
        .unwrap()
}

fn decision(c: &mut Criterion) {
    let engine = PluginEngine::new(None).unwrap();
    let mut g = c.benchmark_group("power_decision");
    for n in [8u32, 64] {
        let snap = snapshot(n);
        let no_curves = CallContext { curves: vec![None; n as usize].into(), wall: None };
        let mut plugin = start(&engine, wasm::POWER_BUDGET, n);
        let want = plugin.decide(&snap, &no_curves).unwrap().actions.len();
        assert_eq!(want, n as usize);
        g.bench_with_input(BenchmarkId::new("wasm", n), &snap, |b, s| {
            b.iter(|| black_box(plugin.decide(s, &no_curves).unwrap()))
        });
        let params = power_budget::Params::default();
        g.bench_with_input(BenchmarkId::new("native", n), &snap, |b, s| {
            b.iter(|| black_box(power_budget::decide(&params, s.budget_w, &to_algo(s))))
        });
        #[cfg(feature = "bench-lua")]
        {
            let lua = lua::Peer::new();
            assert_eq!(lua.decide(&snap).len(), n as usize);
            g.bench_with_input(BenchmarkId::new("lua", n), &snap, |b, s| {
                b.iter(|| black_box(lua.decide(s)))
            });
        }
    }
    g.finish();
}

fn load(c: &mut Criterion) {
    let mut g = c.benchmark_group("plugin_load");
    g.sample_size(10);
    let dir = tempfile::tempdir().unwrap();
    let cached = PluginEngine::new(Some(&dir.path().join("cache"))).unwrap();
    let uncached = PluginEngine::new(None).unwrap();
    for (name, path) in [
        ("power-budget", wasm::POWER_BUDGET),
        ("thermal-guard", wasm::THERMAL_GUARD),
        ("idle-saver", wasm::IDLE_SAVER),
    ] {
        let path = Path::new(path);
        g.bench_function(BenchmarkId::new("compile", name), |b| {
            b.iter(|| black_box(uncached.load(path).unwrap()))
        });
        cached.load(path).unwrap();
        g.bench_function(BenchmarkId::new("cached", name), |b| {
            b.iter(|| black_box(cached.load(path).unwrap()))
        });
        let mut plugin = start(&cached, path.to_str().unwrap(), 8);
        g.bench_function(BenchmarkId::new("reinstantiate_and_init", name), |b| {
            b.iter(|| black_box(plugin.time_restart().unwrap()))
        });
    }
    g.finish();
}

#[cfg(feature = "bench-lua")]
mod lua {
    //! The power-budget algorithm in Lua, as an operator would write it for an embedded
    //! Lua policy host: the snapshot marshalled into Lua tables on every call.

    use mlua::{Function, Lua, Table};

    use gpulet::plugin::wit;

    const SOURCE: &str = r#"
local function round_down(w) return math.floor(w * 1000) / 1000 end

return function(budget, gpus, margin, within)
  local avail, managed, total = budget, {}, 0
  for _, g in ipairs(gpus) do
    if g.lost then
      avail = avail - (g.limit or g.max)
    else
      local held = g.capped or (g.power and g.limit and g.power >= g.limit * (1 - within))
      local demand, why
      if held then demand, why = g.max, "held down by its cap"
      elseif g.power then demand, why = math.min(math.max(g.power + margin, g.min), g.max), "draw plus margin"
      else demand, why = g.max, "power unreadable" end
      managed[#managed + 1] = { g = g, d = demand, why = why }
      total = total + demand
    end
  end
  local out = {}
  if total <= avail then
    local headroom = 0
    for _, m in ipairs(managed) do headroom = headroom + (m.g.max - m.d) end
    local spare = avail - total
    for _, m in ipairs(managed) do
      local extra = 0
      if headroom > 0 then extra = spare * (m.g.max - m.d) / headroom end
      out[#out + 1] = { gpu = m.g.index, limit = round_down(math.min(m.d + extra, m.g.max)),
        reason = string.format("demand %d W (%s) fits the %d W budget; +%d W spare headroom", math.floor(m.d + 0.5), m.why, math.floor(budget + 0.5), math.floor(extra + 0.5)) }
    end
  else
    local lo, hi = 0, 0
    for _, m in ipairs(managed) do if m.d > hi then hi = m.d end end
    for _ = 1, 60 do
      local mid, sum = (lo + hi) / 2, 0
      for _, m in ipairs(managed) do sum = sum + math.min(math.max(mid, m.g.min), math.max(m.d, m.g.min)) end
      if sum > avail then hi = mid else lo = mid end
    end
    for _, m in ipairs(managed) do
      local limit = math.min(math.max(lo, m.g.min), math.max(m.d, m.g.min))
      out[#out + 1] = { gpu = m.g.index, limit = round_down(limit),
        reason = string.format("demand %d W (%s); budget %d W water-filled at %d W", math.floor(m.d + 0.5), m.why, math.floor(budget + 0.5), math.floor(lo + 0.5)) }
    end
  end
  return out
end
"#;

    pub struct Peer {
        lua: Lua,
        decide: Function,
    }

    impl Peer {
        pub fn new() -> Peer {
            let lua = Lua::new();
            let decide: Function = lua.load(SOURCE).eval().unwrap();
            Peer { lua, decide }
        }

        /// One decision: marshal the snapshot, call, read the actions back.
        pub fn decide(&self, s: &wit::Snapshot) -> Vec<(u32, f64, String)> {
            let gpus = self.lua.create_table().unwrap();
            for (i, g) in s.gpus.iter().enumerate() {
                let t = self.lua.create_table().unwrap();
                t.set("index", g.index).unwrap();
                t.set("power", g.power_w).unwrap();
                t.set("limit", g.power_limit_w).unwrap();
                t.set("capped", g.throttle.contains(wit::Throttle::SW_POWER_CAP)).unwrap();
                t.set("lost", g.health == wit::Health::Lost).unwrap();
                t.set("min", g.min_limit_w).unwrap();
                t.set("max", g.max_limit_w).unwrap();
                gpus.set(i + 1, t).unwrap();
            }
            let out: Table =
                self.decide.call((s.budget_w.unwrap_or(0.0), gpus, 25.0, 0.03)).unwrap();
            out.sequence_values::<Table>()
                .map(|t| {
                    let t = t.unwrap();
                    (t.get("gpu").unwrap(), t.get("limit").unwrap(), t.get("reason").unwrap())
                })
                .collect()
        }
    }
}

fn chain(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "[power]\nbudget_w = 4000\n[plugins]\ncache_dir = \"c\"\nstate_dir = \"s\"\n[[sim.gpu]]\npreset = \"h100-sxm\"\nworkload = \"training\"\ncount = 8\n[[plugin]]\nname = \"budget\"\npath = {:?}\n",
        wasm::POWER_BUDGET
    );
    let config = gpulet::config::Config::parse(&toml).unwrap();
    config.validate().unwrap();
    let clock = gpulet::clock::VirtualClock::new(0);
    let backend =
        gpulet::setup::open_backend(&config, dir.path(), Arc::new(clock.clone())).unwrap();
    let inventory = backend.backend.inventory().to_vec();
    let mut agent =
        gpulet::setup::agent(&config, dir.path(), backend, Vec::new(), Arc::new(clock.clone()))
            .unwrap();
    let snap = agent.tick().snapshot;
    let mut chain = gpulet::setup::policy_chain(&config, dir.path(), inventory.len()).unwrap();
    let failed = chain.load(
        &gpulet::setup::plugin_specs(&config, dir.path()).power,
        &inventory,
        &mut Vec::new(),
    );
    assert!(failed.is_empty());
    let mut g = c.benchmark_group("chain_decide_8_gpus");
    g.bench_function("plugin_thread", |b| {
        b.iter(|| black_box(chain.decide(&snap, &mut Vec::new(), &mut Vec::new())))
    });
    g.bench_function("caller_thread", |b| {
        b.iter(|| black_box(chain.decide_on_this_thread(&snap, &mut Vec::new(), &mut Vec::new())))
    });
    g.finish();
}

/// The anomaly reporter on a tick: through the plugin (the snapshot lowered, `report`,
/// the items lifted back) and natively, side by side.
fn report(c: &mut Criterion) {
    use gpulet::plugin::reporter::ReporterPlugin;
    use gpulet_policy_algos::anomaly;
    let engine = PluginEngine::new(None).unwrap();
    let mut g = c.benchmark_group("report");
    for n in [8u32, 64] {
        let snap = snapshot(n);
        let no_curves = CallContext { curves: vec![None; n as usize].into(), wall: None };
        let loaded = engine.load(Path::new(wasm::ANOMALY)).unwrap();
        let kv = Arc::new(Mutex::new(KvStore::in_memory(64 << 10)));
        let infos = (0..n)
            .map(|i| wit::GpuInfo {
                index: i,
                uuid: format!("GPU-{i}"),
                name: "H100".into(),
                memory_total_mib: 81559,
            })
            .collect();
        let mut plugin = ReporterPlugin::start(
            &engine,
            "bench",
            loaded.component,
            "{}".into(),
            infos,
            Limits::default(),
            kv,
        )
        .unwrap();
        assert!(!plugin.report(&snap, &no_curves).unwrap().0.is_empty());
        g.bench_with_input(BenchmarkId::new("wasm", n), &snap, |b, s| {
            b.iter(|| black_box(plugin.report(s, &no_curves).unwrap()))
        });
        let readings: Vec<anomaly::Reading> = snap
            .gpus
            .iter()
            .map(|g| anomaly::Reading {
                index: g.index,
                power_w: g.power_w,
                temp_c: g.temp_c,
                util_pct: g.util_pct,
                limit_w: g.power_limit_w,
                throttle: anomaly::Throttle::NONE,
                health: anomaly::Health::Ok,
            })
            .collect();
        let params = anomaly::Params::default();
        let mut state = anomaly::State::default();
        g.bench_with_input(BenchmarkId::new("native", n), &readings, |b, r| {
            b.iter(|| black_box(anomaly::report(&params, &mut state, r)))
        });
    }
    g.finish();
}

criterion_group!(benches, decision, load, chain, report);
criterion_main!(benches);
