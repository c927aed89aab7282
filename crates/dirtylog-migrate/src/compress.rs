//! Optional per-frame compression of page data, for links slower than the codec.
//!
//! The sender compresses each run of pages it would put in a `Pages` frame and sends a
//! `CompressedPages` frame instead when the result is smaller (see the [wire](crate::wire)
//! format); memory that does not compress (random bytes, already compressed data) goes as
//! plain `Pages`. Two codecs: [LZ4](https://lz4.org) block format (`lz4_flex`, pure Rust: a few
//! GB/s, modest ratios) and [Zstandard](https://facebook.github.io/zstd/) frames (`zstd`, the
//! reference C library: slower, better ratios, tunable by level).
//!
//! ```
//! use dirtylog_migrate::compress::{Compression, Compressor, Decompressor};
//!
//! let raw = b"text-like guest memory, text-like guest memory, ".repeat(100);
//! for c in ["lz4", "zstd", "zstd:3"] {
//!     let c: Compression = c.parse().unwrap();
//!     let mut compressor = Compressor::new(c)?;
//!     let packed = compressor.compress(&raw)?.expect("repetitive bytes compress").to_vec();
//!     assert!(packed.len() < raw.len());
//!     let mut out = vec![0; raw.len()];
//!     Decompressor::default().decompress(c.codec(), &packed, &mut out)?;
//!     assert_eq!(out, raw);
//! }
//! # Ok::<(), dirtylog_migrate::compress::CompressError>(())
//! ```

use std::fmt;
use std::str::FromStr;

use serde::{Serialize, Serializer};
use zstd::zstd_safe;

/// A codec as the wire names it: the `codec` field of a `CompressedPages` frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Codec {
    /// One LZ4 block (no frame header), decompressing to exactly the frame's pages.
    Lz4 = 1,
    /// One or more Zstandard frames, decompressing to exactly the frame's pages.
    Zstd = 2,
}

impl Codec {
    /// The codec with wire id `id`, if this build knows it.
    pub fn from_u32(id: u32) -> Option<Codec> {
        [Codec::Lz4, Codec::Zstd]
            .into_iter()
            .find(|c| *c as u32 == id)
    }

    /// The codec's name: `lz4` or `zstd`.
    pub fn name(self) -> &'static str {
        match self {
            Codec::Lz4 => "lz4",
            Codec::Zstd => "zstd",
        }
    }

    /// The most bytes this codec may produce from `raw_len` bytes: what a receiver accepts
    /// in a frame of `raw_len` bytes of pages. LZ4 block: `raw_len × 1.1 + 20`; zstd:
    /// `ZSTD_COMPRESSBOUND`.
    pub const fn max_compressed_len(self, raw_len: usize) -> usize {
        match self {
            Codec::Lz4 => lz4_flex::block::get_maximum_output_size(raw_len),
            // ZSTD_COMPRESSBOUND of zstd.h (checked against the library's in the tests).
            Codec::Zstd => {
                let small = if raw_len < (128 << 10) {
                    ((128 << 10) - raw_len) >> 11
                } else {
                    0
                };
                raw_len + (raw_len >> 8) + small
            }
        }
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The zstd level `zstd` alone means: the fastest of the regular levels, the one that pays
/// off on the slowest links (see BENCHMARKS.md).
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;

/// How the sender compresses page data: `lz4`, `zstd` (level [`DEFAULT_ZSTD_LEVEL`]) or
/// `zstd:LEVEL` (zstd's levels, negative ones the fastest, up to 22).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Compression {
    /// Zstandard at this level.
    Zstd {
        /// The compression level, in zstd's range (`ZSTD_minCLevel()..=ZSTD_maxCLevel()`).
        level: i32,
    },
    /// LZ4 block format.
    Lz4,
}

impl Compression {
    /// The codec on the wire.
    pub fn codec(self) -> Codec {
        match self {
            Compression::Zstd { .. } => Codec::Zstd,
            Compression::Lz4 => Codec::Lz4,
        }
    }

    /// Check the level: zstd's range is `ZSTD_minCLevel()..=ZSTD_maxCLevel()` (-131072..=22
    /// with zstd 1.5).
    pub fn check(self) -> Result<(), CompressError> {
        match self {
            Compression::Zstd { level }
                if !(zstd_safe::min_c_level()..=zstd_safe::max_c_level()).contains(&level) =>
            {
                Err(CompressError::Level {
                    level,
                    min: zstd_safe::min_c_level(),
                    max: zstd_safe::max_c_level(),
                })
            }
            _ => Ok(()),
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Compression::Zstd { level } => write!(f, "zstd:{level}"),
            Compression::Lz4 => f.write_str("lz4"),
        }
    }
}

impl FromStr for Compression {
    type Err = String;

    /// `lz4`, `zstd` or `zstd:LEVEL`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let c = match s.split_once(':') {
            None if s == "lz4" => Compression::Lz4,
            None if s == "zstd" => Compression::Zstd {
                level: DEFAULT_ZSTD_LEVEL,
            },
            Some(("zstd", level)) => Compression::Zstd {
                level: level
                    .parse()
                    .map_err(|_| format!("'{level}' is not a zstd level (an integer)"))?,
            },
            _ => return Err(format!("'{s}': use lz4, zstd or zstd:LEVEL")),
        };
        c.check().map_err(|e| e.to_string())?;
        Ok(c)
    }
}

/// As its [`Display`](fmt::Display) form: `"lz4"`, `"zstd:1"`.
impl Serialize for Compression {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// What can go wrong compressing or decompressing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CompressError {
    /// A zstd level outside the library's range.
    #[error("zstd level {level} is outside {min}..={max}")]
    Level {
        /// The level asked for.
        level: i32,
        /// `ZSTD_minCLevel()`.
        min: i32,
        /// `ZSTD_maxCLevel()`.
        max: i32,
    },
    /// zstd could not allocate a context.
    #[error("zstd could not allocate its context")]
    Context,
    /// The zstd library failed (for input: the data is not valid zstd).
    #[error("zstd: {0}")]
    Zstd(&'static str),
    /// The LZ4 data is not a valid block, or decompresses to more than expected.
    #[error("lz4: {0}")]
    Lz4(String),
    /// The data decompressed to fewer bytes than expected.
    #[error("decompressed to {got} bytes, {expected} expected")]
    Size {
        /// Bytes expected: the frame's pages.
        expected: usize,
        /// Bytes the data held.
        got: usize,
    },
}

/// A sender's compression state, reused frame after frame: the zstd context and the output
/// buffer (grown once to the codec's bound for the largest frame).
pub struct Compressor {
    compression: Compression,
    zstd: Option<zstd_safe::CCtx<'static>>,
    out: Vec<u8>,
}

impl fmt::Debug for Compressor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Compressor")
            .field("compression", &self.compression)
            .field("buffer", &self.out.len())
            .finish()
    }
}

impl Compressor {
    /// A compressor for `compression`, its level checked.
    pub fn new(compression: Compression) -> Result<Self, CompressError> {
        compression.check()?;
        let zstd = match compression {
            Compression::Zstd { .. } => {
                Some(zstd_safe::CCtx::try_create().ok_or(CompressError::Context)?)
            }
            Compression::Lz4 => None,
        };
        Ok(Compressor {
            compression,
            zstd,
            out: Vec::new(),
        })
    }

    /// The compression this compressor applies.
    pub fn compression(&self) -> Compression {
        self.compression
    }

    /// Compress `raw`; `None` if the result is not smaller (then send `raw` as it is). The
    /// bytes are valid until the next call.
    pub fn compress(&mut self, raw: &[u8]) -> Result<Option<&[u8]>, CompressError> {
        let bound = self.compression.codec().max_compressed_len(raw.len());
        if self.out.len() < bound {
            self.out.resize(bound, 0);
        }
        let out = &mut self.out[..bound];
        let n = match (self.compression, &mut self.zstd) {
            (Compression::Zstd { level }, Some(cctx)) => cctx
                .compress(out, raw, level)
                .map_err(|code| CompressError::Zstd(zstd_safe::get_error_name(code)))?,
            (Compression::Lz4, _) => lz4_flex::block::compress_into(raw, out)
                .map_err(|e| CompressError::Lz4(e.to_string()))?,
            (Compression::Zstd { .. }, None) => return Err(CompressError::Context),
        };
        Ok((n < raw.len()).then(|| &self.out[..n]))
    }
}

/// A receiver's decompression state: the zstd context, made on first use and reused.
#[derive(Default)]
pub struct Decompressor {
    zstd: Option<zstd_safe::DCtx<'static>>,
}

impl fmt::Debug for Decompressor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Decompressor")
            .field("zstd", &self.zstd.is_some())
            .finish()
    }
}

impl Decompressor {
    /// Decompress `data` (untrusted) into `out`, which it must fill exactly: an error if the
    /// data is not valid for `codec` or holds more or fewer bytes than `out`. On an error `out`
    /// holds unspecified bytes.
    pub fn decompress(
        &mut self,
        codec: Codec,
        data: &[u8],
        out: &mut [u8],
    ) -> Result<(), CompressError> {
        let got = match codec {
            Codec::Lz4 => lz4_flex::block::decompress_into(data, out)
                .map_err(|e| CompressError::Lz4(e.to_string()))?,
            Codec::Zstd => {
                if self.zstd.is_none() {
                    self.zstd = Some(zstd_safe::DCtx::try_create().ok_or(CompressError::Context)?);
                }
                let dctx = self.zstd.as_mut().ok_or(CompressError::Context)?;
                dctx.decompress(out, data)
                    .map_err(|code| CompressError::Zstd(zstd_safe::get_error_name(code)))?
            }
        };
        if got != out.len() {
            return Err(CompressError::Size {
                expected: out.len(),
                got,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display() {
        assert_eq!("lz4".parse(), Ok(Compression::Lz4));
        assert_eq!(
            "zstd".parse(),
            Ok(Compression::Zstd {
                level: DEFAULT_ZSTD_LEVEL
            })
        );
        assert_eq!("zstd:-5".parse(), Ok(Compression::Zstd { level: -5 }));
        assert_eq!(Compression::Zstd { level: 3 }.to_string(), "zstd:3");
        assert_eq!(Compression::Lz4.to_string(), "lz4");
        for bad in ["", "gzip", "lz4:1", "zstd:", "zstd:x", "zstd:23", "ZSTD"] {
            assert!(bad.parse::<Compression>().is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            "zstd:99".parse::<Compression>().unwrap_err(),
            "zstd level 99 is outside -131072..=22"
        );
        assert_eq!(
            serde_json::to_value(Compression::Zstd { level: 1 }).unwrap(),
            "zstd:1"
        );
    }

    #[test]
    fn codec_ids_and_bounds() {
        assert_eq!(Codec::from_u32(1), Some(Codec::Lz4));
        assert_eq!(Codec::from_u32(2), Some(Codec::Zstd));
        assert_eq!(Codec::from_u32(0), None);
        assert_eq!(Codec::from_u32(3), None);
        for n in [0, 1, 4096, 100_000, 128 << 10, 2 << 20, 16 << 20] {
            assert_eq!(
                Codec::Zstd.max_compressed_len(n),
                zstd_safe::compress_bound(n),
                "{n}"
            );
        }
    }

    /// Random bytes do not compress: the compressor says so instead of growing them.
    #[test]
    fn incompressible_data_is_refused() {
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        let raw: Vec<u8> = (0..64 << 10)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        for c in [Compression::Lz4, Compression::Zstd { level: 1 }] {
            let mut compressor = Compressor::new(c).unwrap();
            assert_eq!(compressor.compress(&raw).unwrap(), None, "{c}");
        }
    }

    /// The output must be exactly the expected size: shorter and longer fail, never panic.
    #[test]
    fn size_mismatches_fail() {
        let raw = vec![7u8; 8192];
        for c in [Compression::Lz4, Compression::Zstd { level: 1 }] {
            let packed = Compressor::new(c)
                .unwrap()
                .compress(&raw)
                .unwrap()
                .unwrap()
                .to_vec();
            let mut d = Decompressor::default();
            let mut exact = vec![0; 8192];
            d.decompress(c.codec(), &packed, &mut exact).unwrap();
            assert_eq!(exact, raw);
            let mut larger = vec![0; 12288];
            let err = d.decompress(c.codec(), &packed, &mut larger).unwrap_err();
            assert!(
                matches!(
                    err,
                    CompressError::Size {
                        expected: 12288,
                        got: 8192
                    }
                ),
                "{c}: {err}"
            );
            let mut smaller = vec![0; 4096];
            assert!(
                d.decompress(c.codec(), &packed, &mut smaller).is_err(),
                "{c}"
            );
            // Garbage and truncations: an error, not a panic.
            for cut in 0..packed.len() {
                assert!(d.decompress(c.codec(), &packed[..cut], &mut exact).is_err());
            }
            assert!(d.decompress(c.codec(), &[0xff; 64], &mut exact).is_err());
        }
    }
}
