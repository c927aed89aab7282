//! `cargo fuzz run wire_decoder`: see `dirtylog_fuzz::wire_decoder`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dirtylog_fuzz::wire_decoder::run(data));
