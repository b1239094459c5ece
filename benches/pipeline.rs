//! Sustained ingest throughput: uplinks through the real pipeline (registry lookup, decode,
//! shard, group commit with `synchronous = FULL` on a real SQLite file) until every
//! outcome is back. 1000 registered devices, default pipeline config (a shard per core,
//! 5 ms group commit, batches up to 1000).
//!
//! `cargo bench --bench pipeline` — criterion reports time per uplink and uplinks/s
//! ("thrpt"); the figure is the whole path, fsync included, on the machine's temp dir.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use nbiot_gateway::pipeline::{Outcome, Pipeline, PipelineConfig, Transport, Uplink};
use nbiot_gateway::profiles::{self, SharedProfiles};
use nbiot_gateway::registry::{DeviceSpec, PutMode, Registry};
use nbiot_gateway::store::Store;

const DEVICES: usize = 1000;

/// CJ/T 188 read-data reply (raw binary, device clock, frame counter).
const CJT188: &str = "68104433221100337881161f9000007766552c007766552c3101221105152021841316";
/// Dragino N95S31B frame as the device sends it: ASCII hex.
const N95S31B: &str = "724031607457006e0ccd1b0100dc000ccc00e10186";

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

struct Bench {
    dir: PathBuf,
    rt: tokio::runtime::Runtime,
    pipeline: Option<Pipeline>,
}

impl Bench {
    fn new() -> Bench {
        let dir = std::env::temp_dir().join(format!("nbiot-bench-pipeline-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let pipeline = rt.block_on(async {
            let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("device-profiles");
            let mut set = profiles::ProfileSet::default();
            for name in ["cjt188-water-meter", "dragino-n95s31b"] {
                let file = shipped.join(format!("{name}.toml"));
                set.insert(profiles::load_file(&file).expect("shipped profile loads"));
            }
            let store = Arc::new(Store::open(&dir.join("gateway.db")).expect("store"));
            let registry = Registry::open(store, SharedProfiles::new(set))
                .await
                .expect("registry");
            for (profile, prefix) in [("cjt188-water-meter", "m"), ("dragino-n95s31b", "t")] {
                for d in 0..DEVICES {
                    let spec = DeviceSpec {
                        profile: profile.into(),
                        ..DeviceSpec::default()
                    };
                    registry
                        .put(&format!("{prefix}{d:04}"), spec, PutMode::Upsert)
                        .await
                        .expect("register");
                }
            }
            Pipeline::start(
                PipelineConfig {
                    retention: Duration::ZERO,
                    ..PipelineConfig::default()
                },
                registry,
            )
            .await
            .expect("pipeline")
        });
        Bench {
            dir,
            rt,
            pipeline: Some(pipeline),
        }
    }

    /// Submits `n` uplinks (round-robin over the devices) and waits for every outcome.
    fn run(&self, prefix: &str, payload: &Bytes, n: u64) -> Duration {
        let Some(pipeline) = &self.pipeline else {
            return Duration::ZERO;
        };
        let h = pipeline.handle();
        self.rt.block_on(async {
            let started = Instant::now();
            let mut replies = Vec::with_capacity(n as usize);
            for i in 0..n {
                let (tx, rx) = tokio::sync::oneshot::channel();
                let uplink = Uplink {
                    device: format!("{prefix}{:04}", i as usize % DEVICES),
                    payload: payload.clone(),
                    transport: Transport::Coap,
                    peer: None,
                    received_at_ms: 1_767_225_600_000,
                    token: None,
                    reply: Some(tx),
                };
                h.submit_wait(uplink).await.expect("submit");
                replies.push(rx);
            }
            for rx in replies {
                match rx.await {
                    Ok(Outcome::Committed { .. }) => {}
                    other => panic!("not committed: {other:?}"),
                }
            }
            started.elapsed()
        })
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        if let Some(p) = self.pipeline.take() {
            let _ = self.rt.block_on(p.shutdown());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn pipeline(c: &mut Criterion) {
    let bench = Bench::new();
    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(1));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(15));
    let cjt188 = Bytes::from(unhex(CJT188));
    group.bench_function("commit/cjt188", |b| {
        b.iter_custom(|n| bench.run("m", &cjt188, n))
    });
    let n95 = Bytes::from_static(N95S31B.as_bytes());
    group.bench_function("commit/n95s31b-hex", |b| {
        b.iter_custom(|n| bench.run("t", &n95, n))
    });
    group.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
