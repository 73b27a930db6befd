//! `gpulet plugin new NAME --kind power|scheduler|reporter [--lang rust|python|js]`: a
//! ready plugin project outside any gpulet checkout, with gpulet's WIT copied in, the
//! policy plain functions with passing native tests, and a README that says how to
//! build, check and deploy it. In Rust it builds with nothing but Rust and its
//! `wasm32-wasip2` target (the bindings are generated from the WIT at build time); the
//! templates are `agent/templates/rust/`. In Python and JavaScript (power plugins) the
//! project is `examples/python-policy` or `examples/js-policy` (the examples are the
//! templates, so that what is tested and documented there is what an author gets), its
//! build script pointed at the copied WIT, and a README of its own
//! (`agent/templates/python|js/`). All compiled into the binary: what `plugin new`
//! writes is what this gpulet implements.

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
    Python,
    Js,
}

const WIT: &str = include_str!("../../../wit/v0.1.2/policy.wit");
const CARGO_TOML: &str = include_str!("../../templates/rust/Cargo.toml.in");
const README: &str = include_str!("../../templates/rust/README.md.in");
const GITIGNORE: &str = include_str!("../../templates/rust/gitignore");
const POWER: &str = include_str!("../../templates/rust/power.rs");
const SCHEDULER: &str = include_str!("../../templates/rust/scheduler.rs");
const REPORTER: &str = include_str!("../../templates/rust/reporter.rs");

/// A file of a Python or JavaScript project: its path in the project, its text, and the
/// edits that make the example the author's (each must find its text:
/// `tests/it/authoring.rs` checks what they made).
type File = (&'static str, &'static str, &'static [(&'static str, &'static str)]);

const PYTHON: &[File] = &[
    (
        "app.py",
        include_str!("../../../examples/python-policy/app.py"),
        &[("NAME = \"python-policy\"", "NAME = \"{{name}}\"")],
    ),
    ("test_app.py", include_str!("../../../examples/python-policy/test_app.py"), &[]),
    (
        "build.sh",
        include_str!("../../../examples/python-policy/build.sh"),
        &[(
            "wit=\"$here/../../wit/v0.1.2\"",
            "wit=\"$here/wit\"  # copied in by gpulet plugin new",
        )],
    ),
    (".gitignore", include_str!("../../../examples/python-policy/.gitignore"), &[]),
    ("README.md", include_str!("../../templates/python/README.md.in"), &[]),
];

const JS: &[File] = &[
    ("policy.js", include_str!("../../../examples/js-policy/policy.js"), &[]),
    ("policy.test.js", include_str!("../../../examples/js-policy/policy.test.js"), &[]),
    (
        "component.js",
        include_str!("../../../examples/js-policy/component.js"),
        &[("name: 'js-idle-saver'", "name: '{{name}}'")],
    ),
    (
        "package.json",
        include_str!("../../../examples/js-policy/package.json"),
        &[("\"gpulet-js-idle-saver\"", "\"gpulet-{{name}}\"")],
    ),
    (
        "package-lock.json",
        include_str!("../../../examples/js-policy/package-lock.json"),
        &[("\"gpulet-js-idle-saver\"", "\"gpulet-{{name}}\"")],
    ),
    (
        "build.sh",
        include_str!("../../../examples/js-policy/build.sh"),
        &[("wit=\"${WIT:-$here/../../wit/v0.1.2}\"", "wit=\"${WIT:-$here/wit}\"")],
    ),
    (".gitignore", include_str!("../../../examples/js-policy/.gitignore"), &[]),
    ("README.md", include_str!("../../templates/js/README.md.in"), &[]),
];

/// Write the project for plugin `name` of `kind` into `dir` (default `./NAME`), which
/// must not exist or be empty. Returns where it went.
pub fn create(name: &str, kind: Kind, lang: Lang, dir: Option<PathBuf>) -> Result<PathBuf, Error> {
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
    if lang != Lang::Rust && kind != Kind::Power {
        return Err(bad(
            "--kind",
            format!(
                "{kind:?} plugins are made in Rust for now; accepted with --lang {lang:?}: power \
                 (the contract is the same in every language: wit/policy.wit's worlds)"
            )
            .to_lowercase(),
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
    write(&dir.join("wit/policy.wit"), WIT)?;
    let files = match lang {
        Lang::Rust => {
            write(&dir.join("Cargo.toml"), &fill(CARGO_TOML))?;
            write(&dir.join("README.md"), &fill(README))?;
            write(&dir.join(".gitignore"), GITIGNORE)?;
            write(&dir.join("src/lib.rs"), &fill(source))?;
            return Ok(dir);
        }
        Lang::Python => PYTHON,
        Lang::Js => JS,
    };
    for (path, text, edits) in files {
        let text = edits.iter().fold(text.to_string(), |t, (from, to)| t.replace(from, to));
        let path = dir.join(path);
        write(&path, &fill(&text))?;
        if path.extension().is_some_and(|x| x == "sh") {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).map_err(
                |e| Error::Command(format!("cannot make {} executable: {e}", path.display())),
            )?;
        }
    }
    Ok(dir)
}
