//! `VmmBitmap` inside vm-memory: a `GuestMemoryMmap<VmmBitmap>` logs exactly the pages that
//! vm-memory writes, in `DirtyBitmap`s shared with whoever harvests them, and marks the same
//! pages as vm-memory's own `AtomicBitmap`.

use std::sync::Arc;

use dirtylog::bitmap::VmmBitmap;
use dirtylog::DirtyBitmap;
use proptest::prelude::*;
use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

const PAGE: u64 = 4096;
/// Region A: 16 pages at 0; region B: 8 pages right after it.
const A_PAGES: u64 = 16;
const B_PAGES: u64 = 8;

/// Pages set in `b`, taking them (clears the bitmap).
fn take_pages(b: &DirtyBitmap) -> Vec<u64> {
    let mut out = vec![0u64; b.words()];
    b.take_or_into(&mut out);
    (0..b.npages())
        .filter(|&p| out[(p / 64) as usize] >> (p % 64) & 1 == 1)
        .collect()
}

/// The writes of the test and the pages (region A, region B) they must dirty.
fn write_all(mem: &GuestMemoryMmap<VmmBitmap>) -> (Vec<u64>, Vec<u64>) {
    // A u64 inside page 3.
    mem.write_obj(0x1234_5678_u64, GuestAddress(3 * PAGE + 8))
        .unwrap();
    // A u64 across the boundary of pages 4 and 5.
    mem.write_obj(u64::MAX, GuestAddress(5 * PAGE - 4)).unwrap();
    // 100 bytes across pages 7 and 8.
    mem.write_slice(&[0xa5; 100], GuestAddress(8 * PAGE - 10))
        .unwrap();
    // 0x2000 bytes from 0x100 before region A's end into region B: A 15, B 0 and 1.
    let n = mem
        .write(&[0x5a; 0x2000], GuestAddress(A_PAGES * PAGE - 0x100))
        .unwrap();
    assert_eq!(n, 0x2000, "the write did not cross into region B");
    // One byte, last of region B.
    mem.write_obj(7u8, GuestAddress((A_PAGES + B_PAGES) * PAGE - 1))
        .unwrap();
    (vec![3, 4, 5, 7, 8, 15], vec![0, 1, B_PAGES - 1])
}

fn check_data(mem: &GuestMemoryMmap<VmmBitmap>) {
    assert_eq!(
        mem.read_obj::<u64>(GuestAddress(5 * PAGE - 4)).unwrap(),
        u64::MAX
    );
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(A_PAGES * PAGE + 0x1eff))
            .unwrap(),
        0x5a
    );
}

#[test]
fn from_ranges_logs_exactly_the_pages_written() {
    let mem = GuestMemoryMmap::<VmmBitmap>::from_ranges(&[
        (GuestAddress(0), (A_PAGES * PAGE) as usize),
        (GuestAddress(A_PAGES * PAGE), (B_PAGES * PAGE) as usize),
    ])
    .unwrap();
    // The bitmap of each region, as a harvester would hold it.
    let bits: Vec<Arc<DirtyBitmap>> = mem
        .iter()
        .map(|r| GuestMemoryRegion::bitmap(r).bitmap().clone())
        .collect();
    assert_eq!(bits.len(), 2);
    assert_eq!((bits[0].npages(), bits[1].npages()), (A_PAGES, B_PAGES));
    assert!(bits.iter().all(|b| b.count() == 0), "fresh memory is dirty");

    let (want_a, want_b) = write_all(&mem);
    check_data(&mem);
    assert_eq!(take_pages(&bits[0]), want_a);
    assert_eq!(take_pages(&bits[1]), want_b);

    // Taken means clean; a read dirties nothing; the next write is seen again.
    let _: u64 = mem.read_obj(GuestAddress(9 * PAGE)).unwrap();
    assert!(bits.iter().all(|b| b.count() == 0));
    mem.write_obj(1u32, GuestAddress(9 * PAGE)).unwrap();
    assert_eq!(take_pages(&bits[0]), [9]);
}

#[test]
fn writes_land_in_bitmaps_the_caller_already_holds() {
    let a = Arc::new(DirtyBitmap::new(A_PAGES));
    let b = Arc::new(DirtyBitmap::new(B_PAGES));
    let region = |bits: &Arc<DirtyBitmap>, npages: u64, gpa: u64| {
        let mmap = MmapRegionBuilder::new_with_bitmap(
            (npages * PAGE) as usize,
            VmmBitmap::from_bitmap(bits.clone(), PAGE as usize),
        )
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE)
        .build()
        .unwrap();
        GuestRegionMmap::new(mmap, GuestAddress(gpa)).unwrap()
    };
    let mem = GuestMemoryMmap::from_regions(vec![
        region(&a, A_PAGES, 0),
        region(&b, B_PAGES, A_PAGES * PAGE),
    ])
    .unwrap();
    let (want_a, want_b) = write_all(&mem);
    check_data(&mem);
    assert_eq!(take_pages(&a), want_a);
    assert_eq!(take_pages(&b), want_b);
}

/// Pages a bitmap reports dirty, through `dirty_at` of the whole bitmap and of a slice.
fn dirty_pages<B: Bitmap>(b: &B, npages: u64, page: u64) -> Vec<u64> {
    (0..npages)
        .filter(|&p| b.dirty_at((p * page) as usize))
        .collect()
}

proptest! {
    #[test]
    fn marks_the_same_pages_as_atomic_bitmap(
        npages in 1u64..300,
        shift in 9u32..14,
        marks in prop::collection::vec((0u64..(320 << 13), 0u64..(160 << 13), 0u64..(1 << 14)), 1..20),
    ) {
        let page = 1u64 << shift;
        let bytes = (npages * page) as usize;
        let ours = VmmBitmap::new(bytes, page as usize);
        let theirs = AtomicBitmap::new(bytes, std::num::NonZeroUsize::new(page as usize).unwrap());
        for (offset, len, base) in marks {
            // Through a slice at `base`, as vm-memory marks a VolatileSlice's writes.
            let (o, l, s) = (offset as usize, len as usize, base as usize);
            ours.slice_at(s).mark_dirty(o, l);
            theirs.slice_at(s).mark_dirty(o, l);
            prop_assert_eq!(dirty_pages(&ours, npages, page), dirty_pages(&theirs, npages, page));
        }
        // The words in KVM's layout equal AtomicBitmap's.
        let mut words = vec![0u64; ours.bitmap().words()];
        ours.bitmap().take_or_into(&mut words);
        prop_assert_eq!(words, theirs.get_and_reset());
        // dirty_at agrees on every offset's page, inside and past the end.
        for off in [0, page - 1, page, bytes as u64 - 1, bytes as u64, u64::MAX] {
            prop_assert_eq!(ours.dirty_at(off as usize), theirs.dirty_at(off as usize));
        }
    }
}
