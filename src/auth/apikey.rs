//! Device API keys: random, shown once, stored only as a SHA-256 hash.
//!
//! Keys carry 256 bits of randomness, so a fast hash is enough (no password-style stretching);
//! the `sw_` prefix lets the HTTP layer tell a key from a JWT in an `Authorization: Bearer` header.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use sha2::{Digest, Sha256};

pub const KEY_PREFIX: &str = "sw_";

/// A new key: its public id, the secret to hand over once, and the hash to store.
pub struct NewKey {
    pub id: String,
    pub secret: String,
    pub hash: String,
}

pub fn generate() -> NewKey {
    let mut rng = rand::rng();
    let mut secret = [0u8; 32];
    rng.fill_bytes(&mut secret);
    let mut id = [0u8; 6];
    rng.fill_bytes(&mut id);
    let secret = format!("{KEY_PREFIX}{}", URL_SAFE_NO_PAD.encode(secret));
    NewKey {
        id: format!("key_{}", hex::encode(id)),
        hash: hash(&secret),
        secret,
    }
}

pub fn hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

pub fn looks_like_key(token: &str) -> bool {
    token.starts_with(KEY_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_unique_and_hash_stably() {
        let a = generate();
        let b = generate();
        assert_ne!(a.secret, b.secret);
        assert_ne!(a.id, b.id);
        assert!(looks_like_key(&a.secret));
        assert_eq!(hash(&a.secret), a.hash);
        assert_ne!(a.hash, b.hash);
    }
}
