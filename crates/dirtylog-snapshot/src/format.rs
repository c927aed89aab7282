//! The on-disk format, version [`FORMAT`]: the manifest (JSON, kebab-case), the names of a
//! member's files, the chunk checksums, and the encodings of the vCPU and device states.
//! `docs/SNAPSHOT.md` draws it.

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::str::FromStr;

use dirtylog_migrate::digest::mem_hash;
use dirtylog_migrate::wire::{Region, MAX_DEVICE_SECTIONS, MAX_DEVICE_STATE, MAX_VCPU_BLOB};
use dirtylog_migrate::DeviceSection;
use serde::{Deserialize, Serialize};

use crate::error::SnapshotError;

/// The format version this crate writes and reads.
pub const FORMAT: u32 = 1;
/// Bytes covered by one checksum of a member's file.
pub const CHUNK_SIZE: u64 = 1 << 20;
/// The manifest's file name, written last.
pub const MANIFEST: &str = "manifest.json";
/// The vCPU states' file name.
pub const VCPUS: &str = "vcpus.bin";
/// The device sections' file name.
pub const DEVICES: &str = "devices.bin";
/// The largest manifest a reader accepts (a 1 TiB guest has about 1 Mi chunk sums: 20 MiB).
pub const MAX_MANIFEST: u64 = 64 << 20;

/// Region `i`'s memory file: a sparse file of the region's size.
pub fn mem_file(i: usize) -> String {
    format!("mem-{i}.raw")
}

/// Region `i`'s present bitmap (diffs only).
pub fn present_file(i: usize) -> String {
    format!("mem-{i}.present")
}

/// How a snapshot is taken.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SnapshotMode {
    /// Pause, write, resume.
    #[default]
    Stop,
    /// Pre-copy rounds into the file while the guest runs, then a short pause for the last
    /// dirty pages and the vCPU and device state.
    Live,
    /// Pause only to save the state and write-protect memory; pages are saved before the
    /// guest's first write to them, the rest in the background.
    Background,
}

impl SnapshotMode {
    /// `stop`, `live` or `background`.
    pub fn name(self) -> &'static str {
        match self {
            SnapshotMode::Stop => "stop",
            SnapshotMode::Live => "live",
            SnapshotMode::Background => "background",
        }
    }
}

impl fmt::Display for SnapshotMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SnapshotMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stop" => Ok(SnapshotMode::Stop),
            "live" => Ok(SnapshotMode::Live),
            "background" => Ok(SnapshotMode::Background),
            _ => Err(format!(
                "unknown snapshot mode {s:?}: use stop, live or background"
            )),
        }
    }
}

/// A full member or a diff.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// Every page.
    Full,
    /// The pages dirtied since the parent.
    Diff,
}

impl Kind {
    /// `full` or `diff`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Full => "full",
            Kind::Diff => "diff",
        }
    }
}

/// A diff's parent: where it is and the hash of its manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ParentRef {
    /// The parent member's directory: relative to this member's directory (`../3`), or
    /// absolute.
    pub path: String,
    /// [`mem_hash`] (XXH3-64) of the parent's `manifest.json` bytes, 16 hex digits.
    pub manifest_xxh3: String,
}

/// One region of guest memory, as the member holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RegionEntry {
    /// The slot id.
    pub slot: u32,
    /// Guest physical address of the first byte.
    pub guest_phys_addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Pages this member carries (all of them in a full member).
    pub pages_present: u64,
    /// `dirtylog_migrate::digest::mem_digest` of the region as the chain up to this member
    /// holds it: the guest's memory at the snapshot point. 16 hex digits.
    pub memory_xxh3: String,
}

impl RegionEntry {
    /// The stream header's region.
    pub fn region(&self) -> Region {
        Region {
            slot: self.slot,
            gpa: self.guest_phys_addr,
            size: self.size,
        }
    }
}

/// One file of a member and its checksums.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct FileEntry {
    /// The file's name in the member's directory.
    pub name: String,
    /// Its length in bytes.
    pub len: u64,
    /// Bytes per checksum.
    pub chunk_size: u64,
    /// XXH3-64 of each chunk (the last one may be shorter; holes read as zeros), 16 hex
    /// digits each.
    pub chunks: Vec<String>,
}

/// What taking the member cost, as recorded.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ManifestStats {
    /// Pages carried.
    pub pages: u64,
    /// Bytes written to the memory files.
    pub bytes_written: u64,
    /// How long the guest was paused, in µs.
    pub pause_us: u64,
    /// How long taking the member took, in µs.
    pub duration_us: u64,
    /// Pre-copy rounds (live mode), the final one included.
    pub rounds: u32,
}

/// A member's `manifest.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: u32,
    /// Full or diff.
    pub kind: Kind,
    /// A diff's parent; `None` for a full member.
    pub parent: Option<ParentRef>,
    /// Page size in bytes.
    pub page_size: u32,
    /// vCPUs.
    pub vcpu_count: u32,
    /// The memory map, in the stream header's order.
    pub regions: Vec<RegionEntry>,
    /// The dirty tracker that found the pages (`dirty-log`, `clear-log`, `ring:N`).
    pub tracker: String,
    /// How the member was taken.
    pub mode: SnapshotMode,
    /// When it was taken, in milliseconds since the Unix epoch.
    pub created: u64,
    /// Every file of the member but the manifest.
    pub files: Vec<FileEntry>,
    /// Costs.
    pub stats: ManifestStats,
}

impl Manifest {
    /// The entry of file `name`.
    pub fn file(&self, name: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.name == name)
    }

    /// The memory map.
    pub fn layout(&self) -> Vec<Region> {
        self.regions.iter().map(RegionEntry::region).collect()
    }
}

/// `x` as 16 hex digits.
pub fn hex(x: u64) -> String {
    format!("{x:016x}")
}

/// 16 hex digits as a number.
pub fn parse_hex(s: &str) -> Option<u64> {
    (s.len() == 16)
        .then(|| u64::from_str_radix(s, 16).ok())
        .flatten()
}

/// The checksum of a chunk of `len` zero bytes.
pub fn zero_chunk_hash(len: usize) -> u64 {
    mem_hash(&vec![0u8; len])
}

/// The chunk checksums of `file`'s first `len` bytes, reading only the chunks `read(c)`
/// says may hold data (the others are holes, hashed as zeros).
pub fn chunk_hashes(
    file: &File,
    path: &Path,
    len: u64,
    mut read: impl FnMut(u64) -> bool,
) -> Result<Vec<u64>, SnapshotError> {
    let n = len.div_ceil(CHUNK_SIZE);
    let mut out = Vec::with_capacity(n as usize);
    let mut buf = vec![0u8; CHUNK_SIZE.min(len.max(1)) as usize];
    let full_zero = zero_chunk_hash(buf.len());
    for c in 0..n {
        let start = c * CHUNK_SIZE;
        let size = (len - start).min(CHUNK_SIZE) as usize;
        if !read(c) {
            out.push(if size == buf.len() {
                full_zero
            } else {
                zero_chunk_hash(size)
            });
            continue;
        }
        read_full_at(file, path, &mut buf[..size], start)?;
        out.push(mem_hash(&buf[..size]));
    }
    Ok(out)
}

/// Read exactly `buf.len()` bytes at `offset`; a short file is an `UnexpectedEof` error.
pub fn read_full_at(
    file: &File,
    path: &Path,
    buf: &mut [u8],
    offset: u64,
) -> Result<(), SnapshotError> {
    file.read_exact_at(buf, offset)
        .map_err(|e| SnapshotError::io("read", path, e))
}

/// Read a whole small file (at most `max` bytes).
pub fn read_small(path: &Path, max: u64) -> Result<Vec<u8>, SnapshotError> {
    let f = File::open(path).map_err(|e| SnapshotError::io("open", path, e))?;
    let mut out = Vec::new();
    f.take(max + 1)
        .read_to_end(&mut out)
        .map_err(|e| SnapshotError::io("read", path, e))?;
    if out.len() as u64 > max {
        return Err(SnapshotError::Usage(format!(
            "{} is larger than {max} bytes",
            path.display()
        )));
    }
    Ok(out)
}

const VCPUS_MAGIC: &[u8; 8] = b"DLVCPUS1";
const DEVICES_MAGIC: &[u8; 8] = b"DLDEVS01";

/// `vcpus.bin`: magic, count (u32 LE), then each blob as length (u32 LE) and bytes.
pub fn encode_vcpus(blobs: &[Vec<u8>]) -> Vec<u8> {
    let mut out = VCPUS_MAGIC.to_vec();
    out.extend_from_slice(&(blobs.len() as u32).to_le_bytes());
    for b in blobs {
        out.extend_from_slice(&(b.len() as u32).to_le_bytes());
        out.extend_from_slice(b);
    }
    out
}

/// `devices.bin`: magic, count (u32 LE), then each section as name length (u16 LE), name,
/// version (u32 LE), state length (u32 LE) and state.
pub fn encode_devices(sections: &[DeviceSection]) -> Vec<u8> {
    let mut out = DEVICES_MAGIC.to_vec();
    out.extend_from_slice(&(sections.len() as u32).to_le_bytes());
    for s in sections {
        out.extend_from_slice(&(s.name().len() as u16).to_le_bytes());
        out.extend_from_slice(s.name().as_bytes());
        out.extend_from_slice(&s.version().to_le_bytes());
        out.extend_from_slice(&(s.bytes().len() as u32).to_le_bytes());
        out.extend_from_slice(s.bytes());
    }
    out
}

/// A cursor over a state file, every read checked.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("truncated".into());
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u16(&mut self) -> Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// Parse `vcpus.bin`, expecting `count` blobs.
pub fn decode_vcpus(bytes: &[u8], count: u32) -> Result<Vec<Vec<u8>>, String> {
    let mut c = Cursor(bytes);
    if c.take(8)? != VCPUS_MAGIC {
        return Err("not a vCPU state file".into());
    }
    let n = c.u32()?;
    if n != count {
        return Err(format!("{n} vCPU states for {count} vCPUs"));
    }
    let mut out = Vec::with_capacity(n as usize);
    for i in 0..n {
        let len = c.u32()? as usize;
        if len > MAX_VCPU_BLOB {
            return Err(format!("vCPU {i}: state of {len} bytes"));
        }
        out.push(c.take(len)?.to_vec());
    }
    if !c.0.is_empty() {
        return Err("trailing bytes".into());
    }
    Ok(out)
}

/// Parse `devices.bin`.
pub fn decode_devices(bytes: &[u8]) -> Result<Vec<DeviceSection>, String> {
    let mut c = Cursor(bytes);
    if c.take(8)? != DEVICES_MAGIC {
        return Err("not a device state file".into());
    }
    let n = c.u32()? as usize;
    if n > MAX_DEVICE_SECTIONS {
        return Err(format!("{n} device sections"));
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let name_len = usize::from(c.u16()?);
        let name = std::str::from_utf8(c.take(name_len)?)
            .map_err(|_| "a device name is not UTF-8".to_string())?;
        let version = c.u32()?;
        let len = c.u32()? as usize;
        if len > MAX_DEVICE_STATE {
            return Err(format!("device {name:?}: state of {len} bytes"));
        }
        let state = c.take(len)?.to_vec();
        out.push(DeviceSection::new(name, version, state).map_err(|e| e.to_string())?);
    }
    if !c.0.is_empty() {
        return Err("trailing bytes".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_and_truncation_is_refused() {
        let blobs = vec![vec![1, 2, 3], Vec::new(), vec![9; 100]];
        let enc = encode_vcpus(&blobs);
        assert_eq!(decode_vcpus(&enc, 3).unwrap(), blobs);
        assert!(decode_vcpus(&enc, 2).is_err());
        assert!(decode_vcpus(&enc[..enc.len() - 1], 3).is_err());
        let devs = vec![
            DeviceSection::new("serial0", 2, vec![7; 5]).unwrap(),
            DeviceSection::new("rtc", 1, Vec::new()).unwrap(),
        ];
        let enc = encode_devices(&devs);
        assert_eq!(decode_devices(&enc).unwrap(), devs);
        assert!(decode_devices(&enc[..enc.len() - 2]).is_err());
        let mut extra = enc.clone();
        extra.push(0);
        assert!(decode_devices(&extra).is_err());
    }

    #[test]
    fn names_and_hex() {
        for m in [
            SnapshotMode::Stop,
            SnapshotMode::Live,
            SnapshotMode::Background,
        ] {
            assert_eq!(m.to_string().parse::<SnapshotMode>(), Ok(m));
        }
        assert!("paused".parse::<SnapshotMode>().is_err());
        assert_eq!(parse_hex(&hex(0xdead_beef)), Some(0xdead_beef));
        assert_eq!(parse_hex("xyz"), None);
        assert_eq!(parse_hex("00000000000000001"), None);
    }
}
