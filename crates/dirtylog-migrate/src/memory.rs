//! Guest memory as the engines see it: a table of regions ([`Region`]: slot, guest physical
//! address, size), the host mapping of each ([`RegionMemory`]), and optionally the VMM's own
//! record of its writes to each (a [`DirtyBitmap`], e.g. a [`VmmBitmap`]'s).
//!
//! Implement [`MigrationMemory`] over your own mappings with [`RegionMemory::new`] (an
//! `unsafe` promise about the mapping), or use guest memory from vm-memory as it is:
//! [`vm_memory::GuestMemoryMmap`] implements it (regions in address order, slot = index, 4 KiB
//! pages), and [`SlotTable`] gives its regions your own slot ids and page size. With
//! `GuestMemoryMmap<dirtylog::bitmap::VmmBitmap>`, every VMM write through vm-memory is
//! logged, and the engine takes those logs as the VMM bitmaps ([`RegionBitmap`]).

use dirtylog::bitmap::VmmBitmap;
use dirtylog::DirtyBitmap;
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MmapRegion};

use crate::wire::Region;

/// The page size [`GuestMemoryMmap`]'s implementation of [`MigrationMemory`] reports: x86's
/// 4 KiB, the granularity of KVM's dirty log.
pub const DEFAULT_PAGE_SIZE: u32 = 4096;

/// The host mapping of one region of guest memory: `len` bytes at a host address, which the
/// engine reads (source) or writes (target) with word-sized atomic accesses while vCPUs may
/// write the same memory. No Rust reference to guest memory is ever made from it outside the
/// crate's own narrow, documented uses, so it is an address and a length only.
///
/// Built with the `unsafe` [`RegionMemory::new`], or safely from a vm-memory region through
/// [`MigrationMemory`]'s implementation for [`GuestMemoryMmap`].
#[derive(Clone, Copy, Debug)]
pub struct RegionMemory {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a `RegionMemory` is an address and a length; every access through it goes through
// `crate::guestmem`, whose functions state their own concurrency contracts, and the creator
// promised (`RegionMemory::new`) that the mapping stays valid for the migration.
unsafe impl Send for RegionMemory {}
// SAFETY: as for `Send`.
unsafe impl Sync for RegionMemory {}

impl RegionMemory {
    /// The region of `len` bytes at host address `ptr`.
    ///
    /// # Safety
    /// For as long as any migration engine ([`send`](crate::send()), [`receive`](crate::receive())
    /// and their variants) that was handed this value runs:
    /// - `ptr..ptr + len` is one readable and writable mapping of this process, and `ptr` is
    ///   8-byte aligned (an `mmap`ed region is page-aligned);
    /// - on a source, only vCPUs and the VMM write it while the guest runs, and nobody at
    ///   all between [`Vcpus::pause`](crate::Vcpus::pause) and the resume; the engine only
    ///   reads it, with word-sized relaxed atomic loads;
    /// - on a target, nobody but the engine touches it until
    ///   [`VcpuRestore::resume`](crate::VcpuRestore::resume); the engine writes disjoint
    ///   ranges of it from several threads.
    pub unsafe fn new(ptr: *mut u8, len: usize) -> Self {
        RegionMemory { ptr, len }
    }

    /// The host address of the first byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// The size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Is the region empty?
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A VM's guest memory, as the migration engines need it.
///
/// Regions are named by their **index** in [`regions`](Self::regions) (the order of the stream
/// header's memory map); the slot ids are the names on the wire. On a source, the same index
/// names the region for the [`DirtyTracker`](crate::DirtyTracker) too.
///
/// A target's memory must have the regions of the stream header it was built from, in the same
/// order and with the same guest addresses and sizes (slot ids may differ), zero-filled.
pub trait MigrationMemory: Sync {
    /// Page size of the dirty log and of the stream, a power of two ≥ 4096.
    fn page_size(&self) -> u32;
    /// The memory map: slot, guest physical address and size of each region.
    fn regions(&self) -> Vec<Region>;
    /// The host mapping of region `index`; its length must equal the region's size.
    fn region_memory(&self, index: usize) -> Option<RegionMemory>;
    /// The VMM's own record of its writes to region `index` (device models, emulated DMA),
    /// which a hypervisor's dirty log cannot see. On a source, the engine takes its bits at
    /// every harvest and merges them with the tracker's. `None` (the default) if the VMM
    /// does not write guest memory, or records its writes otherwise.
    fn vmm_bitmap(&self, index: usize) -> Option<&DirtyBitmap> {
        let _ = index;
        None
    }
    /// Does a page of region `index` that this process has never populated (neither in its
    /// page tables nor swapped out, as `PAGEMAP_SCAN` or `/proc/self/pagemap` tell) hold
    /// zeros? Then a source's bulk pass skips such pages without reading them: a guest of
    /// 4 GiB that touched 64 MiB costs a pass over 64 MiB, not 4 GiB of page faults on the
    /// zero page. (The source's digest still reads every page, so a wrong answer is caught
    /// by the check, not silently kept.)
    ///
    /// Answer `true` only for **private anonymous** memory (`MAP_PRIVATE | MAP_ANONYMOUS`)
    /// that no userfaultfd missing-mode handler fills on demand: a file or shared mapping
    /// (memfd, shmem, hugetlbfs files) keeps data in the page cache whether or not this
    /// process maps it, and a lazily restored guest (Firecracker's snapshot restore, dirtylog
    /// snapshot's `--lazy`) has pages that exist before they are faulted in. `false` (the
    /// default): every page is read.
    fn unpopulated_is_zero(&self, index: usize) -> bool {
        let _ = index;
        false
    }
}

/// What a vm-memory region's bitmap `B` gives the engine: with dirtylog's
/// [`VmmBitmap`], its [`DirtyBitmap`] (whose page size must be the migration's); with `()`,
/// nothing.
pub trait RegionBitmap {
    /// The VMM's record of its writes, if this bitmap keeps one the engine can take.
    fn vmm_bitmap(&self) -> Option<&DirtyBitmap> {
        None
    }
}

impl RegionBitmap for () {}

impl RegionBitmap for VmmBitmap {
    fn vmm_bitmap(&self) -> Option<&DirtyBitmap> {
        Some(self.bitmap())
    }
}

impl<M: MigrationMemory + ?Sized> MigrationMemory for &M {
    fn page_size(&self) -> u32 {
        (**self).page_size()
    }
    fn regions(&self) -> Vec<Region> {
        (**self).regions()
    }
    fn region_memory(&self, index: usize) -> Option<RegionMemory> {
        (**self).region_memory(index)
    }
    fn vmm_bitmap(&self, index: usize) -> Option<&DirtyBitmap> {
        (**self).vmm_bitmap(index)
    }
    fn unpopulated_is_zero(&self, index: usize) -> bool {
        (**self).unpopulated_is_zero(index)
    }
}

/// vm-memory's guest memory: its regions in address order, slot `i` for the `i`-th, pages of
/// [`DEFAULT_PAGE_SIZE`], and, with `B` = [`VmmBitmap`], each region's log of VMM writes.
/// Wrap it in a [`SlotTable`] for other slot ids or another page size.
///
/// [`unpopulated_is_zero`](MigrationMemory::unpopulated_is_zero) is left `false`: vm-memory
/// regions may map files or be filled by a userfaultfd handler, which only the VMM knows; a
/// VMM whose regions are private anonymous memory says so with
/// [`SlotTable::with_unpopulated_zero`].
///
/// Safe: a `GuestMemoryMmap` is immutable and keeps each region's mapping alive (and its
/// host address and length valid) for as long as it lives, which covers any migration that
/// borrows it; `mmap`ed regions are page-aligned.
impl<B: Bitmap + RegionBitmap + Send + Sync> MigrationMemory for GuestMemoryMmap<B> {
    fn page_size(&self) -> u32 {
        DEFAULT_PAGE_SIZE
    }

    fn regions(&self) -> Vec<Region> {
        self.iter()
            .zip(0u32..)
            .map(|(r, slot)| Region {
                slot,
                gpa: r.start_addr().0,
                size: r.len(),
            })
            .collect()
    }

    fn region_memory(&self, index: usize) -> Option<RegionMemory> {
        let r = self.iter().nth(index)?;
        // SAFETY: the mapping of a `GuestRegionMmap` is valid for `size()` bytes from
        // `as_ptr()` while the region lives, and the region lives as long as `self`, which
        // outlives any migration that borrows it; mmap'ed memory is page-aligned (checked
        // again by the engine). The concurrency rules are the caller's memory contract.
        Some(unsafe { RegionMemory::new(r.as_ptr(), r.size()) })
    }

    fn vmm_bitmap(&self, index: usize) -> Option<&DirtyBitmap> {
        let mapping: &MmapRegion<B> = self.iter().nth(index)?;
        RegionBitmap::vmm_bitmap(mapping.bitmap())
    }
}

/// Any [`MigrationMemory`] with the caller's slot ids and page size: for example a vm-memory
/// [`GuestMemoryMmap`] whose regions are KVM memslots numbered by the VMM.
///
/// ```
/// use dirtylog_migrate::{MigrationMemory, SlotTable};
/// use vm_memory::{GuestAddress, GuestMemoryMmap};
///
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[
///     (GuestAddress(0), 1 << 20),
///     (GuestAddress(1 << 32), 2 << 20),
/// ])
/// .unwrap();
/// let table = SlotTable::new(&mem, vec![0, 7]).unwrap();
/// let regions = table.regions();
/// assert_eq!((regions[1].slot, regions[1].gpa, regions[1].size), (7, 1 << 32, 2 << 20));
/// ```
#[derive(Debug)]
pub struct SlotTable<M> {
    memory: M,
    slots: Vec<u32>,
    page_size: u32,
    unpopulated_zero: bool,
}

impl<M: MigrationMemory> SlotTable<M> {
    /// `memory` with slot `slots[i]` for its `i`-th region, and its own page size. `None` if
    /// `slots` does not have one id per region.
    pub fn new(memory: M, slots: Vec<u32>) -> Option<Self> {
        let page_size = memory.page_size();
        Self::with_page_size(memory, slots, page_size)
    }

    /// As [`new`](Self::new), with pages of `page_size` bytes (checked, with the layout, when
    /// a migration starts).
    pub fn with_page_size(memory: M, slots: Vec<u32>, page_size: u32) -> Option<Self> {
        (memory.regions().len() == slots.len()).then_some(SlotTable {
            memory,
            slots,
            page_size,
            unpopulated_zero: false,
        })
    }

    /// Say that every region is private anonymous memory that no userfaultfd handler fills,
    /// so that pages never populated are zeros the bulk pass may skip unread (see
    /// [`MigrationMemory::unpopulated_is_zero`] for what that promise means).
    pub fn with_unpopulated_zero(mut self) -> Self {
        self.unpopulated_zero = true;
        self
    }
}

impl<M: MigrationMemory> MigrationMemory for SlotTable<M> {
    fn page_size(&self) -> u32 {
        self.page_size
    }

    fn regions(&self) -> Vec<Region> {
        self.memory
            .regions()
            .into_iter()
            .zip(&self.slots)
            .map(|(r, &slot)| Region { slot, ..r })
            .collect()
    }

    fn region_memory(&self, index: usize) -> Option<RegionMemory> {
        self.memory.region_memory(index)
    }

    fn vmm_bitmap(&self, index: usize) -> Option<&DirtyBitmap> {
        self.memory.vmm_bitmap(index)
    }

    fn unpopulated_is_zero(&self, index: usize) -> bool {
        self.unpopulated_zero || self.memory.unpopulated_is_zero(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    #[test]
    fn guest_memory_mmap_regions_in_order() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 4 << 12),
            (GuestAddress(1 << 30), 8 << 12),
        ])
        .unwrap();
        let regions = mem.regions();
        assert_eq!(
            regions,
            vec![
                Region {
                    slot: 0,
                    gpa: 0,
                    size: 4 << 12
                },
                Region {
                    slot: 1,
                    gpa: 1 << 30,
                    size: 8 << 12
                },
            ]
        );
        for (i, r) in regions.iter().enumerate() {
            let m = mem.region_memory(i).unwrap();
            assert_eq!(m.len() as u64, r.size);
            assert_eq!(m.as_ptr() as usize % 4096, 0);
        }
        assert!(mem.region_memory(2).is_none());
        assert!(mem.vmm_bitmap(0).is_none());

        // With dirtylog's VmmBitmap, VMM writes through vm-memory reach the engine.
        use vm_memory::Bytes;
        let mem = GuestMemoryMmap::<VmmBitmap>::from_ranges(&[
            (GuestAddress(0), 4 << 12),
            (GuestAddress(1 << 30), 128 << 12),
        ])
        .unwrap();
        mem.write_obj(7u64, GuestAddress((1 << 30) + 65 * 4096 + 8))
            .unwrap();
        let bits = mem.vmm_bitmap(1).unwrap();
        assert_eq!(bits.words(), 2);
        let mut out = [0u64; 2];
        bits.take_or_into(&mut out);
        assert_eq!(out, [0, 0b10]);
        bits.take_or_into(&mut out);
        assert_eq!(out, [0, 0b10], "taken once, ORed, not set again");
        let mut none = [0u64; 1];
        mem.vmm_bitmap(0).unwrap().take_or_into(&mut none);
        assert_eq!(none, [0]);
        assert!(SlotTable::new(&mem, vec![1]).is_none());
        let t = SlotTable::with_page_size(&mem, vec![5, 9], 8192).unwrap();
        assert_eq!(t.page_size(), 8192);
        assert_eq!(t.regions()[1].slot, 9);
        // Unpopulated pages are zeros only on the VMM's word.
        assert!(!mem.unpopulated_is_zero(1) && !t.unpopulated_is_zero(1));
        assert!(t.with_unpopulated_zero().unpopulated_is_zero(1));
    }
}
