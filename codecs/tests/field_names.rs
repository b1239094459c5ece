//! `Codec::field_names` must list every field a codec produces: profile validation refuses
//! alert rules that name other fields, so a name missing here would make a valid rule fail
//! and a stale name would let a dead rule pass.
//!
//! For every built-in codec, in every configuration that changes what it produces (each
//! model, frame and option value), every payload of `tests/data/devices.json` is decoded,
//! as is each of its one-byte mutations (each byte set to 0x00, 0x01, 0x7F, 0xFF: these reach
//! the sentinel and error-flag fields the vectors themselves rarely carry). Every field of
//! every reading must be in the configuration's `field_names()`, and the list itself must be
//! non-empty and free of duplicates.

use std::collections::{BTreeMap, BTreeSet};

use nbiot_codecs::registry::{self, CodecOptions};
use nbiot_codecs::{builtin_ids, hex};
use serde_json::Value as Json;

/// `(codec id, [codec_options] as TOML)`: each configuration checked.
fn configurations() -> Vec<(&'static str, String)> {
    let mut out = vec![("cjt188", String::new())];
    let milesight_models = [
        "generic",
        "em300-th",
        "em300-mcs",
        "em300-sld",
        "em300-mld",
        "ws303",
        "em300-di",
        "em310-tilt",
        "em400",
        "ws101",
        "at101",
    ];
    for model in milesight_models {
        for frame in ["auto", "tlv", "cellular"] {
            for legacy in [false, true] {
                out.push((
                    "milesight",
                    format!(
                        "model = \"{model}\"\nframe = \"{frame}\"\naccept_legacy_water_channel = {legacy}"
                    ),
                ));
            }
        }
    }
    for model in ["auto", "ndds75", "n95s31b"] {
        out.push(("dragino", format!("model = \"{model}\"")));
    }
    for frame in ["auto", "telegram", "records"] {
        for battery in ["pct", "days"] {
            out.push((
                "wmbus",
                format!("frame = \"{frame}\"\nbattery = \"{battery}\""),
            ));
        }
    }
    out
}

fn vector_payloads() -> Vec<Vec<u8>> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/devices.json");
    let text = std::fs::read_to_string(path).expect("devices.json is readable");
    let entries: Vec<Json> = serde_json::from_str(&text).expect("devices.json is JSON");
    entries
        .iter()
        .flat_map(|e| e["vectors"].as_array().expect("vectors").iter())
        .map(|v| hex::decode(v["hex"].as_str().expect("hex").as_bytes()).expect("vector hex"))
        .collect()
}

/// The payload and its one-byte mutations.
fn variants(payload: &[u8]) -> Vec<Vec<u8>> {
    let mut out = vec![payload.to_vec()];
    for i in 0..payload.len() {
        for b in [0x00, 0x01, 0x7f, 0xff] {
            if payload[i] != b {
                let mut p = payload.to_vec();
                p[i] = b;
                out.push(p);
            }
        }
    }
    out
}

/// Fields produced outside `field_names()`, by configuration; and how many vectors (not
/// mutations) each codec id decoded.
fn undeclared() -> (
    BTreeMap<String, BTreeSet<String>>,
    BTreeMap<&'static str, usize>,
) {
    let payloads = vector_payloads();
    let mut missing: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut decoded: BTreeMap<&'static str, usize> = BTreeMap::new();
    for (id, options) in configurations() {
        let opts: CodecOptions = toml::from_str(&options).expect("options TOML");
        let codec = registry::build(id, &opts).unwrap_or_else(|e| panic!("{id} {options}: {e}"));
        let declared: BTreeSet<&str> = codec.field_names().into_iter().collect();
        for payload in &payloads {
            if codec.decode(payload).is_ok() {
                *decoded.entry(id).or_default() += 1;
            }
            for variant in variants(payload) {
                for reading in codec.decode(&variant).into_iter().flatten() {
                    for (name, _) in &reading.fields {
                        if !declared.contains(name.as_str()) {
                            missing
                                .entry(format!("{id} {{{}}}", options.replace('\n', ", ")))
                                .or_default()
                                .insert(name.to_string());
                        }
                    }
                }
            }
        }
    }
    (missing, decoded)
}

#[test]
fn every_field_produced_is_declared() {
    let (missing, decoded) = undeclared();
    assert!(
        missing.is_empty(),
        "fields not in field_names(): {missing:#?}"
    );
    // Not vacuous: every built-in codec decodes some of the vectors.
    for id in builtin_ids() {
        assert!(
            decoded.get(id).copied().unwrap_or(0) > 0,
            "{id} decoded no vector"
        );
    }
}

#[test]
fn field_lists_are_declared_and_unique() {
    for (id, options) in configurations() {
        let opts: CodecOptions = toml::from_str(&options).expect("options TOML");
        let codec = registry::build(id, &opts).expect("configuration builds");
        let names = codec.field_names();
        assert!(!names.is_empty(), "{id} {options}: declares no fields");
        let unique: BTreeSet<&str> = names.iter().copied().collect();
        assert_eq!(unique.len(), names.len(), "{id} {options}: duplicate names");
        for name in names {
            let snake = name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            assert!(
                snake && !name.is_empty(),
                "{id}: field name `{name}` is not snake_case"
            );
        }
    }
    // Every built-in codec is covered by a configuration here.
    let configured: BTreeSet<&str> = configurations().iter().map(|(id, _)| *id).collect();
    let builtin: BTreeSet<&str> = builtin_ids().iter().copied().collect();
    assert_eq!(configured, builtin);
}
