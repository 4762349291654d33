#![no_main]
//! See `mode::fuzzing::stored_log`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| mode::fuzzing::stored_log(data));
