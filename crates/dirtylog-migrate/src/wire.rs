//! The versioned, framed wire format of a pre-copy migration stream.
//!
//! ```text
//! stream   = preamble header-frame frame*
//! preamble = magic "DIRTYLG\0" (8 bytes) | version u32 (= 5)
//! frame    = type u8 | flags u8 | length u32 | payload[length] | crc32c u32
//! ```
//!
//! Integers are little-endian. The CRC32C covers the type, flags and length bytes and the
//! payload, so a flipped bit anywhere in a frame is caught. The one flag,
//! [`FLAG_HASH_CHECKED`], is allowed on `Pages` frames only: their CRC then covers the type,
//! flags, length and fixed fields but not the pages, which the destination checks instead by
//! the page hashes it records ([`Decoder::set_hash_pages`]) against the source's digest of its
//! paused memory — the end-to-end check a verified migration makes anyway, so the pages are not
//! checksummed twice. A decoder refuses the flag unless it was told to accept it
//! ([`Decoder::accept_hash_checked`]); the receiving engine accepts it only in a stream whose
//! memory is then verified. Every other flag is refused. Each payload starts with fixed
//! fields; `Pages`, `VcpuState`, `Error`, `Device` and `CompressedPages` then carry variable
//! data:
//!
//! | type | frame       | fixed fields                                | data                     |
//! |------|-------------|---------------------------------------------|--------------------------|
//! | 1    | header      | page_size u32, vcpu_count u32, nregions u32 | nregions region entries  |
//! | 2    | `Pages`     | slot u32, first_page u64, npages u64        | npages × page_size bytes |
//! | 3    | `ZeroPages` | slot u32, first_page u64, npages u64        |                          |
//! | 4    | `RoundEnd`  | round u64, dirty_pages u64                  |                          |
//! | 5    | `VcpuState` | vcpu_id u32                                 | blob                     |
//! | 6    | `MemHash`   | slot u32, hash u64                          |                          |
//! | 7    | `Done`      |                                             |                          |
//! | 8    | `Error`     | code u32                                    | UTF-8 message            |
//! | 9    | `Ack`       | code u32                                    |                          |
//! | 10   | `Cancel`    |                                             |                          |
//! | 11   | `Hello`     | connection u32, connections u32, session u64 |                         |
//! | 12   | `Device`    | version u32, name_len u32                   | name, then state bytes   |
//! | 13   | `Prepare`   | verify u32                                  |                          |
//! | 14   | `Resumed`   | resume_us u64                               |                          |
//! | 15   | `CompressedPages` | slot u32, first_page u64, npages u64, codec u32 | compressed pages |
//!
//! `CompressedPages` is a `Pages` frame whose data is compressed: the pages' `npages ×
//! page_size` bytes (at most [`MAX_PAGES_BYTES`]) as one LZ4 block (codec 1) or zstd data
//! (codec 2), at most the codec's bound for that size ([`Codec::max_compressed_len`]); the CRC
//! covers the compressed bytes. It is not a message of its own: the sender writes it with
//! [`Encoder::send_compressed`], and the [`Decoder`] checks its range, length and CRC,
//! decompresses it straight into the destination memory and returns a [`Message::Pages`].
//!
//! A region entry is slot u32, gpa u64, size u64. A `Device` name is 1 to
//! [`MAX_DEVICE_NAME`] bytes of ASCII letters, digits and `-_.:/`; its state at most
//! [`MAX_DEVICE_STATE`] bytes. Version 2 added `Device`; version 1 streams are refused.
//!
//! Who sends what, and when, is drawn in the [protocol](crate::protocol) docs.
//!
//! Every length is bounded per type ([`MAX_PAYLOAD`] overall) and checked before anything is
//! read or allocated; every page range is checked against the header's memory map.
//!
//! The sender's [`Encoder`] writes each frame as three slices (header and fixed fields, the
//! borrowed data, the CRC) with one vectored write: guest memory is never copied. The
//! receiver's [`Decoder`] reads into buffers it reuses, and a `Pages` frame's data straight into
//! the destination memory once its range has been validated (a `CompressedPages` frame's data
//! into its buffer, then decompressed into the destination once the CRC matches).
//!
//! ```
//! use dirtylog_migrate::wire::{Decoder, Encoder, Message, PageRange, Region, StreamHeader};
//!
//! let header = StreamHeader::new(4096, 1, vec![Region { slot: 0, gpa: 0, size: 4 * 4096 }])?;
//! let guest = vec![0xab_u8; 4 * 4096];
//!
//! let mut stream = Vec::new();
//! let mut encoder = Encoder::new(&mut stream, header)?;
//! let range = PageRange { slot: 0, first_page: 1, npages: 2 };
//! encoder.send(Message::Pages { range, data: &guest[4096..3 * 4096] })?;
//! encoder.send(Message::Done)?;
//!
//! let mut decoder = Decoder::new(stream.as_slice())?;
//! let mut memory = vec![vec![0u8; 4 * 4096]]; // one buffer per region of the header
//! while let Some(message) = decoder.next(&mut memory)? {
//!     if message == Message::Done {
//!         break;
//!     }
//! }
//! assert_eq!(memory[0][4096..3 * 4096], guest[4096..3 * 4096]);
//! assert!(memory[0][..4096].iter().all(|&b| b == 0));
//! # Ok::<(), dirtylog_migrate::wire::WireError>(())
//! ```

mod error;
mod header;

use std::io::{self, IoSlice, Read, Write};

pub use error::WireError;

use crate::compress::{Codec, Decompressor};
pub use header::{PageRange, Region, StreamHeader};

/// First bytes of every stream.
pub const MAGIC: [u8; 8] = *b"DIRTYLG\0";
/// The format version this build writes and reads. Version 4: `MemHash` carries
/// [`mem_digest`](crate::digest::mem_digest) over page hashes, and `Prepare`/`Prepared`/
/// `Commit`/`Resumed` hand the guest over exactly once and let the
/// destination run the guest before the memory check. Version 5: [`FLAG_HASH_CHECKED`].
pub const VERSION: u32 = 5;
/// Frame flag of a `Pages` frame whose CRC leaves out the pages: the page hashes check them
/// (see the [module docs](self)).
pub const FLAG_HASH_CHECKED: u8 = 1;
/// Smallest page size a header may declare.
pub const MIN_PAGE_SIZE: u32 = 4096;
/// Largest page size a header may declare (tracking at 2 MiB huge-page granularity).
pub const MAX_PAGE_SIZE: u32 = 2 << 20;
/// Most vCPUs a header may declare (KVM's `KVM_MAX_VCPUS` on x86).
pub const MAX_VCPUS: u32 = 4096;
/// Most TCP connections one migration may use; a `Hello` frame declaring more is refused.
pub const MAX_CONNECTIONS: u32 = 64;
/// Most regions in the memory map.
pub const MAX_REGIONS: usize = 512;
/// Most guest memory, in bytes, the memory map may add up to: 1 TiB.
pub const MAX_GUEST_MEMORY: u64 = 1 << 40;
/// Most bytes of page data in one `Pages` frame: 16 MiB, a multiple of every page size.
pub const MAX_PAGES_BYTES: usize = 16 << 20;
/// Most bytes of a `Pages` frame's data the [`Decoder`] asks for in one `read`; each piece is
/// checked (and hashed, see [`Decoder::set_hash_pages`]) as soon as it has landed, mostly
/// still in cache. Each `read` of a TCP socket may send a window update, so fewer, larger
/// reads cost the kernel less: 1 MiB took 2–10% less CPU per GiB than 256 KiB in a 2-connection
/// bulk pass (128 KiB to 2 MiB tried, BENCHMARKS.md). A
/// [`BufReader`](std::io::BufReader) passes reads this large straight through when it has
/// no capacity above it.
pub const PAGES_PIECE: usize = 1 << 20;
/// Largest `VcpuState` blob: 1 MiB, well above KVM's register, XSAVE and nested state.
pub const MAX_VCPU_BLOB: usize = 1 << 20;
/// Longest `Error` message, in bytes.
pub const MAX_ERROR_MESSAGE: usize = 4096;
/// Longest device name in a `Device` frame, in bytes.
pub const MAX_DEVICE_NAME: usize = 64;
const _: () = assert!(MAX_DEVICE_NAME == 64, "check_device_name's message says 64");
/// Largest device state in a `Device` frame: 8 MiB.
pub const MAX_DEVICE_STATE: usize = 8 << 20;
/// Most `Device` frames one migration may carry.
pub const MAX_DEVICE_SECTIONS: usize = 1024;
/// Most bytes of compressed data in one `CompressedPages` frame: the larger of the codecs'
/// bounds for [`MAX_PAGES_BYTES`] (LZ4's, 10% more); each frame is held to its own codec's
/// bound for its own pages.
pub const MAX_COMPRESSED_BYTES: usize = {
    let (lz4, zstd) = (
        Codec::Lz4.max_compressed_len(MAX_PAGES_BYTES),
        Codec::Zstd.max_compressed_len(MAX_PAGES_BYTES),
    );
    if lz4 > zstd {
        lz4
    } else {
        zstd
    }
};
/// Largest payload of any frame: a full `CompressedPages` frame.
pub const MAX_PAYLOAD: u32 = (COMPRESSED_FIXED + MAX_COMPRESSED_BYTES) as u32;

/// Bytes of a frame header: type, flags, length.
const FRAME_HEAD: usize = 6;
/// Bytes of the fixed fields of `Pages` and `ZeroPages`.
const PAGES_FIXED: usize = 20;
/// Bytes of the fixed fields of `CompressedPages`: the range, then the codec.
const COMPRESSED_FIXED: usize = PAGES_FIXED + 4;
/// Bytes of the fixed fields of `Device`: version, name length.
const DEVICE_FIXED: usize = 8;
/// Room for the fixed fields of any frame, and for a `Device` frame's name after them (the
/// encoder frames the name with the fixed fields, so that the state is the only borrowed
/// slice).
const FIXED_MAX: usize = DEVICE_FIXED + MAX_DEVICE_NAME;

/// One message of the stream. Borrowed data lets the sender frame guest memory in place and
/// the receiver hand out its buffers without copying.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// A run of whole pages with their contents, `range.npages × page_size` bytes.
    Pages {
        /// Where the pages go.
        range: PageRange,
        /// Their contents.
        data: &'a [u8],
    },
    /// A run of pages that are all zero: a marker, no bytes. Decoding leaves memory alone; the
    /// receiver zeroes the range, or knows it is still zero.
    ZeroPages(PageRange),
    /// The end of a round of pre-copy.
    RoundEnd {
        /// The round that ended, from 0.
        round: u64,
        /// Pages found dirty at the start of the round.
        dirty_pages: u64,
    },
    /// Opaque saved state of one vCPU.
    VcpuState {
        /// The vCPU's index, below the header's vCPU count.
        vcpu_id: u32,
        /// Its state, at most [`MAX_VCPU_BLOB`] bytes.
        blob: &'a [u8],
    },
    /// The [`mem_digest`](crate::digest::mem_digest) of a whole region, for the receiver to
    /// compare with its copy.
    MemHash {
        /// The region's slot id.
        slot: u32,
        /// The region's digest.
        hash: u64,
    },
    /// The sender has sent everything.
    Done,
    /// Either side gives up.
    Error {
        /// Application-defined error code.
        code: u32,
        /// What went wrong, at most [`MAX_ERROR_MESSAGE`] bytes.
        message: &'a str,
    },
    /// Receiver to sender: acknowledgement.
    Ack {
        /// Application-defined status; 0 for success.
        code: u32,
    },
    /// Either side cancels the migration.
    Cancel,
    /// Sender to receiver, right after the header on every connection of a migration: which
    /// connection this is, how many there are, and a random session id that ties them together.
    Hello {
        /// This connection's index, below `connections`; 0 carries the control frames.
        connection: u32,
        /// Connections of the migration, `1..=`[`MAX_CONNECTIONS`].
        connections: u32,
        /// The same random value on every connection of one migration.
        session: u64,
    },
    /// Sender to receiver, at switchover after the vCPU states: the opaque saved state of one
    /// device.
    Device {
        /// The device's name: 1 to [`MAX_DEVICE_NAME`] bytes of ASCII letters, digits and
        /// `-_.:/`, unique within the migration.
        name: &'a str,
        /// The version of the state's format, as the device defines it.
        version: u32,
        /// The state, at most [`MAX_DEVICE_STATE`] bytes.
        bytes: &'a [u8],
    },
    /// Sender to receiver, at switchover after the vCPU states, the device sections and (in
    /// strict mode) the digests: everything the guest needs has been sent; get ready to run
    /// it, but do not run it before [`Commit`](Message::Commit). `verify` says when the
    /// memory is checked: [`VERIFY_STRICT`], [`VERIFY_BACKGROUND`] or [`VERIFY_NONE`].
    Prepare {
        /// [`VERIFY_STRICT`], [`VERIFY_BACKGROUND`] or [`VERIFY_NONE`].
        verify: u32,
    },
    /// Receiver to sender, on the reply channel: every state is restored (and, strict, the
    /// memory checked); the guest will run here on `Commit`, and not before.
    Prepared,
    /// Sender to receiver: the source has stopped its guest for good; run it. After this
    /// the source never resumes its guest on its own.
    Commit,
    /// Receiver to sender, on the reply channel: the guest runs here (after `Commit`).
    Resumed {
        /// Microseconds from the `Commit` frame to the guest running.
        resume_us: u64,
    },
}

/// [`Message::Prepare`]: no memory check; only `Done` follows `Commit`.
pub const VERIFY_NONE: u32 = 0;
/// [`Message::Prepare`]: `MemHash` frames follow the guest's resume (after `Commit`), then
/// `Done`; the check runs while the guest runs.
pub const VERIFY_BACKGROUND: u32 = 1;
/// [`Message::Prepare`]: the `MemHash` frames came before it; the receiver checks them before
/// it answers `Prepared`.
pub const VERIFY_STRICT: u32 = 2;

/// Check a device name: 1 to [`MAX_DEVICE_NAME`] bytes of ASCII letters, digits and `-_.:/`.
pub fn check_device_name(name: &[u8]) -> Result<(), WireError> {
    let why = if name.is_empty() {
        "is empty"
    } else if name.len() > MAX_DEVICE_NAME {
        "is longer than 64 bytes"
    } else if !name
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || b"-_.:/".contains(&b))
    {
        "has a character other than ASCII letters, digits and -_.:/"
    } else {
        return Ok(());
    };
    Err(WireError::DeviceName {
        name: String::from_utf8_lossy(&name[..name.len().min(MAX_DEVICE_NAME)]).into_owned(),
        why,
    })
}

/// Check a device section: its name ([`check_device_name`]) and that its state is at most
/// [`MAX_DEVICE_STATE`] bytes.
pub fn check_device(name: &[u8], state_len: usize) -> Result<(), WireError> {
    check_device_name(name)?;
    if state_len > MAX_DEVICE_STATE {
        return Err(WireError::DeviceStateTooLarge {
            len: state_len,
            max: MAX_DEVICE_STATE,
        });
    }
    Ok(())
}

/// The frame types. `Header` only starts a stream; the others carry a [`Message`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Header = 1,
    Pages,
    ZeroPages,
    RoundEnd,
    VcpuState,
    MemHash,
    Done,
    Error,
    Ack,
    Cancel,
    Hello,
    Device,
    Prepare,
    Resumed,
    CompressedPages,
    Prepared,
    Commit,
}

impl Kind {
    const ALL: [Kind; 17] = [
        Kind::Header,
        Kind::Pages,
        Kind::ZeroPages,
        Kind::RoundEnd,
        Kind::VcpuState,
        Kind::MemHash,
        Kind::Done,
        Kind::Error,
        Kind::Ack,
        Kind::Cancel,
        Kind::Hello,
        Kind::Device,
        Kind::Prepare,
        Kind::Resumed,
        Kind::CompressedPages,
        Kind::Prepared,
        Kind::Commit,
    ];

    fn from_u8(byte: u8) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| *k as u8 == byte)
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Header => "header frame",
            Kind::Pages => "Pages frame",
            Kind::ZeroPages => "ZeroPages frame",
            Kind::RoundEnd => "RoundEnd frame",
            Kind::VcpuState => "VcpuState frame",
            Kind::MemHash => "MemHash frame",
            Kind::Done => "Done frame",
            Kind::Error => "Error frame",
            Kind::Ack => "Ack frame",
            Kind::Cancel => "Cancel frame",
            Kind::Hello => "Hello frame",
            Kind::Device => "Device frame",
            Kind::Prepare => "Prepare frame",
            Kind::Prepared => "Prepared frame",
            Kind::Commit => "Commit frame",
            Kind::Resumed => "Resumed frame",
            Kind::CompressedPages => "CompressedPages frame",
        }
    }

    /// Bytes of fixed fields, and the most bytes of data after them.
    fn layout(self) -> (usize, usize) {
        match self {
            Kind::Header => (12, MAX_REGIONS * header::REGION_ENTRY),
            Kind::Pages => (PAGES_FIXED, MAX_PAGES_BYTES),
            Kind::ZeroPages => (PAGES_FIXED, 0),
            Kind::RoundEnd => (16, 0),
            Kind::VcpuState => (4, MAX_VCPU_BLOB),
            Kind::MemHash => (12, 0),
            Kind::Done | Kind::Cancel => (0, 0),
            Kind::Error => (4, MAX_ERROR_MESSAGE),
            Kind::Ack => (4, 0),
            Kind::Hello => (16, 0),
            Kind::Device => (DEVICE_FIXED, MAX_DEVICE_NAME + MAX_DEVICE_STATE),
            Kind::Prepare => (4, 0),
            Kind::Prepared | Kind::Commit => (0, 0),
            Kind::Resumed => (8, 0),
            Kind::CompressedPages => (COMPRESSED_FIXED, MAX_COMPRESSED_BYTES),
        }
    }

    /// Check a payload length against this type's bounds.
    fn check_len(self, len: u64) -> Result<(), WireError> {
        let (fixed, data) = self.layout();
        let (min, max) = (fixed as u64, (fixed + data) as u64);
        if (min..=max).contains(&len) {
            return Ok(());
        }
        Err(WireError::Length {
            frame: self.name(),
            len,
            min,
            max,
        })
    }
}

/// Fixed fields being encoded.
struct Fixed {
    buf: [u8; FIXED_MAX],
    len: usize,
}

impl Default for Fixed {
    fn default() -> Self {
        Fixed {
            buf: [0; FIXED_MAX],
            len: 0,
        }
    }
}

impl Fixed {
    fn put(mut self, bytes: &[u8]) -> Self {
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
        self
    }

    fn u32(self, v: u32) -> Self {
        self.put(&v.to_le_bytes())
    }

    fn u64(self, v: u64) -> Self {
        self.put(&v.to_le_bytes())
    }

    fn range(self, r: PageRange) -> Self {
        self.u32(r.slot).u64(r.first_page).u64(r.npages)
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Fixed fields being decoded. Always over a slice sized by [`Kind::layout`] for the fields
/// read, so the slicing cannot fail.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let (head, rest) = self.0.split_at(N);
        self.0 = rest;
        let mut out = [0; N];
        out.copy_from_slice(head);
        out
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }

    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }

    fn range(&mut self) -> PageRange {
        PageRange {
            slot: self.u32(),
            first_page: self.u64(),
            npages: self.u64(),
        }
    }
}

fn encode_fields<'a>(msg: Message<'a>) -> (Kind, Fixed, &'a [u8]) {
    let f = Fixed::default();
    match msg {
        Message::Pages { range, data } => (Kind::Pages, f.range(range), data),
        Message::ZeroPages(range) => (Kind::ZeroPages, f.range(range), &[]),
        Message::RoundEnd { round, dirty_pages } => {
            (Kind::RoundEnd, f.u64(round).u64(dirty_pages), &[])
        }
        Message::VcpuState { vcpu_id, blob } => (Kind::VcpuState, f.u32(vcpu_id), blob),
        Message::MemHash { slot, hash } => (Kind::MemHash, f.u32(slot).u64(hash), &[]),
        Message::Device {
            name,
            version,
            bytes,
        } => {
            // The name rides with the fixed fields (validated to fit before framing).
            let name = &name.as_bytes()[..name.len().min(MAX_DEVICE_NAME)];
            let fixed = f.u32(version).u32(name.len() as u32).put(name);
            (Kind::Device, fixed, bytes)
        }
        Message::Done => (Kind::Done, f, &[]),
        Message::Error { code, message } => (Kind::Error, f.u32(code), message.as_bytes()),
        Message::Ack { code } => (Kind::Ack, f.u32(code), &[]),
        Message::Cancel => (Kind::Cancel, f, &[]),
        Message::Prepare { verify } => (Kind::Prepare, f.u32(verify), &[]),
        Message::Prepared => (Kind::Prepared, f, &[]),
        Message::Commit => (Kind::Commit, f, &[]),
        Message::Resumed { resume_us } => (Kind::Resumed, f.u64(resume_us), &[]),
        Message::Hello {
            connection,
            connections,
            session,
        } => (
            Kind::Hello,
            f.u32(connection).u32(connections).u64(session),
            &[],
        ),
    }
}

fn decode_fields<'a>(kind: Kind, fixed: &[u8], data: &'a [u8]) -> Result<Message<'a>, WireError> {
    let mut f = Fields(fixed);
    Ok(match kind {
        Kind::Header => {
            return Err(WireError::UnexpectedFrame {
                found: kind.name(),
                expected: "a message frame",
            })
        }
        // Decompressed by `Decoder::compressed`, never through here.
        Kind::CompressedPages => {
            return Err(WireError::UnexpectedFrame {
                found: kind.name(),
                expected: "its data decompressed",
            })
        }
        Kind::Pages => Message::Pages {
            range: f.range(),
            data,
        },
        Kind::ZeroPages => Message::ZeroPages(f.range()),
        Kind::RoundEnd => Message::RoundEnd {
            round: f.u64(),
            dirty_pages: f.u64(),
        },
        Kind::VcpuState => Message::VcpuState {
            vcpu_id: f.u32(),
            blob: data,
        },
        Kind::MemHash => Message::MemHash {
            slot: f.u32(),
            hash: f.u64(),
        },
        Kind::Done => Message::Done,
        Kind::Error => Message::Error {
            code: f.u32(),
            message: std::str::from_utf8(data).map_err(|_| WireError::Utf8)?,
        },
        Kind::Ack => Message::Ack { code: f.u32() },
        Kind::Cancel => Message::Cancel,
        Kind::Prepare => Message::Prepare { verify: f.u32() },
        Kind::Prepared => Message::Prepared,
        Kind::Commit => Message::Commit,
        Kind::Resumed => Message::Resumed { resume_us: f.u64() },
        Kind::Hello => Message::Hello {
            connection: f.u32(),
            connections: f.u32(),
            session: f.u64(),
        },
        Kind::Device => {
            let version = f.u32();
            let name_len = f.u32() as usize;
            if name_len > MAX_DEVICE_NAME || name_len > data.len() {
                return Err(WireError::DeviceNameLength {
                    len: name_len,
                    max: MAX_DEVICE_NAME.min(data.len()),
                });
            }
            let (name, bytes) = data.split_at(name_len);
            // The whole section is checked before it is returned (`StreamHeader::validate`);
            // the name's characters are checked here already, so that it is a `&str`.
            check_device_name(name)?;
            Message::Device {
                // Checked to be ASCII just above.
                name: std::str::from_utf8(name).map_err(|_| WireError::Utf8)?,
                version,
                bytes,
            }
        }
    })
}

impl StreamHeader {
    /// Check a `CompressedPages` frame's range (as a `Pages` frame's, and at most
    /// [`MAX_PAGES_BYTES`]), codec and data length; returns the region's index, the codec and
    /// the decompressed size.
    fn check_compressed(
        &self,
        range: PageRange,
        codec: u32,
        len: usize,
    ) -> Result<(usize, Codec, usize), WireError> {
        let index = self.check_range(range)?;
        let raw = range
            .npages
            .checked_mul(u64::from(self.page_size()))
            .filter(|&raw| raw <= MAX_PAGES_BYTES as u64)
            .ok_or(WireError::CompressedRange {
                npages: range.npages,
                page_size: self.page_size(),
            })? as usize;
        let codec = Codec::from_u32(codec).ok_or(WireError::UnknownCodec(codec))?;
        let max = codec.max_compressed_len(raw);
        if !(1..=max).contains(&len) {
            return Err(WireError::CompressedLength {
                codec,
                raw,
                len,
                max,
            });
        }
        Ok((index, codec, raw))
    }

    /// Check a message against the memory map and vCPU count.
    fn validate(&self, msg: &Message<'_>) -> Result<(), WireError> {
        match *msg {
            Message::Pages { range, data } => self.check_pages(range, data.len()).map(drop),
            Message::ZeroPages(range) => self.check_range(range).map(drop),
            Message::VcpuState { vcpu_id, .. } if vcpu_id >= self.vcpu_count() => {
                Err(WireError::VcpuId {
                    id: vcpu_id,
                    count: self.vcpu_count(),
                })
            }
            Message::MemHash { slot, .. } => self.region(slot).map(drop),
            Message::Prepare { verify } if verify > VERIFY_STRICT => {
                Err(WireError::ResumeMode(verify))
            }
            Message::Device { name, bytes, .. } => check_device(name.as_bytes(), bytes.len()),
            Message::Hello {
                connection,
                connections,
                ..
            } if !(1..=MAX_CONNECTIONS).contains(&connections) || connection >= connections => {
                Err(WireError::Connection {
                    connection,
                    connections,
                })
            }
            _ => Ok(()),
        }
    }
}

/// One encoded frame, ready to write: its header and fixed fields, the borrowed data, and the
/// CRC. Nothing of the data is copied; write it with [`Frame::write_to`] or hand
/// [`Frame::io_slices`] to your own I/O.
#[derive(Clone, Copy, Debug)]
pub struct Frame<'a> {
    head: [u8; FRAME_HEAD + FIXED_MAX],
    head_len: usize,
    data: &'a [u8],
    crc: [u8; 4],
}

impl<'a> Frame<'a> {
    /// Validate `msg` against `header` and frame it.
    pub fn new(header: &StreamHeader, msg: Message<'a>) -> Result<Self, WireError> {
        Frame::checked(header, msg, false)
    }

    /// As [`new`](Self::new) for a `Pages` message, with [`FLAG_HASH_CHECKED`]: the CRC
    /// leaves out the pages. Any other message is framed as by `new`.
    pub fn new_hash_checked(header: &StreamHeader, msg: Message<'a>) -> Result<Self, WireError> {
        Frame::checked(header, msg, true)
    }

    /// Validate `msg` and frame it, a `Pages` message hash-checked if `hash_checked`.
    fn checked(
        header: &StreamHeader,
        msg: Message<'a>,
        hash_checked: bool,
    ) -> Result<Self, WireError> {
        let (kind, fixed, data) = encode_fields(msg);
        kind.check_len((fixed.len + data.len()) as u64)?;
        header.validate(&msg)?;
        let flags = if hash_checked && kind == Kind::Pages {
            FLAG_HASH_CHECKED
        } else {
            0
        };
        Ok(Frame::build_flagged(kind, &fixed, data, flags))
    }

    /// Validate a `CompressedPages` frame against `header` and frame it: `data` is the pages
    /// of `range` compressed with `codec`, at most [`Codec::max_compressed_len`] of their
    /// size. That it decompresses to exactly the pages is the caller's promise; the receiver
    /// checks it.
    pub fn compressed_pages(
        header: &StreamHeader,
        range: PageRange,
        codec: Codec,
        data: &'a [u8],
    ) -> Result<Self, WireError> {
        header.check_compressed(range, codec as u32, data.len())?;
        let fixed = Fixed::default().range(range).u32(codec as u32);
        Kind::CompressedPages.check_len((fixed.len + data.len()) as u64)?;
        Ok(Frame::build(Kind::CompressedPages, &fixed, data))
    }

    /// Frame a payload whose length has been checked against `kind`'s bounds.
    fn build(kind: Kind, fixed: &Fixed, data: &'a [u8]) -> Self {
        Frame::build_flagged(kind, fixed, data, 0)
    }

    /// [`build`](Self::build) with `flags`; with [`FLAG_HASH_CHECKED`] the CRC leaves `data`
    /// out.
    fn build_flagged(kind: Kind, fixed: &Fixed, data: &'a [u8], flags: u8) -> Self {
        debug_assert!(
            fixed.len == kind.layout().0 || kind == Kind::Device,
            "{} fixed fields",
            kind.name()
        );
        let (head, head_len, crc) = frame_head(kind, fixed, data.len(), flags);
        let crc = if flags & FLAG_HASH_CHECKED != 0 {
            crc
        } else {
            crc32c::crc32c_append(crc, data)
        };
        Frame {
            head,
            head_len,
            data,
            crc: crc.to_le_bytes(),
        }
    }

    /// The frame as three slices, for a vectored write.
    pub fn io_slices(&self) -> [IoSlice<'_>; 3] {
        [
            IoSlice::new(&self.head[..self.head_len]),
            IoSlice::new(self.data),
            IoSlice::new(&self.crc),
        ]
    }

    /// Bytes the frame occupies on the wire.
    pub fn wire_len(&self) -> usize {
        self.head_len + self.data.len() + self.crc.len()
    }

    /// Write the whole frame with vectored writes, retrying partial and interrupted writes.
    pub fn write_to<W: Write + ?Sized>(&self, w: &mut W) -> io::Result<()> {
        let mut parts = [&self.head[..self.head_len], self.data, &self.crc[..]];
        while parts.iter().any(|p| !p.is_empty()) {
            let mut n = match w.write_vectored(&parts.map(IoSlice::new)) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            for part in &mut parts {
                let k = n.min(part.len());
                *part = &part[k..];
                n -= k;
            }
        }
        Ok(())
    }
}

/// A frame's type, flags, length and fixed fields for `data_len` bytes of data whose length
/// has been checked against `kind`'s bounds; their length, and the CRC of them alone.
fn frame_head(
    kind: Kind,
    fixed: &Fixed,
    data_len: usize,
    flags: u8,
) -> ([u8; FRAME_HEAD + FIXED_MAX], usize, u32) {
    // Bounded by Kind::layout, far below u32::MAX.
    let len = (fixed.len + data_len) as u32;
    let mut head = [0; FRAME_HEAD + FIXED_MAX];
    head[0] = kind as u8;
    head[1] = flags;
    head[2..FRAME_HEAD].copy_from_slice(&len.to_le_bytes());
    let head_len = FRAME_HEAD + fixed.len;
    head[FRAME_HEAD..head_len].copy_from_slice(fixed.as_bytes());
    (head, head_len, crc32c::crc32c(&head[..head_len]))
}

/// The sending side of a stream: validates each message against the header and writes it as
/// one frame, without copying its data. An invalid message is refused before anything is
/// written; after an I/O error the stream may hold part of a frame and must be abandoned.
/// Each frame is one vectored write: give it an unbuffered socket, or a buffered writer.
#[derive(Debug)]
pub struct Encoder<W> {
    writer: W,
    header: StreamHeader,
    position: u64,
    /// [`Encoder::set_hash_checked_pages`].
    hash_checked: bool,
}

impl<W: Write> Encoder<W> {
    /// Start a stream: write the preamble and the header frame.
    pub fn new(writer: W, header: StreamHeader) -> Result<Self, WireError> {
        let mut encoder = Encoder::back_channel(writer, header);
        let mut preamble = [0; 12];
        preamble[..8].copy_from_slice(&MAGIC);
        preamble[8..].copy_from_slice(&VERSION.to_le_bytes());
        encoder.writer.write_all(&preamble)?;
        encoder.position = preamble.len() as u64;
        let (fixed, entries) = encoder.header.encode();
        encoder.write(&Frame::build(Kind::Header, &fixed, &entries))?;
        Ok(encoder)
    }

    /// An encoder that writes no preamble or header: for the receiver's replies (`Ack`,
    /// `Error`, `Cancel`) on the return channel, whose header both sides already know.
    pub fn back_channel(writer: W, header: StreamHeader) -> Self {
        Encoder {
            writer,
            header,
            position: 0,
            hash_checked: false,
        }
    }

    /// Validate `msg` and write it as one frame.
    pub fn send(&mut self, msg: Message<'_>) -> Result<(), WireError> {
        let frame = Frame::checked(&self.header, msg, self.hash_checked)?;
        self.write(&frame)
    }

    /// Write `Pages` frames with [`FLAG_HASH_CHECKED`] (their CRC leaves out the pages) from
    /// now on, or not. Only for a stream whose memory the destination then verifies by page
    /// hashes; off by default.
    pub fn set_hash_checked_pages(&mut self, on: bool) {
        self.hash_checked = on;
    }

    /// Are `Pages` frames written hash-checked
    /// ([`set_hash_checked_pages`](Self::set_hash_checked_pages))?
    pub fn hash_checked_pages(&self) -> bool {
        self.hash_checked
    }

    /// Write a hash-checked `Pages` frame of `range` whose pages the caller writes itself,
    /// for pages no Rust slice may borrow (memory a running guest writes meanwhile, handed to
    /// the kernel where it lies). `write` gets the writer, the frame's head and its CRC, and
    /// must write the head, then the range's `npages × page_size` bytes of pages, then the
    /// CRC, all of them. Refused before anything is written if the range does not fit the
    /// header, or if hash-checked pages are off (the CRC would have to cover the pages).
    ///
    /// ```
    /// use std::io::Write;
    /// use dirtylog_migrate::wire::{Decoder, Encoder, Message, PageRange, Region, StreamHeader};
    ///
    /// let region = Region { slot: 0, gpa: 0, size: 2 * 4096 };
    /// let header = StreamHeader::new(4096, 1, vec![region])?;
    /// let mut enc = Encoder::new(Vec::new(), header)?;
    /// enc.set_hash_checked_pages(true);
    /// let range = PageRange { slot: 0, first_page: 1, npages: 1 };
    /// enc.send_pages_with(range, |w, head, crc| {
    ///     w.write_all(head)?;
    ///     w.write_all(&[7; 4096])?;
    ///     w.write_all(crc)
    /// })?;
    /// let bytes = enc.into_inner();
    /// let mut dec = Decoder::new(&bytes[..])?;
    /// dec.set_hash_pages(true);
    /// dec.accept_hash_checked(true);
    /// let mut memory = vec![vec![0u8; 2 * 4096]];
    /// match dec.next(&mut memory)? {
    ///     Some(Message::Pages { range: r, data }) => assert!(r == range && data == [7; 4096]),
    ///     other => panic!("{other:?}"),
    /// }
    /// assert_eq!(dec.page_hashes().len(), 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn send_pages_with<F>(&mut self, range: PageRange, write: F) -> Result<(), WireError>
    where
        F: FnOnce(&mut W, &[u8], &[u8]) -> io::Result<()>,
    {
        if !self.hash_checked {
            return Err(WireError::PagesNotHashChecked);
        }
        self.header.check_range(range)?;
        // In range, so at most MAX_GUEST_MEMORY bytes: no overflow.
        let data_len = (range.npages * u64::from(self.header.page_size())) as usize;
        let fixed = Fixed::default().range(range);
        Kind::Pages.check_len((fixed.len + data_len) as u64)?;
        let (head, head_len, crc) = frame_head(Kind::Pages, &fixed, data_len, FLAG_HASH_CHECKED);
        write(&mut self.writer, &head[..head_len], &crc.to_le_bytes())?;
        self.position += (head_len + data_len + 4) as u64;
        Ok(())
    }

    /// Validate and write a `CompressedPages` frame ([`Frame::compressed_pages`]): the pages of
    /// `range`, compressed with `codec` into `data`. The receiver decodes it as
    /// [`Message::Pages`].
    pub fn send_compressed(
        &mut self,
        range: PageRange,
        codec: Codec,
        data: &[u8],
    ) -> Result<(), WireError> {
        let frame = Frame::compressed_pages(&self.header, range, codec, data)?;
        self.write(&frame)
    }

    fn write(&mut self, frame: &Frame<'_>) -> Result<(), WireError> {
        frame.write_to(&mut self.writer)?;
        self.position += frame.wire_len() as u64;
        Ok(())
    }

    /// The stream's header.
    pub fn header(&self) -> &StreamHeader {
        &self.header
    }

    /// Flush the writer, for a buffered one.
    pub fn flush(&mut self) -> Result<(), WireError> {
        Ok(self.writer.flush()?)
    }

    /// Bytes written so far, preamble and header included.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// The writer back.
    pub fn into_inner(self) -> W {
        self.writer
    }
}

/// Where a receiver's `Pages` data lands: one byte slice per region of the header, indexed
/// as [`StreamHeader::regions`]. Each must be exactly its region's size.
pub trait GuestMemoryMut {
    /// The memory of region `index`, or `None` if there is none.
    fn region_mut(&mut self, index: usize) -> Option<&mut [u8]>;

    /// Where the data of a `Pages` frame for `range` goes: the `len` bytes at byte `start` of
    /// region `index`, whose size is `size`. The decoder has checked that the range lies
    /// inside the region. The default slices [`region_mut`](Self::region_mut), which must be
    /// exactly `size` bytes long. Override it to hand out only the range, for example when
    /// several decoders write disjoint ranges of one memory concurrently and must not each
    /// hold the whole region.
    fn range_mut(
        &mut self,
        index: usize,
        size: u64,
        range: PageRange,
        start: usize,
        len: usize,
    ) -> Result<&mut [u8], WireError> {
        match self.region_mut(index) {
            // In bounds: the range was checked against the region, and the region is `size`.
            Some(region) if region.len() as u64 == size => Ok(&mut region[start..start + len]),
            other => Err(WireError::Destination {
                slot: range.slot,
                have: other.map_or(0, |r| r.len() as u64),
                size,
            }),
        }
    }
}

impl<T: AsMut<[u8]>> GuestMemoryMut for [T] {
    fn region_mut(&mut self, index: usize) -> Option<&mut [u8]> {
        self.get_mut(index).map(AsMut::as_mut)
    }
}

impl<T: AsMut<[u8]>> GuestMemoryMut for Vec<T> {
    fn region_mut(&mut self, index: usize) -> Option<&mut [u8]> {
        self.as_mut_slice().region_mut(index)
    }
}

/// No memory at all: for the return channel, where a `Pages` frame is an error.
impl GuestMemoryMut for () {
    fn region_mut(&mut self, _: usize) -> Option<&mut [u8]> {
        None
    }
}

/// The reading half: counts bytes and keeps the running CRC of the current frame.
#[derive(Debug)]
struct Input<R> {
    reader: R,
    position: u64,
    crc: u32,
}

impl<R: Read> Input<R> {
    fn new(reader: R) -> Self {
        Input {
            reader,
            position: 0,
            crc: 0,
        }
    }

    /// Read until `buf` is full or the stream ends; returns the bytes read.
    fn fill(&mut self, buf: &mut [u8]) -> Result<usize, WireError> {
        let mut n = 0;
        while n < buf.len() {
            match self.reader.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.position += n as u64;
        Ok(n)
    }

    fn exact(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), WireError> {
        if self.fill(buf)? < buf.len() {
            return Err(WireError::Truncated {
                offset: self.position,
                what,
            });
        }
        Ok(())
    }

    /// The next frame's type and payload length, checked against the type's bounds; `None`
    /// if the stream ends cleanly before it.
    fn frame_head(&mut self) -> Result<Option<(Kind, usize, u8)>, WireError> {
        let mut head = [0; FRAME_HEAD];
        match self.fill(&mut head)? {
            0 => return Ok(None),
            FRAME_HEAD => {}
            _ => {
                return Err(WireError::Truncated {
                    offset: self.position,
                    what: "frame header",
                })
            }
        }
        let kind = Kind::from_u8(head[0]).ok_or(WireError::UnknownType(head[0]))?;
        let len = u32::from_le_bytes([head[2], head[3], head[4], head[5]]);
        kind.check_len(u64::from(len))?;
        self.crc = crc32c::crc32c(&head);
        Ok(Some((kind, len as usize, head[1])))
    }

    /// Read payload bytes of a `kind` frame into `buf`.
    fn payload(&mut self, buf: &mut [u8], kind: Kind) -> Result<(), WireError> {
        self.exact(buf, kind.name())?;
        self.crc = crc32c::crc32c_append(self.crc, buf);
        Ok(())
    }

    /// Read a `Pages` frame's data into `buf` like [`payload`](Self::payload), in pieces of
    /// at most [`PAGES_PIECE`] bytes, each added to the CRC as soon as it has landed and, with
    /// `hashes`, each page it completes hashed into `hashes` right after, while it is still in
    /// cache. `buf` holds whole pages of `page` bytes.
    fn pages_payload(
        &mut self,
        buf: &mut [u8],
        page: usize,
        mut hashes: Option<&mut Vec<u64>>,
        crc: bool,
    ) -> Result<(), WireError> {
        let page = page.max(1);
        let (mut n, mut hashed) = (0, 0);
        while n < buf.len() {
            let end = buf.len().min(n + PAGES_PIECE);
            match self.reader.read(&mut buf[n..end]) {
                Ok(0) => break,
                Ok(k) => {
                    if crc {
                        self.crc = crc32c::crc32c_append(self.crc, &buf[n..n + k]);
                    }
                    n += k;
                    if let Some(hashes) = hashes.as_deref_mut() {
                        while hashed + page <= n {
                            hashes.push(crate::digest::mem_hash(&buf[hashed..hashed + page]));
                            hashed += page;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.position += n as u64;
        if n < buf.len() {
            return Err(WireError::Truncated {
                offset: self.position,
                what: Kind::Pages.name(),
            });
        }
        Ok(())
    }

    /// Read the frame's CRC and compare it with the running one.
    fn check_crc(&mut self, kind: Kind) -> Result<(), WireError> {
        let mut stored = [0; 4];
        self.exact(&mut stored, kind.name())?;
        let stored = u32::from_le_bytes(stored);
        if stored != self.crc {
            return Err(WireError::Crc {
                frame: kind.name(),
                offset: self.position,
                computed: self.crc,
                stored,
            });
        }
        Ok(())
    }
}

/// The receiving side of a stream. Reuses one buffer for the data of non-`Pages` frames and
/// reads `Pages` data into the destination memory, so steady-state decoding allocates nothing.
/// It issues small reads (frame headers, CRCs): give it a buffered reader. After an error it
/// is out of step with the stream and must be dropped.
#[derive(Debug)]
pub struct Decoder<R> {
    input: Input<R>,
    header: StreamHeader,
    buf: Vec<u8>,
    decompressor: Decompressor,
    /// [`Decoder::set_hash_pages`].
    hash_pages: bool,
    /// The page hashes of the last `Pages` message, with `hash_pages`.
    page_hashes: Vec<u64>,
    /// [`Decoder::accept_hash_checked`].
    accept_hash_checked: bool,
    /// Pages decoded from [`FLAG_HASH_CHECKED`] frames.
    hash_checked_pages: u64,
}

impl<R: Read> Decoder<R> {
    /// Read and validate the preamble and the header frame.
    pub fn new(reader: R) -> Result<Self, WireError> {
        let mut input = Input::new(reader);
        let mut preamble = [0; 12];
        input.exact(&mut preamble, "stream preamble")?;
        let mut magic = [0; 8];
        magic.copy_from_slice(&preamble[..8]);
        if magic != MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        let version = u32::from_le_bytes([preamble[8], preamble[9], preamble[10], preamble[11]]);
        if version != VERSION {
            return Err(WireError::UnsupportedVersion(version));
        }
        let mut buf = Vec::new();
        let header = read_header(&mut input, &mut buf)?;
        Ok(Decoder {
            input,
            header,
            buf,
            decompressor: Decompressor::default(),
            hash_pages: false,
            accept_hash_checked: false,
            hash_checked_pages: 0,
            page_hashes: Vec::new(),
        })
    }

    /// A decoder for a stream without preamble or header: the return channel, whose header
    /// both sides already know.
    pub fn back_channel(reader: R, header: StreamHeader) -> Self {
        Decoder {
            input: Input::new(reader),
            header,
            buf: Vec::new(),
            decompressor: Decompressor::default(),
            hash_pages: false,
            accept_hash_checked: false,
            hash_checked_pages: 0,
            page_hashes: Vec::new(),
        }
    }

    /// Hash every page of each `Pages` message's data with
    /// [`mem_hash`](crate::digest::mem_hash) while decoding it: a piece of at most
    /// [`PAGES_PIECE`] bytes at a time, as soon as it has landed and been added to the CRC,
    /// while it is still in cache (a compressed frame's pages right after decompression). The
    /// hashes of the last `Pages` message are then [`page_hashes`](Self::page_hashes). Off by
    /// default.
    pub fn set_hash_pages(&mut self, on: bool) {
        self.hash_pages = on;
        self.page_hashes.clear();
    }

    /// Accept `Pages` frames with [`FLAG_HASH_CHECKED`], whose CRC leaves out the pages, while
    /// [`set_hash_pages`](Self::set_hash_pages) is on (refused otherwise, as any other flag
    /// is): the caller takes on checking those pages by their [`page_hashes`](Self::page_hashes)
    /// (as the receiving engine does against the source's digest). Off by default.
    pub fn accept_hash_checked(&mut self, on: bool) {
        self.accept_hash_checked = on;
    }

    /// Pages decoded so far from [`FLAG_HASH_CHECKED`] frames: pages no CRC has checked.
    pub fn hash_checked_pages(&self) -> u64 {
        self.hash_checked_pages
    }

    /// With [`set_hash_pages`](Self::set_hash_pages) on, the hash of each page of the last
    /// message [`next`](Self::next) returned if it was `Pages` (in page order, one per page of
    /// its range); empty otherwise.
    pub fn page_hashes(&self) -> &[u64] {
        &self.page_hashes
    }

    /// The stream's header.
    pub fn header(&self) -> &StreamHeader {
        &self.header
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> u64 {
        self.input.position
    }

    /// The next message, or `None` if the stream ends cleanly between frames (whether that is
    /// acceptable before [`Message::Done`] is for the caller to decide).
    ///
    /// A `Pages` frame's range is validated before its data is read straight into `memory`;
    /// the returned `data` is that destination. Its CRC is checked after: if that fails the
    /// destination holds unverified bytes and the migration must not resume the guest.
    ///
    /// A `CompressedPages` frame comes out as `Pages`: its range, codec and length are checked
    /// first, its data read into the decoder's buffer and its CRC checked, then it is
    /// decompressed straight into `memory` (through the same
    /// [`range_mut`](GuestMemoryMut::range_mut)); data that does not decompress to exactly the
    /// range fails with [`WireError::Decompress`], the range holding unspecified bytes.
    pub fn next<'a, M>(&'a mut self, memory: &'a mut M) -> Result<Option<Message<'a>>, WireError>
    where
        M: GuestMemoryMut + ?Sized,
    {
        self.page_hashes.clear();
        let Some((kind, len, flags)) = self.input.frame_head()? else {
            return Ok(None);
        };
        let hash_checked = flags == FLAG_HASH_CHECKED
            && kind == Kind::Pages
            && self.accept_hash_checked
            && self.hash_pages;
        if flags != 0 && !hash_checked {
            return Err(WireError::Flags {
                frame: kind.name(),
                flags,
            });
        }
        let mut fixed = [0; FIXED_MAX];
        let fixed = &mut fixed[..kind.layout().0];
        self.input.payload(fixed, kind)?;
        let data_len = len - fixed.len();
        if kind == Kind::CompressedPages {
            return self.compressed(fixed, data_len, memory).map(Some);
        }
        let data = if kind == Kind::Pages {
            let range = Fields(fixed).range();
            let index = self.header.check_pages(range, data_len)?;
            let data = destination(&self.header, memory, index, range)?;
            let page = self.header.page_size() as usize;
            let hashes = self.hash_pages.then_some(&mut self.page_hashes);
            self.input
                .pages_payload(data, page, hashes, !hash_checked)?;
            if hash_checked {
                self.hash_checked_pages += range.npages;
            }
            data
        } else {
            self.buf.resize(data_len, 0);
            self.input.payload(&mut self.buf, kind)?;
            &mut self.buf[..]
        };
        self.input.check_crc(kind)?;
        let msg = decode_fields(kind, fixed, data)?;
        self.header.validate(&msg)?;
        Ok(Some(msg))
    }

    /// The rest of a `CompressedPages` frame, after its fixed fields: see [`Decoder::next`].
    fn compressed<'a, M>(
        &'a mut self,
        fixed: &[u8],
        len: usize,
        memory: &'a mut M,
    ) -> Result<Message<'a>, WireError>
    where
        M: GuestMemoryMut + ?Sized,
    {
        let kind = Kind::CompressedPages;
        let mut f = Fields(fixed);
        let range = f.range();
        let (index, codec, _) = self.header.check_compressed(range, f.u32(), len)?;
        self.buf.resize(len, 0);
        self.input.payload(&mut self.buf, kind)?;
        self.input.check_crc(kind)?;
        let out = destination(&self.header, memory, index, range)?;
        self.decompressor
            .decompress(codec, &self.buf, out)
            .map_err(|source| WireError::Decompress {
                range,
                codec,
                source,
            })?;
        if self.hash_pages {
            let page = self.header.page_size() as usize;
            let hashes = out.chunks(page).map(crate::digest::mem_hash);
            self.page_hashes.extend(hashes);
        }
        Ok(Message::Pages { range, data: out })
    }

    /// The reader back.
    pub fn into_inner(self) -> R {
        self.input.reader
    }

    /// The reader, to change its settings (a timeout) between frames; reading from it
    /// directly puts the decoder out of step with the stream.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.input.reader
    }
}

/// Read the header frame that follows the preamble.
fn read_header<R: Read>(
    input: &mut Input<R>,
    buf: &mut Vec<u8>,
) -> Result<StreamHeader, WireError> {
    let Some((kind, len, flags)) = input.frame_head()? else {
        return Err(WireError::Truncated {
            offset: input.position,
            what: "stream header",
        });
    };
    if flags != 0 {
        return Err(WireError::Flags {
            frame: kind.name(),
            flags,
        });
    }
    if kind != Kind::Header {
        return Err(WireError::UnexpectedFrame {
            found: kind.name(),
            expected: "the header frame",
        });
    }
    buf.resize(len, 0);
    input.payload(buf, kind)?;
    input.check_crc(kind)?;
    let (fixed, entries) = buf.split_at(kind.layout().0);
    StreamHeader::decode(fixed, entries)
}

/// The bytes of `range` in `memory`, through [`GuestMemoryMut::range_mut`].
fn destination<'m, M: GuestMemoryMut + ?Sized>(
    header: &StreamHeader,
    memory: &'m mut M,
    index: usize,
    range: PageRange,
) -> Result<&'m mut [u8], WireError> {
    let size = header.regions()[index].size;
    // In range, so below MAX_GUEST_MEMORY: no overflow, and it fits in usize on 64-bit hosts.
    let page_size = u64::from(header.page_size());
    let start = (range.first_page * page_size) as usize;
    let len = (range.npages * page_size) as usize;
    memory.range_mut(index, size, range, start, len)
}
