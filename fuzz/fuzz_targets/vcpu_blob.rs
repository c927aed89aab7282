//! `cargo fuzz run vcpu_blob`: see `dirtylog_fuzz::vcpu_blob`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dirtylog_fuzz::vcpu_blob::run(data));
