//! The migration protocol: who sends what, and when. The bytes of each frame are in
//! [`wire`](crate::wire); the engines are [`send`](mod@crate::send) and [`recv`](crate::recv).
//!
//! A migration runs over `N` connections (`1..=`[`MAX_CONNECTIONS`](crate::wire::MAX_CONNECTIONS),
//! TCP or Unix sockets). Each carries one stream from the source to the destination;
//! connection 0 also carries the control frames of the switchover, and, in the other
//! direction, the destination's single reply.
//!
//! ```text
//!   source (sender)                                           destination (receiver)
//!   ───────────────                                           ──────────────────────
//! setup, on every connection i of N:
//!   preamble  "DIRTYLG\0" version=4  ───────────────────────▶  refuse other magic/version
//!   header    page size, vCPUs, memory map  ─────────────────▶  validate; connection 0's
//!                                                              header builds the target
//!   Hello     i, N, session  ────────────────────────────────▶  same header and session on
//!                                                              all N, each i once
//!   (start dirty tracking)
//!
//! bulk pass, round 0 (guest running), spread over all connections:
//!   Pages     slot, first page, n, n × page bytes  ──────────▶  claim pages, write them
//!   ZeroPages slot, first page, n  ──────────────────────────▶  (zero already)
//!   RoundEnd  0  (on every connection)  ─────────────────────▶  fence: all N reach it before
//!                                                              any frame of round 1 applies
//! rounds 1, 2, … (guest running): harvest the dirty log (∪ the VMM's bitmap), then
//!   Pages / ZeroPages of the dirty pages  ───────────────────▶  claim, overwrite / zero
//!   RoundEnd  r  (on every connection)  ─────────────────────▶  fence
//!   … until the expected downtime fits the limit (or the round limit or timeout says so)
//!
//!   (once, after round 0: pause, save every state, resume — timed, for the estimate)
//!
//! switchover (guest paused on the source):
//!   Pages / ZeroPages of the last dirty pages; RoundEnd  ────▶  fence
//!   on connection 0 only:
//!   VcpuState  id, blob    (one per vCPU)  ──────────────────▶  restore_state(id, blob)
//!   Device     name, version, bytes  (zero or more)  ────────▶  validate, no duplicates;
//!                                                              restore_device(name, …)
//!   MemHash    slot, mem_digest(region)  (strict only: the digest of the paused memory
//!              ran beside the final round)  ─────────────▶  remember
//!   Prepare    verify = strict | background | none; Done on the other connections
//!                                                       ──▶  all N done after the same
//!                                                              rounds; every vCPU present;
//!                                                              strict: each hash equals the
//!                                                              digest of the page hashes
//!                                                              recorded as frames landed
//!                                           ◀── Prepared  (ready; the guest does not run)
//!   ── the source commits: from here on it never resumes the guest on its own ──
//!   Commit  ─────────────────────────────────────────────────▶  resume the guest
//!                                           ◀── Resumed  resume_us      (downtime ends here)
//!   background: digest the paused memory (every byte), then
//!   MemHash    slot, mem_digest(region)  ────────────────────▶  compare with the recorded
//!                                                              page hashes (the memory as it
//!                                                              arrived, not as the running
//!                                                              guest changed it since)
//!   Done  ───────────────────────────────────────────────────▶
//!                                           ◀── Ack 0  (the memory is proven equal)
//!                                               or Error: the destination stopped its guest
//!                                               first; the source resumes its own
//!
//!   the source stays paused after Ack 0: the guest runs at the destination
//! ```
//!
//! **Failure**: the side that gives up says why — the source with `Error` (or `Cancel` when
//! pre-copy does not converge) on every connection, the destination with `Error` on
//! connection 0's return direction — and closes its connections. Before `Commit` the source
//! then un-throttles and resumes its guest, and the destination drops its target, which never
//! ran; after it, see below (a failed background check stops the destination's guest before
//! its `Error` goes out, and the source resumes on that `Error`). Among the causes: a malformed or out-of-range frame, a CRC or
//! hash mismatch, a target that cannot restore a vCPU state or does not know a device
//! section's name or version.
//!
//! **Exactly one running guest.** The destination runs the guest only on `Commit`; the source
//! sends `Commit` only after `Prepared`, and from then on resumes its guest only on the
//! destination's `Error` (sent with its guest stopped). So:
//! - a failure before `Commit` was sent: the source resumes; the destination, which never ran
//!   the guest, drops it;
//! - the link lost after `Commit` was sent: the source keeps its copy paused and returns
//!   [`MigrateError::OutcomeUnknown`](crate::MigrateError::OutcomeUnknown); the destination
//!   runs the guest if `Commit` arrived (and says, in [`ReceiveReport::warning`](
//!   crate::ReceiveReport::warning), that the end was not confirmed), or else returns
//!   [`MigrateError::Uncommitted`](crate::MigrateError::Uncommitted) without having run it.
//!   Either the guest runs at the destination, or it runs nowhere and both sides said why;
//!   never on both. `dirtylog migrate recover` then resumes the source's copy or discards it.
//!
//! QEMU compared: QEMU's destination starts the guest when the stream ends, and the source
//! moves to `postmigrate` without waiting for a word back unless the return path is on; with
//! `pause-before-switchover` a management layer can hold the source before the device state
//! goes, but the hand-over itself is not acknowledged: a link lost at the end leaves it to
//! the management layer to find out which side runs. Here the two round trips
//! (`Prepare`/`Prepared`, `Commit`/`Resumed`) cost about 0.2 ms on loopback.
//! `tests/switchover.rs` cuts the link, and separately swallows one message, at every step,
//! in every verify mode, and checks the rule above.
//!
//! **Ordering.** Within a round, frames on different connections are independent, and each
//! page travels at most once per round (the receiver refuses overlaps). Between rounds the
//! `RoundEnd` fence orders them: a page resent in round `r + 1` always lands after its round
//! `r` copy. The switchover frames come after the final `RoundEnd` and before `Done`, in the
//! order drawn: vCPU states, then device sections, then hashes.
