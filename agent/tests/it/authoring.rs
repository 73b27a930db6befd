//! Writing a policy as a new author does: `gpulet plugin new` makes a project of each
//! kind outside any checkout; its own test passes natively, it builds into a component
//! with one command, and the agent loads it as that kind (`plugin check`, then a run).

use std::path::Path;
use std::process::Command;

use crate::repo;

/// `cargo` in `dir`, as an author runs it: the pinned toolchain, none of the outer
/// build's flags, a target directory shared by the three projects and kept between runs
/// (the first build compiles wit-bindgen; later ones are incremental). `--offline`: what
/// it needs (wit-bindgen, serde) is what the workspace itself built with.
fn gpulet(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_gpulet")).args(args).output().unwrap()
}

fn cargo(dir: &Path, args: &[&str]) {
    let toolchain = std::fs::read_to_string(repo().join("rust-toolchain.toml")).unwrap();
    let channel = toolchain
        .lines()
        .find_map(|l| l.strip_prefix("channel = "))
        .unwrap()
        .trim_matches('"')
        .to_owned();
    let mut c = Command::new("cargo");
    c.args(args).arg("--offline").current_dir(dir);
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_BUILD_TARGET",
        "CARGO_MANIFEST_DIR",
    ] {
        c.env_remove(var);
    }
    c.env("RUSTUP_TOOLCHAIN", channel)
        .env("CARGO_TARGET_DIR", Path::new(env!("CARGO_TARGET_TMPDIR")).join("plugin-new"));
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "cargo {args:?} in {}: {}{}",
        dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The Python and JavaScript projects are the examples made the author's: their name,
/// and a build pointed at the WIT copied into the project, not at a gpulet checkout.
/// (`tests/it/languages.rs` builds them and runs them in the agent.)
#[test]
fn plugin_new_in_python_and_javascript_makes_the_example_the_authors() {
    let root = tempfile::tempdir().unwrap();
    for (lang, files) in [
        ("python", &["app.py", "test_app.py", "build.sh", ".gitignore", "README.md"][..]),
        (
            "js",
            &[
                "policy.js",
                "policy.test.js",
                "component.js",
                "package.json",
                "package-lock.json",
                "build.sh",
                ".gitignore",
                "README.md",
            ][..],
        ),
    ] {
        let dir = root.path().join(lang);
        let out =
            gpulet(&["plugin", "new", "night-cap", "--lang", lang, "--dir", dir.to_str().unwrap()]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        for f in files.iter().chain(&["wit/policy.wit"]) {
            assert!(dir.join(f).is_file(), "{lang}: {f}");
        }
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
        let build = read("build.sh");
        assert!(!build.contains("../../wit") && build.contains("$here/wit"), "{lang}: {build}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("build.sh")).unwrap().permissions().mode();
        assert_eq!(mode & 0o111, 0o111, "{lang}: build.sh is executable");
        assert!(read("README.md").contains("name = \"night-cap\""), "{lang}: the deploy snippet");
        if lang == "python" {
            assert!(read("app.py").contains("NAME = \"night-cap\""));
        } else {
            assert!(read("component.js").contains("name: 'night-cap'"));
            assert!(read("package.json").contains("\"gpulet-night-cap\""));
            assert!(!read("package-lock.json").contains("js-idle-saver"));
        }
    }
}

#[test]
fn plugin_new_makes_a_project_of_each_kind_that_tests_builds_and_loads() {
    let root = tempfile::tempdir().unwrap();
    for (kind, world) in
        [("power", "power"), ("scheduler", "job-scheduler"), ("reporter", "reporter")]
    {
        let name = format!("my-{kind}");
        let dir = root.path().join(&name);
        let out = gpulet(&["plugin", "new", &name, "--kind", kind, "--dir", dir.to_str().unwrap()]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(dir.join("wit/policy.wit").exists() && dir.join("README.md").exists());
        cargo(&dir, &["test", "--quiet"]);
        cargo(&dir, &["build", "--quiet", "--release", "--target", "wasm32-wasip2"]);
        let wasm = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("plugin-new/wasm32-wasip2/release")
            .join(format!("my_{kind}.wasm"));
        let out = gpulet(&["plugin", "check", wasm.to_str().unwrap()]);
        let shown = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{shown}{}", String::from_utf8_lossy(&out.stderr));
        assert!(shown.contains(&format!("{name} 0.1.0 ({world} plugin, API 0.1.2)")), "{shown}");
    }
    // A folder that is not empty is not written over; a bad name is refused.
    let out = gpulet(&[
        "plugin",
        "new",
        "my-power",
        "--dir",
        root.path().join("my-power").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("exists and is not empty"));
    let out =
        gpulet(&["plugin", "new", "My_Policy", "--dir", root.path().join("x").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a plugin name"));
    let out = gpulet(&[
        "plugin",
        "new",
        "py-sched",
        "--kind",
        "scheduler",
        "--lang",
        "python",
        "--dir",
        root.path().join("y").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("scheduler plugins are made in rust for now; accepted"), "{err}");
    assert!(!root.path().join("y").exists(), "nothing written");
}
