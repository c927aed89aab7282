//! Compressed test pages, made once per thread and reused across runs.
//!
//! The targets compress generated page patterns to build `CompressedPages` frames. The
//! patterns depend only on a seed byte and a length, so their compressed forms are a small
//! set (a few tens of thousands at most); compressing a few hundred KiB with zstd for every
//! message of every run was a large share of a run. The compressor is a tool here, not the
//! code under test: the receiver's decompression of these bytes is what is checked.

use std::cell::RefCell;
use std::collections::HashMap;

use dirtylog_migrate::compress::{Codec, Compression, Compressor};

/// Which pattern generator made the raw bytes (each target has its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pattern {
    /// `wire_decoder`'s pattern.
    Wire,
    /// `receiver_session`'s pattern.
    Session,
}

type Key = (Pattern, bool, u8, usize);

thread_local! {
    static COMPRESSORS: RefCell<[Option<Compressor>; 2]> = RefCell::new([
        Compressor::new(Compression::Lz4).ok(),
        Compressor::new(Compression::Zstd { level: 1 }).ok(),
    ]);
    static CACHE: RefCell<HashMap<Key, Option<Vec<u8>>>> = RefCell::new(HashMap::new());
}

/// The codec of `zstd` (zstd level 1) or not (LZ4).
pub fn codec(zstd: bool) -> Codec {
    if zstd {
        Compression::Zstd { level: 1 }.codec()
    } else {
        Compression::Lz4.codec()
    }
}

/// `raw()` — the `len` bytes `pattern` makes from `seed` — compressed with zstd (level 1) or
/// LZ4; `None` when the compressor refuses or the result is not smaller. Computed once per
/// key and thread.
pub fn compressed(
    pattern: Pattern,
    zstd: bool,
    seed: u8,
    len: usize,
    raw: impl FnOnce() -> Vec<u8>,
) -> Option<Vec<u8>> {
    let key = (pattern, zstd, seed, len);
    if let Some(hit) = CACHE.with(|c| c.borrow().get(&key).cloned()) {
        return hit;
    }
    let raw = raw();
    debug_assert_eq!(raw.len(), len);
    let packed =
        COMPRESSORS.with(
            |c| match c.borrow_mut()[usize::from(zstd)].as_mut()?.compress(&raw) {
                Ok(Some(p)) => Some(p.to_vec()),
                _ => None,
            },
        );
    CACHE.with(|c| c.borrow_mut().insert(key, packed.clone()));
    packed
}
