//! The stream header: page size, vCPU count and the guest memory map, validated once so that
//! every later range can be checked against it.

use super::{
    Fields, Fixed, WireError, MAX_GUEST_MEMORY, MAX_PAGE_SIZE, MAX_REGIONS, MAX_VCPUS,
    MIN_PAGE_SIZE,
};

/// Bytes of one region entry on the wire: slot u32, gpa u64, size u64.
pub(super) const REGION_ENTRY: usize = 20;

/// One region of guest memory (a KVM memslot) in the stream's memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Region {
    /// Slot id; unique within the map.
    pub slot: u32,
    /// Guest physical address of the first byte; page-aligned.
    pub gpa: u64,
    /// Size in bytes; page-aligned and non-zero.
    pub size: u64,
}

/// A run of whole pages in one region: pages `first_page..first_page + npages` of `slot`,
/// counted from the region's start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PageRange {
    /// Slot id of the region.
    pub slot: u32,
    /// First page, relative to the region's start.
    pub first_page: u64,
    /// Number of pages; at least 1.
    pub npages: u64,
}

/// What a stream declares about the guest before any message. Always valid: the only way to
/// get one is [`StreamHeader::new`] (or decoding, which calls it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamHeader {
    page_size: u32,
    vcpu_count: u32,
    regions: Vec<Region>,
}

impl StreamHeader {
    /// Validate and build a header: `page_size` a power of two in
    /// [`MIN_PAGE_SIZE`]`..=`[`MAX_PAGE_SIZE`], `vcpu_count` in `1..=`[`MAX_VCPUS`], at most
    /// [`MAX_REGIONS`] regions, each non-empty and page-aligned, with unique slot ids, no two
    /// overlapping, adding up to at most [`MAX_GUEST_MEMORY`].
    pub fn new(page_size: u32, vcpu_count: u32, regions: Vec<Region>) -> Result<Self, WireError> {
        if !page_size.is_power_of_two() || !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page_size) {
            return Err(WireError::PageSize(page_size));
        }
        if !(1..=MAX_VCPUS).contains(&vcpu_count) {
            return Err(WireError::VcpuCount(vcpu_count));
        }
        if regions.len() > MAX_REGIONS {
            return Err(WireError::TooManyRegions(regions.len()));
        }
        for r in &regions {
            check_region(r, u64::from(page_size))?;
        }
        let total = regions
            .iter()
            .fold(0u64, |sum, r| sum.saturating_add(r.size));
        if total > MAX_GUEST_MEMORY {
            return Err(WireError::TooMuchMemory(total));
        }
        check_disjoint(&regions)?;
        Ok(StreamHeader {
            page_size,
            vcpu_count,
            regions,
        })
    }

    /// Page size in bytes.
    pub fn page_size(&self) -> u32 {
        self.page_size
    }

    /// Number of vCPUs; `VcpuState` ids are below it.
    pub fn vcpu_count(&self) -> u32 {
        self.vcpu_count
    }

    /// The memory map, in the order given to [`StreamHeader::new`]. A region's index here is
    /// the index [`GuestMemoryMut::region_mut`](super::GuestMemoryMut::region_mut) receives.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// The index and region of `slot`. A linear search: maps have a handful of regions and at
    /// most [`MAX_REGIONS`].
    pub fn region(&self, slot: u32) -> Result<(usize, &Region), WireError> {
        self.regions
            .iter()
            .enumerate()
            .find(|(_, r)| r.slot == slot)
            .ok_or(WireError::UnknownSlot(slot))
    }

    /// Check that `range` is non-empty and lies inside its region; returns the region's index.
    pub fn check_range(&self, range: PageRange) -> Result<usize, WireError> {
        let (index, region) = self.region(range.slot)?;
        if range.npages == 0 {
            return Err(WireError::EmptyRange {
                slot: range.slot,
                first_page: range.first_page,
            });
        }
        let region_pages = region.size / u64::from(self.page_size);
        let end = u128::from(range.first_page) + u128::from(range.npages);
        if end > u128::from(region_pages) {
            return Err(WireError::RangePastEnd {
                slot: range.slot,
                first_page: range.first_page,
                end,
                region_pages,
            });
        }
        Ok(index)
    }

    /// [`check_range`](Self::check_range), and that `data_len` bytes are exactly its pages.
    pub(super) fn check_pages(
        &self,
        range: PageRange,
        data_len: usize,
    ) -> Result<usize, WireError> {
        let index = self.check_range(range)?;
        // In range, so at most MAX_GUEST_MEMORY bytes: no overflow.
        if range.npages * u64::from(self.page_size) != data_len as u64 {
            return Err(WireError::PagesLength {
                npages: range.npages,
                page_size: self.page_size,
                data_len,
            });
        }
        Ok(index)
    }

    /// The header frame's fixed fields and region entries.
    pub(super) fn encode(&self) -> (Fixed, Vec<u8>) {
        // At most MAX_REGIONS (512), so the count fits in u32.
        let fixed = Fixed::default()
            .u32(self.page_size)
            .u32(self.vcpu_count)
            .u32(self.regions.len() as u32);
        let mut entries = Vec::with_capacity(self.regions.len() * REGION_ENTRY);
        for r in &self.regions {
            let entry = Fixed::default().u32(r.slot).u64(r.gpa).u64(r.size);
            entries.extend_from_slice(entry.as_bytes());
        }
        (fixed, entries)
    }

    /// Parse and validate a header frame's payload.
    pub(super) fn decode(fixed: &[u8], entries: &[u8]) -> Result<Self, WireError> {
        let mut f = Fields(fixed);
        let (page_size, vcpu_count, declared) = (f.u32(), f.u32(), f.u32());
        if entries.len() as u64 != u64::from(declared) * REGION_ENTRY as u64 {
            return Err(WireError::RegionCount {
                declared,
                bytes: entries.len(),
            });
        }
        let regions = entries.chunks_exact(REGION_ENTRY).map(|e| {
            let mut f = Fields(e);
            Region {
                slot: f.u32(),
                gpa: f.u64(),
                size: f.u64(),
            }
        });
        StreamHeader::new(page_size, vcpu_count, regions.collect())
    }
}

fn check_region(r: &Region, page_size: u64) -> Result<(), WireError> {
    let why = if r.size == 0 {
        "is empty"
    } else if r.gpa % page_size != 0 || r.size % page_size != 0 {
        "is not page-aligned"
    } else if r.gpa.checked_add(r.size).is_none() {
        "wraps past the end of the address space"
    } else {
        return Ok(());
    };
    Err(WireError::BadRegion {
        slot: r.slot,
        gpa: r.gpa,
        size: r.size,
        why,
    })
}

/// Unique slot ids and no overlap in guest physical memory. Regions have been checked not to
/// wrap, so `gpa + size` does not overflow.
fn check_disjoint(regions: &[Region]) -> Result<(), WireError> {
    let mut by_slot: Vec<&Region> = regions.iter().collect();
    by_slot.sort_unstable_by_key(|r| r.slot);
    if let Some(w) = by_slot.windows(2).find(|w| w[0].slot == w[1].slot) {
        return Err(WireError::DuplicateSlot(w[0].slot));
    }
    let mut by_gpa = by_slot;
    by_gpa.sort_unstable_by_key(|r| r.gpa);
    match by_gpa.windows(2).find(|w| w[0].gpa + w[0].size > w[1].gpa) {
        Some(w) => Err(WireError::OverlappingRegions(w[0].slot, w[1].slot)),
        None => Ok(()),
    }
}
