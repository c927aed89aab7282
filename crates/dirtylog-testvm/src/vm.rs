//! A KVM VM with the dirty-log state this crate manages: memslots backed by
//! [`GuestMemory`], manual protect, the dirty ring, and vCPUs (with their rings mapped).
//!
//! The VM tracks every memslot it creates, so the safe [`KvmVm::get_dirty_log`] can check the
//! caller's buffer against the slot's size before the kernel writes to it, and so guest memory
//! stays mapped while any memslot or vCPU can reach it.

use std::collections::BTreeMap;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::{Arc, Mutex};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use crate::error::{Error, Op, Result};
use crate::memory::GuestMemory;
use crate::ring::RingMap;
use crate::sys::{
    self, RingFlavor, KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    KVM_MEM_LOG_DIRTY_PAGES,
};

/// The only `KVM_GET_API_VERSION` there has ever been.
pub const KVM_API_VERSION: i32 = 12;

/// A memslot created through [`KvmVm`].
#[derive(Debug, Clone)]
pub struct Slot {
    /// `as_id << 16 | id`.
    pub slot: u32,
    /// Guest physical address of the first byte.
    pub guest_phys_addr: u64,
    /// `KVM_MEM_*` flags currently set.
    pub flags: u32,
    /// Size in host pages.
    pub npages: u64,
    /// The backing memory.
    pub mem: Arc<GuestMemory>,
}

impl Slot {
    /// Is dirty logging on?
    pub fn logging(&self) -> bool {
        self.flags & KVM_MEM_LOG_DIRTY_PAGES != 0
    }

    /// Words of this slot's dirty bitmap.
    pub fn bitmap_words(&self) -> usize {
        sys::bitmap_words(self.npages)
    }
}

/// Guest memory that some memslot uses; vCPUs hold this too, so memory stays mapped until no
/// vCPU can run (a guest write into memory unmapped and reused by the host would corrupt it).
type Pins = Arc<Mutex<BTreeMap<u32, Arc<GuestMemory>>>>;

fn pin(p: &Pins) -> std::sync::MutexGuard<'_, BTreeMap<u32, Arc<GuestMemory>>> {
    dirtylog::sync::lock(p)
}

/// The dirty ring as enabled on a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct RingSetup {
    /// Which capability.
    pub flavor: RingFlavor,
    /// Entries per vCPU.
    pub entries: u32,
}

/// A VM.
#[derive(Debug)]
pub struct KvmVm {
    // Field order is drop order: the VM fd closes before memory is unmapped.
    fd: Arc<VmFd>,
    kvm: Kvm,
    slots: BTreeMap<u32, Slot>,
    pins: Pins,
    manual_protect: u64,
    ring: Option<RingSetup>,
    vcpus: u32,
}

impl AsRawFd for KvmVm {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Open `/dev/kvm` (or `path`) and check the API version.
pub fn open_kvm(path: Option<&Path>) -> Result<Kvm> {
    let path = path.unwrap_or(Path::new("/dev/kvm"));
    let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
        Error::Config(format!(
            "KVM device path {} contains a NUL byte",
            path.display()
        ))
    })?;
    let kvm = Kvm::new_with_path(cpath).map_err(|e| Error::from_sys(Op::OpenKvm, e))?;
    let v = kvm.get_api_version();
    if v != KVM_API_VERSION {
        return Err(Error::Config(format!(
            "KVM_GET_API_VERSION returned {v}, expected {KVM_API_VERSION}"
        )));
    }
    Ok(kvm)
}

impl KvmVm {
    /// Open `/dev/kvm` and create a VM.
    pub fn new() -> Result<Self> {
        Self::with_kvm(open_kvm(None)?)
    }

    /// Create a VM on an open KVM system fd.
    pub fn with_kvm(kvm: Kvm) -> Result<Self> {
        let fd = kvm
            .create_vm()
            .map_err(|e| Error::from_sys(Op::CreateVm, e))?;
        Ok(KvmVm {
            fd: Arc::new(fd),
            kvm,
            slots: BTreeMap::new(),
            pins: Arc::new(Mutex::new(BTreeMap::new())),
            manual_protect: 0,
            ring: None,
            vcpus: 0,
        })
    }

    /// The VM fd.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The VM fd, shared: for a component that holds its own handle on the VM, such as a
    /// `dirtylog_kvm::KvmDirtyTracker<Arc<VmFd>>`. The VM lives until every holder is dropped;
    /// memslots stay as this `KvmVm` made them (changing them through the fd is `unsafe` in
    /// `kvm-ioctls`, and its caller's responsibility).
    pub fn shared_fd(&self) -> Arc<VmFd> {
        self.fd.clone()
    }

    /// The system fd.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// `KVM_CHECK_EXTENSION` on this VM.
    pub fn check_extension(&self, cap: u32) -> Result<i64> {
        sys::check_extension(&*self.fd, cap)
    }

    /// The manual-protect mode last enabled (`args[0]`), 0 if off.
    pub fn manual_protect(&self) -> u64 {
        self.manual_protect
    }

    /// The dirty ring, if enabled.
    pub fn ring(&self) -> Option<RingSetup> {
        self.ring
    }

    /// Enable manual dirty-log protect (`KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE`), with
    /// `KVM_DIRTY_LOG_INITIALLY_SET` if asked. Refuses `INITIALLY_SET` on a VM with a ring, and
    /// bits the kernel does not offer (naming the capability).
    pub fn enable_manual_protect(&mut self, initially_set: bool) -> Result<()> {
        let mut mode = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE;
        if initially_set {
            if self.ring.is_some() {
                return Err(Error::RingWithInitiallySet);
            }
            mode |= KVM_DIRTY_LOG_INITIALLY_SET;
        }
        let offered = self.check_extension(sys::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)?;
        if (offered as u64) & mode != mode {
            return Err(Error::Unsupported {
                what: if initially_set {
                    "manual dirty-log protect with INITIALLY_SET"
                } else {
                    "manual dirty-log protect"
                },
                cap: "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2",
                value: offered,
            });
        }
        self.enable_manual_protect_raw(0, mode)
    }

    /// `KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)` exactly as given (for probing the
    /// kernel's checks). Still refuses `INITIALLY_SET` on a VM with a ring.
    pub fn enable_manual_protect_raw(&mut self, flags: u32, mode: u64) -> Result<()> {
        if self.ring.is_some() && mode & KVM_DIRTY_LOG_INITIALLY_SET != 0 {
            return Err(Error::RingWithInitiallySet);
        }
        sys::enable_manual_protect(&self.fd, flags, mode)?;
        self.manual_protect = mode;
        Ok(())
    }

    /// Enable a dirty ring of `entries` entries per vCPU, preferring
    /// `KVM_CAP_DIRTY_LOG_RING_ACQ_REL`. Must be called before any vCPU exists. Refused on a VM
    /// with `INITIALLY_SET`, or if the kernel has no ring.
    pub fn enable_dirty_ring(&mut self, entries: u32) -> Result<RingSetup> {
        let (flavor, _max) = sys::probe_dirty_ring(&self.fd)?;
        self.enable_dirty_ring_raw(
            flavor,
            0,
            entries as u64 * dirtylog::ring::DIRTY_GFN_BYTES as u64,
        )
    }

    /// `KVM_ENABLE_CAP` of a ring capability with `bytes` and `flags` passed through (for
    /// probing the kernel's checks). Still refuses a ring on a VM with `INITIALLY_SET`.
    pub fn enable_dirty_ring_raw(
        &mut self,
        flavor: RingFlavor,
        flags: u32,
        bytes: u64,
    ) -> Result<RingSetup> {
        if self.manual_protect & KVM_DIRTY_LOG_INITIALLY_SET != 0 {
            return Err(Error::RingWithInitiallySet);
        }
        sys::enable_dirty_ring(&self.fd, flavor, flags, bytes)?;
        let setup = RingSetup {
            flavor,
            entries: (bytes / dirtylog::ring::DIRTY_GFN_BYTES as u64) as u32,
        };
        self.ring = Some(setup);
        Ok(setup)
    }

    /// Create or update memslot `slot` (`as_id << 16 | id`) at `guest_phys_addr`, backed by
    /// all of `mem`, with `flags` (`KVM_MEM_LOG_DIRTY_PAGES`, ...). Updating an existing slot
    /// with the same memory and address changes only its flags.
    pub fn set_memslot(
        &mut self,
        slot: u32,
        guest_phys_addr: u64,
        mem: Arc<GuestMemory>,
        flags: u32,
    ) -> Result<()> {
        let region = kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr,
            memory_size: mem.len() as u64,
            userspace_addr: mem.host_addr(),
        };
        // Pin first: once the ioctl succeeds, vCPUs may write the memory.
        let old = pin(&self.pins).insert(slot, mem.clone());
        // SAFETY: `mem` is a live mapping of exactly `memory_size` bytes, and it is pinned in
        // `pins` (held by the VM and every vCPU) until the slot is deleted.
        let r = unsafe { sys::set_user_memory_region(&self.fd, &region) };
        if let Err(e) = r {
            let mut p = pin(&self.pins);
            match old {
                Some(o) => p.insert(slot, o),
                None => p.remove(&slot),
            };
            return Err(e);
        }
        let npages = mem.len() as u64 / sys::host_page_size();
        self.slots.insert(
            slot,
            Slot {
                slot,
                guest_phys_addr,
                flags,
                npages,
                mem,
            },
        );
        Ok(())
    }

    /// Turn dirty logging of a slot on or off (`KVM_MEM_LOG_DIRTY_PAGES`, a flags-only change).
    /// Turning it off drops the bits not yet fetched, as KVM does.
    pub fn set_logging(&mut self, slot: u32, on: bool) -> Result<()> {
        let s = self
            .slots
            .get(&slot)
            .ok_or(Error::NoSuchSlot(slot))?
            .clone();
        let flags = if on {
            s.flags | KVM_MEM_LOG_DIRTY_PAGES
        } else {
            s.flags & !KVM_MEM_LOG_DIRTY_PAGES
        };
        self.set_memslot(slot, s.guest_phys_addr, s.mem, flags)
    }

    /// Delete a memslot. Its memory is unpinned (KVM no longer maps it once this returns).
    pub fn delete_memslot(&mut self, slot: u32) -> Result<()> {
        let s = self.slots.get(&slot).ok_or(Error::NoSuchSlot(slot))?;
        let region = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: s.guest_phys_addr,
            ..Default::default()
        };
        // SAFETY: memory_size 0 deletes the slot; no memory is handed to the kernel.
        unsafe { sys::set_user_memory_region(&self.fd, &region) }?;
        self.slots.remove(&slot);
        pin(&self.pins).remove(&slot);
        Ok(())
    }

    /// The memslot `slot`, if created here.
    pub fn slot(&self, slot: u32) -> Option<&Slot> {
        self.slots.get(&slot)
    }

    /// Every memslot created here.
    pub fn slots(&self) -> impl Iterator<Item = &Slot> {
        self.slots.values()
    }

    /// `KVM_GET_DIRTY_LOG` of `slot` into `bitmap`, which must hold the slot's
    /// `ALIGN(npages, 64) / 64` words (checked: [`Error::BufferTooSmall`]). Nothing is
    /// allocated. For a slot this VM never created the kernel is still asked, with an empty
    /// buffer, so its error (bad id, no such slot) is what the caller sees.
    pub fn get_dirty_log(&self, slot: u32, bitmap: &mut [u64]) -> Result<()> {
        let buf: &mut [u64] = match self.slots.get(&slot) {
            Some(s) => {
                let need = s.bitmap_words();
                if bitmap.len() < need {
                    return Err(Error::BufferTooSmall {
                        need,
                        got: bitmap.len(),
                    });
                }
                &mut bitmap[..need]
            }
            None => &mut [],
        };
        // SAFETY: every memslot of this VM is created through `set_memslot`, so the kernel has
        // a slot `slot` only if `self.slots` does, and then `buf` holds its bitmap. For other
        // ids the kernel fails before writing.
        unsafe { sys::get_dirty_log(&self.fd, slot, buf) }
    }

    /// `KVM_CLEAR_DIRTY_LOG`: clear and re-protect the pages of `[first_page, first_page +
    /// num_pages)` of `slot` whose bit is set in `bitmap` (bit 0 = `first_page`).
    pub fn clear_dirty_log(
        &self,
        slot: u32,
        first_page: u64,
        num_pages: u32,
        bitmap: &[u64],
    ) -> Result<()> {
        sys::clear_dirty_log(&self.fd, slot, first_page, num_pages, bitmap)
    }

    /// `KVM_RESET_DIRTY_RINGS`; returns how many entries were reset.
    pub fn reset_dirty_rings(&self) -> Result<u32> {
        sys::reset_dirty_rings(&self.fd)
    }

    /// Number of vCPUs created.
    pub fn vcpu_count(&self) -> u32 {
        self.vcpus
    }

    /// Create vCPU `id` (ids are dense from 0 in this crate), mapping its ring if the VM has
    /// one.
    pub fn create_vcpu(&mut self) -> Result<KvmVcpu> {
        let id = self.vcpus;
        let fd = self
            .fd
            .create_vcpu(id as u64)
            .map_err(|e| Error::from_sys(Op::CreateVcpu, e))?;
        self.vcpus += 1;
        let ring = match self.ring {
            Some(r) => Some(Arc::new(RingMap::map(&fd, r.entries)?)),
            None => None,
        };
        Ok(KvmVcpu {
            fd,
            id,
            ring,
            _pins: self.pins.clone(),
        })
    }
}

/// A vCPU: its fd, its ring mapping, and a pin on the VM's guest memory.
#[derive(Debug)]
pub struct KvmVcpu {
    // Drop order: fd, ring, then the memory pins.
    fd: VcpuFd,
    id: u32,
    ring: Option<Arc<RingMap>>,
    _pins: Pins,
}

impl KvmVcpu {
    /// The vCPU id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The vCPU fd.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// The vCPU fd, mutably (`KVM_RUN` needs it).
    pub fn fd_mut(&mut self) -> &mut VcpuFd {
        &mut self.fd
    }

    /// The dirty ring mapping, if the VM has rings.
    pub fn ring(&self) -> Option<&Arc<RingMap>> {
        self.ring.as_ref()
    }
}
