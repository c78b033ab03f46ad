//! See `remask_cluster::fuzzing::http_chat` for the property checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| remask_cluster::fuzzing::http_chat(data));
