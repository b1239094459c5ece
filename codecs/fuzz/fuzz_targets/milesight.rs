//! Fuzz target: the `milesight` codec must return readings or an error for any input, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(codec) = nbiot_codecs::builtin("milesight") {
        let _ = codec.decode(data);
    }
});
