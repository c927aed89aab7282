//! Device ports and vCPU state access for the VMM built on the [`Runner`]: handlers for `out`
//! to ports other than the harness's own ([`Runner::set_port_handler`]), and duplicates of the
//! vCPU fds for saving and restoring the state of parked vCPUs ([`Runner::vcpu_fd`]).

use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::{Arc, Mutex, MutexGuard};

use super::Runner;
use crate::error::{Error, Op, Result};
use crate::guest::ports;
use crate::vm::KvmVcpu;

/// A device behind an I/O port: called on the vCPU's thread, with the vCPU's index, each time
/// the guest does an `out` to the port. The vCPU re-enters the guest when it returns.
pub type PortHandler = Arc<dyn Fn(usize) + Send + Sync>;

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
        match self.0.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
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

/// Duplicate every vCPU's fd (before the vCPUs move into their threads).
pub(super) fn dup_fds(vcpus: &[KvmVcpu]) -> Result<Vec<File>> {
    vcpus
        .iter()
        .map(|v| {
            // SAFETY: the fd is open for as long as `v` lives, which outlasts this borrow.
            let fd = unsafe { BorrowedFd::borrow_raw(v.fd().as_raw_fd()) };
            fd.try_clone_to_owned()
                .map(File::from)
                .map_err(|e| Error::Kvm {
                    op: Op::CreateVcpu,
                    errno: e.raw_os_error().unwrap_or(libc::EBADF),
                })
        })
        .collect()
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

    /// A duplicate of vCPU `i`'s fd, for the vCPU ioctls of [`crate::vcpu_state`] from another
    /// thread. Only while the vCPU is parked (its state [`super::VcpuState::is_stopped`], and
    /// kept so): KVM serialises vCPU ioctls with `KVM_RUN`, so an ioctl on a vCPU inside the
    /// guest blocks until it exits.
    pub fn vcpu_fd(&self, i: usize) -> Option<&File> {
        self.sh.state_fds.get(i)
    }
}
