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
            Entry::Copy(file) => match from_copy(engine, file) {
                Ok(c) => return Ok((c, Source::Cached)),
                Err(e) => {
                    tracing::warn!(entry = %path.display(), error = %e, "cached plugin is from another engine; rebuilding");
                    source = Source::Rebuilt;
                }
            },
            Entry::Missing => {}
            Entry::Bad(why) => {
                tracing::warn!(entry = %path.display(), %why, "cached plugin failed its integrity check; rebuilding");
                source = Source::Rebuilt;
            }
            // The entry may be fine: no reason to delete it and compile for tens of
            // seconds. Read and checked into memory instead, as before entries were mapped.
            Entry::NoCopy(why) => {
                tracing::warn!(entry = %path.display(), %why, "no private copy of the cached plugin; loading it into memory");
                if let Some(code) = verified_bytes(&path) {
                    // SAFETY: what `Engine::precompile_component` wrote, checked against
                    // its digest after it was read, from a directory only this user can
                    // write; wasmtime checks version and configuration itself.
                    if let Ok(c) = unsafe { Component::deserialize(engine, &code) } {
                        return Ok((c, Source::Cached));
                    }
                }
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
        match self.store(path, code).map(|()| private_copy(path, &self.dir)) {
            Ok(Entry::Copy(file)) => from_copy(engine, file),
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

/// What [`private_copy`] found.
enum Entry {
    /// No entry: compile.
    Missing,
    /// A private copy of a verified entry.
    Copy(std::fs::File),
    /// An entry that fails its checks: rebuilt.
    Bad(String),
    /// An entry that could not be copied (a full disk, no file descriptors): the entry
    /// itself may be fine.
    NoCopy(String),
}

/// A private copy of the entry, if its digest matches: an unlinked file in the cache
/// directory (`O_TMPFILE`) that no one else can name, let alone change, while the plugin
/// runs from its mapping (a mapped file truncated in place kills the process that maps
/// it, with SIGBUS). Copied and checked in one pass, never read into the agent's memory.
fn private_copy(path: &Path, dir: &Path) -> Entry {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let mut entry =
        match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Entry::Missing,
            Err(e) => return Entry::Bad(e.to_string()),
        };
    let expected = match crate::state::read(&digest_path(path)) {
        Ok(Some(d)) => d,
        Ok(None) => return Entry::Bad("its digest is missing".into()),
        Err(e) => return Entry::Bad(format!("its digest cannot be read: {e}")),
    };
    let mut copy = match tempfile::tempfile_in(dir) {
        Ok(f) => f,
        Err(e) => return Entry::NoCopy(e.to_string()),
    };
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = match entry.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => return Entry::Bad(e.to_string()),
        };
        hasher.update(&buf[..n]);
        if let Err(e) = copy.write_all(&buf[..n]) {
            return Entry::NoCopy(e.to_string());
        }
    }
    if hex(&hasher.finalize()).as_bytes() != expected.as_slice() {
        return Entry::Bad("its digest does not match".into());
    }
    Entry::Copy(copy)
}

/// The component in a private copy: mapped through `/proc/self/fd/N`, the very file
/// `copy` has open (so what is mapped is what was checked); read into memory where
/// `/proc` is not mounted (never the entry's own path, which others could reach).
fn from_copy(engine: &Engine, mut copy: std::fs::File) -> wasmtime::Result<Component> {
    use std::io::{Read, Seek};
    use std::os::fd::AsRawFd;
    let by_fd = PathBuf::from(format!("/proc/self/fd/{}", copy.as_raw_fd()));
    if by_fd.exists() {
        // SAFETY: a private copy of what `Engine::precompile_component` wrote, checked
        // against its digest as it was copied, from a directory only this user can write
        // (see the module docs); no one else can open or change it. wasmtime checks
        // version and configuration itself.
        return unsafe { Component::deserialize_file(engine, by_fd) };
    }
    let mut code = Vec::new();
    copy.rewind()?;
    copy.read_to_end(&mut code)?;
    // SAFETY: as above.
    unsafe { Component::deserialize(engine, &code) }
}

/// The entry's code read into memory, if its digest matches.
fn verified_bytes(path: &Path) -> Option<Vec<u8>> {
    let code = crate::state::read(path).ok()??;
    let expected = crate::state::read(&digest_path(path)).ok()??;
    (hex(&Sha256::digest(&code)).as_bytes() == expected.as_slice()).then_some(code)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
