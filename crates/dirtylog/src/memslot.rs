//! Memslots: `struct kvm_memory_slot` and the validation of `KVM_SET_USER_MEMORY_REGION`.

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::OnceLock;

use crate::bitmap::DirtyBitmap;
use crate::error::{Error, Result};
use crate::sync::Arc;

/// `KVM_MEM_LOG_DIRTY_PAGES`.
pub const KVM_MEM_LOG_DIRTY_PAGES: u32 = 1 << 0;
/// `KVM_MEM_READONLY`.
pub const KVM_MEM_READONLY: u32 = 1 << 1;
/// x86-64's `TASK_SIZE_MAX` with 4-level paging: the end of the user address space that
/// `access_ok()` checks a memslot's host range against.
pub const TASK_SIZE_MAX: u64 = (1 << 47) - 4096;
/// `KVM_MEM_MAX_NR_PAGES`: `(1 << 31) - 1`.
pub const KVM_MEM_MAX_NR_PAGES: u64 = (1 << 31) - 1;

/// `struct kvm_userspace_memory_region`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryRegion {
    /// `as_id << 16 | id`.
    pub slot: u32,
    /// [`KVM_MEM_LOG_DIRTY_PAGES`] and/or [`KVM_MEM_READONLY`].
    pub flags: u32,
    /// Guest-physical address of the first byte, page aligned.
    pub guest_phys_addr: u64,
    /// Bytes, a multiple of the page size; 0 deletes the slot.
    pub memory_size: u64,
    /// Host virtual address of the first byte, page aligned.
    pub userspace_addr: u64,
}

/// What a `set_user_memory_region` call does (`enum kvm_mr_change`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MrChange {
    /// `KVM_MR_CREATE`: a new slot.
    Create,
    /// `KVM_MR_DELETE`: `memory_size` 0 on an existing slot.
    Delete,
    /// `KVM_MR_MOVE`: an existing slot at a new guest address.
    Move,
    /// `KVM_MR_FLAGS_ONLY`: an existing slot with new flags (e.g. logging on or off).
    FlagsOnly,
}

/// One memslot. Immutable once published: a change builds a new `Memslot` (sharing the
/// bitmap when logging stays on), as KVM swaps memslot arrays under SRCU.
#[derive(Debug)]
pub struct Memslot {
    /// The address space (`slot >> 16`).
    pub as_id: u16,
    /// The slot id within it (`slot & 0xffff`).
    pub id: u16,
    /// The first guest frame number.
    pub base_gfn: u64,
    /// Pages in the slot.
    pub npages: u64,
    /// Host virtual address of the first page.
    pub userspace_addr: u64,
    /// `KVM_MEM_*` flags.
    pub flags: u32,
    pub(crate) dirty_bitmap: Option<Arc<DirtyBitmap>>,
    /// The arch's per-slot data (KVM's `slot->arch`): created on first use, shared with the
    /// next version of the slot across flags-only changes, fresh for a new or moved slot
    /// (whose translations are zapped). std's `Arc` even under loom: not part of the protocol.
    pub(crate) arch: SlotArch,
    /// `KVM_MEMSLOT_INVALID`: being deleted or moved; vCPUs touching it retry.
    pub invalid: bool,
}

/// Storage for [`Memslot::arch_data`].
pub(crate) type SlotArch = std::sync::Arc<OnceLock<Box<dyn Any + Send + Sync>>>;

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

    /// A copy sharing this version's bitmap and arch data.
    pub(crate) fn clone_version(&self) -> Memslot {
        Memslot {
            as_id: self.as_id,
            id: self.id,
            base_gfn: self.base_gfn,
            npages: self.npages,
            userspace_addr: self.userspace_addr,
            flags: self.flags,
            dirty_bitmap: self.dirty_bitmap.clone(),
            arch: self.arch.clone(),
            invalid: self.invalid,
        }
    }

    /// The arch's data for this slot, created by `init` on first use. One arch per VM, so
    /// one type per slot: asking for another type is a bug and panics.
    pub fn arch_data<T: Any + Send + Sync>(&self, init: impl FnOnce() -> T) -> &T {
        self.arch
            .get_or_init(|| Box::new(init()))
            .downcast_ref()
            .expect("one arch data type per memslot")
    }

    /// The arch's data for this slot, if created.
    pub fn arch_data_if_present<T: Any + Send + Sync>(&self) -> Option<&T> {
        self.arch.get().and_then(|b| b.downcast_ref())
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
    // `access_ok()`: the host range must lie in the user address space.
    match r.userspace_addr.checked_add(r.memory_size) {
        Some(end) if end <= TASK_SIZE_MAX => {}
        _ => {
            return Err(Error::InvalidRegion(
                "userspace_addr + memory_size is outside the user address space",
            ))
        }
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
