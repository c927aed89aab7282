//! The sending engine: pre-copy from a [`MigrationSource`] over one or more connections (any
//! [`Transport`]: TCP, Unix sockets).
//!
//! ```text
//! setup      connect N; header + Hello on each; start tracking; first harvest
//! bulk       round 0: every page, zero pages as ZeroPages markers, the rest as Pages runs
//! rounds     harvest (tracker ∪ VMM bitmap) → estimate → switch over, stop, or send the round
//! switchover pause; vCPU states; device sections; final harvest; final round; then
//!            strict:     MemHash per slot (digested beside the final round); Done; wait Ack
//!            background: Resume; wait Resumed; digest; MemHash per slot; Done; wait Ack
//!            off:        Resume; wait Resumed; Done; wait Ack
//! ```
//!
//! **Setup probe.** Before the bulk pass the engine pauses the guest once, saves every state,
//! and resumes it, timing each step: the expected downtime is then the last harvest's time
//! plus the dirty bytes at the last round's bandwidth plus these measured costs (and, in
//! strict mode, the part of the digest the final round does not hide), so the limit holds.
//!
//! The frames themselves are drawn in the [protocol](crate::protocol) docs.
//!
//! **Threads.** The calling thread is the control thread: it harvests, decides, clears chunks
//! and cuts the dirty set into *spans* (a run of bitmap words of one region, up to
//! `job_bytes` of dirty pages). One sender thread per connection copies the span's pages from
//! guest memory into its own bounded buffer and writes the frames, pipelined, with no
//! acknowledgement per chunk. Spans go to whichever connection has room in its short queue, so
//! every connection carries every round, the final one too. One more thread reads the
//! destination's replies on connection 0.
//!
//! **Rounds are fenced.** Every connection ends every round with a `RoundEnd` frame, and the
//! receiver applies no frame of round `r + 1` on any connection before all connections have
//! delivered round `r`. So a page sent in two rounds on two connections always lands in
//! round order.
//!
//! **Chunked re-arming.** With manual protect, the control thread calls
//! [`DirtyTracker::clear`] for a chunk (default 1 GiB) just before it hands out the first span
//! of that chunk, with the chunk's harvested bits only; every page whose bit it clears is
//! copied afterwards. A write that races the copy is logged again and sent in a later round.
//!
//! **Failure.** Whatever fails before the destination's `Ack`, the source guest is un-throttled
//! and resumed, tracking is stopped, and the first real cause is returned (a remote error
//! message before the broken pipe it caused). Local failures are announced to the destination
//! with an `Error` (or `Cancel`) frame on every connection.

use std::collections::HashSet;
use std::io::{self, BufWriter, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dirtylog::bitmap::runs;
use dirtylog::{DirtyBitmap, DirtyTracker};
use serde::Serialize;

use crate::compress::{Compression, Compressor};
use crate::convergence::TimeoutPolicy;
use crate::convergence::{
    self, AutoConverge, BlackoutCosts, Decision, Limits, SwitchoverReason, Throttle,
};
use crate::device::{DeviceSection, DeviceState};
use crate::digest::{self, Verify};
use crate::error::{code, MigrateError};
use crate::guestmem;
use crate::memory::{MigrationMemory, RegionMemory};
use crate::stats::{
    CompressionStats, DowntimeBreakdown, MigrationStats, RoundReport, RoundStats, SendReport,
};
use crate::transport::{self, Address, Killer, RateLimiter, Transport};
use crate::vcpu::{is_unsupported, Vcpus};
use crate::vm::MigrationSource;
use crate::wire::{
    self, Decoder, Encoder, Message, PageRange, Region, StreamHeader, MAX_CONNECTIONS,
    MAX_DEVICE_SECTIONS, MAX_PAGES_BYTES, VERIFY_BACKGROUND, VERIFY_NONE, VERIFY_STRICT,
};

/// Most bytes of send buffers over all connections together.
const SEND_BUFFER_BUDGET: usize = 32 << 20;
/// Each connection's write buffer, which gathers small frames into one write; frames of at
/// least this many page bytes go to the socket on their own, and a running guest's pages in
/// them straight from guest memory.
const SOCKET_BUFFER_BYTES: usize = 64 << 10;
/// Bitmap words in one span: 4096 pages.
const SPAN_WORDS: usize = 64;
/// Spans queued per connection.
const QUEUE_DEPTH: usize = 2;
/// How long the destination gets to explain a failure before the connections are cut.
const GRACE: Duration = Duration::from_millis(500);
/// Most probes of the blackout's fixed costs before a limit they exceed is called unreachable.
const MAX_PROBES: u32 = 3;
/// Bytes of guest memory the setup probe digests, spread over all of it, to time the strict
/// mode's check ([`digest::digest_sample`]).
const PROBE_DIGEST_BYTES: usize = 32 << 20;
/// How often the progress callback runs at most.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

/// How to migrate. [`Default`] gives QEMU's and Cloud Hypervisor's defaults.
#[derive(Clone, Debug)]
pub struct SendConfig {
    /// Connections, `1..=`[`MAX_CONNECTIONS`]. Default 1 (QEMU's, without multifd); one per
    /// core is faster when the cores are there (`dirtylog migrate`'s default, at most 4).
    pub connections: usize,
    /// Switch over once the expected downtime is at most this. Default 300 ms.
    pub downtime_limit: Duration,
    /// Bytes per second over all connections; `None` for no limit. Default `None`.
    pub max_bandwidth: Option<u64>,
    /// Most pre-copy rounds after the bulk pass before the timeout policy applies. Default 30.
    pub max_rounds: u64,
    /// Most time before switchover, from the start; `None` for no limit. Default `None`.
    pub timeout: Option<Duration>,
    /// What to do at the round limit or the timeout. Default cancel.
    pub on_timeout: TimeoutPolicy,
    /// Throttle vCPUs when the dirty rate keeps exceeding the bandwidth's threshold; `None`
    /// to never throttle. Default `None`.
    pub auto_converge: Option<AutoConverge>,
    /// Bytes of guest memory re-armed by one [`DirtyTracker::clear`]; a power of two of at
    /// least 64 pages. Default 1 GiB (QEMU's `clear_bmap_shift` 18 with 4 KiB pages).
    pub clear_chunk_bytes: u64,
    /// Most page bytes in one `Pages` frame, and so the size of each connection's copy
    /// buffer; capped so that all connections' buffers stay within 32 MiB. Default 2 MiB.
    pub frame_bytes: usize,
    /// Most dirty bytes handed to a connection at once; smaller in small rounds so that every
    /// connection gets a share. Default 16 MiB.
    pub job_bytes: usize,
    /// Connecting timeout. Default 10 s.
    pub connect_timeout: Duration,
    /// Timeout of each blocking socket write or read. Default 30 s.
    pub io_timeout: Duration,
    /// How long to wait for each of the destination's replies (`Resumed`, `Ack`). Default
    /// 60 s.
    pub ack_timeout: Duration,
    /// When the destination's memory is checked against the source's. Default
    /// [`Verify::Background`].
    pub verify: Verify,
    /// Cap each vCPU's dirty rate at this many pages per second through
    /// [`Vcpus::set_dirty_limit`] for the migration (QEMU's dirty-limit); `None` for no cap.
    /// Default `None`.
    pub dirty_limit: Option<u64>,
    /// Once the expected downtime fits the limit, keep sending rounds while each one at least
    /// halves the dirty set (within `max_rounds` and `timeout`), and switch over when it stops
    /// shrinking: the downtime is then what the guest's working set forces, not whatever the
    /// limit allows. `false` switches over at the first estimate that fits (QEMU's way).
    /// Default `true`.
    pub settle: bool,
    /// Compress each run of pages before sending it (a `CompressedPages` frame), for links
    /// slower than the codec; a run that does not shrink (or that the codec fails on) goes
    /// as plain `Pages`. [`max_bandwidth`](Self::max_bandwidth) is charged the bytes actually
    /// sent. `None` to send pages as they are. Default `None`.
    pub compress: Option<Compression>,
}

impl Default for SendConfig {
    fn default() -> Self {
        SendConfig {
            connections: 1,
            downtime_limit: Duration::from_millis(300),
            max_bandwidth: None,
            max_rounds: 30,
            timeout: None,
            on_timeout: TimeoutPolicy::Cancel,
            auto_converge: None,
            clear_chunk_bytes: 1 << 30,
            frame_bytes: 2 << 20,
            job_bytes: 16 << 20,
            connect_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(30),
            ack_timeout: Duration::from_secs(60),
            verify: Verify::default(),
            dirty_limit: None,
            settle: true,
            compress: None,
        }
    }
}

impl SendConfig {
    fn check(&self, page_size: u64) -> Result<(), MigrateError> {
        let bad = |m: String| Err(MigrateError::Config(m));
        if !(1..=MAX_CONNECTIONS as usize).contains(&self.connections) {
            return bad(format!(
                "{} connections; use 1..={MAX_CONNECTIONS}",
                self.connections
            ));
        }
        let chunk_pages = self.clear_chunk_bytes / page_size.max(1);
        if !self.clear_chunk_bytes.is_power_of_two() || chunk_pages < 64 {
            return bad(format!(
                "clear chunk of {} bytes: it must be a power of two of at least 64 pages \
                 ({} bytes)",
                self.clear_chunk_bytes,
                64 * page_size
            ));
        }
        if self.frame_bytes == 0 || self.job_bytes == 0 {
            return bad("frame and job sizes must not be zero".into());
        }
        if self.dirty_limit == Some(0) {
            return bad("a dirty limit of 0 pages/s would stop the guest".into());
        }
        if self.max_bandwidth == Some(0) {
            return bad("a bandwidth limit of 0 bytes/s would never finish".into());
        }
        if let Some(c) = self.compress {
            if let Err(e) = c.check() {
                return bad(format!("compression {c}: {e}"));
            }
        }
        if let Some(a) = self.auto_converge {
            if a.initial == 0 || a.max == 0 || a.max > 99 || a.initial > a.max {
                return bad(format!(
                    "auto-converge throttle {}%..{}%: use 1..=99 with initial ≤ max",
                    a.initial, a.max
                ));
            }
        }
        Ok(())
    }
}

/// Where the migration is, for a progress display.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Connecting, sending the header, starting tracking.
    Setup,
    /// Sending all memory once (round 0).
    Bulk,
    /// Sending a round of dirty pages.
    Iterating,
    /// The guest is paused; sending the rest.
    Switchover,
    /// The guest runs at the destination; the source digests its paused memory for the
    /// destination's check ([`Verify::Background`]).
    Verifying,
    /// Everything is sent; waiting for the destination's acknowledgement.
    WaitingForAck,
    /// The destination runs the guest.
    Completed,
}

/// A snapshot for the progress callback.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Progress {
    /// The phase.
    pub phase: Phase,
    /// The round being sent.
    pub round: u64,
    /// Pages the round has to send.
    pub round_pages: u64,
    /// Pages of the round handed to the connections so far.
    pub round_done_pages: u64,
    /// Bytes sent so far in total.
    pub transferred: u64,
    /// The last expected downtime, in milliseconds.
    pub expected_downtime_ms: u64,
    /// The last measured dirty rate, pages per second.
    pub dirty_pages_rate: u64,
    /// The last measured bandwidth, Mbit/s.
    pub mbps: f64,
    /// vCPU throttle, percent.
    pub throttle: u8,
    /// Time since the start.
    pub elapsed_ms: u64,
}

/// Migrate `source` to the receiver listening at `to` (a [`SocketAddr`](std::net::SocketAddr)
/// or any [`Address`]: TCP or a Unix socket). See the [module docs](self).
///
/// On success the source guest stays paused: it now runs at the destination, and the caller
/// should tear it down. On failure it runs again (see [`MigrateError`]).
pub fn send<S: MigrationSource>(
    source: &S,
    to: impl Into<Address>,
    config: &SendConfig,
    progress: &mut dyn FnMut(&Progress),
) -> Result<SendReport, MigrateError> {
    config.check(u64::from(source.memory().page_size()))?;
    let streams = transport::connect(
        &to.into(),
        config.connections,
        config.connect_timeout,
        config.io_timeout,
    )?;
    send_on(source, streams, config, progress)
}

/// [`send`] over connections the caller opened, of any [`Transport`] (all to the same
/// receiver; their number overrides `config.connections`). The caller sets their timeouts;
/// `config.io_timeout` still bounds how long the engine waits without progress.
pub fn send_on<S: MigrationSource, T: Transport>(
    source: &S,
    streams: Vec<T>,
    config: &SendConfig,
    progress: &mut dyn FnMut(&Progress),
) -> Result<SendReport, MigrateError> {
    let config = SendConfig {
        connections: streams.len(),
        ..config.clone()
    };
    config.check(u64::from(source.memory().page_size()))?;
    let mut guard = SourceGuard {
        source,
        tracking: false,
        paused: false,
        throttled: false,
        dirty_limited: false,
        committed: false,
    };
    let result =
        Shared::new(source, &config).and_then(|shared| shared.run(streams, &mut guard, progress));
    match result {
        Ok(report) => {
            // The guest lives at the destination now; tracking it further is pointless, and a
            // failure to stop is not a failure of the migration.
            if guard.tracking {
                let _ = source.tracker().stop();
            }
            if guard.dirty_limited {
                let _ = source.vcpus().set_dirty_limit(None);
            }
            Ok(report)
        }
        Err(e) => Err(guard.recover(e)),
    }
}

/// Puts the source back as it was when the migration fails.
struct SourceGuard<'a, S: MigrationSource> {
    source: &'a S,
    tracking: bool,
    paused: bool,
    throttled: bool,
    dirty_limited: bool,
    /// The source has sent `Commit`: the destination may run the guest, so this side must
    /// not resume it unless the destination says it stopped.
    committed: bool,
}

impl<S: MigrationSource> SourceGuard<'_, S> {
    fn recover(&mut self, error: MigrateError) -> MigrateError {
        let mut error = error;
        // After `Commit`, only the destination's own word that it gave up (an `Error` frame,
        // which it sends with its guest stopped) lets this side run the guest again.
        let rolled_back = matches!(
            error,
            MigrateError::Remote {
                side: "destination",
                ..
            }
        );
        if self.committed && !rolled_back {
            if self.tracking {
                let _ = self.source.tracker().stop();
            }
            return MigrateError::OutcomeUnknown(Box::new(error));
        }
        if self.throttled {
            if let Err(e) = self.source.vcpus().throttle(0) {
                error = MigrateError::ResumeFailed {
                    error: Box::new(error),
                    resume: e,
                };
            }
        }
        if self.dirty_limited {
            if let Err(e) = self.source.vcpus().set_dirty_limit(None) {
                error = MigrateError::ResumeFailed {
                    error: Box::new(error),
                    resume: e,
                };
            }
        }
        if self.paused {
            if let Err(e) = self.source.vcpus().resume() {
                error = MigrateError::ResumeFailed {
                    error: Box::new(error),
                    resume: e,
                };
            }
        }
        if self.tracking {
            let _ = self.source.tracker().stop();
        }
        error
    }
}

/// A piece of work for a connection's thread.
enum Job {
    /// Send the dirty pages of a span.
    Span(Box<Span>),
    /// End the round on this connection.
    RoundEnd { round: u64, dirty_pages: u64 },
    /// On connection 0, the switchover frames up to `Prepare` (the connection stays open);
    /// on the others, `Done`.
    Finish(Option<Arc<Control>>),
    /// Connection 0, after `Prepared`: `Commit`.
    Commit,
    /// Connection 0, after `Resumed`: the digests (background), then `Done`.
    Verify(Vec<(u32, u64)>),
    /// Tell the destination why we give up, and stop.
    Abort { cancel: bool, message: Arc<str> },
}

/// The switchover frames of connection 0: the states, (strict) the digests, `Prepare`.
struct Control {
    vcpus: Vec<Vec<u8>>,
    devices: Vec<DeviceSection>,
    hashes: Vec<(u32, u64)>,
    verify: u32,
}

/// Dirty pages of a run of bitmap words of one region.
struct Span {
    region: usize,
    first_word: usize,
    /// A span of the final round: the guest is paused until every connection thread has
    /// ended (the engine's thread scope), so its pages are sent from guest memory as it is.
    frozen: bool,
    nwords: usize,
    /// Pages in the span.
    count: u64,
    words: [u64; SPAN_WORDS],
}

/// What the threads tell the control thread.
enum Event {
    RoundDone,
    /// Connection 0 has sent `Resume`.
    Switched,
    Finished,
    Failed(MigrateError),
    /// A reply from the destination, or the end of its replies.
    Reply(Reply),
}

enum Reply {
    Prepared,
    Resumed,
    Ack(u32),
    Error(u32, String),
    Cancel,
    Closed,
    Broken(MigrateError),
}

/// The destination's replies so far, with when they came.
#[derive(Default)]
struct Replies {
    prepared: Option<Instant>,
    resumed: Option<Instant>,
    acked: Option<Instant>,
}

impl Replies {
    /// Keep `Prepared`, `Resumed` and `Ack 0`, in that order; any other reply is the
    /// destination giving up (after `Commit`: with its guest stopped).
    fn take(&mut self, reply: Reply) -> Result<(), MigrateError> {
        match reply {
            Reply::Prepared if self.prepared.is_none() => self.prepared = Some(Instant::now()),
            Reply::Resumed if self.prepared.is_some() && self.resumed.is_none() => {
                self.resumed = Some(Instant::now())
            }
            Reply::Ack(0) => self.acked = Some(Instant::now()),
            other => return Err(reply_error(other)),
        }
        Ok(())
    }
}

/// Totals the connection threads add to.
#[derive(Default)]
struct Counters {
    bytes: AtomicU64,
    normal: AtomicU64,
    zero: AtomicU64,
    /// [`SendConfig::compress`]: pages sent compressed, their compressed bytes, and pages
    /// sent plain because they did not shrink.
    compressed_pages: AtomicU64,
    compressed_bytes: AtomicU64,
    incompressible_pages: AtomicU64,
    /// Nanoseconds the connection threads spent finding zero pages (a scan, no bytes sent),
    /// so that the estimate's page rate is the rate of pages with contents.
    zero_scan_ns: AtomicU64,
}

impl Counters {
    /// The compression totals for the report.
    fn compression(&self, codec: Option<Compression>, page_size: u64) -> CompressionStats {
        let pages = self.compressed_pages.load(Ordering::Relaxed);
        let compressed_size = self.compressed_bytes.load(Ordering::Relaxed);
        CompressionStats {
            codec,
            pages,
            incompressible_pages: self.incompressible_pages.load(Ordering::Relaxed),
            compressed_size,
            compression_rate: if compressed_size == 0 {
                0.0
            } else {
                (pages * page_size) as f64 / compressed_size as f64
            },
        }
    }

    fn snapshot(&self) -> (u64, u64, u64) {
        (
            self.bytes.load(Ordering::Relaxed),
            self.normal.load(Ordering::Relaxed),
            self.zero.load(Ordering::Relaxed),
        )
    }
}

/// What the control thread and the connection threads share, fixed for the migration.
struct Shared<'a, S: MigrationSource> {
    source: &'a S,
    config: &'a SendConfig,
    header: StreamHeader,
    mems: Vec<RegionMemory>,
    /// The VMM's own-write bitmap of each region, if it keeps one (checked: one bit per page).
    vmm: Vec<Option<&'a DirtyBitmap>>,
    /// Per region: are pages the process never populated zeros the bulk pass may skip?
    unpopulated_zero: Vec<bool>,
    page_size: u64,
    frame_pages: usize,
    chunk_words: usize,
    total_pages: u64,
    counters: Counters,
    limiter: RateLimiter,
    killer: Killer,
    start: Instant,
}

/// The control thread's state.
struct Engine<'s, 'a, S: MigrationSource> {
    sh: &'s Shared<'a, S>,
    /// The merged dirty set, one bitmap per region: the only per-page state of the engine.
    dirty: Vec<Vec<u64>>,
    rounds: Vec<RoundReport>,
    stats: MigrationStats,
    throttle: Option<Throttle>,
    throttle_unsupported: bool,
    dirty_limit_unsupported: bool,
    last_mbps: f64,
    last_progress: Instant,
}

impl<'a, S: MigrationSource> Shared<'a, S> {
    fn new(source: &'a S, config: &'a SendConfig) -> Result<Self, MigrateError> {
        let start = Instant::now();
        let memory = source.memory();
        let regions = memory.regions();
        let vcpus = source.vcpus().vcpu_count();
        let header =
            StreamHeader::new(memory.page_size(), vcpus, regions.clone()).map_err(|e| {
                MigrateError::Config(format!("the VM's memory layout cannot be migrated: {e}"))
            })?;
        let page_size = u64::from(header.page_size());
        let mut mems = Vec::with_capacity(regions.len());
        let mut vmm = Vec::with_capacity(regions.len());
        for (i, r) in regions.iter().enumerate() {
            let mem = memory.region_memory(i).ok_or_else(|| {
                MigrateError::Config(format!("slot {}: the VM has no memory for it", r.slot))
            })?;
            check_region_memory(mem, r, "the VM")?;
            mems.push(mem);
            let bits = memory.vmm_bitmap(i);
            if let Some(b) = bits.filter(|b| b.npages() != r.size / page_size) {
                return Err(MigrateError::Config(format!(
                    "slot {}: the VMM bitmap has {} pages, the region {} of {page_size} bytes \
                     (a bitmap with another page size?)",
                    r.slot,
                    b.npages(),
                    r.size / page_size
                )));
            }
            vmm.push(bits);
        }
        let unpopulated_zero = (0..regions.len())
            .map(|i| memory.unpopulated_is_zero(i))
            .collect();
        let per_conn = (SEND_BUFFER_BUDGET / config.connections)
            .min(config.frame_bytes)
            .min(MAX_PAGES_BYTES);
        Ok(Shared {
            source,
            config,
            total_pages: regions.iter().map(|r| r.size / page_size).sum(),
            header,
            mems,
            vmm,
            unpopulated_zero,
            page_size,
            frame_pages: (per_conn / page_size as usize).max(1),
            chunk_words: (config.clear_chunk_bytes / page_size / 64) as usize,
            counters: Counters::default(),
            limiter: RateLimiter::new(config.max_bandwidth),
            killer: Killer::default(),
            start,
        })
    }

    /// Set `out` to the pages of words `first_word..first_word + out.len()` of `region` that
    /// may hold data: those the process has populated where the memory says unpopulated pages
    /// are zeros, every page otherwise (or if the page tables cannot be read).
    fn populated(&self, region: usize, first_word: usize, out: &mut [u64]) {
        if !self.unpopulated_zero[region] {
            out.fill(!0);
            return;
        }
        let mem = self.mems[region];
        let npages = mem.len() as u64 / self.page_size;
        let first = first_word as u64 * 64;
        let count = (out.len() as u64 * 64).min(npages.saturating_sub(first));
        let addr = mem.as_ptr() as u64 + first * self.page_size;
        out.fill(0);
        if dirtylog_host::populated_pages(addr, count * self.page_size, self.page_size, out)
            .is_err()
        {
            out.fill(!0);
        }
    }

    fn run<T: Transport>(
        &self,
        streams: Vec<T>,
        guard: &mut SourceGuard<'_, S>,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<SendReport, MigrateError> {
        let mut engine = Engine {
            sh: self,
            dirty: self
                .header
                .regions()
                .iter()
                .map(|r| vec![0u64; (r.size / self.page_size).div_ceil(64) as usize])
                .collect(),
            rounds: Vec::new(),
            stats: MigrationStats::default(),
            throttle: self.config.auto_converge.map(Throttle::new),
            throttle_unsupported: false,
            dirty_limit_unsupported: false,
            last_mbps: 0.0,
            last_progress: self.start,
        };
        engine.report(progress, Phase::Setup, 0, 0, 0, true);
        let session = transport::session_id();
        let n = streams.len();
        // Preamble, header and Hello on every connection before any thread starts: the
        // receiver learns the layout and the connection count from connection 0.
        let mut encoders = Vec::with_capacity(n);
        for (i, stream) in streams.iter().enumerate() {
            let setup = |e| MigrateError::Connect {
                what: format!("setting up connection {i}"),
                source: e,
            };
            self.killer.add(stream).map_err(setup)?;
            let writer = BufWriter::with_capacity(
                SOCKET_BUFFER_BYTES,
                Transport::try_clone(stream).map_err(setup)?,
            );
            let mut enc =
                Encoder::new(writer, self.header.clone()).map_err(MigrateError::wire(i))?;
            enc.send(Message::Hello {
                connection: i as u32,
                connections: n as u32,
                session,
            })
            .map_err(MigrateError::wire(i))?;
            // A verified migration's pages go without a CRC of their own: the destination
            // checks each by the hash it records anyway (wire::FLAG_HASH_CHECKED).
            enc.set_hash_checked_pages(self.config.verify != Verify::Off);
            // Out now, not when the buffer first fills: the receiver reads every connection's
            // Hello before it reads any page, and a connection given only zero-page markers
            // would otherwise hold its Hello back while connection 0 waits for it.
            enc.flush().map_err(MigrateError::wire(i))?;
            encoders.push(enc);
        }
        let back = Transport::try_clone(&streams[0]).map_err(|e| MigrateError::Connect {
            what: "setting up the reply channel".into(),
            source: e,
        })?;
        drop(streams);

        let (event_tx, events) = mpsc::channel();
        std::thread::scope(|scope| {
            let this = self;
            let mut queues = Vec::with_capacity(n);
            for (conn, enc) in encoders.into_iter().enumerate() {
                let (tx, rx) = mpsc::sync_channel(QUEUE_DEPTH);
                queues.push(tx);
                let event_tx = event_tx.clone();
                scope.spawn(move || this.connection(conn, enc, rx, event_tx));
            }
            {
                let event_tx = event_tx.clone();
                let header = self.header.clone();
                let killer = &self.killer;
                scope.spawn(move || read_replies(back, header, event_tx, killer));
            }
            drop(event_tx);
            let mut control = Conns {
                queues,
                events,
                next: 0,
                abort_sent: false,
            };
            let result = engine.precopy(&mut control, guard, progress);
            let result = match result {
                Ok(report) => Ok(report),
                Err(e) => Err(engine.abort(&mut control, e)),
            };
            // Every thread ends: the queues close, and the reply reader sees the sockets shut.
            drop(control.queues);
            self.killer.kill();
            result
        })
    }
}

impl<S: MigrationSource> Shared<'_, S> {
    /// The body of connection `conn`'s thread.
    fn connection<T: Transport>(
        &self,
        conn: usize,
        enc: Encoder<BufWriter<T>>,
        jobs: Receiver<Job>,
        events: Sender<Event>,
    ) {
        let mut worker = Worker {
            sender: self,
            conn,
            enc,
            buf: Vec::new(),
            position: 0,
            compressor: None,
        };
        worker.position = worker.enc.position();
        worker.account();
        for job in jobs {
            let event = match worker.run(job) {
                Ok(Some(event)) => event,
                Ok(None) => continue,
                Err(e) => Event::Failed(e),
            };
            let stop = matches!(event, Event::Failed(_) | Event::Finished);
            if events.send(event).is_err() || stop {
                return;
            }
        }
    }
}

impl<S: MigrationSource> Engine<'_, '_, S> {
    /// Pre-copy and switchover, on the control thread.
    fn precopy(
        &mut self,
        ctl: &mut Conns,
        guard: &mut SourceGuard<'_, S>,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<SendReport, MigrateError> {
        let source = self.sh.source;
        let config = self.sh.config;
        source
            .tracker()
            .start()
            .map_err(MigrateError::vm("start tracking"))?;
        guard.tracking = true;
        if let Some(limit) = config.dirty_limit {
            match source.vcpus().set_dirty_limit(Some(limit)) {
                Ok(()) => guard.dirty_limited = true,
                // The VM cannot limit vCPUs one by one: go on without.
                Err(e) if is_unsupported(&e) => self.dirty_limit_unsupported = true,
                Err(e) => return Err(MigrateError::vm("set the dirty limit")(e)),
            }
        }
        let (mut harvest_time, _) = self.harvest()?;
        let mut last_harvest = Instant::now();
        self.stats.setup_time = ms(self.sh.start.elapsed());

        // Round 0: all memory. Each round harvests the next one's dirty set while its last
        // pages are still on their way.
        let (mut bandwidth, mut next) =
            self.send_round(ctl, 0, Phase::Bulk, harvest_time, 0, 0, progress)?;
        // After the bulk pass, with memory as the switchover will find it (pages the bulk
        // pass skipped unpopulated are still unmapped; the digest reads them all the same).
        let mut costs = self.probe(guard)?;
        let mut probes = 1;
        let limits = Limits {
            downtime: config.downtime_limit,
            max_rounds: config.max_rounds,
            timeout: config.timeout,
            policy: config.on_timeout,
        };
        let total_bytes = self.sh.total_pages * self.sh.page_size;
        let digest_bytes = match config.verify {
            Verify::Strict => total_bytes,
            Verify::Background | Verify::Off => 0,
        };
        let mut round = 0;
        // Dirty pages found by the previous harvest (the bulk pass: all of them).
        let mut prev_pages = self.sh.total_pages;
        let (reason, expected_breakdown) = loop {
            // The harvest taken while the round's last pages went out misses what the guest
            // wrote until they had: top it up, or a round that ends long after its pages were
            // handed out looks converged and the final round carries the difference (a
            // 20 ms limit met with 267 ms in tests/compose.rs, once the bulk pass skipped the
            // memory never touched). Cheap: the bits harvested early are already taken.
            let (t, pages) = self.harvest()?;
            let t = next.take().map_or(t, |early| early.max(t));
            let at = Instant::now();
            harvest_time = t;
            let rate = convergence::dirty_rate(pages, at - last_harvest);
            last_harvest = at;
            let expected_breakdown = convergence::expected_breakdown(
                &costs,
                harvest_time,
                pages * self.sh.page_size,
                bandwidth,
                digest_bytes,
            );
            let expected = Duration::from_micros(expected_breakdown.total());
            self.stats.dirty_pages_rate = rate;
            self.stats.expected_downtime = ms(expected);
            self.stats.remaining = pages * self.sh.page_size;
            // What the blackout costs with nothing left to send: if that alone exceeds the
            // limit, more rounds cannot meet it. A probe taken in a burst of load on the host
            // overstates it, so the verdict waits for up to three probes (their fastest).
            let mut floor =
                convergence::expected_breakdown(&costs, harvest_time, 0, bandwidth, digest_bytes);
            while Duration::from_micros(floor.total()) > limits.downtime && probes < MAX_PROBES {
                costs = costs.fastest(&self.probe(guard)?);
                probes += 1;
                floor = convergence::expected_breakdown(
                    &costs,
                    harvest_time,
                    0,
                    bandwidth,
                    digest_bytes,
                );
            }
            if Duration::from_micros(floor.total()) > limits.downtime {
                match config.on_timeout {
                    TimeoutPolicy::Cancel => {
                        return Err(self.not_converged(
                            round,
                            "the pause, state save, resume and strict verification measured \
                             alone exceed the limit: raise it, or verify in the background",
                        ))
                    }
                    // Rounds help while they shrink the final one; with nothing dirty, go.
                    TimeoutPolicy::Switchover if pages == 0 => {
                        break (SwitchoverReason::LimitUnreachable, expected_breakdown)
                    }
                    TimeoutPolicy::Switchover => {}
                }
            }
            let shrinking = pages > 0 && pages.saturating_mul(2) <= prev_pages;
            prev_pages = pages;
            let settling = match limits.decide(expected, round, self.sh.start.elapsed()) {
                Decision::Switchover(SwitchoverReason::Converged)
                    if config.settle
                        && shrinking
                        && round < config.max_rounds
                        && config.timeout.is_none_or(|t| self.sh.start.elapsed() < t) =>
                {
                    true
                }
                Decision::Switchover(reason) => break (reason, expected_breakdown),
                Decision::Cancel(why) => {
                    return Err(self.not_converged(round, why));
                }
                Decision::Continue => false,
            };
            // The dirty rate already fits: no throttling while the rounds settle.
            if let Some(throttle) = self.throttle.as_mut().filter(|_| !settling) {
                let dirty_bytes = rate as f64 * self.sh.page_size as f64;
                if let Some(percent) = throttle.observe(dirty_bytes, bandwidth) {
                    match source.vcpus().throttle(percent) {
                        Ok(()) => guard.throttled = true,
                        // The VM cannot throttle: go on without auto-converge.
                        Err(e) if is_unsupported(&e) => {
                            self.throttle = None;
                            self.throttle_unsupported = true;
                        }
                        Err(e) => return Err(MigrateError::vm("throttle")(e)),
                    }
                }
            }
            round += 1;
            (bandwidth, next) = self.send_round(
                ctl,
                round,
                Phase::Iterating,
                harvest_time,
                pages,
                rate,
                progress,
            )?;
        };

        // Switchover: pause, save the states, send the last dirty pages.
        let pause_start = Instant::now();
        source.vcpus().pause().map_err(MigrateError::vm("pause"))?;
        guard.paused = true;
        let paused_at = Instant::now();
        let vcpus = source
            .vcpus()
            .save_state()
            .map_err(MigrateError::vm("save vCPU state"))?;
        if vcpus.len() != self.sh.header.vcpu_count() as usize {
            return Err(MigrateError::Config(format!(
                "the VM saved {} vCPU states for {} vCPUs",
                vcpus.len(),
                self.sh.header.vcpu_count()
            )));
        }
        let devices = save_devices(source.devices())?;
        let device_count = devices.len();
        let saved_at = Instant::now();
        let (harvest_time, pages) = self.harvest()?;
        self.stats.remaining = pages * self.sh.page_size;
        round += 1;
        let mems = self.sh.mems.clone();
        let regions = self.sh.header.regions().to_vec();
        let page = self.sh.page_size as usize;
        let digest = move || {
            let t = Instant::now();
            (hash_regions(&regions, &mems, page), t.elapsed())
        };
        let phases = std::thread::scope(|scope| -> Result<_, MigrateError> {
            // Strict: digest the paused memory while the final round goes out. Otherwise the
            // blackout does not wait for it, nor share the CPUs with it.
            let hasher = (config.verify == Verify::Strict).then(|| scope.spawn(digest.clone()));
            self.send_round(
                ctl,
                round,
                Phase::Switchover,
                harvest_time,
                pages,
                self.stats.dirty_pages_rate,
                progress,
            )?;
            let final_at = Instant::now();
            let mut replies = Replies::default();
            // Strict: the digests go before Prepare, and the destination checks them before
            // it answers.
            let (hashes, verify) = match hasher {
                Some(hasher) => (join(hasher)?.0, VERIFY_STRICT),
                None if config.verify == Verify::Off => (Vec::new(), VERIFY_NONE),
                None => (Vec::new(), VERIFY_BACKGROUND),
            };
            // The blackout waits for the digest in strict mode only.
            let digested_at = if verify == VERIFY_STRICT {
                Instant::now()
            } else {
                final_at
            };
            let control = Control {
                vcpus,
                devices,
                hashes,
                verify,
            };
            ctl.finish(self.sh, control, &mut replies)?;
            ctl.wait_reply(self.sh, &mut replies, |r| r.prepared)?;
            // The point of no return: from here on this side never resumes the guest on its
            // own (SourceGuard::recover), so the destination may run it.
            guard.committed = true;
            ctl.commit(self.sh)?;
            let resumed_at = ctl.wait_reply(self.sh, &mut replies, |r| r.resumed)?;
            // The guest runs at the destination; ours stays paused until the check passes.
            self.report(progress, Phase::Verifying, round, 0, 0, true);
            let hashes = match config.verify {
                Verify::Background => digest().0,
                Verify::Strict | Verify::Off => Vec::new(),
            };
            ctl.verify(self.sh, hashes, &mut replies)?;
            let acked_at = ctl.wait_reply(self.sh, &mut replies, |r| r.acked)?;
            Ok((final_at, digested_at, resumed_at, acked_at))
        })?;
        let (final_at, digested_at, resumed_at, acked_at) = phases;
        let us = |d: Duration| d.as_micros().min(u128::from(u64::MAX)) as u64;
        let breakdown = DowntimeBreakdown {
            pause: us(paused_at - pause_start),
            state: us(saved_at - paused_at),
            final_round: us(final_at - saved_at),
            verify: us(digested_at - final_at),
            resume: us(resumed_at - digested_at),
        };
        self.stats.downtime = ms(resumed_at - pause_start);
        self.stats.total_time = ms(self.sh.start.elapsed());
        self.stats.remaining = 0;
        let (bytes, normal, zero) = self.sh.counters.snapshot();
        self.stats.transferred = bytes;
        self.stats.normal = normal;
        self.stats.duplicate = zero;
        let transfer_ms = self
            .stats
            .total_time
            .saturating_sub(self.stats.setup_time)
            .max(1);
        self.stats.mbps = bytes as f64 * 8.0 / (transfer_ms as f64 / 1000.0) / 1e6;
        self.report(progress, Phase::Completed, round, 0, 0, true);
        let limit = ms(config.downtime_limit);
        Ok(SendReport {
            stats: self.stats.clone(),
            switchover: reason,
            cpu_throttle_percentage: self.throttle.as_ref().map_or(0, Throttle::percent),
            throttle_unsupported: self.throttle_unsupported,
            dirty_limit_unsupported: self.dirty_limit_unsupported,
            dirty_limit: config.dirty_limit,
            devices: device_count,
            connections: ctl.queues.len(),
            page_size: self.sh.header.page_size(),
            total: total_bytes,
            rounds: std::mem::take(&mut self.rounds),
            downtime_breakdown: breakdown,
            expected_downtime_breakdown: expected_breakdown,
            downtime_limit: limit,
            downtime_limit_exceeded: self.stats.downtime > limit,
            verify: config.verify,
            verify_time: match config.verify {
                Verify::Background => ms(acked_at - resumed_at),
                Verify::Strict | Verify::Off => 0,
            },
            compression: self
                .sh
                .counters
                .compression(config.compress, self.sh.page_size),
        })
    }

    /// Measure what the blackout will cost besides the last pages, on this VM, now: pause,
    /// save every state, (strict: digest a sample of memory), resume. The guest stops for
    /// about as long as the switchover's fixed part; the states are discarded.
    fn probe(&mut self, guard: &mut SourceGuard<'_, S>) -> Result<BlackoutCosts, MigrateError> {
        let source = self.sh.source;
        let t0 = Instant::now();
        source
            .vcpus()
            .pause()
            .map_err(MigrateError::vm("pause (probe)"))?;
        guard.paused = true;
        let t1 = Instant::now();
        source
            .vcpus()
            .save_state()
            .map_err(MigrateError::vm("save vCPU state (probe)"))?;
        save_devices(source.devices())?;
        let t2 = Instant::now();
        let digest_rate = (self.sh.config.verify == Verify::Strict).then(|| {
            // SAFETY: the guest is paused: nobody writes its memory (the `MigrationSource`
            // memory contract) until the slices die with this closure; the connection
            // threads are idle.
            let regions: Vec<&[u8]> = self
                .sh
                .mems
                .iter()
                .map(|&m| unsafe { guestmem::frozen(m) })
                .collect();
            let sample =
                digest::digest_sample(&regions, self.sh.page_size as usize, PROBE_DIGEST_BYTES);
            let total: usize = regions.iter().map(|r| r.len()).sum();
            debug_assert!(sample.sampled <= total);
            if total == 0 {
                // No memory: nothing to digest.
                return f64::INFINITY;
            }
            // Memory that maps the zero page throughout samples nothing: its estimate is the
            // page-table walk alone.
            let estimate = sample.estimate.max(Duration::from_micros(1));
            convergence::bandwidth(total as u64, estimate)
        });
        let t3 = Instant::now();
        source
            .vcpus()
            .resume()
            .map_err(MigrateError::vm("resume (probe)"))?;
        guard.paused = false;
        Ok(BlackoutCosts {
            pause: t1 - t0,
            state: t2 - t1,
            resume: t3.elapsed(),
            digest_rate,
        })
    }

    fn not_converged(&self, round: u64, why: &'static str) -> MigrateError {
        MigrateError::NotConverged {
            rounds: round + 1,
            elapsed_ms: ms(self.sh.start.elapsed()),
            why,
            expected_downtime_ms: self.stats.expected_downtime,
            limit_ms: ms(self.sh.config.downtime_limit),
            dirty_rate: self.stats.dirty_pages_rate,
            mbps: self.last_mbps,
        }
    }

    /// Harvest every region: the tracker's bits, then the VMM's, ORed into the dirty set.
    /// Returns the time taken and the number of distinct dirty pages.
    fn harvest(&mut self) -> Result<(Duration, u64), MigrateError> {
        let t = Instant::now();
        let mut pages = 0;
        for (i, words) in self.dirty.iter_mut().enumerate() {
            self.sh
                .source
                .tracker()
                .harvest(i, words)
                .map_err(MigrateError::vm("harvest"))?;
            if let Some(vmm) = self.sh.vmm[i] {
                vmm.take_or_into(words);
            }
            // Bits past the region's end would name pages that do not exist.
            let npages = self.sh.header.regions()[i].size / self.sh.page_size;
            if let Some(last) = words.len().checked_sub(1) {
                words[last] &= word_mask(npages, last);
            }
            pages += words.iter().map(|w| u64::from(w.count_ones())).sum::<u64>();
        }
        self.stats.dirty_sync_count += 1;
        Ok((t.elapsed(), pages))
    }

    /// Send one round: every page in the bulk pass (round 0), the dirty set otherwise. Returns
    /// the round's bandwidth in bytes per second and, but for the final round, how long the
    /// next round's first harvest took: taken once every page of this round has been handed
    /// out, while the connections still send the last ones (its bits are in the dirty set).
    #[allow(clippy::too_many_arguments)]
    fn send_round(
        &mut self,
        ctl: &mut Conns,
        round: u64,
        phase: Phase,
        harvest_time: Duration,
        dirty_pages: u64,
        rate: u64,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<(f64, Option<Duration>), MigrateError> {
        let t = Instant::now();
        let bulk = round == 0;
        let is_final = phase == Phase::Switchover;
        let round_pages = if bulk {
            self.sh.total_pages
        } else {
            dirty_pages
        };
        let before = self.sh.counters.snapshot();
        let scan_before = self.sh.counters.zero_scan_ns.load(Ordering::Relaxed);
        let n = ctl.queues.len() as u64;
        // Small rounds are cut finer, at least 16 jobs per connection, so that every connection
        // carries a share and they finish together: a job goes to the next connection with
        // room, and a 64 MiB final round cut into 8 jobs left one connection up to 8 ms behind
        // the other in a ~25 ms blackout (32 jobs: 1.58 → 1.31 µs per page, BENCHMARKS.md).
        let job_pages = (self.sh.config.job_bytes as u64 / self.sh.page_size)
            .min(round_pages.div_ceil(n * 16))
            .clamp(1, SPAN_WORDS as u64 * 64);
        let cancel_at = match self.sh.config.on_timeout {
            TimeoutPolicy::Cancel => self.sh.config.timeout,
            TimeoutPolicy::Switchover => None,
        };
        let mut done_pages = 0;
        let mut unpopulated = 0;
        self.report(progress, phase, round, round_pages, 0, true);
        for region in 0..self.dirty.len() {
            let npages = self.sh.header.regions()[region].size / self.sh.page_size;
            let nwords = self.dirty[region].len();
            let mut span = Span::new(region, 0, is_final);
            let mut cleared_chunk = None;
            // Bulk pass: the pages of the current chunk that may hold data (all ones where
            // the memory cannot tell), read from the page tables after the chunk's clear.
            let mut populated = vec![!0u64; self.sh.chunk_words];
            let (mut w, mut taken) = (0, 0u64);
            while w < nwords {
                // The pages of word `w` still to send: all of them in the bulk pass, the dirty
                // ones otherwise, less those already put in a span.
                let wanted = if bulk {
                    word_mask(npages, w)
                } else {
                    self.dirty[region][w]
                } & !taken;
                // Re-arm the chunk before any of its pages is copied (or found unpopulated),
                // with the bits harvested for it (none in the final round: the guest is
                // paused, nothing can dirty the pages again).
                let chunk = w / self.sh.chunk_words;
                let c0 = chunk * self.sh.chunk_words;
                if wanted != 0 && cleared_chunk != Some(chunk) {
                    cleared_chunk = Some(chunk);
                    let c1 = (c0 + self.sh.chunk_words).min(nwords);
                    let chunk_bits = &self.dirty[region][c0..c1];
                    if !is_final && chunk_bits.iter().any(|&b| b != 0) {
                        self.sh
                            .source
                            .tracker()
                            .clear(region, c0 as u64 * 64, chunk_bits)
                            .map_err(MigrateError::vm("clear"))?;
                    }
                    if bulk {
                        // After the clear: a page populated later is dirtied after it, and
                        // goes in the next round.
                        self.sh.populated(region, c0, &mut populated[..c1 - c0]);
                    }
                }
                let pending = if bulk {
                    let p = wanted & populated[w - c0];
                    if taken == 0 {
                        unpopulated += u64::from((wanted & !p).count_ones());
                    }
                    p
                } else {
                    wanted
                };
                if pending == 0 {
                    // In the bulk pass the harvested bits served the chunk's clear only.
                    self.dirty[region][w] = 0;
                    (w, taken) = (w + 1, 0);
                    continue;
                }
                if span.count > 0 && w >= span.first_word + SPAN_WORDS {
                    let full = std::mem::replace(&mut span, Span::new(region, w, is_final));
                    done_pages += ctl.dispatch(self.sh, full)?;
                }
                if span.count == 0 {
                    span.first_word = w;
                }
                let room = job_pages - span.count;
                let bits = if u64::from(pending.count_ones()) > room {
                    lowest_bits(pending, room as u32)
                } else {
                    pending
                };
                span.add(w, bits);
                taken |= bits;
                if !bulk {
                    self.dirty[region][w] &= !bits;
                }
                if span.count >= job_pages {
                    let full = std::mem::replace(&mut span, Span::new(region, w, is_final));
                    done_pages += ctl.dispatch(self.sh, full)?;
                    if let Some(limit) = cancel_at {
                        if !is_final && self.sh.start.elapsed() >= limit {
                            return Err(self.not_converged(round, "timeout"));
                        }
                    }
                    self.report(progress, phase, round, round_pages, done_pages, false);
                }
            }
            if span.count > 0 {
                done_pages += ctl.dispatch(self.sh, span)?;
            }
        }
        for queue in &ctl.queues {
            let job = Job::RoundEnd {
                round,
                dirty_pages: round_pages,
            };
            if queue.send(job).is_err() {
                return Err(ctl.wait_failure(self.sh));
            }
        }
        // Every dirty bit has been taken (and its chunk re-armed): the dirty set is empty, and
        // the next harvest may fill it while the connections finish.
        let next = if is_final {
            None
        } else {
            Some(self.harvest()?.0)
        };
        ctl.wait_for(
            self.sh,
            ctl.queues.len(),
            |e| matches!(e, Event::RoundDone),
            None,
        )?;
        let send_time = t.elapsed();
        let (bytes, normal, zero) = self.sh.counters.snapshot();
        let round_bytes = bytes - before.0;
        let wire = convergence::bandwidth(round_bytes, send_time);
        let mbps = wire * 8.0 / 1e6;
        // What the estimate needs is how fast pages with contents go (a final round is
        // mostly those): their bytes over the round's time less its share of zero-page
        // scanning, which in a bulk pass of sparse memory is most of it. Compression shows in
        // this rate too. A round of zero pages only tells nothing new: the wire rate then.
        let scan = self.sh.counters.zero_scan_ns.load(Ordering::Relaxed) - scan_before;
        let scan = Duration::from_nanos(scan / n);
        let content_bytes = (normal - before.1) * self.sh.page_size;
        let bandwidth = if content_bytes > 0 {
            convergence::bandwidth(content_bytes, send_time.saturating_sub(scan))
        } else {
            wire
        };
        self.last_mbps = mbps;
        self.stats.mbps = mbps;
        self.stats.transferred = bytes;
        self.stats.normal = normal;
        self.stats.duplicate = zero;
        self.rounds.push(RoundReport {
            stats: RoundStats {
                round,
                dirty_pages: round_pages,
                sent_pages: normal - before.1,
                zero_pages: zero - before.2,
                unpopulated_pages: unpopulated,
                harvest_time_us: micros(harvest_time),
                send_time_us: micros(send_time),
                mbps,
            },
            transferred: round_bytes,
            dirty_pages_rate: rate,
            expected_downtime: if bulk {
                0
            } else {
                self.stats.expected_downtime
            },
            cpu_throttle_percentage: self.throttle.as_ref().map_or(0, Throttle::percent),
            dirty_limit_throttle_percentage: self.sh.source.vcpus().dirty_limit_throttle(),
            is_final,
        });
        self.report(progress, phase, round, round_pages, round_pages, true);
        Ok((bandwidth, next))
    }

    fn report(
        &mut self,
        progress: &mut dyn FnMut(&Progress),
        phase: Phase,
        round: u64,
        round_pages: u64,
        round_done_pages: u64,
        force: bool,
    ) {
        let now = Instant::now();
        if !force && now - self.last_progress < PROGRESS_EVERY {
            return;
        }
        self.last_progress = now;
        progress(&Progress {
            phase,
            round,
            round_pages,
            round_done_pages,
            transferred: self.sh.counters.bytes.load(Ordering::Relaxed),
            expected_downtime_ms: self.stats.expected_downtime,
            dirty_pages_rate: self.stats.dirty_pages_rate,
            mbps: self.last_mbps,
            throttle: self.throttle.as_ref().map_or(0, Throttle::percent),
            elapsed_ms: ms(self.sh.start.elapsed()),
        });
    }

    /// Stop everything after `error`, telling the destination when the cause is ours; return
    /// the most telling error.
    fn abort(&self, ctl: &mut Conns, error: MigrateError) -> MigrateError {
        let local = matches!(
            error,
            MigrateError::NotConverged { .. }
                | MigrateError::Vm { .. }
                | MigrateError::Config(_)
                | MigrateError::ResumeFailed { .. }
        );
        if local && !ctl.abort_sent {
            ctl.abort_sent = true;
            let cancel = matches!(error, MigrateError::NotConverged { .. });
            let message: Arc<str> = Arc::from(error.to_string());
            for queue in &ctl.queues {
                let _ = queue.send(Job::Abort {
                    cancel,
                    message: message.clone(),
                });
            }
            // Let the connection threads drain their queues and write the news.
            let deadline = Instant::now() + self.sh.config.io_timeout.min(Duration::from_secs(5));
            let mut finished = 0;
            while finished < ctl.queues.len() {
                match ctl
                    .events
                    .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                {
                    Ok(Event::Finished) | Ok(Event::Failed(_)) => finished += 1,
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            return error;
        }
        // A remote or transport failure: stop writing at once, then give the destination a
        // moment to say why, and prefer its word over our broken pipe.
        self.sh.killer.shutdown_writes();
        let mut best = error;
        let deadline = Instant::now() + GRACE;
        while let Ok(event) = ctl
            .events
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            let candidate = match event {
                Event::Reply(Reply::Closed) => break,
                Event::Reply(r) => reply_error(r),
                Event::Failed(e) => e,
                _ => continue,
            };
            if best.is_secondary() && !candidate.is_secondary() {
                best = candidate;
            }
        }
        best
    }
}

/// The control thread's side of the connection threads.
struct Conns {
    queues: Vec<SyncSender<Job>>,
    events: Receiver<Event>,
    next: usize,
    abort_sent: bool,
}

impl Conns {
    /// Hand a span to the first connection with room, starting after the last one used;
    /// block on that one if all are full. Returns the span's pages.
    fn dispatch<S: MigrationSource>(
        &mut self,
        sender: &Shared<'_, S>,
        span: Span,
    ) -> Result<u64, MigrateError> {
        let pages = span.count;
        self.check(sender)?;
        let n = self.queues.len();
        let mut job = Job::Span(Box::new(span));
        for k in 0..n {
            let i = (self.next + k) % n;
            match self.queues[i].try_send(job) {
                Ok(()) => {
                    self.next = i + 1;
                    return Ok(pages);
                }
                Err(TrySendError::Full(j)) => job = j,
                Err(TrySendError::Disconnected(_)) => return Err(self.wait_failure(sender)),
            }
        }
        let i = self.next % n;
        self.next = i + 1;
        match self.queues[i].send(job) {
            Ok(()) => Ok(pages),
            Err(_) => Err(self.wait_failure(sender)),
        }
    }

    /// Fail early if a thread has reported trouble.
    fn check<S: MigrationSource>(&mut self, _sender: &Shared<'_, S>) -> Result<(), MigrateError> {
        loop {
            match self.events.try_recv() {
                Ok(Event::Failed(e)) => return Err(e),
                Ok(Event::Reply(r)) => return Err(reply_error(r)),
                Ok(_) => {}
                Err(_) => return Ok(()),
            }
        }
    }

    /// Wait for `count` events matching `want`, failing on the first failure, or when no
    /// byte has gone out for twice the I/O timeout (every blocking write is bounded by it).
    /// With `replies`, the destination's `Resumed` and `Ack 0` may come first and are kept
    /// there; any other reply fails the wait.
    fn wait_for<S: MigrationSource>(
        &mut self,
        sender: &Shared<'_, S>,
        count: usize,
        want: impl Fn(&Event) -> bool,
        mut replies: Option<&mut Replies>,
    ) -> Result<(), MigrateError> {
        let mut seen = 0;
        let stall = sender.config.io_timeout * 2;
        let mut last_bytes = sender.counters.bytes.load(Ordering::Relaxed);
        let mut last_move = Instant::now();
        while seen < count {
            match self.events.recv_timeout(Duration::from_millis(100)) {
                Ok(Event::Failed(e)) => return Err(e),
                Ok(Event::Reply(r)) => match replies.as_deref_mut() {
                    Some(replies) => replies.take(r)?,
                    None => return Err(reply_error(r)),
                },
                Ok(e) if want(&e) => seen += 1,
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    let bytes = sender.counters.bytes.load(Ordering::Relaxed);
                    if bytes != last_bytes {
                        (last_bytes, last_move) = (bytes, Instant::now());
                    } else if last_move.elapsed() > stall {
                        return Err(MigrateError::Timeout(
                            stall,
                            "without progress while the connections finish sending",
                        ));
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(MigrateError::Config("every connection thread ended".into()))
                }
            }
        }
        Ok(())
    }

    /// Send the switchover frames (on connection 0) and `Done` (on the others), and wait until
    /// every connection has written them. Replies that arrive meanwhile are kept.
    fn finish<S: MigrationSource>(
        &mut self,
        sender: &Shared<'_, S>,
        control: Control,
        replies: &mut Replies,
    ) -> Result<(), MigrateError> {
        let control = Arc::new(control);
        for (conn, queue) in self.queues.iter().enumerate() {
            let job = Job::Finish((conn == 0).then(|| control.clone()));
            if queue.send(job).is_err() {
                return Err(self.wait_failure(sender));
            }
        }
        self.wait_for(
            sender,
            self.queues.len(),
            |e| matches!(e, Event::Finished | Event::Switched),
            Some(replies),
        )
    }

    /// After `Prepared`: send `Commit` on connection 0.
    fn commit<S: MigrationSource>(&mut self, sender: &Shared<'_, S>) -> Result<(), MigrateError> {
        if self.queues[0].send(Job::Commit).is_err() {
            return Err(self.wait_failure(sender));
        }
        Ok(())
    }

    /// After `Resumed`: send the digests (if any) and `Done` on connection 0.
    fn verify<S: MigrationSource>(
        &mut self,
        sender: &Shared<'_, S>,
        hashes: Vec<(u32, u64)>,
        replies: &mut Replies,
    ) -> Result<(), MigrateError> {
        if self.queues[0].send(Job::Verify(hashes)).is_err() {
            return Err(self.wait_failure(sender));
        }
        self.wait_for(sender, 1, |e| matches!(e, Event::Finished), Some(replies))
    }

    /// Wait, at most the acknowledgement timeout, until `pick` finds the reply it wants;
    /// return when it came. Any other reply than `Resumed` or `Ack 0` fails.
    fn wait_reply<S: MigrationSource>(
        &mut self,
        sender: &Shared<'_, S>,
        replies: &mut Replies,
        pick: impl Fn(&Replies) -> Option<Instant>,
    ) -> Result<Instant, MigrateError> {
        let timeout = sender.config.ack_timeout;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(at) = pick(replies) {
                return Ok(at);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(Event::Reply(reply)) => replies.take(reply)?,
                Ok(Event::Failed(e)) => return Err(e),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    return Err(MigrateError::Timeout(
                        timeout,
                        "waiting for the destination's reply",
                    ))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(reply_error(Reply::Closed));
                }
            }
        }
    }

    /// A queue was closed: its thread failed; find out why.
    fn wait_failure<S: MigrationSource>(&mut self, sender: &Shared<'_, S>) -> MigrateError {
        let deadline = Instant::now() + sender.config.io_timeout;
        loop {
            match self
                .events
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(Event::Failed(e)) => return e,
                Ok(Event::Reply(r)) => return reply_error(r),
                Ok(_) => {}
                Err(_) => {
                    return MigrateError::Config("a connection thread ended unexpectedly".into())
                }
            }
        }
    }
}

/// One connection's thread: frames pages, from guest memory or copied into its buffer first,
/// and writes them.
struct Worker<'s, 'a, S: MigrationSource, T: Transport> {
    sender: &'s Shared<'a, S>,
    conn: usize,
    enc: Encoder<BufWriter<T>>,
    buf: Vec<u8>,
    position: u64,
    /// [`SendConfig::compress`]'s state, made by the first span.
    compressor: Option<Compressor>,
}

impl<S: MigrationSource, T: Transport> Worker<'_, '_, S, T> {
    fn run(&mut self, job: Job) -> Result<Option<Event>, MigrateError> {
        let event = match job {
            Job::Span(span) => {
                self.span(&span)?;
                None
            }
            Job::RoundEnd { round, dirty_pages } => {
                self.send(Message::RoundEnd { round, dirty_pages })?;
                self.flush()?;
                Some(Event::RoundDone)
            }
            Job::Finish(control) => {
                if let Some(control) = control {
                    for (id, blob) in control.vcpus.iter().enumerate() {
                        self.send(Message::VcpuState {
                            vcpu_id: id as u32,
                            blob,
                        })?;
                    }
                    for d in &control.devices {
                        self.send(Message::Device {
                            name: d.name(),
                            version: d.version(),
                            bytes: d.bytes(),
                        })?;
                    }
                    for &(slot, hash) in &control.hashes {
                        self.send(Message::MemHash { slot, hash })?;
                    }
                    self.send(Message::Prepare {
                        verify: control.verify,
                    })?;
                    self.flush()?;
                    return Ok(Some(Event::Switched));
                }
                Some(self.done(&[])?)
            }
            Job::Commit => {
                self.send(Message::Commit)?;
                self.flush()?;
                None
            }
            Job::Verify(hashes) => Some(self.done(&hashes)?),
            Job::Abort { cancel, message } => {
                let msg = if cancel {
                    Message::Cancel
                } else {
                    Message::Error {
                        code: code::SOURCE_FAILED,
                        message: truncate(&message, wire::MAX_ERROR_MESSAGE),
                    }
                };
                // Best effort: the destination may be gone already.
                let _ = self.send(msg).and_then(|()| self.flush());
                Some(Event::Finished)
            }
        };
        Ok(event)
    }

    /// The digests, then `Done`: the end of this connection's stream.
    fn done(&mut self, hashes: &[(u32, u64)]) -> Result<Event, MigrateError> {
        for &(slot, hash) in hashes {
            self.send(Message::MemHash { slot, hash })?;
        }
        self.send(Message::Done)?;
        self.flush()?;
        Ok(Event::Finished)
    }

    fn send(&mut self, msg: Message<'_>) -> Result<(), MigrateError> {
        let r = self.enc.send(msg).map_err(MigrateError::wire(self.conn));
        self.account();
        r
    }

    fn flush(&mut self) -> Result<(), MigrateError> {
        self.enc.flush().map_err(MigrateError::wire(self.conn))
    }

    fn account(&mut self) {
        let pos = self.enc.position();
        self.sender
            .counters
            .bytes
            .fetch_add(pos - self.position, Ordering::Relaxed);
        self.position = pos;
    }

    /// Send the pages of `span`: zero runs as markers, the rest copied and framed as runs,
    /// compressed if [`SendConfig::compress`] asks and they shrink.
    fn span(&mut self, span: &Span) -> Result<(), MigrateError> {
        let s = self.sender;
        if let (None, Some(c)) = (&self.compressor, s.config.compress) {
            let compressor = Compressor::new(c)
                .map_err(|e| MigrateError::Config(format!("compression {c}: {e}")))?;
            self.compressor = Some(compressor);
        }
        let codec = s.config.compress.map(Compression::codec);
        let mem = s.mems[span.region];
        let slot = s.header.regions()[span.region].slot;
        let ps = s.page_size as usize;
        let cap = s.frame_pages;
        if self.buf.len() < cap * ps {
            self.buf = vec![0; cap * ps];
        }
        let base = span.first_word as u64 * 64;
        let range = |first_page, npages| PageRange {
            slot,
            first_page,
            npages,
        };
        let (mut normal, mut zero) = (0, 0);
        // Pages sent compressed, their compressed bytes, pages that did not shrink.
        let (mut packed_pages, mut packed_bytes, mut unpacked_pages) = (0, 0, 0);
        for (first, len) in runs(&span.words[..span.nwords]) {
            let (mut p, end) = (base + first, base + first + len);
            while p < end {
                let scan = Instant::now();
                let mut z = 0;
                while p + z < end && guestmem::is_zero(mem, ((p + z) as usize) * ps, ps) {
                    z += 1;
                }
                if z > 0 {
                    s.counters
                        .zero_scan_ns
                        .fetch_add(nanos(scan.elapsed()), Ordering::Relaxed);
                    self.send(Message::ZeroPages(range(p, z)))?;
                    zero += z;
                    p += z;
                    continue;
                }
                let mut n = 0usize;
                while p + (n as u64) < end && n < cap {
                    if n > 0 && guestmem::is_zero(mem, (p as usize + n) * ps, ps) {
                        break;
                    }
                    n += 1;
                }
                let (offset, len) = (p as usize * ps, n * ps);
                // A running guest's pages in a frame the socket takes whole, checked by their
                // hashes (no CRC to agree with), not compressed: straight from guest memory.
                let direct = !span.frozen
                    && codec.is_none()
                    && len >= SOCKET_BUFFER_BYTES
                    && self.enc.hash_checked_pages();
                let r = if direct {
                    s.limiter.acquire(len);
                    let buf = &mut self.buf;
                    self.enc
                        .send_pages_with(range(p, n as u64), |w, head, crc| {
                            write_live(w, head, mem, offset, len, crc, buf)
                        })
                } else {
                    if !span.frozen {
                        guestmem::copy_out(mem, offset, &mut self.buf[..len]);
                    }
                    let data = if span.frozen {
                        // SAFETY: a final-round span: the guest stays paused, and nobody
                        // writes its memory (the `MigrationSource` memory contract), until
                        // the engine's thread scope has joined this thread; the slice dies
                        // with this frame.
                        let bytes = unsafe { guestmem::frozen(mem) };
                        &bytes[offset..offset + len]
                    } else {
                        &self.buf[..len]
                    };
                    // A codec failure (it cannot fail on valid input but for memory) sends
                    // plain.
                    let packed = match (&mut self.compressor, codec) {
                        (Some(c), Some(codec)) => {
                            c.compress(data).ok().flatten().map(|b| (codec, b))
                        }
                        _ => None,
                    };
                    // Charged what goes on the wire, so that compression speeds up a slow link.
                    s.limiter
                        .acquire(packed.map_or(data.len(), |(_, bytes)| bytes.len()));
                    match packed {
                        Some((codec, bytes)) => {
                            packed_pages += n as u64;
                            packed_bytes += bytes.len() as u64;
                            self.enc.send_compressed(range(p, n as u64), codec, bytes)
                        }
                        None => {
                            if codec.is_some() {
                                unpacked_pages += n as u64;
                            }
                            self.enc.send(Message::Pages {
                                range: range(p, n as u64),
                                data,
                            })
                        }
                    }
                }
                .map_err(MigrateError::wire(self.conn));
                self.account();
                r?;
                normal += n as u64;
                p += n as u64;
            }
        }
        s.counters.normal.fetch_add(normal, Ordering::Relaxed);
        s.counters.zero.fetch_add(zero, Ordering::Relaxed);
        if codec.is_some() {
            let c = &s.counters;
            c.compressed_pages
                .fetch_add(packed_pages, Ordering::Relaxed);
            c.compressed_bytes
                .fetch_add(packed_bytes, Ordering::Relaxed);
            c.incompressible_pages
                .fetch_add(unpacked_pages, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// Write a frame's `head`, the `len` live guest bytes at `offset` of `mem`, and its `crc` to
/// `w`, after what `w` holds: from guest memory straight into the socket when the transport
/// has one ([`Transport::raw_fd`]), else copied through `buf` first.
fn write_live<T: Transport>(
    w: &mut BufWriter<T>,
    head: &[u8],
    mem: RegionMemory,
    offset: usize,
    len: usize,
    crc: &[u8],
    buf: &mut [u8],
) -> io::Result<()> {
    w.flush()?;
    match w.get_ref().raw_fd() {
        Some(fd) => guestmem::write_out(fd, head, mem, offset, len, crc),
        None => {
            let data = &mut buf[..len];
            guestmem::copy_out(mem, offset, data);
            w.write_all(head)?;
            w.write_all(data)?;
            w.write_all(crc)
        }
    }
}

impl Span {
    fn new(region: usize, first_word: usize, frozen: bool) -> Self {
        Span {
            region,
            first_word,
            frozen,
            nwords: 0,
            count: 0,
            words: [0; SPAN_WORDS],
        }
    }

    /// Add `bits` of word `w`, which lies within `SPAN_WORDS` of the first.
    fn add(&mut self, w: usize, bits: u64) {
        let i = w - self.first_word;
        self.words[i] |= bits;
        self.nwords = self.nwords.max(i + 1);
        self.count += u64::from(bits.count_ones());
    }
}

/// The replies thread: decode the destination's frames on connection 0 and pass them on.
fn read_replies<T: Transport>(
    stream: T,
    header: StreamHeader,
    events: Sender<Event>,
    killer: &Killer,
) {
    // Replies come at the end, after the last round: no read timeout while we send.
    let _ = stream.set_read_timeout(None);
    let mut decoder = Decoder::back_channel(std::io::BufReader::new(stream), header);
    let mut no_memory = ();
    let reply = loop {
        let reply = match decoder.next(&mut no_memory) {
            Ok(Some(Message::Prepared)) => Reply::Prepared,
            Ok(Some(Message::Resumed { .. })) => Reply::Resumed,
            Ok(Some(Message::Ack { code })) => Reply::Ack(code),
            Ok(Some(Message::Error { code, message })) => Reply::Error(code, message.into()),
            Ok(Some(Message::Cancel)) => Reply::Cancel,
            Ok(Some(other)) => Reply::Broken(MigrateError::protocol(
                0,
                format!("the destination replied with {other:?}"),
            )),
            Ok(None) => Reply::Closed,
            Err(e) => Reply::Broken(MigrateError::wire(0)(e)),
        };
        match reply {
            // Steps of the switchover; the acknowledgement (or an error) ends the replies.
            Reply::Prepared | Reply::Resumed => {
                if events.send(Event::Reply(reply)).is_err() {
                    return;
                }
            }
            other => break other,
        }
    };
    let failed = !matches!(reply, Reply::Ack(0));
    let _ = events.send(Event::Reply(reply));
    if failed {
        // The destination gave up: unblock every writer.
        killer.shutdown_writes();
    }
}

fn reply_error(reply: Reply) -> MigrateError {
    match reply {
        Reply::Prepared => MigrateError::protocol(0, "the destination said Prepared twice"),
        Reply::Resumed => MigrateError::protocol(0, "the destination said Resumed out of turn"),
        // Not an `Error` frame: not the destination's word that it stopped the guest.
        Reply::Ack(code) => {
            MigrateError::protocol(0, format!("the destination acknowledged with code {code}"))
        }
        Reply::Error(code, message) => MigrateError::Remote {
            side: "destination",
            code,
            message,
        },
        Reply::Cancel => MigrateError::Remote {
            side: "destination",
            code: 0,
            message: "cancelled".into(),
        },
        Reply::Closed => MigrateError::Closed {
            connection: 0,
            side: "destination",
            when: "before acknowledging",
        },
        Reply::Broken(e) => e,
    }
}

/// The devices' sections, checked: at most [`MAX_DEVICE_SECTIONS`], names unique.
fn save_devices(devices: Option<&dyn DeviceState>) -> Result<Vec<DeviceSection>, MigrateError> {
    let Some(devices) = devices else {
        return Ok(Vec::new());
    };
    let sections = devices
        .save_devices()
        .map_err(MigrateError::vm("save device state"))?;
    if sections.len() > MAX_DEVICE_SECTIONS {
        return Err(MigrateError::Config(format!(
            "the VM saved {} device sections, more than the limit of {MAX_DEVICE_SECTIONS}",
            sections.len()
        )));
    }
    let mut names = HashSet::with_capacity(sections.len());
    if let Some(d) = sections.iter().find(|d| !names.insert(d.name())) {
        return Err(MigrateError::Config(format!(
            "the VM saved two device sections named {:?}",
            d.name()
        )));
    }
    Ok(sections)
}

/// Check that `mem` can back `region`: its size, not null, 8-byte aligned.
pub(crate) fn check_region_memory(
    mem: RegionMemory,
    region: &Region,
    who: &str,
) -> Result<(), MigrateError> {
    let ptr = mem.as_ptr();
    if mem.len() as u64 != region.size || ptr.is_null() || ptr as usize % 8 != 0 {
        return Err(MigrateError::Config(format!(
            "slot {}: {who} maps {} bytes at {ptr:p} for a region of {} bytes",
            region.slot,
            mem.len(),
            region.size
        )));
    }
    Ok(())
}

/// The [`digest::mem_digest`] of every region, in header order, with its slot: every byte
/// read but those of pages the kernel maps to its zero page.
fn hash_regions(regions: &[Region], mems: &[RegionMemory], page: usize) -> Vec<(u32, u64)> {
    regions
        .iter()
        .zip(mems)
        .map(|(r, &mem)| {
            // SAFETY: called between `pause` and the end of the final round: nobody writes the
            // guest's memory (the `MigrationSource` memory contract); the connection threads
            // only read it.
            let bytes = unsafe { guestmem::frozen(mem) };
            (r.slot, digest::paused_digest(bytes, page))
        })
        .collect()
}

/// The bits of word `w` that are pages of a region of `npages` pages.
fn word_mask(npages: u64, w: usize) -> u64 {
    let first = w as u64 * 64;
    match npages.saturating_sub(first) {
        0 => 0,
        n if n >= 64 => u64::MAX,
        n => (1u64 << n) - 1,
    }
}

/// The lowest `n` set bits of `bits`.
fn lowest_bits(mut bits: u64, n: u32) -> u64 {
    let mut out = 0;
    for _ in 0..n {
        let low = bits & bits.wrapping_neg();
        out |= low;
        bits &= !low;
    }
    out
}

/// The result of a scoped thread; a panic in it is an error of the migration.
fn join<T>(h: std::thread::ScopedJoinHandle<'_, T>) -> Result<T, MigrateError> {
    h.join()
        .map_err(|_| MigrateError::Config("hashing guest memory panicked".into()))
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

fn nanos(d: Duration) -> u64 {
    d.as_nanos().min(u128::from(u64::MAX)) as u64
}

fn micros(d: Duration) -> u64 {
    d.as_micros().min(u128::from(u64::MAX)) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_masks_cover_the_region() {
        assert_eq!(word_mask(130, 0), u64::MAX);
        assert_eq!(word_mask(130, 1), u64::MAX);
        assert_eq!(word_mask(130, 2), 0b11);
        assert_eq!(word_mask(130, 3), 0);
        assert_eq!(word_mask(128, 1), u64::MAX);
    }

    #[test]
    fn lowest_bits_takes_in_page_order() {
        assert_eq!(lowest_bits(0b1011_0110, 3), 0b0001_0110);
        assert_eq!(lowest_bits(u64::MAX, 64), u64::MAX);
        assert_eq!(lowest_bits(0b100, 0), 0);
    }

    #[test]
    fn truncates_on_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("héllo", 3), "hé");
        assert_eq!(truncate("abc", 10), "abc");
    }

    #[test]
    fn config_is_checked() {
        let ok = SendConfig::default();
        assert!(ok.check(4096).is_ok());
        let bad = |c: SendConfig| c.check(4096).unwrap_err().to_string();
        assert!(bad(SendConfig {
            connections: 0,
            ..ok.clone()
        })
        .contains("0 connections"));
        assert!(bad(SendConfig {
            connections: 65,
            ..ok.clone()
        })
        .contains("65 connections"));
        assert!(bad(SendConfig {
            clear_chunk_bytes: 32 * 4096,
            ..ok.clone()
        })
        .contains("at least 64 pages"));
        assert!(bad(SendConfig {
            clear_chunk_bytes: 3 << 20,
            ..ok.clone()
        })
        .contains("power of two"));
        assert!(ok.clone().check(4096).is_ok());
        let min_chunk = SendConfig {
            clear_chunk_bytes: 64 * 4096,
            ..ok.clone()
        };
        assert!(min_chunk.check(4096).is_ok());
        assert!(bad(SendConfig {
            max_bandwidth: Some(0),
            ..ok.clone()
        })
        .contains("bandwidth"));
        assert!(bad(SendConfig {
            auto_converge: Some(AutoConverge {
                max: 100,
                ..AutoConverge::default()
            }),
            ..ok
        })
        .contains("auto-converge"));
    }
}
