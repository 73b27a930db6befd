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
//! - the directory and every directory above it must belong to root or to this user and
//!   be writable by nobody else (sticky directories such as `/tmp` aside), as ssh's
//!   StrictModes checks a home directory (`state::check_dir`); this is checked when the
//!   cache is opened and again before every load, so a directory swapped after start
//!   (by a user who can write one of its parents) is never read: the plugin is compiled
//!   instead, with a warning. The digest catches accidents; the permissions keep out
//!   anyone who could forge one. Entries are read without following symlinks and
//!   written with `state::atomic_write`.

// Loading precompiled native code is `unsafe` in wasmtime; the two places that do it
// say why it is sound here.
#![allow(unsafe_code)]

use std::hash::{Hash, Hasher};
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
        crate::state::check_dir(dir)?;
        Ok(Cache { dir: dir.to_path_buf() })
    }

    /// The compiled form of `wasm`: from the cache if a verified entry is there, else
    /// compiled and stored.
    pub fn load(&self, engine: &Engine, wasm: &[u8]) -> wasmtime::Result<(Component, Source)> {
        if let Err(why) = crate::state::check_dir(&self.dir) {
            tracing::warn!(%why, "the plugin cache is no longer trusted; compiling");
            let code = engine.precompile_component(wasm)?;
            // SAFETY: `code` was produced by this engine just now.
            let component = unsafe { Component::deserialize(engine, &code)? };
            return Ok((component, Source::Compiled));
        }
        let path = self.entry_path(engine, wasm);
        let mut source = Source::Compiled;
        if let Ok(Some(bytes)) = crate::state::read(&path) {
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
        let mut entry = Vec::with_capacity(MAGIC.len() + 32 + code.len());
        entry.extend_from_slice(MAGIC);
        entry.extend_from_slice(&Sha256::digest(code));
        entry.extend_from_slice(code);
        crate::state::atomic_write(path, &entry)
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
