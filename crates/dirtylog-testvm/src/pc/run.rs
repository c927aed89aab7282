//! Running a kernel on a [`Pc`], and migrating it back to back between PCs while it runs:
//! what `dirtylog run --kernel` does.
//!
//! # Migrations
//!
//! Each migration is real: a fresh destination PC is built from the stream's header, the
//! guest is sent over a Unix socket pair by the engine ([`send_on`] / [`receive_on`]), the
//! destination checks every byte and resumes, and the source is shut down. The guest's serial
//! output goes on from the destination (all PCs of a run share one console), and input typed
//! meanwhile waits in the pipe until the new PC takes it.
//!
//! When to migrate ([`MigrateMode`]):
//! - `on-request`: when the guest asks, with kvm-unit-tests' serial handshake
//!   (`lib/migrate.c`): a line containing `Now migrate the VM` (or its `(quiet)` form) → one
//!   migration, then a newline on the destination's serial input (the guest waits for a key);
//!   `Skipped VM migration` → just the newline; `Begin continuous migration` → the newline,
//!   then migrations back to back until `End continuous migration` (printed twice by the
//!   guest; answered once with a newline).
//! - `every=MS`: every `MS` milliseconds, without the guest knowing.
//!
//! `max_migrations` bounds the count; requests beyond it are answered without migrating. A
//! failed migration (the engine resumes the source) is logged and counted, and the guest runs
//! on where it was; continuous migration stops after one.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::str::FromStr;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dirtylog::sync::lock;
use dirtylog_migrate::{
    receive_on, send_on, MigrateError, ReceiveConfig, SendConfig, SendReport, Vcpus, VmError,
};

use super::bus::{PcBus, PcExit};
use super::machine::{err, Console, Log, Pc, PcConfig};
use crate::migrate::TargetOptions;

/// When a run migrates its guest. See the [module docs](self).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MigrateMode {
    /// Never.
    Off,
    /// When the guest asks (kvm-unit-tests' serial handshake).
    OnRequest,
    /// Every so often, whatever the guest does.
    Every(Duration),
}

impl FromStr for MigrateMode {
    type Err = String;

    /// `off`, `on-request` or `every=MS` (1 to 3 600 000 ms).
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(MigrateMode::Off),
            "on-request" => Ok(MigrateMode::OnRequest),
            _ => {
                let ms = s
                    .strip_prefix("every=")
                    .and_then(|v| v.parse::<u64>().ok())
                    .filter(|ms| (1..=3_600_000).contains(ms))
                    .ok_or_else(|| {
                        format!(
                            "{s:?}: use `on-request`, `every=MS` (MS from 1 to 3600000) or `off`"
                        )
                    })?;
                Ok(MigrateMode::Every(Duration::from_millis(ms)))
            }
        }
    }
}

/// Why a migration happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Trigger {
    /// The guest printed `Now migrate the VM`.
    Request,
    /// Between `Begin continuous migration` and `End continuous migration`.
    Continuous,
    /// `every=MS`.
    Timer,
}

/// One migration of a run.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationRecord {
    /// 1, 2, ...
    pub index: u32,
    /// Why.
    pub trigger: Trigger,
    /// From the start of the send to the destination's acknowledgement, ms (the engine's
    /// `total-time`, whole milliseconds as QEMU's).
    pub total_time_ms: f64,
    /// The guest paused, ms (the engine's `downtime`, whole milliseconds).
    pub downtime_ms: f64,
    /// Bytes on the wire.
    pub bytes: u64,
    /// Rounds (bulk, iterations, final).
    pub rounds: usize,
    /// Where the downtime went, µs.
    pub downtime_breakdown_us: dirtylog_migrate::DowntimeBreakdown,
}

impl MigrationRecord {
    fn new(index: u32, trigger: Trigger, r: &SendReport) -> Self {
        MigrationRecord {
            index,
            trigger,
            total_time_ms: r.stats.total_time as f64,
            downtime_ms: r.stats.downtime as f64,
            bytes: r.stats.transferred,
            rounds: r.rounds.len(),
            downtime_breakdown_us: r.downtime_breakdown,
        }
    }
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunEnd {
    /// The guest ended the machine.
    Exit(PcExit),
    /// The run's time limit passed first.
    Timeout(Duration),
}

/// What to run and how.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// The machine (every destination PC of the run has the same shape).
    pub pc: PcConfig,
    /// The Multiboot kernel image.
    pub kernel: Vec<u8>,
    /// Its command line (the kernel's name, then its arguments).
    pub cmdline: String,
    /// One Multiboot module and its command line.
    pub initrd: Option<(Vec<u8>, String)>,
    /// When to migrate.
    pub migrate: MigrateMode,
    /// At most this many migrations.
    pub max_migrations: Option<u32>,
    /// The engine's source settings for each migration.
    pub send: SendConfig,
    /// The engine's destination settings for each migration.
    pub receive: ReceiveConfig,
    /// End the run after this long, if the guest has not.
    pub timeout: Option<Duration>,
}

/// The report of a run.
#[derive(Clone, Debug)]
pub struct RunReport {
    /// How it ended.
    pub end: RunEnd,
    /// Every completed migration, in order.
    pub migrations: Vec<MigrationRecord>,
    /// Every failed migration (after which the guest ran on where it was), in order. After a
    /// failure, continuous migration stops; timed and requested ones go on.
    pub failures: Vec<String>,
}

/// What the console, the PCs and the timer tell the run.
#[derive(Debug)]
enum Ev {
    /// The guest ended its machine.
    Exit(PcExit),
    Request,
    Skip,
    BeginContinuous,
    EndContinuous,
}

/// Serial input for whichever PC runs the guest now (blocked while a migration is under way;
/// kept until the first PC boots).
#[derive(Clone, Debug, Default)]
pub struct SerialInput(Arc<Mutex<InputTarget>>);

#[derive(Debug, Default)]
struct InputTarget {
    bus: Option<Arc<PcBus>>,
    /// Bytes pushed before the first PC existed.
    early: Vec<u8>,
}

impl SerialInput {
    /// Queue `bytes` on the running guest's COM1 (waits out a migration).
    pub fn push(&self, bytes: &[u8]) {
        let mut t = lock(&self.0);
        match &t.bus {
            Some(bus) => bus.pio().push_serial_input(bytes),
            None => t.early.extend_from_slice(bytes),
        }
    }

    /// From now on, input goes to `bus` (with whatever came before the first PC).
    fn attach(t: &mut InputTarget, bus: Arc<PcBus>) {
        let early = std::mem::take(&mut t.early);
        if !early.is_empty() {
            bus.pio().push_serial_input(&early);
        }
        t.bus = Some(bus);
    }
}

/// A console writing to `out` that also watches the guest's lines for the migration
/// handshake.
fn console(out: Box<dyn Write + Send>, tx: Sender<Ev>) -> Console {
    let state = Mutex::new((out, Vec::<u8>::with_capacity(256)));
    let tx = Mutex::new(tx);
    Arc::new(move |b: u8| {
        let mut st = lock(&state);
        let (out, line) = &mut *st;
        // The guest's output is the user's, live (a guest printing a dot per pass prints no
        // newline); a closed stdout must not stop the guest.
        let _ = out.write_all(&[b]);
        let _ = out.flush();
        if b == b'\n' {
            let ev = {
                let l = String::from_utf8_lossy(line);
                if l.contains("Now migrate the VM") {
                    Some(Ev::Request)
                } else if l.contains("Skipped VM migration") {
                    Some(Ev::Skip)
                } else if l.contains("Begin continuous migration") {
                    Some(Ev::BeginContinuous)
                } else if l.contains("End continuous migration") {
                    Some(Ev::EndContinuous)
                } else {
                    None
                }
            };
            line.clear();
            if let Some(ev) = ev {
                let _ = lock(&tx).send(ev);
            }
        } else if line.len() < 4096 {
            line.push(b);
        }
    })
}

fn watch(pc: &Pc, tx: &Sender<Ev>) {
    let tx = Mutex::new(tx.clone());
    pc.on_exit(Arc::new(move |e| {
        let _ = lock(&tx).send(Ev::Exit(e));
    }));
}

/// Migrate `src`'s guest into a fresh PC over Unix socket pairs (`send.connections` of
/// them); on success the new PC runs
/// the guest and `src` stays paused (the caller shuts it down). The new PC takes `src`'s
/// tracker, and huge pages only if `src` has them and a migration target would
/// ([`TargetOptions::huge_pages`](crate::migrate::TargetOptions::huge_pages): off by
/// default, fresh huge pages cost more than the pages that land in them here).
pub fn migrate_to_new_pc(
    src: &Pc,
    send: &SendConfig,
    receive: &ReceiveConfig,
    console: Console,
    log: Log,
) -> Result<(Pc, SendReport), VmError> {
    let pc = src.config().clone();
    let (mut sending, mut receiving) = (Vec::new(), Vec::new());
    for _ in 0..send.connections.max(1) {
        let (a, b) = UnixStream::pair().map_err(|e| err(format!("socketpair: {e}")))?;
        sending.push(a);
        receiving.push(b);
    }
    let first = receiving.remove(0);
    std::thread::scope(|s| {
        let receiver = s.spawn(move || {
            receive_on(first, receiving, receive, |h| {
                let huge_pages = pc.huge_pages && TargetOptions::default().huge_pages;
                Pc::for_stream(h, pc.tracker, huge_pages, console, log)
            })
        });
        let sent = send_on(src, sending, send, &mut |_| {});
        let received = receiver
            .join()
            .map_err(|_| err("the receiving thread panicked"))?;
        match (sent, received) {
            (Ok(report), Ok((target, _))) => Ok((target, report)),
            // The source had committed and lost track of the destination: it left its guest
            // paused for whoever sees both sides — here, this function. Keep the source's.
            (Err(e @ MigrateError::OutcomeUnknown(_)), received) => {
                if let Ok((target, _)) = received {
                    let _ = target.shutdown();
                }
                Vcpus::resume(src)
                    .map_err(|r| err(format!("sending: {e}; resuming the source: {r}")))?;
                Err(err(format!(
                    "sending: {e} — resolved here: the destination stopped, the source resumed"
                )))
            }
            (Err(e), Ok((target, _))) => {
                // The engine resumed the source; the destination must not run too.
                let _ = target.shutdown();
                Err(err(format!("sending: {e}")))
            }
            (Ok(_), Err(e)) => Err(err(format!("receiving: {e}"))),
            (Err(e), Err(r)) => Err(err(format!("sending: {e}; receiving: {r}"))),
        }
    })
}

/// Run `cfg`'s kernel until the guest ends the machine or the time limit passes, migrating as
/// `cfg.migrate` says. Guest output goes to `out`; diagnostics to `log`; each migration is
/// reported to `on_migration` as it completes; `input` (if given) is the handle through which
/// the caller feeds the guest's serial input.
pub fn run(
    cfg: &RunConfig,
    out: Box<dyn Write + Send>,
    log: Log,
    input: Option<&SerialInput>,
    on_migration: &mut dyn FnMut(&MigrationRecord),
) -> Result<RunReport, VmError> {
    let (tx, rx) = mpsc::channel();
    let console = console(out, tx.clone());
    let pc = Pc::new(&cfg.pc, console.clone(), log.clone())?;
    watch(&pc, &tx);
    let initrd = cfg.initrd.as_ref().map(|(b, c)| (&b[..], c.as_str()));
    pc.boot(&cfg.kernel, &cfg.cmdline, initrd)?;
    let input = input.cloned().unwrap_or_default();
    SerialInput::attach(&mut lock(&input.0), pc.bus().clone());
    let mut state = RunState {
        cfg,
        pc,
        console,
        log,
        tx,
        input,
        migrations: Vec::new(),
        failures: Vec::new(),
        continuous: false,
    };
    let end = state.main_loop(&rx, on_migration);
    let RunState {
        pc,
        migrations,
        failures,
        ..
    } = state;
    let end = end?;
    pc.shutdown()?;
    Ok(RunReport {
        end,
        migrations,
        failures,
    })
}

struct RunState<'a> {
    cfg: &'a RunConfig,
    pc: Pc,
    console: Console,
    log: Log,
    tx: Sender<Ev>,
    input: SerialInput,
    migrations: Vec<MigrationRecord>,
    failures: Vec<String>,
    /// The guest is between `Begin continuous migration` and its end.
    continuous: bool,
}

impl RunState<'_> {
    fn may_migrate(&self) -> bool {
        self.cfg.migrate != MigrateMode::Off
            && self
                .cfg
                .max_migrations
                .is_none_or(|n| (self.migrations.len() as u64) < u64::from(n))
    }

    fn key(&self) {
        self.pc.serial_input(b"\n");
    }

    fn migrate(
        &mut self,
        trigger: Trigger,
        on_migration: &mut dyn FnMut(&MigrationRecord),
    ) -> Result<(), VmError> {
        // Serial input waits until the guest runs on the new PC.
        let mut input = lock(&self.input.0);
        let migrated = migrate_to_new_pc(
            &self.pc,
            &self.cfg.send,
            &self.cfg.receive,
            self.console.clone(),
            self.log.clone(),
        );
        let (target, report) = match migrated {
            Ok(x) => x,
            Err(e) => {
                // The engine resumed the source (a source that failed itself is caught by the
                // main loop's check): the guest runs on here.
                let msg = format!(
                    "migration {} ({trigger:?}) failed; the guest runs on where it was: {e}",
                    self.migrations.len() + self.failures.len() + 1
                );
                (self.log)(&msg);
                self.failures.push(msg);
                return Ok(());
            }
        };
        watch(&target, &self.tx);
        SerialInput::attach(&mut input, target.bus().clone());
        drop(input);
        let old = std::mem::replace(&mut self.pc, target);
        old.shutdown()?;
        let rec = MigrationRecord::new(self.migrations.len() as u32 + 1, trigger, &report);
        on_migration(&rec);
        self.migrations.push(rec);
        Ok(())
    }

    fn main_loop(
        &mut self,
        rx: &Receiver<Ev>,
        on_migration: &mut dyn FnMut(&MigrationRecord),
    ) -> Result<RunEnd, VmError> {
        let start = Instant::now();
        let deadline = self.cfg.timeout.map(|t| start + t);
        let mut next_timer = match self.cfg.migrate {
            MigrateMode::Every(p) => Some(start + p),
            _ => None,
        };
        let mut warned_limit = false;
        let on_request = self.cfg.migrate == MigrateMode::OnRequest;
        loop {
            self.pc.check()?;
            let now = Instant::now();
            if let Some(d) = deadline {
                if now >= d {
                    return Ok(RunEnd::Timeout(d - start));
                }
            }
            if let Some(t) = next_timer {
                if now >= t {
                    if self.may_migrate() {
                        self.migrate(Trigger::Timer, on_migration)?;
                    }
                    if let MigrateMode::Every(p) = self.cfg.migrate {
                        next_timer = Some(Instant::now() + p);
                    }
                    continue;
                }
            }
            let ev = if self.continuous
                && on_request
                && self.failures.is_empty()
                && self.may_migrate()
            {
                match rx.try_recv() {
                    Ok(ev) => Some(ev),
                    Err(_) => {
                        self.migrate(Trigger::Continuous, on_migration)?;
                        continue;
                    }
                }
            } else {
                let mut wait = Duration::from_millis(100);
                for t in [deadline, next_timer].into_iter().flatten() {
                    wait = wait.min(t.saturating_duration_since(now));
                }
                match rx.recv_timeout(wait) {
                    Ok(ev) => Some(ev),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => {
                        return Err(err("the PC's event channel closed"))
                    }
                }
            };
            let Some(ev) = ev else { continue };
            match ev {
                Ev::Exit(e) => return Ok(RunEnd::Exit(e)),
                Ev::Request => {
                    if on_request && self.may_migrate() {
                        self.migrate(Trigger::Request, on_migration)?;
                    } else if on_request && !warned_limit {
                        warned_limit = true;
                        (self.log)(
                            "the guest asked for a migration beyond --migrations; going on without",
                        );
                    }
                    self.key();
                }
                Ev::Skip => self.key(),
                Ev::BeginContinuous => {
                    self.key();
                    self.continuous = true;
                }
                Ev::EndContinuous => {
                    // Printed twice (once "(quiet)"); answered once.
                    if std::mem::take(&mut self.continuous) {
                        self.key();
                    }
                }
            }
        }
    }
}
