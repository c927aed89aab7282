//! Devices of the VMMs built on the [`Runner`]: handlers for `out` to ports other than the
//! harness's own ([`Runner::set_port_handler`]), or a whole device bus
//! ([`Runner::start_with_bus`]).

use std::sync::{Arc, Mutex, MutexGuard};

use super::Runner;
use crate::error::{Error, Result};
use crate::guest::ports;

/// A device behind an I/O port: called on the vCPU's thread, with the vCPU's index, each time
/// the guest does an `out` to the port. The vCPU re-enters the guest when it returns.
pub type PortHandler = Arc<dyn Fn(usize) + Send + Sync>;

/// What the vCPU does after a bus access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoAction {
    /// Re-enter the guest.
    Continue,
    /// The guest ended the VM (the bus recorded how): the vCPU thread ends, as
    /// [`VcpuRunState::Done`](super::VcpuRunState::Done).
    Exit,
}

/// A VMM's devices, called on the vCPU's own thread with the vCPU's index for every exit of
/// its kind. The vCPU stays out of the guest until the call returns.
pub trait IoBus: Send + Sync {
    /// `in` from `port`: fill `data` (1, 2 or 4 bytes; more for string I/O).
    fn pio_read(&self, vcpu: usize, port: u16, data: &mut [u8]);
    /// `out` of `data` to `port`.
    fn pio_write(&self, vcpu: usize, port: u16, data: &[u8]) -> IoAction;
    /// A read of guest-physical `addr` that no memslot or in-kernel device backs: fill
    /// `data`.
    fn mmio_read(&self, vcpu: usize, addr: u64, data: &mut [u8]);
    /// A write to guest-physical `addr` that no memslot or in-kernel device backs.
    fn mmio_write(&self, vcpu: usize, addr: u64, data: &[u8]) -> IoAction;
    /// vCPU `vcpu` saw the guest shut the machine down (`what` says how); its thread ends.
    fn shutdown(&self, vcpu: usize, what: &str);
}

/// The registered port handlers.
#[derive(Default)]
pub(super) struct Ports(Mutex<Vec<(u16, PortHandler)>>);

impl std::fmt::Debug for Ports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ports: Vec<u16> = self.lock().iter().map(|(p, _)| *p).collect();
        f.debug_tuple("Ports").field(&ports).finish()
    }
}

impl Ports {
    fn lock(&self) -> MutexGuard<'_, Vec<(u16, PortHandler)>> {
        dirtylog::sync::lock(&self.0)
    }

    /// Call `port`'s handler for vCPU `vcpu` (outside the lock); false if it has none.
    pub(super) fn call(&self, port: u16, vcpu: usize) -> bool {
        let handler = self
            .lock()
            .iter()
            .find(|(p, _)| *p == port)
            .map(|(_, h)| h.clone());
        match handler {
            Some(h) => {
                h(vcpu);
                true
            }
            None => false,
        }
    }
}

impl Runner {
    /// Handle `out` to `port` with `handler` from now on (replacing any earlier handler).
    /// [`ports::SYNC`] and [`ports::BUDGET`] belong to the harness and are refused. Without a
    /// handler, an `out` to an unknown port stops the vCPU with [`Error::Guest`].
    pub fn set_port_handler(&self, port: u16, handler: PortHandler) -> Result<()> {
        if port == ports::SYNC || port == ports::BUDGET {
            return Err(Error::Config(format!(
                "port {port:#x} is the harness's own (sync or budget)"
            )));
        }
        let mut ports = self.sh.ports.lock();
        ports.retain(|(p, _)| *p != port);
        ports.push((port, handler));
        Ok(())
    }
}
