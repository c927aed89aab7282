//! Memslots: `struct kvm_memory_slot` and the validation of `KVM_SET_USER_MEMORY_REGION`.

use std::collections::BTreeMap;

use crate::bitmap::DirtyBitmap;
use crate::error::{Error, Result};
use crate::sync::Arc;

/// `KVM_MEM_LOG_DIRTY_PAGES`.
pub const KVM_MEM_LOG_DIRTY_PAGES: u32 = 1 << 0;
/// `KVM_MEM_READONLY`.
pub const KVM_MEM_READONLY: u32 = 1 << 1;
/// `KVM_MEM_MAX_NR_PAGES`: `(1 << 31) - 1`.
pub const KVM_MEM_MAX_NR_PAGES: u64 = (1 << 31) - 1;

/// `struct kvm_userspace_memory_region`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryRegion {
    /// `as_id << 16 | id`.
    pub slot: u32,
    pub flags: u32,
    pub guest_phys_addr: u64,
    /// 0 deletes the slot.
    pub memory_size: u64,
    pub userspace_addr: u64,
}

/// What a `set_user_memory_region` call does (`enum kvm_mr_change`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MrChange {
    Create,
    Delete,
    Move,
    FlagsOnly,
}

/// One memslot. Immutable once published: a change builds a new `Memslot` (sharing the
/// bitmap when logging stays on), as KVM swaps memslot arrays under SRCU.
#[derive(Debug)]
pub struct Memslot {
    pub as_id: u16,
    pub id: u16,
    pub base_gfn: u64,
    pub npages: u64,
    pub userspace_addr: u64,
    pub flags: u32,
    pub(crate) dirty_bitmap: Option<Arc<DirtyBitmap>>,
}

impl Memslot {
    /// `as_id << 16 | id`, the value in `kvm_dirty_log.slot` and ring entries.
    pub fn slot_word(&self) -> u32 {
        (self.as_id as u32) << 16 | self.id as u32
    }

    /// The dirty bitmap, if logging is on and the VM uses bitmaps.
    pub fn dirty_bitmap(&self) -> Option<&DirtyBitmap> {
        self.dirty_bitmap.as_deref()
    }

    /// Is dirty tracking enabled (`kvm_slot_dirty_track_enabled`)?
    pub fn logging(&self) -> bool {
        self.flags & KVM_MEM_LOG_DIRTY_PAGES != 0
    }

    /// Does the slot contain `gfn`?
    pub fn contains(&self, gfn: u64) -> bool {
        gfn >= self.base_gfn && gfn - self.base_gfn < self.npages
    }
}

/// The memslots of a VM, all address spaces. Readers hold an `Arc` snapshot.
#[derive(Debug, Default)]
pub struct MemslotSet {
    slots: BTreeMap<(u16, u16), Arc<Memslot>>,
}

impl MemslotSet {
    /// Look a slot up by id (`id_to_memslot`).
    pub fn get(&self, as_id: u16, id: u16) -> Option<&Arc<Memslot>> {
        self.slots.get(&(as_id, id))
    }

    /// The slot containing `gfn` in address space `as_id` (`gfn_to_memslot`).
    pub fn find_gfn(&self, as_id: u16, gfn: u64) -> Option<&Arc<Memslot>> {
        self.slots
            .values()
            .find(|s| s.as_id == as_id && s.contains(gfn))
    }

    /// Every slot.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Memslot>> {
        self.slots.values()
    }

    pub(crate) fn insert(&mut self, s: Arc<Memslot>) {
        self.slots.insert((s.as_id, s.id), s);
    }

    pub(crate) fn remove(&mut self, as_id: u16, id: u16) {
        self.slots.remove(&(as_id, id));
    }
}

/// Split `as_id << 16 | id`.
pub fn split_slot(slot: u32) -> (u16, u16) {
    ((slot >> 16) as u16, slot as u16)
}

/// Validate `region` against the current slots (`__kvm_set_memory_region`, in the kernel's
/// order) and classify the change. `Ok(None)` means "no change".
pub fn check_region(
    set: &MemslotSet,
    r: &MemoryRegion,
    page_size: u64,
    nr_as: u16,
    max_slots: u16,
) -> Result<Option<MrChange>> {
    if r.flags & !(KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY) != 0 {
        return Err(Error::InvalidRegion("unknown flags"));
    }
    let (as_id, id) = split_slot(r.slot);
    if as_id >= nr_as || id >= max_slots {
        return Err(Error::InvalidRegion(
            "slot id or address space out of range",
        ));
    }
    if r.memory_size & (page_size - 1) != 0 {
        return Err(Error::InvalidRegion("memory_size is not page aligned"));
    }
    if r.guest_phys_addr & (page_size - 1) != 0 {
        return Err(Error::InvalidRegion("guest_phys_addr is not page aligned"));
    }
    if r.userspace_addr & (page_size - 1) != 0 {
        return Err(Error::InvalidRegion("userspace_addr is not page aligned"));
    }
    if r.guest_phys_addr.checked_add(r.memory_size).is_none() {
        return Err(Error::InvalidRegion(
            "guest_phys_addr + memory_size overflows",
        ));
    }
    if r.memory_size / page_size > KVM_MEM_MAX_NR_PAGES {
        return Err(Error::InvalidRegion("more than KVM_MEM_MAX_NR_PAGES pages"));
    }
    let old = set.get(as_id, id);
    if r.memory_size == 0 {
        return match old {
            Some(_) => Ok(Some(MrChange::Delete)),
            None => Err(Error::InvalidRegion(
                "deleting a memslot that does not exist",
            )),
        };
    }
    let base_gfn = r.guest_phys_addr / page_size;
    let npages = r.memory_size / page_size;
    let change = match old {
        None => MrChange::Create,
        Some(o) => {
            if r.userspace_addr != o.userspace_addr
                || npages != o.npages
                || (r.flags ^ o.flags) & KVM_MEM_READONLY != 0
            {
                return Err(Error::InvalidRegion(
                    "a memslot's size, userspace_addr and READONLY flag cannot change",
                ));
            }
            if base_gfn != o.base_gfn {
                MrChange::Move
            } else if r.flags != o.flags {
                MrChange::FlagsOnly
            } else {
                return Ok(None);
            }
        }
    };
    if matches!(change, MrChange::Create | MrChange::Move) {
        for s in set.iter() {
            if s.as_id == as_id
                && s.id != id
                && base_gfn < s.base_gfn + s.npages
                && s.base_gfn < base_gfn + npages
            {
                return Err(Error::RegionOverlap { id: s.id });
            }
        }
    }
    Ok(Some(change))
}
