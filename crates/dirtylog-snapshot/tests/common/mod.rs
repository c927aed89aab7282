//! Shared helpers: a software source whose resume records the memory and vCPU progress at
//! the snapshot point, and restore targets that count their creation.
#![allow(dead_code)]

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dirtylog_migrate::soft::{SoftConfig, SoftVm, Workload};
use dirtylog_migrate::wire::{Region, StreamHeader};
use dirtylog_migrate::{
    DeviceSection, DeviceState, MigrationMemory, MigrationSource, MigrationTarget, TrackerKind,
    VcpuRestore, Vcpus, VmError,
};
use dirtylog_snapshot::{restore, RestoreOptions, SnapshotError};

pub const PAGE: u64 = 4096;

/// 16 MiB at 0 and 8 MiB at 4 GiB.
pub fn layout() -> Vec<Region> {
    vec![
        Region {
            slot: 0,
            gpa: 0,
            size: 16 << 20,
        },
        Region {
            slot: 3,
            gpa: 4 << 30,
            size: 8 << 20,
        },
    ]
}

/// vCPUs that record, on every resume, the guest's memory and progress: the state at the
/// snapshot point just taken.
pub struct Capture {
    pub vm: Arc<SoftVm>,
    pub image: Mutex<Option<(Vec<Vec<u8>>, u64)>>,
}

impl Vcpus for Capture {
    fn vcpu_count(&self) -> u32 {
        Vcpus::vcpu_count(&*self.vm)
    }
    fn pause(&self) -> Result<(), VmError> {
        Vcpus::pause(&*self.vm)
    }
    fn resume(&self) -> Result<(), VmError> {
        let regions = MigrationMemory::regions(&*self.vm).len();
        let image = (0..regions).map(|i| self.vm.snapshot(i)).collect();
        let progress = MigrationSource::guest_progress(&*self.vm);
        *self.image.lock().unwrap() = Some((image, progress));
        Vcpus::resume(&*self.vm)
    }
    fn save_state(&self) -> Result<Vec<Vec<u8>>, VmError> {
        self.vm.save_state()
    }
}

impl VcpuRestore for Capture {
    fn restore_state(&self, vcpu: u32, blob: &[u8]) -> Result<(), VmError> {
        self.vm.restore_state(vcpu, blob)
    }
    fn resume(&self) -> Result<(), VmError> {
        VcpuRestore::resume(&*self.vm)
    }
}

/// A software VM seen through [`Capture`], usable as a source and as a target.
pub struct Src {
    pub vm: Arc<SoftVm>,
    pub cap: Capture,
}

impl Src {
    pub fn new(vm: SoftVm) -> Self {
        let vm = Arc::new(vm);
        Src {
            cap: Capture {
                vm: vm.clone(),
                image: Mutex::new(None),
            },
            vm,
        }
    }

    /// The memory and progress recorded at the last resume.
    pub fn at_snapshot(&self) -> (Vec<Vec<u8>>, u64) {
        self.cap
            .image
            .lock()
            .unwrap()
            .clone()
            .expect("a snapshot was taken")
    }

    pub fn progress(&self) -> u64 {
        MigrationSource::guest_progress(&*self.vm)
    }
}

impl MigrationSource for Src {
    type Memory = SoftVm;
    type Tracker = SoftVm;
    type Vcpus = Capture;
    fn memory(&self) -> &SoftVm {
        &self.vm
    }
    fn tracker(&self) -> &SoftVm {
        &self.vm
    }
    fn vcpus(&self) -> &Capture {
        &self.cap
    }
    fn devices(&self) -> Option<&dyn DeviceState> {
        Some(&*self.vm)
    }
    fn guest_progress(&self) -> u64 {
        self.progress()
    }
}

impl MigrationTarget for Src {
    type Memory = SoftVm;
    type Vcpus = Capture;
    fn memory(&self) -> &SoftVm {
        &self.vm
    }
    fn vcpus(&self) -> &Capture {
        &self.cap
    }
    fn devices(&self) -> Option<&dyn DeviceState> {
        Some(&*self.vm)
    }
}

/// A running source: 2 vCPUs writing random pages of a 3000-page working set spanning both
/// regions, 40% of pages non-zero, one device.
pub fn source(tracker: TrackerKind) -> Src {
    let vm = SoftVm::source(&SoftConfig {
        page_size: PAGE as u32,
        regions: layout(),
        vcpus: 2,
        tracker,
        workload: Workload {
            first_page: 3000,
            pages: 3000,
            rate: Some(20_000),
            random: true,
            vmm_rate: Some(2_000),
        },
        nonzero_percent: 40,
    })
    .unwrap();
    vm.add_device(DeviceSection::new("serial0", 1, vec![1, 2, 3]).unwrap());
    Src::new(vm)
}

/// A target for `header` that knows the source's device.
pub fn target(header: &StreamHeader) -> Result<Src, VmError> {
    let vm = SoftVm::target(header, TrackerKind::DirtyLog)?;
    vm.add_device(DeviceSection::new("serial0", 1, Vec::new()).unwrap());
    vm.keep_resume_image();
    Ok(Src::new(vm))
}

/// Restore `tip` into a fresh target; assert its memory at resume equals `image` and that
/// its guest continues from `progress`.
pub fn restore_and_check(tip: &Path, image: &[Vec<u8>], progress: u64) -> Src {
    let (dst, stats) = restore(tip, target, &RestoreOptions::default())
        .unwrap_or_else(|e| panic!("restore {}: {e}", tip.display()));
    assert!(stats.resumed && stats.members >= 1);
    let got = dst.vm.resume_image().expect("resume image kept");
    assert_same(image, &got);
    assert_eq!(dst.vm.restored_devices(), vec!["serial0".to_string()]);
    assert_eq!(
        dst.vm.device_sections()[0].bytes(),
        &[1, 2, 3],
        "device state restored"
    );
    // The restored vCPUs start where the source's stood at the snapshot point and go on.
    let start = dst.progress();
    assert!(start >= progress, "restored progress {start} < {progress}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while dst.progress() <= start {
        assert!(Instant::now() < deadline, "restored guest does not run");
        std::thread::sleep(Duration::from_millis(2));
    }
    dst
}

pub fn assert_same(want: &[Vec<u8>], got: &[Vec<u8>]) {
    assert_eq!(want.len(), got.len());
    for (i, (a, b)) in want.iter().zip(got).enumerate() {
        assert_eq!(a.len(), b.len());
        if a != b {
            let page = a
                .chunks(PAGE as usize)
                .zip(b.chunks(PAGE as usize))
                .position(|(x, y)| x != y)
                .unwrap();
            panic!("region {i} differs first at page {page}");
        }
    }
}

/// Restore `tip` with a target factory that counts its calls; returns the error and the
/// number of targets made.
pub fn refused(tip: &Path) -> (SnapshotError, usize) {
    let made = AtomicUsize::new(0);
    let r = restore(
        tip,
        |h| {
            made.fetch_add(1, Ordering::SeqCst);
            target(h)
        },
        &RestoreOptions::default(),
    );
    match r {
        Ok(_) => panic!("restore of {} succeeded", tip.display()),
        Err(e) => (e, made.load(Ordering::SeqCst)),
    }
}
