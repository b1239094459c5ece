//! The store writer's SQL alone: what one uplink costs to commit, without sources, shards
//! or decoding — the part of the gateway's CPU per uplink that the schema and the writer
//! connection's settings decide (BENCHMARKS.md, "the store writer").
//!
//! Each iteration writes group commits of `BATCH` uplinks (one transaction each, durable:
//! `synchronous = FULL`, WAL) spread round-robin over `DEVICES` devices, like the gateway's
//! writer under load; the store grows across iterations as a real one does. Two shapes:
//! a 1-reading uplink (EM400-like) and a 6-reading one (EM300-TH cellular frame: a status
//! record and five samples).
//!
//! The time reported is the writer thread's **CPU time** (from `/proc/thread-self/schedstat`,
//! so Linux only), not wall time: it is what "uplinks per gateway CPU-second" is made of, and
//! it is much less disturbed by other processes on a shared machine than wall time. Waiting
//! for `fsync` is not in it; the work of the WAL checkpoints is.
//!
//! `cargo bench --bench store` — criterion reports CPU time per uplink ("time") and
//! uplinks per CPU-second ("thrpt").

use std::path::PathBuf;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use nbiot_codecs::{Name, Value};
use nbiot_gateway::store::ingest::{self, NewReading, NewUplink};
use nbiot_gateway::store::Store;
use rusqlite::{Connection, TransactionBehavior};

const DEVICES: usize = 10_000;
const BATCH: usize = 64;

struct Bench {
    dir: PathBuf,
    conn: Connection,
    devices: Vec<String>,
    next: usize,
    payload: Vec<u8>,
}

impl Bench {
    fn new(name: &str) -> Bench {
        let dir =
            std::env::temp_dir().join(format!("nbiot-bench-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("gateway.db");
        drop(Store::open(&path).expect("store"));
        let conn = ingest::open_writer(&path, Duration::from_secs(5)).expect("writer");
        Bench {
            dir,
            conn,
            devices: (0..DEVICES).map(|d| format!("86{d:013}")).collect(),
            next: 0,
            payload: vec![0x5a; 128],
        }
    }

    /// Commits `n` uplinks with `readings` each in batches of `BATCH`.
    fn run(&mut self, readings: &[NewReading], n: u64) -> Duration {
        let started = thread_cpu();
        let mut left = n as usize;
        while left > 0 {
            let k = left.min(BATCH);
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .expect("begin");
            for _ in 0..k {
                let device = &self.devices[self.next % DEVICES];
                self.next += 1;
                ingest::insert_uplink(
                    &tx,
                    &NewUplink {
                        device,
                        profile: "milesight-em300-th-nb",
                        codec: "milesight",
                        transport: "coap",
                        peer: Some("127.0.0.1:40000"),
                        received_at_ms: 1_767_225_600_000 + self.next as i64,
                        payload: &self.payload,
                        error: None,
                        sequence: Some(self.next as u32),
                        gaps: 0,
                        reset: false,
                        readings,
                    },
                )
                .expect("insert");
            }
            tx.commit().expect("commit");
            left -= k;
        }
        thread_cpu().saturating_sub(started)
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// CPU time this thread has used so far.
fn thread_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").expect("schedstat (Linux)");
    let ns = stat
        .split_whitespace()
        .next()
        .and_then(|f| f.parse().ok())
        .expect("schedstat: CPU nanoseconds");
    Duration::from_nanos(ns)
}

fn readings(n: usize) -> Vec<NewReading> {
    let fields = [
        (Name::Static("temperature_c"), Value::Float(26.7)),
        (Name::Static("humidity_pct"), Value::Float(51.5)),
    ];
    let mut json = String::new();
    ingest::encode_fields(&fields, &mut json);
    (0..n)
        .map(|i| NewReading {
            measurement: Name::Static("environment"),
            time_s: 1_767_225_600 - 600 * i as i64,
            device_time: true,
            fields: json.clone(),
        })
        .collect()
}

fn store(c: &mut Criterion) {
    let mut group = c.benchmark_group("store");
    group.throughput(Throughput::Elements(1));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    for n in [1, 6] {
        let mut bench = Bench::new(&format!("r{n}"));
        let rows = readings(n);
        group.bench_function(format!("commit/{n}-readings"), |b| {
            b.iter_custom(|iters| bench.run(&rows, iters))
        });
    }
    group.finish();
}

criterion_group!(benches, store);
criterion_main!(benches);
