//! Client API keys: `Authorization: Bearer <key>` on the gRPC Generation
//! service and the HTTP `/v1` routes. Health, reflection and metrics stay
//! open for probes and scrapers.

use std::collections::HashSet;
use std::path::Path;
use subtle::{Choice, ConstantTimeEq};

#[derive(Clone, Debug, Default)]
pub struct ApiKeys {
    keys: HashSet<String>,
}

impl ApiKeys {
    /// Keys from the command line plus a file of one key per line (blank
    /// lines and `#` comments ignored).
    pub fn load(keys: &[String], file: Option<&Path>) -> std::io::Result<Self> {
        let mut set: HashSet<String> = keys.iter().filter(|k| !k.is_empty()).cloned().collect();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)?;
            set.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(String::from),
            );
        }
        Ok(ApiKeys { keys: set })
    }

    /// No keys configured: everyone is let in.
    pub fn is_open(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether an `Authorization` header value carries a valid key. The
    /// scheme is case-insensitive (`Bearer`, `bearer`, ...; RFC 9110, 11.1).
    pub fn allows(&self, authorization: Option<&str>) -> bool {
        if self.is_open() {
            return true;
        }
        let Some(key) = authorization.and_then(bearer_token) else {
            return false;
        };
        // Compare against every key in constant time per key (`subtle`), so
        // the response time does not tell how much of a key was right.
        let ok = self.keys.iter().fold(Choice::from(0), |ok, k| {
            ok | k.as_bytes().ct_eq(key.as_bytes())
        });
        ok.into()
    }
}

/// The token of a `Bearer` credential, the scheme in any case.
fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_keys() {
        let keys = ApiKeys::load(&["secret-1".into()], None).unwrap();
        assert!(keys.allows(Some("Bearer secret-1")));
        assert!(!keys.allows(Some("Bearer secret-2")));
        assert!(!keys.allows(Some("secret-1")));
        assert!(!keys.allows(None));
        assert!(ApiKeys::default().allows(None));
        // The scheme in any case, as gRPC metadata sends it too.
        assert!(keys.allows(Some("bearer secret-1")));
        assert!(keys.allows(Some("BEARER secret-1")));
        assert!(!keys.allows(Some("Bearer")));
        assert!(!keys.allows(Some("Bearer ")));
        assert!(!keys.allows(Some("Bearersecret-1")));
        assert!(!keys.allows(Some("Basic secret-1")));
    }
}
