//! [`KvmDirtyTracker`]: KVM's three dirty trackers over a VMM's own `kvm-ioctls` fds and slot
//! table, implementing [`dirtylog::DirtyTracker`].
//!
//! # Steps a VMM follows
//!
//! 1. [`KvmDirtyTracker::enable`] on the new VM **before creating vCPUs**: enables manual
//!    protect (with `KVM_DIRTY_LOG_INITIALLY_SET` when offered, as QEMU does) for
//!    [`TrackerKind::ClearLog`], or the per-vCPU dirty ring (`_ACQ_REL` preferred) for
//!    [`TrackerKind::Ring`]; refuses what the kernel lacks, naming the capability.
//! 2. Create memslots and vCPUs as usual.
//! 3. `unsafe` [`KvmDirtyTracker::new`] with the VM fd (`&VmFd`, `Arc<VmFd>` or an owned
//!    `VmFd`) and the slot table ([`Slot`] per region, convertible from
//!    `kvm_userspace_memory_region`); for rings, [`add_vcpu`](KvmDirtyTracker::add_vcpu)
//!    with every vCPU fd, in vCPU order.
//! 4. [`start`](KvmDirtyTracker::start) (turns `KVM_MEM_LOG_DIRTY_PAGES` on in every slot),
//!    then [`harvest`](KvmDirtyTracker::harvest) / [`clear`](KvmDirtyTracker::clear) per
//!    region as often as needed, and [`stop`](KvmDirtyTracker::stop).
//! 5. Rings only: on `KVM_EXIT_DIRTY_RING_FULL` (`VcpuExit::Unsupported(31)` in
//!    `kvm-ioctls`) a vCPU thread calls [`harvest_rings`](KvmDirtyTracker::harvest_rings)
//!    before `KVM_RUN` again; a reaper thread (or the vCPU loop) may watch
//!    [`ring_soft_full`](KvmDirtyTracker::ring_soft_full) to harvest — or kick the vCPU —
//!    before the ring fills.
//!
//! Every method takes `&self` (the state is behind mutexes and atomics), so one tracker in an
//! `Arc` serves the migration thread, the vCPU threads and a reaper. After construction no
//! harvest allocates.
//!
//! The VMM's own writes to guest memory (device emulation) are merged in with
//! [`set_vmm_bitmap`](KvmDirtyTracker::set_vmm_bitmap): the VMM marks pages in a
//! [`DirtyBitmap`] and every harvest takes (swaps to 0) and ORs its words in.
//! (`dirtylog-migrate` takes the VMM bitmaps of its guest memory itself: with it, give them
//! to one or the other, not both.)

use std::borrow::Borrow;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use dirtylog::sync::lock;
use dirtylog::{DirtyBitmap, DirtyTracker, TrackerError, TrackerKind};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{VcpuFd, VmFd};

use crate::error::{Error, Result};
use crate::ring::{DirtyRings, RingMap, RingWatch, RingsHarvested};
use crate::sys::{
    self, RingFlavor, VmFdDirtyLogExt, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MEM_LOG_DIRTY_PAGES,
};

/// One memslot of the VM, as the VMM created it with `KVM_SET_USER_MEMORY_REGION` (the same
/// fields as `kvm_userspace_memory_region`, which converts both ways).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Slot {
    /// `as_id << 16 | id`.
    pub slot: u32,
    /// Guest physical address of the first byte.
    pub guest_phys_addr: u64,
    /// Size in bytes (a multiple of the host page size).
    pub memory_size: u64,
    /// Host virtual address of the first byte.
    pub userspace_addr: u64,
    /// The `KVM_MEM_*` flags the slot was created with. The tracker adds
    /// `KVM_MEM_LOG_DIRTY_PAGES` in [`KvmDirtyTracker::start`] and restores these flags in
    /// [`KvmDirtyTracker::stop`].
    pub flags: u32,
}

impl From<kvm_userspace_memory_region> for Slot {
    fn from(r: kvm_userspace_memory_region) -> Self {
        Slot {
            slot: r.slot,
            guest_phys_addr: r.guest_phys_addr,
            memory_size: r.memory_size,
            userspace_addr: r.userspace_addr,
            flags: r.flags,
        }
    }
}

impl From<Slot> for kvm_userspace_memory_region {
    fn from(s: Slot) -> Self {
        kvm_userspace_memory_region {
            slot: s.slot,
            flags: s.flags,
            guest_phys_addr: s.guest_phys_addr,
            memory_size: s.memory_size,
            userspace_addr: s.userspace_addr,
        }
    }
}

/// Choices beyond the [`TrackerKind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrackerOptions {
    /// Clear-log: enable `KVM_DIRTY_LOG_INITIALLY_SET` when the kernel offers it (default
    /// `true`, as QEMU): turning logging on then marks every page dirty instead of
    /// write-protecting the whole slot at once, and pages are write-protected lazily by the
    /// first `KVM_CLEAR_DIRTY_LOG`. The first harvest after [`KvmDirtyTracker::start`]
    /// reports every page.
    pub initially_set: bool,
    /// Ring: the fill level (entries not yet harvested) at which
    /// [`KvmDirtyTracker::ring_soft_full`] says to harvest. `None`: half the ring.
    pub ring_soft_full: Option<u32>,
}

impl Default for TrackerOptions {
    fn default() -> Self {
        TrackerOptions {
            initially_set: true,
            ring_soft_full: None,
        }
    }
}

/// What [`KvmDirtyTracker::enable`] turned on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enabled {
    /// The tracker.
    pub kind: TrackerKind,
    /// Clear-log: whether `KVM_DIRTY_LOG_INITIALLY_SET` is on.
    pub initially_set: bool,
    /// Ring: which capability.
    pub ring: Option<RingFlavor>,
}

/// The ring state: the rings and, per region, the pages collected from them and not yet
/// returned by `harvest` (plain words: only touched under the lock).
#[derive(Debug, Default)]
struct RingState {
    rings: DirtyRings,
    pending: Box<[Box<[u64]>]>,
}

/// One region of the table and its buffers.
struct Region {
    slot: Slot,
    npages: u64,
    words: usize,
    /// Dirty-log and clear-log: the `KVM_GET_DIRTY_LOG` buffer (persistent: no allocation
    /// per harvest). Empty for rings.
    get: Mutex<Box<[u64]>>,
    /// The VMM's own writes (set once).
    vmm: OnceLock<Arc<DirtyBitmap>>,
}

/// KVM's dirty-log, clear-log or dirty-ring tracker over a VMM's own VM fd and memslots.
/// See the [module docs](self) for the steps.
///
/// `V` is how the tracker holds the VM fd: `&VmFd`, `Arc<VmFd>` (the default) or `VmFd`.
///
/// Dirty-log mode (`KVM_GET_DIRTY_LOG` clears and re-protects on every fetch):
///
/// ```
/// # use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
/// use dirtylog::TrackerKind;
/// use dirtylog_kvm::{KvmDirtyTracker, Slot};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # // A real-mode guest at GPA 0x1000 storing a byte into `count` pages from `first`.
/// # fn write_pages(vcpu: &mut VcpuFd, host: *mut u8, first: u64, count: u64)
/// #     -> Result<(), Box<dyn std::error::Error>> {
/// #     let code = [0x8e, 0xc0, 0x26, 0xc6, 0x06, 0, 0, 1, 0x01, 0xd8, 0xe2, 0xf4, 0xf4];
/// #     // SAFETY: the mapping is 16 pages long; the code fits in page 1.
/// #     unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), host.add(0x1000), code.len()) };
/// #     let mut s = vcpu.get_sregs()?;
/// #     (s.cs.base, s.cs.selector) = (0, 0);
/// #     vcpu.set_sregs(&s)?;
/// #     let mut r = vcpu.get_regs()?;
/// #     (r.rip, r.rflags, r.rax, r.rbx, r.rcx) = (0x1000, 2, first << 8, 0x100, count);
/// #     vcpu.set_regs(&r)?;
/// #     loop {
/// #         match vcpu.run()? {
/// #             VcpuExit::Hlt => return Ok(()),
/// #             e => return Err(format!("unexpected exit {e:?}").into()),
/// #         }
/// #     }
/// # }
/// let kvm = Kvm::new()?;
/// let vm = kvm.create_vm()?;
/// KvmDirtyTracker::enable(&vm, TrackerKind::DirtyLog)?;
/// // 16 pages of anonymous memory as slot 0 at GPA 0.
/// let size = 16 << 12;
/// // SAFETY: a new anonymous mapping, aliasing nothing.
/// let host = unsafe {
///     libc::mmap(std::ptr::null_mut(), size, libc::PROT_READ | libc::PROT_WRITE,
///                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
/// };
/// assert_ne!(host, libc::MAP_FAILED);
/// let slot = Slot { slot: 0, guest_phys_addr: 0, memory_size: size as u64,
///                   userspace_addr: host as u64, flags: 0 };
/// // SAFETY: the mapping is never unmapped.
/// unsafe { vm.set_user_memory_region(slot.into())? };
/// let mut vcpu = vm.create_vcpu(0)?;
///
/// // SAFETY: `slot` is the VM's only memslot, and its memory stays mapped.
/// let tracker = unsafe {
///     KvmDirtyTracker::new(&vm, &[slot], TrackerKind::DirtyLog)?
/// };
/// tracker.start()?;
/// write_pages(&mut vcpu, host.cast(), 5, 2)?; // the guest writes pages 5 and 6
/// let mut dirty = [0u64; 1];
/// tracker.harvest(0, &mut dirty)?;
/// assert_eq!(dirty, [0b11 << 5]);
/// let mut again = [0u64; 1];
/// tracker.harvest(0, &mut again)?; // the fetch re-armed them
/// assert_eq!(again, [0]);
/// tracker.stop()?;
/// # Ok(()) }
/// ```
pub struct KvmDirtyTracker<V: Borrow<VmFd> = Arc<VmFd>> {
    vm: V,
    kind: TrackerKind,
    soft_full: u32,
    regions: Box<[Region]>,
    /// `(slot id, region index)`, sorted, for ring entries.
    by_slot: Box<[(u32, usize)]>,
    rings: Mutex<RingState>,
    /// The rings' fill levels, fixed by the first `start` (read lock-free).
    watches: OnceLock<Box<[RingWatch]>>,
    /// Is logging on?
    started: Mutex<bool>,
    /// vCPUs added to a tracker without rings.
    other_vcpus: AtomicUsize,
}

impl<V: Borrow<VmFd>> fmt::Debug for KvmDirtyTracker<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KvmDirtyTracker")
            .field("kind", &self.kind)
            .field(
                "slots",
                &self.regions.iter().map(|r| r.slot).collect::<Vec<_>>(),
            )
            .field("vcpus", &self.vcpus())
            .finish_non_exhaustive()
    }
}

impl KvmDirtyTracker {
    /// Enable what `kind` needs on a new VM, with the default [`TrackerOptions`]. Call it
    /// before creating any vCPU (the kernel refuses a ring afterwards).
    pub fn enable(vm: &VmFd, kind: TrackerKind) -> Result<Enabled> {
        Self::enable_with(vm, kind, &TrackerOptions::default())
    }

    /// [`enable`](Self::enable) with options: dirty-log needs nothing; clear-log enables
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` (with `INITIALLY_SET` if asked and offered); ring
    /// enables `KVM_CAP_DIRTY_LOG_RING_ACQ_REL` (or the plain ring) of `entries` entries per
    /// vCPU. Refuses what the kernel lacks with [`Error::TrackerUnsupported`].
    pub fn enable_with(vm: &VmFd, kind: TrackerKind, opts: &TrackerOptions) -> Result<Enabled> {
        let mut done = Enabled {
            kind,
            initially_set: false,
            ring: None,
        };
        match kind {
            TrackerKind::DirtyLog => {}
            TrackerKind::ClearLog => {
                let offered = sys::check_extension(vm, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)?;
                let offered_bits = u64::try_from(offered).unwrap_or(0);
                if offered_bits & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE == 0 {
                    return Err(Error::TrackerUnsupported {
                        kind,
                        cap: "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2",
                        value: offered,
                        instead: "use TrackerKind::DirtyLog (KVM_GET_DIRTY_LOG re-arms pages on every fetch)",
                    });
                }
                let mut mode = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE;
                if opts.initially_set && offered_bits & KVM_DIRTY_LOG_INITIALLY_SET != 0 {
                    mode |= KVM_DIRTY_LOG_INITIALLY_SET;
                    done.initially_set = true;
                }
                sys::enable_manual_protect(vm, 0, mode)?;
            }
            TrackerKind::Ring { entries } => {
                check_ring_entries(entries)?;
                let (flavor, max) =
                    sys::probe_dirty_ring(vm).map_err(|_| Error::TrackerUnsupported {
                        kind,
                        cap: "KVM_CAP_DIRTY_LOG_RING_ACQ_REL (or KVM_CAP_DIRTY_LOG_RING)",
                        value: 0,
                        instead: "use TrackerKind::ClearLog (or DirtyLog)",
                    })?;
                let bytes = u64::from(entries) * u64::from(dirtylog::ring::DIRTY_GFN_BYTES);
                if bytes > max {
                    return Err(Error::Config(format!(
                        "a dirty ring of {entries} entries ({bytes} bytes) is larger than the \
                         kernel's maximum of {max} bytes ({}): use a smaller ring",
                        match flavor {
                            RingFlavor::AcqRel => "KVM_CAP_DIRTY_LOG_RING_ACQ_REL",
                            RingFlavor::Plain => "KVM_CAP_DIRTY_LOG_RING",
                        }
                    )));
                }
                sys::enable_dirty_ring(vm, flavor, 0, bytes)?;
                done.ring = Some(flavor);
            }
        }
        Ok(done)
    }
}

fn check_ring_entries(entries: u32) -> Result<()> {
    if !entries.is_power_of_two() || entries < dirtylog::ring::KVM_DIRTY_RING_RSVD_ENTRIES {
        return Err(Error::Config(format!(
            "a dirty ring of {entries} entries: use a power of two of at least 64 entries and \
             a host page"
        )));
    }
    Ok(())
}

impl<V: Borrow<VmFd>> KvmDirtyTracker<V> {
    /// A tracker of `kind` over the memslots `slots` of `vm` (region `i` is `slots[i]`).
    /// [`enable`](KvmDirtyTracker::enable) must have run on `vm` for `kind`. Allocates every
    /// buffer the harvests need; checks that each slot is page aligned and listed once.
    ///
    /// # Safety
    ///
    /// - Each [`Slot`] is exactly a memslot of `vm` as the kernel knows it (same id, guest
    ///   address, size, host address and flags), and stays so as long as the tracker exists:
    ///   the kernel writes `ALIGN(npages, 64) / 8` bytes per `KVM_GET_DIRTY_LOG` into buffers
    ///   sized from `memory_size`, and [`start`](Self::start) / [`stop`](Self::stop) re-issue
    ///   `KVM_SET_USER_MEMORY_REGION` from these fields (only the logging flag changes).
    /// - The memory `[userspace_addr, userspace_addr + memory_size)` stays mapped while the
    ///   tracker exists (re-issuing the region hands it to the kernel again).
    ///
    /// Everything else is safe: a wrong index, buffer length or call order is a typed error,
    /// and so is a ring entry of a slot missing from the table
    /// ([`Error::RingEntryOutsideTable`]).
    pub unsafe fn new(vm: V, slots: &[Slot], kind: TrackerKind) -> Result<Self> {
        // SAFETY: the caller upholds `new`'s contract, which is `with_options`'.
        unsafe { Self::with_options(vm, slots, kind, TrackerOptions::default()) }
    }

    /// [`new`](Self::new) with [`TrackerOptions`] (the ring's soft-full threshold; the
    /// clear-log `initially_set` choice is [`enable_with`](KvmDirtyTracker::enable_with)'s).
    ///
    /// # Safety
    ///
    /// As [`new`](Self::new).
    pub unsafe fn with_options(
        vm: V,
        slots: &[Slot],
        kind: TrackerKind,
        opts: TrackerOptions,
    ) -> Result<Self> {
        let page = sys::host_page_size();
        let mut by_slot = Vec::with_capacity(slots.len());
        let mut regions = Vec::with_capacity(slots.len());
        let ring = kind.ring_entries();
        if let Some(entries) = ring {
            check_ring_entries(entries)?;
        }
        for (i, s) in slots.iter().enumerate() {
            if s.memory_size == 0
                || s.memory_size % page != 0
                || s.userspace_addr % page != 0
                || s.guest_phys_addr % page != 0
            {
                return Err(Error::Config(format!(
                    "slot {:#x} (region {i}): size {:#x}, guest address {:#x} and host address \
                     {:#x} must be non-zero multiples of the host page size {page}",
                    s.slot, s.memory_size, s.guest_phys_addr, s.userspace_addr
                )));
            }
            let npages = s.memory_size / page;
            let words = sys::bitmap_words(npages);
            let get = if ring.is_some() { 0 } else { words };
            regions.push(Region {
                slot: *s,
                npages,
                words,
                get: Mutex::new(vec![0u64; get].into_boxed_slice()),
                vmm: OnceLock::new(),
            });
            by_slot.push((s.slot, i));
        }
        by_slot.sort_unstable();
        if let Some(w) = by_slot.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(Error::Config(format!(
                "slot {:#x} is listed twice (regions {} and {})",
                w[0].0, w[0].1, w[1].1
            )));
        }
        let half = ring.map_or(0, |e| e / 2);
        let pending = regions
            .iter()
            .map(|r| vec![0u64; if ring.is_some() { r.words } else { 0 }].into())
            .collect();
        Ok(KvmDirtyTracker {
            vm,
            kind,
            soft_full: opts.ring_soft_full.unwrap_or(half).max(1),
            regions: regions.into_boxed_slice(),
            by_slot: by_slot.into_boxed_slice(),
            rings: Mutex::new(RingState {
                rings: DirtyRings::new(),
                pending,
            }),
            watches: OnceLock::new(),
            started: Mutex::new(false),
            other_vcpus: AtomicUsize::new(0),
        })
    }

    /// The VM fd.
    pub fn vm(&self) -> &VmFd {
        self.vm.borrow()
    }

    /// Which tracker this is.
    pub fn kind(&self) -> TrackerKind {
        self.kind
    }

    /// Number of regions (the slot table's length).
    pub fn len(&self) -> usize {
        self.regions.len()
    }

    /// No regions?
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// Region `index`'s slot.
    pub fn slot(&self, index: usize) -> Option<&Slot> {
        self.regions.get(index).map(|r| &r.slot)
    }

    /// The length of region `index`'s harvest buffer: `npages.div_ceil(64)` words.
    pub fn bitmap_words(&self, index: usize) -> Option<usize> {
        self.regions.get(index).map(|r| r.words)
    }

    /// Number of vCPUs added ([`add_vcpu`](Self::add_vcpu)).
    pub fn vcpus(&self) -> usize {
        lock(&self.rings).rings.len() + self.other_vcpus.load(Ordering::Relaxed)
    }

    fn region(&self, index: usize) -> Result<&Region> {
        self.regions.get(index).ok_or(Error::IndexOutOfRange {
            index,
            regions: self.regions.len(),
        })
    }

    /// Add the next vCPU (vCPU indexes follow the order of the calls) and return its index.
    /// For the ring tracker this maps the vCPU's dirty ring, and every vCPU must be added,
    /// after it is created and before [`start`](Self::start); the other trackers only count
    /// it, so a VMM can call this whatever the tracker.
    pub fn add_vcpu(&self, vcpu: &VcpuFd) -> Result<usize> {
        let TrackerKind::Ring { entries } = self.kind else {
            return Ok(self.other_vcpus.fetch_add(1, Ordering::Relaxed));
        };
        let _started = lock(&self.started);
        if self.watches.get().is_some() {
            return Err(Error::Config(
                "add_vcpu after start: add every vCPU before start (vCPU hot-plug is not \
                 supported)"
                    .into(),
            ));
        }
        let map = Arc::new(RingMap::map(vcpu, entries)?);
        let mut st = lock(&self.rings);
        st.rings.push(map);
        Ok(st.rings.len() - 1)
    }

    /// Merge the VMM's own writes into region `index`: every harvest of the region takes
    /// (swaps to 0) the words of `bitmap` and ORs them in. `bitmap` covers the region's pages;
    /// it is set once per region (read lock-free by every harvest).
    pub fn set_vmm_bitmap(&self, index: usize, bitmap: Arc<DirtyBitmap>) -> Result<()> {
        let r = self.region(index)?;
        if bitmap.npages() != r.npages {
            return Err(Error::Config(format!(
                "VMM bitmap of {} pages for region {index}, which has {} pages",
                bitmap.npages(),
                r.npages
            )));
        }
        r.vmm
            .set(bitmap)
            .map_err(|_| Error::Config(format!("region {index} already has a VMM bitmap")))
    }

    fn set_flags(&self, r: &Region, flags: u32) -> Result<()> {
        let region = kvm_userspace_memory_region::from(Slot { flags, ..r.slot });
        // SAFETY: by `new`'s contract the slot exists with exactly this id, address, size and
        // memory, which stays mapped while the tracker lives; only KVM_MEM_LOG_DIRTY_PAGES
        // differs, so the kernel is handed no memory it did not already map.
        unsafe { sys::set_user_memory_region(self.vm(), &region) }
    }

    /// Start tracking: turn `KVM_MEM_LOG_DIRTY_PAGES` on in every slot (a flags-only change).
    /// With `INITIALLY_SET` every page then reads dirty. A ring tracker needs its vCPUs
    /// ([`Error::NoVcpu`]); their set is fixed from here on. Calling it again while started
    /// does nothing.
    pub fn start(&self) -> Result<()> {
        let mut started = lock(&self.started);
        if *started {
            return Ok(());
        }
        if self.kind.ring_entries().is_some() {
            let st = lock(&self.rings);
            if st.rings.is_empty() {
                return Err(Error::NoVcpu);
            }
            self.watches
                .get_or_init(|| st.rings.watches().into_boxed_slice());
        }
        for (i, r) in self.regions.iter().enumerate() {
            if let Err(e) = self.set_flags(r, r.slot.flags | KVM_MEM_LOG_DIRTY_PAGES) {
                for r in &self.regions[..i] {
                    let _ = self.set_flags(r, r.slot.flags);
                }
                return Err(e);
            }
        }
        *started = true;
        Ok(())
    }

    /// Stop tracking: restore every slot's flags (turning logging off unless the table had
    /// it on). Rings are harvested and reset one last time, so no vCPU stays blocked on a
    /// full ring, and what was pending is dropped.
    pub fn stop(&self) -> Result<()> {
        let mut started = lock(&self.started);
        if !*started {
            return Ok(());
        }
        let mut first = None;
        for r in self.regions.iter() {
            if let Err(e) = self.set_flags(r, r.slot.flags) {
                first.get_or_insert(e);
            }
        }
        if self.kind.ring_entries().is_some() {
            if let Err(e) = self.harvest_rings() {
                first.get_or_insert(e);
            }
            for p in lock(&self.rings).pending.iter_mut() {
                p.fill(0);
            }
        }
        *started = false;
        first.map_or(Ok(()), Err)
    }

    /// OR the pages of region `index` dirtied since its previous harvest into `out`
    /// (`npages.div_ceil(64)` words, bit `i` = page `i`), then the VMM's writes
    /// ([`set_vmm_bitmap`](Self::set_vmm_bitmap)).
    ///
    /// - dirty-log: `KVM_GET_DIRTY_LOG`, which also write-protects the reported pages again;
    /// - clear-log: `KVM_GET_DIRTY_LOG` as a snapshot: pages stay reported until
    ///   [`clear`](Self::clear);
    /// - ring: [`harvest_rings`](Self::harvest_rings) (every ring collected and reset), then
    ///   the region's pending pages are taken.
    pub fn harvest(&self, index: usize, out: &mut [u64]) -> Result<()> {
        let r = self.region(index)?;
        if out.len() != r.words {
            return Err(Error::BufferLength {
                index,
                need: r.words,
                got: out.len(),
            });
        }
        match self.kind {
            TrackerKind::DirtyLog | TrackerKind::ClearLog => {
                let mut buf = lock(&r.get);
                // SAFETY: by `new`'s contract `r.slot.slot` is a memslot of `npages` pages as
                // the kernel knows it, and `buf` holds `npages.div_ceil(64)` words.
                unsafe { self.vm().get_dirty_log_into(r.slot.slot, &mut buf) }?;
                for (o, b) in out.iter_mut().zip(buf.iter()) {
                    *o |= *b;
                }
            }
            TrackerKind::Ring { .. } => {
                let mut st = lock(&self.rings);
                self.harvest_rings_locked(&mut st)?;
                for (o, p) in out.iter_mut().zip(st.pending[index].iter_mut()) {
                    if *p != 0 {
                        *o |= std::mem::take(p);
                    }
                }
            }
        }
        if let Some(v) = r.vmm.get() {
            v.take_or_into(out);
        }
        Ok(())
    }

    /// Clear-log: `KVM_CLEAR_DIRTY_LOG` of the pages of region `index` whose bit is set in
    /// `bits` (bit `i` = page `first_page + i`; `first_page` a multiple of 64; bits past the
    /// region's end are ignored), so that their next write is reported again. The other
    /// trackers re-arm in `harvest`, and this does nothing for them.
    ///
    /// Clear-log mode (a harvest is a snapshot; pages are re-armed by `clear`):
    ///
    /// ```
    /// # use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # // A real-mode guest at GPA 0x1000 storing a byte into `count` pages from `first`;
    /// # // `on_ring_full` runs on KVM_EXIT_DIRTY_RING_FULL.
    /// # fn write_pages(vcpu: &mut VcpuFd, host: *mut u8, first: u64, count: u64,
    /// #     on_ring_full: &dyn Fn() -> dirtylog_kvm::Result<()>)
    /// #     -> Result<(), Box<dyn std::error::Error>> {
    /// #     let code = [0x8e, 0xc0, 0x26, 0xc6, 0x06, 0, 0, 1, 0x01, 0xd8, 0xe2, 0xf4, 0xf4];
    /// #     // SAFETY: the mapping is 16 pages long; the code fits in page 1.
    /// #     unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), host.add(0x1000), code.len()) };
    /// #     let mut s = vcpu.get_sregs()?;
    /// #     (s.cs.base, s.cs.selector) = (0, 0);
    /// #     vcpu.set_sregs(&s)?;
    /// #     let mut r = vcpu.get_regs()?;
    /// #     (r.rip, r.rflags, r.rax, r.rbx, r.rcx) = (0x1000, 2, first << 8, 0x100, count);
    /// #     vcpu.set_regs(&r)?;
    /// #     loop {
    /// #         match vcpu.run()? {
    /// #             VcpuExit::Hlt => return Ok(()),
    /// #             VcpuExit::Unsupported(31) => on_ring_full()?,
    /// #             e => return Err(format!("unexpected exit {e:?}").into()),
    /// #         }
    /// #     }
    /// # }
    /// # let kvm = Kvm::new()?;
    /// # let vm = kvm.create_vm()?;
    /// use dirtylog::TrackerKind;
    /// use dirtylog_kvm::{KvmDirtyTracker, Slot};
    ///
    /// let on = KvmDirtyTracker::enable(&vm, TrackerKind::ClearLog)?; // INITIALLY_SET if offered
    /// // ... slot 0: 16 pages at GPA 0; vCPU 0 ...
    /// # let size = 16 << 12;
    /// # // SAFETY: a new anonymous mapping, aliasing nothing.
    /// # let host = unsafe {
    /// #     libc::mmap(std::ptr::null_mut(), size, libc::PROT_READ | libc::PROT_WRITE,
    /// #                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
    /// # };
    /// # assert_ne!(host, libc::MAP_FAILED);
    /// # let slot = Slot { slot: 0, guest_phys_addr: 0, memory_size: size as u64,
    /// #                   userspace_addr: host as u64, flags: 0 };
    /// # // SAFETY: the mapping is never unmapped.
    /// # unsafe { vm.set_user_memory_region(slot.into())? };
    /// # let mut vcpu = vm.create_vcpu(0)?;
    /// // SAFETY: `slot` is the VM's only memslot, and its memory stays mapped.
    /// let tracker = unsafe {
    ///     KvmDirtyTracker::new(&vm, &[slot], TrackerKind::ClearLog)?
    /// };
    /// tracker.start()?;
    /// let mut dirty = [0u64; 1];
    /// tracker.harvest(0, &mut dirty)?;
    /// assert_eq!(dirty[0], if on.initially_set { 0xffff } else { 0 });
    /// tracker.clear(0, 0, &dirty)?; // re-arm every page reported
    ///
    /// write_pages(&mut vcpu, host.cast(), 5, 1, &|| Ok(()))?; // the guest writes page 5
    /// let mut dirty = [0u64; 1];
    /// tracker.harvest(0, &mut dirty)?;
    /// assert_eq!(dirty, [1 << 5]);
    /// let mut again = [0u64; 1];
    /// tracker.harvest(0, &mut again)?; // still reported: not cleared yet
    /// assert_eq!(again, [1 << 5]);
    /// tracker.clear(0, 0, &again)?;
    /// let mut after = [0u64; 1];
    /// tracker.harvest(0, &mut after)?;
    /// assert_eq!(after, [0]);
    /// # Ok(()) }
    /// ```
    pub fn clear(&self, index: usize, first_page: u64, bits: &[u64]) -> Result<()> {
        let r = self.region(index)?;
        if self.kind != TrackerKind::ClearLog {
            return Ok(());
        }
        if first_page % 64 != 0 || first_page > r.npages {
            return Err(Error::Config(format!(
                "clear of region {index} from page {first_page}: the first page must be a \
                 multiple of 64 within the region's {} pages",
                r.npages
            )));
        }
        let num = (bits.len() as u64)
            .saturating_mul(64)
            .min(r.npages - first_page);
        // At most 2^31 pages per call (num_pages is a u32), a multiple of 64.
        const CHUNK: u64 = 1 << 31;
        let mut done = 0u64;
        while done < num {
            let n = (num - done).min(CHUNK);
            let from = (done / 64) as usize;
            self.vm()
                .clear_dirty_log(r.slot.slot, first_page + done, n as u32, &bits[from..])?;
            done += n;
        }
        Ok(())
    }

    /// Ring: collect every vCPU's ring into the regions' pending pages, mark the entries
    /// harvested and `KVM_RESET_DIRTY_RINGS`, so the pages are write-protected again. This is
    /// what a vCPU thread calls on `KVM_EXIT_DIRTY_RING_FULL` before `KVM_RUN` again, and what
    /// a reaper calls when [`ring_soft_full`](Self::ring_soft_full) says so; `harvest` calls
    /// it too. Allocates nothing.
    ///
    /// Errors: [`Error::NoVcpu`]; [`Error::RingEntryOutsideTable`] for an entry of a slot not
    /// in the table; [`Error::RingOverflow`] for a ring found full (KVM overwrote entries).
    /// Every collected entry is reset even then.
    ///
    /// Ring mode, with a vCPU loop that handles `KVM_EXIT_DIRTY_RING_FULL`:
    ///
    /// ```
    /// # use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # // A real-mode guest at GPA 0x1000 storing a byte into `count` pages from `first`;
    /// # // `on_ring_full` runs on KVM_EXIT_DIRTY_RING_FULL.
    /// # fn write_pages(vcpu: &mut VcpuFd, host: *mut u8, first: u64, count: u64,
    /// #     on_ring_full: &dyn Fn() -> dirtylog_kvm::Result<()>)
    /// #     -> Result<(), Box<dyn std::error::Error>> {
    /// #     let code = [0x8e, 0xc0, 0x26, 0xc6, 0x06, 0, 0, 1, 0x01, 0xd8, 0xe2, 0xf4, 0xf4];
    /// #     // SAFETY: the mapping is 16 pages long; the code fits in page 1.
    /// #     unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), host.add(0x1000), code.len()) };
    /// #     let mut s = vcpu.get_sregs()?;
    /// #     (s.cs.base, s.cs.selector) = (0, 0);
    /// #     vcpu.set_sregs(&s)?;
    /// #     let mut r = vcpu.get_regs()?;
    /// #     (r.rip, r.rflags, r.rax, r.rbx, r.rcx) = (0x1000, 2, first << 8, 0x100, count);
    /// #     vcpu.set_regs(&r)?;
    /// #     loop {
    /// #         match vcpu.run()? {
    /// #             VcpuExit::Hlt => return Ok(()),
    /// #             VcpuExit::Unsupported(31) => on_ring_full()?,
    /// #             e => return Err(format!("unexpected exit {e:?}").into()),
    /// #         }
    /// #     }
    /// # }
    /// # let kvm = Kvm::new()?;
    /// # let vm = kvm.create_vm()?;
    /// use dirtylog::TrackerKind;
    /// use dirtylog_kvm::{KvmDirtyTracker, Slot};
    ///
    /// let kind = TrackerKind::Ring { entries: 4096 };
    /// KvmDirtyTracker::enable(&vm, kind)?; // before creating vCPUs
    /// // ... slot 0: 16 pages at GPA 0; vCPU 0 ...
    /// # let size = 16 << 12;
    /// # // SAFETY: a new anonymous mapping, aliasing nothing.
    /// # let host = unsafe {
    /// #     libc::mmap(std::ptr::null_mut(), size, libc::PROT_READ | libc::PROT_WRITE,
    /// #                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
    /// # };
    /// # assert_ne!(host, libc::MAP_FAILED);
    /// # let slot = Slot { slot: 0, guest_phys_addr: 0, memory_size: size as u64,
    /// #                   userspace_addr: host as u64, flags: 0 };
    /// # // SAFETY: the mapping is never unmapped.
    /// # unsafe { vm.set_user_memory_region(slot.into())? };
    /// # let mut vcpu = vm.create_vcpu(0)?;
    /// // SAFETY: `slot` is the VM's only memslot, and its memory stays mapped.
    /// let tracker = unsafe { KvmDirtyTracker::new(&vm, &[slot], kind)? };
    /// tracker.add_vcpu(&vcpu)?; // every vCPU, in order
    /// tracker.start()?;
    ///
    /// // The vCPU loop: on KVM_EXIT_DIRTY_RING_FULL, harvest the rings and run again.
    /// write_pages(&mut vcpu, host.cast(), 5, 2, &|| tracker.harvest_rings().map(|_| ()))?;
    /// assert!(!tracker.ring_soft_full(0)); // 2 entries of 4096
    /// assert!(tracker.rings_hold_at_least(2));
    /// let mut dirty = [0u64; 1];
    /// tracker.harvest(0, &mut dirty)?; // harvests and resets every ring
    /// assert_eq!(dirty, [0b11 << 5]);
    /// assert!(!tracker.rings_hold_at_least(1));
    /// # Ok(()) }
    /// ```
    pub fn harvest_rings(&self) -> Result<RingsHarvested> {
        if self.kind.ring_entries().is_none() {
            return Err(Error::Config(format!(
                "harvest_rings is for the ring tracker; this one is {}",
                self.kind
            )));
        }
        self.harvest_rings_locked(&mut lock(&self.rings))
    }

    fn harvest_rings_locked(&self, st: &mut RingState) -> Result<RingsHarvested> {
        let RingState { rings, pending } = st;
        if rings.is_empty() {
            return Err(Error::NoVcpu);
        }
        let mut bad = None;
        // The last slot hit, its region and size: entries come in runs of one slot.
        let mut last = (u32::MAX, 0usize, 0u64);
        let st = rings.harvest_each(self.vm(), |vcpu, e| {
            if e.slot != last.0 {
                if let Ok(k) = self.by_slot.binary_search_by_key(&e.slot, |&(s, _)| s) {
                    let i = self.by_slot[k].1;
                    last = (e.slot, i, self.regions[i].npages);
                }
            }
            match (e.slot == last.0 && e.offset < last.2).then_some(last.1) {
                Some(i) => pending[i][(e.offset / 64) as usize] |= 1 << (e.offset % 64),
                None => {
                    bad.get_or_insert(Error::RingEntryOutsideTable {
                        vcpu: vcpu as u32,
                        slot: e.slot,
                        offset: e.offset,
                    });
                }
            }
        })?;
        bad.map_or(Ok(st), Err)
    }

    /// Ring: does vCPU `vcpu`'s ring hold at least the soft-full threshold
    /// ([`TrackerOptions::ring_soft_full`], default half the ring) of entries not yet
    /// harvested? Lock-free; false before [`start`](Self::start) and for other trackers.
    pub fn ring_soft_full(&self, vcpu: usize) -> bool {
        self.watches
            .get()
            .and_then(|w| w.get(vcpu))
            .is_some_and(|w| w.holds_at_least(self.soft_full))
    }

    /// Ring: each vCPU's ring and how far it has been harvested, in vCPU order, for reading
    /// per-vCPU fill levels and dirty rates from another thread (a dirty limit); empty before
    /// the first [`start`](Self::start) and for other trackers.
    pub fn ring_watches(&self) -> &[RingWatch] {
        self.watches.get().map_or(&[], |w| w)
    }

    /// Ring: does some vCPU's ring hold at least `n` (≥ 1) entries not yet harvested?
    /// Lock-free; false before [`start`](Self::start) and for other trackers.
    pub fn rings_hold_at_least(&self, n: u32) -> bool {
        self.watches
            .get()
            .is_some_and(|ws| ws.iter().any(|w| w.holds_at_least(n)))
    }
}

impl<V: Borrow<VmFd> + Send + Sync> DirtyTracker for KvmDirtyTracker<V> {
    fn kind(&self) -> TrackerKind {
        self.kind
    }

    fn start(&self) -> Result<(), TrackerError> {
        KvmDirtyTracker::start(self).map_err(Into::into)
    }

    fn harvest(&self, index: usize, out: &mut [u64]) -> Result<(), TrackerError> {
        KvmDirtyTracker::harvest(self, index, out).map_err(Into::into)
    }

    fn clear(&self, index: usize, first_page: u64, bits: &[u64]) -> Result<(), TrackerError> {
        KvmDirtyTracker::clear(self, index, first_page, bits).map_err(Into::into)
    }

    fn stop(&self) -> Result<(), TrackerError> {
        KvmDirtyTracker::stop(self).map_err(Into::into)
    }
}
