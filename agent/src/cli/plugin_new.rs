//! `gpulet plugin new NAME --kind power|scheduler|reporter`: a ready plugin project that
//! builds with nothing but Rust and its `wasm32-wasip2` target, outside any gpulet
//! checkout. gpulet's WIT is copied in (the bindings are generated from it at build
//! time), the policy is a plain function with a passing native test, and the README
//! says how to build, check and deploy it. The templates are `agent/templates/rust/`,
//! compiled into the binary: what `plugin new` writes is what this gpulet implements.

use std::path::{Path, PathBuf};

use clap::ValueEnum;
use gpulet::error::Error;
use gpulet::plugin::API_VERSION;

/// The plugin kinds a project can be made for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    Power,
    Scheduler,
    Reporter,
}

/// The languages a project can be written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Lang {
    Rust,
}

const WIT: &str = include_str!("../../../wit/v0.1.2/policy.wit");
const CARGO_TOML: &str = include_str!("../../templates/rust/Cargo.toml.in");
const README: &str = include_str!("../../templates/rust/README.md.in");
const GITIGNORE: &str = include_str!("../../templates/rust/gitignore");
const POWER: &str = include_str!("../../templates/rust/power.rs");
const SCHEDULER: &str = include_str!("../../templates/rust/scheduler.rs");
const REPORTER: &str = include_str!("../../templates/rust/reporter.rs");

/// Write the project for plugin `name` of `kind` into `dir` (default `./NAME`), which
/// must not exist or be empty. Returns where it went.
pub fn create(name: &str, kind: Kind, _lang: Lang, dir: Option<PathBuf>) -> Result<PathBuf, Error> {
    let bad = |key: &str, why: String| Error::Exit { code: 2, message: format!("{key}: {why}") };
    let valid = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.as_bytes()[0].is_ascii_lowercase();
    if !valid {
        return Err(bad(
            "NAME",
            format!(
                "{name:?} is not a plugin name; accepted: 1 to 64 of a-z, 0-9 and '-', starting with a letter"
            ),
        ));
    }
    let dir = dir.unwrap_or_else(|| PathBuf::from(name));
    if std::fs::read_dir(&dir).is_ok_and(|mut d| d.next().is_some()) {
        return Err(bad(
            "--dir",
            format!("{} exists and is not empty; accepted: a new or empty folder", dir.display()),
        ));
    }
    let crate_name = name.replace('-', "_");
    let (source, kind_name, deploy) = match kind {
        Kind::Power => (
            POWER,
            "power",
            format!(
                "[[plugin]]\nname = \"{name}\"\npath = \"/usr/lib/gpulet/plugins/{crate_name}.wasm\"\ngrants = [\"lower\", \"raise\"]"
            ),
        ),
        Kind::Scheduler => (
            SCHEDULER,
            "scheduler",
            format!(
                "[jobs]\nenabled = true\n[jobs.scheduler]\nname = \"{name}\"\npath = \"/usr/lib/gpulet/plugins/{crate_name}.wasm\""
            ),
        ),
        Kind::Reporter => (
            REPORTER,
            "reporter",
            format!(
                "[[reporter]]\nname = \"{name}\"\npath = \"/usr/lib/gpulet/plugins/{crate_name}.wasm\""
            ),
        ),
    };
    let fill = |template: &str| {
        template
            .replace("{{name}}", name)
            .replace("{{crate}}", &crate_name)
            .replace("{{kind}}", kind_name)
            .replace("{{api}}", API_VERSION)
            .replace("{{deploy}}", &deploy)
            .replace("{{check_args}}", "")
    };
    let write = |path: &Path, text: &str| -> Result<(), Error> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| Error::Command(format!("cannot create {}: {e}", parent.display())))?;
        }
        std::fs::write(path, text)
            .map_err(|e| Error::Command(format!("cannot write {}: {e}", path.display())))
    };
    write(&dir.join("Cargo.toml"), &fill(CARGO_TOML))?;
    write(&dir.join("README.md"), &fill(README))?;
    write(&dir.join(".gitignore"), GITIGNORE)?;
    write(&dir.join("wit/policy.wit"), WIT)?;
    write(&dir.join("src/lib.rs"), &fill(source))?;
    Ok(dir)
}
