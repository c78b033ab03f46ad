//! See `remask_model::fuzzing::generation_config` for the property checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| remask_model::fuzzing::generation_config(data));
