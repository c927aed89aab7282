//! The errors of a migration, one variant per way it can fail, each with a message that says
//! what happened and on which side.

use std::io;
use std::time::Duration;

use crate::wire::WireError;

/// An error from the VM behind [`MigrationSource`](crate::MigrationSource) or
/// [`MigrationTarget`](crate::MigrationTarget): whatever the implementation reports. The same
/// type as the core's [`TrackerError`](dirtylog::TrackerError), so a tracker's errors pass
/// through unchanged.
pub type VmError = dirtylog::TrackerError;

/// Why a migration failed. On the source, any of these means the guest was resumed (and the
/// resume's own failure, if any, is in [`MigrateError::ResumeFailed`]); on the destination, it
/// means the guest was never run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrateError {
    /// The configuration is unusable.
    #[error("invalid migration configuration: {0}")]
    Config(String),
    /// Setting up the connections failed.
    #[error("{what}: {source}")]
    Connect {
        /// What was being done.
        what: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The stream on one connection is broken, malformed or failed validation.
    #[error("connection {connection}: {source}")]
    Wire {
        /// The connection's index.
        connection: usize,
        /// What was wrong.
        #[source]
        source: WireError,
    },
    /// The peer broke the protocol with well-formed frames in the wrong place.
    #[error("connection {connection}: protocol violation: {message}")]
    Protocol {
        /// The connection's index.
        connection: usize,
        /// What was wrong.
        message: String,
    },
    /// The VM failed an operation.
    #[error("VM {op} failed: {source}")]
    Vm {
        /// The operation: `harvest`, `pause`, ...
        op: &'static str,
        /// The VM's error.
        #[source]
        source: VmError,
    },
    /// The target could not restore a device section: it does not know the device or the
    /// version, or the state is bad.
    #[error("device {name:?} (state version {version}) could not be restored: {source}")]
    Device {
        /// The device's name.
        name: String,
        /// The state's version.
        version: u32,
        /// The target's error.
        #[source]
        source: VmError,
    },
    /// The other side closed a connection before the migration was over.
    #[error("connection {connection}: the {side} closed the connection {when}")]
    Closed {
        /// The connection's index.
        connection: usize,
        /// `source` or `destination`.
        side: &'static str,
        /// When: `before acknowledging`, ...
        when: &'static str,
    },
    /// The other side reported an error and gave up. Its message is the peer's text: shown
    /// with every control character escaped (`\n`, `\u{1b}`, ...), so it cannot forge lines
    /// or drive a terminal.
    #[error(
        "the {side} reported an error (code {code}): {}",
        escape_controls(message)
    )]
    Remote {
        /// `source` or `destination`.
        side: &'static str,
        /// Its error code.
        code: u32,
        /// Its message.
        message: String,
    },
    /// The source had committed (sent `Commit`: the destination may run the guest) when the
    /// migration failed without the destination saying it stopped: whether the guest runs
    /// there is unknown. The source's guest stays paused; resume it only once you know the
    /// destination does not run it ([`Vcpus::resume`](crate::Vcpus::resume)).
    #[error(
        "outcome unknown: {0}; the source had committed, so the destination may be running the \
         guest — the source's copy stays paused: resume it only if the destination is not \
         running it"
    )]
    OutcomeUnknown(Box<MigrateError>),
    /// The destination was ready but the link to the source failed before the source's
    /// `Commit`: the guest never ran here, and the source, which may have committed, keeps
    /// its copy paused.
    #[error(
        "the link to the source failed after this side was ready and before the source \
         committed{}: the guest never ran here; the source keeps its copy paused and may \
         report the outcome as unknown — resume it there",
        .0.as_ref().map(|e| format!(" ({e})")).unwrap_or_default()
    )]
    Uncommitted(Option<Box<MigrateError>>),
    /// The source cancelled the migration.
    #[error("the source cancelled the migration")]
    Cancelled,
    /// Pre-copy did not converge before the round limit or the timeout, and the policy is to
    /// cancel.
    #[error(
        "migration did not converge after {rounds} rounds in {elapsed_ms} ms ({why}): last \
         expected downtime {expected_downtime_ms} ms (limit {limit_ms} ms) at {dirty_rate} \
         dirty pages/s and {mbps:.0} Mbit/s; cancelled (raise the downtime limit or the timeout, \
         enable auto-converge, or choose the switchover policy)"
    )]
    NotConverged {
        /// Rounds sent, the bulk pass included.
        rounds: u64,
        /// Milliseconds since the start.
        elapsed_ms: u64,
        /// `timeout` or `round limit`.
        why: &'static str,
        /// The last estimate of the downtime.
        expected_downtime_ms: u64,
        /// The downtime limit.
        limit_ms: u64,
        /// The last measured dirty rate.
        dirty_rate: u64,
        /// The last measured bandwidth.
        mbps: f64,
    },
    /// The content hash of a region differs between the source and the destination.
    #[error(
        "memory hash mismatch in slot {slot}: the source sent {expected:#018x}, the destination \
         has {actual:#018x}"
    )]
    HashMismatch {
        /// The region's slot.
        slot: u32,
        /// The source's hash.
        expected: u64,
        /// The destination's hash.
        actual: u64,
    },
    /// Something took too long.
    #[error("timed out after {0:?} {1}")]
    Timeout(Duration, &'static str),
    /// A local I/O error outside the framed streams.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The migration failed, and resuming the source guest afterwards failed too.
    #[error("{error}; resuming the source guest failed as well: {resume}")]
    ResumeFailed {
        /// Why the migration failed.
        error: Box<MigrateError>,
        /// Why the resume failed.
        resume: VmError,
    },
}

impl MigrateError {
    pub(crate) fn vm(op: &'static str) -> impl FnOnce(VmError) -> MigrateError {
        move |source| MigrateError::Vm { op, source }
    }

    pub(crate) fn wire(connection: usize) -> impl FnOnce(WireError) -> MigrateError {
        move |source| MigrateError::Wire { connection, source }
    }

    pub(crate) fn protocol(connection: usize, message: impl Into<String>) -> MigrateError {
        MigrateError::Protocol {
            connection,
            message: message.into(),
        }
    }

    /// Is this a broken connection (reset, closed, timed out) rather than a real cause? Used to
    /// prefer the first real cause when several threads fail together.
    pub(crate) fn is_secondary(&self) -> bool {
        match self {
            MigrateError::Wire { source, .. } => {
                matches!(source, WireError::Io(_) | WireError::Truncated { .. })
            }
            MigrateError::Closed { .. } => true,
            _ => false,
        }
    }
}

/// The error codes of `Error` frames.
pub mod code {
    /// The source failed (VM error, I/O, configuration) and gives up.
    pub const SOURCE_FAILED: u32 = 1;
    /// The destination rejected the stream (malformed, out of range, protocol violation).
    pub const BAD_STREAM: u32 = 2;
    /// The destination's memory hash differs from the source's.
    pub const HASH_MISMATCH: u32 = 3;
    /// The destination VM failed (creation, vCPU state, resume).
    pub const TARGET_FAILED: u32 = 4;
}

/// `s` with every control character (newlines and terminal escapes among them) written as
/// its Rust escape, the rest as it is: for text a peer sent, before it reaches a terminal.
pub fn escape_controls(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peers_message_cannot_forge_lines_or_drive_the_terminal() {
        let e = MigrateError::Remote {
            side: "source",
            code: 1,
            message: "bad \"thing\"\nmigration completed\x1b[2J".into(),
        };
        assert_eq!(
            e.to_string(),
            "the source reported an error (code 1): bad \"thing\"\\nmigration completed\\u{1b}[2J"
        );
    }

    #[test]
    fn a_socket_timeout_says_so() {
        for kind in [std::io::ErrorKind::WouldBlock, std::io::ErrorKind::TimedOut] {
            let e = crate::wire::WireError::Io(std::io::Error::from(kind));
            assert!(e.to_string().contains("timed out"), "{e}");
            assert!(!e.to_string().contains("os error"), "{e}");
        }
    }
}
