//! The wire format through its public API: round trips, and every way a stream can be wrong.

use std::cell::RefCell;
use std::io::{self, IoSlice, Write};
use std::sync::OnceLock;

use dirtylog_migrate::digest::mem_hash;
use dirtylog_migrate::wire::{
    Decoder, Encoder, Frame, Message, PageRange, Region, StreamHeader, WireError,
    FLAG_HASH_CHECKED, MAGIC, MAX_DEVICE_STATE, MAX_ERROR_MESSAGE, MAX_REGIONS, MAX_VCPU_BLOB,
};
use proptest::prelude::*;

const PAGE: u64 = 4096;
const FRAME_HEAD: usize = 6;
const PAGES_FIXED: usize = 20;

/// Slot 0: 1024 pages at 0. Slot 5: 16 pages at 4 GiB.
fn header() -> StreamHeader {
    let regions = vec![
        Region {
            slot: 0,
            gpa: 0,
            size: 1024 * PAGE,
        },
        Region {
            slot: 5,
            gpa: 1 << 32,
            size: 16 * PAGE,
        },
    ];
    StreamHeader::new(PAGE as u32, 2, regions).unwrap()
}

fn memory(h: &StreamHeader) -> Vec<Vec<u8>> {
    h.regions()
        .iter()
        .map(|r| vec![0; r.size as usize])
        .collect()
}

/// Guest memory for [`header`], built once, with contents that differ from page to page.
fn guest() -> &'static [Vec<u8>] {
    static GUEST: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    GUEST.get_or_init(|| {
        let mut mem = memory(&header());
        for (i, region) in mem.iter_mut().enumerate() {
            for (page, bytes) in region.chunks_mut(PAGE as usize).enumerate() {
                let seed = (page as u64 * 31 + i as u64 * 7) as u8;
                bytes
                    .iter_mut()
                    .zip((0..=255u8).cycle())
                    .for_each(|(b, j)| *b = seed ^ j);
            }
        }
        mem
    })
}

fn range(slot: u32, first_page: u64, npages: u64) -> PageRange {
    PageRange {
        slot,
        first_page,
        npages,
    }
}

fn pages<'a>(guest: &'a [Vec<u8>], index: usize, r: PageRange) -> Message<'a> {
    let bytes = (r.first_page * PAGE) as usize..((r.first_page + r.npages) * PAGE) as usize;
    Message::Pages {
        range: r,
        data: &guest[index][bytes],
    }
}

/// One message of every type.
fn every_message(guest: &[Vec<u8>]) -> Vec<Message<'_>> {
    vec![
        pages(guest, 0, range(0, 3, 2)),
        pages(guest, 1, range(5, 15, 1)),
        Message::ZeroPages(range(0, 100, 900)),
        Message::RoundEnd {
            round: 7,
            dirty_pages: 1234,
        },
        Message::VcpuState {
            vcpu_id: 1,
            blob: b"registers",
        },
        Message::Device {
            name: "virtio-net:0/rx",
            version: 3,
            bytes: b"queue state",
        },
        Message::Device {
            name: "pit",
            version: 0,
            bytes: b"",
        },
        Message::MemHash {
            slot: 5,
            hash: mem_hash(&guest[1]),
        },
        Message::Error {
            code: 22,
            message: "destination out of memory",
        },
        Message::Ack { code: 0 },
        Message::Cancel,
        Message::Done,
    ]
}

/// A frame of the encoded stream: where it starts and ends, and its type byte.
#[derive(Clone, Copy, Debug)]
struct Span {
    start: usize,
    end: usize,
    ty: u8,
}

/// Encode `msgs` after a header; returns the stream and its frames, header frame first.
fn encode(h: &StreamHeader, msgs: &[Message<'_>]) -> (Vec<u8>, Vec<Span>) {
    let mut enc = Encoder::new(Vec::new(), h.clone()).unwrap();
    let mut spans = vec![Span {
        start: 12,
        end: enc.position() as usize,
        ty: 1,
    }];
    for &m in msgs {
        let start = enc.position() as usize;
        enc.send(m).unwrap();
        spans.push(Span {
            start,
            end: enc.position() as usize,
            ty: 0,
        });
    }
    let stream = enc.into_inner();
    for s in &mut spans {
        s.ty = stream[s.start];
    }
    (stream, spans)
}

/// Decode a whole stream of [`header`], asserting that every message decoded is the one
/// expected; returns how many there were before the stream ended cleanly. The destination
/// memory is reused from call to call, as a receiver would.
fn decode(stream: &[u8], expected: &[Message<'_>]) -> Result<usize, WireError> {
    thread_local! {
        static MEMORY: RefCell<Vec<Vec<u8>>> = RefCell::new(memory(&header()));
    }
    MEMORY.with_borrow_mut(|mem| {
        let mut dec = Decoder::new(stream)?;
        let mut n = 0;
        while let Some(m) = dec.next(mem)? {
            assert_eq!(m, expected[n], "message {n}");
            n += 1;
        }
        Ok(n)
    })
}

/// A raw frame, with a correct CRC, whatever its contents.
fn raw_frame(ty: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![ty, 0];
    f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    f.extend_from_slice(payload);
    let crc = crc32c::crc32c(&f);
    f.extend_from_slice(&crc.to_le_bytes());
    f
}

/// The header's stream followed by `tail`.
fn stream_with(tail: &[u8]) -> Vec<u8> {
    let mut s = encode(&header(), &[]).0;
    s.extend_from_slice(tail);
    s
}

fn next_error(stream: &[u8]) -> WireError {
    let mut dec = Decoder::new(stream).unwrap();
    let mut mem = memory(&header());
    dec.next(&mut mem).unwrap_err()
}

#[test]
fn every_message_type_round_trips() {
    let h = header();
    let g = guest();
    let msgs = every_message(g);
    let (stream, _) = encode(&h, &msgs);

    let mut dec = Decoder::new(stream.as_slice()).unwrap();
    assert_eq!(dec.header(), &h);
    let mut mem = memory(&h);
    for want in &msgs {
        assert_eq!(dec.next(&mut mem).unwrap(), Some(*want));
    }
    assert_eq!(dec.next(&mut mem).unwrap(), None);
    assert_eq!(dec.position(), stream.len() as u64);
    assert_eq!(mem[0][3 * 4096..5 * 4096], g[0][3 * 4096..5 * 4096]);
    assert_eq!(mem[1][15 * 4096..], g[1][15 * 4096..]);
    assert!(mem[0][..3 * 4096].iter().all(|&b| b == 0));
}

#[test]
fn truncation_at_every_offset_is_an_error_unless_between_frames() {
    let h = header();
    let g = guest();
    let msgs = every_message(g);
    let (stream, spans) = encode(&h, &msgs);
    let header_end = spans[0].end;
    for cut in 0..stream.len() {
        let result = decode(&stream[..cut], &msgs);
        match spans.iter().position(|s| s.end == cut) {
            Some(i) if cut >= header_end => assert_eq!(result.unwrap(), i, "cut at {cut}"),
            _ => match result {
                Err(WireError::Truncated { offset, .. }) => assert_eq!(offset, cut as u64),
                other => panic!("cut at {cut}: {other:?}"),
            },
        }
    }
}

#[test]
fn every_flipped_byte_is_rejected() {
    let h = header();
    let g = guest();
    let msgs = every_message(g);
    let (stream, spans) = encode(&h, &msgs);
    for i in 0..stream.len() {
        for mask in [0x01, 0x80, 0xff] {
            let mut bad = stream.clone();
            bad[i] ^= mask;
            let err = decode(&bad, &msgs).unwrap_err();
            let Some(span) = spans.iter().find(|s| (s.start..s.end).contains(&i)) else {
                let preamble_ok = matches!(
                    (i, &err),
                    (0..8, WireError::BadMagic(_)) | (8..12, WireError::UnsupportedVersion(_))
                );
                assert!(preamble_ok, "byte {i}: {err}");
                continue;
            };
            let at = i - span.start;
            let fixed_checked_early = span.ty == 2 && at < FRAME_HEAD + PAGES_FIXED;
            if at == 1 {
                assert!(matches!(err, WireError::Flags { .. }), "byte {i}: {err}");
            } else if at >= FRAME_HEAD && !fixed_checked_early {
                // Payload and CRC bytes: only the CRC can tell.
                assert!(matches!(err, WireError::Crc { .. }), "byte {i}: {err}");
            }
        }
    }
}

#[test]
fn wrong_magic_and_version_are_rejected() {
    let mut s = stream_with(&[]);
    s[0] = b'X';
    let err = Decoder::new(s.as_slice()).unwrap_err();
    assert!(matches!(err, WireError::BadMagic(m) if m[0] == b'X'));

    let mut s = stream_with(&[]);
    // Version 1 had no Device frame, version 2 one hash of the whole region, version 3 a
    // digest of 64-page chunks and no Resume, version 4 no hash-checked pages: refused, as
    // any other version.
    for v in [1u32, 2, 3, 4, 6] {
        s[8..12].copy_from_slice(&v.to_le_bytes());
        let err = Decoder::new(s.as_slice()).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("unsupported stream version {v} (this build speaks version 5)")
        );
    }
    assert_eq!(&s[..8], &MAGIC);
}

/// The switchover frames: `Prepare` carries a known verify mode, `Prepared` and `Commit`
/// nothing, `Resumed` the destination's resume time.
#[test]
fn switchover_frames_round_trip_and_unknown_modes_are_refused() {
    use dirtylog_migrate::wire::{VERIFY_BACKGROUND, VERIFY_NONE, VERIFY_STRICT};
    for msg in [
        Message::Prepare {
            verify: VERIFY_BACKGROUND,
        },
        Message::Prepare {
            verify: VERIFY_NONE,
        },
        Message::Prepare {
            verify: VERIFY_STRICT,
        },
        Message::Prepared,
        Message::Commit,
        Message::Resumed { resume_us: 1234 },
    ] {
        let mut stream = Vec::new();
        let mut enc = Encoder::new(&mut stream, header()).unwrap();
        enc.send(msg).unwrap();
        let mut dec = Decoder::new(stream.as_slice()).unwrap();
        assert_eq!(dec.next(&mut ()).unwrap(), Some(msg));
    }
    let mut stream = Vec::new();
    let mut enc = Encoder::new(&mut stream, header()).unwrap();
    let err = enc.send(Message::Prepare { verify: 3 }).unwrap_err();
    assert_eq!(err.to_string(), "Prepare frame with unknown verify mode 3");
    let err = next_error(&stream_with(&raw_frame(13, &7u32.to_le_bytes())));
    assert_eq!(err.to_string(), "Prepare frame with unknown verify mode 7");
}

#[test]
fn empty_stream_is_truncated() {
    let err = Decoder::new(&[][..]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "stream truncated at byte 0: incomplete stream preamble"
    );
}

fn pages_head(r: PageRange, data_len: usize) -> Vec<u8> {
    let mut f = vec![2, 0];
    f.extend_from_slice(&((PAGES_FIXED + data_len) as u32).to_le_bytes());
    f.extend_from_slice(&r.slot.to_le_bytes());
    f.extend_from_slice(&r.first_page.to_le_bytes());
    f.extend_from_slice(&r.npages.to_le_bytes());
    f
}

#[test]
fn range_past_the_end_is_rejected_on_both_sides() {
    let h = header();
    let data = vec![0; 200 * PAGE as usize];
    let msg = Message::Pages {
        range: range(0, 1000, 200),
        data: &data,
    };
    let want = "range slot 0 pages 1000..1200 is past the end of the region (1024 pages)";
    let err = Encoder::new(io::sink(), h).unwrap().send(msg).unwrap_err();
    assert_eq!(err.to_string(), want);
    // The decoder rejects it from the frame's fixed fields, before reading any data.
    let err = next_error(&stream_with(&pages_head(range(0, 1000, 200), data.len())));
    assert_eq!(err.to_string(), want);
}

#[test]
fn overflowing_and_unknown_ranges_are_rejected() {
    let overflow = Message::ZeroPages(range(0, u64::MAX, 2));
    let err = Encoder::new(io::sink(), header())
        .unwrap()
        .send(overflow)
        .unwrap_err();
    let want = "range slot 0 pages 18446744073709551615..18446744073709551617 is past the end \
                of the region (1024 pages)";
    assert_eq!(err.to_string(), want);

    let err = next_error(&stream_with(&pages_head(range(9, 0, 1), PAGE as usize)));
    assert_eq!(
        err.to_string(),
        "range names slot 9, which is not in the memory map"
    );

    let mut payload = 5u32.to_le_bytes().to_vec();
    payload.extend_from_slice(&16u64.to_le_bytes());
    payload.extend_from_slice(&0u64.to_le_bytes());
    let err = next_error(&stream_with(&raw_frame(3, &payload)));
    assert!(
        matches!(
            err,
            WireError::EmptyRange {
                slot: 5,
                first_page: 16
            }
        ),
        "{err}"
    );
}

#[test]
fn absurd_lengths_fail_before_reading_or_allocating() {
    let header_end = stream_with(&[]).len() as u64;
    for ty in 1..=10u8 {
        let mut head = vec![ty, 0];
        head.extend_from_slice(&u32::MAX.to_le_bytes());
        let stream = stream_with(&head);
        let mut dec = Decoder::new(stream.as_slice()).unwrap();
        let err = dec.next(&mut ()).unwrap_err();
        assert!(
            matches!(
                err,
                WireError::Length {
                    len: 0xffff_ffff,
                    ..
                }
            ),
            "type {ty}: {err}"
        );
        assert_eq!(
            dec.position(),
            header_end + FRAME_HEAD as u64,
            "type {ty} read past its head"
        );
    }
    // The header frame too.
    let mut s = stream_with(&[]);
    s[14..18].copy_from_slice(&u32::MAX.to_le_bytes());
    let err = Decoder::new(s.as_slice()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "header frame payload of 4294967295 bytes is outside the allowed 12..=10252"
    );
}

#[test]
fn unknown_types_flags_and_misplaced_headers_are_rejected() {
    let err = next_error(&stream_with(&raw_frame(18, &[])));
    assert_eq!(err.to_string(), "unknown frame type 18");

    let mut done = raw_frame(7, &[]);
    done[1] = 0x40;
    assert_eq!(
        next_error(&stream_with(&done)).to_string(),
        "Done frame has flags 0x40; version 5 allows only 0x01 (pages checked by their hashes), \
         on Pages frames, where the receiver accepts it"
    );

    let header_frame = stream_with(&[])[12..].to_vec();
    let err = next_error(&stream_with(&header_frame));
    assert_eq!(
        err.to_string(),
        "unexpected header frame: expected a message frame"
    );

    let mut s = stream_with(&[]);
    s.truncate(12);
    s.extend_from_slice(&raw_frame(7, &[]));
    let err = Decoder::new(s.as_slice()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "unexpected Done frame: expected the header frame"
    );
}

#[test]
fn bad_headers_are_rejected() {
    let r = |slot, gpa, size| Region { slot, gpa, size };
    let cases: Vec<(u32, u32, Vec<Region>, &str)> = vec![
        (
            4097,
            1,
            vec![],
            "page size 4097 is not a power of two between 4096 and 2097152",
        ),
        (
            1 << 22,
            1,
            vec![],
            "page size 4194304 is not a power of two between 4096 and 2097152",
        ),
        (4096, 0, vec![], "vCPU count 0 is outside 1..=4096"),
        (
            4096,
            1,
            vec![r(0, 0, 0)],
            "region slot 0 (gpa 0x0, size 0x0) is empty",
        ),
        (
            4096,
            1,
            vec![r(1, 512, 4096)],
            "region slot 1 (gpa 0x200, size 0x1000) is not page-aligned",
        ),
        (
            4096,
            1,
            vec![r(1, 0, 4097)],
            "region slot 1 (gpa 0x0, size 0x1001) is not page-aligned",
        ),
        (
            4096,
            1,
            vec![r(2, u64::MAX - 4095, 8192)],
            "region slot 2 (gpa 0xfffffffffffff000, size 0x2000) wraps past the end of the \
             address space",
        ),
        (
            4096,
            1,
            vec![r(3, 0, 4096), r(3, 8192, 4096)],
            "slot 3 appears twice in the memory map",
        ),
        (
            4096,
            1,
            vec![r(1, 0, 8192), r(2, 4096, 4096)],
            "regions slot 1 and slot 2 overlap",
        ),
        (
            4096,
            1,
            vec![r(1, 0, 1 << 40), r(2, 1 << 40, 4096)],
            "total guest memory of 1099511631872 bytes exceeds the limit of 1099511627776 bytes",
        ),
    ];
    for (page_size, vcpus, regions, want) in cases {
        let err = StreamHeader::new(page_size, vcpus, regions).unwrap_err();
        assert_eq!(err.to_string(), want);
    }
    let many = (0..=MAX_REGIONS as u32)
        .map(|i| r(i, u64::from(i) * 4096, 4096))
        .collect();
    let err = StreamHeader::new(4096, 1, many).unwrap_err();
    assert_eq!(
        err.to_string(),
        "memory map has 513 regions, more than the limit of 512"
    );
}

#[test]
fn largest_header_round_trips() {
    let regions: Vec<_> = (0..MAX_REGIONS as u32)
        .rev()
        .map(|i| Region {
            slot: i * 3,
            gpa: u64::from(i) << 30,
            size: 1 << 21,
        })
        .collect();
    let h = StreamHeader::new(1 << 21, 4096, regions).unwrap();
    let (stream, _) = encode(&h, &[]);
    assert_eq!(Decoder::new(stream.as_slice()).unwrap().header(), &h);
}

#[test]
fn header_region_count_must_match_its_length() {
    let mut s = stream_with(&[]);
    s[26..30].copy_from_slice(&3u32.to_le_bytes()); // nregions: 2 -> 3
    let crc_at = s.len() - 4;
    let crc = crc32c::crc32c(&s[12..crc_at]);
    s[crc_at..].copy_from_slice(&crc.to_le_bytes());
    let err = Decoder::new(s.as_slice()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "header declares 3 regions but carries 40 bytes of region entries"
    );
}

#[test]
fn pages_data_must_be_exactly_the_range() {
    let data = vec![0; 3 * PAGE as usize];
    let msg = Message::Pages {
        range: range(0, 0, 2),
        data: &data,
    };
    let err = Encoder::new(io::sink(), header())
        .unwrap()
        .send(msg)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "Pages frame for 2 pages of 4096 bytes carries 12288 bytes of data"
    );
    let err = next_error(&stream_with(&pages_head(range(0, 0, 2), 100)));
    assert!(
        matches!(err, WireError::PagesLength { data_len: 100, .. }),
        "{err}"
    );
}

#[test]
fn pages_beyond_the_frame_limit_are_rejected() {
    let h = StreamHeader::new(
        4096,
        1,
        vec![Region {
            slot: 0,
            gpa: 0,
            size: 8192 * PAGE,
        }],
    )
    .unwrap();
    let data = vec![0; 4097 * PAGE as usize];
    let msg = Message::Pages {
        range: range(0, 0, 4097),
        data: &data,
    };
    let err = Encoder::new(io::sink(), h).unwrap().send(msg).unwrap_err();
    assert!(matches!(err, WireError::Length { .. }), "{err}");
}

#[test]
fn vcpu_state_and_error_messages_are_bounded() {
    let mut enc = Encoder::new(io::sink(), header()).unwrap();
    let err = enc
        .send(Message::VcpuState {
            vcpu_id: 2,
            blob: &[],
        })
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "vCPU id 2 is out of range (the stream has 2 vCPUs)"
    );
    let blob = vec![0; MAX_VCPU_BLOB + 1];
    let err = enc
        .send(Message::VcpuState {
            vcpu_id: 0,
            blob: &blob,
        })
        .unwrap_err();
    assert!(matches!(err, WireError::Length { .. }), "{err}");
    let long = "x".repeat(MAX_ERROR_MESSAGE + 1);
    let err = enc
        .send(Message::Error {
            code: 1,
            message: &long,
        })
        .unwrap_err();
    assert!(matches!(err, WireError::Length { .. }), "{err}");
    let err = enc.send(Message::MemHash { slot: 1, hash: 0 }).unwrap_err();
    assert!(matches!(err, WireError::UnknownSlot(1)), "{err}");
    // Nothing invalid reached the writer.
    assert_eq!(enc.position(), encode(&header(), &[]).0.len() as u64);

    let mut payload = 1u32.to_le_bytes().to_vec();
    payload.extend_from_slice(&[0xff, 0xfe]);
    let err = next_error(&stream_with(&raw_frame(8, &payload)));
    assert_eq!(err.to_string(), "Error frame message is not valid UTF-8");
    let err = next_error(&stream_with(&raw_frame(5, &7u32.to_le_bytes())));
    assert!(
        matches!(err, WireError::VcpuId { id: 7, count: 2 }),
        "{err}"
    );
}

#[test]
fn destination_memory_must_match_the_region() {
    let h = header();
    let g = guest();
    let (stream, _) = encode(&h, &[pages(g, 1, range(5, 0, 1))]);
    let mut dec = Decoder::new(stream.as_slice()).unwrap();
    let mut short = vec![vec![0u8; 1024 * 4096], vec![0u8; 4096]];
    let err = dec.next(&mut short).unwrap_err();
    assert_eq!(
        err.to_string(),
        "destination memory for slot 5 is 4096 bytes; the region is 65536 bytes"
    );
    let mut dec = Decoder::new(stream.as_slice()).unwrap();
    let err = dec.next(&mut ()).unwrap_err();
    assert!(
        matches!(
            err,
            WireError::Destination {
                slot: 5,
                have: 0,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn back_channel_carries_replies_without_a_header() {
    let replies = [
        Message::Ack { code: 3 },
        Message::Error {
            code: 5,
            message: "checksum mismatch in slot 0",
        },
        Message::Cancel,
    ];
    let mut enc = Encoder::back_channel(Vec::new(), header());
    for m in replies {
        enc.send(m).unwrap();
    }
    let bytes = enc.into_inner();
    let mut dec = Decoder::back_channel(bytes.as_slice(), header());
    for want in replies {
        assert_eq!(dec.next(&mut ()).unwrap(), Some(want));
    }
    assert_eq!(dec.next(&mut ()).unwrap(), None);
    assert_eq!(dec.into_inner().len(), 0);
}

#[test]
fn crc_mismatch_names_the_frame() {
    let mut s = stream_with(&raw_frame(9, &3u32.to_le_bytes()));
    let last = s.len() - 1;
    s[last] ^= 1;
    let err = next_error(&s);
    assert!(
        err.to_string()
            .starts_with("CRC mismatch in Ack frame ending at byte "),
        "{err}"
    );
}

#[test]
fn mem_hash_is_xxh3_64() {
    // XXH3-64 of no input, seed 0: pins the algorithm, which both sides must agree on.
    assert_eq!(mem_hash(b""), 0x2d06_8005_38d3_94c2);
    assert_ne!(mem_hash(&[0; 4096]), mem_hash(&[1; 4096]));
}

/// `mem_digest` is XXH3 over the pages' XXH3s, the same on one thread and on many, and the
/// destination's table of the pages as they arrived gives the source's digest of the same
/// bytes without reading them.
#[test]
fn mem_digest_is_a_hash_of_page_hashes() {
    use dirtylog_migrate::digest::{mem_digest, DigestTable};
    let page = 4096;
    // 40 MiB and 3 pages: digested in parallel.
    let len = (40 << 20) + 3 * page;
    let mut mem = vec![0u8; len];
    for (i, b) in mem.iter_mut().enumerate().step_by(4093) {
        *b = (i % 251) as u8 + 1;
    }
    let manual = {
        let all: Vec<u8> = mem
            .chunks(page)
            .flat_map(|c| mem_hash(c).to_le_bytes())
            .collect();
        mem_hash(&all)
    };
    assert_eq!(mem_digest(&mem, page), manual);

    // The destination got pages 0..64 and the last 3; everything else stayed zero.
    let npages = len / page;
    let mut sparse = vec![0u8; len];
    sparse[..64 * page].copy_from_slice(&mem[..64 * page]);
    sparse[len - 3 * page..].copy_from_slice(&mem[len - 3 * page..]);
    let table = DigestTable::new(npages, page);
    table.record(0, &mem[..64 * page]);
    table.record((npages - 3) as u64, &mem[len - 3 * page..]);
    assert_eq!(table.digest(), mem_digest(&sparse, page));
    // A byte the table never saw makes the digests differ.
    sparse[5] ^= 1;
    assert_ne!(table.digest(), mem_digest(&sparse, page));
}

/// Records each vectored write. With a `limit`, accepts at most that many bytes per call and
/// fails every other call with `Interrupted`, as a signal would.
struct Recorder {
    bytes: Vec<u8>,
    calls: Vec<Vec<(*const u8, usize)>>,
    limit: Option<usize>,
    interrupt: bool,
}

impl Recorder {
    fn new(limit: Option<usize>) -> Self {
        Recorder {
            bytes: Vec::new(),
            calls: Vec::new(),
            limit,
            interrupt: false,
        }
    }
}

impl Write for Recorder {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.interrupt = !self.interrupt && self.limit.is_some();
        if self.interrupt {
            return Err(io::ErrorKind::Interrupted.into());
        }
        self.calls
            .push(bufs.iter().map(|b| (b.as_ptr(), b.len())).collect());
        let mut n = 0;
        for b in bufs {
            let k = b.len().min(self.limit.map_or(usize::MAX, |l| l - n));
            self.bytes.extend_from_slice(&b[..k]);
            n += k;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn pages_are_written_from_guest_memory_in_one_vectored_write() {
    let h = header();
    let g = guest();
    let msg = pages(g, 0, range(0, 8, 4));
    let mut rec = Recorder::new(None);
    let frame = Frame::new(&h, msg).unwrap();
    frame.write_to(&mut rec).unwrap();
    assert_eq!(rec.calls.len(), 1);
    // The data slice handed to the writer is the guest memory itself: nothing was copied.
    assert_eq!(rec.calls[0][1], (g[0][8 * 4096..].as_ptr(), 4 * 4096));
    assert_eq!(rec.bytes.len(), frame.wire_len());
    assert_eq!(
        frame.io_slices().iter().map(|s| s.len()).sum::<usize>(),
        frame.wire_len()
    );
}

#[test]
fn partial_and_interrupted_writes_give_the_same_stream() {
    let h = header();
    let g = guest();
    let msgs = every_message(g);
    let (want, _) = encode(&h, &msgs);
    for limit in [1, 3, 7, 4096] {
        let rec = Recorder::new(Some(limit));
        let mut enc = Encoder::new(rec, h.clone()).unwrap();
        for &m in &msgs {
            enc.send(m).unwrap();
        }
        assert_eq!(enc.position(), want.len() as u64);
        assert!(enc.into_inner().bytes == want, "limit {limit}");
    }
}

/// A message with owned data, for generating.
#[derive(Clone, Debug)]
enum Owned {
    Pages(usize, PageRange),
    Zero(PageRange),
    RoundEnd(u64, u64),
    Vcpu(u32, Vec<u8>),
    Hash(u32, u64),
    Error(u32, String),
    Ack(u32),
    Done,
    Cancel,
    Device(String, u32, Vec<u8>),
}

impl Owned {
    fn message<'a>(&'a self, g: &'a [Vec<u8>]) -> Message<'a> {
        match self {
            Owned::Pages(index, r) => pages(g, *index, *r),
            Owned::Zero(r) => Message::ZeroPages(*r),
            Owned::RoundEnd(round, dirty_pages) => Message::RoundEnd {
                round: *round,
                dirty_pages: *dirty_pages,
            },
            Owned::Vcpu(vcpu_id, blob) => Message::VcpuState {
                vcpu_id: *vcpu_id,
                blob,
            },
            Owned::Hash(slot, hash) => Message::MemHash {
                slot: *slot,
                hash: *hash,
            },
            Owned::Error(code, message) => Message::Error {
                code: *code,
                message,
            },
            Owned::Ack(code) => Message::Ack { code: *code },
            Owned::Done => Message::Done,
            Owned::Cancel => Message::Cancel,
            Owned::Device(name, version, bytes) => Message::Device {
                name,
                version: *version,
                bytes,
            },
        }
    }
}

/// A valid range of region `index` of [`header`] (slot 0 has 1024 pages, slot 5 has 16).
fn any_range() -> impl Strategy<Value = (usize, PageRange)> {
    (0usize..2).prop_flat_map(|index| {
        let (slot, npages) = [(0u32, 1024u64), (5, 16)][index];
        (0..npages).prop_flat_map(move |first| {
            (1..=(npages - first).min(64)).prop_map(move |n| (index, range(slot, first, n)))
        })
    })
}

fn any_message() -> impl Strategy<Value = Owned> {
    prop_oneof![
        any_range().prop_map(|(i, r)| Owned::Pages(i, r)),
        any_range().prop_map(|(_, r)| Owned::Zero(r)),
        any::<(u64, u64)>().prop_map(|(a, b)| Owned::RoundEnd(a, b)),
        (0u32..2, prop::collection::vec(any::<u8>(), 0..300)).prop_map(|(v, b)| Owned::Vcpu(v, b)),
        (prop::sample::select(vec![0u32, 5]), any::<u64>()).prop_map(|(s, h)| Owned::Hash(s, h)),
        (any::<u32>(), ".{0,40}").prop_map(|(c, m)| Owned::Error(c, m)),
        any::<u32>().prop_map(Owned::Ack),
        Just(Owned::Done),
        Just(Owned::Cancel),
        (
            "[A-Za-z0-9._:/-]{1,64}",
            any::<u32>(),
            prop::collection::vec(any::<u8>(), 0..300)
        )
            .prop_map(|(n, v, b)| Owned::Device(n, v, b)),
    ]
}

/// The payload of a `Device` frame as raw bytes: version, the declared name length, then
/// `name` and `state`.
fn device_payload(version: u32, name_len: u32, name: &[u8], state: &[u8]) -> Vec<u8> {
    let mut p = version.to_le_bytes().to_vec();
    p.extend_from_slice(&name_len.to_le_bytes());
    p.extend_from_slice(name);
    p.extend_from_slice(state);
    p
}

/// What a valid device name is, written independently of the decoder.
fn valid_device_name(name: &[u8]) -> bool {
    (1..=64).contains(&name.len())
        && name.iter().all(|c| {
            matches!(c, b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b':' | b'/')
        })
}

#[test]
fn device_sections_are_validated_on_both_sides() {
    let h = header();
    let mut enc = Encoder::new(Vec::new(), h.clone()).unwrap();
    for (name, why) in [
        ("", "is empty"),
        ("a b", "has a character"),
        ("é", "has a character"),
        ("dev\n", "has a character"),
    ] {
        let err = enc
            .send(Message::Device {
                name,
                version: 1,
                bytes: b"",
            })
            .unwrap_err();
        assert!(
            matches!(err, WireError::DeviceName { .. }),
            "{name:?}: {err}"
        );
        assert!(err.to_string().contains(why), "{name:?}: {err}");
    }
    let long = "x".repeat(65);
    let err = enc
        .send(Message::Device {
            name: &long,
            version: 1,
            bytes: b"",
        })
        .unwrap_err();
    assert!(err.to_string().contains("longer than 64 bytes"), "{err}");
    let max_name = "y".repeat(64);
    enc.send(Message::Device {
        name: &max_name,
        version: 1,
        bytes: b"ok",
    })
    .unwrap();
    let big = vec![0u8; MAX_DEVICE_STATE + 1];
    let err = enc
        .send(Message::Device {
            name: "blk",
            version: 1,
            bytes: &big,
        })
        .unwrap_err();
    assert!(
        matches!(err, WireError::DeviceStateTooLarge { len, .. } if len == MAX_DEVICE_STATE + 1),
        "{err}"
    );
    // Nothing of the refused frames was written: the stream decodes to the one good frame.
    let stream = enc.into_inner();
    let mut dec = Decoder::new(stream.as_slice()).unwrap();
    let mut mem = memory(&h);
    assert!(matches!(
        dec.next(&mut mem).unwrap(),
        Some(Message::Device { name, .. }) if name == max_name
    ));
    assert_eq!(dec.next(&mut mem).unwrap(), None);

    // The receiver refuses the same, and lengths that do not add up.
    let bad = |payload: Vec<u8>| next_error(&stream_with(&raw_frame(12, &payload)));
    let err = bad(device_payload(1, 3, b"a b", b""));
    assert!(matches!(err, WireError::DeviceName { .. }), "{err}");
    let err = bad(device_payload(1, 10, b"abc", b""));
    assert!(
        matches!(err, WireError::DeviceNameLength { len: 10, .. }),
        "{err}"
    );
    let err = bad(device_payload(1, 65, &[b'a'; 65], b""));
    assert!(
        matches!(err, WireError::DeviceNameLength { len: 65, .. }),
        "{err}"
    );
    let err = bad(device_payload(1, 0, b"", b"state"));
    assert!(err.to_string().contains("is empty"), "{err}");
    let err = bad(device_payload(1, 3, b"blk", &big));
    assert!(
        matches!(err, WireError::DeviceStateTooLarge { .. }),
        "{err}"
    );
    let err = bad(vec![1, 0, 0, 0]);
    assert!(matches!(err, WireError::Length { min: 8, .. }), "{err}");
}

/// Valid, non-overlapping regions in shuffled slot order.
fn any_regions() -> impl Strategy<Value = Vec<Region>> {
    prop::collection::vec((1u64..64, 0u64..64, any::<u32>()), 0..20).prop_map(|specs| {
        let mut gpa = 0;
        let mut regions = Vec::new();
        for (i, (pages, gap, salt)) in specs.into_iter().enumerate() {
            gpa += gap * PAGE;
            let slot = (salt & !0xff) | i as u32;
            regions.push(Region {
                slot,
                gpa,
                size: pages * PAGE,
            });
            gpa += pages * PAGE;
        }
        regions
    })
}

proptest! {
    #[test]
    fn malformed_device_frames_are_rejected(
        name in prop::collection::vec(any::<u8>(), 0..80),
        declared in prop_oneof![
            Just(None),
            any::<u32>().prop_map(Some),
            (0u32..100).prop_map(Some),
        ],
        state in prop::collection::vec(any::<u8>(), 0..64),
        version in any::<u32>(),
    ) {
        let name_len = declared.unwrap_or(name.len() as u32);
        let payload = device_payload(version, name_len, &name, &state);
        let stream = stream_with(&raw_frame(12, &payload));
        let mut dec = Decoder::new(stream.as_slice()).unwrap();
        let mut mem = memory(&header());
        // The declared length splits the data into a name and the state.
        let data: Vec<u8> = name.iter().chain(&state).copied().collect();
        let split = usize::try_from(name_len).ok().filter(|&n| n <= data.len());
        let valid = split.is_some_and(|n| valid_device_name(&data[..n]));
        match dec.next(&mut mem) {
            Ok(Some(Message::Device { name: n, version: v, bytes })) => {
                prop_assert!(valid, "accepted {:?}", n);
                let k = split.unwrap();
                prop_assert_eq!(n.as_bytes(), &data[..k]);
                prop_assert_eq!(bytes, &data[k..]);
                prop_assert_eq!(v, version);
            }
            Ok(other) => prop_assert!(false, "decoded {:?}", other),
            Err(e) => prop_assert!(!valid, "refused a valid section: {}", e),
        }
    }

    #[test]
    fn any_valid_message_sequence_round_trips(
        owned in prop::collection::vec(any_message(), 0..30),
    ) {
        let h = header();
        let g = guest();
        let msgs: Vec<Message<'_>> = owned.iter().map(|o| o.message(g)).collect();
        let (stream, _) = encode(&h, &msgs);
        prop_assert_eq!(decode(&stream, &msgs).unwrap(), msgs.len());
    }

    #[test]
    fn any_valid_header_round_trips(
        regions in any_regions(),
        shift in 12u32..=21,
        vcpus in 1u32..=4096,
    ) {
        let page = 1u64 << shift;
        let regions = regions
            .into_iter()
            .map(|r| Region { slot: r.slot, gpa: r.gpa / PAGE * page, size: r.size / PAGE * page })
            .collect();
        let h = StreamHeader::new(page as u32, vcpus, regions).unwrap();
        let (stream, _) = encode(&h, &[]);
        let dec = Decoder::new(stream.as_slice()).unwrap();
        prop_assert_eq!(dec.header(), &h);
    }

    #[test]
    fn garbage_after_the_header_never_panics(
        tail in prop::collection::vec(any::<u8>(), 0..2000),
        ty in 1u8..=12,
    ) {
        let mut garbage = vec![ty, 0];
        garbage.extend_from_slice(&tail);
        for stream in [stream_with(&tail), stream_with(&garbage)] {
            let mut dec = Decoder::new(stream.as_slice()).unwrap();
            let mut mem = memory(&header());
            while let Ok(Some(_)) = dec.next(&mut mem) {}
        }
    }
}

/// A TLS peer meeting a plain one is named as such: a ClientHello where the preamble should
/// be, and a TLS alert where a reply frame should be.
#[test]
fn a_tls_peer_is_recognised() {
    let hello = [
        0x16u8, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03, 0x5a, 0x5a, 0x5a,
    ];
    let err = Decoder::new(&hello[..]).unwrap_err();
    assert!(err.to_string().contains("the peer speaks TLS"), "{err}");
    let alert = [0x15u8, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28];
    let mut replies = Decoder::back_channel(&alert[..], header());
    let err = replies.next(&mut ()).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("unknown frame type 21 (the peer speaks TLS"),
        "{err}"
    );
    // Other bytes get no such hint.
    let err = next_error(&stream_with(&raw_frame(18, &[])));
    assert_eq!(err.to_string(), "unknown frame type 18");
}

/// `FLAG_HASH_CHECKED`: refused unless the decoder hashes pages and accepts it, and then the
/// CRC still covers the frame's head and fixed fields but not the pages, whose hashes tell.
#[test]
fn hash_checked_pages_leave_the_pages_to_their_hashes() {
    let h = header();
    let g = guest();
    let r = range(0, 10, 3);
    let mut stream = Vec::new();
    let mut enc = Encoder::new(&mut stream, h.clone()).unwrap();
    enc.set_hash_checked_pages(true);
    enc.send(pages(g, 0, r)).unwrap();
    // Other frames are not flagged.
    enc.send(Message::Done).unwrap();
    let frame_at = stream_with(&[]).len();
    assert_eq!(stream[frame_at + 1], FLAG_HASH_CHECKED);
    let data_at = frame_at + FRAME_HEAD + PAGES_FIXED;
    let want: Vec<u64> = (10..13)
        .map(|p| mem_hash(&g[0][p * PAGE as usize..(p + 1) * PAGE as usize]))
        .collect();

    // Decode `s` with a decoder set up as given; the page hashes of its Pages frame.
    let run = |s: &[u8], hash: bool, accept: bool| -> Result<Vec<u64>, WireError> {
        let mut d = Decoder::new(s).unwrap();
        d.set_hash_pages(hash);
        d.accept_hash_checked(accept);
        let mut mem = memory(&h);
        d.next(&mut mem)?;
        let hashes = d.page_hashes().to_vec();
        assert_eq!(d.hash_checked_pages(), 3);
        assert_eq!(d.next(&mut mem)?, Some(Message::Done));
        Ok(hashes)
    };
    assert_eq!(run(&stream, true, true).unwrap(), want);
    for (hash, accept) in [(false, false), (true, false), (false, true)] {
        let err = run(&stream, hash, accept).unwrap_err();
        assert!(matches!(err, WireError::Flags { flags: 1, .. }), "{err}");
    }

    // A flipped page byte passes the CRC and shows in its page's hash.
    let mut bad = stream.clone();
    bad[data_at + PAGE as usize + 7] ^= 0x10;
    let got = run(&bad, true, true).unwrap();
    assert_eq!((got[0], got[2]), (want[0], want[2]));
    assert_ne!(got[1], want[1]);
    // A flipped byte of the head or fixed fields does not.
    for at in [
        frame_at,
        frame_at + 3,
        frame_at + FRAME_HEAD + 2,
        data_at - 1,
    ] {
        let mut bad = stream.clone();
        bad[at] ^= 0x01;
        assert!(
            run(&bad, true, true).is_err(),
            "byte {at} of the frame head"
        );
    }
    // Nor does one of the CRC.
    let mut bad = stream.clone();
    bad[data_at + 3 * PAGE as usize] ^= 0x01;
    assert!(matches!(
        run(&bad, true, true).unwrap_err(),
        WireError::Crc { .. }
    ));

    // The flag on any other frame is refused, accepted or not.
    let mut done = raw_frame(7, &[]);
    done[1] = FLAG_HASH_CHECKED;
    let done_stream = stream_with(&done);
    let mut d = Decoder::new(done_stream.as_slice()).unwrap();
    d.set_hash_pages(true);
    d.accept_hash_checked(true);
    assert!(matches!(
        d.next(&mut memory(&h)).unwrap_err(),
        WireError::Flags { .. }
    ));
}

/// `Encoder::send_pages_with` (pages the caller writes, for memory no slice may borrow) makes
/// the same bytes as `send`, and refuses, writing nothing, what `send` would refuse and any
/// stream whose CRC would have to cover the pages.
#[test]
fn pages_written_by_the_caller_frame_as_sent_pages() {
    let h = header();
    let g = guest();
    let r = range(0, 10, 3);
    let page_bytes = |r: PageRange| {
        let (start, n) = (r.first_page as usize * PAGE as usize, r.npages as usize);
        g[0][start..start + n * PAGE as usize].to_vec()
    };
    let mut sent = Vec::new();
    let mut enc = Encoder::new(&mut sent, h.clone()).unwrap();
    enc.set_hash_checked_pages(true);
    enc.send(pages(g, 0, r)).unwrap();
    let mut by_caller = Vec::new();
    let mut enc = Encoder::new(&mut by_caller, h.clone()).unwrap();
    enc.set_hash_checked_pages(true);
    assert!(enc.hash_checked_pages());
    let before = enc.position();
    enc.send_pages_with(r, |w, head, crc| {
        w.write_all(head)?;
        w.write_all(&page_bytes(r))?;
        w.write_all(crc)
    })
    .unwrap();
    let after = enc.position();
    drop(enc);
    assert_eq!(by_caller, sent);
    assert_eq!(
        after - before,
        (by_caller.len() - stream_with(&[]).len()) as u64
    );

    // Refusals write nothing and never call the writer.
    let refuse = |hash_checked: bool, r: PageRange| {
        let mut out = Vec::new();
        let mut enc = Encoder::new(&mut out, h.clone()).unwrap();
        enc.set_hash_checked_pages(hash_checked);
        let start = enc.position();
        let err = enc
            .send_pages_with(r, |_, _, _| panic!("writer called for a refused frame"))
            .unwrap_err();
        assert_eq!(enc.position(), start);
        drop(enc);
        assert_eq!(out.len(), stream_with(&[]).len());
        err
    };
    assert!(matches!(refuse(false, r), WireError::PagesNotHashChecked));
    assert!(matches!(
        refuse(true, range(0, 10, 0)),
        WireError::EmptyRange { .. }
    ));
    assert!(matches!(
        refuse(true, range(0, u64::MAX, 2)),
        WireError::RangePastEnd { .. }
    ));
    assert!(matches!(
        refuse(true, range(99, 0, 1)),
        WireError::UnknownSlot(99)
    ));
}
