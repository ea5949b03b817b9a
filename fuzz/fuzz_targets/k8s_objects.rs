#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_agent::fuzz::k8s_objects(data));
