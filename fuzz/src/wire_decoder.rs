//! `wire_decoder`: a valid preamble and header (a small memory map chosen by the first
//! bytes), then the fuzzer's bytes — as they are, or cut into frames whose CRCs are right
//! (and `CompressedPages` frames with really compressed data, and hash-checked `Pages`
//! frames) — into `Decoder::next` over a `Vec` per region, with or without page hashing and
//! hash-checked frames accepted.
//!
//! Oracle: no panic; every message returned satisfies the header's bounds (ranges inside
//! their region, data exactly the pages and the bytes now in memory, vCPU ids, slots,
//! connections, device names, lengths); with page hashing, a `Pages` message's hashes are
//! its pages'; and the encoder accepts it and, for every frame but `CompressedPages`, writes
//! back exactly the bytes decoded (hash-checked frames as hash-checked).

use dirtylog_migrate::digest::mem_hash;
use dirtylog_migrate::wire::{
    check_device, Decoder, Encoder, Message, PageRange, StreamHeader, FLAG_HASH_CHECKED,
    MAX_CONNECTIONS, MAX_ERROR_MESSAGE, MAX_VCPU_BLOB, VERIFY_STRICT,
};

use crate::frames::{self, kind};
use crate::packed::{self, Pattern};

/// Most messages decoded from one input.
const MAX_MESSAGES: usize = 4096;
/// The "compressed pages, done right" pseudo frame type of the framed mode.
const COMPRESS: u8 = 0xf0;
/// The "hash-checked pages" pseudo frame type of the framed mode.
const HASHED: u8 = 0xf1;

/// Run one input.
pub fn run(data: &[u8]) {
    let Some((head, rest)) = data.split_first_chunk::<5>() else {
        return;
    };
    let header = frames::small_header([head[0], head[1], head[2], head[3]]);
    let mut stream = frames::stream_start(&header);
    let body_at = stream.len();
    if head[4] & 1 == 0 {
        stream.extend_from_slice(rest);
    } else {
        framed(&mut stream, &header, rest);
    }
    let mut memory: Vec<Vec<u8>> = header
        .regions()
        .iter()
        .map(|r| vec![0u8; r.size as usize])
        .collect();
    let mut decoder = match Decoder::new(&stream[..]) {
        Ok(d) => d,
        Err(e) => panic!("a valid preamble and header refused: {e}"),
    };
    // Bit 1: hash pages and accept hash-checked frames, as the receiving engine does.
    let hashing = head[4] & 2 != 0;
    decoder.set_hash_pages(hashing);
    decoder.accept_hash_checked(hashing);
    assert_eq!(decoder.header(), &header);
    assert_eq!(decoder.position(), body_at as u64);
    for _ in 0..MAX_MESSAGES {
        let start = decoder.position() as usize;
        let frame_kind = stream.get(start).copied();
        let flagged = stream.get(start + 1) == Some(&FLAG_HASH_CHECKED);
        let (reencoded, pages) = match decoder.next(&mut memory) {
            Ok(None) | Err(_) => return,
            Ok(Some(msg)) => check(&header, &msg, flagged),
        };
        let end = decoder.position() as usize;
        assert!(
            end > start && end <= stream.len(),
            "position {start} -> {end}"
        );
        if let Some((index, at, bytes)) = pages {
            assert_eq!(
                &memory[index][at..at + bytes.len()],
                &bytes[..],
                "Pages data is not the destination memory"
            );
            if hashing {
                let page = header.page_size() as usize;
                let want: Vec<u64> = bytes.chunks(page).map(mem_hash).collect();
                assert_eq!(decoder.page_hashes(), &want[..], "page hashes");
            }
        }
        if frame_kind != Some(kind::COMPRESSED_PAGES) {
            assert_eq!(
                reencoded,
                stream[start..end],
                "decoded then re-encoded frame differs"
            );
        }
    }
}

/// Check a decoded message against the header; returns it re-encoded by the real encoder,
/// and for `Pages`, where its data lies and a copy of it.
#[allow(clippy::type_complexity)]
fn check(
    header: &StreamHeader,
    msg: &Message<'_>,
    flagged: bool,
) -> (Vec<u8>, Option<(usize, usize, Vec<u8>)>) {
    let page = u64::from(header.page_size());
    let in_map = |range: PageRange| match header.check_range(range) {
        Ok(index) => index,
        Err(e) => panic!("decoded {msg:?} outside the map: {e}"),
    };
    let mut pages = None;
    match *msg {
        Message::Pages { range, data } => {
            let index = in_map(range);
            assert_eq!(data.len() as u64, range.npages * page, "{range:?}");
            pages = Some((index, (range.first_page * page) as usize, data.to_vec()));
        }
        Message::ZeroPages(range) => {
            in_map(range);
        }
        Message::VcpuState { vcpu_id, blob } => {
            assert!(vcpu_id < header.vcpu_count(), "vCPU {vcpu_id}");
            assert!(blob.len() <= MAX_VCPU_BLOB);
        }
        Message::MemHash { slot, .. } => {
            assert!(header.region(slot).is_ok(), "MemHash of slot {slot}");
        }
        Message::Error { message, .. } => assert!(message.len() <= MAX_ERROR_MESSAGE),
        Message::Hello {
            connection,
            connections,
            ..
        } => assert!((1..=MAX_CONNECTIONS).contains(&connections) && connection < connections),
        Message::Device { name, bytes, .. } => {
            assert!(
                check_device(name.as_bytes(), bytes.len()).is_ok(),
                "{name:?}"
            )
        }
        Message::Prepare { verify } => assert!(verify <= VERIFY_STRICT),
        Message::RoundEnd { .. }
        | Message::Prepared
        | Message::Commit
        | Message::Done
        | Message::Ack { .. }
        | Message::Cancel
        | Message::Resumed { .. } => {}
    }
    let mut out = Vec::new();
    let mut encoder = Encoder::back_channel(&mut out, header.clone());
    encoder.set_hash_checked_pages(flagged);
    if let Err(e) = encoder.send(*msg) {
        panic!("the decoder accepted {msg:?}, the encoder refuses it: {e}");
    }
    (out, pages)
}

/// The framed mode: `kind u8 | len u16 | payload[len]` records become frames with a right
/// CRC; a record of kind [`COMPRESS`] (`slot-index u8 | first u8 | npages u8 | codec u8 |
/// seed u8`) becomes a `CompressedPages` frame of really compressed pages, one of kind
/// [`HASHED`] a `Pages` frame with `FLAG_HASH_CHECKED` and its (head-only) CRC.
fn framed(stream: &mut Vec<u8>, header: &StreamHeader, mut rest: &[u8]) {
    while let Some((&[k, l0, l1], tail)) = rest.split_first_chunk::<3>() {
        if k == COMPRESS {
            let Some((&[r, first, npages, codec, seed], tail)) = tail.split_first_chunk::<5>()
            else {
                return;
            };
            compressed(stream, header, [r, first, npages, codec, seed]);
            rest = tail;
            continue;
        }
        let len = usize::from(u16::from_le_bytes([l0, l1])).min(tail.len());
        if k == HASHED {
            frames::hash_checked_frame(stream, &tail[..len]);
        } else {
            frames::raw_frame(stream, k, &tail[..len]);
        }
        rest = &tail[len..];
    }
}

/// A `CompressedPages` frame whose data decompresses to pages made from `seed`.
fn compressed(stream: &mut Vec<u8>, header: &StreamHeader, f: [u8; 5]) {
    let regions = header.regions();
    let region = regions[usize::from(f[0]) % regions.len()];
    let page = u64::from(header.page_size());
    let range = PageRange {
        slot: region.slot,
        first_page: u64::from(f[1] % 20),
        npages: u64::from(f[2] % 20),
    };
    let len = (range.npages * page) as usize;
    let packed = packed::compressed(Pattern::Wire, f[3] & 1 != 0, f[4], len, || {
        pattern(f[4], len)
    });
    let Some(packed) = packed else {
        return;
    };
    // Sometimes lie: drop the last byte, so the data does not decompress to the range.
    let packed = if f[3] & 2 != 0 && !packed.is_empty() {
        &packed[..packed.len() - 1]
    } else {
        &packed[..]
    };
    frames::push_compressed(stream, header, range, packed::codec(f[3] & 1 != 0), packed);
}

/// `len` bytes: byte `i` is `seed ^ i` in every third run of 64 bytes, else 0 — a pattern of
/// period 768 (a multiple of 256 and of 3 × 64), made once and copied. Made byte by byte,
/// its comparisons (each a coverage-tracing call) were most of a run.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    let mut period = [0u8; 768];
    for (run, bytes) in period.chunks_exact_mut(64).enumerate().step_by(3) {
        let base = seed ^ ((run * 64) as u8);
        for (k, b) in bytes.iter_mut().enumerate() {
            *b = base ^ k as u8;
        }
    }
    let mut raw = Vec::with_capacity(len);
    while raw.len() < len {
        let n = (len - raw.len()).min(period.len());
        raw.extend_from_slice(&period[..n]);
    }
    raw
}

#[cfg(test)]
mod tests {
    /// The copied period is the pattern its definition gives, byte for byte.
    #[test]
    fn pattern_is_its_definition() {
        for seed in [0u8, 1, 0x7f, 0xff] {
            for len in [0, 1, 64, 767, 768, 769, 19 * 8192] {
                let want: Vec<u8> = (0..len)
                    .map(|i| {
                        if (i / 64) % 3 == 0 {
                            seed ^ (i as u8)
                        } else {
                            0
                        }
                    })
                    .collect();
                assert!(super::pattern(seed, len) == want, "seed {seed} len {len}");
            }
        }
    }
}
