#![no_main]
//! See `mode::fuzzing::peer_reply`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| mode::fuzzing::peer_reply(data));
