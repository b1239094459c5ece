//! The gateway's configuration: one TOML file, every key optional with a documented default.
//!
//! [`Config`] is what serde reads (`deny_unknown_fields` everywhere, so a misspelt key is
//! refused with its line); [`Config::load`] adds the file name and line to every error and
//! expands `${NAME}` in secret values from the environment. [`DEFAULT_CONFIG`] is the
//! commented reference `print-config` prints; a test parses it back into `Config::default()`.
//! Nothing here binds a socket or opens a file besides reading the config itself.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// The commented reference configuration, with every default. `print-config` prints it.
pub const DEFAULT_CONFIG: &str = include_str!("default.toml");

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub coap: CoapConfig,
    pub mqtt: MqttConfig,
    pub http: HttpConfig,
    pub store: StoreConfig,
    pub influxdb: Option<InfluxConfig>,
    pub alertmanager: Option<AlertmanagerConfig>,
    pub profiles: ProfilesConfig,
}

/// `[coap]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoapConfig {
    pub listen: SocketAddr,
    pub max_payload: usize,
    pub path: String,
}

impl Default for CoapConfig {
    fn default() -> Self {
        CoapConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 5683)),
            max_payload: 1024,
            path: "up/{device}".to_owned(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MqttMode {
    #[default]
    Embedded,
    External,
    Off,
}

/// `[mqtt]`
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    pub mode: MqttMode,
    pub listen: SocketAddr,
    pub url: String,
    pub topics: Vec<String>,
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub shared_group: Option<String>,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            mode: MqttMode::Embedded,
            listen: SocketAddr::from(([0, 0, 0, 0], 1883)),
            url: "mqtt://127.0.0.1:1883".to_owned(),
            topics: vec!["nbiot/{device}/up".to_owned()],
            client_id: "nbiot-gateway".to_owned(),
            username: None,
            password: None,
            shared_group: None,
        }
    }
}

/// The password is a secret: never printed, so a logged config cannot leak it.
impl std::fmt::Debug for MqttConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttConfig")
            .field("mode", &self.mode)
            .field("listen", &self.listen)
            .field("url", &self.url)
            .field("topics", &self.topics)
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("shared_group", &self.shared_group)
            .finish()
    }
}

/// `[http]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address the HTTP API listens on.
    pub listen: SocketAddr,
    /// Bearer tokens. None configured = open, and then only on a loopback address.
    pub tokens: Vec<TokenConfig>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            tokens: Vec::new(),
        }
    }
}

/// `[[http.tokens]]`
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    pub token: String,
    pub role: Role,
}

impl std::fmt::Debug for TokenConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenConfig")
            .field("token", &"<redacted>")
            .field("role", &self.role)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Read,
    Admin,
}

/// `[store]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub path: PathBuf,
    #[serde(deserialize_with = "duration")]
    pub retention: Duration,
    #[serde(deserialize_with = "duration")]
    pub commit_interval: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            path: PathBuf::from("./data/gateway.db"),
            retention: Duration::from_secs(30 * 86_400),
            commit_interval: Duration::from_millis(5),
        }
    }
}

/// `[influxdb]` — absent means no forwarding.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InfluxConfig {
    pub url: String,
    pub org: String,
    pub bucket: String,
    #[serde(default)]
    pub token: String,
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    #[serde(default = "default_flush_interval", deserialize_with = "duration")]
    pub flush_interval: Duration,
    #[serde(default = "default_true")]
    pub gzip: bool,
    /// Device labels written as tags besides `device` and `profile` (a bounded set: every
    /// distinct value is a new series in the TSDB).
    #[serde(default)]
    pub tags: Vec<String>,
    /// A batch is sent once its line protocol reaches this many bytes (before gzip), even
    /// with fewer than `batch_size` lines.
    #[serde(default = "default_batch_bytes")]
    pub batch_bytes: usize,
    /// How long one write request may take (connect, send, answer) before it is retried.
    #[serde(default = "default_influx_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
}

impl std::fmt::Debug for InfluxConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InfluxConfig")
            .field("url", &self.url)
            .field("org", &self.org)
            .field("bucket", &self.bucket)
            .field("token", &"<redacted>")
            .field("batch_size", &self.batch_size)
            .field("flush_interval", &self.flush_interval)
            .field("gzip", &self.gzip)
            .field("tags", &self.tags)
            .field("batch_bytes", &self.batch_bytes)
            .field("timeout", &self.timeout)
            .finish()
    }
}

fn default_batch_size() -> usize {
    5000
}
fn default_flush_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_true() -> bool {
    true
}
fn default_batch_bytes() -> usize {
    4 * 1024 * 1024
}
fn default_influx_timeout() -> Duration {
    Duration::from_secs(10)
}

/// At most this many `[influxdb] tags`: each one multiplies the series a TSDB keeps.
pub const MAX_INFLUX_TAGS: usize = 8;

/// `[alertmanager]` — absent means no push.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertmanagerConfig {
    pub url: String,
    #[serde(default = "default_resend", deserialize_with = "duration")]
    pub resend_interval: Duration,
}

fn default_resend() -> Duration {
    Duration::from_secs(60)
}

/// `[profiles]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProfilesConfig {
    pub dir: PathBuf,
}

impl Default for ProfilesConfig {
    fn default() -> Self {
        ProfilesConfig {
            dir: PathBuf::from("./device-profiles"),
        }
    }
}

/// Durations are written as "30s", "5ms", "30d".
fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| {
        serde::de::Error::custom(format!(
            "`{s}` is not a duration ({e}); write e.g. \"5ms\", \"30s\", \"1m\", \"30d\""
        ))
    })
}

/// Why a config file was refused: one sentence naming the file and line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    Semantic { path: PathBuf, message: String },
}

impl Config {
    /// Reads, expands `${NAME}` references from the environment, and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(path, &text, |name| std::env::var(name).ok())
    }

    /// Parses config text; `env` resolves `${NAME}` references (injected for tests).
    pub fn parse(
        path: &Path,
        text: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let invalid = |span: Option<std::ops::Range<usize>>, message: String| {
            let (line, column) = span
                .map(|s| crate::profiles::line_col(text, s.start))
                .unwrap_or((1, 1));
            ConfigError::Invalid {
                path: path.to_owned(),
                line,
                column,
                message: with_hint(message),
            }
        };
        // Expand in the parsed document's strings, not in the raw text, so a `${` inside a
        // comment or a secret containing `"` cannot change the document's structure.
        let mut doc: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| invalid(e.span(), e.message().trim().to_owned()))?;
        let mut missing = Vec::new();
        expand_env(&mut doc, &env, &mut missing);
        if let Some(name) = missing.first() {
            return Err(ConfigError::Semantic {
                path: path.to_owned(),
                message: format!(
                    "environment variable `{name}` referenced as `${{{name}}}` is not set"
                ),
            });
        }
        // Deserialize from the original text for line numbers; then overlay expanded values.
        let config: Config =
            toml::from_str(text).map_err(|e| invalid(e.span(), e.message().trim().to_owned()))?;
        let config: Config = if text.contains("${") {
            toml::Value::Table(doc)
                .try_into()
                .map_err(|e: toml::de::Error| invalid(None, e.message().trim().to_owned()))?
        } else {
            config
        };
        config.validate().map_err(|message| ConfigError::Semantic {
            path: path.to_owned(),
            message,
        })?;
        Ok(config)
    }

    /// Checks what types cannot: relations between keys.
    pub fn validate(&self) -> Result<(), String> {
        if self.coap.max_payload == 0 || self.coap.max_payload > 64 * 1024 {
            return Err(format!(
                "[coap] max_payload = {} must be between 1 and 65536 bytes",
                self.coap.max_payload
            ));
        }
        if !self.coap.path.contains("{device}") {
            return Err(format!(
                "[coap] path = \"{}\" must contain `{{device}}`",
                self.coap.path
            ));
        }
        for t in &self.mqtt.topics {
            if !t.contains("{device}") {
                return Err(format!("[mqtt] topic \"{t}\" must contain `{{device}}`"));
            }
        }
        if self.http.tokens.is_empty() && !self.http.listen.ip().is_loopback() {
            return Err(format!(
                "[http] listen = \"{}\" is not a loopback address, so [[http.tokens]] are required",
                self.http.listen
            ));
        }
        if let Some(i) = &self.influxdb {
            if i.batch_size == 0 {
                return Err("[influxdb] batch_size must be at least 1".to_owned());
            }
            if !(i.url.starts_with("http://") || i.url.starts_with("https://")) {
                return Err(format!(
                    "[influxdb] url = \"{}\" must start with http:// or https://",
                    i.url
                ));
            }
            if i.batch_bytes < 1024 {
                return Err("[influxdb] batch_bytes must be at least 1024".to_owned());
            }
            if i.timeout.is_zero() || i.flush_interval.is_zero() {
                return Err("[influxdb] timeout and flush_interval must be above zero".to_owned());
            }
            if i.tags.len() > MAX_INFLUX_TAGS {
                return Err(format!(
                    "[influxdb] tags names {} labels; at most {MAX_INFLUX_TAGS} (each one multiplies the series the TSDB keeps)",
                    i.tags.len()
                ));
            }
            for (n, t) in i.tags.iter().enumerate() {
                if !crate::registry::validate::is_valid_key(t) || t.starts_with('_') {
                    return Err(format!(
                        "[influxdb] tags: `{t}` is not a label name (a-z, 0-9, `_`, not starting with `_` or a digit)"
                    ));
                }
                if t == "device" || t == "profile" {
                    return Err(format!(
                        "[influxdb] tags: `{t}` is always written; list only device labels"
                    ));
                }
                if i.tags[..n].contains(t) {
                    return Err(format!("[influxdb] tags: `{t}` is listed twice"));
                }
            }
        }
        Ok(())
    }
}

/// Adds what a reader needs to fix a refused value: the closest valid name for a misspelt
/// key, section or variant ("did you mean `retention`?"), or the expected shape of a value.
fn with_hint(message: String) -> String {
    if let Some(hint) = did_you_mean(&message) {
        return format!("{message}; did you mean `{hint}`?");
    }
    if message.contains("invalid socket address") {
        return format!(
            "{message}; write an IP address and port, e.g. \"0.0.0.0:5683\" or \"[::]:5683\""
        );
    }
    message
}

/// For serde's "unknown field `x`, expected one of `a`, `b`" (and "unknown variant"), the
/// expected name closest to `x`, if it is close enough to be a typo.
fn did_you_mean(message: &str) -> Option<String> {
    let rest = message
        .strip_prefix("unknown field `")
        .or_else(|| message.strip_prefix("unknown variant `"))?;
    let (got, rest) = rest.split_once('`')?;
    let expected = rest.split_once("expected")?.1;
    let candidates = expected.split('`').skip(1).step_by(2);
    let (best, distance) = candidates
        .map(|c| (c, edit_distance(&got.to_lowercase(), c)))
        .min_by_key(|(_, d)| *d)?;
    // Typos, not different words: at most a third of the name, and at least one edit.
    (distance <= (best.len() / 3).max(1) || got.eq_ignore_ascii_case(best)).then(|| best.to_owned())
}

/// Levenshtein distance (keys are short: the quadratic table is a few hundred cells).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut row = Vec::with_capacity(b.len() + 1);
        row.push(i + 1);
        for (j, cb) in b.iter().enumerate() {
            let substitute = prev
                .get(j)
                .copied()
                .unwrap_or(usize::MAX)
                .saturating_add(usize::from(ca != *cb));
            let delete = prev
                .get(j + 1)
                .copied()
                .unwrap_or(usize::MAX)
                .saturating_add(1);
            let insert = row.get(j).copied().unwrap_or(usize::MAX).saturating_add(1);
            row.push(substitute.min(delete).min(insert));
        }
        prev = row;
    }
    prev.last().copied().unwrap_or(0)
}

fn expand_env(
    table: &mut toml::Table,
    env: &impl Fn(&str) -> Option<String>,
    missing: &mut Vec<String>,
) {
    for (_, v) in table.iter_mut() {
        expand_value(v, env, missing);
    }
}

fn expand_value(
    v: &mut toml::Value,
    env: &impl Fn(&str) -> Option<String>,
    missing: &mut Vec<String>,
) {
    match v {
        toml::Value::String(s) => {
            if let Some(name) = s.strip_prefix("${").and_then(|r| r.strip_suffix('}')) {
                match env(name) {
                    Some(val) => *s = val,
                    None => missing.push(name.to_owned()),
                }
            }
        }
        toml::Value::Table(t) => expand_env(t, env, missing),
        toml::Value::Array(a) => a.iter_mut().for_each(|v| expand_value(v, env, missing)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printed_default_config_is_the_default() {
        let parsed = Config::parse(Path::new("print-config"), DEFAULT_CONFIG, |_| None).unwrap();
        assert_eq!(parsed, Config::default());
    }

    fn refused(text: &str) -> String {
        Config::parse(Path::new("g.toml"), text, |_| None)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn misspelt_names_get_the_closest_valid_one() {
        assert_eq!(
            refused("[store]\npath = \"x\"\nretension = \"1d\"\n"),
            "g.toml:3:1: unknown field `retension`, expected one of `path`, `retention`, \
             `commit_interval`; did you mean `retention`?"
        );
        // A section.
        let err = refused("[stor]\npath = \"x\"\n");
        assert!(err.starts_with("g.toml:1:"), "{err}");
        assert!(err.ends_with("did you mean `store`?"), "{err}");
        // A variant, and a case slip.
        let err = refused("[mqtt]\nmode = \"embeded\"\n");
        assert!(err.starts_with("g.toml:2:"), "{err}");
        assert!(err.ends_with("did you mean `embedded`?"), "{err}");
        assert!(refused("[mqtt]\nmode = \"OFF\"\n").ends_with("did you mean `off`?"));
        // Nothing close: no guess.
        let err = refused("[coap]\nbananas = 1\n");
        assert!(err.contains("unknown field `bananas`"), "{err}");
        assert!(!err.contains("did you mean"), "{err}");
    }

    #[test]
    fn bad_addresses_say_what_to_write() {
        let err = refused("[coap]\nlisten = \"localhost\"\n");
        assert!(err.starts_with("g.toml:2:"), "{err}");
        assert!(err.contains("e.g. \"0.0.0.0:5683\""), "{err}");
    }

    #[test]
    fn edit_distances() {
        assert_eq!(edit_distance("retension", "retention"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("abc", ""), 3);
        assert_eq!(edit_distance("flush_intreval", "flush_interval"), 2);
    }

    #[test]
    fn debug_output_never_shows_a_secret() {
        let text = "[mqtt]\nmode = \"external\"\nusername = \"gw\"\npassword = \"${P}\"\n\
                    [http]\n[[http.tokens]]\ntoken = \"${T}\"\nrole = \"admin\"\n\
                    [influxdb]\nurl = \"http://127.0.0.1:8086\"\norg = \"o\"\nbucket = \"b\"\ntoken = \"${I}\"\n";
        let c = Config::parse(Path::new("g.toml"), text, |n| {
            Some(format!("secret-{n}-value"))
        })
        .unwrap();
        assert_eq!(c.mqtt.password.as_deref(), Some("secret-P-value"));
        let shown = format!("{c:?} {c:#?}");
        assert!(!shown.contains("secret-"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }

    #[test]
    fn bad_duration_names_line() {
        let err = Config::parse(
            Path::new("g.toml"),
            "[store]\ncommit_interval = \"soon\"\n",
            |_| None,
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("g.toml:2:"), "{err}");
        assert!(err.contains("`soon` is not a duration"), "{err}");
    }

    #[test]
    fn secrets_come_from_the_environment() {
        let text = "[influxdb]\nurl = \"http://127.0.0.1:8086\"\norg = \"o\"\nbucket = \"b\"\ntoken = \"${INFLUX_TOKEN}\"\n";
        let c = Config::parse(Path::new("g.toml"), text, |n| {
            (n == "INFLUX_TOKEN").then(|| "s3cret".into())
        })
        .unwrap();
        let influx = c.influxdb.unwrap();
        assert_eq!(influx.token, "s3cret");
        assert!(!format!("{influx:?}").contains("s3cret"));
        let err = Config::parse(Path::new("g.toml"), text, |_| None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("INFLUX_TOKEN"), "{err}");
    }

    #[test]
    fn influxdb_keys_have_defaults_and_tags_are_checked() {
        let base = "[influxdb]\nurl = \"http://127.0.0.1:8086\"\norg = \"o\"\nbucket = \"b\"\n";
        let c = Config::parse(Path::new("g.toml"), base, |_| None).unwrap();
        let i = c.influxdb.unwrap();
        assert_eq!(
            (
                i.batch_size,
                i.batch_bytes,
                i.flush_interval,
                i.timeout,
                i.gzip
            ),
            (
                5000,
                4 << 20,
                Duration::from_secs(1),
                Duration::from_secs(10),
                true
            )
        );
        assert!(i.tags.is_empty());
        let with =
            |extra: &str| Config::parse(Path::new("g.toml"), &format!("{base}{extra}"), |_| None);
        let ok = with("tags = [\"district\", \"site\"]\ntimeout = \"2s\"\n").unwrap();
        assert_eq!(ok.influxdb.unwrap().tags, ["district", "site"]);
        for (extra, says) in [
            ("tags = [\"device\"]\n", "always written"),
            ("tags = [\"District\"]\n", "not a label name"),
            ("tags = [\"_x\"]\n", "not a label name"),
            ("tags = [\"a\", \"a\"]\n", "listed twice"),
            (
                "tags = [\"a\",\"b\",\"c\",\"d\",\"e\",\"f\",\"g\",\"h\",\"i\"]\n",
                "at most 8",
            ),
            ("batch_bytes = 10\n", "batch_bytes"),
            ("timeout = \"0s\"\n", "above zero"),
        ] {
            let err = with(extra).unwrap_err().to_string();
            assert!(err.contains(says), "{extra}: {err}");
        }
    }

    #[test]
    fn open_api_only_on_loopback() {
        let err = Config::parse(
            Path::new("g.toml"),
            "[http]\nlisten = \"0.0.0.0:8080\"\n",
            |_| None,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("tokens"), "{err}");
    }
}
