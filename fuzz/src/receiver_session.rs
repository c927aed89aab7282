//! `receiver_session`: a whole migration as the receiver sees it. A valid preamble, header
//! (a small memory map) and `Hello`, then a fuzzer-built sequence of messages — pages, zero
//! pages, compressed pages (really compressed, or compressed to the wrong size), round ends,
//! vCPU states, device sections, memory hashes (right or not), `Prepare`, `Commit`, `Done`,
//! and everything else the wire knows, plus raw garbage — each framed by the real `Encoder`
//! when it accepts it (by hand with a right CRC otherwise), fed to
//! `dirtylog_migrate::receive_on` over an in-memory [`MemConn`] into a `SoftVm` target.
//!
//! The target replays the same sequence through a model of the protocol (the rules
//! `recv.rs` documents: rounds, claims, switchover order, `Prepare` and its verify mode,
//! `Commit`, hashes) to know whether the stream is a complete valid migration and what the
//! guest memory must then be.
//!
//! Oracle: no panic, no hang (the input is finite and reads never block); `Ok` exactly when
//! the model says the migration is complete and valid — or committed and then cut off, which
//! the receiver must report with a warning — and then the target's memory is the model's, the
//! guest runs, and the reply channel carries `Prepared`, `Resumed` and (without a warning)
//! `Ack { code: 0 }`.

use std::collections::HashSet;

use arbitrary::{Arbitrary, Unstructured};
use dirtylog_migrate::digest::mem_digest;
use dirtylog_migrate::soft::SoftVm;
use dirtylog_migrate::wire::{self, Decoder, Message, PageRange, StreamHeader};
use dirtylog_migrate::{receive_on, DeviceSection, ReceiveConfig, TrackerKind};

use crate::frames;
use crate::mem_transport::MemConn;
use crate::packed::{self, Pattern};

/// The device the target knows when the input says so.
const DEVICE: &str = "dev0";
const DEVICE_VERSION: u32 = 1;
/// Bytes of a software vCPU state, and its magic (see `dirtylog_migrate::soft`).
const VCPU_BLOB: usize = 72;

/// The `Hello` frame after the header.
#[derive(Arbitrary, Debug)]
pub enum HelloSpec {
    /// Connection 0 of 1.
    Valid,
    /// Anything.
    Raw {
        /// This connection's index.
        connection: u32,
        /// Connections of the migration.
        connections: u32,
    },
    /// No Hello at all: the messages follow the header.
    Missing,
}

/// A page range: region index, first page and page count, each mapped into (or just past)
/// the region.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct Span {
    /// Region index (mod the number of regions).
    pub region: u8,
    /// First page (mod the region's pages + 2).
    pub first: u8,
    /// Pages (mod the region's pages + 1).
    pub npages: u8,
}

/// A vCPU state blob.
#[derive(Arbitrary, Debug)]
pub enum Blob {
    /// The idle state with this counter.
    Valid(u64),
    /// Anything (a software state that parses gets an idle workload, so that the resumed
    /// guest leaves memory alone).
    Raw(Vec<u8>),
}

/// One message of the stream (see the module docs).
#[allow(missing_docs)]
#[derive(Arbitrary, Debug)]
pub enum Msg {
    Pages {
        span: Span,
        seed: u8,
    },
    Compressed {
        span: Span,
        seed: u8,
        zstd: bool,
        /// Compress one page more than the range: must be refused.
        wrong_size: bool,
    },
    Zero(Span),
    /// `RoundEnd` for the round that ends now (`None`) or any round.
    RoundEnd(Option<u64>),
    Vcpu {
        id: u8,
        blob: Blob,
    },
    Device {
        /// The target's device (`true`) or another valid name.
        known: bool,
        version: u32,
        bytes: Vec<u8>,
    },
    /// A region's digest: the right one (`None`) or this one.
    MemHash {
        region: u8,
        hash: Option<u64>,
    },
    /// `Prepare` with verify mode `mode % 4` (3 is not a mode).
    Prepare(u32),
    Commit,
    Prepared,
    Done,
    Cancel,
    Error {
        code: u32,
        message: String,
    },
    Ack(u32),
    Resumed(u64),
    Hello {
        connection: u32,
        connections: u32,
    },
    /// Raw bytes in the stream.
    Garbage(Vec<u8>),
    /// A whole right switchover: every vCPU's state, the device (if `device`), then for
    /// verify mode `verify % 3` the hashes, `Prepare`, `Commit` and `Done` in their order.
    /// Makes complete migrations easy for the fuzzer to reach, and then to break.
    Switchover {
        verify: u8,
        device: bool,
    },
}

/// A whole session.
#[derive(Arbitrary, Debug)]
pub struct Input {
    /// The memory map (see `frames::small_header`).
    pub shape: [u8; 4],
    /// Short reads: at most `1 + 61 × chunk` bytes per read below 16 (more once the stream
    /// is long, see [`MemConn::new`]), whole reads above.
    pub chunk: u8,
    /// The target knows device `dev0`, version 1.
    pub device: bool,
    /// The `Hello` frame.
    pub hello: HelloSpec,
    /// The messages after it.
    pub msgs: Vec<Msg>,
}

/// Where the model of the receiver is.
#[derive(Debug, Clone, PartialEq)]
enum Verdict {
    /// Still reading.
    Open,
    /// The receiver must fail: why.
    Invalid(String),
    /// A complete valid migration; `true`: committed, then the stream was cut (the receiver
    /// keeps the guest, with a warning).
    Complete(bool),
    /// Committed, then bytes whose error may be a cut link (the guest stays, with a warning)
    /// or a bad frame (the migration fails): either is right.
    Either,
}

/// Where the model is in the switchover.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// Rounds, then vCPU states, device sections and (strict) hashes.
    Precopy,
    /// `Prepare` received (its verify mode), `Prepared` sent: only `Commit` may follow.
    Prepared(u32),
    /// `Commit` received: the guest runs; (background) hashes, then `Done`.
    Committed(u32),
}

/// The receiver as the protocol describes it, for one connection.
struct Model {
    header: StreamHeader,
    page: usize,
    /// The source's memory: what the target must hold at the end.
    memory: Vec<Vec<u8>>,
    verdict: Verdict,
    rounds: u64,
    claims: Vec<Vec<bool>>,
    switchover: bool,
    vcpus: Vec<bool>,
    devices: HashSet<String>,
    device_known: bool,
    hashing: bool,
    hashes: Vec<Option<u64>>,
    /// `mem_digest` of each region of `memory`, until pages land in it: a digest reads the
    /// whole region (and `available_parallelism`, a few files of /proc and /sys), so
    /// computing it for every `MemHash` and check was most of a run.
    digests: Vec<Option<u64>>,
    phase: Phase,
}

impl Model {
    fn new(header: &StreamHeader, device_known: bool) -> Self {
        let page = header.page_size() as usize;
        Model {
            page,
            memory: header
                .regions()
                .iter()
                .map(|r| vec![0; r.size as usize])
                .collect(),
            verdict: Verdict::Open,
            rounds: 0,
            claims: header
                .regions()
                .iter()
                .map(|r| vec![false; r.size as usize / page])
                .collect(),
            switchover: false,
            vcpus: vec![false; header.vcpu_count() as usize],
            devices: HashSet::new(),
            device_known,
            hashing: false,
            hashes: vec![None; header.regions().len()],
            digests: vec![None; header.regions().len()],
            phase: Phase::Precopy,
            header: header.clone(),
        }
    }

    fn open(&self) -> bool {
        self.verdict == Verdict::Open
    }

    fn fail(&mut self, why: impl Into<String>) {
        if self.open() {
            self.verdict = Verdict::Invalid(why.into());
        }
    }

    /// Anything but `Commit` after `Prepare`, or a message out of place after `Commit`.
    fn not_in_switchover(&mut self, what: &str) -> bool {
        match self.phase {
            Phase::Precopy => false,
            Phase::Prepared(_) => {
                self.fail(format!("{what} where Commit was due"));
                true
            }
            Phase::Committed(_) => {
                self.fail(format!("{what} after Commit"));
                true
            }
        }
    }

    /// The input ends here.
    fn end(&mut self) {
        if !self.open() {
            return;
        }
        match self.phase {
            Phase::Committed(_) => self.verdict = Verdict::Complete(true),
            _ => self.fail("the stream ends before Done"),
        }
    }

    /// Raw bytes where a frame should be.
    fn garbage(&mut self) {
        match self.phase {
            Phase::Committed(_) if self.open() => self.verdict = Verdict::Either,
            _ => self.fail("garbage"),
        }
    }

    /// Do the hashes received match the source's memory?
    fn hashes_match(&mut self) -> bool {
        for i in 0..self.hashes.len() {
            let digest = self.digest(i);
            if self.hashes[i] != Some(digest) {
                self.fail(format!("hash of region {i} missing or wrong"));
                return false;
            }
        }
        true
    }

    fn range(&self, span: Span) -> PageRange {
        let regions = self.header.regions();
        let r = regions[usize::from(span.region) % regions.len()];
        let pages = r.size / self.page as u64;
        PageRange {
            slot: r.slot,
            first_page: u64::from(span.first) % (pages + 2),
            npages: u64::from(span.npages) % (pages + 1),
        }
    }

    fn digest(&mut self, index: usize) -> u64 {
        *self.digests[index].get_or_insert_with(|| mem_digest(&self.memory[index], self.page))
    }

    /// The receiver's view of pages landing (`data: None` for zero pages).
    fn pages(&mut self, range: PageRange, data: Option<&[u8]>) {
        if self.not_in_switchover("pages") {
            return;
        }
        let Ok(index) = self.header.check_range(range) else {
            return self.fail("range outside the map");
        };
        if self.switchover {
            return self.fail("pages after the switchover started");
        }
        let (first, n) = (range.first_page as usize, range.npages as usize);
        let claims = &mut self.claims[index][first..first + n];
        if claims.iter().any(|&c| c) {
            return self.fail("pages claimed twice in one round");
        }
        claims.fill(true);
        self.digests[index] = None;
        let bytes = &mut self.memory[index][first * self.page..(first + n) * self.page];
        match data {
            Some(d) => bytes.copy_from_slice(d),
            None => bytes.fill(0),
        }
    }

    fn round_end(&mut self, round: u64) {
        if self.not_in_switchover("RoundEnd") {
            return;
        }
        if self.switchover || round != self.rounds {
            return self.fail("RoundEnd out of place");
        }
        self.rounds += 1;
        for c in &mut self.claims {
            c.fill(false);
        }
    }

    fn vcpu(&mut self, id: u32, valid_blob: bool) {
        if id >= self.header.vcpu_count() {
            return self.fail("vCPU id past the count");
        }
        if self.not_in_switchover("vCPU state") {
            return;
        }
        if self.rounds == 0 {
            return self.fail("vCPU state out of place");
        }
        self.switchover = true;
        if std::mem::replace(&mut self.vcpus[id as usize], true) {
            return self.fail("vCPU state twice");
        }
        if !self.devices.is_empty() || self.hashing {
            return self.fail("vCPU state after devices or hashes");
        }
        if !valid_blob {
            self.fail("vCPU state the target refuses");
        }
    }

    fn device(&mut self, name: &str, version: u32) {
        if self.not_in_switchover("device section") {
            return;
        }
        if self.vcpus.iter().any(|&v| !v) || self.hashing {
            return self.fail("device section out of place");
        }
        self.switchover = true;
        if !self.devices.insert(name.to_string()) {
            return self.fail("device twice");
        }
        if !(self.device_known && name == DEVICE && version == DEVICE_VERSION) {
            self.fail("a device the target does not know");
        }
    }

    fn mem_hash(&mut self, slot: u32, hash: u64) {
        let Ok((index, _)) = self.header.region(slot) else {
            return self.fail("hash of an unknown slot");
        };
        match self.phase {
            Phase::Committed(wire::VERIFY_BACKGROUND) => {}
            Phase::Committed(_) | Phase::Prepared(_) => return self.fail("hash out of place"),
            Phase::Precopy => {
                if self.rounds == 0 {
                    return self.fail("hash before any round");
                }
                self.switchover = true;
                self.hashing = true;
            }
        }
        if self.hashes[index].replace(hash).is_some() {
            self.fail("hash twice");
        }
    }

    fn prepare(&mut self, verify: u32) {
        if verify > wire::VERIFY_STRICT {
            return self.fail("Prepare mode");
        }
        if self.not_in_switchover("Prepare") {
            return;
        }
        if self.rounds == 0 || (self.hashing && verify != wire::VERIFY_STRICT) {
            return self.fail("Prepare out of place");
        }
        if self.vcpus.iter().any(|&v| !v) {
            return self.fail("Prepare without every vCPU state");
        }
        if verify == wire::VERIFY_STRICT && !self.hashes_match() {
            return;
        }
        self.phase = Phase::Prepared(verify);
    }

    fn commit(&mut self) {
        match self.phase {
            Phase::Prepared(verify) => self.phase = Phase::Committed(verify),
            _ => self.fail("Commit out of place"),
        }
    }

    fn done(&mut self) {
        match self.phase {
            Phase::Committed(verify) => {
                if verify == wire::VERIFY_BACKGROUND && !self.hashes_match() {
                    return;
                }
                if self.open() {
                    self.verdict = Verdict::Complete(false);
                }
            }
            Phase::Prepared(_) => self.fail("Done where Commit was due"),
            Phase::Precopy => self.fail("Done without Prepare"),
        }
    }
}

/// Pages made from `seed`, `len` bytes: byte `i` is `seed + i / 64`, except every fourth run
/// of 256 bytes, which is zero — a pattern of period 16 KiB, made once per seed and thread
/// and copied (made for every message, even 64 bytes at a time, it was a tenth of a run).
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    const PERIOD: usize = 256 * 64;
    thread_local! {
        static PERIODS: std::cell::RefCell<Vec<Option<Box<[u8]>>>> =
            std::cell::RefCell::new(vec![None; 256]);
    }
    PERIODS.with(|p| {
        let mut periods = p.borrow_mut();
        let period = periods[usize::from(seed)].get_or_insert_with(|| {
            let mut out = vec![0u8; PERIOD];
            for (run, bytes) in out.chunks_mut(64).enumerate() {
                if (run / 4) % 4 != 3 {
                    bytes.fill(seed.wrapping_add(run as u8));
                }
            }
            out.into_boxed_slice()
        });
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            let n = (len - out.len()).min(PERIOD);
            out.extend_from_slice(&period[..n]);
        }
        out
    })
}

/// Run one input.
pub fn run(data: &[u8]) {
    if let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) {
        run_input(&input);
    }
}

/// Run one session; returns whether the receiver accepted it (the oracle has checked that
/// it had to).
pub fn run_input(input: &Input) -> bool {
    let header = frames::small_header(input.shape);
    let mut stream = frames::stream_start(&header);
    let mut model = Model::new(&header, input.device);
    let session = 0x5eed;
    match input.hello {
        HelloSpec::Valid => {
            frames::push(
                &mut stream,
                &header,
                Message::Hello {
                    connection: 0,
                    connections: 1,
                    session,
                },
            );
        }
        HelloSpec::Raw {
            connection,
            connections,
        } => {
            frames::push(
                &mut stream,
                &header,
                Message::Hello {
                    connection,
                    connections,
                    session,
                },
            );
            if (connection, connections) != (0, 1) {
                model.fail("not connection 0 of 1");
            }
        }
        HelloSpec::Missing => model.fail("no Hello"),
    }
    for msg in &input.msgs {
        emit(&mut stream, &mut model, msg);
    }
    model.end();
    check(&header, stream, &model, input)
}

fn emit(stream: &mut Vec<u8>, model: &mut Model, msg: &Msg) {
    let header = model.header.clone();
    let page = model.page;
    // Once the model has decided, the receiver has stopped reading: the rest is only bytes.
    let open = model.open();
    let push = |stream: &mut Vec<u8>, m: Message<'_>| {
        frames::push(stream, &header, m);
    };
    match msg {
        Msg::Pages { span, seed } => {
            let range = model.range(*span);
            let data = pattern(*seed, range.npages as usize * page);
            push(stream, Message::Pages { range, data: &data });
            if open {
                model.pages(range, Some(&data));
            }
        }
        Msg::Compressed {
            span,
            seed,
            zstd,
            wrong_size,
        } => {
            let range = model.range(*span);
            let len = range.npages as usize * page;
            let data = pattern(*seed, len);
            // Too long by a page when `wrong_size`.
            let raw_len = if *wrong_size { len + page } else { len };
            let packed = packed::compressed(Pattern::Session, *zstd, *seed, raw_len, || {
                pattern(*seed, raw_len)
            });
            match packed {
                Some(packed) => {
                    frames::push_compressed(stream, &header, range, packed::codec(*zstd), &packed);
                }
                // Not smaller, or refused: send the pages as they are, as the sender does.
                _ if !*wrong_size => push(stream, Message::Pages { range, data: &data }),
                _ => return,
            }
            if open {
                if *wrong_size {
                    model.fail("compressed data of the wrong size");
                } else {
                    model.pages(range, Some(&data));
                }
            }
        }
        Msg::Zero(span) => {
            let range = model.range(*span);
            push(stream, Message::ZeroPages(range));
            if open {
                model.pages(range, None);
            }
        }
        Msg::RoundEnd(round) => {
            let round = round.unwrap_or(model.rounds);
            push(
                stream,
                Message::RoundEnd {
                    round,
                    dirty_pages: 0,
                },
            );
            if open {
                model.round_end(round);
            }
        }
        Msg::Vcpu { id, blob } => {
            let id = u32::from(*id) % (header.vcpu_count() + 1);
            let (bytes, valid) = match blob {
                Blob::Valid(counter) => {
                    let mut b = SoftVm::idle_vcpu_state();
                    b[8..16].copy_from_slice(&counter.to_le_bytes());
                    (b, true)
                }
                Blob::Raw(raw) => {
                    let mut b = raw.clone();
                    let idle = SoftVm::idle_vcpu_state();
                    let valid = b.len() == VCPU_BLOB && b[..8] == idle[..8];
                    if valid {
                        // Keep the guest idle: the workload words of the idle state.
                        b[32..].copy_from_slice(&idle[32..]);
                    }
                    (b, valid)
                }
            };
            push(
                stream,
                Message::VcpuState {
                    vcpu_id: id,
                    blob: &bytes,
                },
            );
            if open {
                if bytes.len() > wire::MAX_VCPU_BLOB {
                    model.fail("vCPU blob too large");
                }
                model.vcpu(id, valid);
            }
        }
        Msg::Device {
            known,
            version,
            bytes,
        } => {
            let name = if *known { DEVICE } else { "other:dev-1" };
            push(
                stream,
                Message::Device {
                    name,
                    version: *version,
                    bytes,
                },
            );
            if open {
                model.device(name, *version);
            }
        }
        Msg::MemHash { region, hash } => {
            let regions = header.regions();
            let index = usize::from(*region) % (regions.len() + 1);
            // One past the last region: a slot the map does not have.
            let slot = regions.get(index).map_or(u32::MAX, |r| r.slot);
            let hash = match (hash, regions.get(index)) {
                (Some(h), _) => *h,
                (None, Some(_)) => model.digest(index),
                (None, None) => 0,
            };
            push(stream, Message::MemHash { slot, hash });
            if open {
                model.mem_hash(slot, hash);
            }
        }
        Msg::Prepare(verify) => {
            let verify = verify % 4;
            push(stream, Message::Prepare { verify });
            if open {
                model.prepare(verify);
            }
        }
        Msg::Commit => {
            push(stream, Message::Commit);
            if open {
                model.commit();
            }
        }
        Msg::Prepared => {
            push(stream, Message::Prepared);
            model.fail("Prepared from the source");
        }
        Msg::Done => {
            push(stream, Message::Done);
            if open {
                model.done();
            }
        }
        Msg::Cancel => {
            push(stream, Message::Cancel);
            model.fail("Cancel");
        }
        Msg::Error { code, message } => {
            let end = (0..=message.len().min(wire::MAX_ERROR_MESSAGE))
                .rev()
                .find(|&i| message.is_char_boundary(i))
                .unwrap_or(0);
            push(
                stream,
                Message::Error {
                    code: *code,
                    message: &message[..end],
                },
            );
            model.fail("Error from the source");
        }
        Msg::Ack(code) => {
            push(stream, Message::Ack { code: *code });
            model.fail("Ack from the source");
        }
        Msg::Resumed(us) => {
            push(stream, Message::Resumed { resume_us: *us });
            model.fail("Resumed from the source");
        }
        Msg::Hello {
            connection,
            connections,
        } => {
            push(
                stream,
                Message::Hello {
                    connection: *connection,
                    connections: *connections,
                    session: 1,
                },
            );
            model.fail("a second Hello");
        }
        Msg::Switchover { verify, device } => {
            for msg in switchover(&header, *verify, *device) {
                emit(stream, model, &msg);
            }
        }
        Msg::Garbage(bytes) => {
            if !bytes.is_empty() {
                stream.extend_from_slice(bytes);
                model.garbage();
            }
        }
    }
}

/// The messages of a right switchover (see [`Msg::Switchover`]).
fn switchover(header: &StreamHeader, verify: u8, device: bool) -> Vec<Msg> {
    let mut msgs: Vec<Msg> = (0..header.vcpu_count())
        .map(|id| Msg::Vcpu {
            id: id as u8,
            blob: Blob::Valid(u64::from(id)),
        })
        .collect();
    if device {
        msgs.push(Msg::Device {
            known: true,
            version: DEVICE_VERSION,
            bytes: vec![0xd0],
        });
    }
    let hashes = || {
        (0..header.regions().len()).map(|region| Msg::MemHash {
            region: region as u8,
            hash: None,
        })
    };
    let verify = u32::from(verify % 3);
    if verify == wire::VERIFY_STRICT {
        msgs.extend(hashes());
    }
    msgs.extend([Msg::Prepare(verify), Msg::Commit]);
    if verify == wire::VERIFY_BACKGROUND {
        msgs.extend(hashes());
    }
    msgs.push(Msg::Done);
    msgs
}

fn check(header: &StreamHeader, stream: Vec<u8>, model: &Model, input: &Input) -> bool {
    let chunk = if input.chunk < 16 {
        1 + usize::from(input.chunk) * 61
    } else {
        usize::MAX
    };
    let conn = MemConn::new(stream, chunk);
    let config = ReceiveConfig {
        io_timeout: std::time::Duration::from_secs(1),
        connections_timeout: std::time::Duration::from_millis(10),
        ..ReceiveConfig::default()
    };
    let device = input.device;
    let result = receive_on(conn.clone(), Vec::new(), &config, |h| {
        let vm = SoftVm::target(h, TrackerKind::DirtyLog)?;
        if device {
            vm.add_device(DeviceSection::new(DEVICE, DEVICE_VERSION, Vec::new())?);
        }
        Ok(vm)
    });
    if std::env::var_os("DIRTYLOG_FUZZ_VERBOSE").is_some() {
        eprintln!(
            "model: {:?}; receiver: {:?}",
            model.verdict,
            result.as_ref().map(|_| ()).map_err(|e| e.to_string())
        );
    }
    let accepted = match (&result, &model.verdict) {
        (Ok((_, report)), Verdict::Complete(cut)) => {
            assert_eq!(
                report.warning.is_some(),
                *cut,
                "warning {:?} for a stream {}",
                report.warning,
                if *cut { "cut after Commit" } else { "complete" }
            );
            true
        }
        (Ok(_), Verdict::Either) => true,
        (Err(_), Verdict::Invalid(_) | Verdict::Either) => false,
        (Ok(_), why) => panic!("receive_on accepted a stream the model refuses: {why:?}"),
        (Err(e), why) => panic!("receive_on refused a valid migration ({why:?}): {e}"),
    };
    if let Ok((target, report)) = &result {
        for (i, want) in model.memory.iter().enumerate() {
            assert!(
                target.snapshot(i) == *want,
                "region {i} differs from the source's"
            );
        }
        assert!(!target.is_paused(), "the guest does not run");
        assert_eq!(target.resume_count(), 1);
        let output = conn.output();
        let mut decoder = Decoder::back_channel(&output[..], header.clone());
        let mut replies = Vec::new();
        while let Ok(Some(m)) = decoder.next(&mut ()) {
            replies.push(format!("{m:?}"));
        }
        let mut want = vec!["Prepared".to_string()];
        if replies.len() >= 2 {
            want.push(replies[1].clone()); // Resumed { resume_us: .. }
        }
        if report.warning.is_none() {
            want.push("Ack { code: 0 }".into());
        }
        assert_eq!(replies, want, "the replies");
        assert!(replies[1].starts_with("Resumed"), "{replies:?}");
    }
    accepted
}

#[cfg(test)]
mod tests {
    /// The copied 16 KiB period is the pattern its definition gives, byte for byte.
    #[test]
    fn pattern_is_its_definition() {
        for seed in [0u8, 1, 0x7f, 0xff] {
            for len in [0, 1, 64, 4096, 16384, 16385, 8 * 8192 + 5] {
                let want: Vec<u8> = (0..len)
                    .map(|i| {
                        if (i / 256) % 4 == 3 {
                            0
                        } else {
                            seed.wrapping_add((i / 64) as u8)
                        }
                    })
                    .collect();
                assert!(super::pattern(seed, len) == want, "seed {seed} len {len}");
            }
        }
    }
}
