//! The decoder's page hashes (`Decoder::set_hash_pages`): one `mem_hash` per page of every
//! `Pages` message, plain or compressed, whatever pieces the reader hands out; none when off
//! or for other messages; and a corrupted frame is still refused.

use std::io::Read;

use dirtylog_migrate::compress::{Compression, Compressor};
use dirtylog_migrate::digest::mem_hash;
use dirtylog_migrate::wire::{
    Decoder, Encoder, Message, PageRange, Region, StreamHeader, WireError, MAX_PAGES_BYTES,
    PAGES_PIECE,
};

const PAGE: usize = 4096;
const NPAGES: usize = 8192;

fn header() -> StreamHeader {
    let regions = vec![Region {
        slot: 3,
        gpa: 0,
        size: (NPAGES * PAGE) as u64,
    }];
    StreamHeader::new(PAGE as u32, 1, regions).unwrap()
}

/// Guest memory whose every page differs (and is compressible: runs of one byte).
fn guest() -> Vec<u8> {
    (0..NPAGES * PAGE)
        .map(|i| ((i / PAGE) as u8) ^ ((i / 512) as u8).rotate_left(3))
        .collect()
}

/// A reader that returns at most `step` bytes per `read`, odd sizes that split pages.
struct Trickle<'a> {
    bytes: &'a [u8],
    step: usize,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.step).min(self.bytes.len());
        buf[..n].copy_from_slice(&self.bytes[..n]);
        self.bytes = &self.bytes[n..];
        Ok(n)
    }
}

/// (first page, pages) of the plain frames: small, one page, larger than a piece, the most a
/// frame may carry.
const FRAMES: [(usize, usize); 4] = [
    (5, 3),
    (100, 1),
    (200, PAGES_PIECE / PAGE * 2 + 7),
    (4096, MAX_PAGES_BYTES / PAGE),
];

fn stream(guest: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut enc = Encoder::new(&mut out, header()).unwrap();
    for (first, n) in FRAMES {
        let range = PageRange {
            slot: 3,
            first_page: first as u64,
            npages: n as u64,
        };
        let data = &guest[first * PAGE..(first + n) * PAGE];
        enc.send(Message::Pages { range, data }).unwrap();
        enc.send(Message::RoundEnd {
            round: 0,
            dirty_pages: 0,
        })
        .unwrap();
    }
    // A compressed frame decodes as Pages too.
    let mut c = Compressor::new(Compression::Lz4).unwrap();
    let data = &guest[1000 * PAGE..1040 * PAGE];
    let packed = c
        .compress(data)
        .unwrap()
        .expect("the pages shrink")
        .to_vec();
    let range = PageRange {
        slot: 3,
        first_page: 1000,
        npages: 40,
    };
    enc.send_compressed(range, Compression::Lz4.codec(), &packed)
        .unwrap();
    enc.send(Message::Done).unwrap();
    out
}

/// Decode `bytes`; the page hashes of each message (empty for non-Pages).
fn decode(bytes: &[u8], step: usize, hash: bool) -> Result<Vec<Vec<u64>>, WireError> {
    let mut dec = Decoder::new(Trickle { bytes, step })?;
    dec.set_hash_pages(hash);
    let mut memory = vec![vec![0u8; NPAGES * PAGE]];
    let mut seen = Vec::new();
    loop {
        let done = match dec.next(&mut memory)? {
            Some(Message::Pages { range, data }) => {
                assert_eq!(data.len() as u64, range.npages * PAGE as u64);
                false
            }
            Some(Message::Done) | None => true,
            Some(_) => false,
        };
        seen.push(dec.page_hashes().to_vec());
        if done {
            return Ok(seen);
        }
    }
}

#[test]
fn every_page_is_hashed_as_it_lands() {
    let guest = guest();
    let bytes = stream(&guest);
    let hashes = |first: usize, n: usize| -> Vec<u64> {
        guest[first * PAGE..(first + n) * PAGE]
            .chunks(PAGE)
            .map(mem_hash)
            .collect()
    };
    let mut expected = Vec::new();
    for (first, n) in FRAMES {
        expected.push(hashes(first, n));
        expected.push(Vec::new()); // RoundEnd
    }
    expected.push(hashes(1000, 40));
    expected.push(Vec::new()); // Done
    for step in [usize::MAX, PAGES_PIECE, 65_537, 4095, 1000] {
        assert_eq!(
            decode(&bytes, step, true).unwrap(),
            expected,
            "reads of {step}"
        );
        let off = decode(&bytes, step, false).unwrap();
        assert!(off.iter().all(Vec::is_empty), "no hashes when off");
    }
}

#[test]
fn a_corrupted_pages_frame_is_still_refused() {
    let guest = guest();
    let mut bytes = stream(&guest);
    // A byte of the first frame's page data: preamble 12, header frame 6 + 12 + 20 + 4,
    // then the Pages frame's head 6 and fixed fields 20.
    let at = 12 + 6 + 12 + 20 + 4 + 6 + 20 + 100;
    bytes[at] ^= 1;
    match decode(&bytes, 4095, true) {
        Err(WireError::Crc { .. }) => {}
        other => panic!("expected a CRC error, got {other:?}"),
    }
}
