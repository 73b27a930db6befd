//! The command parser on any payload: it never panics, and whatever it accepts passes
//! the control checks (a finite power in range, an id an operator can read, a reply topic
//! MQTT can carry).
#![no_main]

use gpulet::mqtt::command::{Command, Incoming, Policy, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the command name, the rest is the payload.
    let names = [
        "set-power-budget",
        "set-power-limit",
        "ping",
        "rebirth",
        "reload-plugins",
        "clear-health",
        "x",
    ];
    let Some((&pick, payload)) = data.split_first() else { return };
    let policy = Policy {
        max_payload: 64 << 10,
        keys: Vec::new(),
        require_signed: pick & 0x80 != 0,
        max_validity_ms: 300_000,
        max_skew_ms: 30_000,
    };
    let msg = Incoming {
        node: "n1",
        name: names[usize::from(pick & 0x7f) % names.len()],
        payload,
        retained: false,
        expiry_s: None,
        now_ms: 1_800_000_000_000,
    };
    match parse(&msg, &policy) {
        Ok(a) => {
            assert!(a.id.chars().all(gpulet::control::id_char) && !a.id.is_empty());
            if let Some(t) = &a.reply_to {
                assert!(gpulet::mqtt::valid_topic(t, 1024));
            }
            let watts = match a.command {
                Command::SetPowerBudget { watts } | Command::SetPowerLimit { watts, .. } => watts,
                _ => None,
            };
            if let Some(w) = watts {
                assert!(gpulet::control::check_watts(w).is_ok(), "{w}");
            }
        }
        Err((env, why)) => {
            assert!(!why.is_empty());
            assert!(env.authenticated || env.reply_to.is_none());
        }
    }
});
