//! Decode cost of every published vector with its built-in codec, and of the declarative
//! layout codec against hand-written codecs on the same payloads.
//!
//! `cargo bench --bench codecs` — report the medians (criterion's middle estimate).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use nbiot_codecs::Codec;

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
        serde_json::from_str(include_str!("../codecs/tests/data/devices.json")).expect("vectors parse");
    let mut out = Vec::new();
    for device in doc.as_array().expect("list") {
        let vendor = device["vendor"].as_str().unwrap_or_default();
        let Some(codec) = codec_for(vendor) else { continue };
        let model: String = device["model"]
            .as_str()
            .unwrap_or_default()
            .split([' ', '/', '('])
            .next()
            .unwrap_or_default()
            .to_owned();
        for (i, v) in device["vectors"].as_array().expect("vectors").iter().enumerate() {
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

criterion_group!(benches, builtin_codecs);
criterion_main!(benches);
