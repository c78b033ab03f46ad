//! See `remask_model::fuzzing::safetensors` for the property checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| remask_model::fuzzing::safetensors(data));
