//! Device tokens at rest: a per-device random salt and SHA-256(salt || token). The token
//! itself is never stored or returned.
//!
//! Device tokens are machine secrets checked on every uplink, so a fast hash is the right
//! tool (a password KDF would cost milliseconds per uplink); the salt keeps equal tokens
//! from producing equal rows, and the comparison runs in constant time.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

pub const SALT_LEN: usize = 16;
pub const HASH_LEN: usize = 32;

/// A stored device token.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenHash {
    salt: [u8; SALT_LEN],
    hash: [u8; HASH_LEN],
}

impl std::fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenHash(..)")
    }
}

impl TokenHash {
    /// Hashes `token` with a fresh random salt.
    pub fn new(token: &str) -> TokenHash {
        let salt = random_salt();
        TokenHash {
            salt,
            hash: digest(&salt, token),
        }
    }

    /// Rebuilds a stored hash from its database columns; `None` if the sizes are wrong.
    pub fn from_parts(salt: &[u8], hash: &[u8]) -> Option<TokenHash> {
        Some(TokenHash {
            salt: salt.try_into().ok()?,
            hash: hash.try_into().ok()?,
        })
    }

    pub fn salt(&self) -> &[u8; SALT_LEN] {
        &self.salt
    }

    pub fn hash(&self) -> &[u8; HASH_LEN] {
        &self.hash
    }

    /// True when `token` is the one this hash was made from (constant time in the token's
    /// content).
    pub fn verify(&self, token: &str) -> bool {
        constant_time_eq(&digest(&self.salt, token), &self.hash)
    }
}

fn digest(salt: &[u8], token: &str) -> [u8; HASH_LEN] {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(token.as_bytes());
    h.finalize().into()
}

/// Compares without an early exit, so the time taken does not reveal how many leading
/// bytes matched. (Lengths are public: callers compare fixed-size digests.)
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// SHA-256 of a secret, for comparing secrets of different lengths in constant time.
pub fn sha256(secret: &[u8]) -> [u8; HASH_LEN] {
    Sha256::digest(secret).into()
}

/// 16 unpredictable, unique bytes. A salt needs uniqueness more than secrecy; std's
/// `RandomState` is keyed from the OS random source, and SipHash of a process-wide counter
/// and the clock under that key gives both without another dependency.
fn random_salt() -> [u8; SALT_LEN] {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let state = std::collections::hash_map::RandomState::new();
    let mut out = [0u8; SALT_LEN];
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        let mut h = state.build_hasher();
        h.write_u64(n);
        h.write_u128(nanos);
        h.write_usize(i);
        chunk.copy_from_slice(&h.finish().to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifies_only_the_right_token() {
        let a = TokenHash::new("secret-token-1");
        let b = TokenHash::new("secret-token-1");
        assert!(a.verify("secret-token-1"));
        assert!(!a.verify("secret-token-2"));
        assert!(!a.verify(""));
        assert_ne!(a.salt(), b.salt(), "salts are unique");
        assert_ne!(a.hash(), b.hash(), "so equal tokens give different hashes");
        let back = TokenHash::from_parts(a.salt(), a.hash()).unwrap();
        assert!(back.verify("secret-token-1"));
        assert!(TokenHash::from_parts(&[0; 3], a.hash()).is_none());
    }

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
