//! The dirty-ring reaper of a migration source (the demo's [`KvmSource`](crate::migrate::KvmSource)
//! and the [`Pc`](crate::pc::Pc)): QEMU's reaper thread. While tracking with dirty rings, it
//! harvests every ring ([`KvmDirtyTracker::harvest_rings`]) whenever one holds the threshold
//! its owner gives, and releases the vCPUs parked on a full ring, so that vCPUs rarely block
//! between the engine's harvests.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use dirtylog::sync::lock;
use dirtylog_kvm::KvmDirtyTracker;

/// A reaper thread, started and stopped with tracking.
#[derive(Debug, Default)]
pub struct Reaper {
    quit: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
    error: Arc<Mutex<Option<String>>>,
}

impl Reaper {
    /// Start reaping `tracker`'s rings whenever one holds `threshold` entries (forgetting an
    /// earlier run's error); `release` tells the vCPU threads a harvest and reset completed.
    pub fn start(
        &self,
        tracker: Arc<KvmDirtyTracker>,
        threshold: u32,
        release: impl Fn() + Send + 'static,
    ) -> std::io::Result<()> {
        self.stop();
        *lock(&self.error) = None;
        self.quit.store(false, Ordering::Release);
        let (quit, error) = (self.quit.clone(), self.error.clone());
        let h = std::thread::Builder::new()
            .name("ring-reaper".into())
            .spawn(move || {
                while !quit.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(1));
                    // A vCPU parked on a full ring has more than the threshold unharvested,
                    // so this also releases every vCPU blocked on its ring.
                    if tracker.rings_hold_at_least(threshold) {
                        let r = tracker.harvest_rings();
                        release();
                        if let Err(e) = r {
                            lock(&error).get_or_insert(e.to_string());
                            return;
                        }
                    }
                }
            })?;
        *lock(&self.thread) = Some(h);
        Ok(())
    }

    /// Stop the thread, if running.
    pub fn stop(&self) {
        self.quit.store(true, Ordering::Release);
        if let Some(h) = lock(&self.thread).take() {
            let _ = h.join();
        }
    }

    /// The error that ended the thread, if any.
    pub fn error(&self) -> Option<String> {
        lock(&self.error).clone()
    }
}
