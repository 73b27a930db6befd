//! Commands from the fleet: parsing, validation, signatures and the de-duplication of
//! ids. Everything here is pure or file-backed; the link (`link.rs`) feeds it messages
//! and publishes what it returns.
//!
//! A command is a JSON object published (QoS 1, never retained) to
//! `<root>/<node>/cmd/<name>`:
//!
//! ```json
//! {"id": "c-17", "watts": 4000, "reply_to": "ops/results", "node": "gpu-a01",
//!  "issued_ms": 1764000000000, "expires_ms": 1764000060000, "sig": "base64…"}
//! ```
//!
//! `id` is required; `reply_to`, `node`, `issued_ms`, `expires_ms` and `sig` are the
//! envelope; every other key is an argument of the command and checked strictly.
//! A signature (Ed25519) covers [`signed_bytes`]: the node and command name from the
//! topic and every key of the payload but `sig`, in a canonical form.

use std::collections::{BTreeMap, VecDeque};
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::control::Request;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
pub use ed25519_dalek::SigningKey;
use ed25519_dalek::{Signature, Signer, Verifier, VerifyingKey};
use serde_json::{Map, Value};

/// The commands, with their arguments checked.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// What the loop carries out, as every transport asks it (`control::Request`).
    Request(Request),
    /// The link's own: publish the birth and state again.
    Rebirth,
    /// The link's own: answer at once.
    Ping,
}

pub const NAMES: &str = "set-power-budget, set-power-limit, reload-plugins, rebirth, ping, clear-health, submit-job, cancel-job";

impl Command {
    pub fn name(&self) -> &'static str {
        match self {
            Command::Request(r) => r.name(),
            Command::Rebirth => "rebirth",
            Command::Ping => "ping",
        }
    }
}

/// A command that passed every check but the ones only the agent can make (GPU indices,
/// bounds).
#[derive(Debug, Clone, PartialEq)]
pub struct Accepted {
    pub id: String,
    pub command: Command,
    pub reply_to: Option<String>,
    /// Wall-clock ms after which it is not executed.
    pub expires_ms: Option<u64>,
}

/// What is known of a command, valid or not, to address its result.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Envelope {
    pub id: Option<String>,
    /// Where the sender asked for the result; set only once the command is
    /// authenticated (signed by a configured key, or unsigned where the node takes
    /// unsigned commands): a result never goes to a topic an unauthenticated sender chose.
    pub reply_to: Option<String>,
    /// The command passed the signature policy.
    pub authenticated: bool,
}

/// Checks that do not depend on the payload's content.
pub struct Incoming<'a> {
    pub node: &'a str,
    pub name: &'a str,
    pub payload: &'a [u8],
    pub retained: bool,
    /// MQTT 5 message expiry left, seconds.
    pub expiry_s: Option<u32>,
    pub now_ms: u64,
}

#[derive(Debug, Clone)]
pub struct Policy {
    pub max_payload: usize,
    /// Commands must carry a valid signature from one of these keys.
    pub keys: Vec<VerifyingKey>,
    pub require_signed: bool,
    /// Longest `expires_ms - issued_ms` accepted for signed commands, and tolerated clock
    /// skew for `issued_ms` in the future.
    pub max_validity_ms: u64,
    pub max_skew_ms: u64,
}

/// Parse and check a command. `Err` carries what is known of the envelope and a reason a
/// person can read.
pub fn parse(msg: &Incoming<'_>, policy: &Policy) -> Result<Accepted, (Envelope, String)> {
    let mut env = Envelope::default();
    let fail = |env: &Envelope, why: String| Err((env.clone(), why));
    if msg.payload.len() > policy.max_payload {
        return fail(
            &env,
            format!(
                "payload of {} bytes is too large; accepted: at most {} bytes",
                msg.payload.len(),
                policy.max_payload
            ),
        );
    }
    let value: Value = match crate::control::strict_json(msg.payload) {
        Ok(v) => v,
        Err(e) => {
            return fail(
                &env,
                format!("payload is not valid JSON ({e}); accepted: a JSON object with an \"id\""),
            );
        }
    };
    let Value::Object(mut map) = value else {
        return fail(
            &env,
            "payload is not a JSON object; accepted: a JSON object with an \"id\"".into(),
        );
    };
    // The envelope first, so that a result can be addressed whatever else is wrong; the
    // reply topic is used only once the command is authenticated (below).
    match map.get("id") {
        Some(Value::String(id))
            if !id.is_empty() && id.len() <= 128 && id.chars().all(crate::control::id_char) =>
        {
            env.id = Some(id.clone())
        }
        Some(v) => {
            return fail(
                &env,
                format!(
                    "id: {v} is not accepted; accepted: a string of 1 to 128 characters, none a control or invisible formatting character"
                ),
            );
        }
        None => return fail(&env, "id is missing; every command needs a string \"id\"".into()),
    }
    let mut reply_to = None;
    match map.get("reply_to") {
        None => {}
        Some(Value::String(t)) if super::valid_topic(t, 1024) => reply_to = Some(t.clone()),
        Some(v) => {
            return fail(
                &env,
                format!(
                    "reply_to: {v} is not a topic; accepted: a topic name of at most 1024 bytes without wildcards, a leading $, control characters or noncharacters"
                ),
            );
        }
    }
    if msg.retained {
        return fail(&env, "the command was a retained message; commands are executed only when published with retain=false".into());
    }
    let signed = map.contains_key("sig");
    if policy.require_signed && !signed {
        return fail(&env, "the command is not signed; this node accepts only commands signed with a configured key".into());
    }
    if signed {
        verify(msg, &map, policy).map_err(|why| (env.clone(), why))?;
    }
    env.authenticated = true;
    env.reply_to = reply_to;
    let u64_field = |map: &Map<String, Value>, k: &str| -> Result<Option<u64>, String> {
        match map.get(k) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                format!("{k}: {v} is not accepted; accepted: milliseconds since the Unix epoch")
            }),
        }
    };
    let issued = u64_field(&map, "issued_ms").map_err(|e| (env.clone(), e))?;
    let mut expires = u64_field(&map, "expires_ms").map_err(|e| (env.clone(), e))?;
    if let Some(n) = map.get("node") {
        match n.as_str() {
            Some(n) if n == msg.node => {}
            _ => {
                return fail(
                    &env,
                    format!("the command is meant for node {n}, not {:?}", msg.node),
                );
            }
        }
    }
    if let Some(e) = expires
        && e <= msg.now_ms
    {
        return fail(&env, format!("the command expired at {e} (now {})", msg.now_ms));
    }
    if let Some(i) = issued
        && i > msg.now_ms + policy.max_skew_ms
    {
        return fail(
            &env,
            format!(
                "the command is issued in the future ({i}, now {}); accepted: at most {} ms ahead",
                msg.now_ms, policy.max_skew_ms
            ),
        );
    }
    if let Some(s) = msg.expiry_s {
        let e = msg.now_ms + u64::from(s) * 1000;
        expires = Some(expires.map_or(e, |x| x.min(e)));
    }
    for k in ["id", "reply_to", "node", "issued_ms", "expires_ms", "sig"] {
        map.remove(k);
    }
    let args = Value::Object(map);
    let command = match msg.name {
        "rebirth" | "ping" => {
            crate::control::no_args(args).map_err(|e| (env.clone(), e))?;
            if msg.name == "rebirth" { Command::Rebirth } else { Command::Ping }
        }
        name => match Request::parse(name, args).map_err(|e| (env.clone(), e))? {
            Some(r) => Command::Request(r),
            None => return fail(&env, format!("{name:?} is not a command; accepted: {NAMES}")),
        },
    };
    Ok(Accepted {
        id: env.id.clone().expect("checked"),
        command,
        reply_to: env.reply_to,
        expires_ms: expires,
    })
}

/// The bytes a command's signature covers: a domain tag, the node and command name (from
/// the topic, so a command cannot be moved to another node or command) and the payload
/// without `sig`, as compact JSON with keys sorted (serde_json's own map order).
pub fn signed_bytes(node: &str, name: &str, payload: &Map<String, Value>) -> Vec<u8> {
    let mut unsigned: BTreeMap<&str, &Value> =
        payload.iter().map(|(k, v)| (k.as_str(), v)).collect();
    unsigned.remove("sig");
    let mut out = format!("gpulet-cmd-v1\n{node}\n{name}\n").into_bytes();
    serde_json::to_writer(&mut out, &unsigned).expect("JSON values serialise");
    out
}

fn verify(msg: &Incoming<'_>, map: &Map<String, Value>, policy: &Policy) -> Result<(), String> {
    if policy.keys.is_empty() {
        return Err("the command is signed but this node has no public keys configured (mqtt.commands.public_keys)".into());
    }
    let sig = map
        .get("sig")
        .and_then(Value::as_str)
        .and_then(|s| B64.decode(s).ok())
        .and_then(|b| Signature::from_slice(&b).ok())
        .ok_or("sig: not a base64 Ed25519 signature (64 bytes)")?;
    let (Some(issued), Some(expires)) = (
        map.get("issued_ms").and_then(Value::as_u64),
        map.get("expires_ms").and_then(Value::as_u64),
    ) else {
        return Err(
            "a signed command needs issued_ms and expires_ms (ms since the Unix epoch)".into()
        );
    };
    if expires < issued || expires - issued > policy.max_validity_ms {
        return Err(format!(
            "expires_ms - issued_ms is {} ms; accepted: 0 to {} ms",
            expires as i128 - issued as i128,
            policy.max_validity_ms
        ));
    }
    let bytes = signed_bytes(msg.node, msg.name, map);
    if policy.keys.iter().any(|k| k.verify(&bytes, &sig).is_ok()) {
        Ok(())
    } else {
        Err("the signature does not match any configured key (tampered, signed for another node or command, or an unknown key)".into())
    }
}

/// Sign a command payload in place (adds `sig`).
pub fn sign(key: &SigningKey, node: &str, name: &str, payload: &mut Map<String, Value>) {
    let sig = key.sign(&signed_bytes(node, name, payload));
    payload.insert("sig".into(), Value::String(B64.encode(sig.to_bytes())));
}

/// A new key pair: the private key (seed) and public key, base64.
pub fn keygen() -> io::Result<(String, String)> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| io::Error::other(e.to_string()))?;
    let key = SigningKey::from_bytes(&seed);
    Ok((B64.encode(seed), B64.encode(key.verifying_key().to_bytes())))
}

pub fn signing_key(b64: &str) -> Result<SigningKey, String> {
    Ok(SigningKey::from_bytes(&key_bytes(b64, "private")?))
}

pub fn verifying_key(b64: &str) -> Result<VerifyingKey, String> {
    VerifyingKey::from_bytes(&key_bytes(b64, "public")?)
        .map_err(|e| format!("not a valid Ed25519 public key: {e}"))
}

fn key_bytes(b64: &str, which: &str) -> Result<[u8; 32], String> {
    B64.decode(b64.trim()).ok().and_then(|b| b.try_into().ok()).ok_or_else(|| {
        format!("not a base64 Ed25519 {which} key (32 bytes); make one with `gpulet keygen`")
    })
}

/// The ids seen within a window, kept on disk so that a restart does not execute a
/// command twice. An id is recorded (and synced) before the command is acknowledged.
#[derive(Debug)]
pub struct SeenIds {
    path: PathBuf,
    window_ms: u64,
    max: usize,
    order: VecDeque<(u64, String)>,
    set: std::collections::HashSet<String>,
    fsync: bool,
    /// Lines in the file (it is compacted when it holds far more than the window).
    lines: usize,
}

impl SeenIds {
    pub fn open(
        path: &Path,
        window_ms: u64,
        max: usize,
        fsync: bool,
        now_ms: u64,
    ) -> io::Result<SeenIds> {
        let text =
            String::from_utf8_lossy(&crate::state::read(path)?.unwrap_or_default()).into_owned();
        let mut seen = SeenIds {
            path: path.to_path_buf(),
            window_ms,
            max,
            order: VecDeque::new(),
            set: Default::default(),
            fsync,
            lines: 0,
        };
        // Lines are "<ms> <id>"; a torn last line is ignored.
        for line in text.lines() {
            if let Some((ts, id)) = line.split_once(' ')
                && let Ok(ts) = ts.parse::<u64>()
                && seen.set.insert(id.to_owned())
            {
                seen.order.push_back((ts, id.to_owned()));
            }
        }
        seen.expire(now_ms);
        seen.rewrite()?;
        seen.lines = seen.order.len();
        Ok(seen)
    }

    pub fn contains(&self, id: &str) -> bool {
        self.set.contains(id)
    }

    /// Remember `id`; durable when this returns.
    pub fn insert(&mut self, id: &str, now_ms: u64) -> io::Result<()> {
        self.expire(now_ms);
        if !self.set.insert(id.to_owned()) {
            return Ok(());
        }
        // Ids are 1 to 128 characters without control characters (checked when parsed):
        // one per line. The file is opened per command (rare) rather than held open.
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&self.path)?;
        writeln!(file, "{now_ms} {id}")?;
        if self.fsync {
            file.sync_data()?;
        }
        self.order.push_back((now_ms, id.to_owned()));
        self.lines += 1;
        if self.lines > 2 * self.order.len() + 1024 {
            self.rewrite()?;
            self.lines = self.order.len();
        }
        Ok(())
    }

    fn expire(&mut self, now_ms: u64) {
        while let Some((ts, id)) = self.order.front() {
            if now_ms.saturating_sub(*ts) <= self.window_ms && self.order.len() <= self.max {
                break;
            }
            self.set.remove(id);
            self.order.pop_front();
        }
    }

    /// Compact the file to the ids still remembered.
    fn rewrite(&self) -> io::Result<()> {
        let mut text = String::new();
        for (ts, id) in &self.order {
            text += &format!("{ts} {id}\n");
        }
        crate::state::atomic_write(&self.path, text.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            max_payload: 1024,
            keys: Vec::new(),
            require_signed: false,
            max_validity_ms: 300_000,
            max_skew_ms: 30_000,
        }
    }

    fn run(name: &str, payload: &str) -> Result<Accepted, (Envelope, String)> {
        parse(
            &Incoming {
                node: "n1",
                name,
                payload: payload.as_bytes(),
                retained: false,
                expiry_s: None,
                now_ms: 1_000_000,
            },
            &policy(),
        )
    }

    #[test]
    fn good_commands_parse() {
        let a = run("set-power-budget", r#"{"id":"a","watts":4000}"#).unwrap();
        assert_eq!(a.command, Command::Request(Request::SetPowerBudget(Some(4000.0))));
        let a = run("set-power-budget", r#"{"id":"a","watts":null,"reply_to":"x/y"}"#).unwrap();
        assert_eq!(
            (a.command, a.reply_to.as_deref()),
            (Command::Request(Request::SetPowerBudget(None)), Some("x/y"))
        );
        let a = run("set-power-limit", r#"{"id":"a","gpu":3,"watts":300,"node":"n1"}"#).unwrap();
        assert_eq!(
            a.command,
            Command::Request(Request::SetPowerLimit { gpu: 3, watts: Some(300.0) })
        );
        assert_eq!(run("ping", r#"{"id":"p"}"#).unwrap().command, Command::Ping);
    }

    #[test]
    fn bad_commands_are_rejected_with_a_reason() {
        let cases = [
            ("ping", "{", "not valid JSON"),
            ("ping", "[1]", "not a JSON object"),
            ("ping", r#"{"watts":1}"#, "id is missing"),
            ("ping", r#"{"id":7}"#, "id: 7 is not accepted"),
            ("ping", r#"{"id":"a\nb"}"#, "none a control or invisible formatting character"),
            ("ping", r#"{"id":"a\u202eb"}"#, "none a control or invisible formatting character"),
            ("set-power-budget", r#"{"id":"a","watts":100,"watts":9000}"#, "appears twice"),
            ("set-power-budget", r#"{"id":"a","watts":5e-324}"#, "out of range"),
            ("set-power-budget", r#"{"id":"a","watts":100000.00000000001}"#, "out of range"),
            ("ping", r#"{"id":"a","reply_to":"ops/\u0001"}"#, "reply_to"),
            ("ping", r#"{"id":"a","reply_to":"ops/\uffff"}"#, "reply_to"),
            ("set-power-budget", r#"{"id":"a","watts":"lots"}"#, "watts: invalid type"),
            ("set-power-budget", r#"{"id":"a"}"#, "watts is missing"),
            ("set-power-budget", r#"{"id":"a","watts":-5}"#, "out of range"),
            ("set-power-budget", r#"{"id":"a","watts":4000,"volts":1}"#, "unknown field `volts`"),
            ("set-power-limit", r#"{"id":"a","gpu":-1,"watts":300}"#, "gpu: invalid value"),
            ("ping", r#"{"id":"a","node":"n2"}"#, "meant for node \"n2\""),
            ("ping", r#"{"id":"a","expires_ms":5}"#, "expired"),
            ("ping", r#"{"id":"a","issued_ms":99000000}"#, "in the future"),
            ("reboot", r#"{"id":"a"}"#, "is not a command"),
            ("ping", r#"{"id":"a","reply_to":"a/#"}"#, "reply_to"),
        ];
        for (name, payload, want) in cases {
            let (_, why) = run(name, payload).expect_err(payload);
            assert!(why.contains(want), "{payload}: {why}");
        }
    }

    #[test]
    fn signatures_bind_node_command_and_arguments() {
        let (sk, pk) = keygen().unwrap();
        let sk = signing_key(&sk).unwrap();
        let p =
            Policy { keys: vec![verifying_key(&pk).unwrap()], require_signed: true, ..policy() };
        let mut m: Map<String, Value> = serde_json::from_str(
            r#"{"id":"s1","watts":4000,"issued_ms":999000,"expires_ms":1060000}"#,
        )
        .unwrap();
        sign(&sk, "n1", "set-power-budget", &mut m);
        let signed = serde_json::to_vec(&m).unwrap();
        let check = |node: &str, name: &str, payload: &[u8]| {
            parse(
                &Incoming {
                    node,
                    name,
                    payload,
                    retained: false,
                    expiry_s: None,
                    now_ms: 1_000_000,
                },
                &p,
            )
        };
        assert!(check("n1", "set-power-budget", &signed).is_ok());
        let tampered = String::from_utf8(signed.clone()).unwrap().replace("4000", "9000");
        assert!(
            check("n1", "set-power-budget", tampered.as_bytes())
                .unwrap_err()
                .1
                .contains("does not match")
        );
        assert!(check("n2", "set-power-budget", &signed).unwrap_err().1.contains("does not match"));
        assert!(check("n1", "set-power-limit", &signed).unwrap_err().1.contains("does not match"));
        assert!(check("n1", "ping", br#"{"id":"u"}"#).unwrap_err().1.contains("not signed"));
    }

    /// The test vector of docs/mqtt.md: signed by Python's `cryptography` over the
    /// documented canonical form (`json.dumps(p, sort_keys=True, separators=(",", ":"),
    /// ensure_ascii=False)`), with a 17-digit float that an incorrectly rounding parser
    /// reads as another number (and so re-serialises differently).
    #[test]
    fn a_command_signed_in_python_verifies() {
        let p = Policy {
            keys: vec![verifying_key("6kpsY+KcUgq+9VB7Ey7F+ZVHdq6+vnuSQh7qaRRG0iw=").unwrap()],
            require_signed: true,
            ..policy()
        };
        let payload = br#"{"id": "vector-1", "watts": 3999.9999999999995, "issued_ms": 1800000000000, "expires_ms": 1800000060000, "sig": "S3T59vlesq2ne6S8Gjr0qXFnn8NgwxKoLiaHA8YJ0n7XSzFOTCimILktuPeaWXu5Ez6cRspgr/OQdqMZZQv3BQ=="}"#;
        let a = parse(
            &Incoming {
                node: "gpu-a01",
                name: "set-power-budget",
                payload,
                retained: false,
                expiry_s: None,
                now_ms: 1_800_000_001_000,
            },
            &p,
        )
        .unwrap();
        assert_eq!(a.command, Command::Request(Request::SetPowerBudget(Some(3999.9999999999995))));
    }

    #[test]
    fn a_reply_topic_is_used_only_once_the_command_is_authenticated() {
        let p = Policy { require_signed: true, ..policy() };
        let (env, why) = parse(
            &Incoming {
                node: "n1",
                name: "ping",
                payload: br#"{"id":"a","reply_to":"victims/topic"}"#,
                retained: false,
                expiry_s: None,
                now_ms: 1_000_000,
            },
            &p,
        )
        .unwrap_err();
        assert!(why.contains("not signed"));
        assert_eq!((env.reply_to, env.authenticated), (None, false));
    }

    #[test]
    fn seen_ids_survive_reopen_within_the_window() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ids");
        let mut s = SeenIds::open(&path, 1000, 100, true, 0).unwrap();
        s.insert("a", 10).unwrap();
        s.insert("b", 500).unwrap();
        drop(s);
        let s = SeenIds::open(&path, 1000, 100, true, 1200).unwrap();
        assert!(!s.contains("a"), "expired from the window");
        assert!(s.contains("b"));
    }
}
