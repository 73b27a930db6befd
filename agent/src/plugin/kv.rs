//! Each plugin's key-value store: the only state a plugin keeps across re-instantiation
//! and agent restarts (its memory can be dropped at any time, after a trap for example).
//!
//! Kept in memory and saved to `<state_dir>/<plugin>.kv.json` after each call that
//! changed it ([`KvStore::save`]: a temporary file, then a rename, so a crash leaves the
//! old or the new file, never a torn one). Saving once per call, not per change, keeps a
//! plugin that floods `kv-set` from turning each call into many file writes, which no
//! deadline could interrupt. Size-capped: keys and values together may not exceed the cap.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Longest key accepted.
pub const MAX_KEY: usize = 256;

#[derive(Debug)]
pub struct KvStore {
    map: BTreeMap<String, Vec<u8>>,
    bytes: usize,
    cap: usize,
    file: Option<PathBuf>,
    /// Changed since the last save.
    dirty: bool,
}

impl KvStore {
    /// An in-memory store (for dry runs: `gpulet plugin run`).
    pub fn in_memory(cap: usize) -> KvStore {
        KvStore { map: BTreeMap::new(), bytes: 0, cap, file: None, dirty: false }
    }

    /// The store of `plugin` under `dir`, loaded from disk if it is there. A file that
    /// cannot be parsed is set aside as `.corrupt` and the store starts empty: a
    /// plugin's own state must not keep the agent from starting.
    pub fn open(dir: &Path, plugin: &str, cap: usize) -> Result<KvStore, String> {
        crate::state::check_dir(dir)?;
        let file = dir.join(format!("{plugin}.kv.json"));
        let mut store = KvStore { file: Some(file.clone()), ..KvStore::in_memory(cap) };
        match crate::state::read(&file) {
            Ok(None) => {}
            Ok(Some(bytes)) => match serde_json::from_slice::<BTreeMap<String, String>>(&bytes) {
                Ok(m) => {
                    for (k, hex) in m {
                        if let Some(v) = from_hex(&hex) {
                            store.bytes += k.len() + v.len();
                            store.map.insert(k, v);
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(plugin, file = %file.display(), error = %e, "plugin state is corrupt; set aside, starting empty");
                    let _ = crate::state::set_aside(&file);
                }
            },
            Err(e) => return Err(format!("cannot read {}: {e}", file.display())),
        }
        Ok(store)
    }

    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.map.get(key).cloned()
    }

    pub fn set(&mut self, key: &str, value: Vec<u8>) -> Result<(), String> {
        if key.is_empty() || key.len() > MAX_KEY {
            return Err(format!("key of {} bytes; accepted: 1 to {MAX_KEY} bytes", key.len()));
        }
        let old = self.map.get(key).map_or(0, |v| key.len() + v.len());
        let new_total = self.bytes - old + key.len() + value.len();
        if new_total > self.cap {
            return Err(format!(
                "the store would hold {new_total} bytes; its cap is {} bytes",
                self.cap
            ));
        }
        self.map.insert(key.to_owned(), value);
        self.bytes = new_total;
        self.dirty = true;
        Ok(())
    }

    pub fn delete(&mut self, key: &str) {
        if let Some(v) = self.map.remove(key) {
            self.bytes -= key.len() + v.len();
            self.dirty = true;
        }
    }

    /// Bytes held (keys and values).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Write the store to its file if it changed since the last save.
    pub fn save(&mut self) -> Result<(), String> {
        if !std::mem::take(&mut self.dirty) {
            return Ok(());
        }
        let Some(file) = &self.file else { return Ok(()) };
        let m: BTreeMap<&str, String> =
            self.map.iter().map(|(k, v)| (k.as_str(), to_hex(v))).collect();
        let json = serde_json::to_vec(&m).expect("a map of strings serialises");
        crate::state::atomic_write(file, &json).map_err(|e| {
            self.dirty = true;
            format!("cannot save {}: {e}", file.display())
        })
    }
}

fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_reopening_and_enforces_its_cap() {
        let dir = tempfile::tempdir().unwrap();
        let mut kv = KvStore::open(dir.path(), "p", 16).unwrap();
        kv.set("a", b"12345".to_vec()).unwrap();
        assert!(kv.set("b", vec![0; 20]).unwrap_err().contains("its cap is 16 bytes"));
        kv.set("a", b"1234567".to_vec()).unwrap();
        kv.save().unwrap();
        let kv = KvStore::open(dir.path(), "p", 16).unwrap();
        assert_eq!(kv.get("a").unwrap(), b"1234567");
        assert_eq!(kv.bytes(), 8);
    }

    #[test]
    fn a_corrupt_file_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("p.kv.json"), b"{not json").unwrap();
        let kv = KvStore::open(dir.path(), "p", 16).unwrap();
        assert_eq!(kv.bytes(), 0);
        let aside = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("p.kv.json.bad-"));
        assert!(aside, "set aside beside it");
    }
}
