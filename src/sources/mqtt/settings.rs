//! The MQTT source's settings: `[mqtt]` validated into [`MqttSettings`] by a pure function
//! ([`MqttSettings::from_config`]), the broker address (`mqtt://host:port`), topic templates
//! (`nbiot/{device}/up` → filter `nbiot/+/up` → device id), and the reconnect backoff.
//! Nothing here touches the network.

use std::net::SocketAddr;
use std::time::Duration;

use crate::config::{MqttConfig, MqttMode};

use super::MqttError;

/// The port `mqtt://host` means without one.
const DEFAULT_PORT: u16 = 1883;

/// Where the broker is: `host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddr {
    /// A host name or IP address (IPv6 without brackets).
    pub host: String,
    pub port: u16,
}

impl BrokerAddr {
    /// Parses `mqtt://host[:port]` (or `tcp://`); the port defaults to 1883.
    pub fn parse_url(url: &str) -> Result<BrokerAddr, MqttConfigError> {
        let bad = |problem| MqttConfigError::Url {
            url: url.to_owned(),
            problem,
        };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("must look like mqtt://host:port"))?;
        match scheme.to_ascii_lowercase().as_str() {
            "mqtt" | "tcp" => {}
            "mqtts" | "ssl" | "tls" => {
                return Err(bad(
                    "uses TLS, which the gateway does not support yet; use mqtt://",
                ))
            }
            _ => return Err(bad("must start with mqtt://")),
        }
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains('@') {
            return Err(bad(
                "must not carry credentials; set [mqtt] username and password",
            ));
        }
        if authority.contains(['/', '?', '#']) {
            return Err(bad("must be only mqtt://host:port, with no path or query"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| bad("has an IPv6 address without its closing `]`"))?;
            match after {
                "" => (host, None),
                p => (
                    host,
                    Some(
                        p.strip_prefix(':')
                            .ok_or_else(|| bad("has text after the IPv6 address"))?,
                    ),
                ),
            }
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(bad("has no host"));
        }
        if host.contains(':') && !authority.starts_with('[') {
            return Err(bad(
                "has an IPv6 address; write it in brackets: mqtt://[::1]:1883",
            ));
        }
        let port = match port {
            None => DEFAULT_PORT,
            Some(p) => match p.parse::<u16>() {
                Ok(p) if p != 0 => p,
                _ => return Err(bad("has a port that is not 1-65535")),
            },
        };
        Ok(BrokerAddr {
            host: host.to_owned(),
            port,
        })
    }
}

impl From<SocketAddr> for BrokerAddr {
    fn from(a: SocketAddr) -> Self {
        BrokerAddr {
            host: a.ip().to_string(),
            port: a.port(),
        }
    }
}

impl std::fmt::Display for BrokerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// A topic template such as `nbiot/{device}/up`, and the subscription filter made from it
/// (`nbiot/+/up`).
///
/// `{device}` appears once and may share its level with fixed text (`dev-{device}`); other
/// levels are literal, `+` (any one level) or, last, `#` (any rest). A received topic gives
/// a device id only if it matches the whole template and the id is not empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate {
    template: String,
    filter: String,
    levels: Vec<Level>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Literal(String),
    Device { prefix: String, suffix: String },
    AnyOne,
    AnyRest,
}

/// Longest template accepted (MQTT allows 65 535 bytes; a template is a few dozen).
const TEMPLATE_MAX: usize = 1024;

impl TopicTemplate {
    pub fn parse(template: &str) -> Result<TopicTemplate, MqttConfigError> {
        let bad = |problem| MqttConfigError::Topic {
            topic: template.to_owned(),
            problem,
        };
        if template.len() > TEMPLATE_MAX {
            return Err(bad("is longer than 1024 bytes"));
        }
        if template.starts_with('$') {
            return Err(bad(
                "must not start with `$` (set shared_group for a $share subscription)",
            ));
        }
        if template.chars().any(char::is_control) {
            return Err(bad("contains a control character"));
        }
        if template.matches("{device}").count() != 1 {
            return Err(bad("must contain `{device}` exactly once"));
        }
        let parts: Vec<&str> = template.split('/').collect();
        let mut levels = Vec::with_capacity(parts.len());
        let mut filter = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let level = if let Some((prefix, suffix)) = part.split_once("{device}") {
                let special = ['+', '#', '{', '}'];
                if prefix.contains(special) || suffix.contains(special) {
                    return Err(bad(
                        "must not mix `{device}` with `+`, `#` or braces in one level",
                    ));
                }
                filter.push("+");
                Level::Device {
                    prefix: prefix.to_owned(),
                    suffix: suffix.to_owned(),
                }
            } else if *part == "+" {
                filter.push("+");
                Level::AnyOne
            } else if *part == "#" {
                if i + 1 != parts.len() {
                    return Err(bad("may use `#` only as its last level"));
                }
                filter.push("#");
                Level::AnyRest
            } else if part.contains(['+', '#', '{', '}']) {
                return Err(bad(
                    "may use `+` and `#` only as whole levels, and braces only in `{device}`",
                ));
            } else {
                filter.push(part);
                Level::Literal((*part).to_owned())
            };
            levels.push(level);
        }
        Ok(TopicTemplate {
            template: template.to_owned(),
            filter: filter.join("/"),
            levels,
        })
    }

    /// The template as configured.
    pub fn template(&self) -> &str {
        &self.template
    }

    /// The MQTT filter subscribed to (`{device}` → `+`).
    pub fn filter(&self) -> &str {
        &self.filter
    }

    /// The filter as subscribed, with the `$share/<group>/` prefix when a group is set.
    pub fn subscription(&self, shared_group: Option<&str>) -> String {
        match shared_group {
            Some(g) => format!("$share/{g}/{}", self.filter),
            None => self.filter.clone(),
        }
    }

    /// The device id in `topic`, if `topic` matches this template. No allocation.
    pub fn device<'t>(&self, topic: &'t str) -> Option<&'t str> {
        let mut parts = topic.split('/');
        let mut device = None;
        for level in &self.levels {
            match level {
                Level::AnyRest => return device,
                Level::AnyOne => {
                    parts.next()?;
                }
                Level::Literal(l) => {
                    if parts.next()? != l {
                        return None;
                    }
                }
                Level::Device { prefix, suffix } => {
                    let id = parts
                        .next()?
                        .strip_prefix(prefix.as_str())?
                        .strip_suffix(suffix.as_str())?;
                    if id.is_empty() {
                        return None;
                    }
                    device = Some(id);
                }
            }
        }
        if parts.next().is_some() {
            return None;
        }
        device
    }
}

/// Backoff between connection attempts: capped exponential with full jitter (a uniformly
/// random delay in `[0, min(max, initial × 2^attempt)]`), so a fleet of gateways does not
/// reconnect in lockstep after a broker restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(250),
            max: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    /// The delay before retry number `attempt` (0-based), with `unit` in `[0, 1)` the
    /// random draw.
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let ceiling = self
            .initial
            .checked_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX))
            .unwrap_or(self.max)
            .min(self.max);
        ceiling.mul_f64(unit.clamp(0.0, 1.0))
    }

    pub(super) fn clamp(&self, d: Duration) -> Duration {
        d.max(self.initial).min(self.max)
    }
}

/// A uniform draw in `[0, 1)`. `RandomState` is seeded from the OS once per thread and
/// re-keyed on every call, which is all jitter needs (no `rand` dependency).
pub(super) fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let bits = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// What the MQTT consumer needs, validated. Built by [`MqttSettings::from_config`]; the
/// tuning fields have documented defaults and are not config keys (yet).
#[derive(Clone, PartialEq)]
pub struct MqttSettings {
    pub broker: BrokerAddr,
    /// Stable across restarts: it names the persistent session.
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub topics: Vec<TopicTemplate>,
    /// Subscribe as `$share/<group>/…` (external brokers only).
    pub shared_group: Option<String>,
    /// MQTT keep-alive (at least 1 s). The broker drops the session after 1.5× this without
    /// traffic, which also bounds how long a stalled pipeline may hold a full window.
    pub keep_alive: Duration,
    /// Messages in flight at most (see the module docs).
    pub window: usize,
    /// Largest packet accepted from the broker (topic + payload + header), in bytes. A
    /// larger one breaks the connection, and the broker re-sends it on every reconnect: set
    /// the broker's own limit (Mosquitto `message_size_limit`) at or below this.
    pub max_packet_size: usize,
    pub backoff: Backoff,
    /// At shutdown, how long to keep waiting for outcomes so their acks can still go out.
    pub drain_timeout: Duration,
}

impl std::fmt::Debug for MqttSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttSettings")
            .field("broker", &self.broker)
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("topics", &self.topics)
            .field("shared_group", &self.shared_group)
            .field("keep_alive", &self.keep_alive)
            .field("window", &self.window)
            .field("max_packet_size", &self.max_packet_size)
            .field("backoff", &self.backoff)
            .field("drain_timeout", &self.drain_timeout)
            .finish()
    }
}

/// Why `[mqtt]` was refused: one sentence naming the key and value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MqttConfigError {
    #[error("[mqtt] url = \"{url}\" {problem}")]
    Url { url: String, problem: &'static str },
    #[error("[mqtt] topic \"{topic}\" {problem}")]
    Topic {
        topic: String,
        problem: &'static str,
    },
    #[error("[mqtt] topics \"{first}\" and \"{second}\" subscribe to the same filter")]
    DuplicateTopic { first: String, second: String },
    #[error("[mqtt] topics must list at least one topic template")]
    NoTopics,
    #[error("[mqtt] client_id = \"{client_id}\" {problem}")]
    ClientId {
        client_id: String,
        problem: &'static str,
    },
    #[error("[mqtt] password is set without username")]
    PasswordWithoutUsername,
    #[error("[mqtt] shared_group = \"{group}\" {problem}")]
    SharedGroup {
        group: String,
        problem: &'static str,
    },
}

impl MqttSettings {
    /// Validates `[mqtt]` into settings. Pure: no socket, no environment (`${ENV}` values
    /// were expanded when the config was loaded).
    ///
    /// External mode connects to `url`. Embedded mode connects to the `listen` address
    /// (loopback when it listens everywhere) and ignores `url` and `shared_group` (the
    /// in-process broker has exactly one consumer); when the broker was started on port 0,
    /// point the settings at the bound address with [`MqttSettings::with_broker`]. `off`
    /// is validated like embedded.
    pub fn from_config(c: &MqttConfig) -> Result<MqttSettings, MqttConfigError> {
        let external = c.mode == MqttMode::External;
        let broker = if external {
            BrokerAddr::parse_url(&c.url)?
        } else {
            BrokerAddr::from(crate::sources::broker::connect_addr(c.listen))
        };
        if c.topics.is_empty() {
            return Err(MqttConfigError::NoTopics);
        }
        let mut topics: Vec<TopicTemplate> = Vec::with_capacity(c.topics.len());
        for t in &c.topics {
            let t = TopicTemplate::parse(t)?;
            if let Some(first) = topics.iter().find(|o| o.filter == t.filter) {
                return Err(MqttConfigError::DuplicateTopic {
                    first: first.template.clone(),
                    second: t.template,
                });
            }
            topics.push(t);
        }
        check_client_id(&c.client_id)?;
        if c.password.is_some() && c.username.is_none() {
            return Err(MqttConfigError::PasswordWithoutUsername);
        }
        let shared_group = match &c.shared_group {
            Some(g) if external => {
                check_group(g)?;
                Some(g.clone())
            }
            _ => None,
        };
        Ok(MqttSettings {
            broker,
            client_id: c.client_id.clone(),
            username: c.username.clone(),
            password: c.password.clone(),
            topics,
            shared_group,
            keep_alive: Duration::from_secs(30),
            window: 512,
            max_packet_size: 64 * 1024 + 1024,
            backoff: Backoff::default(),
            drain_timeout: Duration::from_secs(5),
        })
    }

    /// The same settings, connecting to `addr` (the embedded broker's bound address).
    pub fn with_broker(mut self, addr: SocketAddr) -> MqttSettings {
        self.broker = BrokerAddr::from(crate::sources::broker::connect_addr(addr));
        self
    }

    /// The subscriptions made after every CONNACK.
    pub fn subscriptions(&self) -> Vec<String> {
        self.topics
            .iter()
            .map(|t| t.subscription(self.shared_group.as_deref()))
            .collect()
    }

    /// What `run` relies on even when the fields were set by hand.
    pub(super) fn check(&self) -> Result<(), MqttError> {
        let bad = |what: &'static str| Err(MqttError::InvalidSettings(what));
        if check_client_id(&self.client_id).is_err() {
            return bad("client_id must be a non-empty id without + # / $ or spaces");
        }
        if self.topics.is_empty() {
            return bad("at least one topic template is needed");
        }
        if self.window == 0 {
            return bad("window must be at least 1");
        }
        if self.keep_alive < Duration::from_secs(1) {
            return bad("keep_alive must be at least 1 s");
        }
        if self.max_packet_size < 128 {
            return bad("max_packet_size must be at least 128 bytes");
        }
        if self.backoff.initial.is_zero() || self.backoff.max < self.backoff.initial {
            return bad("backoff needs 0 < initial <= max");
        }
        Ok(())
    }
}

fn check_client_id(id: &str) -> Result<(), MqttConfigError> {
    let bad = |problem| {
        Err(MqttConfigError::ClientId {
            client_id: id.to_owned(),
            problem,
        })
    };
    if id.is_empty() {
        return bad("must not be empty: it names the gateway's persistent session");
    }
    if id.len() > 256 {
        return bad("is longer than 256 bytes");
    }
    // rumqttd refuses these; wildcards and spaces in an id only cause trouble elsewhere.
    if id.contains(['+', '#', '/', '$']) || id.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return bad("must not contain + # / $, spaces or control characters");
    }
    Ok(())
}

fn check_group(g: &str) -> Result<(), MqttConfigError> {
    if g.is_empty() || g.contains(['/', '+', '#']) || g.chars().any(char::is_control) {
        return Err(MqttConfigError::SharedGroup {
            group: g.to_owned(),
            problem: "must be a non-empty name without / + # or control characters",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(mode: MqttMode) -> MqttConfig {
        MqttConfig {
            mode,
            ..MqttConfig::default()
        }
    }

    #[test]
    fn templates_become_filters_and_extract_devices() {
        /// (template, filter, [(topic, device)])
        type Case<'a> = (&'a str, &'a str, &'a [(&'a str, Option<&'a str>)]);
        let cases: &[Case] = &[
            (
                "nbiot/{device}/up",
                "nbiot/+/up",
                &[
                    ("nbiot/861234567890127/up", Some("861234567890127")),
                    ("nbiot//up", None), // `+` matches an empty level; no device
                    ("nbiot/dev1/up/extra", None), // longer
                    ("nbiot/dev1", None), // shorter
                    ("other/dev1/up", None),
                    ("nbiot/dev1/down", None),
                ],
            ),
            (
                "t/dev-{device}.json",
                "t/+",
                &[
                    ("t/dev-42.json", Some("42")),
                    ("t/dev-.json", None),
                    ("t/42.json", None),
                    ("t/dev-42.xml", None),
                ],
            ),
            (
                "{device}",
                "+",
                &[("abc", Some("abc")), ("a/b", None), ("", None)],
            ),
            (
                "city/+/{device}/#",
                "city/+/+/#",
                &[
                    ("city/north/m1", Some("m1")),
                    ("city/north/m1/up/raw", Some("m1")),
                    ("city/m1", None),
                ],
            ),
        ];
        for (template, filter, topics) in cases {
            let t = TopicTemplate::parse(template).unwrap();
            assert_eq!(t.filter(), *filter, "{template}");
            assert_eq!(t.template(), *template);
            for (topic, device) in *topics {
                assert_eq!(t.device(topic), *device, "{template} vs {topic}");
            }
        }
    }

    #[test]
    fn shared_subscription_prefix() {
        let t = TopicTemplate::parse("nbiot/{device}/up").unwrap();
        assert_eq!(t.subscription(None), "nbiot/+/up");
        assert_eq!(t.subscription(Some("gw")), "$share/gw/nbiot/+/up");
    }

    #[test]
    fn bad_templates_are_refused_with_the_reason() {
        let cases = [
            ("nbiot/up", "must contain `{device}` exactly once"),
            ("{device}/{device}", "must contain `{device}` exactly once"),
            ("$SYS/{device}", "must not start with `$`"),
            ("a/#/{device}", "may use `#` only as its last level"),
            ("a/x+/{device}", "may use `+` and `#` only as whole levels"),
            ("a/{dev}/{device}", "braces only in `{device}`"),
            ("a/+{device}", "must not mix `{device}`"),
        ];
        for (template, want) in cases {
            match TopicTemplate::parse(template) {
                Err(MqttConfigError::Topic { topic, problem }) => {
                    assert_eq!(topic, template);
                    assert!(problem.contains(want), "{template}: {problem}");
                }
                other => panic!("{template}: {other:?}"),
            }
        }
    }

    #[test]
    fn urls() {
        let ok = |url: &str, host: &str, port: u16| {
            assert_eq!(
                BrokerAddr::parse_url(url).unwrap(),
                BrokerAddr {
                    host: host.to_owned(),
                    port
                },
                "{url}"
            )
        };
        ok("mqtt://127.0.0.1:1883", "127.0.0.1", 1883);
        ok("mqtt://broker.example.net", "broker.example.net", 1883);
        ok("tcp://emqx:11883/", "emqx", 11883);
        ok("MQTT://[::1]:2883", "::1", 2883);
        ok("mqtt://[fe80::1]", "fe80::1", 1883);
        for (url, want) in [
            ("127.0.0.1:1883", "must look like mqtt://host:port"),
            ("http://x:1883", "must start with mqtt://"),
            ("mqtts://x:8883", "TLS"),
            ("mqtt://u:p@x:1883", "credentials"),
            ("mqtt://x:1883/topic", "no path"),
            ("mqtt://:1883", "no host"),
            ("mqtt://x:0", "1-65535"),
            ("mqtt://x:99999", "1-65535"),
            ("mqtt://x:", "1-65535"),
            ("mqtt://::1:1883", "brackets"),
            ("mqtt://[::1", "closing"),
        ] {
            match BrokerAddr::parse_url(url) {
                Err(e @ MqttConfigError::Url { .. }) => {
                    assert!(e.to_string().contains(want), "{url}: {e}")
                }
                other => panic!("{url}: {other:?}"),
            }
        }
        let a = BrokerAddr::parse_url("mqtt://[::1]:1").unwrap();
        assert_eq!(a.to_string(), "[::1]:1");
    }

    #[test]
    fn settings_from_the_default_config() {
        let s = MqttSettings::from_config(&MqttConfig::default()).unwrap();
        // Embedded: the consumer dials the listen port on loopback.
        assert_eq!(
            s.broker,
            BrokerAddr {
                host: "127.0.0.1".into(),
                port: 1883
            }
        );
        assert_eq!(s.client_id, "nbiot-gateway");
        assert_eq!(s.subscriptions(), ["nbiot/+/up"]);
        assert_eq!(s.shared_group, None);
        s.check().unwrap();
        let moved = s.with_broker("0.0.0.0:40001".parse().unwrap());
        assert_eq!(moved.broker.to_string(), "127.0.0.1:40001");
    }

    #[test]
    fn external_settings_use_url_group_and_credentials() {
        let c = MqttConfig {
            url: "mqtt://emqx.local:1884".into(),
            topics: vec!["a/{device}/up".into(), "b/{device}".into()],
            client_id: "gw-7".into(),
            username: Some("gw".into()),
            password: Some("s3cret".into()),
            shared_group: Some("gateways".into()),
            ..config(MqttMode::External)
        };
        let s = MqttSettings::from_config(&c).unwrap();
        assert_eq!(s.broker.to_string(), "emqx.local:1884");
        assert_eq!(
            s.subscriptions(),
            ["$share/gateways/a/+/up", "$share/gateways/b/+"]
        );
        assert!(!format!("{s:?}").contains("s3cret"), "password redacted");
        assert_eq!(s.username.as_deref(), Some("gw"));
        assert_eq!(s.password.as_deref(), Some("s3cret"));
        // Embedded mode ignores the group: one in-process consumer.
        let e = MqttSettings::from_config(&MqttConfig {
            mode: MqttMode::Embedded,
            ..c
        })
        .unwrap();
        assert_eq!(e.subscriptions(), ["a/+/up", "b/+"]);
    }

    #[test]
    fn config_errors_name_key_and_value() {
        let cases: Vec<(MqttConfig, &str)> = vec![
            (
                MqttConfig {
                    url: "mqtts://x".into(),
                    ..config(MqttMode::External)
                },
                "[mqtt] url = \"mqtts://x\" uses TLS",
            ),
            (
                MqttConfig {
                    topics: vec![],
                    ..MqttConfig::default()
                },
                "[mqtt] topics must list at least one",
            ),
            (
                MqttConfig {
                    topics: vec!["x/{device}".into(), "x/id-{device}".into()],
                    ..MqttConfig::default()
                },
                "[mqtt] topics \"x/{device}\" and \"x/id-{device}\" subscribe to the same filter",
            ),
            (
                MqttConfig {
                    client_id: String::new(),
                    ..MqttConfig::default()
                },
                "[mqtt] client_id = \"\" must not be empty",
            ),
            (
                MqttConfig {
                    client_id: "gw/1".into(),
                    ..MqttConfig::default()
                },
                "[mqtt] client_id = \"gw/1\" must not contain",
            ),
            (
                MqttConfig {
                    password: Some("p".into()),
                    ..MqttConfig::default()
                },
                "[mqtt] password is set without username",
            ),
            (
                MqttConfig {
                    shared_group: Some("a/b".into()),
                    ..config(MqttMode::External)
                },
                "[mqtt] shared_group = \"a/b\"",
            ),
        ];
        for (c, want) in cases {
            let e = MqttSettings::from_config(&c).unwrap_err().to_string();
            assert!(e.starts_with(want), "{e}");
        }
        // A bad url does not matter in embedded mode (it is not used).
        MqttSettings::from_config(&MqttConfig {
            url: "nonsense".into(),
            ..MqttConfig::default()
        })
        .unwrap();
    }

    #[test]
    fn backoff_is_capped_exponential_with_full_jitter() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
        };
        let almost_one = 1.0 - f64::EPSILON;
        let ceilings = [100u64, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000];
        for (attempt, ms) in ceilings.into_iter().enumerate() {
            let a = attempt as u32;
            assert_eq!(b.delay(a, 0.0), Duration::ZERO);
            let top = b.delay(a, almost_one);
            assert!(top <= Duration::from_millis(ms), "{a}: {top:?}");
            assert!(top >= Duration::from_millis(ms) * 99 / 100, "{a}: {top:?}");
            assert_eq!(b.delay(a, 0.5), Duration::from_millis(ms) / 2);
        }
        // Huge attempt counts neither overflow nor exceed the cap.
        assert_eq!(
            b.delay(u32::MAX, almost_one).min(b.max),
            b.delay(u32::MAX, almost_one)
        );
        for _ in 0..1000 {
            let u = jitter();
            assert!((0.0..1.0).contains(&u));
        }
        assert_eq!(b.clamp(Duration::ZERO), b.initial);
        assert_eq!(b.clamp(Duration::from_secs(60)), b.max);
    }
}
