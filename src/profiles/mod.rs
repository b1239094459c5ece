//! Device profiles: one TOML file per device model. (Being written by the lead — the
//! signatures below are the contract other modules build against.)

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

use nbiot_codecs::{DecodeError, Reading};
use serde::Serialize;

/// One loaded, validated device profile.
#[derive(Debug, Serialize)]
pub struct Profile {
    pub name: String,
    pub description: String,
    pub measurement: String,
    pub codec: String,
}

impl Profile {
    /// Decodes one payload as this profile's devices send it: transport encoding
    /// (raw/hex/base64) first, then the codec; readings carry the profile's measurement.
    pub fn decode(&self, payload: &[u8]) -> Result<Vec<Reading>, DecodeError> {
        let _ = payload;
        Err(DecodeError::Empty)
    }
}

/// A validation failure in one profile file, with where it is.
#[derive(Debug, Clone, Serialize)]
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

/// The profiles in force, by name.
#[derive(Debug, Default)]
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
}

/// What loading a directory produced: the profiles that validated, and why the others did not.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub set: ProfileSet,
    pub errors: Vec<ProfileError>,
}

/// Loads and validates every `*.toml` in `dir`. A bad file never takes down the others.
pub fn load_dir(dir: &Path) -> LoadReport {
    let _ = dir;
    LoadReport::default()
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
