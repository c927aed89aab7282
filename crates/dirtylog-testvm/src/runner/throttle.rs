//! vCPU throttling, as QEMU's auto-converge does it: hold each vCPU thread out of `KVM_RUN` for
//! a share of every period, whatever its guest is doing.
//!
//! A ticker thread wakes every [`THROTTLE_PERIOD`], marks every throttled vCPU as owing a hold
//! and kicks its thread (the kick signal, race-free through `immediate_exit`, as
//! [`Runner::pause`] does: a thread about to enter `KVM_RUN` returns at once and takes its hold).
//! A vCPU thread that owes a hold sleeps its share of the period before its next `KVM_RUN`, then
//! runs until the next tick: so it runs the rest of the time. vCPUs parked elsewhere (sync,
//! pacing, full ring) owe at most one hold, taken when they next enter the guest.
//!
//! Two shares combine, the larger winning: the all-vCPU percentage of
//! [`Runner::set_throttle`] (auto-converge) and each vCPU's own share in per-mille
//! ([`VcpuThrottle`], what a dirty limit sets: QEMU's per-vCPU `throttle_us_per_full`). A vCPU
//! whose share is 0 is never kicked by the ticker.

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{Runner, Shared};
use crate::error::{Error, Op, Result};

/// The throttle's period.
pub const THROTTLE_PERIOD: Duration = Duration::from_millis(10);

/// The largest per-vCPU share, per mille of [`THROTTLE_PERIOD`] (as 99% for
/// [`Runner::set_throttle`]: a vCPU must run to make progress).
pub const MAX_VCPU_THROTTLE_PERMILLE: u16 = 990;

/// The throttle state of a runner.
#[derive(Debug)]
pub(super) struct Throttle {
    percent: AtomicU8,
    /// Per vCPU, its own share in per-mille ([`VcpuThrottle`]).
    permille: Vec<AtomicU16>,
    owed: Vec<AtomicBool>,
    ticker: Mutex<Option<JoinHandle<()>>>,
}

impl Throttle {
    pub(super) fn new(vcpus: usize) -> Self {
        Throttle {
            percent: AtomicU8::new(0),
            permille: (0..vcpus).map(|_| AtomicU16::new(0)).collect(),
            owed: (0..vcpus).map(|_| AtomicBool::new(false)).collect(),
            ticker: Mutex::new(None),
        }
    }

    /// vCPU `i`'s share of the period in force, per mille: the larger of the two.
    fn effective_permille(&self, i: usize) -> u16 {
        let all = u16::from(self.percent.load(Ordering::Relaxed)) * 10;
        let own = self
            .permille
            .get(i)
            .map_or(0, |p| p.load(Ordering::Relaxed));
        all.max(own)
    }

    /// On vCPU `i`'s thread, before `KVM_RUN`: sleep the owed share of the period, if any;
    /// return early when `interrupted()` (shutdown, pause).
    pub(super) fn hold(&self, i: usize, interrupted: impl Fn() -> bool) {
        if !self.owed[i].swap(false, Ordering::AcqRel) {
            return;
        }
        let permille = self.effective_permille(i);
        if permille == 0 {
            return;
        }
        let until = Instant::now() + THROTTLE_PERIOD * u32::from(permille) / 1000;
        loop {
            let now = Instant::now();
            if now >= until || interrupted() {
                return;
            }
            std::thread::sleep((until - now).min(Duration::from_millis(2)));
        }
    }

    /// Join the ticker (the runner is shutting down: `watch_quit` is set).
    pub(super) fn stop(&self) {
        let t = dirtylog::sync::lock(&self.ticker).take();
        if let Some(t) = t {
            let _ = t.join();
        }
    }
}

fn tick(sh: &Shared) {
    while !sh.watch_quit.load(Ordering::Acquire) {
        std::thread::sleep(THROTTLE_PERIOD);
        for (i, owed) in sh.throttle.owed.iter().enumerate() {
            if sh.throttle.effective_permille(i) == 0 {
                continue;
            }
            // The request first, then the kick (see `super::kick`).
            owed.store(true, Ordering::SeqCst);
            sh.kick(i);
        }
    }
}

/// Start the ticker unless it runs, or the runner is shutting down: `Runner::shutdown` sets
/// `watch_quit` before it joins the ticker under the same lock, so no ticker starts (and
/// kicks) after the vCPU threads are joined.
fn ensure_ticker(sh: &Arc<Shared>) -> Result<()> {
    let mut ticker = dirtylog::sync::lock(&sh.throttle.ticker);
    if ticker.is_some() || sh.watch_quit.load(Ordering::Acquire) {
        return Ok(());
    }
    let tsh = sh.clone();
    let h = std::thread::Builder::new()
        .name("vcpu-throttle".into())
        .spawn(move || tick(&tsh))
        .map_err(|e| Error::Kvm {
            op: Op::SpawnThread,
            errno: e.raw_os_error().unwrap_or(libc::EAGAIN),
        })?;
    *ticker = Some(h);
    Ok(())
}

/// A handle on the per-vCPU throttle of a [`Runner`], for another thread (a dirty-limit
/// controller) without the runner: [`Runner::vcpu_throttle`]. It outlives the runner harmlessly
/// (setting a share then holds nothing).
#[derive(Clone, Debug)]
pub struct VcpuThrottle {
    sh: Arc<Shared>,
}

impl VcpuThrottle {
    /// Number of vCPUs.
    pub fn len(&self) -> usize {
        self.sh.throttle.permille.len()
    }

    /// No vCPUs?
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Hold vCPU `vcpu` out of the guest for `permille`‰ (0..=[`MAX_VCPU_THROTTLE_PERMILLE`])
    /// of every [`THROTTLE_PERIOD`], or the all-vCPU throttle's share if larger; 0 lifts it.
    /// Only this vCPU is kicked for it. Takes effect within a period.
    pub fn set(&self, vcpu: usize, permille: u16) -> Result<()> {
        let Some(p) = self.sh.throttle.permille.get(vcpu) else {
            return Err(Error::Config(format!(
                "no vCPU {vcpu} to throttle ({} vCPUs)",
                self.len()
            )));
        };
        if permille > MAX_VCPU_THROTTLE_PERMILLE {
            return Err(Error::Config(format!(
                "throttle of {permille}‰: at most {MAX_VCPU_THROTTLE_PERMILLE}‰ (a vCPU must \
                 run to make progress)"
            )));
        }
        p.store(permille, Ordering::Relaxed);
        if permille == 0 {
            return Ok(());
        }
        ensure_ticker(&self.sh)
    }

    /// vCPU `vcpu`'s own share in force, per mille (0 for a vCPU that does not exist).
    pub fn get(&self, vcpu: usize) -> u16 {
        self.sh
            .throttle
            .permille
            .get(vcpu)
            .map_or(0, |p| p.load(Ordering::Relaxed))
    }

    /// Lift every vCPU's own share (the all-vCPU throttle stays).
    pub fn clear(&self) {
        for p in &self.sh.throttle.permille {
            p.store(0, Ordering::Relaxed);
        }
    }
}

impl Runner {
    /// Hold every vCPU out of the guest for `percent`% (0..=99) of every
    /// [`THROTTLE_PERIOD`]; 0 stops throttling. Takes effect within a period. A vCPU's own
    /// share ([`vcpu_throttle`](Self::vcpu_throttle)) applies if larger.
    pub fn set_throttle(&self, percent: u8) -> Result<()> {
        if percent > 99 {
            return Err(Error::Config(format!(
                "throttle of {percent}%: at most 99% (a vCPU must run to make progress)"
            )));
        }
        self.sh.throttle.percent.store(percent, Ordering::Relaxed);
        if percent == 0 {
            return Ok(());
        }
        ensure_ticker(&self.sh)
    }

    /// The throttle percentage in force.
    pub fn throttle(&self) -> u8 {
        self.sh.throttle.percent.load(Ordering::Relaxed)
    }

    /// The per-vCPU throttle: a handle that sets each vCPU's own share of the period, from
    /// any thread.
    pub fn vcpu_throttle(&self) -> VcpuThrottle {
        VcpuThrottle {
            sh: self.sh.clone(),
        }
    }
}
