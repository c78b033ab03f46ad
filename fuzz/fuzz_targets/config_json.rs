//! See `remask_model::fuzzing::config` for the property checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| remask_model::fuzzing::config(data));
