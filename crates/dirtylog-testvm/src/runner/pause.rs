//! Pausing and resuming vCPUs whatever their guest does, and running closures on a paused
//! vCPU's own thread (see the [runner's module docs](super)).

use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuFd;

use super::{Runner, VcpuRunState};
use crate::error::{Error, Result};

/// How long [`Runner::pause`] waits for a kicked vCPU to acknowledge before kicking it again.
/// A kick is lost only if it lands before the vCPU thread registered its `immediate_exit`
/// (see [`super::kick`]), so re-kicks are rare.
pub const PAUSE_REKICK: Duration = Duration::from_millis(1);

/// How long [`Runner::with_paused_vcpu`] waits for the parked thread to run the closure.
const JOB_TIMEOUT: Duration = Duration::from_secs(10);

impl Runner {
    /// Pause every vCPU: return once every vCPU thread is parked out of `KVM_RUN`
    /// ([`VcpuRunState::is_stopped`]: paused, halted, synced, blocked on a full ring, or
    /// ended), whatever the guest does — a tight loop, `HLT`, the middle of a write. Each
    /// vCPU's pause request is set, then its thread is kicked (and kicked again every
    /// [`PAUSE_REKICK`] until it has parked). A vCPU parked at a sync exit or on a full ring
    /// stays there, and parks as paused when released. vCPUs stay paused until
    /// [`resume`](Self::resume).
    ///
    /// Fails with the error of a failed vCPU, or [`Error::Timeout`] after `timeout` (the
    /// pause requests stay set: the vCPUs park when they can).
    pub fn pause(&self, timeout: Duration) -> Result<()> {
        let sh = &self.sh;
        for r in &sh.pause_req {
            r.store(true, Ordering::SeqCst);
        }
        let deadline = Instant::now() + timeout;
        let mut st = sh.lock();
        // Wake threads waiting on the condition variable (pacing) to see the request.
        sh.cv.notify_all();
        loop {
            if let Some(i) = st.vcpus.iter().position(|s| *s == VcpuRunState::Failed) {
                if let Some(e) = st.errors[i].take() {
                    return Err(e);
                }
            }
            if st.vcpus.iter().all(|s| s.is_stopped()) {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    what: format!("the vCPUs to pause (states: {:?})", st.vcpus),
                    ms: timeout.as_millis() as u64,
                });
            }
            let running: Vec<usize> = (0..st.vcpus.len())
                .filter(|&i| !st.vcpus[i].is_stopped())
                .collect();
            drop(st);
            for i in running {
                sh.kick(i);
            }
            st = sh.lock();
            // Parking threads notify the condition variable; re-kick the stragglers after
            // PAUSE_REKICK.
            if !st.vcpus.iter().all(|s| s.is_stopped()) {
                st = sh.wait_timeout(st, PAUSE_REKICK.min(deadline - now));
            }
        }
    }

    /// Let paused vCPUs run again (and halted ones re-enter the guest). vCPUs parked at a sync
    /// exit or on a full ring stay there until [`release`](Self::release) or
    /// [`ring_reset_done`](Self::ring_reset_done).
    pub fn resume(&self) {
        for r in &self.sh.pause_req {
            r.store(false, Ordering::SeqCst);
        }
        let mut st = self.sh.lock();
        st.resume_gen += 1;
        self.sh.cv.notify_all();
    }

    /// Whether a pause is in force (requested and not resumed).
    pub fn is_paused(&self) -> bool {
        self.sh.pause_req.iter().any(|r| r.load(Ordering::SeqCst))
    }

    /// Run `f` on paused vCPU `i`'s own thread, with its [`VcpuFd`] (vCPU ioctls such as
    /// [`crate::vcpu_state::VcpuSnapshot::save`] need the fd, which the thread owns), and
    /// return its result. The runner must be paused ([`pause`](Self::pause) returned) and the
    /// vCPU parked ([`VcpuRunState::is_parked`]); any pending I/O exit has been completed.
    pub fn with_paused_vcpu<R, F>(&self, i: usize, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&VcpuFd) -> R + Send + 'static,
    {
        let (tx, rx) = mpsc::sync_channel(1);
        {
            let mut st = self.sh.lock();
            let state = *st
                .vcpus
                .get(i)
                .ok_or_else(|| Error::Config(format!("vCPU {i}: the runner has {}", self.len())))?;
            if !self.sh.pause_requested(i) || !state.is_parked() {
                return Err(Error::Config(format!(
                    "vCPU {i} is {state:?}{}: pause the runner first",
                    if self.sh.pause_requested(i) {
                        ""
                    } else {
                        ", not paused"
                    }
                )));
            }
            if st.jobs[i].is_some() {
                return Err(Error::Config(format!(
                    "vCPU {i} already has a closure to run"
                )));
            }
            st.jobs[i] = Some(Box::new(move |fd: &VcpuFd| {
                let _ = tx.send(f(fd));
            }));
            self.sh.cv.notify_all();
        }
        rx.recv_timeout(JOB_TIMEOUT).map_err(|e| match e {
            mpsc::RecvTimeoutError::Timeout => Error::Timeout {
                what: format!("vCPU {i}'s thread to run a closure"),
                ms: JOB_TIMEOUT.as_millis() as u64,
            },
            mpsc::RecvTimeoutError::Disconnected => Error::Guest {
                vcpu: i as u32,
                what: "the closure given to with_paused_vcpu panicked, or the thread ended \
                       before running it"
                    .into(),
            },
        })
    }
}
