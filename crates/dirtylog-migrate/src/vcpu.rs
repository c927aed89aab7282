//! vCPU control: [`Vcpus`] on a source (pause, resume, throttle, save), [`VcpuRestore`] on a
//! target (load the saved states, then run).
//!
//! The engine treats vCPU states as opaque blobs (at most
//! [`MAX_VCPU_BLOB`](crate::wire::MAX_VCPU_BLOB) bytes each): what goes in them, and how they
//! are versioned, is the VMM's business.

use std::fmt;

use crate::error::VmError;

/// The error of an optional operation a VM does not implement, such as the default
/// [`Vcpus::throttle`]. The engine recognises it (with `error.downcast_ref::<Unsupported>()`)
/// and carries on without the feature where it can.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unsupported(pub &'static str);

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} is not supported by this VM", self.0)
    }
}

impl std::error::Error for Unsupported {}

/// Is `error` an [`Unsupported`]?
pub fn is_unsupported(error: &VmError) -> bool {
    error.downcast_ref::<Unsupported>().is_some()
}

/// The vCPUs of a source VM, as the VMM runs them.
///
/// Every method takes `&self`: the engine calls them from its control thread while its sender
/// threads read memory.
pub trait Vcpus: Sync {
    /// Number of vCPUs, the number of blobs [`save_state`](Self::save_state) returns.
    fn vcpu_count(&self) -> u32;
    /// Stop every vCPU and every other writer of guest memory (device models included);
    /// return once they are all stopped. If it fails, it must leave the guest running.
    fn pause(&self) -> Result<(), VmError>;
    /// Let the vCPUs (and devices) run again after [`pause`](Self::pause).
    fn resume(&self) -> Result<(), VmError>;
    /// Hold every vCPU out of guest mode for `percent`% of each period (0 = no throttling),
    /// for auto-converge. The default returns [`Unsupported`]: the engine then gives up
    /// throttling for this migration, and says so in its report.
    fn throttle(&self, percent: u8) -> Result<(), VmError> {
        let _ = percent;
        Err(Box::new(Unsupported("vCPU throttling")))
    }
    /// Cap every vCPU's dirty rate at `pages_per_second` (`None`: lift the cap), slowing
    /// only the vCPUs that dirty faster (QEMU's dirty-limit, `set-vcpu-dirty-limit`). The
    /// default returns [`Unsupported`]: the engine then migrates without it and says so in
    /// its report. `None` is QEMU's `cancel-vcpu-dirty-limit`. A VM that measures the rate
    /// from its dirty rings (as QEMU does) returns [`Unsupported`] when it tracks with a
    /// bitmap, which gives no per-vCPU rate.
    fn set_dirty_limit(&self, pages_per_second: Option<u64>) -> Result<(), VmError> {
        let _ = pages_per_second;
        Err(Box::new(Unsupported("a per-vCPU dirty limit")))
    }
    /// Each vCPU's throttle set by the dirty limit in force, in vCPU order: the percentage of
    /// the time it is held out of the guest (what QEMU's dirtylimit reports as the vCPU's
    /// sleep share; `query-vcpu-dirty-limit` gives the limit and current rate). Empty when no
    /// limit is in force, and by default.
    fn dirty_limit_throttle(&self) -> Vec<u8> {
        Vec::new()
    }
    /// The saved state of each vCPU, in vCPU order; called while paused. Each blob is at most
    /// [`MAX_VCPU_BLOB`](crate::wire::MAX_VCPU_BLOB) bytes.
    fn save_state(&self) -> Result<Vec<Vec<u8>>, VmError>;
}

/// The vCPUs of a target VM: created from the stream header, loaded, then started.
pub trait VcpuRestore: Sync {
    /// Load the state of vCPU `vcpu` (below the header's vCPU count), as saved by the
    /// source's [`Vcpus::save_state`].
    fn restore_state(&self, vcpu: u32, blob: &[u8]) -> Result<(), VmError>;
    /// Start the guest. Called at most once, after every vCPU state and device section has
    /// been restored and — in [`Verify::Strict`](crate::Verify::Strict) — every region's
    /// digest has matched the source's. In the other modes the check follows while the guest
    /// runs: if it fails, the engine drops the target, whose `Drop` must stop the guest.
    fn resume(&self) -> Result<(), VmError>;
}
