//! Device profiles: one TOML file per device model (`device-profiles/*.toml`).
//!
//! A profile names how a model's payload arrives (`encoding`) and decodes (a built-in
//! `codec` or an inline `[layout]`), the measurement its readings go to, its fields' units
//! and kinds, its alert rules and its examples. This module loads and validates profiles:
//! every error names the file and line; a bad file never takes down the others; the examples
//! must decode to what they say. It does not evaluate alert rules (see `rules`), it only
//! checks that they are well-formed and reference fields the codec produces.

mod check;
pub(crate) use check::line_col;
pub mod schema;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::Engine as _;
use nbiot_codecs::{Codec, DecodeError, Name, Reading};
use serde::Serialize;

pub use schema::{AlertKind, Encoding, FieldKind, FieldMeta, Severity};

/// One loaded, validated device profile.
#[derive(Debug, Serialize)]
pub struct Profile {
    pub name: String,
    pub description: String,
    pub measurement: String,
    /// The built-in codec id, or `"layout"` for a declarative layout.
    pub codec: String,
    pub encoding: Encoding,
    #[serde(serialize_with = "ser_opt_duration")]
    pub report_interval: Option<Duration>,
    /// Seconds east of UTC of the device's wall clock (applied to `DeviceTime::Local`).
    pub utc_offset_s: i64,
    pub fields: BTreeMap<String, FieldMeta>,
    pub alerts: Vec<Alert>,
    pub examples: usize,
    /// The file it was loaded from.
    pub source: PathBuf,
    /// The profile file's text, for `GET /api/v1/profiles/{name}` and re-validation.
    #[serde(skip)]
    pub text: String,
    #[serde(skip)]
    measurement_name: Name,
    #[serde(skip)]
    decoder: Arc<dyn Codec>,
}

/// A validated alert rule, as the rules engine receives it.
#[derive(Debug, Clone, Serialize)]
pub struct Alert {
    pub name: String,
    pub kind: AlertKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expr: Option<String>,
    #[serde(rename = "for", serialize_with = "ser_opt_duration")]
    pub for_: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clear: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after: Option<After>,
    pub severity: Severity,
    pub summary: String,
    /// Line of the rule in its profile file, for error messages from the rules compiler.
    pub line: usize,
}

/// `after` of an inactive rule: a multiple of the report interval, or a fixed duration.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum After {
    Intervals(f64),
    #[serde(serialize_with = "ser_duration")]
    Duration(Duration),
}

fn ser_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

fn ser_opt_duration<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => ser_duration(d, s),
        None => s.serialize_none(),
    }
}

impl Profile {
    /// Decodes one payload as this profile's devices send it: the transport encoding
    /// (raw/hex/base64) first, then the codec; readings carry the profile's measurement.
    pub fn decode(&self, payload: &[u8]) -> Result<Vec<Reading>, DecodeError> {
        let bytes;
        let raw: &[u8] = match self.encoding {
            Encoding::Raw => payload,
            Encoding::Hex => {
                bytes = nbiot_codecs::hex::decode(payload)?;
                &bytes
            }
            Encoding::Base64 => {
                let text = payload.trim_ascii();
                bytes = base64::engine::general_purpose::STANDARD
                    .decode(text)
                    .map_err(base64_error)?;
                &bytes
            }
        };
        self.decode_bytes(raw)
    }

    /// Decodes payload bytes that are already in the codec's wire form (no transport
    /// encoding applied): what examples and `decode --profile` with hex input use.
    pub fn decode_bytes(&self, raw: &[u8]) -> Result<Vec<Reading>, DecodeError> {
        let mut readings = self.decoder.decode(raw)?;
        for r in &mut readings {
            r.measurement = self.measurement_name.clone();
        }
        Ok(readings)
    }

    /// Fields this profile's codec can produce, when known (see [`Codec::field_names`]),
    /// else the fields its examples produce plus its `[fields]` table.
    pub fn known_fields(&self) -> BTreeSet<String> {
        let mut set: BTreeSet<String> = self
            .decoder
            .field_names()
            .into_iter()
            .map(str::to_owned)
            .collect();
        set.extend(self.fields.keys().cloned());
        set
    }
}

fn base64_error(e: base64::DecodeError) -> DecodeError {
    use base64::DecodeError as B;
    let (offset, reason) = match e {
        B::InvalidByte(at, _) => (at, "not a base64 character"),
        B::InvalidLength(at) => (at, "base64 text has an impossible length"),
        B::InvalidLastSymbol(at, _) => (at, "base64 text ends with a malformed symbol"),
        B::InvalidPadding => (0, "base64 padding is malformed"),
    };
    DecodeError::Encoding { offset, reason }
}

/// A validation failure in one profile file, with where it is.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProfileError {
    pub file: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

impl std::fmt::Display for ProfileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.line, self.column) {
            (Some(l), Some(c)) => write!(f, "{}:{l}:{c}: {}", self.file, self.message),
            (Some(l), None) => write!(f, "{}:{l}: {}", self.file, self.message),
            _ => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

impl std::error::Error for ProfileError {}

/// The profiles in force, by name.
#[derive(Debug, Default, Clone)]
pub struct ProfileSet {
    profiles: BTreeMap<String, Arc<Profile>>,
}

impl ProfileSet {
    pub fn get(&self, name: &str) -> Option<&Arc<Profile>> {
        self.profiles.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Profile>> {
        self.profiles.values()
    }

    pub fn len(&self) -> usize {
        self.profiles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.profiles.is_empty()
    }

    /// Adds or replaces a profile.
    pub fn insert(&mut self, profile: Profile) {
        self.profiles
            .insert(profile.name.clone(), Arc::new(profile));
    }

    /// The set a reload leaves in force: every profile that loaded now, and for each file
    /// that failed, the version that was in force before (found by source path), so one bad
    /// edit never unloads a model that devices are using.
    pub fn merged_reload(&self, report: &LoadReport) -> ProfileSet {
        let mut next = report.set.clone();
        let failed: BTreeSet<&str> = report.errors.iter().map(|e| e.file.as_str()).collect();
        for old in self.iter() {
            let file = old.source.display().to_string();
            if failed.contains(file.as_str()) && next.get(&old.name).is_none() {
                next.profiles.insert(old.name.clone(), Arc::clone(old));
            }
        }
        next
    }
}

/// What loading a directory produced: the profiles that validated, and why the others did not.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub set: ProfileSet,
    pub errors: Vec<ProfileError>,
}

/// Loads and validates every `*.toml` in `dir` (sorted by file name). A bad file never takes
/// down the others; a second file claiming a name already loaded is refused.
pub fn load_dir(dir: &Path) -> LoadReport {
    let mut report = LoadReport::default();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            report.errors.push(ProfileError {
                file: dir.display().to_string(),
                line: None,
                column: None,
                message: format!("cannot read the profiles directory: {e}"),
            });
            return report;
        }
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    paths.sort();
    for path in paths {
        match load_file(&path) {
            Ok(profile) => {
                if let Some(first) = report.set.get(&profile.name) {
                    report.errors.push(ProfileError {
                        file: path.display().to_string(),
                        line: Some(1),
                        column: None,
                        message: format!(
                            "profile name `{}` is already used by {}",
                            profile.name,
                            first.source.display()
                        ),
                    });
                } else {
                    report.set.insert(profile);
                }
            }
            Err(errors) => report.errors.extend(errors),
        }
    }
    report
}

/// Loads and validates one profile file; all the problems found, each with its line.
pub fn load_file(path: &Path) -> Result<Profile, Vec<ProfileError>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![ProfileError {
            file: path.display().to_string(),
            line: None,
            column: None,
            message: format!("cannot read the file: {e}"),
        }]
    })?;
    check::parse_and_validate(path, text)
}

/// The profiles shared by the API and the pipeline; replaced whole on reload so readers
/// never see a half-loaded set.
#[derive(Debug, Clone, Default)]
pub struct SharedProfiles(Arc<RwLock<Arc<ProfileSet>>>);

impl SharedProfiles {
    pub fn new(set: ProfileSet) -> Self {
        SharedProfiles(Arc::new(RwLock::new(Arc::new(set))))
    }

    /// The current set (cheap: one Arc clone under a read lock held for no longer).
    pub fn current(&self) -> Arc<ProfileSet> {
        match self.0.read() {
            Ok(g) => Arc::clone(&g),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    pub fn replace(&self, set: ProfileSet) {
        let new = Arc::new(set);
        match self.0.write() {
            Ok(mut g) => *g = new,
            Err(poisoned) => *poisoned.into_inner() = new,
        }
    }
}
