//! vCPU throttling, as QEMU's auto-converge does it: hold each vCPU thread out of `KVM_RUN` for
//! a share of every period, whatever its guest is doing.
//!
//! A ticker thread wakes every [`THROTTLE_PERIOD`], marks every vCPU as owing a hold and kicks
//! every vCPU thread (the kick signal, race-free through `immediate_exit`, as
//! [`Runner::pause`] does: a thread about to enter `KVM_RUN` returns at once and takes its hold). A vCPU thread that owes a hold sleeps
//! `percent`% of the period before its next `KVM_RUN`, then runs until the next tick: so it runs
//! `100 - percent`% of the time. vCPUs parked elsewhere (sync, pacing, full ring) owe at most one
//! hold, taken when they next enter the guest.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{Runner, Shared};
use crate::error::{Error, Op, Result};

/// The throttle's period.
pub const THROTTLE_PERIOD: Duration = Duration::from_millis(10);

/// The throttle state of a runner.
#[derive(Debug)]
pub(super) struct Throttle {
    percent: AtomicU8,
    owed: Vec<AtomicBool>,
    ticker: Mutex<Option<JoinHandle<()>>>,
}

impl Throttle {
    pub(super) fn new(vcpus: usize) -> Self {
        Throttle {
            percent: AtomicU8::new(0),
            owed: (0..vcpus).map(|_| AtomicBool::new(false)).collect(),
            ticker: Mutex::new(None),
        }
    }

    /// On vCPU `i`'s thread, before `KVM_RUN`: sleep the owed share of the period, if any;
    /// return early when `interrupted()` (shutdown, pause).
    pub(super) fn hold(&self, i: usize, interrupted: impl Fn() -> bool) {
        if !self.owed[i].swap(false, Ordering::AcqRel) {
            return;
        }
        let percent = self.percent.load(Ordering::Relaxed);
        if percent == 0 {
            return;
        }
        let until = Instant::now() + THROTTLE_PERIOD * u32::from(percent) / 100;
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
        if sh.throttle.percent.load(Ordering::Relaxed) == 0 {
            continue;
        }
        for (i, owed) in sh.throttle.owed.iter().enumerate() {
            // The request first, then the kick (see `super::kick`).
            owed.store(true, Ordering::SeqCst);
            sh.kick(i);
        }
    }
}

impl Runner {
    /// Hold every vCPU out of the guest for `percent`% (0..=99) of every
    /// [`THROTTLE_PERIOD`]; 0 stops throttling. Takes effect within a period.
    pub fn set_throttle(&self, percent: u8) -> Result<()> {
        if percent > 99 {
            return Err(Error::Config(format!(
                "throttle of {percent}%: at most 99% (a vCPU must run to make progress)"
            )));
        }
        let th = &self.sh.throttle;
        th.percent.store(percent, Ordering::Relaxed);
        if percent == 0 {
            return Ok(());
        }
        let mut ticker = dirtylog::sync::lock(&th.ticker);
        if ticker.is_none() {
            let sh: Arc<Shared> = self.sh.clone();
            let h = std::thread::Builder::new()
                .name("vcpu-throttle".into())
                .spawn(move || tick(&sh))
                .map_err(|e| Error::Kvm {
                    op: Op::SpawnThread,
                    errno: e.raw_os_error().unwrap_or(libc::EAGAIN),
                })?;
            *ticker = Some(h);
        }
        Ok(())
    }

    /// The throttle percentage in force.
    pub fn throttle(&self) -> u8 {
        self.sh.throttle.percent.load(Ordering::Relaxed)
    }
}
