//! walship's local state files: small `key value` text files, written atomically and durably.
//!
//! Invariants: a state file is replaced only through `write_file_atomic` (temp, fsync,
//! rename, directory fsync), so after a crash it holds either the previous or the new
//! content; reading is strict (a missing key or a bad number is an error naming the file).

use crate::durable::write_file_atomic;
use crate::layout::names::GenerationId;
use anyhow::{anyhow, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// An ordered set of `key value` pairs.
#[derive(Debug, Default, Clone)]
pub struct Kv(pub BTreeMap<String, String>);

impl Kv {
    /// Sets `key` to the display form of `v`.
    pub fn set(&mut self, key: &str, v: impl std::fmt::Display) -> &mut Self {
        self.0.insert(key.to_owned(), v.to_string());
        self
    }

    /// The raw value of `key`.
    ///
    /// # Errors
    /// The key is missing.
    pub fn str(&self, key: &str) -> Result<&str> {
        self.0
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| anyhow!("missing key {key:?}"))
    }

    /// `key` parsed as a decimal u64.
    ///
    /// # Errors
    /// Missing or not a number.
    pub fn u64(&self, key: &str) -> Result<u64> {
        let s = self.str(key)?;
        s.parse()
            .map_err(|_| anyhow!("bad number {s:?} for {key:?}"))
    }

    /// `key` parsed as a hexadecimal u64.
    ///
    /// # Errors
    /// Missing or not hex.
    pub fn hex(&self, key: &str) -> Result<u64> {
        let s = self.str(key)?;
        u64::from_str_radix(s, 16).map_err(|_| anyhow!("bad hex number {s:?} for {key:?}"))
    }

    /// `key` parsed as a generation id.
    ///
    /// # Errors
    /// Missing or malformed.
    pub fn generation(&self, key: &str) -> Result<GenerationId> {
        let s = self.str(key)?;
        s.parse()
            .map_err(|e| anyhow!("bad generation {s:?} for {key:?}: {e}"))
    }

    /// Writes the pairs to `path` atomically and durably.
    ///
    /// # Errors
    /// I/O errors, with the path.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut text = String::new();
        for (k, v) in &self.0 {
            text.push_str(k);
            text.push(' ');
            text.push_str(v);
            text.push('\n');
        }
        write_file_atomic(path, &mut text.as_bytes(), 0o640)
            .with_context(|| format!("cannot write state file {}", path.display()))?;
        Ok(())
    }

    /// Reads `path`; `None` if it does not exist.
    ///
    /// # Errors
    /// I/O errors or malformed lines, with the path.
    pub fn load(path: &Path) -> Result<Option<Kv>> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(e).with_context(|| format!("cannot read state file {}", path.display()))
            }
        };
        let mut kv = Kv::default();
        for (i, line) in text.lines().enumerate() {
            let (k, v) = line.split_once(' ').ok_or_else(|| {
                anyhow!("state file {} line {} is malformed", path.display(), i + 1)
            })?;
            kv.0.insert(k.to_owned(), v.to_owned());
        }
        Ok(Some(kv))
    }
}
