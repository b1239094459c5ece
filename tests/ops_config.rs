//! Config UX as an operator meets it, through the real binary:
//!
//! - `print-config` prints every key the config accepts (found from the config types
//!   themselves, so a key added without documenting it fails here), each with its default
//!   and a comment, and the output parses back;
//! - a bad config is refused at start with file, line and a suggestion;
//! - secrets written `${NAME}` never appear in a log line or in `print-config`.
//!
//! (tests/cli.rs checks that the active part of `print-config` equals the defaults.)

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use nbiot_gateway::config::{
    AlertmanagerConfig, CoapConfig, Config, HttpConfig, InfluxConfig, MqttConfig, ProfilesConfig,
    StoreConfig, TokenConfig,
};
use serde::de::{DeserializeOwned, Visitor};
use support::*;

/// A serde `Deserializer` that only records the field names a struct asks for: derive
/// passes them all to `deserialize_struct`, so this lists a config section's keys without
/// a hand-kept list that could fall behind.
struct FieldNames;

#[derive(Debug)]
struct Found(&'static [&'static str]);

impl std::fmt::Display for Found {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl std::error::Error for Found {}

impl serde::de::Error for Found {
    fn custom<T: std::fmt::Display>(_: T) -> Self {
        Found(&[])
    }
}

impl<'de> serde::Deserializer<'de> for FieldNames {
    type Error = Found;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Found> {
        Err(Found(&[]))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Found> {
        Err(Found(fields))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

fn keys_of<T: DeserializeOwned>() -> Vec<&'static str> {
    match T::deserialize(FieldNames) {
        Err(Found(fields)) => {
            assert!(
                !fields.is_empty(),
                "{} is not a struct",
                std::any::type_name::<T>()
            );
            fields.to_vec()
        }
        Ok(_) => unreachable!("FieldNames never yields a value"),
    }
}

/// Every key the config accepts, as (TOML table path, key). `http.tokens` is an array of
/// tables: its keys are those of one element.
fn every_config_key() -> Vec<(String, &'static str)> {
    let sections: BTreeMap<&str, Vec<&'static str>> = BTreeMap::from([
        ("coap", keys_of::<CoapConfig>()),
        ("mqtt", keys_of::<MqttConfig>()),
        ("http", keys_of::<HttpConfig>()),
        ("http.tokens", keys_of::<TokenConfig>()),
        ("store", keys_of::<StoreConfig>()),
        ("influxdb", keys_of::<InfluxConfig>()),
        ("alertmanager", keys_of::<AlertmanagerConfig>()),
        ("profiles", keys_of::<ProfilesConfig>()),
    ]);
    let mut keys = Vec::new();
    for section in keys_of::<Config>() {
        assert!(
            sections.contains_key(section),
            "Config has a section [{section}] this test does not know: add its type above"
        );
        keys.push((String::new(), section));
    }
    for (section, fields) in sections {
        keys.extend(fields.into_iter().map(|k| (section.to_owned(), k)));
    }
    keys
}

fn print_config() -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_nbiot-gateway"))
        .arg("print-config")
        .output()
        .expect("print-config runs");
    assert!(out.status.success());
    String::from_utf8(out.stdout).expect("utf-8")
}

/// A line of print-config: a key or table header, active or commented out.
#[derive(Debug)]
struct Entry {
    /// The line with the leading `# ` removed.
    text: String,
    commented: bool,
    /// Whether the line before it (or before its run of entries) is a prose comment.
    explained: bool,
    /// That comment.
    comment: String,
}

fn is_entry(s: &str) -> bool {
    s.starts_with('[')
        || s.split_once(" = ").is_some_and(|(k, _)| {
            !k.is_empty() && k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
        })
}

/// Every key and header of print-config's output; commented-out ones uncommented.
fn entries(text: &str) -> Vec<Entry> {
    let mut entries = Vec::new();
    let mut comment = String::new();
    let mut after_entry = false;
    for line in text.lines() {
        let (body, commented) = match line.strip_prefix("# ") {
            Some(rest) => (rest, true),
            None => (line, false),
        };
        if line.trim().is_empty() {
            comment.clear();
        } else if is_entry(body) {
            entries.push(Entry {
                text: body.to_owned(),
                commented,
                explained: !comment.is_empty(),
                comment: comment.clone(),
            });
            after_entry = true;
        } else if commented {
            // Prose: explains the entries that follow it.
            if after_entry {
                comment.clear();
            }
            comment.push_str(body);
            comment.push('\n');
            after_entry = false;
        }
    }
    entries
}

fn parse(text: &str) -> Result<Config, String> {
    Config::parse(Path::new("print-config"), text, |name| {
        Some(format!("value-of-{name}"))
    })
    .map_err(|e| e.to_string())
}

#[test]
fn print_config_documents_every_key_with_its_default() {
    let printed = print_config();
    let entries = entries(&printed);
    let uncommented: String = entries.iter().map(|e| format!("{}\n", e.text)).collect();

    // Everything, optional sections and examples included, parses back.
    let full = parse(&uncommented).unwrap_or_else(|e| panic!("{e}\n{uncommented}"));
    assert!(full.influxdb.is_some() && full.alertmanager.is_some());
    assert!(!full.http.tokens.is_empty());

    // Every key the config types accept is printed.
    let doc: toml::Table = uncommented.parse().expect("TOML");
    for (section, key) in every_config_key() {
        let table = section
            .split('.')
            .filter(|p| !p.is_empty())
            .try_fold(&doc, |t, part| match t.get(part)? {
                toml::Value::Table(t) => Some(t),
                toml::Value::Array(a) => a.first()?.as_table(),
                _ => None,
            });
        assert!(
            table.is_some_and(|t| t.contains_key(key)),
            "print-config does not show [{section}] {key}"
        );
    }

    // Every key has a comment explaining it (directly or for its block).
    for e in entries.iter().filter(|e| !e.text.starts_with('[')) {
        assert!(e.explained, "print-config has no comment for `{}`", e.text);
    }

    // Every printed value is the key's default: leaving the key out changes nothing. The
    // exceptions say what they are: keys without a default (leaving them out is an error),
    // `${NAME}` secrets, optional keys shown as commented-out examples in an active section
    // (`# username = "gateway"`), and examples whose comment states the default.
    let mut section_commented = false;
    for (i, e) in entries.iter().enumerate() {
        if e.text.starts_with('[') {
            section_commented = e.commented;
            continue;
        }
        if e.text.contains("\"${")
            || (e.commented && !section_commented)
            || e.comment.contains("default")
        {
            continue;
        }
        let without: String = entries
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, e)| format!("{}\n", e.text))
            .collect();
        if let Ok(parsed) = parse(&without) {
            assert_eq!(
                parsed, full,
                "print-config shows `{}`, which is not the default: print the default, or \
                 state it in the key's comment",
                e.text
            );
        }
    }
}

#[test]
fn a_bad_config_is_refused_at_start_with_file_line_and_a_suggestion() {
    let dir = TempDir::new("badconfig");
    let cases = [
        (
            "[store]\npath = \"x.db\"\nretension = \"1d\"\n",
            ":3:1: unknown field `retension`",
            "did you mean `retention`?",
        ),
        (
            "[mqtt]\nmode = \"embeded\"\n",
            ":2:8: unknown variant `embeded`",
            "did you mean `embedded`?",
        ),
        (
            "[http]\nlisten = \"localhost:8080\"\n",
            ":2:10: invalid socket address syntax",
            "e.g. \"0.0.0.0:5683\"",
        ),
        (
            "[store]\ncommit_interval = \"fast\"\n",
            ":2:19: `fast` is not a duration",
            "write e.g. \"5ms\"",
        ),
    ];
    for (i, (text, at, hint)) in cases.iter().enumerate() {
        let path = dir.path(&format!("bad{i}.toml"));
        std::fs::write(&path, text).expect("write config");
        let out = Command::new(env!("CARGO_BIN_EXE_nbiot-gateway"))
            .args(["run", "--config", path.to_str().expect("path")])
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(
            stderr.starts_with(&format!("nbiot-gateway: {}{at}", path.display())),
            "{stderr}"
        );
        assert!(stderr.contains(hint), "{stderr}");
    }
}

#[test]
fn secrets_from_the_environment_are_never_logged_or_printed() {
    const ADMIN: &str = "adm1n-S3CRET-token-4711";
    const INFLUX: &str = "influx-S3CRET-token-0815";
    const MQTT: &str = "mqtt-S3CRET-password-42";
    let secrets = [ADMIN, INFLUX, MQTT];
    let dir = TempDir::new("secrets");
    // Every secret a config can hold, each in use: the API token guards the API, the
    // forwarder and the MQTT source try servers that are not there (so they log failures).
    let closed = free_port();
    let config = config(
        &dir,
        &format!(
            "[mqtt]\nmode = \"external\"\nurl = \"mqtt://127.0.0.1:{closed}\"\n\
             username = \"gw\"\npassword = \"${{NBIOT_OPS_MQTT}}\"\n\
             [[http.tokens]]\ntoken = \"${{NBIOT_OPS_ADMIN}}\"\nrole = \"admin\"\n\
             [influxdb]\nurl = \"http://127.0.0.1:{closed}\"\norg = \"o\"\nbucket = \"b\"\n\
             token = \"${{NBIOT_OPS_INFLUX}}\"\nflush_interval = \"100ms\"\n"
        ),
    );
    let env = [
        ("NBIOT_OPS_ADMIN", ADMIN),
        ("NBIOT_OPS_INFLUX", INFLUX),
        ("NBIOT_OPS_MQTT", MQTT),
        ("RUST_LOG", "trace"),
    ];
    let mut gw = Gateway::start(&config, &[], &env);
    // The token works, so the config carried it; a wrong one is refused.
    gw.devices(
        &["add", "78330011223344", "--profile", "cjt188-water-meter"],
        Some(ADMIN),
    );
    let out = Command::new(env!("CARGO_BIN_EXE_nbiot-gateway"))
        .args(["devices", "list", "--url", &format!("http://{}", gw.http)])
        .env("NBIOT_TOKEN", "wrong-token")
        .output()
        .expect("devices list");
    assert!(!out.status.success());
    // An uplink, so the forwarder has something to (fail to) send.
    let reply = coap_post(
        &dir,
        &gw.coap,
        "78330011223344",
        &nbiot_codecs::hex::decode(
            b"68104433221100337881161f9000007766552c007766552c3101221105152021841316",
        )
        .expect("hex"),
    );
    assert!(!reply.contains("4."), "{reply}");
    let (_, ready) = gw.get("/readyz");
    // Wait until both have used their secret against a server that is not there: the
    // forwarder's write failed to connect, the MQTT source's connection failed.
    wait_for(
        "a failed TSDB write and a failed MQTT connection",
        DEADLINE,
        || {
            let samples = parse_exposition(&gw.metrics());
            let forward = value(
                &samples,
                "nbiot_forward_retries_total",
                &[("reason", "connect")],
            );
            let mqtt = value(&samples, "nbiot_mqtt_connected", &[]);
            (forward >= Some(1.0) && mqtt == Some(0.0) && gw.log_text().contains("MQTT"))
                .then_some(())
        },
    );
    gw.stop();

    let log = gw.log_text();
    for secret in secrets {
        assert!(!log.contains(secret), "the log shows a secret:\n{log}");
        assert!(!ready.contains(secret), "/readyz shows a secret: {ready}");
    }
    let printed = print_config();
    for secret in secrets {
        assert!(!printed.contains(secret));
    }
}
