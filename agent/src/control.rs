//! The control vocabulary: what any transport (MQTT today, the local socket next) may ask
//! of the agent, why a request is refused, what commands set (the desired state) and the
//! value checks they share. A restored desired state passes the same checks as the
//! command that set it.

use std::collections::BTreeMap;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// A node budget in place of the configured one; `None` returns to the configured.
    SetPowerBudget(Option<f64>),
    /// An operator's limit for one GPU, within its bounds; `None` removes it.
    SetPowerLimit {
        gpu: u32,
        watts: Option<f64>,
    },
    ReloadPlugins,
    /// Clear a GPU's sticky `degraded` state (its XID was dealt with).
    ClearHealth {
        gpu: u32,
    },
    /// Queue a job (`docs/jobs.md`) that runs as `user`; `job` is checked by the queue.
    SubmitJob {
        user: String,
        job: Value,
    },
    /// Cancel a job.
    CancelJob {
        id: u64,
    },
}

/// The requests by name, as every transport spells them.
pub const REQUEST_NAMES: &str =
    "set-power-budget, set-power-limit, reload-plugins, clear-health, submit-job, cancel-job";

impl Request {
    /// The request `name` with its arguments `args` (a JSON object), checked strictly: an
    /// unknown or missing argument, or a value out of range, is an error naming it and
    /// what is accepted. `Ok(None)`: `name` is not a request.
    pub fn parse(name: &str, args: Value) -> Result<Option<Request>, String> {
        if matches!(name, "set-power-budget" | "set-power-limit") && args.get("watts").is_none() {
            return Err("watts is missing; accepted: a number of watts, or null to clear".into());
        }
        Ok(Some(match name {
            "set-power-budget" => {
                let a: BudgetArgs = args_of(args)?;
                Request::SetPowerBudget(watts(a.watts)?)
            }
            "set-power-limit" => {
                let a: LimitArgs = args_of(args)?;
                Request::SetPowerLimit { gpu: a.gpu, watts: watts(a.watts)? }
            }
            "clear-health" => Request::ClearHealth { gpu: args_of::<GpuArgs>(args)?.gpu },
            "reload-plugins" => {
                no_args(args)?;
                Request::ReloadPlugins
            }
            "submit-job" => {
                let mut job = match args {
                    Value::Object(m) => m,
                    _ => return Err("arguments: a JSON object".into()),
                };
                let user = match job.remove("user") {
                    Some(Value::String(u)) if !u.is_empty() => u,
                    _ => return Err("user is missing or not a string; accepted: the name of the user the job runs as".into()),
                };
                Request::SubmitJob { user, job: Value::Object(job) }
            }
            "cancel-job" => Request::CancelJob { id: args_of::<JobArgs>(args)?.job },
            _ => return Ok(None),
        }))
    }

    pub fn name(&self) -> &'static str {
        match self {
            Request::SetPowerBudget(_) => "set-power-budget",
            Request::SetPowerLimit { .. } => "set-power-limit",
            Request::ReloadPlugins => "reload-plugins",
            Request::ClearHealth { .. } => "clear-health",
            Request::SubmitJob { .. } => "submit-job",
            Request::CancelJob { .. } => "cancel-job",
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BudgetArgs {
    watts: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitArgs {
    gpu: u32,
    watts: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArgs {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GpuArgs {
    gpu: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JobArgs {
    /// Not `id`: every transport's envelope has an `id` of its own (the request's).
    job: u64,
}

/// Check that a request that takes no arguments got none.
pub fn no_args(args: Value) -> Result<(), String> {
    args_of::<NoArgs>(args).map(|_| ())
}

/// Deserialise arguments strictly, naming the key at fault.
fn args_of<T: de::DeserializeOwned>(args: Value) -> Result<T, String> {
    serde_path_to_error::deserialize(args).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            format!("arguments: {}", e.inner())
        } else {
            format!("{path}: {}", e.inner())
        }
    })
}

fn watts(w: Option<f64>) -> Result<Option<f64>, String> {
    w.map(check_watts).transpose().map_err(|e| format!("watts: {e}, or null"))
}

/// As a person reads it in a log line: `set-power-budget 625 W`.
impl std::fmt::Display for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let w = |w: &Option<f64>| w.map_or("none".to_owned(), |w| format!("{w} W"));
        match self {
            Request::SetPowerBudget(watts) => write!(f, "set-power-budget {}", w(watts)),
            Request::SetPowerLimit { gpu, watts } => {
                write!(f, "set-power-limit GPU {gpu} {}", w(watts))
            }
            Request::ReloadPlugins => f.write_str("reload-plugins"),
            Request::ClearHealth { gpu } => write!(f, "clear-health GPU {gpu}"),
            Request::SubmitJob { user, .. } => write!(f, "submit-job as {user}"),
            Request::CancelJob { id } => write!(f, "cancel-job {id}"),
        }
    }
}

/// Why a request did not succeed.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// It does not fit this node (no such GPU, outside bounds): nothing changed.
    Rejected(String),
    /// It was tried and did not work (a plugin failed to load).
    Failed(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Rejected(why) => write!(f, "rejected: {why}"),
            Refusal::Failed(why) => write!(f, "failed: {why}"),
        }
    }
}

/// A budget or limit in a log line: `625 W`, or `none`.
pub fn show_watts(w: Option<f64>) -> String {
    w.map_or("none".to_owned(), |w| format!("{w} W"))
}

/// What commands set: restored at start so that a restart does not undo an operator.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Desired {
    pub budget_w: Option<f64>,
    pub limits_w: BTreeMap<u32, f64>,
}

/// Whether `c` may appear in an identifier an operator reads or a topic carries (a node,
/// a command id, a topic root, a client id): not a control character, not a Unicode
/// noncharacter (MQTT's UTF-8 rules refuse both), and not an invisible format or
/// bidirectional control (U+200B–U+200F, U+202A–U+202E, U+2066–U+2069, U+FEFF…), which
/// would let two ids that look the same differ, or make a log line read backwards.
pub fn id_char(c: char) -> bool {
    let u = c as u32;
    let noncharacter = (0xFDD0..=0xFDEF).contains(&u) || (u & 0xFFFE) == 0xFFFE;
    let format = matches!(u,
        0xAD | 0x600..=0x605 | 0x61C | 0x6DD | 0x70F | 0x180E | 0x200B..=0x200F
        | 0x202A..=0x202E | 0x2060..=0x206F | 0xFEFF | 0xFFF9..=0xFFFB | 0xE0000..=0xE007F);
    !c.is_control() && !noncharacter && !format
}

/// Parse a request body as strict JSON: a key repeated in any object is an error (a
/// parser that keeps the last of two `watts` would execute a value the signer may not
/// have seen), and numbers are correctly rounded (serde_json's `float_roundtrip`), so
/// that a value signed in Python's canonical form is the same number here.
pub fn strict_json(bytes: &[u8]) -> Result<Value, serde_json::Error> {
    serde_json::from_slice::<Strict>(bytes).map(|s| s.0)
}

struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Strict, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(k) = map.next_key::<String>()? {
            if out.contains_key(&k) {
                return Err(de::Error::custom(format!(
                    "the key {k:?} appears twice; accepted: each key once"
                )));
            }
            let Strict(v) = map.next_value()?;
            out.insert(k, v);
        }
        Ok(Value::Object(out))
    }
}

/// The largest node budget or GPU limit a request may carry, watts.
pub const MAX_WATTS: f64 = 100_000.0;
/// The smallest: below a watt is not a power limit (and `5e-324` is not a budget).
pub const MIN_WATTS: f64 = 1.0;

/// Whether `w` can be a power budget or limit; the error says what is accepted.
pub fn check_watts(w: f64) -> Result<f64, String> {
    if w.is_finite() && (MIN_WATTS..=MAX_WATTS).contains(&w) {
        Ok(w)
    } else {
        Err(format!("{} W is out of range; accepted: {MIN_WATTS} to {MAX_WATTS} W", short(w)))
    }
}

/// A number as a person reads it: `1e300`, not three hundred digits.
fn short(w: f64) -> String {
    if w != 0.0 && w.is_finite() && !(1e-3..1e9).contains(&w.abs()) {
        format!("{w:e}")
    } else {
        format!("{w}")
    }
}

impl Desired {
    /// The desired state kept at `path`: `None` if there is none; an error naming the file
    /// if it cannot be read as one (the caller sets it aside).
    pub fn load(path: &std::path::Path) -> Result<Option<Desired>, String> {
        let bytes = crate::state::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        bytes
            .map(|b| serde_json::from_slice(&b).map_err(|e| format!("{}: {e}", path.display())))
            .transpose()
    }

    /// Keep it at `path`, durably.
    pub fn save(&self, path: &std::path::Path) -> std::io::Result<()> {
        crate::state::atomic_write(path, &serde_json::to_vec(self).expect("serialises"))
    }

    /// The requests that set this state again, each checked as a command would be: what
    /// fails a check is left out and returned with why.
    pub fn requests(&self) -> (Vec<Request>, Vec<String>) {
        let mut ok = Vec::new();
        let mut bad = Vec::new();
        if let Some(w) = self.budget_w {
            match check_watts(w) {
                Ok(w) => ok.push(Request::SetPowerBudget(Some(w))),
                Err(e) => bad.push(format!("budget_w: {e}")),
            }
        }
        for (&gpu, &w) in &self.limits_w {
            match check_watts(w) {
                Ok(w) => ok.push(Request::SetPowerLimit { gpu, watts: Some(w) }),
                Err(e) => bad.push(format!("limits_w.{gpu}: {e}")),
            }
        }
        (ok, bad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_json_refuses_repeated_keys_at_any_depth_and_rounds_correctly() {
        let e = strict_json(br#"{"watts":100,"watts":9000}"#).unwrap_err().to_string();
        assert!(e.contains("the key \"watts\" appears twice"), "{e}");
        assert!(strict_json(br#"{"a":[{"b":1,"b":2}]}"#).is_err());
        let v = strict_json(br#"{"a":[1,-2,2.5,"x",null,true,{"b":{}}]}"#).unwrap();
        assert_eq!(v, serde_json::json!({"a":[1,-2,2.5,"x",null,true,{"b":{}}]}));
        // Correctly rounded: just above 100 kW is above it.
        let w = strict_json(b"100000.00000000001").unwrap().as_f64().unwrap();
        assert!(w > MAX_WATTS && check_watts(w).is_err());
    }

    #[test]
    fn ids_refuse_control_noncharacters_and_invisible_formatting() {
        for c in [
            '\u{1}',
            '\u{7f}',
            '\u{85}',
            '\u{ffff}',
            '\u{fdd0}',
            '\u{1fffe}',
            '\u{202e}',
            '\u{200b}',
            '\u{feff}',
        ] {
            assert!(!id_char(c), "{c:?}");
        }
        for c in ['a', 'Z', '-', '_', '.', 'é', '日', '\u{1f600}'] {
            assert!(id_char(c), "{c:?}");
        }
    }

    #[test]
    fn restored_values_pass_the_command_checks() {
        let d = Desired {
            budget_w: Some(1e300),
            limits_w: [(0, -5.0), (1, 300.0), (2, 5e-324)].into(),
        };
        let (ok, bad) = d.requests();
        assert_eq!(ok, vec![Request::SetPowerLimit { gpu: 1, watts: Some(300.0) }]);
        assert_eq!(bad.len(), 3, "{bad:?}");
        assert!(bad[0].starts_with("budget_w: 1e300 W is out of range"), "{bad:?}");
    }
}
