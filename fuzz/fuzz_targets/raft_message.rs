#![no_main]
//! See `mode::fuzzing::raft_message`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| mode::fuzzing::raft_message(data));
