//! Compressed page data: `CompressedPages` frames through the public wire API (round trips,
//! corrupted and mis-sized data, bounds), and loopback migrations with each codec.

mod common;

use common::*;
use dirtylog_migrate::compress::{Codec, Compression, Compressor};
use dirtylog_migrate::soft::{SoftVm, Workload};
use dirtylog_migrate::wire::{
    Decoder, Encoder, Message, PageRange, Region, StreamHeader, WireError, MAX_PAGES_BYTES,
};
use dirtylog_migrate::{send, MigrationSource, SendConfig, TrackerKind};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const FRAME_HEAD: usize = 6;
const COMPRESSED_FIXED: usize = 24;
const CODECS: [Compression; 3] = [
    Compression::Lz4,
    Compression::Zstd { level: 1 },
    Compression::Zstd { level: 9 },
];

/// Slot 2: 64 pages at 0. Slot 7: 8192 pages (32 MiB, more than one frame may carry).
fn header() -> StreamHeader {
    let regions = vec![
        Region {
            slot: 2,
            gpa: 0,
            size: 64 * PAGE,
        },
        Region {
            slot: 7,
            gpa: 1 << 30,
            size: 8192 * PAGE,
        },
    ];
    StreamHeader::new(PAGE as u32, 1, regions).unwrap()
}

fn range(slot: u32, first_page: u64, npages: u64) -> PageRange {
    PageRange {
        slot,
        first_page,
        npages,
    }
}

/// Text-like pages: words of a small vocabulary, different on each page.
fn text_pages(npages: u64, seed: u64) -> Vec<u8> {
    const WORDS: [&str; 12] = [
        "the ",
        "page ",
        "dirty ",
        "migration ",
        "of ",
        "kernel ",
        "memory ",
        "and ",
        "log ",
        "guest ",
        "a ",
        "bit\n",
    ];
    let mut x = seed | 1;
    let len = (npages * PAGE) as usize;
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(WORDS[(x % WORDS.len() as u64) as usize].as_bytes());
    }
    out.truncate(len);
    out
}

fn compress(c: Compression, raw: &[u8]) -> Vec<u8> {
    Compressor::new(c)
        .unwrap()
        .compress(raw)
        .unwrap()
        .expect("text compresses")
        .to_vec()
}

/// A memory for [`header`]'s first region only (the tests never write the second).
fn memory() -> Vec<Vec<u8>> {
    vec![vec![0; 64 * PAGE as usize], Vec::new()]
}

/// The header's stream, then `frame`.
fn stream_with(frame: &[u8]) -> Vec<u8> {
    let mut s = Encoder::new(Vec::new(), header()).unwrap().into_inner();
    s.extend_from_slice(frame);
    s
}

/// A `CompressedPages` frame with any fields, its length and CRC made to match.
fn raw_compressed(r: PageRange, codec: u32, data: &[u8]) -> Vec<u8> {
    let mut f = vec![15, 0];
    f.extend_from_slice(&((COMPRESSED_FIXED + data.len()) as u32).to_le_bytes());
    f.extend_from_slice(&r.slot.to_le_bytes());
    f.extend_from_slice(&r.first_page.to_le_bytes());
    f.extend_from_slice(&r.npages.to_le_bytes());
    f.extend_from_slice(&codec.to_le_bytes());
    f.extend_from_slice(data);
    let crc = crc32c::crc32c(&f);
    f.extend_from_slice(&crc.to_le_bytes());
    f
}

fn decode_one(stream: &[u8], mem: &mut Vec<Vec<u8>>) -> Result<(PageRange, Vec<u8>), WireError> {
    let mut dec = Decoder::new(stream).unwrap();
    match dec.next(mem)? {
        Some(Message::Pages { range, data }) => Ok((range, data.to_vec())),
        other => panic!("expected Pages, got {other:?}"),
    }
}

#[test]
fn compressed_pages_round_trip_into_memory_as_pages() {
    for c in CODECS {
        let raw = text_pages(5, 42);
        let packed = compress(c, &raw);
        assert!(packed.len() * 2 < raw.len(), "{c}: {} bytes", packed.len());
        let mut enc = Encoder::new(Vec::new(), header()).unwrap();
        let r = range(2, 10, 5);
        enc.send_compressed(r, c.codec(), &packed).unwrap();
        enc.send(Message::Done).unwrap();
        let wire = enc.position() as usize;
        let stream = enc.into_inner();
        assert_eq!(stream.len(), wire);

        let mut mem = memory();
        let mut dec = Decoder::new(stream.as_slice()).unwrap();
        let msg = dec.next(&mut mem).unwrap().unwrap();
        assert_eq!(
            msg,
            Message::Pages {
                range: r,
                data: &raw
            },
            "{c}"
        );
        assert_eq!(dec.next(&mut mem).unwrap(), Some(Message::Done));
        assert_eq!(dec.next(&mut mem).unwrap(), None);
        let at = 10 * PAGE as usize;
        assert_eq!(mem[0][at..at + raw.len()], raw[..], "{c}");
        assert!(mem[0][..at].iter().all(|&b| b == 0), "{c}: wrote before");
        assert!(
            mem[0][at + raw.len()..].iter().all(|&b| b == 0),
            "{c}: wrote after"
        );
    }
}

/// Every byte of the compressed data flipped, the CRC recomputed (a sender bug, or a
/// tamperer): the decoder either decodes exactly the range or fails with a typed error, and
/// never panics or writes outside the range. (LZ4 has no checksum of its own, so a flipped
/// literal decodes to other bytes of the right size: the memory digests catch that.)
#[test]
fn corrupted_compressed_data_with_a_good_crc_fails_cleanly() {
    for c in CODECS {
        let raw = text_pages(2, 7);
        let packed = compress(c, &raw);
        let r = range(2, 3, 2);
        let mut failures = 0;
        let mut mem = memory();
        // Every byte of the codec's headers, then every 5th (debug builds of the codecs are
        // slow).
        for i in (0..packed.len()).filter(|&i| i < 64 || i % 5 == 0) {
            for mask in [0x01, 0x80, 0xff] {
                let mut bad = packed.clone();
                bad[i] ^= mask;
                match decode_one(
                    &stream_with(&raw_compressed(r, c.codec() as u32, &bad)),
                    &mut mem,
                ) {
                    Ok((got, data)) => {
                        assert_eq!(got, r);
                        assert_eq!(data.len(), raw.len());
                    }
                    Err(WireError::Decompress { range, codec, .. }) => {
                        assert_eq!((range, codec), (r, c.codec()));
                        failures += 1;
                    }
                    Err(e) => panic!("{c}: byte {i} ^ {mask:#x}: {e}"),
                }
                let (before, after) = (3 * PAGE as usize, 5 * PAGE as usize);
                assert!(mem[0][..before].iter().all(|&b| b == 0), "{c}: byte {i}");
                assert!(mem[0][after..].iter().all(|&b| b == 0), "{c}: byte {i}");
            }
        }
        assert!(failures > 0, "{c}: no corruption was detected");
        // Garbage and truncated data: always an error.
        let mut mem = memory();
        for bad in [
            &[0xffu8; 100][..],
            &packed[..packed.len() - 1],
            &packed[..1],
        ] {
            let err = decode_one(
                &stream_with(&raw_compressed(r, c.codec() as u32, bad)),
                &mut mem,
            )
            .unwrap_err();
            assert!(matches!(err, WireError::Decompress { .. }), "{c}: {err}");
        }
    }
}

/// Data that decompresses to more or fewer bytes than the range fails, naming the sizes.
#[test]
fn data_of_another_size_than_the_range_fails() {
    for c in CODECS {
        let packed = compress(c, &text_pages(3, 9));
        for (npages, why) in [(2, "more"), (4, "fewer")] {
            let mut mem = memory();
            let frame = raw_compressed(range(2, 0, npages), c.codec() as u32, &packed);
            let err = decode_one(&stream_with(&frame), &mut mem).unwrap_err();
            let msg = err.to_string();
            assert!(
                matches!(err, WireError::Decompress { .. }),
                "{c} {why}: {msg}"
            );
            assert!(
                msg.starts_with(&format!(
                    "CompressedPages frame for slot 2 pages 0..{npages}: its {} data is bad",
                    c.codec()
                )),
                "{msg}"
            );
            if npages == 4 {
                assert!(
                    msg.ends_with("decompressed to 12288 bytes, 16384 expected"),
                    "{msg}"
                );
            }
        }
    }
}

/// A frame whose CRC does not match is refused before anything is decompressed: the
/// destination is untouched.
#[test]
fn a_bad_crc_leaves_memory_untouched() {
    let packed = compress(Compression::Lz4, &text_pages(4, 1));
    let mut frame = raw_compressed(range(2, 0, 4), Codec::Lz4 as u32, &packed);
    let last = frame.len() - 1;
    frame[last] ^= 1;
    let mut mem = memory();
    let err = decode_one(&stream_with(&frame), &mut mem).unwrap_err();
    assert!(matches!(err, WireError::Crc { .. }), "{err}");
    assert!(mem[0].iter().all(|&b| b == 0));
}

/// Range, codec and length are checked from the fixed fields, before the data is read.
#[test]
fn bad_fields_fail_before_the_data_is_read() {
    let packed = compress(Compression::Lz4, &text_pages(2, 3));
    let header_end = stream_with(&[]).len() as u64;
    let cases: [(PageRange, u32, usize, &str); 6] = [
        (
            range(2, 63, 2),
            1,
            packed.len(),
            "range slot 2 pages 63..65 is past the end of the region (64 pages)",
        ),
        (
            range(9, 0, 1),
            1,
            packed.len(),
            "range names slot 9, which is not in the memory map",
        ),
        (
            range(2, 0, 2),
            3,
            packed.len(),
            "CompressedPages frame with unknown codec 3",
        ),
        (
            range(7, 0, 4097),
            1,
            packed.len(),
            "CompressedPages frame for 4097 pages of 4096 bytes: more than 16777216 bytes \
             once decompressed",
        ),
        (
            range(2, 0, 1),
            1,
            4096 * 11 / 10 + 21,
            "CompressedPages frame for 4096 bytes of pages carries 4526 bytes of lz4 data; \
             1..=4525 bytes fit",
        ),
        (
            range(2, 0, 1),
            2,
            0,
            "CompressedPages frame for 4096 bytes of pages carries 0 bytes of zstd data; \
             1..=4174 bytes fit",
        ),
    ];
    for (r, codec, len, want) in cases {
        // Only the head and fixed fields: the decoder must fail without reading further.
        let frame = raw_compressed(r, codec, &vec![0; len]);
        let stream = stream_with(&frame[..FRAME_HEAD + COMPRESSED_FIXED]);
        let mut dec = Decoder::new(stream.as_slice()).unwrap();
        let err = dec.next(&mut memory()).unwrap_err();
        assert_eq!(err.to_string(), want);
        assert_eq!(
            dec.position(),
            header_end + (FRAME_HEAD + COMPRESSED_FIXED) as u64,
            "{want}"
        );
        // The encoder refuses the same frame.
        let mut enc = Encoder::new(Vec::new(), header()).unwrap();
        let before = enc.position();
        if let Some(codec) = Codec::from_u32(codec) {
            let err = enc.send_compressed(r, codec, &vec![0; len]).unwrap_err();
            assert_eq!(err.to_string(), want);
            assert_eq!(enc.position(), before, "{want}: wrote part of a frame");
        }
    }
    // The most any frame may declare: a full frame of pages at LZ4's bound.
    let mut head = vec![15, 0];
    head.extend_from_slice(&u32::MAX.to_le_bytes());
    let mut dec = Decoder::new(std::io::Cursor::new(stream_with(&head))).unwrap();
    let err = dec.next(&mut memory()).unwrap_err();
    let max = COMPRESSED_FIXED + Codec::Lz4.max_compressed_len(MAX_PAGES_BYTES);
    assert_eq!(
        err.to_string(),
        format!(
            "CompressedPages frame payload of 4294967295 bytes is outside the allowed \
             {COMPRESSED_FIXED}..={max}"
        )
    );
}

/// A whole migration with each codec: the destination holds the source's memory, the
/// compressed pages are counted, and fewer bytes went on the wire than without compression.
#[test]
fn loopback_migration_with_each_codec_sends_fewer_bytes() {
    let run = |compress: Option<Compression>| {
        let src = soft(
            layout(8, 4),
            1,
            TrackerKind::ClearLog,
            workload(512, Some(2000), true),
        );
        let config = SendConfig {
            compress,
            ..send_config(2)
        };
        let (sent, received) = migrate(&src, &config);
        let report = sent.unwrap_or_else(|e| panic!("{compress:?}: send failed: {e}"));
        let (dst, rrep) = received.unwrap_or_else(|e| panic!("{compress:?}: receive failed: {e}"));
        assert_same_memory(&src, &dst);
        assert_eq!(rrep.transferred, report.stats.transferred);
        assert_eq!(rrep.normal, report.stats.normal);
        report
    };
    let plain = run(None);
    assert_eq!(plain.compression.pages, 0);
    assert_eq!(plain.compression.codec, None);
    let plain_bulk = plain.rounds[0].transferred;
    for c in [Compression::Lz4, Compression::Zstd { level: 1 }] {
        let report = run(Some(c));
        let z = &report.compression;
        eprintln!(
            "{c}: bulk {} bytes (plain {plain_bulk}), total {} (plain {}), {z:?}",
            report.rounds[0].transferred, report.stats.transferred, plain.stats.transferred
        );
        assert_eq!(z.codec, Some(c));
        // The SoftVm's pages are a few random words among zeros: they all shrink.
        assert!(z.pages > 0 && z.pages + z.incompressible_pages <= report.stats.normal);
        assert!(z.compression_rate > 2.0, "{c}: {z:?}");
        let raw = z.pages * PAGE;
        assert!(
            (z.compression_rate - raw as f64 / z.compressed_size as f64).abs() < 1e-9,
            "{z:?}"
        );
        // The bulk pass sends about the same pages in both runs (the guest writes meanwhile).
        assert!(
            report.rounds[0].transferred * 2 < plain_bulk,
            "{c}: bulk {} bytes, plain {plain_bulk}",
            report.rounds[0].transferred
        );
        assert!(report.stats.transferred < plain.stats.transferred, "{c}");
    }
}

/// A source whose memory is a vm-memory mapping filled by the test, with a software VM's
/// tracker and (idle) vCPUs over the same layout.
struct Filled {
    mem: GuestMemoryMmap<()>,
    vm: SoftVm,
}

impl MigrationSource for Filled {
    type Memory = GuestMemoryMmap<()>;
    type Tracker = SoftVm;
    type Vcpus = SoftVm;
    fn memory(&self) -> &GuestMemoryMmap<()> {
        &self.mem
    }
    fn tracker(&self) -> &SoftVm {
        &self.vm
    }
    fn vcpus(&self) -> &SoftVm {
        &self.vm
    }
}

/// Random memory does not shrink: it goes as plain `Pages`, counted as incompressible, while
/// the text-like region goes compressed; the destination gets both exactly.
#[test]
fn incompressible_pages_go_plain() {
    let size = 1u64 << 20;
    let regions = vec![
        Region {
            slot: 0,
            gpa: 0,
            size,
        },
        Region {
            slot: 1,
            gpa: 4 << 30,
            size,
        },
    ];
    let mem = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), size as usize),
        (GuestAddress(4 << 30), size as usize),
    ])
    .unwrap();
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    let random: Vec<u8> = (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect();
    let text = text_pages(size / PAGE, 5);
    mem.write_slice(&random, GuestAddress(0)).unwrap();
    mem.write_slice(&text, GuestAddress(4 << 30)).unwrap();
    let src = Filled {
        mem,
        vm: soft(regions, 1, TrackerKind::ClearLog, Workload::idle()),
    };
    let config = SendConfig {
        compress: Some(Compression::Lz4),
        frame_bytes: 64 << 10,
        ..send_config(1)
    };
    let (addr, receiver, _) = spawn_receiver(recv_config());
    let report = send(&src, addr, &config, &mut |_| {}).unwrap();
    let (dst, _) = receiver.join().unwrap().unwrap();
    let image = dst.resume_image().unwrap();
    assert!(image[0] == random, "random region differs");
    assert!(image[1] == text, "text region differs");
    let z = &report.compression;
    assert_eq!(z.incompressible_pages, size / PAGE, "{z:?}");
    assert_eq!(z.pages, size / PAGE, "{z:?}");
    assert_eq!(report.stats.normal, 2 * size / PAGE);
    assert!(z.compression_rate > 2.0, "{z:?}");
}

#[test]
fn a_bad_level_is_refused_by_the_config_check() {
    let src = soft(layout(1, 1), 1, TrackerKind::ClearLog, Workload::idle());
    let config = SendConfig {
        compress: Some(Compression::Zstd { level: 1000 }),
        ..send_config(1)
    };
    // Checked before connecting: nobody listens there.
    let addr: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
    let err = send(&src, addr, &config, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("compression zstd:1000: zstd level 1000 is outside"),
        "{err}"
    );
    assert!(!src.is_paused());
}
