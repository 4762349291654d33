#![no_main]
//! See `mode::fuzzing::snapshot`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| mode::fuzzing::snapshot(data));
