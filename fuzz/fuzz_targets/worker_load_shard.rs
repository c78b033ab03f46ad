//! See `remask_cluster::fuzzing::worker_load_shard` for the property checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| remask_cluster::fuzzing::worker_load_shard(data));
