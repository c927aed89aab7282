//! What can be wrong with a migration stream.

use std::io;

use super::{
    PageRange, MAX_CONNECTIONS, MAX_GUEST_MEMORY, MAX_PAGES_BYTES, MAX_PAGE_SIZE, MAX_REGIONS,
    MAX_VCPUS, MIN_PAGE_SIZE, VERSION,
};
use crate::compress::{Codec, CompressError};

/// An error encoding or decoding a migration stream. Each message says what was wrong and,
/// for input, where.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The underlying reader or writer failed (a read or write that timed out says so, not
    /// "os error 11").
    #[error("I/O error: {}", io_message(.0))]
    Io(#[from] io::Error),
    /// The stream ended in the middle of something; a stream that ends between two frames is
    /// not an error (see [`Decoder::next`](super::Decoder::next)).
    #[error("stream truncated at byte {offset}: incomplete {what}")]
    Truncated {
        /// Bytes read before the end of the stream.
        offset: u64,
        /// What was being read: the preamble, a frame header or a named frame.
        what: &'static str,
    },
    /// The stream does not start with [`MAGIC`](super::MAGIC).
    #[error("bad magic {magic:02x?}: not a dirtylog migration stream{hint}", magic = .0, hint = tls_hint(.0[0]))]
    BadMagic([u8; 8]),
    /// The stream's version is not [`VERSION`](super::VERSION).
    #[error("unsupported stream version {0} (this build speaks version {VERSION})")]
    UnsupportedVersion(u32),
    /// The header's page size is not a power of two in the supported range.
    #[error("page size {0} is not a power of two between {MIN_PAGE_SIZE} and {MAX_PAGE_SIZE}")]
    PageSize(u32),
    /// The header's vCPU count is zero or above [`MAX_VCPUS`](super::MAX_VCPUS).
    #[error("vCPU count {0} is outside 1..={MAX_VCPUS}")]
    VcpuCount(u32),
    /// The memory map has more than [`MAX_REGIONS`](super::MAX_REGIONS) regions.
    #[error("memory map has {0} regions, more than the limit of {MAX_REGIONS}")]
    TooManyRegions(usize),
    /// A region of the memory map is empty, unaligned or wraps the address space.
    #[error("region slot {slot} (gpa {gpa:#x}, size {size:#x}) {why}")]
    BadRegion {
        /// The region's slot id.
        slot: u32,
        /// The region's guest physical address.
        gpa: u64,
        /// The region's size in bytes.
        size: u64,
        /// What is wrong with it.
        why: &'static str,
    },
    /// Two regions of the memory map have the same slot id.
    #[error("slot {0} appears twice in the memory map")]
    DuplicateSlot(u32),
    /// Two regions of the memory map overlap in guest physical memory.
    #[error("regions slot {0} and slot {1} overlap")]
    OverlappingRegions(u32, u32),
    /// The memory map adds up to more than [`MAX_GUEST_MEMORY`](super::MAX_GUEST_MEMORY).
    #[error("total guest memory of {0} bytes exceeds the limit of {MAX_GUEST_MEMORY} bytes")]
    TooMuchMemory(u64),
    /// A frame's type byte is not one this version defines.
    #[error("unknown frame type {kind}{hint}", kind = .0, hint = tls_hint(*.0))]
    UnknownType(u8),
    /// A known frame where the stream needs another: a header mid-stream, or a message first.
    #[error("unexpected {found}: expected {expected}")]
    UnexpectedFrame {
        /// The frame found.
        found: &'static str,
        /// What the stream needs at this point.
        expected: &'static str,
    },
    /// A frame sets flags it may not: version 5 defines only `FLAG_HASH_CHECKED` (0x01), on
    /// `Pages` frames, for a decoder that accepts it.
    #[error(
        "{frame} has flags {flags:#04x}; version {VERSION} allows only 0x01 (pages checked by \
         their hashes), on Pages frames, where the receiver accepts it"
    )]
    Flags {
        /// The frame.
        frame: &'static str,
        /// The flags byte.
        flags: u8,
    },
    /// A frame's payload length is impossible for its type. Checked before anything is
    /// allocated or read.
    #[error("{frame} payload of {len} bytes is outside the allowed {min}..={max}")]
    Length {
        /// The frame.
        frame: &'static str,
        /// The payload length declared (decoding) or needed (encoding).
        len: u64,
        /// The smallest payload of this type.
        min: u64,
        /// The largest payload of this type.
        max: u64,
    },
    /// The header frame's region count disagrees with its length.
    #[error("header declares {declared} regions but carries {bytes} bytes of region entries")]
    RegionCount {
        /// The region count the header declares.
        declared: u32,
        /// Bytes of region entries it carries (20 per region).
        bytes: usize,
    },
    /// A frame's CRC32C does not match its contents.
    #[error(
        "CRC mismatch in {frame} ending at byte {offset}: computed {computed:#010x}, \
         frame carries {stored:#010x}"
    )]
    Crc {
        /// The frame.
        frame: &'static str,
        /// Stream offset just past the frame.
        offset: u64,
        /// CRC32C of what was received.
        computed: u32,
        /// CRC32C the frame carries.
        stored: u32,
    },
    /// A range, hash or destination names a slot that the memory map lacks.
    #[error("range names slot {0}, which is not in the memory map")]
    UnknownSlot(u32),
    /// A range of zero pages.
    #[error("range slot {slot} at page {first_page} is empty")]
    EmptyRange {
        /// The range's slot id.
        slot: u32,
        /// The range's first page.
        first_page: u64,
    },
    /// A range that does not fit in its region.
    #[error(
        "range slot {slot} pages {first_page}..{end} is past the end of the region \
         ({region_pages} pages)"
    )]
    RangePastEnd {
        /// The range's slot id.
        slot: u32,
        /// The range's first page.
        first_page: u64,
        /// One past its last page (wide enough never to overflow).
        end: u128,
        /// Pages in the region.
        region_pages: u64,
    },
    /// A `Pages` frame whose data is not exactly its pages.
    #[error(
        "Pages frame for {npages} pages of {page_size} bytes carries {data_len} bytes of data"
    )]
    PagesLength {
        /// Pages in the range.
        npages: u64,
        /// The stream's page size.
        page_size: u32,
        /// Bytes of page data.
        data_len: usize,
    },
    /// [`Encoder::send_pages_with`](super::Encoder::send_pages_with) on an encoder whose
    /// `Pages` frames are not hash-checked: their CRC would have to cover the pages.
    #[error(
        "pages written by the caller need hash-checked Pages frames (the CRC cannot cover them)"
    )]
    PagesNotHashChecked,
    /// A `VcpuState` frame for a vCPU the stream does not have.
    #[error("vCPU id {id} is out of range (the stream has {count} vCPUs)")]
    VcpuId {
        /// The vCPU id.
        id: u32,
        /// vCPUs in the stream header.
        count: u32,
    },
    /// A range that the receiver has already been sent in the current round (or that another
    /// connection is writing): every page travels at most once per round.
    #[error(
        "range slot {slot} pages {first_page}..{end} overlaps pages already received this round"
    )]
    Overlap {
        /// The range's slot id.
        slot: u32,
        /// The range's first page.
        first_page: u64,
        /// One past its last page.
        end: u64,
    },
    /// A `Hello` frame whose connection index or count is impossible.
    #[error(
        "Hello frame for connection {connection} of {connections}: the count must be \
         1..={MAX_CONNECTIONS} and the index below it"
    )]
    Connection {
        /// The connection index declared.
        connection: u32,
        /// The connection count declared.
        connections: u32,
    },
    /// A `Prepare` frame with a verify mode this build does not know.
    #[error("Prepare frame with unknown verify mode {0}")]
    ResumeMode(u32),
    /// An `Error` frame's message is not UTF-8.
    #[error("Error frame message is not valid UTF-8")]
    Utf8,
    /// A `Device` frame's name is empty, too long, or has a character outside ASCII
    /// letters, digits and `-_.:/`.
    #[error("device name {name:?} {why}")]
    DeviceName {
        /// The name (lossily decoded, at most 64 bytes of it).
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A `Device` frame's name length is longer than the limit or than its data.
    #[error("Device frame declares a name of {len} bytes; at most {max} fit")]
    DeviceNameLength {
        /// The name length declared.
        len: usize,
        /// The most it may be here.
        max: usize,
    },
    /// A device's state is longer than [`MAX_DEVICE_STATE`](super::MAX_DEVICE_STATE).
    #[error("device state of {len} bytes exceeds the limit of {max} bytes")]
    DeviceStateTooLarge {
        /// The state's length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A `CompressedPages` frame names a codec this build does not know.
    #[error("CompressedPages frame with unknown codec {0}")]
    UnknownCodec(u32),
    /// A `CompressedPages` frame for more pages than a `Pages` frame may carry
    /// ([`MAX_PAGES_BYTES`](super::MAX_PAGES_BYTES)).
    #[error(
        "CompressedPages frame for {npages} pages of {page_size} bytes: more than \
         {MAX_PAGES_BYTES} bytes once decompressed"
    )]
    CompressedRange {
        /// Pages in the range.
        npages: u64,
        /// The stream's page size.
        page_size: u32,
    },
    /// A `CompressedPages` frame whose data is empty or longer than its codec can produce
    /// from its pages.
    #[error(
        "CompressedPages frame for {raw} bytes of pages carries {len} bytes of {codec} data; \
         1..={max} bytes fit"
    )]
    CompressedLength {
        /// The codec.
        codec: Codec,
        /// Bytes of the pages once decompressed.
        raw: usize,
        /// Bytes of compressed data.
        len: usize,
        /// The codec's bound for `raw` bytes.
        max: usize,
    },
    /// A `CompressedPages` frame's data (its CRC correct) does not decompress to exactly its
    /// pages. The destination range holds unspecified bytes.
    #[error(
        "CompressedPages frame for slot {} pages {}..{}: its {codec} data is bad: {source}",
        range.slot,
        range.first_page,
        u128::from(range.first_page) + u128::from(range.npages)
    )]
    Decompress {
        /// The frame's range.
        range: PageRange,
        /// The codec.
        codec: Codec,
        /// What the codec said.
        #[source]
        source: CompressError,
    },
    /// The receiver's memory for a region is missing or not the region's size.
    #[error("destination memory for slot {slot} is {have} bytes; the region is {size} bytes")]
    Destination {
        /// The region's slot id.
        slot: u32,
        /// Bytes of destination memory supplied (0 if none).
        have: u64,
        /// The region's size.
        size: u64,
    },
}

/// An I/O error for people: a socket timeout (`EAGAIN`/`ETIMEDOUT` from a read or write with a
/// timeout set) is named as one.
fn io_message(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            "timed out: the peer sent or took nothing within the I/O timeout".to_string()
        }
        _ => e.to_string(),
    }
}

/// What a first byte that is a TLS record type means here: the peer speaks TLS and this side
/// does not (22: a handshake; 21: an alert, such as a TLS receiver refusing a plain sender).
fn tls_hint(first: u8) -> &'static str {
    match first {
        22 | 21 => {
            " (the peer speaks TLS and this side does not: give both sides the same \
             --tls-cert/--tls-key/--tls-ca or --psk-file options)"
        }
        _ => "",
    }
}
