//! `cargo fuzz run core_clear_ring`: see `dirtylog_fuzz::core_clear_ring`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dirtylog_fuzz::core_clear_ring::run(data));
