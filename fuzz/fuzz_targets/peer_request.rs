#![no_main]
//! See `mode::fuzzing::peer_request`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| mode::fuzzing::peer_request(data));
