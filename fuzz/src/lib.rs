//! Fuzz targets for dirtylog, as plain functions of the input bytes so that the cargo-fuzz
//! binaries (`fuzz_targets/`) and the corpus replay test (`tests/replay.rs`, stable Rust, no
//! libFuzzer) run the same code. Each `run` panics exactly when it finds a bug: a panic in
//! the code under test, or an answer the target's oracle refuses.
//!
//! - [`wire_decoder`]: arbitrary frames after a valid preamble and header, into
//!   `dirtylog_migrate::wire::Decoder::next`.
//! - [`receiver_session`]: a structured sequence of messages (CRCs right) fed to
//!   `dirtylog_migrate::receive_on` with a software target, against a model of the protocol.
//! - [`vcpu_blob`]: `dirtylog_kvm`'s vCPU and VM state decoders, with round trips.
//! - [`core_clear_ring`]: the core's `KVM_CLEAR_DIRTY_LOG`, `KVM_GET_DIRTY_LOG` and
//!   `KVM_RESET_DIRTY_RINGS` on the software MMU, against a model.

#![warn(missing_docs)]

pub mod core_clear_ring;
pub mod frames;
pub mod mem_transport;
pub mod packed;
pub mod receiver_session;
pub mod vcpu_blob;
pub mod wire_decoder;
