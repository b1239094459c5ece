//! Alert-rule scenarios, table-driven.
//!
//! The first half drives a shard's rule state ([`ShardRules`]) reading by reading with
//! explicit times (the rule clock is the reading's time, so no clock is involved):
//! `for`, `clear` and hysteresis, three-valued logic over missing fields, missing params,
//! `delta`, `rate`, `distance_m`, `local_hour`, out-of-order readings, summaries.
//!
//! The second half runs the real pipeline over a real store with paused tokio time:
//! silence (`kind = "inactive"`) fires at its deadline and resolves on the next uplink, and
//! state survives a restart (pending keeps its start, firing stays firing, silence counted
//! from the restart at the earliest).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use nbiot_codecs::{Name, Value};
use nbiot_gateway::alerts::{AlertEvent, AlertState};
use nbiot_gateway::pipeline::{Clock, Outcome, Pipeline, PipelineConfig, Transport, Uplink};
use nbiot_gateway::profiles::{self, Profile, SharedProfiles};
use nbiot_gateway::registry::{Device, DeviceSpec, ParamValue, PutMode, Registry, TokenUpdate};
use nbiot_gateway::rules::engine::Issue;
use nbiot_gateway::rules::expr::EvalError;
use nbiot_gateway::rules::{ShardRules, Transition};
use nbiot_gateway::store::Store;
use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

// ---------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "nbiot-rules-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A test device model: a fixed 15-byte frame, big-endian.
///
/// temp_c i16 /10 | level_m u16 /100 | volume_m3 u32 /1000 | latitude_deg i32 /1e6 |
/// longitude_deg i32 /1e6 | flags u8 (bit 0 open, bits 1-2 mode)
const PROFILE_HEAD: &str = r#"
name = "scenario"
measurement = "test"
report_interval = "10m"
utc_offset = "+08:00"

[layout]
endian = "big"
items = [
  { field = "temp_c", type = "i16", scale = 0.1 },
  { field = "level_m", type = "u16", scale = 0.01 },
  { field = "volume_m3", type = "u32", scale = 0.001 },
  { field = "latitude_deg", type = "i32", scale = 0.000001 },
  { field = "longitude_deg", type = "i32", scale = 0.000001 },
  { bitfield = "u8", items = [
      { field = "open", bit = 0 },
      { field = "mode", bits = "1-2", enum = { 0 = "idle", 1 = "run", 2 = "fault", 3 = "test" } },
  ] },
]
"#;

/// A frame of the test model.
fn frame(temp_c: f64, level_m: f64, volume_m3: f64, open: bool) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend(((temp_c * 10.0).round() as i16).to_be_bytes());
    f.extend(((level_m * 100.0).round() as u16).to_be_bytes());
    f.extend(((volume_m3 * 1000.0).round() as u32).to_be_bytes());
    f.extend(31_230_000i32.to_be_bytes());
    f.extend(121_470_000i32.to_be_bytes());
    f.push(u8::from(open));
    f
}

struct Env {
    // Removed on drop, after the registry (fields drop in order).
    registry: Registry,
    _dir: TempDir,
}

impl Env {
    /// A store and a registry with the `scenario` profile carrying `alerts` (TOML).
    async fn new(tag: &str, alerts: &str) -> Env {
        let dir = TempDir::new(tag);
        let profiles_dir = dir.0.join("profiles");
        std::fs::create_dir_all(&profiles_dir).unwrap();
        std::fs::write(
            profiles_dir.join("scenario.toml"),
            format!("{PROFILE_HEAD}\n{alerts}"),
        )
        .unwrap();
        let report = profiles::load_dir(&profiles_dir);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        let store = Arc::new(Store::open(&dir.0.join("gateway.db")).unwrap());
        let registry = Registry::open(store, SharedProfiles::new(report.set))
            .await
            .unwrap();
        Env {
            registry,
            _dir: dir,
        }
    }

    async fn register(&self, id: &str, params: &[(&str, ParamValue)]) -> Arc<Device> {
        let spec = DeviceSpec {
            profile: "scenario".into(),
            labels: [("district".to_owned(), "north".to_owned())].into(),
            params: params
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect::<BTreeMap<_, _>>(),
            token: TokenUpdate::Keep,
        };
        self.registry.put(id, spec, PutMode::Upsert).await.unwrap();
        self.registry.lookup(id).unwrap()
    }

    fn profile(&self) -> Arc<Profile> {
        Arc::clone(self.registry.profiles().current().get("scenario").unwrap())
    }

    fn db(&self) -> Connection {
        Connection::open(self.registry.store().path()).unwrap()
    }
}

/// 2026-01-01T17:00:00Z: 01:00 at the profile's +08:00.
const T0_MS: i64 = 1_767_286_800_000;
const MIN: i64 = 60;
const HOUR: i64 = 3600;

/// `"temp_c=31.5 open=true n=3 mode=fault"` → fields (a `.` makes a float).
fn fields(spec: &str) -> Vec<(Name, Value)> {
    spec.split_whitespace()
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap();
            let value = match v {
                "true" => Value::Bool(true),
                "false" => Value::Bool(false),
                v if v.contains('.') && v.parse::<f64>().is_ok() => {
                    Value::Float(v.parse().unwrap())
                }
                v if v.parse::<i64>().is_ok() => Value::Int(v.parse().unwrap()),
                v => Value::Text(v.to_owned().into()),
            };
            (Name::from(k.to_owned()), value)
        })
        .collect()
}

/// One reading, taken (and received) `at_s` after T0, and the transitions it must cause:
/// `"rule:state"` or `"rule:state=value"` (value within 1e-6; `resolved~` = resolved
/// without having fired), in order.
struct Step {
    at_s: i64,
    fields: &'static str,
    want: &'static [&'static str],
}

struct Scenario {
    name: &'static str,
    alerts: &'static str,
    params: &'static [(&'static str, f64)],
    steps: &'static [Step],
}

fn describe(t: &Transition) -> String {
    let state = match (t.state, t.starts_ms) {
        (AlertState::Resolved, None) => "resolved~",
        (s, _) => s.as_str(),
    };
    format!("{}:{state}", t.rule)
}

fn matches(t: &Transition, want: &str) -> bool {
    let (head, value) = match want.split_once('=') {
        Some((h, v)) => (h, Some(v.parse::<f64>().unwrap())),
        None => (want, None),
    };
    describe(t) == head && value.is_none_or(|v| t.value.is_some_and(|got| (got - v).abs() < 1e-6))
}

async fn run(s: &Scenario) {
    let env = Env::new(s.name, s.alerts).await;
    let params: Vec<(&str, ParamValue)> = s
        .params
        .iter()
        .map(|(k, v)| (*k, ParamValue::Number(*v)))
        .collect();
    let device = env.register("dev-1", &params).await;
    let mut rules = ShardRules::new(T0_MS);
    let set = rules.rule_set(&env.profile()).expect("rules");
    for (i, step) in s.steps.iter().enumerate() {
        let at_ms = T0_MS + step.at_s * 1000;
        let (mut out, mut issues) = (Vec::new(), Vec::new());
        rules.reading(
            &device,
            &set,
            &fields(step.fields),
            at_ms,
            at_ms,
            &mut out,
            &mut issues,
        );
        assert!(issues.is_empty(), "{} step {i}: {issues:?}", s.name);
        let got: Vec<String> = out
            .iter()
            .map(|t| format!("{}={:?}", describe(t), t.value))
            .collect();
        assert!(
            out.len() == step.want.len() && out.iter().zip(step.want).all(|(t, w)| matches(t, w)),
            "{} step {i} ({}): got {got:?}, want {:?}",
            s.name,
            step.fields,
            step.want
        );
        for t in &out {
            assert_eq!(t.at_ms, at_ms, "{} step {i}", s.name);
            assert_eq!(t.received_at_ms, Some(at_ms));
            assert_eq!(t.device.id(), "dev-1");
            assert_eq!(&*t.profile, "scenario");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Reading by reading
// ---------------------------------------------------------------------------------------

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "for_holds_then_fires",
        alerts: r#"
[[alerts]]
name = "hot"
expr = "temp_c > 30"
for = "10m"
severity = "warning"
"#,
        params: &[],
        steps: &[
            Step {
                at_s: 0,
                fields: "temp_c=31.0",
                want: &["hot:pending=31"],
            },
            Step {
                at_s: 5 * MIN,
                fields: "temp_c=32.0",
                want: &[],
            },
            // Unknown (the field is missing) changes nothing; `for` keeps counting.
            Step {
                at_s: 7 * MIN,
                fields: "level_m=1.0",
                want: &[],
            },
            // Promoted by the first reading at least `for` after it started to hold.
            Step {
                at_s: 10 * MIN,
                fields: "temp_c=30.5",
                want: &["hot:firing=30.5"],
            },
            Step {
                at_s: 15 * MIN,
                fields: "temp_c=40.0",
                want: &[],
            },
            Step {
                at_s: 20 * MIN,
                fields: "temp_c=29.0",
                want: &["hot:resolved=29"],
            },
            Step {
                at_s: 21 * MIN,
                fields: "temp_c=29.0",
                want: &[],
            },
        ],
    },
    Scenario {
        name: "pending_that_stops_never_fires",
        alerts: r#"
[[alerts]]
name = "hot"
expr = "temp_c > 30"
for = "10m"
severity = "warning"
"#,
        params: &[],
        steps: &[
            Step {
                at_s: 0,
                fields: "temp_c=31.0",
                want: &["hot:pending"],
            },
            Step {
                at_s: 9 * MIN,
                fields: "temp_c=30.0",
                want: &["hot:resolved~"],
            },
            // Holds again: `for` starts over.
            Step {
                at_s: 12 * MIN,
                fields: "temp_c=31.0",
                want: &["hot:pending"],
            },
            Step {
                at_s: 21 * MIN,
                fields: "temp_c=31.0",
                want: &[],
            },
            Step {
                at_s: 22 * MIN,
                fields: "temp_c=31.0",
                want: &["hot:firing"],
            },
        ],
    },
    Scenario {
        name: "clear_gives_hysteresis",
        alerts: r#"
[[alerts]]
name = "hot"
expr = "temp_c > 30"
clear = "temp_c < 28"
severity = "warning"
summary = "{device} at {temp_c} °C ({value}), limit {$limit}"
"#,
        params: &[],
        steps: &[
            Step {
                at_s: 0,
                fields: "temp_c=31.0",
                want: &["hot:firing=31"],
            },
            // The dead band between clear and expr keeps it firing.
            Step {
                at_s: 60,
                fields: "temp_c=29.0",
                want: &[],
            },
            Step {
                at_s: 120,
                fields: "temp_c=28.0",
                want: &[],
            },
            Step {
                at_s: 180,
                fields: "temp_c=27.5",
                want: &["hot:resolved=27.5"],
            },
            // ... and inactive: it takes expr again to fire.
            Step {
                at_s: 240,
                fields: "temp_c=29.0",
                want: &[],
            },
            Step {
                at_s: 300,
                fields: "temp_c=30.5",
                want: &["hot:firing"],
            },
        ],
    },
    Scenario {
        name: "three_valued_logic_over_missing_fields",
        alerts: r#"
[[alerts]]
name = "alarm"
expr = "open or temp_c > 30"
severity = "critical"
"#,
        params: &[],
        steps: &[
            // `unknown or false` is unknown: nothing happens.
            Step {
                at_s: 0,
                fields: "temp_c=25.0",
                want: &[],
            },
            // `true or unknown` is true.
            Step {
                at_s: 60,
                fields: "open=true",
                want: &["alarm:firing=1"],
            },
            Step {
                at_s: 120,
                fields: "temp_c=25.0",
                want: &[],
            },
            Step {
                at_s: 180,
                fields: "open=false temp_c=25.0",
                want: &["alarm:resolved"],
            },
        ],
    },
    Scenario {
        name: "delta_compares_with_the_reading_a_window_ago",
        alerts: r#"
[[alerts]]
name = "flow"
expr = "delta(volume_m3, 1h) > 0.5"
severity = "warning"
summary = "{value} m³ in an hour"
"#,
        params: &[],
        steps: &[
            Step {
                at_s: 0,
                fields: "volume_m3=10.0",
                want: &[],
            },
            // No reading an hour old yet: unknown.
            Step {
                at_s: 30 * MIN,
                fields: "volume_m3=10.3",
                want: &[],
            },
            Step {
                at_s: HOUR,
                fields: "volume_m3=10.6",
                want: &["flow:firing=0.6"],
            },
            // Baseline: the newest reading at least 1 h older (the one at 30 min).
            Step {
                at_s: 90 * MIN,
                fields: "volume_m3=10.7",
                want: &["flow:resolved=0.4"],
            },
            Step {
                at_s: 150 * MIN,
                fields: "volume_m3=11.3",
                want: &["flow:firing=0.6"],
            },
        ],
    },
    Scenario {
        name: "rate_is_per_second",
        alerts: r#"
[[alerts]]
name = "fast"
expr = "rate(volume_m3, 1h) * 3600 > 1"
for = "1h"
severity = "warning"
"#,
        params: &[],
        steps: &[
            Step {
                at_s: 0,
                fields: "volume_m3=0.0",
                want: &[],
            },
            Step {
                at_s: HOUR,
                fields: "volume_m3=0.5",
                want: &[],
            },
            // 1.5 m³ since the reading an hour ago: 1.5 m³/h (the value is the left side).
            Step {
                at_s: 2 * HOUR,
                fields: "volume_m3=2.0",
                want: &["fast:pending=1.5"],
            },
            Step {
                at_s: 3 * HOUR,
                fields: "volume_m3=3.2",
                want: &["fast:firing=1.2"],
            },
            Step {
                at_s: 4 * HOUR,
                fields: "volume_m3=3.3",
                want: &["fast:resolved=0.1"],
            },
        ],
    },
    Scenario {
        name: "distance_from_home",
        alerts: r#"
[[alerts]]
name = "left_home"
expr = "distance_m(latitude_deg, longitude_deg, $home_lat, $home_lon) > $radius_m"
severity = "warning"
"#,
        params: &[
            ("home_lat", 31.23),
            ("home_lon", 121.47),
            ("radius_m", 500.0),
        ],
        steps: &[
            Step {
                at_s: 0,
                fields: "latitude_deg=31.23 longitude_deg=121.47",
                want: &[],
            },
            Step {
                at_s: 60,
                fields: "latitude_deg=31.232 longitude_deg=121.47",
                want: &[],
            },
            // 0.01° of latitude is about 1112 m.
            Step {
                at_s: 120,
                fields: "latitude_deg=31.24 longitude_deg=121.47",
                want: &["left_home:firing"],
            },
            // No fix (no coordinates): unknown, stays.
            Step {
                at_s: 180,
                fields: "temp_c=20.0",
                want: &[],
            },
            Step {
                at_s: 240,
                fields: "latitude_deg=31.23 longitude_deg=121.4705",
                want: &["left_home:resolved"],
            },
        ],
    },
    Scenario {
        name: "night_flow_by_local_hour",
        alerts: r#"
[[alerts]]
name = "night_flow"
expr = "local_hour() >= 1 and local_hour() < 5 and delta(volume_m3, 1h) > 0"
for = "2h"
clear = "delta(volume_m3, 1h) <= 0"
severity = "warning"
"#,
        params: &[],
        steps: &[
            // T0 is 01:00 local.
            Step {
                at_s: 0,
                fields: "volume_m3=5.0",
                want: &[],
            },
            Step {
                at_s: HOUR,
                fields: "volume_m3=5.1",
                want: &["night_flow:pending"],
            },
            Step {
                at_s: 2 * HOUR,
                fields: "volume_m3=5.2",
                want: &[],
            },
            Step {
                at_s: 3 * HOUR,
                fields: "volume_m3=5.3",
                want: &["night_flow:firing"],
            },
            // 05:00 local: expr no longer holds, but `clear` decides: still flowing.
            Step {
                at_s: 4 * HOUR,
                fields: "volume_m3=5.4",
                want: &[],
            },
            Step {
                at_s: 5 * HOUR,
                fields: "volume_m3=5.4",
                want: &["night_flow:resolved"],
            },
            // 06:00 local, flowing again: not at night.
            Step {
                at_s: 6 * HOUR,
                fields: "volume_m3=5.9",
                want: &[],
            },
        ],
    },
    Scenario {
        name: "text_fields_and_several_rules",
        alerts: r#"
[[alerts]]
name = "fault"
expr = "mode == 'fault'"
severity = "warning"

[[alerts]]
name = "high"
expr = "level_m > $depth_m * 0.8"
clear = "level_m < $depth_m * 0.75"
severity = "critical"
"#,
        params: &[("depth_m", 2.0)],
        steps: &[
            Step {
                at_s: 0,
                fields: "mode=run level_m=1.0",
                want: &[],
            },
            Step {
                at_s: 60,
                fields: "mode=fault level_m=1.7",
                want: &["fault:firing", "high:firing=1.7"],
            },
            Step {
                at_s: 120,
                fields: "mode=idle level_m=1.55",
                want: &["fault:resolved"],
            },
            Step {
                at_s: 180,
                fields: "level_m=1.45",
                want: &["high:resolved=1.45"],
            },
        ],
    },
    Scenario {
        name: "out_of_order_readings_only_join_the_history",
        alerts: r#"
[[alerts]]
name = "hot"
expr = "temp_c > 30"
severity = "warning"

[[alerts]]
name = "used"
expr = "delta(volume_m3, 1h) > 1"
severity = "info"
"#,
        params: &[],
        steps: &[
            Step {
                at_s: 2 * HOUR,
                fields: "temp_c=31.0 volume_m3=3.0",
                want: &["hot:firing"],
            },
            // Older than the last reading (a stored register, a backlog): no state change...
            Step {
                at_s: 30 * MIN,
                fields: "temp_c=20.0 volume_m3=1.5",
                want: &[],
            },
            // ... but its value is history: at 2.5 h the baseline (at or before 1.5 h) is it.
            Step {
                at_s: 150 * MIN,
                fields: "temp_c=20.0 volume_m3=3.0",
                want: &["hot:resolved", "used:firing=1.5"],
            },
        ],
    },
];

#[tokio::test]
async fn scenarios() {
    for s in SCENARIOS {
        run(s).await;
    }
}

#[tokio::test]
async fn summaries_interpolate_device_fields_params_and_value() {
    let env = Env::new(
        "summary",
        r#"
[[alerts]]
name = "high"
expr = "level_m > $depth_m * 0.8"
severity = "critical"
summary = "Manhole {device} ({profile}/{rule}): water at {level_m} m of {$depth_m} m, mode {mode}, {value}"
"#,
    )
    .await;
    let device = env
        .register("mh-7", &[("depth_m", ParamValue::Number(2.5))])
        .await;
    let mut rules = ShardRules::new(T0_MS);
    let set = rules.rule_set(&env.profile()).unwrap();
    let (mut out, mut issues) = (Vec::new(), Vec::new());
    rules.reading(
        &device,
        &set,
        &fields("level_m=2.1234 mode=run"),
        T0_MS,
        T0_MS,
        &mut out,
        &mut issues,
    );
    assert_eq!(out.len(), 1);
    assert_eq!(
        out[0].summary,
        "Manhole mh-7 (scenario/high): water at 2.123 m of 2.5 m, mode run, 2.123"
    );
    assert_eq!(out[0].severity.as_str(), "critical");
    assert_eq!(out[0].starts_ms, Some(T0_MS));
    assert_eq!(out[0].since_ms, T0_MS);
}

#[tokio::test]
async fn a_missing_param_is_an_error_reported_once_and_the_rule_is_skipped() {
    let env = Env::new(
        "params",
        r#"
[[alerts]]
name = "high"
expr = "level_m > $depth_m * 0.8"
severity = "critical"

[[alerts]]
name = "typed"
expr = "mode > 1"
severity = "info"
"#,
    )
    .await;
    let without = env.register("mh-1", &[]).await;
    let with = env
        .register("mh-2", &[("depth_m", ParamValue::Number(2.0))])
        .await;
    let mut rules = ShardRules::new(T0_MS);
    let set = rules.rule_set(&env.profile()).unwrap();
    let reading = fields("level_m=1.9 mode=run");
    let summarize = |issues: &[Issue]| -> Vec<(String, &'static str, Option<String>, bool)> {
        issues
            .iter()
            .map(|i| {
                (
                    i.rule.to_string(),
                    i.error.reason(),
                    i.param.as_deref().map(str::to_owned),
                    i.first,
                )
            })
            .collect()
    };
    for (n, first) in [(0, true), (1, false)] {
        let (mut out, mut issues) = (Vec::new(), Vec::new());
        let at = T0_MS + n * 60_000;
        rules.reading(&without, &set, &reading, at, at, &mut out, &mut issues);
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(
            summarize(&issues),
            vec![
                (
                    "high".to_owned(),
                    "missing_param",
                    Some("depth_m".to_owned()),
                    first
                ),
                ("typed".to_owned(), "type", None, first),
            ]
        );
        assert!(matches!(issues[1].error, EvalError::Type { .. }));
    }
    let (mut out, mut issues) = (Vec::new(), Vec::new());
    rules.reading(&with, &set, &reading, T0_MS, T0_MS, &mut out, &mut issues);
    assert_eq!(
        out.iter().map(describe).collect::<Vec<_>>(),
        ["high:firing"]
    );
    assert_eq!(
        summarize(&issues),
        vec![("typed".to_owned(), "type", None, true)]
    );
}

#[tokio::test]
async fn silence_timers_fire_at_the_deadline_and_resolve_on_the_next_uplink() {
    let env = Env::new(
        "silence",
        r#"
[[alerts]]
name = "offline"
kind = "inactive"
after = "3x"
severity = "warning"
summary = "{device} silent for {value} s"

[[alerts]]
name = "gone"
kind = "inactive"
after = "2h"
severity = "critical"
"#,
    )
    .await;
    let a = env.register("a", &[]).await;
    let b = env.register("b", &[]).await;
    let mut rules = ShardRules::new(T0_MS);
    let set = rules.rule_set(&env.profile()).unwrap();
    struct Reg(Registry);
    impl nbiot_gateway::rules::state::Lookup for Reg {
        fn device(&self, id: &str) -> Option<Arc<Device>> {
            self.0.lookup(id)
        }
        fn profiles(&self) -> Arc<profiles::ProfileSet> {
            self.0.profiles().current()
        }
    }
    let lookup = Reg(env.registry.clone());
    let mut out = Vec::new();
    rules.uplink(&a, Some(&set), T0_MS, &mut out);
    rules.uplink(&b, Some(&set), T0_MS + 5 * 60_000, &mut out);
    assert!(out.is_empty());
    // 3 × 10 min after a's uplink.
    assert_eq!(rules.next_deadline_ms(), Some(T0_MS + 30 * 60_000));
    assert_eq!(
        rules.expire(T0_MS + 30 * 60_000 - 1000, 100, &lookup, &mut out),
        0
    );
    assert!(out.is_empty());
    // Late tick: the transition is dated at the deadline, not at the tick.
    assert_eq!(rules.expire(T0_MS + 31 * 60_000, 100, &lookup, &mut out), 1);
    assert_eq!(out.len(), 1);
    let t = &out[0];
    assert_eq!(
        (t.device.id(), &*t.rule, t.state),
        ("a", "offline", AlertState::Firing)
    );
    assert_eq!(
        (t.at_ms, t.starts_ms, t.since_ms),
        (T0_MS + 30 * 60_000, Some(T0_MS + 30 * 60_000), T0_MS)
    );
    assert_eq!(t.value, Some(1800.0));
    assert_eq!(t.summary, "a silent for 1800 s");
    assert_eq!(t.silent, 1);
    assert_eq!(t.received_at_ms, None);
    // The next deadline: b's offline, then a's `gone` at 2 h.
    assert_eq!(rules.next_deadline_ms(), Some(T0_MS + 35 * 60_000));
    out.clear();
    rules.expire(T0_MS + 2 * 3_600_000, 100, &lookup, &mut out);
    let got: Vec<(&str, &str, i8)> = out
        .iter()
        .map(|t| (t.device.id(), &*t.rule, t.silent))
        .collect();
    assert_eq!(got, [("b", "offline", 1), ("a", "gone", 0)]);
    assert_eq!(rules.active("a").len(), 2);
    // a speaks: both resolve (the device stops being silent once).
    out.clear();
    let back = T0_MS + 2 * 3_600_000 + 5000;
    rules.uplink(&a, Some(&set), back, &mut out);
    let got: Vec<(&str, AlertState, i8, i64)> = out
        .iter()
        .map(|t| (&*t.rule, t.state, t.silent, t.at_ms))
        .collect();
    assert_eq!(
        got,
        [
            ("offline", AlertState::Resolved, 0, back),
            ("gone", AlertState::Resolved, -1, back)
        ]
    );
    assert!(rules.active("a").is_empty());
    // Watched again from the new uplink; b's `gone` comes first.
    assert_eq!(rules.len(), (2, 2));
    assert_eq!(
        rules.next_deadline_ms(),
        Some(T0_MS + 2 * 3_600_000 + 5 * 60_000)
    );
}

#[tokio::test]
async fn watching_costs_one_entry_and_one_timer_per_device() {
    // (Bytes per device at a million devices: benches/rules.rs.)
    let env = Env::new(
        "many",
        r#"
[[alerts]]
name = "offline"
kind = "inactive"
after = "3x"
severity = "warning"
"#,
    )
    .await;
    let mut rules = ShardRules::new(T0_MS);
    let set = rules.rule_set(&env.profile()).unwrap();
    let devices: Vec<Arc<Device>> = {
        let mut v = Vec::new();
        for i in 0..200 {
            v.push(env.register(&format!("d{i:04}"), &[]).await);
        }
        v
    };
    let mut out = Vec::new();
    for (i, d) in devices.iter().enumerate() {
        rules.uplink(d, Some(&set), T0_MS + i as i64 * 1000, &mut out);
    }
    assert_eq!(rules.len(), (200, 200));
    // Uplinks move the timer, never add one.
    for d in &devices {
        rules.uplink(d, Some(&set), T0_MS + 600_000, &mut out);
    }
    assert_eq!(rules.len(), (200, 200));
    assert!(out.is_empty());
}

// ---------------------------------------------------------------------------------------
// The real pipeline, paused time
// ---------------------------------------------------------------------------------------

/// A clock that follows tokio's (paused) time, starting at `base_ms`.
fn tokio_clock(base_ms: i64) -> Clock {
    let t0 = tokio::time::Instant::now();
    Arc::new(move || base_ms + i64::try_from(t0.elapsed().as_millis()).unwrap())
}

/// Waits for `fut` while keeping a 1 ms timer armed, so paused time advances by
/// milliseconds (not to the next silence deadline) while the writer thread works.
async fn wait<T>(fut: impl std::future::Future<Output = T>) -> T {
    tokio::pin!(fut);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        tokio::select! {
            v = &mut fut => return v,
            () = tokio::time::sleep(Duration::from_millis(1)) => {
                assert!(tokio::time::Instant::now() < deadline, "timed out");
            }
        }
    }
}

async fn send(pipeline: &Pipeline, device: &str, payload: Vec<u8>, at_ms: i64) -> Outcome {
    let (tx, rx) = oneshot::channel();
    let u = Uplink {
        device: device.into(),
        payload: Bytes::from(payload),
        transport: Transport::Coap,
        peer: None,
        received_at_ms: at_ms,
        token: None,
        reply: Some(tx),
    };
    pipeline.handle().submit_wait(u).await.unwrap();
    wait(rx).await.unwrap()
}

async fn start(env: &Env, clock: Clock, events: mpsc::Sender<AlertEvent>) -> Pipeline {
    let config = PipelineConfig {
        shards: 2,
        commit_interval: Duration::ZERO,
        retention: Duration::ZERO,
        clock,
        alert_events: Some(events),
        ..PipelineConfig::default()
    };
    wait(Pipeline::start(config, env.registry.clone()))
        .await
        .unwrap()
}

async fn next_event(rx: &mut mpsc::Receiver<AlertEvent>) -> AlertEvent {
    wait(rx.recv()).await.expect("an alert event")
}

fn stored_transitions(env: &Env) -> Vec<(i64, String, String, i64, Option<i64>)> {
    let db = env.db();
    let mut stmt = db
        .prepare("SELECT id, rule, state, time_ms, starts_ms FROM alert_transitions ORDER BY id")
        .unwrap();
    stmt.query_map([], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

fn stored_state(env: &Env) -> Vec<(String, String, String, i64, Option<i64>)> {
    let db = env.db();
    let mut stmt = db
        .prepare("SELECT device, rule, state, active_since_ms, firing_since_ms FROM alert_state ORDER BY device, rule")
        .unwrap();
    stmt.query_map([], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

const PIPELINE_ALERTS: &str = r#"
[[alerts]]
name = "hot"
expr = "temp_c > 30"
for = "10m"
severity = "warning"
summary = "{device} at {temp_c} °C"

[[alerts]]
name = "open"
expr = "open"
severity = "critical"

[[alerts]]
name = "offline"
kind = "inactive"
after = "3x"
severity = "warning"
"#;

#[tokio::test(start_paused = true)]
async fn silence_fires_on_time_in_the_pipeline_and_the_next_uplink_resolves_it() {
    let env = Env::new("pipe-silence", PIPELINE_ALERTS).await;
    env.register("s-1", &[]).await;
    let (tx, mut rx) = mpsc::channel(16);
    let pipeline = start(&env, tokio_clock(T0_MS), tx).await;

    let out = send(&pipeline, "s-1", frame(20.0, 0.5, 1.0, false), T0_MS).await;
    assert!(
        matches!(out, Outcome::Committed { readings: 1, .. }),
        "{out:?}"
    );
    // Nothing before the deadline (30 min of silence).
    tokio::time::sleep(Duration::from_secs(29 * 60)).await;
    assert!(rx.try_recv().is_err());
    tokio::time::sleep(Duration::from_secs(2 * 60)).await;
    let e = next_event(&mut rx).await;
    assert_eq!(
        (e.device.as_str(), e.rule.as_str(), e.state),
        ("s-1", "offline", AlertState::Firing)
    );
    assert_eq!(e.at_ms, T0_MS + 30 * 60_000);
    assert_eq!(e.starts_ms, Some(T0_MS + 30 * 60_000));
    assert_eq!(e.received_at_ms, None);
    assert_eq!(e.labels, vec![("district".to_owned(), "north".to_owned())]);
    assert_eq!(
        stored_state(&env),
        vec![(
            "s-1".to_owned(),
            "offline".to_owned(),
            "firing".to_owned(),
            T0_MS,
            Some(T0_MS + 30 * 60_000)
        )]
    );

    let back = T0_MS + 45 * 60_000;
    tokio::time::sleep(Duration::from_secs(14 * 60)).await;
    send(&pipeline, "s-1", frame(20.0, 0.5, 1.0, false), back).await;
    let e = next_event(&mut rx).await;
    assert_eq!(
        (e.rule.as_str(), e.state, e.at_ms),
        ("offline", AlertState::Resolved, back)
    );
    assert_eq!(e.starts_ms, Some(T0_MS + 30 * 60_000));
    assert!(stored_state(&env).is_empty());
    let rows = stored_transitions(&env);
    assert_eq!(rows.len(), 2);
    assert_eq!(e.id, rows[1].0);
    wait(pipeline.shutdown()).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn state_survives_a_restart() {
    let env = Env::new("pipe-restart", PIPELINE_ALERTS).await;
    env.register("r-1", &[]).await;
    env.register("r-2", &[]).await;
    let (tx, mut rx) = mpsc::channel(16);
    let pipeline = start(&env, tokio_clock(T0_MS), tx).await;

    // r-1: hot starts to hold (pending); r-2: silent until its offline rule fires.
    send(&pipeline, "r-1", frame(31.0, 0.5, 1.0, false), T0_MS).await;
    let e = next_event(&mut rx).await;
    assert_eq!(
        (e.device.as_str(), e.rule.as_str(), e.state),
        ("r-1", "hot", AlertState::Pending)
    );
    assert_eq!(e.summary, "r-1 at 31 °C");
    assert_eq!(e.received_at_ms, Some(T0_MS));
    send(&pipeline, "r-2", frame(20.0, 0.5, 1.0, false), T0_MS).await;
    tokio::time::sleep(Duration::from_secs(4 * 60)).await;
    send(
        &pipeline,
        "r-1",
        frame(31.0, 0.5, 1.0, false),
        T0_MS + 4 * 60_000,
    )
    .await;
    // r-1 keeps reporting every few minutes so it does not go silent; r-2 does.
    let mut t = 4;
    while t < 30 {
        t += 5;
        tokio::time::sleep(Duration::from_secs(5 * 60)).await;
        if t < 9 {
            send(
                &pipeline,
                "r-1",
                frame(31.0, 0.5, 1.0, false),
                T0_MS + t * 60_000,
            )
            .await;
        } else {
            send(
                &pipeline,
                "r-1",
                frame(20.0, 0.5, 1.0, false),
                T0_MS + t * 60_000,
            )
            .await;
        }
    }
    // Pending (since T0) at 9 min held → not yet 10 min; at 14 min the condition failed.
    let e = next_event(&mut rx).await;
    assert_eq!(
        (e.rule.as_str(), e.state, e.starts_ms),
        ("hot", AlertState::Resolved, None)
    );
    let e = next_event(&mut rx).await;
    assert_eq!(
        (e.device.as_str(), e.rule.as_str(), e.state),
        ("r-2", "offline", AlertState::Firing)
    );
    // r-1 hot again (pending since 35 min), then the gateway stops.
    tokio::time::sleep(Duration::from_secs(60)).await;
    send(
        &pipeline,
        "r-1",
        frame(32.0, 0.5, 1.0, false),
        T0_MS + 35 * 60_000,
    )
    .await;
    let e = next_event(&mut rx).await;
    assert_eq!((e.rule.as_str(), e.state), ("hot", AlertState::Pending));
    wait(pipeline.shutdown()).await.unwrap();
    assert_eq!(
        stored_state(&env),
        vec![
            (
                "r-1".to_owned(),
                "hot".to_owned(),
                "pending".to_owned(),
                T0_MS + 35 * 60_000,
                None
            ),
            (
                "r-2".to_owned(),
                "offline".to_owned(),
                "firing".to_owned(),
                T0_MS,
                Some(T0_MS + 30 * 60_000)
            ),
        ]
    );

    // Restart two hours later.
    let restart = T0_MS + 155 * 60_000;
    let (tx, mut rx) = mpsc::channel(16);
    let pipeline = start(&env, tokio_clock(restart), tx).await;
    // r-1 is still hot 10 min after it started (before the restart): `for` counted on.
    send(&pipeline, "r-1", frame(33.0, 0.5, 1.0, false), restart).await;
    let e = next_event(&mut rx).await;
    assert_eq!(
        (e.rule.as_str(), e.state, e.starts_ms),
        ("hot", AlertState::Firing, Some(restart))
    );
    // r-2's offline alert is still firing: no second `firing`; its next uplink resolves it.
    send(
        &pipeline,
        "r-2",
        frame(20.0, 0.5, 1.0, false),
        restart + 1000,
    )
    .await;
    let e = next_event(&mut rx).await;
    assert_eq!(
        (e.device.as_str(), e.rule.as_str(), e.state),
        ("r-2", "offline", AlertState::Resolved)
    );
    assert_eq!(e.starts_ms, Some(T0_MS + 30 * 60_000));
    // r-1 last spoke at the restart: silence is counted from it (30 min later).
    tokio::time::sleep(Duration::from_secs(29 * 60)).await;
    assert!(rx.try_recv().is_err());
    tokio::time::sleep(Duration::from_secs(60 + 30)).await;
    let e = next_event(&mut rx).await;
    assert_eq!(
        (e.device.as_str(), e.rule.as_str(), e.at_ms),
        ("r-1", "offline", restart + 30 * 60_000)
    );
    wait(pipeline.shutdown()).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn after_a_gateway_outage_silence_counts_from_the_restart() {
    let env = Env::new("pipe-outage", PIPELINE_ALERTS).await;
    env.register("o-1", &[]).await;
    let (tx, mut rx) = mpsc::channel(16);
    let pipeline = start(&env, tokio_clock(T0_MS), tx).await;
    send(&pipeline, "o-1", frame(20.0, 0.5, 1.0, false), T0_MS).await;
    wait(pipeline.shutdown()).await.unwrap();

    // Down for 5 hours, far beyond the 30 min `after`: o-1 is not blamed for it.
    let restart = T0_MS + 5 * 3_600_000;
    let (tx, mut rx2) = mpsc::channel(16);
    let pipeline = start(&env, tokio_clock(restart), tx).await;
    tokio::time::sleep(Duration::from_secs(29 * 60)).await;
    assert!(rx2.try_recv().is_err());
    tokio::time::sleep(Duration::from_secs(2 * 60)).await;
    let e = next_event(&mut rx2).await;
    assert_eq!(
        (e.rule.as_str(), e.state, e.at_ms),
        ("offline", AlertState::Firing, restart + 30 * 60_000)
    );
    assert_eq!(
        e.value,
        Some(((restart + 30 * 60_000 - T0_MS) / 1000) as f64)
    );
    wait(pipeline.shutdown()).await.unwrap();
    assert!(rx.try_recv().is_err());
}

#[tokio::test(start_paused = true)]
async fn a_device_registered_but_never_seen_is_not_watched() {
    let env = Env::new("pipe-unseen", PIPELINE_ALERTS).await;
    env.register("n-1", &[]).await;
    let (tx, mut rx) = mpsc::channel(16);
    let pipeline = start(&env, tokio_clock(T0_MS), tx).await;
    tokio::time::sleep(Duration::from_secs(24 * 3600)).await;
    assert!(rx.try_recv().is_err());
    wait(pipeline.shutdown()).await.unwrap();
    assert!(stored_transitions(&env).is_empty());
}

#[tokio::test]
async fn a_reload_keeps_the_state_of_rules_that_stay_and_resolves_the_others() {
    let env = Env::new(
        "reload",
        r#"
[[alerts]]
name = "hot"
expr = "temp_c > 30"
for = "10m"
severity = "warning"

[[alerts]]
name = "open"
expr = "open"
severity = "critical"
"#,
    )
    .await;
    let device = env.register("dev-1", &[]).await;
    let mut rules = ShardRules::new(T0_MS);
    let old = rules.rule_set(&env.profile()).unwrap();
    let (mut out, mut issues) = (Vec::new(), Vec::new());
    rules.reading(
        &device,
        &old,
        &fields("temp_c=31.0 open=true"),
        T0_MS,
        T0_MS,
        &mut out,
        &mut issues,
    );
    assert_eq!(
        out.iter().map(describe).collect::<Vec<_>>(),
        ["hot:pending", "open:firing"]
    );

    // The profile is edited: `open` is gone, `hot` stays (with another threshold).
    let file = env._dir.0.join("profiles/scenario.toml");
    std::fs::write(
        &file,
        format!("{PROFILE_HEAD}\n[[alerts]]\nname = \"hot\"\nexpr = \"temp_c > 25\"\nfor = \"10m\"\nseverity = \"warning\"\n"),
    )
    .unwrap();
    let new = Arc::new(profiles::load_file(&file).unwrap());
    let set = rules.rule_set(&new).unwrap();
    assert!(!Arc::ptr_eq(&old, &set));
    out.clear();
    let at = T0_MS + 10 * 60_000;
    rules.reading(
        &device,
        &set,
        &fields("temp_c=26.0 open=true"),
        at,
        at,
        &mut out,
        &mut issues,
    );
    // `open` ended with the old rules; `hot` kept its start and fires under the new threshold.
    assert_eq!(
        out.iter().map(describe).collect::<Vec<_>>(),
        ["open:resolved", "hot:firing"]
    );
    assert_eq!(out[0].starts_ms, Some(T0_MS));
    assert_eq!(out[1].since_ms, T0_MS);
    assert!(issues.is_empty());
}
