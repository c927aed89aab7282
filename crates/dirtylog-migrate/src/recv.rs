//! The receiving engine: accept a migration's connections, build the target from the stream
//! header, apply every connection's frames straight into the target's memory, check each
//! region's hash, and only then resume the guest and acknowledge.
//!
//! **Validation.** Every frame is CRC-checked (in a verified migration, a `Pages` frame's
//! pages are checked by their hashes instead, [`wire::FLAG_HASH_CHECKED`]; pages that came so
//! in a stream that then asks for no check fail it) and every range checked against the
//! header's memory map by the [`wire`] decoder before a byte lands. Every allocation is bounded by the
//! header or a constant: two bits per page (claimed this round, ever written: at most 64 MiB for
//! the 1 TiB limit), one flag
//! per declared vCPU, one hash per region, the names of at most
//! [`wire::MAX_DEVICE_SECTIONS`] device sections, and the decoder's
//! buffer for one frame (at most [`wire::MAX_DEVICE_STATE`] for a
//! device section).
//!
//! **Admission.** [`receive`] bounds each accepted connection's handshake (TLS, header,
//! `Hello`) by [`ReceiveConfig::handshake_timeout`]; a connection that does not complete it
//! — silent, trickling, failing its TLS handshake, or for connections 1.. carrying garbage
//! or another session's `Hello` — is dropped, told to [`ReceiveConfig::on_refused`] (escaped),
//! and the next one accepted; a receive that gives up says how many it refused and why.
//!
//! **Concurrency.** One thread per connection decodes into the shared target memory. A thread
//! only ever holds a `&mut [u8]` for the pages of the frame it is decoding, after atomically
//! *claiming* them in a per-round bitmap: a page claimed twice in one round (a confused or
//! hostile sender) is a protocol error, never two threads writing the same bytes. At each
//! `RoundEnd` the threads meet at a fence; the last to arrive forgets the claims and opens the
//! next round. So no frame of round `r + 1` is applied before every connection has delivered
//! all of round `r`, and a page resent in a later round always overwrites the older copy.
//!
//! **Switchover.** After the last round, connection 0 carries the vCPU states, then the device
//! sections (each validated, unique by name, handed to the target's
//! [`DeviceState::restore_device`](crate::DeviceState::restore_device)), then (strict only)
//! one digest per region ([`mem_digest`](crate::digest::mem_digest)), then `Prepare`: every
//! thread is joined, strict digests are checked, and `Prepared` goes back. The guest is
//! resumed only on the source's `Commit` (`Resumed` goes back); in background mode the
//! digests and `Done` then follow and are checked while the guest runs. The hand-over and its
//! failures are drawn in the [protocol](crate::protocol) docs.
//!
//! The check never reads guest memory: a [`DigestTable`] per region records each page's hash
//! as its frame lands, so it describes the memory as it arrived, whatever the guest has
//! written since it resumed.
//!
//! **Failure.** Any error stops every thread, is reported to the source in an `Error` frame
//! (unless the source itself gave up), and is returned; the target is dropped — stopped, if
//! it had been resumed for a background check — before the source hears of it.

use std::collections::HashSet;
use std::fmt;
use std::io::{self, BufReader, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use dirtylog::sync::lock;
use dirtylog::DirtyBitmap;
use std::time::{Duration, Instant};

use crate::digest::{DigestTable, Verify};
use crate::error::{code, escape_controls, MigrateError, VmError};
use crate::guestmem;
use crate::memory::{MigrationMemory, RegionMemory};
use crate::send::check_region_memory;
use crate::stats::ReceiveReport;
use crate::transport::{self, Killer, Listener, Transport};
use crate::vcpu::VcpuRestore;
use crate::vm::MigrationTarget;
use crate::wire::{
    self, Decoder, Encoder, GuestMemoryMut, Message, PageRange, StreamHeader, WireError,
    MAX_CONNECTIONS, MAX_DEVICE_SECTIONS, MAX_GUEST_MEMORY, VERIFY_BACKGROUND, VERIFY_STRICT,
};

/// Read buffer per connection, for frame headers and small frames: `Pages` data is read
/// straight into guest memory, [`wire::PAGES_PIECE`] at a time, past the buffer (which
/// `BufReader` does for reads at least its capacity); what the buffer did read ahead of a
/// frame's data is copied once more, so it is small.
const READ_BUFFER: usize = 64 << 10;
const _: () = assert!(READ_BUFFER <= wire::PAGES_PIECE);

/// Told about each connection [`receive`] refused ([`ReceiveConfig::on_refused`]).
pub type RefusedHook = Arc<dyn Fn(&str) + Send + Sync>;

/// How to receive.
#[derive(Clone)]
pub struct ReceiveConfig {
    /// How long to wait for the first connection; `None` to wait for ever. Default `None`.
    pub accept_timeout: Option<Duration>,
    /// How long to wait for the other connections once the first has said how many there
    /// are. Default 10 s.
    pub connections_timeout: Duration,
    /// Timeout of each blocking socket read or write. Default 60 s.
    pub io_timeout: Duration,
    /// Most connections accepted. Default [`MAX_CONNECTIONS`].
    pub max_connections: u32,
    /// Most guest memory accepted, in bytes. Default [`MAX_GUEST_MEMORY`] (1 TiB).
    pub max_guest_memory: u64,
    /// How long [`receive`] gives each accepted connection to say who it is — its stream
    /// header and `Hello`, from the first byte to the last — after its TLS handshake, if any
    /// (which a [`TlsListener`](crate::transport::tls::TlsListener) bounds with its own
    /// handshake timeout: give both the same). A connection that stays silent, trickles,
    /// fails its TLS handshake, or (for the second and later connections) sends anything but
    /// this migration's header and `Hello` — garbage, another session's — is dropped and
    /// the next one accepted, until the accept deadline (first connection) or
    /// [`connections_timeout`](Self::connections_timeout) (the others). So someone who
    /// merely reaches the port cannot fail the real sender's migration, nor hold it up
    /// longer than this per connection; the sender writes its header at once. (A first
    /// connection that sends a bad header still fails the receive, with an `Error` back to
    /// it: with plain TCP nothing tells a broken sender from an intruder.) Default 5 s.
    pub handshake_timeout: Duration,
    /// Called with one line (every control character escaped) for each connection refused
    /// that way, for a log; the error of a receive that gives up says how many there were
    /// and why the first was refused. Default `None`.
    pub on_refused: Option<RefusedHook>,
}

impl fmt::Debug for ReceiveConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReceiveConfig")
            .field("accept_timeout", &self.accept_timeout)
            .field("connections_timeout", &self.connections_timeout)
            .field("io_timeout", &self.io_timeout)
            .field("max_connections", &self.max_connections)
            .field("max_guest_memory", &self.max_guest_memory)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("on_refused", &self.on_refused.as_ref().map(|_| "Fn"))
            .finish()
    }
}

impl Default for ReceiveConfig {
    fn default() -> Self {
        ReceiveConfig {
            accept_timeout: None,
            connections_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(60),
            max_connections: MAX_CONNECTIONS,
            max_guest_memory: MAX_GUEST_MEMORY,
            handshake_timeout: Duration::from_secs(5),
            on_refused: None,
        }
    }
}

type Input<C> = Decoder<BufReader<Timed<C>>>;

/// A connection read under a deadline while it has one: each read may last only what is
/// left of it, so a peer cannot stretch a handshake by trickling its bytes.
struct Timed<C> {
    conn: C,
    until: Option<Instant>,
}

impl<C: Transport> Read for Timed<C> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(until) = self.until {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the handshake deadline passed",
                ));
            }
            self.conn.set_read_timeout(Some(left))?;
        }
        self.conn.read(buf)
    }
}

/// The connections [`receive`] turned away while waiting for the sender's.
#[derive(Default)]
struct Refused {
    count: usize,
    first: Option<String>,
}

impl Refused {
    fn note(&mut self, config: &ReceiveConfig, why: &str) {
        let why = escape_controls(why);
        if let Some(hook) = &config.on_refused {
            hook(&why);
        }
        self.count += 1;
        self.first.get_or_insert(why);
    }

    /// ` (1 connection refused meanwhile: WHY)`, ` (N connections refused meanwhile, the
    /// first: WHY)`, or nothing.
    fn summary(&self) -> String {
        match (&self.first, self.count) {
            (None, _) => String::new(),
            (Some(first), 1) => format!(" (1 connection refused meanwhile: {first})"),
            (Some(first), n) => format!(" ({n} connections refused meanwhile, the first: {first})"),
        }
    }
}

/// `a connection from ADDR`, or `a connection` when the transport does not know the address.
fn a_connection<S: 'static>(stream: &S) -> String {
    match transport::tls::peer_addr(stream) {
        Some(a) => format!("a connection from {a}"),
        None => "a connection".into(),
    }
}

/// Accept a connection before `deadline` that starts speaking within the handshake timeout:
/// one that stays silent, or fails its TLS handshake, is dropped (and noted), and the next
/// one accepted.
fn accept_speaking<L: Listener>(
    listener: &L,
    deadline: Instant,
    what: &str,
    config: &ReceiveConfig,
    refused: &mut Refused,
) -> Result<L::Stream, MigrateError> {
    let gave_up = |source: io::Error, refused: &Refused| MigrateError::Connect {
        what: format!("accepting {what}{}", refused.summary()),
        source,
    };
    loop {
        // Connections queued faster than they are refused do not stretch the deadline.
        if refused.count > 0 && Instant::now() >= deadline {
            return Err(gave_up(
                io::Error::new(io::ErrorKind::TimedOut, "no connection arrived in time"),
                refused,
            ));
        }
        let stream = match listener.accept_before(deadline) {
            Ok(s) => s,
            // A failed TLS handshake (PermissionDenied), or a peer gone before its accept.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::PermissionDenied
                        | io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::ConnectionReset
                ) =>
            {
                refused.note(config, &e.to_string());
                continue;
            }
            Err(e) => return Err(gave_up(e, refused)),
        };
        let who = a_connection(&stream);
        match stream.wait_readable(config.handshake_timeout) {
            Ok(true) => {}
            Ok(false) => {
                refused.note(
                    config,
                    &format!(
                        "{who} sent nothing within {:?}; dropped",
                        config.handshake_timeout
                    ),
                );
                continue;
            }
            Err(e) => {
                refused.note(config, &format!("{who} failed before saying anything: {e}"));
                continue;
            }
        }
        match transport::configure(&stream, config.io_timeout) {
            Ok(()) => return Ok(stream),
            Err(e) => refused.note(config, &format!("setting up {who} failed: {e}")),
        }
    }
}

/// Where the connections after the first come from.
enum More<'a, C> {
    /// Handed over by the caller, in any order: the first that fails its handshake fails the
    /// migration.
    Given(std::vec::IntoIter<C>),
    /// Accepted, each speaking ([`accept_speaking`]), before the deadline given: one that
    /// does not send this migration's header and `Hello` within the handshake timeout is
    /// dropped (and noted), and the next one accepted.
    Accepted {
        accept: &'a mut dyn FnMut(usize, Instant, &mut Refused) -> Result<C, MigrateError>,
        refused: &'a mut Refused,
    },
}

/// Receive one migration on `listener` (a [`TcpListener`](std::net::TcpListener), a
/// [`UnixListener`](std::os::unix::net::UnixListener), or what
/// [`listen`](crate::transport::listen) returns). `make_target` builds the empty VM from the
/// stream header. Returns the target, running, and a report; on error the target (if any was
/// built) is dropped without having run.
pub fn receive<L, T, F>(
    listener: &L,
    config: &ReceiveConfig,
    make_target: F,
) -> Result<(T, ReceiveReport), MigrateError>
where
    L: Listener,
    T: MigrationTarget,
    F: FnOnce(&StreamHeader) -> Result<T, VmError>,
{
    let deadline = config
        .accept_timeout
        .map_or_else(far_future, |t| after(Instant::now(), t));
    // A connection that says nothing within the handshake timeout, or fails its TLS
    // handshake, is dropped, and the next one accepted, until the accept deadline.
    let mut refused = Refused::default();
    let first = accept_speaking(
        listener,
        deadline,
        "the first connection",
        config,
        &mut refused,
    )?;
    let mut accept = |k: usize, deadline: Instant, refused: &mut Refused| {
        accept_speaking(
            listener,
            deadline,
            &format!("connection {k}"),
            config,
            refused,
        )
    };
    receive_with(
        first,
        config,
        make_target,
        More::Accepted {
            accept: &mut accept,
            refused: &mut refused,
        },
    )
}

/// A deadline no receive reaches.
fn far_future() -> Instant {
    after(Instant::now(), Duration::from_secs(100 * 365 * 24 * 3600))
}

/// `t + d`, or as far as the clock goes (no overflow panic for a huge `d`).
fn after(t: Instant, d: Duration) -> Instant {
    let mut d = d;
    loop {
        if let Some(at) = t.checked_add(d) {
            return at;
        }
        d /= 2;
    }
}

/// [`receive`] on connections the caller accepted, of any [`Transport`]: `first`, then `more`
/// in any order. The caller sets their timeouts.
pub fn receive_on<C, T, F>(
    first: C,
    more: Vec<C>,
    config: &ReceiveConfig,
    make_target: F,
) -> Result<(T, ReceiveReport), MigrateError>
where
    C: Transport,
    T: MigrationTarget,
    F: FnOnce(&StreamHeader) -> Result<T, VmError>,
{
    receive_with(first, config, make_target, More::Given(more.into_iter()))
}

fn receive_with<C, T, F>(
    first: C,
    config: &ReceiveConfig,
    make_target: F,
    mut more: More<'_, C>,
) -> Result<(T, ReceiveReport), MigrateError>
where
    C: Transport,
    T: MigrationTarget,
    F: FnOnce(&StreamHeader) -> Result<T, VmError>,
{
    let start = Instant::now();
    let killer = Killer::default();
    let reply = Transport::try_clone(&first).map_err(|source| MigrateError::Connect {
        what: "setting up the reply channel".into(),
        source,
    });
    let result = reply.and_then(|mut reply| {
        let _ = killer.add(&first);
        let outcome = receive_inner(
            first,
            config,
            make_target,
            &mut more,
            &killer,
            &mut reply,
            start,
        );
        finish(outcome, reply)
    });
    killer.kill();
    result
}

/// Tell the source how it ended: `Ack` once the guest runs, or why it failed.
fn finish<T, C: Transport>(
    outcome: Result<(T, ReceiveReport, StreamHeader), (MigrateError, Option<StreamHeader>)>,
    mut reply: C,
) -> Result<(T, ReceiveReport), MigrateError> {
    let fallback = || StreamHeader::new(wire::MIN_PAGE_SIZE, 1, Vec::new());
    match outcome {
        Ok((target, mut report, header)) => {
            let mut enc = Encoder::back_channel(&mut reply, header);
            // Committed: the guest runs here whatever becomes of the acknowledgement. Without
            // it the source keeps its copy paused and reports the outcome as unknown — which
            // is also what it must do when the end could not be confirmed here (a warning):
            // `Ack 0` says the memory was checked, so it is not sent then.
            if report.warning.is_some() {
                return Ok((target, report));
            }
            if let Err(e) = enc.send(Message::Ack { code: 0 }) {
                report.warning.get_or_insert(format!(
                    "the guest runs here, but the final acknowledgement could not be sent \
                     ({e}): the source keeps its copy paused and reports the outcome as unknown"
                ));
            }
            Ok((target, report))
        }
        Err((error, header)) => {
            let code = match &error {
                MigrateError::Remote { .. } | MigrateError::Cancelled => None,
                MigrateError::HashMismatch { .. } => Some(code::HASH_MISMATCH),
                MigrateError::Vm { .. } | MigrateError::Device { .. } => Some(code::TARGET_FAILED),
                _ => Some(code::BAD_STREAM),
            };
            if let (Some(code), Some(header)) = (code, header.or_else(|| fallback().ok())) {
                let message = error.to_string();
                let mut end = message.len().min(wire::MAX_ERROR_MESSAGE);
                while !message.is_char_boundary(end) {
                    end -= 1;
                }
                let _ = reply.set_write_timeout(Some(Duration::from_secs(2)));
                let mut enc = Encoder::back_channel(&mut reply, header);
                let _ = enc.send(Message::Error {
                    code,
                    message: &message[..end],
                });
            }
            Err(error)
        }
    }
}

type Outcome<T> = Result<(T, ReceiveReport, StreamHeader), (MigrateError, Option<StreamHeader>)>;

#[allow(clippy::too_many_arguments)]
fn receive_inner<C, T, F>(
    first: C,
    config: &ReceiveConfig,
    make_target: F,
    more: &mut More<'_, C>,
    killer: &Killer,
    reply: &mut C,
    start: Instant,
) -> Outcome<T>
where
    C: Transport,
    T: MigrationTarget,
    F: FnOnce(&StreamHeader) -> Result<T, VmError>,
{
    // Accepted connections say who they are within the handshake timeout; the caller's
    // keep the timeouts it set.
    let accepted = matches!(more, More::Accepted { .. });
    let open = |stream: &C, until: Option<Instant>| -> Result<Input<C>, MigrateError> {
        let conn = Transport::try_clone(stream).map_err(|source| MigrateError::Io {
            what: "cloning a connection",
            source,
        })?;
        let reader = Timed { conn, until };
        let mut input =
            Decoder::new(BufReader::with_capacity(READ_BUFFER, reader)).map_err(|source| {
                MigrateError::Wire {
                    connection: 0,
                    source,
                }
            })?;
        // Each page is hashed as it lands, while it is still in cache; so pages may come
        // without a CRC of their own if the stream is verified (checked at Prepare).
        input.set_hash_pages(true);
        input.accept_hash_checked(true);
        Ok(input)
    };
    // The handshake over: reads are bounded by the I/O timeout again.
    let settle = |input: &mut Input<C>| -> Result<(), MigrateError> {
        let timed = input.get_mut().get_mut();
        if timed.until.take().is_some() {
            timed
                .conn
                .set_read_timeout(Some(config.io_timeout))
                .map_err(|source| MigrateError::Io {
                    what: "setting a connection's timeout",
                    source,
                })?;
        }
        Ok(())
    };
    let handshake_until = || accepted.then(|| after(Instant::now(), config.handshake_timeout));
    let mut first_input = open(&first, handshake_until()).map_err(|e| (e, None))?;
    let header = first_input.header().clone();
    let fail = |e: MigrateError| (e, Some(header.clone()));
    let (n, session) = match hello(&mut first_input, 0) {
        Ok((0, n, session)) => (n, session),
        Ok((i, ..)) => {
            return Err(fail(MigrateError::protocol(
                0,
                format!("the first connection says it is connection {i}"),
            )))
        }
        Err(e) => return Err(fail(e)),
    };
    settle(&mut first_input).map_err(fail)?;
    if n > config.max_connections {
        return Err(fail(MigrateError::protocol(
            0,
            format!(
                "{n} connections requested, more than the limit of {}",
                config.max_connections
            ),
        )));
    }
    let total: u64 = header.regions().iter().map(|r| r.size).sum();
    if total > config.max_guest_memory {
        return Err(fail(MigrateError::protocol(
            0,
            format!(
                "the guest has {total} bytes of memory, more than the limit of {}",
                config.max_guest_memory
            ),
        )));
    }
    let target = make_target(&header).map_err(|e| fail(MigrateError::vm("create target")(e)))?;
    let mems = target_memory(&target, &header).map_err(fail)?;

    // The other connections, in any order, each with the same header and session.
    let mut inputs: Vec<Option<Input<C>>> = (0..n).map(|_| None).collect();
    inputs[0] = Some(first_input);
    let admit = |stream: &C,
                 k: usize,
                 until: Option<Instant>,
                 inputs: &[Option<Input<C>>]|
     -> Result<(usize, Input<C>), MigrateError> {
        let mut input = open(stream, until).map_err(|e| renumber(e, k))?;
        if input.header() != &header {
            return Err(MigrateError::protocol(
                k,
                "its stream header differs from connection 0's",
            ));
        }
        let (i, count, id) = hello(&mut input, k)?;
        let i = i as usize;
        if count != n || id != session || i == 0 || inputs[i].is_some() {
            return Err(MigrateError::protocol(
                k,
                format!(
                    "Hello for connection {i} of {count} (session {id:#x}) does not belong to \
                     this migration of {n} connections (session {session:#x}) or repeats one"
                ),
            ));
        }
        settle(&mut input)?;
        Ok((i, input))
    };
    for k in 1..n as usize {
        let (stream, (i, input)) = match more {
            More::Given(given) => {
                let stream = given.next().ok_or_else(|| {
                    fail(MigrateError::Connect {
                        what: format!("connection {k}"),
                        source: io::ErrorKind::NotConnected.into(),
                    })
                })?;
                let admitted = admit(&stream, k, None, &inputs).map_err(fail)?;
                (stream, admitted)
            }
            More::Accepted { accept, refused } => {
                let deadline = after(Instant::now(), config.connections_timeout);
                loop {
                    let stream = accept(k, deadline, refused).map_err(fail)?;
                    let until = handshake_until().map(|t| t.min(deadline));
                    match admit(&stream, k, until, &inputs) {
                        Ok(admitted) => break (stream, admitted),
                        // Not this migration's: dropped; the sender's is still to come.
                        Err(e) => refused.note(
                            config,
                            &format!(
                                "{} in place of connection {k}: {e}; dropped",
                                a_connection(&stream)
                            ),
                        ),
                    }
                }
            }
        };
        let _ = killer.add(&stream);
        inputs[i] = Some(input);
    }

    let shared = Shared {
        header: &header,
        target: &target,
        mems,
        claims: claim_bitmaps(&header),
        digests: digest_tables(&header),
        fence: Fence::new(n as usize),
        killer,
        failure: Mutex::new(None),
        bytes: AtomicU64::new(0),
        normal: AtomicU64::new(0),
        zero: AtomicU64::new(0),
        hash_checked: AtomicU64::new(0),
    };
    let mut outcomes: Vec<Option<(ConnOutcome, Input<C>)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = inputs
            .into_iter()
            .enumerate()
            .map(|(i, input)| {
                let shared = &shared;
                scope.spawn(move || {
                    let input = input?;
                    match shared.connection(i, input) {
                        Ok(o) => Some(o),
                        Err(e) => {
                            shared.fail(e);
                            None
                        }
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(None))
            .collect()
    });
    if let Some(e) = lock(&shared.failure).take() {
        return Err(fail(e));
    }
    let Some(Some((control, _))) = outcomes.first() else {
        return Err(fail(MigrateError::protocol(
            0,
            "connection thread ended without a result",
        )));
    };
    let rounds = control.rounds;
    for (i, o) in outcomes.iter().enumerate() {
        match o {
            Some((o, _)) if o.rounds == rounds => {}
            _ => {
                return Err(fail(MigrateError::protocol(
                    i,
                    format!(
                        "ended after a different number of rounds than connection 0 ({rounds})"
                    ),
                )))
            }
        }
    }
    let Some(Some((control, mut input))) = outcomes.get_mut(0).map(Option::take) else {
        return Err(fail(MigrateError::protocol(0, "connection 0 vanished")));
    };
    drop(outcomes);
    let missing_vcpu = control.vcpus.iter().position(|&seen| !seen);
    if let Some(id) = missing_vcpu {
        return Err(fail(MigrateError::protocol(
            0,
            format!("switchover without the state of vCPU {id}"),
        )));
    }

    let mut hashes = control.hashes;
    let Some((mode, prepare_at)) = control.prepare else {
        return Err(fail(MigrateError::protocol(
            0,
            "Done on connection 0 without Prepare",
        )));
    };
    let verify = match mode {
        VERIFY_STRICT => Verify::Strict,
        VERIFY_BACKGROUND => Verify::Background,
        _ => Verify::Off,
    };
    // Pages without a CRC are only ever checked by the memory check: a stream that sent any
    // and then asks for none would leave them unchecked.
    let unchecked = shared.hash_checked.load(Ordering::Relaxed);
    if verify == Verify::Off && unchecked > 0 {
        return Err(fail(MigrateError::protocol(
            0,
            format!(
                "{unchecked} pages came without a CRC (checked by page hashes) in a stream \
                 that then asks for no memory check"
            ),
        )));
    }
    let check = |hashes: &[Option<u64>]| -> Result<Duration, MigrateError> {
        // The memory as it arrived against the source's paused memory.
        let t = Instant::now();
        for (i, region) in header.regions().iter().enumerate() {
            let Some(expected) = hashes[i] else {
                return Err(MigrateError::protocol(
                    0,
                    format!("no memory hash of slot {}", region.slot),
                ));
            };
            let actual = shared.digests[i].digest();
            if actual != expected {
                return Err(MigrateError::HashMismatch {
                    slot: region.slot,
                    expected,
                    actual,
                });
            }
        }
        Ok(t.elapsed())
    };
    let mut hash_check_time = Duration::ZERO;
    match verify {
        Verify::Strict => hash_check_time = check(&hashes).map_err(fail)?,
        _ if hashes.iter().any(Option::is_some) => {
            return Err(fail(MigrateError::protocol(
                0,
                format!("memory hashes before a Prepare for verify {verify}"),
            )))
        }
        _ => {}
    }

    // Ready: every state restored, (strict) the memory checked. The guest runs on Commit only.
    let mut replies = Encoder::back_channel(&mut *reply, header.clone());
    replies
        .send(Message::Prepared)
        .and_then(|()| replies.flush())
        .map_err(|e| fail(MigrateError::wire(0)(e)))?;
    let before = input.position();
    let mut no_memory = ();
    let commit = match input.next(&mut no_memory) {
        Ok(Some(Message::Commit)) => Ok(()),
        Ok(Some(other)) => Err(source_gave_up(&other).unwrap_or_else(|| {
            MigrateError::protocol(0, format!("{} where Commit was due", frame_name(&other)))
        })),
        Ok(None) => Err(MigrateError::Uncommitted(None)),
        Err(e) => Err(MigrateError::Uncommitted(Some(Box::new(
            MigrateError::wire(0)(e),
        )))),
    };
    commit.map_err(fail)?;
    let commit_at = Instant::now();
    shared
        .bytes
        .fetch_add(input.position() - before, Ordering::Relaxed);

    // Committed: the source will not run the guest unless this side says it stopped it. From
    // here on, a failure of the link leaves the guest running here (with a warning); a
    // failure of this side stops it and says so.
    target
        .vcpus()
        .resume()
        .map_err(|e| fail(MigrateError::vm("resume")(e)))?;
    let resume_us = micros(commit_at.elapsed());
    let resumed_at = Instant::now();
    let mut warning = None;
    if let Err(e) = replies
        .send(Message::Resumed { resume_us })
        .and_then(|()| replies.flush())
    {
        warning = Some(format!(
            "the guest runs here, but the source could not be told ({e}): it keeps its copy \
             paused and reports the outcome as unknown"
        ));
    }
    if warning.is_none() {
        let before = input.position();
        let read = read_digests(&mut input, &header, &mut hashes, verify);
        shared
            .bytes
            .fetch_add(input.position() - before, Ordering::Relaxed);
        match read {
            Ok(()) if verify == Verify::Background => {
                hash_check_time = check(&hashes).map_err(fail)?;
            }
            Ok(()) => {}
            // The link died: the guest runs here, committed.
            Err(e) if e.is_secondary() => {
                warning = Some(format!(
                    "the guest runs here, but the link to the source failed before the end \
                     ({e}){}",
                    if verify == Verify::Background {
                        "; its memory could not be checked"
                    } else {
                        ""
                    }
                ))
            }
            Err(e) => return Err(fail(e)),
        }
    }
    drop(input);
    let report = ReceiveReport {
        total_time: ms(start.elapsed()),
        transferred: shared.bytes.load(Ordering::Relaxed),
        normal: shared.normal.load(Ordering::Relaxed),
        duplicate: shared.zero.load(Ordering::Relaxed),
        rounds,
        connections: n as usize,
        devices: control.devices,
        verify,
        hash_check_time: ms(hash_check_time),
        verify_after_resume_time: match verify {
            Verify::Background => ms(resumed_at.elapsed()),
            _ => 0,
        },
        resume_time: ms(resumed_at.saturating_duration_since(prepare_at)),
        warning,
    };
    drop(shared);
    Ok((target, report, header))
}

/// After `Resumed`, on connection 0: one `MemHash` per region and `Done` ([`Verify::Background`]),
/// or `Done` alone. Nothing may touch guest memory any more.
fn read_digests<C: Transport>(
    input: &mut Input<C>,
    header: &StreamHeader,
    hashes: &mut [Option<u64>],
    verify: Verify,
) -> Result<(), MigrateError> {
    loop {
        match input.next(&mut ()).map_err(MigrateError::wire(0))? {
            Some(Message::MemHash { slot, hash }) if verify == Verify::Background => {
                let (index, _) = header.region(slot).map_err(MigrateError::wire(0))?;
                if hashes[index].replace(hash).is_some() {
                    return Err(MigrateError::protocol(
                        0,
                        format!("hash of slot {slot} sent twice"),
                    ));
                }
            }
            Some(Message::Done) => return Ok(()),
            Some(other) => {
                return Err(source_gave_up(&other).unwrap_or_else(|| {
                    MigrateError::protocol(
                        0,
                        format!(
                            "unexpected {} after Commit (verify {verify})",
                            frame_name(&other)
                        ),
                    )
                }))
            }
            None => {
                return Err(MigrateError::wire(0)(WireError::Truncated {
                    offset: input.position(),
                    what: "stream before its Done frame",
                }))
            }
        }
    }
}

/// The source's `Cancel` or `Error`, as the error it ends the migration with; `None` for any
/// other frame.
fn source_gave_up(msg: &Message<'_>) -> Option<MigrateError> {
    match *msg {
        Message::Cancel => Some(MigrateError::Cancelled),
        Message::Error { code, message } => Some(MigrateError::Remote {
            side: "source",
            code,
            message: message.into(),
        }),
        _ => None,
    }
}

/// The Hello frame that must follow the header on every connection.
fn hello<C: Transport>(input: &mut Input<C>, conn: usize) -> Result<(u32, u32, u64), MigrateError> {
    match input.next(&mut ()).map_err(MigrateError::wire(conn))? {
        Some(Message::Hello {
            connection,
            connections,
            session,
        }) => Ok((connection, connections, session)),
        Some(other) => Err(source_gave_up(&other).unwrap_or_else(|| {
            MigrateError::protocol(
                conn,
                format!(
                    "expected a Hello frame after the header, got {}",
                    frame_name(&other)
                ),
            )
        })),
        None => Err(MigrateError::wire(conn)(WireError::Truncated {
            offset: input.position(),
            what: "stream before its Hello frame",
        })),
    }
}

fn renumber(e: MigrateError, conn: usize) -> MigrateError {
    match e {
        MigrateError::Wire { source, .. } => MigrateError::Wire {
            connection: conn,
            source,
        },
        other => other,
    }
}

/// The target's memory of each region of the header, checked against it: same count, guest
/// addresses and sizes (slot ids are the target's own business).
fn target_memory<T: MigrationTarget>(
    target: &T,
    header: &StreamHeader,
) -> Result<Vec<RegionMemory>, MigrateError> {
    let memory = target.memory();
    let mine = memory.regions();
    if mine.len() != header.regions().len() {
        return Err(MigrateError::Config(format!(
            "the target has {} regions for the stream's {}",
            mine.len(),
            header.regions().len()
        )));
    }
    header
        .regions()
        .iter()
        .zip(&mine)
        .enumerate()
        .map(|(i, (r, m))| {
            if (m.gpa, m.size) != (r.gpa, r.size) {
                return Err(MigrateError::Config(format!(
                    "the target's region {i} is {:#x} bytes at {:#x}, the stream's slot {} is \
                     {:#x} bytes at {:#x}",
                    m.size, m.gpa, r.slot, r.size, r.gpa
                )));
            }
            let mem = memory.region_memory(i).ok_or_else(|| {
                MigrateError::Config(format!("the target has no memory for slot {}", r.slot))
            })?;
            check_region_memory(mem, r, "the target")?;
            Ok(mem)
        })
        .collect()
}

fn digest_tables(header: &StreamHeader) -> Vec<DigestTable> {
    let page = u64::from(header.page_size());
    header
        .regions()
        .iter()
        // In range (below MAX_GUEST_MEMORY): fits in usize on 64-bit hosts.
        .map(|r| DigestTable::new((r.size / page) as usize, page as usize))
        .collect()
}

fn claim_bitmaps(header: &StreamHeader) -> Vec<DirtyBitmap> {
    let page = u64::from(header.page_size());
    header
        .regions()
        .iter()
        .map(|r| DirtyBitmap::new(r.size / page))
        .collect()
}

/// What one connection's thread learned.
struct ConnOutcome {
    /// Rounds completed before `Done`.
    rounds: u64,
    /// Connection 0: which vCPU states arrived.
    vcpus: Vec<bool>,
    /// Connection 0: each region's hash from the source (strict mode: before `Done`).
    hashes: Vec<Option<u64>>,
    /// Connection 0: device sections restored.
    devices: usize,
    /// Connection 0 ended with `Prepare`: its verify field, and when it arrived.
    prepare: Option<(u32, Instant)>,
}

/// State shared by the connection threads.
struct Shared<'a, T> {
    header: &'a StreamHeader,
    target: &'a T,
    mems: Vec<RegionMemory>,
    /// One bit per page: claimed in the current round.
    claims: Vec<DirtyBitmap>,
    /// The hash of every page as it last arrived, per region.
    digests: Vec<DigestTable>,
    fence: Fence,
    killer: &'a Killer,
    failure: Mutex<Option<MigrateError>>,
    bytes: AtomicU64,
    normal: AtomicU64,
    zero: AtomicU64,
    /// Pages that came in `FLAG_HASH_CHECKED` frames: only the memory check checks them.
    hash_checked: AtomicU64,
}

impl<T: MigrationTarget> Shared<'_, T> {
    /// Record a failure (the first real cause wins over the broken connections it causes)
    /// and stop every thread.
    fn fail(&self, e: MigrateError) {
        {
            let mut slot = lock(&self.failure);
            let replace = match &*slot {
                None => true,
                Some(old) => old.is_secondary() && !e.is_secondary(),
            };
            if replace {
                *slot = Some(e);
            }
        }
        self.fence.abort();
        // Unblock the readers; the reply direction stays open for the Error frame.
        self.killer.shutdown_reads();
    }

    fn connection<C: Transport>(
        &self,
        conn: usize,
        mut input: Input<C>,
    ) -> Result<(ConnOutcome, Input<C>), MigrateError> {
        let control = conn == 0;
        let mut memory = Claimed { shared: self };
        let mut rounds = 0u64;
        let mut switchover = false;
        let mut vcpus = vec![
            false;
            if control {
                self.header.vcpu_count() as usize
            } else {
                0
            }
        ];
        let mut hashes = vec![
            None;
            if control {
                self.header.regions().len()
            } else {
                0
            }
        ];
        let (mut normal, mut zero) = (0, 0);
        // Device sections: names seen (bounded by MAX_DEVICE_SECTIONS), and whether a hash
        // has closed them.
        let mut devices: HashSet<String> = HashSet::new();
        let mut hashing = false;
        let mut last_position = input.position();
        let outcome = loop {
            let position = input.position();
            self.bytes
                .fetch_add(position - last_position, Ordering::Relaxed);
            last_position = position;
            let msg = input.next(&mut memory).map_err(MigrateError::wire(conn))?;
            let late =
                |what: &str| MigrateError::protocol(conn, format!("{what} after the vCPU states"));
            match msg {
                None => {
                    return Err(MigrateError::wire(conn)(WireError::Truncated {
                        offset: input.position(),
                        what: "stream before its Done frame",
                    }))
                }
                Some(Message::Pages { range, data: _ }) => {
                    if switchover {
                        return Err(late("Pages frame"));
                    }
                    let index = self
                        .header
                        .check_range(range)
                        .map_err(MigrateError::wire(conn))?;
                    // The decoder hashed each page as it landed (CRC- or hash-checked); the
                    // memory is never read again.
                    let hashes = input.page_hashes();
                    if hashes.len() as u64 != range.npages {
                        return Err(MigrateError::protocol(
                            conn,
                            format!(
                                "{} page hashes for the {} pages of a Pages frame",
                                hashes.len(),
                                range.npages
                            ),
                        ));
                    }
                    self.digests[index].record_hashes(range.first_page, hashes);
                    normal += range.npages;
                }
                Some(Message::ZeroPages(range)) => {
                    if switchover {
                        return Err(late("ZeroPages frame"));
                    }
                    let index = self
                        .header
                        .check_range(range)
                        .map_err(MigrateError::wire(conn))?;
                    let size = self.header.regions()[index].size;
                    let page = self.header.page_size() as usize;
                    let (start, len) = (
                        range.first_page as usize * page,
                        range.npages as usize * page,
                    );
                    if rounds == 0 {
                        // The first time any page arrives, into zero-filled memory: nothing
                        // to write (its digest entry is still the zero page's), but the pages
                        // are claimed all the same.
                        let claims = self
                            .claims
                            .get(index)
                            .ok_or(WireError::UnknownSlot(range.slot))
                            .map_err(MigrateError::wire(conn))?;
                        claim(claims, range).map_err(MigrateError::wire(conn))?;
                    } else {
                        let bytes = memory
                            .range_mut(index, size, range, start, len)
                            .map_err(MigrateError::wire(conn))?;
                        for p in bytes.chunks_mut(page) {
                            if !guestmem::is_zero_bytes(p) {
                                p.fill(0);
                            }
                        }
                        self.digests[index].record_zero(range.first_page, range.npages);
                    }
                    zero += range.npages;
                }
                Some(Message::RoundEnd { round, .. }) => {
                    if switchover {
                        return Err(late("RoundEnd frame"));
                    }
                    if round != rounds {
                        return Err(MigrateError::protocol(
                            conn,
                            format!("RoundEnd for round {round} where round {rounds} ends"),
                        ));
                    }
                    self.fence
                        .arrive(round, || self.forget_claims())
                        .map_err(|m| MigrateError::protocol(conn, m))?;
                    rounds += 1;
                }
                Some(Message::VcpuState { vcpu_id, blob }) if control => {
                    if rounds == 0 {
                        return Err(MigrateError::protocol(conn, "vCPU state before any round"));
                    }
                    switchover = true;
                    let seen = &mut vcpus[vcpu_id as usize];
                    if std::mem::replace(seen, true) {
                        return Err(MigrateError::protocol(
                            conn,
                            format!("state of vCPU {vcpu_id} sent twice"),
                        ));
                    }
                    if !devices.is_empty() || hashing {
                        return Err(MigrateError::protocol(
                            conn,
                            format!("state of vCPU {vcpu_id} after the device sections or hashes"),
                        ));
                    }
                    self.target
                        .vcpus()
                        .restore_state(vcpu_id, blob)
                        .map_err(MigrateError::vm("restore vCPU state"))?;
                }
                Some(Message::Device {
                    name,
                    version,
                    bytes,
                }) if control => {
                    if let Some(id) = vcpus.iter().position(|&seen| !seen) {
                        return Err(MigrateError::protocol(
                            conn,
                            format!("device section {name:?} before the state of vCPU {id}"),
                        ));
                    }
                    if hashing {
                        return Err(MigrateError::protocol(
                            conn,
                            format!("device section {name:?} after the memory hashes"),
                        ));
                    }
                    if devices.len() >= MAX_DEVICE_SECTIONS {
                        return Err(MigrateError::protocol(
                            conn,
                            format!("more than {MAX_DEVICE_SECTIONS} device sections"),
                        ));
                    }
                    switchover = true;
                    if !devices.insert(name.to_string()) {
                        return Err(MigrateError::protocol(
                            conn,
                            format!("device section {name:?} sent twice"),
                        ));
                    }
                    let restored = match self.target.devices() {
                        Some(d) => d.restore_device(name, version, bytes),
                        None => Err(format!(
                            "this VM has no devices, and the stream carries {name:?} \
                             (version {version})"
                        )
                        .into()),
                    };
                    restored.map_err(|e| MigrateError::Device {
                        name: name.to_string(),
                        version,
                        source: e,
                    })?;
                }
                Some(Message::MemHash { slot, hash }) if control => {
                    if rounds == 0 {
                        return Err(MigrateError::protocol(conn, "memory hash before any round"));
                    }
                    switchover = true;
                    hashing = true;
                    let (index, _) = self.header.region(slot).map_err(MigrateError::wire(conn))?;
                    if hashes[index].replace(hash).is_some() {
                        return Err(MigrateError::protocol(
                            conn,
                            format!("hash of slot {slot} sent twice"),
                        ));
                    }
                }
                Some(Message::Prepare { verify }) if control => {
                    if rounds == 0 || (hashing && verify != VERIFY_STRICT) {
                        return Err(MigrateError::protocol(
                            conn,
                            "Prepare before any round, or after memory hashes outside strict \
                             verification",
                        ));
                    }
                    let at = Instant::now();
                    self.fence
                        .leave(rounds)
                        .map_err(|m| MigrateError::protocol(conn, m))?;
                    break ConnOutcome {
                        rounds,
                        vcpus,
                        hashes,
                        devices: devices.len(),
                        prepare: Some((verify, at)),
                    };
                }
                Some(Message::Done) => {
                    self.fence
                        .leave(rounds)
                        .map_err(|m| MigrateError::protocol(conn, m))?;
                    break ConnOutcome {
                        rounds,
                        vcpus,
                        hashes,
                        devices: devices.len(),
                        prepare: None,
                    };
                }
                Some(other) => {
                    return Err(source_gave_up(&other).unwrap_or_else(|| {
                        MigrateError::protocol(
                            conn,
                            format!("unexpected {} on this connection", frame_name(&other)),
                        )
                    }))
                }
            }
        };
        self.bytes
            .fetch_add(input.position() - last_position, Ordering::Relaxed);
        self.normal.fetch_add(normal, Ordering::Relaxed);
        self.zero.fetch_add(zero, Ordering::Relaxed);
        self.hash_checked
            .fetch_add(input.hash_checked_pages(), Ordering::Relaxed);
        Ok((outcome, input))
    }

    /// Called by the last thread to reach a round's fence, while all others wait at it.
    fn forget_claims(&self) {
        for claims in &self.claims {
            claims.clear_all();
        }
    }
}

/// The target memory as the decoder sees it: only claimed ranges, never whole regions.
struct Claimed<'s, 'a, T> {
    shared: &'s Shared<'a, T>,
}

impl<T: MigrationTarget> GuestMemoryMut for Claimed<'_, '_, T> {
    fn region_mut(&mut self, _index: usize) -> Option<&mut [u8]> {
        None
    }

    fn range_mut(
        &mut self,
        index: usize,
        size: u64,
        range: PageRange,
        start: usize,
        len: usize,
    ) -> Result<&mut [u8], WireError> {
        let s = self.shared;
        let (Some(&mem), Some(claims)) = (s.mems.get(index), s.claims.get(index)) else {
            return Err(WireError::UnknownSlot(range.slot));
        };
        let fits = matches!(start.checked_add(len), Some(end) if end <= mem.len());
        if mem.len() as u64 != size || !fits {
            return Err(WireError::Destination {
                slot: range.slot,
                have: mem.len() as u64,
                size,
            });
        }
        claim(claims, range)?;
        // SAFETY: `start..start + len` lies inside the region's mapping (checked above), which
        // the target keeps valid and which nobody else touches until resume (the
        // `MigrationTarget` memory contract). Its pages were just claimed by this thread for
        // the current round: no other thread can claim them, and so hold a reference to them,
        // until every thread has reached the round's fence, and the slice dies before this
        // thread does (at the end of the frame's decoding).
        Ok(unsafe { std::slice::from_raw_parts_mut(mem.as_ptr().add(start), len) })
    }
}

/// Claim the pages of `range` for this round; fail if any was already claimed.
fn claim(claims: &DirtyBitmap, range: PageRange) -> Result<(), WireError> {
    if claims.set_range(range.first_page, range.npages) {
        return Err(WireError::Overlap {
            slot: range.slot,
            first_page: range.first_page,
            end: range.first_page + range.npages,
        });
    }
    Ok(())
}

/// The per-round meeting point of the connection threads. A thread that has sent `Done`
/// leaves; a round that a departed thread never reached is a protocol error, as is any
/// wait once a thread has failed.
struct Fence {
    state: Mutex<FenceState>,
    cv: Condvar,
}

struct FenceState {
    active: usize,
    arrived: usize,
    generation: u64,
    aborted: bool,
    /// Rounds completed by the threads that have left.
    ended_after: Option<u64>,
}

impl Fence {
    fn new(n: usize) -> Self {
        Fence {
            state: Mutex::new(FenceState {
                active: n,
                arrived: 0,
                generation: 0,
                aborted: false,
                ended_after: None,
            }),
            cv: Condvar::new(),
        }
    }

    /// Wait until every connection has ended `round`; the last to arrive runs `last` first.
    fn arrive(&self, round: u64, last: impl FnOnce()) -> Result<(), String> {
        let mut s = lock(&self.state);
        if s.aborted {
            return Err("stopped: another connection failed".into());
        }
        if let Some(ended) = s.ended_after {
            if round >= ended {
                s.aborted = true;
                self.cv.notify_all();
                return Err(format!(
                    "round {round} ended here, but another connection finished after {ended} rounds"
                ));
            }
        }
        s.arrived += 1;
        if s.arrived == s.active {
            last();
            s.arrived = 0;
            s.generation += 1;
            self.cv.notify_all();
            return Ok(());
        }
        let generation = s.generation;
        while s.generation == generation && !s.aborted {
            s = dirtylog::sync::wait(&self.cv, s);
        }
        if s.aborted {
            return Err("stopped: another connection failed".into());
        }
        Ok(())
    }

    /// Leave after `rounds` rounds.
    fn leave(&self, rounds: u64) -> Result<(), String> {
        let mut s = lock(&self.state);
        if s.aborted {
            return Err("stopped: another connection failed".into());
        }
        let mismatch = s.arrived > 0 || s.ended_after.is_some_and(|e| e != rounds);
        if mismatch {
            s.aborted = true;
            self.cv.notify_all();
            return Err(format!(
                "Done after {rounds} rounds while another connection is in a different round"
            ));
        }
        s.ended_after = Some(rounds);
        s.active -= 1;
        Ok(())
    }

    fn abort(&self) {
        lock(&self.state).aborted = true;
        self.cv.notify_all();
    }
}

fn frame_name(msg: &Message<'_>) -> &'static str {
    match msg {
        Message::Pages { .. } => "Pages frame",
        Message::ZeroPages(_) => "ZeroPages frame",
        Message::RoundEnd { .. } => "RoundEnd frame",
        Message::VcpuState { .. } => "VcpuState frame",
        Message::MemHash { .. } => "MemHash frame",
        Message::Done => "Done frame",
        Message::Error { .. } => "Error frame",
        Message::Ack { .. } => "Ack frame",
        Message::Cancel => "Cancel frame",
        Message::Hello { .. } => "Hello frame",
        Message::Device { .. } => "Device frame",
        Message::Prepare { .. } => "Prepare frame",
        Message::Prepared => "Prepared frame",
        Message::Commit => "Commit frame",
        Message::Resumed { .. } => "Resumed frame",
    }
}

fn micros(d: Duration) -> u64 {
    d.as_micros().min(u128::from(u64::MAX)) as u64
}

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_refuse_overlap_within_a_round() {
        let claims = DirtyBitmap::new(192);
        let r = |first_page, npages| PageRange {
            slot: 7,
            first_page,
            npages,
        };
        claim(&claims, r(10, 100)).unwrap();
        claim(&claims, r(110, 50)).unwrap();
        claim(&claims, r(0, 10)).unwrap();
        let e = claim(&claims, r(150, 20)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "range slot 7 pages 150..170 overlaps pages already received this round"
        );
    }

    #[test]
    fn fence_orders_rounds_and_detects_early_done() {
        let fence = Fence::new(2);
        let resets = AtomicU64::new(0);
        std::thread::scope(|s| {
            let a = s.spawn(|| {
                for r in 0..3 {
                    fence.arrive(r, || {
                        resets.fetch_add(1, Ordering::Relaxed);
                    })?;
                }
                fence.leave(3)
            });
            for r in 0..3 {
                fence
                    .arrive(r, || {
                        resets.fetch_add(1, Ordering::Relaxed);
                    })
                    .unwrap();
            }
            fence.leave(3).unwrap();
            a.join().unwrap().unwrap();
        });
        assert_eq!(resets.load(Ordering::Relaxed), 3);

        // One connection says Done after 1 round, the other goes on to round 1.
        let fence = Fence::new(2);
        std::thread::scope(|s| {
            let a = s.spawn(|| {
                fence.arrive(0, || ())?;
                fence.arrive(1, || ())
            });
            fence.arrive(0, || ()).unwrap();
            // Either the leave sees the other waiting, or the other sees the leave.
            let left = fence.leave(1);
            let other = a.join().unwrap();
            assert!(left.is_err() || other.is_err());
        });
    }
}
