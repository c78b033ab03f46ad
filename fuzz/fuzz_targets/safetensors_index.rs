//! See `remask_model::fuzzing::index` for the property checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| remask_model::fuzzing::index(data));
