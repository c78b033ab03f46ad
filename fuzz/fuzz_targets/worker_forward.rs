//! See `remask_cluster::fuzzing::worker_forward` for the property checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| remask_cluster::fuzzing::worker_forward(data));
