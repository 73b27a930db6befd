//! The on-disk cache of compiled plugins, so that a restart does not recompile.
//!
//! An entry is named by the SHA-256 of the component and the engine's compatibility hash
//! (wasmtime version and every setting that changes code generation), so a changed
//! plugin, a new gpulet or a different engine config never finds a stale entry. Loading
//! native code from disk means trusting it, so:
//!
//! - every entry carries a SHA-256 of its contents, checked before use: a truncated,
//!   corrupt or edited entry is deleted and rebuilt from the component, never loaded;
//! - wasmtime checks that the entry was made by this version with this configuration
//!   (a foreign entry is rebuilt the same way);
//! - the directory must belong to this user and be writable by nobody else (as ssh's
//!   StrictModes): otherwise the cache is not used at all and plugins are compiled on
//!   every start, with a warning. The digest catches accidents; the permissions keep
//!   out anyone who could forge one.

// Loading precompiled native code is `unsafe` in wasmtime; the two places that do it
// say why it is sound here.
#![allow(unsafe_code)]

use std::hash::{Hash, Hasher};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

const MAGIC: &[u8; 10] = b"GPULETCW1\n";

/// How a component was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Compiled now (no usable cache entry); the entry is written for next time.
    Compiled,
    /// Loaded from a verified cache entry.
    Cached,
    /// A cache entry was there but failed its checks; it was replaced.
    Rebuilt,
}

#[derive(Debug)]
pub struct Cache {
    dir: PathBuf,
}

impl Cache {
    /// A cache in `dir`, created if missing (mode 0700). `Err` says why it cannot be used.
    pub fn open(dir: &Path) -> Result<Cache, String> {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let meta =
            std::fs::metadata(dir).map_err(|e| format!("cannot stat {}: {e}", dir.display()))?;
        let me = owner_uid()?;
        if meta.uid() != me {
            return Err(format!(
                "{} belongs to uid {}, not to this user (uid {me})",
                dir.display(),
                meta.uid()
            ));
        }
        if meta.mode() & 0o022 != 0 {
            return Err(format!(
                "{} is writable by group or others (mode {:o})",
                dir.display(),
                meta.mode() & 0o777
            ));
        }
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        Ok(Cache { dir: dir.to_path_buf() })
    }

    /// The compiled form of `wasm`: from the cache if a verified entry is there, else
    /// compiled and stored.
    pub fn load(&self, engine: &Engine, wasm: &[u8]) -> wasmtime::Result<(Component, Source)> {
        let path = self.entry_path(engine, wasm);
        let mut source = Source::Compiled;
        if let Ok(bytes) = std::fs::read(&path) {
            match verified(&bytes) {
                Some(code) => {
                    // SAFETY: `code` is what `Engine::precompile_component` wrote, checked
                    // against its digest, from a directory only this user can write (see
                    // the module docs); wasmtime checks version and configuration itself.
                    match unsafe { Component::deserialize(engine, code) } {
                        Ok(c) => return Ok((c, Source::Cached)),
                        Err(e) => {
                            tracing::warn!(entry = %path.display(), error = %e, "cached plugin is from another engine; rebuilding")
                        }
                    }
                }
                None => {
                    tracing::warn!(entry = %path.display(), "cached plugin failed its integrity check; rebuilding")
                }
            }
            let _ = std::fs::remove_file(&path);
            source = Source::Rebuilt;
        }
        let code = engine.precompile_component(wasm)?;
        if let Err(e) = self.store(&path, &code) {
            tracing::warn!(entry = %path.display(), error = %e, "cannot write the plugin cache");
        }
        // SAFETY: `code` was produced by this engine just now.
        let component = unsafe { Component::deserialize(engine, &code)? };
        Ok((component, source))
    }

    /// Where the entry for `wasm` lives.
    pub fn entry_path(&self, engine: &Engine, wasm: &[u8]) -> PathBuf {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        let digest = Sha256::digest(wasm);
        self.dir.join(format!("{}-{:016x}.cwasm", hex(&digest), h.finish()))
    }

    fn store(&self, path: &Path, code: &[u8]) -> std::io::Result<()> {
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(MAGIC)?;
        f.write_all(&Sha256::digest(code))?;
        f.write_all(code)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    }
}

/// The code of an entry whose digest matches, or `None`.
fn verified(bytes: &[u8]) -> Option<&[u8]> {
    let rest = bytes.strip_prefix(MAGIC.as_slice())?;
    let (digest, code) = rest.split_at_checked(32)?;
    (Sha256::digest(code).as_slice() == digest).then_some(code)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// This process's uid: `/proc/self` belongs to it (Linux; no `unsafe` libc call).
fn owner_uid() -> Result<u32, String> {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .map_err(|e| format!("cannot stat /proc/self: {e}"))
}
