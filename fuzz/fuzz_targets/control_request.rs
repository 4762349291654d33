#![no_main]
//! See `mode::fuzzing::control_request`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| mode::fuzzing::control_request(data));
