//! A `reporter` plugin for the host's tests, well-behaved or hostile as its config says.
//! The host must keep what is valid, refuse the rest (counted, reported once per
//! reason), and contain a reporter that faults.
//!
//! Config: `{"mode": M}`:
//!
//! | mode | what `report` returns |
//! |---|---|
//! | `fine` | metric `fixture.power_w` per GPU (its power), metric `fixture.ticks` and an event `tick` naming the tick |
//! | `bad` | every tick: a metric named `Bad Name`, one valued NaN, one about GPU 99, an event of kind `Bad_Kind`; and one valid metric `fixture.ok` |
//! | `flood` | 1,000 valid metrics and 100 valid events a tick |
//! | `huge` | 5,000 metrics: past what a call may return (a fault) |
//! | `trap` | panics |
//! | `loop` | never returns (stopped at its deadline) |
//! | `alloc` | allocates until its memory cap stops it |

use gpulet_guest::{
    ConfigError, GpuInfo, Metric, PluginInfo, ReportEvent, ReportItem, ReporterGuest, Snapshot,
};
use serde::Deserialize;
use std::cell::RefCell;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Config {
    mode: String,
}

thread_local! {
    static MODE: RefCell<String> = const { RefCell::new(String::new()) };
}

fn metric(name: &str, value: f64, gpu: Option<u32>) -> ReportItem {
    ReportItem::Metric(Metric { name: name.to_owned(), value, gpu })
}

fn event(kind: &str, message: String, gpu: Option<u32>) -> ReportItem {
    ReportItem::Event(ReportEvent { kind: kind.to_owned(), message, gpu })
}

struct Plugin;

impl ReporterGuest for Plugin {
    fn info() -> PluginInfo {
        gpulet_guest::info("fixture-reporter", env!("CARGO_PKG_VERSION"))
    }

    fn validate_config(config: String) -> Result<(), Vec<ConfigError>> {
        gpulet_guest::parse_config::<Config>(&config).map(|_| ())
    }

    fn init(config: String, _gpus: Vec<GpuInfo>) -> Result<(), String> {
        let c: Config = gpulet_guest::parse_config(&config)
            .map_err(|e| format!("{}: {}", e[0].path, e[0].message))?;
        MODE.with(|m| *m.borrow_mut() = c.mode);
        Ok(())
    }

    fn report(snapshot: Snapshot) -> Vec<ReportItem> {
        match MODE.with(|m| m.borrow().clone()).as_str() {
            "bad" => vec![
                metric("Bad Name", 1.0, None),
                metric("fixture.nan", f64::NAN, None),
                metric("fixture.nowhere", 1.0, Some(99)),
                event("Bad_Kind", "a kind the host refuses".into(), None),
                metric("fixture.ok", 1.0, None),
            ],
            "flood" => (0..1000)
                .map(|k| metric("fixture.flood", f64::from(k), None))
                .chain((0..100).map(|k| event("flood", format!("event {k}"), None)))
                .collect(),
            "huge" => (0..5000).map(|k| metric("fixture.huge", f64::from(k), None)).collect(),
            "trap" => panic!("the fixture reporter traps on request"),
            "loop" => {
                let mut x: u64 = 0;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            "alloc" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(std::hint::black_box(vec![1u8; 1 << 20]));
                }
            }
            _ => {
                let mut items: Vec<ReportItem> = snapshot
                    .gpus
                    .iter()
                    .filter_map(|g| Some(metric("fixture.power_w", g.power_w?, Some(g.index))))
                    .collect();
                items.push(metric("fixture.ticks", snapshot.seq as f64, None));
                items.push(event("tick", format!("tick {}", snapshot.seq), Some(0)));
                items
            }
        }
    }
}

gpulet_guest::export_reporter!(Plugin);
