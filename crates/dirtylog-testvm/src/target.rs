//! A migration target for whatever guest a stream brings: the harness's generated guests
//! ([`KvmTarget`]) or a kernel on the minimal PC ([`Pc`]), told apart by the stream's memory
//! map ([`pc::is_pc_stream`]).

use dirtylog::DirtyBitmap;
use dirtylog_migrate::wire::{Region, StreamHeader};
use dirtylog_migrate::{
    DeviceState, MigrationMemory, MigrationTarget, RegionMemory, VcpuRestore, VmError,
};

use crate::migrate::{KvmTarget, TargetOptions};
use crate::pc::{self, Console, Log, Pc};

/// The guest a stream brought.
#[derive(Debug)]
pub enum AnyTarget {
    /// One of the harness's guests.
    Harness(KvmTarget),
    /// A kernel on the minimal PC.
    Pc(Pc),
}

impl AnyTarget {
    /// The target for `header`'s guest: a PC (tracking with the default tracker, guest output
    /// to `console`, diagnostics to `log`) or the harness's target with `opts`.
    pub fn new(
        header: &StreamHeader,
        opts: &TargetOptions,
        console: Console,
        log: Log,
    ) -> Result<Self, VmError> {
        if pc::is_pc_stream(header.regions()) {
            let t = pc::PcConfig::default().tracker;
            Pc::for_stream(header, t, opts.huge_pages, console, log).map(AnyTarget::Pc)
        } else {
            KvmTarget::new(header, opts).map(AnyTarget::Harness)
        }
    }

    /// The guest's progress: the harness guest's writes, or the bytes the kernel wrote to
    /// its serial port here.
    pub fn progress(&self) -> u64 {
        MigrationTarget::guest_progress(self)
    }

    /// Mailbox requests served here (harness guests; 0 for a PC).
    pub fn mailbox_served(&self) -> u64 {
        match self {
            AnyTarget::Harness(t) => t.mailbox_served(),
            AnyTarget::Pc(_) => 0,
        }
    }

    /// How the kernel ended its machine, if it did (a PC's guest).
    pub fn exit(&self) -> Option<pc::PcExit> {
        match self {
            AnyTarget::Harness(_) => None,
            AnyTarget::Pc(p) => p.exit(),
        }
    }

    /// The first vCPU error, if a vCPU thread failed.
    pub fn check(&self) -> Result<(), VmError> {
        match self {
            AnyTarget::Harness(t) => t.check(),
            AnyTarget::Pc(p) => p.check(),
        }
    }

    /// Stop the guest; the first vCPU error, if any.
    pub fn shutdown(self) -> Result<(), VmError> {
        match self {
            AnyTarget::Harness(t) => t.shutdown(),
            AnyTarget::Pc(p) => p.shutdown(),
        }
    }
}

impl MigrationTarget for AnyTarget {
    type Memory = Self;
    type Vcpus = Self;

    fn memory(&self) -> &Self {
        self
    }

    fn vcpus(&self) -> &Self {
        self
    }

    fn devices(&self) -> Option<&dyn DeviceState> {
        match self {
            AnyTarget::Harness(t) => MigrationTarget::devices(t),
            AnyTarget::Pc(t) => MigrationTarget::devices(t),
        }
    }

    fn guest_progress(&self) -> u64 {
        match self {
            AnyTarget::Harness(t) => MigrationTarget::guest_progress(t),
            AnyTarget::Pc(t) => MigrationTarget::guest_progress(t),
        }
    }
}

impl MigrationMemory for AnyTarget {
    fn page_size(&self) -> u32 {
        match self {
            AnyTarget::Harness(t) => t.page_size(),
            AnyTarget::Pc(t) => t.page_size(),
        }
    }

    fn regions(&self) -> Vec<Region> {
        match self {
            AnyTarget::Harness(t) => t.regions(),
            AnyTarget::Pc(t) => t.regions(),
        }
    }

    fn region_memory(&self, index: usize) -> Option<RegionMemory> {
        match self {
            AnyTarget::Harness(t) => t.region_memory(index),
            AnyTarget::Pc(t) => t.region_memory(index),
        }
    }

    fn vmm_bitmap(&self, index: usize) -> Option<&DirtyBitmap> {
        match self {
            AnyTarget::Harness(t) => t.vmm_bitmap(index),
            AnyTarget::Pc(t) => t.vmm_bitmap(index),
        }
    }
}

impl VcpuRestore for AnyTarget {
    fn restore_state(&self, vcpu: u32, blob: &[u8]) -> Result<(), VmError> {
        match self {
            AnyTarget::Harness(t) => t.restore_state(vcpu, blob),
            AnyTarget::Pc(t) => t.restore_state(vcpu, blob),
        }
    }

    fn resume(&self) -> Result<(), VmError> {
        match self {
            AnyTarget::Harness(t) => VcpuRestore::resume(t),
            AnyTarget::Pc(t) => VcpuRestore::resume(t),
        }
    }
}
