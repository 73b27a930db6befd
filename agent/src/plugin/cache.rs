//! The on-disk cache of compiled plugins, so that a restart does not recompile.
//!
//! An entry is named by the SHA-256 of the component and the engine's compatibility hash
//! (wasmtime version and every setting that changes code generation), so a changed
//! plugin, a new gpulet or a different engine config never finds a stale entry. Loading
//! native code from disk means trusting it, so:
//!
//! - every entry has a SHA-256 of its contents beside it (`<entry>.sha256`), checked
//!   before use: a truncated, corrupt or edited entry is deleted and rebuilt from the
//!   component, never loaded;
//! - wasmtime checks that the entry was made by this version with this configuration
//!   (a foreign entry is rebuilt the same way);
//! - the directory and every directory above it must belong to root or to this user and
//!   be writable by nobody else (sticky directories such as `/tmp` aside), as ssh's
//!   StrictModes checks a home directory (`state::check_dir`); this is checked when the
//!   cache is opened and again before every load, so a directory swapped after start
//!   (by a user who can write one of its parents) is never read: the plugin is compiled
//!   instead, with a warning. The digest catches accidents; the permissions keep out
//!   anyone who could forge one. Entries are opened without following symlinks and
//!   written with `state::atomic_write`.
//!
//! An entry is mapped, not read (`Component::deserialize_file`): the compiled code of a
//! plugin with an interpreter inside is ~35 MB, and mapped it costs only the pages its
//! calls touch, shared with the page cache and dropped under pressure, where read and
//! deserialized it was 35 MB of the agent's own memory (70 MB at the peak of loading).
//! The mapping also lets wasmtime map the guest's initial heap copy-on-write from the
//! file (`memory_init_cow`) instead of copying it. What is mapped is a private copy of
//! the entry, made and checked against the digest in one pass: an unlinked file in the
//! cache directory that no one can name or change, so that neither a swap after the
//! check nor an entry truncated in place (which would kill the agent with SIGBUS on the
//! next page it touched) can reach a running plugin. It costs a copy on disk per loaded
//! plugin (given back when the plugin is dropped or the agent exits) and ~30 ms a load.

// Loading precompiled native code is `unsafe` in wasmtime; the places that do it say why
// it is sound here.
#![allow(unsafe_code)]

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

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
    /// compiled by `compile` (`Engine::precompile_component` of an engine configured as
    /// `engine`) and stored.
    pub fn load(
        &self,
        engine: &Engine,
        wasm: &[u8],
        compile: &dyn Fn(&[u8]) -> wasmtime::Result<Vec<u8>>,
    ) -> wasmtime::Result<(Component, Source)> {
        if let Err(why) = crate::state::check_dir(&self.dir) {
            tracing::warn!(%why, "the plugin cache is no longer trusted; compiling");
            return Ok((uncached(engine, wasm, compile)?, Source::Compiled));
        }
        let path = self.entry_path(engine, wasm);
        let mut source = Source::Compiled;
        match private_copy(&path, &self.dir) {
            Ok(Some(file)) => {
                // SAFETY: the file is a private copy of what `Engine::precompile_component`
                // wrote, checked against its digest as it was copied, from a directory
                // only this user can write (see the module docs), and no one else can
                // open or change it; wasmtime checks version and configuration itself.
                match unsafe { Component::deserialize_file(engine, path_of_open(&file, &path)) } {
                    Ok(c) => return Ok((c, Source::Cached)),
                    Err(e) => {
                        tracing::warn!(entry = %path.display(), error = %e, "cached plugin is from another engine; rebuilding")
                    }
                }
                source = Source::Rebuilt;
            }
            Ok(None) => {}
            Err(why) => {
                tracing::warn!(entry = %path.display(), %why, "cached plugin failed its integrity check; rebuilding");
                source = Source::Rebuilt;
            }
        }
        if source == Source::Rebuilt {
            let _ = std::fs::remove_file(&path);
            let _ = std::fs::remove_file(digest_path(&path));
        }
        Ok((self.store_and_load(engine, &compile(wasm)?, &path)?, source))
    }

    /// Store freshly compiled `code` at `path` and load it from there (mapped, as a
    /// restart would); from memory if the entry cannot be written.
    fn store_and_load(
        &self,
        engine: &Engine,
        code: &[u8],
        path: &Path,
    ) -> wasmtime::Result<Component> {
        match self
            .store(path, code)
            .and_then(|()| private_copy(path, &self.dir).map_err(std::io::Error::other))
        {
            Ok(Some(file)) => {
                // SAFETY: written by this engine just now and checked as above.
                unsafe { Component::deserialize_file(engine, path_of_open(&file, path)) }
            }
            stored => {
                if let Err(e) = stored {
                    tracing::warn!(entry = %path.display(), error = %e, "cannot write the plugin cache");
                }
                // SAFETY: `code` was produced by this engine's configuration just now.
                unsafe { Component::deserialize(engine, code) }
            }
        }
    }

    /// Where the entry for `wasm` lives.
    pub fn entry_path(&self, engine: &Engine, wasm: &[u8]) -> PathBuf {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        let digest = Sha256::digest(wasm);
        self.dir.join(format!("{}-{:016x}.cwasm", hex(&digest), h.finish()))
    }

    /// The code first, then its digest: a crash between the two leaves an entry whose
    /// digest does not match, rebuilt at the next load.
    fn store(&self, path: &Path, code: &[u8]) -> std::io::Result<()> {
        crate::state::atomic_write(path, code)?;
        crate::state::atomic_write(&digest_path(path), hex(&Sha256::digest(code)).as_bytes())
    }
}

/// `wasm` compiled by `compile` and loaded from memory, with no cache.
pub(super) fn uncached(
    engine: &Engine,
    wasm: &[u8],
    compile: &dyn Fn(&[u8]) -> wasmtime::Result<Vec<u8>>,
) -> wasmtime::Result<Component> {
    let code = compile(wasm)?;
    // SAFETY: `code` was produced by this engine's configuration just now.
    unsafe { Component::deserialize(engine, &code) }
}

/// Compiling a plugin with an interpreter inside peaks at ~300 MB, freed when it is done
/// (the compiling engine is dropped) but kept by the allocator for the agent's whole
/// life unless handed back: called once a compiled plugin is loaded.
pub(super) fn release_scratch() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory that is free; callable at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn digest_path(entry: &Path) -> PathBuf {
    entry.with_extension("sha256")
}

/// A private copy of the entry, if its digest matches: an unlinked file in the cache
/// directory (`O_TMPFILE`) that no one else can name, let alone change, while the plugin
/// runs from its mapping (a mapped file truncated in place kills the process that maps
/// it, with SIGBUS). Copied and checked in one pass, never read into the agent's memory.
/// `Ok(None)` if there is no entry; `Err` saying what is wrong with one that is there.
fn private_copy(path: &Path, dir: &Path) -> Result<Option<std::fs::File>, String> {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let mut entry =
        match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.to_string()),
        };
    let expected = match crate::state::read(&digest_path(path)) {
        Ok(Some(d)) => d,
        Ok(None) => return Err("its digest is missing".into()),
        Err(e) => return Err(format!("its digest cannot be read: {e}")),
    };
    let mut copy = tempfile::tempfile_in(dir).map_err(|e| format!("no private copy: {e}"))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = entry.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        copy.write_all(&buf[..n]).map_err(|e| format!("no private copy: {e}"))?;
    }
    if hex(&hasher.finalize()).as_bytes() != expected.as_slice() {
        return Err("its digest does not match".into());
    }
    Ok(Some(copy))
}

/// A path to the very file `file` has open (the private copy), so that what is mapped is
/// what was checked; the entry's own path where `/proc` is not mounted.
fn path_of_open(file: &std::fs::File, path: &Path) -> PathBuf {
    use std::os::fd::AsRawFd;
    let by_fd = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    if by_fd.exists() { by_fd } else { path.to_path_buf() }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
