//! Who is calling: JWT users (dashboards, admins) and device API keys.
//!
//! [`jwt`] verifies tokens exactly as the contract says (exp required, 30 s leeway, HS256 by default,
//! RS256/ES256 by PEM key or JWKS); [`apikey`] makes and hashes device keys; [`Caller`] is what the
//! HTTP layer and the socket layer authorise against.

pub mod apikey;
pub mod jwt;

use serde::{Deserialize, Serialize};

pub use jwt::{AuthError, JwtVerifier, UserClaims};

use crate::wire::KeyScope;

/// A user's role; a token without one is a `viewer`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    #[default]
    Viewer,
    Operator,
    Admin,
}

/// A device or service authenticated by an API key.
#[derive(Debug, Clone)]
pub struct KeyIdentity {
    pub id: String,
    pub org_id: String,
    pub scopes: Vec<KeyScope>,
}

/// The authenticated principal of one HTTP request.
#[derive(Debug, Clone)]
pub enum Caller {
    User(UserClaims),
    Key(KeyIdentity),
}

impl Caller {
    pub fn org_id(&self) -> &str {
        match self {
            Caller::User(u) => &u.org_id,
            Caller::Key(k) => &k.org_id,
        }
    }

    /// Whether the caller may see this site (`site_ids` restricts users; keys see their whole org).
    pub fn can_see_site(&self, site_id: &str) -> bool {
        match self {
            Caller::User(u) => u.can_see_site(site_id),
            Caller::Key(_) => true,
        }
    }
}

pub use crate::wire::valid_id;

/// The credential of an `Authorization: Bearer <credential>` header, trimmed; `None` when the
/// header is absent, not Bearer, or empty. The scheme is case-insensitive (RFC 7235). HTTP
/// requests and Socket.io handshakes both read it here.
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, credential) = value.split_once(' ')?;
    let credential = credential.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !credential.is_empty()).then_some(credential)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_takes_the_credential_of_any_case_scheme() {
        let headers = |v: &str| {
            let mut h = axum::http::HeaderMap::new();
            h.insert(axum::http::header::AUTHORIZATION, v.parse().unwrap());
            h
        };
        assert_eq!(bearer(&headers("Bearer abc")), Some("abc"));
        assert_eq!(bearer(&headers("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(&headers("BEARER abc")), Some("abc"));
        assert_eq!(bearer(&headers("Basic abc")), None);
        assert_eq!(bearer(&headers("Bearer ")), None);
        assert_eq!(bearer(&headers("Bearer")), None);
        assert_eq!(bearer(&axum::http::HeaderMap::new()), None);
    }

    #[test]
    fn ids() {
        assert!(valid_id("u-1"));
        assert!(valid_id("site.a:b_c"));
        assert!(!valid_id(""));
        assert!(!valid_id(&"x".repeat(65)));
        assert!(valid_id(&"x".repeat(64)));
        assert!(!valid_id("a b"));
        assert!(!valid_id("a|b"));
        assert!(!valid_id("é"));
    }
}
