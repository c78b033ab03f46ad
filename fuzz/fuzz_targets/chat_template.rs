//! See `remask_model::fuzzing::chat_template` for the property checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| remask_model::fuzzing::chat_template(data));
