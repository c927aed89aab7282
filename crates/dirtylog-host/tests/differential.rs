//! One write script, two sources: host memory under every method and mode, and the software
//! MMU (the reference arch with KVM's GET/CLEAR algorithms). At every reap point both must
//! report the same pages; in clear-log mode both then clear the same random subset of what
//! they reported, and in dirty-log mode a reap re-protects everything it reports.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use dirtylog::softmmu::{FlushKind, Machine};
use dirtylog::vm::{KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE};
use dirtylog::{DirtyTracker, MemoryRegion, TrackerKind, KVM_MEM_LOG_DIRTY_PAGES};
use dirtylog_host::{
    HostBacking, HostDirtyTracker, HostMemory, HostMethod, HostRegion, HostTrackerConfig,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// n·64 + 3 pages: the tail word is partial, as in the kernel's tests.
const PAGES: u64 = 3 * 64 + 3;
const STEPS: usize = 3000;

fn run(method: HostMethod, mode: TrackerKind, seed: u64) {
    let what = format!("{method} {mode} seed {seed}");

    // The reference: a softmmu VM with one logged slot over the same number of pages.
    let m = Machine::new(FlushKind::Ranged, Default::default());
    if mode == TrackerKind::ClearLog {
        m.vm()
            .enable_cap(
                KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                0,
                KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
            )
            .expect("manual protect on the softmmu");
    }
    let page = m.vm().config().page_size;
    m.vm()
        .set_user_memory_region(&MemoryRegion {
            slot: 0,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: 0,
            memory_size: PAGES * page,
            userspace_addr: 0,
        })
        .expect("softmmu memslot");
    let vcpu = m.create_vcpu();

    // The source under test.
    let mem = Arc::new(HostMemory::new(PAGES * 4096, HostBacking::Anonymous).expect("mmap"));
    assert_eq!(mem.page_size(), page, "{what}: both sides use 4 KiB pages");
    let t = HostDirtyTracker::new(
        vec![HostRegion::new(mem.clone())],
        HostTrackerConfig { method, mode },
    )
    .unwrap_or_else(|e| panic!("{what}: {e} (see `dirtylog caps` for the host methods)"));
    t.start().expect("start");

    let words = PAGES.div_ceil(64) as usize;
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut reaps = 0;
    for step in 0..STEPS {
        let r = rng.random_range(0..100);
        if r < 85 {
            let p = rng.random_range(0..PAGES);
            let v = step as u64 + 1;
            mem.words()[(p * 512) as usize].store(v, Ordering::Relaxed);
            vcpu.write_u64(p * page, v).expect("softmmu write");
        } else {
            reaps += 1;
            let mut host = vec![0u64; words];
            let mut model = vec![0u64; words];
            t.harvest(0, &mut host).expect("harvest");
            m.vm().get_dirty_log(0, &mut model).expect("GET");
            assert_eq!(host, model, "{what}: reap {reaps} at step {step}");
            if mode == TrackerKind::ClearLog {
                // Clear a random subset of what was reported, from a random 64-page boundary.
                let first_word = rng.random_range(0..words);
                let mask: Vec<u64> = model[first_word..]
                    .iter()
                    .map(|w| w & rng.random::<u64>())
                    .collect();
                let first_page = first_word as u64 * 64;
                t.clear(0, first_page, &mask).expect("clear");
                m.vm()
                    .clear_dirty_log(0, first_page, (PAGES - first_page) as u32, &mask)
                    .expect("CLEAR");
            }
        }
    }
    assert!(reaps > 100, "{what}: the script reaped only {reaps} times");
    // The contents agree too: every page holds what the script last wrote on both sides.
    for p in 0..PAGES {
        let host = mem.words()[(p * 512) as usize].load(Ordering::Relaxed);
        let model = m.read_u64(p * page);
        assert_eq!(host, model, "{what}: page {p}");
    }
    t.stop().expect("stop");
}

#[test]
fn host_memory_reports_what_the_softmmu_reports_in_every_method_and_mode() {
    for method in [HostMethod::Async, HostMethod::Sync, HostMethod::Mprotect] {
        for mode in [TrackerKind::DirtyLog, TrackerKind::ClearLog] {
            for seed in 1..=3 {
                run(method, mode, seed);
            }
        }
    }
}
