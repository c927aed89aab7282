//! vCPU threads: one host thread per vCPU running `KVM_RUN`, and the host-side coordination
//! of their exits.
//!
//! | exit | what the vCPU thread does |
//! |---|---|
//! | `out` to [`ports::SYNC`] | completes the `out`, parks ([`VcpuRunState::Synced`]) until the host calls [`Runner::release`] |
//! | `out` to [`ports::BUDGET`] | paces the dirtier: grants write budget per [`Runner::set_rate`], sleeping as needed |
//! | `out` to a device port | calls its handler ([`Runner::set_port_handler`]), re-enters |
//! | `KVM_EXIT_DIRTY_RING_FULL` (31) | counts it, parks ([`VcpuRunState::RingFull`]) until the host has harvested and reset the rings ([`Runner::ring_reset_done`]), then re-enters |
//! | HLT | parks ([`VcpuRunState::Halted`]) until the host resumes, pauses or shuts down; re-enters on [`Runner::resume`] |
//! | `EINTR` / `EAGAIN` | checks the host's requests (pause, shutdown, throttle), re-enters |
//! | shutdown, internal error, failed entry, anything else | stops with [`Error::Guest`] carrying the registers |
//!
//! A VMM of its own devices (the [`pc`](crate::pc)) starts the runner with an [`IoBus`]
//! instead ([`Runner::start_with_bus`]): every `in`, `out` and MMIO access goes to the bus
//! (the harness's ports mean nothing there), a bus write may end the VM ([`IoAction::Exit`]:
//! the vCPU thread ends as [`VcpuRunState::Done`]), and a guest shutdown (triple fault,
//! `KVM_EXIT_SYSTEM_EVENT`) is reported to the bus rather than as an error.
//!
//! # Pausing any guest
//!
//! The VMM pauses vCPUs whatever their guest does ([`Runner::pause`]): it sets each vCPU's
//! pause request and kicks the thread out of `KVM_RUN` ([`kick_signal`]; race-free through
//! `kvm_run.immediate_exit`, see [`kick`]), re-kicking until every thread has parked. A
//! thread parks ([`VcpuRunState::Paused`]) at its next check of the request, after
//! completing a pending I/O exit (a `KVM_RUN` with `immediate_exit = 1`, which finishes the
//! instruction and returns `EINTR` without entering the guest), so that a vCPU's saved state
//! never holds a half-done `out`. Threads parked elsewhere (sync, full ring, halted) count as
//! paused and park as paused when released. [`Runner::with_paused_vcpu`] runs a closure on a
//! parked vCPU's own thread, with its `VcpuFd` (saving and restoring vCPU state).
//! Throttling ([`Runner::set_throttle`], and per vCPU [`Runner::vcpu_throttle`]) and shutdown
//! kick the same way.
//!
//! # Dirty rings on late hosts
//!
//! The ring watchdog ([`Runner::watch_rings`]) kicks a vCPU whose ring has reached the soft
//! limit so that KVM's next entry takes the ring-full exit. Some hosts (PVM, measured: exits
//! 0–64 entries past the soft limit, at arbitrary guest instructions) act on the soft-full
//! request only when the vCPU next leaves for userspace or takes a host interrupt, not right
//! after the faulting write is logged; without the kick a fast writer overruns the 64 reserved
//! entries and KVM overwrites entries not yet harvested (a `WARN` in `kvm_dirty_ring_push`,
//! lost dirty pages, and a ring that never resynchronises: see [`Error::RingOverflow`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::error::{Error, Op, Result};
use crate::guest::{control, ports};
use crate::memory::GuestMemory;
use crate::ring::RingWatch;
use crate::sys::KVM_EXIT_DIRTY_RING_FULL;
use crate::vm::KvmVcpu;
use crate::x86::{describe_state, layout};

mod devices;
pub mod kick;
mod pause;
mod throttle;
pub use devices::{IoAction, IoBus, PortHandler};
pub use kick::kick_signal;
pub use pause::PAUSE_REKICK;
pub use throttle::{VcpuThrottle, MAX_VCPU_THROTTLE_PERMILLE, THROTTLE_PERIOD};

/// How often the ring watchdog looks at the rings. With the 64 reserved entries, a guest
/// faulting every 10 µs leaves the watchdog about 600 µs after the soft limit.
pub const RING_WATCH_PERIOD: Duration = Duration::from_micros(200);

/// How often it looks while a ring is within 64 entries of the soft limit.
pub const RING_WATCH_PERIOD_NEAR: Duration = Duration::from_micros(25);

/// Put the calling thread in `SCHED_FIFO` at the lowest priority, if allowed (root or
/// `CAP_SYS_NICE`). The ring watchdog needs it on small hosts: with every core running a vCPU
/// thread inside `KVM_RUN`, a normal-priority watchdog may not run for milliseconds, while a
/// fast guest fills the ring's 64 reserved entries in well under one. It sleeps between
/// polls, so it takes almost no CPU time.
fn make_realtime() -> bool {
    let p = libc::sched_param { sched_priority: 1 };
    // SAFETY: changes only the calling thread's scheduling policy; `p` is a valid sched_param.
    unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_FIFO, &p) == 0 }
}

/// Where a vCPU thread is (not the saved vCPU state: see [`crate::vcpu_state`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum VcpuRunState {
    /// In (or about to enter) `KVM_RUN`.
    Running,
    /// Parked at a sync exit (its `out` completed), waiting for [`Runner::release`].
    Synced,
    /// Parked after a dirty-ring-full exit, waiting for [`Runner::ring_reset_done`].
    RingFull,
    /// Sleeping for write budget (dirtier).
    Paced,
    /// Parked after the guest executed `HLT`, until [`Runner::resume`].
    Halted,
    /// Parked at the host's request ([`Runner::pause`]), until [`Runner::resume`].
    Paused,
    /// The thread ended normally (on shutdown).
    Done,
    /// The thread ended with an error.
    Failed,
}

impl VcpuRunState {
    /// Out of `KVM_RUN` and staying out until the host acts: paused, halted, synced, or
    /// blocked on a full ring (whose pending write has not retired). Done and failed threads
    /// cannot run either. What [`Runner::pause`] waits for.
    pub fn is_stopped(self) -> bool {
        matches!(
            self,
            VcpuRunState::Synced
                | VcpuRunState::RingFull
                | VcpuRunState::Halted
                | VcpuRunState::Paused
                | VcpuRunState::Done
                | VcpuRunState::Failed
        )
    }

    /// Stopped, with a live thread that can run a closure ([`Runner::with_paused_vcpu`]).
    pub fn is_parked(self) -> bool {
        self.is_stopped() && !matches!(self, VcpuRunState::Done | VcpuRunState::Failed)
    }
}

#[derive(Debug)]
struct Pacing {
    /// Pages per second per vCPU; `None` is unlimited.
    rate: Option<f64>,
    t0: Instant,
    /// Per vCPU, the write count the schedule started from: `WRITES` when the rate was set,
    /// moved forward whenever the vCPU fell behind (see [`PACING_BURST`]).
    base: Vec<f64>,
}

/// The most a paced vCPU may write ahead of its own recent progress, in seconds of its rate.
/// Time it did not run (throttled, paused, descheduled) is forgiven, not made up in a burst:
/// otherwise a paced dirtier would defeat auto-converge's throttling by catching up.
const PACING_BURST: f64 = 0.01;

/// A closure to run on a parked vCPU's thread ([`Runner::with_paused_vcpu`]).
type Job = Box<dyn FnOnce(&VcpuFd) + Send>;

struct State {
    vcpus: Vec<VcpuRunState>,
    errors: Vec<Option<Error>>,
    release_gen: u64,
    ring_gen: u64,
    /// Bumped by every [`Runner::resume`] (wakes halted vCPUs).
    resume_gen: u64,
    quit: bool,
    pacing: Pacing,
    /// Per vCPU, a closure its parked thread is to run.
    jobs: Vec<Option<Job>>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("vcpus", &self.vcpus)
            .field("release_gen", &self.release_gen)
            .field("ring_gen", &self.ring_gen)
            .field("resume_gen", &self.resume_gen)
            .field("quit", &self.quit)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Shared {
    st: Mutex<State>,
    cv: Condvar,
    /// The system memory holding the control region (harness guests), or the VMM's device
    /// bus.
    guest: GuestIo,
    ring_full: Vec<AtomicU64>,
    sync_exits: Vec<AtomicU64>,
    /// The vCPU threads, for `pthread_kill` (valid until they are joined).
    pthreads: Mutex<Vec<libc::pthread_t>>,
    kicks: AtomicU64,
    watch_quit: AtomicBool,
    /// Per vCPU: inside `KVM_RUN` (or about to enter it).
    in_run: Vec<AtomicBool>,
    /// Per vCPU: the host asks it to park ([`Runner::pause`]). Set before the kick.
    pause_req: Vec<AtomicBool>,
    /// Device port handlers ([`Runner::set_port_handler`]).
    ports: devices::Ports,
    /// vCPU throttling ([`Runner::set_throttle`]).
    throttle: throttle::Throttle,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        dirtylog::sync::lock(&self.st)
    }

    fn wait<'a>(&self, g: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        dirtylog::sync::wait(&self.cv, g)
    }

    fn wait_timeout<'a>(&self, g: MutexGuard<'a, State>, d: Duration) -> MutexGuard<'a, State> {
        dirtylog::sync::wait_timeout(&self.cv, g, d)
    }

    /// Send the kick signal to vCPU thread `i` (see [`kick`]).
    fn kick(&self, i: usize) {
        let t = dirtylog::sync::lock(&self.pthreads).get(i).copied();
        if let Some(t) = t {
            // SAFETY: `t` is a thread of this runner that has not been joined (threads are
            // joined only after kicking stops), and the signal's handler only sets the
            // thread's registered `immediate_exit` byte.
            unsafe { libc::pthread_kill(t, kick_signal()) };
            self.kicks.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn vcpu_word(&self, i: usize, field: u64) -> u64 {
        match &self.guest {
            GuestIo::Harness(sys) => {
                sys.read_u64(layout::CONTROL + control::vcpu(i as u32) + field)
            }
            GuestIo::Bus(_) => 0,
        }
    }

    fn bus(&self) -> Option<&dyn IoBus> {
        match &self.guest {
            GuestIo::Harness(_) => None,
            GuestIo::Bus(b) => Some(&**b),
        }
    }

    fn pause_requested(&self, i: usize) -> bool {
        self.pause_req[i].load(Ordering::SeqCst)
    }

    /// Park vCPU `i`'s thread in `state` until `done(state)` holds, running the closures the
    /// host hands it meanwhile ([`Runner::with_paused_vcpu`]). False if the runner is shutting
    /// down.
    fn park(
        &self,
        i: usize,
        vcpu: &mut KvmVcpu,
        state: VcpuRunState,
        done: impl Fn(&Self, &State) -> bool,
    ) -> bool {
        let mut st = self.lock();
        st.vcpus[i] = state;
        self.cv.notify_all();
        loop {
            if st.quit {
                st.jobs[i] = None;
                return false;
            }
            if let Some(job) = st.jobs[i].take() {
                drop(st);
                // A panicking closure drops its result channel: the caller gets an error, and
                // this thread lives on.
                let fd = vcpu.fd();
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || job(fd)));
                st = self.lock();
                continue;
            }
            let paused = st.vcpus[i] == VcpuRunState::Paused;
            if paused && !self.pause_requested(i) || !paused && done(self, &st) {
                if self.pause_requested(i) && !paused {
                    // Released into a pause (a sync, a ring harvest or a resume of a halted
                    // vCPU while the host pauses): stay parked, as paused, without passing
                    // through Running. Nothing is pending after these parks.
                    st.vcpus[i] = VcpuRunState::Paused;
                    self.cv.notify_all();
                    continue;
                }
                break;
            }
            st = self.wait(st);
        }
        st.vcpus[i] = VcpuRunState::Running;
        true
    }

    /// A harvest and `KVM_RESET_DIRTY_RINGS` completed: release the vCPUs parked on a full
    /// ring. Only they wait for this; a vCPU between its ring-full exit and its park sees the
    /// new generation under the lock and does not wait. Waking the others (parked at a sync
    /// exit) would only cost the harvest a round of context switches.
    fn ring_reset_done(&self) {
        let mut st = self.lock();
        st.ring_gen += 1;
        if st.vcpus.contains(&VcpuRunState::RingFull) {
            self.cv.notify_all();
        }
    }

    /// Park at a sync exit until released.
    fn park_sync(&self, i: usize, vcpu: &mut KvmVcpu) -> bool {
        self.sync_exits[i].fetch_add(1, Ordering::Relaxed);
        let gen = self.lock().release_gen;
        self.park(i, vcpu, VcpuRunState::Synced, |_, st| st.release_gen != gen)
    }

    /// Park after a ring-full exit until a harvest that started after `gen` finished.
    fn park_ring_full(&self, i: usize, vcpu: &mut KvmVcpu, gen: u64) -> bool {
        self.ring_full[i].fetch_add(1, Ordering::Relaxed);
        self.park(i, vcpu, VcpuRunState::RingFull, |_, st| st.ring_gen != gen)
    }

    /// Park after `HLT` until the host resumes (or the thread has a closure to run).
    fn park_halted(&self, i: usize, vcpu: &mut KvmVcpu) -> bool {
        let gen = self.lock().resume_gen;
        self.park(i, vcpu, VcpuRunState::Halted, |_, st| st.resume_gen != gen)
    }

    /// Park at the host's request until it resumes.
    fn park_paused(&self, i: usize, vcpu: &mut KvmVcpu) -> bool {
        self.park(i, vcpu, VcpuRunState::Paused, |sh, _| {
            !sh.pause_requested(i)
        })
    }

    /// Grant the dirtier more budget, sleeping until its rate allows at least one write. Gives
    /// up (granting nothing) when the host pauses the vCPU.
    fn pace(&self, i: usize) -> bool {
        let GuestIo::Harness(sys) = &self.guest else {
            return true;
        };
        let budget_off = layout::CONTROL + control::vcpu(i as u32) + control::BUDGET;
        let mut st = self.lock();
        loop {
            if st.quit {
                return false;
            }
            if self.pause_requested(i) {
                break;
            }
            let Some(rate) = st.pacing.rate else {
                sys.write_u64(budget_off, u64::MAX);
                break;
            };
            let writes = self.vcpu_word(i, control::WRITES);
            let el = st.pacing.t0.elapsed().as_secs_f64();
            // Grant in quanta of about a millisecond so a slow rate does not mean one exit
            // per write, and a fast one not one exit per page.
            let quantum = (rate / 1000.0).max(1.0);
            let burst = (rate * PACING_BURST).max(quantum);
            if st.pacing.base[i] + rate * el > writes as f64 + burst {
                // Behind schedule: forgive the lost time.
                st.pacing.base[i] = writes as f64 + burst - rate * el;
            }
            let allowed = st.pacing.base[i] + rate * el;
            if allowed >= writes as f64 + quantum {
                sys.write_u64(budget_off, allowed as u64);
                break;
            }
            let need = writes as f64 + quantum - st.pacing.base[i];
            let wake = Duration::from_secs_f64((need / rate.max(1e-9) - el).clamp(1e-4, 0.05));
            st.vcpus[i] = VcpuRunState::Paced;
            st = self.wait_timeout(st, wake);
            st.vcpus[i] = VcpuRunState::Running;
        }
        st.vcpus[i] = VcpuRunState::Running;
        true
    }
}

/// What the vCPU threads talk to besides KVM.
enum GuestIo {
    /// The harness's guests: the system memory holding the control region; `out` to the
    /// harness's ports ([`ports::SYNC`], [`ports::BUDGET`]) and to registered port handlers.
    Harness(Arc<GuestMemory>),
    /// A VMM's devices: every I/O and MMIO exit.
    Bus(Arc<dyn IoBus>),
}

impl std::fmt::Debug for GuestIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GuestIo::Harness(_) => "Harness",
            GuestIo::Bus(_) => "Bus",
        })
    }
}

/// Owned exit reason (the `VcpuExit` borrows the vCPU).
enum Exit {
    Out(u16),
    /// An access the bus handled; its instruction completes at the next `KVM_RUN`.
    Io(IoAction),
    /// The guest shut the machine down (bus mode).
    Shutdown(&'static str),
    RingFull,
    Hlt,
    Retry,
    Fatal(String),
}

fn internal_error(vcpu: &mut KvmVcpu) -> String {
    let run = vcpu.fd_mut().get_kvm_run();
    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so the kernel filled the `internal`
    // member of the exit union.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let n = (internal.ndata as usize).min(internal.data.len());
    format!(
        "internal error, suberror {} data {:x?}",
        internal.suberror,
        &internal.data[..n]
    )
}

/// One `KVM_RUN`, then clear `immediate_exit` (a kick that lands after this point is seen by
/// the caller's next check of the host's requests, which were recorded before the kick).
fn run_once(i: usize, vcpu: &mut KvmVcpu, bus: Option<&dyn IoBus>) -> Exit {
    let mut pio = None;
    let r = match (vcpu.fd_mut().run(), bus) {
        // Handled below, once the exit's borrow of the vCPU has ended: string I/O needs the
        // access size, which only `kvm_run` has.
        (Ok(VcpuExit::IoOut(port, data)), Some(_)) => {
            pio = Some(PendingPio {
                port,
                data: data.as_ptr().cast_mut(),
                len: data.len(),
                write: true,
            });
            Exit::Retry
        }
        (Ok(VcpuExit::IoIn(port, data)), Some(_)) => {
            pio = Some(PendingPio {
                port,
                data: data.as_mut_ptr(),
                len: data.len(),
                write: false,
            });
            Exit::Retry
        }
        (Ok(VcpuExit::MmioWrite(addr, data)), Some(b)) => Exit::Io(b.mmio_write(i, addr, data)),
        (Ok(VcpuExit::MmioRead(addr, data)), Some(b)) => {
            b.mmio_read(i, addr, data);
            Exit::Io(IoAction::Continue)
        }
        (Ok(VcpuExit::Shutdown), Some(_)) => {
            Exit::Shutdown("shutdown (a triple fault, or the guest reset the machine)")
        }
        (Ok(VcpuExit::SystemEvent(kind, _)), Some(_)) => Exit::Shutdown(match kind {
            kvm_bindings::KVM_SYSTEM_EVENT_RESET => "system event: reset",
            kvm_bindings::KVM_SYSTEM_EVENT_CRASH => "system event: crash",
            _ => "system event: shutdown",
        }),
        (Ok(VcpuExit::IoapicEoi(_)), Some(_)) => Exit::Retry,
        (r, _) => match r {
            Ok(VcpuExit::IoOut(port, _)) => Exit::Out(port),
            Ok(VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL)) => Exit::RingFull,
            Ok(VcpuExit::Intr) => Exit::Retry,
            Ok(VcpuExit::Hlt) => Exit::Hlt,
            Ok(VcpuExit::Shutdown) => {
                Exit::Fatal("shutdown (triple fault: the guest took an exception)".into())
            }
            Ok(VcpuExit::InternalError) => Exit::Fatal(String::new()),
            Ok(VcpuExit::FailEntry(reason, cpu)) => Exit::Fatal(format!(
                "VM entry failed: hardware_entry_failure_reason {reason:#x} on cpu {cpu}"
            )),
            Ok(VcpuExit::IoIn(port, _)) => {
                Exit::Fatal(format!("unexpected `in` from port {port:#x}"))
            }
            Ok(VcpuExit::MmioRead(addr, _)) | Ok(VcpuExit::MmioWrite(addr, _)) => Exit::Fatal(
                format!("access to unmapped guest-physical address {addr:#x} (MMIO exit)"),
            ),
            Ok(other) => Exit::Fatal(format!("unexpected exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Exit::Retry,
            Err(e) => Exit::Fatal(Error::from_sys(Op::Run, e).to_string()),
        },
    };
    vcpu.fd_mut().set_kvm_immediate_exit(0);
    if let (Some(p), Some(b)) = (pio, bus) {
        return bus_pio(i, vcpu, b, p);
    }
    match r {
        Exit::Fatal(s) if s.is_empty() => Exit::Fatal(internal_error(vcpu)),
        r => r,
    }
}

/// The data of a port I/O exit, kept past the exit's borrow of the vCPU.
struct PendingPio {
    port: u16,
    data: *mut u8,
    len: usize,
    write: bool,
}

/// Hand a port I/O exit to the bus, one access of the instruction's size at a time: a string
/// instruction (`rep insb`, `rep outsw`, ...) exits once with `count` accesses of `size` bytes,
/// every one of them to the same port.
fn bus_pio(i: usize, vcpu: &mut KvmVcpu, bus: &dyn IoBus, p: PendingPio) -> Exit {
    // SAFETY: the last `KVM_RUN` returned KVM_EXIT_IO (kvm-ioctls decoded an I/O exit), so the
    // kernel filled the `io` member of the exit union.
    let io = unsafe { vcpu.fd_mut().get_kvm_run().__bindgen_anon_1.io };
    let size = usize::from(io.size).max(1);
    // SAFETY: `p.data` and `p.len` are the slice kvm-ioctls handed out for this exit:
    // `io.count * io.size` bytes at `io.data_offset` (the page after `struct kvm_run`) inside
    // this vCPU's `kvm_run` mapping, which lives as long as the `VcpuFd` borrowed here. The
    // slice's borrow ended with `run_once`'s match and `io` above is a copy, so nothing else
    // refers to those bytes until the next `KVM_RUN` (the kick handler writes only
    // `immediate_exit`, in `struct kvm_run`, which does not overlap them).
    let data = unsafe { std::slice::from_raw_parts_mut(p.data, p.len) };
    if p.write {
        for access in data.chunks(size) {
            if bus.pio_write(i, p.port, access) == IoAction::Exit {
                return Exit::Io(IoAction::Exit);
            }
        }
    } else {
        for access in data.chunks_mut(size) {
            bus.pio_read(i, p.port, access);
        }
    }
    Exit::Io(IoAction::Continue)
}

/// Complete the instruction of the last I/O exit without entering the guest: `KVM_RUN` with
/// `immediate_exit = 1` runs KVM's pending completion (an `out` moves `rip` past itself) and
/// returns `EINTR`. Afterwards the vCPU's state is that of a finished instruction, so it can be
/// saved and restored elsewhere, where it simply runs on.
fn complete_pending_io(i: usize, vcpu: &mut KvmVcpu, pending: &mut bool) -> Result<()> {
    if !std::mem::take(pending) {
        return Ok(());
    }
    vcpu.fd_mut().set_kvm_immediate_exit(1);
    let r = vcpu.fd_mut().run().map(|e| format!("{e:?}"));
    vcpu.fd_mut().set_kvm_immediate_exit(0);
    match r {
        Err(e) if e.errno() == libc::EINTR => Ok(()),
        Err(e) => Err(Error::from_sys(Op::Run, e)),
        Ok(exit) => Err(Error::Guest {
            vcpu: i as u32,
            what: format!(
                "KVM_RUN with immediate_exit set entered the guest (exit {exit}); {}",
                describe_state(vcpu.fd())
            ),
        }),
    }
}

fn vcpu_loop(i: usize, vcpu: &mut KvmVcpu, sh: &Shared) -> Result<()> {
    // SAFETY: `_kick` is dropped at the end of this function, on this thread, while `vcpu`
    // (borrowed for the whole call) is still alive and in place.
    let _kick = unsafe { kick::KickTarget::register(vcpu) };
    // The last exit was an I/O exit whose instruction KVM completes at the next KVM_RUN.
    let mut io_pending = false;
    loop {
        let ring_gen = {
            let st = sh.lock();
            if st.quit {
                return Ok(());
            }
            st.ring_gen
        };
        if sh.pause_requested(i) {
            complete_pending_io(i, vcpu, &mut io_pending)?;
            if !sh.park_paused(i, vcpu) {
                return Ok(());
            }
            continue;
        }
        sh.throttle.hold(i, || {
            sh.watch_quit.load(Ordering::Acquire) || sh.pause_requested(i)
        });
        sh.in_run[i].store(true, Ordering::SeqCst);
        let exit = run_once(i, vcpu, sh.bus());
        sh.in_run[i].store(false, Ordering::SeqCst);
        // Any KVM_RUN, even one that returned EINTR at once, completed the previous exit.
        io_pending = matches!(exit, Exit::Out(_) | Exit::Io(_));
        let go_on = match exit {
            Exit::Io(IoAction::Continue) => true,
            Exit::Io(IoAction::Exit) => return Ok(()),
            Exit::Shutdown(what) => {
                if let Some(b) = sh.bus() {
                    b.shutdown(i, what);
                }
                return Ok(());
            }
            Exit::Out(ports::SYNC) => {
                complete_pending_io(i, vcpu, &mut io_pending)?;
                sh.park_sync(i, vcpu)
            }
            Exit::Out(ports::BUDGET) => sh.pace(i),
            Exit::RingFull => sh.park_ring_full(i, vcpu, ring_gen),
            Exit::Hlt => sh.park_halted(i, vcpu),
            Exit::Retry => true,
            // A device port: the handler ran (on this thread); re-enter.
            Exit::Out(port) if sh.ports.call(port, i) => true,
            Exit::Out(port) => {
                return Err(Error::Guest {
                    vcpu: i as u32,
                    what: format!(
                        "unexpected `out` to port {port:#x}; {}",
                        describe_state(vcpu.fd())
                    ),
                })
            }
            Exit::Fatal(what) => {
                return Err(Error::Guest {
                    vcpu: i as u32,
                    what: format!("{what}; {}", describe_state(vcpu.fd())),
                })
            }
        };
        if !go_on {
            return Ok(());
        }
    }
}

/// The vCPU threads of a machine.
#[derive(Debug)]
pub struct Runner {
    sh: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    watchdog: Option<JoinHandle<()>>,
}

impl Runner {
    /// Start one thread per vCPU (already set up to run), in `KVM_RUN` at once. `sys` is the
    /// system memory holding the control region.
    pub fn start(vcpus: Vec<KvmVcpu>, sys: Arc<GuestMemory>) -> Result<Self> {
        Self::spawn(vcpus, GuestIo::Harness(sys), false)
    }

    /// Start one thread per vCPU of a VMM whose devices are `bus` (every I/O and MMIO exit
    /// goes to it; see the [module docs](self)), paused if `paused` (as
    /// [`start_paused`](Self::start_paused)).
    pub fn start_with_bus(vcpus: Vec<KvmVcpu>, bus: Arc<dyn IoBus>, paused: bool) -> Result<Self> {
        Self::spawn(vcpus, GuestIo::Bus(bus), paused)
    }

    /// Start one thread per vCPU, paused: each parks ([`VcpuRunState::Paused`]) before its
    /// first `KVM_RUN`, until [`resume`](Self::resume). Lets the VMM register its devices and
    /// pacing before any guest instruction runs.
    pub fn start_paused(vcpus: Vec<KvmVcpu>, sys: Arc<GuestMemory>) -> Result<Self> {
        Self::spawn(vcpus, GuestIo::Harness(sys), true)
    }

    fn spawn(vcpus: Vec<KvmVcpu>, guest: GuestIo, paused: bool) -> Result<Self> {
        kick::install_kick_handler()?;
        let n = vcpus.len();
        let sh = Arc::new(Shared {
            st: Mutex::new(State {
                vcpus: vec![VcpuRunState::Running; n],
                errors: (0..n).map(|_| None).collect(),
                release_gen: 0,
                ring_gen: 0,
                resume_gen: 0,
                quit: false,
                pacing: Pacing {
                    rate: None,
                    t0: Instant::now(),
                    base: vec![0.0; n],
                },
                jobs: (0..n).map(|_| None).collect(),
            }),
            cv: Condvar::new(),
            guest,
            ring_full: (0..n).map(|_| AtomicU64::new(0)).collect(),
            sync_exits: (0..n).map(|_| AtomicU64::new(0)).collect(),
            pthreads: Mutex::new(Vec::with_capacity(n)),
            kicks: AtomicU64::new(0),
            watch_quit: AtomicBool::new(false),
            in_run: (0..n).map(|_| AtomicBool::new(false)).collect(),
            pause_req: (0..n).map(|_| AtomicBool::new(paused)).collect(),
            ports: devices::Ports::default(),
            throttle: throttle::Throttle::new(n),
        });
        let mut r = Runner {
            sh: sh.clone(),
            threads: Vec::with_capacity(n),
            watchdog: None,
        };
        for (i, mut v) in vcpus.into_iter().enumerate() {
            let tsh = sh.clone();
            let h = std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || {
                    let sh = tsh;
                    // A panic (a port handler's, say) ends the thread as Failed, so that
                    // `pause` and `wait_all` report it instead of waiting for it.
                    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        vcpu_loop(i, &mut v, &sh)
                    }))
                    .unwrap_or_else(|_| {
                        Err(Error::Guest {
                            vcpu: i as u32,
                            what: "the vCPU thread panicked (in a port handler?)".into(),
                        })
                    });
                    let mut st = sh.lock();
                    st.jobs[i] = None;
                    match res {
                        Ok(()) => st.vcpus[i] = VcpuRunState::Done,
                        Err(e) => {
                            st.vcpus[i] = VcpuRunState::Failed;
                            st.errors[i] = Some(e);
                        }
                    }
                    sh.cv.notify_all();
                })
                .map_err(|e| Error::Kvm {
                    op: Op::SpawnThread,
                    errno: e.raw_os_error().unwrap_or(libc::EAGAIN),
                })?;
            {
                use std::os::unix::thread::JoinHandleExt;
                let mut p = dirtylog::sync::lock(&sh.pthreads);
                p.push(h.as_pthread_t() as libc::pthread_t);
            }
            r.threads.push(h);
        }
        Ok(r)
    }

    /// Start the ring watchdog: every [`RING_WATCH_PERIOD`], kick each running vCPU whose ring
    /// holds at least `threshold` unharvested entries (use the soft limit, `entries - 64`), so
    /// that KVM takes the ring-full exit now rather than at its next exit to userspace. `rings`
    /// are in vCPU order. On a host that exits at the soft limit by itself the kicks never find
    /// a running vCPU over the threshold, or are harmless duplicates. The watchdog runs
    /// `SCHED_FIFO` when the process may (root or `CAP_SYS_NICE`; best effort, through the
    /// private `make_realtime`), so busy vCPU threads cannot starve it.
    pub fn watch_rings(&mut self, rings: Vec<RingWatch>, threshold: u32) -> Result<()> {
        if rings.len() != self.len() {
            return Err(Error::Config("one ring per vCPU, watched once".into()));
        }
        // Poll fast only while some ring is within 64 entries of the threshold.
        let near = threshold.saturating_sub(64).max(1);
        let rings = Arc::new(rings);
        let r = rings.clone();
        self.watch_ring_fill(
            move || r.iter().any(|w| w.holds_at_least(near)),
            move |i| rings.get(i).is_some_and(|w| w.holds_at_least(threshold)),
        )
    }

    /// [`watch_rings`](Self::watch_rings) over rings someone else harvests (such as a
    /// `dirtylog_kvm::KvmDirtyTracker`'s): `full(i)` says whether vCPU `i`'s ring reached the
    /// kick threshold (`KvmDirtyTracker::ring_soft_full`), `near()` whether some ring is close
    /// to it (the watchdog then polls every [`RING_WATCH_PERIOD_NEAR`]).
    pub fn watch_ring_fill(
        &mut self,
        near: impl Fn() -> bool + Send + 'static,
        full: impl Fn(usize) -> bool + Send + 'static,
    ) -> Result<()> {
        if self.watchdog.is_some() {
            return Err(Error::Config("one ring per vCPU, watched once".into()));
        }
        let n = self.len();
        let sh = self.sh.clone();
        let h = std::thread::Builder::new()
            .name("ring-watchdog".into())
            .spawn(move || {
                // Best effort: without the privilege it runs at normal priority.
                make_realtime();
                let mut period = RING_WATCH_PERIOD;
                while !sh.watch_quit.load(Ordering::Acquire) {
                    std::thread::sleep(period);
                    if !near() {
                        period = RING_WATCH_PERIOD;
                        continue;
                    }
                    period = RING_WATCH_PERIOD_NEAR;
                    for i in 0..n {
                        if full(i) && sh.in_run[i].load(Ordering::Acquire) {
                            sh.kick(i);
                        }
                    }
                }
            })
            .map_err(|e| Error::Kvm {
                op: Op::SpawnThread,
                errno: e.raw_os_error().unwrap_or(libc::EAGAIN),
            })?;
        self.watchdog = Some(h);
        Ok(())
    }

    /// Kicks sent so far (pause, throttle, watchdog and shutdown).
    pub fn kicks(&self) -> u64 {
        self.sh.kicks.load(Ordering::Relaxed)
    }

    /// Number of vCPUs.
    pub fn len(&self) -> usize {
        self.sh.ring_full.len()
    }

    /// No vCPUs?
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every vCPU's state.
    pub fn states(&self) -> Vec<VcpuRunState> {
        self.sh.lock().vcpus.clone()
    }

    /// Ring-full exits of vCPU `i`.
    pub fn ring_full_exits(&self, i: usize) -> u64 {
        self.sh.ring_full[i].load(Ordering::Relaxed)
    }

    /// Ring-full exits of all vCPUs.
    pub fn total_ring_full_exits(&self) -> u64 {
        self.sh
            .ring_full
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .sum()
    }

    /// Sync exits of vCPU `i`.
    pub fn sync_exits(&self, i: usize) -> u64 {
        self.sh.sync_exits[i].load(Ordering::Relaxed)
    }

    /// Wait until every vCPU's state satisfies `ok`. A failed vCPU ends the wait with its error
    /// (unless `ok` accepts `Failed`); so does the deadline, with [`Error::Timeout`].
    pub fn wait_all(
        &self,
        what: &str,
        timeout: Duration,
        ok: impl Fn(VcpuRunState) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut st = self.sh.lock();
        loop {
            if let Some(i) = st
                .vcpus
                .iter()
                .position(|s| *s == VcpuRunState::Failed && !ok(VcpuRunState::Failed))
            {
                return Err(st.errors[i].take().unwrap_or(Error::Guest {
                    vcpu: i as u32,
                    what: "failed (error already reported)".into(),
                }));
            }
            if st.vcpus.iter().all(|s| ok(*s)) {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    what: format!("{what} (vCPU states: {:?})", st.vcpus),
                    ms: timeout.as_millis() as u64,
                });
            }
            st = self.sh.wait_timeout(st, deadline - now);
        }
    }

    /// The error of a failed vCPU, if any (taken: reported once).
    pub fn check(&self) -> Result<()> {
        let mut st = self.sh.lock();
        if let Some(i) = st.vcpus.iter().position(|s| *s == VcpuRunState::Failed) {
            if let Some(e) = st.errors[i].take() {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Let every vCPU parked at a sync exit continue (vCPUs not parked there are unaffected and
    /// will park at their next sync).
    pub fn release(&self) {
        let mut st = self.sh.lock();
        st.release_gen += 1;
        self.sh.cv.notify_all();
    }

    /// Tell vCPUs blocked on a full ring that a harvest and `KVM_RESET_DIRTY_RINGS` completed.
    pub fn ring_reset_done(&self) {
        self.sh.ring_reset_done();
    }

    /// A handle that does [`ring_reset_done`](Self::ring_reset_done) from another thread (a
    /// ring reaper's), without the runner.
    pub fn ring_reset_notifier(&self) -> impl Fn() + Send + Sync + 'static {
        let sh = self.sh.clone();
        move || {
            sh.ring_reset_done();
        }
    }

    /// Dirtier pacing: `Some(pages_per_second)` per vCPU, or `None` for unlimited. Takes effect
    /// from now on.
    pub fn set_rate(&self, rate: Option<f64>) {
        let mut st = self.sh.lock();
        let base = (0..st.vcpus.len())
            .map(|i| self.sh.vcpu_word(i, control::WRITES) as f64)
            .collect();
        st.pacing = Pacing {
            rate,
            t0: Instant::now(),
            base,
        };
        self.sh.cv.notify_all();
    }

    /// Stop every thread: release all parks, kick every thread out of the guest, and join the
    /// threads (waiting up to `timeout`; a thread stuck in the guest is left detached, still
    /// holding its memory).
    /// Returns the first vCPU error, if any.
    pub fn shutdown(&mut self, timeout: Duration) -> Result<()> {
        self.sh.watch_quit.store(true, Ordering::Release);
        self.sh.throttle.stop();
        if let Some(w) = self.watchdog.take() {
            let _ = w.join();
        }
        {
            let mut st = self.sh.lock();
            st.quit = true;
            self.sh.cv.notify_all();
        }
        let deadline = Instant::now() + timeout;
        while self.threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
            // Kick again and again: a kick that lands before a thread registered its
            // `immediate_exit` is lost.
            for (i, t) in self.threads.iter().enumerate() {
                if !t.is_finished() {
                    self.sh.kick(i);
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        // Joined (or detached) threads must not be signalled again: a `pthread_t` is only
        // valid until its thread is joined.
        dirtylog::sync::lock(&self.sh.pthreads).clear();
        let mut stuck = 0;
        for t in self.threads.drain(..) {
            if t.is_finished() {
                let _ = t.join();
            } else {
                stuck += 1;
            }
        }
        let mut st = self.sh.lock();
        if let Some(e) = st.errors.iter_mut().find_map(Option::take) {
            return Err(e);
        }
        if stuck > 0 {
            return Err(Error::Timeout {
                what: format!("{stuck} vCPU thread(s) to leave the guest at shutdown"),
                ms: timeout.as_millis() as u64,
            });
        }
        Ok(())
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        if !self.threads.is_empty() || self.watchdog.is_some() {
            let _ = self.shutdown(Duration::from_secs(5));
        }
    }
}
