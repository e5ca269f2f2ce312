#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| flexprefill_fuzz::safetensors(data));
