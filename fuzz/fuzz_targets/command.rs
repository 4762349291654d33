#![no_main]
//! See `mode::fuzzing::command`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| mode::fuzzing::command(data));
