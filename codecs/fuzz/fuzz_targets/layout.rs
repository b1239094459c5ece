//! Fuzz target: the declarative layout compiler and the parsers it builds never panic.
//!
//! The input is split at the first NUL byte: the part before is a layout source (TOML whose
//! top level is the layout table), the part after is a payload. Any source must compile or
//! give a `LayoutError` whose span lies inside the source; a layout that compiles must
//! decode any payload to readings or a `DecodeError`. Seed the corpus with the layouts of
//! `codecs/tests/layout.rs` followed by `\0` and a payload.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbiot_codecs::Codec;

fuzz_target!(|data: &[u8]| {
    let (source, payload) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let Ok(source) = std::str::from_utf8(source) else {
        return;
    };
    match nbiot_codecs::layout::compile_str(source) {
        Ok(codec) => {
            let _ = codec.decode(payload);
            let _ = codec.field_names();
        }
        Err(e) => {
            if let Some(span) = &e.span {
                assert!(span.end <= source.len(), "span outside the source: {e:?}");
            }
            let _ = e.line_col(source);
        }
    }
});
