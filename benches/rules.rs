//! Alert rules: what evaluating a reading costs, and what watching a device for silence
//! costs in memory.
//!
//! `cargo bench --bench rules` — criterion reports the time per reading for the shipped
//! profiles' rules (all the profile's condition rules of one device, the common case where
//! nothing changes, and the `delta` history of a water meter), and per uplink for moving a
//! device's silence timer among 100 000 watched devices. Then it prints the heap bytes a
//! shard's rule state spends per watched device at 1 000 000 devices (a counting global
//! allocator around `ShardRules::watch`; the devices themselves are the registry's).

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;

use criterion::{criterion_group, Criterion, Throughput};
use nbiot_codecs::{Name, Value};
use nbiot_gateway::profiles::{self, Profile, SharedProfiles};
use nbiot_gateway::registry::{
    Device, DeviceSpec, ImportMode, ParamValue, PutMode, Registry, TokenUpdate,
};
use nbiot_gateway::rules::ShardRules;
use nbiot_gateway::store::Store;

/// Counts live heap bytes.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// 2026-01-01T00:00:00Z.
const T0_MS: i64 = 1_767_225_600_000;

struct Setup {
    _dir: TempDir,
    rt: tokio::runtime::Runtime,
    registry: Registry,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn setup(tag: &str) -> Setup {
    let dir = TempDir(
        std::env::temp_dir().join(format!("nbiot-bench-rules-{tag}-{}", std::process::id())),
    );
    let _ = std::fs::remove_dir_all(&dir.0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("device-profiles");
    let mut set = profiles::ProfileSet::default();
    for name in [
        "milesight-em400",
        "cjt188-water-meter",
        "elderly-care-watch",
    ] {
        set.insert(profiles::load_file(&shipped.join(format!("{name}.toml"))).expect("profile"));
    }
    let store = Arc::new(Store::open(&dir.0.join("gateway.db")).expect("store"));
    let registry = rt
        .block_on(Registry::open(store, SharedProfiles::new(set)))
        .expect("registry");
    Setup {
        _dir: dir,
        rt,
        registry,
    }
}

fn register(s: &Setup, id: &str, profile: &str, params: &[(&str, f64)]) -> Arc<Device> {
    let spec = DeviceSpec {
        profile: profile.into(),
        labels: BTreeMap::new(),
        params: params
            .iter()
            .map(|(k, v)| ((*k).to_owned(), ParamValue::Number(*v)))
            .collect(),
        token: TokenUpdate::Keep,
    };
    s.rt.block_on(s.registry.put(id, spec, PutMode::Upsert))
        .expect("put");
    s.registry.lookup(id).expect("registered")
}

fn profile(s: &Setup, name: &str) -> Arc<Profile> {
    Arc::clone(s.registry.profiles().current().get(name).expect("profile"))
}

fn f(name: &'static str, v: Value) -> (Name, Value) {
    (Name::Static(name), v)
}

fn evaluate(c: &mut Criterion) {
    let s = setup("eval");
    let mut g = c.benchmark_group("rules");
    g.throughput(Throughput::Elements(1));

    // A manhole level sensor: 6 condition rules ($depth_m arithmetic, booleans, thresholds).
    let device = register(&s, "em400-1", "milesight-em400", &[("depth_m", 3.0)]);
    let mut rules = ShardRules::new(T0_MS);
    let set = rules
        .rule_set(&profile(&s, "milesight-em400"))
        .expect("rules");
    let reading = vec![
        f("battery_pct", Value::Int(92)),
        f("temperature_c", Value::Float(25.7)),
        f("distance_m", Value::Float(2.116)),
        f("tilted", Value::Bool(false)),
    ];
    let (mut out, mut issues) = (Vec::new(), Vec::new());
    let mut t = T0_MS;
    g.bench_function("evaluate/milesight-em400", |b| {
        b.iter(|| {
            t += 1000;
            rules.reading(&device, &set, &reading, t, t, &mut out, &mut issues);
            out.clear();
        })
    });

    // A water meter: `delta` over its history (5 rules, 1 with a 1 h window), hourly readings.
    let meter = register(&s, "meter-1", "cjt188-water-meter", &[]);
    let set = rules
        .rule_set(&profile(&s, "cjt188-water-meter"))
        .expect("rules");
    let mut volume = 100.0;
    let mut t = T0_MS;
    g.bench_function("evaluate/cjt188-water-meter (delta)", |b| {
        b.iter(|| {
            t += 3_600_000;
            volume += 0.01;
            let reading = [
                f("volume_m3", Value::Float(volume)),
                f("settlement_volume_m3", Value::Float(90.0)),
                f("status", Value::Int(0)),
                f("valve_open", Value::Bool(true)),
                f("valve_fault", Value::Bool(false)),
                f("battery_low", Value::Bool(false)),
            ];
            rules.reading(&meter, &set, &reading, t, t, &mut out, &mut issues);
            out.clear();
        })
    });

    // A wearable: distance_m from home (haversine) and vitals, 6 rules.
    let watch = register(
        &s,
        "watch-1",
        "elderly-care-watch",
        &[
            ("home_lat", 31.23),
            ("home_lon", 121.47),
            ("radius_m", 500.0),
        ],
    );
    let set = rules
        .rule_set(&profile(&s, "elderly-care-watch"))
        .expect("rules");
    let reading = vec![
        f("sos", Value::Bool(false)),
        f("fall", Value::Bool(false)),
        f("charging", Value::Bool(false)),
        f("activity", Value::Text("walking".into())),
        f("battery_pct", Value::Int(80)),
        f("heart_rate_bpm", Value::Int(72)),
        f("spo2_pct", Value::Int(97)),
        f("steps", Value::Int(4242)),
        f("latitude_deg", Value::Float(31.2301)),
        f("longitude_deg", Value::Float(121.4702)),
        f("gnss_fix", Value::Bool(true)),
    ];
    let mut t = T0_MS;
    g.bench_function("evaluate/elderly-care-watch", |b| {
        b.iter(|| {
            t += 1000;
            rules.reading(&watch, &set, &reading, t, t, &mut out, &mut issues);
            out.clear();
        })
    });

    // Moving one device's silence timer among 100 000 watched devices.
    let em400 = profile(&s, "milesight-em400");
    let set = rules.rule_set(&em400).expect("rules");
    let devices = import(&s, 100_000, "milesight-em400");
    let mut watch_rules = ShardRules::new(T0_MS);
    for (i, d) in devices.iter().enumerate() {
        watch_rules.watch(d, &set, T0_MS + i as i64);
    }
    let mut i = 0usize;
    let mut t = T0_MS + 1_000_000;
    g.bench_function("uplink/silence timer, 100k watched", |b| {
        b.iter(|| {
            i = (i + 7919) % devices.len();
            t += 10;
            watch_rules.uplink(&devices[i], Some(&set), t, &mut out);
            out.clear();
        })
    });
    g.finish();
}

/// Registers `n` devices through a CSV import (the registry's bulk path).
fn import(s: &Setup, n: usize, profile: &str) -> Vec<Arc<Device>> {
    let mut csv = String::from("device,profile\n");
    for i in 0..n {
        csv.push_str(&format!("bench-{i:07},{profile}\n"));
    }
    s.rt.block_on(s.registry.import_csv(csv, ImportMode::AllOrNothing))
        .expect("import");
    (0..n)
        .map(|i| {
            s.registry
                .lookup(&format!("bench-{i:07}"))
                .expect("imported")
        })
        .collect()
}

/// Heap bytes of a shard's rule state per watched device, at `n` devices.
fn memory(n: usize) {
    let s = setup("memory");
    let devices = import(&s, n, "milesight-em400");
    let mut rules = ShardRules::new(T0_MS);
    let set = rules
        .rule_set(&profile(&s, "milesight-em400"))
        .expect("rules");
    let before = LIVE.load(Ordering::Relaxed);
    for (i, d) in devices.iter().enumerate() {
        rules.watch(d, &set, T0_MS + (i as i64 % 600_000));
    }
    let after = LIVE.load(Ordering::Relaxed);
    let (entries, timers) = rules.len();
    let bytes = (after - before) as f64;
    println!(
        "rules/memory: {n} watched devices ({entries} entries, {timers} timers): {:.1} MiB, {:.1} bytes per device",
        bytes / (1024.0 * 1024.0),
        bytes / n as f64
    );
    drop(rules);
}

criterion_group!(benches, evaluate);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    // Skipped under `cargo test --benches` (which runs benches once, with --bench absent).
    if std::env::args().any(|a| a == "--bench") {
        for n in [100_000, 1_000_000] {
            memory(n);
        }
    }
}
