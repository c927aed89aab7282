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
//!   then one of:
//!
//!   strict (the digest of the paused memory ran beside the final round):
//!   MemHash    slot, mem_digest(region)  (one per region)  ──▶  remember
//!   Done       (on every connection)  ───────────────────────▶  all N done after the same
//!                                                              rounds; every vCPU, every
//!                                                              hash present; each equals
//!                                                              the digest of the page
//!                                                              hashes recorded as frames
//!                                                              landed → resume the guest
//!                                           ◀── Ack 0  (on connection 0's return direction)
//!
//!   background (default) / off:
//!   Resume     verify = 1 / 0;  Done on the other connections ▶  all N done after the same
//!                                                              rounds; every vCPU present
//!                                                              → resume the guest
//!                                           ◀── Resumed  resume_us    (downtime ends here)
//!   (digest the paused memory: every byte)
//!   MemHash    slot, mem_digest(region)  (background only)  ─▶  remember
//!   Done  ───────────────────────────────────────────────────▶  hashes match the recorded
//!                                                              page hashes (memory as it
//!                                                              arrived, not as the running
//!                                                              guest changed it since)
//!                                           ◀── Ack 0
//!                                               or Error: the destination guest was stopped
//!                                               first; the source resumes its own
//!
//!   the source stays paused after Ack 0: the guest runs at the destination
//! ```
//!
//! **Failure**, at any point before the `Ack`: the side that gives up says why — the source
//! with `Error` (or `Cancel` when pre-copy does not converge) on every connection, the
//! destination with `Error` on connection 0's return direction — and closes its connections.
//! The source then un-throttles and resumes its guest; the destination drops its target,
//! which never ran — or, after `Resume`, ran only until the check failed: dropping it stops it
//! before the `Error` goes out. Among the causes: a malformed or out-of-range frame, a CRC or
//! hash mismatch, a target that cannot restore a vCPU state or does not know a device
//! section's name or version.
//!
//! **Known gap** (both modes): if the link dies after the destination sent `Ack 0` and before
//! the source read it, the destination runs the guest and the source resumes its own. The
//! protocol that rules this out is issue 10's switchover work.
//!
//! **Ordering.** Within a round, frames on different connections are independent, and each
//! page travels at most once per round (the receiver refuses overlaps). Between rounds the
//! `RoundEnd` fence orders them: a page resent in round `r + 1` always lands after its round
//! `r` copy. The switchover frames come after the final `RoundEnd` and before `Done`, in the
//! order drawn: vCPU states, then device sections, then hashes.
