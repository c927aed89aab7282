//! The framing shared by the vCPU state blob ([`crate::vcpu_state`]) and the VM state blob
//! ([`crate::vm_state`]): a magic, a version, a header word, then tagged sections, every integer
//! little-endian, every read bounds-checked.
//!
//! ```text
//! blob    = magic[8] | version u32 | header u32 | nsections u32 | section*
//! section = tag u32 | length u32 | payload[length]
//! ```
//!
//! Section tags from [`VMM_SECTION_BASE`] up belong to the VMM and are carried opaquely (at
//! most [`MAX_VMM_SECTION`] bytes each).

use crate::error::{Error, Result};

/// Section tags from here up belong to the VMM and are carried opaquely.
pub const VMM_SECTION_BASE: u32 = 0x1000;
/// Most bytes of one VMM section.
pub const MAX_VMM_SECTION: usize = 64 << 10;

/// Little-endian field writer.
#[derive(Default)]
pub(crate) struct Writer(Vec<u8>);

impl Writer {
    pub(crate) fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub(crate) fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    pub(crate) fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.0)
    }
}

/// Little-endian field reader over one section (or the header); every read is bounds-checked
/// and fails with `err(message)`.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
    what: &'static str,
    err: fn(String) -> Error,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], what: &'static str, err: fn(String) -> Error) -> Self {
        Reader {
            buf,
            at: 0,
            what,
            err,
        }
    }
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| {
                (self.err)(format!(
                    "{} is truncated: {} bytes, {} needed",
                    self.what,
                    self.buf.len(),
                    self.at.saturating_add(n)
                ))
            })?;
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }
    pub(crate) fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    pub(crate) fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub(crate) fn u64(&mut self) -> Result<u64> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    pub(crate) fn finish(&self) -> Result<()> {
        if self.at != self.buf.len() {
            return Err((self.err)(format!(
                "{} has {} bytes, {} expected",
                self.what,
                self.buf.len(),
                self.at
            )));
        }
        Ok(())
    }
}

/// Frame `sections` (in order) behind the header.
pub(crate) fn frame(
    magic: &[u8; 8],
    version: u32,
    header: u32,
    sections: Vec<(u32, Vec<u8>)>,
) -> Vec<u8> {
    let mut out = Writer::default();
    out.bytes(magic);
    out.u32(version);
    out.u32(header);
    out.u32(sections.len() as u32);
    for (tag, payload) in sections {
        out.u32(tag);
        out.u32(payload.len() as u32);
        out.bytes(&payload);
    }
    out.take()
}

/// A blob's header and its sections, each `(tag, payload)`, in blob order.
pub(crate) struct Framed<'a> {
    pub(crate) version: u32,
    pub(crate) header: u32,
    pub(crate) sections: Vec<(u32, &'a [u8])>,
}

/// Parse the framing: magic, a version in `versions`, the section table, nothing after the
/// last section. `what` names the blob in errors ("vCPU state").
pub(crate) fn unframe<'a>(
    blob: &'a [u8],
    magic: &[u8; 8],
    versions: &[u32],
    what: &'static str,
    err: fn(String) -> Error,
) -> Result<Framed<'a>> {
    let mut r = Reader::new(blob, "the blob header", err);
    if r.take(8)? != magic {
        return Err(err(format!("not a dirtylog KVM {what} (bad magic)")));
    }
    let version = r.u32()?;
    if !versions.contains(&version) {
        return Err(err(format!(
            "{what} version {version}; this build reads versions {versions:?}"
        )));
    }
    let header = r.u32()?;
    let n = r.u32()?;
    // Every section takes at least 8 bytes, so a count the blob cannot hold is refused before
    // anything is allocated for it.
    let room = blob.len().saturating_sub(20) / 8;
    if n as usize > room {
        return Err(err(format!(
            "the blob header is truncated: {n} sections announced, room for at most {room}"
        )));
    }
    let mut sections = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let tag = r.u32()?;
        let len = r.u32()? as usize;
        if tag >= VMM_SECTION_BASE && len > MAX_VMM_SECTION {
            return Err(err(format!(
                "VMM section {tag:#x} of {len} bytes, at most {MAX_VMM_SECTION}"
            )));
        }
        sections.push((tag, r.take(len)?));
    }
    r.finish()?;
    Ok(Framed {
        version,
        header,
        sections,
    })
}

/// Add or replace VMM section `tag` in `vmm` (kept in tag order), refusing tags below
/// [`VMM_SECTION_BASE`] and sections over [`MAX_VMM_SECTION`] bytes.
pub(crate) fn set_vmm_section(
    vmm: &mut Vec<(u32, Vec<u8>)>,
    tag: u32,
    bytes: Vec<u8>,
    err: fn(String) -> Error,
) -> Result<()> {
    if tag < VMM_SECTION_BASE || bytes.len() > MAX_VMM_SECTION {
        return Err(err(format!(
            "VMM section {tag:#x} of {} bytes: tags start at {VMM_SECTION_BASE:#x}, sections \
             hold at most {MAX_VMM_SECTION} bytes",
            bytes.len()
        )));
    }
    vmm.retain(|(t, _)| *t != tag);
    vmm.push((tag, bytes));
    vmm.sort_by_key(|(t, _)| *t);
    Ok(())
}

/// Collect a decoded VMM section into `vmm`, refusing a repeated tag.
pub(crate) fn push_vmm_section(
    vmm: &mut Vec<(u32, Vec<u8>)>,
    tag: u32,
    payload: &[u8],
    err: fn(String) -> Error,
) -> Result<()> {
    if vmm.iter().any(|(t, _)| *t == tag) {
        return Err(err(format!("VMM section {tag:#x} appears twice")));
    }
    vmm.push((tag, payload.to_vec()));
    vmm.sort_by_key(|(t, _)| *t);
    Ok(())
}
