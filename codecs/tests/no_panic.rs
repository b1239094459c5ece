//! Every built-in codec is total: random bytes and mutations of the published vectors
//! decode to readings or an error, never a panic. (The fuzz targets in `codecs/fuzz/` run
//! the same property with coverage guidance; this runs in CI on stable.)

use nbiot_codecs::{builtin, builtin_ids};
use proptest::prelude::*;

/// Every published payload, as seeds for mutation.
fn seeds() -> &'static [Vec<u8>] {
    static SEEDS: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    SEEDS.get_or_init(load_seeds)
}

fn load_seeds() -> Vec<Vec<u8>> {
    let text = include_str!("data/devices.json");
    let doc: serde_json::Value = serde_json::from_str(text).expect("devices.json parses");
    let mut out = Vec::new();
    for device in doc.as_array().expect("a list of devices") {
        for v in device["vectors"].as_array().expect("vectors") {
            let hex = v["hex"].as_str().expect("hex");
            out.push(nbiot_codecs::hex::decode(hex.as_bytes()).expect("valid hex"));
        }
    }
    out
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, bit: u8 },
    Set { at: usize, byte: u8 },
    Truncate { len: usize },
    Insert { at: usize, byte: u8 },
    Remove { at: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Set { at, byte }),
        any::<usize>().prop_map(|len| Mutation::Truncate { len }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Insert { at, byte }),
        any::<usize>().prop_map(|at| Mutation::Remove { at }),
    ]
}

fn apply(mut p: Vec<u8>, muts: &[Mutation]) -> Vec<u8> {
    for m in muts {
        let n = p.len().max(1);
        match *m {
            Mutation::Flip { at, bit } => {
                if let Some(b) = p.get_mut(at % n) {
                    *b ^= 1 << bit;
                }
            }
            Mutation::Set { at, byte } => {
                if let Some(b) = p.get_mut(at % n) {
                    *b = byte;
                }
            }
            Mutation::Truncate { len } => p.truncate(len % n),
            Mutation::Insert { at, byte } => p.insert(at % (p.len() + 1), byte),
            Mutation::Remove { at } => {
                if !p.is_empty() {
                    p.remove(at % n);
                }
            }
        }
    }
    p
}

fn decode_all(payload: &[u8]) {
    for id in builtin_ids() {
        let codec = builtin(id).expect("built-in codec");
        // Decoding an ASCII-hex rendering exercises the hex transport paths too.
        let _ = codec.decode(payload);
        let _ = codec.decode(nbiot_codecs::hex::encode(payload).as_bytes());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(payload in proptest::collection::vec(any::<u8>(), 0..300)) {
        decode_all(&payload);
    }

    #[test]
    fn mutated_vectors_never_panic(
        seed in any::<prop::sample::Index>(),
        muts in proptest::collection::vec(mutation(), 1..6),
    ) {
        let seeds = seeds();
        let payload = apply(seeds[seed.index(seeds.len())].clone(), &muts);
        decode_all(&payload);
    }
}

#[test]
fn every_seed_is_checked() {
    // Guards the test above against an empty seed list making it vacuous.
    assert!(
        seeds().len() >= 40,
        "expected the published vectors, got {}",
        seeds().len()
    );
}
