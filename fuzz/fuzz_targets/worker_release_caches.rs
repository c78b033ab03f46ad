//! See `remask_cluster::fuzzing::worker_release_caches` for the property checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| remask_cluster::fuzzing::worker_release_caches(data));
