//! JWT verification and (for development) minting.
//!
//! The rules are the contract's: `exp` is required, 30 s of leeway, `iss`/`aud` checked only when
//! configured, claims `sub` + `org_id` required, `role` defaulting to `viewer`. The same
//! [`JwtVerifier::verify`] serves the HTTP API, the Socket.io handshake and `auth:refresh`, so a
//! token is either good everywhere or nowhere.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};

use super::Role;
use crate::config::JwtArgs;

/// Seconds a token stays acceptable past its `exp`.
pub const LEEWAY_SECS: i64 = 30;

/// The verified identity a token carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserClaims {
    pub sub: String,
    pub org_id: String,
    #[serde(default)]
    pub role: Role,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site_ids: Option<Vec<String>>,
    pub exp: i64,
}

impl UserClaims {
    pub fn can_see_site(&self, site_id: &str) -> bool {
        match &self.site_ids {
            Some(ids) => ids.iter().any(|s| s == site_id),
            None => true,
        }
    }

    /// The instant (seconds since the epoch) after which the token is no longer accepted.
    pub fn deadline(&self) -> i64 {
        self.exp.saturating_add(LEEWAY_SECS)
    }
}

/// Why a token was refused. `Display` is exactly the contract's `connect_error` message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("unauthorized: missing token")]
    Missing,
    #[error("unauthorized: invalid token")]
    Invalid,
    #[error("unauthorized: token expired")]
    Expired,
}

impl AuthError {
    /// The short code used in acks (`auth:refresh`).
    pub fn code(self) -> &'static str {
        match self {
            AuthError::Missing | AuthError::Invalid => "invalid_token",
            AuthError::Expired => "token_expired",
        }
    }
}

enum Keys {
    /// HS256 with a shared secret; also able to mint tokens.
    Secret {
        decoding: DecodingKey,
        encoding: EncodingKey,
    },
    /// RS256 or ES256 with one public key.
    Public { key: DecodingKey, alg: Algorithm },
    /// RS256/ES256 keys picked by the token's `kid`.
    Jwks(JwkSet),
}

/// Verifies (and, with a shared secret, mints) tokens.
pub struct JwtVerifier {
    keys: Keys,
    issuer: Option<String>,
    audience: Option<String>,
}

/// A key setting that cannot be used, naming the setting.
#[derive(Debug, thiserror::Error)]
#[error("{setting}: {problem}")]
pub struct KeyError {
    pub setting: &'static str,
    pub problem: String,
}

impl JwtVerifier {
    /// Builds the verifier from configuration. Without any key setting, `dev_secret` is used
    /// (see [`dev_secret`]); pass `None` to make a key setting mandatory.
    pub fn from_args(args: &JwtArgs, dev_secret: Option<String>) -> Result<Self, KeyError> {
        let keys = if let Some(secret) = &args.jwt_secret {
            secret_keys(secret)
        } else if let Some(path) = &args.jwt_public_key_file {
            public_key(path)?
        } else if let Some(path) = &args.jwks_file {
            let text = read(path, "JWKS_FILE")?;
            let set: JwkSet = serde_json::from_str(&text).map_err(|e| KeyError {
                setting: "JWKS_FILE",
                problem: format!("{} is not a JWKS document: {e}", path.display()),
            })?;
            Keys::Jwks(set)
        } else if let Some(secret) = dev_secret {
            secret_keys(&secret)
        } else {
            return Err(KeyError {
                setting: "JWT_SECRET",
                problem: "not set: set JWT_SECRET (HS256), JWT_PUBLIC_KEY_FILE or JWKS_FILE".into(),
            });
        };
        Ok(JwtVerifier {
            keys,
            issuer: args.jwt_issuer.clone(),
            audience: args.jwt_audience.clone(),
        })
    }

    /// A verifier for a known secret (tests, tools).
    pub fn with_secret(secret: &str) -> Self {
        JwtVerifier {
            keys: secret_keys(secret),
            issuer: None,
            audience: None,
        }
    }

    pub fn verify(&self, token: &str) -> Result<UserClaims, AuthError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Invalid)?;
        let (key, alg) = match &self.keys {
            Keys::Secret { decoding, .. } => (decoding.clone(), Algorithm::HS256),
            Keys::Public { key, alg } => (key.clone(), *alg),
            Keys::Jwks(set) => {
                let jwk = match &header.kid {
                    Some(kid) => set.find(kid),
                    None if set.keys.len() == 1 => set.keys.first(),
                    None => None,
                }
                .ok_or(AuthError::Invalid)?;
                if !matches!(header.alg, Algorithm::RS256 | Algorithm::ES256) {
                    return Err(AuthError::Invalid);
                }
                (
                    DecodingKey::from_jwk(jwk).map_err(|_| AuthError::Invalid)?,
                    header.alg,
                )
            }
        };
        if header.alg != alg {
            return Err(AuthError::Invalid);
        }
        let mut validation = Validation::new(alg);
        validation.leeway = LEEWAY_SECS as u64;
        validation.set_required_spec_claims(&["exp", "sub"]);
        match &self.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &self.issuer {
            validation.set_issuer(&[iss]);
        }
        let data =
            jsonwebtoken::decode::<UserClaims>(token, &key, &validation).map_err(|e| {
                match e.kind() {
                    ErrorKind::ExpiredSignature => AuthError::Expired,
                    _ => AuthError::Invalid,
                }
            })?;
        let claims = data.claims;
        if claims.sub.is_empty() || !valid_org_id(&claims.org_id) {
            return Err(AuthError::Invalid);
        }
        Ok(claims)
    }

    /// Mints an HS256 token (for `sensorwire token` and the demo). `None` for public-key setups,
    /// where tokens come from the identity provider.
    pub fn mint(&self, claims: &UserClaims) -> Option<String> {
        match &self.keys {
            Keys::Secret { encoding, .. } => {
                jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, encoding).ok()
            }
            _ => None,
        }
    }
}

/// Organisation ids become part of room names, so they are held to a safe alphabet.
pub fn valid_org_id(org: &str) -> bool {
    !org.is_empty()
        && org.len() <= 128
        && org
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-' | b'@'))
}

fn secret_keys(secret: &str) -> Keys {
    Keys::Secret {
        decoding: DecodingKey::from_secret(secret.as_bytes()),
        encoding: EncodingKey::from_secret(secret.as_bytes()),
    }
}

fn read(path: &Path, setting: &'static str) -> Result<String, KeyError> {
    std::fs::read_to_string(path).map_err(|e| KeyError {
        setting,
        problem: format!("cannot read {}: {e}", path.display()),
    })
}

fn public_key(path: &Path) -> Result<Keys, KeyError> {
    let pem = read(path, "JWT_PUBLIC_KEY_FILE")?;
    if let Ok(key) = DecodingKey::from_rsa_pem(pem.as_bytes()) {
        return Ok(Keys::Public {
            key,
            alg: Algorithm::RS256,
        });
    }
    if let Ok(key) = DecodingKey::from_ec_pem(pem.as_bytes()) {
        return Ok(Keys::Public {
            key,
            alg: Algorithm::ES256,
        });
    }
    Err(KeyError {
        setting: "JWT_PUBLIC_KEY_FILE",
        problem: format!("{} is not an RSA or EC public key in PEM", path.display()),
    })
}

/// Loads (or creates on first use) the development secret under `data_dir`, so a fresh checkout
/// runs with no setup and `sensorwire token` mints tokens the server accepts. Production sets
/// JWT_SECRET or a public key; the server logs a warning whenever this fallback is in use.
pub fn dev_secret(data_dir: &Path) -> std::io::Result<String> {
    let path = data_dir.join("dev-jwt-secret");
    if let Ok(secret) = std::fs::read_to_string(&path) {
        let secret = secret.trim().to_string();
        if secret.len() >= 16 {
            return Ok(secret);
        }
    }
    std::fs::create_dir_all(data_dir)?;
    let mut bytes = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
    let secret = hex::encode(bytes);
    std::fs::write(&path, &secret)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(secret)
}

pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: i64) -> UserClaims {
        UserClaims {
            sub: "alice".into(),
            org_id: "acme".into(),
            role: Role::Admin,
            site_ids: None,
            exp,
        }
    }

    #[test]
    fn round_trip_and_expiry_with_leeway() {
        let v = JwtVerifier::with_secret("0123456789abcdef0123");
        let now = now_secs();
        let t = v.mint(&claims(now + 60)).unwrap();
        assert_eq!(v.verify(&t).unwrap(), claims(now + 60));
        // Inside the 30 s leeway: still accepted.
        let t = v.mint(&claims(now - 10)).unwrap();
        assert!(v.verify(&t).is_ok());
        let t = v.mint(&claims(now - 120)).unwrap();
        assert_eq!(v.verify(&t), Err(AuthError::Expired));
    }

    #[test]
    fn refuses_wrong_secret_garbage_and_bad_org() {
        let v = JwtVerifier::with_secret("0123456789abcdef0123");
        let other = JwtVerifier::with_secret("another-secret-0123456");
        let t = other.mint(&claims(now_secs() + 60)).unwrap();
        assert_eq!(v.verify(&t), Err(AuthError::Invalid));
        assert_eq!(v.verify("garbage"), Err(AuthError::Invalid));
        assert_eq!(v.verify(""), Err(AuthError::Missing));
        let mut c = claims(now_secs() + 60);
        c.org_id = "a|b".into();
        assert_eq!(v.verify(&v.mint(&c).unwrap()), Err(AuthError::Invalid));
    }

    #[test]
    fn role_defaults_to_viewer_and_exp_is_required() {
        let secret = "0123456789abcdef0123";
        let v = JwtVerifier::with_secret(secret);
        let key = EncodingKey::from_secret(secret.as_bytes());
        let no_role = serde_json::json!({"sub": "a", "org_id": "o", "exp": now_secs() + 60});
        let t = jsonwebtoken::encode(&Header::default(), &no_role, &key).unwrap();
        assert_eq!(v.verify(&t).unwrap().role, Role::Viewer);
        let no_exp = serde_json::json!({"sub": "a", "org_id": "o"});
        let t = jsonwebtoken::encode(&Header::default(), &no_exp, &key).unwrap();
        assert_eq!(v.verify(&t), Err(AuthError::Invalid));
        let bad_role =
            serde_json::json!({"sub": "a", "org_id": "o", "role": "root", "exp": now_secs() + 60});
        let t = jsonwebtoken::encode(&Header::default(), &bad_role, &key).unwrap();
        assert_eq!(v.verify(&t), Err(AuthError::Invalid));
    }

    /// RS256 and ES256 with a PEM public key, and ES256 through a JWKS chosen by `kid`, with
    /// `iss`/`aud` enforced when configured. Keys are test-only fixtures in `tests/fixtures`.
    #[test]
    fn public_keys_jwks_issuer_and_audience() {
        let fixture = |f: &str| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures")
                .join(f)
        };
        let pem = |f: &str| std::fs::read(fixture(f)).unwrap();
        let args = |public: Option<&str>, jwks: Option<&str>| JwtArgs {
            jwt_secret: None,
            jwt_public_key_file: public.map(fixture),
            jwks_file: jwks.map(fixture),
            jwt_issuer: Some("https://id.example".into()),
            jwt_audience: Some("sensorwire".into()),
        };
        let claims = |iss: &str, aud: &str| serde_json::json!({ "sub": "a", "org_id": "o", "exp": now_secs() + 60, "iss": iss, "aud": aud });
        let sign = |alg: Algorithm, key: EncodingKey, kid: Option<&str>, c: serde_json::Value| {
            let mut h = Header::new(alg);
            h.kid = kid.map(str::to_string);
            jsonwebtoken::encode(&h, &c, &key).unwrap()
        };
        let rsa = EncodingKey::from_rsa_pem(&pem("rs256-private.pem")).unwrap();
        let ec = || EncodingKey::from_ec_pem(&pem("es256-private.pem")).unwrap();
        let good = claims("https://id.example", "sensorwire");

        let rs = JwtVerifier::from_args(&args(Some("rs256-public.pem"), None), None).unwrap();
        assert!(
            rs.verify(&sign(Algorithm::RS256, rsa.clone(), None, good.clone()))
                .is_ok()
        );
        let wrong_aud = claims("https://id.example", "other");
        assert_eq!(
            rs.verify(&sign(Algorithm::RS256, rsa.clone(), None, wrong_aud)),
            Err(AuthError::Invalid)
        );
        let wrong_iss = claims("https://evil.example", "sensorwire");
        assert_eq!(
            rs.verify(&sign(Algorithm::RS256, rsa, None, wrong_iss)),
            Err(AuthError::Invalid)
        );
        // An HS256 token signed with the public key as a secret is refused (algorithm confusion).
        let confused = EncodingKey::from_secret(&pem("rs256-public.pem"));
        assert_eq!(
            rs.verify(&sign(Algorithm::HS256, confused, None, good.clone())),
            Err(AuthError::Invalid)
        );

        let es = JwtVerifier::from_args(&args(Some("es256-public.pem"), None), None).unwrap();
        assert!(
            es.verify(&sign(Algorithm::ES256, ec(), None, good.clone()))
                .is_ok()
        );

        let jwks = JwtVerifier::from_args(&args(None, Some("jwks.json")), None).unwrap();
        assert!(
            jwks.verify(&sign(Algorithm::ES256, ec(), Some("test-es"), good.clone()))
                .is_ok()
        );
        assert_eq!(
            jwks.verify(&sign(Algorithm::ES256, ec(), Some("unknown"), good)),
            Err(AuthError::Invalid)
        );
        assert!(
            jwks.mint(&UserClaims {
                sub: "a".into(),
                org_id: "o".into(),
                role: Role::Viewer,
                site_ids: None,
                exp: 0
            })
            .is_none()
        );

        let missing = JwtVerifier::from_args(&args(Some("nope.pem"), None), None);
        assert!(missing.is_err_and(|e| e.setting == "JWT_PUBLIC_KEY_FILE"));
    }
}
