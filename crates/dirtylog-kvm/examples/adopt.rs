//! Adopting dirtylog in a Rust VMM: a VM made with plain kvm-ioctls, guest memory in a
//! vm-memory `GuestMemoryMmap<VmmBitmap>` (so the VMM's own writes are logged by the memory
//! type), a tiny real-mode guest, and one VMM write, harvested through `KvmDirtyTracker` with
//! each of KVM's three trackers.
//!
//! The dirtylog-specific lines are marked: between `// dirtylog:` comments saying begin and end.
//! Exits non-zero unless each tracker harvests exactly the pages written.
//!
//! ```text
//! cargo run -p dirtylog-kvm --example adopt [dirty-log|clear-log|ring:ENTRIES ...]
//! ```

use std::collections::BTreeSet;
use std::process::ExitCode;
use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

// dirtylog: begin
use dirtylog::bitmap::VmmBitmap;
use dirtylog::TrackerKind;
use dirtylog_kvm::{sys::KVM_EXIT_DIRTY_RING_FULL, KvmDirtyTracker, Slot};
// dirtylog: end

type Error = Box<dyn std::error::Error>;

/// Real mode at GPA 0x1000: for `cx` pages from segment `ax` (stride `bx`), store a byte,
/// `out 0x80`; then `hlt`.
const CODE: [u8; 15] = [
    0x8e, 0xc0, 0x26, 0xc6, 0x06, 0, 0, 1, 0x01, 0xd8, 0xe6, 0x80, 0xe2, 0xf2, 0xf4,
];
const MEM: usize = 1 << 20;
/// The guest writes pages 0x10..0x14, the VMM page 0x50.
const GUEST_PAGES: std::ops::Range<u64> = 0x10..0x14;
const VMM_PAGE: u64 = 0x50;

fn run(kind_arg: &str) -> Result<BTreeSet<u64>, Error> {
    let kvm = Kvm::new()?;
    let vm = Arc::new(kvm.create_vm()?);
    // dirtylog: begin
    let kind: TrackerKind = kind_arg.parse()?;
    // Before creating vCPUs: manual protect, or the dirty ring.
    KvmDirtyTracker::enable(&vm, kind)?;
    // dirtylog: end
    let mem = GuestMemoryMmap::<VmmBitmap>::from_ranges(&[(GuestAddress(0), MEM)])?;
    let mut regions = Vec::new();
    for (i, r) in mem.iter().enumerate() {
        let region = kvm_userspace_memory_region {
            slot: i as u32,
            guest_phys_addr: r.start_addr().raw_value(),
            memory_size: r.len(),
            userspace_addr: r.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: `mem` outlives the VM and its vCPU (dropped in reverse order).
        unsafe { vm.set_user_memory_region(region)? };
        regions.push(region);
    }
    mem.write_slice(&CODE, GuestAddress(0x1000))?;
    let mut vcpu = vm.create_vcpu(0)?;
    let mut sregs = vcpu.get_sregs()?;
    (sregs.cs.base, sregs.cs.selector) = (0, 0);
    vcpu.set_sregs(&sregs)?;

    // dirtylog: begin
    let slots: Vec<Slot> = regions.iter().map(|r| Slot::from(*r)).collect();
    // SAFETY: `slots` are exactly the VM's memslots, and `mem` stays mapped while tracked.
    let tracker = unsafe { KvmDirtyTracker::new(vm.clone(), &slots, kind)? };
    tracker.add_vcpu(&vcpu)?; // maps its dirty ring (other trackers: nothing to do)
    for (i, r) in mem.iter().enumerate() {
        tracker.set_vmm_bitmap(i, GuestMemoryRegion::bitmap(r).bitmap().clone())?;
    }
    tracker.start()?;
    // A migration's first pass copies everything; with clear-log, re-arm what it reported.
    let mut first = vec![0u64; tracker.bitmap_words(0).unwrap_or(0)];
    tracker.harvest(0, &mut first)?;
    tracker.clear(0, 0, &first)?;
    // dirtylog: end

    // The guest writes GUEST_PAGES; the VMM (a device model) writes VMM_PAGE.
    let mut regs = vcpu.get_regs()?;
    (regs.rip, regs.rflags, regs.rcx) = (0x1000, 2, GUEST_PAGES.end - GUEST_PAGES.start);
    (regs.rax, regs.rbx) = (GUEST_PAGES.start << 8, 0x100);
    vcpu.set_regs(&regs)?;
    loop {
        match vcpu.run()? {
            VcpuExit::Hlt => break,
            VcpuExit::IoOut(..) => {}
            // dirtylog: begin
            VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL) => tracker.harvest_rings().map(drop)?,
            // dirtylog: end
            e => return Err(format!("unexpected exit {e:?}").into()),
        }
    }
    mem.write_obj(0xfeed_u64, GuestAddress(VMM_PAGE << 12))?;

    // dirtylog: begin
    let mut dirty = vec![0u64; tracker.bitmap_words(0).unwrap_or(0)];
    tracker.harvest(0, &mut dirty)?;
    tracker.stop()?;
    // dirtylog: end
    Ok((0..MEM as u64 >> 12)
        .filter(|p| dirty[(p / 64) as usize] & (1 << (p % 64)) != 0)
        .collect())
}

/// Run each tracker named in `kinds` (all three if empty) and say whether each harvested
/// exactly the pages written. (`tests/adopt_example.rs` runs this in `cargo test`.)
pub fn check(kinds: &[String]) -> bool {
    let all = ["dirty-log", "clear-log", "ring"].map(String::from);
    let kinds = if kinds.is_empty() { &all[..] } else { kinds };
    let want: BTreeSet<u64> = GUEST_PAGES.chain([VMM_PAGE]).collect();
    let mut ok = true;
    for kind in kinds {
        match run(kind) {
            Ok(got) if got == want => println!("{kind}: harvested pages {got:x?}: as expected"),
            Ok(got) => {
                println!("{kind}: harvested pages {got:x?}, expected {want:x?}");
                ok = false;
            }
            Err(e) => {
                println!("{kind}: error: {e}");
                ok = false;
            }
        }
    }
    ok
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if check(&args) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
