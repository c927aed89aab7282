//! The PC's side of the vCPU threads: the [`IoBus`] that hands port I/O to the devices
//! ([`PioBus`]), MMIO to pc-testdev's buffer or, elsewhere, answers it with all-ones (logged
//! once per page), and records how the guest ended the machine.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use dirtylog::sync::lock;

use super::pio::{PioAction, PioBus};
use super::testdev;
use crate::runner::{IoAction, IoBus};

/// How the guest ended the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PcExit {
    /// A write to the exit port (`isa-debug-exit`): the status the process exits with,
    /// `value << 1 | 1`, as QEMU.
    Status(u32),
    /// A triple fault, a reset or a shutdown request (QEMU with `-no-reboot` exits 0).
    Shutdown(String),
}

impl PcExit {
    /// The process exit status QEMU gives for this end.
    pub fn code(&self) -> i32 {
        match self {
            // The status is `v << 1 | 1` truncated to the 8 bits a process can return, as
            // QEMU's `exit((val << 1) | 1)`.
            PcExit::Status(s) => (*s & 0xff) as i32,
            PcExit::Shutdown(_) => 0,
        }
    }
}

impl std::fmt::Display for PcExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PcExit::Status(s) => write!(f, "the guest wrote {} to the exit port", s >> 1),
            PcExit::Shutdown(what) => write!(f, "the guest shut the machine down ({what})"),
        }
    }
}

/// Where a PC tells how the guest ended it (called once, on the vCPU thread that saw the end).
pub type ExitSink = Arc<dyn Fn(PcExit) + Send + Sync>;

/// The PC's device bus: port I/O to [`PioBus`], unbacked MMIO read as all-ones and ignored
/// (each page logged once), the machine's end sent to the owner.
pub struct PcBus {
    pio: PioBus,
    log: Box<dyn Fn(&str) + Send + Sync>,
    mmio_seen: Mutex<BTreeSet<u64>>,
    exit: Mutex<Option<PcExit>>,
    events: Mutex<Option<ExitSink>>,
    mmio_exits: AtomicU64,
}

impl std::fmt::Debug for PcBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PcBus")
            .field("exit", &*lock(&self.exit))
            .finish_non_exhaustive()
    }
}

impl PcBus {
    /// A bus over `pio`, logging through `log`.
    pub fn new(pio: PioBus, log: Box<dyn Fn(&str) + Send + Sync>) -> Self {
        PcBus {
            pio,
            log,
            mmio_seen: Mutex::new(BTreeSet::new()),
            exit: Mutex::new(None),
            events: Mutex::new(None),
            mmio_exits: AtomicU64::new(0),
        }
    }

    /// The port devices.
    pub fn pio(&self) -> &PioBus {
        &self.pio
    }

    /// Send the machine's end to `sink` (at once if it already ended).
    pub fn on_exit(&self, sink: ExitSink) {
        let exit = lock(&self.exit).clone();
        if let Some(e) = exit {
            sink(e);
        }
        *lock(&self.events) = Some(sink);
    }

    /// How the guest ended the machine, if it did.
    pub fn exit(&self) -> Option<PcExit> {
        lock(&self.exit).clone()
    }

    /// MMIO exits so far.
    pub fn mmio_exits(&self) -> u64 {
        self.mmio_exits.load(Ordering::Relaxed)
    }

    fn end(&self, e: PcExit) {
        {
            let mut exit = lock(&self.exit);
            if exit.is_some() {
                return;
            }
            *exit = Some(e.clone());
        }
        let sink = lock(&self.events).clone();
        if let Some(sink) = sink {
            sink(e);
        }
    }

    fn mmio(&self, addr: u64, len: usize, write: bool) {
        self.mmio_exits.fetch_add(1, Ordering::Relaxed);
        if lock(&self.mmio_seen).insert(addr & !0xfff) {
            (self.log)(&format!(
                "guest {} unbacked guest-physical address {addr:#x} ({len} bytes, MMIO); \
                 ignored{} (logged once per page)",
                if write { "wrote" } else { "read" },
                if write { "" } else { ", read as all-ones" }
            ));
        }
    }
}

/// `addr`'s offset in pc-testdev's MMIO buffer, if it is there.
fn testdev_offset(addr: u64) -> Option<u64> {
    addr.checked_sub(testdev::IOMEM_BASE)
        .filter(|&off| off < testdev::IOMEM_LEN)
}

impl IoBus for PcBus {
    fn pio_read(&self, _vcpu: usize, port: u16, data: &mut [u8]) {
        self.pio.read(port, data);
    }

    fn pio_write(&self, _vcpu: usize, port: u16, data: &[u8]) -> IoAction {
        match self.pio.write(port, data) {
            PioAction::Continue => IoAction::Continue,
            PioAction::Exit(status) => {
                self.end(PcExit::Status(status));
                IoAction::Exit
            }
        }
    }

    fn mmio_read(&self, _vcpu: usize, addr: u64, data: &mut [u8]) {
        if let Some(off) = testdev_offset(addr) {
            self.pio.testdev().read_iomem(off, data);
            return;
        }
        self.mmio(addr, data.len(), false);
        data.fill(0xff);
    }

    fn mmio_write(&self, _vcpu: usize, addr: u64, data: &[u8]) -> IoAction {
        if let Some(off) = testdev_offset(addr) {
            self.pio.testdev().write_iomem(off, data);
            return IoAction::Continue;
        }
        self.mmio(addr, data.len(), true);
        IoAction::Continue
    }

    fn shutdown(&self, vcpu: usize, what: &str) {
        self.end(PcExit::Shutdown(format!("vCPU {vcpu}: {what}")));
    }
}
