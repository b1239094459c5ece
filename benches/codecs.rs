//! Decode cost of every published vector with its built-in codec, and of the declarative
//! layout codec against hand-written codecs on the same payloads.
//!
//! `cargo bench --bench codecs` — report the medians (criterion's middle estimate).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};

struct Vector {
    codec: &'static str,
    label: String,
    payload: Vec<u8>,
}

fn codec_for(vendor: &str) -> Option<&'static str> {
    match vendor {
        "Milesight" => Some("milesight"),
        "Dragino" => Some("dragino"),
        "Axioma Metering" => Some("wmbus"),
        v if v.contains("CJ/T 188") => Some("cjt188"),
        _ => None,
    }
}

fn vectors() -> Vec<Vector> {
    let doc: serde_json::Value =
        serde_json::from_str(include_str!("../codecs/tests/data/devices.json"))
            .expect("vectors parse");
    let mut out = Vec::new();
    for device in doc.as_array().expect("list") {
        let vendor = device["vendor"].as_str().unwrap_or_default();
        let Some(codec) = codec_for(vendor) else {
            continue;
        };
        let model: String = device["model"]
            .as_str()
            .unwrap_or_default()
            .split([' ', '/', '('])
            .next()
            .unwrap_or_default()
            .to_owned();
        for (i, v) in device["vectors"]
            .as_array()
            .expect("vectors")
            .iter()
            .enumerate()
        {
            let hex = v["hex"].as_str().expect("hex");
            out.push(Vector {
                codec,
                label: format!("{model}#{i}"),
                payload: nbiot_codecs::hex::decode(hex.as_bytes()).expect("hex"),
            });
        }
    }
    out
}

fn builtin_codecs(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    for v in vectors() {
        let codec = nbiot_codecs::builtin(v.codec).expect("built-in codec");
        group.bench_function(format!("{}/{}", v.codec, v.label), |b| {
            b.iter(|| black_box(codec.decode(black_box(&v.payload))))
        });
    }
    group.finish();
}

/// The declarative layout codec against the hand-written codec for the same device
/// (target: within 2×).
fn layout_vs_builtin(c: &mut Criterion) {
    let cases = [
        (
            "dragino-n95s31b",
            include_str!("../codecs/tests/data/layout-dragino-n95s31b.toml"),
            "dragino",
            "724031607457006e0ccd1b0100dc000ccc00e10186",
        ),
        (
            "milesight-em300-th",
            include_str!("../codecs/tests/data/layout-milesight-em300-th.toml"),
            "milesight",
            "01755c03673401046865",
        ),
    ];
    let mut group = c.benchmark_group("layout_vs_builtin");
    for (name, layout, builtin, hex) in cases {
        let payload = nbiot_codecs::hex::decode(hex.as_bytes()).expect("hex");
        let layout = nbiot_codecs::layout::compile_str(layout).expect("layout compiles");
        let builtin = nbiot_codecs::builtin(builtin).expect("built-in codec");
        group.bench_function(format!("{name}/layout"), |b| {
            b.iter(|| black_box(nbiot_codecs::Codec::decode(&layout, black_box(&payload))))
        });
        group.bench_function(format!("{name}/builtin"), |b| {
            b.iter(|| black_box(builtin.decode(black_box(&payload))))
        });
    }
    group.finish();
}

criterion_group!(benches, builtin_codecs, layout_vs_builtin);
criterion_main!(benches);
