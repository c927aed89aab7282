//! Building streams for the targets: the preamble and header through the real `Encoder`, and
//! frames with a right CRC whatever their content — through the `Encoder` when it accepts the
//! message, by hand (the same layout) when it refuses it, so that the receiver's own checks
//! are what stops a bad message, not the CRC.

use dirtylog_migrate::compress::Codec;
use dirtylog_migrate::wire::{Encoder, Message, PageRange, Region, StreamHeader};

/// Frame type ids of the wire format (version 4, with `Prepare`/`Prepared`/`Commit`).
pub mod kind {
    /// `Pages`.
    pub const PAGES: u8 = 2;
    /// `CompressedPages`.
    pub const COMPRESSED_PAGES: u8 = 15;
}

/// The preamble and header frame of a stream with `header`.
pub fn stream_start(header: &StreamHeader) -> Vec<u8> {
    let mut out = Vec::new();
    // Writing to a Vec cannot fail; the header is valid by construction.
    let _ = Encoder::new(&mut out, header.clone());
    out
}

/// A frame of type `kind` with `payload` and its right CRC, whatever the payload says.
pub fn raw_frame(out: &mut Vec<u8>, kind: u8, payload: &[u8]) {
    frame(out, kind, 0, payload, payload.len());
}

/// A `Pages` frame with `FLAG_HASH_CHECKED` and `payload`: its CRC covers the head and the
/// first 20 bytes (the fixed fields, or what there is of them), as the flag says.
pub fn hash_checked_frame(out: &mut Vec<u8>, payload: &[u8]) {
    let flag = dirtylog_migrate::wire::FLAG_HASH_CHECKED;
    frame(out, kind::PAGES, flag, payload, payload.len().min(20));
}

/// A frame of `kind` with `flags` and `payload`, its CRC over the head and the first
/// `crc_len` bytes of the payload.
fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, payload: &[u8], crc_len: usize) {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    let mut head = [0u8; 6];
    head[0] = kind;
    head[1] = flags;
    head[2..].copy_from_slice(&len.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&head), &payload[..crc_len]);
    out.extend_from_slice(&head);
    out.extend_from_slice(payload);
    out.extend_from_slice(&crc.to_le_bytes());
}

fn range_bytes(p: &mut Vec<u8>, r: PageRange) {
    p.extend_from_slice(&r.slot.to_le_bytes());
    p.extend_from_slice(&r.first_page.to_le_bytes());
    p.extend_from_slice(&r.npages.to_le_bytes());
}

/// The frame type and payload of `msg`, as the wire format lays them out.
pub fn payload(msg: &Message<'_>) -> (u8, Vec<u8>) {
    let mut p = Vec::new();
    let kind = match *msg {
        Message::Pages { range, data } => {
            range_bytes(&mut p, range);
            p.extend_from_slice(data);
            kind::PAGES
        }
        Message::ZeroPages(range) => {
            range_bytes(&mut p, range);
            3
        }
        Message::RoundEnd { round, dirty_pages } => {
            p.extend_from_slice(&round.to_le_bytes());
            p.extend_from_slice(&dirty_pages.to_le_bytes());
            4
        }
        Message::VcpuState { vcpu_id, blob } => {
            p.extend_from_slice(&vcpu_id.to_le_bytes());
            p.extend_from_slice(blob);
            5
        }
        Message::MemHash { slot, hash } => {
            p.extend_from_slice(&slot.to_le_bytes());
            p.extend_from_slice(&hash.to_le_bytes());
            6
        }
        Message::Done => 7,
        Message::Error { code, message } => {
            p.extend_from_slice(&code.to_le_bytes());
            p.extend_from_slice(message.as_bytes());
            8
        }
        Message::Ack { code } => {
            p.extend_from_slice(&code.to_le_bytes());
            9
        }
        Message::Cancel => 10,
        Message::Hello {
            connection,
            connections,
            session,
        } => {
            p.extend_from_slice(&connection.to_le_bytes());
            p.extend_from_slice(&connections.to_le_bytes());
            p.extend_from_slice(&session.to_le_bytes());
            11
        }
        Message::Device {
            name,
            version,
            bytes,
        } => {
            p.extend_from_slice(&version.to_le_bytes());
            p.extend_from_slice(&(name.len() as u32).to_le_bytes());
            p.extend_from_slice(name.as_bytes());
            p.extend_from_slice(bytes);
            12
        }
        Message::Prepare { verify } => {
            p.extend_from_slice(&verify.to_le_bytes());
            13
        }
        Message::Resumed { resume_us } => {
            p.extend_from_slice(&resume_us.to_le_bytes());
            14
        }
        Message::Prepared => 16,
        Message::Commit => 17,
    };
    (kind, p)
}

/// Append `msg` as one frame: through the real `Encoder` if it accepts it (returns true),
/// else framed by hand with a right CRC (returns false).
pub fn push(out: &mut Vec<u8>, header: &StreamHeader, msg: Message<'_>) -> bool {
    let mut frame = Vec::new();
    if Encoder::back_channel(&mut frame, header.clone())
        .send(msg)
        .is_ok()
    {
        out.extend_from_slice(&frame);
        return true;
    }
    let (kind, p) = payload(&msg);
    raw_frame(out, kind, &p);
    false
}

/// Append a `CompressedPages` frame for `range` with `data` as its compressed bytes: through
/// the real `Encoder` if it accepts it, else by hand.
pub fn push_compressed(
    out: &mut Vec<u8>,
    header: &StreamHeader,
    range: PageRange,
    codec: Codec,
    data: &[u8],
) -> bool {
    let mut frame = Vec::new();
    if Encoder::back_channel(&mut frame, header.clone())
        .send_compressed(range, codec, data)
        .is_ok()
    {
        out.extend_from_slice(&frame);
        return true;
    }
    let mut p = Vec::new();
    range_bytes(&mut p, range);
    p.extend_from_slice(&(codec as u32).to_le_bytes());
    p.extend_from_slice(data);
    raw_frame(out, kind::COMPRESSED_PAGES, &p);
    false
}

/// A small memory layout from a few fuzzer-chosen bytes: page size 4 KiB (or 8 KiB), 1 to 3
/// regions of 1 to 8 pages at distinct slots and addresses, 1 to 3 vCPUs. (Up to 8 pages:
/// every case of a range against its region — inside, at either end, past it, empty — is
/// there, and each run moves, hashes and checks at most 192 KiB; at 16 pages the bytes
/// were most of a `receiver_session` run.)
pub fn small_header(shape: [u8; 4]) -> StreamHeader {
    let page = if shape[0] & 0x80 != 0 { 8192u64 } else { 4096 };
    let nregions = 1 + (shape[0] % 3) as usize;
    let vcpus = 1 + u32::from(shape[1] % 3);
    let regions: Vec<Region> = (0..nregions)
        .map(|i| Region {
            // Distinct, and not in index order when shape says so.
            slot: (u32::from(shape[2]) + 7 * i as u32) % 64,
            gpa: (i as u64) << 30,
            size: page * (1 + u64::from(shape[3].rotate_left(3 * i as u32) % 8)),
        })
        .collect();
    let fallback = || {
        StreamHeader::new(
            4096,
            1,
            vec![Region {
                slot: 0,
                gpa: 0,
                size: 4096,
            }],
        )
    };
    match StreamHeader::new(page as u32, vcpus, regions) {
        Ok(h) => h,
        // Slots may collide (mod 64 of a multiple of 7 does not for 3 regions, but be safe).
        Err(_) => fallback().unwrap_or_else(|e| panic!("the fallback header is valid: {e}")),
    }
}
