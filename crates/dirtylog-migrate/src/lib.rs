//! Pre-copy live migration on top of dirtylog's dirty page tracking.
//!
//! - [`wire`]: the versioned, framed, CRC-checked stream format between the source and the
//!   destination, with a zero-copy encoder and a validating, allocation-free decoder.
//! - [`vmmbitmap`]: a dirty bitmap for the VMM's own writes to guest memory, which KVM's
//!   dirty log does not see.
//! - [`stats`]: migration statistics under QEMU's names.

#![warn(missing_docs)]

pub mod stats;
pub mod vmmbitmap;
pub mod wire;
