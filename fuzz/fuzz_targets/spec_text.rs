#![no_main]
//! See `mode::fuzzing::spec_text`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| mode::fuzzing::spec_text(data));
