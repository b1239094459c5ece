//! Fuzz target: the `cjt188` codec must return readings or an error for any input, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(codec) = nbiot_codecs::builtin("cjt188") {
        let _ = codec.decode(data);
    }
});
