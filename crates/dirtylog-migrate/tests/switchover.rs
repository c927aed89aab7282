//! The switchover's fault matrix: the link cut, or one message swallowed, at every step of
//! the hand-over (`Prepare`, `Prepared`, `Commit`, `Resumed`, the digests or `Done`, `Ack`), in
//! every verify mode. Whatever happens, the guest never runs on both sides; it runs on
//! neither only when the source reports the outcome as unknown (and keeps its copy paused for
//! the operator).

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use dirtylog_migrate::{send, MigrateError, ReceiveConfig, SendConfig, TrackerKind, Verify};

/// Frame types on the wire (see the `wire` module's table).
const MEM_HASH: u8 = 6;
const DONE: u8 = 7;
const ACK: u8 = 9;
const PREPARE: u8 = 13;
const RESUMED: u8 = 14;
const PREPARED: u8 = 16;
const COMMIT: u8 = 17;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    /// Source to destination.
    Forward,
    /// The destination's replies.
    Back,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum How {
    /// Close the connection, both ways, instead of passing the frame.
    Cut,
    /// Swallow the frame and everything after it in that direction; the connection stays
    /// open, so each side finds out by its timeouts.
    Stall,
}

/// A one-connection proxy that lets frames through until the first frame of type `kind`
/// going `dir`, which it cuts or swallows.
fn frame_proxy(upstream: SocketAddr, dir: Dir, kind: u8, how: How) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let Ok((client, _)) = listener.accept() else {
            return;
        };
        let Ok(server) = TcpStream::connect(upstream) else {
            return;
        };
        let all = Arc::new(Mutex::new(vec![
            client.try_clone().unwrap(),
            server.try_clone().unwrap(),
        ]));
        let pump = |from: TcpStream, to: TcpStream, this: Dir, all: Arc<Mutex<Vec<TcpStream>>>| {
            std::thread::spawn(move || {
                // The forward stream starts with the 12-byte preamble; frames follow on both.
                let skip = if this == Dir::Forward { 12 } else { 0 };
                forward_frames(from, to, skip, (this == dir).then_some((kind, how)), &all);
            })
        };
        let f = pump(
            client.try_clone().unwrap(),
            server.try_clone().unwrap(),
            Dir::Forward,
            all.clone(),
        );
        let b = pump(server, client, Dir::Back, all);
        let _ = f.join();
        let _ = b.join();
    });
    addr
}

/// Copy `from` to `to` frame by frame (after `skip` raw bytes); apply the fault at the first
/// frame of the given type.
fn forward_frames(
    mut from: TcpStream,
    mut to: TcpStream,
    skip: usize,
    fault: Option<(u8, How)>,
    all: &Mutex<Vec<TcpStream>>,
) {
    let mut pending = Vec::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut skip = skip;
    let mut stalled = false;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if stalled {
            continue;
        }
        pending.extend_from_slice(&buf[..n]);
        if skip > 0 {
            let k = skip.min(pending.len());
            if to.write_all(&pending[..k]).is_err() {
                break;
            }
            pending.drain(..k);
            skip -= k;
        }
        while pending.len() >= 6 {
            let len = u32::from_le_bytes(pending[2..6].try_into().unwrap()) as usize;
            let total = 6 + len + 4;
            if pending.len() < total {
                break;
            }
            match fault {
                Some((kind, how)) if pending[0] == kind => match how {
                    How::Cut => {
                        for s in all.lock().unwrap().iter() {
                            let _ = s.shutdown(Shutdown::Both);
                        }
                        return;
                    }
                    How::Stall => {
                        stalled = true;
                        pending.clear();
                        break;
                    }
                },
                _ => {}
            }
            if to.write_all(&pending[..total]).is_err() {
                return;
            }
            pending.drain(..total);
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// What each side ended with.
struct Outcome {
    sent: Result<dirtylog_migrate::SendReport, MigrateError>,
    received: Received,
    source_runs: bool,
    destination_runs: bool,
}

fn run(verify: Verify, dir: Dir, kind: u8, how: How) -> Outcome {
    let src = soft(
        layout(2, 1),
        1,
        TrackerKind::ClearLog,
        workload(128, Some(2000), true),
    );
    let (addr, receiver, _, watch) = spawn_watched_receiver(ReceiveConfig {
        io_timeout: Duration::from_secs(2),
        ..recv_config()
    });
    let via = frame_proxy(addr, dir, kind, how);
    let config = SendConfig {
        downtime_limit: Duration::from_secs(1),
        io_timeout: Duration::from_secs(2),
        ack_timeout: Duration::from_secs(2),
        verify,
        ..send_config(1)
    };
    let sent = send(&src, via, &config, &mut |_| {});
    let received = receiver.join().unwrap();
    let destination_runs = match &received {
        Ok((vm, _)) => vm.resume_count() > 0,
        Err(_) => watch.lock().unwrap().as_ref().is_some_and(|w| w.running()),
    };
    let source_runs = !src.is_paused();
    if source_runs {
        assert_runs("source", || source_progress(&src));
    }
    Outcome {
        sent,
        received,
        source_runs,
        destination_runs,
    }
}

/// The invariant, and what each step's fault must lead to.
fn check(verify: Verify, dir: Dir, kind: u8, how: How) {
    let what = format!("{verify} {how:?} at {dir:?} frame {kind}");
    let o = run(verify, dir, kind, how);
    let serr = o.sent.as_ref().err().map(ToString::to_string);
    let rerr = o.received.as_ref().err().map(ToString::to_string);
    let rwarn = o
        .received
        .as_ref()
        .ok()
        .and_then(|(_, r)| r.warning.clone());
    eprintln!(
        "{what}: source runs {} ({serr:?}); destination runs {} ({rerr:?}, warning {rwarn:?})",
        o.source_runs, o.destination_runs
    );
    assert!(
        !(o.source_runs && o.destination_runs),
        "{what}: the guest runs on both sides"
    );
    let unknown = matches!(o.sent, Err(MigrateError::OutcomeUnknown(_)));
    if !o.source_runs && !o.destination_runs {
        assert!(
            unknown,
            "{what}: the guest runs nowhere, unreported: {serr:?}"
        );
        assert!(
            matches!(o.received, Err(MigrateError::Uncommitted(_))),
            "{what}: the destination does not say the source may hold the guest: {rerr:?}"
        );
    }
    let committed = matches!((dir, kind), (Dir::Forward, COMMIT))
        || matches!((dir, kind), (Dir::Back, RESUMED | ACK))
        || matches!((dir, kind), (Dir::Forward, MEM_HASH | DONE));
    if committed {
        assert!(
            unknown,
            "{what}: after Commit the source must not guess: {serr:?}"
        );
        assert!(!o.source_runs, "{what}: the committed source resumed");
    } else {
        assert!(
            o.source_runs,
            "{what}: before Commit the source must run on"
        );
        assert!(!o.destination_runs, "{what}: ran before Commit");
    }
    if matches!(
        (dir, kind),
        (Dir::Back, RESUMED | ACK) | (Dir::Forward, MEM_HASH | DONE)
    ) {
        assert!(
            o.destination_runs,
            "{what}: the committed destination stopped"
        );
    }
}

/// The last frame the source sends after `Resumed`: the first digest in background mode,
/// `Done` otherwise.
fn after_resumed(verify: Verify) -> u8 {
    if verify == Verify::Background {
        MEM_HASH
    } else {
        DONE
    }
}

#[test]
fn a_cut_link_at_every_step_never_leaves_two_running_guests() {
    for verify in [Verify::Strict, Verify::Background, Verify::Off] {
        for (dir, kind) in [
            (Dir::Forward, PREPARE),
            (Dir::Back, PREPARED),
            (Dir::Forward, COMMIT),
            (Dir::Back, RESUMED),
            (Dir::Forward, after_resumed(verify)),
            (Dir::Back, ACK),
        ] {
            check(verify, dir, kind, How::Cut);
        }
    }
}

#[test]
fn a_lost_message_at_every_step_never_leaves_two_running_guests() {
    let verify = Verify::Background;
    for (dir, kind) in [
        (Dir::Forward, PREPARE),
        (Dir::Back, PREPARED),
        (Dir::Forward, COMMIT),
        (Dir::Back, RESUMED),
        (Dir::Forward, MEM_HASH),
        (Dir::Back, ACK),
    ] {
        check(verify, dir, kind, How::Stall);
    }
}
