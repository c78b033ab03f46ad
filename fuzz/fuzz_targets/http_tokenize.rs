//! See `remask_cluster::fuzzing::http_tokenize` for the property checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| remask_cluster::fuzzing::http_tokenize(data));
