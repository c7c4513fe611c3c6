//! API keys: checks `Authorization: Bearer <key>` in constant time against SHA-256 digests of the configured keys.

use axum::http::{header, HeaderMap};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ApiError;

/// The accepted keys, held only as digests (the key text is not kept in memory after start-up).
#[derive(Clone, Default)]
pub struct ApiKeys {
    digests: Vec<[u8; 32]>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.digests.len())
    }
}

fn digest(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

impl ApiKeys {
    pub fn new<S: AsRef<str>>(keys: &[S]) -> Self {
        ApiKeys {
            digests: keys.iter().map(|k| digest(k.as_ref().as_bytes())).collect(),
        }
    }

    /// Authentication is on when at least one key is configured.
    pub fn enabled(&self) -> bool {
        !self.digests.is_empty()
    }

    pub fn len(&self) -> usize {
        self.digests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// Whether `presented` is one of the keys. Digests have a fixed length, so the comparison's time depends
    /// neither on where the key differs nor on its length; every key is compared, matched or not.
    pub fn accepts(&self, presented: &[u8]) -> bool {
        let presented = digest(presented);
        self.digests
            .iter()
            .fold(subtle::Choice::from(0), |found, key| {
                found | key.ct_eq(&presented)
            })
            .into()
    }

    /// Ok when authentication is off or the request carries an accepted bearer key; else 401.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        if !self.enabled() {
            return Ok(());
        }
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Err(ApiError::Unauthorized(
                "missing API key: send `Authorization: Bearer <key>`",
            ));
        };
        let token = bearer_token(value.as_bytes()).ok_or(ApiError::Unauthorized(
            "malformed Authorization header: expected `Bearer <key>`",
        ))?;
        if self.accepts(token) {
            Ok(())
        } else {
            Err(ApiError::Unauthorized("API key not accepted"))
        }
    }
}

/// The credentials of `Bearer <token>` (scheme case-insensitive, RFC 6750), trimmed; None for other schemes.
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at(value.iter().position(|&b| b == b' ')?);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn any_configured_key_is_accepted_and_nothing_else() {
        let keys = ApiKeys::new(&["old-key-0123456789", "new-key-0123456789"]);
        assert!(keys.check(&headers("Bearer old-key-0123456789")).is_ok());
        assert!(keys.check(&headers("bearer  new-key-0123456789 ")).is_ok());
        for bad in [
            "Bearer new-key-012345678",
            "Bearer new-key-01234567890",
            "Basic new-key-0123456789",
            "Bearer",
            "Bearer ",
            "new-key-0123456789",
        ] {
            let error = keys.check(&headers(bad)).unwrap_err();
            assert_eq!(error.code(), "unauthorized", "{bad}");
        }
        assert_eq!(
            keys.check(&HeaderMap::new()).unwrap_err().code(),
            "unauthorized"
        );
    }

    #[test]
    fn no_keys_means_open() {
        let keys = ApiKeys::default();
        assert!(!keys.enabled());
        assert!(keys.check(&HeaderMap::new()).is_ok());
    }
}
