//! `cargo fuzz run receiver_session`: see `dirtylog_fuzz::receiver_session`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dirtylog_fuzz::receiver_session::run(data));
